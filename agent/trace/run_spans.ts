/**
 * The spans of a run, as its driver (local mode's, or the cluster's
 * scheduler) records them once the engine's state that they describe is
 * persisted:
 *
 * ```
 * run <pipeline>                      (one per round; round 1 is the root)
 * └── step <step id>                  (one per attempt: scheduled → ended)
 *     ├── queue wait                  (scheduled → placed on a runner)
 *     ├── fetch inputs   ┐
 *     ├── execute        ├ recorded where the attempt runs (agent/attempt/mod.ts)
 *     └── upload outputs ┘
 * ```
 *
 * Times come from the engine's state (the attempt's `scheduledAt` and
 * `endedAt`), ids from the run's trace id and the attempt id
 * (`context.ts`): a scheduler elected after a failover records the spans
 * of what it finishes exactly as the one before it would have.
 *
 * @module
 */

import type { Plan, RunState } from "../../core/model.ts";
import {
  attemptSpanId,
  formatTraceparent,
  runSpanId,
  traceIdOfRun,
  type TraceParent,
} from "./context.ts";
import type { AttributeValue, Tracer } from "./exporter.ts";

/** The run a {@link RunTrace} records: its record's header. */
export interface TracedRun {
  runId: string;
  pipeline: string;
  /** The trace id the run's record holds (one is derived for a run without). */
  traceId?: string;
}

/** Records the spans of one run; every method is a no-op without a tracer. */
export class RunTrace {
  /** The run's trace id. */
  readonly traceId: string;
  readonly #run: TracedRun;
  readonly #tracer: Tracer | undefined;
  /** Attempts whose span was recorded: a duplicated report records nothing twice. */
  readonly #recorded = new Set<string>();

  /** The trace of `run`, recorded to `tracer` if there is one. */
  constructor(run: TracedRun, tracer?: Tracer) {
    this.#run = run;
    this.#tracer = tracer;
    this.traceId = traceIdOfRun(run);
  }

  /** Whether spans are recorded at all. */
  get enabled(): boolean {
    return this.#tracer !== undefined;
  }

  /** The span an attempt's own spans (inputs, execution, outputs) hang under. */
  attemptParent(attemptId: string): TraceParent {
    return { traceId: this.traceId, spanId: attemptSpanId(this.traceId, attemptId) };
  }

  /** The `traceparent` an attempt is handed (its assignment carries it to an agent). */
  traceparent(attemptId: string): string {
    return formatTraceparent(this.attemptParent(attemptId));
  }

  /** An attempt left the queue at `untilMs`, placed on `worker`. */
  queueWait(state: RunState, stepId: string, attemptId: string, untilMs: number, worker: string) {
    if (!this.#tracer) return;
    const attempt = attemptOf(state, stepId, attemptId);
    if (!attempt) return;
    this.#tracer.record({
      traceId: this.traceId,
      spanId: attemptSpanId(this.traceId, `${attemptId}\u0000queue`),
      parentSpanId: attemptSpanId(this.traceId, attemptId),
      name: "queue wait",
      startMs: attempt.scheduledAt,
      endMs: untilMs,
      attributes: {
        ...this.#runAttributes(),
        "runnel.step.id": stepId,
        "runnel.attempt.id": attemptId,
        "runnel.attempt": attempt.attempt,
        "runnel.worker": worker,
      },
    });
  }

  /**
   * An attempt ended (its result, loss or stop is in `state`): its span,
   * once. An attempt that has not ended yet records nothing.
   */
  attemptEnded(plan: Plan, state: RunState, stepId: string, attemptId: string): void {
    if (!this.#tracer || this.#recorded.has(attemptId)) return;
    const attempt = attemptOf(state, stepId, attemptId);
    if (!attempt || attempt.endedAt === undefined) return;
    this.#recorded.add(attemptId);
    const result = attempt.result;
    const step = plan.steps[stepId];
    const outcome = !result
      ? "ended"
      : result.ok
      ? "succeeded"
      : result.lost
      ? "lost"
      : result.errorClass === "cancelled" || result.errorClass === "timeout"
      ? result.errorClass
      : "failed";
    this.#tracer.record({
      traceId: this.traceId,
      spanId: attemptSpanId(this.traceId, attemptId),
      parentSpanId: runSpanId(this.traceId, state.round),
      name: `step ${stepId}`,
      startMs: attempt.scheduledAt,
      endMs: attempt.endedAt,
      attributes: {
        ...this.#runAttributes(),
        "runnel.step.id": stepId,
        "runnel.step.name": step?.name,
        "runnel.attempt.id": attemptId,
        "runnel.attempt": attempt.attempt,
        "runnel.backend": step?.backend,
        "runnel.worker": attempt.worker,
        "runnel.outcome": outcome,
        ...(result && !result.ok ? { "error.type": result.errorClass } : {}),
        "runnel.exit_code": result?.exitCode,
        ...(result?.ok && result.cached ? { "runnel.cached": true } : {}),
      },
      ...(result && !result.ok ? { error: result.message ?? result.errorClass } : {}),
    });
  }

  /** The run's round ended: its span. */
  runFinished(state: RunState, now: number): void {
    if (!this.#tracer) return;
    const failed = state.status === "failed" || state.status === "cancelled";
    const attributes: Record<string, AttributeValue | undefined> = {
      ...this.#runAttributes(),
      "runnel.run.status": state.status,
      "runnel.run.round": state.round,
    };
    this.#tracer.record({
      traceId: this.traceId,
      spanId: runSpanId(this.traceId, state.round),
      ...(state.round > 1 ? { parentSpanId: runSpanId(this.traceId, 1) } : {}),
      name: `run ${this.#run.pipeline}`,
      startMs: state.startedAt ?? state.createdAt,
      endMs: state.finishedAt ?? now,
      attributes,
      ...(failed ? { error: `the run ${state.status}` } : {}),
    });
  }

  #runAttributes(): Record<string, AttributeValue> {
    return { "runnel.run.id": this.#run.runId, "runnel.pipeline": this.#run.pipeline };
  }
}

function attemptOf(state: RunState, stepId: string, attemptId: string) {
  return state.steps[stepId]?.attempts.find((attempt) => attempt.attemptId === attemptId);
}
