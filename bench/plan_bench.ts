/**
 * Benchmark: parse + validate + plan a generated 10,000-step DAG, against a
 * plain `yaml` parse of the same text as the anchor.
 *
 * `deno run --allow-read --allow-env bench/plan_bench.ts`
 *
 * @module
 */

import { parse } from "npm:yaml@2.9.1";
import { parsePipeline } from "../core/load.ts";
import { printTable } from "./_table.ts";

/** Steps in the generated DAG (the size the planner must handle comfortably). */
const STEPS = 10_000;
const RUNS = 5;
/** Targets from the brief: 300 ms per load and 200 MB resident. */
const TARGET_MS = 300;
const TARGET_RSS_MB = 200;

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
  ]);
  await Promise.resolve();
}

if (import.meta.main) await benchPlan();
