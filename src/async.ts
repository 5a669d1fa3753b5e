/**
 * Small promise helpers shared by the core and the adapters.
 *
 * @module
 */

/**
 * Settles with `promise`, or with `undefined` once `ms` have passed. The timer never outlives the
 * race, so a finished wait never keeps the program alive.
 */
export async function within<T>(promise: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<undefined>((resolve) => timer = setTimeout(() => resolve(undefined), ms)),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Waits `graceMs` for a child to exit by itself, then sends SIGTERM, then SIGKILL after another
 * second. Resolves with the exit and whether it had to be killed.
 */
export async function endChild<T>(
  exited: Promise<T>,
  kill: (signal: "SIGTERM" | "SIGKILL") => void,
  graceMs: number,
): Promise<{ exit: T; killed: boolean }> {
  const exit = await within(exited, graceMs);
  if (exit !== undefined) return { exit, killed: false };
  kill("SIGTERM");
  if ((await within(exited, 1000)) === undefined) kill("SIGKILL");
  return { exit: await exited, killed: true };
}
