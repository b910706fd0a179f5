/**
 * Runs inside the sandboxed subprocess of a `deno` step: builds the
 * {@link StepContext}, calls the module's default export, and turns every
 * way it can fail into an exit code plus one marker line on stderr,
 * `::runnel-error::{"errorClass":…,"message":…}`, that the backend parses.
 *
 * The generated entry file imports this module before the step module, so
 * the listeners below are in place while the step module evaluates.
 *
 * @module
 */

import { BUSINESS_EXIT_CODE, type ErrorClass } from "../../core/model.ts";
import { isBusinessError, type StepContext } from "./context.ts";

/** Prefix of the machine-readable failure line on stderr. */
export const ERROR_MARKER = "::runnel-error::";

/** Exit code of a step that reached past its grant: sysexits(3) `EX_NOPERM`. */
export const PERMISSION_EXIT_CODE = 77;

/** Exit code of a step that threw any other error. */
export const APPLICATION_EXIT_CODE = 1;

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

let failing = false;

globalThis.addEventListener("unhandledrejection", (event) => {
  event.preventDefault();
  fail(event.reason);
});
globalThis.addEventListener("error", (event) => {
  event.preventDefault();
  fail(event.error);
});

/** Runs the step module's default export with its context, then exits. */
export async function runStep(
  module: Record<string, unknown>,
  context: HarnessContext,
): Promise<void> {
  const run = module.default;
  if (typeof run !== "function") {
    report(APPLICATION_EXIT_CODE, {
      errorClass: "application",
      message: `step module "${context.module}" has no default export function`,
    });
  }
  const env: Record<string, string> = {};
  for (const name of context.envNames) {
    const value = Deno.env.get(name);
    if (value !== undefined) env[name] = value;
  }
  const ctx: StepContext = {
    inputs: context.inputs,
    outputs: context.outputs,
    env,
    matrix: context.matrix,
    args: context.args,
    runId: context.runId,
    stepId: context.stepId,
    attempt: context.attempt,
    log: (...args) => console.log(...args),
  };
  try {
    await (run as (ctx: StepContext) => unknown)(ctx);
  } catch (error) {
    fail(error);
  }
  // Exit at once: a timer or socket the step left open must not keep it alive.
  Deno.exit(0);
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

function fail(error: unknown): never {
  if (failing) Deno.exit(APPLICATION_EXIT_CODE);
  failing = true;
  const { exitCode, report: payload } = classifyError(error);
  // The stack is for the human reading the log; the marker for the backend.
  if (payload.errorClass !== "business") console.error(error);
  report(exitCode, payload);
}

function report(exitCode: number, payload: ErrorReport): never {
  console.error(`${ERROR_MARKER}${JSON.stringify(payload)}`);
  Deno.exit(exitCode);
}
