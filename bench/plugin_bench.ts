/**
 * Plugin dispatch: what running a backend out of process costs.
 *
 * - Cold host start: a new pool's first call (spawn `deno run` with the
 *   manifest's grant, load the backend, hello, one request), against the
 *   anchor, a bare `deno run` of an empty module. Target ≤ 150 ms.
 * - Warm round trip: one request to a running host (`fingerprint` of the
 *   shell backend), against the same call in process. Target ≤ 5 ms.
 *
 * Run: `deno run --allow-read --allow-write --allow-run --allow-env bench/plugin_bench.ts`
 *
 * @module
 */

import { createShellBackend } from "../backends/shell/mod.ts";
import { builtinPlugins, PluginHostPool } from "../backends/mod.ts";
import { median, printTable } from "./_table.ts";

/** Cold starts per backend. */
const COLD_RUNS = 10;
/** Warm round trips. */
const WARM_RUNS = 500;

/** The bench's figures, medians in milliseconds. */
export interface PluginBenchResult {
  bareDenoMs: number;
  coldShellMs: number;
  coldDenoMs: number;
  warmRoundTripMs: number;
  inProcessCallMs: number;
}

/** Measures, prints a table, and returns the figures. */
export async function benchPlugins(): Promise<PluginBenchResult> {
  const root = await Deno.realPath(await Deno.makeTempDir({ prefix: "runnel_plugin_bench_" }));
  try {
    await Deno.writeTextFile(`${root}/empty.ts`, "\n");
    const bare = async () => {
      const started = performance.now();
      const output = await new Deno.Command(Deno.execPath(), {
        args: ["run", "--no-prompt", `${root}/empty.ts`],
        stdout: "null",
        stderr: "null",
      }).output();
      if (!output.success) throw new Error("bare deno run failed");
      return performance.now() - started;
    };
    const cold = async (backend: string) => {
      const pool = new PluginHostPool({
        plugins: builtinPlugins(),
        context: { scratchRoot: root, agentId: "bench" },
        entryDir: `${root}/hosts`,
      });
      const started = performance.now();
      const fingerprint = await pool.backend(backend).fingerprint();
      const elapsed = performance.now() - started;
      await pool.close();
      if (!fingerprint.available) throw new Error(`${backend}: ${fingerprint.detail}`);
      return elapsed;
    };
    // Warm the module cache and the entry files first.
    await bare();
    await cold("shell");
    await cold("deno");
    const samples = { bare: [] as number[], shell: [] as number[], deno: [] as number[] };
    for (let i = 0; i < COLD_RUNS; i++) {
      samples.bare.push(await bare());
      samples.shell.push(await cold("shell"));
      samples.deno.push(await cold("deno"));
    }

    const pool = new PluginHostPool({
      plugins: builtinPlugins(),
      context: { scratchRoot: root, agentId: "bench" },
      entryDir: `${root}/hosts`,
    });
    const remote = pool.backend("shell");
    const local = createShellBackend();
    const warm: number[] = [];
    const inProcess: number[] = [];
    for (let i = 0; i < 50; i++) await remote.fingerprint();
    for (let i = 0; i < WARM_RUNS; i++) {
      let started = performance.now();
      await remote.fingerprint();
      warm.push(performance.now() - started);
      started = performance.now();
      await local.fingerprint();
      inProcess.push(performance.now() - started);
    }
    await pool.close();

    const result: PluginBenchResult = {
      bareDenoMs: median(samples.bare),
      coldShellMs: median(samples.shell),
      coldDenoMs: median(samples.deno),
      warmRoundTripMs: median(warm),
      inProcessCallMs: median(inProcess),
    };
    printTable(`plugin dispatch (medians; cold ×${COLD_RUNS}, warm ×${WARM_RUNS})`, [
      { what: "bare deno run, empty module (anchor)", ms: fmt(result.bareDenoMs), ratio: "1.00" },
      {
        what: "cold host start, shell backend",
        ms: fmt(result.coldShellMs),
        ratio: (result.coldShellMs / result.bareDenoMs).toFixed(2),
      },
      {
        what: "cold host start, deno backend",
        ms: fmt(result.coldDenoMs),
        ratio: (result.coldDenoMs / result.bareDenoMs).toFixed(2),
      },
      { what: "in-process call (anchor)", ms: fmt(result.inProcessCallMs, 3), ratio: "1.00" },
      {
        what: "warm host round trip",
        ms: fmt(result.warmRoundTripMs, 3),
        ratio: (result.warmRoundTripMs / result.inProcessCallMs).toFixed(1),
      },
    ]);
    const coldMs = Math.max(result.coldShellMs, result.coldDenoMs);
    console.log(
      `targets: cold start ≤ 150 ms ${coldMs <= 150 ? "met" : "NOT met"} · warm round trip ≤ 5 ms ${
        result.warmRoundTripMs <= 5 ? "met" : "NOT met"
      }`,
    );
    return result;
  } finally {
    await Deno.remove(root, { recursive: true });
  }
}

function fmt(ms: number, digits = 1): string {
  return ms.toFixed(digits);
}

if (import.meta.main) {
  await benchPlugins();
}
