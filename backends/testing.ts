/**
 * Testing an execution backend, for plugin authors: a scratch attempt to
 * start, a way to run one to its end, and {@link checkBackendConformance},
 * which holds a backend to the contract every backend keeps (start, logs,
 * wait, status, cancel, cleanup, recover with any handle, re-attach when
 * it says it can).
 *
 * Import it as `@runnel/runnel/testing`, or by path or URL as
 * `…/backends/testing.ts`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { checkBackendConformance } from "./testing.ts";
 * import createShellBackend from "./shell/mod.ts";
 *
 * const report = await checkBackendConformance({
 *   backend: createShellBackend,
 *   echo: { config: { run: "echo hello" }, stdout: "hello\n" },
 *   long: { config: { run: "sleep 60" } },
 * });
 * assert.deepEqual(report.skipped, ["re-attaches after a restart"]);
 * assert.ok(report.passed.includes("cancels a running step"));
 * ```
 *
 * @module
 */

import assert from "node:assert/strict";
import type { AttemptSpec, Execution, ExecutionBackend, ExitStatus } from "./backend.ts";
import { isSuccess } from "./backend.ts";
import { raceTimeout } from "../core/_async.ts";

/** Options of {@link scratchSpec}. */
export interface ScratchOptions {
  /** Files to create in the pipeline directory: relative path → contents. */
  files?: Record<string, string>;
  /** Files to create as inputs: input name → contents. */
  inputs?: Record<string, string>;
  /** Fields of the spec to override. */
  spec?: Partial<AttemptSpec>;
}

/** An attempt whose directories live under one fresh temporary directory. */
export interface ScratchAttempt extends AttemptSpec, AsyncDisposable {
  /** The temporary directory (also the spec's `scratchRoot`). */
  root: string;
  /** Deletes the temporary directory; `await using` does it too. */
  remove(): Promise<void>;
}

/**
 * A complete {@link AttemptSpec} for `config`, its directories made under a
 * fresh temporary directory: `pipeline/` (the `baseDir`, holding
 * `options.files`), `work/`, `inputs/` (one file per `options.inputs`
 * entry) and `outputs/`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { runToEnd, scratchSpec } from "./testing.ts";
 * import createShellBackend from "./shell/mod.ts";
 *
 * await using spec = await scratchSpec(
 *   { run: 'tr a-z A-Z < "$RUNNEL_INPUT_WORDS" > "$RUNNEL_OUTPUT_UPPER_TXT"' },
 *   { inputs: { words: "hello\n" }, spec: { outputs: ["upper.txt"] } },
 * );
 * const { status } = await runToEnd(await createShellBackend().start(spec));
 * assert.deepEqual(status, { exitCode: 0 });
 * assert.equal(await Deno.readTextFile(`${spec.outputsDir}/upper.txt`), "HELLO\n");
 * ```
 */
export async function scratchSpec(
  config: Record<string, unknown>,
  options: ScratchOptions = {},
): Promise<ScratchAttempt> {
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
  const remove = () => Deno.remove(root, { recursive: true });
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
    remove,
    [Symbol.asyncDispose]: () => remove().catch(() => {}),
  };
}

/** What {@link runToEnd} collects. */
export interface RunResult {
  status: ExitStatus;
  /** Everything the attempt wrote to stdout, decoded as UTF-8. */
  stdout: string;
  /** Everything it wrote to stderr. */
  stderr: string;
}

/** Reads every log chunk, waits for the exit status, then cleans the execution up. */
export async function runToEnd(execution: Execution): Promise<RunResult> {
  const result = await collect(execution);
  await execution.cleanup();
  return result;
}

/** Reads every log chunk and waits for the exit status. */
async function collect(execution: Execution): Promise<RunResult> {
  const decoder = { stdout: new TextDecoder(), stderr: new TextDecoder() };
  const text = { stdout: "", stderr: "" };
  for await (const chunk of execution.logs) {
    text[chunk.stream] += decoder[chunk.stream].decode(chunk.data, { stream: true });
  }
  const status = await execution.wait();
  return {
    status,
    stdout: text.stdout + decoder.stdout.decode(),
    stderr: text.stderr + decoder.stderr.decode(),
  };
}

/** Options of {@link checkBackendConformance}. */
export interface ConformanceOptions {
  /**
   * Makes the backend under test. Called once more to stand for a
   * restarted runner, whose `recover` must find what the first one left.
   */
  backend: () => ExecutionBackend;
  /** A step config that writes `stdout` (exactly) to its standard output and exits 0. */
  echo: { config: Record<string, unknown>; stdout: string };
  /** A step config that runs until it is cancelled (a minute or more). */
  long: { config: Record<string, unknown> };
  /** Files of the pipeline directory both steps may need (see {@link ScratchOptions.files}). */
  files?: Record<string, string>;
  /** Grace period of the cancel (default 2 s). */
  cancelGraceMs?: number;
  /** Longest any one check may take (default 60 s). */
  timeoutMs?: number;
}

/** What {@link checkBackendConformance} checked. */
export interface ConformanceReport {
  /** The checks passed, in order. */
  passed: string[];
  /** Checks that do not apply to this backend (by its declared capabilities). */
  skipped: string[];
}

/** A backend broke the contract; the message says which check and how. */
export class BackendConformanceError extends Error {
  /** Stable error code. */
  readonly code = "backend_nonconformant";
  /** The check that failed. */
  readonly check: string;

  /** Builds the error from the backend name, the check and its failure. */
  constructor(backend: string, check: string, cause: unknown) {
    super(
      `Expected backend "${backend}" to pass "${check}": ${
        cause instanceof Error ? cause.message : String(cause)
      }`,
      { cause },
    );
    this.name = "BackendConformanceError";
    this.check = check;
  }
}

const DEFAULT_CONFORMANCE_GRACE_MS = 2_000;
const DEFAULT_CONFORMANCE_TIMEOUT_MS = 60_000;

/**
 * Runs `backend` through the contract every {@link ExecutionBackend} keeps,
 * with real attempts of the two step configs given; throws a
 * {@link BackendConformanceError} at the first check that fails.
 *
 * Each run uses an agent id of its own, so `recover` (which reaps whatever
 * that agent left) touches nothing else.
 *
 * @example Through a plugin host, as the runner runs a backend
 * ```ts
 * import assert from "node:assert/strict";
 * import { builtinPlugins, PluginHostPool } from "./mod.ts";
 * import { checkBackendConformance } from "./testing.ts";
 *
 * const scratchRoot = await Deno.makeTempDir();
 * const pool = new PluginHostPool({
 *   plugins: builtinPlugins(),
 *   context: { scratchRoot, agentId: "conformance" },
 * });
 * try {
 *   const report = await checkBackendConformance({
 *     backend: () => pool.backend("shell"),
 *     echo: { config: { run: "echo hello" }, stdout: "hello\n" },
 *     long: { config: { run: "sleep 60" } },
 *   });
 *   assert.deepEqual(report.skipped, ["re-attaches after a restart"]);
 *   assert.equal(report.passed.length, 5);
 * } finally {
 *   await pool.close();
 *   await Deno.remove(scratchRoot, { recursive: true });
 * }
 * ```
 */
export async function checkBackendConformance(
  options: ConformanceOptions,
): Promise<ConformanceReport> {
  const backend = options.backend();
  const report: ConformanceReport = { passed: [], skipped: [] };
  const graceMs = options.cancelGraceMs ?? DEFAULT_CONFORMANCE_GRACE_MS;
  const timeoutMs = options.timeoutMs ?? DEFAULT_CONFORMANCE_TIMEOUT_MS;
  const agentId = `conformance-${crypto.randomUUID().slice(0, 8)}`;
  const check = async (name: string, body: () => Promise<void>) => {
    const run = body();
    try {
      if (await raceTimeout(run, timeoutMs)) {
        throw new Error(`it did not finish within ${timeoutMs} ms`);
      }
      await run;
    } catch (error) {
      throw new BackendConformanceError(backend.name, name, error);
    }
    report.passed.push(name);
  };
  let attempts = 0;
  const scratch = (config: Record<string, unknown>) => {
    const attempt = ++attempts;
    return scratchSpec(config, {
      files: options.files,
      spec: { agentId, attempt, attemptId: `${agentId}/step/${attempt}` },
    });
  };
  await using echo = await scratch(options.echo.config);
  await using long = await scratch(options.long.config);
  let echoHandle = "";

  await check("declares itself and is available here", async () => {
    assert.equal(typeof backend.name, "string");
    assert.ok(backend.name.length > 0, "a name");
    const { reattach, usage } = backend.capabilities;
    assert.equal(typeof reattach, "boolean", "capabilities.reattach");
    assert.equal(typeof usage, "boolean", "capabilities.usage");
    const fingerprint = await backend.fingerprint();
    assert.equal(typeof fingerprint.detail, "string", "fingerprint.detail");
    assert.ok(fingerprint.available, `available here (${fingerprint.detail})`);
  });

  await check("runs a step: logs, then its exit", async () => {
    const execution = await backend.start(echo);
    assert.equal(typeof execution.handle, "string");
    assert.ok(execution.handle.length > 0, "a handle");
    echoHandle = execution.handle;
    try {
      const result = await collect(execution);
      assert.ok(isSuccess(result.status), `success, got ${JSON.stringify(result.status)}`);
      assert.equal(result.stdout, options.echo.stdout, "its stdout");
      assert.deepEqual(await execution.status(), { state: "exited", exit: result.status });
    } finally {
      await execution.cleanup();
    }
  });

  await check("cancels a running step", async () => {
    const execution = await backend.start(long);
    try {
      assert.equal((await execution.status()).state, "running", "running before the cancel");
      const drained = (async () => {
        for await (const _ of execution.logs) { /* drained */ }
      })();
      await execution.cancel(graceMs);
      const status = await execution.wait();
      assert.equal(status.errorClass, "cancelled", JSON.stringify(status));
      await drained;
      assert.equal((await execution.status()).state, "exited");
    } finally {
      await execution.cleanup();
    }
  });

  await check("recovers nothing from stale or garbage handles", async () => {
    // What a restarted runner may hand back from its records: the handles
    // of attempts long gone, and whatever a damaged record holds.
    const restarted = options.backend();
    const handles = [echoHandle, "", "no such handle", "../../etc", "1@0", "0"];
    const keep = [echo.attemptId, long.attemptId];
    assert.deepEqual(await restarted.recover({ agentId, keep, handles }), []);
  });

  const reattach = "re-attaches after a restart";
  if (!backend.capabilities.reattach) {
    report.skipped.push(reattach);
  } else {
    await check(reattach, async () => {
      const first = await backend.start({ ...long, attemptId: `${long.attemptId}-again` });
      try {
        const restarted = options.backend();
        const found = await restarted.recover({ agentId, keep: [`${long.attemptId}-again`] });
        assert.deepEqual(found.map((attempt) => attempt.attemptId), [`${long.attemptId}-again`]);
        const [{ execution }] = found;
        assert.equal((await execution.status()).state, "running", "still running");
        await execution.cancel(graceMs);
        assert.equal((await execution.wait()).errorClass, "cancelled");
        await execution.cleanup();
      } finally {
        await first.cleanup();
      }
    });
  }

  await check("cleans up twice without complaint", async () => {
    const execution = await backend.start(echo);
    await runToEnd(execution);
    await execution.cleanup();
    await execution.cleanup();
  });
  return report;
}
