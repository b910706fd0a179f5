/**
 * The worker agent of cluster mode (`runnel agent`).
 *
 * An agent keeps one gRPC stream to a server (`proto/`): it says Hello with
 * its join token, labels, capabilities (the fingerprint of each backend of
 * its plugin host pool) and the attempts it still holds; it heartbeats,
 * runs the attempts it is assigned in sandboxed plugin hosts, streams their
 * masked logs, puts their outputs into the artifact store and reports each
 * result until the server acknowledges it.
 *
 * Three promises hold whatever happens to the stream:
 * - **Results are never dropped.** A result is written to a durable outbox
 *   (`<stateDir>/outbox/`) before it is sent, and resent after every
 *   reconnect (and restart) until a `ResultAck` arrives. The server dedups
 *   by attempt id, so from its side each result arrives once.
 * - **Nothing else is sent twice.** A log chunk handed to a stream that
 *   breaks is not resent (its tail may be lost); chunks produced while no
 *   server is connected wait in a bounded backlog.
 * - **A restart reconciles.** Each attempt is recorded (`<stateDir>/attempts/`)
 *   before it starts. On startup, before Hello, the backends are asked to
 *   `recover` them: re-attached ones go on (logs, result), the rest of what
 *   the old process left is reaped. Hello then lists the re-attached ones as
 *   running and the unacknowledged results as pending.
 *
 * When the stream breaks, running attempts go on; the agent reconnects to
 * the next server in its list (round robin, capped exponential backoff with
 * jitter) and says Hello again.
 *
 * @module
 */

import { DEFAULT_RETENTION_MS } from "../../core/artifacts/store.ts";
import { bundleDir, BundleError, type PipelineBundle, unpackBundle } from "../bundle.ts";
import { retryDelay } from "../../core/backoff.ts";
import type { ArtifactStore } from "../../core/artifacts/store.ts";
import type { AttemptResult as ModelResult, ErrorClass } from "../../core/model.ts";
import { Masker } from "../../core/secrets.ts";
import { builtinPlugins, PluginHostPool, type PluginSource } from "../../backends/mod.ts";
import {
  type AttemptSpec,
  DEFAULT_CANCEL_GRACE_MS,
  type Execution,
} from "../../backends/backend.ts";
import {
  type AgentMessageInit,
  type AssignmentSpec,
  type Capability,
  type ClientCredentials,
  openAgentStream,
  type Reject,
  type ServerConnection,
  type Welcome,
} from "../../proto/mod.ts";
import type * as wire from "../../proto/mod.ts";
import type { HostTuning } from "../config.ts";
import {
  collectOutputs,
  errorClassOf,
  failureOf,
  fileSafe,
  maskedLogs,
  materializeInputs,
} from "../attempt/io.ts";

/** Where an agent keeps its state when none is named. */
export const DEFAULT_AGENT_STATE_DIR = ".runnel/agent";
/** The seed's heartbeat period, used until a server's Welcome sets its own. */
export const DEFAULT_AGENT_HEARTBEAT_MS = 5_000;
/** Attempts an agent runs at once unless told otherwise. */
export const DEFAULT_AGENT_SLOTS = 2;
/** First reconnect delay; it doubles per failed try up to {@link DEFAULT_RECONNECT_MAX_MS}. */
export const DEFAULT_RECONNECT_INITIAL_MS = 250;
/** Longest reconnect delay. */
export const DEFAULT_RECONNECT_MAX_MS = 10_000;
/** How long a server may take to answer Hello before the agent tries another. */
export const DEFAULT_HELLO_TIMEOUT_MS = 10_000;
/**
 * Log text kept while no server is connected. Past it, output is dropped
 * (with a marker line): an agent cut off for long must not exhaust memory.
 */
const MAX_LOG_BACKLOG_CHARS = 4 * 1024 * 1024;
/** Fingerprints are taken again for a Hello when older than this (Docker may have come up). */
const CAPABILITY_TTL_MS = 60_000;
/** Longest a stopping agent waits for the acknowledgement of its last results. */
const STOP_ACK_WAIT_MS = 5_000;
/** Longest a stopping agent waits for the server to end the stream after it ended its side. */
const STOP_CLOSE_GRACE_MS = 2_000;
/** Events kept in {@link RunningAgent.events}. */
const EVENT_HISTORY = 1_000;

/** Options of {@link startAgent}; `runnel agent` flags in brackets. */
export interface AgentOptions {
  /** gRPC addresses (`host:port`) of the servers, tried in order, round robin [`--server`]. */
  servers: string[];
  /** The cluster's join token [`--token`]. */
  token: string;
  /** Agent id; default: `<hostname>-<random>`, made once and kept in `<stateDir>/agent.json`. */
  agentId?: string;
  /** Labels the scheduler matches step selectors against, e.g. `{cloud: "gcp"}` [`--labels`]. */
  labels?: Record<string, string>;
  /** Attempts run at once (default {@link DEFAULT_AGENT_SLOTS}) [`--slots`]. */
  slots?: number;
  /**
   * Agent state: `agent.json`, `attempts/`, `outbox/`, plugin host entry
   * files (`hosts/`) and the scratch root `work/` (default
   * {@link DEFAULT_AGENT_STATE_DIR}).
   */
  stateDir?: string;
  /** Where inputs are fetched from and outputs put (local or S3; the caller opens it). */
  artifacts: ArtifactStore;
  /** Third-party backends, besides the built-in ones (`--config`, `--plugin`). */
  plugins?: PluginSource[];
  /** Plugin host tuning (idle time, heartbeats). */
  hosts?: HostTuning;
  /** TLS towards the servers ({@link clientCredentials}) [`--tls-ca`, `--tls-cert`, `--tls-key`]. */
  credentials?: ClientCredentials;
  /**
   * Runs `shell` steps, which are trusted and unsandboxed: off on agents
   * unless asked for; otherwise shell is advertised as unavailable and its
   * assignments are refused [`--allow-shell`].
   */
  allowShell?: boolean;
  /** Structured log sink; default: one JSON line per entry on stderr. */
  log?: (fields: Record<string, unknown>) => void;
  /** Heartbeat period until a server's Welcome sets one (default {@link DEFAULT_AGENT_HEARTBEAT_MS}). */
  heartbeatMs?: number;
  /** Reconnect backoff: first delay and cap, in ms. */
  reconnect?: { initialMs?: number; maxMs?: number };
  /** How long a server may take to answer Hello (default {@link DEFAULT_HELLO_TIMEOUT_MS}). */
  helloTimeoutMs?: number;
  /** Grace of a cancelled attempt before it is killed (default {@link DEFAULT_CANCEL_GRACE_MS}). */
  cancelGraceMs?: number;
  /** gRPC keepalive ping period (see `proto/mod.ts`). */
  keepaliveMs?: number;
  /** runnel's version, sent in Hello. */
  version?: string;
  /** Scratch directories of runs untouched this long are removed at start (default 14 days). */
  scratchRetentionMs?: number;
}

/** Something the agent did, as its structured log and {@link RunningAgent.events} tell it. */
export type AgentEvent =
  | { type: "connected"; server: string; serverId: string; heartbeatMs: number }
  | { type: "rejected"; server: string; code: string; message: string }
  | { type: "connect_failed"; server: string; reason: string }
  | { type: "disconnected"; server: string; reason: string }
  | { type: "reconnecting"; server: string; afterMs: number }
  | { type: "assignment"; attemptId: string; backend: string }
  | { type: "refused"; attemptId: string; reason: string }
  | { type: "started"; attemptId: string; handle: string }
  | { type: "cancel"; attemptId: string; reason: string; known: boolean }
  | { type: "finished"; attemptId: string; ok: boolean; errorClass?: ErrorClass }
  | { type: "acked"; attemptId: string; accepted: boolean; message: string }
  | { type: "recovered"; attemptId: string }
  | { type: "lost"; attemptId: string; reason: string }
  | { type: "diagnostic"; backend: string; text: string }
  | { type: "stopped" };

const EVENT_MESSAGES: Record<AgentEvent["type"], string> = {
  connected: "connected",
  rejected: "rejected",
  connect_failed: "connection failed",
  disconnected: "disconnected",
  reconnecting: "reconnecting",
  assignment: "assignment received",
  refused: "assignment refused",
  started: "attempt started",
  cancel: "cancel received",
  finished: "attempt finished",
  acked: "result acked",
  recovered: "attempt re-attached after a restart",
  lost: "attempt lost in a restart",
  diagnostic: "plugin host diagnostic",
  stopped: "stopped",
};

const EVENT_LEVELS: Partial<Record<AgentEvent["type"], "warn" | "error">> = {
  rejected: "error",
  connect_failed: "warn",
  disconnected: "warn",
  refused: "warn",
  lost: "warn",
  diagnostic: "warn",
};

/** A started agent. */
export interface RunningAgent {
  /** Its id, as servers know it. */
  readonly agentId: string;
  /** Whether a server has welcomed it on the current stream. */
  readonly connected: boolean;
  /** The server of the current stream, when connected. */
  readonly server: string | undefined;
  /** Attempts running now. */
  readonly running: string[];
  /** Attempts whose results await a server's acknowledgement. */
  readonly pendingResults: string[];
  /** The latest events, oldest first (for tests and diagnostics). */
  readonly events: readonly AgentEvent[];
  /** Calls `listener` for every event from now on; returns the unsubscribe function. */
  on(listener: (event: AgentEvent) => void): () => void;
  /**
   * Settles when the agent has stopped: resolves after {@link stop}, rejects
   * with {@link AgentRejectedError} when a server refused its token.
   */
  readonly done: Promise<void>;
  /**
   * Stops the agent. With `drain`, it takes no new work (heartbeats say so),
   * lets its attempts finish and waits for their results to be acknowledged;
   * without, it cancels its attempts (reported as `infrastructure`, so they
   * are retried elsewhere). Resolves once it has stopped.
   */
  stop(options?: { drain?: boolean }): Promise<void>;
}

/** A server refused the agent's join token; the agent stops instead of retrying. */
export class AgentRejectedError extends Error {
  /** Stable error code. */
  readonly code = "agent_rejected";
  /** The server's reason code (`bad_token`). */
  readonly reason: string;
  /** The server that refused. */
  readonly server: string;

  /** Builds the error from the server's address and its Reject. */
  constructor(server: string, reject: Pick<Reject, "code" | "message">) {
    super(`Server ${server} refused this agent: ${reject.message || reject.code}`);
    this.name = "AgentRejectedError";
    this.reason = reject.code;
    this.server = server;
  }
}

/** Options an agent cannot start with. */
export class AgentOptionsError extends Error {
  /** Stable error code. */
  readonly code = "bad_agent_options";

  /** Builds the error from a full sentence. */
  constructor(message: string) {
    super(message);
    this.name = "AgentOptionsError";
  }
}

/** Paths under an agent's state directory. */
export interface AgentPaths {
  root: string;
  /** `{agentId}`. */
  identity: string;
  /** One JSON file per attempt in flight (its assignment and handle). */
  attempts: string;
  /** One JSON file per result not yet acknowledged. */
  outbox: string;
  /** Plugin host entry files. */
  hosts: string;
  /** The scratch root: `<run>/<step>/<attempt>/{in,out}`. */
  work: string;
}

/** The layout of an agent's state directory. */
export function agentPaths(stateDir: string = DEFAULT_AGENT_STATE_DIR): AgentPaths {
  return {
    root: stateDir,
    identity: `${stateDir}/agent.json`,
    attempts: `${stateDir}/attempts`,
    outbox: `${stateDir}/outbox`,
    hosts: `${stateDir}/hosts`,
    work: `${stateDir}/work`,
  };
}

/**
 * The agent's id: the one saved in `<stateDir>/agent.json`, or a new
 * `<hostname>-<6 hex>` saved there. A stable id lets a restarted agent find
 * what it left (Docker labels its containers with it).
 *
 * @example
 * ```ts ignore
 * import { loadAgentId } from "./mod.ts";
 * const id = await loadAgentId(".runnel/agent");
 * ```
 */
export async function loadAgentId(stateDir: string = DEFAULT_AGENT_STATE_DIR): Promise<string> {
  const paths = agentPaths(stateDir);
  try {
    const saved = JSON.parse(await Deno.readTextFile(paths.identity)) as { agentId?: unknown };
    if (typeof saved.agentId === "string" && saved.agentId) return saved.agentId;
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound) && !(error instanceof SyntaxError)) throw error;
  }
  let host = "agent";
  try {
    host = Deno.hostname().toLowerCase().replace(/[^a-z0-9-]+/g, "-").replace(/^-+|-+$/g, "") ||
      host;
  } catch {
    // Without --allow-sys=hostname the id is still unique, just less telling.
  }
  const random = [...crypto.getRandomValues(new Uint8Array(3))]
    .map((byte) => byte.toString(16).padStart(2, "0")).join("");
  const agentId = `${host}-${random}`;
  await Deno.mkdir(paths.root, { recursive: true });
  await writeJsonAtomic(paths.identity, { agentId });
  return agentId;
}

/** A result waiting for its acknowledgement, as the outbox keeps it. */
export interface OutboxEntry {
  attemptId: string;
  /** core/model.ts `AttemptResult` as JSON. */
  resultJson: string;
  atMs: number;
}

/**
 * The durable outbox of results: one file per result, written before it is
 * sent and removed when the server acknowledges it.
 */
export class Outbox {
  readonly #dir: string;
  readonly #entries = new Map<string, OutboxEntry>();

  /** An outbox in `dir`; call {@link load} before use. */
  constructor(dir: string) {
    this.#dir = dir;
  }

  /** Reads what an earlier process left; unreadable files are skipped. */
  async load(): Promise<OutboxEntry[]> {
    await Deno.mkdir(this.#dir, { recursive: true });
    for await (const file of Deno.readDir(this.#dir)) {
      if (!file.isFile || !file.name.endsWith(".json")) continue;
      try {
        const entry = JSON.parse(await Deno.readTextFile(`${this.#dir}/${file.name}`));
        if (typeof entry?.attemptId === "string" && typeof entry.resultJson === "string") {
          this.#entries.set(entry.attemptId, entry);
        }
      } catch {
        // A torn write cannot happen (writes are atomic); anything else is not ours.
      }
    }
    return this.entries();
  }

  /** Records a result durably. */
  async add(entry: OutboxEntry): Promise<void> {
    await writeJsonAtomic(this.#path(entry.attemptId), entry);
    this.#entries.set(entry.attemptId, entry);
  }

  /** Forgets an acknowledged result; false when it was not there. */
  async remove(attemptId: string): Promise<boolean> {
    if (!this.#entries.delete(attemptId)) return false;
    await Deno.remove(this.#path(attemptId)).catch(ignoreNotFound);
    return true;
  }

  /** Whether a result for the attempt waits. */
  has(attemptId: string): boolean {
    return this.#entries.has(attemptId);
  }

  /** The results waiting, oldest first. */
  entries(): OutboxEntry[] {
    return [...this.#entries.values()].sort((a, b) => a.atMs - b.atMs);
  }

  #path(attemptId: string): string {
    return `${this.#dir}/${fileSafe(attemptId)}.json`;
  }
}

/** An attempt in flight as `<stateDir>/attempts/<id>.json` records it. */
interface AttemptRecordFile {
  attemptId: string;
  backend: string;
  /** The spec as started (paths on this agent); holds secret values, so the file is 0600. */
  spec: AttemptSpec;
  mask: string[];
  handle?: string;
  /**
   * When the handle is a process id: when that process started (epoch ms), so that a
   * restart never signals a process that merely reuses the pid.
   */
  processStartMs?: number;
  assignedAt: number;
}

/** One attempt this agent runs. */
interface ActiveAttempt {
  record: AttemptRecordFile;
  masker: Masker;
  execution?: Execution;
  /** Set once a stop was asked for: by the server (cancel) or by the agent stopping. */
  stop?: { by: "server" | "agent"; reason: string };
  done: Promise<void>;
}

/**
 * Starts an agent: loads its id, outbox and in-flight attempts, reconciles
 * what an earlier process left through the backends' `recover`, then
 * connects. Resolves once a server welcomed it, or once every server was
 * tried without an answer (it keeps trying in the background); rejects with
 * {@link AgentRejectedError} when a server refuses its join token.
 *
 * @example
 * ```ts ignore
 * import { startAgent } from "./mod.ts";
 * import { openLocalArtifactStore } from "../../core/artifacts/local.ts";
 * const agent = await startAgent({
 *   servers: ["127.0.0.1:7070"],
 *   token: Deno.env.get("RUNNEL_TOKEN")!,
 *   labels: { cloud: "gcp", region: "us-east1" },
 *   artifacts: openLocalArtifactStore(".runnel/artifacts"),
 * });
 * Deno.addSignalListener("SIGTERM", () => agent.stop({ drain: true }));
 * await agent.done;
 * ```
 */
export async function startAgent(options: AgentOptions): Promise<RunningAgent> {
  if (options.servers.length === 0) {
    throw new AgentOptionsError("Expected at least one server address (--server host:port)");
  }
  const slots = options.slots ?? DEFAULT_AGENT_SLOTS;
  if (!Number.isInteger(slots) || slots < 1) {
    throw new AgentOptionsError(`Expected a whole number of slots of 1 or more, got ${slots}`);
  }
  const paths = agentPaths(options.stateDir);
  await Deno.mkdir(paths.work, { recursive: true });
  const agentId = options.agentId ?? await loadAgentId(paths.root);
  const scratchRoot = await Deno.realPath(paths.work);
  const agent = new Agent(options, { agentId, paths, scratchRoot, slots });
  // Failed attempts' scratch directories are kept for inspection, not forever.
  sweepScratch(scratchRoot, options.scratchRetentionMs ?? DEFAULT_RETENTION_MS).catch(() => {});
  try {
    await agent.reconcile();
  } catch (error) {
    await agent.stop();
    throw error;
  }
  return await agent.connect();
}

interface AgentContext {
  agentId: string;
  paths: AgentPaths;
  scratchRoot: string;
  slots: number;
}

class Agent implements RunningAgent {
  readonly agentId: string;
  readonly done: Promise<void>;
  readonly #options: AgentOptions;
  readonly #paths: AgentPaths;
  /** Pipeline bundles unpacked (or being unpacked) by this agent, by digest. */
  readonly #bundles = new Map<string, Promise<string>>();
  readonly #scratchRoot: string;
  readonly #slots: number;
  readonly #pool: PluginHostPool;
  readonly #servers: string[];
  readonly #outbox: Outbox;
  readonly #active = new Map<string, ActiveAttempt>();
  readonly #events: AgentEvent[] = [];
  readonly #listeners = new Set<(event: AgentEvent) => void>();
  readonly #log: (fields: Record<string, unknown>) => void;
  /** What waits to be sent: started, log and result messages, in order. */
  readonly #queue: AgentMessageInit[] = [];
  #queuedLogChars = 0;
  /** Attempts whose output was dropped during this disconnection (one marker line each). */
  readonly #droppedLogs = new Set<string>();
  #pumping = false;
  #stream: ServerConnection | undefined;
  #server: string | undefined;
  #heartbeatMs: number;
  #heartbeat: ReturnType<typeof setInterval> | undefined;
  #capabilities: { at: number; list: Capability[] } | undefined;
  #draining = false;
  /** A stop that does not wait for running steps (a plain stop, or a second signal). */
  #hurry = false;
  #stopping: Promise<void> | undefined;
  #shutdownDone: Promise<void> | undefined;
  readonly #abort = new AbortController();
  #loop: Promise<void> | undefined;
  #resolveDone!: () => void;
  #rejectDone!: (error: Error) => void;
  /** Settled once the first round of connection tries has an answer. */
  #firstAnswer:
    | { resolve: () => void; reject: (error: Error) => void; settled: boolean }
    | undefined;
  /** Wakes the stop that waits for the outbox to drain. */
  #acked: (() => void) | undefined;

  constructor(options: AgentOptions, context: AgentContext) {
    this.agentId = context.agentId;
    this.#options = options;
    this.#paths = context.paths;
    this.#scratchRoot = context.scratchRoot;
    this.#slots = context.slots;
    this.#pool = new PluginHostPool({
      plugins: [...builtinPlugins(), ...(options.plugins ?? [])],
      context: { scratchRoot: context.scratchRoot, agentId: context.agentId },
      entryDir: context.paths.hosts,
      onDiagnostic: (backend, text) => this.emit({ type: "diagnostic", backend, text }),
      ...options.hosts,
    });
    this.#servers = [...options.servers];
    this.#outbox = new Outbox(context.paths.outbox);
    this.#heartbeatMs = options.heartbeatMs ?? DEFAULT_AGENT_HEARTBEAT_MS;
    this.#log = options.log ?? printJsonLine;
    this.done = new Promise<void>((resolve, reject) => {
      this.#resolveDone = resolve;
      this.#rejectDone = reject;
    });
    // A caller that only awaits `startAgent` must not see an unhandled rejection.
    this.done.catch(() => {});
  }

  get connected(): boolean {
    return this.#stream !== undefined;
  }

  get server(): string | undefined {
    return this.#stream ? this.#server : undefined;
  }

  get running(): string[] {
    return [...this.#active.keys()];
  }

  get pendingResults(): string[] {
    return this.#outbox.entries().map((entry) => entry.attemptId);
  }

  get events(): readonly AgentEvent[] {
    return this.#events;
  }

  on(listener: (event: AgentEvent) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  emit(event: AgentEvent): void {
    this.#events.push(event);
    if (this.#events.length > EVENT_HISTORY) this.#events.shift();
    const { type, ...fields } = event;
    try {
      this.#log({
        time: new Date().toISOString(),
        level: EVENT_LEVELS[type] ?? "info",
        component: "agent",
        agent: this.agentId,
        msg: EVENT_MESSAGES[type],
        ...fields,
      });
    } catch {
      // A broken log sink must not stop the agent.
    }
    for (const listener of this.#listeners) listener(event);
  }

  // -------------------------------------------------------------------------
  // Startup.

  /**
   * Loads the outbox and the attempts an earlier process left, and asks
   * their backends to recover them: re-attached ones are supervised again,
   * the rest are reaped (by the backends) and forgotten here.
   */
  async reconcile(): Promise<void> {
    await this.#outbox.load();
    await Deno.mkdir(this.#paths.attempts, { recursive: true });
    const left: AttemptRecordFile[] = [];
    for await (const file of Deno.readDir(this.#paths.attempts)) {
      if (!file.isFile || !file.name.endsWith(".json")) continue;
      const path = `${this.#paths.attempts}/${file.name}`;
      try {
        const record = JSON.parse(await Deno.readTextFile(path)) as AttemptRecordFile;
        // Finished before the restart: its result is in the outbox.
        if (this.#outbox.has(record.attemptId)) await Deno.remove(path).catch(ignoreNotFound);
        else left.push(record);
      } catch {
        await Deno.remove(path).catch(ignoreNotFound);
      }
    }
    const byBackend = new Map<string, AttemptRecordFile[]>();
    for (const record of left) {
      if (!this.#pool.source(record.backend)) continue;
      byBackend.set(record.backend, [...(byBackend.get(record.backend) ?? []), record]);
    }
    const recovered = new Map<string, Execution>();
    await Promise.all([...byBackend].map(async ([backend, records]) => {
      const keep = records.map((record) => record.attemptId);
      // Handles let the process backends, which cannot find their steps
      // again, kill the process groups the dead agent left.
      const handles: string[] = [];
      for (const record of records) {
        if (await stillOurs(record)) handles.push(record.handle!);
      }
      try {
        const found = await this.#pool.backend(backend).recover({
          agentId: this.agentId,
          keep,
          handles,
        });
        for (const { attemptId, execution } of found) {
          if (keep.includes(attemptId) && !recovered.has(attemptId)) {
            recovered.set(attemptId, execution);
          } else await execution.cleanup().catch(() => {});
        }
      } catch (error) {
        this.emit({ type: "diagnostic", backend, text: `recover failed: ${messageOf(error)}` });
      }
    }));
    for (const record of left) {
      const execution = recovered.get(record.attemptId);
      if (execution) {
        this.emit({ type: "recovered", attemptId: record.attemptId });
        this.#supervise(record, execution);
      } else {
        // The server learns of it from Hello, which does not list it.
        await Deno.remove(this.#recordPath(record.attemptId)).catch(ignoreNotFound);
        this.emit({
          type: "lost",
          attemptId: record.attemptId,
          reason: "its backend could not re-attach to it after the agent restarted",
        });
      }
    }
  }

  /** Starts the connection loop; settles as {@link startAgent} says. */
  connect(): Promise<RunningAgent> {
    const first = new Promise<void>((resolve, reject) => {
      this.#firstAnswer = { resolve, reject, settled: false };
    });
    this.#loop = this.#connectLoop();
    return first.then(() => this as RunningAgent);
  }

  #answered(error?: Error): void {
    if (!this.#firstAnswer || this.#firstAnswer.settled) return;
    this.#firstAnswer.settled = true;
    if (error) this.#firstAnswer.reject(error);
    else this.#firstAnswer.resolve();
  }

  // -------------------------------------------------------------------------
  // Connection.

  async #connectLoop(): Promise<void> {
    const signal = this.#abort.signal;
    let index = 0;
    let failures = 0;
    let tries = 0;
    while (!signal.aborted) {
      const server = this.#servers[index % this.#servers.length];
      let outcome: { welcomed: boolean; rejected?: Reject };
      try {
        outcome = await this.#session(server);
      } catch (error) {
        // A bad address, say: this server is skipped like an unreachable one.
        this.emit({ type: "connect_failed", server, reason: messageOf(error) });
        outcome = { welcomed: false };
      }
      if (outcome.rejected?.code === "bad_token") {
        const error = new AgentRejectedError(server, outcome.rejected);
        await this.#shutdown(error);
        this.#rejectDone(error);
        return;
      }
      if (signal.aborted) return;
      tries++;
      if (tries >= this.#servers.length) this.#answered();
      failures = outcome.welcomed ? 0 : failures + 1;
      index++;
      const delay = retryDelay(
        {
          backoffMs: this.#options.reconnect?.initialMs ?? DEFAULT_RECONNECT_INITIAL_MS,
          maxBackoffMs: this.#options.reconnect?.maxMs ?? DEFAULT_RECONNECT_MAX_MS,
          factor: 2,
          jitter: 0.5,
        },
        { retry: failures + 1, key: `${this.agentId}/${tries}` },
      );
      this.emit({
        type: "reconnecting",
        server: this.#servers[index % this.#servers.length],
        afterMs: delay,
      });
      await abortableDelay(delay, signal);
    }
  }

  /** One stream to one server, from Hello to its end. */
  async #session(
    server: string,
  ): Promise<{ welcomed: boolean; rejected?: Reject }> {
    const hello = await this.#hello();
    if (this.#abort.signal.aborted) return { welcomed: false };
    const stream = openAgentStream(server, {
      credentials: this.#options.credentials,
      keepaliveMs: this.#options.keepaliveMs,
    });
    // Stopping ends the stream cleanly; a server that does not end its side
    // in time gets it broken.
    let closeTimer: ReturnType<typeof setTimeout> | undefined;
    const onAbort = () => {
      stream.end();
      closeTimer = setTimeout(() => stream.cancel(), STOP_CLOSE_GRACE_MS);
    };
    this.#abort.signal.addEventListener("abort", onAbort, { once: true });
    let welcomed = false;
    let rejected: Reject | undefined;
    let helloTimedOut = false;
    const helloTimer = setTimeout(() => {
      helloTimedOut = true;
      stream.cancel();
    }, this.#options.helloTimeoutMs ?? DEFAULT_HELLO_TIMEOUT_MS);
    try {
      await stream.send({ hello });
      for await (const message of stream) {
        switch (message.body) {
          case "welcome":
            clearTimeout(helloTimer);
            welcomed = true;
            this.#welcomed(stream, server, message.welcome);
            break;
          case "reject":
            clearTimeout(helloTimer);
            rejected = message.reject;
            this.emit({ type: "rejected", server, ...message.reject });
            stream.cancel();
            break;
          case "assign":
            this.#assigned(message.assign);
            break;
          case "cancel":
            this.#cancelled(message.cancel);
            break;
          case "ack":
            await this.#acknowledged(message.ack);
            break;
        }
      }
    } finally {
      clearTimeout(helloTimer);
      this.#abort.signal.removeEventListener("abort", onAbort);
    }
    const end = await stream.closed;
    clearTimeout(closeTimer);
    if (this.#stream === stream) this.#detach();
    if (welcomed) {
      this.emit({ type: "disconnected", server, reason: end.ok ? "the stream ended" : end.reason });
    } else if (!rejected && !this.#abort.signal.aborted) {
      const reason = helloTimedOut ? "no answer to Hello in time" : end.reason;
      this.emit({ type: "connect_failed", server, reason });
    }
    return { welcomed, rejected };
  }

  async #hello(): Promise<Partial<wire.Hello>> {
    return {
      agentId: this.agentId,
      token: this.#options.token,
      labels: this.#options.labels ?? {},
      capabilities: await this.#fingerprint(),
      version: this.#options.version ?? "",
      runningAttemptIds: this.running,
      // With slots 0 a draining agent's Hello asks for nothing.
      slots: this.#draining ? 0 : this.#slots,
      pendingResultAttemptIds: this.pendingResults,
    };
  }

  /** The fingerprint of every backend of the pool; shell is off unless allowed. */
  async #fingerprint(): Promise<Capability[]> {
    const now = Date.now();
    if (this.#capabilities && now - this.#capabilities.at < CAPABILITY_TTL_MS) {
      return this.#capabilities.list;
    }
    const list = await Promise.all(this.#pool.names.map(async (backend): Promise<Capability> => {
      if (backend === "shell" && !this.#options.allowShell) {
        return {
          backend,
          available: false,
          version: "",
          detail: SHELL_OFF,
        };
      }
      const found = await this.#pool.backend(backend).fingerprint();
      return {
        backend,
        available: found.available,
        version: found.version ?? "",
        detail: found.detail,
      };
    }));
    this.#capabilities = { at: now, list };
    return list;
  }

  #welcomed(stream: ServerConnection, server: string, welcome: Welcome): void {
    for (const other of welcome.servers) {
      if (other && !this.#servers.includes(other)) this.#servers.push(other);
    }
    if (welcome.heartbeatIntervalMs > 0) this.#heartbeatMs = welcome.heartbeatIntervalMs;
    // Results the server has not acknowledged, in the order they ended,
    // unless already queued behind their logs.
    for (const entry of this.#outbox.entries()) {
      const queued = this.#queue.some((message) =>
        "result" in message && message.result.attemptId === entry.attemptId
      );
      if (!queued) this.#queue.push({ result: entry });
    }
    for (const attemptId of this.#droppedLogs) {
      this.#queue.push({
        log: { attemptId, stream: "stderr", text: DROPPED_LOG_MARKER },
      });
    }
    this.#droppedLogs.clear();
    this.#stream = stream;
    this.#server = server;
    clearInterval(this.#heartbeat);
    this.#heartbeat = setInterval(() => this.#beat(), this.#heartbeatMs);
    this.emit({
      type: "connected",
      server,
      serverId: welcome.serverId,
      heartbeatMs: this.#heartbeatMs,
    });
    this.#answered();
    this.#pump().catch((error) => this.#failed(error));
  }

  #detach(): void {
    this.#stream = undefined;
    clearInterval(this.#heartbeat);
    this.#heartbeat = undefined;
    // Results handed to the broken stream are resent from the outbox after
    // the next Welcome; drop their queued copies so they go once per stream.
    for (let i = this.#queue.length - 1; i >= 0; i--) {
      if ("result" in this.#queue[i]) this.#queue.splice(i, 1);
    }
  }

  #beat(): void {
    this.#stream?.send({
      heartbeat: {
        sentAtMs: Date.now(),
        runningAttemptIds: this.running,
        draining: this.#draining,
      },
    }).catch((error) => this.#failed(error));
  }

  /** Queues a message for the server; it goes at once when connected. */
  #enqueue(message: AgentMessageInit): void {
    if ("log" in message) {
      const size = message.log.text?.length ?? 0;
      if (this.#queuedLogChars + size > MAX_LOG_BACKLOG_CHARS) {
        this.#droppedLogs.add(message.log.attemptId ?? "");
        return;
      }
      this.#queuedLogChars += size;
    }
    this.#queue.push(message);
    this.#pump().catch((error) => this.#failed(error));
  }

  /** Sends what is queued, in order, while a stream is up. */
  async #pump(): Promise<void> {
    if (this.#pumping) return;
    this.#pumping = true;
    let broken: ServerConnection | undefined;
    try {
      // The stream is read anew on every turn: a Welcome on a new stream
      // while a send on the old one was pending carries on with the new one.
      while (this.#stream && this.#stream !== broken && this.#queue.length > 0) {
        const stream = this.#stream;
        const message = this.#queue[0];
        if (!(await stream.send(message))) {
          // Not taken by the transport: it stays queued for the next stream.
          broken = stream;
          continue;
        }
        // A result may have been taken out of the queue meanwhile (#detach).
        if (this.#queue[0] === message) this.#queue.shift();
        if ("log" in message) this.#queuedLogChars -= message.log.text?.length ?? 0;
      }
    } finally {
      this.#pumping = false;
    }
  }

  async #acknowledged(ack: wire.ResultAck): Promise<void> {
    if (!(await this.#outbox.remove(ack.attemptId))) return;
    this.emit({ type: "acked", ...ack });
    this.#acked?.();
  }

  // -------------------------------------------------------------------------
  // Attempts.

  #assigned(assignment: wire.Assignment): void {
    const { attemptId, backend } = assignment;
    this.emit({ type: "assignment", attemptId, backend });
    // Repeated (a resent assignment): the attempt runs, or its result is on its way.
    if (this.#active.has(attemptId) || this.#outbox.has(attemptId)) return;
    const refusal = this.#refusal(assignment);
    if (refusal) {
      this.emit({ type: "refused", attemptId, reason: refusal.message });
      this.#deliver(attemptId, { ok: false, ...refusal }).catch((error) => this.#failed(error));
      return;
    }
    let spec: AssignmentSpec;
    try {
      spec = parseAssignmentSpec(assignment.specJson);
    } catch (error) {
      const message = messageOf(error);
      this.emit({ type: "refused", attemptId, reason: message });
      this.#deliver(attemptId, { ok: false, errorClass: "infrastructure", message })
        .catch((error) => this.#failed(error));
      return;
    }
    const record: AttemptRecordFile = {
      attemptId,
      backend,
      spec: this.#attemptSpec(attemptId, spec),
      mask: assignment.mask,
      assignedAt: Date.now(),
    };
    const active: ActiveAttempt = {
      record,
      masker: new Masker(assignment.mask),
      done: Promise.resolve(),
    };
    this.#active.set(attemptId, active);
    let bundle: PipelineBundle | undefined;
    if (assignment.bundleJson) {
      try {
        bundle = JSON.parse(assignment.bundleJson) as PipelineBundle;
      } catch {
        // Reported below: the step finds no bundle.
      }
    }
    active.done = this.#run(active, spec, bundle).catch((error) => this.#failed(error));
  }

  /** The agent's own disk failed it (the outbox cannot be written): say so loudly. */
  #failed(error: unknown): void {
    this.emit({
      type: "diagnostic",
      backend: "agent",
      text: `internal error: ${messageOf(error)}`,
    });
  }

  /** Why an assignment cannot run here, as the failure reported for it. */
  #refusal(
    assignment: wire.Assignment,
  ): { errorClass: ErrorClass; message: string } | undefined {
    if (this.#draining || this.#stopping) {
      return { errorClass: "infrastructure", message: `agent ${this.agentId} is stopping` };
    }
    if (assignment.backend === "shell" && !this.#options.allowShell) {
      return { errorClass: "permission", message: `agent ${this.agentId}: ${SHELL_OFF}` };
    }
    if (!this.#pool.source(assignment.backend)) {
      return {
        errorClass: "infrastructure",
        message: `backend "${assignment.backend}" is not available on agent ${this.agentId}`,
      };
    }
    if (this.#active.size >= this.#slots) {
      return {
        errorClass: "infrastructure",
        message:
          `agent ${this.agentId} has no free slot (${this.#active.size} of ${this.#slots} busy)`,
      };
    }
    return undefined;
  }

  /** The backend spec of an assignment, with this agent's scratch paths filled in. */
  #attemptSpec(attemptId: string, spec: AssignmentSpec): AttemptSpec {
    const workDir = `${this.#scratchRoot}/${fileSafe(spec.runId)}/${fileSafe(spec.stepId)}/${
      fileSafe(String(spec.attempt))
    }`;
    return {
      ...spec,
      attemptId,
      agentId: this.agentId,
      scratchRoot: this.#scratchRoot,
      baseDir: spec.baseDir ?? workDir,
      workDir,
      inputsDir: `${workDir}/in`,
      outputsDir: `${workDir}/out`,
      // Filled in once the artifacts are fetched.
      inputs: {},
      config: spec.config ?? {},
      outputs: spec.outputs ?? [],
      env: spec.env ?? {},
      matrix: spec.matrix ?? {},
    };
  }

  /** Runs an assigned attempt: inputs, start, then {@link #finish}. */
  async #run(
    active: ActiveAttempt,
    assigned: AssignmentSpec,
    bundle?: PipelineBundle,
  ): Promise<void> {
    const { record } = active;
    try {
      const spec = record.spec;
      await Deno.mkdir(spec.outputsDir, { recursive: true });
      await Deno.mkdir(spec.inputsDir!, { recursive: true });
      if (assigned.bundleDigest) {
        // The run shipped its pipeline directory: steps run in the copy
        // unpacked here (once per digest), wherever the submitter kept it.
        const root = `${this.#paths.root}/bundles`;
        const dir = bundleDir(root, assigned.bundleDigest);
        // Only the first assignment of a run on a stream carries the bundle;
        // the others wait for its unpacking.
        if (bundle?.digest === assigned.bundleDigest && !this.#bundles.has(bundle.digest)) {
          const unpacking = unpackBundle(bundle, root);
          this.#bundles.set(bundle.digest, unpacking);
          unpacking.catch(() => this.#bundles.delete(bundle.digest));
        }
        const unpacking = this.#bundles.get(assigned.bundleDigest);
        if (unpacking) {
          spec.baseDir = await unpacking;
        } else if (await isDirectory(dir)) {
          spec.baseDir = dir;
        } else {
          throw new BundleError(
            `Expected the pipeline bundle ${assigned.bundleDigest} from the server; it did not come`,
          );
        }
      } else if (!(await isDirectory(spec.baseDir))) {
        // The pipeline directory is the server's; an agent on another machine
        // may not have it. Relative paths then resolve in the attempt's work
        // directory (a deno step's module must be there to be found).
        spec.baseDir = spec.workDir;
      }
      spec.inputs = await materializeInputs(
        this.#options.artifacts,
        assigned.inputs ?? {},
        spec.inputsDir!,
      );
      if (active.stop) return await this.#deliver(record.attemptId, stoppedResult(active.stop));
      // Recorded before anything starts: a restarted agent then knows
      // every execution it may have left behind.
      await this.#saveRecord(record);
      const execution = await this.#pool.backend(record.backend).start(spec);
      active.execution = execution;
      record.handle = execution.handle;
      // When the process started guards a later reap against a reused pid
      // (checked against ps(1) then, not spawned for now: it costs a process).
      if (/^\d+$/.test(execution.handle)) record.processStartMs = Date.now();
      await this.#saveRecord(record);
      this.#enqueue({
        started: { attemptId: record.attemptId, handle: execution.handle, atMs: Date.now() },
      });
      this.emit({ type: "started", attemptId: record.attemptId, handle: execution.handle });
      if (active.stop) execution.cancel(this.#graceMs()).catch(() => {});
      await this.#finish(active, execution);
    } catch (error) {
      await this.#deliver(record.attemptId, {
        ok: false,
        errorClass: errorClassOf(error),
        message: active.masker.mask(messageOf(error)),
      });
    }
  }

  /** Supervises an execution a backend re-attached after a restart. */
  #supervise(record: AttemptRecordFile, execution: Execution): void {
    const active: ActiveAttempt = {
      record,
      masker: new Masker(record.mask),
      execution,
      done: Promise.resolve(),
    };
    this.#active.set(record.attemptId, active);
    active.done = this.#finish(active, execution).catch(async (error) => {
      await this.#deliver(record.attemptId, {
        ok: false,
        errorClass: errorClassOf(error),
        message: active.masker.mask(messageOf(error)),
      });
    }).catch((error) => this.#failed(error));
  }

  /** Streams an execution's logs, waits for its end, stores its outputs and reports. */
  async #finish(active: ActiveAttempt, execution: Execution): Promise<void> {
    const { record } = active;
    const attemptId = record.attemptId;
    let cleaned: Promise<void> | undefined;
    try {
      const logsDone = (async () => {
        for await (const { stream, text } of maskedLogs(execution.logs, active.masker)) {
          this.#enqueue({ log: { attemptId, stream, text } });
        }
      })();
      const exit = await execution.wait();
      await logsDone;
      // Released while the outputs are stored; the attempt ends after both.
      cleaned = execution.cleanup().catch(() => {});
      const failure = failureOf(exit, active.masker);
      if (failure && active.stop) {
        return await this.#deliver(attemptId, {
          ...stoppedResult(active.stop),
          ...(exit.usage ? { usage: exit.usage } : {}),
        });
      }
      if (failure) return await this.#deliver(attemptId, failure);
      const outputs = await collectOutputs(this.#options.artifacts, {
        ...record.spec,
        attemptId,
      });
      await this.#deliver(attemptId, {
        ok: true,
        exitCode: 0,
        outputs,
        ...(exit.usage ? { usage: exit.usage } : {}),
      });
      // The outputs are in the artifact store now; a failed attempt's
      // scratch directory is kept for inspection.
      await Deno.remove(record.spec.workDir, { recursive: true }).catch(() => {});
    } finally {
      await cleaned;
    }
  }

  /**
   * Records a result in the outbox (durably, before anything else), forgets
   * the attempt and sends the result.
   */
  async #deliver(attemptId: string, result: ModelResult): Promise<void> {
    const entry: OutboxEntry = { attemptId, resultJson: JSON.stringify(result), atMs: Date.now() };
    await this.#outbox.add(entry);
    await Deno.remove(this.#recordPath(attemptId)).catch(ignoreNotFound);
    this.#active.delete(attemptId);
    this.emit({
      type: "finished",
      attemptId,
      ok: result.ok,
      ...(result.ok ? {} : { errorClass: result.errorClass }),
    });
    this.#enqueue({ result: entry });
  }

  #cancelled(cancel: wire.CancelAttempt): void {
    const active = this.#active.get(cancel.attemptId);
    this.emit({
      type: "cancel",
      attemptId: cancel.attemptId,
      reason: cancel.reason,
      known: active !== undefined,
    });
    if (!active || active.stop) return;
    active.stop = { by: "server", reason: cancel.reason || "cancelled by the server" };
    active.execution?.cancel(this.#graceMs()).catch(() => {});
  }

  #graceMs(): number {
    return this.#options.cancelGraceMs ?? DEFAULT_CANCEL_GRACE_MS;
  }

  async #saveRecord(record: AttemptRecordFile): Promise<void> {
    await writeJsonAtomic(this.#recordPath(record.attemptId), record, { mode: 0o600 });
  }

  #recordPath(attemptId: string): string {
    return `${this.#paths.attempts}/${fileSafe(attemptId)}.json`;
  }

  // -------------------------------------------------------------------------
  // Stopping.

  stop(options: { drain?: boolean } = {}): Promise<void> {
    if (this.#stopping && !options.drain && this.#draining) {
      // Asked to stop now while draining: cut the drain short.
      this.#hurry = true;
      this.#cancelActive();
      this.#acked?.();
      return this.#stopping;
    }
    this.#stopping ??= (async () => {
      if (options.drain) {
        this.#draining = true;
        this.#beat();
      } else {
        this.#hurry = true;
        this.#cancelActive();
      }
      await Promise.allSettled([...this.#active.values()].map((active) => active.done));
      await this.#waitForAcks(STOP_ACK_WAIT_MS);
      this.#abort.abort();
      await this.#loop;
      await this.#shutdown();
      this.#resolveDone();
    })();
    return this.#stopping;
  }

  /** Waits until every result is acknowledged, or `ms` passed, or no server is connected. */
  /** Cancels every attempt still running (reported as infrastructure failures). */
  #cancelActive(): void {
    for (const active of this.#active.values()) {
      if (active.stop) continue;
      active.stop = { by: "agent", reason: "the agent stopped before the attempt ended" };
      active.execution?.cancel(this.#graceMs()).catch(() => {});
    }
  }

  /**
   * Waits for the outbox to be acknowledged: without end while draining,
   * `hurryMs` at most once asked to stop now.
   */
  async #waitForAcks(hurryMs: number): Promise<void> {
    const started = Date.now();
    const deadline = () => this.#hurry ? started + hurryMs : Infinity;
    while (this.#outbox.entries().length > 0 && this.#stream && Date.now() < deadline()) {
      const left = deadline() - Date.now();
      await new Promise<void>((resolve) => {
        const timer = Number.isFinite(left) ? setTimeout(resolve, left) : undefined;
        this.#acked = () => {
          clearTimeout(timer);
          resolve();
        };
        // A stream that breaks meanwhile ends the wait (see the loop's condition).
        this.#stream?.closed.then(() => {
          clearTimeout(timer);
          resolve();
        });
      });
      this.#acked = undefined;
    }
  }

  /** Stops everything; `startAgent`, if still waiting, rejects with `error` or resolves. */
  #shutdown(error?: Error): Promise<void> {
    this.#shutdownDone ??= (async () => {
      this.#abort.abort();
      clearInterval(this.#heartbeat);
      this.#stream?.end();
      await this.#pool.close();
      this.#answered(error);
      this.emit({ type: "stopped" });
    })();
    return this.#shutdownDone;
  }
}

/** Sentence of a shell capability (and refusal) on an agent that does not run shell steps. */
const SHELL_OFF =
  "shell steps are off on agents (they run unsandboxed); start the agent with --allow-shell to run them";

/** Stands for the output an agent could not keep while no server was connected. */
const DROPPED_LOG_MARKER =
  "[runnel agent: output dropped while no server was connected (backlog full)]\n";

/** Reads `Assignment.specJson`; throws a plain error for anything but an assignment spec. */
function parseAssignmentSpec(json: string): AssignmentSpec {
  let spec: AssignmentSpec;
  try {
    spec = JSON.parse(json);
  } catch (error) {
    throw new Error(`Expected the assignment's spec as JSON: ${messageOf(error)}`);
  }
  if (typeof spec !== "object" || spec === null || Array.isArray(spec)) {
    throw new Error("Expected the assignment's spec as a JSON object");
  }
  for (const key of ["runId", "stepId"] as const) {
    if (typeof spec[key] !== "string" || !spec[key]) {
      throw new Error(`Expected "${key}" in the assignment's spec`);
    }
  }
  spec.attempt ??= 1;
  return spec;
}

function stoppedResult(stop: NonNullable<ActiveAttempt["stop"]>): ModelResult {
  if (stop.by === "agent") {
    // Not the step's failure: it runs again elsewhere without using its retries.
    return { ok: false, errorClass: "infrastructure", message: stop.reason, lost: true };
  }
  const timedOut = stop.reason === "timeout";
  return {
    ok: false,
    errorClass: timedOut ? "timeout" : "cancelled",
    message: timedOut ? "the step ran past its timeout" : `cancelled: ${stop.reason}`,
  };
}

/** Writes JSON to a temporary file and renames it over `path`: readers never see half a file. */
async function writeJsonAtomic(
  path: string,
  value: unknown,
  options: { mode?: number } = {},
): Promise<void> {
  const temporary = `${path}.${crypto.randomUUID().slice(0, 8)}.tmp`;
  await Deno.writeTextFile(temporary, JSON.stringify(value), { mode: options.mode });
  await Deno.rename(temporary, path);
}

/**
 * The start time of the process a handle names, when the handle is a
 * process id (process backends); undefined otherwise or when `ps` cannot
 * tell (Deno guards `/proc` behind --allow-all).
 */
/** When the process `handle` (a pid) started, by ps(1), in epoch ms; undefined if it is gone. */
async function processStartOf(handle: string): Promise<number | undefined> {
  if (!/^\d+$/.test(handle)) return undefined;
  try {
    const output = await new Deno.Command("ps", {
      args: ["-p", handle, "-o", "lstart="],
      env: { LC_ALL: "C", TZ: "UTC" },
      stdout: "piped",
      stderr: "null",
    }).output();
    const text = new TextDecoder().decode(output.stdout).trim();
    if (!text) return undefined;
    // "Tue Nov 24 20:39:22 2026", in UTC as asked.
    const parsed = Date.parse(`${text.replace(/\s+/g, " ")} UTC`);
    return Number.isNaN(parsed) ? undefined : parsed;
  } catch {
    return undefined;
  }
}

/** How far ps(1)'s start time (whole seconds) may be from the recorded one. */
const PROCESS_START_SLACK_MS = 3_000;

/**
 * Whether a recorded handle may be handed to `recover` for reaping: any
 * non-process handle (a container id), or a process id that still names the
 * process the attempt started (not one that reuses the pid, after a reboot
 * say): its start time matches the one recorded when it was started.
 */
async function stillOurs(record: AttemptRecordFile): Promise<boolean> {
  if (!record.handle) return false;
  if (!/^\d+$/.test(record.handle)) return true;
  if (record.processStartMs === undefined) return false;
  const started = await processStartOf(record.handle);
  return started !== undefined &&
    Math.abs(started - record.processStartMs) <= PROCESS_START_SLACK_MS;
}

async function isDirectory(path: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isDirectory;
  } catch {
    return false;
  }
}

function ignoreNotFound(error: unknown): void {
  if (!(error instanceof Deno.errors.NotFound)) throw error;
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

function printJsonLine(fields: Record<string, unknown>): void {
  console.error(JSON.stringify(fields));
}

/** Resolves after `ms`, or at once when `signal` aborts. */
function abortableDelay(ms: number, signal: AbortSignal): Promise<void> {
  if (signal.aborted) return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal.addEventListener("abort", done, { once: true });
  });
}

/**
 * Removes the scratch directories of runs (`<scratch>/<run>`) not modified
 * within `retentionMs`: what failed attempts left for inspection. Returns
 * the names removed.
 */
export async function sweepScratch(scratchRoot: string, retentionMs: number): Promise<string[]> {
  const removed: string[] = [];
  const cutoff = Date.now() - retentionMs;
  for await (const entry of Deno.readDir(scratchRoot)) {
    if (!entry.isDirectory) continue;
    const path = `${scratchRoot}/${entry.name}`;
    try {
      const info = await Deno.stat(path);
      if ((info.mtime?.getTime() ?? Date.now()) >= cutoff) continue;
      await Deno.remove(path, { recursive: true });
      removed.push(entry.name);
    } catch {
      // Gone already, or not ours to remove: the next start tries again.
    }
  }
  return removed;
}
