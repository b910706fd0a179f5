/**
 * Issue 10, item 14: a scheduler failover must never fail a step. Two
 * `runnel server`s over a 3-member etcd, two agent processes; each trial
 * submits a small shell pipeline with `retry: 0` and its own pipeline
 * bundle, SIGKILLs the scheduling server at a seeded random moment, restarts
 * it, and asserts the run succeeds with no step run twice at once (each
 * step appends its start and end to a trace file).
 *
 * `RUNNEL_SEED` replays the kill moments; `RUNNEL_FAILOVER_TRIALS` sets the
 * number of trials (default 20).
 *
 * @module
 */

import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { RunClient } from "../../agent/client/mod.ts";
import type { StepState } from "../../core/model.ts";
import { mulberry32, testSeed } from "../../core/_random.ts";
import { ignoreWithoutEtcd, startEtcdCluster } from "../_etcd.ts";
import { poll, sandbox } from "../_helpers.ts";
import { ADMIN_TOKEN, AgentProcess, freePort, ServerProcess, TOKEN } from "./_cluster.ts";

const SEED = testSeed();
const TRIALS = Number(Deno.env.get("RUNNEL_FAILOVER_TRIALS") ?? 20);
/** Fast heartbeats: a worker lease of 1.5 s, far above an agent's reconnect. */
const HEARTBEAT = "500ms";
const STEP_SECONDS = 0.2;

/**
 * A diamond of shell steps with no retries: `a`, then `b1`…`b4` at once,
 * then `c`, then `d1`, `d2`. Each step writes its start and end (also when
 * it is stopped) to `trace`.
 */
function pipeline(trial: number, trace: string): string {
  const step = (needs: string[]) => `
    needs: [${needs.join(", ")}]
    run: |
      trap 'echo "$RUNNEL_STEP $RUNNEL_ATTEMPT end $(date +%s%N)" >> ${trace}; exit 143' TERM INT
      echo "$RUNNEL_STEP $RUNNEL_ATTEMPT start $(date +%s%N)" >> ${trace}
      sleep ${STEP_SECONDS}
      echo "$RUNNEL_STEP $RUNNEL_ATTEMPT end $(date +%s%N)" >> ${trace}`;
  const steps: Record<string, string[]> = {
    a: [],
    b1: ["a"],
    b2: ["a"],
    b3: ["a"],
    b4: ["a"],
    c: ["b1", "b2", "b3", "b4"],
    d1: ["c"],
    d2: ["c"],
  };
  return `name: failover-${trial}
defaults:
  backend: shell
  retry: 0
steps:
${Object.entries(steps).map(([id, needs]) => `  ${id}:${step(needs)}`).join("\n")}
`;
}

/** Each step's runs in the trace, as [start, end] in ns (end Infinity if it never ended). */
async function runsOf(trace: string): Promise<Map<string, Array<[number, number]>>> {
  const events = new Map<string, { start?: number; end?: number }>();
  for (const line of (await Deno.readTextFile(trace)).trim().split("\n")) {
    const [step, attempt, kind, at] = line.split(" ");
    const key = `${step} ${attempt}`;
    const event = events.get(key) ?? {};
    event[kind as "start" | "end"] = Number(at);
    events.set(key, event);
  }
  const runs = new Map<string, Array<[number, number]>>();
  for (const [key, { start, end }] of events) {
    const step = key.split(" ")[0];
    runs.set(step, [...(runs.get(step) ?? []), [start ?? -Infinity, end ?? Infinity]]);
  }
  return runs;
}

Deno.test({
  name: `failover: the scheduling server is SIGKILLed ${TRIALS} times mid-run ` +
    `(RUNNEL_SEED=${SEED}); every run with retry: 0 succeeds, no step runs twice at once`,
  ignore: ignoreWithoutEtcd(),
  async fn() {
    const random = mulberry32(SEED);
    const started = Date.now();
    await using box = await sandbox();
    await using etcd = await startEtcdCluster({ members: 3 });
    const ports = [0, 1].map(() => ({ http: freePort(), grpc: freePort() }));
    const peers = ports.map((port) => `127.0.0.1:${port.grpc}`);
    const spawn = (index: number) =>
      new ServerProcess({
        id: `server-${index}`,
        etcd: etcd.endpoints,
        ports: ports[index],
        peers,
        heartbeat: HEARTBEAT,
      });
    const servers = [spawn(0), spawn(1)];
    const agents: AgentProcess[] = [];
    const client = new RunClient(servers.map((server) => server.http), { token: ADMIN_TOKEN });
    const trials: string[] = [];
    try {
      await Promise.all(servers.map((server) => server.ready()));
      for (const name of ["agent-1", "agent-2"]) {
        agents.push(
          await AgentProcess.start({
            servers: peers,
            token: TOKEN,
            agentId: name,
            allowShell: true,
            stateDir: `${box.dir}/${name}`,
            artifactsDir: `${box.dir}/artifacts`,
            reconnect: { initialMs: 50, maxMs: 500 },
          }),
        );
      }
      const leaderId = await poll(async () => {
        const state = await servers[0].clusterState();
        return state.scheduler && state.workers.length === 2 ? state.scheduler : undefined;
      }, { what: "a scheduler and two workers", timeoutMs: 60_000, retryOnError: true });
      let leader = servers.findIndex((server) => server.id === leaderId);

      for (let trial = 1; trial <= TRIALS; trial++) {
        const dir = `${box.dir}/trial-${trial}`;
        await Deno.mkdir(dir);
        const trace = `${dir}/trace.log`;
        await Deno.writeTextFile(trace, "");
        const source = pipeline(trial, trace);
        // A bundle of its own: agents cannot have it from an earlier run.
        const files = {
          "pipeline.yaml": Buffer.from(source).toString("base64"),
          "trial.txt": Buffer.from(`trial ${trial} of seed ${SEED}\n`).toString("base64"),
        };
        const { runId } = await client.submit(source, "pipeline.yaml", dir, files);
        // Killed once 0 to 5 steps have been handed out.
        const handedOut = Math.floor(random() * 6);
        await poll(async () => {
          const { steps } = await client.run(runId);
          const count = Object.values(steps).filter((step) => step.attempts.length > 0).length;
          return count >= handedOut ? true : undefined;
        }, { what: `${handedOut} steps handed out in trial ${trial}`, timeoutMs: 30_000 });
        const victim = servers[leader];
        await victim.kill();
        trials.push(`trial ${trial}: killed ${victim.id} after ${handedOut} steps`);
        servers[leader] = spawn(leader);
        const survivor = servers[1 - leader];
        const survivorClient = new RunClient([survivor.http], { token: ADMIN_TOKEN });
        const done = await poll(async () => {
          const { run, steps } = await survivorClient.run(runId);
          return ["succeeded", "failed", "cancelled"].includes(run.status)
            ? { run, steps }
            : undefined;
        }, { what: `the run of trial ${trial} to finish`, timeoutMs: 60_000 });
        const failed = Object.values(done.steps as Record<string, StepState>)
          .filter((step) => step.status !== "succeeded")
          .map((step) => `${step.id}: ${step.status} ${JSON.stringify(step.attempts.at(-1))}`);
        assert.equal(done.run.status, "succeeded", `trial ${trial}: ${failed.join("; ")}`);
        for (const [step, runs] of await runsOf(trace)) {
          runs.sort((x, y) => x[0] - y[0]);
          for (let i = 1; i < runs.length; i++) {
            assert.ok(
              runs[i][0] >= runs[i - 1][1],
              `trial ${trial}: ${step} ran twice at once: ${JSON.stringify(runs)}`,
            );
          }
        }
        await servers[leader].ready();
        const state = await survivor.clusterState();
        assert.equal(state.scheduler, survivor.id, `trial ${trial}: the survivor schedules`);
        await poll(async () => {
          const { workers } = await survivor.clusterState();
          return workers.length === 2 ? true : undefined;
        }, { what: "both workers back", timeoutMs: 30_000 });
        leader = 1 - leader;
      }
      const seconds = ((Date.now() - started) / 1000).toFixed(1);
      console.log(`failover: ${TRIALS} SIGKILLs of the scheduler in ${seconds} s (seed ${SEED})`);
    } catch (error) {
      console.error(
        `failover failed with RUNNEL_SEED=${SEED} after:\n  ${trials.join("\n  ")}\n` +
          servers.map((server) => `--- ${server.id}\n${server.stderr.join("").slice(-4000)}`)
            .join("\n") +
          agents.map((agent, i) => `--- agent-${i + 1}\n${agent.stderr.join("").slice(-6000)}`)
            .join("\n"),
      );
      throw error;
    } finally {
      await Promise.all(agents.map((agent) => agent.stop()));
      await Promise.all(servers.map((server) => server.stop()));
    }
  },
});
