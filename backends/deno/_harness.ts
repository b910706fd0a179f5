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
 * A pre-started (warm) process's entry calls {@link parkStep} instead: it
 * waits for its step on stdin, and `_warm_gate.ts`, imported by the step
 * module file before the step module, calls {@link dropLoadGrants} (see
 * `_warm.ts`).
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
  WARM_MARKERS,
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

/** Read grants a warm process holds only to load its step, and the read grants of its step. */
export interface LoadGrants {
  /** Revoked before any step module evaluates. */
  temporary: string[];
  /** The step's own read grants: still granted afterwards. */
  kept: string[];
}

let loadGrants: LoadGrants | undefined;

/**
 * Parks a pre-started process: waits for its step (one JSON line on stdin:
 * env vars and context), sets the env vars, imports the step module file
 * `moduleUrl` (whose first import, the gate, drops `grants.temporary`),
 * then runs the step as {@link runStep} does. End of stdin before a step:
 * the host is gone or the pool stopped; the process exits.
 */
export async function parkStep(moduleUrl: string, grants: LoadGrants): Promise<void> {
  loadGrants = grants;
  announce(WARM_MARKERS.parked);
  const message = await readStepMessage();
  if (!message) Deno.exit(0);
  // Before any step code: module-level reads of Deno.env see the step's values.
  for (const [name, value] of Object.entries(message.env)) Deno.env.set(name, value);
  announce(WARM_MARKERS.started);
  let module: Record<string, unknown>;
  try {
    module = (await import(moduleUrl)).step;
  } catch (error) {
    fail(error);
  }
  // The gate ran before the step module; if it did not, step code ran with the grants.
  if (loadGrants !== undefined) unsafe("the gate did not run before the step module");
  await runStep(module, message.context);
}

/**
 * Revokes the temporary load grants and checks that they are gone and the
 * step's own read grants are not; exits without running the step
 * otherwise. Called once, by the gate module; later calls do nothing.
 */
export function dropLoadGrants(): void {
  const grants = loadGrants;
  loadGrants = undefined;
  if (!grants) return;
  const state = (path: string) => Deno.permissions.querySync({ name: "read", path }).state;
  try {
    for (const path of grants.temporary) Deno.permissions.revokeSync({ name: "read", path });
  } catch (error) {
    unsafe(`revoking a load grant failed: ${error}`);
  }
  const leaked = grants.temporary.filter((path) => state(path) === "granted");
  const lost = grants.kept.filter((path) => state(path) !== "granted");
  if (leaked.length > 0 || lost.length > 0) {
    unsafe(`load grants left: ${leaked.length}, step grants lost: ${lost.length}`);
  }
}

/** Reads the first line of stdin as the step message; undefined at end-of-file before it. */
async function readStepMessage(): Promise<
  { env: Record<string, string>; context: HarnessContext } | undefined
> {
  const decoder = new TextDecoder();
  const buffer = new Uint8Array(64 * 1024);
  let text = "";
  for (;;) {
    const read = await Deno.stdin.read(buffer);
    if (read === null) return undefined;
    text += decoder.decode(buffer.subarray(0, read), { stream: true });
    const newline = text.indexOf("\n");
    if (newline !== -1) return JSON.parse(text.slice(0, newline));
  }
}

function announce(payload: string): void {
  console.error(`${prefix}${payload}`);
}

function unsafe(reason: string): never {
  console.error(`runnel: a pre-started step process is not safe to use (${reason})`);
  announce(WARM_MARKERS.unsafe);
  Deno.exit(APPLICATION_EXIT_CODE);
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
