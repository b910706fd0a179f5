/**
 * Waiting with a deadline, shared by the backends and the plugin hosts.
 *
 * @module
 */

/** Resolves true if `promise` has not settled within `ms` (its outcome is ignored). */
export async function raceTimeout(promise: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const deadline = new Promise<boolean>((resolve) => {
    timer = setTimeout(() => resolve(true), ms);
  });
  try {
    return await Promise.race([promise.then(() => false, () => false), deadline]);
  } finally {
    clearTimeout(timer);
  }
}
