/**
 * The `docker` backend's overhead, each figure beside its anchor measured in
 * the same process on the same machine:
 *
 * 1. One `echo` step, end to end through runnel (`runPipeline`, one-step
 *    pipeline, warm plugin host) vs a raw `docker run --rm
 *    runnel/busybox:local echo hi` (target: median ratio ≤ 1.10).
 * 2. 200 `echo` steps at concurrency 4 through runnel vs 200 raw
 *    `docker run --rm` with 4 in flight (target: throughput ratio ≥ 0.9).
 *
 * Both also show the backend used directly (`start` → drain logs → `wait` →
 * `cleanup`, no runner, no plugin host), to tell the backend's cost from the
 * runner's. And a raw `docker run` with the backend's own isolation
 * (`--network none --init`) shows what a bridge network costs the anchor.
 *
 * Run: `deno run --allow-all bench/docker_bench.ts` (needs Docker; the
 * busybox image is built offline first if missing).
 *
 * @module
 */

import { type AttemptSpec, isSuccess } from "../backends/backend.ts";
import { builtinPlugins, PluginHostPool, type PluginSource } from "../backends/mod.ts";
import createDockerBackend from "../backends/docker/mod.ts";
import { dockerManifest } from "../backends/docker/manifest.ts";
import { ensureBusyboxImage } from "../infra/images.ts";
import { parsePipeline, runPipeline } from "../mod.ts";
import { median, printTable, type Row } from "./_table.ts";

/** Options of {@link benchDocker}. */
export interface DockerBenchOptions {
  /** Sequential executions per variant for the single-step figure (default 15). */
  repetitions?: number;
  /** Steps of the throughput figure (default 200). */
  steps?: number;
  /** Steps in flight for the throughput figure (default 4). */
  concurrency?: number;
}

/** The figures, in milliseconds and steps per second. */
export interface DockerBenchResult {
  /** Median of one raw `docker run --rm … echo hi`. */
  anchorMedianMs: number;
  /** Median of one echo step through runnel. */
  runnelMedianMs: number;
  /** runnel / anchor medians (target ≤ 1.10). */
  latencyRatio: number;
  anchorStepsPerSecond: number;
  runnelStepsPerSecond: number;
  /** runnel / anchor throughput (target ≥ 0.9). */
  throughputRatio: number;
}

/** Measures both figures, prints their tables, and returns them (undefined without Docker). */
export async function benchDocker(
  options: DockerBenchOptions = {},
): Promise<DockerBenchResult | undefined> {
  const repetitions = options.repetitions ?? 15;
  const steps = options.steps ?? 200;
  const concurrency = options.concurrency ?? 4;
  const backend = createDockerBackend();
  const fingerprint = await backend.fingerprint();
  if (!fingerprint.available) {
    console.log(`\ndocker bench skipped: ${fingerprint.detail}`);
    return undefined;
  }
  const image = await ensureBusyboxImage();
  const dir = await Deno.realPath(await Deno.makeTempDir({ prefix: "runnel-docker-bench-" }));
  const stateDir = `${dir}/.runnel`;
  await Deno.mkdir(`${stateDir}/work`, { recursive: true });
  const plugins = dockerPlugins();
  // One pool for every run: the plugin host stays warm, as in a long-lived runner.
  const pool = new PluginHostPool({
    plugins,
    context: { scratchRoot: await Deno.realPath(`${stateDir}/work`), agentId: "docker-bench" },
  });
  let runs = 0;
  const runnel = async (count: number, parallel: number) => {
    const lines = Array.from(
      { length: count },
      (_, i) => `  s${i}: { backend: docker, image: ${image}, run: "echo hi" }`,
    );
    const plan = parsePipeline(
      `name: docker-echo-${runs++}\nconcurrency: ${parallel}\nsteps:\n${lines.join("\n")}\n`,
      { file: `${dir}/pipeline.yaml`, baseDir: dir },
    );
    const started = performance.now();
    const summary = await runPipeline(plan, { stateDir, plugins, pool });
    const elapsed = performance.now() - started;
    if (summary.status !== "succeeded") {
      const failed = Object.entries(summary.steps).find(([, s]) => s.status !== "succeeded");
      throw new Error(`docker echo run ${summary.status}: ${JSON.stringify(failed)}`);
    }
    return elapsed;
  };
  let attempts = 0;
  const direct = async () => {
    const id = `bench-${attempts++}`;
    const workDir = `${dir}/direct/${id}`;
    await Deno.mkdir(`${workDir}/out`, { recursive: true });
    const spec: AttemptSpec = {
      agentId: "docker-bench-direct",
      scratchRoot: dir,
      runId: "bench",
      stepId: "echo",
      attemptId: `${crypto.randomUUID()}/echo/1`,
      attempt: 1,
      config: { image, run: "echo hi" },
      baseDir: dir,
      workDir,
      inputs: {},
      inputsDir: workDir,
      outputsDir: `${workDir}/out`,
      outputs: [],
      env: {},
      matrix: {},
    };
    const started = performance.now();
    const execution = await backend.start(spec);
    for await (const _ of execution.logs) { /* drain */ }
    const status = await execution.wait();
    await execution.cleanup();
    const elapsed = performance.now() - started;
    if (!isSuccess(status)) throw new Error(`direct echo failed: ${JSON.stringify(status)}`);
    return elapsed;
  };
  try {
    // Cold figures first, for the record: a new plugin host, a first container.
    const coldRunnel = await runnel(1, 1);
    await rawDockerRun(image, []);
    await direct();

    const samples: Record<string, number[]> = { anchor: [], isolated: [], direct: [], runnel: [] };
    for (let i = 0; i < repetitions; i++) {
      // Interleaved, so that drift in machine load hits every variant alike.
      samples.anchor.push(await rawDockerRun(image, []));
      samples.isolated.push(await rawDockerRun(image, ["--network", "none", "--init"]));
      samples.direct.push(await direct());
      samples.runnel.push(await runnel(1, 1));
    }
    const anchorMedianMs = median(samples.anchor);
    const runnelMedianMs = median(samples.runnel);
    const latencyRow = (what: string, values: number[]): Row => ({
      what,
      median_ms: median(values).toFixed(0),
      min_ms: Math.min(...values).toFixed(0),
      max_ms: Math.max(...values).toFixed(0),
      ratio: (median(values) / anchorMedianMs).toFixed(2),
    });
    printTable(`one docker echo step, ${repetitions} sequential runs each (median)`, [
      latencyRow(`docker run --rm ${image} echo hi (anchor)`, samples.anchor),
      latencyRow("docker run --rm --network none --init … (same isolation)", samples.isolated),
      latencyRow("docker backend direct (start → wait → cleanup)", samples.direct),
      latencyRow("runnel runPipeline, 1 step (warm plugin host)", samples.runnel),
      {
        what: "runnel runPipeline, 1 step (cold plugin host, once)",
        median_ms: coldRunnel.toFixed(0),
        min_ms: "",
        max_ms: "",
        ratio: (coldRunnel / anchorMedianMs).toFixed(2),
      },
    ]);
    const latencyRatio = runnelMedianMs / anchorMedianMs;
    console.log(
      `latency ratio ${latencyRatio.toFixed(2)} (target ≤ 1.10: ${verdict(latencyRatio <= 1.1)})`,
    );

    const anchorMs = await lanes(steps, concurrency, () => rawDockerRun(image, []));
    const directMs = await lanes(steps, concurrency, direct);
    const runnelMs = await runnel(steps, concurrency);
    const perSecond = (ms: number) => steps / ms * 1000;
    const throughputRow = (what: string, ms: number): Row => ({
      what,
      total_ms: ms.toFixed(0),
      steps_per_s: perSecond(ms).toFixed(2),
      ratio: (perSecond(ms) / perSecond(anchorMs)).toFixed(2),
    });
    printTable(`${steps} docker echo steps, ${concurrency} in flight`, [
      throughputRow(`docker run --rm ${image} echo hi ×${concurrency} (anchor)`, anchorMs),
      throughputRow("docker backend direct", directMs),
      throughputRow(`runnel runPipeline, concurrency ${concurrency}`, runnelMs),
    ]);
    const throughputRatio = perSecond(runnelMs) / perSecond(anchorMs);
    console.log(
      `throughput ratio ${throughputRatio.toFixed(2)} (target ≥ 0.9: ${
        verdict(throughputRatio >= 0.9)
      })`,
    );
    return {
      anchorMedianMs,
      runnelMedianMs,
      latencyRatio,
      anchorStepsPerSecond: perSecond(anchorMs),
      runnelStepsPerSecond: perSecond(runnelMs),
      throughputRatio,
    };
  } finally {
    await pool.close();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

/** The built-in plugins, with the docker backend added if the build does not have it yet. */
function dockerPlugins(): PluginSource[] {
  const builtins = builtinPlugins();
  if (builtins.some((plugin) => plugin.name === "docker")) return builtins;
  return [...builtins, {
    name: "docker",
    module: new URL("../backends/docker/mod.ts", import.meta.url).href,
    manifest: dockerManifest,
  }];
}

/** One `docker run --rm IMAGE echo hi` through the CLI; returns its wall time. */
async function rawDockerRun(image: string, flags: string[]): Promise<number> {
  const started = performance.now();
  const output = await new Deno.Command("docker", {
    args: ["run", "--rm", ...flags, image, "echo", "hi"],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const elapsed = performance.now() - started;
  if (!output.success) {
    throw new Error(`docker run failed: ${new TextDecoder().decode(output.stderr)}`);
  }
  return elapsed;
}

/** Runs `task` `count` times with `parallel` in flight; returns the wall time. */
async function lanes(count: number, parallel: number, task: () => Promise<unknown>) {
  let next = 0;
  const started = performance.now();
  await Promise.all(Array.from({ length: parallel }, async () => {
    while (next < count) {
      next++;
      await task();
    }
  }));
  return performance.now() - started;
}

function verdict(met: boolean): string {
  return met ? "met" : "NOT met";
}

if (import.meta.main) {
  await benchDocker();
}
