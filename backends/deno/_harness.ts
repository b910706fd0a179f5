/**
 * Runs inside the sandboxed subprocess of a `deno` step: builds the
 * {@link StepContext}, calls the module's default export, and turns every
 * way it can fail into an exit code plus one marker line on stderr that the
 * backend parses (see `_report.ts`).
 *
 * The generated entry file imports this module before the step module, so
 * that, before any step code evaluates, the attempt's nonce has left the
 * environment and the listeners below are in place. Only the entry file
 * imports it: its set-up would take over any other process.
 *
 * @module
 */

import type { StepContext } from "./context.ts";
import {
  APPLICATION_EXIT_CODE,
  classifyError,
  type ErrorReport,
  HARNESS_NONCE_ENV,
  type HarnessContext,
  markerPrefix,
} from "./_report.ts";

/** The marker prefix of this attempt; empty without a nonce, which no backend accepts. */
const prefix = markerPrefix(takeNonce());

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
    const returned = await (run as (ctx: StepContext) => unknown)(ctx);
    // A returned object of scalars is the step's values (`$RUNNEL_VALUES`).
    if (returned !== null && typeof returned === "object" && !Array.isArray(returned)) {
      const file = Deno.env.get("RUNNEL_VALUES");
      const lines = Object.entries(returned as Record<string, unknown>)
        .filter(([, value]) => ["string", "number", "boolean"].includes(typeof value))
        .map(([name, value]) => `${name}=${String(value).replace(/\r?\n/g, " ")}\n`);
      if (file && lines.length > 0) {
        await Deno.writeTextFile(file, lines.join(""), { append: true });
      }
    }
  } catch (error) {
    fail(error);
  }
  // Exit at once: a timer or socket the step left open must not keep it alive.
  Deno.exit(0);
}

/** Reads the attempt's nonce and removes it from the environment, where step code could read it. */
function takeNonce(): string {
  try {
    const nonce = Deno.env.get(HARNESS_NONCE_ENV) ?? "";
    Deno.env.delete(HARNESS_NONCE_ENV);
    return nonce;
  } catch {
    // Not granted: run outside the backend, where no marker is read anyway.
    return "";
  }
}

function fail(error: unknown): never {
  if (failing) Deno.exit(APPLICATION_EXIT_CODE);
  failing = true;
  const { exitCode, report: payload } = classifyError(error);
  // The stack is for the human reading the log; the marker for the backend.
  if (payload.errorClass !== "business") console.error(error);
  report(exitCode, payload);
}

/**
 * Writes the marker and exits. A step could have replaced `console.error`
 * by now and so learn the nonce; what it could then claim is still limited
 * to the classes the harness itself reports, which it can reach by
 * throwing anyway.
 */
function report(exitCode: number, payload: ErrorReport): never {
  console.error(`${prefix}${JSON.stringify(payload)}`);
  Deno.exit(exitCode);
}
