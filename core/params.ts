/**
 * Run parameters: a pipeline's `params:` section declares them (type,
 * default, required), a run gives their values (`--param k=v`, a params
 * file, the API, the library), and `${{ params.name }}` uses them in the
 * strings a step takes.
 *
 * A parameter is data, never code: in a step's `run` script the reference
 * becomes `${RUNNEL_PARAM_NAME}`, an env var the step is given, so a value
 * like `; rm -rf /` is never spliced into the script text (GitHub Actions'
 * script-injection lesson); write it in double quotes as any variable.
 * Everywhere else (env values, args, image, selector values, matrix
 * values) the value itself is substituted.
 *
 * @module
 */

import { mayMention } from "./plan.ts";
import type { PipelineFile } from "./schema.ts";

/** A parameter's value once checked against its declaration. */
export type ParamValue = string | number | boolean;

/** A parameter as the `params:` section declares it. */
export interface ParamSpec {
  type: "string" | "number" | "boolean" | "enum";
  values?: Array<string | number>;
  default?: ParamValue;
  description?: string;
  required?: boolean;
}

/** `${{ params.name }}`, the name captured. */
export const PARAM_REFERENCE = /\$\{\{\s*params\.([A-Za-z][A-Za-z0-9_]*)\s*\}\}/g;

/** The env var a step's `run` reads a parameter from. */
export function paramEnvName(name: string): string {
  return `RUNNEL_PARAM_${name.toUpperCase()}`;
}

/** A problem with a path in the pipeline file (located by the caller). */
export interface ParamProblem {
  code: string;
  message: string;
  path: Array<string | number>;
  key?: string;
  expected?: string;
}

/** What a value given as text or JSON is, for the declared type; or why it is not. */
export function coerceParam(
  name: string,
  spec: ParamSpec,
  given: unknown,
): { value: ParamValue } | { problem: string } {
  const shown = typeof given === "string" ? `"${given}"` : JSON.stringify(given);
  switch (spec.type) {
    case "string":
      if (typeof given === "string") return { value: given };
      if (typeof given === "number" || typeof given === "boolean") return { value: String(given) };
      break;
    case "number": {
      const value = typeof given === "string" && given.trim() !== "" ? Number(given) : given;
      if (typeof value === "number" && Number.isFinite(value)) return { value };
      return { problem: `expected a number for "${name}", got ${shown}` };
    }
    case "boolean": {
      if (typeof given === "boolean") return { value: given };
      const text = typeof given === "string" ? given.toLowerCase() : "";
      if (["true", "yes", "1", "on"].includes(text)) return { value: true };
      if (["false", "no", "0", "off"].includes(text)) return { value: false };
      return { problem: `expected true or false for "${name}", got ${shown}` };
    }
    case "enum": {
      const values = spec.values ?? [];
      const match = values.find((value) => String(value) === String(given));
      if (match !== undefined && (typeof given === "string" || typeof given === "number")) {
        return { value: match };
      }
      return {
        problem:
          `expected one of ${values.map((v) => JSON.stringify(v)).join(", ")} for "${name}", ` +
          `got ${shown}`,
      };
    }
  }
  return { problem: `expected a ${spec.type} for "${name}", got ${shown}` };
}

/** The declarations' own problems: enum values, defaults of the wrong type, names clashing. */
export function checkDeclarations(params: Record<string, ParamSpec>): ParamProblem[] {
  const problems: ParamProblem[] = [];
  const envNames = new Map<string, string>();
  for (const [name, spec] of Object.entries(params)) {
    const clash = envNames.get(paramEnvName(name));
    if (clash) {
      problems.push({
        code: "duplicate_param",
        message: `parameters "${clash}" and "${name}" differ only in case (both ${
          paramEnvName(name)
        })`,
        path: ["params", name],
        key: name,
      });
    }
    envNames.set(paramEnvName(name), name);
    if (spec.type === "enum" && (spec.values ?? []).length === 0) {
      problems.push({
        code: "invalid_param",
        message: `parameter "${name}" is an enum without "values"`,
        path: ["params", name],
        key: "values",
        expected: "a non-empty list of values",
      });
    } else if (spec.type !== "enum" && spec.values !== undefined) {
      problems.push({
        code: "invalid_param",
        message: `parameter "${name}" has "values" but is not an enum`,
        path: ["params", name, "values"],
        key: "values",
      });
    }
    if (spec.default !== undefined) {
      const checked = coerceParam(name, spec, spec.default);
      if ("problem" in checked || typeof checked.value !== typeof spec.default) {
        problems.push({
          code: "invalid_param",
          message: `the default of parameter "${name}" is not a ${spec.type}` +
            ("problem" in checked ? `: ${checked.problem}` : ""),
          path: ["params", name, "default"],
          key: "default",
        });
      }
      if (spec.required) {
        problems.push({
          code: "invalid_param",
          message: `parameter "${name}" is required and has a default; drop one of them`,
          path: ["params", name, "required"],
          key: "required",
        });
      }
    }
  }
  return problems;
}

/**
 * Calls `visit` on every string of `value`, with its path. The path is one
 * array, extended and shortened during the walk: a visitor keeps a copy.
 */
function eachString(
  value: unknown,
  path: Array<string | number>,
  visit: (text: string, path: Array<string | number>) => void,
): void {
  if (typeof value === "string") visit(value, path);
  else if (value === null || typeof value !== "object") return;
  else if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) {
      path.push(i);
      eachString(value[i], path, visit);
      path.pop();
    }
  } else {
    for (const key of Object.keys(value)) {
      path.push(key);
      eachString((value as Record<string, unknown>)[key], path, visit);
      path.pop();
    }
  }
}

/** References to undeclared parameters, each at the string that makes it. */
export function checkReferences(pipeline: PipelineFile): ParamProblem[] {
  const declared = new Set(Object.keys(pipeline.params ?? {}));
  const problems: ParamProblem[] = [];
  const check = (text: string, path: Array<string | number>) => {
    if (!text.includes("${{")) return;
    for (const match of text.matchAll(PARAM_REFERENCE)) {
      if (declared.has(match[1])) continue;
      problems.push({
        code: "unknown_param",
        message: `"\${{ params.${match[1]} }}" names no parameter of the pipeline` +
          (declared.size > 0
            ? ` (it declares ${[...declared].map((n) => `"${n}"`).join(", ")})`
            : ` (it has no "params" section)`),
        path: [...path],
        key: String(path.at(-1)),
        expected: "a name of the `params` section",
      });
    }
  };
  const path: Array<string | number> = ["steps"];
  for (const name of Object.keys(pipeline.steps)) {
    const step = pipeline.steps[name];
    // No "${{" anywhere in a step, no reference in it.
    if (!mayMention(step, "${{")) continue;
    path.push(name);
    eachString(step, path, check);
    path.pop();
  }
  eachString(pipeline.env, ["env"], check);
  eachString(pipeline.defaults, ["defaults"], check);
  eachString(pipeline.selector, ["selector"], check);
  eachString(pipeline["run-name"], ["run-name"], check);
  eachString(pipeline["concurrency-key"], ["concurrency-key"], check);
  eachString(pipeline.labels, ["labels"], check);
  return problems;
}

/**
 * The values of a run: each given value checked against its declaration,
 * defaults for the rest. `given` undefined: no run is being started (a
 * `validate`), so required parameters may be missing and stay unresolved.
 */
export function resolveParams(
  params: Record<string, ParamSpec>,
  given: Record<string, unknown> | undefined,
): { values: Record<string, ParamValue>; problems: ParamProblem[] } {
  const values: Record<string, ParamValue> = {};
  const problems: ParamProblem[] = [];
  for (const name of Object.keys(given ?? {})) {
    if (Object.hasOwn(params, name)) continue;
    const names = Object.keys(params);
    problems.push({
      code: "unknown_param",
      message: `parameter "${name}" was given, but the pipeline declares ${
        names.length > 0 ? names.map((n) => `"${n}"`).join(", ") : "none"
      }`,
      path: names.length > 0 ? ["params"] : [],
      key: "params",
    });
  }
  for (const [name, spec] of Object.entries(params)) {
    if (given && Object.hasOwn(given, name)) {
      const checked = coerceParam(name, spec, given[name]);
      if ("problem" in checked) {
        problems.push({
          code: "invalid_param_value",
          message: checked.problem,
          path: ["params", name],
          key: name,
        });
      } else values[name] = checked.value;
    } else if (spec.default !== undefined) {
      values[name] = spec.default;
    } else if (given !== undefined && spec.required) {
      problems.push({
        code: "missing_param",
        message: `parameter "${name}" is required: give it with --param ${name}=VALUE` +
          (spec.description ? ` (${spec.description})` : ""),
        path: ["params", name],
        key: name,
      });
    } else if (given !== undefined) {
      // Neither given, nor a default, nor required: the empty value of its type.
      values[name] = spec.type === "number" ? 0 : spec.type === "boolean" ? false : "";
    }
  }
  return { values, problems };
}

/**
 * Parameters a plan still names unresolved: it was planned without values
 * (a `validate`) for parameters that are required. Such a plan must not run.
 */
export function unresolvedParams(steps: unknown): string[] {
  const text = JSON.stringify(steps);
  if (!text.includes("${{")) return [];
  return [...new Set([...text.matchAll(PARAM_REFERENCE)].map((match) => match[1]))];
}

/** Replaces references in a string by their values (those without one are left as written). */
function substitute(text: string, values: Record<string, ParamValue>): string {
  return text.includes("${{")
    ? text.replace(
      PARAM_REFERENCE,
      (whole, name: string) => Object.hasOwn(values, name) ? String(values[name]) : whole,
    )
    : text;
}

function substituteDeep(value: unknown, values: Record<string, ParamValue>): unknown {
  if (typeof value === "string") return substitute(value, values);
  if (Array.isArray(value)) return value.map((item) => substituteDeep(item, values));
  if (value && typeof value === "object") {
    return Object.fromEntries(
      Object.entries(value).map(([key, item]) => [key, substituteDeep(item, values)]),
    );
  }
  return value;
}

/**
 * The pipeline with its parameters applied: a step's `run` reads each as
 * `${RUNNEL_PARAM_NAME}` from its env (given only the parameters it uses
 * there, so that a value is part of the cache key of the steps it affects
 * only); every other string gets the value itself.
 */
export function applyParams(
  pipeline: PipelineFile,
  values: Record<string, ParamValue>,
): PipelineFile {
  if (!pipeline.params) return pipeline;
  const steps: PipelineFile["steps"] = {};
  for (const [name, step] of Object.entries(pipeline.steps)) {
    const { run, ...rest } = step;
    const applied = substituteDeep(rest, values) as typeof step;
    if (typeof run === "string") {
      const used = new Set<string>();
      applied.run = run.includes("${{")
        ? run.replace(PARAM_REFERENCE, (whole, param: string) => {
          if (!Object.hasOwn(values, param)) return whole;
          used.add(param);
          return `\${${paramEnvName(param)}}`;
        })
        : run;
      if (used.size > 0) {
        applied.env = {
          ...applied.env,
          ...Object.fromEntries([...used].map((p) => [paramEnvName(p), String(values[p])])),
        };
      }
    }
    steps[name] = applied;
  }
  return {
    ...pipeline,
    steps,
    ...(pipeline.env ? { env: substituteDeep(pipeline.env, values) as typeof pipeline.env } : {}),
    ...(pipeline.defaults
      ? { defaults: substituteDeep(pipeline.defaults, values) as typeof pipeline.defaults }
      : {}),
    ...(pipeline.selector
      ? { selector: substituteDeep(pipeline.selector, values) as typeof pipeline.selector }
      : {}),
    ...(pipeline["run-name"] ? { "run-name": substitute(pipeline["run-name"], values) } : {}),
    ...(pipeline["concurrency-key"]
      ? {
        "concurrency-key": substituteDeep(
          pipeline["concurrency-key"],
          values,
        ) as typeof pipeline["concurrency-key"],
      }
      : {}),
    ...(pipeline.labels
      ? { labels: substituteDeep(pipeline.labels, values) as typeof pipeline.labels }
      : {}),
  };
}
