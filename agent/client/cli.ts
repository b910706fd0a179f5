/**
 * The cluster commands of the `runnel` CLI: `server`, `agent`, `submit`,
 * and `runs|show|logs|cancel|resume --server URL`. main.ts parses the flags
 * and calls these.
 *
 * @module
 */

import { dirname, resolve } from "node:path";
import { hostname } from "node:os";
import { parseDuration } from "../../core/duration.ts";
import { openEmbeddedStore } from "../../consensus/embedded.ts";
import type { Store } from "../../consensus/store.ts";
import { openLocalArtifactStore } from "../../core/artifacts/local.ts";
import { openS3ArtifactStore } from "../../core/artifacts/s3.ts";
import type { ArtifactStore } from "../../core/artifacts/store.ts";
import type { StepState } from "../../core/model.ts";
import { clientCredentials, serverCredentials } from "../../proto/mod.ts";
import type { AgentConfig } from "../config.ts";
import { RunClient } from "./mod.ts";
import { collectBundle } from "../bundle.ts";
import type { ClusterRunRecord } from "../server/keys.ts";
import { jsonLog, type LeaderElection, standaloneElection, startServer } from "../server/mod.ts";
import { AgentRejectedError, startAgent } from "../worker/mod.ts";
import type { RaftState } from "../server/metrics.ts";

/** The flags the cluster commands read (as main.ts parsed them). */
export interface ClusterFlags {
  server?: string[];
  token?: string;
  labels?: string;
  slots?: string;
  "allow-shell"?: boolean;
  listen?: string;
  grpc?: string;
  store?: string;
  etcd?: string;
  id?: string;
  peers?: string;
  heartbeat?: string;
  artifacts?: string;
  "s3-endpoint"?: string;
  "s3-bucket"?: string;
  "s3-region"?: string;
  "tls-ca"?: string;
  "tls-cert"?: string;
  "tls-key"?: string;
  "etcd-ca"?: string;
  "etcd-cert"?: string;
  "etcd-key"?: string;
  "state-dir"?: string;
  json?: boolean;
  follow?: boolean;
  logs?: boolean;
}

/** A flag a cluster command cannot use; main.ts reports it as bad input (exit 2). */
export class ClusterUsageError extends Error {
  /** Stable error code. */
  readonly code = "usage";

  /** Builds the error from a full sentence. */
  constructor(message: string) {
    super(message);
    this.name = "ClusterUsageError";
  }
}

/** How a cluster store is opened: main.ts wires the etcd engine in. */
export interface StoreFactory {
  /** Opens the etcd engine and its election (`--etcd URLS`). */
  etcd?(endpoints: string[], flags: ClusterFlags): Promise<{
    store: Store;
    election: LeaderElection;
    raftState: () => Promise<RaftState>;
    close(): Promise<void>;
  }>;
}

/** `runnel server`: serves until SIGINT/SIGTERM. */
export async function serverCommand(flags: ClusterFlags, factory: StoreFactory): Promise<number> {
  const token = joinToken(flags);
  const [hostnameHttp, portHttp] = hostPort(flags.listen ?? "127.0.0.1:8080", "--listen");
  const grpcAddress = flags.grpc ?? "127.0.0.1:7070";
  hostPort(grpcAddress, "--grpc");
  const heartbeatMs = flags.heartbeat ? duration(flags.heartbeat, "--heartbeat") : undefined;
  let store: Store;
  let election: LeaderElection;
  let raftState: (() => Promise<RaftState>) | undefined;
  let closeStore: () => Promise<void>;
  if (flags.etcd) {
    if (!factory.etcd) throw new ClusterUsageError("this build cannot reach etcd");
    const endpoints = flags.etcd.split(",").map((url) => url.trim()).filter(Boolean);
    const opened = await factory.etcd(endpoints, flags);
    ({ store, election, raftState } = opened);
    closeStore = () => opened.close();
  } else {
    const path = flags.store ?? `${flags["state-dir"] ?? ".runnel"}/server.db`;
    await Deno.mkdir(dirname(resolve(path)), { recursive: true });
    const embedded = openEmbeddedStore(path);
    store = embedded;
    election = standaloneElection();
    closeStore = () => embedded.close();
  }
  const server = await startServer({
    serverId: flags.id ?? `${hostname()}-${portHttp}`,
    store,
    election,
    raftState,
    http: { hostname: hostnameHttp, port: portHttp },
    grpc: { address: grpcAddress, credentials: serverTls(flags) },
    token,
    heartbeatMs,
    peers: flags.peers?.split(",").map((peer) => peer.trim()).filter(Boolean),
  });
  console.error(
    `runnel server ${server.serverId}: API http://${hostnameHttp}:${server.httpPort} · agents ${
      grpcAddress.replace(/:\d+$/, "")
    }:${server.grpcPort}`,
  );
  await untilSignal();
  await server.close();
  await closeStore();
  return 0;
}

/** `runnel agent`: runs until SIGINT/SIGTERM (which drain it). */
export async function agentCommand(flags: ClusterFlags, config: AgentConfig): Promise<number> {
  const servers = (flags.server ?? []).flatMap((list) => list.split(","))
    .map((server) => server.trim().replace(/^(grpcs?|https?):\/\//, "")).filter(Boolean);
  if (servers.length === 0) {
    throw new ClusterUsageError('"runnel agent" needs --server HOST:PORT (the servers\' gRPC)');
  }
  const stateDir = flags["state-dir"] ?? ".runnel/agent";
  let agent;
  try {
    agent = await startAgent({
      servers,
      token: joinToken(flags),
      labels: parseLabels(flags.labels),
      slots: flags.slots ? positive(flags.slots, "--slots") : undefined,
      allowShell: flags["allow-shell"],
      stateDir,
      artifacts: await openArtifacts(flags, stateDir),
      plugins: config.plugins,
      hosts: config.hosts,
      credentials: flags["tls-ca"] || flags["tls-cert"]
        ? clientCredentials({ ca: flags["tls-ca"], cert: flags["tls-cert"], key: flags["tls-key"] })
        : undefined,
      log: jsonLog,
    });
  } catch (error) {
    if (error instanceof AgentRejectedError) {
      console.error(`error: ${error.message}`);
      return 2;
    }
    throw error;
  }
  // The first SIGINT/SIGTERM drains (running steps finish, results are
  // acknowledged); a second one stops at once (running steps are reported
  // as infrastructure failures and retried elsewhere).
  const stopped = untilSignal().then(() => {
    console.error("draining: running steps finish first; signal again to stop now");
    untilSignal().then(() => agent.stop());
    return agent.stop({ drain: true });
  });
  try {
    await Promise.race([agent.done, stopped]);
    await agent.done;
    return 0;
  } catch (error) {
    if (error instanceof AgentRejectedError) {
      console.error(`error: ${error.message}`);
      return 2;
    }
    throw error;
  }
}

/** `runnel submit FILE --server URL [--follow]`. */
export async function submitCommand(file: string, flags: ClusterFlags): Promise<number> {
  const client = clientOf(flags);
  let source: string;
  try {
    source = await Deno.readTextFile(file);
  } catch (error) {
    throw new ClusterUsageError(`cannot read ${file}: ${(error as Error).message}`);
  }
  // The pipeline's directory goes with it: agents run its steps from a copy.
  const baseDir = dirname(resolve(file));
  const bundle = await collectBundle(baseDir);
  const { runId } = await client.submit(source, file, baseDir, bundle.files);
  if (!flags.follow) {
    console.log(flags.json ? JSON.stringify({ runId }) : `submitted ${runId}`);
    return 0;
  }
  return await followRun(client, runId, flags);
}

/** `runnel runs|show|logs|cancel|resume --server URL`. */
export async function remoteCommand(
  command: string,
  args: string[],
  flags: ClusterFlags,
): Promise<number> {
  const client = clientOf(flags);
  const id = () => {
    if (!args[0]) throw new ClusterUsageError(`"runnel ${command}" needs a run id`);
    return args[0];
  };
  switch (command) {
    case "runs": {
      const runs = await client.runs();
      if (flags.json) return print(JSON.stringify(runs, null, 2));
      if (runs.length === 0) return print("no runs on this cluster yet");
      return print(runs.map((run) => `${run.runId}  ${run.pipeline}  ${run.status}`).join("\n"));
    }
    case "show": {
      const { run, steps } = await client.run(id());
      if (flags.json) return print(JSON.stringify({ ...run, steps }, null, 2));
      return print(describeRun(run, steps));
    }
    case "logs": {
      for await (
        const { event, data } of client.logs(id(), { step: args[1], follow: flags.follow })
      ) {
        if (event !== "log") continue;
        const log = data as { step: string; attempt: number; text: string };
        Deno.stdout.writeSync(new TextEncoder().encode(
          log.text.split("\n").map((line, i, all) =>
            i === all.length - 1 && line === "" ? "" : `${log.step} │ ${line}\n`
          ).join(""),
        ));
      }
      return 0;
    }
    case "cancel":
      return print(`${id()}: ${await client.cancel(id())}`);
    case "resume":
      await client.resume(id());
      if (!flags.follow) return print(`${id()}: resume requested`);
      return await followRun(client, (await client.run(id())).run.runId, flags);
  }
  throw new ClusterUsageError(`"runnel ${command}" cannot talk to a server`);
}

async function followRun(client: RunClient, runId: string, flags: ClusterFlags): Promise<number> {
  const seen = new Map<string, string>();
  let last: ClusterRunRecord | undefined;
  if (!flags.json) console.log(`run ${runId}`);
  for await (const { event, data } of client.events(runId)) {
    if (flags.json && event !== "end") {
      console.log(JSON.stringify({ type: event, ...data as object }));
    }
    if (event === "run") last = data as ClusterRunRecord;
    if (event === "step" && !flags.json) {
      const step = data as StepState;
      if (seen.get(step.id) === step.status) continue;
      seen.set(step.id, step.status);
      const attempt = step.attempts.at(-1);
      const where = attempt?.worker ? ` on ${attempt.worker}` : "";
      const why = step.reason ? ` (${step.reason})` : "";
      console.log(`${step.status.padEnd(9)} ${step.id}${where}${why}`);
    }
  }
  const status = last?.status ?? "unknown";
  if (!flags.json) console.log(`${status} · runnel show ${runId} --server …`);
  return status === "succeeded" ? 0 : 1;
}

function describeRun(run: ClusterRunRecord, steps: Record<string, StepState>): string {
  const lines = [
    `run       ${run.runId}`,
    `pipeline  ${run.pipeline} (${run.file})`,
    `status    ${run.status}`,
    "",
  ];
  for (const step of Object.values(steps)) {
    lines.push(
      `${step.id.padEnd(24)} ${step.status.padEnd(10)} ${step.attempts.length} attempt(s)`,
    );
    for (const attempt of step.attempts) {
      const result = attempt.result;
      const outcome = !result
        ? "running"
        : result.ok
        ? "ok"
        : `${result.errorClass}: ${result.message}`;
      lines.push(`  #${attempt.attempt} ${attempt.worker ?? "-"}  ${outcome}`);
    }
  }
  return lines.join("\n");
}

function clientOf(flags: ClusterFlags): RunClient {
  const servers = (flags.server ?? []).flatMap((list) => list.split(","))
    .map((server) => server.trim()).filter(Boolean)
    .map((server) => /^https?:\/\//.test(server) ? server : `http://${server}`);
  if (servers.length === 0) throw new ClusterUsageError("Expected --server URL");
  return new RunClient(servers);
}

async function openArtifacts(flags: ClusterFlags, stateDir: string): Promise<ArtifactStore> {
  if (flags["s3-endpoint"] || flags["s3-bucket"]) {
    if (!flags["s3-endpoint"] || !flags["s3-bucket"]) {
      throw new ClusterUsageError("Expected both --s3-endpoint and --s3-bucket");
    }
    const accessKey = Deno.env.get("AWS_ACCESS_KEY_ID");
    const secretKey = Deno.env.get("AWS_SECRET_ACCESS_KEY");
    if (!accessKey || !secretKey) {
      throw new ClusterUsageError(
        "Expected AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment for --s3-endpoint",
      );
    }
    return await openS3ArtifactStore({
      endpoint: flags["s3-endpoint"],
      bucket: flags["s3-bucket"],
      region: flags["s3-region"],
      accessKey,
      secretKey,
    });
  }
  return openLocalArtifactStore(flags.artifacts ?? `${stateDir}/artifacts`);
}

function serverTls(flags: ClusterFlags) {
  if (!flags["tls-cert"] && !flags["tls-key"]) return undefined;
  if (!flags["tls-cert"] || !flags["tls-key"]) {
    throw new ClusterUsageError("Expected both --tls-cert and --tls-key");
  }
  return serverCredentials({ ca: flags["tls-ca"], cert: flags["tls-cert"], key: flags["tls-key"] });
}

function joinToken(flags: ClusterFlags): string {
  const token = flags.token ?? Deno.env.get("RUNNEL_TOKEN");
  if (!token) {
    throw new ClusterUsageError(
      "Expected a join token: --token T or RUNNEL_TOKEN in the environment",
    );
  }
  return token;
}

/** `cloud=gcp,region=us-east1` → `{cloud: "gcp", region: "us-east1"}`. */
export function parseLabels(text?: string): Record<string, string> {
  const labels: Record<string, string> = {};
  for (const pair of (text ?? "").split(",").map((part) => part.trim()).filter(Boolean)) {
    const at = pair.indexOf("=");
    if (at <= 0) throw new ClusterUsageError(`Expected --labels key=value,…, got "${pair}"`);
    labels[pair.slice(0, at)] = pair.slice(at + 1);
  }
  return labels;
}

function hostPort(text: string, flag: string): [string, number] {
  const match = /^(.*):(\d+)$/.exec(text);
  if (!match || Number(match[2]) > 65535) {
    throw new ClusterUsageError(`Expected ${flag} HOST:PORT, got "${text}"`);
  }
  return [match[1] || "0.0.0.0", Number(match[2])];
}

function duration(text: string, flag: string): number {
  try {
    return parseDuration(text);
  } catch {
    throw new ClusterUsageError(`Expected a duration like "5s" for ${flag}, got "${text}"`);
  }
}

function positive(text: string, flag: string): number {
  const value = Number(text);
  if (!Number.isInteger(value) || value <= 0) {
    throw new ClusterUsageError(`Expected a positive integer for ${flag}, got "${text}"`);
  }
  return value;
}

function untilSignal(): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      Deno.removeSignalListener("SIGINT", done);
      Deno.removeSignalListener("SIGTERM", done);
      resolve();
    };
    Deno.addSignalListener("SIGINT", done);
    Deno.addSignalListener("SIGTERM", done);
  });
}

function print(text: string): number {
  console.log(text);
  return 0;
}
