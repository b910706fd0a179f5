/**
 * Local mode's driver of the pure engine, in the manner of an etcd-io/raft
 * application: feed it an event, persist the step states it changed (one
 * store transaction), then perform the effects it returned — start an
 * attempt (through the shared {@link AttemptLifecycle}), stop one, arm a
 * timer, call a webhook. Persisting before acting is what makes a SIGKILL at
 * any instant safe: the store never records less than what was acted upon,
 * so `resume` can always finish the run.
 *
 * What is local mode's own: the step cache and the log files.
 *
 * @module
 */

import type { RunEngine } from "../../core/engine.ts";
import type {
  ArtifactRef,
  AttemptResult,
  Effect,
  EngineEvent,
  Plan,
  PlannedStep,
  RunStatus,
  StepState,
  StepStatus,
} from "../../core/model.ts";
import { attemptGets } from "../../core/attempt.ts";
import { resolveSecrets, type SecretStore } from "../../core/secrets.ts";
import type { PluginHostPool, PoolMetrics } from "../../backends/mod.ts";
import type {
  AttemptLifecycle,
  AttemptRecord,
  AttemptSink,
  RunningAttempt,
  StopReason,
} from "../attempt/mod.ts";
import { exhaustedResult, isResourceExhaustion, stoppedResult } from "../attempt/mod.ts";
import { PIPELINE_BACKEND } from "../../core/schema.ts";
import type { SubPipelineConfig } from "../../core/plan.ts";
import { errorClassOf } from "../attempt/io.ts";
import type { Execution } from "../../backends/backend.ts";
import { type SmtpSettings, WakeTimer, WebhookNotifier } from "../effects.ts";
import { cacheKeyOf, restoreFromCache, saveToCache } from "./cache.ts";
import type { Tracer } from "../trace/exporter.ts";
import { RunTrace } from "../trace/run_spans.ts";
import {
  claimRun,
  diskFullError,
  isDiskFull,
  localKeys,
  type LocalState,
  logPath,
  persistRun,
  persistRunOrdered,
  releaseReserve,
  type RunRecord,
} from "./state.ts";

/** Longest the run waits, after finishing, for on-failure webhooks still in flight. */
const WEBHOOK_DRAIN_MS = 15_000;

/**
 * Longest an applied attempt start waits for a commit to ride with. The
 * store then says `running` instead of `scheduled`; a runner that dies
 * before loses nothing: a resume counts the attempt lost either way.
 */
const START_COMMIT_DELAY_MS = 100;

/** Effects performed once their batch is ordered in the store, before it is durable. */
const ACTS_ON_ORDER = new Set<Effect["type"]>(["StartAttempt", "StopAttempt", "WakeAt"]);

/** Something a user interface may show while a run goes on. */
export type RunEvent =
  | { type: "run"; runId: string; pipeline: string; status: RunStatus; at: number; steps: string[] }
  | {
    type: "step";
    runId: string;
    stepId: string;
    status: StepStatus;
    attempt: number;
    at: number;
    reason?: string;
    cached?: boolean;
  }
  | {
    type: "log";
    runId: string;
    stepId: string;
    attempt: number;
    stream: "stdout" | "stderr";
    text: string;
  }
  | { type: "webhook"; runId: string; stepId: string; ok: boolean; detail: string };

/** What a finished (or cancelled) run amounts to. */
export interface RunSummary {
  runId: string;
  status: RunStatus;
  steps: Record<string, StepState>;
  /** Plugin host counters of the run's pool (cold starts, warm hits). */
  hosts?: PoolMetrics;
  startedAt: number;
  finishedAt: number;
}

/** What the driver needs besides the plan and the engine. */
export interface LocalDriverContext {
  state: LocalState;
  record: RunRecord;
  pool: PluginHostPool;
  lifecycle: AttemptLifecycle;
  now: () => number;
  onEvent?: (event: RunEvent) => void;
  signal?: AbortSignal;
  /** Where the pipeline's `{ env }` secret references are read. */
  env?: (name: string) => string | undefined;
  /** The user's declared secrets, which the pipeline's named references resolve through. */
  secrets?: SecretStore;
  /** The SMTP server email alerts go through (`--smtp`). */
  smtp?: SmtpSettings;
  /** Runs the child of a `pipeline:` step to its end. */
  runChild?: (request: ChildRequest) => Promise<RunSummary>;
  /** Where the run's spans are recorded (`--otlp-endpoint`). */
  tracer?: Tracer;
}

/** What a `pipeline:` step asks of its driver: a child run. */
export interface ChildRequest {
  config: SubPipelineConfig;
  /** The parent's pipeline directory: the child's file is relative to it. */
  baseDir: string;
  parent: { runId: string; stepId: string; attemptId: string };
  signal: AbortSignal;
  onEvent: (event: RunEvent) => void;
}

/** One attempt in flight. */
interface ActiveAttempt {
  stepId: string;
  attempt: number;
  /** Set once the engine stopped it: the engine already recorded its outcome. */
  stopped?: "cancel" | "timeout";
  /** Its backend started it: it holds processes, pipes, files until it ends. */
  started?: boolean;
  /** It could not start for want of a resource (and was reported lost). */
  starved?: boolean;
  running?: RunningAttempt;
  done: Promise<void>;
}

/** Drives one run of the engine to its end in this process. */
export class LocalDriver {
  readonly #plan: Plan;
  readonly #engine: RunEngine;
  readonly #context: LocalDriverContext;
  readonly #now: () => number;
  readonly #active = new Map<string, ActiveAttempt>();
  readonly #wake: WakeTimer;
  readonly #webhooks: WebhookNotifier;
  readonly #trace: RunTrace;
  #queue: Promise<void> = Promise.resolve();
  /** The effects of persisted batches that wait for their batch to be durable, in order. */
  #announced: Promise<void> = Promise.resolve();
  /** Events to apply; an item without an event only asks for a commit. */
  readonly #pending: Array<{ event?: EngineEvent; ignoreFinish: boolean }> = [];
  /** Set while applied starts wait for their commit (see {@link START_COMMIT_DELAY_MS}). */
  #startCommit: ReturnType<typeof setTimeout> | undefined;
  /**
   * How many attempts may be in flight: unbounded (the engine's concurrency
   * decides) until one cannot start for want of a resource; then as many as
   * held resources at that moment, growing by one after as many successes,
   * in the manner of TCP's congestion window.
   */
  #admitLimit = Infinity;
  #successesSinceGrowth = 0;
  /** Attempts whose work is not over. */
  #inFlight = 0;
  /** Why the store could not take the run's state (no write is tried after that). */
  #unrecorded: unknown;
  /** The store holds the run: a resume can finish it. */
  #recorded: boolean;
  /** Attempts the engine started that wait for the admission limit, in order. */
  readonly #admission = new Map<string, () => void>();
  #draining = false;
  #logDirReady?: Promise<unknown>;
  #finished?: (status: RunStatus) => void;
  #failed?: (error: unknown) => void;

  /** A driver of `engine` for `plan`. */
  constructor(plan: Plan, engine: RunEngine, context: LocalDriverContext) {
    this.#plan = plan;
    this.#engine = engine;
    this.#context = context;
    this.#now = context.now;
    this.#recorded = engine.state.status !== "pending";
    this.#trace = new RunTrace(context.record, context.tracer);
    this.#wake = new WakeTimer(() => this.#submit({ type: "Tick", now: this.#now() }), this.#now);
    this.#webhooks = new WebhookNotifier(
      (outcome) => this.#emit({ type: "webhook", ...outcome }),
      undefined,
      context.smtp,
    );
  }

  /**
   * Applies `initial` (a Start, or the losses and the Resume of a resumed
   * run), supervises the attempts a backend re-attached, and drives the run
   * to its end.
   */
  async drive(
    initial: EngineEvent[],
    reattached: Array<{ record: AttemptRecord; execution: Execution }> = [],
  ): Promise<RunSummary> {
    const { state, record, signal } = this.#context;
    const store = state.store;
    const runId = record.runId;
    const release = await claimRun(store, runId, this.#now()).catch((error) => {
      throw isDiskFull(error) ? this.#diskFull(error) : error;
    });
    const watchAbort = new AbortController();
    const finished = new Promise<RunStatus>((resolve, reject) => {
      this.#finished = resolve;
      this.#failed = reject;
    });
    const onAbort = () => this.#submit({ type: "Cancel", now: this.#now(), reason: "interrupted" });
    signal?.addEventListener("abort", onAbort, { once: true });
    this.#watchCancelRequests(watchAbort.signal);
    this.#watchApprovals(watchAbort.signal);
    try {
      await (await this.#persist()).durable;
      this.#emitRun("running");
      for (const { record, execution } of reattached) this.#adopt(record, execution);
      // Only the last initial event may finish the run: an AttemptLost
      // replayed before a Resume can end the run for a moment, and that
      // passing end is not the outcome.
      initial.forEach((event, i) => this.#submit(event, i < initial.length - 1));
      if (signal?.aborted) onAbort();
      // A run resumed when every step is already terminal finishes at once.
      this.#submit({ type: "Tick", now: this.#now() });
      const status = await finished.catch(async (error) => {
        // Nothing more can be recorded: stop what runs, so that nothing keeps
        // writing; the store still says they run, so a resume runs them again.
        const stopping = [...this.#active.values()];
        for (const active of stopping) {
          active.running?.stop({ kind: "shutdown", message: "the runner stopped" });
        }
        await Promise.allSettled(stopping.map((a) => a.done));
        throw error;
      });
      await this.#queue;
      await this.#announced;
      // Stopped steps: wait for their processes to be gone before returning.
      await Promise.allSettled([...this.#active.values()].map((a) => a.done));
      await this.#webhooks.drain(WEBHOOK_DRAIN_MS);
      this.#emitRun(status);
      return {
        runId,
        status,
        steps: structuredClone(this.#engine.state.steps),
        hosts: this.#context.pool.metrics(),
        startedAt: this.#engine.state.startedAt ?? record.createdAt,
        finishedAt: this.#engine.state.finishedAt ?? this.#now(),
      };
    } finally {
      signal?.removeEventListener("abort", onAbort);
      clearTimeout(this.#startCommit);
      watchAbort.abort();
      this.#wake.clear();
      await release();
    }
  }

  /**
   * Queues an event. Events are applied in order, and every event that
   * arrived while the last batch was being persisted is applied as one batch
   * with one store transaction (group commit): fewer fsyncs, same guarantee.
   */
  #submit(event: EngineEvent, ignoreFinish = false): void {
    this.#pending.push({ event, ignoreFinish });
    if (!this.#draining) this.#queue = this.#drain();
  }

  async #drain(): Promise<void> {
    this.#draining = true;
    try {
      while (this.#pending.length > 0) {
        const batch = this.#pending.splice(0);
        const effects: Effect[] = [];
        let deferrable = true;
        for (const { event, ignoreFinish } of batch) {
          if (!event || event.type !== "AttemptStarted") deferrable = false;
          if (!event) continue;
          for (const effect of this.#engine.step(event).effects) {
            // Replayed losses before a resume end the run (and may fail steps)
            // only for a moment: showing or announcing that would mislead.
            const passing = effect.type === "RunFinished" || effect.type === "StepStatus" ||
              effect.type === "Notify" || effect.type === "NotifyRun" || effect.type === "Alert";
            if (ignoreFinish && passing) continue;
            effects.push(effect);
          }
        }
        // Persist before acting: the store never knows less than was done.
        // A batch of starts alone acts on nothing that must be durable (a
        // status shown, a deadline armed): its commit may wait a moment for
        // the next batch's, which writes it too: one commit a step, not two.
        let durable = Promise.resolve();
        if (deferrable) this.#deferCommit();
        else {
          clearTimeout(this.#startCommit);
          this.#startCommit = undefined;
          durable = (await this.#persist()).durable;
        }
        // Starting and stopping attempts need the batch only ordered in the
        // store's log: whatever they lead to is written after it, so it can
        // only be durable once this batch is (a crash before loses both, and
        // a resume counts those attempts lost). What is announced (statuses,
        // webhooks, the run's end) waits until the batch is durable.
        const announced: Effect[] = [];
        for (const effect of effects) {
          if (ACTS_ON_ORDER.has(effect.type)) this.#perform(effect);
          else announced.push(effect);
        }
        const events = batch.flatMap(({ event }) => event ? [event] : []);
        this.#announced = this.#announced.then(() => durable).then(() => {
          this.#traceEnded(events, effects);
          for (const effect of announced) this.#perform(effect);
        });
        this.#announced.catch((error) => this.#failed?.(error));
      }
    } catch (error) {
      this.#failed?.(error);
    } finally {
      this.#draining = false;
    }
  }

  /** Commits the applied starts within {@link START_COMMIT_DELAY_MS}, unless a batch does first. */
  #deferCommit(): void {
    this.#startCommit ??= setTimeout(() => {
      this.#startCommit = undefined;
      this.#pending.push({ ignoreFinish: false });
      if (!this.#draining) this.#queue = this.#drain();
    }, START_COMMIT_DELAY_MS);
  }

  /**
   * Writes the run record and the changed steps; resolves once the write is
   * ordered in the store's log, with the promise of its durability. On a
   * full disk the state directory's reserve is given up for one more try: a
   * step that filled the disk then fails and the run is recorded as failed.
   * Without room, the run stays as last recorded (resumable) and the error
   * says so.
   */
  async #persist(): Promise<{ durable: Promise<void> }> {
    const { state, record } = this.#context;
    // After a write failed for good, the store keeps the last state it took whole.
    if (this.#unrecorded) throw this.#unrecorded;
    try {
      const ordered = await persistRunOrdered(state.store, record, this.#engine);
      this.#recorded = true;
      return ordered;
    } catch (error) {
      this.#unrecorded = error;
      if (!isDiskFull(error)) throw error;
      this.#unrecorded = this.#diskFull(error);
      if (!(await releaseReserve(state.paths))) throw this.#unrecorded;
      try {
        // The failed write drained the changed steps: write them all.
        await persistRun(state.store, record, this.#engine, { all: true });
      } catch (again) {
        if (!isDiskFull(again)) this.#unrecorded = again;
        throw this.#unrecorded;
      }
      this.#unrecorded = undefined;
      this.#recorded = true;
      return { durable: Promise.resolve() };
    }
  }

  /** The error of a full disk, naming the run when a resume can finish it. */
  #diskFull(error: unknown): Error {
    const { state, record } = this.#context;
    return diskFullError(state.paths, error, this.#recorded ? record.runId : undefined);
  }

  /** Records the spans of the attempts (and the run) that the persisted batch ended. */
  #traceEnded(events: EngineEvent[], effects: Effect[]): void {
    if (!this.#trace.enabled) return;
    const state = this.#engine.state;
    for (const item of [...events, ...effects]) {
      if (
        item.type === "AttemptExited" || item.type === "AttemptLost" ||
        item.type === "StopAttempt"
      ) {
        this.#trace.attemptEnded(this.#plan, state, item.stepId, item.attemptId);
      } else if (item.type === "RunFinished") this.#trace.runFinished(state, this.#now());
    }
  }

  #perform(effect: Effect): void {
    switch (effect.type) {
      case "StartAttempt":
        this.#admission.set(
          effect.attemptId,
          () =>
            this.#track(effect.attemptId, effect.stepId, effect.attempt, (active) => {
              this.#trace.queueWait(
                this.#engine.state,
                effect.stepId,
                effect.attemptId,
                this.#now(),
                "local",
              );
              this.#submit({
                type: "AttemptStarted",
                stepId: effect.stepId,
                attemptId: effect.attemptId,
                now: this.#now(),
                worker: "local",
              });
              return this.#start(active, effect.attemptId);
            }),
        );
        this.#admit();
        break;
      case "StopAttempt": {
        // Stopped before it was admitted: nothing of it runs.
        if (this.#admission.delete(effect.attemptId)) break;
        const active = this.#active.get(effect.attemptId);
        if (active && !active.stopped) {
          active.stopped = effect.reason;
          active.running?.stop(stopReasonOf(effect.reason));
        }
        break;
      }
      case "WakeAt":
        this.#wake.arm(effect.at);
        break;
      case "Notify":
        this.#webhooks.notify(effect.webhook, effect.failure);
        break;
      case "NotifyRun":
        this.#webhooks.notifyRun(effect.webhook, effect.notice);
        break;
      case "Alert":
        this.#webhooks.alert(effect.email, effect.notice);
        break;
      case "StepStatus": {
        const step = this.#engine.state.steps[effect.stepId];
        this.#emit({
          type: "step",
          runId: this.#context.record.runId,
          stepId: effect.stepId,
          status: effect.status,
          attempt: effect.attempt,
          at: effect.at,
          reason: effect.reason,
          cached: step?.cached,
        });
        break;
      }
      case "RunFinished":
        this.#finished?.(effect.status);
        break;
    }
  }

  /** Keeps `work` as the attempt's life until it settles. */
  #track(
    attemptId: string,
    stepId: string,
    attempt: number,
    work: (active: ActiveAttempt) => Promise<void>,
  ): void {
    const active: ActiveAttempt = { stepId, attempt, done: Promise.resolve() };
    this.#active.set(attemptId, active);
    this.#inFlight += 1;
    active.done = work(active)
      .catch((error) => this.#failed?.(error))
      .finally(() => {
        this.#active.delete(attemptId);
        this.#inFlight -= 1;
        if (active.started && !active.starved && Number.isFinite(this.#admitLimit)) {
          this.#successesSinceGrowth += 1;
          if (this.#successesSinceGrowth >= this.#admitLimit) {
            this.#successesSinceGrowth = 0;
            this.#admitLimit += 1;
          }
        }
        this.#admit();
      });
  }

  /** Starts the attempts waiting for admission, in order, while the limit allows. */
  #admit(): void {
    for (const [attemptId, start] of this.#admission) {
      // One at least: with nothing in flight, waiting frees nothing.
      if (this.#inFlight > 0 && this.#inFlight >= this.#admitLimit) return;
      this.#admission.delete(attemptId);
      start();
    }
  }

  /** Supervises an attempt a backend re-attached after a runner restart. */
  #adopt(record: AttemptRecord, execution: Execution): void {
    const running = this.#engine.runningAttempts().find((a) => a.attemptId === record.attemptId);
    if (!running) {
      execution.cleanup().catch(() => {});
      this.#context.lifecycle.forget(record.attemptId).catch(() => {});
      return;
    }
    this.#track(record.attemptId, running.stepId, record.spec.attempt, async (active) => {
      active.started = true;
      const log = this.#openLog(active);
      try {
        // The record names the secrets; their values are resolved again here.
        let secrets: Record<string, string> | undefined;
        try {
          secrets = resolveSecrets(this.#plan.secrets, record.secrets ?? [], {
            env: this.#context.env,
            store: this.#context.secrets,
          });
        } catch {
          secrets = undefined;
        }
        active.running = this.#context.lifecycle.adopt({ record, execution }, log, { secrets });
        if (active.stopped) active.running.stop(stopReasonOf(active.stopped));
        const result = await active.running.result;
        this.#report(active, record.attemptId, log.failure ?? result);
      } finally {
        log.close();
      }
    });
  }

  /** Runs a new attempt: from the cache when it can, on its backend otherwise. */
  async #start(active: ActiveAttempt, attemptId: string): Promise<void> {
    const plan = this.#plan;
    const step = plan.steps[active.stepId];
    const runId = this.#context.record.runId;
    const lifecycle = this.#context.lifecycle;
    let result: AttemptResult;
    let cacheKey: string | undefined;
    let log: LogFile | undefined;
    try {
      const gets = attemptGets(plan, runId, this.#engine.state.steps, step.id);
      const secrets = resolveSecrets(plan.secrets, gets.secrets, {
        env: this.#context.env,
        store: this.#context.secrets,
      });
      if (step.cache) {
        cacheKey = cacheKeyOf(step, gets.inputs, gets.values);
        const outputs = await restoreFromCache(this.#context.state, cacheKey, {
          runId,
          stepId: step.id,
          attemptId,
          outputs: step.outputs,
          dir: `${lifecycle.workDirOf({ runId, stepId: step.id, attempt: active.attempt })}.cached`,
        });
        if (outputs) {
          return this.#report(active, attemptId, { ok: true, exitCode: 0, outputs, cached: true });
        }
      }
      log = this.#openLog(active);
      if (active.stopped) return;
      if (step.backend === PIPELINE_BACKEND) {
        active.started = true;
        active.running = this.#child(step, gets.config, attemptId, log);
        result = await active.running.result;
        return this.#report(active, attemptId, log.failure ?? result);
      }
      const sink = {
        onLog: log.onLog,
        onStarted: () => {
          active.started = true;
        },
      };
      active.running = lifecycle.run({
        runId,
        stepId: step.id,
        attemptId,
        attempt: active.attempt,
        backend: step.backend,
        config: gets.config,
        baseDir: plan.baseDir,
        inputs: gets.inputs,
        outputs: step.outputs,
        ...(step.keepPartial ? { keepPartial: true } : {}),
        env: gets.env,
        secrets,
        matrix: step.matrix ?? {},
        ...(step.timeoutMs !== undefined ? { timeoutMs: step.timeoutMs } : {}),
        resources: step.resources,
        trace: this.#trace.attemptParent(attemptId),
      }, sink);
      result = await active.running.result;
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      result = isResourceExhaustion(error) ? exhaustedResult(message) : {
        ok: false,
        errorClass: errorClassOf(error),
        message,
      };
    } finally {
      log?.close();
    }
    if (log?.failure) result = log.failure;
    if (result.ok && cacheKey && !active.stopped) {
      // The cache saves time; a full disk that refuses it fails nothing.
      await saveToCache(this.#context.state, cacheKey, {
        runId,
        stepId: step.id,
        outputs: result.outputs ?? {},
      }).catch((error) => {
        if (!isDiskFull(error)) throw error;
      });
    }
    this.#report(active, attemptId, result);
  }

  /**
   * A `pipeline:` step's attempt: its child run, started through the
   * context, linked both ways (the child's record names this attempt, the
   * result names the child), cancelled when the attempt is stopped. The
   * outputs it maps become this step's.
   */
  #child(
    step: PlannedStep,
    config: Record<string, unknown>,
    attemptId: string,
    log: LogFile,
  ): RunningAttempt {
    const sub = config as unknown as SubPipelineConfig;
    const controller = new AbortController();
    let stopReason: StopReason | undefined;
    let childRun: string | undefined;
    const say = (text: string) => log.onLog({ stream: "stdout", text: `runnel: ${text}\n` });
    const result = (async (): Promise<AttemptResult> => {
      if (!this.#context.runChild) throw new Error("this runner cannot start child runs");
      const summary = await this.#context.runChild({
        config: sub,
        baseDir: this.#plan.baseDir,
        parent: { runId: this.#context.record.runId, stepId: step.id, attemptId },
        signal: controller.signal,
        onEvent: (event) => {
          if (childRun === undefined && "runId" in event) {
            childRun = event.runId;
            say(`child run ${childRun} of ${sub.file} started`);
          }
        },
      });
      childRun = summary.runId;
      await say(`child run ${childRun} ${summary.status}`);
      if (stopReason) return { ...stoppedResult(stopReason), childRun };
      if (summary.status !== "succeeded") {
        return {
          ok: false,
          errorClass: "application",
          message: `child run ${childRun} of ${sub.file} ${summary.status}`,
          childRun,
        };
      }
      const outputs: Record<string, ArtifactRef> = {};
      for (const [name, ref] of Object.entries(sub.outputs)) {
        const [childStep, childOutput] = ref.split("/");
        const found = summary.steps[childStep]?.outputs?.[childOutput];
        if (!found) {
          return {
            ok: false,
            errorClass: "artifact",
            message:
              `child run ${childRun} has no output "${childOutput}" of step "${childStep}" ` +
              `(mapped to this step's "${name}")`,
            childRun,
          };
        }
        outputs[name] = { ...found, name };
      }
      return { ok: true, exitCode: 0, outputs, childRun };
    })().catch((error): AttemptResult => ({
      ...(stopReason ? stoppedResult(stopReason) : {
        ok: false,
        errorClass: "application",
        message: `child pipeline ${sub.file ?? sub.name}: ${(error as Error).message ?? error}`,
      }),
      ...(childRun ? { childRun } : {}),
    } as AttemptResult));
    return {
      attemptId,
      result,
      get stopped() {
        return stopReason !== undefined;
      },
      stop(reason: StopReason) {
        if (stopReason) return;
        stopReason = reason;
        controller.abort();
      },
    };
  }

  /**
   * Hands an attempt's result to the engine (unless it stopped it) and
   * forgets its record. The runner is alive, so an attempt lost here could
   * not start for want of a resource (open files, processes): the engine
   * runs it again without using a retry, and from now on no more attempts
   * start at once than held resources when it starved.
   */
  #report(active: ActiveAttempt, attemptId: string, result: AttemptResult): void {
    if (!result.ok && result.lost && !active.stopped) {
      active.starved = true;
      let holding = 0;
      for (const other of this.#active.values()) if (other.started) holding++;
      this.#admitLimit = Math.max(1, holding);
      this.#successesSinceGrowth = 0;
    }
    // A stopped attempt's outcome is the engine's already.
    if (!active.stopped) {
      this.#submit({
        type: "AttemptExited",
        stepId: active.stepId,
        attemptId,
        now: this.#now(),
        result,
      });
    }
    this.#context.lifecycle.forget(attemptId).catch(() => {});
  }

  /**
   * The attempt's log file; its sink writes there and to the run's events.
   * A write that fails (a full disk) stops the attempt, whose output can no
   * longer be kept: it fails as `infrastructure` (the sink's `failure`).
   */
  #openLog(active: ActiveAttempt): LogFile {
    const { state, record } = this.#context;
    const { stepId, attempt } = active;
    const path = logPath(state.paths, record.runId, stepId, attempt);
    const encoder = new TextEncoder();
    let closed = false;
    // Created with the attempt's first output: a step that prints nothing
    // costs no file (readers take a missing log for an empty one).
    let opening: Promise<Deno.FsFile> | undefined;
    const open = async () => {
      this.#logDirReady ??= Deno.mkdir(`${state.paths.logs}/${record.runId}`, { recursive: true })
        .catch((error) => {
          this.#logDirReady = undefined;
          throw error;
        });
      await this.#logDirReady;
      return await Deno.open(path, { create: true, append: true });
    };
    const sink: LogFile = {
      onLog: async ({ stream, text }) => {
        if (closed) return;
        this.#emit({ type: "log", runId: record.runId, stepId, attempt, stream, text });
        if (sink.failure) return;
        try {
          const file = await (opening ??= open());
          const bytes = encoder.encode(text);
          // A nearly full disk takes part of a write before it refuses the rest.
          for (let written = 0; written < bytes.length;) {
            written += await file.write(bytes.subarray(written));
          }
        } catch (error) {
          const reason = error instanceof Error ? error.message : String(error);
          sink.failure = {
            ok: false,
            errorClass: "infrastructure",
            message: `Expected to keep the step's output in ${path}, but: ${reason}`,
          };
          active.running?.stop({ kind: "cancel", message: "its output could not be kept" });
        }
      },
      close: () => {
        if (closed) return;
        closed = true;
        opening?.then((file) => {
          try {
            file.close();
          } catch {
            // Already closed.
          }
        }, () => {});
      },
    };
    return sink;
  }

  #emitRun(status: RunStatus): void {
    this.#emit({
      type: "run",
      runId: this.#context.record.runId,
      pipeline: this.#plan.name,
      status,
      at: this.#now(),
      steps: this.#plan.order,
    });
  }

  #emit(event: RunEvent): void {
    this.#context.onEvent?.(event);
  }

  /**
   * `runnel approve` from another process: decisions are keys of the store,
   * applied (then removed) as they come, and those left while no runner
   * was alive once this one starts.
   */
  async #watchApprovals(signal: AbortSignal): Promise<void> {
    const store = this.#context.state.store;
    const prefix = localKeys.approvePrefix(this.#context.record.runId);
    const apply = async (key: string, value: string) => {
      const decision = JSON.parse(value) as { approved: boolean; by: string; reason?: string };
      const stepId = decodeURIComponent(key.slice(prefix.length));
      this.#submit({ type: "Approve", stepId, now: this.#now(), ...decision });
      await store.delete(key);
    };
    try {
      const { items, revision } = await store.list(prefix);
      for (const kv of items) await apply(kv.key, kv.value);
      for await (const event of store.watch(prefix, { fromRevision: revision + 1, signal })) {
        if (event.type === "put") await apply(event.key, event.value!);
      }
    } catch (error) {
      if (!signal.aborted) this.#failed?.(error);
    }
  }

  async #watchCancelRequests(signal: AbortSignal): Promise<void> {
    const store = this.#context.state.store;
    const key = localKeys.cancel(this.#context.record.runId);
    try {
      const revision = await store.revision();
      for await (const event of store.watch(key, { fromRevision: revision + 1, signal })) {
        if (event.type === "put") {
          this.#submit({ type: "Cancel", now: this.#now(), reason: "cancelled by user" });
        }
      }
    } catch (error) {
      if (!signal.aborted) this.#failed?.(error);
    }
  }
}

/** An attempt's log file as a sink; close it once the attempt has ended. */
interface LogFile extends AttemptSink {
  close(): void;
  /** Set when a write failed: what the attempt amounts to, whatever its exit. */
  failure?: AttemptResult;
}

function stopReasonOf(reason: "cancel" | "timeout"): StopReason {
  return reason === "timeout"
    ? { kind: "timeout" }
    : { kind: "cancel", message: "cancelled by user" };
}
