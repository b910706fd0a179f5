/**
 * The one table printer of the benchmarks (a title, then aligned columns) and
 * the median they summarise samples with.
 *
 * @module
 */

/** One row of a printed table; keys are the column headers. */
export type Row = Record<string, string | number>;

/** Prints rows as an aligned table under a title. */
export function printTable(title: string, rows: Row[]): void {
  console.log(`\n${title}`);
  const headers = Object.keys(rows[0] ?? {});
  const cells = rows.map((r) => headers.map((h) => String(r[h])));
  const widths = headers.map((h, i) => Math.max(h.length, ...cells.map((c) => c[i].length)));
  console.log(headers.map((h, i) => h.padEnd(widths[i])).join("  ").trimEnd());
  for (const c of cells) console.log(c.map((v, i) => v.padEnd(widths[i])).join("  ").trimEnd());
}

/** The median of some samples (the mean of the middle two for an even count). */
export function median(samples: number[]): number {
  const sorted = [...samples].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}
