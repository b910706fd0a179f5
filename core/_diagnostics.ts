/**
 * Collecting the problems of a pipeline: a {@link Reporter} locates each
 * one (by line and column in a YAML file, by key path always) and throws
 * them all at once as a {@link PipelineError}; and the phrases the
 * messages share (`in step "a"`, `got the string "x"`).
 *
 * @module
 */

import { type Diagnostic, PipelineError } from "./errors.ts";
import type { PathSegment, Position, Positions } from "./_locator.ts";

/** Most diagnostics reported for one file; past that the rest are summarised. */
export const MAX_DIAGNOSTICS = 200;

/** What a diagnostic may say besides its code, message and place. */
export type DiagnosticDetails = Partial<Pick<Diagnostic, "key" | "expected" | "hint">>;

/** Collects diagnostics with their positions and key paths. */
export class Reporter {
  readonly diagnostics: Diagnostic[] = [];
  readonly positions: Positions;

  /** Builds a reporter that locates problems with `positions`. */
  constructor(positions: Positions) {
    this.positions = positions;
  }

  /** Adds a problem at a position (and key path, when it has one). */
  add(
    code: string,
    message: string,
    where: Position,
    extra: DiagnosticDetails & { path?: readonly PathSegment[] } = {},
  ): void {
    const { path, ...rest } = extra;
    const diagnostic: Diagnostic = { code, message, file: this.positions.file, ...where, ...rest };
    if (path && path.length > 0) diagnostic.path = keyPath(path);
    this.diagnostics.push(diagnostic);
  }

  /**
   * Adds a problem located at the value at `path` (at its key with
   * `onKey`). `keyPath` names the key reported when it differs from the
   * place: a missing key is located at its mapping but named by its own path.
   */
  at(
    code: string,
    message: string,
    path: readonly PathSegment[],
    extra: DiagnosticDetails & { onKey?: boolean; keyPath?: readonly PathSegment[] } = {},
  ): void {
    const { onKey, keyPath, ...rest } = extra;
    this.add(code, message, this.positions.at(path, { key: onKey }), {
      ...rest,
      path: keyPath ?? path,
    });
  }

  /** Throws every problem collected, in source order, at most {@link MAX_DIAGNOSTICS}. */
  fail(): never {
    const all = this.diagnostics;
    // Stable: problems of a pipeline without positions keep the order they were found in.
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
}

/** A key path as messages quote it: `retry.on[0]`. */
export function joinPath(path: readonly PathSegment[]): string {
  return path.map((p, i) => typeof p === "number" ? `[${p}]` : i === 0 ? p : `.${p}`).join("");
}

/** Keys written with a dot in a key path; any other key is quoted in brackets. */
const PLAIN_KEY = /^[A-Za-z_][A-Za-z0-9_-]*$/;

/** A key path as {@link Diagnostic.path} gives it: `steps.analyze.needs[0]`, `env["A.B"]`. */
export function keyPath(path: readonly PathSegment[]): string {
  return path.map((p, i) =>
    typeof p === "number"
      ? `[${p}]`
      : PLAIN_KEY.test(p)
      ? (i === 0 ? p : `.${p}`)
      : `[${JSON.stringify(p)}]`
  ).join("");
}

/** Where a path is, in words: `in step "a"`, `in "retry" of step "a"`, `at the top level`. */
export function describePath(path: readonly PathSegment[]): string {
  if (path.length === 0) return "at the top level";
  if (path[0] === "steps" && path.length >= 2) {
    const rest = path.slice(2);
    return rest.length === 0
      ? `in step "${path[1]}"`
      : `in "${joinPath(rest)}" of step "${path[1]}"`;
  }
  return `in "${joinPath(path)}"`;
}

/** What a value is, in words: `a list`, `the string "x"`, `number 3`. */
export function typeName(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "a list";
  if (typeof value === "object") return "a mapping";
  if (typeof value === "string") return `the string ${JSON.stringify(value.slice(0, 60))}`;
  return `${typeof value} ${String(value)}`;
}
