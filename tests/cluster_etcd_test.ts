/**
 * Cluster mode over a real 3-member etcd (Debian's etcd 3.4) on loopback,
 * with `runnel server` processes that are SIGKILLed: the scheduling server
 * dies mid-run and another takes over; the etcd leader member dies mid-run.
 * Each time the run finishes and every step has exactly one recorded
 * result.
 *
 * @module
 */

import assert from "node:assert/strict";
import { openLocalArtifactStore } from "../core/artifacts/local.ts";
import { RunClient } from "../agent/client/mod.ts";
import { type RunningAgent, startAgent } from "../agent/worker/mod.ts";
import type { StepState } from "../core/model.ts";
import { ignoreWithoutEtcd, startEtcdCluster } from "./_etcd.ts";
import { CLI_PERMISSIONS, MAIN, poll, sandbox } from "./_helpers.ts";
import { mulberry32, testSeed } from "../core/_random.ts";

const SEED = testSeed();

const TOKEN = "etcd-cluster-token";
/** The API's admin token; each server reads it from `--admin-token-file`. */
const ADMIN_TOKEN = "etcd-cluster-admin-token-0123456789";
/** Headers of a raw API call as the admin. */
const AS_ADMIN = { headers: { authorization: `Bearer ${ADMIN_TOKEN}` } };
const HEARTBEAT = "500ms";

function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

interface ServerProcess {
  id: string;
  http: string;
  grpc: string;
  child: Deno.ChildProcess;
}

/** Writes the admin token file the servers of a test read (mode 0600). */
async function adminTokenFile(dir: string): Promise<string> {
  const path = `${dir}/admin.token`;
  await Deno.writeTextFile(path, `${ADMIN_TOKEN}\n`, { mode: 0o600 });
  return path;
}

function spawnServer(
  id: string,
  etcd: string[],
  peers: string[],
  ports: [number, number],
  adminToken: string,
) {
  const [httpPort, grpcPort] = ports;
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      ...CLI_PERMISSIONS,
      MAIN,
      "server",
      "--etcd",
      etcd.join(","),
      "--id",
      id,
      "--listen",
      `127.0.0.1:${httpPort}`,
      "--grpc",
      `127.0.0.1:${grpcPort}`,
      "--peers",
      peers.join(","),
      "--heartbeat",
      HEARTBEAT,
      "--admin-token-file",
      adminToken,
    ],
    env: { RUNNEL_TOKEN: TOKEN, NO_COLOR: "1" },
    stdout: "null",
    stderr: "null",
  }).spawn();
  return { id, http: `http://127.0.0.1:${httpPort}`, grpc: `127.0.0.1:${grpcPort}`, child };
}

/** Two servers over the same etcd, each told of both for the agents' failover. */
function twoServers(etcd: string[], adminToken: string) {
  const ports = [[freePort(), freePort()], [freePort(), freePort()]] as [number, number][];
  const peers = ports.map(([, grpc]) => `127.0.0.1:${grpc}`);
  const servers = [
    spawnServer("server-a", etcd, peers, ports[0], adminToken),
    spawnServer("server-b", etcd, peers, ports[1], adminToken),
  ];
  return { ports, peers, servers, adminToken };
}

async function ready(server: ServerProcess): Promise<void> {
  await poll(async () => {
    try {
      const response = await fetch(`${server.http}/ready`);
      await response.body?.cancel();
      return response.ok ? true : undefined;
    } catch {
      return undefined;
    }
  }, { what: `${server.id} ready`, timeoutMs: 30_000 });
}

/** A chain of steps, each reading the previous one's output. */
function chain(length: number): string {
  const steps = Array.from({ length }, (_, i) => {
    const input = i === 0 ? "" : `\n    inputs: { prev: s${i - 1}/out.txt }`;
    return `  s${i}:
    backend: shell${input}
    run: |
      sleep 0.3
      echo step ${i}
      echo ${i} > "$RUNNEL_OUTPUT_OUT_TXT"
    outputs: [out.txt]`;
  });
  return `name: chain\nsteps:\n${steps.join("\n")}\n`;
}

/** Stops agents, then servers (SIGTERM), then the etcd cluster. */
async function tearDown(
  agents: RunningAgent[],
  servers: ServerProcess[],
  etcd: { stop(): Promise<void> },
): Promise<void> {
  await Promise.allSettled(agents.map((agent) => agent.stop()));
  for (const server of servers) {
    try {
      server.child.kill("SIGTERM");
    } catch {
      // Already gone.
    }
    await server.child.status;
  }
  await etcd.stop();
}

function assertOneResultEach(steps: Record<string, StepState>, count: number): void {
  assert.equal(Object.keys(steps).length, count);
  for (const step of Object.values(steps)) {
    assert.equal(step.status, "succeeded", `${step.id}: ${JSON.stringify(step)}`);
    assert.equal(step.attempts.length, 1, `${step.id} ran ${step.attempts.length} times`);
  }
}

async function startAgents(
  dir: string,
  servers: string[],
  count: number,
): Promise<RunningAgent[]> {
  const artifacts = `${dir}/artifacts`;
  return await Promise.all(Array.from({ length: count }, (_, i) =>
    startAgent({
      servers,
      token: TOKEN,
      agentId: `worker-${i + 1}`,
      allowShell: true,
      stateDir: `${dir}/worker-${i + 1}`,
      artifacts: openLocalArtifactStore(artifacts),
      log: () => {},
    })));
}

Deno.test({
  name:
    "etcd cluster: the scheduling server is SIGKILLed mid-run; the other takes over, nothing lost or doubled",
  ignore: ignoreWithoutEtcd(),
  async fn() {
    await using box = await sandbox();
    const etcd = await startEtcdCluster({ members: 3 });
    const { peers, servers } = twoServers(etcd.endpoints, await adminTokenFile(box.dir));
    let agents: RunningAgent[] = [];
    try {
      await Promise.all(servers.map(ready));
      agents = await startAgents(box.dir, peers, 2);
      const client = new RunClient(servers.map((server) => server.http), { token: ADMIN_TOKEN });
      const leaderId = await poll(async () => {
        const state = await (await fetch(`${servers[0].http}/cluster-state`, AS_ADMIN)).json();
        return state.scheduler && state.workers.length === 2
          ? state.scheduler as string
          : undefined;
      }, { what: "a scheduler and two workers", timeoutMs: 30_000 });
      const leader = servers.find((server) => server.id === leaderId)!;
      const survivor = servers.find((server) => server !== leader)!;
      const { runId } = await client.submit(chain(8), "chain.yaml", box.dir);
      await poll(async () => {
        const { steps } = await client.run(runId);
        return steps.s2?.status === "succeeded" ? true : undefined;
      }, { what: "s2 done", timeoutMs: 30_000 });
      leader.child.kill("SIGKILL");
      await leader.child.status;
      const killedAt = Date.now();
      const survivorClient = new RunClient([survivor.http], { token: ADMIN_TOKEN });
      const done = await poll(async () => {
        const { run, steps } = await survivorClient.run(runId);
        return ["succeeded", "failed", "cancelled"].includes(run.status)
          ? { run, steps }
          : undefined;
      }, { what: "the run to finish after the failover", timeoutMs: 60_000 });
      assert.equal(done.run.status, "succeeded");
      assertOneResultEach(done.steps, 8);
      // The log of a step done before the kill is stored with its result, whichever
      // server recorded it (one that was streaming at the kill may lose its tail).
      let text = "";
      for await (const { event, data } of survivorClient.logs(runId)) {
        if (event === "log") text += (data as { text: string }).text;
      }
      for (const i of [0, 1, 2]) assert.match(text, new RegExp(`^step ${i}$`, "m"));
      // Failover: from the kill to the next step scheduled.
      const next = Object.values(done.steps)
        .map((step) => step.attempts[0].scheduledAt)
        .filter((at) => at > killedAt)
        .sort((a, b) => a - b)[0];
      const failoverMs = next - killedAt;
      console.log(`scheduler failover: ${failoverMs} ms from SIGKILL to the next step scheduled`);
      assert.ok(failoverMs <= 10_000, `failover took ${failoverMs} ms`);
      const state = await (await fetch(`${survivor.http}/cluster-state`, AS_ADMIN)).json();
      assert.equal(state.scheduler, survivor.id);
    } finally {
      await tearDown(agents, servers, etcd);
    }
  },
});

Deno.test({
  name: "etcd cluster: the etcd leader member is SIGKILLed mid-run and restarted; the run finishes",
  ignore: ignoreWithoutEtcd(),
  async fn() {
    await using box = await sandbox();
    const etcd = await startEtcdCluster({ members: 3 });
    const ports: [number, number] = [freePort(), freePort()];
    const server = spawnServer(
      "server-a",
      etcd.endpoints,
      [`127.0.0.1:${ports[1]}`],
      ports,
      await adminTokenFile(box.dir),
    );
    let agents: RunningAgent[] = [];
    try {
      await ready(server);
      agents = await startAgents(box.dir, [server.grpc], 1);
      const client = new RunClient([server.http], { token: ADMIN_TOKEN });
      const { runId } = await client.submit(chain(6), "chain.yaml", box.dir);
      await poll(async () => {
        const { steps } = await client.run(runId);
        return steps.s1?.status === "succeeded" ? true : undefined;
      }, { what: "s1 done", timeoutMs: 30_000 });
      const leader = await etcd.leader();
      await etcd.kill(leader);
      const raft = await poll(async () => {
        try {
          const state = await (await fetch(`${server.http}/raft-state`, AS_ADMIN)).json();
          return state.term ? state : undefined;
        } catch {
          return undefined;
        }
      }, { what: "raft state after the kill" });
      assert.ok(["leader", "follower"].includes(raft.state));
      await etcd.restart(leader);
      const done = await poll(async () => {
        const { run, steps } = await client.run(runId);
        return ["succeeded", "failed", "cancelled"].includes(run.status)
          ? { run, steps }
          : undefined;
      }, { what: "the run to finish", timeoutMs: 60_000 });
      assert.equal(done.run.status, "succeeded");
      assertOneResultEach(done.steps, 6);
      const metrics = await (await fetch(`${server.http}/metrics`, AS_ADMIN)).text();
      assert.match(metrics, /^raft_term \d+$/m);
      assert.match(metrics, /^raft_elections_total \d+$/m);
    } finally {
      await tearDown(agents, [server], etcd);
    }
  },
});

Deno.test({
  name: `etcd cluster: random faults mid-run (RUNNEL_SEED=${SEED}) leave one success per step`,
  ignore: ignoreWithoutEtcd(),
  async fn() {
    const random = mulberry32(SEED);
    await using box = await sandbox();
    const etcd = await startEtcdCluster({ members: 3 });
    const { ports, peers, servers, adminToken } = twoServers(
      etcd.endpoints,
      await adminTokenFile(box.dir),
    );
    let agents: RunningAgent[] = [];
    const faults: string[] = [];
    try {
      await Promise.all(servers.map(ready));
      agents = await startAgents(box.dir, peers, 2);
      const client = new RunClient(servers.map((server) => server.http), { token: ADMIN_TOKEN });
      const steps = 10;
      const { runId } = await client.submit(chain(steps), "chain.yaml", box.dir);
      // Three faults at random moments: a server, an etcd member, an agent's
      // stream; each restarted (or reconnecting) before the next.
      for (const fault of ["server", "etcd", "server"] as const) {
        const waitFor = Math.floor(random() * 3);
        await poll(async () => {
          const { steps: states } = await client.run(runId);
          const done = Object.values(states).filter((s) => s.status === "succeeded").length;
          return done >= waitFor + faults.length * 2 ? true : undefined;
        }, { what: `progress before fault ${faults.length + 1}`, timeoutMs: 60_000 });
        if (fault === "etcd") {
          const member = Math.floor(random() * 3);
          faults.push(`SIGKILL etcd member ${member}`);
          await etcd.kill(member);
          await etcd.restart(member);
        } else {
          const index = Math.floor(random() * 2);
          faults.push(`SIGKILL ${servers[index].id}`);
          servers[index].child.kill("SIGKILL");
          await servers[index].child.status;
          servers[index] = spawnServer(
            servers[index].id,
            etcd.endpoints,
            peers,
            ports[index],
            adminToken,
          );
          await ready(servers[index]);
        }
      }
      const done = await poll(async () => {
        const { run, steps: states } = await client.run(runId);
        return ["succeeded", "failed", "cancelled"].includes(run.status)
          ? { run, steps: states }
          : undefined;
      }, { what: "the run to finish", timeoutMs: 90_000 });
      assert.equal(done.run.status, "succeeded", `seed ${SEED}, faults: ${faults.join(", ")}`);
      for (const step of Object.values(done.steps)) {
        const successes = step.attempts.filter((attempt) => attempt.result?.ok);
        assert.equal(successes.length, 1, `${step.id}: seed ${SEED}, ${faults.join(", ")}`);
      }
    } catch (error) {
      console.error(`random faults failed with RUNNEL_SEED=${SEED}: ${faults.join(", ")}`);
      throw error;
    } finally {
      await tearDown(agents, servers, etcd);
    }
  },
});
