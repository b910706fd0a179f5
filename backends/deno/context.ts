/**
 * What a `deno` step module sees: the context its default export receives,
 * and the error it throws to report a business error.
 *
 * @example A step module's default export, called as the harness calls it
 * ```ts
 * import assert from "node:assert/strict";
 * import { BusinessError, type StepContext } from "./context.ts";
 *
 * // In the step module: `export default async function analyze(…)`.
 * async function analyze(ctx: StepContext): Promise<void> {
 *   const csv = await Deno.readTextFile(ctx.inputs.data);
 *   if (csv.length === 0) throw new BusinessError("the energy data is empty");
 *   await Deno.writeTextFile(ctx.outputs["summary.json"], JSON.stringify({ rows: 1 }));
 * }
 *
 * const dir = await Deno.makeTempDir();
 * const ctx: StepContext = {
 *   inputs: { data: `${dir}/data.csv` },
 *   outputs: { "summary.json": `${dir}/summary.json` },
 *   env: {}, matrix: {}, args: [], runId: "r1", stepId: "analyze", attempt: 1,
 *   log: () => {},
 * };
 * await Deno.writeTextFile(ctx.inputs.data, "");
 * await assert.rejects(analyze(ctx), BusinessError);
 * await Deno.writeTextFile(ctx.inputs.data, "day,kwh\n1,42\n");
 * await analyze(ctx);
 * assert.equal(await Deno.readTextFile(ctx.outputs["summary.json"]), '{"rows":1}');
 * await Deno.remove(dir, { recursive: true });
 * ```
 *
 * @module
 */

/** The argument of a step module's default export. */
export interface StepContext {
  /** Input name → absolute path (a file, or a directory for fan-in inputs). */
  inputs: Record<string, string>;
  /** Declared output name → absolute path the step must write. */
  outputs: Record<string, string>;
  /** The environment variables the step may read (step env, secrets, `RUNNEL_*`, declared). */
  env: Record<string, string>;
  /** This leg's matrix values (empty for a plain step). */
  matrix: Record<string, string | number | boolean>;
  /** The step config's `args`. */
  args: string[];
  runId: string;
  stepId: string;
  /** 1-based attempt number. */
  attempt: number;
  /** Writes a line to the step's log (stdout). */
  log(...args: unknown[]): void;
}

/** The shape of a step module's default export. */
export type StepFunction = (ctx: StepContext) => unknown | Promise<unknown>;

/**
 * Marks business errors across module copies: a step may import this file
 * by another URL than the harness does, so `instanceof` alone is not enough.
 */
const BUSINESS_ERROR_BRAND = Symbol.for("runnel.BusinessError");

/**
 * Thrown by a step to say its input is wrong: the attempt fails with error
 * class `business` and is not retried.
 */
export class BusinessError extends Error {
  /** Stable error code. */
  readonly code = "business_error";
  /** Brand checked by {@link isBusinessError}. */
  readonly [BUSINESS_ERROR_BRAND] = true;

  /** Builds the error; the message is shown as the step's failure reason. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "BusinessError";
  }
}

/** True for a {@link BusinessError} from any copy of this module. */
export function isBusinessError(error: unknown): error is BusinessError {
  return typeof error === "object" && error !== null &&
    (error as Record<symbol, unknown>)[BUSINESS_ERROR_BRAND] === true;
}
