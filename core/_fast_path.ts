/**
 * The fast path for large pipeline files: a plain YAML load (js-yaml, core
 * schema, a fraction of the time and memory of a positioned document), the
 * same zod schema and the same checks. It only ever returns a valid plan: at
 * the first sign of any problem it gives up, and the located path re-parses
 * the file to report every problem with its line and column. Step
 * positions come from a scan of the block-style `steps:` mapping.
 *
 * @module
 */

import { CORE_SCHEMA, load as loadYaml } from "npm:js-yaml@4.1.0";
import { LineCounter } from "npm:yaml@2.9.1";
import type { Plan } from "./model.ts";
import { type PipelineFile, PipelineSchema } from "./schema.ts";
import { type CheckOptions, checkSteps, planValidated, viewOf } from "./validate.ts";
import { Reporter } from "./_diagnostics.ts";
import { parsePipelineFast } from "./_fast_schema.ts";
import { Locator, type PathSegment, type Position, type Positions } from "./_locator.ts";
import { checkSource } from "./_yaml.ts";

/**
 * Files at least this large try the fast path first. Below it the located
 * parse costs a few milliseconds and gives exact step positions.
 */
export const FAST_PATH_MIN_CHARS = 64 * 1024;

/** An anchor or alias anywhere: such files take the located path (bounded alias expansion). */
const ANCHOR_OR_ALIAS = /(?:^|[\s[{,:-])[&*][^\s,\]}]/m;

/** Options of {@link parseFast}. */
export interface FastPathOptions extends CheckOptions {
  /** Path of the file as the user named it. */
  file: string;
}

/** The plan of a valid file, or undefined for the located path to report on. */
export function parseFast(source: string, options: FastPathOptions): Plan | undefined {
  if (ANCHOR_OR_ALIAS.test(source) || source.includes("<<")) return undefined;
  const counter = new Locator(options.file, new LineCounter());
  if (!checkSource(source, new Reporter(counter), counter)) return undefined;
  const pipeline = parsePlain(source);
  if (pipeline === undefined) return undefined;
  const reporter = new Reporter(scannedPositions(options.file, source));
  let edges;
  try {
    edges = checkSteps(viewOf(pipeline), options, reporter);
  } catch {
    return undefined;
  }
  if (reporter.diagnostics.length > 0) return undefined;
  const plan = planValidated(pipeline, { ...options, source, edges }, reporter);
  return reporter.diagnostics.length > 0 ? undefined : plan;
}

/**
 * The pipeline of YAML text, or undefined when it is not YAML js-yaml reads
 * or not a valid pipeline (the located path says why). Steps are checked by
 * {@link parsePipelineFast}, and by the whole schema only when it has a doubt.
 */
function parsePlain(source: string): PipelineFile | undefined {
  let raw: unknown;
  try {
    raw = loadYaml(source, { schema: CORE_SCHEMA, json: false });
  } catch {
    return undefined;
  }
  return parsePipelineFast(raw) ?? PipelineSchema.safeParse(raw).data;
}

/** Positions of the steps only (from a scan of the text); 1:1 for anything else. */
function scannedPositions(file: string, source: string): Positions {
  const { lines, col } = scanStepLines(source);
  const at = (path: readonly PathSegment[]): Position => {
    const line = path[0] === "steps" && path.length > 1 ? lines.get(String(path[1])) : undefined;
    return line === undefined ? { line: 1, col: 1 } : { line, col };
  };
  return { file, at, inString: at };
}

/**
 * The line of each step key of a block-style `steps:` mapping, and their
 * column (they share one indent).
 */
function scanStepLines(source: string): { lines: Map<string, number>; col: number } {
  const found = new Map<string, number>();
  const header = /^steps\s*:\s*(#.*)?$/m.exec(source);
  if (!header) return { lines: found, col: 1 };
  // One line at a time by index, without splitting the whole text into lines.
  const key = /( +)([^\s:#][^:\n]*?)\s*:(?:\s|$)/y;
  let line = source.slice(0, header.index).split("\n").length;
  let start = source.indexOf("\n", header.index) + 1;
  let indent = -1;
  while (start > 0 && start < source.length) {
    line++;
    const end = source.indexOf("\n", start);
    const first = source.charCodeAt(start);
    if (first !== 32) {
      if (!/\s/.test(source[start])) break; // the next top-level key
    } else if (indent < 0 || source.charCodeAt(start + indent) !== 32) {
      // Not a line inside a step (indented deeper than the step keys): a step key, maybe.
      key.lastIndex = start;
      const match = key.exec(source);
      if (match && (end < 0 || match.index + match[0].length <= end + 1)) {
        if (indent < 0) indent = match[1].length;
        if (match[1].length === indent) {
          const name = match[2];
          const quoted = QUOTES.includes(name[0]) || QUOTES.includes(name[name.length - 1]);
          found.set(quoted ? name.replace(/^["']|["']$/g, "") : name, line);
        }
      }
    }
    start = end + 1;
  }
  return { lines: found, col: indent + 1 };
}

/** Quotes a step key may be written in. */
const QUOTES = `"'`;
