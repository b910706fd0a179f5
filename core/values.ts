/**
 * Step values: small named values a step publishes besides its files
 * (Argo output parameters, GitLab dotenv reports), as `NAME=value` lines in
 * the file `$RUNNEL_VALUES` names (a deno step may return an object), and
 * that later steps read as `${{ steps.STEP.values.NAME }}` in their env,
 * args and config, and in `when` conditions.
 *
 * As parameters are, a value is data: in a `run` script the reference
 * becomes `${RUNNEL_VALUE_STEP_NAME}`, an env var the step is given.
 *
 * @module
 */

import { mapStrings } from "./_deep.ts";

/** The file a step writes its values to, in its outputs directory (not an output itself). */
export const VALUES_FILE = ".runnel-values";
/** Largest values file of a step. */
export const MAX_VALUES_BYTES = 64 * 1024;
/** Most values a step may publish. */
export const MAX_VALUES = 1_000;

/** `${{ steps.STEP.values.NAME }}`, the step and the name captured. */
export const VALUE_REFERENCE =
  /\$\{\{\s*steps\.([A-Za-z][A-Za-z0-9_-]*)\.values\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}/g;

const NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

/** A values file a step wrote that cannot be taken. */
export class StepValuesError extends Error {
  /** Stable code. */
  readonly code = "bad_values";
  /** The step's fault: it fails as an application error. */
  readonly errorClass = "application";

  /** Builds the error from a full sentence. */
  constructor(message: string) {
    super(message);
    this.name = "StepValuesError";
  }
}

/** Parses `NAME=value` lines (blank lines and `#` comments skipped); throws {@link StepValuesError}. */
export function parseValues(text: string): Record<string, string> {
  if (new TextEncoder().encode(text).length > MAX_VALUES_BYTES) {
    throw new StepValuesError(
      `Expected at most ${MAX_VALUES_BYTES} bytes of values in $RUNNEL_VALUES`,
    );
  }
  const values: Record<string, string> = {};
  const lines = text.split("\n");
  for (const [i, raw] of lines.entries()) {
    const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
    if (line.trim() === "" || line.trimStart().startsWith("#")) continue;
    const at = line.indexOf("=");
    const name = at > 0 ? line.slice(0, at) : "";
    if (!NAME.test(name)) {
      throw new StepValuesError(
        `Expected NAME=value on line ${i + 1} of $RUNNEL_VALUES (NAME of [A-Za-z0-9_]), got ` +
          JSON.stringify(line.slice(0, 80)),
      );
    }
    values[name] = line.slice(at + 1);
    if (Object.keys(values).length > MAX_VALUES) {
      throw new StepValuesError(`Expected at most ${MAX_VALUES} values in $RUNNEL_VALUES`);
    }
  }
  return values;
}

/**
 * Why values as an agent reported them cannot be taken (names, count,
 * size), or undefined: a server does not trust an agent's message.
 */
export function valuesProblem(values: unknown): string | undefined {
  if (values === undefined) return undefined;
  if (!values || typeof values !== "object" || Array.isArray(values)) {
    return "expected values as a map of names to strings";
  }
  const entries = Object.entries(values);
  if (entries.length > MAX_VALUES) return `expected at most ${MAX_VALUES} values`;
  let bytes = 0;
  for (const [name, value] of entries) {
    if (!NAME.test(name) || typeof value !== "string") {
      return `expected value names of [A-Za-z0-9_] with string values, got "${name.slice(0, 40)}"`;
    }
    bytes += name.length + 1 + new TextEncoder().encode(value).length + 1;
  }
  return bytes > MAX_VALUES_BYTES
    ? `expected at most ${MAX_VALUES_BYTES} bytes of values`
    : undefined;
}

/** The env var a `run` script reads a value from. */
export function valueEnvName(step: string, name: string): string {
  return `RUNNEL_VALUE_${step.toUpperCase().replace(/[^A-Z0-9]/g, "_")}_${name.toUpperCase()}`;
}

/** A value an upstream step was to publish and did not. */
export class ValueMissingError extends Error {
  /** Stable code. */
  readonly code = "value_missing";
  /** What the attempt that reads it fails with. */
  readonly errorClass = "artifact";

  /** Builds the error from a full sentence. */
  constructor(message: string) {
    super(message);
    this.name = "ValueMissingError";
  }
}

/**
 * A step's config and env with the values of its upstream steps in place:
 * in `run`, env var references (their values added to `env`); everywhere
 * else, the values themselves. `valuesOf(step)` gives a step name's
 * published values (undefined when it published none).
 */
export function applyValues(
  config: Record<string, unknown>,
  env: Record<string, string>,
  valuesOf: (step: string) => Record<string, string> | undefined,
  stepId: string,
): { config: Record<string, unknown>; env: Record<string, string>; used: Record<string, string> } {
  const used: Record<string, string> = {};
  const valueOf = (step: string, name: string): string => {
    const value = valuesOf(step)?.[name];
    if (value === undefined) {
      throw new ValueMissingError(
        `Step "${stepId}" reads value "${name}" of step "${step}", which did not publish it`,
      );
    }
    used[`${step}.${name}`] = value;
    return value;
  };
  const substitute = (text: string) =>
    text.includes("${{")
      ? text.replace(VALUE_REFERENCE, (_whole, step: string, name: string) => valueOf(step, name))
      : text;
  const deep = (value: unknown): unknown => mapStrings(value, substitute);
  const json = JSON.stringify(config) + JSON.stringify(env);
  if (!json.includes("${{")) return { config, env, used };
  const { run, ...rest } = config;
  const out = deep(rest) as Record<string, unknown>;
  const outEnv = deep(env) as Record<string, string>;
  if (typeof run === "string") {
    out.run = run.replace(VALUE_REFERENCE, (_whole, step: string, name: string) => {
      const variable = valueEnvName(step, name);
      outEnv[variable] = valueOf(step, name);
      return `\${${variable}}`;
    });
  } else if (run !== undefined) {
    out.run = run;
  }
  return { config: out, env: outEnv, used };
}
