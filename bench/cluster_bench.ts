/**
 * Cluster mode on loopback over a 3-member etcd: throughput of 1,000 no-op
 * steps across 4 agents (target ≥ 400 steps/s), and Windmill's protocol —
 * 400 sequential lightweight steps — for the per-step orchestration overhead
 * (target ≤ 5 ms; Windmill ≈ 34–39 ms, Temporal ≈ 40 ms published). The
 * anchor of both is the same work in local mode, in the same process. Each
 * also counts what etcd did per step (its own metrics): commits (raft
 * proposals), WAL fsyncs and requests — figures a loaded machine does not
 * blur.
 *
 * Run: `deno run -A bench/cluster_bench.ts` (needs Debian's etcd-server).
 *
 * @module
 */

import { parsePipeline } from "../core/load.ts";
import { RunClient } from "../agent/client/mod.ts";
import { startServer } from "../agent/server/mod.ts";
import { openEtcdCluster } from "../agent/server/etcd.ts";
import { runPipeline } from "../agent/local/mod.ts";
import { etcdInstalled, startEtcdCluster } from "../tests/_etcd.ts";
import { CLI_PERMISSIONS } from "../tests/_helpers.ts";
import { median, printTable } from "./_table.ts";

const TOKEN = "bench-token";
/** The API's admin token (as `--admin-token-file` would hold it). */
const ADMIN_TOKEN = "cluster-bench-admin-token-0123456789";

/** Figures of the cluster bench. */
export interface ClusterBenchResult {
  stepsPerSecond: number;
  localStepsPerSecond: number;
  overheadMsPerStep: number;
  localOverheadMsPerStep: number;
}

/** Runs both measurements and prints their tables. */
export async function benchCluster(
  noopSteps = 1000,
  sequentialSteps = 400,
): Promise<ClusterBenchResult | undefined> {
  if (!etcdInstalled()) {
    console.log("\ncluster bench skipped: etcd is not installed (apt-get install etcd-server)");
    return undefined;
  }
  const dir = await Deno.realPath(await Deno.makeTempDir({ prefix: "runnel_cluster_bench_" }));
  const etcd = await startEtcdCluster({ members: 3 });
  const opened = await openEtcdCluster({ endpoints: etcd.endpoints });
  const server = await startServer({
    serverId: "bench-server",
    store: opened.store,
    election: opened.election,
    raftState: opened.raftState,
    http: { hostname: "127.0.0.1", port: 0 },
    grpc: { address: "127.0.0.1:0" },
    token: TOKEN,
    adminToken: ADMIN_TOKEN,
    heartbeatMs: 1_000,
    log: () => {},
  });
  // Agents are their own processes, as on real workers (`runnel agent`).
  const agents: Deno.ChildProcess[] = [];
  try {
    for (let i = 0; i < 4; i++) {
      agents.push(
        new Deno.Command(Deno.execPath(), {
          args: [
            "run",
            ...CLI_PERMISSIONS,
            new URL("../main.ts", import.meta.url).pathname,
            "agent",
            "--server",
            `127.0.0.1:${server.grpcPort}`,
            "--labels",
            `bench=${i}`,
            "--slots",
            "4",
            "--allow-shell",
            "--state-dir",
            `${dir}/agent-${i}`,
            "--artifacts",
            `${dir}/artifacts`,
          ],
          env: { RUNNEL_TOKEN: TOKEN },
          stdout: "null",
          stderr: "null",
        }).spawn(),
      );
    }
    await waitForWorkers(`http://127.0.0.1:${server.httpPort}`, 4);
    const client = new RunClient([`http://127.0.0.1:${server.httpPort}`], {
      token: ADMIN_TOKEN,
    });
    const run = async (source: string) => {
      const started = performance.now();
      const { runId } = await client.submit(source, "bench.yaml", dir);
      for await (const _ of client.events(runId)) { /* until it ends */ }
      const { run, steps } = await client.run(runId);
      if (run.status !== "succeeded") throw new Error(`bench run ${run.status}`);
      return { ms: performance.now() - started, steps };
    };

    // 1. Throughput: independent no-op steps, 16 slots in all.
    const noop = `name: noop\nconcurrency: 16\nsteps:\n${
      Array.from({ length: noopSteps }, (_, i) => `  s${i}: { backend: shell, run: "true" }`)
        .join("\n")
    }\n`;
    await run(noop.replace(/^ {2}s([1-9]\d*):.*$/gm, "")); // warm-up: one step
    const beforeNoop = await etcdCounts(etcd.metrics);
    const cluster = await run(noop);
    const noopCounts = perStep(await etcdCounts(etcd.metrics), beforeNoop, noopSteps);
    const local = await timeLocal(noop, dir);
    const stepsPerSecond = noopSteps / (cluster.ms / 1000);
    const localStepsPerSecond = noopSteps / (local / 1000);
    // What the machine allows at all: bare spawns of what the shell backend runs.
    const rawRate = await rawSpawnRate(Math.min(noopSteps, 500), 16);

    // 2. Windmill's protocol: sequential lightweight steps.
    const sequential = `name: sequential\nsteps:\n${
      Array.from({ length: sequentialSteps }, (_, i) =>
        `  s${i}: { backend: shell, run: "true"${i > 0 ? `, needs: [s${i - 1}]` : ""} }`).join("\n")
    }\n`;
    const beforeChain = await etcdCounts(etcd.metrics);
    const chain = await run(sequential);
    const chainCounts = perStep(await etcdCounts(etcd.metrics), beforeChain, sequentialSteps);
    // Execution of a no-op step is one `sh -c true`: what is left is orchestration.
    const spawnMs = await rawSpawnMs(50);
    const localChainMs = await timeLocal(sequential, dir);
    const overheadMsPerStep = chain.ms / sequentialSteps - spawnMs;
    const localOverheadMsPerStep = localChainMs / sequentialSteps - spawnMs;
    // Real steps print: each ends with the rest of its log to store beside its result.
    const printingSteps = Math.max(1, Math.round(sequentialSteps / 4));
    const printing = sequential.replaceAll('run: "true"', 'run: "echo a line"')
      .split("\n").slice(0, printingSteps + 2).join("\n") + "\n";
    const beforePrinting = await etcdCounts(etcd.metrics);
    const printed = await run(printing);
    const printingCounts = perStep(await etcdCounts(etcd.metrics), beforePrinting, printingSteps);

    printTable(`cluster: ${noopSteps} no-op shell steps, 4 agents × 4 slots, 3-member etcd`, [
      {
        what: "local mode, concurrency 16 (anchor)",
        total_ms: local.toFixed(0),
        steps_per_s: localStepsPerSecond.toFixed(0),
        ratio: "1.00",
      },
      {
        what: "cluster",
        total_ms: cluster.ms.toFixed(0),
        steps_per_s: stepsPerSecond.toFixed(0),
        ratio: (stepsPerSecond / localStepsPerSecond).toFixed(2),
      },
      {
        what: `bare \`setsid sh -e -c true\`, 16 in flight (ceiling)`,
        total_ms: rawRate.ms.toFixed(0),
        steps_per_s: rawRate.perSecond.toFixed(0),
        ratio: (rawRate.perSecond / localStepsPerSecond).toFixed(2),
      },
    ]);
    console.log(`target ≥ 400 steps/s: ${stepsPerSecond >= 400 ? "met" : "NOT met"}`);
    printCounts("cluster: etcd per step, 1,000 no-op steps", noopCounts);
    printTable(`cluster: Windmill protocol, ${sequentialSteps} sequential no-op steps`, [
      { what: "raw sh -c true spawn (execution anchor)", ms_per_step: spawnMs.toFixed(2) },
      { what: "local mode, overhead per step", ms_per_step: localOverheadMsPerStep.toFixed(2) },
      { what: "cluster, total per step", ms_per_step: (chain.ms / sequentialSteps).toFixed(2) },
      {
        what: "cluster, overhead per step",
        ms_per_step: overheadMsPerStep.toFixed(2),
      },
      {
        what: `cluster, ${printingSteps} sequential steps printing a line, total per step`,
        ms_per_step: (printed.ms / printingSteps).toFixed(2),
      },
      {
        what: "  etcd commits per printing step",
        ms_per_step: (printingCounts["commits (raft proposals)"] ?? 0).toFixed(2),
      },
      { what: "Windmill (published)", ms_per_step: "34–39" },
      { what: "Temporal (published)", ms_per_step: "40" },
    ]);
    console.log(`target overhead ≤ 5 ms/step: ${overheadMsPerStep <= 5 ? "met" : "NOT met"}`);
    printCounts(`cluster: etcd per step, ${sequentialSteps} sequential steps`, chainCounts);
    return { stepsPerSecond, localStepsPerSecond, overheadMsPerStep, localOverheadMsPerStep };
  } finally {
    for (const agent of agents) {
      try {
        agent.kill("SIGTERM");
      } catch {
        // Already gone.
      }
    }
    // Drained agents exit at once; one that does not within 10 s is killed.
    const timer = setTimeout(() => {
      for (const agent of agents) {
        try {
          agent.kill("SIGKILL");
        } catch {
          // Already gone.
        }
      }
    }, 10_000);
    await Promise.all(agents.map((agent) => agent.status));
    clearTimeout(timer);
    await server.close();
    await opened.close();
    await etcd.stop();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

/** Counters of etcd (summed over members; per-member figures divided by the member count). */
async function etcdCounts(metrics: string[]): Promise<Record<string, number>> {
  const counts: Record<string, number> = {};
  for (const url of metrics) {
    const text = await (await fetch(`${url}/metrics`)).text();
    for (const line of text.split("\n")) {
      const request = line.match(
        /^grpc_server_handled_total\{[^}]*grpc_method="(\w+)"[^}]*\} (\S+)/,
      );
      if (request) {
        counts[`requests ${request[1]}`] = (counts[`requests ${request[1]}`] ?? 0) +
          Number(request[2]);
      }
      for (const [name, label] of MEMBER_COUNTERS) {
        if (line.startsWith(`${name} `)) {
          counts[label] = (counts[label] ?? 0) +
            Number(line.slice(name.length + 1)) / metrics.length;
        }
      }
    }
  }
  return counts;
}

/** Counters every member keeps alike (each applies every entry): averaged over members. */
const MEMBER_COUNTERS: [string, string][] = [
  ["etcd_server_proposals_committed_total", "commits (raft proposals)"],
  ["etcd_disk_wal_fsync_duration_seconds_count", "WAL fsyncs, each member"],
  ["etcd_mvcc_put_total", "puts"],
  ["etcd_mvcc_delete_total", "deletes"],
];

function perStep(
  after: Record<string, number>,
  before: Record<string, number>,
  steps: number,
): Record<string, number> {
  const result: Record<string, number> = {};
  for (const [key, value] of Object.entries(after)) {
    const delta = value - (before[key] ?? 0);
    if (delta > 0) result[key] = delta / steps;
  }
  return result;
}

function printCounts(title: string, counts: Record<string, number>): void {
  printTable(
    title,
    Object.entries(counts)
      .filter(([key]) => !key.startsWith("requests ") || counts[key] >= 0.01)
      .sort(([a], [b]) => a < b ? -1 : 1)
      .map(([what, value]) => ({ what, per_step: value.toFixed(2) })),
  );
}

async function waitForWorkers(http: string, count: number): Promise<void> {
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    const state = await (await fetch(`${http}/cluster-state`, {
      headers: { authorization: `Bearer ${ADMIN_TOKEN}` },
    })).json();
    if (state.workers.length >= count) return;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`Expected ${count} workers within 30 s`);
}

async function rawSpawnMs(count: number): Promise<number> {
  const samples: number[] = [];
  for (let i = 0; i < count; i++) {
    const started = performance.now();
    await new Deno.Command("/bin/sh", { args: ["-c", "true"], stdout: "null", stderr: "null" })
      .output();
    samples.push(performance.now() - started);
  }
  return median(samples);
}

/** Spawns per second of the shell backend's bare command, `concurrency` at a time. */
async function rawSpawnRate(
  count: number,
  concurrency: number,
): Promise<{ ms: number; perSecond: number }> {
  let next = 0;
  const started = performance.now();
  await Promise.all(Array.from({ length: concurrency }, async () => {
    while (next++ < count) {
      await new Deno.Command("setsid", {
        args: ["sh", "-e", "-c", "true"],
        stdout: "null",
        stderr: "null",
      }).output();
    }
  }));
  const ms = performance.now() - started;
  return { ms, perSecond: count / (ms / 1000) };
}

async function timeLocal(source: string, dir: string): Promise<number> {
  const plan = parsePipeline(source, { file: `${dir}/local.yaml`, baseDir: dir });
  const started = performance.now();
  const summary = await runPipeline(plan, { stateDir: `${dir}/local-state` });
  if (summary.status !== "succeeded") throw new Error(`local run ${summary.status}`);
  return performance.now() - started;
}

if (import.meta.main) {
  const [noop, sequential] = Deno.args.map(Number);
  await benchCluster(noop || 1000, sequential || 400);
}
