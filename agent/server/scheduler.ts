/**
 * The cluster scheduler: the second driver of the pure run engine (local
 * mode is the first). Exactly one server runs it at a time, chosen by
 * election; every write it makes carries the election's fence, so a deposed
 * scheduler's writes fail instead of racing its successor's.
 *
 * It learns everything through store watches (submitted runs, results
 * reported by any server, workers coming and going, users' cancel and
 * resume requests) and acts only through store writes (step states and
 * assignments, in one transaction per batch). So a scheduler that dies
 * loses nothing: the next one lists the same keys and carries on.
 *
 * Placement: a ready step goes to a live worker whose labels match its
 * `selector`, whose capabilities include its backend, and which has a free
 * slot; with `affinity: pipeline`, every step of a run goes to the worker
 * of its first step. A step no worker can take waits in the queue.
 *
 * @module
 */

import { RunEngine, runStateOf, syncHeader } from "../../core/engine.ts";
import type {
  ArtifactRef,
  AttemptResult,
  Effect,
  EngineEvent,
  Plan,
  PlannedStep,
  RunState,
  StepState,
} from "../../core/model.ts";
import type { Compare, Store, TxnOp, WatchEvent } from "../../consensus/store.ts";
import {
  type AssignmentRecord,
  clusterKeys,
  type ClusterRunRecord,
  type ResultRecord,
  type WorkerRecord,
} from "./keys.ts";
import { type SmtpSettings, WakeTimer, WebhookAllowList, WebhookNotifier } from "../effects.ts";
import { statusIndexOps } from "./run_index.ts";
import { type AttemptGets, attemptGets } from "../../core/attempt.ts";
import { ValueMissingError } from "../../core/values.ts";
import { isTerminalRunStatus, isTerminalStepStatus } from "../../core/model.ts";
import { createHash } from "node:crypto";
import { dirname, resolve } from "node:path";
import { PIPELINE_BACKEND } from "../../core/schema.ts";
import type { SubPipelineConfig } from "../../core/plan.ts";
import { parsePipeline } from "../../core/load.ts";
import { bundleFile, type BundleStorage, getBundle } from "../bundle.ts";
import { versionToRun } from "./pipelines.ts";
import { clusterStepStates, submitRun } from "./runs.ts";
import type { Tracer } from "../trace/exporter.ts";
import { RunTrace } from "../trace/run_spans.ts";

/** Something the scheduler did, for metrics and logs. */
export type SchedulerEvent =
  | { type: "assigned"; runId: string; stepId: string; attemptId: string; agentId: string }
  | {
    type: "step-finished";
    runId: string;
    stepId: string;
    backend: string;
    outcome: string;
    durationMs?: number;
  }
  | { type: "run-finished"; runId: string; status: string }
  | { type: "worker-lost"; agentId: string; attempts: string[] }
  | { type: "queue"; depth: number }
  | { type: "webhook"; runId: string; stepId: string; ok: boolean; detail: string };

/** Options of {@link runScheduler}. */
export interface SchedulerOptions {
  store: Store;
  /** Compares added to every write: the election's fence. */
  fence: Compare[];
  /** Aborted when leadership is lost: the scheduler stops at once. */
  signal: AbortSignal;
  now?: () => number;
  onEvent?: (event: SchedulerEvent) => void;
  /** Structured log line. */
  log?: (fields: Record<string, unknown>) => void;
  /**
   * Given the scheduler's {@link ResultSink} once it has loaded (undefined
   * once it stops): the gateway of the same server hands it the results its
   * agents report.
   */
  onResultSink?: (sink: ResultSink | undefined) => void;
  /**
   * Hosts `on-failure` webhooks may reach (`--webhook-allow`); default none.
   * The API refuses other hosts at submit; this is the second check.
   */
  webhookAllow?: WebhookAllowList;
  /** The operator's SMTP server for email alerts (`--smtp`). */
  smtp?: SmtpSettings;
  /** Where shipped directories are kept: a `pipeline:` step's child is read from its parent's. */
  bundles?: BundleStorage;
  /** Where the spans of runs (run, attempts, queue waits) are recorded (`--otlp-endpoint`). */
  tracer?: Tracer;
}

/**
 * The scheduler's door for results reported on its own server: applied
 * with the step's end and the next placements in one commit, instead of a
 * write of `/results/<attempt>` and a second commit once the scheduler has
 * watched it. `offer` resolves true once the result is committed (then the
 * agent may be acknowledged), false when the attempt is not the agent's in
 * the scheduler's view or the commit failed: the gateway then takes the
 * ordinary path through the store, which answers every other case.
 * `before` are writes that must land no later than the result (the tail of
 * the attempt's log): they go first in the same commit.
 */
export interface ResultSink {
  offer(record: ResultRecord, before?: TxnOp[]): Promise<boolean>;
}

/**
 * A result to apply; `settle` when it was offered directly (not read from
 * the store), with the writes that go with it.
 */
type ReportedResult = ResultRecord & { settle?: (ok: boolean) => void; before?: TxnOp[] };

/** How often the scheduler reads the worker keys again (see `Scheduler.run`). */
const WORKER_RESYNC_MS = 1_000;

/** Writes per transaction: below etcd's default `--max-txn-ops` of 128. */
const MAX_TXN_OPS = 100;

/** Transactions of one write in flight at once (`#writeGroups`). */
const WRITE_LANES = 8;

/** Writes staged for several runs: each run's ops, the drivers touched, the effects to act on. */
class Staging {
  /** Run id → its ops (besides its own state, persisted at commit). */
  readonly ops = new Map<string, TxnOp[]>();
  readonly touched = new Map<string, RunDriver>();
  readonly later: Array<[RunDriver, Effect]> = [];
  /** Run id → ops written ahead of its state (an offered result's log tail). */
  readonly early = new Map<string, TxnOp[]>();

  /** Ops written first in the run's group, before its state. */
  addEarly(runId: string, ops: TxnOp[]): void {
    if (ops.length === 0) return;
    this.add(runId, []);
    const list = this.early.get(runId);
    if (list) list.push(...ops);
    else this.early.set(runId, [...ops]);
  }

  add(runId: string, ops: TxnOp[]): void {
    const list = this.ops.get(runId);
    if (list) list.push(...ops);
    else this.ops.set(runId, [...ops]);
  }

  touch(driver: RunDriver, staged: { ops: TxnOp[]; later: Effect[] }): void {
    this.touched.set(driver.record.runId, driver);
    this.add(driver.record.runId, staged.ops);
    for (const effect of staged.later) this.later.push([driver, effect]);
  }
}

/** The scheduler's writes failed their fence: another server leads now. */
export class DeposedError extends Error {
  /** Stable error code. */
  readonly code = "deposed";

  /** Builds the error. */
  constructor() {
    super("Expected to lead the scheduler, but another server was elected: stopping");
    this.name = "DeposedError";
  }
}

/**
 * Runs the scheduler until `signal` aborts (or its fence fails, which
 * rejects with {@link DeposedError}).
 */
export async function runScheduler(options: SchedulerOptions): Promise<void> {
  const scheduler = new Scheduler(options);
  await scheduler.run();
}

interface Placement {
  runId: string;
  stepId: string;
  attemptId: string;
  attempt: number;
}

class RunDriver {
  readonly engine: RunEngine;
  /** StartAttempt effects waiting for a worker. */
  readonly waiting: Placement[] = [];
  /** Step id → what its placement asks of a worker (`#placementKind`). */
  readonly kinds = new Map<string, string>();
  /** The run's record as last written (or as read when adopted). */
  written: string;
  readonly wake: WakeTimer;
  readonly trace: RunTrace;
  /** Spans to record once the write they describe is done. */
  readonly traceLater: Array<() => void> = [];

  constructor(
    readonly record: ClusterRunRecord,
    readonly plan: Plan,
    state: RunState,
    onWake: (driver: RunDriver) => void,
    now: () => number,
    tracer: Tracer | undefined,
  ) {
    this.engine = new RunEngine(plan, state);
    this.written = JSON.stringify(record);
    this.wake = new WakeTimer(() => onWake(this), now);
    this.trace = new RunTrace(record, tracer);
  }

  /** An attempt may have ended: its span, once the write is done. */
  traceEnded(stepId: string, attemptId: string): void {
    if (!this.trace.enabled) return;
    this.traceLater.push(() =>
      this.trace.attemptEnded(this.plan, this.engine.state, stepId, attemptId)
    );
  }

  /** Records the spans of what was just written. */
  traced(): void {
    for (const record of this.traceLater.splice(0)) record();
  }
}

class Scheduler {
  readonly #options: SchedulerOptions;
  readonly #store: Store;
  readonly #now: () => number;
  readonly #runs = new Map<string, RunDriver>();
  readonly #workers = new Map<string, WorkerRecord>();
  /** attemptId → where it runs. */
  readonly #assigned = new Map<string, { runId: string; stepId: string; agentId: string }>();
  /** Attempts per worker, kept with `#assigned` (placement reads it for every step). */
  readonly #loadOf = new Map<string, number>();
  #queue: Promise<void> = Promise.resolve();
  #failed: ((error: unknown) => void) | undefined;
  /** Results not yet applied, and whether a task to apply them is queued. */
  readonly #results: ReportedResult[] = [];
  /** Attempts with a stop key (`/stop/<agent>/<attempt>`) to delete when they end. */
  readonly #stops = new Set<string>();
  /** Steps already reported as unplaceable, by run (forgotten when the run ends). */
  readonly #warned = new Map<string, Set<string>>();
  #resultsQueued = false;
  readonly #webhooks: WebhookNotifier;

  constructor(options: SchedulerOptions) {
    this.#options = options;
    this.#store = options.store;
    this.#now = options.now ?? Date.now;
    this.#webhooks = new WebhookNotifier(
      (outcome) => this.#options.onEvent?.({ type: "webhook", ...outcome }),
      options.webhookAllow ?? new WebhookAllowList([]),
      options.smtp,
    );
  }

  async run(): Promise<void> {
    const { signal } = this.#options;
    const failure = new Promise<never>((_, reject) => {
      this.#failed = reject;
    });
    failure.catch(() => {});
    let resync: ReturnType<typeof setInterval> | undefined;
    const stopped = new Promise<void>((resolve) => {
      if (signal.aborted) resolve();
      signal.addEventListener("abort", () => resolve(), { once: true });
    });
    try {
      const revision = await this.#load();
      this.#options.onResultSink?.({ offer: (record, before) => this.#offer(record, before) });
      const watches = [
        clusterKeys.workerPrefix,
        clusterKeys.runPrefix,
        clusterKeys.resultPrefix,
        clusterKeys.requestPrefix,
      ].map((prefix) => this.#watch(prefix, revision + 1));
      // Worker keys change only when agents connect and leave (heartbeats
      // renew leases, which write nothing): an event a watch lost while
      // its etcd member died would never come again. A periodic read of
      // the few worker keys heals the view.
      resync = setInterval(
        () => this.#enqueue(() => this.#resyncWorkers()),
        WORKER_RESYNC_MS,
      );
      await Promise.race([stopped, failure, Promise.all(watches)]);
    } finally {
      clearInterval(resync);
      this.#options.onResultSink?.(undefined);
      for (const driver of this.#runs.values()) driver.wake.clear();
      // Results offered and not yet applied take the ordinary path.
      for (const reported of this.#results.splice(0)) reported.settle?.(false);
    }
  }

  /** A result reported on this server: see {@link ResultSink}. */
  #offer(record: ResultRecord, before?: TxnOp[]): Promise<boolean> {
    const where = this.#assigned.get(record.attemptId);
    if (this.#options.signal.aborted || where?.agentId !== record.agentId) {
      return Promise.resolve(false);
    }
    return new Promise((settle) => {
      this.#results.push({ ...record, settle, ...(before?.length ? { before } : {}) });
      if (this.#resultsQueued) return;
      this.#resultsQueued = true;
      this.#enqueue(() => this.#applyResults());
    });
  }

  /** Brings the workers in view in line with the store's worker keys (see `run`). */
  async #resyncWorkers(): Promise<void> {
    const { items } = await this.#store.list(clusterKeys.workerPrefix);
    const listed = new Map<string, WorkerRecord>();
    for (const kv of items) {
      const worker = JSON.parse(kv.value) as WorkerRecord;
      listed.set(worker.agentId, worker);
    }
    let arrived = false;
    for (const [agentId, worker] of listed) {
      if (!this.#workers.has(agentId)) {
        arrived = true;
        this.#log({ msg: "worker online (found by resync)", agent: agentId });
      }
      this.#workers.set(agentId, worker);
    }
    for (const agentId of [...this.#workers.keys()]) {
      if (!listed.has(agentId)) await this.#onWorkerLost(agentId);
    }
    if (arrived) await this.#placeWaiting();
  }

  /** Lists what the previous scheduler left; returns the revision read at. */
  async #load(): Promise<number> {
    const store = this.#store;
    const workers = await store.list(clusterKeys.workerPrefix);
    for (const kv of workers.items) {
      const worker = JSON.parse(kv.value) as WorkerRecord;
      this.#workers.set(worker.agentId, worker);
    }
    const assignments = await store.list(clusterKeys.assignmentPrefix());
    for (const kv of assignments.items) {
      const assignment = JSON.parse(kv.value) as AssignmentRecord;
      this.#assign(assignment.attemptId, {
        runId: assignment.runId,
        stepId: assignment.stepId,
        agentId: assignment.agentId,
      });
    }
    const stops = await store.list(clusterKeys.stopPrefix());
    for (const kv of stops.items) {
      this.#stops.add(decodeURIComponent(kv.key.slice(kv.key.lastIndexOf("/") + 1)));
    }
    const runs = await store.list(clusterKeys.runPrefix);
    for (const kv of runs.items) await this.#adoptRun(JSON.parse(kv.value) as ClusterRunRecord);
    const results = await store.list(clusterKeys.resultPrefix);
    for (const kv of results.items) this.#bufferResult(kv.value);
    // Attempts the engines think running whose worker is gone, or that were
    // never handed out (the last scheduler died between two writes): lost.
    for (const driver of this.#runs.values()) {
      for (const { stepId, attemptId } of driver.engine.runningAttempts()) {
        if (driver.plan.steps[stepId]?.backend === PIPELINE_BACKEND) {
          // Its child run goes on without a scheduler: find it again (or start it).
          this.#enqueue(() => this.#resumeChild(driver, stepId, attemptId));
          continue;
        }
        const where = this.#assigned.get(attemptId);
        if (!where || !this.#workers.has(where.agentId)) {
          this.#enqueue(() =>
            this.#apply(
              driver,
              [{
                type: "AttemptLost",
                stepId,
                attemptId,
                now: this.#now(),
                reason: where
                  ? `worker ${where.agentId} went offline`
                  : "the attempt was never handed to a worker",
              }],
              where
                ? [{ type: "delete", key: clusterKeys.assignment(where.agentId, attemptId) }]
                : [],
            )
          );
        }
      }
      // A run submitted but never started (or submitted just now) starts,
      // oldest first (the order its concurrency key, if any, serves them in).
      if (driver.engine.state.status !== "pending") {
        this.#enqueue(() => this.#apply(driver, [{ type: "Tick", now: this.#now() }]));
      }
    }
    const pending = [...this.#runs.values()]
      .filter((driver) => driver.engine.state.status === "pending")
      .sort((a, b) =>
        a.record.createdAt - b.record.createdAt || (a.record.runId < b.record.runId ? -1 : 1)
      );
    for (const driver of pending) this.#enqueue(() => this.#startRun(driver));
    // Requests made while no scheduler led (a cancel, an approval) are not lost.
    const requests = await store.list(clusterKeys.requestPrefix);
    for (const kv of requests.items) this.#enqueue(() => this.#onRequest(kv.key));
    return Math.max(
      workers.revision,
      assignments.revision,
      runs.revision,
      results.revision,
      requests.revision,
    );
  }

  async #watch(prefix: string, fromRevision: number): Promise<void> {
    for await (
      const event of this.#store.watch(prefix, { fromRevision, signal: this.#options.signal })
    ) {
      this.#enqueue(() => this.#onWatch(prefix, event));
    }
  }

  /** Runs `work` after everything queued before it: one change at a time. */
  #enqueue(work: () => Promise<void> | void): void {
    this.#queue = this.#queue.then(async () => {
      if (this.#options.signal.aborted) return;
      try {
        await work();
      } catch (error) {
        this.#failed?.(error);
      }
    });
  }

  async #onWatch(prefix: string, event: WatchEvent): Promise<void> {
    switch (prefix) {
      case clusterKeys.workerPrefix:
        if (event.type === "put") {
          const worker = JSON.parse(event.value!) as WorkerRecord;
          const isNew = !this.#workers.has(worker.agentId);
          this.#workers.set(worker.agentId, worker);
          if (isNew) this.#log({ msg: "worker online", agent: worker.agentId });
          await this.#placeWaiting();
        } else {
          await this.#onWorkerLost(decodeURIComponent(event.key.slice(prefix.length)));
        }
        return;
      case clusterKeys.runPrefix:
        if (event.type === "put") {
          const record = JSON.parse(event.value!) as ClusterRunRecord;
          if (record.parent && isTerminalRunStatus(record.status)) await this.#childEnded(record);
          if (!this.#runs.has(record.runId) && record.status === "pending") {
            const driver = await this.#adoptRun(record);
            if (driver) await this.#startRun(driver);
          }
        }
        return;
      case clusterKeys.resultPrefix:
        if (event.type === "put") this.#bufferResult(event.value!);
        return;
      case clusterKeys.requestPrefix:
        if (event.type === "put") await this.#onRequest(event.key);
        return;
    }
  }

  /** Runs of a concurrency key that hold a place (started, not finished), oldest first. */
  #holders(key: string): RunDriver[] {
    return [...this.#runs.values()]
      .filter((driver) =>
        driver.plan.concurrencyKey?.key === key && driver.engine.state.status === "running"
      )
      .sort((a, b) => a.record.createdAt - b.record.createdAt);
  }

  /** Pending runs of a concurrency key, in line: first submitted, first served. */
  #waiters(key: string): RunDriver[] {
    return [...this.#runs.values()]
      .filter((driver) =>
        driver.plan.concurrencyKey?.key === key && driver.engine.state.status === "pending"
      )
      .sort((a, b) =>
        a.record.createdAt - b.record.createdAt || (a.record.runId < b.record.runId ? -1 : 1)
      );
  }

  /**
   * Starts a pending run, unless its concurrency key is full. The key is no
   * separate lock: the runs' own statuses in the store are the semaphore,
   * changed only by the elected scheduler in fenced writes, so a successor
   * rebuilds the same holders and the same line after a failover.
   */
  async #startRun(driver: RunDriver): Promise<void> {
    if (driver.engine.state.status !== "pending") return;
    const group = driver.plan.concurrencyKey;
    if (!group) {
      await this.#apply(driver, [{ type: "Start", now: this.#now() }]);
      return;
    }
    await this.#serveKey(group.key, driver);
  }

  /** Starts the runs in line for `key` while it has room; `arrived` is a run just submitted. */
  async #serveKey(key: string, arrived?: RunDriver): Promise<void> {
    for (;;) {
      const holders = this.#holders(key);
      const line = this.#waiters(key);
      const next = line[0];
      if (!next) return;
      const group = next.plan.concurrencyKey!;
      if (holders.length < group.limit) {
        delete next.record.waiting;
        await this.#apply(next, [{ type: "Start", now: this.#now() }]);
        continue;
      }
      const held = `concurrency key "${key}" is held by ${
        holders.map((h) => h.record.runId).join(", ")
      }`;
      if (arrived && arrived.engine.state.status === "pending") {
        const conflict = arrived.plan.concurrencyKey!.onConflict;
        if (conflict === "cancel-new") {
          await this.#apply(arrived, [{
            type: "Cancel",
            now: this.#now(),
            reason: `${held} (on-conflict: cancel-new)`,
          }]);
          arrived = undefined;
          continue;
        }
        if (conflict === "cancel-running") {
          // Room for the newcomer: the oldest holders go; it starts once they have ended.
          const excess = holders.length - group.limit + 1;
          for (const holder of holders.slice(0, excess)) {
            await this.#apply(holder, [{
              type: "Cancel",
              now: this.#now(),
              reason: `replaced by run ${arrived.record.runId} (concurrency key "${key}", ` +
                `on-conflict: cancel-running)`,
            }]);
          }
        }
      }
      // Wait in line, and say why.
      for (const waiter of this.#waiters(key)) {
        const waiting = `waiting for ${held}`;
        if (waiter.record.waiting !== waiting) {
          waiter.record.waiting = waiting;
          await this.#write(this.#persistOps(waiter));
        }
      }
      return;
    }
  }

  /** Builds the engine of a run that is not finished; undefined for a finished one. */
  async #adoptRun(record: ClusterRunRecord, finished = false): Promise<RunDriver | undefined> {
    if (!finished && isTerminalRunStatus(record.status)) return undefined;
    if (this.#runs.has(record.runId)) return this.#runs.get(record.runId);
    const planKv = await this.#store.get(clusterKeys.plan(record.runId));
    if (!planKv) return undefined;
    const plan = JSON.parse(planKv.value) as Plan;
    const stored = await this.#store.list(clusterKeys.stepPrefix(record.runId));
    const steps: Record<string, StepState> = {};
    for (const kv of stored.items) {
      const step = JSON.parse(kv.value) as StepState;
      steps[step.id] = step;
    }
    const state = runStateOf(plan, record, steps);
    const driver = new RunDriver(
      record,
      plan,
      state,
      (driver) => this.#enqueue(() => this.#apply(driver, [{ type: "Tick", now: this.#now() }])),
      this.#now,
      this.#options.tracer,
    );
    this.#runs.set(record.runId, driver);
    return driver;
  }

  /**
   * Results are applied in batches: those that arrive while a write is in
   * flight go out together in the next one (group commit), which is what
   * lets many agents report at once without a transaction each.
   */
  #bufferResult(value: string): void {
    this.#results.push(JSON.parse(value) as ResultRecord);
    if (this.#resultsQueued) return;
    this.#resultsQueued = true;
    this.#enqueue(() => this.#applyResults());
  }

  async #applyResults(): Promise<void> {
    this.#resultsQueued = false;
    const batch = this.#results.splice(0);
    const staging = new Staging();
    const applied = new Set<string>();
    /** Attempts whose `/results/` key this write deletes (a key at most once in a txn). */
    const deleted = new Set<string>();
    const offered: Array<(ok: boolean) => void> = [];
    for (const reported of batch) {
      const { settle } = reported;
      // The same result by two paths (offered here, and in the store after a
      // resend elsewhere): applied once, and a key twice in a txn is refused.
      if (applied.has(reported.attemptId)) {
        if (reported.before) staging.addEarly(reported.runId, reported.before);
        settle?.(true);
        // Its key in the store goes, whichever path was applied.
        if (!settle && !deleted.has(reported.attemptId)) {
          deleted.add(reported.attemptId);
          staging.add(reported.runId, [
            { type: "delete", key: clusterKeys.result(reported.attemptId) },
          ]);
        }
        continue;
      }
      if (settle && this.#assigned.get(reported.attemptId)?.agentId !== reported.agentId) {
        settle(false);
        continue;
      }
      applied.add(reported.attemptId);
      if (settle) offered.push(settle);
      if (reported.before) staging.addEarly(reported.runId, reported.before);
      const cleanup = this.#cleanupOps(reported.agentId, reported.attemptId);
      // An offered result was never written: only one read from the store is deleted.
      if (!settle) {
        deleted.add(reported.attemptId);
        cleanup.unshift({ type: "delete", key: clusterKeys.result(reported.attemptId) });
      }
      this.#unassign(reported.attemptId);
      const driver = this.#runs.get(reported.runId);
      if (!driver) {
        // A late report of a run that is over: only tidy up.
        staging.add(reported.runId, cleanup);
        continue;
      }
      const staged = this.#stage(driver, [{
        type: "AttemptExited",
        stepId: reported.stepId,
        attemptId: reported.attemptId,
        now: this.#now(),
        result: reported.result,
      }], cleanup);
      staging.touch(driver, staged);
    }
    // The slots these results freed are filled in the same write.
    this.#stageWaiting(staging);
    try {
      await this.#commit(staging);
    } catch (error) {
      // Not known to be written: the gateways write them to the store for the next scheduler.
      for (const settle of offered) settle(false);
      throw error;
    }
    for (const settle of offered) settle(true);
    this.#reportQueue();
  }

  /**
   * The deletes that retire an attempt's assignment: its assignment key,
   * and its stop key if the scheduler wrote one (most attempts have none:
   * a delete of an absent key still costs etcd a write).
   */
  #cleanupOps(agentId: string, attemptId: string): TxnOp[] {
    const ops: TxnOp[] = [{ type: "delete", key: clusterKeys.assignment(agentId, attemptId) }];
    if (this.#stops.delete(attemptId)) {
      ops.push({ type: "delete", key: clusterKeys.stop(agentId, attemptId) });
    }
    return ops;
  }

  async #onWorkerLost(agentId: string): Promise<void> {
    this.#workers.delete(agentId);
    const lost = [...this.#assigned].filter(([, where]) => where.agentId === agentId);
    this.#log({ msg: "worker offline", agent: agentId, attempts: lost.length });
    this.#options.onEvent?.({ type: "worker-lost", agentId, attempts: lost.map(([id]) => id) });
    for (const [attemptId, where] of lost) {
      this.#unassign(attemptId);
      const driver = this.#runs.get(where.runId);
      const cleanup = this.#cleanupOps(agentId, attemptId);
      if (!driver) {
        await this.#write(cleanup);
        continue;
      }
      await this.#apply(driver, [{
        type: "AttemptLost",
        stepId: where.stepId,
        attemptId,
        now: this.#now(),
        reason: `worker ${agentId} missed 3 heartbeats and was declared offline`,
      }], cleanup);
    }
    await this.#placeWaiting();
  }

  async #onRequest(key: string): Promise<void> {
    const [runId, kind, step] = key.slice(clusterKeys.requestPrefix.length).split("/");
    const consume: TxnOp[] = [{ type: "delete", key }];
    let driver = this.#runs.get(runId);
    if (kind === "approve") {
      const kv = await this.#store.get(key);
      if (!driver || !kv || step === undefined) return await this.#write(consume);
      const decision = JSON.parse(kv.value) as { approved: boolean; by: string; reason?: string };
      await this.#apply(driver, [{
        type: "Approve",
        stepId: decodeURIComponent(step),
        approved: decision.approved === true,
        by: String(decision.by),
        ...(typeof decision.reason === "string" ? { reason: decision.reason } : {}),
        now: this.#now(),
      }], consume);
    } else if (kind === "cancel") {
      if (!driver) return await this.#write(consume);
      await this.#apply(
        driver,
        [{ type: "Cancel", now: this.#now(), reason: "cancelled by user" }],
        consume,
      );
    } else if (kind === "resume") {
      if (!driver) {
        const kv = await this.#store.get(clusterKeys.run(runId));
        if (!kv) return await this.#write(consume);
        const record = JSON.parse(kv.value) as ClusterRunRecord;
        if (record.status === "succeeded") return await this.#write(consume);
        // A failed or cancelled run comes back to life, as it stands.
        driver = await this.#adoptRun(record, true);
        if (!driver) return await this.#write(consume);
      }
      await this.#apply(driver, [{ type: "Resume", now: this.#now() }], consume);
    }
  }

  /**
   * Applies events to a run's engine, persists the result (with `extra`
   * writes) in one fenced transaction, then acts on the effects.
   */
  async #apply(driver: RunDriver, events: EngineEvent[], extra: TxnOp[] = []): Promise<void> {
    const staged = this.#stage(driver, events, extra);
    await this.#write([...this.#persistOps(driver), ...staged.ops]);
    driver.traced();
    for (const effect of staged.later) this.#perform(driver, effect);
    this.#reportQueue();
  }

  /**
   * Applies events to a run's engine and places what became ready: the
   * writes to persist (besides the run's own state) and the effects to act
   * on once they are persisted. No I/O.
   */
  #stage(
    driver: RunDriver,
    events: EngineEvent[],
    extra: TxnOp[] = [],
  ): { ops: TxnOp[]; later: Effect[] } {
    const effects: Effect[] = [];
    for (const event of events) {
      effects.push(...driver.engine.step(event).effects);
      if (event.type === "AttemptExited" || event.type === "AttemptLost") {
        driver.traceEnded(event.stepId, event.attemptId);
      }
    }
    // Place what can be placed now, so the start and its assignment are one write.
    const ops: TxnOp[] = [...extra];
    const later: Effect[] = [];
    for (const effect of effects) {
      if (effect.type === "StartAttempt") {
        const gets = this.#gets(driver, effect.stepId);
        if (typeof gets === "string") {
          // It cannot start: an upstream step did not publish a value it reads.
          effects.push(
            ...driver.engine.step({
              type: "AttemptExited",
              stepId: effect.stepId,
              attemptId: effect.attemptId,
              now: this.#now(),
              result: { ok: false, errorClass: "artifact", message: gets },
            }).effects,
          );
          driver.traceEnded(effect.stepId, effect.attemptId);
          continue;
        }
        if (driver.plan.steps[effect.stepId].backend === PIPELINE_BACKEND) {
          // Run by the scheduler itself: a child run, no worker.
          later.push(
            ...driver.engine.step({
              type: "AttemptStarted",
              stepId: effect.stepId,
              attemptId: effect.attemptId,
              now: this.#now(),
              worker: "scheduler",
            }).effects,
          );
          const { stepId, attemptId } = effect;
          this.#enqueue(() => this.#startChild(driver, stepId, attemptId, gets.config));
          continue;
        }
        const placement = {
          runId: driver.record.runId,
          stepId: effect.stepId,
          attemptId: effect.attemptId,
          attempt: effect.attempt,
        };
        const placed = this.#place(driver, placement, gets);
        if (placed) {
          later.push(...driver.engine.step(placed.started).effects);
          ops.push(placed.op);
        } else {
          driver.waiting.push(placement);
        }
      } else if (effect.type === "StopAttempt") {
        driver.traceEnded(effect.stepId, effect.attemptId);
        const waiting = driver.waiting.findIndex((p) => p.attemptId === effect.attemptId);
        if (waiting >= 0) driver.waiting.splice(waiting, 1);
        if (driver.plan.steps[effect.stepId]?.backend === PIPELINE_BACKEND) {
          // Its child run is cancelled with it (a request the next round applies).
          ops.push({
            type: "put",
            key: clusterKeys.request(childRunId(effect.attemptId), "cancel"),
            value: JSON.stringify({ at: this.#now(), reason: `parent step ${effect.reason}` }),
          });
        }
        const where = this.#assigned.get(effect.attemptId);
        if (where) {
          this.#stops.add(effect.attemptId);
          ops.push({
            type: "put",
            key: clusterKeys.stop(where.agentId, effect.attemptId),
            value: JSON.stringify({ reason: effect.reason, at: this.#now() }),
          });
        }
      } else {
        later.push(effect);
      }
    }
    return { ops, later };
  }

  /** Chooses a worker for an attempt; the engine event and the write that hand it over. */
  /**
   * What an attempt of the step gets (decided once, for its placement and
   * its assignment), or why it cannot be given its upstream values.
   */
  /**
   * Starts the child run of a `pipeline:` step's attempt: its pipeline
   * (a file of the parent's shipped directory, or a registered version)
   * planned with its parameters, under an id derived from the attempt, so
   * that a successor after a failover finds it rather than starting it twice.
   */
  async #startChild(
    driver: RunDriver,
    stepId: string,
    attemptId: string,
    config: Record<string, unknown>,
  ): Promise<void> {
    const step = driver.engine.state.steps[stepId];
    if (step?.attemptId !== attemptId || step.status !== "running") return;
    const childId = childRunId(attemptId);
    if (await this.#store.get(clusterKeys.run(childId))) return;
    const sub = config as unknown as SubPipelineConfig;
    try {
      let source: string, file: string, baseDir: string, bundle: string | undefined;
      if (sub.name !== undefined) {
        const version = await versionToRun(this.#store, sub.name, sub.version);
        ({ source, file, baseDir, bundle } = version);
      } else {
        baseDir = driver.plan.baseDir;
        file = resolve(baseDir, sub.file!);
        bundle = driver.record.bundle;
        const shipped = bundle
          ? await getBundle(this.#store, bundle, this.#options.bundles)
          : undefined;
        const bytes = shipped ? bundleFile(shipped, baseDir, file) : undefined;
        if (!bytes) {
          throw new Error(`pipeline file ${sub.file} is not in the run's shipped directory`);
        }
        if (dirname(file) !== baseDir) {
          // Agents run a shipped directory from its root.
          throw new Error(
            `in a cluster a child pipeline file sits beside its parent, at the root of the ` +
              `shipped directory; ${sub.file} is in a subdirectory`,
          );
        }
        source = new TextDecoder().decode(bytes);
      }
      const shipped = bundle
        ? await getBundle(this.#store, bundle, this.#options.bundles)
        : undefined;
      const plan = parsePipeline(source, {
        file,
        baseDir,
        params: sub.params,
        ...(shipped ? { readFile: (path: string) => bundleFile(shipped, baseDir, path) } : {}),
      });
      await submitRun(this.#store, plan, {
        runId: childId,
        file,
        ...(bundle ? { bundleDigest: bundle } : {}),
        parent: { runId: driver.record.runId, stepId, attemptId },
        ...(sub.name !== undefined && sub.version !== undefined
          ? { registered: { name: sub.name, version: sub.version } }
          : {}),
      });
      this.#log({
        msg: "child run started",
        run: driver.record.runId,
        step: stepId,
        child: childId,
      });
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      await this.#apply(driver, [{
        type: "AttemptExited",
        stepId,
        attemptId,
        now: this.#now(),
        result: {
          ok: false,
          errorClass: "application",
          message: `child pipeline ${sub.file ?? sub.name}: ${message}`,
        },
      }]);
    }
  }

  /** After a failover: a running `pipeline:` attempt's child, ended, running, or never started. */
  async #resumeChild(driver: RunDriver, stepId: string, attemptId: string): Promise<void> {
    const kv = await this.#store.get(clusterKeys.run(childRunId(attemptId)));
    if (kv) {
      const record = JSON.parse(kv.value) as ClusterRunRecord;
      if (isTerminalRunStatus(record.status)) await this.#childEnded(record);
      return;
    }
    const gets = this.#gets(driver, stepId);
    if (typeof gets !== "string") await this.#startChild(driver, stepId, attemptId, gets.config);
  }

  /** A child run ended: its parent's attempt ends with it, the outputs it maps taken along. */
  async #childEnded(record: ClusterRunRecord): Promise<void> {
    const parent = record.parent!;
    const driver = this.#runs.get(parent.runId);
    const step = driver?.engine.state.steps[parent.stepId];
    if (!driver || step?.attemptId !== parent.attemptId || step.status !== "running") return;
    const gets = this.#gets(driver, parent.stepId);
    const sub = (typeof gets === "string" ? {} : gets.config) as unknown as SubPipelineConfig;
    let result: AttemptResult;
    if (record.status !== "succeeded") {
      result = {
        ok: false,
        errorClass: record.status === "cancelled" ? "cancelled" : "application",
        message: `child run ${record.runId} ${record.status}`,
        childRun: record.runId,
      };
    } else {
      const steps = await clusterStepStates(this.#store, record.runId);
      const outputs: Record<string, ArtifactRef> = {};
      let missing: string | undefined;
      for (const [name, ref] of Object.entries(sub.outputs ?? {})) {
        const [childStep, childOutput] = ref.split("/");
        const found = steps[childStep]?.outputs?.[childOutput];
        if (found) outputs[name] = { ...found, name };
        else {missing ??= `child run ${record.runId} has no output "${childOutput}" of step ` +
            `"${childStep}" (mapped to this step's "${name}")`;}
      }
      result = missing
        ? { ok: false, errorClass: "artifact", message: missing, childRun: record.runId }
        : { ok: true, exitCode: 0, outputs, childRun: record.runId };
    }
    await this.#apply(driver, [{
      type: "AttemptExited",
      stepId: parent.stepId,
      attemptId: parent.attemptId,
      now: this.#now(),
      result,
    }]);
  }

  #gets(driver: RunDriver, stepId: string): AttemptGets | string {
    try {
      return attemptGets(driver.plan, driver.record.runId, driver.engine.state.steps, stepId);
    } catch (error) {
      if (error instanceof ValueMissingError) return error.message;
      throw error;
    }
  }

  #place(
    driver: RunDriver,
    placement: Placement,
    gets?: AttemptGets,
  ): { started: EngineEvent; op: TxnOp } | undefined {
    const step = driver.plan.steps[placement.stepId];
    const worker = this.#chooseWorker(driver, step);
    if (!worker) {
      this.#warnUnplaceable(driver, step);
      return undefined;
    }
    if (driver.plan.affinity === "pipeline") driver.record.agent ??= worker.agentId;
    const assignment = this.#assignment(driver, step, placement, worker.agentId, gets);
    this.#assign(placement.attemptId, {
      runId: placement.runId,
      stepId: placement.stepId,
      agentId: worker.agentId,
    });
    if (driver.trace.enabled) {
      const placedAt = this.#now();
      driver.traceLater.push(() =>
        driver.trace.queueWait(
          driver.engine.state,
          placement.stepId,
          placement.attemptId,
          placedAt,
          worker.agentId,
        )
      );
    }
    this.#options.onEvent?.({
      type: "assigned",
      runId: placement.runId,
      stepId: placement.stepId,
      attemptId: placement.attemptId,
      agentId: worker.agentId,
    });
    return {
      started: {
        type: "AttemptStarted",
        stepId: placement.stepId,
        attemptId: placement.attemptId,
        now: this.#now(),
        worker: worker.agentId,
      },
      op: {
        type: "put",
        key: clusterKeys.assignment(worker.agentId, placement.attemptId),
        value: JSON.stringify(assignment),
      },
    };
  }

  /**
   * Says once, in the log, why a step waits when no live worker could ever
   * take it (rather than all of them being busy): a selector nobody matches,
   * a backend nobody can run.
   */
  #warnUnplaceable(driver: RunDriver, step: PlannedStep): void {
    const runId = driver.record.runId;
    if (this.#warned.get(runId)?.has(step.id)) return;
    const could = [...this.#workers.values()].some((worker) => canRun(worker, step, driver.plan));
    if (could) return;
    const warned = this.#warned.get(runId) ?? new Set<string>();
    this.#warned.set(runId, warned.add(step.id));
    this.#log({
      level: "warn",
      msg: "step waits: no live worker can run it",
      run: driver.record.runId,
      step: step.id,
      backend: step.backend,
      selector: step.selector,
      secrets: secretNamesOf(step, driver.plan),
    });
  }

  #assign(attemptId: string, where: { runId: string; stepId: string; agentId: string }): void {
    this.#unassign(attemptId);
    this.#assigned.set(attemptId, where);
    this.#loadOf.set(where.agentId, (this.#loadOf.get(where.agentId) ?? 0) + 1);
  }

  #unassign(attemptId: string): void {
    const where = this.#assigned.get(attemptId);
    if (!where) return;
    this.#assigned.delete(attemptId);
    const left = (this.#loadOf.get(where.agentId) ?? 1) - 1;
    if (left > 0) this.#loadOf.set(where.agentId, left);
    else this.#loadOf.delete(where.agentId);
  }

  #chooseWorker(driver: RunDriver, step: PlannedStep): WorkerRecord | undefined {
    const load = this.#loadOf;
    const fits = (worker: WorkerRecord) =>
      (load.get(worker.agentId) ?? 0) < worker.slots && canRun(worker, step, driver.plan);
    if (driver.record.agent) {
      const pinned = this.#workers.get(driver.record.agent);
      return pinned && fits(pinned) ? pinned : undefined;
    }
    // The least loaded worker that fits; ties go to the lowest id, for stable tests.
    let best: WorkerRecord | undefined;
    for (const worker of this.#workers.values()) {
      if (!fits(worker)) continue;
      const better = !best ||
        (load.get(worker.agentId) ?? 0) < (load.get(best.agentId) ?? 0) ||
        ((load.get(worker.agentId) ?? 0) === (load.get(best.agentId) ?? 0) &&
          worker.agentId < best.agentId);
      if (better) best = worker;
    }
    return best;
  }

  #assignment(
    driver: RunDriver,
    step: PlannedStep,
    placement: Placement,
    agentId: string,
    decided?: AttemptGets,
  ): AssignmentRecord {
    const gets = decided ??
      attemptGets(driver.plan, placement.runId, driver.engine.state.steps, step.id);
    // Names only: the agent's server resolves the values as it pushes this.
    const secrets = Object.fromEntries(
      gets.secrets.map((env) => [env, { ...driver.plan.secrets[env] }]),
    );
    return {
      runId: placement.runId,
      stepId: placement.stepId,
      attemptId: placement.attemptId,
      attempt: placement.attempt,
      agentId,
      backend: step.backend,
      spec: {
        config: gets.config,
        baseDir: driver.plan.baseDir,
        env: gets.env,
        outputs: step.outputs,
        ...(step.keepPartial ? { keepPartial: true } : {}),
        matrix: step.matrix,
        timeoutMs: step.timeoutMs,
        resources: step.resources,
        ...(driver.record.bundle ? { bundleDigest: driver.record.bundle } : {}),
      },
      inputs: gets.inputs,
      secrets,
      assignedAt: this.#now(),
      traceparent: driver.trace.traceparent(placement.attemptId),
    };
  }

  /**
   * Tries the queue again (a worker came, a slot freed up). A step no
   * worker could take now is remembered by what it asks for (backend,
   * selector, secrets, pinned worker): the rest of the queue asking for the
   * same is not tried against every worker again in this pass, so a long
   * queue costs one scan per kind of step, not one per step.
   */
  async #placeWaiting(): Promise<void> {
    const staging = new Staging();
    this.#stageWaiting(staging);
    await this.#commit(staging);
    this.#reportQueue();
  }

  /** Places what waits, across runs, into `staging` (no I/O): see {@link #placeWaiting}. */
  #stageWaiting(staging: Staging): void {
    if (!this.#anyFreeSlot()) return;
    const full = new Set<string>();
    for (const driver of this.#runs.values()) {
      if (driver.waiting.length === 0) continue;
      const placed: EngineEvent[] = [];
      const handOver: TxnOp[] = [];
      const still: Placement[] = [];
      for (const placement of driver.waiting.splice(0)) {
        const kind = this.#placementKind(driver, placement);
        const result = full.has(kind) ? undefined : this.#place(driver, placement);
        if (result) {
          placed.push(result.started);
          handOver.push(result.op);
        } else {
          full.add(kind);
          still.push(placement);
        }
      }
      driver.waiting.push(...still);
      if (placed.length === 0) continue;
      staging.touch(driver, this.#stage(driver, placed, handOver));
    }
  }

  /**
   * Writes what was staged for several runs, then acts on the effects.
   * Each run's writes are one group: its state first, then new keys
   * (assignments, stops), then deletes (consumed results last of all), so
   * should a group take several transactions, a successor that finds only
   * the first ones reschedules attempts never handed out and applies
   * results again (a repeated report changes nothing), losing none.
   * Groups share no key, so they go to etcd side by side
   * ({@link #writeGroups}).
   */
  async #commit(staging: Staging): Promise<void> {
    const groups: TxnOp[][] = [];
    for (const [runId, ops] of staging.ops) {
      const driver = staging.touched.get(runId);
      const persist = driver ? this.#persistOps(driver) : [];
      groups.push([
        ...staging.early.get(runId) ?? [],
        ...persist,
        ...ops.filter((op) => op.type === "put"),
        ...ops.filter((op) => op.type !== "put"),
      ]);
    }
    if (groups.length === 0) return;
    await this.#writeGroups(groups);
    for (const driver of staging.touched.values()) driver.traced();
    for (const [driver, effect] of staging.later) this.#perform(driver, effect);
  }

  #anyFreeSlot(): boolean {
    for (const worker of this.#workers.values()) {
      if ((this.#loadOf.get(worker.agentId) ?? 0) < worker.slots) return true;
    }
    return false;
  }

  /** What a placement asks of a worker: equal kinds fit the same workers. */
  #placementKind(driver: RunDriver, placement: Placement): string {
    let kind = driver.kinds.get(placement.stepId);
    if (kind === undefined) {
      const step = driver.plan.steps[placement.stepId];
      kind = step
        ? JSON.stringify([step.backend, step.selector, secretNamesOf(step, driver.plan)])
        : `${driver.record.runId}/${placement.stepId}`;
      driver.kinds.set(placement.stepId, kind);
    }
    return driver.record.agent === undefined ? kind : `${kind} on ${driver.record.agent}`;
  }

  #reportQueue(): void {
    let depth = 0;
    for (const driver of this.#runs.values()) depth += driver.waiting.length;
    this.#options.onEvent?.({ type: "queue", depth });
  }

  /** The writes of a run's record and of its steps changed since the last write. */
  #persistOps(driver: RunDriver): TxnOp[] {
    const state = driver.engine.state;
    const record = driver.record;
    const before = record.status;
    syncHeader(record, state);
    // The record changes with the run's status and little else: most batches
    // touch only steps, and an unchanged record is not written again.
    const value = JSON.stringify(record);
    const recordOps: TxnOp[] = value === driver.written
      ? []
      : [{ type: "put", key: clusterKeys.run(record.runId), value }];
    driver.written = value;
    return [
      ...recordOps,
      ...statusIndexOps(record, before),
      ...driver.engine.drainChanged().map((stepId): TxnOp => ({
        type: "put",
        key: clusterKeys.step(record.runId, stepId),
        value: JSON.stringify(state.steps[stepId]),
      })),
    ];
  }

  /**
   * Fenced transactions (a failed fence means another scheduler leads), in
   * chunks that etcd accepts (`--max-txn-ops` is 128 by default). Chunks
   * land in order before anything is acted on; a successor that finds only
   * some of them sees attempts that were never handed out, and reschedules
   * them.
   */
  async #write(ops: TxnOp[]): Promise<void> {
    for (let at = 0; at < ops.length || at === 0; at += MAX_TXN_OPS) {
      const result = await this.#store.txn({
        compare: this.#options.fence,
        success: ops.slice(at, at + MAX_TXN_OPS),
      });
      if (!result.succeeded) throw new DeposedError();
    }
  }
  /**
   * Fenced writes of groups that share no key (one run's each): groups are
   * packed into transactions side by side and sent together, a few at a
   * time — etcd commits concurrent transactions in one raft round and one
   * fsync — while a group too big for one transaction goes in order, as
   * {@link #write} does. Resolves once all have landed.
   */
  async #writeGroups(groups: TxnOp[][]): Promise<void> {
    const chains: TxnOp[][] = [];
    let packed: TxnOp[] = [];
    for (const group of groups) {
      if (group.length > MAX_TXN_OPS) {
        chains.push(group);
        continue;
      }
      if (packed.length + group.length > MAX_TXN_OPS) {
        chains.push(packed);
        packed = [];
      }
      packed.push(...group);
    }
    if (packed.length > 0) chains.push(packed);
    let next = 0;
    const lanes = Array.from({ length: Math.min(WRITE_LANES, chains.length) }, async () => {
      while (next < chains.length) await this.#write(chains[next++]);
    });
    await Promise.all(lanes);
  }

  #perform(driver: RunDriver, effect: Effect): void {
    switch (effect.type) {
      case "WakeAt":
        driver.wake.arm(effect.at);
        return;
      case "Notify":
        this.#webhooks.notify(effect.webhook, effect.failure);
        return;
      case "NotifyRun":
        this.#webhooks.notifyRun(effect.webhook, effect.notice);
        return;
      case "Alert":
        this.#webhooks.alert(effect.email, effect.notice);
        return;
      case "StepStatus": {
        if (!isTerminalStepStatus(effect.status)) return;
        const step = driver.plan.steps[effect.stepId];
        const last = driver.engine.state.steps[effect.stepId]?.attempts.at(-1);
        this.#options.onEvent?.({
          type: "step-finished",
          runId: driver.record.runId,
          stepId: effect.stepId,
          backend: step?.backend ?? "unknown",
          outcome: effect.status,
          durationMs: last?.startedAt && last.endedAt ? last.endedAt - last.startedAt : undefined,
        });
        return;
      }
      case "RunFinished":
        driver.trace.runFinished(driver.engine.state, this.#now());
        driver.wake.clear();
        this.#runs.delete(driver.record.runId);
        // Its warnings go with it: kept, they would add up over the scheduler's term.
        this.#warned.delete(driver.record.runId);
        // Its place under a concurrency key goes to the next run in line.
        if (driver.plan.concurrencyKey) {
          const key = driver.plan.concurrencyKey.key;
          this.#enqueue(() => this.#serveKey(key));
        }
        this.#log({ msg: "run finished", run: driver.record.runId, status: effect.status });
        this.#options.onEvent?.({
          type: "run-finished",
          runId: driver.record.runId,
          status: effect.status,
        });
        return;
    }
  }

  #log(fields: Record<string, unknown>): void {
    this.#options.log?.({ component: "scheduler", ...fields });
  }
}

export type { AttemptResult };

/** The id of the child run of a `pipeline:` step's attempt: derived, so found again after a failover. */
export function childRunId(attemptId: string): string {
  const [parentRun] = attemptId.split("/");
  const hash = createHash("sha256").update(attemptId).digest("hex").slice(0, 6);
  return `${parentRun.slice(0, 15)}-${hash}`;
}

/**
 * Whether a worker could ever run a step: it runs the step's backend, its
 * labels match the step's selector, and it (or its server) declares every
 * secret the step is given — otherwise the step would fail there as a
 * `permission` error instead of waiting for a worker that can.
 */
function canRun(worker: WorkerRecord, step: PlannedStep, plan: Plan): boolean {
  if (!worker.capabilities.some((c) => c.backend === step.backend && c.available)) return false;
  if (!Object.entries(step.selector).every(([key, value]) => worker.labels[key] === value)) {
    return false;
  }
  // A worker that does not say which secrets it can be given (an older agent) is not second-guessed.
  if (worker.secrets === undefined) return true;
  const names = secretNamesOf(step, plan);
  if (names.length === 0) return true;
  let declared = declaredSecrets.get(worker);
  if (!declared) declaredSecrets.set(worker, declared = new Set(worker.secrets));
  return names.every((name) => declared.has(name));
}

/**
 * Placement asks these of every worker for every step: kept per record
 * (a worker's record is replaced, never changed, when its key changes).
 */
const declaredSecrets = new WeakMap<WorkerRecord, Set<string>>();
const stepSecretNames = new WeakMap<PlannedStep, string[]>();

/** The operator's names of the secrets a step is given. */
function secretNamesOf(step: PlannedStep, plan: Plan): string[] {
  let names = stepSecretNames.get(step);
  if (!names) {
    names = step.secrets.flatMap((env) => {
      const name = plan.secrets[env]?.secret;
      return name === undefined ? [] : [name];
    });
    stepSecretNames.set(step, names);
  }
  return names;
}
