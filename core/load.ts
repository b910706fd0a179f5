/**
 * Loading a pipeline file: source limits, YAML with positions, the zod
 * schema, cross-step checks, then planning. Every problem of the file is
 * collected and thrown at once as a {@link PipelineError}.
 *
 * @module
 */

import {
  isAlias,
  isMap,
  isScalar,
  isSeq,
  LineCounter,
  parseDocument,
  Scalar,
  visit,
} from "npm:yaml@2.9.1";
import process from "node:process";
import { CORE_SCHEMA, load as loadYaml } from "npm:js-yaml@4.1.0";
import type { Document, Node, Pair, YAMLMap } from "npm:yaml@2.9.1";
import type { z } from "npm:zod@4.6.7";
import { dirname, resolve } from "node:path";
import { type Diagnostic, PipelineError, QuantityError } from "./errors.ts";
import {
  DURATION_PATTERN,
  MILLICPU_PATTERN,
  parseByteSize,
  parseCpu,
  parseDuration,
  SIZE_PATTERN,
} from "./duration.ts";
import { ConditionSyntaxError, parseCondition } from "./expr.ts";
import type { Plan } from "./model.ts";
import {
  BUILTIN_BACKENDS,
  type PipelineFile,
  PipelineSchema,
  type StepFile,
  StepSchema,
} from "./schema.ts";
import { expandMatrix, inferBackend, planPipeline, stepEdges } from "./plan.ts";

/** Largest pipeline file accepted (5 MiB): far above any real pipeline, bounds parse time. */
export const MAX_PIPELINE_BYTES = 5 * 1024 * 1024;
/** Most YAML aliases resolved; a few are normal, thousands are an alias bomb. */
export const MAX_ALIAS_COUNT = 1000;
/** Most diagnostics reported for one file; past that the rest are summarised. */
export const MAX_DIAGNOSTICS = 200;

/** Options of {@link parsePipeline}. */
export interface ParseOptions {
  /** Path of the file as the user named it (used in diagnostics). */
  file: string;
  /** Directory module paths resolve against; default the file's directory. */
  baseDir?: string;
  /** Plugin backend names accepted besides the built-in ones. */
  backends?: string[];
  /**
   * Reads a step module by absolute path, for checks and cache digests;
   * default the filesystem. A server given a pipeline's shipped directory
   * reads from that instead. Returns undefined for a missing file.
   */
  readFile?: (path: string) => Uint8Array | undefined;
}

/** Options of {@link loadPipeline}. */
export interface LoadOptions {
  /** Plugin backend names accepted besides the built-in ones. */
  backends?: string[];
}

type PathSegment = string | number;

/** Finds positions of YAML nodes by key path; map lookups are cached for large files. */
export class Locator {
  readonly file: string;
  #doc: Document | undefined;
  #lines: LineCounter;
  #maps = new WeakMap<YAMLMap, Map<string, Pair>>();

  /** Builds a locator over a parsed document (absent for files that never parsed). */
  constructor(file: string, lines: LineCounter, doc?: Document) {
    this.file = file;
    this.#lines = lines;
    this.#doc = doc;
  }

  /** Line and column (from 1) of a character offset. */
  position(offset: number): { line: number; col: number } {
    const pos = this.#lines.linePos(Math.max(0, offset));
    return { line: Math.max(1, pos.line), col: Math.max(1, pos.col) };
  }

  #pair(map: YAMLMap, key: PathSegment): Pair | undefined {
    let index = this.#maps.get(map);
    if (!index) {
      index = new Map();
      for (const pair of map.items) {
        const k = isScalar(pair.key) ? String(pair.key.value) : String(pair.key);
        if (!index.has(k)) index.set(k, pair as Pair);
      }
      this.#maps.set(map, index);
    }
    return index.get(String(key));
  }

  /** The node at a path, or the deepest one found. */
  node(path: readonly PathSegment[], options: { key?: boolean } = {}): Node | undefined {
    let node: unknown = this.#doc?.contents;
    let found: Node | undefined = node as Node | undefined;
    for (let i = 0; i < path.length; i++) {
      if (isAlias(node)) return found;
      if (isMap(node)) {
        const pair = this.#pair(node, path[i]);
        if (!pair) return found;
        const last = i === path.length - 1;
        if (last && options.key || pair.value === null || pair.value === undefined) {
          return pair.key as Node;
        }
        node = pair.value;
      } else if (isSeq(node) && typeof path[i] === "number") {
        node = node.items[path[i] as number];
        if (!node) return found;
      } else {
        return found;
      }
      found = node as Node;
    }
    return found;
  }

  /** Position of the node at a path (its key with `key: true`); 1:1 when unknown. */
  at(path: readonly PathSegment[], options: { key?: boolean } = {}): { line: number; col: number } {
    const node = this.node(path, options);
    return node?.range ? this.position(node.range[0]) : { line: 1, col: 1 };
  }

  /** Position of a character inside the string scalar at a path. */
  inString(path: readonly PathSegment[], offset: number): { line: number; col: number } {
    const node = this.node(path);
    if (!node?.range) return { line: 1, col: 1 };
    if (
      isScalar(node) && (node.type === Scalar.PLAIN || node.type === Scalar.QUOTE_SINGLE ||
        node.type === Scalar.QUOTE_DOUBLE)
    ) {
      const quote = node.type === Scalar.PLAIN ? 0 : 1;
      const text = String(node.value);
      if (!text.includes("\n")) return this.position(node.range[0] + quote + offset);
    }
    return this.position(node.range[0]);
  }
}

/** Collects diagnostics with positions. */
class Reporter {
  readonly diagnostics: Diagnostic[] = [];
  readonly locator: Locator;

  constructor(locator: Locator) {
    this.locator = locator;
  }

  add(
    code: string,
    message: string,
    where: { line: number; col: number },
    extra: Partial<Pick<Diagnostic, "key" | "expected" | "hint">> = {},
  ): void {
    this.diagnostics.push({ code, message, file: this.locator.file, ...where, ...extra });
  }

  at(
    code: string,
    message: string,
    path: readonly PathSegment[],
    extra: Partial<Pick<Diagnostic, "key" | "expected" | "hint">> & { onKey?: boolean } = {},
  ): void {
    const { onKey, ...rest } = extra;
    this.add(code, message, this.locator.at(path, { key: onKey }), rest);
  }
}

/** Levenshtein distance, for did-you-mean hints. */
export function editDistance(a: string, b: string): number {
  if (Math.abs(a.length - b.length) > 8) return Math.abs(a.length - b.length);
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      current[j] = Math.min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost);
    }
    previous = current;
  }
  return previous[b.length];
}

/** A `did you mean "x"?` hint naming the closest candidate, if one is close. */
export function didYouMean(word: string, candidates: Iterable<string>): string | undefined {
  let best: string | undefined;
  let bestDistance = Math.max(2, Math.floor(word.length / 3)) + 1;
  for (const candidate of candidates) {
    const distance = editDistance(word.toLowerCase(), candidate.toLowerCase());
    if (distance < bestDistance) {
      best = candidate;
      bestDistance = distance;
    }
  }
  return best === undefined ? undefined : `did you mean "${best}"?`;
}

function describePath(path: readonly PathSegment[]): string {
  if (path.length === 0) return "at the top level";
  if (path[0] === "steps" && path.length >= 2) {
    const rest = path.slice(2);
    return rest.length === 0
      ? `in step "${path[1]}"`
      : `in "${joinPath(rest)}" of step "${path[1]}"`;
  }
  return `in "${joinPath(path)}"`;
}

function joinPath(path: readonly PathSegment[]): string {
  return path.map((p, i) => typeof p === "number" ? `[${p}]` : i === 0 ? p : `.${p}`).join("");
}

function typeName(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "a list";
  if (typeof value === "object") return "a mapping";
  if (typeof value === "string") return `the string ${JSON.stringify(value.slice(0, 60))}`;
  return `${typeof value} ${String(value)}`;
}

function valueAt(root: unknown, path: readonly PathSegment[]): unknown {
  let value = root;
  for (const segment of path) {
    if (value === null || typeof value !== "object") return undefined;
    value = (value as Record<string, unknown>)[segment as string];
  }
  return value;
}

interface ZodSchemaLike {
  _zod: { def: Record<string, unknown> & { type: string } };
}

/** Keys an object schema reached along `path` accepts (for did-you-mean). */
function knownKeys(schema: ZodSchemaLike, path: readonly PathSegment[]): string[] {
  let current: ZodSchemaLike[] = [schema];
  const unwrap = (list: ZodSchemaLike[]): ZodSchemaLike[] =>
    list.flatMap((s) => {
      const def = s._zod.def;
      if (def.type === "optional" || def.type === "nullable" || def.type === "default") {
        return unwrap([def.innerType as ZodSchemaLike]);
      }
      if (def.type === "union") return unwrap(def.options as ZodSchemaLike[]);
      return [s];
    });
  for (const segment of path) {
    current = unwrap(current).flatMap((s) => {
      const def = s._zod.def;
      if (def.type === "object") {
        const shape = def.shape as Record<string, ZodSchemaLike>;
        return Object.hasOwn(shape, segment) ? [shape[segment]] : [];
      }
      if (def.type === "record") return [def.valueType as ZodSchemaLike];
      if (def.type === "array") return [def.element as ZodSchemaLike];
      return [];
    });
  }
  return unwrap(current).flatMap((s) =>
    s._zod.def.type === "object" ? Object.keys(s._zod.def.shape as object) : []
  );
}

function formatMessage(pattern: string, value: unknown, key: string): string | undefined {
  try {
    if (pattern === String(DURATION_PATTERN)) parseDuration(String(value), { key });
    else if (pattern === String(SIZE_PATTERN)) parseByteSize(String(value), { key });
    else if (pattern === String(MILLICPU_PATTERN)) parseCpu(String(value), { key });
    else return undefined;
  } catch (error) {
    if (error instanceof QuantityError) return error.message;
  }
  return undefined;
}

const PATTERN_NAMES: Record<string, string> = {
  name: "a pipeline name of letters, digits, _ . -",
  inputs: 'a reference "step/output"',
  outputs: "a plain file name (no / and not . or ..)",
  matrix: "a matrix key of letters, digits, _ -, starting with a letter",
  steps: "a step name of letters, digits, _ -, starting with a letter",
};

function reportZodIssues(
  issues: readonly z.core.$ZodIssue[],
  raw: unknown,
  reporter: Reporter,
  prefix: readonly PathSegment[] = [],
): void {
  for (const issue of issues) {
    const path = [...prefix, ...issue.path] as PathSegment[];
    const named = path.findLastIndex((p) => typeof p === "string");
    const key = named < 0 ? "" : joinPath(path.slice(named));
    const where = describePath(path.slice(0, Math.max(0, named)));
    const value = valueAt(raw, path);
    switch (issue.code) {
      case "unrecognized_keys":
        for (const unknown of issue.keys) {
          const hint = didYouMean(
            unknown,
            knownKeys(PipelineSchema as unknown as ZodSchemaLike, path),
          );
          const message = `unknown key "${unknown}" ${describePath(path)}`;
          reporter.at("unknown_key", message, [...path, unknown], {
            onKey: true,
            key: unknown,
            hint,
          });
        }
        break;
      case "invalid_type": {
        if (value === undefined) {
          const message = `missing required key "${key}" ${where}`;
          reporter.at("missing_key", message, path.slice(0, -1), { key, expected: issue.expected });
        } else {
          const message = `expected ${issue.expected} for "${key}" ${where}, got ${
            typeName(value)
          }`;
          reporter.at("invalid_type", message, path, { key, expected: issue.expected });
        }
        break;
      }
      case "invalid_union": {
        const branches = issue.errors;
        const typeOnly = (list: readonly z.core.$ZodIssue[]) =>
          list.every((i) => i.code === "invalid_type" && i.path.length === 0);
        const specific = branches.filter((list) => !typeOnly(list));
        if (specific.length > 0) {
          specific.sort((a, b) => a.length - b.length);
          reportZodIssues(specific[0], raw, reporter, path);
        } else {
          const expected = [
            ...new Set(branches.flat().map((i) => (i as { expected?: string }).expected)),
          ]
            .filter(Boolean).join(" or ");
          const message = `expected ${expected} for "${key}" ${where}, got ${typeName(value)}`;
          reporter.at("invalid_type", message, path, { key, expected });
        }
        break;
      }
      case "invalid_format": {
        const pattern = (issue as { pattern?: string }).pattern ?? "";
        const quantity = formatMessage(pattern, value, key);
        if (quantity) {
          reporter.at("invalid_value", `${quantity} ${where}`.trim(), path, { key });
          break;
        }
        const named = PATTERN_NAMES[key] ?? PATTERN_NAMES[String(path.at(-2))] ??
          PATTERN_NAMES[String(path.at(-3))];
        const expected = issue.format === "url" ? "a URL" : named ?? `a value matching ${pattern}`;
        const message = `expected ${expected} for "${key}" ${where}, got ${typeName(value)}`;
        reporter.at("invalid_value", message, path, { key, expected });
        break;
      }
      case "invalid_key": {
        const badKey = key;
        const expected = PATTERN_NAMES[String(path.at(-2))] ?? "a valid key";
        const message = `invalid key "${badKey}" ${
          describePath(path.slice(0, -1))
        }: expected ${expected}`;
        reporter.at("invalid_key", message, path, { onKey: true, key: badKey, expected });
        break;
      }
      case "invalid_value": {
        const expected = issue.values.map((v) => JSON.stringify(v)).join(", ");
        const message = `expected one of ${expected} for "${key}" ${where}, got ${typeName(value)}`;
        reporter.at("invalid_value", message, path, { key, expected });
        break;
      }
      case "too_small":
      case "too_big": {
        const message = `${
          issue.message.replace(/^Too (small|big): expected/i, "expected")
        } for "${key}" ${where}`;
        reporter.at("invalid_value", message, path, { key });
        break;
      }
      default: {
        const text = issue.message.charAt(0).toLowerCase() + issue.message.slice(1);
        const message = issue.code === "custom"
          ? `expected ${text} for "${key}" ${where}`
          : `${text} for "${key}" ${where}`;
        reporter.at("invalid_value", message, path, { key });
      }
    }
  }
}

function checkSource(source: string, reporter: Reporter): boolean {
  const origin = { line: 1, col: 1 };
  if (source.length > MAX_PIPELINE_BYTES) {
    reporter.add(
      "too_large",
      `expected a pipeline file of at most 5 MiB, got ${source.length} characters`,
      origin,
    );
    return false;
  }
  const nul = source.indexOf("\0");
  if (nul >= 0) {
    reporter.add(
      "binary",
      "expected a text file, found a NUL byte (is this a binary file?)",
      reporter.locator.position(nul),
    );
    return false;
  }
  const replacement = source.indexOf("\uFFFD");
  if (replacement >= 0) {
    reporter.add(
      "invalid_utf8",
      "expected UTF-8 text, found an invalid byte sequence",
      reporter.locator.position(replacement),
    );
    return false;
  }
  if (/^(?:\s|#[^\n]*)*$/.test(source.replace(/^\uFEFF/, ""))) {
    reporter.add("empty", "expected a pipeline, found an empty file", origin);
    return false;
  }
  return true;
}

/**
 * Parses YAML with positions. yaml's own duplicate-key check is quadratic in
 * the size of a map (10,000 steps took seconds), so keys are checked by
 * {@link reportDuplicateKeys} instead. yaml also reads `process.env.LOG_TOKENS`
 * once per token; under Deno that is a permission-checked op (about 40% of
 * parse time, and it demands --allow-env), so a plain object stands in for
 * `process.env` during this synchronous call and is restored after it.
 */
function parseYaml(source: string, lines: LineCounter): Document {
  const env = Object.getOwnPropertyDescriptor(process, "env");
  const swap = env?.configurable === true;
  if (swap) {
    Object.defineProperty(process, "env", { value: {}, configurable: true, writable: true });
  }
  try {
    return parseDocument(source, {
      lineCounter: lines,
      prettyErrors: true,
      uniqueKeys: false,
      // Collection keys are reported as unknown keys; yaml's console warning adds nothing.
      logLevel: "error",
    });
  } finally {
    if (swap) Object.defineProperty(process, "env", env!);
  }
}

/** Reports every repeated key of every mapping (a repeated step as `duplicate_step`). */
function reportDuplicateKeys(doc: Document, reporter: Reporter): void {
  const steps = reporter.locator.node(["steps"]);
  visit(doc, {
    Map(_, map) {
      const seen = new Set<string>();
      for (const pair of map.items) {
        const key = isScalar(pair.key) ? String(pair.key.value) : String(pair.key);
        if (!seen.has(key)) {
          seen.add(key);
          continue;
        }
        const where = (pair.key as Node | null)?.range
          ? reporter.locator.position((pair.key as Node).range![0])
          : { line: 1, col: 1 };
        const isStep = map === steps;
        reporter.add(
          isStep ? "duplicate_step" : "duplicate_key",
          isStep ? `duplicate step "${key}"` : `duplicate key "${key}"`,
          where,
          {
            key,
          },
        );
      }
    },
  });
}

/** What the cross-step checks can see when parts of the file failed validation. */
interface PartialView {
  steps: Map<string, StepFile | undefined>;
  /** Steps whose `outputs` did not validate, so inputs naming them are not checked. */
  uncertainOutputs?: Set<string>;
  /** Keys of each step that did not validate (checks depending on them are skipped). */
  droppedKeys?: Map<string, Set<string>>;
  secrets?: Set<string>;
  startNode?: string;
  defaultBackend?: string;
}

/**
 * Parses what can be parsed of an invalid object: drops the top-level keys
 * zod complained about until the rest parses, so cross-step checks still
 * see (and report on) the valid parts.
 */
function salvage<T>(
  schema: z.ZodType<T>,
  raw: unknown,
  dropped = new Set<string>(),
): T | undefined {
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) {
    const parsed = schema.safeParse(raw);
    return parsed.success ? parsed.data : undefined;
  }
  const copy: Record<string, unknown> = { ...raw as Record<string, unknown> };
  for (let round = 0; round < 4; round++) {
    const parsed = schema.safeParse(copy);
    if (parsed.success) return parsed.data;
    for (const issue of parsed.error.issues) {
      if (issue.path.length > 0) {
        dropped.add(String(issue.path[0]));
        delete copy[String(issue.path[0])];
      } else if (issue.code === "unrecognized_keys") {
        for (const key of issue.keys) delete copy[key];
      } else return undefined;
    }
  }
  return undefined;
}

function partialView(raw: Record<string, unknown>): PartialView {
  const steps = new Map<string, StepFile | undefined>();
  const uncertainOutputs = new Set<string>();
  const droppedKeys = new Map<string, Set<string>>();
  const rawSteps = raw.steps;
  if (rawSteps && typeof rawSteps === "object" && !Array.isArray(rawSteps)) {
    for (const [name, step] of Object.entries(rawSteps)) {
      const dropped = new Set<string>();
      steps.set(name, salvage(StepSchema, step, dropped));
      if (dropped.has("outputs")) uncertainOutputs.add(name);
      if (dropped.size > 0) droppedKeys.set(name, dropped);
    }
  }
  const shape = PipelineSchema.shape;
  const secrets = shape.secrets.safeParse(raw.secrets);
  const start = shape.start_node.safeParse(raw.start_node);
  const defaults = salvage(shape.defaults, raw.defaults);
  return {
    steps,
    uncertainOutputs,
    droppedKeys,
    secrets: secrets.success ? new Set(Object.keys(secrets.data ?? {})) : undefined,
    startNode: start.success ? start.data : undefined,
    defaultBackend: defaults?.backend,
  };
}

function checkSteps(
  view: PartialView,
  options: ParseOptions & { baseDir: string },
  reporter: Reporter,
): void {
  const names = [...view.steps.keys()];
  const known = new Set(names);
  const backends = new Set<string>([...BUILTIN_BACKENDS, ...(options.backends ?? [])]);
  let reportedDefaultBackend = false;
  for (const [name, step] of view.steps) {
    if (!step) continue;
    const at = (...path: PathSegment[]) => ["steps", name, ...path];
    const dropped = view.droppedKeys?.get(name) ?? new Set<string>();
    const backend = step.backend ?? view.defaultBackend ?? inferBackend(step);
    if (["backend", "module", "image", "build", "host", "run"].some((k) => dropped.has(k))) {
      // The step's backend cannot be known; its own diagnostics say why.
    } else if (backend === undefined) {
      reporter.at(
        "missing_backend",
        `cannot tell the backend of step "${name}": expected "backend" or one of "module", "image", "build", "host", "run"`,
        at(),
        { onKey: true, key: "backend" },
      );
    } else if (!backends.has(backend)) {
      const path = step.backend ? at("backend") : ["defaults", "backend"];
      if (step.backend || !reportedDefaultBackend) {
        reportedDefaultBackend ||= !step.backend;
        reporter.at("unknown_backend", `unknown backend "${backend}" for step "${name}"`, path, {
          key: "backend",
          expected: [...backends].join(", "),
          hint: didYouMean(backend, backends),
        });
      }
    } else {
      const required: Record<string, string[]> = {
        deno: ["module"],
        shell: ["run"],
        docker: step.build === undefined ? ["image"] : [],
        ssh: ["host", "run"],
        kubernetes: ["image"],
      };
      for (const key of required[backend] ?? []) {
        if (step[key as keyof StepFile] === undefined) {
          reporter.at(
            "missing_key",
            `missing required key "${key}" in step "${name}" (backend ${backend})`,
            at(),
            {
              onKey: true,
              key,
            },
          );
        }
      }
      if (backend === "deno" && step.module !== undefined && !step.module.includes("${{")) {
        const modulePath = resolve(options.baseDir, step.module);
        const problem = options.readFile
          ? (options.readFile(modulePath) ? undefined : `does not exist (looked for ${modulePath})`)
          : moduleProblem(modulePath);
        if (problem) {
          reporter.at(
            "missing_module",
            `module "${step.module}" of step "${name}" ${problem}`,
            at("module"),
            {
              key: "module",
            },
          );
        }
      }
    }
    const needs = step.needs === undefined
      ? []
      : Array.isArray(step.needs)
      ? step.needs
      : [step.needs];
    needs.forEach((need, i) => {
      if (!known.has(need)) {
        const path = Array.isArray(step.needs) ? at("needs", i) : at("needs");
        reporter.at("unknown_step", `step "${name}" needs unknown step "${need}"`, path, {
          key: "needs",
          hint: didYouMean(need, names),
        });
      }
    });
    if (step.next_node !== undefined && !known.has(step.next_node)) {
      reporter.at(
        "unknown_step",
        `"next_node" of step "${name}" names unknown step "${step.next_node}"`,
        at("next_node"),
        {
          key: "next_node",
          hint: didYouMean(step.next_node, names),
        },
      );
    }
    for (const [input, ref] of Object.entries(step.inputs ?? {})) {
      const [from, output] = ref.split("/");
      const source = view.steps.get(from);
      if (!known.has(from)) {
        reporter.at(
          "unknown_step",
          `input "${input}" of step "${name}" names unknown step "${from}"`,
          at("inputs", input),
          {
            key: input,
            hint: didYouMean(from, names),
          },
        );
      } else if (
        source && !view.uncertainOutputs?.has(from) && !(source.outputs ?? []).includes(output)
      ) {
        reporter.at(
          "unknown_output",
          `input "${input}" of step "${name}" names output "${output}" that step "${from}" does not declare`,
          at("inputs", input),
          {
            key: input,
            expected: (source.outputs ?? []).join(", "),
            hint: didYouMean(output, source.outputs ?? []),
          },
        );
      }
    }
    if (view.secrets) {
      (step.secrets ?? []).forEach((secret, i) => {
        if (!view.secrets!.has(secret)) {
          reporter.at(
            "unknown_secret",
            `step "${name}" uses undeclared secret "${secret}"`,
            at("secrets", i),
            {
              key: "secrets",
              hint: didYouMean(secret, view.secrets!) ?? 'declare it under the top-level "secrets"',
            },
          );
        }
      });
    }
    if (step.when !== undefined) {
      try {
        parseCondition(step.when);
      } catch (error) {
        if (!(error instanceof ConditionSyntaxError)) throw error;
        reporter.add(
          "condition_syntax",
          `invalid condition in "when" of step "${name}": ${error.message}`,
          reporter.locator.inString(at("when"), error.offset),
          { key: "when" },
        );
      }
    }
    if (step.matrix) checkMatrix(name, step.matrix, reporter);
  }
  if (view.startNode !== undefined && !known.has(view.startNode)) {
    reporter.at("unknown_step", `"start_node" names unknown step "${view.startNode}"`, [
      "start_node",
    ], {
      key: "start_node",
      hint: didYouMean(view.startNode, names),
    });
  }
  checkGraph(view, reporter);
}

function moduleProblem(path: string): string | undefined {
  try {
    const info = Deno.statSync(path);
    return info.isFile ? undefined : "is not a file";
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return `does not exist (looked for ${path})`;
    if (error instanceof Deno.errors.NotCapable || error instanceof Deno.errors.PermissionDenied) {
      return `cannot be read (${(error as Error).message})`;
    }
    return `cannot be read (${String(error)})`;
  }
}

function checkMatrix(name: string, matrix: Record<string, unknown[]>, reporter: Reporter): void {
  const at = (...path: PathSegment[]) => ["steps", name, "matrix", ...path];
  let valid = true;
  for (const [key, values] of Object.entries(matrix)) {
    const special = key === "include" || key === "exclude";
    const wrong = values.findIndex((v) =>
      special ? v === null || typeof v !== "object" : typeof v === "object"
    );
    if (wrong >= 0) {
      const expected = special ? "a list of mappings" : "a list of strings, numbers or booleans";
      reporter.at(
        "invalid_type",
        `expected ${expected} for matrix key "${key}" of step "${name}"`,
        at(key, wrong),
        {
          key,
          expected,
        },
      );
      valid = false;
    } else if (!special && values.length === 0) {
      reporter.at("empty_matrix", `matrix key "${key}" of step "${name}" has no values`, at(key), {
        key,
      });
      valid = false;
    }
  }
  if (valid && expandMatrix(matrix as Parameters<typeof expandMatrix>[0]).length === 0) {
    reporter.at(
      "empty_matrix",
      `matrix of step "${name}" expands to no legs (every combination is excluded)`,
      at(),
      {
        onKey: true,
        key: "matrix",
      },
    );
  }
}

function checkGraph(view: PartialView, reporter: Reporter): void {
  const edges = stepEdges(view.steps);
  const names = [...view.steps.keys()];
  // Kahn on step names; whatever is left over sits on or behind a cycle.
  const pending = new Map(names.map((n) => [n, edges.needs.get(n)!.size]));
  const queue = names.filter((n) => pending.get(n) === 0);
  for (let i = 0; i < queue.length; i++) {
    for (const dependent of edges.dependents.get(queue[i]) ?? []) {
      const left = pending.get(dependent)! - 1;
      pending.set(dependent, left);
      if (left === 0) queue.push(dependent);
    }
  }
  if (queue.length < names.length) {
    const remaining = new Set(names.filter((n) => pending.get(n)! > 0));
    const start = names.find((n) => remaining.has(n))!;
    const seen = new Map<string, number>();
    const walk: string[] = [];
    let current = start;
    while (!seen.has(current)) {
      seen.set(current, walk.length);
      walk.push(current);
      current = [...edges.needs.get(current)!].find((n) => remaining.has(n))!;
    }
    const cycle = walk.slice(seen.get(current)!).reverse();
    cycle.push(cycle[0]);
    const first = cycle.at(-2)!;
    reporter.at("cycle", `cycle between steps: ${cycle.join(" → ")}`, ["steps", first], {
      onKey: true,
      hint: "remove one of these needs",
    });
  }
  if (view.startNode !== undefined && view.steps.has(view.startNode)) {
    const reached = new Set([view.startNode]);
    const stack = [view.startNode];
    while (stack.length > 0) {
      for (const next of edges.dependents.get(stack.pop()!) ?? []) {
        if (!reached.has(next)) {
          reached.add(next);
          stack.push(next);
        }
      }
    }
    for (const name of names) {
      if (!reached.has(name)) {
        reporter.at(
          "unreachable",
          `step "${name}" is unreachable from start_node "${view.startNode}"`,
          ["steps", name],
          {
            onKey: true,
            hint: `add it to a "next_node" or "needs" chain starting at "${view.startNode}"`,
          },
        );
      }
    }
  }
}

function fail(reporter: Reporter): never {
  const all = reporter.diagnostics;
  all.sort((a, b) => a.line - b.line || a.col - b.col);
  if (all.length > MAX_DIAGNOSTICS) {
    const more = all.length - MAX_DIAGNOSTICS;
    const last = all[MAX_DIAGNOSTICS - 1];
    all.length = MAX_DIAGNOSTICS;
    all.push({
      ...last,
      code: "too_many",
      message: `${more} more problems not shown`,
      key: undefined,
      hint: undefined,
    });
  }
  throw new PipelineError(all);
}

/**
 * Parses, validates and plans a pipeline from its source text.
 *
 * @throws {PipelineError} listing every problem of the file.
 * @example
 * ```ts
 * import { parsePipeline } from "./load.ts";
 * const plan = parsePipeline("name: hi\nsteps:\n  a: { run: echo hi }\n", { file: "p.yaml" });
 * plan.order; // ["a"]
 * ```
 */
export function parsePipeline(source: string, options: ParseOptions): Plan {
  return (source.length >= FAST_PATH_MIN_CHARS ? parseFast(source, options) : undefined) ??
    parseLocated(source, options);
}

/**
 * Files at least this large try the fast path first. Below it the located
 * parse costs a few milliseconds and gives exact step positions.
 */
const FAST_PATH_MIN_CHARS = 64 * 1024;

/** An anchor or alias anywhere: such files take the located path (bounded alias expansion). */
const ANCHOR_OR_ALIAS = /(?:^|[\s[{,:-])[&*][^\s,\]}]/m;

/**
 * The fast path for large files: a plain YAML load (js-yaml, core schema, a
 * fraction of the time and memory of a positioned document), the same zod
 * schema and the same checks. It only ever returns a valid plan: at the
 * first sign of any problem it gives up, and the located path re-parses the
 * file to report every problem with its line and column. Step positions come
 * from a scan of the block-style `steps:` mapping.
 */
function parseFast(source: string, options: ParseOptions): Plan | undefined {
  if (ANCHOR_OR_ALIAS.test(source) || source.includes("<<")) return undefined;
  const reporter = new Reporter(new Locator(options.file, new LineCounter()));
  if (!checkSource(source, reporter)) return undefined;
  let raw: unknown;
  try {
    raw = loadYaml(source, { schema: CORE_SCHEMA, json: false });
  } catch {
    return undefined;
  }
  const parsed = PipelineSchema.safeParse(raw);
  if (!parsed.success) return undefined;
  const baseDir = options.baseDir ?? dirname(resolve(options.file));
  const view: PartialView = {
    steps: new Map(Object.entries(parsed.data.steps)),
    secrets: new Set(Object.keys(parsed.data.secrets ?? {})),
    startNode: parsed.data.start_node,
    defaultBackend: parsed.data.defaults?.backend,
  };
  try {
    checkSteps(view, { ...options, baseDir }, reporter);
  } catch {
    return undefined;
  }
  if (reporter.diagnostics.length > 0) return undefined;
  const stepLines = scanStepLines(source);
  const planned = planPipeline(parsed.data, {
    file: options.file,
    baseDir,
    source,
    readFile: options.readFile,
    locate: (path) => {
      const name = path[0] === "steps" ? String(path[1]) : undefined;
      return { file: options.file, ...(name && stepLines.get(name) || { line: 1, col: 1 }) };
    },
  });
  return "diagnostics" in planned ? undefined : planned.plan;
}

/** Line and column of each step key of a block-style `steps:` mapping. */
function scanStepLines(source: string): Map<string, { line: number; col: number }> {
  const found = new Map<string, { line: number; col: number }>();
  const lines = source.split("\n");
  const start = lines.findIndex((line) => /^steps\s*:\s*(#.*)?$/.test(line));
  if (start < 0) return found;
  let indent = -1;
  for (let i = start + 1; i < lines.length; i++) {
    const match = /^( +)([^\s:#][^:]*?)\s*:(?:\s|$)/.exec(lines[i]);
    if (!match) {
      if (/^\S/.test(lines[i])) break; // the next top-level key
      continue;
    }
    if (indent < 0) indent = match[1].length;
    if (match[1].length === indent) {
      found.set(match[2].replace(/^["']|["']$/g, ""), { line: i + 1, col: indent + 1 });
    }
  }
  return found;
}

/**
 * Parses with a positioned YAML document: every problem with its line and
 * column, and exact step positions. {@link parsePipeline} uses it for files
 * under 64 KiB and for any file the fast path does not accept.
 */
export function parseLocated(source: string, options: ParseOptions): Plan {
  const lines = new LineCounter();
  const reporter = new Reporter(new Locator(options.file, lines));
  const baseDir = options.baseDir ?? dirname(resolve(options.file));
  if (!checkSource(source, reporter)) {
    // Positions before parsing come from a counter over the raw text.
    fail(reporter);
  }
  const doc = parseYaml(source, lines);
  const locator = new Locator(options.file, lines, doc);
  const located = new Reporter(locator);
  for (const error of doc.errors) {
    const pos = error.linePos?.[0] ?? locator.position(error.pos[0]);
    located.add(
      "yaml_syntax",
      `invalid YAML: ${error.message.split("\n")[0].replace(/ at line \d+, column \d+:?$/, "")}`,
      pos,
    );
  }
  if (located.diagnostics.length > 0) fail(located);
  reportDuplicateKeys(doc, located);
  if (located.diagnostics.length > 0) fail(located);
  let raw: unknown;
  try {
    raw = doc.toJS({ maxAliasCount: MAX_ALIAS_COUNT });
  } catch (error) {
    const message = /alias/i.test(String(error))
      ? `expected at most ${MAX_ALIAS_COUNT} alias expansions (is this an alias bomb?)`
      : `cannot read the YAML document: ${(error as Error).message}`;
    located.add("yaml_aliases", message, { line: 1, col: 1 });
    fail(located);
  }
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) {
    located.at("invalid_type", `expected a mapping at the top level, got ${typeName(raw)}`, []);
    fail(located);
  }
  const parsed = PipelineSchema.safeParse(raw);
  if (!parsed.success) reportZodIssues(parsed.error.issues, raw, located);
  const view: PartialView = parsed.success
    ? {
      steps: new Map(Object.entries(parsed.data.steps)),
      secrets: new Set(Object.keys(parsed.data.secrets ?? {})),
      startNode: parsed.data.start_node,
      defaultBackend: parsed.data.defaults?.backend,
    }
    : partialView(raw as Record<string, unknown>);
  checkSteps(view, { ...options, baseDir }, located);
  if (located.diagnostics.length > 0 || !parsed.success) fail(located);
  const planned = planPipeline(parsed.data as PipelineFile, {
    file: options.file,
    baseDir,
    source,
    readFile: options.readFile,
    locate: (path) => ({ file: options.file, ...locator.at(path, { key: true }) }),
  });
  if ("diagnostics" in planned) {
    for (const d of planned.diagnostics) {
      located.at(d.code, d.message, d.path, { onKey: d.onKey, key: d.key });
    }
    fail(located);
  }
  return planned.plan;
}

/**
 * Reads a pipeline file and parses it (see {@link parsePipeline}).
 *
 * @throws {PipelineError} also when the file is unreadable, too large, binary or not UTF-8.
 * @example
 * ```ts ignore
 * import { loadPipeline } from "./load.ts";
 * const plan = await loadPipeline("examples/energy/pipeline.yaml");
 * ```
 */
export async function loadPipeline(path: string, options: LoadOptions = {}): Promise<Plan> {
  const problem = (code: string, message: string): never => {
    throw new PipelineError([{ code, message, file: path, line: 1, col: 1 }]);
  };
  let bytes: Uint8Array;
  try {
    const info = await Deno.stat(path);
    if (info.isDirectory) problem("unreadable", "expected a pipeline file, got a directory");
    if (info.size > MAX_PIPELINE_BYTES) {
      problem("too_large", `expected a pipeline file of at most 5 MiB, got ${info.size} bytes`);
    }
    bytes = await Deno.readFile(path);
  } catch (error) {
    if (error instanceof PipelineError) throw error;
    const reason = error instanceof Deno.errors.NotFound
      ? "it does not exist"
      : (error as Error).message;
    return problem("unreadable", `cannot read the pipeline file: ${reason}`);
  }
  if (bytes.length > MAX_PIPELINE_BYTES) {
    problem("too_large", `expected a pipeline file of at most 5 MiB, got ${bytes.length} bytes`);
  }
  let source: string;
  try {
    source = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    const nul = bytes.indexOf(0);
    return problem(
      nul >= 0 ? "binary" : "invalid_utf8",
      nul >= 0
        ? "expected a text file, found a NUL byte (is this a binary file?)"
        : "expected UTF-8 text, found an invalid byte sequence",
    );
  }
  return parsePipeline(source, {
    file: path,
    baseDir: dirname(resolve(path)),
    backends: options.backends,
  });
}
