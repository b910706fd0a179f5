/**
 * The key layout of cluster mode, in one place. Servers and the scheduler
 * talk to each other only through these keys.
 *
 * | key | written by | what |
 * | --- | --- | --- |
 * | `/run/<run>` | API, scheduler | `ClusterRunRecord` |
 * | `/plan/<run>` | API (once) | the run's `Plan` |
 * | `/steps/<run>/<step>` | scheduler | `StepState` |
 * | `/workers/<agent>` | the agent's server, under a lease of 3 heartbeats | `WorkerRecord` |
 * | `/agents/<agent>/identity` | the server it first registered with | `AgentIdentityRecord` |
 * | `/agents/<agent>/connection` | the agent's server, under the worker's lease | `AgentConnectionRecord` |
 * | `/presence/<server>` | that server, every half heartbeat interval | `PresenceRecord`: its agents' last heartbeats (`presence.ts`) |
 * | `/assign/<agent>/<attempt>` | scheduler, with the step's start | `AssignmentRecord` |
 * | `/stop/<agent>/<attempt>` | scheduler | a cancel for the agent |
 * | `/results/<attempt>` | the agent's server (create-only) | `ResultRecord` |
 * | `/request/<run>/cancel`, `/request/<run>/resume` | API | a user's request |
 * | `/logs/<run>/<step>/<attempt>/<seq>` | the agent's server, under a rolling retention lease | a batch of masked log text |
 * | `/bundle/<digest>/…` | API (once per digest), without an artifact store | a shipped pipeline directory, in chunks |
 * | `/bundles/<digest>` | with the chunks | its size and time: the budget's index (`agent/bundle.ts`) |
 * | `/pipelines/<name>/…` | API | registered pipelines and their versions (`pipelines.ts`) |
 * | `/election/scheduler/…` | servers | election candidates |
 *
 * Attempt ids hold `/` (`run/step/3`): inside keys they are URI-encoded.
 *
 * No key holds a secret's value: a run's plan and its assignments name
 * secrets; the agent's server resolves the values when it pushes an
 * assignment, and they travel only on the agent's stream.
 *
 * @module
 */

import type { AttemptResult, FanInLocator, SecretRef } from "../../core/model.ts";
import type { RunHeader } from "../../core/engine.ts";

/** A run as the cluster records it. */
export interface ClusterRunRecord extends RunHeader {
  /** The pipeline file as submitted (for humans; the plan is at `/plan/<run>`). */
  file: string;
  planDigest: string;
  /** With `affinity: pipeline`: the agent every step of the run goes to. */
  agent?: string;
  /** Digest of the pipeline directory shipped with the run (`agent/bundle.ts`). */
  bundle?: string;
  /** The run this one reruns steps of (`runnel rerun`). */
  rerunOf?: string;
  /** Its labels (the pipeline's and the submission's), indexed (`run_index.ts`). */
  labels?: Record<string, string>;
  /** Its name (`run-name`). */
  name?: string;
  /** Why it has not started (its concurrency key is full). */
  waiting?: string;
  /** The run's parameter values (also in its plan). */
  params?: Record<string, string | number | boolean>;
  /**
   * The registered pipeline and version it runs, when triggered
   * (`agent/server/pipelines.ts`); `tick` when a schedule started it.
   */
  registered?: { name: string; version: number; tick?: number };
  /** The run (and its `pipeline:` step's attempt) that started this one as its child. */
  parent?: { runId: string; stepId: string; attemptId: string };
  /** The run's OpenTelemetry trace id (32 hex digits): its spans, and its steps' `TRACEPARENT`. */
  traceId?: string;
  /** The name of the API token that submitted, triggered or reran it. */
  submittedBy?: string;
}

/** What one backend can do on a worker (its fingerprint). */
export interface WorkerCapability {
  backend: string;
  available: boolean;
  version?: string;
  detail?: string;
}

/** A connected worker, as its server registers it. */
export interface WorkerRecord {
  agentId: string;
  labels: Record<string, string>;
  capabilities: WorkerCapability[];
  /** Attempts it runs at once. */
  slots: number;
  /** The server holding its stream. */
  server: string;
  /**
   * Names of the secrets a step on this worker can be given: those its
   * agent's config declares and those its server's `--secrets` declares.
   */
  secrets?: string[];
  version?: string;
  connectedAt: number;
  lastHeartbeat: number;
}

/**
 * The identity a server issued to an agent at its first registration. Only
 * the credential's hash is kept: the credential is 32 random bytes, so a
 * plain sha256 cannot be reversed by guessing.
 */
export interface AgentIdentityRecord {
  agentId: string;
  /** `sha256:<hex>` of the credential. */
  credentialHash: string;
  /** `sha256:<hex>` of the session (agent process) it was issued to. */
  sessionHash: string;
  /** The server that issued it. */
  issuedBy: string;
  issuedAt: number;
  /** Set by an operator: every Hello for this id is refused until the key is deleted. */
  revokedAt?: number;
}

/**
 * The agent's live connection: one at a time per agent id, across
 * servers. Under the worker's lease, so it ends with it.
 */
export interface AgentConnectionRecord {
  /** Unique per stream. */
  connectionId: string;
  /** `sha256:<hex>` of the session (agent process) holding it. */
  sessionHash: string;
  server: string;
  connectedAt: number;
  /**
   * When the claim was taken (the server's clock). Later heartbeats are in
   * the holding server's `/presence/<server>` (`presence.ts`), not here.
   */
  heartbeatAt: number;
}

/** An attempt handed to a worker. */
export interface AssignmentRecord {
  runId: string;
  stepId: string;
  attemptId: string;
  attempt: number;
  agentId: string;
  backend: string;
  /** The step's backend config, env (without secrets), outputs, limits. */
  spec: {
    config: Record<string, unknown>;
    baseDir: string;
    env: Record<string, string>;
    outputs: string[];
    /** Keep a failed attempt's outputs as `NAME.partial-ATTEMPT`. */
    keepPartial?: boolean;
    matrix?: Record<string, string | number | boolean>;
    timeoutMs?: number;
    resources?: { cpu?: number; memoryBytes?: number };
    /** The run's pipeline bundle, when one was shipped. */
    bundleDigest?: string;
  };
  /** What each input reads (one artifact per matrix leg for a fan-in). */
  inputs: Record<string, FanInLocator>;
  /**
   * The step's secrets: env name → reference (an operator's secret name).
   * Never their values: the agent's server resolves them as it pushes the
   * assignment, unless the agent declares the name itself.
   */
  secrets: Record<string, SecretRef>;
  assignedAt: number;
  /** The W3C trace context of the attempt's span (`agent/trace/`), handed to its agent. */
  traceparent?: string;
}

/** An attempt's end as its worker reported it. */
export interface ResultRecord {
  runId: string;
  stepId: string;
  attemptId: string;
  agentId: string;
  result: AttemptResult;
  at: number;
}

/** Encodes an id (an attempt id holds `/`) for use as one key segment. */
export function segment(id: string): string {
  return encodeURIComponent(id);
}

/** The cluster key builders. */
export const clusterKeys = {
  run: (runId: string) => `/run/${runId}`,
  runPrefix: "/run/",
  plan: (runId: string) => `/plan/${runId}`,
  step: (runId: string, stepId: string) => `/steps/${runId}/${segment(stepId)}`,
  stepPrefix: (runId: string) => `/steps/${runId}/`,
  worker: (agentId: string) => `/workers/${segment(agentId)}`,
  workerPrefix: "/workers/",
  agentIdentity: (agentId: string) => `/agents/${segment(agentId)}/identity`,
  agentConnection: (agentId: string) => `/agents/${segment(agentId)}/connection`,
  agentPrefix: (agentId: string) => `/agents/${segment(agentId)}/`,
  presence: (serverId: string) => `/presence/${segment(serverId)}`,
  presencePrefix: "/presence/",
  assignment: (agentId: string, attemptId: string) =>
    `/assign/${segment(agentId)}/${segment(attemptId)}`,
  assignmentPrefix: (agentId?: string) =>
    agentId === undefined ? "/assign/" : `/assign/${segment(agentId)}/`,
  stop: (agentId: string, attemptId: string) => `/stop/${segment(agentId)}/${segment(attemptId)}`,
  stopPrefix: (agentId?: string) => agentId === undefined ? "/stop/" : `/stop/${segment(agentId)}/`,
  result: (attemptId: string) => `/results/${segment(attemptId)}`,
  resultPrefix: "/results/",
  request: (runId: string, kind: "cancel" | "resume") => `/request/${runId}/${kind}`,
  approval: (runId: string, stepId: string) => `/request/${runId}/approve/${segment(stepId)}`,
  requestPrefix: "/request/",
  logs: (runId: string, stepId: string, attempt: number) =>
    `/logs/${runId}/${segment(stepId)}/${attempt}/`,
  logsOfRun: (runId: string) => `/logs/${runId}/`,
  logBatch: (runId: string, stepId: string, attempt: number, seq: number) =>
    `/logs/${runId}/${segment(stepId)}/${attempt}/${String(seq).padStart(20, "0")}`,
  electionPrefix: "/election/scheduler/",
};
