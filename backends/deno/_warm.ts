/**
 * Warm starts of `deno` steps: sandboxed processes started before their
 * step is known, parked in the harness until the backend hands them one
 * step over stdin.
 *
 * What makes a pre-started process as safe as a cold one:
 * - It is started with the flags, cwd layout and runtime environment a cold
 *   run of the same step gets, computed from the step as if its attempt
 *   directory were the process's own *slot* (`<scratch>/.runnel-deno-warm/…`,
 *   with `in/` and `out/` inside, as an attempt has). Processes are pooled
 *   by a key of everything those flags depend on (module, its local graph,
 *   config, input layout, output and env names), never by a value of an env
 *   var or secret: those reach the process over stdin with its step, and
 *   the harness sets them before anything of the step is imported. A
 *   process started before its step is known holds no secret.
 * - A dynamic `import()` needs read access to the files it loads, which a
 *   cold run's static graph does not: the process is granted, on top of the
 *   cold flags, read of exactly the local files of the step module's graph
 *   (the files the cold run loads anyway), and a gate module that the
 *   generated step module file imports first revokes them before any step
 *   module evaluates, then checks that it did (see `_harness.ts`).
 * - A process runs at most one step, then exits; what a step left in its
 *   globals dies with it. The key's next processes are started once a
 *   step of the key has ended (see `replaceAfter` in `mod.ts`).
 * - Every process the pool (`../_warm.ts`) holds is killed by process group
 *   on `close`, on its idle timeout, and exits by itself when the host that
 *   started it is gone (its stdin reaches end-of-file).
 *
 * @module
 */

import type { ExitStatus } from "../backend.ts";
import type { WarmProcess } from "../_warm.ts";
import { WARM_MARKERS } from "./_report.ts";

export {
  DEFAULT_WARM_IDLE_MS,
  DEFAULT_WARM_PER_KEY,
  DEFAULT_WARM_TOTAL,
  WarmPool,
  type WarmPoolOptions,
  WarmProcess,
} from "../_warm.ts";

/** The step a parked harness receives: one JSON line on stdin. */
export interface WarmStepMessage {
  /** Env vars to set before the step module is imported (secrets included). */
  env: Record<string, string>;
  /** The harness context (see `_report.ts`), its paths in the process's slot. */
  context: unknown;
}

/** Applies a harness's warm marker to `process`; false for any other marker payload. */
export function onWarmMarker(process: WarmProcess<unknown>, payload: string): boolean {
  if (payload === WARM_MARKERS.parked) process.markParked();
  else if (payload === WARM_MARKERS.started) process.started = true;
  else if (payload === WARM_MARKERS.unsafe) process.unsafe = true;
  else return false;
  return true;
}

/** Hands a parked harness its step: one JSON line on stdin. */
export function sendWarmStep(
  process: WarmProcess<unknown>,
  message: WarmStepMessage,
): Promise<void> {
  return process.send(JSON.stringify(message) + "\n");
}

/** The status of a warm step whose harness did not get to run it. */
export function notRunStatus(
  status: ExitStatus,
  process: WarmProcess<unknown>,
): ExitStatus | undefined {
  if (process.unsafe) {
    return {
      ...status,
      errorClass: "infrastructure",
      message: "the pre-started deno process could not drop its load grants; the step did not run",
    };
  }
  if (!process.started) {
    return {
      ...status,
      errorClass: "infrastructure",
      message: "the pre-started deno process ended before it ran the step",
    };
  }
  return undefined;
}
