/**
 * Rerunning steps of a finished run (Argo's `retry --node-field-selector`,
 * Airflow's `tasks clear --downstream`): a new run of the same plan in
 * which the chosen steps (and, with `downstream`, everything that depends
 * on them) run again, and every other step that succeeded is reused with
 * its outputs, by digest, without running.
 *
 * @module
 */

import type { Plan, StepState } from "./model.ts";

/** A rerun that cannot be made: no such step, say. */
export class RerunError extends Error {
  /** Stable code. */
  readonly code = "bad_rerun";

  /** Builds the error from a full sentence. */
  constructor(message: string) {
    super(message);
    this.name = "RerunError";
  }
}

/** What a rerun runs again and what it reuses. */
export interface RerunSelection {
  /** Step instance ids that run again, in plan order. */
  rerun: string[];
  /** Step states the new run starts with: succeeded, with the old run's outputs. */
  reused: Record<string, StepState>;
}

/**
 * Chooses what a rerun of `selected` (step names or instance ids) runs
 * again: those steps, their dependents with `downstream`, and every step
 * the old run did not finish successfully (nothing of it can be reused),
 * with its dependents. `usable` says whether an output can still be read
 * (a collected artifact cannot): a step whose outputs cannot is run again.
 */
export function selectRerun(
  plan: Plan,
  old: Record<string, StepState>,
  selected: string[],
  options: {
    downstream: boolean;
    fromRun: string;
    now: number;
    usable?: (digest: string) => boolean;
  },
): RerunSelection {
  const chosen = new Set<string>();
  for (const wanted of selected) {
    const ids = plan.order.filter((id) => id === wanted || plan.steps[id].name === wanted);
    if (ids.length === 0) {
      const names = [...new Set(plan.order.map((id) => plan.steps[id].name))];
      throw new RerunError(
        `Expected a step of pipeline "${plan.name}", got "${wanted}" (its steps: ${
          names.join(", ")
        })`,
      );
    }
    ids.forEach((id) => chosen.add(id));
  }
  const dependents = new Map<string, string[]>(plan.order.map((id) => [id, []]));
  for (const id of plan.order) {
    for (const need of plan.steps[id].needs) dependents.get(need)?.push(id);
  }
  const rerun = new Set<string>();
  const add = (id: string, withDependents: boolean) => {
    if (rerun.has(id)) return;
    rerun.add(id);
    if (withDependents) { for (const next of dependents.get(id) ?? []) add(next, true); }
  };
  for (const id of chosen) add(id, options.downstream);
  for (const id of plan.order) {
    const step = old[id];
    const outputs = Object.values(step?.outputs ?? {});
    const reusable = step?.status === "succeeded" &&
      outputs.every((ref) => options.usable?.(ref.digest) ?? true);
    if (!reusable) add(id, true);
  }
  const reused: Record<string, StepState> = {};
  for (const id of plan.order) {
    if (rerun.has(id)) continue;
    reused[id] = {
      id,
      status: "succeeded",
      attemptsThisRound: 0,
      attempts: [],
      ...(old[id].outputs ? { outputs: old[id].outputs } : {}),
      cached: true,
      reason: `reused from run ${options.fromRun}`,
      finishedAt: options.now,
    };
  }
  return { rerun: plan.order.filter((id) => rerun.has(id)), reused };
}
