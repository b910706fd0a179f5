/**
 * Test helpers for backends: a scratch attempt and log collection.
 *
 * @module
 */

import type { AttemptSpec, Execution, ExitStatus } from "./backend.ts";

/** Options of {@link scratchSpec}. */
export interface ScratchOptions {
  /** Files to create in the pipeline directory: relative path → contents. */
  files?: Record<string, string>;
  /** Files to create as inputs: input name → contents. */
  inputs?: Record<string, string>;
  /** Fields of the spec to override. */
  spec?: Partial<AttemptSpec>;
}

/** A spec whose directories live under a fresh temporary directory; `remove()` deletes it. */
export async function scratchSpec(
  config: Record<string, unknown>,
  options: ScratchOptions = {},
): Promise<AttemptSpec & { root: string; remove(): Promise<void> }> {
  const root = await Deno.realPath(await Deno.makeTempDir({ prefix: "runnel_backend_test_" }));
  const baseDir = `${root}/pipeline`;
  const workDir = `${root}/work`;
  const inputsDir = `${root}/inputs`;
  const outputsDir = `${root}/outputs`;
  for (const dir of [baseDir, workDir, inputsDir, outputsDir]) await Deno.mkdir(dir);
  for (const [path, text] of Object.entries(options.files ?? {})) {
    const full = `${baseDir}/${path}`;
    await Deno.mkdir(full.slice(0, full.lastIndexOf("/")), { recursive: true });
    await Deno.writeTextFile(full, text);
  }
  const inputs: Record<string, string> = {};
  for (const [name, text] of Object.entries(options.inputs ?? {})) {
    inputs[name] = `${inputsDir}/${name}`;
    await Deno.writeTextFile(inputs[name], text);
  }
  return {
    agentId: "test",
    scratchRoot: root,
    runId: "run1",
    stepId: "step",
    attemptId: "run1/step/1",
    attempt: 1,
    config,
    baseDir,
    workDir,
    inputs,
    inputsDir,
    outputsDir,
    outputs: [],
    env: {},
    matrix: {},
    ...options.spec,
    root,
    remove: () => Deno.remove(root, { recursive: true }),
  };
}

/** Reads every log chunk and waits for the exit status. */
export async function runToEnd(
  execution: Execution,
): Promise<{ status: ExitStatus; stdout: string; stderr: string }> {
  const decoder = { stdout: new TextDecoder(), stderr: new TextDecoder() };
  const text = { stdout: "", stderr: "" };
  for await (const chunk of execution.logs) {
    text[chunk.stream] += decoder[chunk.stream].decode(chunk.data, { stream: true });
  }
  const status = await execution.wait();
  await execution.cleanup();
  return { status, ...text };
}

/** Polls `check` until it returns true or `timeoutMs` passes; throws on timeout. */
export async function waitUntil(
  check: () => boolean | Promise<boolean>,
  what: string,
  timeoutMs = 10_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`Timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** True while a process with this id exists and is not a zombie awaiting its reaper. */
export async function processAlive(pid: number): Promise<boolean> {
  // Deno reads /proc/<pid> only under --allow-all, so ask ps instead.
  const { stdout } = await new Deno.Command("ps", { args: ["-o", "stat=", "-p", String(pid)] })
    .output();
  const state = new TextDecoder().decode(stdout).trim();
  return state !== "" && !state.startsWith("Z");
}
