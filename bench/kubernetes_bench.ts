/**
 * The `kubernetes` backend against the API stand-in (`infra/kube/`, pods
 * as local Docker containers), two figures:
 *
 * - a trivial Job step (`true`) through runnel (the backend in a warm
 *   sandboxed plugin host, as an agent runs it: create, watch, logs, end)
 *   vs the anchor `kubectl create -f job.yaml && kubectl wait
 *   --for=condition=complete` against the same stand-in in the same run
 *   (target ratio ≤ 1.0);
 * - a pipeline of 50 Job steps (a matrix) with `concurrency: 10`, run by
 *   the local runner: API calls per step (target ≤ 10: watches shared, no
 *   polling).
 *
 * Run: `deno task bench` (all) or `deno run -A bench/kubernetes_bench.ts`.
 *
 * @module
 */

import { builtinPlugins, PluginHostPool } from "../backends/mod.ts";
import type { ExecutionBackend } from "../backends/backend.ts";
import { scratchSpec } from "../backends/testing.ts";
import { loadPipeline, runPipeline } from "../mod.ts";
import { ensureBusyboxImage } from "../infra/images.ts";
import { type KubeStandIn, startKubeStandIn } from "../infra/kube/mod.ts";
import { median, printTable } from "./_table.ts";

/** Samples of the trivial step, each way. */
const TRIVIAL_SAMPLES = 7;
/** The fan-out figure: steps, and how many run at once (the numbers). */
const MANY_STEPS = 50;
const CONCURRENCY = 10;

function ms(value: number): string {
  return value.toFixed(0);
}

async function kubectlCreateAndWait(kube: KubeStandIn, home: string, name: string, image: string) {
  const file = `${home}/${name}.yaml`;
  await Deno.writeTextFile(
    file,
    JSON.stringify({
      apiVersion: "batch/v1",
      kind: "Job",
      metadata: { name },
      spec: {
        backoffLimit: 0,
        template: {
          spec: { restartPolicy: "Never", containers: [{ name: "c", image, command: ["true"] }] },
        },
      },
    }),
  );
  const started = performance.now();
  const script = `kubectl create -f ${file} >/dev/null && ` +
    `kubectl wait --for=condition=complete job/${name} --timeout=60s >/dev/null`;
  const output = await new Deno.Command("sh", {
    args: ["-c", script],
    env: { HOME: home, KUBECONFIG: kube.kubeconfig, PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin" },
    clearEnv: true,
    stderr: "piped",
  }).output();
  if (!output.success) {
    throw new Error(`kubectl failed: ${new TextDecoder().decode(output.stderr)}`);
  }
  return performance.now() - started;
}

async function runnelStep(
  backend: ExecutionBackend,
  image: string,
  index: number,
  agentId: string,
) {
  await using spec = await scratchSpec({ image, command: ["true"] }, {
    spec: { agentId, attemptId: `${agentId}/trivial/${index}`, stepId: "trivial" },
  });
  const started = performance.now();
  const execution = await backend.start(spec);
  const status = await execution.wait();
  const elapsed = performance.now() - started;
  for await (const _ of execution.logs) { /* drained */ }
  await execution.cleanup();
  if (status.exitCode !== 0) throw new Error(`step failed: ${JSON.stringify(status)}`);
  return elapsed;
}

/** Runs both figures and prints their tables. */
export async function benchKubernetes(): Promise<void> {
  const image = await ensureBusyboxImage();
  await using kube = await startKubeStandIn();
  const previous = Deno.env.get("KUBECONFIG");
  Deno.env.set("KUBECONFIG", kube.kubeconfig);
  const home = await Deno.makeTempDir({ prefix: "runnel-bench-kubectl-" });
  const scratchRoot = await Deno.makeTempDir({ prefix: "runnel-bench-kube-" });
  const pool = new PluginHostPool({
    plugins: builtinPlugins(),
    context: { scratchRoot, agentId: "bench-kube" },
  });
  try {
    const backend = pool.backend("kubernetes");
    // Warm both: the plugin host and its watches; kubectl's discovery cache.
    await runnelStep(backend, image, 0, "bench-kube");
    await kubectlCreateAndWait(kube, home, "warm", image);
    const runnel: number[] = [];
    const kubectl: number[] = [];
    for (let i = 1; i <= TRIVIAL_SAMPLES; i++) {
      runnel.push(await runnelStep(backend, image, i, "bench-kube"));
      kubectl.push(await kubectlCreateAndWait(kube, home, `anchor-${i}`, image));
    }
    const runnelMs = median(runnel);
    const kubectlMs = median(kubectl);
    printTable("kubernetes backend: a trivial Job step (`true`), median ms", [
      { variant: "kubectl create -f && kubectl wait (anchor)", ms: ms(kubectlMs), ratio: "1.00" },
      {
        variant: "runnel kubernetes step, warm plugin host",
        ms: ms(runnelMs),
        ratio: `${(runnelMs / kubectlMs).toFixed(2)} (target ≤ 1.0)`,
      },
    ]);

    // 50 steps, 10 at a time, through the runner (local mode, one plugin host):
    // API calls per step.
    const pipeline = `${scratchRoot}/many.yaml`;
    await Deno.writeTextFile(
      pipeline,
      [
        "name: many-jobs",
        `concurrency: ${CONCURRENCY}`,
        "steps:",
        "  many:",
        "    backend: kubernetes",
        `    image: ${image}`,
        '    command: ["true"]',
        `    concurrency: ${CONCURRENCY}`,
        `    matrix: { i: [${Array.from({ length: MANY_STEPS }, (_, i) => i + 1).join(", ")}] }`,
        "",
      ].join("\n"),
    );
    kube.clearRequests();
    const started = performance.now();
    const summary = await runPipeline(await loadPipeline(pipeline), {
      stateDir: `${scratchRoot}/state`,
    });
    if (summary.status !== "succeeded") throw new Error(`the pipeline ${summary.status}`);
    const elapsed = performance.now() - started;
    const requests = kube.requests;
    const count = (filter: (r: (typeof requests)[number]) => boolean) =>
      requests.filter(filter).length;
    const perStep = (n: number) => (n / MANY_STEPS).toFixed(2);
    printTable(`kubernetes backend: ${MANY_STEPS} Job steps, concurrency: ${CONCURRENCY}`, [
      { what: "API calls per step, all", value: `${perStep(requests.length)} (target ≤ 10)` },
      { what: "  creates (Job, Secret)", value: perStep(count((r) => r.method === "POST")) },
      { what: "  log follows", value: perStep(count((r) => r.follow)) },
      { what: "  deletes (pods, Job)", value: perStep(count((r) => r.method === "DELETE")) },
      { what: "  watches opened (shared)", value: String(count((r) => r.watch)) },
      { what: "  lists", value: String(count((r) => r.method === "GET" && !r.watch && !r.follow)) },
      { what: "wall time, s", value: (elapsed / 1000).toFixed(1) },
    ]);
  } finally {
    await pool.close();
    if (previous === undefined) Deno.env.delete("KUBECONFIG");
    else Deno.env.set("KUBECONFIG", previous);
    await Deno.remove(home, { recursive: true }).catch(() => {});
    await Deno.remove(scratchRoot, { recursive: true }).catch(() => {});
  }
}

if (import.meta.main) await benchKubernetes();
