/**
 * Names that become paths or resource names, in one place: ids (a step id
 * may hold `[`, `=`, `,`; an attempt id holds `/`) encoded as single file
 * names, reversibly; and readable names for resources whose names allow
 * only a few characters (a container, a host entry file).
 *
 * @module
 */

/**
 * Encodes an id as one file name: URI-encoded, with `%` written `~` so the
 * name needs no quoting in a shell. Distinct ids give distinct names.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { fileSafe } from "./_paths.ts";
 * assert.equal(fileSafe("r1/convert[region=eu]/1"), "r1~2Fconvert~5Bregion~3Deu~5D~2F1");
 * assert.equal(fileSafe(".."), "~2E~2E");
 * ```
 */
export function fileSafe(id: string): string {
  const name = encodeURIComponent(id).replaceAll("%", "~");
  // "." and ".." are names of directories, not of files: spell their dots out.
  return name === "." || name === ".." ? name.replaceAll(".", "~2E") : name;
}

/**
 * A readable name made safe for a file or container name: every run of
 * characters other than letters, digits, `_`, `.` and `-` becomes one `_`.
 * Lossy: distinct names may map alike, so callers that need them apart add
 * a digest.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { readableName } from "./_paths.ts";
 * assert.equal(readableName("convert[region=eu]"), "convert_region_eu_");
 * ```
 */
export function readableName(name: string): string {
  return name.replace(/[^A-Za-z0-9_.-]+/g, "_");
}
