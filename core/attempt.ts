/**
 * What one attempt of a step gets, decided from the plan and the run's
 * state alone: the artifacts it reads, its environment, and the names of
 * the secrets to resolve for it. Both drivers (local mode and the cluster
 * scheduler) ask here, so a step sees the same inputs whoever runs it.
 *
 * @module
 */

import type { FanInLocator, Plan, StepState } from "./model.ts";
import { applyValues } from "./values.ts";

/** What {@link attemptGets} decides for one attempt. */
export interface AttemptGets {
  /** Input name → the artifacts it reads (a fan-in reads one per leg, in leg order). */
  inputs: Record<string, FanInLocator>;
  /** The pipeline's env overlaid with the step's (secret values are not in it). */
  env: Record<string, string>;
  /** Names of the pipeline secrets the step is given, resolved by the driver. */
  secrets: string[];
  /** The step's backend config, upstream values in place (`core/values.ts`). */
  config: Record<string, unknown>;
  /** The upstream values it reads (`step.name` → value), for its cache key. */
  values: Record<string, string>;
}

/** An input's upstream step has no record of the output it should read. */
export class InputMissingError extends Error {
  /** Stable error code. */
  readonly code = "input_missing";
  /** Attempts fail with this class: the artifact they need is not there. */
  readonly errorClass = "artifact";

  /** Builds the error from a full sentence. */
  constructor(message: string) {
    super(message);
    this.name = "InputMissingError";
  }
}

/**
 * Decides what an attempt of `stepId` gets from the states of the steps it
 * reads. Throws {@link InputMissingError} when an upstream step has no
 * record of an output the step reads (the engine starts a step only once
 * what it needs succeeded, so this is a corrupt state, not a user error).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { attemptGets } from "./attempt.ts";
 * import { parsePipeline } from "./load.ts";
 * const plan = parsePipeline(
 *   "name: p\nenv: { A: '1' }\nsteps:\n" +
 *     "  make: { backend: shell, run: 'true', outputs: [x.txt] }\n" +
 *     "  use: { backend: shell, run: 'true', needs: [make], env: { B: '2' }, inputs: { x: make/x.txt } }\n",
 *   { file: "p.yaml" },
 * );
 * const gets = attemptGets(plan, "r1", {
 *   make: {
 *     id: "make", status: "succeeded", attempts: [],
 *     outputs: { "x.txt": { name: "x.txt", digest: "sha256:ab", size: 2 } },
 *   },
 * }, "use");
 * assert.deepEqual(gets.env, { A: "1", B: "2" });
 * assert.equal(gets.inputs.x.artifacts[0].digest, "sha256:ab");
 * ```
 */
export function attemptGets(
  plan: Plan,
  runId: string,
  steps: Record<string, Pick<StepState, "outputs"> & Partial<StepState>>,
  stepId: string,
): AttemptGets {
  const step = plan.steps[stepId];
  const inputs: Record<string, FanInLocator> = {};
  for (const [name, input] of Object.entries(step.inputs)) {
    inputs[name] = {
      fanIn: input.fanIn,
      artifacts: input.from.map((from) => {
        const ref = steps[from]?.outputs?.[input.output];
        if (!ref) {
          throw new InputMissingError(
            `Input "${name}" of step "${stepId}" expects output "${input.output}" of step "${from}", which has none`,
          );
        }
        return {
          runId,
          stepId: from,
          name: input.output,
          digest: ref.digest,
          size: ref.size,
          leg: legName(plan, from),
        };
      }),
    };
  }
  // Values come from the step's needs (transitively): by step name, the
  // first instance of that name in plan order that published them.
  const valuesOf = (name: string) => {
    for (const id of plan.order) {
      if (plan.steps[id].name === name && steps[id]?.values) return steps[id].values;
    }
    return undefined;
  };
  const env = { ...plan.env, ...step.env };
  if (step.handler !== undefined) {
    // An exit handler learns how the rest of the run went.
    const failed = plan.order.filter((id) =>
      plan.steps[id].handler === undefined && steps[id]?.status === "failed"
    );
    const hard = failed.some((id) => !plan.steps[id].continueOnError);
    env.RUNNEL_RUN_STATUS = hard ? "failed" : "succeeded";
    env.RUNNEL_FAILED_STEPS = failed.join(",");
  }
  const applied = applyValues(step.config, env, valuesOf, stepId);
  return {
    inputs,
    env: applied.env,
    secrets: step.secrets,
    config: applied.config,
    values: applied.used,
  };
}

/**
 * The name of a matrix leg inside a fan-in input: `region=eu,size=2` (the
 * step id without its name); the step id for a plain step.
 */
export function legName(plan: Plan, stepId: string): string {
  const matrix = plan.steps[stepId]?.matrix;
  if (!matrix) return stepId;
  return Object.entries(matrix).map(([k, v]) => `${k}=${v}`).join(",");
}
