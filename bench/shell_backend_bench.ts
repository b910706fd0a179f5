/**
 * Per-execution overhead of the `shell` backend: a no-op step (`run: "true"`)
 * through the in-process `shell` backend — start, drain `logs`, `wait()`, `cleanup()` —
 * against the anchor, a raw detached `/bin/sh -e -c true` spawn with piped
 * output whose streams are cancelled before its status is awaited.
 *
 * Run: `deno run --allow-read --allow-write --allow-run --allow-env bench/shell_backend_bench.ts`
 *
 * @module
 */

import process from "node:process";
import type { AttemptSpec } from "../backends/backend.ts";
import { isSuccess } from "../backends/backend.ts";
import { createShellBackend } from "../backends/shell/mod.ts";
import { printTable } from "./_table.ts";

/** Sequential executions per variant. */
const RUNS = 300;
/** Untimed executions per variant first, so both start warm. */
const WARMUP_RUNS = 20;
/** Executions per timed block; the variants alternate block by block. */
const BLOCK = 50;

/** Timings of one variant, in milliseconds per execution. */
export interface ShellBenchRow {
  name: string;
  meanMs: number;
  medianMs: number;
  p90Ms: number;
  /** Process CPU time (user + system, all threads) per execution. */
  cpuMs: number;
}

/** The bench's result: both rows and the backend-to-anchor ratio of means. */
export interface ShellBackendBenchResult {
  anchor: ShellBenchRow;
  backend: ShellBenchRow;
  ratio: number;
  /** Backend executions per second with two in flight. */
  concurrentPerSecond: number;
}

/** Measures both variants, prints a table, and returns the figures. */
export async function benchShellBackend(): Promise<ShellBackendBenchResult> {
  const root = await Deno.realPath(await Deno.makeTempDir({ prefix: "runnel_shell_bench_" }));
  try {
    const backend = createShellBackend();
    const spec: AttemptSpec = {
      agentId: "bench",
      scratchRoot: root,
      runId: "bench",
      stepId: "noop",
      attemptId: "bench/noop/1",
      attempt: 1,
      config: { run: "true" },
      baseDir: root,
      workDir: root,
      inputs: {},
      inputsDir: root,
      outputsDir: root,
      outputs: [],
      env: {},
      matrix: {},
    };
    const viaBackend = async () => {
      const started = performance.now();
      const execution = await backend.start(spec);
      for await (const _ of execution.logs) { /* drain */ }
      const status = await execution.wait();
      await execution.cleanup();
      const elapsed = performance.now() - started;
      if (!isSuccess(status)) throw new Error(`No-op step failed: ${JSON.stringify(status)}`);
      return elapsed;
    };
    const raw = async () => {
      const started = performance.now();
      const child = new Deno.Command("/bin/sh", {
        args: ["-e", "-c", "true"],
        cwd: root,
        detached: true,
        clearEnv: true,
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
      }).spawn();
      await Promise.all([child.stdout.cancel(), child.stderr.cancel()]);
      const status = await child.status;
      const elapsed = performance.now() - started;
      if (!status.success) throw new Error("Raw spawn of /bin/sh -e -c true failed");
      return elapsed;
    };

    for (let i = 0; i < WARMUP_RUNS; i++) {
      await raw();
      await viaBackend();
    }
    const samples = { anchor: [] as number[], backend: [] as number[] };
    const cpuMicros = { anchor: 0, backend: 0 };
    const measure = async (variant: "anchor" | "backend", run: () => Promise<number>) => {
      const before = process.cpuUsage();
      for (let i = 0; i < BLOCK; i++) samples[variant].push(await run());
      const used = process.cpuUsage(before);
      cpuMicros[variant] += used.user + used.system;
    };
    // Alternating blocks so that drift in machine load hits both variants alike.
    for (let done = 0; done < RUNS; done += BLOCK) {
      await measure("anchor", raw);
      await measure("backend", viaBackend);
    }
    const anchor = summarise("raw detached spawn", samples.anchor, cpuMicros.anchor);
    const viaBackendRow = summarise("shell backend", samples.backend, cpuMicros.backend);
    const ratio = viaBackendRow.meanMs / anchor.meanMs;
    printTable(
      `shell no-op, ${RUNS} sequential executions each (ms per execution)`,
      [anchor, viaBackendRow].map((row) => ({
        variant: row.name,
        mean: row.meanMs.toFixed(2),
        median: row.medianMs.toFixed(2),
        p90: row.p90Ms.toFixed(2),
        cpu: row.cpuMs.toFixed(2),
        ratio: (row.meanMs / anchor.meanMs).toFixed(2),
      })),
    );
    // Throughput with two executions in flight, as local mode runs them.
    const lane = async () => {
      for (let i = 0; i < RUNS / 2; i++) await viaBackend();
    };
    const started = performance.now();
    await Promise.all([lane(), lane()]);
    const concurrentPerSecond = RUNS / ((performance.now() - started) / 1000);
    console.log(
      `backend: ${(1000 / viaBackendRow.meanMs).toFixed(0)} executions/s sequentially, ${
        concurrentPerSecond.toFixed(0)
      } executions/s with 2 in flight`,
    );
    return { anchor, backend: viaBackendRow, ratio, concurrentPerSecond };
  } finally {
    await Deno.remove(root, { recursive: true });
  }
}

function summarise(name: string, samples: number[], cpuMicros: number): ShellBenchRow {
  const sorted = [...samples].sort((a, b) => a - b);
  const meanMs = sorted.reduce((sum, ms) => sum + ms, 0) / sorted.length;
  const medianMs = sorted[Math.floor(sorted.length / 2)];
  const p90Ms = sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * 0.9))];
  return { name, meanMs, medianMs, p90Ms, cpuMs: cpuMicros / 1000 / samples.length };
}

if (import.meta.main) {
  await benchShellBackend();
}
