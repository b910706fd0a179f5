/**
 * One walk over JSON-shaped values: a copy with every string mapped.
 *
 * @module
 */

/**
 * A copy of `value` with `map` applied to every string in it (object keys
 * stay as they are).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { mapStrings } from "./_deep.ts";
 *
 * assert.deepEqual(mapStrings({ a: ["x", 1], b: "y" }, (s) => s.toUpperCase()), {
 *   a: ["X", 1],
 *   b: "Y",
 * });
 * ```
 */
export function mapStrings(value: unknown, map: (text: string) => string): unknown {
  if (typeof value === "string") return map(value);
  if (Array.isArray(value)) return value.map((item) => mapStrings(item, map));
  if (value && typeof value === "object") {
    return Object.fromEntries(
      Object.entries(value).map(([key, item]) => [key, mapStrings(item, map)]),
    );
  }
  return value;
}
