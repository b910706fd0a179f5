/**
 * What a worker agent is told and what it tells: its options and their
 * defaults, the events it logs, the handle of a started agent, and the
 * errors it stops with.
 *
 * @module
 */

import type { ArtifactStore } from "../../core/artifacts/store.ts";
import type { ErrorClass } from "../../core/model.ts";
import type { SecretSource } from "../../core/secrets.ts";
import type { PluginSource } from "../../backends/mod.ts";
import type { ClientCredentials, Reject } from "../../proto/mod.ts";
import type { HostTuning } from "../config.ts";
import type { AttemptPolicy } from "../attempt/policy.ts";
import type { Tracer } from "../trace/exporter.ts";

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
export const MAX_LOG_BACKLOG_CHARS = 4 * 1024 * 1024;
/** Fingerprints are taken again for a Hello when older than this (Docker may have come up). */
export const CAPABILITY_TTL_MS = 60_000;
/** Longest a stopping agent waits for the acknowledgement of its last results. */
export const STOP_ACK_WAIT_MS = 5_000;
/** Longest a stopping agent waits for the server to end the stream after it ended its side. */
export const STOP_CLOSE_GRACE_MS = 2_000;
/**
 * How long an attempt waits for its run's pipeline bundle, asked of the
 * servers, before it is given back as lost (the agent's worker is declared
 * offline long before, if no server answers at all).
 */
export const BUNDLE_WAIT_MS = 60_000;
/** Events kept in {@link RunningAgent.events}. */
export const EVENT_HISTORY = 1_000;

/** Options of {@link startAgent}; `runnel agent` flags in brackets. */
export interface AgentOptions {
  /** gRPC addresses (`host:port`) of the servers, tried in order, round robin [`--server`]. */
  servers: string[];
  /** The cluster's join token [`--token`]. */
  token: string;
  /**
   * Agent id; default: `<hostname>-<random>`, made once and kept in
   * `<stateDir>/agent.json`. The first server to welcome it issues it a
   * credential, kept in `<stateDir>/credential.json` (mode 0600) and
   * required in every later Hello for the id.
   */
  agentId?: string;
  /** Labels the scheduler matches step selectors against, e.g. `{cloud: "gcp"}` [`--labels`]. */
  labels?: Record<string, string>;
  /** Attempts run at once (default {@link DEFAULT_AGENT_SLOTS}) [`--slots`]. */
  slots?: number;
  /**
   * Agent state: `agent.json`, `credential.json`, `attempts/`, `outbox/`,
   * plugin host entry files (`hosts/`), `bundles/` and the scratch root
   * `work/` (default {@link DEFAULT_AGENT_STATE_DIR}). Locked while the
   * agent runs (`agent.lock`): a second agent on it refuses to start.
   */
  stateDir?: string;
  /** Where inputs are fetched from and outputs put (local or S3; the caller opens it). */
  artifacts: ArtifactStore;
  /** Third-party backends, besides the built-in ones (`--config`, `--plugin`). */
  plugins?: PluginSource[];
  /** Plugin host tuning (idle time, heartbeats). */
  hosts?: HostTuning;
  /** Backends' settings of the agent config (`ssh:` host aliases), as plugin hosts get them. */
  settings?: Record<string, unknown>;
  /**
   * Secrets this host's operator declares (`--config` `secrets:`,
   * `--secrets`): name → env var or file of the agent. A step naming one
   * gets its value from here, never from a server; Hello sends the names.
   */
  secrets?: Record<string, SecretSource>;
  /** TLS towards the servers ({@link clientCredentials}) [`--tls-ca`, `--tls-cert`, `--tls-key`]. */
  credentials?: ClientCredentials;
  /**
   * Runs `shell` steps, which are trusted and unsandboxed: off on agents
   * unless asked for; otherwise shell is advertised as unavailable and its
   * assignments are refused [`--allow-shell`].
   */
  allowShell?: boolean;
  /**
   * What a submitted pipeline may ask of this host; default `agentPolicy()`
   * over the built-in backends and `plugins` (docker off) [`--config`].
   */
  policy?: AttemptPolicy;
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
  /**
   * Where the spans of the attempts it runs are recorded, under the context
   * each assignment carries [`--otlp-endpoint`]; the caller shuts it down.
   */
  tracer?: Tracer;
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

export const EVENT_MESSAGES: Record<AgentEvent["type"], string> = {
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

export const EVENT_LEVELS: Partial<Record<AgentEvent["type"], "warn" | "error">> = {
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
   * with {@link AgentRejectedError} when a server refused its token or its
   * identity.
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

/**
 * A server refused the agent's join token or its identity; the agent stops
 * instead of retrying.
 */
export class AgentRejectedError extends Error {
  /** Stable error code. */
  readonly code = "agent_rejected";
  /** The server's reason code (`bad_token`, `bad_identity`). */
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
