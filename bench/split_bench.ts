/**
 * `batch:` splitting: runnel's streaming splitter against coreutils
 * `split` on the same file, in the same process and machine, and the
 * runner's memory while it splits.
 *
 * @module
 */

import { runSplit } from "../agent/attempt/split.ts";
import { median, printTable } from "./_table.ts";

const MIB = 2 ** 20;
const SIZE_MIB = 256;
const LINES_PER_BATCH = 1_000_000;

async function writeInput(path: string): Promise<number> {
  const line = new TextEncoder().encode("2026-12-03T00:00:00Z,meter-0001,12.345\n");
  const block = new Uint8Array(Math.floor(MIB / line.length) * line.length);
  for (let at = 0; at < block.length; at += line.length) block.set(line, at);
  using file = await Deno.open(path, { write: true, create: true });
  for (let i = 0; i < SIZE_MIB; i++) {
    let done = 0;
    while (done < block.length) done += await file.write(block.subarray(done));
  }
  return SIZE_MIB * block.length;
}

/** Prints the table. */
export async function benchSplit(runs = 3): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "runnel-bench-split-" });
  try {
    const input = `${dir}/data.csv`;
    const size = await writeInput(input);
    const anchor: number[] = [];
    const ours: number[] = [];
    let peakGrowth = 0;
    for (let run = 0; run < runs; run++) {
      const out = `${dir}/coreutils-${run}`;
      await Deno.mkdir(out);
      let started = performance.now();
      const status = await new Deno.Command("split", {
        args: ["-l", String(LINES_PER_BATCH), input, `${out}/part-`],
      }).output();
      if (!status.success) throw new Error("split(1) failed");
      anchor.push(performance.now() - started);
      const mine = `${dir}/runnel-${run}`;
      await Deno.mkdir(mine);
      const before = Deno.memoryUsage().rss;
      let peak = before;
      const sampler = setInterval(() => peak = Math.max(peak, Deno.memoryUsage().rss), 10);
      started = performance.now();
      await runSplit(
        { input: "data", maxLegs: 4096, mode: "lines", lines: LINES_PER_BATCH, header: false },
        input,
        mine,
      );
      ours.push(performance.now() - started);
      clearInterval(sampler);
      peakGrowth = Math.max(peakGrowth, Math.max(peak, Deno.memoryUsage().rss) - before);
      await Deno.remove(out, { recursive: true });
      await Deno.remove(mine, { recursive: true });
    }
    const a = median(anchor);
    const r = median(ours);
    const rate = (ms: number) => (size / MIB / (ms / 1000)).toFixed(0);
    printTable(
      `split a ${SIZE_MIB} MiB CSV into batches of ${LINES_PER_BATCH} lines (median of ${runs})`,
      [
        {
          what: "coreutils split -l (anchor)",
          ms: a.toFixed(0),
          mib_per_s: rate(a),
          ratio: "1.00",
        },
        {
          what: "runnel batch: lines",
          ms: r.toFixed(0),
          mib_per_s: rate(r),
          ratio: (r / a).toFixed(2),
        },
        {
          what: "runner RSS growth while splitting (MiB)",
          ms: "",
          mib_per_s: "",
          ratio: (peakGrowth / MIB).toFixed(1),
        },
      ],
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

if (import.meta.main) await benchSplit();
