/**
 * The contract between the runner and an execution backend.
 *
 * Shaped after Nomad task drivers and GitLab Runner executors: a backend
 * declares what it can do, fingerprints the host, starts an attempt, and
 * recovers what an earlier runner left; the returned {@link Execution}
 * streams logs, waits, cancels and cleans up. What a plugin declares about
 * itself without running (its config schema, its permissions) is its
 * {@link BackendManifest}.
 * Everything that crosses this boundary is plain data (paths, strings,
 * numbers) so that a later plugin host can carry it over a message protocol.
 *
 * @module
 */

import type { z } from "npm:zod@4.6.7";
import {
  BUSINESS_EXIT_CODE,
  type ErrorClass,
  SAFE_NAME_PATTERN,
  type Usage,
} from "../core/model.ts";

/** Deno permissions, one allow-list per permission kind (empty = not granted). */
export interface DenoPermissions {
  read: string[];
  write: string[];
  net: string[];
  env: string[];
  run: string[];
}

/**
 * Where a backend host runs: what a manifest may grant outside any one step
 * (fingerprint, recover).
 */
export interface HostContext {
  /**
   * The agent's scratch root (absolute): every attempt's `workDir` and
   * `outputsDir` lie below it.
   */
  scratchRoot: string;
  /** Id of the agent the host works for (labels, recovery). */
  agentId: string;
  /**
   * Each backend's section of the agent config, by backend name (`ssh:`
   * with its host aliases, say), as the config file gave it: a manifest
   * reads only its own and checks it.
   */
  settings?: Record<string, unknown>;
}

/**
 * What a backend can do beyond running an attempt, declared as data (after
 * Nomad's driver `Capabilities`), so that a runner need not guess from its
 * name.
 */
export interface BackendCapabilities {
  /**
   * `recover` re-attaches to an attempt still running (or finished) after
   * the runner restarted, instead of only reaping it (docker: its
   * containers outlive the runner; a process backend's steps cannot be
   * watched again).
   */
  readonly reattach: boolean;
  /** Exit statuses carry resource usage ({@link ExitStatus.usage}). */
  readonly usage: boolean;
  /**
   * What an attempt started can be reached again only with that attempt's
   * own grant (an SSH host the step named, not the agent): the runner
   * recovers recorded attempts in hosts granted each one's permissions,
   * passing their specs ({@link RecoverOptions.attempts}).
   */
  readonly recoverPerAttempt?: boolean;
}

/**
 * What a backend plugin declares about itself. The runner evaluates it to
 * decide how to start the plugin's sandboxed host; the plugin's code runs
 * only inside that host.
 */
export interface BackendManifest<C> {
  /** Backend name as steps write it (`backend: deno`). */
  name: string;
  /** Version of the plugin, shown by `runnel backends`. */
  version?: string;
  /**
   * What the backend can do; its `ExecutionBackend.capabilities` must say
   * the same (a plugin host whose backend says otherwise is refused).
   */
  capabilities: BackendCapabilities;
  /** Schema of the step config this backend accepts (`runnel validate` checks steps against it). */
  configSchema: z.ZodType<C>;
  /** Permissions the host needs for `fingerprint` and `recover` (no step involved). */
  hostPermissions(context: HostContext): DenoPermissions;
  /**
   * Permissions the host needs to run this attempt of this step. Hosts are
   * pooled per permission set, so a manifest that grants by stable roots
   * (the pipeline directory, the scratch root) lets steps share warm hosts.
   */
  permissions(config: C, spec: AttemptSpec): DenoPermissions;
  /**
   * The step's config as this host runs it, before it is checked: an SSH
   * host alias replaced by the connection the agent config names for it,
   * say. Absent: the config as written.
   */
  resolveConfig?(config: Record<string, unknown>, context: HostContext): Record<string, unknown>;
}

/** Whether, and which version of, a backend can run on this host. */
export interface Fingerprint {
  available: boolean;
  /** Human sentence: what was found, or why it is unavailable. */
  detail: string;
  version?: string;
}

/** Everything a backend needs to run one attempt of one step. */
export interface AttemptSpec {
  /** Agent running the attempt (`local` in local mode); backends label what they start with it. */
  agentId: string;
  /**
   * The agent's scratch root (absolute), an ancestor of `workDir` and
   * `outputsDir`: manifests grant by it, so that attempts share warm hosts.
   */
  scratchRoot: string;
  runId: string;
  stepId: string;
  attemptId: string;
  /** 1-based attempt number. */
  attempt: number;
  /** Backend-specific step config (validated against the manifest's schema). */
  config: Record<string, unknown>;
  /** Pipeline directory (absolute): relative modules and workdirs resolve against it. */
  baseDir: string;
  /** Per-attempt scratch directory (absolute); it exists. */
  workDir: string;
  /** Input name → absolute path: a file, or a directory for fan-in inputs. */
  inputs: Record<string, string>;
  /** Directory (absolute) holding the inputs, exposed as `RUNNEL_INPUTS`. */
  inputsDir: string;
  /** Directory (absolute) where each declared output is written as a file named after it; it exists. */
  outputsDir: string;
  /** Declared output file names. */
  outputs: string[];
  /** Step env plus resolved secret values. */
  env: Record<string, string>;
  /** This leg's matrix values; `{}` for a plain step. */
  matrix: Record<string, string | number | boolean>;
  /** Informational: the caller enforces it through {@link Execution.cancel}. */
  timeoutMs?: number;
  resources?: { cpu?: number; memoryBytes?: number };
}

/** A piece of a step's output as it arrives. */
export interface LogChunk {
  stream: "stdout" | "stderr";
  data: Uint8Array;
}

/**
 * How an attempt ended. It succeeded exactly when `exitCode` is 0 and
 * `errorClass` is absent (see {@link isSuccess}): a step that exits 0 but
 * leaves a declared output unwritten keeps its exit code and gets an
 * `application` error class.
 */
export interface ExitStatus {
  exitCode: number;
  /** Signal that ended the process, e.g. `SIGTERM`. */
  signal?: string;
  /** Set when the backend knows why the attempt failed. */
  errorClass?: ErrorClass;
  /** One human sentence about the failure. */
  message?: string;
  usage?: Usage;
}

/** Where a started attempt stands (Nomad's `InspectTask`). */
export interface ExecutionState {
  state: "running" | "exited";
  /** Set once exited. */
  exit?: ExitStatus;
}

/** A started attempt. */
export interface Execution {
  /**
   * Opaque to everyone but the backend (a container id; `<pid>@<startMs>`
   * for a process): the caller records it and hands it back to
   * {@link ExecutionBackend.recover} after a restart, however stale by then.
   */
  readonly handle: string;
  /** Live output; iterate it once. Output is buffered until it is read. */
  readonly logs: AsyncIterable<LogChunk>;
  /** Resolves when the attempt has ended and its output has been drained. */
  wait(): Promise<ExitStatus>;
  /** Where the attempt stands now, without waiting. */
  status(): Promise<ExecutionState>;
  /** SIGTERM to the whole process group, then SIGKILL after `graceMs` (default 5 s). */
  cancel(graceMs?: number): Promise<void>;
  /** Releases what the attempt holds (not the workDir or outputsDir, which the caller owns). */
  cleanup(): Promise<void>;
}

/** What {@link ExecutionBackend.recover} looks for. */
export interface RecoverOptions {
  /** The agent whose leftovers are wanted (`runnel.agent` label, for instance). */
  agentId: string;
  /**
   * Attempt ids the caller wants back: one still running is re-attached, one
   * that finished is reported. Everything else the agent left is reaped.
   */
  keep: string[];
  /**
   * Handles of executions the caller recorded and lost (their plugin host
   * or the runner died): reaped whether or not the backend can find them
   * otherwise. Any handle may come back: the backend checks that it still
   * names what it started (a reused pid does not) and ignores the rest.
   */
  handles?: string[];
  /**
   * The recorded attempts behind `handles`, with the spec each was started
   * with (its secrets' values left out), for backends that can reach an
   * attempt again only from its step's config
   * ({@link BackendCapabilities.recoverPerAttempt}).
   */
  attempts?: Array<{ attemptId: string; handle: string; spec: AttemptSpec }>;
  /** The host context's settings (see {@link HostContext.settings}). */
  settings?: Record<string, unknown>;
}

/** An attempt found by {@link ExecutionBackend.recover} and handed back. */
export interface RecoveredAttempt {
  attemptId: string;
  /** The re-attached execution: logs from now on, `wait` for its end. */
  execution: Execution;
}

/**
 * An execution backend: a Docker daemon, an SSH host, a Deno sandbox, a
 * shell. A step's config is checked against the manifest's `configSchema`
 * before `start` is called; `start` may check it again.
 */
export interface ExecutionBackend {
  /** Backend name as steps write it. */
  readonly name: string;
  /** What it can do; the same as its manifest declares. */
  readonly capabilities: BackendCapabilities;
  /**
   * Tells whether this host can run steps on this backend; `context`
   * carries the agent config's settings (the SSH hosts to probe, say).
   */
  fingerprint(context?: HostContext): Promise<Fingerprint>;
  /** Starts one attempt; rejects only when nothing could be started. */
  start(spec: AttemptSpec): Promise<Execution>;
  /**
   * After an agent restart: re-attaches to the attempts in `keep` that an
   * earlier process left (with {@link BackendCapabilities.reattach}), and
   * reaps everything else it left (Nomad's `RecoverTask`). Backends that
   * cannot find leftovers reap `handles` only.
   */
  recover(options: RecoverOptions): Promise<RecoveredAttempt[]>;
}

/** A step config the backend cannot run; `start` rejects with it. */
export class InvalidStepConfigError extends Error {
  /** Stable error code. */
  readonly code = "invalid_step_config";
  /** The individual problems. */
  readonly messages: string[];

  /** Builds the error from the backend name and its messages. */
  constructor(backend: string, messages: string[]) {
    super(`Expected a valid "${backend}" step config: ${messages.join("; ")}`);
    this.name = "InvalidStepConfigError";
    this.messages = messages;
  }
}

/** Checks `config` against a zod schema; returns one human message per problem. */
export function configMessages(schema: z.ZodType, config: unknown): string[] {
  const parsed = schema.safeParse(config);
  if (parsed.success) return [];
  return parsed.error.issues.map((issue) => {
    const key = issue.path.length > 0 ? `"${issue.path.join(".")}": ` : "";
    return `${key}${issue.message}`;
  });
}

/** Grace period between SIGTERM and SIGKILL on cancel, after `docker stop`'s default. */
export const DEFAULT_CANCEL_GRACE_MS = 5_000;

/** Options of {@link classifyExit}. */
export interface ClassifyExitOptions {
  /**
   * Why the attempt failed, as the backend learnt it besides the exit code
   * (the `deno` harness's nonce-bearing report, say). Used only for a
   * failed exit. Its error class must be the backend's own finding, never a
   * claim a step could print: step output is not a trusted channel.
   */
  report?: { errorClass: ErrorClass; message: string };
}

/**
 * Gives an attempt's exit its error class, the same way for every backend:
 * a clean exit 0 succeeds; a failed exit takes the class of
 * `options.report` when there is one; else a process killed by a signal is
 * an `application` error, exit {@link BUSINESS_EXIT_CODE} a `business`
 * error, and any other code an `application` error.
 *
 * A status that already has an error class (cancelled, a container killed
 * for its memory limit, a missing output) passes through unchanged, so a
 * driver may call it again on any backend's status.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { classifyExit } from "./backend.ts";
 *
 * assert.deepEqual(classifyExit({ exitCode: 0 }), { exitCode: 0 });
 * assert.deepEqual(classifyExit({ exitCode: 65 }), {
 *   exitCode: 65,
 *   errorClass: "business",
 *   message: "step reported a business error (exit code 65)",
 * });
 * const killed = classifyExit({ exitCode: 143, signal: "SIGTERM" });
 * assert.equal(killed.message, "step was killed by SIGTERM");
 * // Idempotent: a classified status passes through.
 * assert.deepEqual(classifyExit(killed), killed);
 * ```
 */
export function classifyExit(status: ExitStatus, options: ClassifyExitOptions = {}): ExitStatus {
  if (status.errorClass !== undefined) return status;
  if (status.exitCode === 0 && !status.signal) return status;
  const { report } = options;
  if (report) return { ...status, errorClass: report.errorClass, message: report.message };
  if (status.signal) {
    return { ...status, errorClass: "application", message: `step was killed by ${status.signal}` };
  }
  if (status.exitCode === BUSINESS_EXIT_CODE) {
    return {
      ...status,
      errorClass: "business",
      message: `step reported a business error (exit code ${BUSINESS_EXIT_CODE})`,
    };
  }
  return {
    ...status,
    errorClass: "application",
    message: `step exited with code ${status.exitCode}`,
  };
}

/** True when an attempt ended well: exit code 0 and no error class. */
export function isSuccess(status: ExitStatus): boolean {
  return status.exitCode === 0 && status.errorClass === undefined;
}

/**
 * Turns a name into the tail of an environment variable name: upper case,
 * every non-alphanumeric character replaced by `_` (`summary.json` →
 * `SUMMARY_JSON`).
 */
export function envVarSuffix(name: string): string {
  return name.toUpperCase().replace(/[^A-Z0-9]/g, "_");
}

/**
 * The standard `RUNNEL_*` variables every step sees.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { stepEnvironment } from "./backend.ts";
 *
 * const env = stepEnvironment({
 *   agentId: "local", scratchRoot: "/w", runId: "r1", stepId: "analyze",
 *   attemptId: "r1/analyze/1", attempt: 1, config: {}, baseDir: "/p", workDir: "/w/1",
 *   inputs: { data: "/w/1/in/data.csv" }, inputsDir: "/w/1/in", outputsDir: "/w/1/out",
 *   outputs: ["summary.json"], env: {}, matrix: { region: "eu" },
 * });
 * assert.deepEqual(env, {
 *   RUNNEL_RUN_ID: "r1",
 *   RUNNEL_STEP: "analyze",
 *   RUNNEL_ATTEMPT: "1",
 *   RUNNEL_INPUTS: "/w/1/in",
 *   RUNNEL_OUTPUTS: "/w/1/out",
 *   RUNNEL_VALUES: "/w/1/out/.runnel-values",
 *   RUNNEL_INPUT_DATA: "/w/1/in/data.csv",
 *   RUNNEL_OUTPUT_SUMMARY_JSON: "/w/1/out/summary.json",
 *   RUNNEL_MATRIX_REGION: "eu",
 * });
 * ```
 */
export function stepEnvironment(spec: AttemptSpec): Record<string, string> {
  const env: Record<string, string> = {
    RUNNEL_RUN_ID: spec.runId,
    RUNNEL_STEP: spec.stepId,
    RUNNEL_ATTEMPT: String(spec.attempt),
    RUNNEL_INPUTS: spec.inputsDir,
    RUNNEL_OUTPUTS: spec.outputsDir,
    // Where the step publishes its values (`NAME=value` lines; not an output).
    RUNNEL_VALUES: joinPath(spec.outputsDir, ".runnel-values"),
  };
  for (const [name, path] of Object.entries(spec.inputs)) {
    env[`RUNNEL_INPUT_${envVarSuffix(name)}`] = path;
  }
  for (const name of spec.outputs) {
    env[`RUNNEL_OUTPUT_${envVarSuffix(name)}`] = joinPath(spec.outputsDir, name);
  }
  for (const [key, value] of Object.entries(spec.matrix)) {
    env[`RUNNEL_MATRIX_${envVarSuffix(key)}`] = String(value);
  }
  return env;
}

/**
 * Turns a successful status into a failure naming the first declared output
 * that cannot be taken from `outputsDir` (see {@link outputProblem}); other
 * statuses pass through.
 */
export async function missingOutputStatus(
  spec: Pick<AttemptSpec, "outputsDir" | "outputs">,
  status: ExitStatus,
): Promise<ExitStatus> {
  if (!isSuccess(status)) return status;
  for (const name of spec.outputs) {
    const problem = await outputProblem(spec.outputsDir, name);
    if (problem) return { ...status, ...problem };
  }
  return status;
}

/** Why a declared output cannot be stored, as the attempt's failure says it. */
export interface OutputProblem {
  /** `application` for an output the step did not write as a file; `permission` for a link. */
  errorClass: ErrorClass;
  message: string;
}

/**
 * Why the declared output `name` cannot be taken from `outputsDir`, or
 * undefined when it is a regular file there. Nothing is followed: not a
 * name that would leave the directory, not the directory if it became a
 * link, not an output that is a symbolic link (a step that links its output
 * to `/etc/shadow` or the runner's state db must not get that file stored
 * as its artifact). Whoever then reads the file must make sure it is still
 * the same one (the attempt lifecycle moves it out of the step's reach
 * first).
 */
export async function outputProblem(
  outputsDir: string,
  name: string,
): Promise<OutputProblem | undefined> {
  if (!SAFE_NAME_PATTERN.test(name)) {
    return {
      errorClass: "permission",
      message: `declared output "${name}" is not a plain file name`,
    };
  }
  let info: Deno.FileInfo;
  try {
    const dir = await Deno.lstat(outputsDir);
    if (!dir.isDirectory) {
      return {
        errorClass: "permission",
        message: `the outputs directory was replaced by something that is not a directory`,
      };
    }
    info = await Deno.lstat(joinPath(outputsDir, name));
  } catch {
    return { errorClass: "application", message: `step did not write declared output "${name}"` };
  }
  if (info.isFile) return undefined;
  if (info.isSymlink) {
    return {
      errorClass: "permission",
      message:
        `declared output "${name}" is a symbolic link; an output must be a regular file, and links are not followed`,
    };
  }
  return {
    errorClass: "application",
    message: `declared output "${name}" is ${
      info.isDirectory ? "a directory" : "not a regular file"
    }; an output must be a regular file`,
  };
}

/** Joins an absolute directory and a file name with `/`. */
export function joinPath(dir: string, name: string): string {
  return dir.endsWith("/") ? dir + name : `${dir}/${name}`;
}
