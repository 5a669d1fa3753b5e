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
