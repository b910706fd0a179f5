/**
 * Overhead of the `deno` backend: a no-op step run through the backend
 * (entry file, harness, sandbox flags, log pumping, output check), in
 * process and through a warm plugin host (as the runner does it), against
 * a bare `deno run` of the same module, the anchor.
 *
 * Rows: the cold path in process; a pre-started (warm) process in process,
 * each sample taken once the replacement of the previous one is parked (so
 * that no start-up runs during another row's sample); the first step of a
 * new key in a warm backend (a cold start: a key gets processes once it
 * repeats); and, in a phase of their own after the interleaved rows,
 * steps back to back through a plugin host (warm starts on, as the runner
 * runs them: each replacement starts as the next step comes) and
 * spaced by an idle gap (its replacement parks in the gap). Target: a warm
 * step ≤ 1.0× the anchor.
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
/**
 * Idle time before each spaced plugin-host step: steps of one key that come
 * at least this far apart (a pipeline's repeated step, scheduled runs) find
 * their process parked; a start-up takes about 60 ms here.
 */
const STEP_GAP_MS = 250;

/** Timings of one variant, in milliseconds. */
export interface BenchRow {
  name: string;
  medianMs: number;
  minMs: number;
  maxMs: number;
}

/** The bench's result: the rows and the warm-to-anchor ratio of medians. */
export interface DenoStepBenchResult {
  anchor: BenchRow;
  /** In process, cold. */
  backend: BenchRow;
  /** In process, pre-started and parked. */
  warm: BenchRow;
  /** First step of a new key with warm starts on (a cold start). */
  firstStep: BenchRow;
  /** Through a plugin host (warm starts on), steps back to back. */
  plugin: BenchRow;
  /** Through a plugin host (warm starts on), steps {@link STEP_GAP_MS} apart. */
  spacedPlugin: BenchRow;
  /** Warm (pre-started) row over the anchor. */
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
    const warmBackend = createDenoBackend({ warm: true });
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
    /** A warm step, its process parked before the clock starts; its replacement parked after. */
    const warm = async () => {
      await warmBackend.warmPool!.settled();
      const elapsed = await viaBackend(warmBackend);
      await warmBackend.warmPool!.settled();
      return elapsed;
    };
    /**
     * The first step of its key, in a fresh warm backend (the module's graph
     * check is cached, as for the other rows): cold, and nothing pre-started.
     */
    const firstStep = async () => {
      const backend = createDenoBackend({ warm: true });
      try {
        return await viaBackend(backend);
      } finally {
        await backend.close();
      }
    };
    /** A step through the plugin host after an idle gap in which its process parks. */
    const spacedPlugin = async () => {
      await new Promise((resolve) => setTimeout(resolve, STEP_GAP_MS));
      return await viaBackend(viaPlugin);
    };

    const viaPlugin = pool.backend("deno");
    for (let i = 0; i < WARMUP_RUNS; i++) {
      await bare();
      await viaBackend(inProcess);
      await warm();
      await firstStep();
    }
    const samples = {
      anchor: [] as number[],
      backend: [] as number[],
      warm: [] as number[],
      firstStep: [] as number[],
      plugin: [] as number[],
      spaced: [] as number[],
    };
    // Interleaved so that drift in machine load hits every variant alike.
    for (let i = 0; i < RUNS; i++) {
      samples.anchor.push(await bare());
      samples.backend.push(await viaBackend(inProcess));
      samples.warm.push(await warm());
      samples.firstStep.push(await firstStep());
    }
    await warmBackend.close();
    // Back to back, as a runner sends repeated steps: not interleaved, since
    // each replacement process starts during whatever runs next.
    for (let i = 0; i < WARMUP_RUNS; i++) await viaBackend(viaPlugin);
    for (let i = 0; i < RUNS; i++) samples.plugin.push(await viaBackend(viaPlugin));
    for (let i = 0; i < RUNS; i++) samples.spaced.push(await spacedPlugin());
    await pool.close();
    const anchor = summarise("bare deno run (anchor)", samples.anchor);
    const viaBackendRow = summarise("deno backend, in process, cold", samples.backend);
    const warmRow = summarise("deno backend, warm (pre-started, parked)", samples.warm);
    const firstRow = summarise("warm backend, first step of a key (cold)", samples.firstStep);
    const viaPluginRow = summarise("warm plugin host, steps back to back", samples.plugin);
    const spacedRow = summarise(`warm plugin host, steps ${STEP_GAP_MS} ms apart`, samples.spaced);
    const ratio = warmRow.medianMs / anchor.medianMs;
    printTable(
      `deno step, ${RUNS} runs each (ms)`,
      [anchor, viaBackendRow, warmRow, firstRow, viaPluginRow, spacedRow].map((row) => ({
        variant: row.name,
        median: row.medianMs.toFixed(1),
        min: row.minMs.toFixed(1),
        max: row.maxMs.toFixed(1),
        ratio: (row.medianMs / anchor.medianMs).toFixed(2),
      })),
    );
    console.log(`target: warm ratio ≤ 1.00: ${ratio <= 1 ? "met" : "NOT met"}`);
    return {
      anchor,
      backend: viaBackendRow,
      warm: warmRow,
      firstStep: firstRow,
      plugin: viaPluginRow,
      spacedPlugin: spacedRow,
      ratio,
    };
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
