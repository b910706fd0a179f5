/**
 * Benchmark: parse + validate + plan a generated 10,000-step DAG, against a
 * plain `yaml` parse of the same text as the anchor; and the time to refuse
 * a matrix of a million legs (issue 10, item 9: 19.7 s and 3.26 GB when it
 * was expanded before it was counted).
 *
 * `deno run --allow-read --allow-env bench/plan_bench.ts`
 *
 * @module
 */

import { parse } from "npm:yaml@2.9.1";
import { PipelineError } from "../core/errors.ts";
import { parsePipeline } from "../core/load.ts";
import { printTable } from "./_table.ts";

/** Steps in the generated DAG (the size the planner must handle comfortably). */
const STEPS = 10_000;
const RUNS = 5;
/** Targets from the brief: 300 ms per load and 200 MB resident. */
const TARGET_MS = 300;
const TARGET_RSS_MB = 200;
/** Refusing an oversized matrix is a count and a message: no more than a small file's parse. */
const TARGET_REFUSE_MS = 50;

/** 3 keys × 100 values: 10^6 legs in under 1 KiB. */
function matrixBomb(): string {
  const values = `[${Array.from({ length: 100 }, (_, i) => i).join(",")}]`;
  return `name: bomb\nsteps:\n  fan:\n    run: echo \${{ matrix.a }}\n    matrix:\n` +
    `      a: ${values}\n      b: ${values}\n      c: ${values}\n`;
}

function generate(steps: number): string {
  // Deterministic LCG so every run measures the same file.
  let state = 42;
  const next = () => (state = (state * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
  const lines = ["name: bench", "defaults: { timeout: 10m, retry: 2 }", "steps:"];
  for (let i = 0; i < steps; i++) {
    lines.push(`  s${i}:`, `    run: echo ${i}`);
    if (i > 0) {
      const count = 1 + Math.floor(next() * 3);
      const needs = new Set<number>();
      for (let k = 0; k < count; k++) needs.add(Math.floor(next() * i));
      lines.push(`    needs: [${[...needs].map((n) => `s${n}`).join(", ")}]`);
    }
  }
  return lines.join("\n") + "\n";
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

function time(fn: () => void): number {
  const samples: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    const started = performance.now();
    fn();
    samples.push(performance.now() - started);
  }
  return median(samples);
}

/** Runs the benchmark and prints its table. */
export async function benchPlan(): Promise<void> {
  const source = generate(STEPS);
  let planned = 0;
  // runnel first, so the RSS read is not inflated by the anchor's own document trees.
  const loadMs = time(() => {
    planned = parsePipeline(source, { file: "bench.yaml", baseDir: Deno.cwd() }).order.length;
  });
  const rssMb = Deno.memoryUsage().rss / 2 ** 20;
  const anchorMs = time(() => parse(source));
  if (planned !== STEPS) throw new Error(`planned ${planned} steps, expected ${STEPS}`);
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
  printTable(`validate + plan a generated ${STEPS}-step DAG (median of runs)`, [
    { case: "yaml parse (anchor)", median_ms: anchorMs.toFixed(1), ratio: "1.00", target: "" },
    {
      case: `parse+validate+plan ${STEPS} steps`,
      median_ms: loadMs.toFixed(1),
      ratio: (loadMs / anchorMs).toFixed(2),
      target: `≤${TARGET_MS} ms ${loadMs <= TARGET_MS ? "ok" : "MISSED"}`,
    },
    {
      case: "rss after runs (MB)",
      median_ms: rssMb.toFixed(0),
      ratio: "",
      target: `≤${TARGET_RSS_MB} MB ${rssMb <= TARGET_RSS_MB ? "ok" : "MISSED"}`,
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
      target: `≤${TARGET_REFUSE_MS} ms ${refuseMs <= TARGET_REFUSE_MS ? "ok" : "MISSED"}`,
    },
  ]);
  await Promise.resolve();
}

if (import.meta.main) await benchPlan();
