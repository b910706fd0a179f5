/**
 * The simulation's topology, read from `infra/sim.yaml`: clouds and their
 * subnets, the round trip between each pair, the nodes with their
 * addresses and roles, and the timings tuned for the cross-cloud RTT.
 *
 * @module
 */

import { parse } from "npm:yaml@2.9.1";
import { z } from "npm:zod@4.6.7";
import { isDuration, parseDuration } from "../../core/duration.ts";

/** Linux interface names are at most 15 bytes; `PREFIX-api` must fit. */
const PREFIX_PATTERN = /^[a-z][a-z0-9]{0,7}$/;
const IPV4 = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/;

const ipv4 = z.string().regex(IPV4, { message: "Expected an IPv4 address like 10.10.0.10" });
const duration = z.string().refine(isDuration, { message: 'Expected a duration like "50ms"' });
const name = z.string().regex(/^[a-z][a-z0-9-]{0,30}$/, {
  message: "Expected a lower-case name (letters, digits, dashes)",
});

const SimFileSchema = z.strictObject({
  prefix: z.string().regex(PREFIX_PATTERN, {
    message: "Expected a prefix of 1–8 lower-case letters and digits, starting with a letter",
  }),
  clouds: z.record(
    name,
    z.strictObject({
      subnet: z.string().regex(/^10\.\d{1,3}\.\d{1,3}\.0\/24$/, {
        message: "Expected a 10.x.y.0/24 subnet",
      }),
      gateway: ipv4,
    }),
  ),
  latency: z.record(z.string(), z.strictObject({ rtt: duration, jitter: duration })),
  nodes: z.record(
    name,
    z.strictObject({
      cloud: name,
      address: ipv4,
      role: z.enum(["control-plane", "worker", "object-store"]),
    }),
  ),
  etcd: z.strictObject({ heartbeat: duration, election: duration }),
  agents: z.strictObject({ heartbeat: duration }),
  leader: name,
  api: z.strictObject({ host: ipv4, sim: ipv4, port: z.number().int().min(1).max(65_532) }),
  bucket: z.string().regex(/^[a-z0-9][a-z0-9.-]{2,62}$/, { message: "Expected an S3 bucket name" }),
});

/** One node of the simulation. */
export interface SimNode {
  name: string;
  cloud: string;
  address: string;
  role: "control-plane" | "worker" | "object-store";
}

/** The simulation's topology with durations in milliseconds. */
export interface SimConfig {
  prefix: string;
  clouds: Record<string, { subnet: string; gateway: string }>;
  /** `a-b` in the order of {@link clouds} → round trip and jitter (ms). */
  latency: Record<string, { rttMs: number; jitterMs: number }>;
  nodes: SimNode[];
  etcd: { heartbeatMs: number; electionMs: number };
  agentHeartbeatMs: number;
  leader: string;
  api: { host: string; sim: string; port: number };
  bucket: string;
}

/** A sim.yaml that does not describe a usable topology. */
export class SimConfigError extends Error {
  readonly code = "sim_config_invalid";
  constructor(message: string) {
    super(message);
    this.name = "SimConfigError";
  }
}

/** The default topology file. */
export const DEFAULT_CONFIG_PATH = new URL("../sim.yaml", import.meta.url).pathname;

/** Reads and checks a sim.yaml. */
export async function loadSimConfig(path = DEFAULT_CONFIG_PATH): Promise<SimConfig> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (error) {
    throw new SimConfigError(
      `Expected a readable sim config, ${path}: ${(error as Error).message}`,
    );
  }
  return parseSimConfig(text, path);
}

/** Checks a sim.yaml's text (`file` names it in errors). */
export function parseSimConfig(text: string, file = "sim.yaml"): SimConfig {
  let raw: unknown;
  try {
    raw = parse(text);
  } catch (error) {
    throw new SimConfigError(`${file}: ${(error as Error).message}`);
  }
  const result = SimFileSchema.safeParse(raw);
  if (!result.success) {
    const issue = result.error.issues[0];
    throw new SimConfigError(`${file}: ${issue.path.join(".") || "(top)"}: ${issue.message}`);
  }
  const file_ = result.data;
  const order = Object.keys(file_.clouds);
  const fail = (message: string): never => {
    throw new SimConfigError(`${file}: ${message}`);
  };
  const latency: SimConfig["latency"] = {};
  for (let i = 0; i < order.length; i++) {
    for (let j = i + 1; j < order.length; j++) {
      const key = `${order[i]}-${order[j]}`;
      const entry = file_.latency[key] ?? file_.latency[`${order[j]}-${order[i]}`] ??
        fail(`latency.${key}: Expected a round trip for every cloud pair`);
      const rttMs = parseDuration(entry.rtt);
      const jitterMs = parseDuration(entry.jitter);
      if (jitterMs > rttMs) fail(`latency.${key}: Expected jitter ≤ rtt`);
      latency[key] = { rttMs, jitterMs };
    }
  }
  const addresses = new Set<string>();
  const nodes: SimNode[] = Object.entries(file_.nodes).map(([nodeName, node]) => {
    const cloud = file_.clouds[node.cloud] ??
      fail(`nodes.${nodeName}.cloud: Unknown cloud "${node.cloud}"`);
    if (!node.address.startsWith(cloud.subnet.replace(/0\/24$/, ""))) {
      fail(`nodes.${nodeName}.address: Expected an address in ${cloud.subnet}`);
    }
    if (node.address === cloud.gateway || addresses.has(node.address)) {
      fail(`nodes.${nodeName}.address: ${node.address} is taken`);
    }
    addresses.add(node.address);
    return { name: nodeName, ...node };
  });
  const controlPlanes = nodes.filter((node) => node.role === "control-plane");
  if (controlPlanes.length % 2 === 0) fail("nodes: Expected an odd number of control-plane nodes");
  if (nodes.filter((node) => node.role === "object-store").length !== 1) {
    fail("nodes: Expected exactly one object-store node");
  }
  if (!controlPlanes.some((node) => node.name === file_.leader)) {
    fail(`leader: Expected a control-plane node, got "${file_.leader}"`);
  }
  const heartbeatMs = parseDuration(file_.etcd.heartbeat);
  const electionMs = parseDuration(file_.etcd.election);
  // etcd 3.4 refuses these (its own checks, reported here before anything starts).
  if (electionMs < 5 * heartbeatMs || electionMs > 50_000) {
    fail("etcd.election: Expected 5× heartbeat ≤ election ≤ 50s");
  }
  return {
    prefix: file_.prefix,
    clouds: file_.clouds,
    latency,
    nodes,
    etcd: { heartbeatMs, electionMs },
    agentHeartbeatMs: parseDuration(file_.agents.heartbeat, { minMs: 50 }),
    leader: file_.leader,
    api: file_.api,
    bucket: file_.bucket,
  };
}

/** The nodes of one role. */
export function nodesOf(config: SimConfig, role: SimNode["role"]): SimNode[] {
  return config.nodes.filter((node) => node.role === role);
}
