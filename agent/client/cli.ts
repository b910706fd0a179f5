/**
 * The cluster commands of the `runnel` CLI: `server`, `agent`, `submit`,
 * `token`, and `runs|show|logs|cancel|resume --server URL`. main.ts parses
 * the flags (`flags.ts`) and calls these; they print a run as local mode
 * does (`render.ts`). The commands that call the API present a token and
 * trust a CA as `credentials.ts` finds them.
 *
 * @module
 */

import { dirname, resolve } from "node:path";
import { parse as parseYaml } from "npm:yaml@2.9.1";
import { hostname } from "node:os";
import { openEmbeddedStore } from "../../consensus/embedded.ts";
import type { Store } from "../../consensus/store.ts";
import { openLocalArtifactStore } from "../../core/artifacts/local.ts";
import { openS3ArtifactStore } from "../../core/artifacts/s3.ts";
import type { ArtifactStore } from "../../core/artifacts/store.ts";
import type { StepState } from "../../core/model.ts";
import { loadSecretsFile, SecretsFileError, type SecretSource } from "../../core/secrets.ts";
import { clientCredentials, serverCredentials } from "../../proto/mod.ts";
import type { AgentConfig } from "../config.ts";
import { agentPolicy } from "../attempt/policy.ts";
import { RunClient } from "./mod.ts";
import { collectBundle } from "../bundle.ts";
import type { ClusterRunRecord } from "../server/keys.ts";
import {
  jsonLog,
  type LeaderElection,
  ServerListenError,
  standaloneElection,
  startServer,
} from "../server/mod.ts";
import { AgentRejectedError, startAgent } from "../worker/mod.ts";
import type { RaftState } from "../server/metrics.ts";
import type { MemberMaintenance } from "../server/maintenance.ts";
import {
  type CliFlags,
  commaList,
  durationFlag,
  EXIT_BAD_INPUT,
  HEARTBEAT_BOUNDS,
  hostPort,
  labelsFlag,
  limitsFlag,
  otlpFlag,
  paramsFlag,
  parseLabels,
  positiveInt,
  smtpFlag,
  UsageError,
  VERSION,
} from "./flags.ts";
import { openTracer, type Tracer } from "../trace/exporter.ts";
import { artifactsOfSteps, renderRun, renderRunList, table } from "./render.ts";
import { apiCredentials, sendsTokenInClear } from "./credentials.ts";
import { AdminTokenError, checkAdminToken, isRole, ROLES } from "../server/auth.ts";
import { WebhookAllowList } from "../effects.ts";

/** The flag that sets each of a server's listeners, for messages. */
const LISTENER_FLAG = { http: "--listen", grpc: "--grpc" } as const;

/** `runnel server`: serves until SIGINT/SIGTERM. */
export async function serverCommand(flags: CliFlags): Promise<number> {
  const token = joinToken(flags);
  const [hostnameHttp, portHttp] = hostPort(flags.listen ?? "127.0.0.1:8080", "--listen");
  const grpcAddress = flags.grpc ?? "127.0.0.1:7070";
  hostPort(grpcAddress, "--grpc");
  const heartbeatMs = flags.heartbeat
    ? durationFlag(flags.heartbeat, "--heartbeat", HEARTBEAT_BOUNDS)
    : undefined;
  const httpTls = await httpTlsOf(flags);
  const adminToken = flags["admin-token-file"]
    ? await adminTokenOf(flags["admin-token-file"])
    : undefined;
  const webhookAllow = commaList(flags["webhook-allow"]);
  try {
    new WebhookAllowList(webhookAllow);
  } catch (error) {
    throw new UsageError(`--webhook-allow: ${(error as Error).message}`);
  }
  const secrets = flags.secrets ? await operatorSecrets(flags.secrets) : undefined;
  const serverId = flags.id ?? `${hostname()}-${portHttp}`;
  const tracer = tracerOf(flags, "server", serverId);
  let store: Store;
  let election: LeaderElection;
  let raftState: (() => Promise<RaftState>) | undefined;
  let closeStore: () => Promise<void>;
  let members: MemberMaintenance | undefined;
  if (flags.etcd) {
    // Only a server on etcd loads the etcd client.
    const { openEtcdCluster } = await import("../server/etcd.ts");
    const opened = await openEtcdCluster({
      endpoints: commaList(flags.etcd),
      tls: flags["etcd-ca"]
        ? { caFile: flags["etcd-ca"], certFile: flags["etcd-cert"], keyFile: flags["etcd-key"] }
        : undefined,
    });
    ({ store, election, raftState, members } = opened);
    closeStore = () => opened.close();
  } else {
    const path = flags.store ?? `${flags["state-dir"] ?? ".runnel"}/server.db`;
    await Deno.mkdir(dirname(resolve(path)), { recursive: true });
    const embedded = openEmbeddedStore(path);
    store = embedded;
    election = standaloneElection();
    closeStore = () => embedded.close();
  }
  let server;
  try {
    server = await startServer({
      serverId,
      store,
      election,
      raftState,
      http: { hostname: hostnameHttp, port: portHttp, tls: httpTls },
      grpc: { address: grpcAddress, credentials: serverTls(flags) },
      token,
      heartbeatMs,
      peers: commaList(flags.peers),
      secrets,
      adminToken,
      metricsPublic: flags["metrics-public"],
      webhookAllow,
      smtp: smtpFlag(flags.smtp, flags["smtp-from"]),
      pipelineLimits: limitsFlag(flags.limit),
      ...(tracer ? { tracer } : {}),
      // Where the agents put artifacts, when the operator says: the UI's downloads, and
      // shipped pipeline directories (kept there rather than in etcd).
      ...(flags.artifacts || flags["s3-endpoint"] || flags["s3-bucket"]
        ? { artifacts: await openArtifacts(flags, flags["state-dir"] ?? ".runnel") }
        : {}),
      maintenance: {
        ...(flags.retention
          ? { runRetentionMs: durationFlag(flags.retention, "--retention") }
          : {}),
        ...(members ? { members } : {}),
      },
    });
  } catch (error) {
    await closeStore();
    await tracer?.shutdown();
    if (!(error instanceof ServerListenError)) throw error;
    const flag = LISTENER_FLAG[error.listener];
    const given = error.listener === "http" ? flags.listen ?? "127.0.0.1:8080" : grpcAddress;
    console.error(
      error.code === "address_in_use"
        ? `error: ${flag} ${given} is already in use (another runnel server?); choose a free address with ${flag} HOST:PORT`
        : `error: ${flag} ${given} cannot be listened on: ${
          error.cause instanceof Error ? error.cause.message : String(error.cause)
        }`,
    );
    return EXIT_BAD_INPUT;
  }
  console.error(
    `runnel server ${server.serverId}: API ${
      httpTls ? "https" : "http"
    }://${hostnameHttp}:${server.httpPort} · agents ${
      grpcAddress.replace(/:\d+$/, "")
    }:${server.grpcPort}`,
  );
  await untilSignal();
  await server.close();
  await closeStore();
  await tracer?.shutdown();
  return 0;
}

/**
 * The tracer of `--otlp-endpoint URL` (else of the OTLP env vars) for a
 * server or an agent, or none. A collector that is down is logged, once
 * until it is back, and never stops anything.
 */
function tracerOf(
  flags: CliFlags,
  role: "server" | "agent",
  instance: string | undefined,
): Tracer | undefined {
  const endpoint = otlpFlag(flags["otlp-endpoint"]);
  if (!endpoint) return undefined;
  return openTracer({
    endpoint,
    resource: { "service.version": VERSION, "service.instance.id": instance, "runnel.role": role },
    onError: (message) => jsonLog({ level: "warn", component: "trace", msg: message }),
  });
}

/** `runnel agent`: runs until SIGINT/SIGTERM (which drain it). */
export async function agentCommand(flags: CliFlags, config: AgentConfig): Promise<number> {
  const servers = commaList(flags.server).map((server) =>
    server.replace(/^(grpcs?|https?):\/\//, "")
  );
  if (servers.length === 0) {
    throw new UsageError('"runnel agent" needs --server HOST:PORT (the servers\' gRPC)');
  }
  const stateDir = flags["state-dir"] ?? ".runnel/agent";
  const tracer = tracerOf(flags, "agent", flags.id);
  try {
    return await runAgent(flags, config, { servers, stateDir, tracer });
  } finally {
    await tracer?.shutdown();
  }
}

async function runAgent(
  flags: CliFlags,
  config: AgentConfig,
  { servers, stateDir, tracer }: { servers: string[]; stateDir: string; tracer?: Tracer },
): Promise<number> {
  let agent;
  try {
    agent = await startAgent({
      servers,
      // A name the operator chose (the sim's node names); otherwise kept from the state dir.
      agentId: flags.id,
      token: joinToken(flags),
      labels: parseLabels(flags.labels),
      slots: flags.slots ? positiveInt(flags.slots, "--slots") : undefined,
      allowShell: flags["allow-shell"],
      stateDir,
      artifacts: await openArtifacts(flags, stateDir),
      plugins: config.plugins,
      hosts: config.hosts,
      settings: config.settings,
      secrets: config.secrets,
      policy: agentPolicy(config.policy, {
        configFile: config.file,
        plugins: config.plugins.map((plugin) => plugin.name),
      }),
      credentials: flags["tls-ca"] || flags["tls-cert"]
        ? clientCredentials({ ca: flags["tls-ca"], cert: flags["tls-cert"], key: flags["tls-key"] })
        : undefined,
      log: jsonLog,
      ...(tracer ? { tracer } : {}),
    });
  } catch (error) {
    if (error instanceof AgentRejectedError) {
      console.error(`error: ${error.message}`);
      return EXIT_BAD_INPUT;
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
      return EXIT_BAD_INPUT;
    }
    throw error;
  }
}

/** A server's `--secrets FILE`; a bad file is bad input. */
async function operatorSecrets(file: string): Promise<Record<string, SecretSource>> {
  try {
    return await loadSecretsFile(file);
  } catch (error) {
    if (error instanceof SecretsFileError) throw new UsageError(error.message);
    throw error;
  }
}

/**
 * A pipeline file's text and its directory, as `submit` and `apply` send
 * them: agents run its steps from a copy of the directory.
 */
async function pipelineToShip(file: string) {
  let source: string;
  try {
    source = await Deno.readTextFile(file);
  } catch (error) {
    throw new UsageError(`Expected a readable pipeline file, ${file}: ${(error as Error).message}`);
  }
  const baseDir = dirname(resolve(file));
  return { source, baseDir, bundle: await collectBundle(baseDir) };
}

/** `runnel submit FILE --server URL [--follow]`. */
export async function submitCommand(file: string, flags: CliFlags): Promise<number> {
  using client = await clientOf(flags);
  const { source, baseDir, bundle } = await pipelineToShip(file);
  const params = await paramsFlag(flags.param, flags["params-file"]);
  const { runId } = await client.submit(
    source,
    file,
    baseDir,
    bundle.files,
    params,
    labelsFlag(flags.label),
  );
  if (!flags.follow) {
    console.log(flags.json ? JSON.stringify({ runId }) : `submitted ${runId}`);
    return 0;
  }
  return await followRun(client, runId, flags);
}

/** `runnel apply FILE --server URL`: registers the pipeline (and its directory) under its name. */
export async function applyCommand(file: string, flags: CliFlags): Promise<number> {
  using client = await clientOf(flags);
  const { source, baseDir, bundle } = await pipelineToShip(file);
  const applied = await client.apply(source, file, baseDir, bundle.files);
  if (flags.json) return print(JSON.stringify(applied));
  return print(
    applied.unchanged
      ? `${applied.name} unchanged (version ${applied.version})`
      : `${applied.name} version ${applied.version} applied`,
  );
}

/** `runnel pipelines [NAME] --server URL`: the registered pipelines, or one's versions. */
export async function pipelinesCommand(args: string[], flags: CliFlags): Promise<number> {
  using client = await clientOf(flags);
  if (args[0]) {
    const { pipeline, versions } = await client.pipeline(args[0]);
    if (flags.json) return print(JSON.stringify({ pipeline, versions }, null, 2));
    return print(
      [
        `pipeline  ${pipeline.name} (current version ${pipeline.current})`,
        "",
        table(
          ["VERSION", "APPLIED", "BY", "DIGEST"],
          versions.map((v) => [
            `${v.version}${v.version === pipeline.current ? " *" : ""}`,
            new Date(v.createdAt).toISOString().replace("T", " ").slice(0, 19),
            v.createdBy ?? "",
            v.digest.slice(0, 12),
          ]),
        ),
      ].join("\n"),
    );
  }
  const pipelines = await client.pipelines();
  if (flags.json) return print(JSON.stringify(pipelines, null, 2));
  if (pipelines.length === 0) return print("no pipelines registered on this cluster yet");
  return print(table(
    ["PIPELINE", "CURRENT", "VERSIONS", "UPDATED", "BY"],
    pipelines.map((p) => [
      p.name,
      String(p.current),
      String(p.latest),
      new Date(p.updatedAt).toISOString().replace("T", " ").slice(0, 19),
      p.updatedBy ?? "",
    ]),
  ));
}

/** `runnel trigger NAME [--pipeline-version N] [--param k=v …] [--follow] --server URL`. */
export async function triggerCommand(name: string, flags: CliFlags): Promise<number> {
  using client = await clientOf(flags);
  const version = flags["pipeline-version"] === undefined
    ? undefined
    : positiveInt(flags["pipeline-version"], "--pipeline-version");
  const params = await paramsFlag(flags.param, flags["params-file"]);
  const started = await client.trigger(name, { params, version, labels: labelsFlag(flags.label) });
  if (!flags.follow) {
    return print(
      flags.json
        ? JSON.stringify(started)
        : `triggered ${started.runId} (${started.pipeline} version ${started.version}) ${started.url}`,
    );
  }
  return await followRun(client, started.runId, flags);
}

/** `runnel schedules [suspend|resume NAME] --server URL`. */
export async function schedulesCommand(args: string[], flags: CliFlags): Promise<number> {
  using client = await clientOf(flags);
  if (args[0] === "set") {
    if (!args[1] || !args[2]) {
      throw new UsageError(`"runnel schedules set" needs a pipeline name and a schedule file`);
    }
    let schedule: unknown;
    try {
      schedule = parseYaml(await Deno.readTextFile(args[2]));
    } catch (error) {
      throw new UsageError(
        `Expected a readable YAML schedule in ${args[2]}: ${(error as Error).message}`,
      );
    }
    if (!schedule || typeof schedule !== "object" || Array.isArray(schedule)) {
      throw new UsageError(`Expected ${args[2]} to hold a schedule (cron: …, timezone: …)`);
    }
    await client.setSchedule(args[1], schedule as Record<string, unknown>);
    return print(`${args[1]}: schedule set`);
  }
  if (args[0] === "delete") {
    if (!args[1]) throw new UsageError(`"runnel schedules delete" needs a pipeline name`);
    await client.deleteSchedule(args[1]);
    return print(`${args[1]}: schedule deleted`);
  }
  if (args[0] === "suspend" || args[0] === "resume") {
    if (!args[1]) throw new UsageError(`"runnel schedules ${args[0]}" needs a pipeline name`);
    await client.suspendSchedule(args[1], args[0] === "suspend");
    return print(`${args[1]}: schedule ${args[0] === "suspend" ? "suspended" : "resumed"}`);
  }
  if (args[0]) {
    throw new UsageError(
      `Expected "runnel schedules [set NAME FILE | delete NAME | suspend NAME | resume NAME]", ` +
        `got "${args[0]}"`,
    );
  }
  const schedules = await client.schedules();
  if (flags.json) return print(JSON.stringify(schedules, null, 2));
  if (schedules.length === 0) return print("no schedules on this cluster yet");
  const at = (ms?: number) =>
    ms === undefined ? "-" : new Date(ms).toISOString().replace("T", " ").slice(0, 19);
  return print(table(
    ["PIPELINE", "CRON", "TZ", "STATE", "NEXT", "LAST", "LAST RUN", "SKIPPED"],
    schedules.map((s) => [
      s.name,
      s.cron,
      s.timezone ?? "UTC",
      s.suspended ? "suspended" : s.concurrency,
      s.suspended ? "-" : at(s.next),
      at(s.last),
      s.lastRun ?? "-",
      String(s.skipped),
    ]),
  ));
}

/** `runnel backfill NAME --from T --to T [--dry-run] --server URL`. */
export async function backfillCommand(name: string, flags: CliFlags): Promise<number> {
  if (!flags.from || !flags.to) {
    throw new UsageError(`"runnel backfill" needs --from and --to (ISO 8601 dates and times)`);
  }
  using client = await clientOf(flags);
  const result = await client.backfill(name, {
    from: flags.from,
    to: flags.to,
    dryRun: flags["dry-run"],
  });
  if (flags.json) return print(JSON.stringify(result));
  if (result.ticks.length === 0) {
    return print(`${name}: no tick between ${flags.from} and ${flags.to}`);
  }
  return print(
    [
      flags["dry-run"]
        ? `${name}: ${result.ticks.length} runs would start (dry run):`
        : `${name}: ${result.ticks.length} runs to start, as its schedule's concurrency allows:`,
      ...result.ticks.map((tick) => `  ${tick}`),
    ].join("\n"),
  );
}

/** `runnel delete-pipeline NAME --server URL` (admin). */
export async function deletePipelineCommand(name: string, flags: CliFlags): Promise<number> {
  using client = await clientOf(flags);
  await client.deletePipeline(name);
  return print(`${name} deleted (its runs stay)`);
}

/** `runnel runs|show|logs|cancel|resume --server URL`. */
export async function remoteCommand(
  command: string,
  args: string[],
  flags: CliFlags,
): Promise<number> {
  using client = await clientOf(flags);
  const id = () => {
    if (!args[0]) throw new UsageError(`"runnel ${command}" needs a run id`);
    return args[0];
  };
  switch (command) {
    case "runs": {
      const page = await client.searchRuns({
        labels: labelsFlag(flags.label),
        status: flags.status,
        pipeline: flags.pipeline,
        limit: flags["page-size"] ? positiveInt(flags["page-size"], "--page-size") : undefined,
        after: flags.after,
      });
      if (flags.json) return print(JSON.stringify(page, null, 2));
      if (page.runs.length === 0) {
        const filtered = flags.label?.length || flags.status || flags.pipeline || flags.after;
        return print(filtered ? "no runs on this cluster match" : "no runs on this cluster yet");
      }
      return print(
        renderRunList(page.runs) + (page.next ? `\nmore: runnel runs … --after ${page.next}` : ""),
      );
    }
    case "approve": {
      if (!args[1]) throw new UsageError(`"runnel approve" needs a run id and a step`);
      await client.approve(id(), args[1], !flags.reject, flags.reason);
      return print(`${flags.reject ? "rejected" : "approved"} ${args[1]} of run ${id()}`);
    }
    case "rerun": {
      const { runId, rerun } = await client.rerun(id(), args.slice(1), flags.downstream);
      if (!flags.follow) {
        return print(
          flags.json ? JSON.stringify({ runId, rerun }) : `rerun ${runId}: ${rerun.join(", ")}`,
        );
      }
      return await followRun(client, runId, flags);
    }
    case "show": {
      const { run, steps } = await client.run(id());
      const artifacts = artifactsOfSteps(steps);
      if (flags.json) return print(JSON.stringify({ ...run, steps, artifacts }, null, 2));
      return print(renderRun({ run, steps, artifacts }));
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
  throw new UsageError(`"runnel ${command}" cannot talk to a server`);
}

async function followRun(client: RunClient, runId: string, flags: CliFlags): Promise<number> {
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

/**
 * `runnel token bootstrap|create|revoke|list --server URL`: the cluster's
 * API tokens. A token's secret is printed once, when it is made.
 */
export async function tokenCommand(args: string[], flags: CliFlags): Promise<number> {
  using client = await clientOf(flags);
  const [action, id] = args;
  switch (action) {
    case "bootstrap":
      return printIssued(await client.bootstrap(), flags);
    case "create": {
      if (!flags.name) throw new UsageError('"runnel token create" needs --name NAME');
      if (!isRole(flags.role)) {
        throw new UsageError(
          `"runnel token create" needs --role ${ROLES.join("|")}` +
            (flags.role ? `, got "${flags.role}"` : ""),
        );
      }
      return printIssued(await client.createToken({ name: flags.name, role: flags.role }), flags);
    }
    case "revoke": {
      if (!id) throw new UsageError('"runnel token revoke" needs a token id');
      const revoked = await client.revokeToken(id);
      if (flags.json) return print(JSON.stringify(revoked));
      return print(`revoked ${revoked.id} (${revoked.name}, ${revoked.role})`);
    }
    case "list": {
      const tokens = await client.listTokens();
      if (flags.json) return print(JSON.stringify(tokens, null, 2));
      if (tokens.length === 0) return print("no API tokens yet");
      const rows = [["ID", "NAME", "ROLE", "CREATED", "CREATED BY"]].concat(
        tokens.map((token) => [
          token.id,
          token.name,
          token.role,
          new Date(token.createdAt).toISOString().slice(0, 19) + "Z",
          token.createdBy,
        ]),
      );
      const widths = rows[0].map((_, i) => Math.max(...rows.map((row) => row[i].length)));
      return print(
        rows.map((row) => row.map((cell, i) => cell.padEnd(widths[i])).join("  ").trimEnd())
          .join("\n"),
      );
    }
  }
  throw new UsageError(
    `"runnel token" needs bootstrap, create --role R --name N, revoke ID or list` +
      (action ? `; got "${action}"` : ""),
  );
}

/**
 * `runnel agents revoke|forget ID --server URL`: an agent's identity. A
 * revoked agent is cut off at once and refused; a forgotten one may
 * register again with the join token (and gets a new credential).
 */
export async function agentsCommand(args: string[], flags: CliFlags): Promise<number> {
  using client = await clientOf(flags);
  const [action, id] = args;
  if ((action === "revoke" || action === "forget") && !id) {
    throw new UsageError(`"runnel agents ${action}" needs an agent id (see /cluster-state)`);
  }
  switch (action) {
    case "revoke":
      await client.revokeAgent(id);
      return print(flags.json ? JSON.stringify({ revoked: id }) : `revoked agent ${id}`);
    case "forget":
      await client.forgetAgent(id);
      return print(flags.json ? JSON.stringify({ forgotten: id }) : `forgot agent ${id}`);
  }
  throw new UsageError(
    `"runnel agents" needs revoke ID or forget ID` + (action ? `; got "${action}"` : ""),
  );
}

function printIssued(
  issued: { token: string; id: string; name: string; role: string },
  flags: CliFlags,
) {
  if (flags.json) return print(JSON.stringify(issued));
  console.log(
    `token  ${issued.token}\nid     ${issued.id}\nname   ${issued.name}\nrole   ${issued.role}`,
  );
  console.error("Keep the token secret: it is shown only this once.");
  return 0;
}

async function clientOf(flags: CliFlags): Promise<RunClient> {
  const servers = commaList(flags.server)
    .map((server) => /^https?:\/\//.test(server) ? server : `http://${server}`);
  if (servers.length === 0) throw new UsageError("Expected --server URL");
  const credentials = await apiCredentials(flags);
  if (credentials.token && servers.some(sendsTokenInClear)) {
    console.error(
      "warning: sending the API token over plain http to another host; " +
        "serve the API with TLS (--http-tls-cert) and use https://",
    );
  }
  return new RunClient(servers, credentials);
}

/** The HTTP API's certificate and key: its own flags, else the gRPC ones. */
async function httpTlsOf(flags: CliFlags): Promise<{ cert: string; key: string } | undefined> {
  const own = flags["http-tls-cert"] !== undefined || flags["http-tls-key"] !== undefined;
  const [certFlag, keyFlag] = own ? ["http-tls-cert", "http-tls-key"] as const : [
    "tls-cert",
    "tls-key",
  ] as const;
  const cert = flags[certFlag];
  const key = flags[keyFlag];
  if (cert === undefined && key === undefined) return undefined;
  if (cert === undefined || key === undefined) {
    throw new UsageError(`Expected both --${certFlag} and --${keyFlag}`);
  }
  const read = async (path: string, flag: string) => {
    try {
      return await Deno.readTextFile(path);
    } catch (error) {
      throw new UsageError(
        `Expected a readable PEM file for --${flag} at ${path}: ${(error as Error).message}`,
      );
    }
  };
  return { cert: await read(cert, certFlag), key: await read(key, keyFlag) };
}

/** The admin token in an operator's file (never printed), warning if others can read it. */
async function adminTokenOf(path: string): Promise<string> {
  let text: string;
  try {
    const { mode } = await Deno.stat(path);
    if (mode !== null && (mode & 0o077) !== 0) {
      console.error(
        `warning: --admin-token-file ${path} can be read by other users (mode ${
          (mode & 0o777).toString(8)
        }); run "chmod 600 ${path}"`,
      );
    }
    text = await Deno.readTextFile(path);
  } catch (error) {
    throw new UsageError(
      `Expected a readable file for --admin-token-file at ${path}: ${(error as Error).message}`,
    );
  }
  try {
    return checkAdminToken(text);
  } catch (error) {
    if (error instanceof AdminTokenError) {
      throw new UsageError(`--admin-token-file ${path}: ${error.message}`);
    }
    throw error;
  }
}

async function openArtifacts(flags: CliFlags, stateDir: string): Promise<ArtifactStore> {
  if (flags["s3-endpoint"] || flags["s3-bucket"]) {
    if (!flags["s3-endpoint"] || !flags["s3-bucket"]) {
      throw new UsageError("Expected both --s3-endpoint and --s3-bucket");
    }
    const accessKey = Deno.env.get("AWS_ACCESS_KEY_ID");
    const secretKey = Deno.env.get("AWS_SECRET_ACCESS_KEY");
    if (!accessKey || !secretKey) {
      throw new UsageError(
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

function serverTls(flags: CliFlags) {
  if (!flags["tls-cert"] && !flags["tls-key"]) return undefined;
  if (!flags["tls-cert"] || !flags["tls-key"]) {
    throw new UsageError("Expected both --tls-cert and --tls-key");
  }
  return serverCredentials({ ca: flags["tls-ca"], cert: flags["tls-cert"], key: flags["tls-key"] });
}

function joinToken(flags: CliFlags): string {
  const token = flags.token ?? Deno.env.get("RUNNEL_TOKEN");
  if (!token) {
    throw new UsageError(
      "Expected a join token: --token T or RUNNEL_TOKEN in the environment",
    );
  }
  return token;
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
