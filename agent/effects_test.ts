import assert from "node:assert/strict";
import { MAX_TIMER_DELAY_MS, WakeTimer } from "./effects.ts";

/** Replaces the global timers while `body` runs: timers fire only when the test says so. */
function withFakeTimers(
  body: (timers: { delays: number[]; fire: () => void }) => void,
): void {
  const real = { setTimeout: globalThis.setTimeout, clearTimeout: globalThis.clearTimeout };
  const armed = new Map<number, () => void>();
  const delays: number[] = [];
  let next = 1;
  globalThis.setTimeout = ((callback: () => void, delay: number) => {
    delays.push(delay);
    armed.set(next, callback);
    return next++;
  }) as unknown as typeof setTimeout;
  globalThis.clearTimeout = ((id: number) => armed.delete(id)) as unknown as typeof clearTimeout;
  const fire = () => {
    assert.equal(armed.size, 1, "expected exactly one armed timer");
    const [[id, callback]] = armed;
    armed.delete(id);
    callback();
  };
  try {
    body({ delays, fire });
  } finally {
    globalThis.setTimeout = real.setTimeout;
    globalThis.clearTimeout = real.clearTimeout;
  }
}

Deno.test("a wake 30 days away is reached in steps a timer can wait, then fires once", () => {
  withFakeTimers(({ delays, fire }) => {
    let now = 0;
    let woken = 0;
    const timer = new WakeTimer(() => woken++, () => now);
    const at = 30 * 86_400_000;
    timer.arm(at);
    assert.deepEqual(delays, [MAX_TIMER_DELAY_MS]);
    now += MAX_TIMER_DELAY_MS;
    fire();
    assert.equal(woken, 0, "a partial wait re-arms instead of waking");
    assert.deepEqual(delays, [MAX_TIMER_DELAY_MS, at - MAX_TIMER_DELAY_MS]);
    now = at;
    fire();
    assert.equal(woken, 1);
  });
});

Deno.test("a later wake never postpones an earlier one; NaN and Infinity arm nothing", () => {
  withFakeTimers(({ delays }) => {
    const timer = new WakeTimer(() => {}, () => 1_000);
    timer.arm(5_000);
    timer.arm(9_000);
    timer.arm(Number.NaN);
    timer.arm(Infinity);
    assert.deepEqual(delays, [4_000]);
    timer.arm(2_000);
    assert.deepEqual(delays, [4_000, 1_000]);
    timer.clear();
  });
});
