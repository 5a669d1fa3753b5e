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

/** Runs `fn` and returns its result as a promise: a value resolves it, a throw rejects it. */
export function promiseOf<T>(fn: () => T | Promise<T>): Promise<T> {
  try {
    return Promise.resolve(fn());
  } catch (err) {
    return Promise.reject(err);
  }
}

/**
 * Calls `poll` until it returns a value or `ms` milliseconds have passed, calling `pause` between
 * attempts; `undefined` if nothing came. It holds the calling thread for at most about `ms`.
 */
export function spinFor<T>(ms: number, poll: () => T | undefined, pause: () => void): T | undefined {
  const until = performance.now() + ms;
  do {
    const value = poll();
    if (value !== undefined) return value;
    pause();
  } while (performance.now() < until);
  return undefined;
}
