/**
 * The simulation's networks, made with iproute2: one network namespace per
 * node with one veth (`eth0`) into the gateway namespace, where each cloud
 * is a bridge (`br-aws`, with the cloud's gateway address). Same-cloud
 * traffic is switched by its bridge. Policy routing sends every packet that
 * arrives from a bridge into the TUN device `dl0` (the delay line); what
 * the delay line writes back arrives on `dl0` and is routed by the main
 * table to the destination bridge.
 *
 * Nothing here adds a route for the sim's subnets to the host namespace:
 * the only host-side link is `PREFIX-api`, a veth carrying one link-local
 * /30 to the gateway namespace, where the API forwarder listens.
 *
 * @module
 */

import type { SimConfig } from "./config.ts";

/** The TUN device of the delay line, in the gateway namespace. */
export const TUN_NAME = "dl0";
/** The table the gateway's policy rules send cross-cloud packets to. */
const DELAY_TABLE = "100";

/** The namespace of a node (or `gw`). */
export function namespaceOf(prefix: string, node: string): string {
  return `${prefix}-${node}`;
}

/** The gateway's namespace. */
export function gatewayNamespace(prefix: string): string {
  return namespaceOf(prefix, "gw");
}

/** The host-namespace end of the published API link. */
export function apiLinkName(prefix: string): string {
  return `${prefix}-api`;
}

/** The temp directory holding the sim's state (data, logs, pids, sockets). */
export function stateDirOf(prefix: string): string {
  return `${Deno.env.get("TMPDIR") ?? "/tmp"}/runnel-sim-${prefix}`;
}

/** A command of the plumbing failed. */
export class SimNetworkError extends Error {
  readonly code = "sim_network_failed";
  constructor(message: string) {
    super(message);
    this.name = "SimNetworkError";
  }
}

/** Runs a command to completion, throwing with its stderr when it fails. */
export async function run(command: string, args: string[]): Promise<string> {
  let output;
  try {
    output = await new Deno.Command(command, { args, stdout: "piped", stderr: "piped" }).output();
  } catch (error) {
    throw new SimNetworkError(`${command} could not be started: ${(error as Error).message}`);
  }
  const decoder = new TextDecoder();
  if (!output.success) {
    throw new SimNetworkError(
      `${command} ${args.join(" ")} failed: ${decoder.decode(output.stderr).trim()}`,
    );
  }
  return decoder.decode(output.stdout);
}

/** `ip ARGS`. */
export function ip(...args: string[]): Promise<string> {
  return run("ip", args);
}

/** Runs a command inside a namespace. */
export function inNamespace(namespace: string, command: string, args: string[]): Promise<string> {
  return run("ip", ["netns", "exec", namespace, command, ...args]);
}

/** The sim's namespaces that exist now. */
export async function namespacesOf(prefix: string): Promise<string[]> {
  const listing = await ip("netns", "list");
  return listing.split("\n")
    .map((line) => line.split(" ")[0])
    .filter((name) => name.startsWith(`${prefix}-`));
}

/**
 * The prefixes of every simulation on this machine: gateways' namespaces
 * (`PREFIX-gw`) and state directories (`runnel-sim-PREFIX`), so a sim that
 * died half way is found by either.
 */
export async function simPrefixes(): Promise<string[]> {
  const found = new Set<string>();
  for (const line of (await ip("netns", "list")).split("\n")) {
    const match = /^([a-z][a-z0-9]{0,7})-gw(\s|$)/.exec(line);
    if (match) found.add(match[1]);
  }
  const tmp = Deno.env.get("TMPDIR") ?? "/tmp";
  try {
    for await (const entry of Deno.readDir(tmp)) {
      const match = /^runnel-sim-([a-z][a-z0-9]{0,7})$/.exec(entry.name);
      if (match && entry.isDirectory) found.add(match[1]);
    }
  } catch {
    // No temp directory to look in.
  }
  return [...found].sort();
}

/** Processes whose network namespace is `namespace` (`ip netns pids`). */
export async function pidsIn(namespace: string): Promise<number[]> {
  const text = await ip("netns", "pids", namespace).catch(() => "");
  return text.split("\n").filter((line) => /^\d+$/.test(line.trim())).map(Number);
}

async function sysctls(namespace: string, settings: Record<string, string>): Promise<void> {
  await inNamespace(
    namespace,
    "sysctl",
    ["-q", "-w", ...Object.entries(settings).map(([key, value]) => `${key}=${value}`)],
  );
}

/** The `/etc/hosts` every node sees (`ip netns exec` mounts /etc/netns/NS/hosts over it). */
function hostsFile(config: SimConfig): string {
  const lines = ["127.0.0.1 localhost"];
  for (const node of config.nodes) lines.push(`${node.address} ${node.name}`);
  for (const [cloud, { gateway }] of Object.entries(config.clouds)) {
    lines.push(`${gateway} gateway-${cloud}`);
  }
  return lines.join("\n") + "\n";
}

/** Creates the namespaces, bridges, veths, TUN device, rules and the published link. */
export async function createNetwork(config: SimConfig): Promise<void> {
  const { prefix } = config;
  const gateway = gatewayNamespace(prefix);
  await ip("netns", "add", gateway);
  await ip("-n", gateway, "link", "set", "lo", "up");
  await sysctls(gateway, {
    "net.ipv4.ip_forward": "1",
    // Packets come back from the TUN device with sources of other
    // interfaces' subnets: reverse-path filtering would drop them.
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
    "net.ipv4.conf.all.send_redirects": "0",
    "net.ipv4.conf.default.send_redirects": "0",
    "net.ipv6.conf.all.disable_ipv6": "1",
    "net.ipv6.conf.default.disable_ipv6": "1",
  });
  for (const [cloud, { subnet, gateway: address }] of Object.entries(config.clouds)) {
    const bridge = `br-${cloud}`.slice(0, 15);
    await ip("-n", gateway, "link", "add", bridge, "type", "bridge");
    await ip("-n", gateway, "addr", "add", `${address}/${subnet.split("/")[1]}`, "dev", bridge);
    await ip("-n", gateway, "link", "set", bridge, "up");
    await ip("-n", gateway, "rule", "add", "iif", bridge, "lookup", DELAY_TABLE, "pref", "100");
  }
  await ip("-n", gateway, "tuntap", "add", "dev", TUN_NAME, "mode", "tun");
  await ip("-n", gateway, "link", "set", TUN_NAME, "up");
  await ip("-n", gateway, "route", "add", "default", "dev", TUN_NAME, "table", DELAY_TABLE);
  await sysctls(gateway, { [`net.ipv4.conf.${TUN_NAME}.rp_filter`]: "0" });

  await Deno.mkdir(`/etc/netns`, { recursive: true });
  const hosts = hostsFile(config);
  await Promise.all(config.nodes.map(async (node, index) => {
    const namespace = namespaceOf(prefix, node.name);
    const cloud = config.clouds[node.cloud];
    await ip("netns", "add", namespace);
    await Deno.mkdir(`/etc/netns/${namespace}`, { recursive: true });
    await Deno.writeTextFile(`/etc/netns/${namespace}/hosts`, hosts);
    await sysctls(namespace, {
      "net.ipv6.conf.all.disable_ipv6": "1",
      "net.ipv6.conf.default.disable_ipv6": "1",
    });
    // Both ends are made in their namespaces: no name ever exists in the host's.
    const peer = `v${index}`;
    await ip(
      "link",
      "add",
      "eth0",
      "netns",
      namespace,
      "type",
      "veth",
      "peer",
      "name",
      peer,
      "netns",
      gateway,
    );
    await ip("-n", gateway, "link", "set", peer, "alias", node.name);
    await ip("-n", gateway, "link", "set", peer, "master", `br-${node.cloud}`.slice(0, 15), "up");
    await ip("-n", namespace, "link", "set", "lo", "up");
    await ip(
      "-n",
      namespace,
      "addr",
      "add",
      `${node.address}/${cloud.subnet.split("/")[1]}`,
      "dev",
      "eth0",
    );
    await ip("-n", namespace, "link", "set", "eth0", "up");
    await ip("-n", namespace, "route", "add", "default", "via", cloud.gateway);
  }));

  // The published API: one link-local /30 between the host and the gateway.
  const link = apiLinkName(prefix);
  await ip("link", "add", link, "type", "veth", "peer", "name", "api0", "netns", gateway);
  await ip("addr", "add", `${config.api.host}/30`, "dev", link);
  await ip("link", "set", link, "up");
  await ip("-n", gateway, "addr", "add", `${config.api.sim}/30`, "dev", "api0");
  await ip("-n", gateway, "link", "set", "api0", "up");
}

/**
 * Removes every namespace of the prefix (and with them their links, bridges
 * and TUN device), their hosts files and the published link. Processes must
 * be gone first: `ip netns del` does not end them.
 */
export async function destroyNetwork(prefix: string): Promise<void> {
  for (const namespace of await namespacesOf(prefix)) {
    await ip("netns", "del", namespace).catch(() => {});
    await Deno.remove(`/etc/netns/${namespace}`, { recursive: true }).catch(() => {});
  }
  // Gone with its peer's namespace; removed here if that failed half way.
  await ip("link", "del", apiLinkName(prefix)).catch(() => {});
  try {
    for await (const entry of Deno.readDir("/etc/netns")) {
      if (entry.name.startsWith(`${prefix}-`)) {
        await Deno.remove(`/etc/netns/${entry.name}`, { recursive: true }).catch(() => {});
      }
    }
  } catch {
    // No /etc/netns: nothing left there.
  }
}
