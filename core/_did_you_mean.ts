/**
 * "Did you mean" hints: the closest known word to a misspelt one, by edit
 * distance.
 *
 * @module
 */

/**
 * Levenshtein distance, for did-you-mean hints. Words whose lengths differ
 * by more than 8 are far apart whatever their letters, so the length
 * difference is returned without the quadratic table.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { editDistance } from "./_did_you_mean.ts";
 *
 * assert.equal(editDistance("neds", "needs"), 1);
 * ```
 */
export function editDistance(a: string, b: string): number {
  if (Math.abs(a.length - b.length) > 8) return Math.abs(a.length - b.length);
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      current[j] = Math.min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost);
    }
    previous = current;
  }
  return previous[b.length];
}

/**
 * A `did you mean "x"?` hint naming the closest candidate, if one is close:
 * within a third of the word's length (at least 2 edits), ignoring case.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { didYouMean } from "./_did_you_mean.ts";
 *
 * assert.equal(didYouMean("dockr", ["deno", "docker"]), 'did you mean "docker"?');
 * assert.equal(didYouMean("lambda", ["deno", "docker"]), undefined);
 * ```
 */
export function didYouMean(word: string, candidates: Iterable<string>): string | undefined {
  let best: string | undefined;
  let bestDistance = Math.max(2, Math.floor(word.length / 3)) + 1;
  for (const candidate of candidates) {
    const distance = editDistance(word.toLowerCase(), candidate.toLowerCase());
    if (distance < bestDistance) {
      best = candidate;
      bestDistance = distance;
    }
  }
  return best === undefined ? undefined : `did you mean "${best}"?`;
}
