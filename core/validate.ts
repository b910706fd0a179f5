/**
 * Validation of a pipeline, whether it was written in YAML or built in
 * code: the zod schema, then the checks that span steps (backends,
 * references, conditions, matrices, the graph), then planning. Problems are
 * collected in a {@link Reporter}, which locates them by line and column or
 * by key path, so one file reports every problem at once.
 *
 * @module
 */

import { VALUE_REFERENCE } from "./values.ts";
import { basename, dirname, isAbsolute, relative, resolve } from "node:path";
import { parse as parseYaml } from "npm:yaml@2.9.1";
import type { z } from "npm:zod@4.6.7";
import { ConditionSyntaxError, parseCondition } from "./expr.ts";
import { checkPipelineSize, type PipelineLimits, pipelineLimits } from "./limits.ts";
import type { Plan } from "./model.ts";
import {
  expandMatrix,
  fansIn,
  foreachRef,
  inferBackend,
  mayMention,
  outputNames,
  planPipeline,
  type StepEdges,
  stepEdges,
  stepJson,
  subPipelineConfig,
} from "./plan.ts";
import { ITEM_REFERENCE } from "./fanout.ts";
import {
  BUILTIN_BACKENDS,
  PIPELINE_BACKEND,
  type PipelineFile,
  PipelineSchema,
  type StepFile,
  StepSchema,
} from "./schema.ts";
import { didYouMean } from "./_did_you_mean.ts";
import { type Reporter, typeName } from "./_diagnostics.ts";
import type { PathSegment } from "./_locator.ts";
import { reportZodIssues } from "./_zod_issues.ts";
import { applyParams, checkDeclarations, checkReferences, resolveParams } from "./params.ts";
import { scheduleProblem, scheduleSpec } from "./schedule.ts";
import type { SecretPolicy } from "./secrets.ts";

/** Keys that tell a step's backend. */
const BACKEND_KEYS = ["backend", "module", "image", "build", "host", "run"];
/** Keys each built-in backend requires (docker: `image` unless it has `build`). */
const REQUIRED_KEYS: Record<string, string[]> = {
  deno: ["module"],
  shell: ["run"],
  ssh: ["host", "run"],
  kubernetes: ["image"],
};
/** The needs of a step that has none. */
const NO_NEEDS: readonly string[] = Object.freeze([]);
/** Options of `Positions.at` for a key's own position. */
const ON_KEY = Object.freeze({ key: true });
/** The keys dropped of a step that validated. */
const NONE_DROPPED: ReadonlySet<string> = new Set();

/** Options of the checks of {@link validatePipeline} and {@link checkSteps}. */
export interface CheckOptions {
  /** Absolute directory module paths resolve against. */
  baseDir: string;
  /** Plugin backend names accepted besides the built-in ones. */
  backends?: string[];
  /**
   * Reads a step module by absolute path; default the filesystem. Returns
   * undefined for a missing file.
   */
  readFile?: (path: string) => Uint8Array | undefined;
  /**
   * Host paths outside the pipeline directory that deno steps may be
   * granted here (the runner's policy: `policy.deno.read` and `write` of the
   * agent config). Any other absolute path, or a `..` leaving the pipeline
   * directory, under a deno step's `permissions.read` or `write` is an error.
   */
  hostPaths?: { read?: string[]; write?: string[] };
  /**
   * What the operator declared of secrets: the names a pipeline may use,
   * and whether it may read env vars and files itself. Absent: any name,
   * and env and file references (local mode).
   */
  secrets?: SecretPolicy;
  /** Limits on what the pipeline may expand to; default `DEFAULT_PIPELINE_LIMITS`. */
  limits?: Partial<PipelineLimits>;
  /**
   * The run's parameter values as given (`--param`, a params file, an API
   * body): checked against the `params` section, defaults applied. Absent:
   * no run is being started (`validate`), so required ones may be missing.
   */
  params?: Record<string, unknown>;
}

/**
 * Validates a parsed pipeline against the schema and the cross-step checks,
 * reporting every problem. Returns the typed pipeline when it has none.
 */
export function validatePipeline(
  raw: unknown,
  options: CheckOptions,
  reporter: Reporter,
): PipelineFile | undefined {
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) {
    reporter.at("invalid_type", `expected a mapping at the top level, got ${typeName(raw)}`, []);
    return undefined;
  }
  const before = reporter.diagnostics.length;
  const parsed = PipelineSchema.safeParse(raw);
  if (!parsed.success) reportZodIssues(parsed.error.issues, raw, reporter);
  const view = parsed.success ? viewOf(parsed.data) : salvageView(raw as Record<string, unknown>);
  const edges = checkSteps(view, options, reporter);
  if (!parsed.success || reporter.diagnostics.length !== before) return undefined;
  checkedEdges.set(parsed.data, edges);
  return parsed.data;
}

/** The graph {@link checkSteps} built of each pipeline it passed, for planning to reuse. */
const checkedEdges = new WeakMap<PipelineFile, StepEdges>();

/** The view of a pipeline that passed the schema. */
export function viewOf(pipeline: PipelineFile): PipelineView {
  // A loop, not `new Map(Object.entries(…))`: no pair array per step.
  const steps = new Map<string, StepFile>();
  for (const name of Object.keys(pipeline.steps)) steps.set(name, pipeline.steps[name]);
  return {
    steps,
    secrets: new Set(Object.keys(pipeline.secrets ?? {})),
    secretRefs: pipeline.secrets,
    startNode: pipeline.start_node,
    defaultBackend: pipeline.defaults?.backend,
    inheritedSize: inheritedSize(pipeline.defaults, pipeline.selector),
  };
}

/** Characters every step instance inherits from the `defaults` block and the selector. */
function inheritedSize(defaults: unknown, selector: unknown): number {
  return JSON.stringify({ defaults, selector }).length;
}

/** Options of {@link planValidated}. */
export interface PlanValidatedOptions extends CheckOptions {
  /** Path of the file as the user named it (or the name of a pipeline defined in code). */
  file: string;
  /** Source text, hashed into `Plan.digest`. */
  source: string;
  /** The steps' graph as {@link checkSteps} returned it (default: the one it built, or a new one). */
  edges?: StepEdges;
}

/**
 * Plans a validated pipeline. The problems only planning finds (unknown
 * matrix keys after interpolation, modules that cannot be read) are
 * reported, and then undefined is returned.
 */
export function planValidated(
  pipeline: PipelineFile,
  options: PlanValidatedOptions,
  reporter: Reporter,
): Plan | undefined {
  const positions = reporter.positions;
  const problems = [
    ...checkDeclarations(pipeline.params ?? {}),
    ...checkReferences(pipeline),
  ];
  const { values, problems: valueProblems } = resolveParams(
    pipeline.params ?? {},
    options.params,
  );
  problems.push(...valueProblems);
  if (pipeline.schedule) {
    const wrong = scheduleProblem(pipeline.schedule);
    if (wrong) {
      problems.push({
        code: "invalid_schedule",
        message: wrong.message,
        path: ["schedule", wrong.key],
        key: wrong.key,
      });
    }
    // The values its runs are started with, checked as a trigger's are.
    const logical = pipeline.schedule["logical-date-param"];
    if (logical !== undefined && pipeline.params?.[logical]?.type !== "string") {
      problems.push({
        code: "invalid_schedule",
        message: `schedule: "logical-date-param" names "${logical}", which is not a string ` +
          `parameter of the pipeline`,
        path: ["schedule", "logical-date-param"],
        key: "logical-date-param",
      });
    }
    const scheduled = resolveParams(pipeline.params ?? {}, {
      ...pipeline.schedule.params,
      ...(logical !== undefined && pipeline.params?.[logical]
        ? { [logical]: new Date(0).toISOString() }
        : {}),
    });
    for (const problem of scheduled.problems) {
      problems.push({
        ...problem,
        message: `schedule: ${problem.message}`,
        path: problem.code === "unknown_param" ? ["schedule", "params"] : problem.path,
      });
    }
  }
  for (const problem of problems) {
    reporter.at(problem.code, problem.message, problem.path, {
      key: problem.key,
      ...(problem.expected ? { expected: problem.expected } : {}),
    });
  }
  if (problems.length > 0) return undefined;
  const planned = planPipeline(applyParams(pipeline, values), {
    file: options.file,
    baseDir: options.baseDir,
    source: options.source,
    readFile: options.readFile,
    locate: (path) => {
      const { line, col } = positions.at(path, ON_KEY);
      return { file: options.file, line, col };
    },
    edges: options.edges ?? checkedEdges.get(pipeline),
  });
  if ("plan" in planned) {
    if (pipeline.params) planned.plan.params = values;
    if (pipeline.schedule) planned.plan.schedule = scheduleSpec(pipeline.schedule);
    if (pipeline.webhook) planned.plan.webhookSecret = pipeline.webhook.secret;
    return planned.plan;
  }
  for (const d of planned.diagnostics) {
    reporter.at(d.code, d.message, d.path, { onKey: d.onKey, key: d.key });
  }
  return undefined;
}

/**
 * What the cross-step checks see: every step of a valid pipeline, or, when
 * parts of it failed validation, what could be salvaged of them.
 */
export interface PipelineView {
  steps: Map<string, StepFile | undefined>;
  /** Steps whose `outputs` did not validate, so inputs naming them are not checked. */
  uncertainOutputs?: Set<string>;
  /** Keys of each step that did not validate (checks depending on them are skipped). */
  droppedKeys?: Map<string, Set<string>>;
  secrets?: Set<string>;
  /** The pipeline's secrets as written: env name → operator name, or (local) env var or file. */
  secretRefs?: PipelineFile["secrets"];
  startNode?: string;
  defaultBackend?: string;
  /** Characters every step instance inherits (see {@link checkPipelineSize}). */
  inheritedSize?: number;
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

/** The view of a pipeline that failed validation: what could be salvaged of each step. */
export function salvageView(raw: Record<string, unknown>): PipelineView {
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
    secretRefs: secrets.success ? secrets.data : undefined,
    startNode: start.success ? start.data : undefined,
    defaultBackend: defaults?.backend,
    inheritedSize: inheritedSize(raw.defaults, raw.selector),
  };
}

/**
 * The checks zod cannot make because they span steps or reach outside the
 * pipeline: each step's backend is known and has its required keys, a deno
 * step's module exists, every `needs`, `next_node`, input, secret and
 * `start_node` names something declared, conditions parse, matrices expand,
 * and the graph has no cycle and no step unreachable from `start_node`.
 * Returns the steps' graph (for planning to reuse).
 */
export function checkSteps(
  view: PipelineView,
  options: CheckOptions,
  reporter: Reporter,
): StepEdges {
  // The steps' names, for suggestions; no list or set of them (a file may have 100,000).
  const names: Iterable<string> = { [Symbol.iterator]: () => view.steps.keys() };
  const known = view.steps;
  const backends = new Set<string>([...BUILTIN_BACKENDS, ...(options.backends ?? [])]);
  let reportedDefaultBackend = false;
  // Exit handlers constrain the steps around them; without one there is nothing to check.
  let handlers = false;
  for (const step of view.steps.values()) handlers ||= step?.handler !== undefined;
  // Before anything expands a matrix: a small file can describe a million legs.
  // One graph for every check that follows edges (sizes, cycles, value references).
  const edges = stepEdges(view.steps);
  const sized = checkPipelineSize(view.steps, {
    limits: pipelineLimits(options.limits),
    inheritedSize: view.inheritedSize,
    edges,
  }, reporter);
  for (const [name, step] of view.steps) {
    if (!step) continue;
    const at = (...path: PathSegment[]) => ["steps", name, ...path];
    const dropped = view.droppedKeys?.get(name) ?? NONE_DROPPED;
    const backend = step.pipeline !== undefined
      ? PIPELINE_BACKEND
      : step.backend ?? view.defaultBackend ?? inferBackend(step);
    if (step.pipeline !== undefined) {
      // Run by the drivers themselves; checked by checkSubPipeline.
    } else if (dropped.size > 0 && BACKEND_KEYS.some((k) => dropped.has(k))) {
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
      const required = backend === "docker"
        ? (step.build === undefined ? ["image"] : [])
        : REQUIRED_KEYS[backend] ?? [];
      for (const key of required) {
        if (step[key as keyof StepFile] === undefined) {
          reporter.at(
            "missing_key",
            `missing required key "${key}" in step "${name}" (backend ${backend})`,
            at(),
            { onKey: true, key, keyPath: at(key) },
          );
        }
      }
      if (backend === "deno") checkDenoPaths(name, step, options, reporter);
      if (backend === "ssh") {
        for (const key of ["passphrase-secret", "password-secret"] as const) {
          const secret = step[key];
          if (typeof secret === "string" && !(step.secrets ?? []).includes(secret)) {
            reporter.at(
              "unknown_secret",
              `step "${name}" takes its ${key.split("-")[0]} from secret "${secret}", ` +
                `which is not one of its secrets`,
              at(key),
              { key, expected: `a name listed in the step's "secrets"` },
            );
          }
        }
      }
      if (
        backend === "deno" && step.module !== undefined && !step.module.includes("${{") &&
        !leavesDir(step.module, options.baseDir)
      ) {
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
      ? NO_NEEDS
      : Array.isArray(step.needs)
      ? step.needs
      : [step.needs];
    for (let i = 0; i < needs.length; i++) {
      const need = needs[i];
      if (!known.has(need)) {
        const path = Array.isArray(step.needs) ? at("needs", i) : at("needs");
        reporter.at("unknown_step", `step "${name}" needs unknown step "${need}"`, path, {
          key: "needs",
          hint: didYouMean(need, names),
        });
      }
    }
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
    for (const [input, ref] of step.inputs === undefined ? [] : Object.entries(step.inputs)) {
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
        source && !view.uncertainOutputs?.has(from) && !outputNames(source).includes(output)
      ) {
        reporter.at(
          "unknown_output",
          `input "${input}" of step "${name}" names output "${output}" that step "${from}" does not declare`,
          at("inputs", input),
          {
            key: input,
            expected: outputNames(source).join(", "),
            hint: didYouMean(output, outputNames(source)),
          },
        );
      }
    }
    if (view.secrets && step.secrets !== undefined) {
      step.secrets.forEach((secret, i) => {
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
          reporter.positions.inString(at("when"), error.offset),
          { key: "when", path: at("when") },
        );
      }
    }
    if (step.matrix) checkMatrix(name, step.matrix, reporter, sized);
    checkFanOut(name, step, view, reporter);
    if (handlers) checkHandler(name, step, view, reporter);
    if (step.pipeline !== undefined) {
      checkSubPipeline(name, step, { ...options, file: reporter.positions.file }, reporter);
    }
  }
  if (view.startNode !== undefined && !known.has(view.startNode)) {
    reporter.at("unknown_step", `"start_node" names unknown step "${view.startNode}"`, [
      "start_node",
    ], {
      key: "start_node",
      hint: didYouMean(view.startNode, names),
    });
  }
  if (options.secrets) checkSecretRefs(view, options.secrets, reporter);
  checkGraph(view, edges, reporter);
  checkValueRefs(view, edges, reporter);
  return edges;
}

/** Most pipelines deep a chain of `pipeline:` steps may go. */
const MAX_SUB_PIPELINE_DEPTH = 16;

/**
 * A `pipeline:` step runs a child: a file inside the pipeline directory
 * (that exists), or a registered name, never both; its outputs are the
 * ones it maps; and no chain of files leads back to a file on it.
 */
function checkSubPipeline(
  name: string,
  step: StepFile,
  options: CheckOptions & { file?: string },
  reporter: Reporter,
): void {
  const at = (...path: PathSegment[]) => ["steps", name, "pipeline", ...path];
  const sub = step.pipeline!;
  const config = subPipelineConfig(step);
  for (const key of ["run", "module", "image", "build", "host", "outputs"] as const) {
    if (step[key] === undefined) continue;
    reporter.at(
      "pipeline_step_key",
      key === "outputs"
        ? `step "${name}" runs a pipeline: its outputs are the keys of pipeline.outputs`
        : `step "${name}" runs a pipeline and cannot also have "${key}"`,
      ["steps", name, key],
      {
        key,
        onKey: true,
        hint: key === "outputs" ? 'map them: outputs: { out.csv: "step/out.csv" }' : undefined,
      },
    );
  }
  if ((config.file === undefined) === (config.name === undefined)) {
    reporter.at(
      "pipeline_ref",
      `step "${name}" runs a pipeline: give exactly one of "file" or "name"`,
      at(),
      { key: "pipeline", onKey: true },
    );
    return;
  }
  if (config.file === undefined || config.file.includes("${{")) return;
  const path = typeof sub === "string" ? at() : at("file");
  if (leavesDir(config.file, options.baseDir)) {
    reporter.at(
      "path_escape",
      `pipeline "${config.file}" of step "${name}" is outside the pipeline directory`,
      path,
      { key: "pipeline", expected: "a path inside the pipeline directory, like ./child.yaml" },
    );
    return;
  }
  const root = options.file === undefined
    ? undefined
    : resolve(options.baseDir, basename(options.file));
  const start = resolve(options.baseDir, config.file);
  // Depth-first over the files the child runs in turn.
  const chain: string[] = [];
  const visit = (file: string): string | undefined => {
    if (file === root || chain.includes(file)) {
      return [...chain, file].map((f) => relative(options.baseDir, f) || basename(f)).join(" → ");
    }
    if (chain.length >= MAX_SUB_PIPELINE_DEPTH) return undefined;
    let text: string;
    try {
      const bytes = options.readFile ? options.readFile(file) : Deno.readFileSync(file);
      if (bytes === undefined) throw new Deno.errors.NotFound(file);
      text = new TextDecoder().decode(bytes);
    } catch (error) {
      if (chain.length === 0) throw error;
      return undefined;
    }
    chain.push(file);
    for (const child of childFiles(text)) {
      const cycle = visit(resolve(dirname(file), child));
      if (cycle) return cycle;
    }
    chain.pop();
    return undefined;
  };
  try {
    const cycle = visit(start);
    if (cycle) {
      reporter.at(
        "pipeline_cycle",
        `step "${name}" runs pipeline "${config.file}", which leads back: ${
          root ? `${basename(root)} → ` : ""
        }${cycle}`,
        path,
        { key: "pipeline", hint: "a pipeline cannot run itself, directly or not" },
      );
    }
  } catch {
    reporter.at(
      "missing_pipeline",
      `pipeline "${config.file}" of step "${name}" does not exist or cannot be read ` +
        `(looked for ${start})`,
      path,
      { key: "pipeline" },
    );
  }
}

/** The files a pipeline's `pipeline:` steps run (read leniently: the file is validated when it runs). */
function childFiles(text: string): string[] {
  let doc: unknown;
  try {
    doc = parseYaml(text, { maxAliasCount: 100 });
  } catch {
    return [];
  }
  const steps = (doc as { steps?: unknown })?.steps;
  if (!steps || typeof steps !== "object") return [];
  const files: string[] = [];
  for (const step of Object.values(steps as Record<string, unknown>)) {
    const sub = (step as { pipeline?: unknown })?.pipeline;
    const file = typeof sub === "string" ? sub : (sub as { file?: unknown })?.file;
    if (typeof file === "string" && !file.includes("${{")) files.push(file);
  }
  return files;
}

/**
 * An exit handler (`handler:`) runs after every other step: it says no
 * `needs` of its own, and nothing needs it or reads its outputs.
 */
function checkHandler(name: string, step: StepFile, view: PipelineView, reporter: Reporter): void {
  if (step.handler !== undefined && (step.needs !== undefined || step.next_node !== undefined)) {
    const key = step.needs !== undefined ? "needs" : "next_node";
    reporter.at(
      "handler_needs",
      `step "${name}" is an exit handler: it already waits for every other step, so it has no ${key}`,
      ["steps", name, key],
      { key, onKey: true, hint: `remove ${key}` },
    );
  }
  const needs = step.needs === undefined
    ? []
    : Array.isArray(step.needs)
    ? step.needs
    : [step.needs];
  const refs: Array<[string, PathSegment[]]> = needs.map((need, i) => [
    need,
    Array.isArray(step.needs) ? ["needs", i] : ["needs"],
  ]);
  for (const [input, ref] of Object.entries(step.inputs ?? {})) {
    refs.push([ref.split("/")[0], ["inputs", input]]);
  }
  for (const [other, path] of refs) {
    if (other === name || view.steps.get(other)?.handler === undefined) continue;
    reporter.at(
      "needs_handler",
      `step "${name}" needs exit handler "${other}", which runs only after every other step`,
      ["steps", name, ...path],
      { key: String(path.at(-1)), hint: "make it a handler too, or drop the dependency" },
    );
  }
}

/**
 * `batch:` and `foreach:` (dynamic fan-out, `fanout.ts`): one way to fan
 * out per step, a batch of an input the step has, split in exactly one
 * way that fits the input (a directory input only by `files`), a list an
 * upstream step declares, and `${{ item }}` only where there are items.
 */
function checkFanOut(
  name: string,
  step: StepFile,
  view: PipelineView,
  reporter: Reporter,
): void {
  const at = (...path: PathSegment[]) => ["steps", name, ...path];
  const { batch, foreach, matrix } = step;
  // Two ways of fanning out take a batch or a foreach.
  const kinds = batch || foreach
    ? [matrix && "matrix", batch && "batch", foreach && "foreach"].filter(Boolean)
    : [];
  if (kinds.length > 1) {
    reporter.at(
      "fan_out_conflict",
      `step "${name}" has both ${kinds.join(" and ")}: a step fans out one way`,
      at(batch ? "batch" : "foreach"),
      { key: batch ? "batch" : "foreach", onKey: true, hint: "use a second step" },
    );
    return;
  }
  if (!foreach && mayMention(step, "${{") && stepJson(step).match(ITEM_REFERENCE)) {
    reporter.at(
      "unknown_item",
      `step "${name}" reads \${{ item }}, which only a step with foreach: has`,
      at(),
      { key: name, onKey: true, hint: "add foreach: STEP/OUTPUT naming a JSON list" },
    );
  }
  if (batch) {
    const ways = (["lines", "bytes", "items", "records", "count", "files"] as const).filter((k) =>
      batch[k] !== undefined
    );
    if (ways.length !== 1) {
      reporter.at(
        "batch_way",
        ways.length === 0
          ? `batch of step "${name}" does not say how to split: give one of lines, bytes, ` +
            "items, records, count or files"
          : `batch of step "${name}" splits by ${ways.join(" and ")}: give exactly one`,
        at("batch"),
        {
          key: "batch",
          onKey: true,
          expected: "one of lines, bytes, items, records, count, files",
        },
      );
    }
    if (batch.header !== undefined && batch.lines === undefined) {
      reporter.at(
        "batch_header",
        `batch of step "${name}" has header: but does not split by lines`,
        at("batch", "header"),
        { key: "header", onKey: true },
      );
    }
    const ref = step.inputs?.[batch.input];
    if (ref === undefined) {
      const inputs = Object.keys(step.inputs ?? {});
      reporter.at(
        "unknown_input",
        `batch of step "${name}" splits input "${batch.input}", which the step does not have`,
        at("batch", "input"),
        {
          key: "input",
          expected: inputs.length > 0 ? inputs.join(", ") : "an input declared under inputs:",
          hint: didYouMean(batch.input, inputs),
        },
      );
    } else {
      const source = view.steps.get(ref.split("/")[0]);
      const directory = fansIn(source);
      if (directory && !batch.files) {
        reporter.at(
          "batch_directory",
          `batch of step "${name}" splits input "${batch.input}", a directory with one entry ` +
            `per leg of step "${ref.split("/")[0]}": only files: true splits a directory`,
          at("batch", "input"),
          { key: "input", hint: "write files: true for one leg per file" },
        );
      } else if (!directory && source && batch.files) {
        reporter.at(
          "batch_files",
          `batch of step "${name}" has files: true, but input "${batch.input}" is one file`,
          at("batch", "files"),
          { key: "files", onKey: true, hint: "split it by lines, bytes, items, records or count" },
        );
      }
    }
  }
  if (foreach) {
    const ref = foreachRef(step)!;
    const path = typeof foreach === "string" ? at("foreach") : at("foreach", "input");
    const [from, output] = ref.split("/");
    const source = view.steps.get(from);
    const names = [...view.steps.keys()];
    if (!view.steps.has(from)) {
      reporter.at("unknown_step", `foreach of step "${name}" names unknown step "${from}"`, path, {
        key: "foreach",
        hint: didYouMean(from, names),
      });
    } else if (
      source && !view.uncertainOutputs?.has(from) && !outputNames(source).includes(output)
    ) {
      reporter.at(
        "unknown_output",
        `foreach of step "${name}" names output "${output}" that step "${from}" does not declare`,
        path,
        {
          key: "foreach",
          expected: outputNames(source).join(", "),
          hint: didYouMean(output, outputNames(source)),
        },
      );
    } else if (fansIn(source)) {
      reporter.at(
        "foreach_directory",
        `foreach of step "${name}" reads "${ref}", a directory with one entry per leg of ` +
          `step "${from}": foreach reads one JSON list`,
        path,
        { key: "foreach", hint: "have one step write the list" },
      );
    }
  }
}

/**
 * A deno step's paths stay in its pipeline directory: its module always,
 * its `permissions.read` and `write` unless the runner's policy allows the
 * host path ({@link CheckOptions.hostPaths}). Interpolated paths are left
 * to the agent, which checks every attempt again.
 */
function checkDenoPaths(
  name: string,
  step: StepFile,
  options: CheckOptions,
  reporter: Reporter,
): void {
  const at = (...path: PathSegment[]) => ["steps", name, ...path];
  if (
    step.module !== undefined && !step.module.includes("${{") &&
    leavesDir(step.module, options.baseDir)
  ) {
    reporter.at(
      "path_escape",
      `module "${step.module}" of step "${name}" is outside the pipeline directory`,
      at("module"),
      {
        key: "module",
        expected: "a path inside the pipeline directory, like ./steps/analyze.ts",
      },
    );
  }
  for (const kind of ["read", "write"] as const) {
    (step.permissions?.[kind] ?? []).forEach((path, i) => {
      if (path.includes("${{") || !leavesDir(path, options.baseDir)) return;
      const hostPath = resolve(options.baseDir, path);
      if ((options.hostPaths?.[kind] ?? []).some((root) => isInside(hostPath, resolve(root)))) {
        return;
      }
      reporter.at(
        "path_escape",
        `deno ${kind} path "${path}" of step "${name}" is outside the pipeline directory`,
        at("permissions", kind, i),
        {
          key: kind,
          expected: "a path relative to the pipeline directory, without a leading / or ..",
          hint: `an operator allows a host path with policy.deno.${kind} in the agent config`,
        },
      );
    });
  }
}

/** Whether a pipeline path is absolute or leaves `baseDir` through `..`. */
function leavesDir(path: string, baseDir: string): boolean {
  return isAbsolute(path) || !isInside(resolve(baseDir, path), resolve(baseDir));
}

/** Whether `path` is `dir` or lies below it (both absolute and normalised). */
function isInside(path: string, dir: string): boolean {
  return path === dir || path.startsWith(dir.endsWith("/") ? dir : `${dir}/`);
}

/**
 * The pipeline's secrets name only what the operator declared (when the
 * names are known), and read no env var or file of the runner unless the
 * user is the operator (local mode).
 */
function checkSecretRefs(view: PipelineView, policy: SecretPolicy, reporter: Reporter): void {
  const declared = policy.names ? new Set(policy.names) : undefined;
  for (const [env, ref] of Object.entries(view.secretRefs ?? {})) {
    if (typeof ref === "string") {
      if (declared && !declared.has(ref)) {
        reporter.at(
          "undeclared_secret",
          `secret "${env}" names "${ref}", which the operator did not declare`,
          ["secrets", env],
          {
            key: env,
            expected: [...declared].sort().join(", ") || "a declared secret (none are)",
            hint: didYouMean(ref, declared) ??
              "ask the operator to declare it (runnel server --secrets FILE, or an agent " +
                "config's secrets:)",
          },
        );
      }
    } else if (policy.allowSources === false) {
      const [kind, where] = "env" in ref ? ["env var", ref.env] : ["file", ref.file];
      reporter.at(
        "secret_source_refused",
        `secret "${env}" reads ${kind} "${where}" of the server or agent: a cluster resolves ` +
          "only secrets its operator declared",
        ["secrets", env],
        {
          key: env,
          hint: `have the operator declare it (runnel server --secrets FILE, or an agent ` +
            `config's secrets:) and write ${env}: <its name>`,
        },
      );
    }
  }
}

/** Why a module path cannot be used, or undefined if it is a readable file. */
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

/**
 * A matrix's values have the right types and expand to at least one leg
 * (expanded only when `expand`: the pipeline keeps its size limits).
 */
function checkMatrix(
  name: string,
  matrix: Record<string, unknown[]>,
  reporter: Reporter,
  expand: boolean,
): void {
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
  if (
    valid && expand && expandMatrix(matrix as Parameters<typeof expandMatrix>[0]).length === 0
  ) {
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

/** No cycle among the steps, and every step reachable from `start_node` when there is one. */
/**
 * `${{ steps.X.values.NAME }}` in a step's strings reads what X published:
 * X must be a step it depends on (through `needs` or inputs, transitively).
 */
function checkValueRefs(view: PipelineView, edges: StepEdges, reporter: Reporter): void {
  const steps = view.steps;
  let mentioned = false;
  for (const step of steps.values()) {
    if (step && mayMention(step, ".values.") && stepJson(step).includes(".values.")) {
      mentioned = true;
      break;
    }
  }
  if (!mentioned) return;
  const { needs, names, index } = edges;
  const ancestors = (name: string): Set<string> => {
    const seen = new Set<number>();
    const stack = [...needs[index.get(name)!]];
    while (stack.length > 0) {
      const next = stack.pop()!;
      if (seen.has(next)) continue;
      seen.add(next);
      for (const need of needs[next]) stack.push(need);
    }
    return new Set([...seen].map((i) => names[i]));
  };
  for (const [name, step] of steps) {
    if (!step) continue;
    let upstream: Set<string> | undefined;
    const visit = (value: unknown, path: PathSegment[]): void => {
      if (typeof value === "string") {
        if (!value.includes("${{")) return;
        for (const match of value.matchAll(VALUE_REFERENCE)) {
          upstream ??= ancestors(name);
          if (upstream.has(match[1])) continue;
          reporter.at(
            "unknown_value",
            `step "${name}" reads a value of step "${match[1]}", which ${
              steps.has(match[1]) ? "it does not depend on (add it to needs)" : "does not exist"
            }`,
            ["steps", name, ...path],
            { key: String(path.at(-1)), expected: "a value of a step it needs" },
          );
        }
      } else if (Array.isArray(value)) {
        value.forEach((item, i) => visit(item, [...path, i]));
      } else if (value && typeof value === "object") {
        for (const [key, item] of Object.entries(value)) visit(item, [...path, key]);
      }
    };
    for (const [key, value] of Object.entries(step)) {
      if (key !== "when") visit(value, [key]);
    }
  }
}

function checkGraph(view: PipelineView, edges: StepEdges, reporter: Reporter): void {
  const { names, needs, dependents } = edges;
  // Kahn on step numbers; whatever is left over sits on or behind a cycle.
  const pending = needs.map((list) => list.length);
  const queue: number[] = [];
  for (let i = 0; i < names.length; i++) if (pending[i] === 0) queue.push(i);
  for (let q = 0; q < queue.length; q++) {
    for (const dependent of dependents[queue[q]]) {
      if (--pending[dependent] === 0) queue.push(dependent);
    }
  }
  if (queue.length < names.length) {
    const start = pending.findIndex((left) => left > 0);
    const seen = new Map<number, number>();
    const walk: number[] = [];
    let current = start;
    while (!seen.has(current)) {
      seen.set(current, walk.length);
      walk.push(current);
      current = needs[current].find((n) => pending[n] > 0)!;
    }
    const cycle = walk.slice(seen.get(current)!).reverse().map((i) => names[i]);
    cycle.push(cycle[0]);
    const first = cycle.at(-2)!;
    reporter.at("cycle", `cycle between steps: ${cycle.join(" → ")}`, ["steps", first], {
      onKey: true,
      hint: "remove one of these needs",
    });
  }
  if (view.startNode !== undefined && view.steps.has(view.startNode)) {
    const startIndex = edges.index.get(view.startNode)!;
    const reachedIndex = new Set([startIndex]);
    const stack = [startIndex];
    while (stack.length > 0) {
      for (const next of dependents[stack.pop()!]) {
        if (!reachedIndex.has(next)) {
          reachedIndex.add(next);
          stack.push(next);
        }
      }
    }
    const reached = new Set([...reachedIndex].map((i) => names[i]));
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
