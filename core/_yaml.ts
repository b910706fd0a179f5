/**
 * The YAML front end of the loader: the limits of the source text, a parse
 * that keeps every node's position, duplicate keys, and aliases expanded
 * with a bound. What it hands on is the plain value the file describes and
 * a {@link Reporter} that locates problems in the file.
 *
 * @module
 */

import process from "node:process";
import { isScalar, LineCounter, parseDocument, visit } from "npm:yaml@2.9.1";
import type { Document, Node } from "npm:yaml@2.9.1";
import { Reporter } from "./_diagnostics.ts";
import { Locator } from "./_locator.ts";

/** Largest pipeline file accepted (5 MiB): far above any real pipeline, bounds parse time. */
export const MAX_PIPELINE_BYTES = 5 * 1024 * 1024;
/** Most YAML aliases resolved; a few are normal, thousands are an alias bomb. */
export const MAX_ALIAS_COUNT = 1000;

/**
 * Reads YAML source text into the plain value it describes, with a
 * reporter that locates problems by line and column. Throws a
 * `PipelineError` for text that is not a YAML document within the limits.
 */
export function readYaml(source: string, file: string): { raw: unknown; reporter: Reporter } {
  const lines = new LineCounter();
  // Positions before parsing come from a counter over the raw text.
  const counter = new Locator(file, lines);
  const early = new Reporter(counter);
  if (!checkSource(source, early, counter)) early.fail();
  const doc = parseYaml(source, lines);
  const locator = new Locator(file, lines, doc);
  const reporter = new Reporter(locator);
  for (const error of doc.errors) {
    const pos = error.linePos?.[0] ?? locator.position(error.pos[0]);
    reporter.add(
      "yaml_syntax",
      `invalid YAML: ${error.message.split("\n")[0].replace(/ at line \d+, column \d+:?$/, "")}`,
      pos,
    );
  }
  if (reporter.diagnostics.length > 0) reporter.fail();
  reportDuplicateKeys(doc, reporter, locator);
  if (reporter.diagnostics.length > 0) reporter.fail();
  try {
    return { raw: doc.toJS({ maxAliasCount: MAX_ALIAS_COUNT }), reporter };
  } catch (error) {
    const message = /alias/i.test(String(error))
      ? `expected at most ${MAX_ALIAS_COUNT} alias expansions (is this an alias bomb?)`
      : `cannot read the YAML document: ${(error as Error).message}`;
    reporter.add("yaml_aliases", message, { line: 1, col: 1 });
    return reporter.fail();
  }
}

/**
 * Checks the limits of the source text before it is parsed: size, NUL
 * bytes, invalid UTF-8 (decoded as U+FFFD), nothing but comments.
 */
export function checkSource(source: string, reporter: Reporter, locator: Locator): boolean {
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
      locator.position(nul),
    );
    return false;
  }
  const replacement = source.indexOf("\uFFFD");
  if (replacement >= 0) {
    reporter.add(
      "invalid_utf8",
      "expected UTF-8 text, found an invalid byte sequence",
      locator.position(replacement),
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
function reportDuplicateKeys(doc: Document, reporter: Reporter, locator: Locator): void {
  const steps = locator.node(["steps"]);
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
          ? locator.position((pair.key as Node).range![0])
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
