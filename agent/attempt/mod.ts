/**
 * The one attempt lifecycle, whichever driver runs it (local mode or a
 * cluster agent):
 *
 * 1. check what it asks against the host's {@link AttemptPolicy} (refused:
 *    a `permission` failure, nothing started), make its scratch directories
 *    and fetch its inputs from the artifact store (digests verified);
 * 2. record it durably (`<stateDir>/attempts/<id>.json`: its spec and the
 *    names of its secrets, never their values), start it on its backend,
 *    and record the backend's handle;
 * 3. stream its output, masked line by line, to the driver;
 * 4. wait for its end, release what the backend holds, put its outputs into
 *    the store and turn all of it into one `AttemptResult`.
 *
 * The record is what makes a killed runner safe: whoever starts next asks
 * the backends to {@link AttemptLifecycle.recover} every recorded attempt —
 * re-attach what can be re-attached, reap the rest — so an attempt's side
 * effects never run twice beside each other. A driver {@link forget}s an
 * attempt once its result is durable on the driver's side.
 *
 * What differs between the drivers stays with them: local mode's cache and
 * log files, the agent's outbox and stream.
 *
 * @module
 */

import { StepValuesError } from "../../core/values.ts";
import { SPLIT_BACKEND, type SplitConfig } from "../../core/fanout.ts";
import { runSplit } from "./split.ts";
import { dirname } from "node:path";
import type { ArtifactStore } from "../../core/artifacts/store.ts";
import type { AttemptResult, InputLocator, Resources } from "../../core/model.ts";
import { Masker } from "../../core/secrets.ts";
import { fileSafe } from "../../core/_paths.ts";
import type { PluginHostPool } from "../../backends/mod.ts";
import {
  type AttemptSpec,
  DEFAULT_CANCEL_GRACE_MS,
  type Execution,
} from "../../backends/backend.ts";
import {
  childPath,
  collectOutputs,
  errorClassOf,
  failureOf,
  keepPartialOutputs,
  maskedLogs,
  type MaskedText,
  materializeInputs,
  readStepValues,
} from "./io.ts";
import { type AttemptPolicy, backendRefusal, checkAttempt, localPolicy } from "./policy.ts";
import {
  formatTraceparent,
  newSpanId,
  parseTraceparent,
  type TraceParent,
  TRACEPARENT_ENV,
} from "../trace/context.ts";
import type { AttributeValue, Tracer } from "../trace/exporter.ts";

/** Everything a driver decides about an attempt before it runs. */
export interface AttemptJob {
  runId: string;
  stepId: string;
  attemptId: string;
  /** 1-based attempt number. */
  attempt: number;
  backend: string;
  config: Record<string, unknown>;
  /** Pipeline directory (absolute); resolved by `resolveBaseDir` when the driver must fetch it. */
  baseDir: string;
  inputs: Record<string, InputLocator>;
  outputs: string[];
  /** Env without secrets. */
  env: Record<string, string>;
  /**
   * Secret env vars: env name → value, masked in every log line and
   * message. Kept in memory only: the attempt record names them.
   */
  secrets: Record<string, string>;
  matrix: Record<string, string | number | boolean>;
  timeoutMs?: number;
  resources?: Resources;
  /** Keep a failed attempt's outputs as `NAME.partial-ATTEMPT` (`keep-partial`). */
  keepPartial?: boolean;
  /**
   * The attempt's span in its run's trace: its input fetch, execution and
   * output upload are recorded under it, and the step gets the execution's
   * context as `TRACEPARENT`.
   */
  trace?: TraceParent;
}

/** Why a driver stops an attempt; it decides the result the attempt ends with. */
export type StopReason =
  /** The run's engine timed the step out. */
  | { kind: "timeout" }
  /** A user (or the engine, for a cancelled run) cancelled it. */
  | { kind: "cancel"; message: string }
  /** The runner itself goes away: not the step's fault, it runs again without using a retry. */
  | { kind: "shutdown"; message: string };

/** What a driver hears of a running attempt. */
export interface AttemptSink {
  /** The backend started it; `handle` is the backend's own (opaque) name for it. */
  onStarted?(handle: string): void;
  /** A masked piece of its output: whole lines, except at the very end. */
  onLog(text: MaskedText): void | Promise<void>;
}

/** An attempt in flight. */
export interface RunningAttempt {
  readonly attemptId: string;
  /** Settles with the attempt's result; never rejects. */
  readonly result: Promise<AttemptResult>;
  /** Stops it: the backend gets a cancel, and the result says why (see {@link StopReason}). */
  stop(reason: StopReason): void;
  /** Whether a stop was asked for. */
  readonly stopped: boolean;
}

/** An attempt as `<stateDir>/attempts/<id>.json` records it (mode 0600). */
export interface AttemptRecord {
  attemptId: string;
  backend: string;
  /** The spec as started (paths on this host), its env without the secrets. */
  spec: AttemptSpec;
  /**
   * Env names of the attempt's secrets. Their values are never written
   * down: whoever adopts the attempt after a restart resolves them again.
   */
  secrets: string[];
  /** The backend's handle, once started; opaque here, read only by its backend. */
  handle?: string;
  recordedAt: number;
  /** The attempt's span in its run's trace: whoever adopts it records its execution there. */
  trace?: TraceParent;
}

/** Options of {@link AttemptLifecycle}. */
export interface AttemptLifecycleOptions {
  /** Backends, in their sandboxed plugin hosts. */
  pool: PluginHostPool;
  /** Where inputs are fetched from and outputs put. */
  artifacts: ArtifactStore;
  /**
   * Directory of the attempt records (created if missing). Its parent is
   * the runner's state directory, which no step may be granted.
   */
  recordsDir: string;
  /**
   * What a pipeline may ask of this host; default {@link localPolicy} (the
   * user is the operator). An agent passes its own (`agentPolicy`).
   */
  policy?: AttemptPolicy;
  /** Agent id the backends label what they start with (`local-<run>` in local mode). */
  agentId: string | ((job: AttemptJob) => string);
  /** Grace of a stopped attempt before it is killed (default {@link DEFAULT_CANCEL_GRACE_MS}). */
  cancelGraceMs?: number;
  /** Where the spans of attempts with a {@link AttemptJob.trace} are recorded. */
  tracer?: Tracer;
}

/** What {@link AttemptLifecycle.recover} found. */
export interface RecoveredAttempts {
  /** Attempts their backend re-attached: supervise them with {@link AttemptLifecycle.adopt}. */
  reattached: Array<{ record: AttemptRecord; execution: Execution }>;
  /** Attempts whose processes are gone or were reaped: run them again. */
  lost: AttemptRecord[];
}

/**
 * Runs attempts end to end on the backends of one plugin host pool, and
 * recovers what an earlier runner recorded.
 */
export class AttemptLifecycle {
  readonly #options: AttemptLifecycleOptions;
  readonly #recordsDir: string;
  readonly #policy: AttemptPolicy;
  #recordsReady: Promise<void> | undefined;

  /** A lifecycle over `options.pool` and `options.artifacts`. */
  constructor(options: AttemptLifecycleOptions) {
    this.#options = options;
    this.#recordsDir = options.recordsDir;
    this.#policy = options.policy ?? localPolicy();
  }

  /**
   * Why this host's policy refuses every step of `backend` (for a
   * fingerprint to say so), or undefined.
   */
  backendRefusal(backend: string): string | undefined {
    return backendRefusal(this.#policy, backend);
  }

  /** The pool's scratch root: every attempt's work directory lies below it. */
  get scratchRoot(): string {
    return this.#options.pool.context.scratchRoot;
  }

  /**
   * The attempt's scratch directory: `<scratch>/<run>/<step>/<attempt>`.
   * Throws for ids that would leave the scratch root (`..`: a plan that did
   * not come through validation).
   */
  workDirOf(job: Pick<AttemptJob, "runId" | "stepId" | "attempt">): string {
    const runDir = childPath(this.scratchRoot, fileSafe(job.runId), "run id");
    const stepDir = childPath(runDir, fileSafe(job.stepId), "step id");
    return childPath(stepDir, String(job.attempt), "attempt number");
  }

  /**
   * Starts an attempt. `resolveBaseDir`, when given, is awaited first and
   * its answer replaces `job.baseDir` (an agent unpacking the run's
   * pipeline directory, say).
   */
  run(
    job: AttemptJob,
    sink: AttemptSink,
    options: { resolveBaseDir?: () => Promise<string> } = {},
  ): RunningAttempt {
    const attempt = new Attempt(this.#graceMs(), new Masker(Object.values(job.secrets)));
    attempt.result = this.#run(attempt, job, sink, options.resolveBaseDir)
      .catch((error) => attempt.failure(error));
    return attempt.handle(job.attemptId);
  }

  /**
   * Supervises an attempt a backend re-attached after a restart (see
   * {@link recover}). `options.secrets` are the values of the record's
   * secrets, resolved again by the driver (maybe later: its output waits
   * for them); when they cannot be had (undefined, or some missing), the
   * attempt's output is withheld rather than passed on unmasked.
   */
  adopt(
    { record, execution }: { record: AttemptRecord; execution: Execution },
    sink: AttemptSink,
    options: { secrets?: SecretValues | Promise<SecretValues | undefined> } = {},
  ): RunningAttempt {
    const attempt = new Attempt(this.#graceMs(), new Masker([]));
    attempt.execution = execution;
    // Its execution's span goes on under the id its step was given (in TRACEPARENT).
    const executing = parseTraceparent(record.spec.env?.[TRACEPARENT_ENV]);
    if (record.trace && parseTraceparent(formatTraceparent(record.trace)) && executing) {
      attempt.spans = new AttemptSpans(
        { ...record.spec, backend: record.backend },
        record.trace,
        record.spec.agentId,
        this.#options.tracer,
        (text) => attempt.masker.mask(text),
        executing.spanId,
      );
      attempt.spans.executing(record.recordedAt, { "runnel.recovered": true });
    }
    attempt.result = (async () => {
      const names = record.secrets ?? [];
      const values = names.length > 0 ? await options.secrets : {};
      if (values && names.every((name) => values[name] !== undefined)) {
        attempt.masker = new Masker(Object.values(values));
      } else attempt.withheld = true;
      return await this.#finish(attempt, record.spec, execution, sink);
    })().catch((error) => attempt.failure(error));
    return attempt.handle(record.attemptId);
  }

  /**
   * Reads every attempt record, and asks each backend with records (and
   * each of `alsoAsk`, which may have left attempts no record names, like a
   * container started just before a crash) to recover: attempts in `keep`
   * that are still running come back re-attached; everything else the
   * backend finds of `agentId` is reaped, and so are the recorded handles
   * it cannot re-attach (a process group left by a killed runner). A
   * backend that fails to answer recovers nothing; its attempts count as
   * lost. Records of lost attempts are removed.
   */
  async recover(options: {
    agentId: string;
    records: AttemptRecord[];
    /** Attempts wanted back; default: every record. */
    keep?: string[];
    alsoAsk?: string[];
    onDiagnostic?: (backend: string, text: string) => void;
  }): Promise<RecoveredAttempts> {
    const pool = this.#options.pool;
    const keep = new Set(options.keep ?? options.records.map((record) => record.attemptId));
    const byBackend = new Map<string, AttemptRecord[]>();
    for (const name of options.alsoAsk ?? []) {
      if (pool.source(name)) byBackend.set(name, []);
    }
    for (const record of options.records) {
      if (!pool.source(record.backend)) continue;
      byBackend.set(record.backend, [...(byBackend.get(record.backend) ?? []), record]);
    }
    const reattached = new Map<string, Execution>();
    await Promise.all([...byBackend].map(async ([backend, records]) => {
      try {
        const found = await pool.backend(backend).recover({
          agentId: options.agentId,
          keep: records.map((record) => record.attemptId).filter((id) => keep.has(id)),
          handles: records.flatMap((record) => record.handle ? [record.handle] : []),
          attempts: records.flatMap((record) =>
            record.handle
              ? [{ attemptId: record.attemptId, handle: record.handle, spec: record.spec }]
              : []
          ),
        });
        for (const { attemptId, execution } of found) {
          if (keep.has(attemptId) && !reattached.has(attemptId)) {
            reattached.set(attemptId, execution);
          } else await execution.cleanup().catch(() => {});
        }
      } catch (error) {
        options.onDiagnostic?.(backend, `recover failed: ${messageOf(error)}`);
      }
    }));
    const result: RecoveredAttempts = { reattached: [], lost: [] };
    for (const record of options.records) {
      const execution = reattached.get(record.attemptId);
      if (execution) result.reattached.push({ record, execution });
      else {
        await this.forget(record.attemptId);
        result.lost.push(record);
      }
    }
    return result;
  }

  /** The attempt records left in the records directory (unreadable ones are removed). */
  async records(filter?: (record: AttemptRecord) => boolean): Promise<AttemptRecord[]> {
    await this.#ensureRecordsDir();
    const records: AttemptRecord[] = [];
    for await (const file of Deno.readDir(this.#recordsDir)) {
      if (!file.isFile || !file.name.endsWith(".json")) continue;
      const path = `${this.#recordsDir}/${file.name}`;
      try {
        const record = JSON.parse(await Deno.readTextFile(path)) as AttemptRecord;
        if (typeof record?.attemptId !== "string" || typeof record.backend !== "string") {
          throw new Error("not an attempt record");
        }
        if (!filter || filter(record)) records.push(record);
      } catch {
        // Writes are atomic: what does not parse is not ours.
        await Deno.remove(path).catch(() => {});
      }
    }
    return records.sort((a, b) => a.recordedAt - b.recordedAt);
  }

  /** Removes an attempt's record: call once its result is durable on the driver's side. */
  forget(attemptId: string): Promise<void> {
    // Synchronous, like the other small metadata writes of every attempt
    // (its directories, its record): an unlink takes microseconds, the
    // thread-pool hop of an async op several times that (see docs/performance.md).
    try {
      Deno.removeSync(this.#recordPath(attemptId));
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) return Promise.reject(error);
    }
    return Promise.resolve();
  }

  async #run(
    attempt: Attempt,
    job: AttemptJob,
    sink: AttemptSink,
    resolveBaseDir?: () => Promise<string>,
  ): Promise<AttemptResult> {
    const workDir = this.workDirOf(job);
    const inputsDir = `${workDir}/in`;
    const outputsDir = `${workDir}/out`;
    Deno.mkdirSync(outputsDir, { recursive: true });
    if (job.backend === SPLIT_BACKEND) return await this.#split(attempt, job, sink);
    const agentId = typeof this.#options.agentId === "function"
      ? this.#options.agentId(job)
      : this.#options.agentId;
    const spans = job.trace
      ? new AttemptSpans(
        job,
        job.trace,
        agentId,
        this.#options.tracer,
        (text) => attempt.masker.mask(text),
      )
      : undefined;
    attempt.spans = spans;
    const fetching = Date.now();
    const baseDir = resolveBaseDir ? await resolveBaseDir() : job.baseDir;
    await checkAttempt(this.#policy, {
      backend: job.backend,
      config: job.config,
      baseDir,
      scratchRoot: this.scratchRoot,
      stateDir: dirname(this.#recordsDir),
    });
    const inputs = await spans?.around(
      "fetch inputs",
      fetching,
      () => materializeInputs(this.#options.artifacts, job.inputs, inputsDir),
      {
        "runnel.inputs": Object.keys(job.inputs).length,
      },
    ) ?? await materializeInputs(this.#options.artifacts, job.inputs, inputsDir);
    if (attempt.stopReason) return stoppedResult(attempt.stopReason);
    // The step's own spans (an OpenTelemetry SDK reads TRACEPARENT) hang under its execution.
    const traceEnv: Record<string, string> = spans ? { [TRACEPARENT_ENV]: spans.traceparent } : {};
    const spec: AttemptSpec = {
      agentId,
      scratchRoot: this.scratchRoot,
      runId: job.runId,
      stepId: job.stepId,
      attemptId: job.attemptId,
      attempt: job.attempt,
      config: job.config,
      baseDir,
      workDir,
      inputs,
      inputsDir,
      outputsDir,
      outputs: job.outputs,
      env: { ...job.env, ...traceEnv, ...job.secrets },
      matrix: job.matrix,
      ...(job.timeoutMs !== undefined ? { timeoutMs: job.timeoutMs } : {}),
      ...(job.resources ? { resources: job.resources } : {}),
    };
    // Recorded before anything starts: a runner that dies from here on
    // leaves a record that names the backend (and, once known, the handle).
    // A backend that can neither re-attach nor recover by attempt finds
    // nothing from a record without a handle: it is recorded once, with it.
    const record: AttemptRecord = {
      attemptId: job.attemptId,
      backend: job.backend,
      spec: { ...spec, env: { ...job.env, ...traceEnv } },
      secrets: Object.keys(job.secrets),
      recordedAt: Date.now(),
      ...(job.trace ? { trace: job.trace } : {}),
    };
    const capabilities = this.#options.pool.declaredCapabilities(job.backend);
    if (!capabilities || capabilities.reattach || capabilities.recoverPerAttempt) {
      await this.#save(record);
    }
    spans?.executing();
    const execution = await this.#options.pool.backend(job.backend).start(spec);
    attempt.execution = execution;
    record.handle = execution.handle;
    // Written while the step runs (a short step is not held up by it); the
    // attempt ends only once it is, so that `forget` comes after it.
    const saved = this.#save(record);
    saved.catch(() => {});
    sink.onStarted?.(execution.handle);
    if (attempt.stopReason) attempt.cancel();
    try {
      return await this.#finish(attempt, spec, execution, sink, job.keepPartial === true);
    } finally {
      await saved;
    }
  }

  /**
   * A split node's attempt (`batch:` / `foreach:`): runnel's own work, no
   * backend and no user code. It fetches the input, splits it in one pass
   * into the outputs directory, and stores the batches as its outputs.
   */
  async #split(attempt: Attempt, job: AttemptJob, sink: AttemptSink): Promise<AttemptResult> {
    const workDir = this.workDirOf(job);
    const outputsDir = `${workDir}/out`;
    const config = job.config as unknown as SplitConfig;
    const inputs = await materializeInputs(this.#options.artifacts, job.inputs, `${workDir}/in`);
    if (attempt.stopReason) return stoppedResult(attempt.stopReason);
    const path = inputs[config.input];
    if (path === undefined) {
      return {
        ok: false,
        errorClass: "artifact",
        message: `Expected input "${config.input}" to split`,
      };
    }
    sink.onStarted?.(`split@${Date.now()}`);
    const started = performance.now();
    const outcome = await runSplit(
      config,
      path,
      outputsDir,
      () => attempt.stopReason !== undefined,
    );
    const outputs = await collectOutputs(this.#options.artifacts, {
      runId: job.runId,
      stepId: job.stepId,
      attemptId: job.attemptId,
      outputsDir,
      outputs: outcome.outputs,
    });
    const bytes = Object.values(outputs).reduce((sum, ref) => sum + (ref.size ?? 0), 0);
    await sink.onLog({
      stream: "stdout",
      text: `runnel: ${config.mode === "foreach" ? "read" : "split"} input "${config.input}" ` +
        `into ${outcome.legs.length} leg${outcome.legs.length === 1 ? "" : "s"}` +
        (config.mode === "foreach" ? "" : ` (${bytes} bytes)`) +
        ` in ${Math.round(performance.now() - started)} ms\n`,
    });
    await Deno.remove(workDir, { recursive: true }).catch(() => {});
    return { ok: true, exitCode: 0, outputs, fanOut: outcome.legs };
  }

  /** Streams an execution's logs, waits for its end, stores its outputs: its result. */
  async #finish(
    attempt: Attempt,
    spec: AttemptSpec,
    execution: Execution,
    sink: AttemptSink,
    keepPartial = false,
  ): Promise<AttemptResult> {
    let released: Promise<void> | undefined;
    try {
      const logsDone = (async () => {
        if (attempt.withheld) {
          await sink.onLog({ stream: "stderr", text: `${WITHHELD}\n` });
          for await (const _ of execution.logs) {
            // Drained unread: without the secrets it could not be masked.
          }
          return;
        }
        for await (const text of maskedLogs(execution.logs, attempt.masker)) await sink.onLog(text);
      })();
      const exit = await execution.wait();
      await logsDone;
      // Released while the outputs are stored; the attempt ends after both.
      released = execution.cleanup().catch(() => {});
      const failure = failureOf(exit, attempt.masker);
      if (failure && !failure.ok && attempt.withheld) failure.message = WITHHELD;
      attempt.spans?.executed(failure ?? undefined, exit.exitCode);
      if (failure && attempt.stopReason) {
        return {
          ...stoppedResult(attempt.stopReason),
          ...(exit.usage ? { usage: exit.usage } : {}),
        };
      }
      if (failure) {
        if (keepPartial && !attempt.stopReason) {
          const kept = await keepPartialOutputs(this.#options.artifacts, spec).catch(() => []);
          for (const name of kept) {
            await sink.onLog({ stream: "stderr", text: `runnel: kept partial output ${name}\n` });
          }
        }
        return failure;
      }
      let values: Record<string, string> | undefined;
      try {
        values = await readStepValues(spec.outputsDir);
      } catch (error) {
        if (!(error instanceof StepValuesError)) throw error;
        return { ok: false, errorClass: "application", exitCode: 0, message: error.message };
      }
      const outputs = await attempt.spans?.around(
        "upload outputs",
        Date.now(),
        () => collectOutputs(this.#options.artifacts, spec),
        { "runnel.outputs": spec.outputs.length },
      ) ?? await collectOutputs(this.#options.artifacts, spec);
      // The outputs are in the artifact store now; a failed attempt's
      // scratch directory is kept for inspection (swept after the retention period).
      await Deno.remove(spec.workDir, { recursive: true }).catch(() => {});
      return {
        ok: true,
        exitCode: 0,
        outputs,
        ...(values && Object.keys(values).length > 0 ? { values } : {}),
        ...(exit.usage ? { usage: exit.usage } : {}),
      };
    } finally {
      await released;
    }
  }

  #graceMs(): number {
    return this.#options.cancelGraceMs ?? DEFAULT_CANCEL_GRACE_MS;
  }

  async #save(record: AttemptRecord): Promise<void> {
    await this.#ensureRecordsDir();
    await writeJsonAtomic(this.#recordPath(record.attemptId), record, { mode: 0o600 });
  }

  #ensureRecordsDir(): Promise<void> {
    this.#recordsReady ??= Deno.mkdir(this.#recordsDir, { recursive: true });
    return this.#recordsReady;
  }

  #recordPath(attemptId: string): string {
    return `${this.#recordsDir}/${fileSafe(attemptId)}.json`;
  }
}

/** Secret values by env name. */
export type SecretValues = Record<string, string>;

/** What stands for the output of an adopted attempt whose secrets could not be had again. */
const WITHHELD = "[runnel] output withheld: the runner restarted and could not get this " +
  "attempt's secret values again to mask it";

/** The state of one attempt in flight, shared by its run and its handle. */
class Attempt {
  execution: Execution | undefined;
  stopReason: StopReason | undefined;
  result!: Promise<AttemptResult>;
  /** Its secrets are unknown: nothing it prints is passed on. */
  withheld = false;
  /** Its spans, when its job is traced. */
  spans: AttemptSpans | undefined;

  constructor(readonly graceMs: number, public masker: Masker) {}

  cancel(): void {
    this.execution?.cancel(this.graceMs).catch(() => {});
  }

  /** The result of something thrown while preparing, starting or finishing. */
  failure(error: unknown): AttemptResult {
    const result = this.#failure(error);
    if (!result.ok) this.spans?.executed(result);
    return result;
  }

  #failure(error: unknown): AttemptResult {
    if (this.stopReason) return stoppedResult(this.stopReason);
    // Nothing ran: the machine's fault, not the step's (see isResourceExhaustion).
    if (!this.execution && isResourceExhaustion(error)) {
      return exhaustedResult(this.masker.mask(messageOf(error)));
    }
    return {
      ok: false,
      errorClass: errorClassOf(error),
      message: this.withheld ? WITHHELD : this.masker.mask(messageOf(error)),
    };
  }

  handle(attemptId: string): RunningAttempt {
    // deno-lint-ignore no-this-alias
    const attempt = this;
    return {
      attemptId,
      result: attempt.result,
      get stopped() {
        return attempt.stopReason !== undefined;
      },
      stop(reason: StopReason) {
        if (attempt.stopReason) return;
        attempt.stopReason = reason;
        attempt.cancel();
      },
    };
  }
}

/**
 * The spans an attempt records where it runs, under its attempt span:
 * `fetch inputs`, `execute` (whose context the step gets as
 * `TRACEPARENT`) and `upload outputs`.
 */
class AttemptSpans {
  #executingSince: number | undefined;
  #executingAttributes: Record<string, AttributeValue> = {};
  readonly #attributes: Record<string, AttributeValue>;

  constructor(
    job: Pick<AttemptJob, "runId" | "stepId" | "attemptId" | "attempt" | "backend">,
    readonly parent: TraceParent,
    agentId: string,
    readonly tracer: Tracer | undefined,
    /** Masks the attempt's secrets out of an error's message. */
    readonly mask: (text: string) => string,
    /** The execution's span id: known before it starts, for the step's env. */
    readonly executeSpanId: string = newSpanId(),
  ) {
    this.#attributes = {
      "runnel.run.id": job.runId,
      "runnel.step.id": job.stepId,
      "runnel.attempt.id": job.attemptId,
      "runnel.attempt": job.attempt,
      "runnel.backend": job.backend,
      "runnel.worker": agentId,
    };
  }

  /** The step's `TRACEPARENT`: the execution span. */
  get traceparent(): string {
    return formatTraceparent({ traceId: this.parent.traceId, spanId: this.executeSpanId });
  }

  /** Runs `work` as a span from `startMs` (failed if it throws). */
  async around<T>(
    name: string,
    startMs: number,
    work: () => Promise<T>,
    attributes: Record<string, AttributeValue> = {},
  ): Promise<T> {
    try {
      const value = await work();
      this.#record(name, newSpanId(), startMs, attributes);
      return value;
    } catch (error) {
      this.#record(name, newSpanId(), startMs, attributes, this.mask(messageOf(error)));
      throw error;
    }
  }

  /** The execution begins (began, for an adopted attempt) at `since`. */
  executing(since = Date.now(), attributes: Record<string, AttributeValue> = {}): void {
    this.#executingSince = since;
    this.#executingAttributes = attributes;
  }

  /** The execution ended (or failed to start), once; nothing if it never began. */
  executed(failure?: AttemptResult, exitCode?: number): void {
    const since = this.#executingSince;
    if (since === undefined) return;
    this.#executingSince = undefined;
    const failed = failure && !failure.ok ? failure : undefined;
    this.#record("execute", this.executeSpanId, since, {
      ...this.#executingAttributes,
      ...(exitCode !== undefined ? { "runnel.exit_code": exitCode } : {}),
      ...(failed ? { "error.type": failed.errorClass } : {}),
    }, failed?.message);
  }

  #record(
    name: string,
    spanId: string,
    startMs: number,
    attributes: Record<string, AttributeValue>,
    error?: string,
  ): void {
    this.tracer?.record({
      traceId: this.parent.traceId,
      spanId,
      parentSpanId: this.parent.spanId,
      name,
      startMs,
      endMs: Date.now(),
      attributes: { ...this.#attributes, ...attributes },
      ...(error !== undefined ? { error } : {}),
    });
  }
}

/** The result of an attempt stopped on purpose. */
export function stoppedResult(reason: StopReason): AttemptResult {
  switch (reason.kind) {
    case "shutdown":
      // Not the step's failure: it runs again elsewhere without using its retries.
      return { ok: false, errorClass: "infrastructure", message: reason.message, lost: true };
    case "timeout":
      return { ok: false, errorClass: "timeout", message: "the step ran past its timeout" };
    case "cancel":
      return { ok: false, errorClass: "cancelled", message: `cancelled: ${reason.message}` };
  }
}

/**
 * The errors of a machine out of open files, processes or memory (EMFILE,
 * ENFILE, EAGAIN from fork, ENOMEM). 1,000 steps started at once failed 889
 * times with "Too many open files": an attempt that cannot start for that
 * is lost, and runs again without using the step's retries. A full disk is
 * not among them: it stays full until someone frees it.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { isResourceExhaustion } from "./mod.ts";
 *
 * const error = new Error("Failed to spawn 'sh': Too many open files (os error 24)");
 * assert.equal(isResourceExhaustion(error), true);
 * assert.equal(isResourceExhaustion(new Error("No space left on device (os error 28)")), false);
 * ```
 */
export function isResourceExhaustion(error: unknown): boolean {
  const code = (error as { code?: unknown })?.code;
  return RESOURCE_EXHAUSTION.test(`${messageOf(error)} ${typeof code === "string" ? code : ""}`);
}

const RESOURCE_EXHAUSTION =
  /\b(?:EMFILE|ENFILE|EAGAIN|ENOMEM)\b|os error (?:11|12|23|24)\b|too many open files|cannot allocate memory|resource temporarily unavailable/i;

/** The result of an attempt that could not start for want of a resource: lost, not failed. */
export function exhaustedResult(message: string): AttemptResult {
  return {
    ok: false,
    errorClass: "infrastructure",
    message: `The machine ran out of resources to start the attempt: ${message}`,
    lost: true,
  };
}

/**
 * Writes JSON to a temporary file and renames it over `path`: readers never
 * see half a file. Synchronous underneath: the files are a few KiB, and an
 * async write and rename cost several times that in thread-pool hops.
 */
export function writeJsonAtomic(
  path: string,
  value: unknown,
  options: { mode?: number } = {},
): Promise<void> {
  try {
    writeJsonAtomicSync(path, value, options);
    return Promise.resolve();
  } catch (error) {
    return Promise.reject(error);
  }
}

function writeJsonAtomicSync(path: string, value: unknown, options: { mode?: number }): void {
  const temporary = `${path}.${crypto.randomUUID().slice(0, 8)}.tmp`;
  try {
    Deno.writeTextFileSync(temporary, JSON.stringify(value), { mode: options.mode });
    Deno.renameSync(temporary, path);
  } catch (error) {
    // A full disk leaves a partial temporary file: it is nobody's.
    try {
      Deno.removeSync(temporary);
    } catch {
      // Never made, or gone.
    }
    throw error;
  }
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

export type { MaskedText };
