/**
 * Every benchmark, one after another (`deno task bench`). Each prints a
 * table with its anchor measured in the same process. The scale bench
 * (1,000 simulated agents) runs only when asked: `deno task bench scale`.
 *
 * @module
 */

import { benchPlan } from "./plan_bench.ts";
import { benchDenoStep } from "./deno_step_bench.ts";
import { benchNoopSteps, benchOutsideSequential, benchWindmill } from "./local_bench.ts";
import { benchShellBackend } from "./shell_backend_bench.ts";
import { benchPlugins } from "./plugin_bench.ts";
import { benchDocker } from "./docker_bench.ts";
import { benchStore } from "./store_bench.ts";
import { runIsolated } from "./_isolated.ts";
import { benchSim } from "./sim_bench.ts";
import { benchKubernetes } from "./kubernetes_bench.ts";
import { benchSpanCost, benchTraces } from "./trace_bench.ts";
import { benchSplit } from "./split_bench.ts";
import { benchUi } from "./ui_bench.ts";
import { benchGrowth } from "./growth_bench.ts";
import { benchScale } from "./scale_bench.ts";

if (import.meta.main) {
  console.log(
    `runnel benchmarks · deno ${Deno.version.deno} · ${navigator.hardwareConcurrency} cores`,
  );
  await benchPlan();
  await benchPlugins();
  await benchDenoStep();
  await benchShellBackend();
  await benchNoopSteps();
  await benchOutsideSequential();
  await benchWindmill();
  await benchSplit();
  await benchSpanCost();
  await benchTraces();
  await benchDocker();
  await benchStore();
  // In a process of its own: it can crash at its exit (see _isolated.ts).
  const cluster = await runIsolated("./cluster_bench.ts");
  if (cluster.code !== 0 || cluster.killed.length > 0) {
    console.log(
      `\ncluster bench: its process ended with ${
        cluster.signal ?? `exit code ${cluster.code}`
      } (Deno's node:http2 abort at exit: denoland/deno#36788); ` +
        `${cluster.killed.length} process(es) it left running were killed`,
    );
  }
  await benchSim();
  await benchKubernetes();
  await benchUi();
  await benchGrowth();
  // Minutes long and heavy (1,000 agents): only when asked for.
  if (Deno.args.includes("scale") || Deno.env.get("RUNNEL_BENCH_SCALE") === "1") {
    await benchScale();
  } else {
    console.log("\nscale bench not run: `deno task bench scale` (or RUNNEL_BENCH_SCALE=1) runs it");
  }
}
