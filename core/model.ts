/**
 * The runtime model shared by the planner, the run engine and the drivers.
 *
 * The pipeline *file* is described by the zod schema in `schema.ts`; this
 * module describes what the planner turns it into: a flat DAG of concrete
 * step instances (matrix legs expanded, durations in milliseconds, defaults
 * applied, `${{ matrix.x }}` interpolated) and the run state the engine
 * advances. Everything here is plain JSON-serialisable data so that a store
 * can persist it as it is.
 *
 * @module
 */

import type { FanOut } from "./fanout.ts";
import type { ScheduleSpec } from "./schedule.ts";

/**
 * Pattern of a name that becomes a file or directory name on an agent: an
 * input, an output (artifact) name. Letters, digits, `_`, `.` and `-`, not
 * starting with `.` or `-` (so never `.`, `..` or a hidden file), at most
 * 128 characters: it cannot leave the directory it is joined to.
 */
export const SAFE_NAME_PATTERN = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/;

/** Where something is in a source file; lines and columns count from 1. */
export interface SourceLocation {
  /** Path of the file as the user named it. */
  file: string;
  line: number;
  col: number;
}

/**
 * Why an attempt failed. Application errors (a step's own non-zero exit),
 * timeouts and infrastructure errors (a backend or host that broke) are
 * worth retrying; business errors (the step says its input is wrong, exit
 * code {@link BUSINESS_EXIT_CODE} or a thrown `BusinessError`), permission
 * errors (a sandboxed step reached past its grant) and artifact errors (an
 * input that failed its integrity check) are not, because a retry would
 * meet the same answer.
 */
export type ErrorClass =
  | "application"
  | "business"
  | "timeout"
  | "infrastructure"
  | "permission"
  | "artifact"
  | "cancelled"
  /** Waited longer than its `queue-timeout` for a worker (or a local slot). */
  | "queue-timeout"
  /** Still going when its run's `deadline` passed. */
  | "deadline";

/** Every error class, in a stable order (for schemas and docs). */
export const ERROR_CLASSES: readonly ErrorClass[] = [
  "application",
  "business",
  "timeout",
  "infrastructure",
  "permission",
  "artifact",
  "cancelled",
  "queue-timeout",
  "deadline",
];

/** The classes retried when a step's `retry.on` does not say otherwise. */
export const DEFAULT_RETRY_CLASSES: readonly ErrorClass[] = [
  "application",
  "timeout",
  "infrastructure",
];

/**
 * Exit code by which a process reports a business error: sysexits(3)
 * `EX_DATAERR`, "the input data was incorrect in some way".
 */
export const BUSINESS_EXIT_CODE = 65;

/** When and how often a failed step is tried again. */
export interface RetryPolicy {
  /** Attempts after the first; `max: 2` allows three attempts in all. */
  max: number;
  /** Delay before the first retry, in milliseconds. */
  backoffMs: number;
  /** Upper bound of any delay, in milliseconds. */
  maxBackoffMs: number;
  /** Growth factor of the delay between consecutive retries. */
  factor: number;
  /** Fraction (0..1) of each delay that is randomised (full jitter when 1). */
  jitter: number;
  /** Error classes that are retried. `business` is never among them. */
  onClasses: ErrorClass[];
  /** Exit codes that are retried whatever their class. */
  onExitCodes: number[];
}

/** A reference to a secret value (exactly one field); the value itself is never stored. */
export interface SecretRef {
  /** Name of a secret the operator declared (a server's or agent's secret store). */
  secret?: string;
  /** Local mode only: an environment variable of the runner that holds the value. */
  env?: string;
  /** Local mode only: a file whose contents (trailing newline trimmed) is the value. */
  file?: string;
}

/** A webhook called when a step fails for good (after its retries). */
export interface WebhookSpec {
  url: string;
  headers: Record<string, string>;
  /** Delivery attempts after the first. */
  retries: number;
  backoffMs: number;
  timeoutMs: number;
  /** The body: runnel's JSON (default), or a Slack incoming-webhook message (`{text}`). */
  format?: "json" | "slack";
}

/** Who is mailed when a run ends (`alerts.email`). */
export interface EmailAlert {
  to: string[];
  /** The ends that are mailed. */
  on: Array<"failure" | "success" | "exit">;
  subject?: string;
}

/** What a run's `on-success` / `on-exit` webhooks receive when it ends. */
export interface RunNotice {
  runId: string;
  pipeline: string;
  status: "succeeded" | "failed" | "cancelled";
  at: number;
  startedAt?: number;
  /** Step instances that failed. */
  failedSteps: string[];
}

/** One leg a split node made: a batch it stored, or an item of a list. */
export interface FanOutLeg {
  /** What follows `batch=` / `item=` in the leg's id (`0007`, `eu-west`). */
  key: string;
  /** `batch`: the split node's output holding the leg's batch. */
  output?: string;
  /** `batch` with `files: true`: the file's path inside the directory input. */
  source?: string;
  /** `foreach`: the item, as JSON. */
  item?: unknown;
}

/** One input of a step: the outputs of one or more step instances. */
export interface InputRef {
  /** The step name as written in the file (`generate`). */
  step: string;
  /** The output file name (`energy.csv`). */
  output: string;
  /**
   * The instance ids it reads from: one for a plain step, every leg for a
   * matrix step (fan-in, materialised as a directory with one file per leg).
   */
  from: string[];
  /** True when `step` is a matrix step, so the input is a directory. */
  fanIn: boolean;
}

/** Resource requests of a step. */
export interface Resources {
  /** CPUs, fractional allowed. */
  cpu?: number;
  /** Memory in bytes. */
  memoryBytes?: number;
}

/** A concrete step instance: a plain step, or one leg of a matrix step. */
export interface PlannedStep {
  /** Unique instance id: `analyze`, or `convert[region=eu,size=2]` for a leg. */
  id: string;
  /** The step's key in the file. */
  name: string;
  /** This leg's matrix values, absent for a plain step. */
  matrix?: Record<string, string | number | boolean>;
  /** Backend name: `deno`, `shell`, `docker`, `ssh`, `kubernetes`, or a plugin's. */
  backend: string;
  /** Instance ids this step waits for (a matrix need expands to every leg). */
  needs: string[];
  /**
   * Backend-specific configuration after interpolation: `run`, `module`,
   * `args`, `image`, `permissions`, `workdir`, … (validated by the backend).
   */
  config: Record<string, unknown>;
  inputs: Record<string, InputRef>;
  /** File names the step must write. */
  outputs: string[];
  env: Record<string, string>;
  /** Names of pipeline-level secrets exposed to the step as env vars. */
  secrets: string[];
  resources: Resources;
  timeoutMs?: number;
  /** Keep a failed attempt's outputs, renamed `NAME.partial-ATTEMPT` (`keep-partial`). */
  keepPartial?: boolean;
  /** Longest wait of an attempt for a worker (or a local slot) before it fails (`queue-timeout`). */
  queueTimeoutMs?: number;
  retry: RetryPolicy;
  /** Condition source (see `expr.ts`); absent means `success()`. */
  when?: string;
  /** An exit handler (`handler:`): it needs every other step, and learns the run's outcome. */
  handler?: "exit" | "success" | "failure";
  /** The step waits for a person's approval before it runs (`approval:`). */
  approval?: { message?: string; timeoutMs?: number; role?: "read" | "submit" | "admin" };
  continueOnError: boolean;
  cache: boolean;
  /** Max legs of this step's matrix running at once. */
  concurrency?: number;
  selector: Record<string, string>;
  onFailure?: WebhookSpec;
  /**
   * Set on the split node of a `batch:` / `foreach:` step (backend `split`):
   * what its legs are once it has run (see `fanout.ts`).
   */
  fanOut?: FanOut;
  /** Where the step is defined. */
  source: SourceLocation;
  /** sha256 (hex) of the canonical JSON of everything above that changes what the step does. */
  specDigest: string;
}

/** A validated, expanded pipeline, ready to run. */
export interface Plan {
  name: string;
  /** The file it came from, as the user named it. */
  file: string;
  /** Directory relative module paths and workdirs resolve against (absolute). */
  baseDir: string;
  /** Step instances by id. */
  steps: Record<string, PlannedStep>;
  /** Instance ids in a topological order (needs first), ties in file order. */
  order: string[];
  /** Longest a round of the run may take before it fails (`deadline`). */
  deadlineMs?: number;
  /** Max step instances running at once across the run. */
  concurrency?: number;
  affinity?: "pipeline";
  env: Record<string, string>;
  secrets: Record<string, SecretRef>;
  onFailure?: WebhookSpec;
  /**
   * How long `gc` keeps artifacts (ms, or forever): the pipeline's (`run`)
   * and each step name's that says (`steps`).
   */
  retention?: {
    run?: number | "forever";
    steps?: Record<string, number | "forever">;
    /** By `step/output` (the step's name): an output's own `retention`. */
    outputs?: Record<string, number | "forever">;
  };
  /** Told when a run succeeds. */
  onSuccess?: WebhookSpec;
  /** Told when a run ends, however it ends. */
  onExit?: WebhookSpec;
  /** Mailed when a run ends (as `on` says). */
  emailAlert?: EmailAlert;
  /** sha256 (hex) of the source text. */
  digest: string;
  /** The run's parameter values (declared ones, defaults applied); absent: it declares none. */
  params?: Record<string, string | number | boolean>;
  /** When a registered pipeline of it runs by itself (cluster, `runnel apply`). */
  schedule?: ScheduleSpec;
  /** The operator secret that signs webhook triggers of it (cluster, `runnel apply`). */
  webhookSecret?: string;
  /** Labels of its runs (the file's; a submission may add to them). */
  labels?: Record<string, string>;
  /** Name of its runs (`run-name`, parameters applied). */
  runName?: string;
  /** Runs sharing the key run at most `limit` at once (cluster). */
  concurrencyKey?: {
    key: string;
    limit: number;
    onConflict: "queue" | "cancel-new" | "cancel-running";
  };
}

/** Status of a step instance. */
export type StepStatus =
  | "pending"
  /** Ready, and waiting for someone to approve it (`approval:`). */
  | "waiting"
  | "scheduled"
  | "running"
  | "retrying"
  | "succeeded"
  | "failed"
  | "cancelled"
  | "skipped";

/** Statuses a step never leaves (except through an explicit resume). */
export const TERMINAL_STEP_STATUSES: readonly StepStatus[] = [
  "succeeded",
  "failed",
  "cancelled",
  "skipped",
];

const TERMINAL_STEP_SET: ReadonlySet<string> = new Set(TERMINAL_STEP_STATUSES);

/**
 * True for a step status the step never leaves except through an explicit
 * resume (one of {@link TERMINAL_STEP_STATUSES}).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { isTerminalStepStatus } from "./model.ts";
 *
 * assert.equal(isTerminalStepStatus("skipped"), true);
 * assert.equal(isTerminalStepStatus("retrying"), false);
 * ```
 */
export function isTerminalStepStatus(status: StepStatus): boolean {
  return TERMINAL_STEP_SET.has(status);
}

/** Status of a run. */
export type RunStatus = "pending" | "running" | "succeeded" | "failed" | "cancelled";

/** Statuses a run never leaves (except through an explicit resume). */
export const TERMINAL_RUN_STATUSES: readonly RunStatus[] = ["succeeded", "failed", "cancelled"];

const TERMINAL_RUN_SET: ReadonlySet<string> = new Set(TERMINAL_RUN_STATUSES);

/**
 * True for a run status the run never leaves except through an explicit
 * resume (one of {@link TERMINAL_RUN_STATUSES}).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { isTerminalRunStatus } from "./model.ts";
 *
 * assert.equal(isTerminalRunStatus("cancelled"), true);
 * assert.equal(isTerminalRunStatus("running"), false);
 * ```
 */
export function isTerminalRunStatus(status: RunStatus): boolean {
  return TERMINAL_RUN_SET.has(status);
}

/** A produced artifact as the engine sees it. */
export interface ArtifactRef {
  name: string;
  /** `sha256:<hex>`. */
  digest: string;
  size: number;
}

/** Resource usage of an attempt, when the backend can tell. */
export interface Usage {
  cpuMs?: number;
  memoryPeakBytes?: number;
}

/** How an attempt ended. */
export type AttemptResult =
  | {
    ok: true;
    exitCode: 0;
    outputs: Record<string, ArtifactRef>;
    /** Small named values the step published (`NAME=value` lines in `$RUNNEL_VALUES`). */
    values?: Record<string, string>;
    /** True when the result was taken from the cache, not executed. */
    cached?: boolean;
    /** A split node's legs (`batch:` / `foreach:`), in order. */
    fanOut?: FanOutLeg[];
    /** The child run of a `pipeline:` step. */
    childRun?: string;
    usage?: Usage;
  }
  | {
    ok: false;
    errorClass: ErrorClass;
    exitCode?: number;
    message: string;
    usage?: Usage;
    /** The attempt was lost with its worker (or runner), not failed by the step. */
    lost?: true;
    /** The child run of a `pipeline:` step. */
    childRun?: string;
  };

/** One attempt of a step. */
export interface AttemptRecord {
  /** Globally unique: `${runId}/${stepId}/${attempt}`. */
  attemptId: string;
  /** 1-based attempt number, counting across resumes. */
  attempt: number;
  scheduledAt: number;
  startedAt?: number;
  endedAt?: number;
  /** Which worker ran it (`local` in local mode). */
  worker?: string;
  result?: AttemptResult;
}

/** The state of one step instance in a run. */
export interface StepState {
  id: string;
  status: StepStatus;
  /** Current (latest) attempt id, the only one whose reports are accepted. */
  attemptId?: string;
  /** Attempts made since the run (or the last resume) began, for retry limits. */
  attemptsThisRound: number;
  /** Attempts lost (and rescheduled) this round: capped by `MAX_LOST_RESCHEDULES`. */
  lostThisRound?: number;
  attempts: AttemptRecord[];
  /** When a `retrying` step may start its next attempt (epoch ms). */
  retryAt?: number;
  /** Outputs of the successful attempt. */
  outputs?: Record<string, ArtifactRef>;
  /** Values the successful attempt published (`${{ steps.NAME.values.KEY }}`). */
  values?: Record<string, string>;
  /** A split node's legs, as its successful attempt reported them (`fanout.ts`). */
  fanOut?: { legs: FanOutLeg[] };
  /** Its approval gate: when it was asked for and how it was decided. */
  approval?: {
    requestedAt: number;
    decidedAt?: number;
    by?: string;
    outcome?: "approved" | "rejected" | "timed-out";
    reason?: string;
  };
  cached?: boolean;
  /** Human reason for the current status (`needs failed: analyze`, `when was false`, …). */
  reason?: string;
  /** When the step reached a terminal status. */
  finishedAt?: number;
}

/** The state of a run: what the engine advances and the store persists. */
export interface RunState {
  runId: string;
  pipeline: string;
  status: RunStatus;
  createdAt: number;
  startedAt?: number;
  finishedAt?: number;
  /** Incremented by each `Resume`. */
  round: number;
  /** When this round fails for its `deadline` (set at `Start` and each `Resume`). */
  deadlineAt?: number;
  steps: Record<string, StepState>;
}

/** Something that happened, fed to the engine. */
export type EngineEvent =
  | { type: "Start"; now: number }
  | { type: "AttemptStarted"; stepId: string; attemptId: string; now: number; worker?: string }
  | {
    type: "AttemptExited";
    stepId: string;
    attemptId: string;
    now: number;
    result: AttemptResult;
  }
  /** The worker (or local runner process) running the attempt is gone. */
  | { type: "AttemptLost"; stepId: string; attemptId: string; now: number; reason: string }
  | { type: "Cancel"; now: number; reason?: string }
  /** Someone decided a waiting step's approval gate. */
  | {
    type: "Approve";
    stepId: string;
    approved: boolean;
    by: string;
    reason?: string;
    now: number;
  }
  | { type: "Resume"; now: number }
  | { type: "Tick"; now: number };

/** Failure metadata sent to an `on-failure` webhook. */
export interface FailureInfo {
  runId: string;
  pipeline: string;
  stepId: string;
  step: string;
  attemptId: string;
  attempt: number;
  errorClass: ErrorClass;
  exitCode?: number;
  message: string;
  at: number;
}

/** Something the driver must do, returned by the engine. */
export type Effect =
  | {
    type: "StartAttempt";
    stepId: string;
    attemptId: string;
    attempt: number;
    /** Epoch ms by which the attempt must end (from `timeout`). */
    deadline?: number;
  }
  | { type: "StopAttempt"; stepId: string; attemptId: string; reason: "cancel" | "timeout" }
  /** Feed the engine a `Tick` at (or soon after) this epoch ms. */
  | { type: "WakeAt"; at: number }
  | { type: "Notify"; webhook: WebhookSpec; failure: FailureInfo }
  /** A run ended: tell its `on-success` / `on-exit` webhook. */
  | { type: "NotifyRun"; webhook: WebhookSpec; notice: RunNotice }
  /** A run ended as its email alert asks to be told (through the operator's SMTP server). */
  | { type: "Alert"; email: EmailAlert; notice: RunNotice }
  | {
    type: "StepStatus";
    stepId: string;
    status: StepStatus;
    attempt: number;
    at: number;
    reason?: string;
  }
  | { type: "RunFinished"; status: RunStatus; at: number };

/** Report of an event the engine refused; it changes nothing. */
export interface Rejection {
  type: "Rejected";
  event: EngineEvent;
  reason: "duplicate" | "stale-attempt" | "unknown-step" | "not-applicable";
}

/** An artifact an attempt reads, in the artifact store. */
export interface ArtifactLocator {
  runId: string;
  stepId: string;
  /** The output name (`energy.csv`): the file name the step sees. */
  name: string;
  /** `sha256:<hex>`; checked against the store's record and on read. */
  digest: string;
  size?: number;
  /** For a fan-in: the leg's directory name (`region=eu`); defaults to the step id. */
  leg?: string;
}

/** A fan-in input: a directory holding one sub-directory per leg. */
export interface FanInLocator {
  fanIn: boolean;
  artifacts: ArtifactLocator[];
}

/**
 * An input of an attempt: one artifact (a file), a fan-in (a directory
 * with one sub-directory per leg), or a bare list of artifacts (a fan-in).
 */
export type InputLocator = ArtifactLocator | FanInLocator | ArtifactLocator[];
