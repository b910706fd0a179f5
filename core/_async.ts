/**
 * Waiting, in one place: a delay that an abort cuts short, and a race
 * against a deadline.
 *
 * @module
 */

/**
 * Resolves after `ms`, or at once when `signal` aborts (never rejects).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { abortableDelay } from "./_async.ts";
 * const stop = new AbortController();
 * stop.abort();
 * const started = Date.now();
 * await abortableDelay(60_000, stop.signal);
 * assert.ok(Date.now() - started < 1_000);
 * ```
 */
export function abortableDelay(ms: number, signal?: AbortSignal): Promise<void> {
  if (signal?.aborted) return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
  });
}

/**
 * Resolves true if `promise` has not settled within `ms` (its outcome is
 * ignored), false if it settled first.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { raceTimeout } from "./_async.ts";
 * assert.equal(await raceTimeout(Promise.resolve(), 1_000), false);
 * assert.equal(await raceTimeout(new Promise(() => {}), 10), true);
 * ```
 */
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
