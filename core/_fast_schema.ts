/**
 * A quicker road through the pipeline schema for the fast path's large,
 * well-formed files. zod checks a step in some microseconds and copies it;
 * in a 100,000-step file that was a tenth of the load and much of its
 * garbage. Here each step key whose schema asks only for a type (a string,
 * a boolean, a list of strings, `needs`) is checked by hand, and any other
 * key by its own field schema, so the result is what zod gives. It never
 * reports: at the first doubt it returns undefined, and the caller asks the
 * whole schema, whose issues locate the problem.
 *
 * The value it is given must be its own (a fresh YAML load): a step that
 * needs no change is kept as it is, not copied, and so is the mapping of
 * steps when every step is. A kept step's keys stay in the order they were
 * written, where zod writes them in its schema's order: nothing made of a
 * step depends on that order (the planner reads a step key by key, and
 * `plan_golden_test.ts` holds plans to the base loader's), and no
 * `PipelineFile` of this path leaves the loader.
 *
 * @module
 */

import type { z } from "npm:zod@4.6.7";
import { type PipelineFile, PipelineSchema, STEP_NAME_PATTERN, StepSchema } from "./schema.ts";

/** How a step key is checked: by hand for a bare type, else by its field schema. */
type FieldKind = "string" | "boolean" | "strings" | "needs" | "schema";

interface Field {
  /** Its place in the schema: zod writes a step's keys in this order. */
  index: number;
  kind: FieldKind;
  schema: z.ZodType;
}

/** The definition zod keeps of a schema (its internals, read only to classify bare types). */
interface Def {
  type: string;
  checks?: unknown[];
  innerType?: { _zod: { def: Def } };
  element?: { _zod: { def: Def } };
  options?: Array<{ _zod: { def: Def } }>;
}

function defOf(schema: unknown): Def {
  return (schema as { _zod: { def: Def } })._zod.def;
}

/** Whether a definition is a string with no pattern, length or refinement. */
function bareString(def: Def | undefined): boolean {
  return def?.type === "string" && !(def.checks?.length);
}

/** Whether a definition is a list of bare strings with no bound. */
function bareStrings(def: Def | undefined): boolean {
  return def?.type === "array" && !(def.checks?.length) && bareString(def.element?._zod.def);
}

/** The kind of a step key's schema (`optional` around it, nothing else). */
function kindOf(schema: z.ZodType): FieldKind {
  const outer = defOf(schema);
  if (outer.type !== "optional" || outer.checks?.length) return "schema";
  const def = outer.innerType?._zod.def;
  if (bareString(def)) return "string";
  if (def?.type === "boolean" && !(def.checks?.length)) return "boolean";
  if (bareStrings(def)) return "strings";
  const options = def?.type === "union" && !(def.checks?.length) ? def.options : undefined;
  if (
    options?.length === 2 && bareString(options[0]._zod.def) && bareStrings(options[1]._zod.def)
  ) {
    return "needs";
  }
  return "schema";
}

/** Every step key, by name. */
const STEP_FIELDS: Map<string, Field> = new Map(
  Object.entries(StepSchema.shape).map(([key, schema], index) => [
    key,
    { index, kind: kindOf(schema as z.ZodType), schema: schema as z.ZodType },
  ]),
);

/** The pipeline's own keys: the whole schema but its steps. */
const TopSchema = PipelineSchema.omit({ steps: true });
const PIPELINE_KEYS = Object.keys(PipelineSchema.shape);

function isStrings(value: unknown): boolean {
  if (!Array.isArray(value)) return false;
  for (let i = 0; i < value.length; i++) if (typeof value[i] !== "string") return false;
  return true;
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  if (value === null || typeof value !== "object" || Array.isArray(value)) return false;
  const proto = Object.getPrototypeOf(value);
  return proto === Object.prototype || proto === null;
}

/** One step as the schema parses it, or undefined when the schema should say why not. */
function parseStep(raw: unknown): unknown {
  if (!isPlainObject(raw)) return undefined;
  const keys = Object.keys(raw);
  let parsed: Map<string, unknown> | undefined;
  for (const key of keys) {
    const field = STEP_FIELDS.get(key);
    if (field === undefined) return undefined;
    const value = raw[key];
    switch (field.kind) {
      case "string":
        if (typeof value !== "string") return undefined;
        break;
      case "boolean":
        if (typeof value !== "boolean") return undefined;
        break;
      case "strings":
        if (!isStrings(value)) return undefined;
        break;
      case "needs":
        if (typeof value !== "string" && !isStrings(value)) return undefined;
        break;
      default: {
        // `services` are checked against the step's secrets by the pipeline schema.
        if (key === "services" || value === undefined) return undefined;
        const result = field.schema.safeParse(value);
        if (!result.success) return undefined;
        if (result.data !== value) (parsed ??= new Map()).set(key, result.data);
      }
    }
  }
  if (parsed === undefined) return raw;
  // What each key's schema made of it, keys in the schema's order (as zod writes them).
  keys.sort((a, b) => STEP_FIELDS.get(a)!.index - STEP_FIELDS.get(b)!.index);
  const step: Record<string, unknown> = {};
  for (const key of keys) step[key] = parsed.has(key) ? parsed.get(key) : raw[key];
  return step;
}

/**
 * The pipeline a plain YAML value describes, as `PipelineSchema` parses
 * it, or undefined when it may not be valid (then ask the schema). `raw` is
 * used up: steps the schema would copy unchanged are kept.
 */
export function parsePipelineFast(raw: unknown): PipelineFile | undefined {
  if (!isPlainObject(raw) || !isPlainObject(raw.steps)) return undefined;
  const { steps: rawSteps, ...rest } = raw;
  const top = TopSchema.safeParse(rest);
  if (!top.success) return undefined;
  const names = Object.keys(rawSteps);
  if (names.length === 0) return undefined;
  // A mapping of their own only once a step differs from the one written.
  let steps: Record<string, unknown> | undefined;
  for (let i = 0; i < names.length; i++) {
    const name = names[i];
    if (!STEP_NAME_PATTERN.test(name)) return undefined;
    const written = rawSteps[name];
    const step = parseStep(written);
    if (step === undefined) return undefined;
    if (step !== written && steps === undefined) {
      steps = {};
      for (let j = 0; j < i; j++) steps[names[j]] = rawSteps[names[j]];
    }
    if (steps !== undefined) steps[name] = step;
  }
  const data = top.data as Record<string, unknown>;
  const pipeline: Record<string, unknown> = {};
  for (const key of PIPELINE_KEYS) {
    if (key === "steps") pipeline.steps = steps ?? rawSteps;
    else if (Object.hasOwn(data, key)) pipeline[key] = data[key];
  }
  return pipeline as PipelineFile;
}
