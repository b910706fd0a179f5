/**
 * Overhead of the `deno` backend: a no-op step run through the backend
 * (entry file, harness, sandbox flags, log pumping, output check), in
 * process and through a warm plugin host (as the runner does it), against
 * a bare `deno run` of the same module, the anchor. Target: ratio ≤ 1.3
 * through the plugin system.
 *
 * Run: `deno run --allow-read --allow-write --allow-run --allow-env bench/deno_step_bench.ts`
 *
 * @module
 */

import { isSuccess } from "../backends/backend.ts";
import type { ExecutionBackend } from "../backends/backend.ts";
import { createDenoBackend } from "../backends/deno/mod.ts";
import { builtinPlugins, PluginHostPool } from "../backends/mod.ts";
import { median, printTable } from "./_table.ts";

/** Runs per variant; 20 keeps the whole bench near ten seconds on two cores. */
const RUNS = 20;
/** Untimed runs per variant first, so both start with a warm module cache. */
const WARMUP_RUNS = 10;

/** Timings of one variant, in milliseconds. */
export interface BenchRow {
  name: string;
  medianMs: number;
  minMs: number;
  maxMs: number;
}

/** The bench's result: the rows and the plugin-host-to-anchor ratio of medians. */
export interface DenoStepBenchResult {
  anchor: BenchRow;
  backend: BenchRow;
  plugin: BenchRow;
  ratio: number;
}

/** Measures both variants, prints a table, and returns the figures. */
export async function benchDenoStep(): Promise<DenoStepBenchResult> {
  const root = await Deno.realPath(await Deno.makeTempDir({ prefix: "runnel_bench_" }));
  try {
    const baseDir = `${root}/pipeline`;
    await Deno.mkdir(baseDir);
    await Deno.writeTextFile(`${baseDir}/noop.ts`, "export default () => {};\n");
    const inProcess = createDenoBackend();
    const pool = new PluginHostPool({
      plugins: builtinPlugins(),
      context: { scratchRoot: root, agentId: "bench" },
    });
    let attempt = 0;

    const viaBackend = async (backend: ExecutionBackend) => {
      attempt++;
      const workDir = `${root}/work-${attempt}`;
      const outputsDir = `${root}/out-${attempt}`;
      await Deno.mkdir(workDir);
      await Deno.mkdir(outputsDir);
      const started = performance.now();
      const execution = await backend.start({
        agentId: "bench",
        runId: "bench",
        stepId: "noop",
        attemptId: `bench/noop/${attempt}`,
        attempt,
        config: { module: "noop.ts" },
        scratchRoot: root,
        baseDir,
        workDir,
        inputs: {},
        inputsDir: workDir,
        outputsDir,
        outputs: [],
        env: {},
        matrix: {},
      });
      for await (const _ of execution.logs) { /* drain */ }
      const status = await execution.wait();
      const elapsed = performance.now() - started;
      await execution.cleanup();
      if (!isSuccess(status)) throw new Error(`No-op step failed: ${JSON.stringify(status)}`);
      return elapsed;
    };
    const bare = async () => {
      const started = performance.now();
      const output = await new Deno.Command(Deno.execPath(), {
        args: ["run", "--no-prompt", `${baseDir}/noop.ts`],
        cwd: root,
        stdout: "piped",
        stderr: "piped",
      }).output();
      const elapsed = performance.now() - started;
      if (!output.success) throw new Error("Bare deno run of the no-op module failed");
      return elapsed;
    };

    const viaPlugin = pool.backend("deno");
    for (let i = 0; i < WARMUP_RUNS; i++) {
      await bare();
      await viaBackend(inProcess);
      await viaBackend(viaPlugin);
    }
    const samples = { anchor: [] as number[], backend: [] as number[], plugin: [] as number[] };
    // Interleaved so that drift in machine load hits every variant alike.
    for (let i = 0; i < RUNS; i++) {
      samples.anchor.push(await bare());
      samples.backend.push(await viaBackend(inProcess));
      samples.plugin.push(await viaBackend(viaPlugin));
    }
    await pool.close();
    const anchor = summarise("bare deno run (anchor)", samples.anchor);
    const viaBackendRow = summarise("deno backend, in process", samples.backend);
    const viaPluginRow = summarise("deno backend, warm plugin host", samples.plugin);
    const ratio = viaPluginRow.medianMs / anchor.medianMs;
    printTable(
      `deno step, ${RUNS} runs each (ms)`,
      [anchor, viaBackendRow, viaPluginRow].map((row) => ({
        variant: row.name,
        median: row.medianMs.toFixed(1),
        min: row.minMs.toFixed(1),
        max: row.maxMs.toFixed(1),
        ratio: (row.medianMs / anchor.medianMs).toFixed(2),
      })),
    );
    console.log(`target ratio ≤ 1.30: ${ratio <= 1.3 ? "met" : "NOT met"}`);
    return { anchor, backend: viaBackendRow, plugin: viaPluginRow, ratio };
  } finally {
    await Deno.remove(root, { recursive: true });
  }
}

function summarise(name: string, samples: number[]): BenchRow {
  return {
    name,
    medianMs: median(samples),
    minMs: Math.min(...samples),
    maxMs: Math.max(...samples),
  };
}

if (import.meta.main) {
  await benchDenoStep();
}
