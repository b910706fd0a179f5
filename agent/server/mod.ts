/**
 * `runnel server`: one member of the control plane. Every server serves
 * the HTTP API and the agents' gRPC streams; the one that wins the election
 * also runs the scheduler, fenced by its leadership, until it loses it.
 *
 * @module
 */

import type { SmtpSettings } from "../effects.ts";
import type { PipelineLimits } from "../../core/limits.ts";
import type { ArtifactStore } from "../../core/artifacts/store.ts";
import type { Compare, Store } from "../../consensus/store.ts";
import { type AgentServiceServer, serveAgentService } from "../../proto/mod.ts";
import type { ServerCredentials } from "npm:@grpc/grpc-js@1.14.7";
import { createApiHandler } from "./http_api.ts";
import { PipelineParser } from "./parse_worker.ts";
import { runSchedules } from "./schedules.ts";
import { planRegistered } from "./trigger.ts";
import { createGateway, DEFAULT_HEARTBEAT_MS } from "./gateway.ts";
import { type RaftState, ServerMetrics } from "./metrics.ts";
import { type ResultSink, runScheduler, type SchedulerEvent } from "./scheduler.ts";
import { listWorkers } from "./runs.ts";
import { abortableDelay } from "../../core/_async.ts";
import { type SecretSource, SecretStore } from "../../core/secrets.ts";
import { closeBootstrap, createAuthenticator } from "./auth.ts";
import { WebhookAllowList } from "../effects.ts";
import type { Tracer } from "../trace/exporter.ts";
import type { BundleStorage } from "../bundle.ts";
import { type MaintenanceSettings, runMaintenance } from "./maintenance.ts";

/** A won election: the fence to put in every write, and the signal of its loss. */
export interface Leadership {
  /** Compares that hold only while this leadership lasts. */
  fence: Compare[];
  /** Aborts when the leadership is lost (lease expired, resigned, deposed). */
  lost: AbortSignal;
  /** Gives the leadership up. */
  resign(): Promise<void>;
}

/** Chooses the one server that runs the scheduler. */
export interface LeaderElection {
  /** Resolves once `candidate` leads; rejects if `signal` aborts first. */
  campaign(candidate: string, signal: AbortSignal): Promise<Leadership>;
  /** The current leader's id, if any. */
  leader(): Promise<string | undefined>;
}

/**
 * The election of a server that is alone (the embedded store is one
 * process's): it leads at once, for as long as it runs. A cluster uses
 * etcd's election instead.
 */
export function standaloneElection(): LeaderElection {
  let leader: string | undefined;
  return {
    campaign(candidate, signal) {
      if (signal.aborted) return Promise.reject(signal.reason);
      if (leader !== undefined && leader !== candidate) {
        return Promise.reject(
          new Error(`Expected one server on an embedded store; ${leader} leads`),
        );
      }
      leader = candidate;
      const lost = new AbortController();
      return Promise.resolve({
        fence: [],
        lost: lost.signal,
        resign: () => {
          leader = undefined;
          lost.abort();
          return Promise.resolve();
        },
      });
    },
    leader: () => Promise.resolve(leader),
  };
}

/** Options of {@link startServer}. */
export interface ServerOptions {
  /** This server's id (in `/cluster-state`, logs, election). */
  serverId: string;
  store: Store;
  election: LeaderElection;
  /** The Raft status of the store member (etcd); standalone for the embedded store. */
  raftState?: () => Promise<RaftState>;
  /** Where the HTTP API listens; with `tls` (PEM texts) it serves HTTPS only. */
  http: { hostname: string; port: number; tls?: { cert: string; key: string } };
  /** Where the agents' gRPC service listens (`host:port`). */
  grpc: { address: string; credentials?: ServerCredentials };
  /** The cluster's join token. */
  token: string;
  /** Heartbeat interval of agents (default 5 s; offline after 3 missed). */
  heartbeatMs?: number;
  /** gRPC addresses of every server, handed to agents for failover. */
  peers?: string[];
  /**
   * The secrets this server's operator declares (`--secrets FILE`): name →
   * env var or file of this process. Submitted pipelines may name these (or
   * those a connected agent declares) and nothing else; the values are read
   * when an assignment is pushed to its agent, and never stored.
   */
  secrets?: Record<string, SecretSource>;
  /** Where the env vars of `secrets` are read (default: this process's env). */
  env?: (name: string) => string | undefined;
  /** Structured log line (default: JSON to stderr). */
  log?: (fields: Record<string, unknown>) => void;
  /** How long step logs stay in the store (default 14 days, as artifacts). */
  logRetentionMs?: number;
  /**
   * A token the API accepts as admin besides the stored ones (the content of
   * `--admin-token-file`, at least 24 characters). Giving one closes the
   * one-time bootstrap for the whole cluster: with an admin at hand, an open
   * bootstrap is only a race an attacker could win.
   */
  adminToken?: string;
  /** Whether `/metrics` answers without a token (default: it needs the read role). */
  metricsPublic?: boolean;
  /**
   * Hosts `on-failure` webhooks may reach: `host` (its scheme's default
   * port), `host:port` or `*.domain`. Default none: a pipeline naming a
   * webhook is refused at submit.
   */
  webhookAllow?: string[];
  /** The SMTP server email alerts go through (`--smtp HOST:PORT --smtp-from ADDR`). */
  smtp?: SmtpSettings;
  /** Limits on what a submitted pipeline may expand to (default: the defaults). */
  pipelineLimits?: Partial<PipelineLimits>;
  /**
   * Where the scheduler records the spans of runs (`--otlp-endpoint`); the
   * caller shuts it down after the server closed.
   */
  tracer?: Tracer;
  /**
   * The artifact store the agents share: the web UI's downloads read it, and
   * shipped pipeline directories are kept in it. Without one they are kept
   * in the state store, within `bundleBudgetBytes`.
   */
  artifacts?: ArtifactStore;
  /** Bundle bytes the state store may keep without an artifact store (default 256 MiB). */
  bundleBudgetBytes?: number;
  /** Retention, compaction and defragmentation of the store (`maintenance.ts`). */
  maintenance?: MaintenanceSettings;
}

/** A running server. */
export interface RunningServer {
  serverId: string;
  httpPort: number;
  grpcPort: number;
  /** True while this server runs the scheduler. */
  readonly leading: boolean;
  metrics: ServerMetrics;
  /** Stops serving; the scheduler (if here) stops and its leadership is resigned. */
  close(): Promise<void>;
}

/** Which of a server's two listeners an address belongs to. */
export type ServerListener = "http" | "grpc";

/**
 * A listener of the server could not bind its address: taken by another
 * process (`code` `address_in_use`) or refused by the system (`listen_failed`).
 */
export class ServerListenError extends Error {
  /** `address_in_use` or `listen_failed`. */
  readonly code: "address_in_use" | "listen_failed";
  /** The HTTP API's listener or the agents' gRPC one. */
  readonly listener: ServerListener;
  /** The address as given (`host:port`). */
  readonly address: string;

  /** Builds the error from the listener, its address and the system's refusal. */
  constructor(listener: ServerListener, address: string, cause: unknown) {
    const detail = cause instanceof Error ? cause.message : String(cause);
    const inUse = cause instanceof Deno.errors.AddrInUse || /EADDRINUSE/.test(detail);
    const what = listener === "http" ? "the HTTP API" : "the agents' gRPC service";
    super(
      inUse
        ? `${address} is already in use: ${what} cannot listen there`
        : `${what} cannot listen on ${address}: ${detail}`,
      { cause },
    );
    this.name = "ServerListenError";
    this.code = inUse ? "address_in_use" : "listen_failed";
    this.listener = listener;
    this.address = address;
  }
}

/**
 * Starts a server; resolves once both listeners are bound. An address that
 * cannot be bound rejects with a {@link ServerListenError}, and neither
 * listener is left open.
 */
export async function startServer(options: ServerOptions): Promise<RunningServer> {
  const log = options.log ?? jsonLog;
  // Bad settings fail before anything listens.
  const auth = createAuthenticator(options.store, { adminToken: options.adminToken });
  const webhookAllow = new WebhookAllowList(options.webhookAllow ?? []);
  const metrics = new ServerMetrics();
  const heartbeatMs = options.heartbeatMs ?? DEFAULT_HEARTBEAT_MS;
  const store = timedStore(options.store, (ms) => metrics.observeWrite(ms));
  const raftState = options.raftState ?? (async (): Promise<RaftState> => ({
    node_id: options.serverId,
    state: "standalone",
    leader: options.serverId,
    term: 1,
    commit_index: await store.revision(),
  }));
  const secrets = new SecretStore(options.secrets, { env: options.env });
  const parser = new PipelineParser();
  const bundles: BundleStorage = {
    artifacts: options.artifacts,
    budgetBytes: options.bundleBudgetBytes,
  };
  const secretNames = async () => [
    ...secrets.names,
    ...(await listWorkers(store)).flatMap((worker) => worker.secrets ?? []),
  ];
  // Set while this server schedules: its agents' results go straight to the scheduler.
  let resultSink: ResultSink | undefined;
  const gateway = createGateway({
    resultSink: () => resultSink,
    serverId: options.serverId,
    store,
    secrets,
    token: options.token,
    heartbeatMs,
    servers: () => options.peers ?? [],
    log,
    logRetentionMs: options.logRetentionMs,
    onRefused: (what) => metrics.onAgentRefused(what),
    bundles,
  });
  let grpc: AgentServiceServer;
  try {
    grpc = await serveAgentService({
      address: options.grpc.address,
      credentials: options.grpc.credentials,
      onConnect: (stream) => gateway.onConnect(stream),
    });
  } catch (error) {
    throw new ServerListenError("grpc", options.grpc.address, error);
  }
  const closing = new AbortController();
  let http: Deno.HttpServer<Deno.NetAddr>;
  try {
    http = Deno.serve(
      {
        hostname: options.http.hostname,
        port: options.http.port,
        ...(options.http.tls ?? {}),
        onListen: () => {},
      },
      createApiHandler({
        serverId: options.serverId,
        store,
        metrics,
        raftState,
        schedulerLeader: () => options.election.leader(),
        heartbeatMs,
        secretNames,
        auth,
        metricsPublic: options.metricsPublic ?? false,
        bootstrapOpen: options.adminToken === undefined,
        webhookAllow,
        log,
        pipelineLimits: options.pipelineLimits,
        artifacts: options.artifacts,
        closing: closing.signal,
        parser,
        bundles,
        readSecret: (name) => {
          try {
            return secrets.has(name) ? secrets.read(name) : undefined;
          } catch {
            return undefined; // declared, but its env var or file is gone
          }
        },
      }),
    );
  } catch (error) {
    await grpc.close();
    throw new ServerListenError(
      "http",
      `${options.http.hostname}:${options.http.port}`,
      error,
    );
  }

  const bootstrapClosed = options.adminToken === undefined
    ? Promise.resolve()
    : closeBootstrapWhenReachable(store, options.serverId, closing.signal, log);
  let leading = false;
  const schedulerLoop = (async () => {
    while (!closing.signal.aborted) {
      let leadership: Leadership;
      try {
        leadership = await options.election.campaign(options.serverId, closing.signal);
      } catch (error) {
        if (closing.signal.aborted) return;
        log({ level: "warn", msg: "campaign failed; retrying", error: String(error) });
        await abortableDelay(1_000, closing.signal);
        continue;
      }
      leading = true;
      metrics.setLeader(true);
      log({ msg: "elected: running the scheduler", server: options.serverId });
      const stop = AbortSignal.any([leadership.lost, closing.signal]);
      // Schedules fire under the same fence as the scheduler's writes, and stop with it.
      const schedulesStop = new AbortController();
      const schedules = runSchedules({
        store,
        fence: leadership.fence,
        signal: AbortSignal.any([stop, schedulesStop.signal]),
        plan: async (name, params) => {
          const planned = await planRegistered(
            { store, parser, secretNames, limits: options.pipelineLimits, bundles },
            name,
            { params },
          );
          return {
            plan: planned.plan,
            file: planned.version.file,
            bundle: planned.bundle,
            version: planned.version.version,
          };
        },
        onEvent: (event) =>
          log({ component: "schedules", msg: `schedule ${event.type}`, ...event }),
      }).catch((error) => log({ level: "warn", msg: "schedules stopped", error: String(error) }));
      // Retention, compaction and defragmentation: one server does them, under the same fence.
      const maintenance = runMaintenance(
        { store, fence: leadership.fence, settings: options.maintenance, bundles, log },
        AbortSignal.any([stop, schedulesStop.signal]),
      );
      try {
        await runScheduler({
          store,
          fence: leadership.fence,
          signal: stop,
          onResultSink: (sink) => resultSink = sink,
          webhookAllow,
          ...(options.smtp ? { smtp: options.smtp } : {}),
          ...(options.tracer ? { tracer: options.tracer } : {}),
          bundles,
          onEvent: (event: SchedulerEvent) => {
            metrics.onSchedulerEvent(event);
            if (event.type === "worker-lost") {
              log({ msg: "worker lost", agent: event.agentId, attempts: event.attempts });
            }
            if (event.type === "webhook" && !event.ok) {
              log({
                level: "warn",
                msg: "on-failure webhook not delivered",
                runId: event.runId,
                stepId: event.stepId,
                detail: event.detail,
              });
            }
          },
          log,
        });
      } catch (error) {
        log({ level: "warn", msg: "scheduler stopped", error: String(error) });
      } finally {
        schedulesStop.abort();
        await schedules;
        await maintenance;
        leading = false;
        metrics.setLeader(false);
        await leadership.resign().catch(() => {});
      }
      if (!closing.signal.aborted) {
        log({ msg: "no longer the scheduler", server: options.serverId });
      }
    }
  })();

  // Keep the worker gauge fresh even when nobody scrapes `/cluster-state`.
  const gauges = setInterval(() => {
    listWorkers(store).then((workers) => metrics.setWorkers(workers.length), () => {});
    raftState().then((state) => metrics.observeRaft(state), () => {});
  }, heartbeatMs);
  Deno.unrefTimer(gauges);

  log({
    msg: "server started",
    server: options.serverId,
    http: http.addr.port,
    https: options.http.tls !== undefined,
    grpc: grpc.port,
    metricsPublic: options.metricsPublic ?? false,
    webhookAllow: webhookAllow.describe(),
  });
  return {
    serverId: options.serverId,
    httpPort: http.addr.port,
    grpcPort: grpc.port,
    get leading() {
      return leading;
    },
    metrics,
    async close() {
      closing.abort();
      clearInterval(gauges);
      await bootstrapClosed;
      await schedulerLoop;
      await grpc.close();
      await gateway.close();
      await http.shutdown();
      parser.close();
    },
  };
}

/**
 * Closes the ACL bootstrap, retrying while the store does not answer: until
 * it does, no bootstrap can succeed either.
 */
async function closeBootstrapWhenReachable(
  store: Store,
  serverId: string,
  signal: AbortSignal,
  log: (fields: Record<string, unknown>) => void,
): Promise<void> {
  for (let warned = false; !signal.aborted; warned = true) {
    try {
      await closeBootstrap(store, { serverId });
      return;
    } catch (error) {
      if (!warned) {
        log({ level: "warn", msg: "cannot close the ACL bootstrap yet", error: String(error) });
      }
      await abortableDelay(1_000, signal);
    }
  }
}

/** A store whose writes are timed (the `raft_replication_latency_ms` histogram). */
function timedStore(store: Store, observe: (ms: number) => void): Store {
  const timedTxn: Store["txn"] = async (request) => {
    const started = performance.now();
    const result = await store.txn(request);
    observe(performance.now() - started);
    return result;
  };
  const timedPut: Store["put"] = async (key, value, options) => {
    const started = performance.now();
    const revision = await store.put(key, value, options);
    observe(performance.now() - started);
    return revision;
  };
  // Engines keep their state in private fields: every other method is bound to the engine.
  return new Proxy(store, {
    get(target, property) {
      if (property === "txn") return timedTxn;
      if (property === "put") return timedPut;
      const value = Reflect.get(target, property, target);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
}

/**
 * One JSON object per line on stderr: the structured log of a server or
 * agent. Written straight to the file descriptor: an agent logs a few lines
 * per step, and `console.error` costs twice as much for the same bytes. A
 * write that fails (a reader gone: a broken pipe) goes through
 * `console.error`, which drops what nobody reads instead of throwing.
 */
export function jsonLog(fields: Record<string, unknown>): void {
  const line = JSON.stringify({ time: new Date().toISOString(), level: "info", ...fields });
  if (stderrFailed) return console.error(line);
  const bytes = LINE_ENCODER.encode(`${line}\n`);
  let at = 0;
  try {
    while (at < bytes.length) at += Deno.stderr.writeSync(bytes.subarray(at));
  } catch {
    stderrFailed = true;
    if (at === 0) console.error(line);
  }
}

const LINE_ENCODER = new TextEncoder();
/** A write to stderr failed: later lines take `console.error`'s way. */
let stderrFailed = false;
