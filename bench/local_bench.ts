/**
 * Local-mode benchmarks, each printed as a table beside its anchor measured
 * in the same process on the same machine:
 *
 * - 1,000 no-op `shell` steps (`true`), durable store included, vs raw
 *   `Deno.Command("true")` spawns, and vs the bare processes of a step
 *   (`setsid sh -e -c true`) (target ≥ 1,000 steps/s, ≤ 2× a raw spawn, at
 *   concurrency 2).
 * - Windmill's published protocol: 400 sequential light tasks (naive
 *   `fibo(10)`) and 10 sequential long ones (`fibo(33)`), with `deno` and
 *   with `shell` steps. Execution is the task's own work, anchored by a bare
 *   `deno run` of the same script on this machine; orchestration overhead
 *   is everything else per step (target ≤ 5 ms), split into the engine's
 *   share (assignment and transition, between attempts) and the attempt's
 *   (work directory, plugin host, spawn, logs and outputs around the task).
 *
 * Run with `deno task bench` (or this file alone).
 *
 * @module
 */

import { parsePipeline, runPipeline, type RunSummary } from "../mod.ts";
import { median, printTable, type Row } from "./_table.ts";
import { CLI_PERMISSIONS, MAIN } from "../tests/_helpers.ts";

async function tempDir(): Promise<string> {
  return await Deno.realPath(await Deno.makeTempDir({ prefix: "runnel-bench-" }));
}

async function rawSpawns(
  count: number,
  parallel: number,
  command = "true",
  args: string[] = [],
): Promise<number> {
  const started = performance.now();
  let next = 0;
  await Promise.all(
    Array.from({ length: parallel }, async () => {
      while (next < count) {
        next++;
        await new Deno.Command(command, { args, stdout: "null", stderr: "null" }).output();
      }
    }),
  );
  return performance.now() - started;
}

/**
 * The processes every `shell` step is, spawned bare: `setsid(1)` (a new
 * session and process group, so that a cancel reaches what the step
 * started) exec'ing `sh -e -c`. The floor of a step's cost on this machine.
 */
function stepChainSpawns(count: number, parallel: number): Promise<number> {
  return rawSpawns(count, parallel, "/usr/bin/setsid", ["/bin/sh", "-e", "-c", "true"]);
}

/** 1,000 no-op shell steps through local mode vs raw spawns. */
export async function benchNoopSteps(count = 1000, concurrency = 2): Promise<void> {
  const dir = await tempDir();
  try {
    const steps = Array.from(
      { length: count },
      (_, i) => `  s${i}: { backend: shell, run: "true" }`,
    ).join("\n");
    const plan = parsePipeline(`name: noop\nconcurrency: ${concurrency}\nsteps:\n${steps}\n`, {
      file: `${dir}/pipeline.yaml`,
      baseDir: dir,
    });
    const anchorMs = await rawSpawns(count, concurrency);
    const chainMs = await stepChainSpawns(count, concurrency);
    const started = performance.now();
    const summary = await runPipeline(plan, { stateDir: `${dir}/.runnel` });
    const runnelMs = performance.now() - started;
    if (summary.status !== "succeeded") throw new Error(`noop run ${summary.status}`);
    printTable(`${count} no-op shell steps, concurrency ${concurrency}`, [
      {
        what: 'raw Deno.Command("true") (anchor)',
        total_ms: anchorMs.toFixed(0),
        per_step_ms: (anchorMs / count).toFixed(2),
        steps_per_s: (count / anchorMs * 1000).toFixed(0),
        ratio: "1.00",
      },
      {
        what: "setsid sh -e -c true, bare (a step's processes)",
        total_ms: chainMs.toFixed(0),
        per_step_ms: (chainMs / count).toFixed(2),
        steps_per_s: (count / chainMs * 1000).toFixed(0),
        ratio: (chainMs / anchorMs).toFixed(2),
      },
      {
        what: "runnel local mode",
        total_ms: runnelMs.toFixed(0),
        per_step_ms: (runnelMs / count).toFixed(2),
        steps_per_s: (count / runnelMs * 1000).toFixed(0),
        ratio: (runnelMs / anchorMs).toFixed(2),
      },
    ]);
    console.log(
      `overhead over a raw spawn: ${((runnelMs - anchorMs) / count).toFixed(2)} ms/step, ` +
        `over the step's own processes: ${((runnelMs - chainMs) / count).toFixed(2)} ms/step ` +
        `(target ≥ 1,000 steps/s and ≤ 2× a raw spawn: ${
          count / runnelMs * 1000 >= 1000 && runnelMs <= 2 * anchorMs ? "met" : "NOT met"
        })`,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** `runnel run FILE` as a user types it (`deno task run`), output to /dev/null; wall ms. */
async function runnelRun(file: string, stateDir: string): Promise<number> {
  const started = performance.now();
  const { code } = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      ...CLI_PERMISSIONS,
      MAIN,
      "run",
      file,
      "--state-dir",
      stateDir,
    ],
    stdout: "null",
    stderr: "null",
  }).output();
  const ms = performance.now() - started;
  if (code !== 0) throw new Error(`runnel run ${file} exited with ${code}`);
  return ms;
}

/**
 * 400 sequential no-op shell steps timed from outside: `runnel run` as a
 * whole process (start-up, plan, store, every step, exit) against the
 * anchor, 400 sequential `sh -c true` spawned from a Deno process. A run of
 * one step gives runnel's own start-up and exit. Target: ≤ 1 ms per step
 * beyond the spawn, start-up included (issue 17).
 */
export async function benchOutsideSequential(count = 400, runs = 3): Promise<void> {
  const dir = await tempDir();
  try {
    const steps = (n: number) =>
      Array.from(
        { length: n },
        (_, i) => `  s${i}: { backend: shell, run: "true"${i > 0 ? `, needs: [s${i - 1}]` : ""} }`,
      )
        .join("\n");
    await Deno.writeTextFile(`${dir}/one.yaml`, `name: one\nsteps:\n${steps(1)}\n`);
    await Deno.writeTextFile(`${dir}/many.yaml`, `name: many\nsteps:\n${steps(count)}\n`);
    await runnelRun(`${dir}/one.yaml`, `${dir}/warm`); // module cache warm, not timed
    const anchor: number[] = [];
    const one: number[] = [];
    const many: number[] = [];
    for (let round = 0; round < runs; round++) {
      const started = performance.now();
      for (let i = 0; i < count; i++) {
        await new Deno.Command("sh", { args: ["-c", "true"], stdout: "null", stderr: "null" })
          .output();
      }
      anchor.push(performance.now() - started);
      one.push(await runnelRun(`${dir}/one.yaml`, `${dir}/state-one-${round}`));
      many.push(await runnelRun(`${dir}/many.yaml`, `${dir}/state-many-${round}`));
    }
    const anchorMs = median(anchor);
    const oneMs = median(one);
    const manyMs = median(many);
    const beyond = (manyMs - anchorMs) / count;
    printTable(`${count} sequential no-op shell steps, timed from outside (median of ${runs})`, [
      {
        what: `${count} × sh -c true, sequential (anchor)`,
        total_ms: anchorMs.toFixed(0),
        per_step_ms: (anchorMs / count).toFixed(2),
        ratio: "1.00",
      },
      {
        what: "runnel run, 1 step (start-up and exit)",
        total_ms: oneMs.toFixed(0),
        per_step_ms: "",
        ratio: "",
      },
      {
        what: `runnel run, ${count} steps`,
        total_ms: manyMs.toFixed(0),
        per_step_ms: (manyMs / count).toFixed(2),
        ratio: (manyMs / anchorMs).toFixed(2),
      },
    ]);
    console.log(
      `beyond the spawn: ${beyond.toFixed(2)} ms/step start-up included, ` +
        `${((manyMs - oneMs - anchorMs) / count).toFixed(2)} ms/step without it ` +
        `(target ≤ 1 ms/step from outside: ${beyond <= 1 ? "met" : "NOT met"})`,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

const FIBO_MODULE = `export default function (ctx: { args: string[] }) {
  const n = Number(ctx.args[0]);
  const fibo = (k: number): number => k <= 1 ? k : fibo(k - 1) + fibo(k - 2);
  fibo(n);
}
`;

const FIBO_SCRIPT = `const n = Number(Deno.args[0]);
const fibo = (k) => k <= 1 ? k : fibo(k - 1) + fibo(k - 2);
fibo(n);
`;

/**
 * Windmill's breakdown of a sequential flow. `executionMs` is the task's own
 * work (a bare run of it); an attempt's recorded span is not: local mode
 * marks an attempt started before it prepares the work directory and the
 * backend, and ended after it has stored the outputs.
 */
function windmillBreakdown(
  summary: RunSummary,
  order: string[],
  wallMs: number,
  executionMs: number,
) {
  let assignment = 0;
  let attempts = 0;
  let transition = 0;
  let previousEnd: number | undefined;
  for (const id of order) {
    const attempt = summary.steps[id].attempts.at(-1)!;
    assignment += attempt.startedAt! - attempt.scheduledAt;
    attempts += attempt.endedAt! - attempt.startedAt!;
    if (previousEnd !== undefined) transition += attempt.scheduledAt - previousEnd;
    previousEnd = attempt.endedAt!;
  }
  const n = order.length;
  const perStep = wallMs / n;
  return {
    total_s: (wallMs / 1000).toFixed(2),
    per_step_ms: perStep.toFixed(2),
    execution_ms: executionMs.toFixed(2),
    overhead_ms: (perStep - executionMs).toFixed(2),
    engine_ms: ((assignment + transition) / n).toFixed(2),
    in_attempt_ms: (attempts / n - executionMs).toFixed(2),
  };
}

/** Runs one sequential fibo flow and returns Windmill's breakdown. */
async function fiboFlow(
  backend: "deno" | "shell",
  tasks: number,
  n: number,
  executionMs: number,
) {
  const dir = await tempDir();
  try {
    await Deno.writeTextFile(`${dir}/fibo.ts`, FIBO_MODULE);
    await Deno.writeTextFile(`${dir}/fibo.js`, FIBO_SCRIPT);
    const deno = Deno.execPath();
    const lines = [];
    for (let i = 0; i < tasks; i++) {
      const needs = i > 0 ? `, needs: [t${i - 1}]` : "";
      lines.push(
        backend === "deno"
          ? `  t${i}: { backend: deno, module: ./fibo.ts, args: ["${n}"]${needs} }`
          : `  t${i}: { backend: shell, run: "${deno} run --quiet fibo.js ${n}"${needs} }`,
      );
    }
    const plan = parsePipeline(`name: fibo\nsteps:\n${lines.join("\n")}\n`, {
      file: `${dir}/pipeline.yaml`,
      baseDir: dir,
    });
    const started = performance.now();
    const summary = await runPipeline(plan, { stateDir: `${dir}/.runnel` });
    const wallMs = performance.now() - started;
    if (summary.status !== "succeeded") throw new Error(`fibo flow ${summary.status}`);
    return windmillBreakdown(summary, plan.order, wallMs, executionMs);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** A bare `deno run` of the fibo script: the task's own work, the execution anchor (median). */
async function bareDenoRun(n: number, times: number): Promise<number> {
  const dir = await tempDir();
  try {
    await Deno.writeTextFile(`${dir}/fibo.js`, FIBO_SCRIPT);
    const samples: number[] = [];
    for (let i = 0; i < times; i++) {
      const started = performance.now();
      await new Deno.Command(Deno.execPath(), {
        args: ["run", "--quiet", `${dir}/fibo.js`, String(n)],
        stdout: "null",
      }).output();
      samples.push(performance.now() - started);
    }
    return median(samples);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Windmill's protocol: 400 light and 10 long sequential tasks. */
export async function benchWindmill(lightTasks = 400, longTasks = 10): Promise<void> {
  const bareLight = await bareDenoRun(10, 21);
  const bareLong = await bareDenoRun(33, 5);
  const rows: Row[] = [];
  const lightOverheads: number[] = [];
  for (const backend of ["deno", "shell"] as const) {
    const light = await fiboFlow(backend, lightTasks, 10, bareLight);
    lightOverheads.push(Number(light.overhead_ms));
    rows.push({ flow: `${lightTasks} × fibo(10)`, backend, ...light });
    rows.push({
      flow: `${longTasks} × fibo(33)`,
      backend,
      ...await fiboFlow(backend, longTasks, 33, bareLong),
    });
  }
  printTable("Windmill protocol, sequential flows, local mode (per-step averages)", rows);
  printTable("Anchors", [
    { what: "bare deno run fibo(10), per task (execution)", ms: bareLight.toFixed(1) },
    { what: "bare deno run fibo(33), per task (execution)", ms: bareLong.toFixed(1) },
    { what: "Windmill, 400 × fibo(10) total (m4.large, published)", ms: "19700" },
    { what: "Temporal, 400 × fibo(10) total (published)", ms: "39000" },
    { what: "Hatchet, 400 × fibo(10) total (published)", ms: "35800" },
    { what: "Windmill 2026 per-step overhead (published)", ms: "34" },
  ]);
  console.log(
    "execution = a bare deno run of the task (start-up included); overhead = total / steps − execution" +
      " = engine (assignment + transition) + in_attempt (runnel's work around the task) + run setup",
  );
  const worst = Math.max(...lightOverheads);
  console.log(
    `target overhead ≤ 5 ms/step (light flows): ${worst <= 5 ? "met" : "NOT met"} (${
      worst.toFixed(2)
    } ms)`,
  );
}

if (import.meta.main) {
  await benchNoopSteps();
  await benchOutsideSequential();
  await benchWindmill();
}
