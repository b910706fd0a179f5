import assert from "node:assert/strict";
import { formatDuration, parseByteSize, parseCpu, parseDuration } from "./duration.ts";
import { QuantityError } from "./errors.ts";

Deno.test("durations", () => {
  assert.equal(parseDuration("500ms"), 500);
  assert.equal(parseDuration("2s"), 2000);
  assert.equal(parseDuration("10m"), 600_000);
  assert.equal(parseDuration("1h30m"), 5_400_000);
  assert.equal(parseDuration("1d"), 86_400_000);
  assert.equal(parseDuration("1.5s"), 1500);
  assert.throws(() => parseDuration("ten minutes", { key: "timeout" }), {
    name: "QuantityError",
    message: 'Expected a duration like "10m" for "timeout", got "ten minutes"',
  });
  for (const bad of ["", "10", "m", "1 h", "-1s", "1x"]) {
    assert.throws(() => parseDuration(bad), QuantityError, bad);
  }
});

Deno.test("sizes and cpus", () => {
  assert.equal(parseByteSize("64Mi"), 64 * 1024 * 1024);
  assert.equal(parseByteSize("1G"), 1e9);
  assert.equal(parseByteSize(1024), 1024);
  assert.equal(parseByteSize("512"), 512);
  assert.throws(() => parseByteSize("lots", { key: "memory" }), /for "memory", got "lots"/);
  assert.equal(parseCpu("500m"), 0.5);
  assert.equal(parseCpu(2), 2);
  assert.throws(() => parseCpu("two"), QuantityError);
  assert.throws(() => parseCpu(0), QuantityError);
});

Deno.test("durations keep their bounds; the message names them", () => {
  const bounds = { key: "timeout", minMs: 1, maxMs: 7 * 86_400_000 };
  assert.equal(parseDuration("7d", bounds), 7 * 86_400_000);
  assert.equal(parseDuration("1ms", bounds), 1);
  for (const text of ["0s", "7d1ms", "30d", "99999999d", `${"9".repeat(400)}d`]) {
    assert.throws(() => parseDuration(text, bounds), {
      name: "QuantityError",
      message: `Expected a duration from 1ms to 7d for "timeout", got "${text}"`,
    });
  }
  assert.equal(formatDuration(0), "0s");
  assert.equal(formatDuration(7 * 86_400_000), "7d");
  assert.equal(formatDuration(3_723_004), "1h2m3s4ms");
});
