/**
 * Scale beyond this machine, simulated and measured here: 1,000 agents in
 * one process (each a real gRPC stream, `bench/scale/sim_agent.ts`) against
 * 3 `runnel server` processes over a real 3-member etcd, 10,000 queued
 * no-op steps across 100 runs, then a SIGKILL of the scheduling server with
 * every agent connected. Anchors: Nomad's C1M (≈ 3,750 containers placed
 * per second on 5 servers, published) and the raw etcd write rate of the
 * same cluster, measured in the same run.
 *
 * Opt-in (`deno task bench` runs it last; it needs Debian's etcd-server):
 * `deno run -A bench/scale_bench.ts [agents] [runs] [stepsPerRun]`.
 *
 * @module
 */

import { etcdInstalled, startEtcdCluster } from "../tests/_etcd.ts";
import { openEtcdStore } from "../consensus/etcd.ts";
import { runScale, type ScaleResult } from "./scale/harness.ts";
import { printTable } from "./_table.ts";

/** Options of {@link benchScale}. */
export interface ScaleBenchOptions {
  agents?: number;
  runs?: number;
  stepsPerRun?: number;
  slots?: number;
  delayMs?: number;
  heartbeatMs?: number;
}

/** Runs the harness at scale and prints its tables; undefined without etcd. */
export async function benchScale(
  options: ScaleBenchOptions = {},
): Promise<ScaleResult | undefined> {
  if (!etcdInstalled()) {
    console.log("\nscale bench skipped: etcd is not installed (apt-get install etcd-server)");
    return undefined;
  }
  const agents = options.agents ?? 1_000;
  const runs = options.runs ?? 100;
  const stepsPerRun = options.stepsPerRun ?? 100;
  const rawWrites = await rawEtcdWritesPerSecond();
  const result = await runScale({
    agents,
    runs,
    stepsPerRun,
    slots: options.slots ?? 4,
    delayMs: options.delayMs ?? 0,
    heartbeatMs: options.heartbeatMs ?? 5_000,
    failover: true,
    failoverSteps: 1_000,
    failoverDelayMs: 50,
    log: (line) => console.log(`  · ${line}`),
  });
  printScale(result, rawWrites);
  return result;
}

/** Prints the tables of a harness run. */
export function printScale(result: ScaleResult, rawWritesPerSecond?: number): void {
  const f = (value: number, digits = 0) => Number.isFinite(value) ? value.toFixed(digits) : "–";
  printTable(
    `scale: ${result.agents} simulated agents (gRPC streams), 3 servers, 3-member etcd, ` +
      `${result.steps} queued no-op steps`,
    [
      {
        what: "assignments / s (sustained)",
        value: f(result.assignmentsPerSecond),
        anchor: "target ≥ 2,000; Nomad C1M ≈ 3,750 on 5 servers",
      },
      {
        what: "results / s (sustained)",
        value: f(result.resultsPerSecond),
        anchor: "target ≥ 2,000",
      },
      {
        what: "assignments / results per s once all runs are in",
        value: `${f(result.drainAssignmentsPerSecond)} / ${f(result.drainResultsPerSecond)}`,
        anchor: "the queue draining, not the API's intake",
      },
      ...(rawWritesPerSecond === undefined ? [] : [{
        what: "raw etcd txn / s, 64 in flight, same machine",
        value: f(rawWritesPerSecond),
        anchor: "the store's ceiling here",
      }]),
      {
        what: "assignment latency p50 / p99 (placed → at agent)",
        value: `${f(result.dispatchP50Ms, 1)} / ${f(result.dispatchP99Ms, 1)} ms`,
        anchor: "",
      },
      {
        what: "queued latency p50 / p99 (ready → at agent)",
        value: `${f(result.queuedP50Ms)} / ${f(result.queuedP99Ms)} ms`,
        anchor: "includes waiting for a slot",
      },
      {
        what: "server RSS per connected agent",
        value: `${f(result.rssPerAgentKiB)} KiB`,
        anchor: `servers at ${result.serverRssMiB.map((m) => f(m)).join(", ")} MiB`,
      },
      {
        what: "etcd writes (put+delete) per step",
        value: f(result.writesPerStep, 2),
        anchor: `puts ${f(result.putsPerStep, 2)}`,
      },
      {
        what: "etcd proposals (raft entries) per step",
        value: f(result.proposalsPerStep, 2),
        anchor: `fsyncs ${f(result.fsyncsPerStep, 2)} per step`,
      },
      {
        what: "etcd WAL bytes per step",
        value: f(result.walBytesPerStep),
        anchor: `client bytes in ${f(result.clientBytesInPerStep)}`,
      },
      {
        what: "heartbeats: etcd writes / s with all agents idle",
        value: f(result.idleWritesPerSecond, 1),
        anchor: `lease renewals ${f(result.idleLeaseRenewalsPerSecond, 1)}/s`,
      },
      {
        what: "heartbeats: share of etcd writes under load",
        value: `${f(result.heartbeatShare * 100, 1)} %`,
        anchor: "target ≤ 10 %",
      },
      {
        what: "watch fan-out: watchers / streams in etcd",
        value: `${result.watchers} / ${result.watchStreams}`,
        anchor: `${f(result.eventsPerWrite, 2)} events sent per write`,
      },
      {
        what: "GET /api/runs p50 / p99 under load",
        value: `${f(result.apiP50Ms)} / ${f(result.apiP99Ms)} ms`,
        anchor: `${result.apiCalls} calls`,
      },
      {
        what: "etcd txn p50 / p99 under load (1 put, from outside)",
        value: `${f(result.etcdP50Ms, 1)} / ${f(result.etcdP99Ms, 1)} ms`,
        anchor: "",
      },
      {
        what: "CPU per step: servers / etcd / simulated agents",
        value: `${f(result.cpuMsPerStep.servers, 2)} / ${f(result.cpuMsPerStep.etcd, 2)} / ${
          f(result.cpuMsPerStep.agents, 2)
        } ms`,
        anchor: `the scheduling server ${
          f(result.cpuMsPerStep.scheduler, 2)
        } ms of it; ${navigator.hardwareConcurrency} cores shared by all`,
      },
      { what: "runs succeeded", value: `${result.succeededRuns}`, anchor: "" },
    ],
  );
  const failover = result.failover;
  if (failover) {
    printTable(`scale: SIGKILL of the scheduling server with ${result.agents} agents connected`, [
      {
        what: "SIGKILL → next placement",
        value: `${failover.toNextPlacementMs} ms`,
        anchor: "target ≤ 5,000 ms",
      },
      {
        what: "SIGKILL → next assignment at an agent",
        value: `${failover.toNextAssignmentMs} ms`,
        anchor: "",
      },
      {
        what: "steps succeeded",
        value: `${failover.succeeded} / ${failover.steps}`,
        anchor: "nothing lost",
      },
      { what: "steps rescheduled (lost attempt)", value: `${failover.rescheduled}`, anchor: "" },
      {
        what: "agents registered after",
        value: `${failover.reconnected}`,
        anchor: `of ${result.agents}`,
      },
    ]);
  }
}

/** The etcd cluster's own write rate here: puts in txns, 64 in flight, for 2 s. */
async function rawEtcdWritesPerSecond(): Promise<number> {
  const etcd = await startEtcdCluster({ members: 3 });
  const store = await openEtcdStore({ endpoints: etcd.endpoints, namespace: "raw/" });
  try {
    let count = 0;
    const until = performance.now() + 2_000;
    const started = performance.now();
    await Promise.all(Array.from({ length: 64 }, async (_, worker) => {
      while (performance.now() < until) {
        await store.txn({
          compare: [],
          success: [{ type: "put", key: `k${worker}/${count}`, value: "x".repeat(400) }],
        });
        count++;
      }
    }));
    return count / ((performance.now() - started) / 1000);
  } finally {
    await store.close();
    await etcd.stop();
  }
}

if (import.meta.main) {
  const [agents, runs, stepsPerRun] = Deno.args.map(Number);
  await benchScale({
    agents: agents || undefined,
    runs: runs || undefined,
    stepsPerRun: stepsPerRun || undefined,
  });
}
