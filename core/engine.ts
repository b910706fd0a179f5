/**
 * The run engine: a deterministic state machine over one run, after
 * etcd-io/raft. A driver feeds it events (`Start`, attempt reports, `Tick`,
 * `Cancel`, `Resume`) and performs the effects it hands back (start or stop
 * an attempt, wake me at, notify a webhook, publish a status). The engine
 * does no I/O and reads no clock: every time it knows comes from an event,
 * and its retry jitter is a hash of the attempt id, so replaying the same
 * events gives the same state and effects.
 *
 * Cost: an event costs O(what it changes); only `Start`, `Cancel`, `Resume`
 * and rehydration touch every step. The engine keeps, besides the persisted
 * {@link RunState}, derived indexes (dependents, unmet-need counters, a ready
 * queue in plan order, timers) that it rebuilds from the state alone.
 *
 * @module
 */

import { isRetryable, retryDelay } from "./backoff.ts";
import { MinHeap } from "./_heap.ts";
import {
  type ConditionAst,
  type ConditionContext,
  evaluateCondition,
  parseCondition,
} from "./expr.ts";
import type {
  AttemptRecord,
  AttemptResult,
  Effect,
  EngineEvent,
  FailureInfo,
  FanOutLeg,
  Plan,
  PlannedStep,
  RunNotice,
  RunState,
  StepState,
  StepStatus,
} from "./model.ts";
import { isTerminalStepStatus } from "./model.ts";
import { expandPlan, expandSplit, fanOutProblem } from "./fanout.ts";

/** The condition of a step that does not say `when`. */
export const DEFAULT_CONDITION = "success()";

/** Why the engine refused an event (it then changed nothing). */
export type RejectionReason = "duplicate" | "stale-attempt" | "unknown-step" | "not-applicable";

/** What one event did: the effects for the driver, or why it was refused. */
export interface EngineStepResult {
  /** Effects to perform, in order. Empty when the event was rejected. */
  effects: Effect[];
  /** Set when the event was refused; the state is then unchanged. */
  rejected?: RejectionReason;
}

/** Options of {@link RunEngine.start}. */
export interface StartOptions {
  runId: string;
  /** Creation time of the run (epoch ms). */
  now: number;
  /** Steps the run starts with already succeeded (a rerun's reused ones, see `rerun.ts`). */
  reuse?: Record<string, StepState>;
}

/** A plan, or a persisted state, that the engine cannot work with. */
export class EngineStateError extends Error {
  /** Stable error code. */
  readonly code = "invalid_engine_state";

  /** Builds the error from its full message. */
  constructor(message: string) {
    super(message);
    this.name = "EngineStateError";
  }
}

/**
 * How many times a step's attempt may be lost with its worker (or runner)
 * and rescheduled in one round without using its retry budget: enough for
 * a rolling restart, few enough that a step that kills its workers ends.
 */
export const MAX_LOST_RESCHEDULES = 3;

const ACTIVE = new Set<StepStatus>(["scheduled", "running"]);

/** Status whose dependents see it as its outcome, after `continue-on-error`. */
function effectiveOutcome(step: PlannedStep, state: StepState): StepStatus {
  return state.status === "failed" && step.continueOnError ? "succeeded" : state.status;
}

/** Outcome of a step name over its legs: failed, else cancelled, else skipped, else succeeded. */
const OUTCOME_RANK: Partial<Record<StepStatus, number>> = {
  failed: 3,
  cancelled: 2,
  skipped: 1,
  succeeded: 0,
};

/** Key order independent equality of two JSON values (report de-duplication). */
function sameJson(a: unknown, b: unknown): boolean {
  if (a === b) return true;
  if (typeof a !== "object" || typeof b !== "object" || a === null || b === null) return false;
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  const left = a as Record<string, unknown>;
  const right = b as Record<string, unknown>;
  const leftKeys = Object.keys(left).filter((key) => left[key] !== undefined);
  const rightKeys = Object.keys(right).filter((key) => right[key] !== undefined);
  if (leftKeys.length !== rightKeys.length) return false;
  return leftKeys.every((key) => sameJson(left[key], right[key]));
}

/** A pending wake-up: a retry becoming due, or an attempt's deadline. */
interface Timer {
  at: number;
  /** Plan order index of the step, to break ties deterministically. */
  index: number;
  stepId: string;
  /** Set for a deadline: the attempt it guards. */
  attemptId?: string;
  /**
   * What it guards: an attempt's `timeout` (absent), the wait of a
   * scheduled attempt for a worker (`queue`), the run's `deadline` (`run`).
   */
  kind?: "queue" | "run" | "approval";
}

function timerLess(a: Timer, b: Timer): boolean {
  return a.at < b.at || (a.at === b.at && a.index < b.index);
}

function numberLess(a: number, b: number): boolean {
  return a < b;
}

/**
 * The run engine of one run. Feed it events with {@link RunEngine.step},
 * perform the returned effects, and persist the steps {@link RunEngine.drainChanged}
 * names. After rehydrating from a persisted state, feed it a `Tick`: the
 * answer re-announces the earliest wake-up.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { RunEngine } from "./engine.ts";
 * import { planOf } from "./_testing.ts";
 *
 * const engine = RunEngine.start(planOf([{ id: "build" }]), { runId: "r1", now: 0 });
 * const { effects } = engine.step({ type: "Start", now: 0 });
 * const start = effects.find((effect) => effect.type === "StartAttempt");
 * assert.deepEqual(start, {
 *   type: "StartAttempt",
 *   stepId: "build",
 *   attemptId: "r1/build/1",
 *   attempt: 1,
 * });
 * ```
 */
export class RunEngine {
  readonly #plan: Plan;
  readonly #state: RunState;
  /** Plan order (every step exactly once). */
  #order: string[];
  readonly #index = new Map<string, number>();
  readonly #dependents = new Map<string, string[]>();
  readonly #conditions = new Map<string, ConditionAst>();
  /** Needs of each step that are not terminal yet. */
  readonly #unmet = new Map<string, number>();
  /** Ready steps (pending with a true condition, or retrying and due), by plan order. */
  #queue = new MinHeap<number>(numberLess);
  readonly #queued = new Set<string>();
  /** Queued legs of a step name held back by its own concurrency limit. */
  readonly #blocked = new Map<string, MinHeap<number>>();
  /** Steps scheduled or running. */
  readonly #active = new Set<string>();
  readonly #activeByName = new Map<string, number>();
  #timers = new MinHeap<Timer>(timerLess);
  #terminalCount = 0;
  /** Steps that failed without `continue-on-error`. */
  #hardFailures = 0;
  /** Steps whose unmet needs reached zero, waiting for their condition. */
  #readyWork: string[] = [];
  readonly #changed = new Set<string>();
  #effects: Effect[] = [];

  /**
   * Fresh state of a run of `plan`: every step pending, the run pending.
   * Feed `{ type: "Start" }` next.
   */
  static start(plan: Plan, options: StartOptions): RunEngine {
    const steps: Record<string, StepState> = {};
    for (const id of Object.keys(plan.steps)) {
      steps[id] = options.reuse?.[id] ??
        { id, status: "pending", attemptsThisRound: 0, attempts: [] };
    }
    const state: RunState = {
      runId: options.runId,
      pipeline: plan.name,
      status: "pending",
      createdAt: options.now,
      round: 1,
      steps,
    };
    const engine = new RunEngine(plan, state);
    for (const id of engine.#order) engine.#changed.add(id);
    return engine;
  }

  /**
   * Rehydrates the engine of `plan` from a persisted `state` (which it then
   * owns and mutates).
   *
   * @throws {EngineStateError} when the plan's needs or order name missing
   * steps, or the state lacks a step of the plan.
   */
  constructor(plan: Plan, state: RunState) {
    this.#plan = plan;
    this.#state = state;
    // Legs of split nodes that already ran (a rehydrated run) come back first.
    for (const id of expandPlan(plan, state.steps)) {
      state.steps[id] ??= { id, status: "pending", attemptsThisRound: 0, attempts: [] };
    }
    const order = plan.order.filter((id) => id in plan.steps);
    const seen = new Set(order);
    for (const id of Object.keys(plan.steps)) if (!seen.has(id)) order.push(id);
    this.#order = order;
    order.forEach((id, index) => {
      this.#index.set(id, index);
      this.#dependents.set(id, []);
    });
    for (const id of order) {
      if (!(id in state.steps)) {
        throw new EngineStateError(`Expected the run state to hold step "${id}" of the plan`);
      }
      for (const need of plan.steps[id].needs) {
        const dependents = this.#dependents.get(need);
        if (!dependents) {
          throw new EngineStateError(`Expected "${need}" (a need of "${id}") to be a step`);
        }
        dependents.push(id);
      }
    }
    this.#rebuild();
    if (state.status === "running") {
      // Pending steps with every need terminal already passed their condition
      // (a false one would have skipped them in the same event): queue them.
      for (const id of order) {
        if (state.steps[id].status === "pending" && this.#unmet.get(id) === 0) this.#enqueue(id);
      }
    }
  }

  /** The run state: plain JSON data, live (persist it, do not mutate it). */
  get state(): RunState {
    return this.#state;
  }

  /** Step ids whose state changed since the last call, in the order they changed. */
  drainChanged(): string[] {
    const changed = [...this.#changed];
    this.#changed.clear();
    return changed;
  }

  /** Attempts the driver should have in flight (scheduled or running), in plan order. */
  runningAttempts(): Array<{ stepId: string; attemptId: string }> {
    return [...this.#active]
      .sort((a, b) => this.#index.get(a)! - this.#index.get(b)!)
      .map((stepId) => ({ stepId, attemptId: this.#state.steps[stepId].attemptId! }));
  }

  /** Applies one event; deterministic, no I/O. A rejected event changes nothing. */
  step(event: EngineEvent): EngineStepResult {
    this.#effects = [];
    const wakeBefore = this.#earliestTimer();
    const rejected = this.#apply(event);
    if (rejected) {
      this.#effects = [];
      return { effects: [], rejected };
    }
    this.#settle(event.now);
    const wakeAfter = this.#earliestTimer();
    if (
      wakeAfter !== undefined && this.#state.status === "running" &&
      (wakeAfter !== wakeBefore || event.type === "Tick")
    ) {
      this.#effects.push({ type: "WakeAt", at: wakeAfter });
    }
    const effects = this.#effects;
    this.#effects = [];
    return { effects };
  }

  #apply(event: EngineEvent): RejectionReason | undefined {
    switch (event.type) {
      case "Start":
        return this.#onStart(event.now);
      case "AttemptStarted":
      case "AttemptExited":
      case "AttemptLost":
        return this.#onReport(event);
      case "Tick":
        return this.#onTick(event.now);
      case "Cancel":
        return this.#onCancel(event.now, event.reason);
      case "Resume":
        return this.#onResume(event.now);
      case "Approve":
        return this.#onApprove(event);
      default:
        return "not-applicable";
    }
  }

  #onStart(now: number): RejectionReason | undefined {
    if (this.#state.status !== "pending") return "not-applicable";
    this.#state.status = "running";
    this.#state.startedAt = now;
    this.#armRunDeadline(now);
    for (const id of this.#order) {
      if (this.#state.steps[id].status === "pending" && this.#unmet.get(id) === 0) {
        this.#readyWork.push(id);
      }
    }
    return undefined;
  }

  #onReport(
    event: Extract<EngineEvent, { type: "AttemptStarted" | "AttemptExited" | "AttemptLost" }>,
  ): RejectionReason | undefined {
    const step = this.#state.steps[event.stepId];
    if (!step || !(event.stepId in this.#plan.steps)) return "unknown-step";
    if (step.attemptId === undefined || step.attemptId !== event.attemptId) return "stale-attempt";
    const record = step.attempts[step.attempts.length - 1];
    if (!record || record.attemptId !== event.attemptId) return "stale-attempt";
    const ended = record.endedAt !== undefined;

    if (event.type === "AttemptStarted") {
      if (record.startedAt !== undefined) return "duplicate";
      if (ended || step.status !== "scheduled") return "stale-attempt";
      record.startedAt = event.now;
      if (event.worker !== undefined) record.worker = event.worker;
      this.#setStatus(event.stepId, "running", event.now);
      this.#armDeadline(event.stepId);
      return undefined;
    }

    const result: AttemptResult = event.type === "AttemptExited" ? event.result : {
      ok: false,
      errorClass: "infrastructure",
      message: `Attempt lost: ${event.reason}`,
      lost: true,
    };
    // A report of an attempt the engine already closed is a duplicate when it
    // says what was recorded, and stale otherwise (the attempt was timed out,
    // cancelled or lost before this report arrived).
    if (ended) return sameJson(record.result, result) ? "duplicate" : "stale-attempt";
    if (!ACTIVE.has(step.status)) return "stale-attempt";
    this.#endAttempt(event.stepId, record, result, event.now);
    return undefined;
  }

  #onTick(now: number): RejectionReason | undefined {
    if (this.#state.status !== "running") return "not-applicable";
    for (;;) {
      const timer = this.#timers.peek();
      if (timer === undefined || timer.at > now) break;
      this.#timers.pop();
      if (!this.#timerValid(timer)) continue;
      if (timer.kind === "run") {
        this.#failForDeadline(now);
        return undefined;
      }
      const step = this.#state.steps[timer.stepId];
      if (timer.kind === "approval") {
        const timeoutMs = this.#plan.steps[timer.stepId].approval?.timeoutMs;
        step.approval = { ...step.approval!, decidedAt: now, outcome: "timed-out" };
        this.#setStatus(
          timer.stepId,
          "failed",
          now,
          `approval timed out: nobody decided within ${timeoutMs} ms`,
        );
        continue;
      }
      if (timer.kind === "queue") {
        const record = step.attempts[step.attempts.length - 1];
        const queueTimeoutMs = this.#plan.steps[timer.stepId].queueTimeoutMs;
        // Withdrawn before it started: the driver drops it from its queue.
        this.#effects.push({
          type: "StopAttempt",
          stepId: timer.stepId,
          attemptId: record.attemptId,
          reason: "timeout",
        });
        this.#endAttempt(timer.stepId, record, {
          ok: false,
          errorClass: "queue-timeout",
          message: `Expected a worker to start the attempt within its queue-timeout of ` +
            `${queueTimeoutMs} ms; none did`,
        }, now);
      } else if (timer.attemptId === undefined) {
        // Due: the step now waits only for a free slot. Clearing retryAt
        // records that in the state, so a rehydrated engine queues it too.
        delete step.retryAt;
        this.#changed.add(timer.stepId);
        this.#enqueue(timer.stepId);
      } else {
        const record = step.attempts[step.attempts.length - 1];
        const timeoutMs = this.#plan.steps[timer.stepId].timeoutMs;
        this.#effects.push({
          type: "StopAttempt",
          stepId: timer.stepId,
          attemptId: record.attemptId,
          reason: "timeout",
        });
        this.#endAttempt(timer.stepId, record, {
          ok: false,
          errorClass: "timeout",
          message: `Expected the attempt to end within its timeout of ${timeoutMs} ms`,
        }, now);
      }
    }
    return undefined;
  }

  #onCancel(now: number, reason: string | undefined): RejectionReason | undefined {
    const state = this.#state;
    if (state.status !== "pending" && state.status !== "running") return "not-applicable";
    this.#endRun(now, {
      status: "cancelled",
      why: reason ?? "run cancelled",
      errorClass: "cancelled",
      stop: "cancel",
    });
    return undefined;
  }

  /**
   * Ends the run at once (a cancel, a passed deadline): running attempts are
   * stopped and fail with `errorClass`, steps that were to run will not.
   */
  #endRun(
    now: number,
    end: {
      status: "cancelled" | "failed";
      why: string;
      errorClass: "cancelled" | "deadline";
      stop: "cancel" | "timeout";
    },
  ): void {
    const state = this.#state;
    // The run ends first so that no step becomes ready on the way.
    state.status = end.status;
    for (const id of this.#order) {
      const step = state.steps[id];
      if (isTerminalStepStatus(step.status)) continue;
      const active = ACTIVE.has(step.status);
      if (active) {
        const record = step.attempts[step.attempts.length - 1];
        record.endedAt = now;
        record.result = {
          ok: false,
          errorClass: end.errorClass,
          message: `${end.errorClass === "cancelled" ? "Cancelled" : "Stopped"}: ${end.why}`,
        };
        this.#effects.push({
          type: "StopAttempt",
          stepId: id,
          attemptId: record.attemptId,
          reason: end.stop,
        });
      }
      delete step.retryAt;
      // A stopped attempt fails with the run; a step that never ran is cancelled.
      this.#setStatus(id, active && end.status === "failed" ? "failed" : "cancelled", now, end.why);
    }
    this.#finishRun(end.status, now);
    this.#queue = new MinHeap<number>(numberLess);
    this.#queued.clear();
    this.#blocked.clear();
    this.#timers = new MinHeap<Timer>(timerLess);
  }

  #onResume(now: number): RejectionReason | undefined {
    const state = this.#state;
    if (state.status !== "failed" && state.status !== "cancelled" && state.status !== "running") {
      return "not-applicable";
    }
    state.round += 1;
    state.status = "running";
    delete state.finishedAt;
    // Plan order is topological, so each step's needs are settled before it.
    for (const id of this.#order) {
      const step = state.steps[id];
      const rerun = step.status === "failed" || step.status === "cancelled" ||
        step.status === "skipped" ||
        // A retrying step whose need goes back to pending waits for it again:
        // its condition was judged on the outcome the resume discards.
        (step.status === "retrying" &&
          this.#plan.steps[id].needs.some((need) =>
            !isTerminalStepStatus(state.steps[need].status)
          ));
      if (!rerun) continue;
      step.status = "pending";
      step.attemptsThisRound = 0;
      delete step.lostThisRound;
      delete step.reason;
      delete step.finishedAt;
      delete step.retryAt;
      delete step.outputs;
      delete step.values;
      delete step.approval;
      delete step.cached;
      this.#changed.add(id);
      this.#effects.push({
        type: "StepStatus",
        stepId: id,
        status: "pending",
        attempt: step.attempts.length,
        at: now,
        reason: `resumed (round ${state.round})`,
      });
    }
    delete state.deadlineAt;
    this.#rebuild();
    // Each round has a deadline of its own.
    this.#armRunDeadline(now);
    for (const id of this.#order) {
      const step = state.steps[id];
      if (step.status === "pending" && this.#unmet.get(id) === 0) this.#readyWork.push(id);
    }
    return undefined;
  }

  /** The run's deadline passed: what still runs is stopped, and the run fails. */
  #failForDeadline(now: number): void {
    this.#endRun(now, {
      status: "failed",
      why: `the run's deadline of ${this.#plan.deadlineMs} ms passed`,
      errorClass: "deadline",
      stop: "timeout",
    });
  }

  /** Evaluates steps that became ready, fills free slots, finishes the run when all is done. */
  #settle(now: number): void {
    if (this.#state.status !== "running") return;
    while (this.#readyWork.length > 0) {
      const work = this.#readyWork;
      this.#readyWork = [];
      for (const id of work) this.#evaluateReady(id, now);
    }
    this.#dispatch(now);
    if (this.#terminalCount === this.#order.length) {
      this.#finishRun(this.#hardFailures > 0 ? "failed" : "succeeded", now);
    }
  }

  #evaluateReady(id: string, now: number): void {
    const step = this.#state.steps[id];
    if (step.status !== "pending") return;
    const planned = this.#plan.steps[id];
    const context = this.#conditionContext(planned);
    let runs: boolean;
    try {
      runs = evaluateCondition(this.#condition(planned.when ?? DEFAULT_CONDITION), context);
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      this.#setStatus(id, "failed", now, `condition failed to evaluate: ${message}`);
      return;
    }
    if (runs) {
      if (planned.approval && step.approval?.outcome !== "approved") {
        // A person decides first; the wait is bounded by its timeout.
        step.approval = { requestedAt: now };
        this.#setStatus(id, "waiting", now, planned.approval.message ?? "waiting for approval");
        this.#armApprovalTimeout(id);
        return;
      }
      this.#enqueue(id);
      return;
    }
    this.#setStatus(id, "skipped", now, this.#skipReason(planned, context));
  }

  #condition(source: string): ConditionAst {
    let ast = this.#conditions.get(source);
    if (ast === undefined) {
      ast = parseCondition(source);
      this.#conditions.set(source, ast);
    }
    return ast;
  }

  #conditionContext(planned: PlannedStep): ConditionContext {
    const needs: ConditionContext["needs"] = {};
    const byName: Record<string, StepStatus> = {};
    const valuesByName: Record<string, Record<string, string>> = {};
    for (const need of planned.needs) {
      const needPlanned = this.#plan.steps[need];
      const outcome = effectiveOutcome(needPlanned, this.#state.steps[need]);
      const values = this.#state.steps[need].values;
      needs[need] = { outcome, ...(values ? { values } : {}) };
      if (values) valuesByName[needPlanned.name] = values;
      const previous = byName[needPlanned.name];
      if (previous === undefined || (OUTCOME_RANK[outcome] ?? 0) > (OUTCOME_RANK[previous] ?? 0)) {
        byName[needPlanned.name] = outcome;
      }
    }
    for (const [name, outcome] of Object.entries(byName)) {
      needs[name] = { outcome, ...(valuesByName[name] ? { values: valuesByName[name] } : {}) };
    }
    const context: ConditionContext = {
      needs,
      runCancelled: this.#state.status === "cancelled",
      env: { ...this.#plan.env, ...planned.env },
    };
    if (planned.matrix !== undefined) context.matrix = planned.matrix;
    return context;
  }

  #skipReason(planned: PlannedStep, context: ConditionContext): string {
    if (planned.when !== undefined) return "when was false";
    const names = (outcome: StepStatus) => {
      const found = new Set<string>();
      for (const need of planned.needs) {
        if (context.needs[need].outcome === outcome) found.add(this.#plan.steps[need].name);
      }
      return [...found].join(", ");
    };
    for (const outcome of ["failed", "cancelled", "skipped"] as const) {
      const list = names(outcome);
      if (list) return `needs ${outcome}: ${list}`;
    }
    return "when was false";
  }

  #enqueue(id: string): void {
    if (this.#queued.has(id)) return;
    this.#queued.add(id);
    this.#queue.push(this.#index.get(id)!);
  }

  #dispatch(now: number): void {
    const limit = this.#plan.concurrency;
    while (this.#queue.size > 0) {
      if (limit !== undefined && this.#active.size >= limit) return;
      const id = this.#order[this.#queue.pop()!];
      const planned = this.#plan.steps[id];
      const nameLimit = planned.concurrency;
      if (nameLimit !== undefined && (this.#activeByName.get(planned.name) ?? 0) >= nameLimit) {
        let blocked = this.#blocked.get(planned.name);
        if (!blocked) {
          blocked = new MinHeap<number>(numberLess);
          this.#blocked.set(planned.name, blocked);
        }
        blocked.push(this.#index.get(id)!);
        continue;
      }
      this.#queued.delete(id);
      this.#schedule(id, now);
    }
  }

  #schedule(id: string, now: number): void {
    const step = this.#state.steps[id];
    const attempt = step.attempts.length + 1;
    const attemptId = `${this.#state.runId}/${id}/${attempt}`;
    step.attempts.push({ attemptId, attempt, scheduledAt: now });
    step.attemptId = attemptId;
    step.attemptsThisRound += 1;
    delete step.retryAt;
    this.#setStatus(id, "scheduled", now);
    this.#armQueueTimeout(id);
    const deadline = this.#armDeadline(id);
    const effect: Effect = { type: "StartAttempt", stepId: id, attemptId, attempt };
    if (deadline !== undefined) effect.deadline = deadline;
    this.#effects.push(effect);
  }

  /** Deadline of the step's current attempt, counted from its start (or its scheduling). */
  #deadlineOf(id: string): number | undefined {
    const timeoutMs = this.#plan.steps[id].timeoutMs;
    if (timeoutMs === undefined) return undefined;
    const step = this.#state.steps[id];
    const record = step.attempts[step.attempts.length - 1];
    return (record.startedAt ?? record.scheduledAt) + timeoutMs;
  }

  #onApprove(event: Extract<EngineEvent, { type: "Approve" }>): RejectionReason | undefined {
    const step = this.#state.steps[event.stepId];
    if (!step || !(event.stepId in this.#plan.steps)) return "unknown-step";
    if (this.#state.status !== "running" || step.status !== "waiting") return "not-applicable";
    step.approval = {
      ...step.approval!,
      decidedAt: event.now,
      by: event.by,
      outcome: event.approved ? "approved" : "rejected",
      ...(event.reason ? { reason: event.reason } : {}),
    };
    if (event.approved) {
      this.#setStatus(event.stepId, "pending", event.now, `approved by ${event.by}`);
      this.#readyWork.push(event.stepId);
    } else {
      this.#setStatus(
        event.stepId,
        "failed",
        event.now,
        `rejected by ${event.by}${event.reason ? `: ${event.reason}` : ""}`,
      );
    }
    return undefined;
  }

  /** When the step's approval gate times out. */
  #approvalDeadlineOf(id: string): number | undefined {
    const timeoutMs = this.#plan.steps[id].approval?.timeoutMs;
    const requestedAt = this.#state.steps[id].approval?.requestedAt;
    return timeoutMs === undefined || requestedAt === undefined
      ? undefined
      : requestedAt + timeoutMs;
  }

  #armApprovalTimeout(id: string): void {
    const at = this.#approvalDeadlineOf(id);
    if (at === undefined) return;
    this.#timers.push({ at, index: this.#index.get(id)!, stepId: id, kind: "approval" });
  }

  /** When the step's scheduled attempt has waited too long for a worker. */
  #queueDeadlineOf(id: string): number | undefined {
    const queueTimeoutMs = this.#plan.steps[id].queueTimeoutMs;
    if (queueTimeoutMs === undefined) return undefined;
    const step = this.#state.steps[id];
    const record = step.attempts[step.attempts.length - 1];
    return record.scheduledAt + queueTimeoutMs;
  }

  #armQueueTimeout(id: string): void {
    const at = this.#queueDeadlineOf(id);
    if (at === undefined) return;
    const attemptId = this.#state.steps[id].attemptId;
    this.#timers.push({ at, index: this.#index.get(id)!, stepId: id, attemptId, kind: "queue" });
  }

  /** Sets this round's run deadline (at `Start` and `Resume`) and arms it. */
  #armRunDeadline(now: number): void {
    const deadlineMs = this.#plan.deadlineMs;
    if (deadlineMs === undefined) return;
    this.#state.deadlineAt = now + deadlineMs;
    this.#timers.push({ at: this.#state.deadlineAt, index: -1, stepId: "", kind: "run" });
  }

  #armDeadline(id: string): number | undefined {
    const at = this.#deadlineOf(id);
    if (at !== undefined) {
      const attemptId = this.#state.steps[id].attemptId;
      this.#timers.push({ at, index: this.#index.get(id)!, stepId: id, attemptId });
    }
    return at;
  }

  #timerValid(timer: Timer): boolean {
    if (timer.kind === "run") {
      return this.#state.status === "running" && this.#state.deadlineAt === timer.at;
    }
    const step = this.#state.steps[timer.stepId];
    if (timer.kind === "approval") {
      return step.status === "waiting" && this.#approvalDeadlineOf(timer.stepId) === timer.at;
    }
    if (timer.kind === "queue") {
      return step.status === "scheduled" && step.attemptId === timer.attemptId &&
        this.#queueDeadlineOf(timer.stepId) === timer.at;
    }
    if (timer.attemptId === undefined) {
      return step.status === "retrying" && step.retryAt === timer.at;
    }
    return ACTIVE.has(step.status) && step.attemptId === timer.attemptId &&
      this.#deadlineOf(timer.stepId) === timer.at;
  }

  #earliestTimer(): number | undefined {
    for (;;) {
      const timer = this.#timers.peek();
      if (timer === undefined) return undefined;
      if (this.#timerValid(timer)) return timer.at;
      this.#timers.pop();
    }
  }

  #endAttempt(id: string, record: AttemptRecord, result: AttemptResult, now: number): void {
    const step = this.#state.steps[id];
    const planned = this.#plan.steps[id];
    if (result.ok && planned.fanOut) {
      const problem = fanOutProblem(planned, result.fanOut, result.outputs);
      if (problem) {
        result = { ok: false, errorClass: "application", message: `Split refused: ${problem}` };
      }
    }
    record.endedAt = now;
    record.result = result;
    if (result.ok && planned.fanOut) {
      step.outputs = result.outputs;
      step.fanOut = { legs: result.fanOut ?? [] };
      const legs = this.#expand(id, step.fanOut.legs);
      const what = planned.fanOut.kind === "batch" ? "batch" : "item";
      this.#setStatus(
        id,
        "succeeded",
        now,
        `fanned out to ${legs} leg${legs === 1 ? "" : "s"} (one per ${what})`,
      );
      return;
    }
    if (result.ok) {
      step.outputs = result.outputs;
      if (result.values && Object.keys(result.values).length > 0) step.values = result.values;
      if (result.cached) step.cached = true;
      this.#setStatus(
        id,
        "succeeded",
        now,
        result.childRun !== undefined ? `child run ${result.childRun}` : undefined,
      );
      return;
    }
    if (this.#unmet.get(id)! > 0) {
      // A resume re-opened a need while this attempt ran: rather than retry
      // on a stale judgement, wait for the need and evaluate the step afresh.
      step.attemptsThisRound = 0;
      this.#setStatus(id, "pending", now, "waiting for needs re-run by resume");
      return;
    }
    if (!result.ok && result.lost && (step.lostThisRound ?? 0) < MAX_LOST_RESCHEDULES) {
      // Not the step's failure: its worker (or runner) went away. It runs
      // again at once, without using its retry budget, a few times at most
      // (a step that keeps killing its workers must end).
      step.lostThisRound = (step.lostThisRound ?? 0) + 1;
      step.attemptsThisRound -= 1;
      step.retryAt = now;
      this.#setStatus(id, "retrying", now, `attempt ${record.attempt} was lost; rescheduled`);
      this.#timers.push({ at: now, index: this.#index.get(id)!, stepId: id });
      return;
    }
    const policy = planned.retry;
    if (isRetryable(policy, result) && step.attemptsThisRound <= policy.max) {
      step.retryAt = now + retryDelay(policy, {
        retry: step.attemptsThisRound,
        key: record.attemptId,
      });
      this.#setStatus(
        id,
        "retrying",
        now,
        `attempt ${record.attempt} failed (${result.errorClass})`,
      );
      this.#timers.push({ at: step.retryAt, index: this.#index.get(id)!, stepId: id });
      return;
    }
    this.#setStatus(id, "failed", now, `${result.errorClass}: ${result.message}`);
    const webhook = planned.onFailure ?? this.#plan.onFailure;
    if (webhook !== undefined) {
      const failure: FailureInfo = {
        runId: this.#state.runId,
        pipeline: this.#state.pipeline,
        stepId: id,
        step: planned.name,
        attemptId: record.attemptId,
        attempt: record.attempt,
        errorClass: result.errorClass,
        message: result.message,
        at: now,
      };
      if (result.exitCode !== undefined) failure.exitCode = result.exitCode;
      this.#effects.push({ type: "Notify", webhook, failure });
    }
  }

  /**
   * Adds the legs of split node `splitId` (which just succeeded) to the plan
   * and the run: pending, each needing the split node, and needed by every
   * step that needed it. Heaps hold plan-order indexes, so they are
   * re-indexed. Returns the number of legs.
   */
  #expand(splitId: string, legs: FanOutLeg[]): number {
    const oldOrder = this.#order;
    const ids = expandSplit(this.#plan, splitId, legs);
    if (ids.length === 0 || this.#index.has(ids[0])) return ids.length;
    const state = this.#state;
    for (const id of ids) {
      state.steps[id] ??= { id, status: "pending", attemptsThisRound: 0, attempts: [] };
      this.#changed.add(id);
    }
    const order = this.#plan.order.filter((id) => id in this.#plan.steps);
    this.#order = order;
    this.#index.clear();
    order.forEach((id, index) => this.#index.set(id, index));
    const reindex = (heap: MinHeap<number>): MinHeap<number> => {
      const next = new MinHeap<number>(numberLess);
      while (heap.size > 0) next.push(this.#index.get(oldOrder[heap.pop()!])!);
      return next;
    };
    this.#queue = reindex(this.#queue);
    for (const [name, heap] of this.#blocked) this.#blocked.set(name, reindex(heap));
    const timers = new MinHeap<Timer>(timerLess);
    while (this.#timers.size > 0) {
      const timer = this.#timers.pop()!;
      timers.push(
        timer.kind === "run" ? timer : { ...timer, index: this.#index.get(timer.stepId)! },
      );
    }
    this.#timers = timers;
    // Dependents of the split node now wait for every leg too.
    const dependents = [...this.#dependents.get(splitId)!];
    for (const dependent of dependents) {
      this.#unmet.set(dependent, this.#unmet.get(dependent)! + ids.length);
    }
    for (const id of ids) {
      this.#dependents.set(id, [...dependents]);
      let unmet = 0;
      for (const need of this.#plan.steps[id].needs) {
        this.#dependents.get(need)!.push(id);
        if (!isTerminalStepStatus(state.steps[need].status)) unmet++;
      }
      this.#unmet.set(id, unmet);
    }
    return ids.length;
  }

  /** Changes a step's status, keeping every counter and index in step with it. */
  #setStatus(id: string, status: StepStatus, now: number, reason?: string): void {
    const step = this.#state.steps[id];
    const before = step.status;
    step.status = status;
    if (reason === undefined) delete step.reason;
    else step.reason = reason;
    this.#changed.add(id);
    const effect: Effect = {
      type: "StepStatus",
      stepId: id,
      status,
      attempt: step.attempts.length,
      at: now,
    };
    if (reason !== undefined) effect.reason = reason;
    this.#effects.push(effect);

    const name = this.#plan.steps[id].name;
    if (ACTIVE.has(before) && !ACTIVE.has(status)) {
      this.#active.delete(id);
      this.#activeByName.set(name, (this.#activeByName.get(name) ?? 1) - 1);
      // One slot of this name freed: one held-back leg may compete again.
      const next = this.#blocked.get(name)?.pop();
      if (next !== undefined) this.#queue.push(next);
    } else if (!ACTIVE.has(before) && ACTIVE.has(status)) {
      this.#active.add(id);
      this.#activeByName.set(name, (this.#activeByName.get(name) ?? 0) + 1);
    }
    if (isTerminalStepStatus(status) && !isTerminalStepStatus(before)) {
      step.finishedAt = now;
      this.#terminalCount += 1;
      if (status === "failed" && !this.#plan.steps[id].continueOnError) this.#hardFailures += 1;
      if (this.#state.status === "running") {
        for (const dependent of this.#dependents.get(id)!) {
          const unmet = this.#unmet.get(dependent)! - 1;
          this.#unmet.set(dependent, unmet);
          if (unmet === 0) this.#readyWork.push(dependent);
        }
      }
    }
  }

  #finishRun(status: "succeeded" | "failed" | "cancelled", now: number): void {
    this.#state.status = status;
    this.#state.finishedAt = now;
    this.#effects.push({ type: "RunFinished", status, at: now });
    const handlers = [
      ...(status === "succeeded" && this.#plan.onSuccess ? [this.#plan.onSuccess] : []),
      ...(this.#plan.onExit ? [this.#plan.onExit] : []),
    ];
    const email = this.#plan.emailAlert;
    const mailed = email !== undefined && (
      email.on.includes("exit") || (email.on.includes("failure") && status === "failed") ||
      (email.on.includes("success") && status === "succeeded")
    );
    if (handlers.length === 0 && !mailed) return;
    const notice: RunNotice = {
      runId: this.#state.runId,
      pipeline: this.#state.pipeline,
      status,
      at: now,
      ...(this.#state.startedAt !== undefined ? { startedAt: this.#state.startedAt } : {}),
      failedSteps: this.#order.filter((id) => this.#state.steps[id].status === "failed"),
    };
    for (const webhook of handlers) this.#effects.push({ type: "NotifyRun", webhook, notice });
    if (mailed) this.#effects.push({ type: "Alert", email: email!, notice });
  }

  /** Recomputes every derived index from the state alone. */
  #rebuild(): void {
    const state = this.#state;
    this.#queue = new MinHeap<number>(numberLess);
    this.#queued.clear();
    this.#blocked.clear();
    this.#active.clear();
    this.#activeByName.clear();
    this.#timers = new MinHeap<Timer>(timerLess);
    this.#terminalCount = 0;
    this.#hardFailures = 0;
    this.#readyWork = [];
    const running = state.status === "running";
    for (const id of this.#order) {
      const step = state.steps[id];
      const planned = this.#plan.steps[id];
      let unmet = 0;
      for (const need of planned.needs) {
        if (!isTerminalStepStatus(state.steps[need].status)) unmet++;
      }
      this.#unmet.set(id, unmet);
      if (isTerminalStepStatus(step.status)) {
        this.#terminalCount += 1;
        if (step.status === "failed" && !planned.continueOnError) this.#hardFailures += 1;
      } else if (ACTIVE.has(step.status)) {
        this.#active.add(id);
        this.#activeByName.set(planned.name, (this.#activeByName.get(planned.name) ?? 0) + 1);
        if (running) this.#armDeadline(id);
        if (running && step.status === "scheduled") this.#armQueueTimeout(id);
      } else if (step.status === "waiting" && running) {
        this.#armApprovalTimeout(id);
      } else if (step.status === "retrying" && running) {
        if (step.retryAt === undefined) this.#enqueue(id);
        else this.#timers.push({ at: step.retryAt, index: this.#index.get(id)!, stepId: id });
      }
    }
    if (running && state.deadlineAt !== undefined) {
      this.#timers.push({ at: state.deadlineAt, index: -1, stepId: "", kind: "run" });
    }
  }
}

/** The run-level fields a driver keeps in its own run record. */
export type RunHeader =
  & Pick<
    RunState,
    "runId" | "pipeline" | "status" | "createdAt" | "startedAt" | "finishedAt" | "round"
  >
  & Partial<Pick<RunState, "deadlineAt">>;

/**
 * The state to rehydrate an engine from: the stored run header and steps,
 * fitted to `plan`. A step added to the file since the run began starts
 * pending; a step removed from it is dropped.
 */
export function runStateOf(
  plan: Plan,
  header: RunHeader,
  stored: Record<string, StepState>,
): RunState {
  // The legs split nodes made are steps of the run too.
  expandPlan(plan, stored);
  const steps: Record<string, StepState> = {};
  for (const id of plan.order) {
    steps[id] = stored[id] ?? { id, status: "pending", attemptsThisRound: 0, attempts: [] };
  }
  return {
    runId: header.runId,
    pipeline: header.pipeline,
    status: header.status,
    createdAt: header.createdAt,
    startedAt: header.startedAt,
    finishedAt: header.finishedAt,
    round: header.round,
    ...(header.deadlineAt !== undefined ? { deadlineAt: header.deadlineAt } : {}),
    steps,
  };
}

/** Copies the engine's run-level fields into a driver's run record (before it is written). */
export function syncHeader(record: RunHeader, state: RunState): void {
  record.status = state.status;
  record.startedAt = state.startedAt;
  record.finishedAt = state.finishedAt;
  record.round = state.round;
  if (state.deadlineAt !== undefined) record.deadlineAt = state.deadlineAt;
  else delete record.deadlineAt;
}
