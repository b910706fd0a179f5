/**
 * Plan builders for tests of the run engine and its drivers: write only the
 * fields a test cares about, get a complete {@link Plan}.
 *
 * @module
 */

import { DEFAULT_RETRY_CLASSES } from "./model.ts";
import type { Plan, PlannedStep, RetryPolicy } from "./model.ts";

/** A step as a test writes it: an id, plus any fields that differ from the defaults. */
export type StepSpec = Omit<Partial<PlannedStep>, "retry"> & {
  id: string;
  retry?: Partial<RetryPolicy>;
};

/** Plan-level fields a test may set; `order` defaults to a topological order. */
export type PlanSpec = Partial<Omit<Plan, "steps">>;

/** A plan builder was given steps that do not form a DAG. */
export class TestPlanError extends Error {
  /** Stable error code. */
  readonly code = "invalid_test_plan";

  /** Builds the error from its full message. */
  constructor(message: string) {
    super(message);
    this.name = "TestPlanError";
  }
}

/**
 * A retry policy with test-friendly defaults: no retries, 1 s backoff
 * doubling up to 60 s, no jitter, the default retried classes.
 */
export function retryPolicy(overrides: Partial<RetryPolicy> = {}): RetryPolicy {
  return {
    max: 0,
    backoffMs: 1000,
    maxBackoffMs: 60_000,
    factor: 2,
    jitter: 0,
    onClasses: [...DEFAULT_RETRY_CLASSES],
    onExitCodes: [],
    ...overrides,
  };
}

/**
 * A complete planned step; `name` defaults to the id up to its first `[`
 * (so `convert[region=eu]` is a leg of `convert`).
 */
export function stepOf(spec: StepSpec): PlannedStep {
  const { retry, ...rest } = spec;
  const bracket = spec.id.indexOf("[");
  return {
    name: bracket > 0 ? spec.id.slice(0, bracket) : spec.id,
    backend: "shell",
    needs: [],
    config: {},
    inputs: {},
    outputs: [],
    env: {},
    secrets: [],
    resources: {},
    continueOnError: false,
    cache: false,
    selector: {},
    source: { file: "test.yaml", line: 1, col: 1 },
    specDigest: `digest-of-${spec.id}`,
    ...rest,
    retry: retryPolicy(retry),
  };
}

/**
 * A complete plan of `steps`, in a topological order (ties in the given order).
 *
 * @throws {TestPlanError} when a need names a missing step or the needs form a cycle.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { planOf } from "./_testing.ts";
 *
 * const plan = planOf([{ id: "build" }, { id: "test", needs: ["build"] }]);
 * assert.deepEqual(plan.order, ["build", "test"]);
 * ```
 */
export function planOf(steps: StepSpec[], options: PlanSpec = {}): Plan {
  const byId: Record<string, PlannedStep> = {};
  for (const spec of steps) byId[spec.id] = stepOf(spec);
  return {
    name: "test",
    file: "test.yaml",
    baseDir: "/tmp",
    env: {},
    secrets: {},
    digest: "test-digest",
    ...options,
    steps: byId,
    order: options.order ?? topologicalOrder(steps.map((spec) => byId[spec.id])),
  };
}

function topologicalOrder(steps: PlannedStep[]): string[] {
  const ids = new Set(steps.map((step) => step.id));
  const placed = new Set<string>();
  const order: string[] = [];
  while (order.length < steps.length) {
    const before = order.length;
    for (const step of steps) {
      if (placed.has(step.id)) continue;
      for (const need of step.needs) {
        if (!ids.has(need)) {
          throw new TestPlanError(`Expected "${need}" (a need of "${step.id}") to be a step`);
        }
      }
      if (step.needs.every((need) => placed.has(need))) {
        placed.add(step.id);
        order.push(step.id);
      }
    }
    if (order.length === before) {
      throw new TestPlanError("Expected the needs of the test plan to form no cycle");
    }
  }
  return order;
}
