import assert from "node:assert/strict";
import { isRetryable, jitterFraction, retryDelay } from "./backoff.ts";
import { retryPolicy } from "./_testing.ts";

Deno.test("retryDelay grows by factor and is capped without jitter", () => {
  const policy = retryPolicy({ backoffMs: 1000, factor: 2, maxBackoffMs: 5000, jitter: 0 });
  const delays = [1, 2, 3, 4, 5].map((retry) => retryDelay(policy, { retry, key: "k" }));
  assert.deepEqual(delays, [1000, 2000, 4000, 5000, 5000]);
});

Deno.test("retryDelay jitter stays within its fraction and is deterministic per key", () => {
  const policy = retryPolicy({ backoffMs: 1000, factor: 1, maxBackoffMs: 1000, jitter: 0.5 });
  const seen = new Set<number>();
  for (let i = 0; i < 200; i++) {
    const key = `run/step/${i}`;
    const delay = retryDelay(policy, { retry: 1, key });
    assert.ok(delay >= 500 && delay <= 1000, `delay ${delay} out of range`);
    assert.equal(delay, retryDelay(policy, { retry: 1, key }));
    seen.add(delay);
  }
  assert.ok(seen.size > 50, "jitter should spread delays");
});

Deno.test("retryDelay survives huge exponents", () => {
  const policy = retryPolicy({ backoffMs: 1000, factor: 10, maxBackoffMs: 30_000 });
  assert.equal(retryDelay(policy, { retry: 5000, key: "k" }), 30_000);
});

Deno.test("jitterFraction is in [0, 1) and roughly uniform", () => {
  const buckets = new Array(10).fill(0);
  for (let i = 0; i < 10_000; i++) {
    const u = jitterFraction(`r/s/${i}`);
    assert.ok(u >= 0 && u < 1);
    buckets[Math.floor(u * 10)]++;
  }
  for (const count of buckets) assert.ok(count > 800 && count < 1200, `bucket ${count}`);
});

Deno.test("isRetryable follows classes and exit codes, never business", () => {
  const policy = retryPolicy({ onClasses: ["application", "timeout"], onExitCodes: [75, 65] });
  assert.equal(isRetryable(policy, { errorClass: "application", exitCode: 1 }), true);
  assert.equal(isRetryable(policy, { errorClass: "timeout" }), true);
  assert.equal(isRetryable(policy, { errorClass: "infrastructure" }), false);
  assert.equal(isRetryable(policy, { errorClass: "permission", exitCode: 75 }), true);
  assert.equal(isRetryable(policy, { errorClass: "business", exitCode: 65 }), false);
  assert.equal(
    isRetryable(retryPolicy({ onClasses: ["business"] }), { errorClass: "business" }),
    false,
  );
});
