/**
 * Retry policy arithmetic: which failures are retried and how long to wait.
 *
 * Jitter is drawn from a hash of the attempt id instead of `Math.random`, so
 * the run engine stays deterministic: replaying the same events yields the
 * same retry times, while different attempts (and different runs) still
 * spread out instead of retrying in lockstep.
 *
 * @module
 */

import type { ErrorClass, RetryPolicy } from "./model.ts";

/** What {@link isRetryable} needs to know about a failed attempt. */
export interface FailureSummary {
  errorClass: ErrorClass;
  exitCode?: number;
}

/** Options of {@link retryDelay}. */
export interface RetryDelayOptions {
  /** 1-based number of the retry about to be waited for. */
  retry: number;
  /** Key the jitter is drawn from; the engine passes the failed attempt's id. */
  key: string;
}

/**
 * A fraction in `[0, 1)` derived from `key` alone (FNV-1a, then the murmur3
 * finaliser so that ids differing in their last character spread well).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { jitterFraction } from "./backoff.ts";
 *
 * const fraction = jitterFraction("run-1/build/1");
 * assert.equal(jitterFraction("run-1/build/1"), fraction);
 * assert.ok(fraction >= 0 && fraction < 1);
 * ```
 */
export function jitterFraction(key: string): number {
  let hash = 0x811c9dc5;
  for (let i = 0; i < key.length; i++) {
    hash ^= key.charCodeAt(i);
    hash = Math.imul(hash, 0x01000193);
  }
  hash ^= hash >>> 16;
  hash = Math.imul(hash, 0x85ebca6b);
  hash ^= hash >>> 13;
  hash = Math.imul(hash, 0xc2b2ae35);
  hash ^= hash >>> 16;
  return (hash >>> 0) / 0x1_0000_0000;
}

/**
 * Milliseconds to wait before retry number `options.retry`: `backoffMs ×
 * factor^(retry-1)`, capped at `maxBackoffMs`, of which the `jitter`
 * fraction is randomised downwards (full jitter when `jitter` is 1).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { retryDelay } from "./backoff.ts";
 *
 * const policy = { backoffMs: 1000, maxBackoffMs: 60_000, factor: 2, jitter: 0 };
 * assert.equal(retryDelay(policy, { retry: 3, key: "r/s/3" }), 4000);
 * ```
 */
export function retryDelay(
  policy: Pick<RetryPolicy, "backoffMs" | "maxBackoffMs" | "factor" | "jitter">,
  options: RetryDelayOptions,
): number {
  const exponent = Math.max(0, options.retry - 1);
  const uncapped = policy.backoffMs * Math.pow(policy.factor, exponent);
  const base = Math.max(0, Math.min(policy.maxBackoffMs, uncapped));
  if (!Number.isFinite(base)) return 0;
  const jitter = Math.min(1, Math.max(0, policy.jitter));
  return Math.floor(base - base * jitter * jitterFraction(options.key));
}

/**
 * Whether a failure is retried under `policy`: its class is listed in
 * `onClasses` or its exit code in `onExitCodes` — except business errors,
 * which are never retried because a retry would meet the same answer.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { isRetryable } from "./backoff.ts";
 *
 * const policy = { onClasses: ["application" as const], onExitCodes: [] };
 * assert.equal(isRetryable(policy, { errorClass: "application", exitCode: 1 }), true);
 * assert.equal(isRetryable(policy, { errorClass: "business", exitCode: 65 }), false);
 * ```
 */
export function isRetryable(
  policy: Pick<RetryPolicy, "onClasses" | "onExitCodes">,
  failure: FailureSummary,
): boolean {
  if (failure.errorClass === "business") return false;
  if (policy.onClasses.includes(failure.errorClass)) return true;
  return failure.exitCode !== undefined && policy.onExitCodes.includes(failure.exitCode);
}
