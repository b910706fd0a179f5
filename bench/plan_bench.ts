/**
 * Benchmark: parse + validate + plan a generated DAG (issue 17: 10,000
 * steps in ≤ 150 ms and ≤ 150 MB resident, 100,000 steps in ≤ 2 s and
 * linear), against a plain `yaml` parse of the same text as the anchor; and
 * the time to refuse a matrix of a million legs (issue 10, item 9: 19.7 s
 * and 3.26 GB when it was expanded before it was counted).
 *
 * How it measures. Each load runs in its own `deno` process, so that what
 * it reports is the load alone: the child imports the loader, reads the
 * pipeline text from its stdin (no generator garbage in its heap), reads its
 * RSS, loads the pipeline once (the cold load a `runnel validate` or `run`
 * does) and reads its RSS again — the RSS row is that second reading, the
 * process's whole resident set with the plan alive — and then loads it
 * {@link RUNS} more times for the median time. The child then loads the
 * same text with js-yaml alone (the plain YAML load the large-file path
 * starts with) {@link RUNS} times: the floor anchor, measured in the same
 * process as the loads it is compared with.
 *
 * The `yaml` anchor runs in this process. It is yaml's default parse
 * (duplicate keys checked pairwise, `process.env` read per token), which
 * the loader never does: it says what a naive parse would cost, not what
 * the load could get down to; that is the floor anchor's job.
 *
 * The 10,000-step DAG is written in block style (the issue's figure). The
 * linear check loads 10,000 and 100,000 steps written one flow mapping per
 * line: in block style 100,000 steps take 5.4 MiB, over the 5 MiB a
 * pipeline file may have (`MAX_PIPELINE_BYTES`). The yaml anchor is not
 * run at 100,000 steps: it takes minutes there.
 *
 * `deno run --allow-read --allow-env --allow-run bench/plan_bench.ts`
 *
 * @module
 */

import { CORE_SCHEMA, load as loadJsYaml } from "npm:js-yaml@4.1.0";
import { parse } from "npm:yaml@2.9.1";
import { PipelineError } from "../core/errors.ts";
import { parsePipeline } from "../core/load.ts";
import { median, printTable } from "./_table.ts";

/** Steps in the generated DAG (the size the planner must handle comfortably). */
const STEPS = 10_000;
/** Steps of the scale check (the default limit of step instances in a run). */
const LARGE_STEPS = 100_000;
const RUNS = 5;
/** Targets from issue 17: 150 ms per load, 150 MB resident, 100,000 steps in 2 s. */
const TARGET_MS = 150;
const TARGET_RSS_MB = 150;
const TARGET_LARGE_MS = 2_000;
/** Linear: the time per step at 100,000 steps at most this many times that at 10,000. */
const TARGET_LINEAR = 1.5;
/** Refusing an oversized matrix is a count and a message: no more than a small file's parse. */
const TARGET_REFUSE_MS = 50;

/** 3 keys × 100 values: 10^6 legs in under 1 KiB. */
function matrixBomb(): string {
  const values = `[${Array.from({ length: 100 }, (_, i) => i).join(",")}]`;
  return `name: bomb\nsteps:\n  fan:\n    run: echo \${{ matrix.a }}\n    matrix:\n` +
    `      a: ${values}\n      b: ${values}\n      c: ${values}\n`;
}

/**
 * A DAG of `steps` steps, each needing one to three earlier ones, in block
 * style or one flow mapping per step (`compact`).
 */
export function generate(steps: number, compact = false): string {
  // Deterministic LCG so every run measures the same file.
  let state = 42;
  const next = () => (state = (state * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
  const lines = ["name: bench", "defaults: { timeout: 10m, retry: 2 }", "steps:"];
  for (let i = 0; i < steps; i++) {
    let needs = "";
    if (i > 0) {
      const count = 1 + Math.floor(next() * 3);
      const set = new Set<number>();
      for (let k = 0; k < count; k++) set.add(Math.floor(next() * i));
      needs = `[${[...set].map((n) => `s${n}`).join(", ")}]`;
    }
    if (compact) {
      lines.push(` s${i}: {run: echo ${i}${needs && `, needs: ${needs}`}}`);
    } else {
      lines.push(`  s${i}:`, `    run: echo ${i}`);
      if (needs) lines.push(`    needs: ${needs}`);
    }
  }
  return lines.join("\n") + "\n";
}

function time(fn: () => void, runs = RUNS): number {
  const samples: number[] = [];
  for (let i = 0; i < runs; i++) {
    const started = performance.now();
    fn();
    samples.push(performance.now() - started);
  }
  return median(samples);
}

/** What a child process reports of its loads. */
interface LoadReport {
  /** Step instances planned. */
  planned: number;
  /** The first (cold) load. */
  firstMs: number;
  /** Median of the loads after it. */
  medianMs: number;
  /** Resident set before the first load and right after it. */
  rssBeforeMb: number;
  rssMb: number;
  /** Median of js-yaml loads of the same text in the same process (the floor anchor). */
  floorMs: number;
}

/** The child: loads the pipeline on stdin and prints a {@link LoadReport}. */
async function child(): Promise<void> {
  const source = await new Response(Deno.stdin.readable).text();
  const rssBeforeMb = Deno.memoryUsage().rss / 2 ** 20;
  const load = () => parsePipeline(source, { file: "bench.yaml", baseDir: Deno.cwd() });
  const started = performance.now();
  const planned = load().order.length;
  const firstMs = performance.now() - started;
  const rssMb = Deno.memoryUsage().rss / 2 ** 20;
  const medianMs = time(() => load());
  const floorMs = time(() => loadJsYaml(source, { schema: CORE_SCHEMA, json: false }));
  const report: LoadReport = { planned, firstMs, medianMs, rssBeforeMb, rssMb, floorMs };
  console.log(JSON.stringify(report));
}

/** Loads `source` in a fresh `deno` process (see the module's doc). */
async function loadInChild(source: string): Promise<LoadReport> {
  const process = new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-read", "--allow-env", new URL(import.meta.url).pathname, "--child"],
    stdin: "piped",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const writer = process.stdin.getWriter();
  await writer.write(new TextEncoder().encode(source));
  await writer.close();
  const { success, stdout } = await process.output();
  if (!success) throw new Error("the load process failed");
  return JSON.parse(new TextDecoder().decode(stdout));
}

/** Runs the benchmark and prints its table. */
export async function benchPlan(): Promise<void> {
  const source = generate(STEPS);
  const compact = generate(STEPS, true);
  const large = generate(LARGE_STEPS, true);
  // The loads first, each in its own process, then the anchors here.
  const block = await loadInChild(source);
  const small = await loadInChild(compact);
  const big = await loadInChild(large);
  for (const [report, steps] of [[block, STEPS], [small, STEPS], [big, LARGE_STEPS]] as const) {
    if (report.planned !== steps) throw new Error(`planned ${report.planned} steps, not ${steps}`);
  }
  const anchorMs = time(() => parse(source));
  const bomb = matrixBomb();
  const bombAnchorMs = time(() => parse(bomb));
  const refuseMs = time(() => {
    try {
      parsePipeline(bomb, { file: "bomb.yaml", baseDir: Deno.cwd() });
    } catch (error) {
      if (error instanceof PipelineError && error.diagnostics[0].code === "too_many_legs") return;
      throw error;
    }
    throw new Error("the million-leg matrix was accepted");
  });
  const perStep = (report: LoadReport, steps: number) => report.medianMs / steps;
  const linear = perStep(big, LARGE_STEPS) / perStep(small, STEPS);
  const verdict = (ok: boolean) => ok ? "ok" : "MISSED";
  printTable(`validate + plan a generated DAG (median of ${RUNS} loads in a fresh process)`, [
    { case: "yaml parse (anchor)", median_ms: anchorMs.toFixed(1), ratio: "1.00", target: "" },
    {
      case: `js-yaml load of the ${STEPS}-step text, in the load's process (floor anchor)`,
      median_ms: block.floorMs.toFixed(1),
      ratio: "1.00",
      target: "",
    },
    {
      case: `parse+validate+plan ${STEPS} steps (ratio to the floor anchor)`,
      median_ms: block.medianMs.toFixed(1),
      ratio: (block.medianMs / block.floorMs).toFixed(2),
      target: "",
    },
    {
      case: `parse+validate+plan ${STEPS} steps`,
      median_ms: block.medianMs.toFixed(1),
      ratio: (block.medianMs / anchorMs).toFixed(2),
      target: `≤${TARGET_MS} ms ${verdict(block.medianMs <= TARGET_MS)}`,
    },
    {
      case: `  its first (cold) load`,
      median_ms: block.firstMs.toFixed(1),
      ratio: (block.firstMs / anchorMs).toFixed(2),
      target: "",
    },
    {
      case: `  rss after the first load (MB; ${block.rssBeforeMb.toFixed(0)} before it)`,
      median_ms: block.rssMb.toFixed(0),
      ratio: "",
      target: `≤${TARGET_RSS_MB} MB ${verdict(block.rssMb <= TARGET_RSS_MB)}`,
    },
    {
      case: `${STEPS} steps, one line each (linear anchor)`,
      median_ms: small.medianMs.toFixed(1),
      ratio: "1.00",
      target: `${(perStep(small, STEPS) * 1000).toFixed(1)} µs/step`,
    },
    {
      case: `${LARGE_STEPS} steps, one line each`,
      median_ms: big.medianMs.toFixed(1),
      ratio: linear.toFixed(2),
      target: `≤${TARGET_LARGE_MS} ms ${verdict(big.medianMs <= TARGET_LARGE_MS)}, ` +
        `${(perStep(big, LARGE_STEPS) * 1000).toFixed(1)} µs/step ` +
        `(≤${TARGET_LINEAR}× ${verdict(linear <= TARGET_LINEAR)})`,
    },
    {
      case: `  js-yaml load of its text, same process (floor anchor)`,
      median_ms: big.floorMs.toFixed(1),
      ratio: (big.medianMs / big.floorMs).toFixed(2),
      target: "ratio: the load to it",
    },
    {
      case: `  its first (cold) load`,
      median_ms: big.firstMs.toFixed(1),
      ratio: "",
      target: "",
    },
    {
      case: `  rss after the first load (MB)`,
      median_ms: big.rssMb.toFixed(0),
      ratio: "",
      target: "",
    },
    {
      case: `yaml parse of the ${bomb.length}-byte matrix bomb (anchor)`,
      median_ms: bombAnchorMs.toFixed(1),
      ratio: "1.00",
      target: "",
    },
    {
      case: "refuse its 10^6 legs (validate)",
      median_ms: refuseMs.toFixed(1),
      ratio: (refuseMs / bombAnchorMs).toFixed(2),
      target: `≤${TARGET_REFUSE_MS} ms ${verdict(refuseMs <= TARGET_REFUSE_MS)}`,
    },
  ]);
}

if (import.meta.main) {
  if (Deno.args[0] === "--child") await child();
  else await benchPlan();
}
