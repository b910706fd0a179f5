/**
 * The simulation's command line, behind the `sim-*` tasks of deno.json:
 *
 *     sim up | down [--all] | list | check | status | kill NODE | start NODE | partition CLOUD on|off
 *       [--config infra/sim.yaml] [--prefix NAME]
 *
 * Needs root. Exit codes: 0 done · 1 failed (or, for check, a round trip
 * out of bounds) · 2 bad input.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { type SimConfig, SimConfigError } from "./config.ts";
import { renderMatrix, renderTable } from "./check.ts";
import {
  apiUrl,
  clusterState,
  etcdStatus,
  gatewayState,
  loadSimConfig,
  measureLatency,
  nodeProcesses,
  raftState,
  renderMeasurements,
  runningConfig,
  simDown,
  SimError,
  simKill,
  simPartition,
  simPaths,
  simStart,
  simUp,
} from "./mod.ts";
import { namespacesOf, SimNetworkError, simPrefixes } from "./network.ts";

const USAGE =
  `usage: sim up|down [--all]|list|check|status|kill NODE|start NODE|partition CLOUD on|off [--config FILE] [--prefix NAME]`;

async function configOf(flags: { config?: string; prefix?: string }): Promise<SimConfig> {
  const config = await loadSimConfig(flags.config);
  if (flags.prefix) {
    if (!/^[a-z][a-z0-9]{0,7}$/.test(flags.prefix)) {
      throw new SimConfigError(`Expected --prefix of 1–8 lower-case letters and digits`);
    }
    config.prefix = flags.prefix;
  }
  // A running sim's own config wins for every command but up (which checks they agree).
  return config;
}

async function requireRunning(config: SimConfig): Promise<SimConfig> {
  const running = await runningConfig(config.prefix);
  if (!running) {
    throw new SimError(`no simulation runs under prefix "${config.prefix}" (deno task sim-up)`);
  }
  return running;
}

function topology(config: SimConfig): string {
  const rows = [["node", "cloud", "address", "role"]];
  for (const node of config.nodes) rows.push([node.name, node.cloud, node.address, node.role]);
  for (const [cloud, { gateway }] of Object.entries(config.clouds)) {
    rows.push([`gateway`, cloud, gateway, "delay line (all cross-cloud traffic)"]);
  }
  return renderTable(rows);
}

async function status(config: SimConfig): Promise<void> {
  const rows = [["node", "cloud", "address", "processes"]];
  for (const { node, processes } of await nodeProcesses(config)) {
    rows.push([
      node.name,
      node.cloud,
      node.address,
      Object.entries(processes).map(([name, pid]) => `${name} ${pid ?? "DOWN"}`).join(", "),
    ]);
  }
  console.log(renderTable(rows));
  console.log("\netcd members (etcdctl endpoint status, from inside the sim):");
  const members = await etcdStatus(config).catch(() => []);
  console.log(
    members.length
      ? renderTable([
        ["member", "id", "leader", "term"],
        ...members.map((m) => [m.node, m.id, m.leader ? "yes" : "", String(m.term)]),
      ])
      : "  none answers",
  );
  console.log("\n/raft-state of each control-plane node:");
  const raftRows = [["node", "state", "leader", "term", "commit index"]];
  for (const plane of config.nodes.filter((node) => node.role === "control-plane")) {
    try {
      const raft = await raftState(config, plane.name);
      raftRows.push([
        plane.name,
        raft.state,
        raft.leader,
        String(raft.term),
        String(raft.commit_index),
      ]);
    } catch (error) {
      raftRows.push([plane.name, `unreachable (${(error as Error).message})`, "", "", ""]);
    }
  }
  console.log(renderTable(raftRows));
  try {
    const cluster = await clusterState(config);
    console.log(`\nscheduler: ${cluster.scheduler ?? "none"} (asked ${cluster.server})`);
    console.log(renderTable([
      ["worker", "labels", "status"],
      ...cluster.workers.map((w) => [
        w.agentId,
        Object.entries(w.labels).map(([k, v]) => `${k}=${v}`).join(","),
        w.status,
      ]),
    ]));
  } catch (error) {
    console.log(`\n/cluster-state: unreachable (${(error as Error).message})`);
  }
  try {
    const gateway = await gatewayState(config);
    console.log("\ngateway delays in force (configured; sim-check measures):");
    console.log(renderTable([
      ["pair", "rtt", "jitter"],
      ...Object.entries(gateway.delays).map((
        [pair, d],
      ) => [pair, `${d.rttMs} ms`, `±${d.jitterMs} ms`]),
    ]));
    console.log(`partitioned: ${gateway.partitioned.join(", ") || "none"}`);
  } catch (error) {
    console.log(`\ngateway: unreachable (${(error as Error).message})`);
  }
}

async function check(config: SimConfig): Promise<number> {
  const measurements = await measureLatency(config);
  console.log(renderMatrix(measurements, Object.keys(config.clouds)));
  console.log("");
  console.log(renderMeasurements(measurements));
  const bad = measurements.filter((m) => !m.ok);
  if (bad.length) {
    console.error(`\n${bad.length} pair(s) out of bounds: ${bad.map((m) => m.link).join(", ")}`);
    return 1;
  }
  return 0;
}

async function main(args: string[]): Promise<number> {
  const { values: flags, positionals } = parseArgs({
    args,
    options: { config: { type: "string" }, prefix: { type: "string" }, all: { type: "boolean" } },
    allowPositionals: true,
  });
  const [command, ...rest] = positionals;
  const config = await configOf(flags);
  switch (command) {
    case "up": {
      const started = Date.now();
      const wasRunning = (await runningConfig(config.prefix)) !== undefined;
      await simUp(config, { log: (line) => console.error(`sim-up: ${line}`) });
      if (wasRunning) {
        // A second sim-up reports what runs.
        await status(config);
        console.log("");
      }
      console.log(topology(config));
      console.log(
        `\nready in ${((Date.now() - started) / 1000).toFixed(1)} s; measured round trips:`,
      );
      const code = await check(config);
      const paths = simPaths(config.prefix);
      console.log(`
API (published into this namespace): ${apiUrl(config)}
  export RUNNEL_API_TOKEN=$(cat ${paths.adminToken})
  deno task runnel submit examples/multicloud/pipeline.yaml --server ${apiUrl(config)} --follow
logs: ${paths.logs}   ·   deno task sim-status   ·   deno task sim-down`);
      return code;
    }
    case "down": {
      // --all: every sim on this machine (a test run killed before its clean-up, say).
      const prefixes = flags.all ? await simPrefixes() : [config.prefix];
      for (const prefix of prefixes) {
        const removed = await simDown(prefix);
        console.log(
          removed.length ? `removed: ${removed.join(", ")}` : `nothing of "${prefix}" was left`,
        );
        const left = await namespacesOf(prefix);
        if (left.length) throw new SimError(`namespaces left: ${left.join(", ")}`);
      }
      return 0;
    }
    case "list": {
      const prefixes = await simPrefixes();
      console.log(prefixes.length ? prefixes.join("\n") : "no simulation on this machine");
      return 0;
    }
    case "check":
      return await check(await requireRunning(config));
    case "status":
      await status(await requireRunning(config));
      return 0;
    case "kill": {
      if (!rest[0]) throw new SimConfigError(`sim kill needs a NODE\n${USAGE}`);
      const pids = await simKill(await requireRunning(config), rest[0]);
      console.log(`${rest[0]}: SIGKILLed ${pids.join(", ") || "(nothing ran)"}`);
      return 0;
    }
    case "start": {
      if (!rest[0]) throw new SimConfigError(`sim start needs a NODE\n${USAGE}`);
      await simStart(await requireRunning(config), rest[0]);
      console.log(`${rest[0]}: started`);
      return 0;
    }
    case "partition": {
      const [cloud, mode] = rest;
      if (!cloud || !["on", "off"].includes(mode)) {
        throw new SimConfigError(`sim partition needs CLOUD on|off\n${USAGE}`);
      }
      const state = await simPartition(await requireRunning(config), cloud, mode === "on");
      console.log(`partitioned: ${state.partitioned.join(", ") || "none"}`);
      return 0;
    }
    default:
      throw new SimConfigError(USAGE);
  }
}

if (import.meta.main) {
  try {
    Deno.exit(await main(Deno.args));
  } catch (error) {
    if (error instanceof SimConfigError) {
      console.error(`error: ${error.message}`);
      Deno.exit(2);
    }
    if (error instanceof SimError || error instanceof SimNetworkError) {
      console.error(`error: ${(error as Error).message}`);
      Deno.exit(1);
    }
    throw error;
  }
}
