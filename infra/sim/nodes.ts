/**
 * The processes of the simulation and how each node's are started: the
 * delay line and API forwarder in the gateway, an etcd member and a
 * `runnel server` on each control-plane node, a `runnel agent` on each
 * worker, s3rver on the object-store node. Every process runs inside its
 * node's namespace (`ip netns exec`), detached, its output appended to a
 * log in the sim's state directory and its pid recorded there.
 *
 * @module
 */

import { nodesOf, type SimConfig, type SimNode } from "./config.ts";
import { gatewayNamespace, namespaceOf, pidsIn, stateDirOf, TUN_NAME } from "./network.ts";
import type { DelayLineConfig } from "./delay_line.ts";
import type { ForwardConfig } from "./api_forward.ts";

/** The repository root (main.ts, deno.lock). */
const ROOT = new URL("../..", import.meta.url).pathname.replace(/\/$/, "");
const SIM_DIR = `${ROOT}/infra/sim`;

/** Ports every node uses on its own address. */
export const PORTS = { etcdClient: 2379, etcdPeer: 2380, http: 8080, grpc: 7070, s3: 9000 };
/** The credentials s3rver accepts. */
export const S3_CREDENTIALS = { accessKey: "S3RVER", secretKey: "S3RVER" };

/** The files of a sim's state directory. */
export function simPaths(prefix: string) {
  const root = stateDirOf(prefix);
  return {
    root,
    config: `${root}/config.json`,
    joinToken: `${root}/join.token`,
    adminToken: `${root}/admin.token`,
    control: `${root}/delay-line.sock`,
    logs: `${root}/logs`,
    pids: `${root}/pids`,
    node: (name: string) => `${root}/nodes/${name}`,
  };
}

/** One process to start in a namespace. */
interface ProcessSpec {
  /** Short name: `etcd`, `server`, `agent`, `s3`, `delay-line`, `api`. */
  name: string;
  argv: string[];
  env?: Record<string, string>;
}

/** The base environment of every sim process: nothing else of the caller's leaks in. */
function baseEnv(): Record<string, string> {
  const env: Record<string, string> = {
    PATH: Deno.env.get("PATH") ?? "/usr/local/bin:/usr/bin:/bin",
    HOME: Deno.env.get("HOME") ?? "/root",
    NO_COLOR: "1",
    DENO_NO_UPDATE_CHECK: "1",
  };
  for (const key of ["DENO_DIR", "TMPDIR"]) {
    const value = Deno.env.get(key);
    if (value) env[key] = value;
  }
  return env;
}

function shellQuote(word: string): string {
  return `'${word.replaceAll("'", `'\\''`)}'`;
}

/**
 * Starts a detached process in a namespace and records its pid. `ip netns
 * exec` and the shell both exec, so the pid is the process's own.
 */
async function launch(prefix: string, node: string, namespace: string, spec: ProcessSpec) {
  const paths = simPaths(prefix);
  const log = `${paths.logs}/${node}.${spec.name}.log`;
  const child = new Deno.Command("ip", {
    args: [
      "netns",
      "exec",
      namespace,
      "sh",
      "-c",
      `exec ${spec.argv.map(shellQuote).join(" ")} >>${shellQuote(log)} 2>&1`,
    ],
    stdin: "null",
    stdout: "null",
    stderr: "null",
    detached: true,
    clearEnv: true,
    env: { ...baseEnv(), ...spec.env },
  }).spawn();
  child.unref();
  await Deno.writeTextFile(`${paths.pids}/${node}.${spec.name}`, `${child.pid}\n`);
}

function addressOf(config: SimConfig, name: string): string {
  return config.nodes.find((node) => node.name === name)!.address;
}

/** Control-plane nodes, the leader first, then the rest in file order. */
export function controlPlanes(config: SimConfig): SimNode[] {
  const planes = nodesOf(config, "control-plane");
  return [
    ...planes.filter((node) => node.name === config.leader),
    ...planes.filter((node) => node.name !== config.leader),
  ];
}

/** A node's own cloud's control planes first: the others are reached across the gateway. */
function nearestFirst(config: SimConfig, cloud: string): SimNode[] {
  const planes = nodesOf(config, "control-plane");
  return [
    ...planes.filter((node) => node.cloud === cloud),
    ...planes.filter((node) => node.cloud !== cloud),
  ];
}

/** The URL of the object store, from inside the sim. */
export function s3Endpoint(config: SimConfig): string {
  return `http://${nodesOf(config, "object-store")[0].address}:${PORTS.s3}`;
}

function runnelArgv(args: string[]): string[] {
  return [
    Deno.execPath(),
    "run",
    `--lock=${ROOT}/deno.lock`,
    "--allow-read",
    "--allow-write",
    "--allow-run",
    "--allow-env",
    "--allow-net",
    "--allow-sys=hostname,osRelease",
    `${ROOT}/main.ts`,
    ...args,
  ];
}

/** The processes of one node. */
function processesOf(config: SimConfig, node: SimNode, secrets: { join: string }): ProcessSpec[] {
  const paths = simPaths(config.prefix);
  const dir = paths.node(node.name);
  switch (node.role) {
    case "control-plane": {
      const planes = nodesOf(config, "control-plane");
      const initialCluster = planes
        .map((plane) => `${plane.name}=http://${plane.address}:${PORTS.etcdPeer}`)
        .join(",");
      const etcd: ProcessSpec = {
        name: "etcd",
        argv: [
          "etcd",
          `--name=${node.name}`,
          `--data-dir=${dir}/etcd`,
          `--listen-client-urls=http://${node.address}:${PORTS.etcdClient},http://127.0.0.1:${PORTS.etcdClient}`,
          `--advertise-client-urls=http://${node.address}:${PORTS.etcdClient}`,
          `--listen-peer-urls=http://${node.address}:${PORTS.etcdPeer}`,
          `--initial-advertise-peer-urls=http://${node.address}:${PORTS.etcdPeer}`,
          `--initial-cluster=${initialCluster}`,
          `--initial-cluster-token=runnel-sim-${config.prefix}`,
          "--initial-cluster-state=new",
          `--heartbeat-interval=${config.etcd.heartbeatMs}`,
          `--election-timeout=${config.etcd.electionMs}`,
          "--pre-vote",
          // Applies wait on a cross-cloud quorum: etcd's 100 ms warning would fire on every one.
          "--experimental-warning-apply-duration=1s",
          "--logger=zap",
        ],
      };
      // Its own member first: the others are across the gateway.
      const endpoints = [node, ...planes.filter((plane) => plane !== node)]
        .map((plane) => `http://${plane.address}:${PORTS.etcdClient}`);
      const server: ProcessSpec = {
        name: "server",
        argv: runnelArgv([
          "server",
          "--etcd",
          endpoints.join(","),
          "--id",
          node.name,
          "--listen",
          `${node.address}:${PORTS.http}`,
          "--grpc",
          `${node.address}:${PORTS.grpc}`,
          "--peers",
          planes.map((plane) => `${plane.address}:${PORTS.grpc}`).join(","),
          "--heartbeat",
          `${config.agentHeartbeatMs}ms`,
          "--admin-token-file",
          paths.adminToken,
          "--state-dir",
          `${dir}/server`,
        ]),
        env: { RUNNEL_TOKEN: secrets.join },
      };
      return [etcd, server];
    }
    case "worker":
      return [{
        name: "agent",
        argv: runnelArgv([
          "agent",
          "--id",
          node.name,
          "--server",
          nearestFirst(config, node.cloud).map((plane) => `${plane.address}:${PORTS.grpc}`)
            .join(","),
          "--labels",
          `cloud=${node.cloud},node=${node.name}`,
          "--state-dir",
          `${dir}/agent`,
          "--s3-endpoint",
          s3Endpoint(config),
          "--s3-bucket",
          config.bucket,
          "--allow-shell",
        ]),
        env: {
          RUNNEL_TOKEN: secrets.join,
          AWS_ACCESS_KEY_ID: S3_CREDENTIALS.accessKey,
          AWS_SECRET_ACCESS_KEY: S3_CREDENTIALS.secretKey,
        },
      }];
    case "object-store":
      return [{
        name: "s3",
        argv: [
          Deno.execPath(),
          "run",
          `--lock=${ROOT}/deno.lock`,
          "--allow-env",
          "--allow-sys",
          `--allow-net=${node.address}`,
          `--allow-read=${dir}`,
          `--allow-write=${dir}`,
          `${SIM_DIR}/s3_server.ts`,
          JSON.stringify({
            address: node.address,
            port: PORTS.s3,
            directory: `${dir}/s3`,
            bucket: config.bucket,
          }),
        ],
      }];
  }
}

/**
 * Starts a node's processes, or only those named in `only` (`etcd`,
 * `server`); a node with processes running already is left alone unless
 * `only` picks which to add.
 */
export async function startNode(config: SimConfig, node: SimNode, only?: string[]): Promise<void> {
  const namespace = namespaceOf(config.prefix, node.name);
  if (only === undefined && (await pidsIn(namespace)).length > 0) return;
  const paths = simPaths(config.prefix);
  const join = (await Deno.readTextFile(paths.joinToken)).trim();
  await Deno.mkdir(paths.node(node.name), { recursive: true });
  for (const spec of processesOf(config, node, { join })) {
    if (only && !only.includes(spec.name)) continue;
    await launch(config.prefix, node.name, namespace, spec);
  }
}

/**
 * The pid recorded for a node's process, if that process still runs in the
 * node's namespace (Deno keeps other processes' /proc entries behind
 * --allow-all, so the namespace's own pid list is the witness).
 */
export async function recordedPid(prefix: string, node: string, process: string) {
  try {
    const pid = Number(
      (await Deno.readTextFile(`${simPaths(prefix).pids}/${node}.${process}`)).trim(),
    );
    const namespace = node === "gateway" ? gatewayNamespace(prefix) : namespaceOf(prefix, node);
    return (await pidsIn(namespace)).includes(pid) ? pid : undefined;
  } catch {
    return undefined;
  }
}

/** Starts the delay line and the API forwarder in the gateway namespace. */
export async function startGateway(config: SimConfig): Promise<void> {
  const namespace = gatewayNamespace(config.prefix);
  if ((await pidsIn(namespace)).length > 0) return;
  const paths = simPaths(config.prefix);
  const clouds = Object.fromEntries(
    Object.entries(config.clouds).map(([cloud, { subnet }]) => [cloud, subnet]),
  );
  const delayLine: DelayLineConfig = {
    tun: TUN_NAME,
    control: paths.control,
    clouds,
    delays: config.latency,
  };
  await launch(config.prefix, "gateway", namespace, {
    name: "delay-line",
    argv: [
      Deno.execPath(),
      "run",
      "--allow-ffi",
      `--allow-read=${paths.root}`,
      `--allow-write=${paths.root}`,
      `--allow-net=unix:${paths.control}`,
      `${SIM_DIR}/delay_line.ts`,
      JSON.stringify(delayLine),
    ],
  });
  const planes = controlPlanes(config);
  const targets = planes.map((plane) => `${plane.address}:${PORTS.http}`);
  const forward: ForwardConfig = {
    hostname: config.api.sim,
    routes: [
      { port: config.api.port, targets },
      ...nodesOf(config, "control-plane").map((plane, index) => ({
        port: config.api.port + 1 + index,
        targets: [`${addressOf(config, plane.name)}:${PORTS.http}`],
      })),
    ],
  };
  await launch(config.prefix, "gateway", namespace, {
    name: "api",
    argv: [
      Deno.execPath(),
      "run",
      `--allow-net=${config.api.sim},${planes.map((plane) => plane.address).join(",")}`,
      `${SIM_DIR}/api_forward.ts`,
      JSON.stringify(forward),
    ],
  });
}

/** The published URL of a control-plane node's API (or of any live one). */
export function apiUrl(config: SimConfig, node?: string): string {
  if (node === undefined) return `http://${config.api.sim}:${config.api.port}`;
  const index = nodesOf(config, "control-plane").findIndex((plane) => plane.name === node);
  if (index < 0) throw new Error(`${node} is not a control-plane node`);
  return `http://${config.api.sim}:${config.api.port + 1 + index}`;
}
