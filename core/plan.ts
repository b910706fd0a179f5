/**
 * Planning: turns a validated pipeline file into a {@link Plan} — matrix legs
 * expanded and interpolated, defaults applied, needs expanded to instance
 * ids, a topological order, and a digest per step for the cache.
 *
 * @module
 */

import { resolve } from "node:path";
import { parseByteSize, parseCpu, parseDuration } from "./duration.ts";
import {
  DEFAULT_RETRY_CLASSES,
  type ErrorClass,
  type InputRef,
  type Plan,
  type PlannedStep,
  type Resources,
  type RetryPolicy,
  type SourceLocation,
  type WebhookSpec,
} from "./model.ts";
import {
  MAX_FAN_OUT_LEGS,
  type OnFailureFile,
  PIPELINE_BACKEND,
  type PipelineFile,
  type RetryFile,
  type StepFile,
} from "./schema.ts";
import { itemFieldsOf, SPLIT_BACKEND, type SplitConfig } from "./fanout.ts";
import { MinHeap } from "./_heap.ts";
import { mapStrings } from "./_deep.ts";
import { sha256Hex } from "./_bytes.ts";

type Scalar = string | number | boolean;
/** A matrix as written: key → values, plus `include`/`exclude` lists of maps. */
export type MatrixFile = Record<string, Array<Scalar | Record<string, Scalar>>>;

/** A problem found while planning, located by key path. */
export interface PlanDiagnostic {
  code: string;
  message: string;
  path: Array<string | number>;
  onKey?: boolean;
  key?: string;
}

/** Options of {@link planPipeline}. */
export interface PlanOptions {
  /** Path of the file as the user named it. */
  file: string;
  /** Absolute directory relative paths resolve against. */
  baseDir: string;
  /** Source text, hashed into `Plan.digest`. */
  source: string;
  /** Position of the key at a path (for `PlannedStep.source`). */
  locate: (path: Array<string | number>) => SourceLocation;
  /** Reads a module by absolute path (default the filesystem); undefined if missing. */
  readFile?: (path: string) => Uint8Array | undefined;
  /** The steps' graph, when validation built it already (default: built from the steps). */
  edges?: StepEdges;
}

/** Keys of a step that configure its backend (copied into `PlannedStep.config`). */
export const CONFIG_KEYS = [
  "run",
  "module",
  "args",
  "permissions",
  "image",
  "workdir",
  "user",
  "network",
  "build",
  "services",
  "host",
  "port",
  "identity",
  "known-hosts",
  "host-key",
  "agent",
  "passphrase-secret",
  "password-secret",
  "trust-on-first-use",
  "work-root",
  "keep-on-failure",
  "command",
  "namespace",
  "service-account",
  "node-selector",
  "image-pull-policy",
  "unschedulable-timeout",
  "with",
] as const;

const MATRIX_REFERENCE = /\$\{\{\s*matrix\.([A-Za-z][A-Za-z0-9_-]*)\s*\}\}/g;

/** The place of each config key in {@link CONFIG_KEYS}. */
const CONFIG_INDEX: ReadonlyMap<string, number> = new Map(CONFIG_KEYS.map((key, i) => [key, i]));
/** The config keys of a step with `run` alone. */
const RUN_ONLY: readonly ConfigKey[] = ["run"];
type ConfigKey = typeof CONFIG_KEYS[number];

/**
 * The config keys a step has (not undefined), in the order of
 * {@link CONFIG_KEYS}: found among the step's own keys, which are few,
 * rather than by asking the step for each of the many config keys.
 */
function configKeysOf(step: StepFile): readonly ConfigKey[] {
  let keys: ConfigKey[] | undefined;
  let sorted = true;
  let last = -1;
  for (const key in step) {
    const index = CONFIG_INDEX.get(key);
    if (index === undefined || step[key as ConfigKey] === undefined) continue;
    if (keys === undefined && key === "run") {
      keys = RUN_ONLY as ConfigKey[];
    } else {
      keys = keys === RUN_ONLY ? ["run"] : keys ?? [];
      keys.push(key as ConfigKey);
    }
    if (index < last) sorted = false;
    last = index;
  }
  if (!sorted) keys!.sort((a, b) => CONFIG_INDEX.get(a)! - CONFIG_INDEX.get(b)!);
  return keys ?? NO_ITEMS;
}

/** The backend a step implies by its keys: module→deno, image→docker, host→ssh, run→shell. */
export function inferBackend(step: StepFile): string | undefined {
  if (step.pipeline !== undefined) return PIPELINE_BACKEND;
  if (step.module !== undefined) return "deno";
  if (step.build !== undefined) return "docker";
  if (step.image !== undefined) return "docker";
  if (step.host !== undefined) return "ssh";
  if (step.run !== undefined) return "shell";
  return undefined;
}

/**
 * Expands a matrix into its legs: the cartesian product of its keys (first
 * key varies slowest), minus legs matching an `exclude` entry, plus each
 * `include` entry.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { expandMatrix } from "./plan.ts";
 *
 * assert.deepEqual(expandMatrix({ os: ["linux", "mac"], exclude: [{ os: "mac" }] }), [
 *   { os: "linux" },
 * ]);
 * ```
 */
export function expandMatrix(matrix: MatrixFile): Array<Record<string, Scalar>> {
  let legs: Array<Record<string, Scalar>> = [{}];
  const keys = Object.keys(matrix).filter((k) => k !== "include" && k !== "exclude");
  for (const key of keys) {
    const values = matrix[key] as Scalar[];
    legs = legs.flatMap((leg) => values.map((value) => ({ ...leg, [key]: value })));
  }
  if (keys.length === 0) legs = [];
  const excludes = (matrix.exclude ?? []) as Array<Record<string, Scalar>>;
  legs = legs.filter((leg) =>
    !excludes.some((rule) => Object.entries(rule).every(([k, v]) => leg[k] === v))
  );
  for (const extra of (matrix.include ?? []) as Array<Record<string, Scalar>>) {
    if (Object.keys(extra).length > 0) legs.push({ ...extra });
  }
  const seen = new Set<string>();
  return legs.filter((leg) => {
    const id = legSuffix(leg);
    if (seen.has(id)) return false;
    seen.add(id);
    return true;
  });
}

/**
 * The most legs a matrix can expand to, counted without expanding it: the
 * product of its keys' value counts (the factors), plus its `include`
 * entries; `exclude` and duplicates only take legs away.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { matrixLegBound } from "./plan.ts";
 *
 * const matrix = { a: [1, 2, 3], b: ["x", "y"], include: [{ a: 9 }] };
 * assert.deepEqual(matrixLegBound(matrix), { legs: 7, factors: [3, 2] });
 * ```
 */
export function matrixLegBound(matrix: MatrixFile): { legs: number; factors: number[] } {
  const factors = Object.keys(matrix)
    .filter((key) => key !== "include" && key !== "exclude")
    .map((key) => matrix[key].length);
  const product = factors.length === 0 ? 0 : factors.reduce((a, b) => a * b, 1);
  const included =
    (matrix.include ?? []).filter((entry) =>
      entry !== null && typeof entry === "object" && Object.keys(entry).length > 0
    ).length;
  return { legs: product + included, factors };
}

/**
 * The most characters one leg of a step can take once planned: its
 * definition without the matrix, each `${{ matrix.x }}` replaced by the
 * longest value of `x`, and the leg's own values. Counted without
 * expanding the matrix.
 */
export function legSizeBound(step: StepFile): number {
  if (!step.matrix) return stepJson(step).length;
  const { matrix, ...rest } = step;
  const text = JSON.stringify(rest);
  const longest = new Map<string, number>();
  const see = (key: string, value: unknown) =>
    longest.set(key, Math.max(longest.get(key) ?? 0, String(value).length));
  for (const [key, values] of Object.entries(matrix)) {
    if (key === "include") {
      for (const entry of values) {
        if (entry && typeof entry === "object") {
          for (const [k, v] of Object.entries(entry)) see(k, v);
        }
      }
    } else if (key !== "exclude") {
      for (const value of values) see(key, value);
    }
  }
  let size = text.length;
  for (const [key, length] of longest) size += key.length + length + 6;
  if (text.includes("${{")) {
    for (const match of text.matchAll(MATRIX_REFERENCE)) size += longest.get(match[1]) ?? 0;
  }
  return size;
}

function legSuffix(leg: Record<string, Scalar>): string {
  return Object.entries(leg).map(([k, v]) => `${k}=${v}`).join(",");
}

/** The instance id of a step or matrix leg: `name` or `name[k=v,k2=v2]`. */
export function instanceId(name: string, leg?: Record<string, Scalar>): string {
  return leg ? `${name}[${legSuffix(leg)}]` : name;
}

/** A step as JSON (`JSON.stringify`). */
export function stepJson(step: StepFile): string {
  return JSON.stringify(step);
}

/**
 * Whether a search of a step's JSON for `text` could find it: some key or
 * string in it contains it. Meant for text without a quote, backslash or
 * control character (`${{`, `.values.`): every escape JSON writes starts
 * with a backslash and every string with a quote, so such text is found in
 * the JSON only inside one key or string. The checks ask this of every
 * step, and write a step's JSON only when the answer is yes; anything but
 * plain data (a value that may have a JSON of its own) answers yes.
 */
export function mayMention(value: unknown, text: string): boolean {
  if (typeof value === "string") return value.includes(text);
  if (value === null || typeof value !== "object") return false;
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) if (mayMention(value[i], text)) return true;
    return false;
  }
  const proto = Object.getPrototypeOf(value);
  if (proto !== Object.prototype && proto !== null) return true;
  for (const key of Object.keys(value)) {
    if (key.includes(text) || mayMention((value as Record<string, unknown>)[key], text)) {
      return true;
    }
  }
  return false;
}

/**
 * Step-level dependency edges: what each step needs, and what needs it.
 * Steps are numbered in file order, so the graph is arrays of numbers: a
 * 100,000-step file makes one map of names, not one set per step.
 */
export interface StepEdges {
  /** Step names in file order; a step's number is its place here. */
  names: string[];
  /** The number of each step, by name. */
  index: Map<string, number>;
  /** What each step needs, in the order the file says it (no repeats). */
  needs: number[][];
  /** What needs each step (no repeats). */
  dependents: number[][];
}

/** The legs of a step without a matrix: one, with no matrix values. */
const NO_LEGS: ReadonlyArray<undefined> = Object.freeze([undefined]);

/** The needs or dependents of a step that has none (frozen: shared by all of them). */
const NO_LINKS = Object.freeze([]) as unknown as number[];

/** Above this many needs, a step's links are checked for repeats with a set. */
const FEW_NEEDS = 16;

/** Step-level dependency edges from `needs`, `next_node` and `inputs`, restricted to known steps. */
export function stepEdges(steps: Map<string, StepFile | undefined>): StepEdges {
  const names = [...steps.keys()];
  const index = new Map<string, number>();
  for (let i = 0; i < names.length; i++) index.set(names[i], i);
  // Steps without needs or dependents share one empty list until a link gives them theirs.
  const needs: number[][] = new Array(names.length).fill(NO_LINKS);
  const dependents: number[][] = new Array(names.length).fill(NO_LINKS);
  // Sets only for steps with many needs; a short list is searched.
  const many = new Map<number, Set<number>>();
  const link = (fromName: string, to: number) => {
    const from = index.get(fromName);
    if (from === undefined) return;
    let list = needs[to];
    if (list === NO_LINKS) needs[to] = list = [];
    if (list.length < FEW_NEEDS) {
      if (list.includes(from)) return;
    } else {
      let seen = many.get(to);
      if (!seen) many.set(to, seen = new Set(list));
      if (seen.has(from)) return;
      seen.add(from);
    }
    list.push(from);
    if (dependents[from] === NO_LINKS) dependents[from] = [to];
    else dependents[from].push(to);
  };
  let i = 0;
  for (const step of steps.values()) {
    const to = i++;
    if (!step) continue;
    const need = step.needs;
    if (typeof need === "string") link(need, to);
    else if (need !== undefined) { for (const name of need) link(name, to); }
    if (step.next_node !== undefined) {
      const next = index.get(step.next_node);
      if (next !== undefined) link(names[to], next);
    }
    for (const input in step.inputs) link(step.inputs[input].split("/")[0], to);
    const foreach = foreachRef(step);
    if (foreach !== undefined) link(foreach.split("/")[0], to);
  }
  return { names, index, needs, dependents };
}

/** The `"step/output"` a `foreach:` reads, if the step has one. */
export function foreachRef(step: StepFile): string | undefined {
  const foreach = step.foreach;
  return foreach === undefined ? undefined : typeof foreach === "string" ? foreach : foreach.input;
}

/** The file names of a step's `outputs` (each a name, or `{ name, retention }`). */
export function outputNames(step: StepFile | undefined): string[] {
  const sub = step?.pipeline;
  if (sub !== undefined) return typeof sub === "string" ? [] : Object.keys(sub.outputs ?? {});
  return (step?.outputs ?? []).map((output) => typeof output === "string" ? output : output.name);
}

/** A `pipeline:` step's child, as its config holds it. */
export interface SubPipelineConfig {
  file?: string;
  name?: string;
  version?: number;
  params: Record<string, string | number | boolean>;
  /** This step's output → `childStep/output`. */
  outputs: Record<string, string>;
}

/** The config of a `pipeline:` step. */
export function subPipelineConfig(step: StepFile): SubPipelineConfig {
  const sub = step.pipeline!;
  if (typeof sub === "string") return { file: sub, params: {}, outputs: {} };
  return {
    ...(sub.file !== undefined ? { file: sub.file } : {}),
    ...(sub.name !== undefined ? { name: sub.name } : {}),
    ...(sub.version !== undefined ? { version: sub.version } : {}),
    params: { ...sub.params },
    outputs: { ...sub.outputs },
  };
}

/** The condition of an exit handler of each kind (`handler:`). */
export const HANDLER_CONDITIONS = {
  exit: "always()",
  success: "success()",
  failure: "failure()",
} as const;

/** Whether a step's outputs reach its readers as a fan-in (a directory, one entry per leg). */
export function fansIn(step: StepFile | undefined): boolean {
  return !!step && (!!step.matrix || step.batch !== undefined || step.foreach !== undefined);
}

/**
 * The split node of a `batch:` / `foreach:` step planned as `leg` (see
 * `fanout.ts`): it needs what the step needs, reads only what it splits,
 * and holds the step's plan as the template of its legs.
 */
function splitNode(
  step: StepFile,
  leg: PlannedStep,
  idsByName: (name: string) => string[],
  retry: RetryPolicy,
): PlannedStep {
  const batch = step.batch;
  let config: SplitConfig;
  let inputs: Record<string, InputRef>;
  if (batch) {
    const common = { input: batch.input, maxLegs: MAX_FAN_OUT_LEGS };
    config = batch.lines !== undefined
      ? { ...common, mode: "lines", lines: batch.lines, header: batch.header ?? false }
      : batch.records !== undefined
      ? { ...common, mode: "records", records: batch.records }
      : batch.bytes !== undefined
      ? { ...common, mode: "bytes", bytes: parseByteSize(batch.bytes) }
      : batch.count !== undefined
      ? { ...common, mode: "count", count: batch.count }
      : batch.items !== undefined
      ? { ...common, mode: "items", items: batch.items }
      : { ...common, mode: "files" };
    inputs = { [batch.input]: structuredClone(leg.inputs[batch.input]) };
  } else {
    const ref = foreachRef(step)!;
    const [from, output] = ref.split("/");
    const key = typeof step.foreach === "object" ? step.foreach.key : undefined;
    config = {
      input: "items",
      maxLegs: MAX_FAN_OUT_LEGS,
      mode: "foreach",
      ...(key !== undefined ? { key } : {}),
      fields: itemFieldsOf([leg.config, leg.env]),
    };
    inputs = { items: { step: from, output, from: [...idsByName(from)], fanIn: false } };
  }
  const { id: _id, source, specDigest, matrix: _matrix, ...template } = leg;
  const node: PlannedStep = {
    id: leg.id,
    name: leg.name,
    backend: SPLIT_BACKEND,
    needs: [...leg.needs],
    config: config as unknown as Record<string, unknown>,
    inputs,
    outputs: [],
    env: {},
    secrets: [],
    resources: {},
    retry,
    continueOnError: leg.continueOnError,
    cache: false,
    selector: { ...leg.selector },
    fanOut: {
      kind: batch ? "batch" : "foreach",
      ...(batch ? { input: batch.input } : {}),
      leg: { ...template, specDigest, when: undefined, approval: undefined },
    },
    source,
    specDigest: sha256(`${canonicalJson(config)}\n${specDigest}`),
  };
  if (leg.when !== undefined) node.when = leg.when;
  if (leg.approval !== undefined) node.approval = leg.approval;
  if (leg.queueTimeoutMs !== undefined) node.queueTimeoutMs = leg.queueTimeoutMs;
  for (const key of ["when", "approval"] as const) delete node.fanOut!.leg[key];
  return node;
}

/**
 * The empty list and mapping planned steps share where they have nothing
 * (no outputs, inputs, env…): frozen, so nothing can add to one step's
 * through another's. A 100,000-step plan is a few objects per step less.
 */
const NO_ITEMS = Object.freeze([]) as unknown as never[];
const NO_ENTRIES = Object.freeze({}) as Record<string, never>;

/** JSON with object keys sorted, so equal specs hash equally. */
export function canonicalJson(value: unknown): string {
  if (value === undefined) return "null";
  if (value === null || typeof value !== "object") return JSON.stringify(value);
  // The shared empties of planned steps (most steps have several).
  if (value === NO_ENTRIES) return "{}";
  if (value === NO_ITEMS) return "[]";
  // A list or mapping of plain values in order (most in a plan: needs, a `run`, env) is
  // what JSON.stringify writes, in one string instead of one per item.
  if (flatInOrder(value)) return JSON.stringify(value);
  if (Array.isArray(value)) {
    let out = "[";
    for (let i = 0; i < value.length; i++) out += (i > 0 ? "," : "") + canonicalJson(value[i]);
    return out + "]";
  }
  return canonicalRecord(value as Record<string, unknown>);
}

/**
 * Whether `value` is a list of strings, numbers, booleans and nulls, or a
 * plain object of them with its keys in sorted order (for…in lists them as
 * JSON.stringify does): its JSON is its canonical JSON.
 */
function flatInOrder(value: object): boolean {
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) if (!isFlat(value[i])) return false;
    return true;
  }
  const proto = Object.getPrototypeOf(value);
  if (proto !== Object.prototype && proto !== null) return false;
  let last: string | undefined;
  for (const key in value) {
    if ((last !== undefined && !(last < key)) || !isFlat((value as Record<string, unknown>)[key])) {
      return false;
    }
    last = key;
  }
  return true;
}

/** A value JSON.stringify writes as canonicalJson does, by itself. */
function isFlat(value: unknown): boolean {
  const type = typeof value;
  return type === "string" || type === "number" || type === "boolean" || value === null ||
    value === undefined;
}

/** {@link canonicalJson} of an object. */
function canonicalRecord(record: Record<string, unknown>): string {
  const keys = Object.keys(record).sort();
  let out = "{";
  for (const key of keys) {
    const item = record[key];
    if (item === undefined) continue;
    out += (out.length > 1 ? "," : "") + JSON.stringify(key) + ":" + canonicalJson(item);
  }
  return out + "}";
}

/**
 * {@link canonicalJson} of a planned step's spec, the text its `specDigest`
 * hashes: every field but `id`, `source`, `specDigest` and a split node's
 * `fanOut`, in sorted order, each read by name (a loop over the field names
 * read each one by a key that changes every time, the slowest kind of
 * property read, 22 times a step). Each field is one constant (its key, or
 * its key and the shared empty value most steps have) and its value's
 * JSON: a concatenation makes a string, and a 10,000-step plan made 22 MB
 * of them when each field took several. `retryJson` is the canonical JSON
 * of its retry policy when known.
 */
function specJson(step: PlannedStep, retryJson?: string): string {
  // `backend` is always there; only `approval` sorts before it.
  let out = step.approval === undefined
    ? '{"backend":'
    : '{"approval":' + canonicalJson(step.approval) + ',"backend":';
  out += JSON.stringify(step.backend);
  out += step.cache ? ',"cache":true' : ',"cache":false';
  if (step.concurrency !== undefined) out += ',"concurrency":' + canonicalJson(step.concurrency);
  out += ',"config":' + canonicalJson(step.config);
  out += step.continueOnError ? ',"continueOnError":true' : ',"continueOnError":false';
  out += step.env === NO_ENTRIES ? ',"env":{}' : ',"env":' + canonicalJson(step.env);
  if (step.handler !== undefined) out += ',"handler":' + JSON.stringify(step.handler);
  out += step.inputs === NO_ENTRIES ? ',"inputs":{}' : ',"inputs":' + canonicalJson(step.inputs);
  if (step.keepPartial !== undefined) out += ',"keepPartial":' + canonicalJson(step.keepPartial);
  if (step.matrix !== undefined) out += ',"matrix":' + canonicalJson(step.matrix);
  out += ',"name":' + JSON.stringify(step.name);
  out += ',"needs":' + canonicalJson(step.needs);
  if (step.onFailure !== undefined) out += ',"onFailure":' + canonicalJson(step.onFailure);
  out += step.outputs === NO_ITEMS ? ',"outputs":[]' : ',"outputs":' + canonicalJson(step.outputs);
  if (step.queueTimeoutMs !== undefined) {
    out += ',"queueTimeoutMs":' + canonicalJson(step.queueTimeoutMs);
  }
  out += step.resources === NO_ENTRIES
    ? ',"resources":{}'
    : ',"resources":' + canonicalJson(step.resources);
  out += ',"retry":' + (retryJson ?? canonicalJson(step.retry));
  out += step.secrets === NO_ITEMS ? ',"secrets":[]' : ',"secrets":' + canonicalJson(step.secrets);
  out += step.selector === NO_ENTRIES
    ? ',"selector":{}'
    : ',"selector":' + canonicalJson(step.selector);
  if (step.timeoutMs !== undefined) out += ',"timeoutMs":' + canonicalJson(step.timeoutMs);
  if (step.when !== undefined) out += ',"when":' + JSON.stringify(step.when);
  return out + "}";
}

/**
 * SHA-256 in hex. A hash object per digest: Deno's one-call `hash()` takes
 * twice as long (16 ms against 8.6 ms for 10,000 step specs here).
 */
const sha256 = sha256Hex;

function stringMap(map: Record<string, Scalar> | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(map ?? {})) out[k] = String(v);
  return out;
}

function retryPolicy(defaults: RetryFile | undefined, step: RetryFile | undefined): RetryPolicy {
  const asObject = (r: RetryFile | undefined) => typeof r === "number" ? { max: r } : r ?? {};
  const merged = { ...asObject(defaults), ...asObject(step) };
  const on = merged.on;
  return {
    max: merged.max ?? 0,
    backoffMs: parseDuration(merged.backoff ?? "1s"),
    maxBackoffMs: parseDuration(merged["max-backoff"] ?? "60s"),
    factor: merged.factor ?? 2,
    jitter: merged.jitter ?? 0.2,
    onClasses: on
      ? on.filter((x): x is ErrorClass => typeof x === "string")
      : [...DEFAULT_RETRY_CLASSES],
    onExitCodes: on ? on.filter((x): x is number => typeof x === "number") : [],
  };
}

function webhook(spec: OnFailureFile | undefined): WebhookSpec | undefined {
  if (!spec) return undefined;
  return {
    url: spec.webhook,
    headers: { ...spec.headers },
    retries: spec.retries ?? 3,
    backoffMs: parseDuration(spec.backoff ?? "1s"),
    timeoutMs: parseDuration(spec.timeout ?? "10s"),
    ...(spec.format ? { format: spec.format } : {}),
  };
}

function resources(...specs: Array<StepFile["resources"]>): Resources {
  const out: Resources = {};
  for (const spec of specs) {
    if (spec?.cpu !== undefined) out.cpu = parseCpu(spec.cpu);
    if (spec?.memory !== undefined) out.memoryBytes = parseByteSize(spec.memory);
  }
  return out;
}

/**
 * {@link topologicalOrder} of the instances a plan has just made, given
 * what each needs by instance number (no map of ids), and the steps' graph
 * when the instances are the steps (no matrix, no exit handler): then
 * what needs each is known already.
 */
function orderOf(steps: PlannedStep[], needsOf: number[][], edges: StepEdges): string[] {
  const pending = new Array<number>(needsOf.length);
  let sameAsSteps = needsOf.length === edges.needs.length;
  for (let i = 0; i < needsOf.length; i++) {
    pending[i] = needsOf[i].length;
    sameAsSteps &&= needsOf[i] === edges.needs[i];
  }
  return orderByNumber(steps, pending, sameAsSteps ? edges.dependents : dependentsOf(needsOf));
}

/** Topological order of instances (needs first), ties broken by file order; iterative. */
export function topologicalOrder(steps: PlannedStep[]): string[] {
  const index = new Map(steps.map((s, i) => [s.id, i]));
  const needsOf = steps.map((s) => s.needs.map((need) => index.get(need)!));
  return orderByNumber(steps, needsOf.map((needs) => needs.length), dependentsOf(needsOf));
}

/** What needs each instance, from what each needs. */
function dependentsOf(needsOf: number[][]): number[][] {
  const dependents: number[][] = new Array(needsOf.length).fill(NO_LINKS);
  for (let dependent = 0; dependent < needsOf.length; dependent++) {
    const needs = needsOf[dependent];
    for (let k = 0; k < needs.length; k++) {
      const need = needs[k];
      if (dependents[need] === NO_LINKS) dependents[need] = [dependent];
      else dependents[need].push(dependent);
    }
  }
  return dependents;
}

/**
 * Kahn's order by instance number: `pending[i]` needs of each (counted
 * down), `dependents[i]` what needs each; ties by file order.
 */
function orderByNumber(steps: PlannedStep[], pending: number[], dependents: number[][]): string[] {
  const heap = new MinHeap<number>((a, b) => a < b);
  for (let i = 0; i < steps.length; i++) if (pending[i] === 0) heap.push(i);
  const order: string[] = [];
  while (heap.size > 0) {
    const i = heap.pop()!;
    order.push(steps[i].id);
    const next = dependents[i];
    for (let k = 0; k < next.length; k++) if (--pending[next[k]] === 0) heap.push(next[k]);
  }
  return order;
}

/**
 * Plans a validated pipeline file. Returns the plan, or the problems only
 * visible after matrix interpolation (unknown matrix keys, missing modules).
 */
export function planPipeline(
  pipeline: PipelineFile,
  options: PlanOptions,
): { plan: Plan } | { diagnostics: PlanDiagnostic[] } {
  const diagnostics: PlanDiagnostic[] = [];
  const defaults = pipeline.defaults ?? {};
  let edges = options.edges;
  let steps = edges?.names.map((name) => pipeline.steps[name]);
  // A graph given for other steps (not the ones validated) is built again.
  if (
    !edges || !steps || steps.includes(undefined as unknown as StepFile) ||
    steps.length !== Object.keys(pipeline.steps).length
  ) {
    edges = stepEdges(new Map(Object.entries(pipeline.steps)));
    steps = edges.names.map((name) => pipeline.steps[name]);
  }
  const { names } = edges;
  // By step number: its legs, its instance ids, and the number of its first instance.
  // A step without legs shares NO_LEGS, and its list of ids (its name) is made when asked for.
  const legsOf: Array<ReadonlyArray<Record<string, Scalar> | undefined>> = [];
  const idsOf: Array<string[] | undefined> = [];
  const firstOf: number[] = [];
  let instances = 0;
  let handlers = false;
  for (let i = 0; i < names.length; i++) {
    const step = steps[i];
    const legs = step.matrix ? expandMatrix(step.matrix) : NO_LEGS;
    legsOf.push(legs);
    idsOf.push(step.matrix ? legs.map((leg) => instanceId(names[i], leg)) : undefined);
    firstOf.push(instances);
    instances += legs.length;
    handlers ||= step.handler !== undefined;
  }
  const ids = (i: number): string[] => idsOf[i] ??= [names[i]];
  const idsByName = (name: string): string[] => ids(edges.index.get(name)!);
  const moduleDigests = new Map<string, string | undefined>();
  const moduleDigest = (path: string): string | undefined => {
    if (!moduleDigests.has(path)) {
      try {
        const bytes = options.readFile ? options.readFile(path) : Deno.readFileSync(path);
        moduleDigests.set(path, bytes === undefined ? undefined : sha256(bytes));
      } catch {
        moduleDigests.set(path, undefined);
      }
    }
    return moduleDigests.get(path);
  };
  const defaultRetry = retryPolicy(defaults.retry, undefined);
  const defaultTimeoutMs = defaults.timeout ? parseDuration(defaults.timeout) : undefined;
  const defaultQueueTimeoutMs = defaults["queue-timeout"]
    ? parseDuration(defaults["queue-timeout"])
    : undefined;
  const planned: PlannedStep[] = [];
  // An exit handler needs every step that is not one: it runs after the DAG.
  const dagIds: string[] = [];
  const dagInstances: number[] = [];
  for (let i = 0; handlers && i < names.length; i++) {
    if (steps[i].handler !== undefined) continue;
    for (let leg = 0; leg < legsOf[i].length; leg++) {
      dagIds.push(ids(i)[leg]);
      dagInstances.push(firstOf[i] + leg);
    }
  }
  // What each instance needs, by instance number (for the order).
  const needsOf: number[][] = [];
  // Shared by every step that leaves them out: computed once, copied per step.
  const defaultEnv = stringMap(defaults.env);
  const noDefaultEnv = Object.keys(defaultEnv).length === 0;
  const noDefaultSelector = pipeline.selector === undefined && defaults.selector === undefined;
  const sharedRetry: RetryPolicy = Object.freeze({
    ...defaultRetry,
    onClasses: Object.freeze([...defaultRetry.onClasses]) as ErrorClass[],
    onExitCodes: Object.freeze([...defaultRetry.onExitCodes]) as number[],
  });
  const defaultRetryJson = canonicalJson(defaultRetry);
  // One interpolation for every leg: the leg it fills in, and the unknown keys it met.
  let currentLeg: Record<string, Scalar> | undefined;
  let unknownKeys: Set<string> | undefined;
  const interpolate = (text: string): string =>
    text.includes("${{")
      ? text.replace(MATRIX_REFERENCE, (whole, key: string) => {
        if (currentLeg && Object.hasOwn(currentLeg, key)) return String(currentLeg[key]);
        (unknownKeys ??= new Set()).add(key);
        return whole;
      })
      : text;
  const deep = (value: unknown): unknown => mapStrings(value, interpolate);
  for (let i = 0; i < names.length; i++) {
    const name = names[i];
    const step = steps[i];
    let needs: string[];
    let needed: number[];
    if (step.handler !== undefined) {
      needs = [...dagIds];
      needed = dagInstances;
    } else if (instances === names.length) {
      // No step has legs: instance numbers are step numbers.
      needed = edges.needs[i];
      needs = needed.map((need) => names[need]);
    } else {
      needs = [];
      needed = [];
      for (const need of edges.needs[i]) {
        for (let leg = 0; leg < legsOf[need].length; leg++) {
          needs.push(ids(need)[leg]);
          needed.push(firstOf[need] + leg);
        }
      }
    }
    const source = options.locate(["steps", name]);
    const backend = step.pipeline !== undefined
      ? PIPELINE_BACKEND
      : step.backend ?? defaults.backend ?? inferBackend(step)!;
    const outputs = step.outputs === undefined && step.pipeline === undefined
      ? NO_ITEMS
      : outputNames(step);
    const timeoutMs = step.timeout ? parseDuration(step.timeout) : defaultTimeoutMs;
    const queueTimeoutMs = step["queue-timeout"]
      ? parseDuration(step["queue-timeout"])
      : defaultQueueTimeoutMs;
    const retry = step.retry === undefined ? undefined : retryPolicy(defaults.retry, step.retry);
    const when = step.handler === undefined
      ? step.when
      : step.when === undefined
      ? HANDLER_CONDITIONS[step.handler]
      : `${HANDLER_CONDITIONS[step.handler]} && (${stripBraces(step.when)})`;
    const stepEnv = step.env === undefined ? undefined : stringMap(step.env);
    const configKeys = configKeysOf(step);
    for (const leg of legsOf[i]) {
      needsOf.push(needed);
      currentLeg = leg;
      unknownKeys = undefined;
      const config: Record<string, unknown> = {};
      for (const key of configKeys) config[key] = deep(step[key]);
      if (step.pipeline !== undefined) {
        Object.assign(config, deep(subPipelineConfig(step)) as Record<string, unknown>);
      }
      const env = stepEnv
        ? deep({ ...defaultEnv, ...stepEnv }) as Record<string, string>
        : noDefaultEnv
        ? NO_ENTRIES
        : deep(defaultEnv) as Record<string, string>;
      for (const key of unknownKeys ?? []) {
        diagnostics.push({
          code: "unknown_matrix_key",
          message: `step "${name}" uses "\${{ matrix.${key} }}" but its matrix has no key "${key}"`,
          path: ["steps", name],
          onKey: true,
          key,
        });
      }
      const inputs: Record<string, InputRef> = step.inputs === undefined ? NO_ENTRIES : {};
      for (const input in step.inputs) {
        const [from, output] = step.inputs[input].split("/");
        inputs[input] = {
          step: from,
          output,
          from: idsByName(from),
          fanIn: fansIn(pipeline.steps[from]),
        };
      }
      // Built in the order of `PlannedStep`, without undefined fields (canonicalJson skips them).
      const instance: PlannedStep = {
        id: instanceId(name, leg),
        name,
      } as PlannedStep;
      if (leg) instance.matrix = leg;
      instance.backend = backend;
      instance.needs = needs;
      instance.config = config;
      instance.inputs = inputs;
      instance.outputs = outputs.length === 0 ? NO_ITEMS : leg ? [...outputs] : outputs;
      instance.env = env;
      instance.secrets = step.secrets?.length ? [...step.secrets] : NO_ITEMS;
      instance.resources = defaults.resources === undefined && step.resources === undefined
        ? NO_ENTRIES
        : resources(defaults.resources, step.resources);
      if (timeoutMs !== undefined) instance.timeoutMs = timeoutMs;
      if (step.approval) {
        instance.approval = {
          ...(step.approval.message ? { message: step.approval.message } : {}),
          ...(step.approval.timeout ? { timeoutMs: parseDuration(step.approval.timeout) } : {}),
          role: step.approval.role ?? "submit",
        };
      }
      if (step["keep-partial"]) instance.keepPartial = true;
      if (queueTimeoutMs !== undefined) instance.queueTimeoutMs = queueTimeoutMs;
      instance.retry = retry === undefined ? sharedRetry : leg ? structuredClone(retry) : retry;
      if (when !== undefined) instance.when = when;
      if (step.handler !== undefined) instance.handler = step.handler;
      instance.continueOnError = step["continue-on-error"] ?? false;
      instance.cache = step.cache ?? false;
      if (step.concurrency !== undefined) instance.concurrency = step.concurrency;
      instance.selector = step.selector === undefined && noDefaultSelector
        ? NO_ENTRIES
        : { ...pipeline.selector, ...defaults.selector, ...step.selector };
      const onFailure = webhook(step["on-failure"]);
      if (onFailure !== undefined) instance.onFailure = onFailure;
      let digestInput = specJson(instance, retry === undefined ? defaultRetryJson : undefined);
      if (backend === "deno" && typeof config.module === "string") {
        const modulePath = resolve(options.baseDir, config.module);
        const digest = moduleDigest(modulePath);
        if (digest === undefined) {
          diagnostics.push({
            code: "missing_module",
            message: `module "${config.module}" of step "${
              instanceId(name, leg)
            }" does not exist or cannot be read (looked for ${modulePath})`,
            path: ["steps", name, "module"],
            key: "module",
          });
        }
        digestInput += `\nmodule:${digest}`;
      }
      instance.source = leg ? { ...source } : source;
      instance.specDigest = sha256(digestInput);
      planned.push(
        step.batch !== undefined || step.foreach !== undefined
          ? splitNode(step, instance, idsByName, defaultRetry)
          : instance,
      );
    }
  }
  if (diagnostics.length > 0) return { diagnostics };
  const plan: Plan = {
    name: pipeline.name,
    file: options.file,
    baseDir: options.baseDir,
    steps: byId(planned),
    order: orderOf(planned, needsOf, edges),
    env: stringMap(pipeline.env),
    secrets: Object.fromEntries(
      Object.entries(pipeline.secrets ?? {}).map((
        [k, v],
      ) => [k, typeof v === "string" ? { secret: v } : { ...v }]),
    ),
    digest: sha256(options.source),
  };
  if (pipeline.concurrency !== undefined) plan.concurrency = pipeline.concurrency;
  if (pipeline.deadline !== undefined) plan.deadlineMs = parseDuration(pipeline.deadline);
  if (pipeline.labels && Object.keys(pipeline.labels).length > 0) plan.labels = pipeline.labels;
  if (pipeline["run-name"] !== undefined) plan.runName = pipeline["run-name"];
  const key = pipeline["concurrency-key"];
  if (key !== undefined) {
    plan.concurrencyKey = typeof key === "string"
      ? { key, limit: 1, onConflict: "queue" }
      : { key: key.key, limit: key.limit ?? 1, onConflict: key["on-conflict"] ?? "queue" };
  }
  if (pipeline.affinity !== undefined) plan.affinity = pipeline.affinity;
  const onFailure = webhook(pipeline["on-failure"]);
  if (onFailure) plan.onFailure = onFailure;
  const onSuccess = webhook(pipeline["on-success"]);
  if (onSuccess) plan.onSuccess = onSuccess;
  const onExit = webhook(pipeline["on-exit"]);
  if (onExit) plan.onExit = onExit;
  const keep = (text: string): number | "forever" =>
    text === "forever" ? "forever" : parseDuration(text);
  const outputRetention: Record<string, number | "forever"> = {};
  const stepRetention: Record<string, number | "forever"> = {};
  for (let i = 0; i < names.length; i++) {
    const name = names[i];
    const step = steps[i];
    for (const output of step.outputs ?? []) {
      if (typeof output !== "string") {
        outputRetention[`${name}/${output.name}`] = keep(output.retention);
      }
    }
    if (step.retention) stepRetention[name] = keep(step.retention);
  }
  if (
    pipeline.retention || Object.keys(stepRetention).length > 0 ||
    Object.keys(outputRetention).length > 0
  ) {
    plan.retention = {
      ...(pipeline.retention ? { run: keep(pipeline.retention) } : {}),
      ...(Object.keys(stepRetention).length > 0 ? { steps: stepRetention } : {}),
      ...(Object.keys(outputRetention).length > 0 ? { outputs: outputRetention } : {}),
    };
  }
  const email = pipeline.alerts?.email;
  if (email) {
    plan.emailAlert = {
      to: [...email.to],
      on: email.on ?? ["failure"],
      ...(email.subject ? { subject: email.subject } : {}),
    };
  }
  return { plan };
}

/** Planned steps by id, in plan order (a loop: no pair array per step). */
function byId(planned: PlannedStep[]): Record<string, PlannedStep> {
  const steps: Record<string, PlannedStep> = {};
  for (const step of planned) steps[step.id] = step;
  return steps;
}

/** A condition without its optional `${{ }}`. */
function stripBraces(text: string): string {
  const match = /^\s*\$\{\{([\s\S]*)\}\}\s*$/.exec(text);
  return match ? match[1].trim() : text;
}

/** Wave (1-based) of every instance: one more than the deepest of its needs. */
export function planWaves(plan: Plan): Map<string, number> {
  const waves = new Map<string, number>();
  for (const id of plan.order) {
    let wave = 1;
    for (const need of plan.steps[id].needs) wave = Math.max(wave, waves.get(need)! + 1);
    waves.set(id, wave);
  }
  return waves;
}

/**
 * Renders a plan as text: its waves (steps that may run together), each
 * step with its backend and needs.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parsePipeline } from "./load.ts";
 * import { renderPlanText } from "./plan.ts";
 *
 * const source = "name: x\nsteps:\n  a: { run: 'true' }\n  b: { run: 'true', needs: [a] }\n";
 * assert.equal(
 *   renderPlanText(parsePipeline(source, { file: "x.yaml" })),
 *   "pipeline x: 2 steps in 2 waves\nwave 1\n  a [shell]\nwave 2\n  b [shell]  ← a\n",
 * );
 * ```
 */
export function renderPlanText(plan: Plan): string {
  const waves = planWaves(plan);
  const byWave: string[][] = [];
  for (const id of plan.order) (byWave[waves.get(id)! - 1] ??= []).push(id);
  const count = plan.order.length;
  const lines = [
    `pipeline ${plan.name}: ${count} step${count === 1 ? "" : "s"} in ${byWave.length} wave${
      byWave.length === 1 ? "" : "s"
    }`,
  ];
  byWave.forEach((ids, i) => {
    lines.push(`wave ${i + 1}`);
    for (const id of ids) {
      const step = plan.steps[id];
      const needs = step.needs.length > 0 ? `  ← ${step.needs.join(", ")}` : "";
      lines.push(`  ${id} [${step.backend}]${needs}`);
    }
  });
  return lines.join("\n") + "\n";
}
