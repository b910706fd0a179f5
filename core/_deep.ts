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
  if (value === null || typeof value !== "object") return value;
  if (Array.isArray(value)) {
    const out = new Array(value.length);
    for (let i = 0; i < value.length; i++) out[i] = mapStrings(value[i], map);
    return out;
  }
  // Plain loops: a large plan maps every step's config and env through here.
  const out: Record<string, unknown> = {};
  for (const key of Object.keys(value)) {
    const item = mapStrings((value as Record<string, unknown>)[key], map);
    // An own "__proto__" key (YAML may have one) stays a key, as Object.fromEntries keeps it.
    if (key === "__proto__") {
      Object.defineProperty(out, key, {
        value: item,
        enumerable: true,
        writable: true,
        configurable: true,
      });
    } else out[key] = item;
  }
  return out;
}
