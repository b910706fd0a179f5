/**
 * Runs one of the energy step modules inside a container, where no runnel
 * harness is: builds the module's `StepContext` from what the `docker`
 * backend provides (inputs mounted under `$RUNNEL_INPUTS`, one entry per
 * input name; outputs named by `RUNNEL_OUTPUT_*`), then calls its default
 * export. A `BusinessError` exits with code 65, as the backend expects.
 *
 * Usage (the image's entrypoint): `deno run … run_step.ts <module> [args…]`
 *
 * @module
 */

import {
  isBusinessError,
  type StepContext,
  type StepFunction,
} from "../../../backends/deno/context.ts";

/** sysexits(3) `EX_DATAERR`: the exit code of a business error. */
const BUSINESS_EXIT_CODE = 65;

async function main(): Promise<number> {
  const [module, ...args] = Deno.args;
  if (!module) {
    console.error("Expected the step module as the first argument");
    return 2;
  }
  const env = Deno.env.toObject();
  const inputs: Record<string, string> = {};
  if (env.RUNNEL_INPUTS) {
    try {
      for await (const entry of Deno.readDir(env.RUNNEL_INPUTS)) {
        inputs[entry.name] = `${env.RUNNEL_INPUTS}/${entry.name}`;
      }
    } catch {
      // No inputs mounted.
    }
  }
  const outputs: Record<string, string> = {};
  for (const [name, path] of Object.entries(env)) {
    if (name.startsWith("RUNNEL_OUTPUT_")) outputs[path.slice(path.lastIndexOf("/") + 1)] = path;
  }
  const ctx: StepContext = {
    inputs,
    outputs,
    env,
    matrix: {},
    args,
    runId: env.RUNNEL_RUN_ID ?? "",
    stepId: env.RUNNEL_STEP ?? "",
    attempt: Number(env.RUNNEL_ATTEMPT ?? "1"),
    log: (...parts: unknown[]) => console.log(...parts),
  };
  const url = new URL(module, `file://${Deno.cwd()}/`).href;
  const step: StepFunction = (await import(url)).default;
  try {
    await step(ctx);
    return 0;
  } catch (error) {
    console.error(error instanceof Error ? error.message : String(error));
    return isBusinessError(error) ? BUSINESS_EXIT_CODE : 1;
  }
}

Deno.exit(await main());
