/**
 * The scale harness: many simulated agents (each a real gRPC stream,
 * `sim_agent.ts`) in this process, against `runnel server` processes over a
 * real 3-member etcd, with many queued no-op steps across many runs. It
 * measures what the servers and etcd do for them — assignments and results
 * per second, assignment latency, server RSS per connected agent, etcd
 * writes, proposals, fsyncs and bytes per step (etcd's own `/metrics`),
 * watch fan-out, the API's `GET /api/runs` latency under load — and,
 * optionally, a SIGKILL of the scheduling server with every agent
 * connected: time to the next assignment, and whether anything was lost.
 *
 * `bench/scale_bench.ts` runs it at 1,000 agents; `tests/scale_test.ts`
 * runs it scaled down.
 *
 * @module
 */

import { RunClient } from "../../agent/client/mod.ts";
import type { StepState } from "../../core/model.ts";
import { type EtcdCluster, startEtcdCluster } from "../../tests/_etcd.ts";
import { CLI_PERMISSIONS, MAIN, poll } from "../../tests/_helpers.ts";
import { SimAgent, type SimRecorder } from "./sim_agent.ts";
import { openEtcdStore } from "../../consensus/etcd.ts";

const TOKEN = "scale-join-token-0123456789";
const ADMIN_TOKEN = "scale-admin-token-0123456789abcdef";
const AS_ADMIN = { headers: { authorization: `Bearer ${ADMIN_TOKEN}` } };
const PROFILE_DIR = Deno.env.get("RUNNEL_SCALE_PROFILE");

/** Options of {@link runScale}. */
export interface ScaleOptions {
  agents: number;
  runs: number;
  stepsPerRun: number;
  /** Slots of each simulated agent. */
  slots: number;
  /** Time a simulated step takes (0: completes at once). */
  delayMs: number;
  /** Agent heartbeat interval the servers announce. */
  heartbeatMs: number;
  /** Also SIGKILL the scheduling server under load (a second phase). */
  failover: boolean;
  /**
   * Steps of the failover phase: 10 runs, each a chain (every step needs the
   * one before, so placements keep coming), each step taking `failoverDelayMs`.
   */
  failoverSteps?: number;
  failoverDelayMs?: number;
  /** Progress lines. */
  log?: (line: string) => void;
}

/** etcd counters of one member (each member applies every write). */
export interface EtcdCounters {
  puts: number;
  deletes: number;
  txns: number;
  ranges: number;
  proposals: number;
  walFsyncs: number;
  backendCommits: number;
  walBytes: number;
  clientBytesIn: number;
  clientBytesOut: number;
  leaseRenewals: number;
  watchers: number;
  watchStreams: number;
  events: number;
}

/** What a failover phase measured. */
export interface FailoverResult {
  /** From the SIGKILL to the first placement by the new scheduler. */
  toNextPlacementMs: number;
  /** From the SIGKILL to the first such assignment arriving at an agent. */
  toNextAssignmentMs: number;
  steps: number;
  succeeded: number;
  /** Steps that needed more than one attempt (lost and rescheduled). */
  rescheduled: number;
  /** Agents connected again (to the survivors) within the phase. */
  reconnected: number;
}

/** Everything the harness measured. */
export interface ScaleResult {
  agents: number;
  steps: number;
  connectMs: number;
  /** Idle window: etcd writes (puts + deletes) per second with every agent connected. */
  idleWritesPerSecond: number;
  idleProposalsPerSecond: number;
  idleLeaseRenewalsPerSecond: number;
  loadMs: number;
  assignmentsPerSecond: number;
  resultsPerSecond: number;
  /** The same once every run was submitted: the queue draining, not the API's intake. */
  drainAssignmentsPerSecond: number;
  drainResultsPerSecond: number;
  /** Placement (engine `startedAt`) to the agent holding the assignment. */
  dispatchP50Ms: number;
  dispatchP99Ms: number;
  /** Step made ready (`scheduledAt`) to the agent holding it: includes queueing. */
  queuedP50Ms: number;
  queuedP99Ms: number;
  rssPerAgentKiB: number;
  serverRssMiB: number[];
  /** Over the load phase, per step. */
  writesPerStep: number;
  putsPerStep: number;
  proposalsPerStep: number;
  fsyncsPerStep: number;
  walBytesPerStep: number;
  clientBytesInPerStep: number;
  /** Heartbeat writes (the idle rate over the load window) as a share of the load's writes. */
  heartbeatShare: number;
  /** Watchers etcd holds (all servers), and watch events it sent per write. */
  watchers: number;
  watchStreams: number;
  eventsPerWrite: number;
  apiP50Ms: number;
  apiP99Ms: number;
  apiCalls: number;
  /**
   * CPU time (user + system) per step over the load: the scheduling server,
   * all 3 servers (it included), the 3 etcd members, this process.
   */
  cpuMsPerStep: { scheduler: number; servers: number; etcd: number; agents: number };
  /** A one-put etcd txn from this process every 50 ms under the load: its latency. */
  etcdP50Ms: number;
  etcdP99Ms: number;
  succeededRuns: number;
  failover?: FailoverResult;
}

interface ServerProcess {
  id: string;
  http: string;
  grpc: string;
  child: Deno.ChildProcess;
  /** Inspector address when profiling. */
  inspect?: string;
}

/** Runs the harness; everything it started is stopped before it returns. */
export async function runScale(options: ScaleOptions): Promise<ScaleResult> {
  const log = options.log ?? (() => {});
  const dir = await Deno.makeTempDir({ prefix: "runnel_scale_" });
  const etcd = await startEtcdCluster({ members: 3 });
  const servers = await startServers(dir, etcd, 3, options.heartbeatMs);
  const agents: SimAgent[] = [];
  const assignedAt = new Map<string, number>();
  const ackedAt = new Map<string, number>();
  const recorder: SimRecorder = {
    assigned: (attemptId, at) => assignedAt.set(attemptId, at),
    acked: (attemptId, at) => ackedAt.set(attemptId, at),
    welcomed: () => {},
  };
  const delay = { ms: options.delayMs };
  try {
    const client = new RunClient(servers.map((server) => server.http), { token: ADMIN_TOKEN });
    const rssBefore = await Promise.all(servers.map((server) => rssKiB(server.child.pid)));

    // 1. Connect every agent, a batch at a time (as a fleet rolls out).
    const connectStarted = performance.now();
    const grpcs = servers.map((server) => server.grpc);
    for (let at = 0; at < options.agents; at += 50) {
      const batch: SimAgent[] = [];
      for (let i = at; i < Math.min(at + 50, options.agents); i++) {
        const agent = new SimAgent({
          agentId: `sim-${String(i).padStart(5, "0")}`,
          servers: grpcs,
          first: i,
          token: TOKEN,
          slots: options.slots,
          get delayMs() {
            return delay.ms;
          },
          recorder,
        });
        agents.push(agent);
        batch.push(agent);
        agent.start();
      }
      await withDeadline(Promise.all(batch.map((agent) => agent.ready)), 60_000, "agents welcomed");
    }
    await poll(async () => {
      const state = await (await fetch(`${servers[0].http}/cluster-state`, AS_ADMIN)).json();
      return state.workers.length >= options.agents ? true : undefined;
    }, { what: `${options.agents} workers registered`, timeoutMs: 60_000 });
    const connectMs = performance.now() - connectStarted;
    log(`${options.agents} agents connected in ${connectMs.toFixed(0)} ms`);

    // 2. Idle: what heartbeats alone cost etcd, and what each connection costs a server.
    const idleMs = Math.max(2 * options.heartbeatMs, 2_000);
    const idleBefore = await etcdCounters(etcd);
    const idleStarted = performance.now();
    await new Promise((resolve) => setTimeout(resolve, idleMs));
    const idleAfter = await etcdCounters(etcd);
    const idleSeconds = (performance.now() - idleStarted) / 1000;
    const idle = diff(idleAfter, idleBefore);
    const rssAfter = await Promise.all(servers.map((server) => rssKiB(server.child.pid)));
    const rssPerAgentKiB = (sum(rssAfter) - sum(rssBefore)) / options.agents;

    // 3. Load: every run submitted at once, all steps queued; agents complete them.
    const steps = options.runs * options.stepsPerRun;
    const before = await etcdCounters(etcd);
    const api = pollApi(servers[1].http);
    const probe = await probeEtcd(etcd);
    const etcdPids = await pidsWith(`--data-dir=${etcd.dir}`);
    const cpuBefore = await cpuOf([
      ...servers.map((server) => server.child.pid),
      ...etcdPids,
      Deno.pid,
    ]);
    const profiles = PROFILE_DIR ? await Promise.all(servers.map(startProfile)) : [];
    const loadStarted = Date.now();
    const runIds = await submitAll(client, dir, options.runs, options.stepsPerRun, "load");
    const submitted = Date.now();
    log(`${options.runs} runs submitted in ${submitted - loadStarted} ms`);
    await poll(() => ackedAt.size >= steps ? true : undefined, {
      what: `${steps} results acknowledged (have ${ackedAt.size})`,
      timeoutMs: Math.max(120_000, steps * 20),
    });
    const loadEnded = Date.now();
    const after = await etcdCounters(etcd);
    const apiTimes = await api.stop();
    const probeTimes = await probe.stop();
    const cpuAfter = await cpuOf([
      ...servers.map((server) => server.child.pid),
      ...etcdPids,
      Deno.pid,
    ]);
    const cpuMs = cpuAfter.map((ms, i) => ms - cpuBefore[i]);
    const schedulerId =
      (await (await fetch(`${servers[0].http}/cluster-state`, AS_ADMIN)).json()).scheduler;
    for (const [i, stop] of profiles.entries()) {
      await Deno.writeTextFile(`${PROFILE_DIR}/${servers[i].id}.cpuprofile`, await stop());
    }
    const load = diff(after, before);
    const loadMs = loadEnded - loadStarted;
    log(`${steps} steps done in ${loadMs} ms`);

    // Latencies, from the steps' own records (the same clock: one machine).
    const states = await finishedRuns(client, runIds);
    const dispatch: number[] = [];
    const queued: number[] = [];
    let succeededRuns = 0;
    for (const { run, steps: stepStates } of states) {
      if (run.status === "succeeded") succeededRuns++;
      for (const step of Object.values(stepStates)) {
        const attempt = step.attempts.at(-1);
        const at = attempt && assignedAt.get(attempt.attemptId);
        if (!attempt || at === undefined) continue;
        if (attempt.startedAt !== undefined) dispatch.push(at - attempt.startedAt);
        queued.push(at - attempt.scheduledAt);
      }
    }
    const firstAssigned = Math.min(...[...assignedAt.values()]);
    const lastAssigned = Math.max(...[...assignedAt.values()]);
    const firstAcked = Math.min(...[...ackedAt.values()]);
    const lastAcked = Math.max(...[...ackedAt.values()]);
    // Once every run is in, the queue drains as fast as the cluster places and records.
    const drained = [...assignedAt.values()].filter((at) => at >= submitted).length;
    const drainedResults = [...ackedAt.values()].filter((at) => at >= submitted).length;
    const writes = load.puts + load.deletes;
    const heartbeatWrites = (idle.puts + idle.deletes) / idleSeconds * (loadMs / 1000);

    const result: ScaleResult = {
      agents: options.agents,
      steps,
      connectMs,
      idleWritesPerSecond: (idle.puts + idle.deletes) / idleSeconds,
      idleProposalsPerSecond: idle.proposals / idleSeconds,
      idleLeaseRenewalsPerSecond: idle.leaseRenewals / idleSeconds,
      loadMs,
      assignmentsPerSecond: steps / (Math.max(1, lastAssigned - firstAssigned) / 1000),
      resultsPerSecond: steps / (Math.max(1, lastAcked - firstAcked) / 1000),
      drainAssignmentsPerSecond: drained / (Math.max(1, lastAssigned - submitted) / 1000),
      drainResultsPerSecond: drainedResults / (Math.max(1, lastAcked - submitted) / 1000),
      dispatchP50Ms: quantile(dispatch, 0.5),
      dispatchP99Ms: quantile(dispatch, 0.99),
      queuedP50Ms: quantile(queued, 0.5),
      queuedP99Ms: quantile(queued, 0.99),
      rssPerAgentKiB,
      serverRssMiB: rssAfter.map((kib) => kib / 1024),
      writesPerStep: writes / steps,
      putsPerStep: load.puts / steps,
      proposalsPerStep: load.proposals / steps,
      fsyncsPerStep: load.walFsyncs / steps,
      walBytesPerStep: load.walBytes / steps,
      clientBytesInPerStep: load.clientBytesIn / steps,
      heartbeatShare: writes > 0 ? heartbeatWrites / writes : 0,
      watchers: after.watchers,
      watchStreams: after.watchStreams,
      eventsPerWrite: writes > 0 ? load.events / writes : 0,
      apiP50Ms: quantile(apiTimes, 0.5),
      apiP99Ms: quantile(apiTimes, 0.99),
      apiCalls: apiTimes.length,
      cpuMsPerStep: {
        scheduler: cpuMs[servers.findIndex((server) => server.id === schedulerId)] / steps,
        servers: sum(cpuMs.slice(0, servers.length)) / steps,
        etcd: sum(cpuMs.slice(servers.length, servers.length + etcdPids.length)) / steps,
        agents: cpuMs[cpuMs.length - 1] / steps,
      },
      etcdP50Ms: quantile(probeTimes, 0.5),
      etcdP99Ms: quantile(probeTimes, 0.99),
      succeededRuns,
    };

    // 4. Failover: SIGKILL the scheduling server with every agent connected.
    if (options.failover) {
      result.failover = await failover(
        { client, servers, agents, assignedAt, ackedAt, delay, dir, log },
        options.failoverSteps ?? 1_000,
        options.failoverDelayMs ?? 200,
      );
    }
    return result;
  } finally {
    await Promise.all(agents.map((agent) => agent.stop()));
    for (const server of servers) {
      try {
        server.child.kill("SIGTERM");
      } catch {
        // Already gone (the failover phase killed it).
      }
    }
    const timer = setTimeout(() => {
      for (const server of servers) {
        try {
          server.child.kill("SIGKILL");
        } catch {
          // Already gone.
        }
      }
    }, 10_000);
    const stopping = performance.now();
    const statuses = await Promise.all(servers.map((server) => server.child.status));
    log(
      `servers stopped in ${(performance.now() - stopping).toFixed(0)} ms: ${
        statuses.map((status) => status.signal ?? status.code).join(", ")
      }`,
    );
    clearTimeout(timer);
    if (Deno.env.get("RUNNEL_SCALE_DEBUG")) {
      for (const server of servers) {
        const text = await Deno.readTextFile(`${dir}/${server.id}.log`).catch(() => "");
        const lines = text.split("\n").filter((line) =>
          !line.includes('"level":"info"') || /scheduler|elected|worker/.test(line)
        );
        log(`--- ${server.id}\n${lines.slice(-40).join("\n")}`);
      }
    }
    await etcd.stop();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

interface FailoverContext {
  client: RunClient;
  servers: ServerProcess[];
  agents: SimAgent[];
  assignedAt: Map<string, number>;
  ackedAt: Map<string, number>;
  delay: { ms: number };
  dir: string;
  log: (line: string) => void;
}

async function failover(
  context: FailoverContext,
  steps: number,
  delayMs: number,
): Promise<FailoverResult> {
  const { servers, ackedAt, log } = context;
  context.delay.ms = delayMs;
  const runs = 10;
  const perRun = Math.ceil(steps / runs);
  const ackedBefore = ackedAt.size;
  const runIds = await submitAll(context.client, context.dir, runs, perRun, "failover", true);
  // Kill once the phase is well under way.
  await poll(() => ackedAt.size - ackedBefore >= (runs * perRun) / 4 ? true : undefined, {
    what: "a quarter of the failover phase done",
    timeoutMs: 120_000,
  });
  const state = await (await fetch(`${servers[0].http}/cluster-state`, AS_ADMIN)).json();
  const leader = servers.find((server) => server.id === state.scheduler)!;
  const survivors = servers.filter((server) => server !== leader);
  leader.child.kill("SIGKILL");
  await leader.child.status;
  const killedAt = Date.now();
  log(`SIGKILLed scheduling server ${leader.id}`);
  const client = new RunClient(survivors.map((server) => server.http), { token: ADMIN_TOKEN });
  // Until every run has ended (a result whose ack died with the server is
  // sent again and answered "already recorded": counted by the runs, not the acks).
  try {
    const ended = new Set<string>();
    await poll(async () => {
      for (const runId of runIds) {
        if (ended.has(runId)) continue;
        const { run } = await client.run(runId);
        if (!["succeeded", "failed", "cancelled"].includes(run.status)) return undefined;
        ended.add(runId);
      }
      return true;
    }, {
      what: `the failover phase's ${runs} runs to end`,
      timeoutMs: Number(Deno.env.get("RUNNEL_SCALE_FAILOVER_MS") ?? 120_000),
    });
  } catch (error) {
    if (Deno.env.get("RUNNEL_SCALE_DEBUG")) {
      for (const runId of runIds) {
        const { run, steps } = await client.run(runId);
        const open = Object.values(steps).filter((step) => step.status !== "succeeded");
        log(`${runId} ${run.status}: ${JSON.stringify(open.slice(0, 2))}`);
      }
    }
    throw error;
  }
  const states = await finishedRuns(client, runIds);
  let succeeded = 0;
  let rescheduled = 0;
  let nextPlacement = Infinity;
  let nextAssignment = Infinity;
  for (const { steps: stepStates } of states) {
    for (const step of Object.values(stepStates)) {
      if (step.status === "succeeded") succeeded++;
      if (step.attempts.length > 1) rescheduled++;
      for (const attempt of step.attempts) {
        if (attempt.startedAt !== undefined && attempt.startedAt > killedAt) {
          nextPlacement = Math.min(nextPlacement, attempt.startedAt);
          const at = context.assignedAt.get(attempt.attemptId);
          if (at !== undefined) nextAssignment = Math.min(nextAssignment, at);
        }
      }
    }
  }
  const workers = await (await fetch(`${survivors[0].http}/cluster-state`, AS_ADMIN)).json();
  context.delay.ms = 0;
  return {
    toNextPlacementMs: nextPlacement - killedAt,
    toNextAssignmentMs: nextAssignment - killedAt,
    steps: runs * perRun,
    succeeded,
    rescheduled,
    reconnected: workers.workers.length,
  };
}

/** Starts `count` servers over the etcd cluster, each told of all of them. */
async function startServers(
  dir: string,
  etcd: EtcdCluster,
  count: number,
  heartbeatMs: number,
): Promise<ServerProcess[]> {
  const adminFile = `${dir}/admin.token`;
  await Deno.writeTextFile(adminFile, `${ADMIN_TOKEN}\n`, { mode: 0o600 });
  const ports = Array.from({ length: count }, () => [freePort(), freePort()]);
  const inspectPorts = ports.map(() => freePort());
  const peers = ports.map(([, grpc]) => `127.0.0.1:${grpc}`);
  const servers: ServerProcess[] = [];
  for (let i = 0; i < count; i++) {
    const id = `scale-server-${i}`;
    const [httpPort, grpcPort] = ports[i];
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        ...CLI_PERMISSIONS,
        // RUNNEL_SCALE_PROFILE=<dir>: the load phase's CPU profile of each server goes there
        // (taken through the inspector: the servers' exit is not clean enough for --cpu-prof).
        ...(PROFILE_DIR ? [`--inspect=127.0.0.1:${inspectPorts[i]}`] : []),
        MAIN,
        "server",
        "--etcd",
        etcd.endpoints.join(","),
        "--id",
        id,
        "--listen",
        `127.0.0.1:${httpPort}`,
        "--grpc",
        `127.0.0.1:${grpcPort}`,
        "--peers",
        peers.join(","),
        "--heartbeat",
        `${heartbeatMs}ms`,
        "--admin-token-file",
        adminFile,
      ],
      env: { RUNNEL_TOKEN: TOKEN, NO_COLOR: "1" },
      stdout: "null",
      stderr: "piped",
    }).spawn();
    const logFile = await Deno.open(`${dir}/${id}.log`, { write: true, create: true });
    child.stderr.pipeTo(logFile.writable).catch(() => {});
    servers.push({
      id,
      http: `http://127.0.0.1:${httpPort}`,
      grpc: `127.0.0.1:${grpcPort}`,
      child,
      inspect: PROFILE_DIR ? `127.0.0.1:${inspectPorts[i]}` : undefined,
    });
  }
  await Promise.all(servers.map((server) =>
    poll(async () => {
      try {
        const response = await fetch(`${server.http}/ready`);
        await response.body?.cancel();
        return response.ok ? true : undefined;
      } catch {
        return undefined;
      }
    }, { what: `${server.id} ready`, timeoutMs: 60_000 })
  ));
  return servers;
}

/** Submits `runs` pipelines of `perRun` no-op steps (independent, or a chain), four at a time. */
async function submitAll(
  client: RunClient,
  dir: string,
  runs: number,
  perRun: number,
  name: string,
  chain = false,
): Promise<string[]> {
  const source = `name: ${name}\nsteps:\n${
    Array.from(
      { length: perRun },
      (_, i) =>
        `  s${i}: { backend: shell, run: "true"${chain && i > 0 ? `, needs: [s${i - 1}]` : ""} }`,
    ).join("\n")
  }\n`;
  const runIds: string[] = [];
  let next = 0;
  await Promise.all(Array.from({ length: 4 }, async () => {
    while (next < runs) {
      next++;
      const { runId } = await client.submit(source, `${name}.yaml`, dir);
      runIds.push(runId);
    }
  }));
  return runIds;
}

/** Each run and its steps, once the run has ended. */
async function finishedRuns(
  client: RunClient,
  runIds: string[],
): Promise<{ run: { status: string }; steps: Record<string, StepState> }[]> {
  return await Promise.all(runIds.map((runId) =>
    poll(async () => {
      const got = await client.run(runId);
      return ["succeeded", "failed", "cancelled"].includes(got.run.status) ? got : undefined;
    }, { what: `run ${runId} ended`, timeoutMs: 60_000 })
  ));
}

/** Starts the V8 profiler of a server through its inspector; the stop returns the profile. */
async function startProfile(server: ServerProcess): Promise<() => Promise<string>> {
  const [target] = await (await fetch(`http://${server.inspect}/json/list`)).json();
  const socket = new WebSocket(target.webSocketDebuggerUrl);
  await new Promise((resolve) => socket.addEventListener("open", resolve, { once: true }));
  let id = 0;
  const call = (method: string) =>
    new Promise<Record<string, unknown>>((resolve) => {
      const mine = ++id;
      const listener = (event: MessageEvent) => {
        const message = JSON.parse(event.data);
        if (message.id !== mine) return;
        socket.removeEventListener("message", listener);
        resolve(message.result);
      };
      socket.addEventListener("message", listener);
      socket.send(JSON.stringify({ id: mine, method }));
    });
  await call("Profiler.enable");
  await call("Profiler.start");
  return async () => {
    const result = await call("Profiler.stop");
    socket.close();
    return JSON.stringify(result.profile);
  };
}

/** A one-put txn to etcd every 50 ms until stopped: each one's latency. */
async function probeEtcd(etcd: EtcdCluster): Promise<{ stop(): Promise<number[]> }> {
  const store = await openEtcdStore({ endpoints: etcd.endpoints, namespace: "/probe" });
  const times: number[] = [];
  let stopped = false;
  const loop = (async () => {
    while (!stopped) {
      const started = performance.now();
      // One that fails (etcd did not answer within the store's 5 s) counts as its time so far.
      await store.txn({ compare: [], success: [{ type: "put", key: "/p", value: "x" }] })
        .catch(() => {});
      times.push(performance.now() - started);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  })();
  return {
    async stop() {
      stopped = true;
      await loop;
      await store.close();
      return times;
    },
  };
}

/** `GET /api/runs` in a loop, one call at a time, until stopped: each call's latency. */
function pollApi(http: string): { stop(): Promise<number[]> } {
  const times: number[] = [];
  let stopped = false;
  const loop = (async () => {
    while (!stopped) {
      const started = performance.now();
      const response = await fetch(`${http}/api/runs`, AS_ADMIN);
      await response.arrayBuffer();
      times.push(performance.now() - started);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  })();
  return {
    async stop() {
      stopped = true;
      await loop;
      return times;
    },
  };
}

/** Counters of the etcd leader member. */
async function etcdCounters(etcd: EtcdCluster): Promise<EtcdCounters> {
  const leader = await etcd.leader();
  const text = await (await fetch(`${etcd.metrics[leader]}/metrics`)).text();
  const all = await Promise.all(etcd.metrics.map(async (url) => {
    try {
      return await (await fetch(`${url}/metrics`)).text();
    } catch {
      return "";
    }
  }));
  const value = (source: string, name: string) => {
    const line = source.split("\n").find((candidate) => candidate.startsWith(`${name} `));
    return line === undefined ? 0 : Number(line.slice(name.length + 1));
  };
  const total = (name: string) => all.reduce((count, source) => count + value(source, name), 0);
  return {
    puts: value(text, "etcd_mvcc_put_total"),
    deletes: value(text, "etcd_mvcc_delete_total"),
    txns: value(text, "etcd_mvcc_txn_total"),
    ranges: total("etcd_mvcc_range_total"),
    proposals: value(text, "etcd_server_proposals_committed_total"),
    walFsyncs: value(text, "etcd_disk_wal_fsync_duration_seconds_count"),
    backendCommits: value(text, "etcd_disk_backend_commit_duration_seconds_count"),
    walBytes: value(text, "etcd_disk_wal_write_bytes_total"),
    clientBytesIn: total("etcd_network_client_grpc_received_bytes_total"),
    clientBytesOut: total("etcd_network_client_grpc_sent_bytes_total"),
    leaseRenewals: value(text, "etcd_debugging_lease_renewed_total"),
    watchers: total("etcd_debugging_mvcc_watcher_total"),
    watchStreams: total("etcd_debugging_mvcc_watch_stream_total"),
    events: total("etcd_debugging_mvcc_events_total"),
  };
}

function diff(after: EtcdCounters, before: EtcdCounters): EtcdCounters {
  const result = { ...after };
  for (const key of Object.keys(after) as (keyof EtcdCounters)[]) {
    result[key] = after[key] - before[key];
  }
  return result;
}

/** Ids of the processes whose command line holds `needle` (`pgrep -f`). */
async function pidsWith(needle: string): Promise<number[]> {
  const output = await new Deno.Command("pgrep", { args: ["-f", "--", needle], stderr: "null" })
    .output();
  return new TextDecoder().decode(output.stdout).split("\n").filter(Boolean).map(Number);
}

/**
 * A `/proc/<pid>/` file of each process ("" for one that is gone), read by
 * `cat`: Deno lets only a fully privileged process read `/proc` itself.
 */
async function procFiles(pids: number[], file: string): Promise<string[]> {
  return await Promise.all(pids.map(async (pid) => {
    const output = await new Deno.Command("cat", {
      args: [`/proc/${pid}/${file}`],
      stderr: "null",
    }).output();
    return new TextDecoder().decode(output.stdout);
  }));
}

/** CPU time (user + system) of each process so far, in ms (0 for one that is gone). */
async function cpuOf(pids: number[]): Promise<number[]> {
  return (await procFiles(pids, "stat")).map((stat) => {
    // Fields after the command (which may hold spaces): utime and stime are the 12th and 13th,
    // in clock ticks of 10 ms.
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return fields.length > 13 ? (Number(fields[11]) + Number(fields[12])) * 10 : 0;
  });
}

async function rssKiB(pid: number): Promise<number> {
  const [status] = await procFiles([pid], "status");
  const match = status.match(/^VmRSS:\s+(\d+) kB/m);
  return match ? Number(match[1]) : 0;
}

function sum(values: number[]): number {
  return values.reduce((total, value) => total + value, 0);
}

/** The q-quantile of samples (nearest rank); NaN for none. */
export function quantile(samples: number[], q: number): number {
  if (samples.length === 0) return NaN;
  const sorted = [...samples].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)];
}

function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

async function withDeadline<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) =>
        timer = setTimeout(() => reject(new Error(`Expected ${what} within ${ms} ms`)), ms)
      ),
    ]);
  } finally {
    clearTimeout(timer);
  }
}
