/**
 * The multi-cloud simulation: bring it up, look at it, break it, take it
 * down. `main.ts` beside this file is its command line (`deno task sim-up`
 * and friends); tests and benchmarks call these functions directly, each
 * with its own prefix so runs side by side never meet.
 *
 * @module
 */

import { nodesOf, type SimConfig, type SimNode } from "./config.ts";
import { delayLineRequest } from "./control.ts";
import type { DelayLineState } from "./delay_line.ts";
import {
  createNetwork,
  destroyNetwork,
  gatewayNamespace,
  inNamespace,
  namespaceOf,
  namespacesOf,
  pidsIn,
  stateDirOf,
} from "./network.ts";
import {
  apiUrl,
  controlPlanes,
  PORTS,
  recordedPid,
  simPaths,
  startGateway,
  startNode,
} from "./nodes.ts";

export { apiUrl, simPaths } from "./nodes.ts";
export { loadSimConfig, parseSimConfig, type SimConfig, type SimNode } from "./config.ts";
export { measureLatency, type PairMeasurement, renderMeasurements } from "./check.ts";

/** How long sim-up waits for the whole topology to be ready. */
const UP_TIMEOUT_MS = 120_000;
/** How long a process has after SIGTERM before SIGKILL (etcd can take ~10 s). */
const TERM_GRACE_MS = 3_000;

/** The simulation cannot run here (not root, a tool missing) or did not come up. */
export class SimError extends Error {
  readonly code = "sim_failed";
  constructor(message: string) {
    super(message);
    this.name = "SimError";
  }
}

/** Polls `check` until it returns a value, or fails after `timeoutMs`. */
export async function waitFor<T>(
  what: string,
  check: () => Promise<T | undefined>,
  timeoutMs: number,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let delay = 20;
  while (true) {
    const value = await check().catch(() => undefined);
    if (value !== undefined) return value;
    if (Date.now() > deadline) {
      throw new SimError(`timed out after ${timeoutMs} ms waiting for ${what}`);
    }
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 250);
  }
}

/** Whether this process runs as root (asked of id(1): the suite grants no --allow-sys=uid). */
export async function isRoot(): Promise<boolean> {
  const output = await new Deno.Command("id", { args: ["-u"], stdout: "piped", stderr: "null" })
    .output();
  return new TextDecoder().decode(output.stdout).trim() === "0";
}

/** Fails with a clear message unless this can run the simulation. */
export async function requireSimHost(): Promise<void> {
  if (!(await isRoot())) {
    throw new SimError(
      "the simulation needs root (network namespaces, veth, TUN): run it as root, e.g. sudo -E deno task sim-up",
    );
  }
  for (
    const [tool, hint] of [
      ["ip", "iproute2"],
      ["ping", "iputils-ping"],
      ["etcd", "etcd-server"],
      ["etcdctl", "etcd-client"],
    ]
  ) {
    const found = await new Deno.Command("sh", {
      args: ["-c", `command -v ${tool}`],
      stdout: "null",
      stderr: "null",
    }).output();
    if (!found.success) throw new SimError(`${tool} is missing: apt-get install ${hint}`);
  }
}

function randomHex(bytes: number): string {
  return Array.from(crypto.getRandomValues(new Uint8Array(bytes)))
    .map((byte) => byte.toString(16).padStart(2, "0")).join("");
}

/** The admin token of a running sim (what `RUNNEL_API_TOKEN` should be). */
export async function adminToken(prefix: string): Promise<string> {
  return (await Deno.readTextFile(simPaths(prefix).adminToken)).trim();
}

/** The config a running sim was started with, if one runs under this prefix. */
export async function runningConfig(prefix: string): Promise<SimConfig | undefined> {
  try {
    return JSON.parse(await Deno.readTextFile(simPaths(prefix).config)) as SimConfig;
  } catch {
    return undefined;
  }
}

async function apiGet(config: SimConfig, path: string, node?: string): Promise<unknown> {
  const response = await fetch(`${apiUrl(config, node)}${path}`, {
    headers: { authorization: `Bearer ${await adminToken(config.prefix)}` },
    signal: AbortSignal.timeout(3_000),
  });
  if (!response.ok) {
    await response.body?.cancel();
    throw new Error(`${path}: HTTP ${response.status}`);
  }
  return await response.json();
}

/** One etcd member's view, from `etcdctl endpoint status` run inside the sim. */
export interface EtcdMemberStatus {
  node: string;
  id: string;
  leader: boolean;
  term: number;
}

/** The etcd members that answer, asked from inside `via`'s namespace. */
export async function etcdStatus(config: SimConfig, via?: string): Promise<EtcdMemberStatus[]> {
  const planes = nodesOf(config, "control-plane");
  const from = via ?? planes[0].name;
  const output = await inNamespace(namespaceOf(config.prefix, from), "sh", [
    "-c",
    `etcdctl --dial-timeout=1s --command-timeout=2s --endpoints=${
      planes.map((plane) => `http://${plane.address}:${PORTS.etcdClient}`).join(",")
    } endpoint status -w simple 2>/dev/null; true`,
  ]);
  const members: EtcdMemberStatus[] = [];
  for (const line of output.split("\n")) {
    const cells = line.split(",").map((cell) => cell.trim());
    if (cells.length < 7) continue;
    const plane = planes.find((node) => cells[0].includes(`//${node.address}:`));
    if (!plane) continue;
    members.push({
      node: plane.name,
      id: cells[1],
      leader: cells[4] === "true",
      term: Number(cells[6]),
    });
  }
  return members;
}

/** Makes `node`'s etcd member the leader (etcd's move-leader), once the cluster has one. */
export async function moveEtcdLeader(config: SimConfig, node: string, timeoutMs = 30_000) {
  await waitFor(`etcd leader ${node}`, async () => {
    const members = await etcdStatus(config, node);
    const leader = members.find((member) => member.leader);
    const target = members.find((member) => member.node === node);
    if (!leader || !target) return undefined;
    if (leader === target) return true;
    const leaderAddress = config.nodes.find((n) => n.name === leader.node)!.address;
    await inNamespace(namespaceOf(config.prefix, node), "etcdctl", [
      `--endpoints=http://${leaderAddress}:${PORTS.etcdClient}`,
      "move-leader",
      target.id,
    ]).catch(() => {});
    return undefined;
  }, timeoutMs);
}

/** The scheduler's server id and the workers online, as any live server reports them. */
export async function clusterState(config: SimConfig, node?: string) {
  return await apiGet(config, "/cluster-state", node) as {
    server: string;
    scheduler: string | null;
    workers: Array<{ agentId: string; labels: Record<string, string>; status: string }>;
  };
}

/** A control-plane node's `/raft-state`. */
export async function raftState(config: SimConfig, node: string) {
  return await apiGet(config, "/raft-state", node) as {
    node_id: string;
    state: string;
    leader: string;
    term: number;
    commit_index: number;
  };
}

async function serverReady(config: SimConfig, node: string): Promise<true | undefined> {
  const response = await fetch(`${apiUrl(config, node)}/ready`, {
    signal: AbortSignal.timeout(3_000),
  });
  await response.body?.cancel();
  return response.ok ? true : undefined;
}

/** Options of {@link simUp}. */
export interface SimUpOptions {
  /** Progress lines (default: none). */
  log?: (line: string) => void;
  timeoutMs?: number;
}

/**
 * Builds and starts the simulation and waits until etcd has a leader (the
 * configured one), every server is ready and every worker online. A sim
 * already running under the prefix is completed (nodes not running are
 * started) instead of built again.
 */
export async function simUp(config: SimConfig, options: SimUpOptions = {}): Promise<void> {
  const log = options.log ?? (() => {});
  const timeoutMs = options.timeoutMs ?? UP_TIMEOUT_MS;
  await requireSimHost();
  const paths = simPaths(config.prefix);
  const running = await runningConfig(config.prefix);
  if (running) {
    if (JSON.stringify(running) !== JSON.stringify(config)) {
      throw new SimError(
        `a simulation with another configuration runs under prefix "${config.prefix}": sim-down first`,
      );
    }
    log(`the simulation "${config.prefix}" exists; starting whatever of it is not running`);
  } else {
    // Leftovers of a run that died half way (no config written) go first.
    await simDown(config.prefix);
    await Deno.mkdir(paths.logs, { recursive: true, mode: 0o700 });
    await Deno.mkdir(paths.pids, { recursive: true, mode: 0o700 });
    await Deno.writeTextFile(paths.joinToken, randomHex(24) + "\n", { mode: 0o600 });
    await Deno.writeTextFile(paths.adminToken, randomHex(24) + "\n", { mode: 0o600 });
    log(
      `networks: ${
        Object.entries(config.clouds).map(([c, { subnet }]) => `net-${c} ${subnet}`).join(", ")
      }`,
    );
    try {
      await createNetwork(config);
    } catch (error) {
      await simDown(config.prefix);
      throw error;
    }
    await Deno.writeTextFile(paths.config, JSON.stringify(config, null, 2) + "\n");
  }
  await startGateway(config);
  await waitFor("the delay line", () => delayLineRequest(paths.control, { op: "state" }), 20_000);
  log("gateway: delay line and API forwarder up");

  const planes = controlPlanes(config);
  const leader = planes[0];
  const store = nodesOf(config, "object-store");
  const needsServer: SimNode[] = [];
  for (const plane of planes) {
    if ((await pidsIn(namespaceOf(config.prefix, plane.name))).length === 0) {
      await startNode(config, plane, ["etcd"]);
      needsServer.push(plane);
    }
  }
  for (const node of store) await startNode(config, node);
  await waitFor(
    "an etcd leader",
    async () => (await etcdStatus(config)).some((member) => member.leader) || undefined,
    timeoutMs,
  );
  if (needsServer.length === planes.length) {
    await moveEtcdLeader(config, leader.name, timeoutMs);
    log(`etcd: leader ${leader.name}`);
  }
  // The configured leader's server starts (and so campaigns) first.
  for (const plane of needsServer) {
    await startNode(config, plane, ["server"]);
    await waitFor(`${plane.name} ready`, () => serverReady(config, plane.name), timeoutMs);
    if (plane === leader) {
      await waitFor(
        `${plane.name} scheduling`,
        async () => (await clusterState(config, plane.name)).scheduler === plane.name || undefined,
        timeoutMs,
      );
    }
    log(`${plane.name}: etcd member and runnel server ready`);
  }
  for (const worker of nodesOf(config, "worker")) await startNode(config, worker);
  const workers = nodesOf(config, "worker").map((node) => node.name);
  await waitFor("every worker online", async () => {
    const state = await clusterState(config);
    const online = state.workers.filter((worker) => worker.status === "online")
      .map((worker) => worker.agentId);
    return workers.every((name) => online.includes(name)) || undefined;
  }, timeoutMs);
  for (const plane of planes) {
    await waitFor(`${plane.name} ready`, () => serverReady(config, plane.name), timeoutMs);
  }
  log(`workers online: ${workers.join(", ")}`);
}

/** Ends every process of a namespace: SIGTERM, then SIGKILL after a grace. */
async function endProcesses(namespace: string, graceMs: number): Promise<void> {
  const signal = (pids: number[], name: Deno.Signal) => {
    for (const pid of pids) {
      try {
        Deno.kill(pid, name);
      } catch {
        // Already gone.
      }
    }
  };
  let pids = await pidsIn(namespace);
  if (pids.length === 0) return;
  if (graceMs > 0) {
    signal(pids, "SIGTERM");
    const deadline = Date.now() + graceMs;
    while (Date.now() < deadline && (pids = await pidsIn(namespace)).length > 0) {
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }
  for (let round = 0; round < 50 && (pids = await pidsIn(namespace)).length > 0; round++) {
    signal(pids, "SIGKILL");
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/**
 * Stops every process of the simulation (by pid: those in its namespaces),
 * removes its namespaces, links, TUN device, hosts files and state
 * directory. Safe to run twice, and on a sim that died half way.
 */
export async function simDown(prefix: string): Promise<string[]> {
  const removed: string[] = [];
  const namespaces = await namespacesOf(prefix);
  await Promise.all(namespaces.map((namespace) => endProcesses(namespace, TERM_GRACE_MS)));
  await destroyNetwork(prefix);
  removed.push(...namespaces);
  const dir = stateDirOf(prefix);
  try {
    await Deno.remove(dir, { recursive: true });
    removed.push(dir);
  } catch {
    // Never made, or removed already.
  }
  return removed;
}

/** SIGKILLs every process of a node (for a gateway: the delay line and forwarder). */
export async function simKill(config: SimConfig, node: string): Promise<number[]> {
  const namespace = node === "gateway"
    ? gatewayNamespace(config.prefix)
    : namespaceOf(config.prefix, nodeNamed(config, node).name);
  const pids = await pidsIn(namespace);
  await endProcesses(namespace, 0);
  return pids;
}

/** Starts a killed node again (its data directories kept). */
export async function simStart(config: SimConfig, node: string): Promise<void> {
  if (node === "gateway") return await startGateway(config);
  await startNode(config, nodeNamed(config, node));
}

function nodeNamed(config: SimConfig, name: string): SimNode {
  const node = config.nodes.find((candidate) => candidate.name === name);
  if (!node) {
    throw new SimError(
      `Expected a node name (${
        config.nodes.map((n) => n.name).join(", ")
      }, gateway), got "${name}"`,
    );
  }
  return node;
}

/** Cuts a cloud off at the gateway (every packet to or from it dropped), or heals it. */
export async function simPartition(config: SimConfig, cloud: string, cut: boolean) {
  if (!(cloud in config.clouds)) {
    throw new SimError(
      `Expected a cloud (${Object.keys(config.clouds).join(", ")}), got "${cloud}"`,
    );
  }
  return await delayLineRequest(simPaths(config.prefix).control, { op: "partition", cloud, cut });
}

/** The delay line's state: delays in force, partitions, per-direction counters. */
export async function gatewayState(config: SimConfig): Promise<DelayLineState> {
  return await delayLineRequest(simPaths(config.prefix).control, { op: "state" });
}

/** What runs: per node (and the gateway) its processes (pid or down). */
export async function nodeProcesses(config: SimConfig) {
  const rows = [];
  const gateway = {
    name: "gateway",
    cloud: "-",
    address: Object.values(config.clouds).map((cloud) => cloud.gateway).join(","),
    role: "gateway",
  };
  rows.push({
    node: gateway,
    processes: {
      "delay-line": await recordedPid(config.prefix, "gateway", "delay-line"),
      api: await recordedPid(config.prefix, "gateway", "api"),
    } as Record<string, number | undefined>,
  });
  for (const node of config.nodes) {
    const names = node.role === "control-plane"
      ? ["etcd", "server"]
      : node.role === "worker"
      ? ["agent"]
      : ["s3"];
    const processes: Record<string, number | undefined> = {};
    for (const name of names) processes[name] = await recordedPid(config.prefix, node.name, name);
    rows.push({ node, processes });
  }
  return rows;
}
