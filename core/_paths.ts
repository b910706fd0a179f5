/**
 * Names that become paths, in one place: ids (a step id may hold `[`, `=`,
 * `,`; an attempt id holds `/`) encoded as single file names.
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
 * ```
 */
export function fileSafe(id: string): string {
  return encodeURIComponent(id).replaceAll("%", "~");
}
