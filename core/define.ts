/**
 * Pipelines defined in TypeScript: the object a YAML file would describe,
 * typed by the same zod schema, validated by the same checks and planned
 * into the same {@link Plan} — without YAML. Having no source text, its
 * problems are located by key path (`steps.analyze.needs[0]`).
 *
 * @module
 */

import { resolve } from "node:path";
import type { PipelineLimits } from "./limits.ts";
import type { Plan } from "./model.ts";
import { canonicalJson } from "./plan.ts";
import type { PipelineFile } from "./schema.ts";
import { type CheckOptions, planValidated, validatePipeline } from "./validate.ts";
import { describePath, joinPath, keyPath, Reporter } from "./_diagnostics.ts";
import { type PathSegment, unlocated } from "./_locator.ts";

/** Options of {@link definePipeline}. */
export interface DefineOptions {
  /** Directory relative `module:` paths resolve against; default `Deno.cwd()`. */
  baseDir?: string;
  /**
   * What diagnostics and `Plan.file` call the pipeline (it has no file);
   * default its `name`.
   */
  name?: string;
  /** Plugin backend names accepted besides the built-in ones. */
  backends?: string[];
  /** Host paths deno steps may be granted here (see `CheckOptions.hostPaths`). */
  hostPaths?: CheckOptions["hostPaths"];
  /** Limits on what the pipeline may expand to; each one not given keeps its default. */
  limits?: Partial<PipelineLimits>;
  /** The run's parameter values (see `CheckOptions.params`). */
  params?: Record<string, unknown>;
}

/**
 * Validates and plans a pipeline defined in code: the same schema, checks
 * and plan as `parsePipeline` gives for the same pipeline in YAML.
 * The plan is a copy: changing `pipeline` afterwards does not change it.
 *
 * @throws {PipelineError} listing every problem, each located by its key
 * path (`Diagnostic.path`) and naming the key and what was expected.
 * @example Define and plan a pipeline
 * ```ts
 * import assert from "node:assert/strict";
 * import { definePipeline } from "./define.ts";
 *
 * const plan = definePipeline({
 *   name: "report",
 *   steps: {
 *     generate: { run: "echo 42 > $RUNNEL_OUTPUT_DATA_TXT", outputs: ["data.txt"] },
 *     publish: { run: 'cat "$RUNNEL_INPUT_DATA"', inputs: { data: "generate/data.txt" } },
 *   },
 * });
 * assert.deepEqual(plan.order, ["generate", "publish"]);
 * assert.deepEqual(plan.steps.publish.needs, ["generate"]);
 * ```
 * @example Problems are located by key path
 * ```ts
 * import assert from "node:assert/strict";
 * import { definePipeline } from "./define.ts";
 * import { formatDiagnostic, PipelineError } from "./errors.ts";
 *
 * assert.throws(
 *   () => definePipeline({ name: "report", steps: { publish: { run: "true", needs: ["gen"] } } }),
 *   (error: unknown) => {
 *     assert.ok(error instanceof PipelineError);
 *     assert.equal(error.diagnostics[0].path, "steps.publish.needs[0]");
 *     assert.equal(
 *       formatDiagnostic(error.diagnostics[0]),
 *       'report: steps.publish.needs[0]: step "publish" needs unknown step "gen"',
 *     );
 *     return true;
 *   },
 * );
 * ```
 */
export function definePipeline(pipeline: PipelineFile, options: DefineOptions = {}): Plan {
  const given = pipeline as unknown as { name?: unknown } | null | undefined;
  const name = options.name ??
    (typeof given?.name === "string" && given.name !== "" ? given.name : "pipeline");
  const reporter = new Reporter(unlocated(name));
  const order = new Map<string, number>();
  const raw = jsonData(pipeline, [], { reporter, order, ancestors: [] });
  if (reporter.diagnostics.length === 0) {
    const checks = {
      baseDir: resolve(options.baseDir ?? Deno.cwd()),
      backends: options.backends,
      hostPaths: options.hostPaths,
      limits: options.limits,
      params: options.params,
    };
    const valid = validatePipeline(raw, checks, reporter);
    // The canonical JSON stands in for source text: equal definitions have equal digests.
    const plan = valid &&
      planValidated(valid, { ...checks, file: name, source: canonicalJson(raw) }, reporter);
    if (plan) return plan;
  }
  // In the order of the definition's keys, as a file's problems are in source order.
  const rank = (path = ""): number => {
    for (let at = path;; at = parentKeyPath(at)) {
      const found = order.get(at);
      if (found !== undefined || at === "") return found ?? 0;
    }
  };
  reporter.diagnostics.sort((a, b) => rank(a.path) - rank(b.path));
  return reporter.fail();
}

/** The key path of the mapping or list holding the last key of a path (`""` at the top). */
function parentKeyPath(path: string): string {
  const parent = path.replace(/(?:\.[^.[]+|\[[^[]*\])$/, "");
  return parent === path ? "" : parent;
}

/** What {@link jsonData} carries down the tree. */
interface Walk {
  reporter: Reporter;
  /** Each key path met, numbered in the order of the definition's keys. */
  order: Map<string, number>;
  /** The mappings and lists holding the current value (a cycle returns to one). */
  ancestors: object[];
}

/**
 * A copy of `value` as JSON data — what a YAML file could have said — with
 * `undefined` members left out (an optional key not given). Anything else
 * (a function, a class instance, a cycle, a number JSON cannot hold) is
 * reported at its key path: a plan is persisted as JSON.
 */
function jsonData(value: unknown, path: PathSegment[], walk: Walk): unknown {
  const { reporter, order, ancestors } = walk;
  order.set(keyPath(path), order.size);
  const wrong = (got: string): undefined => {
    const named = path.findLastIndex((p) => typeof p === "string");
    const key = named < 0 ? "" : joinPath(path.slice(named));
    const where = describePath(path.slice(0, Math.max(0, named)));
    const expected = "JSON data (a string, number, boolean, null, list or mapping)";
    const message = path.length === 0
      ? `expected a mapping at the top level, got ${got}`
      : `expected ${expected} for "${key}" ${where}, got ${got}`;
    reporter.at("invalid_type", message, path, { key: key || undefined, expected });
    return undefined;
  };
  switch (typeof value) {
    case "string":
    case "boolean":
      return value;
    case "number":
      return Number.isFinite(value) ? value : wrong(`number ${value}`);
    case "undefined":
      return wrong("undefined");
    case "object": {
      if (value === null) return null;
      if (ancestors.includes(value)) return wrong("a reference to a mapping or list it is in");
      if (Array.isArray(value)) {
        const inner = { ...walk, ancestors: [...ancestors, value] };
        return value.map((item, i) => jsonData(item, [...path, i], inner));
      }
      const prototype = Object.getPrototypeOf(value);
      if (prototype !== Object.prototype && prototype !== null) {
        return wrong(`an instance of ${prototype?.constructor?.name ?? "a class"}`);
      }
      const inner = { ...walk, ancestors: [...ancestors, value] };
      const copy: Record<string, unknown> = {};
      for (const [key, item] of Object.entries(value)) {
        if (item !== undefined) copy[key] = jsonData(item, [...path, key], inner);
      }
      return copy;
    }
    default:
      return wrong(`a ${typeof value}`);
  }
}
