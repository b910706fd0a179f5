/**
 * Quantities written in pipeline files: durations (`1h30m`), memory sizes
 * (`64Mi`, `1G`) and CPU counts (`0.5`, `500m`).
 *
 * @module
 */

import { QuantityError } from "./errors.ts";

/** Pattern of a duration: one or more `<number><unit>` parts, units ms, s, m, h, d. */
export const DURATION_PATTERN = /^(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+$/;
/** Pattern of a memory size: a number with an optional SI or binary unit suffix. */
export const SIZE_PATTERN = /^\d+(?:\.\d+)?(?:[kKMGTP]i?|[kKMGTP]B|B)?$/;
/** Pattern of a CPU quantity written in millicores. */
export const MILLICPU_PATTERN = /^\d+m$/;

/**
 * Longest timeout or delay a pipeline may ask for: 7 days. Far above any
 * step's real need, and far below the 2^31-1 ms (24.8 days) a `setTimeout`
 * can wait: a longer wait overflows and fires after 1 ms.
 */
export const MAX_DURATION_MS = 7 * 86_400_000;

const DURATION_UNITS_MS: Record<string, number> = {
  ms: 1,
  s: 1_000,
  m: 60_000,
  h: 3_600_000,
  d: 86_400_000,
};

const SIZE_UNITS: Record<string, number> = {
  "": 1,
  B: 1,
  k: 1e3,
  K: 1e3,
  kB: 1e3,
  KB: 1e3,
  M: 1e6,
  MB: 1e6,
  G: 1e9,
  GB: 1e9,
  T: 1e12,
  TB: 1e12,
  P: 1e15,
  PB: 1e15,
  Ki: 2 ** 10,
  ki: 2 ** 10,
  Mi: 2 ** 20,
  Gi: 2 ** 30,
  Ti: 2 ** 40,
  Pi: 2 ** 50,
};

/** Options naming what is being parsed, for the error message. */
export interface QuantityOptions {
  /** The key the value came from, e.g. `timeout`. */
  key?: string;
}

/** Options of {@link parseDuration}: what is parsed, and the bounds it must keep. */
export interface DurationOptions extends QuantityOptions {
  /** Shortest duration accepted, in ms (included); default 0. */
  minMs?: number;
  /** Longest duration accepted, in ms (included); default unbounded. */
  maxMs?: number;
}

/** True when `text` is a valid duration. */
export function isDuration(text: string): boolean {
  return DURATION_PATTERN.test(text);
}

/**
 * Parses a duration like `"1h30m"` into milliseconds, within the bounds
 * `options` gives.
 *
 * @throws {QuantityError} `Expected a duration like "10m" for "timeout", got "ten minutes"`,
 * or `Expected a duration from 1ms to 7d for "timeout", got "30d"`.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseDuration } from "./duration.ts";
 *
 * assert.equal(parseDuration("1h30m"), 5_400_000);
 * assert.throws(() => parseDuration("ten minutes"), /Expected a duration like "10m"/);
 * assert.throws(
 *   () => parseDuration("30d", { key: "timeout", minMs: 1, maxMs: 7 * 86_400_000 }),
 *   /Expected a duration from 1ms to 7d for "timeout", got "30d"/,
 * );
 * ```
 */
export function parseDuration(text: string, options: DurationOptions = {}): number {
  const key = options.key ? ` for "${options.key}"` : "";
  if (!isDuration(text)) {
    throw new QuantityError(`Expected a duration like "10m"${key}, got ${JSON.stringify(text)}`);
  }
  let total = 0;
  for (const part of text.matchAll(/(\d+(?:\.\d+)?)(ms|s|m|h|d)/g)) {
    total += Number(part[1]) * DURATION_UNITS_MS[part[2]];
  }
  const ms = Math.round(total);
  if (!durationWithin(ms, options)) {
    throw new QuantityError(
      `Expected ${describeDurationBounds(options)}${key}, got ${JSON.stringify(text)}`,
    );
  }
  return ms;
}

/** Whether `ms` (a parsed duration) keeps the bounds; `Infinity` never does. */
export function durationWithin(
  ms: number,
  bounds: Pick<DurationOptions, "minMs" | "maxMs">,
): boolean {
  return Number.isFinite(ms) && ms >= (bounds.minMs ?? 0) && ms <= (bounds.maxMs ?? Infinity);
}

/** The bounds of a duration in words: `a duration from 1ms to 7d`. */
export function describeDurationBounds(bounds: Pick<DurationOptions, "minMs" | "maxMs">): string {
  const min = bounds.minMs ?? 0;
  if (bounds.maxMs === undefined) return `a duration of at least ${formatDuration(min)}`;
  return `a duration from ${formatDuration(min)} to ${formatDuration(bounds.maxMs)}`;
}

/**
 * Writes milliseconds as the shortest duration text that parses back to
 * them: `"7d"`, `"1h30m"`, `"1ms"`, `"0s"`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { formatDuration, parseDuration } from "./duration.ts";
 *
 * assert.equal(formatDuration(5_400_000), "1h30m");
 * assert.equal(parseDuration(formatDuration(90_061_001)), 90_061_001);
 * ```
 */
export function formatDuration(ms: number): string {
  if (ms === 0) return "0s";
  let rest = Math.round(ms);
  let text = "";
  for (const unit of ["d", "h", "m", "s", "ms"]) {
    const size = DURATION_UNITS_MS[unit];
    if (rest >= size) {
      text += `${Math.floor(rest / size)}${unit}`;
      rest %= size;
    }
  }
  return text;
}

/**
 * Parses a memory size (`"64Mi"`, `"1G"` or a byte count) into bytes.
 *
 * @throws {QuantityError} when the text is not a size.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseByteSize } from "./duration.ts";
 *
 * assert.equal(parseByteSize("64Mi"), 67_108_864);
 * assert.equal(parseByteSize("1G"), 1_000_000_000);
 * ```
 */
export function parseByteSize(value: string | number, options: QuantityOptions = {}): number {
  const text = String(value);
  const match = SIZE_PATTERN.test(text) ? /^(\d+(?:\.\d+)?)(.*)$/.exec(text) : null;
  if (!match || !(match[2] in SIZE_UNITS)) {
    const key = options.key ? ` for "${options.key}"` : "";
    throw new QuantityError(
      `Expected a size like "64Mi" or "1G"${key}, got ${JSON.stringify(text)}`,
    );
  }
  return Math.round(Number(match[1]) * SIZE_UNITS[match[2]]);
}

/**
 * Parses a CPU quantity (`1.5` or `"500m"`) into CPUs.
 *
 * @throws {QuantityError} when the value is not a CPU count.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseCpu } from "./duration.ts";
 *
 * assert.equal(parseCpu("500m"), 0.5);
 * assert.equal(parseCpu(2), 2);
 * ```
 */
export function parseCpu(value: string | number, options: QuantityOptions = {}): number {
  if (typeof value === "number" && value > 0 && Number.isFinite(value)) return value;
  if (typeof value === "string" && MILLICPU_PATTERN.test(value) && parseInt(value) > 0) {
    return parseInt(value) / 1000;
  }
  const key = options.key ? ` for "${options.key}"` : "";
  throw new QuantityError(
    `Expected a CPU count like 0.5 or "500m"${key}, got ${JSON.stringify(value)}`,
  );
}
