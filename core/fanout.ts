/**
 * Dynamic fan-out (`batch:` and `foreach:`): legs that appear at run time.
 *
 * A step with `batch:` or `foreach:` is planned as two things. Its **split
 * node** (id = the step's name, backend `split`) runs first, as an attempt
 * like any other: it cuts the input into batches (stored as its outputs) or
 * reads the JSON list, and reports one {@link FanOutLeg} per leg. When it
 * succeeds the engine **expands** the plan: one leg per batch or item
 * (`analyze[batch=0007]`, `analyze[item=eu-west]`), each a plain step of
 * the step's own backend needing the split node, and every step that
 * needed the split node (or reads its outputs) now needs every leg and
 * reads their outputs as a fan-in, in leg order.
 *
 * Everything here is pure: the expansion is a function of the plan and the
 * split node's recorded legs, so a rehydrated engine (a restarted runner, a
 * new scheduler after a failover) rebuilds the same legs from the stored
 * state alone.
 *
 * @module
 */

import type { FanOutLeg, InputRef, Plan, PlannedStep, StepState } from "./model.ts";
import { canonicalJson, instanceId } from "./plan.ts";
import { mapStrings } from "./_deep.ts";
import { sha256Hex as sha256 } from "./_bytes.ts";

/** Backend name of a split node; runners run it themselves (`agent/attempt/split.ts`). */
export const SPLIT_BACKEND = "split";

/** A leg key: what follows `batch=` / `item=` in a leg's id. */
export const LEG_KEY_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;

/** Most bytes of one `foreach` item kept on the run (its JSON). */
export const MAX_ITEM_BYTES = 16 * 1024;

/** Most bytes of every `foreach` item of one step together (their JSON). */
export const MAX_ITEMS_BYTES = 1024 * 1024;

/** `${{ item }}` or `${{ item.a.b }}`: the field path captured (with its leading dot). */
export const ITEM_REFERENCE = /\$\{\{\s*item((?:\.[A-Za-z_][A-Za-z0-9_-]*)*)\s*\}\}/g;

/** How a split node splits (its `config`, read by the splitter). */
export type SplitConfig =
  & {
    /** The input of the split node that is split (or read, for foreach). */
    input: string;
    /** Most legs; more is the split's failure. */
    maxLegs: number;
  }
  & (
    | { mode: "lines"; lines: number; header: boolean }
    | { mode: "records"; records: number }
    | { mode: "bytes"; bytes: number }
    | { mode: "count"; count: number }
    | { mode: "items"; items: number }
    | { mode: "files" }
    | { mode: "foreach"; key?: string; fields: string[][] }
  );

/** What a step with `batch:` / `foreach:` fans out to: the plan of one leg. */
export interface FanOut {
  kind: "batch" | "foreach";
  /** For `batch`: the input each leg reads its batch as. */
  input?: string;
  /** Everything of a leg but its id, matrix, needs and the batch input. */
  leg: Omit<PlannedStep, "id" | "source" | "fanOut" | "matrix">;
}

/** The string an item becomes in `${{ item }}` and `$RUNNEL_ITEM`. */
export function itemText(item: unknown): string {
  if (item === null || item === undefined) return "";
  if (typeof item === "string") return item;
  if (typeof item === "number" || typeof item === "boolean") return String(item);
  return JSON.stringify(item);
}

/** The value at a field path of an item, or undefined when it has none. */
export function itemField(item: unknown, path: string[]): unknown {
  let value = item;
  for (const field of path) {
    if (!value || typeof value !== "object" || Array.isArray(value)) return undefined;
    if (!Object.hasOwn(value, field)) return undefined;
    value = (value as Record<string, unknown>)[field];
  }
  return value;
}

/** Field paths a step's definition reads of its item (`${{ item.region }}` → `["region"]`). */
export function itemFieldsOf(value: unknown): string[][] {
  const found = new Map<string, string[]>();
  const visit = (v: unknown): void => {
    if (typeof v === "string") {
      if (!v.includes("${{")) return;
      for (const match of v.matchAll(ITEM_REFERENCE)) {
        if (match[1]) found.set(match[1], match[1].slice(1).split("."));
      }
    } else if (Array.isArray(v)) v.forEach(visit);
    else if (v && typeof v === "object") Object.values(v).forEach(visit);
  };
  visit(value);
  return [...found.values()];
}

/** The env var a `run` script reads an item (or a field of it) from: `RUNNEL_ITEM_REGION`. */
export function itemEnvName(path: string): string {
  return `RUNNEL_ITEM${path.toUpperCase().replace(/[^A-Z0-9]/g, "_")}`;
}

/**
 * Replaces `${{ item… }}` in the config and env of a leg (copies). In a
 * `run` script the reference becomes an env var the leg is given
 * (`${RUNNEL_ITEM_REGION}`): an item is data an upstream step wrote, never
 * spliced into a shell script.
 */
function withItem(
  template: { config: Record<string, unknown>; env: Record<string, string> },
  item: unknown,
): { config: Record<string, unknown>; env: Record<string, string> } {
  const valueAt = (path: string) =>
    itemText(path ? itemField(item, path.slice(1).split(".")) : item);
  const substitute = (text: string) =>
    text.includes("${{")
      ? text.replace(ITEM_REFERENCE, (_whole, path: string) => valueAt(path))
      : text;
  const deep = (v: unknown): unknown => mapStrings(v, substitute);
  const { run, ...rest } = template.config;
  const config = deep(rest) as Record<string, unknown>;
  const env = deep(template.env) as Record<string, string>;
  if (typeof run === "string") {
    config.run = run.replace(ITEM_REFERENCE, (_whole, path: string) => {
      const variable = itemEnvName(path);
      env[variable] = valueAt(path);
      return `\${${variable}}`;
    });
  } else if (run !== undefined) config.run = run;
  return { config, env };
}

/**
 * Why the legs a split reported cannot be taken, or undefined. The split
 * runs on a worker: what it reports is checked here like any agent message
 * (a count within the cap, keys that are safe names and unique, outputs it
 * stored, items within their size).
 */
export function fanOutProblem(
  split: PlannedStep,
  legs: unknown,
  outputs: Record<string, unknown> | undefined,
): string | undefined {
  const fanOut = split.fanOut;
  if (!fanOut) return "the step does not fan out";
  if (!Array.isArray(legs)) return "expected the split to report its legs as a list";
  const maxLegs = (split.config as SplitConfig).maxLegs;
  if (legs.length > maxLegs) {
    return `the split made ${legs.length} legs, more than the cap of ${maxLegs}`;
  }
  const keys = new Set<string>();
  let itemBytes = 0;
  for (const [i, leg] of legs.entries()) {
    if (!leg || typeof leg !== "object") return `expected leg ${i} as an object`;
    const { key, output, item, source } = leg as Record<string, unknown>;
    if (typeof key !== "string" || !LEG_KEY_PATTERN.test(key)) {
      return `expected leg ${i}'s key to match ${LEG_KEY_PATTERN}`;
    }
    if (keys.has(key)) return `leg key "${key}" appears twice`;
    keys.add(key);
    if (source !== undefined && (typeof source !== "string" || source.length > 1024)) {
      return `expected leg ${i}'s source as a short string`;
    }
    if (fanOut.kind === "batch") {
      if (typeof output !== "string" || !outputs || !Object.hasOwn(outputs, output)) {
        return `expected leg ${i} to name an output the split stored`;
      }
    } else {
      const bytes = JSON.stringify(item ?? null).length;
      if (bytes > MAX_ITEM_BYTES) {
        return `item ${i} is ${bytes} bytes of JSON, more than ${MAX_ITEM_BYTES}`;
      }
      itemBytes += bytes;
      if (itemBytes > MAX_ITEMS_BYTES) {
        return `the items are more than ${MAX_ITEMS_BYTES} bytes of JSON together`;
      }
      const config = split.config as SplitConfig;
      if (config.mode === "foreach") {
        for (const path of config.fields) {
          if (itemField(item, path) === undefined) {
            return `item ${i} has no field "${path.join(".")}", which the step reads as ` +
              `\${{ item.${path.join(".")} }}`;
          }
        }
      }
    }
  }
  return undefined;
}

/** A leg's dimension in its id and matrix: `batch` or `item`. */
function dimensionOf(split: PlannedStep): "batch" | "item" {
  return split.fanOut!.kind === "batch" ? "batch" : "item";
}

/** The instance id of one leg of split node `split`: `analyze[batch=0007]`. */
function legId(split: PlannedStep, leg: FanOutLeg): string {
  return instanceId(split.name, { [dimensionOf(split)]: leg.key });
}

/** The legs of split node `split` for the legs it reported, in order. */
export function legsOf(split: PlannedStep, legs: FanOutLeg[]): PlannedStep[] {
  const fanOut = split.fanOut!;
  const dimension = dimensionOf(split);
  return legs.map((leg, index) => {
    const matrix = { [dimension]: leg.key };
    const extraEnv: Record<string, string> = fanOut.kind === "batch"
      ? {
        RUNNEL_BATCH_INDEX: String(index),
        RUNNEL_BATCH_COUNT: String(legs.length),
        ...(leg.source !== undefined ? { RUNNEL_BATCH_FILE: leg.source } : {}),
      }
      : {
        RUNNEL_ITEM: itemText(leg.item),
        RUNNEL_ITEM_KEY: leg.key,
        RUNNEL_ITEM_INDEX: String(index),
      };
    const template = fanOut.kind === "foreach"
      ? withItem({ config: fanOut.leg.config, env: fanOut.leg.env }, leg.item ?? null)
      : { config: fanOut.leg.config, env: fanOut.leg.env };
    const inputs: Record<string, InputRef> = {};
    for (const [name, ref] of Object.entries(fanOut.leg.inputs)) {
      inputs[name] = name === fanOut.input
        ? { step: split.name, output: leg.output!, from: [split.id], fanIn: false }
        : { ...ref, from: [...ref.from] };
    }
    const planned: PlannedStep = {
      ...structuredClone(fanOut.leg),
      id: instanceId(split.name, matrix),
      matrix,
      needs: [...fanOut.leg.needs, split.id],
      config: template.config,
      env: { ...extraEnv, ...template.env },
      inputs,
      source: split.source,
      specDigest: sha256(
        `${fanOut.leg.specDigest}\n${
          canonicalJson({ matrix, extraEnv, item: leg.item ?? null, index })
        }`,
      ),
    };
    return planned;
  });
}

/**
 * Adds the legs of split node `splitId` to `plan`, right after it in
 * `plan.order`, and points every step that needs it at every leg (needs,
 * and fan-in inputs reading its outputs). Returns the leg ids; called
 * again, it changes nothing and returns them again.
 */
export function expandSplit(plan: Plan, splitId: string, legs: FanOutLeg[]): string[] {
  const split = plan.steps[splitId];
  if (!split?.fanOut) return [];
  const ids = legs.map((leg) => legId(split, leg));
  // Expanded already (a plan shared by two engines, a rehydration): the same
  // legs, found without planning (and hashing) them again.
  if (ids.some((id) => id in plan.steps)) return ids;
  for (const leg of legsOf(split, legs)) plan.steps[leg.id] = leg;
  const at = plan.order.indexOf(splitId);
  plan.order.splice(at + 1, 0, ...ids);
  for (const id of plan.order) {
    const step = plan.steps[id];
    if (step.name === split.name || !step.needs.includes(splitId)) continue;
    // A split node that needs it hands its legs' template the same change.
    const targets = step.fanOut?.leg.needs.includes(splitId) ? [step, step.fanOut.leg] : [step];
    for (const target of targets) {
      // New arrays: the legs of a matrix share theirs.
      target.needs = [...target.needs, ...ids];
      target.inputs = Object.fromEntries(
        Object.entries(target.inputs).map(([name, input]) => [
          name,
          input.step === split.name ? { ...input, from: [...ids], fanIn: true } : input,
        ]),
      );
    }
  }
  return ids;
}

/**
 * Expands every split node of `plan` that `steps` records as split (after
 * a restart, a failover, or for display). Returns every leg id.
 */
export function expandPlan(
  plan: Plan,
  steps: Record<string, Pick<StepState, "fanOut"> | undefined>,
): string[] {
  const ids: string[] = [];
  for (const id of [...plan.order]) {
    const legs = plan.steps[id]?.fanOut ? steps[id]?.fanOut?.legs : undefined;
    if (legs) ids.push(...expandSplit(plan, id, legs));
  }
  return ids;
}
