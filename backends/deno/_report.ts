/**
 * How a `deno` step's harness tells the backend why the step failed: one
 * marker line on stderr, `::runnel-error:<nonce>::{"errorClass":…,"message":…}`.
 *
 * The marker is the harness's alone. The backend draws a fresh nonce for
 * each attempt and hands it over in {@link HARNESS_NONCE_ENV}; the harness
 * takes it out of its process's environment before the step module
 * evaluates, so step code cannot read it. The backend takes out of the log
 * only the lines that carry the nonce, and even from those only an error
 * class the harness may report ({@link HARNESS_ERROR_CLASSES}); a line a
 * step prints to look like a marker stays in its log as text.
 *
 * Pure declarations, shared by the harness (in the step's subprocess) and
 * the backend; the harness's set-up lives in `_harness.ts`.
 *
 * @module
 */

import { BUSINESS_EXIT_CODE, type ErrorClass } from "../../core/model.ts";
import { isBusinessError } from "./context.ts";

/** Start of a marker line; the attempt's nonce and `::` follow, then the JSON report. */
export const ERROR_MARKER = "::runnel-error:";

/** Env var through which the backend hands the harness the attempt's nonce. */
export const HARNESS_NONCE_ENV = "RUNNEL_HARNESS_NONCE";

/**
 * Payloads of the marker lines a warm (pre-started) harness writes about
 * itself (see `_warm.ts`); no report parses as one of them.
 */
export const WARM_MARKERS = {
  /** The harness is parked, waiting for its step. */
  parked: '{"warm":"parked"}',
  /** The harness read its step and is about to import it. */
  started: '{"warm":"started"}',
  /** The gate could not drop the load grants: the step did not run. */
  unsafe: '{"warm":"unsafe"}',
} as const;

/** Exit code of a step that reached past its grant: sysexits(3) `EX_NOPERM`. */
export const PERMISSION_EXIT_CODE = 77;

/** Exit code of a step that threw any other error. */
export const APPLICATION_EXIT_CODE = 1;

/**
 * The error classes the harness reports (see {@link classifyError}); a
 * marker claiming another (`infrastructure`, say, to be retried) is no report.
 */
export const HARNESS_ERROR_CLASSES: readonly ErrorClass[] = [
  "application",
  "business",
  "permission",
];

/** The payload of a marker line. */
export interface ErrorReport {
  errorClass: ErrorClass;
  message: string;
}

/** What the backend writes into the entry file (no secret values: those come as env vars). */
export interface HarnessContext {
  inputs: Record<string, string>;
  outputs: Record<string, string>;
  /** Names of the env vars granted to the step; their values are read at run time. */
  envNames: string[];
  matrix: Record<string, string | number | boolean>;
  args: string[];
  runId: string;
  stepId: string;
  attempt: number;
  /** The step module as the user named it, for messages. */
  module: string;
}

/** The start of the marker lines of the attempt holding `nonce`. */
export function markerPrefix(nonce: string): string {
  return `${ERROR_MARKER}${nonce}::`;
}

/**
 * Reads the JSON of a marker line; undefined unless it is a report the
 * harness may make.
 */
export function parseReport(payload: string): ErrorReport | undefined {
  let value: unknown;
  try {
    value = JSON.parse(payload);
  } catch {
    return undefined;
  }
  const { errorClass, message } = (value ?? {}) as Record<string, unknown>;
  if (typeof message !== "string") return undefined;
  if (!HARNESS_ERROR_CLASSES.includes(errorClass as ErrorClass)) return undefined;
  return { errorClass: errorClass as ErrorClass, message };
}

/** Classifies a thrown value as the backend will report it. */
export function classifyError(error: unknown): { exitCode: number; report: ErrorReport } {
  if (error instanceof Deno.errors.NotCapable || error instanceof Deno.errors.PermissionDenied) {
    return {
      exitCode: PERMISSION_EXIT_CODE,
      report: { errorClass: "permission", message: permissionMessage(error.message) },
    };
  }
  if (isBusinessError(error)) {
    return {
      exitCode: BUSINESS_EXIT_CODE,
      report: { errorClass: "business", message: error.message },
    };
  }
  const message = error instanceof Error
    ? (error.message || error.name)
    : `step threw a non-error value: ${String(error)}`;
  return { exitCode: APPLICATION_EXIT_CODE, report: { errorClass: "application", message } };
}

const GRANTABLE = new Set(["read", "write", "net", "env"]);

/**
 * Rewrites Deno's `Requires read access to "/x", run again with the
 * --allow-read flag` into what a pipeline author must change.
 */
export function permissionMessage(denoMessage: string): string {
  const match = /^Requires (\w+) access(?: to (.+?))?, run again with the --allow-\w+ flag/
    .exec(denoMessage);
  if (!match) return `step was denied an operation: ${denoMessage}`;
  const [, kind, target] = match;
  const what = target ? `${kind} access to ${target}` : `${kind} access`;
  if (!GRANTABLE.has(kind)) return `step needs ${what}, which a deno step cannot be granted`;
  return `step needs ${what}, which it was not granted (declare it under permissions.${kind})`;
}
