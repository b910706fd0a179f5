/**
 * Error classes of the pipeline language, each with a stable `code`.
 *
 * @module
 */

/**
 * One located problem of a pipeline. In a file, lines and columns count
 * from 1; a pipeline defined in code (`definePipeline`) has no source text,
 * so its problems have line and column 0 and are located by `path`.
 */
export interface Diagnostic {
  /** Stable machine-readable kind, e.g. `unknown_key`, `cycle`, `yaml_syntax`. */
  code: string;
  /** Sentence saying what is wrong (without the location). */
  message: string;
  /** Path of the file as the user named it (or the name of a pipeline defined in code). */
  file: string;
  /** Line from 1; 0 when the pipeline has no source text. */
  line: number;
  /** Column from 1; 0 when the pipeline has no source text. */
  col: number;
  /** Key path of the problem, e.g. `steps.analyze.needs[0]`, when it has one. */
  path?: string;
  /** The offending key, when there is one. */
  key?: string;
  /** What was expected there, when it can be said. */
  expected?: string;
  /** A suggestion such as `did you mean "needs"?`. */
  hint?: string;
}

/**
 * Renders a diagnostic as `file:line:col: message — hint`, or as
 * `name: key.path: message — hint` for a pipeline defined in code.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { formatDiagnostic } from "./errors.ts";
 *
 * assert.equal(
 *   formatDiagnostic({ code: "x", message: "bad", file: "p.yaml", line: 1, col: 2, hint: "fix" }),
 *   "p.yaml:1:2: bad — fix",
 * );
 * assert.equal(
 *   formatDiagnostic({ code: "x", message: "bad", file: "demo", line: 0, col: 0, path: "a.b" }),
 *   "demo: a.b: bad",
 * );
 * ```
 */
export function formatDiagnostic(diagnostic: Diagnostic): string {
  const where = diagnostic.line > 0
    ? `${diagnostic.file}:${diagnostic.line}:${diagnostic.col}`
    : diagnostic.path
    ? `${diagnostic.file}: ${diagnostic.path}`
    : diagnostic.file;
  const hint = diagnostic.hint ? ` — ${diagnostic.hint}` : "";
  return `${where}: ${diagnostic.message}${hint}`;
}

/** A pipeline file that cannot be loaded; carries every problem found in it. */
export class PipelineError extends Error {
  /** Stable error code. */
  readonly code = "invalid_pipeline";
  /** Every problem of the file, in source order. */
  readonly diagnostics: Diagnostic[];

  /** Builds the error from its diagnostics (at least one). */
  constructor(diagnostics: Diagnostic[]) {
    const lines = diagnostics.map(formatDiagnostic);
    const count = diagnostics.length === 1 ? "1 problem" : `${diagnostics.length} problems`;
    super(`Expected a valid pipeline, found ${count}:\n${lines.join("\n")}`);
    this.name = "PipelineError";
    this.diagnostics = diagnostics;
  }
}

/** A `when` condition that does not parse. */
export class ConditionSyntaxError extends Error {
  /** Stable error code. */
  readonly code = "condition_syntax";
  /** 0-based character offset of the problem in the condition source. */
  readonly offset: number;

  /** Builds the error; `offset` counts characters from 0. */
  constructor(message: string, offset: number) {
    super(message);
    this.name = "ConditionSyntaxError";
    this.offset = offset;
  }
}

/** A duration, size or CPU quantity that does not parse. */
export class QuantityError extends Error {
  /** Stable error code. */
  readonly code = "invalid_quantity";

  /** Builds the error from its full message. */
  constructor(message: string) {
    super(message);
    this.name = "QuantityError";
  }
}
