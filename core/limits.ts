/**
 * How large a pipeline may grow once planned. A few hundred bytes of YAML
 * can describe a million matrix legs (a 971-byte file took 19.7 s and
 * 3.26 GB to validate), so these limits are computed from the matrix sizes
 * and the file's own text, before any matrix is expanded.
 *
 * The defaults sit far above what real pipelines use (GitHub Actions allows
 * 256 jobs per matrix, GitLab 200), well below what exhausts a runner.
 * Whoever runs runnel may change them: `limits` in the load options, `--limit
 * NAME=VALUE` on the command line and on `runnel server`.
 *
 * @module
 */

import { parseByteSize } from "./duration.ts";
import { QuantityError } from "./errors.ts";
import { legSizeBound, matrixLegBound, type StepEdges, stepEdges } from "./plan.ts";
import type { StepFile } from "./schema.ts";
import type { Reporter } from "./_diagnostics.ts";

/** Most legs one step's matrix may expand to. */
export const MAX_MATRIX_LEGS = 10_000;
/** Most step instances (a step without a matrix is one, a matrix step one per leg) in a run. */
export const MAX_STEP_INSTANCES = 100_000;
/**
 * Most dependencies between step instances in a run: every leg of a step
 * waits for every instance of each step it needs, and lists every leg of
 * each step an input reads. Two 10,000-leg steps, one needing the other,
 * make 10^8.
 */
export const MAX_DEPENDENCIES = 1_000_000;
/**
 * Most bytes of step definitions once written out for every leg (a leg's
 * `${{ matrix.x }}` replaced by its value): the size of the plan that is
 * hashed, stored and sent to agents.
 */
export const MAX_PLAN_BYTES = 64 * 2 ** 20;

/** Limits on what a pipeline may expand to; see {@link DEFAULT_PIPELINE_LIMITS}. */
export interface PipelineLimits {
  /** Most legs of one step's matrix ({@link MAX_MATRIX_LEGS}). */
  maxMatrixLegs: number;
  /** Most step instances in a run ({@link MAX_STEP_INSTANCES}). */
  maxStepInstances: number;
  /** Most dependencies between step instances in a run ({@link MAX_DEPENDENCIES}). */
  maxDependencies: number;
  /** Most bytes of the expanded step definitions ({@link MAX_PLAN_BYTES}). */
  maxPlanBytes: number;
}

/** The limits used when none are given. */
export const DEFAULT_PIPELINE_LIMITS: Readonly<PipelineLimits> = Object.freeze({
  maxMatrixLegs: MAX_MATRIX_LEGS,
  maxStepInstances: MAX_STEP_INSTANCES,
  maxDependencies: MAX_DEPENDENCIES,
  maxPlanBytes: MAX_PLAN_BYTES,
});

/** The name of each limit on the command line (`--limit matrix-legs=20000`). */
export const LIMIT_NAMES: Readonly<Record<string, keyof PipelineLimits>> = Object.freeze({
  "matrix-legs": "maxMatrixLegs",
  "step-instances": "maxStepInstances",
  "dependencies": "maxDependencies",
  "plan-bytes": "maxPlanBytes",
});

/**
 * The defaults with `overrides` applied.
 *
 * @throws {QuantityError} when an override is not a positive integer.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { pipelineLimits } from "./limits.ts";
 *
 * assert.equal(pipelineLimits({ maxMatrixLegs: 20_000 }).maxMatrixLegs, 20_000);
 * assert.equal(pipelineLimits().maxStepInstances, 100_000);
 * ```
 */
export function pipelineLimits(overrides: Partial<PipelineLimits> = {}): PipelineLimits {
  const limits = { ...DEFAULT_PIPELINE_LIMITS };
  for (const key of Object.keys(DEFAULT_PIPELINE_LIMITS) as Array<keyof PipelineLimits>) {
    const value = overrides[key];
    if (value === undefined) continue;
    if (!Number.isSafeInteger(value) || value < 1) {
      throw new QuantityError(`Expected a positive integer for limit "${key}", got ${value}`);
    }
    limits[key] = value;
  }
  return limits;
}

/**
 * Parses `NAME=VALUE` as `--limit` takes it: a name of {@link LIMIT_NAMES}
 * and a positive integer (a size like `128Mi` for `plan-bytes`).
 *
 * @throws {QuantityError} naming the limits there are, or what the value should be.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseLimit } from "./limits.ts";
 *
 * assert.deepEqual(parseLimit("matrix-legs=20000"), { maxMatrixLegs: 20_000 });
 * assert.deepEqual(parseLimit("plan-bytes=128Mi"), { maxPlanBytes: 134_217_728 });
 * ```
 */
export function parseLimit(text: string): Partial<PipelineLimits> {
  const at = text.indexOf("=");
  const name = at < 0 ? text : text.slice(0, at);
  const key = Object.hasOwn(LIMIT_NAMES, name) ? LIMIT_NAMES[name] : undefined;
  if (key === undefined) {
    throw new QuantityError(
      `Expected a limit NAME=VALUE with NAME one of ${Object.keys(LIMIT_NAMES).join(", ")}, got ${
        JSON.stringify(text)
      }`,
    );
  }
  if (at < 0) throw new QuantityError(`Expected a limit NAME=VALUE, got ${JSON.stringify(text)}`);
  const raw = text.slice(at + 1);
  const value = key === "maxPlanBytes" && !/^\d+$/.test(raw)
    ? parseByteSize(raw, { key: name })
    : Number(raw);
  if (!Number.isSafeInteger(value) || value < 1) {
    throw new QuantityError(
      `Expected a positive integer for limit "${name}", got ${JSON.stringify(raw)}`,
    );
  }
  return { [key]: value };
}

/** What {@link checkPipelineSize} needs besides the steps. */
export interface SizeCheckOptions {
  limits: PipelineLimits;
  /** Characters every step instance inherits (the `defaults` block, the pipeline's selector). */
  inheritedSize?: number;
  /** The steps' graph, when the caller has it already (default: built from `steps`). */
  edges?: StepEdges;
}

/**
 * Checks the limits from the matrix sizes and the steps' text alone, so no
 * matrix is expanded: legs per step (reported at the `matrix` key), step
 * instances, dependencies between them and the size of the plan (each
 * reported once, at the `steps` key or the step weighing most). Returns
 * whether the pipeline keeps every limit; when it does not, nothing may
 * expand its matrices.
 */
export function checkPipelineSize(
  steps: Map<string, StepFile | undefined>,
  options: SizeCheckOptions,
  reporter: Reporter,
): boolean {
  const { limits } = options;
  let within = true;
  // Legs of each step, by its number in file order (see `StepEdges`).
  const legs: number[] = [];
  for (const [name, step] of steps) {
    if (!step?.matrix) {
      legs.push(1);
      continue;
    }
    const bound = matrixLegBound(step.matrix);
    legs.push(bound.legs);
    if (bound.legs > limits.maxMatrixLegs) {
      within = false;
      const product = bound.factors.length > 1 ? ` (${bound.factors.join(" × ")})` : "";
      reporter.at(
        "too_many_legs",
        `matrix of step "${name}" expands to up to ${count(bound.legs)} legs${product}; ` +
          `the limit is ${count(limits.maxMatrixLegs)} legs per step`,
        ["steps", name, "matrix"],
        {
          onKey: true,
          key: "matrix",
          expected: `at most ${count(limits.maxMatrixLegs)} legs`,
          hint: "split the matrix over several steps, or raise --limit matrix-legs",
        },
      );
    }
  }
  const instances = legs.reduce((a, b) => a + b, 0);
  // A matrix over its own limit is the one to fix; the run's total would say it again.
  if (within && instances > limits.maxStepInstances) {
    within = false;
    const largest = [...steps.keys()].map((name, i) => [name, legs[i]] as const)
      .sort((a, b) => b[1] - a[1]).slice(0, 3)
      .map(([name, n]) => `"${name}" ${count(n)}`).join(", ");
    reporter.at(
      "too_many_instances",
      `the pipeline expands to up to ${count(instances)} step instances; ` +
        `the limit is ${count(limits.maxStepInstances)} per run`,
      ["steps"],
      {
        onKey: true,
        key: "steps",
        expected: `at most ${count(limits.maxStepInstances)} step instances`,
        hint: `largest: ${largest}; or raise --limit step-instances`,
      },
    );
  }
  if (!within) return false;
  // Dependencies and plan size, by step: the heaviest step is where to look.
  const { needs, index } = options.edges ?? stepEdges(steps);
  let dependencies = 0;
  let size = 0;
  const heaviest = {
    dependencies: { name: "", n: 0, legs: 1 },
    size: { name: "", n: 0, legs: 1 },
  };
  let i = -1;
  for (const [name, step] of steps) {
    i++;
    if (!step) continue;
    let waitsFor = 0;
    for (const need of needs[i]) waitsFor += legs[need];
    for (const input in step.inputs) {
      const from = index.get(step.inputs[input].split("/")[0]);
      if (from !== undefined) waitsFor += legs[from];
    }
    const stepDependencies = legs[i] * waitsFor;
    const stepSize = legs[i] * (legSizeBound(step) + (options.inheritedSize ?? 0));
    dependencies += stepDependencies;
    size += stepSize;
    if (stepDependencies > heaviest.dependencies.n) {
      heaviest.dependencies = { name, n: stepDependencies, legs: legs[i] };
    }
    if (stepSize > heaviest.size.n) heaviest.size = { name, n: stepSize, legs: legs[i] };
  }
  if (dependencies > limits.maxDependencies) {
    within = false;
    const { name, n, legs: stepLegs } = heaviest.dependencies;
    reporter.at(
      "too_many_dependencies",
      `the pipeline's step instances depend on one another up to ${count(dependencies)} times ` +
        `(step "${name}": ${count(n)}, each of its ${count(stepLegs)} legs waiting for ` +
        `${count(n / stepLegs)} instances); the limit is ${count(limits.maxDependencies)} per run`,
      ["steps", name],
      {
        onKey: true,
        expected: `at most ${count(limits.maxDependencies)} dependencies`,
        hint: "gather the legs in a step without a matrix, or raise --limit dependencies",
      },
    );
  }
  if (size > limits.maxPlanBytes) {
    within = false;
    const { name, n, legs: stepLegs } = heaviest.size;
    reporter.at(
      "plan_too_large",
      `the pipeline's steps, written out for every leg, take up to ${bytes(size)} ` +
        `(step "${name}": ${bytes(n)} over ${count(stepLegs)} legs); ` +
        `the limit is ${bytes(limits.maxPlanBytes)}`,
      ["steps", name],
      {
        onKey: true,
        expected: `at most ${bytes(limits.maxPlanBytes)}`,
        hint: "move large text into files the steps read, or raise --limit plan-bytes",
      },
    );
  }
  return within;
}

/** A count as messages write it: `1,000,000`. */
function count(n: number): string {
  return Number.isFinite(n) ? n.toLocaleString("en-US") : "more than 2^53";
}

/** A size as messages write it: `64 MiB`. */
function bytes(n: number): string {
  if (!Number.isFinite(n)) return "more than 2^53 bytes";
  const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${n} bytes` : `${Number(value.toFixed(1))} ${units[unit]}`;
}
