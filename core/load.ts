/**
 * Loading a pipeline file: source limits, YAML with positions, the zod
 * schema, cross-step checks, then planning. Every problem of the file is
 * collected and thrown at once as a `PipelineError`.
 *
 * The steps live in their own modules: `_read.ts` reads the file,
 * `_yaml.ts` parses it with positions (`_locator.ts` finds them by key
 * path), `validate.ts` checks it (`_zod_issues.ts` renders zod's issues,
 * `_did_you_mean.ts` suggests names, `_diagnostics.ts` collects the
 * problems) and `_fast_path.ts` takes a quicker road for large valid files.
 *
 * @module
 */

import { dirname, resolve } from "node:path";
import type { PipelineLimits } from "./limits.ts";
import type { Plan } from "./model.ts";
import type { SecretPolicy } from "./secrets.ts";
import { type CheckOptions, planValidated, validatePipeline } from "./validate.ts";
import { FAST_PATH_MIN_CHARS, parseFast } from "./_fast_path.ts";
import { readPipelineText } from "./_read.ts";
import { readYaml } from "./_yaml.ts";

export { didYouMean, editDistance } from "./_did_you_mean.ts";
export { MAX_DIAGNOSTICS } from "./_diagnostics.ts";
export { Locator } from "./_locator.ts";
export { MAX_ALIAS_COUNT, MAX_PIPELINE_BYTES } from "./_yaml.ts";
export {
  DEFAULT_PIPELINE_LIMITS,
  LIMIT_NAMES,
  MAX_DEPENDENCIES,
  MAX_MATRIX_LEGS,
  MAX_PLAN_BYTES,
  MAX_STEP_INSTANCES,
  parseLimit,
  type PipelineLimits,
  pipelineLimits,
} from "./limits.ts";

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
  /** Host paths deno steps may be granted here (see `CheckOptions.hostPaths`). */
  hostPaths?: CheckOptions["hostPaths"];
  /** What the operator declared of secrets (see `CheckOptions.secrets`); absent: local mode. */
  secrets?: SecretPolicy;
  /**
   * Limits on what the pipeline may expand to (matrix legs, step instances,
   * dependencies, plan size); each one not given keeps its default
   * ({@link DEFAULT_PIPELINE_LIMITS}).
   */
  limits?: Partial<PipelineLimits>;
  /** The run's parameter values as given (see `CheckOptions.params`). */
  params?: Record<string, unknown>;
}

/** Options of {@link loadPipeline}. */
export interface LoadOptions {
  /** Plugin backend names accepted besides the built-in ones. */
  backends?: string[];
  /** Host paths deno steps may be granted here (see `CheckOptions.hostPaths`). */
  hostPaths?: CheckOptions["hostPaths"];
  /** What the operator declared of secrets (see `CheckOptions.secrets`); absent: local mode. */
  secrets?: SecretPolicy;
  /** Limits on what the pipeline may expand to (see {@link ParseOptions.limits}). */
  limits?: Partial<PipelineLimits>;
  /** The run's parameter values as given (see {@link ParseOptions.params}). */
  params?: Record<string, unknown>;
}

/**
 * Parses, validates and plans a pipeline from its source text.
 *
 * @throws {PipelineError} listing every problem of the file.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parsePipeline } from "./load.ts";
 *
 * const plan = parsePipeline("name: hi\nsteps:\n  a: { run: echo hi }\n", { file: "p.yaml" });
 * assert.deepEqual(plan.order, ["a"]);
 * assert.equal(plan.steps.a.backend, "shell");
 * ```
 */
export function parsePipeline(source: string, options: ParseOptions): Plan {
  const resolved = { ...options, baseDir: options.baseDir ?? dirname(resolve(options.file)) };
  return (source.length >= FAST_PATH_MIN_CHARS ? parseFast(source, resolved) : undefined) ??
    parseLocated(source, resolved);
}

/**
 * Parses with a positioned YAML document: every problem with its line and
 * column, and exact step positions. {@link parsePipeline} uses it for files
 * under 64 KiB and for any file the fast path does not accept.
 *
 * @throws {PipelineError} listing every problem of the file.
 */
export function parseLocated(source: string, options: ParseOptions): Plan {
  const baseDir = options.baseDir ?? dirname(resolve(options.file));
  const { raw, reporter } = readYaml(source, options.file);
  const checks = {
    baseDir,
    backends: options.backends,
    readFile: options.readFile,
    hostPaths: options.hostPaths,
    secrets: options.secrets,
    limits: options.limits,
    params: options.params,
  };
  const pipeline = validatePipeline(raw, checks, reporter);
  const plan = pipeline &&
    planValidated(pipeline, { ...checks, file: options.file, source }, reporter);
  return plan ?? reporter.fail();
}

/**
 * Reads a pipeline file and parses it (see {@link parsePipeline}); module
 * paths resolve against the file's directory.
 *
 * @throws {PipelineError} also when the file is unreadable, too large, binary or not UTF-8.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { loadPipeline } from "./load.ts";
 *
 * const dir = await Deno.makeTempDir();
 * await Deno.writeTextFile(`${dir}/pipeline.yaml`, "name: hi\nsteps:\n  a: { run: echo hi }\n");
 * const plan = await loadPipeline(`${dir}/pipeline.yaml`);
 * assert.equal(plan.baseDir, await Deno.realPath(dir));
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function loadPipeline(path: string, options: LoadOptions = {}): Promise<Plan> {
  const source = await readPipelineText(path);
  return parsePipeline(source, {
    file: path,
    baseDir: dirname(resolve(path)),
    backends: options.backends,
    hostPaths: options.hostPaths,
    secrets: options.secrets,
    limits: options.limits,
    params: options.params,
  });
}
