/**
 * Renders zod's issues with a pipeline as diagnostics a person can act on:
 * the key, where it is, what was expected and what was found, with a
 * did-you-mean hint for an unknown key and the quantity parsers' own
 * messages for a bad duration, size or CPU.
 *
 * @module
 */

import type { z } from "npm:zod@4.6.7";
import { QuantityError } from "./errors.ts";
import {
  DURATION_PATTERN,
  MILLICPU_PATTERN,
  parseByteSize,
  parseCpu,
  parseDuration,
  SIZE_PATTERN,
} from "./duration.ts";
import { PipelineSchema } from "./schema.ts";
import { didYouMean } from "./_did_you_mean.ts";
import { describePath, joinPath, type Reporter, typeName } from "./_diagnostics.ts";
import type { PathSegment } from "./_locator.ts";

/** The value at a path of the raw pipeline, or undefined where the path leaves it. */
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

/** The quantity parser's own message for a value that fails a duration, size or CPU pattern. */
function quantityMessage(pattern: string, value: unknown, key: string): string | undefined {
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

/** A name that becomes a file name, in words (see `SAFE_NAME_PATTERN`). */
const SAFE_NAME = "letters, digits, _ . - not starting with . or - ([A-Za-z0-9_][A-Za-z0-9_.-]*)";
/** An env var name, in words (see `ENV_NAME_PATTERN`). */
const ENV_NAME = "letters, digits, _ not starting with a digit ([A-Za-z_][A-Za-z0-9_]*)";

/** What a value's pattern asks for, in words, by the key (or the mapping it is in). */
const PATTERN_NAMES: Record<string, string> = {
  name: "a pipeline name of letters, digits, _ . -",
  inputs: 'a reference "step/output"',
  outputs: `a file name of ${SAFE_NAME}`,
  secrets: `a secret name of ${ENV_NAME}`,
  matrix: "a matrix key of letters, digits, _ -, starting with a letter",
  steps: "a step name of letters, digits, _ -, starting with a letter",
};

/** What the keys of a mapping must look like, in words, by the mapping. */
const KEY_PATTERN_NAMES: Record<string, string> = {
  inputs: `an input name of ${SAFE_NAME}`,
  env: `an env var name of ${ENV_NAME}`,
  secrets: `a secret name of ${ENV_NAME}`,
};

/**
 * Reports each of zod's issues with `raw` (the pipeline as parsed, before
 * validation) as a diagnostic; `prefix` is the path of the value the issues
 * are relative to (for the branches of a union).
 */
export function reportZodIssues(
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
          reporter.at("missing_key", message, path.slice(0, -1), {
            key,
            expected: issue.expected,
            keyPath: path,
          });
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
        const quantity = quantityMessage(pattern, value, key);
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
        const expected = KEY_PATTERN_NAMES[String(path.at(-2))] ??
          PATTERN_NAMES[String(path.at(-2))] ?? "a valid key";
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
        const got = (issue as { params?: { showValue?: boolean } }).params?.showValue
          ? `, got ${typeName(value)}`
          : "";
        const message = issue.code === "custom"
          ? `expected ${text} for "${key}" ${where}${got}`
          : `${text} for "${key}" ${where}`;
        reporter.at("invalid_value", message, path, { key });
      }
    }
  }
}
