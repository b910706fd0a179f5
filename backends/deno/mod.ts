/**
 * The `deno` backend: runs a step module's default export in a
 * `deno run --no-prompt` subprocess that may read its inputs, write its
 * outputs directory, and reach only the hosts and env vars it declares.
 *
 * A dynamic `import()` of a local file needs read permission, so the
 * backend writes an entry file into the attempt's workDir that statically
 * imports the harness and the step module: the main module and its static
 * graph load without any grant.
 *
 * With warm starts on (a plugin host's backend), steps whose sandbox
 * repeats run in a process pre-started with that sandbox (see `_warm.ts`).
 *
 * @module
 */

import { isAbsolute, relative, resolve } from "node:path";
import {
  type AttemptSpec,
  classifyExit,
  configMessages,
  type DenoPermissions,
  type Execution,
  type ExecutionBackend,
  type ExitStatus,
  type Fingerprint,
  InvalidStepConfigError,
  joinPath,
  missingOutputStatus,
  stepEnvironment,
} from "../backend.ts";
import { parseProcessHandle, reapProcessGroups, spawnExecution } from "../_process.ts";
import { LogQueue } from "../log_queue.ts";
import { type GraphRefusal, inspectModuleGraph } from "./_imports.ts";
import {
  type ErrorReport,
  HARNESS_NONCE_ENV,
  type HarnessContext,
  markerPrefix,
  parseReport,
  PERMISSION_EXIT_CODE,
} from "./_report.ts";
import type { LoadGrants } from "./_harness.ts";
import {
  notRunStatus,
  onWarmMarker,
  sendWarmStep,
  WarmPool,
  type WarmPoolOptions,
  WarmProcess,
} from "./_warm.ts";
import { randomHex } from "../../core/_bytes.ts";
import { type DenoConfig, denoConfigSchema, denoManifest } from "./manifest.ts";

/** Name of the generated entry file inside the attempt's workDir. */
export const ENTRY_FILE = "runnel_step_entry.ts";

/** How much recent stderr is scanned for Deno's own `error:` line. */
const DENO_ERROR_SCAN_CHARS = 4_096;

/** Exit code reported for an attempt refused before it started (sysexits' `EX_NOPERM`). */
const REFUSED_EXIT_CODE = PERMISSION_EXIT_CODE;

/** Random bytes in an attempt's marker nonce: 128 bits, not to be guessed. */
const NONCE_BYTES = 16;

const HARNESS_URL = new URL("./_harness.ts", import.meta.url).href;

/** The warm step module file's first import (see `_warm_gate.ts`). */
const GATE_URL = new URL("./_warm_gate.ts", import.meta.url).href;

/** Directory of the pre-started processes' slots, in the scratch root. */
export const WARM_DIR = ".runnel-deno-warm";

/** Name of a warm slot's module file: imports the gate, then the step module. */
const WARM_MODULE_FILE = "runnel_step_module.ts";

/**
 * Env vars a Deno process reads when it starts (time zone, locale, colours):
 * set later by a parked harness they would not take the effect they take
 * in a cold run, so a step granted one runs cold. Case-insensitive.
 */
const STARTUP_ENV = /^(TZ|LANG|LANGUAGE|LC_\w+|NO_COLOR|FORCE_COLOR|CLICOLOR\w*|TERM)$/i;

/** runnel's library entry: a step may import the step API (`BusinessError`) from it. */
const LIBRARY_URL = new URL("../../mod.ts", import.meta.url).href;

/**
 * Env vars that configure the Deno runtime, the dynamic linker or the
 * network stack of the step's process rather than the step: set by a
 * pipeline (`env:`, a secret's name), they would reach around the sandbox
 * (`LD_PRELOAD` of an input file, a `DENO_DIR` or `XDG_CACHE_HOME` full of
 * forged code caches, `DENO_V8_FLAGS`, a proxy). Case-insensitive.
 */
const RUNTIME_ENV =
  /^(LD_\w*|DENO_\w*|NODE_\w*|NPM_CONFIG_\w*|RUST_\w*|XDG_\w*|V8_\w*|MALLOC_\w*|GLIBC_TUNABLES|SSL_CERT_\w*|HOME|PATH|(HTTPS?|ALL|NO)_PROXY)$/i;

/**
 * `host:port` of the harness when runnel itself was loaded over http(s)
 * (imported by URL): the step's entry file imports the harness from there.
 */
const HARNESS_IMPORT_HOST = (() => {
  const url = new URL(HARNESS_URL);
  if (url.protocol !== "http:" && url.protocol !== "https:") return undefined;
  return `${url.hostname}:${url.port || (url.protocol === "https:" ? "443" : "80")}`;
})();

/** Options of {@link createDenoBackend}. */
export interface DenoBackendOptions {
  /**
   * Pre-start sandboxed processes for steps whose sandbox repeats (`true`
   * for the default limits). Off by default: a backend that pre-starts
   * holds processes until {@link DenoBackend.close}.
   */
  warm?: boolean | WarmPoolOptions;
}

/** The `deno` backend; `close` stops the processes it pre-started. */
export interface DenoBackend extends ExecutionBackend {
  /** The pre-started processes, when warm starts are on. */
  readonly warmPool: WarmPool | undefined;
  /** Kills every pre-started process and starts no more. */
  close(): Promise<void>;
}

/** Creates the `deno` backend. */
export function createDenoBackend(options: DenoBackendOptions = {}): DenoBackend {
  const pool = options.warm ? new WarmPool(options.warm === true ? {} : options.warm) : undefined;
  return {
    name: "deno",
    capabilities: denoManifest.capabilities,
    fingerprint: fingerprintDeno,
    start: (spec) => startDenoStep(spec, pool),
    recover: reapProcessGroups,
    warmPool: pool,
    close: () => pool?.close() ?? Promise.resolve(),
  };
}

/**
 * The backend a plugin host serves: warm starts on. The host lives across
 * steps, so its pre-started processes serve the next step of a key; they
 * exit with the host (their stdin ends).
 */
export function createHostedDenoBackend(): DenoBackend {
  return createDenoBackend({ warm: true });
}

/** Checks a `deno` step config; returns human messages, empty when valid. */
export function validateDenoConfig(config: Record<string, unknown>): string[] {
  return configMessages(denoConfigSchema, config);
}

/**
 * The permissions the step's subprocess is granted: its inputs (and
 * `permissions.read`), its outputs directory (and `permissions.write`), the
 * hosts it declares, and the env vars it receives or declares, plus the
 * harness's nonce variable (gone from the environment before step code
 * runs). Never run, ffi or sys.
 */
export function sandboxPermissions(spec: AttemptSpec): DenoPermissions {
  const config = spec.config as DenoConfig;
  const declared = config.permissions ?? {};
  return {
    read: unique([
      ...Object.values(spec.inputs),
      ...(declared.read ?? []).map((path) => resolve(spec.baseDir, path)),
    ]),
    write: unique([
      spec.outputsDir,
      ...(declared.write ?? []).map((path) => resolve(spec.baseDir, path)),
    ]),
    net: unique(declared.net ?? []),
    env: unique([
      ...Object.keys(spec.env),
      ...Object.keys(stepEnvironment(spec)),
      ...(declared.env ?? []),
      HARNESS_NONCE_ENV,
    ]).sort(),
    run: [],
  };
}

/** The `deno` command-line arguments (after the executable) for a step. */
export function denoArgs(spec: AttemptSpec, entryPath: string): string[] {
  return sandboxArgs(sandboxPermissions(spec), [
    entryPath,
    ...((spec.config as DenoConfig).args ?? []),
  ]);
}

/** `deno run` with `granted`, then `rest` (the entry file and the step's args). */
function sandboxArgs(granted: DenoPermissions, rest: string[]): string[] {
  const args = ["run", "--no-prompt"];
  for (const kind of ["read", "write", "net", "env"] as const) {
    // An empty `--allow-read=` would be rejected; leaving it out denies all.
    if (granted[kind].length > 0) args.push(`--allow-${kind}=${granted[kind].join(",")}`);
  }
  args.push(...importFlags(granted.net));
  args.push(...rest);
  return args;
}

/**
 * Where a step may load modules from besides its pipeline directory: the
 * hosts it is granted (and the harness's, when runnel itself was imported
 * by URL). Without a flag Deno would import from its default hosts
 * (deno.land, esm.sh…), a way out for a step granted nothing
 * (an import of a URL whose path is a secret); such a step fetches nothing at
 * all, not even an npm package (its name would reach the registry), and
 * loads only what is cached (runnel's own npm dependencies, say).
 */
export function importFlags(grantedNet: string[]): string[] {
  const hosts = unique([...grantedNet, ...(HARNESS_IMPORT_HOST ? [HARNESS_IMPORT_HOST] : [])]);
  const flags = hosts.length > 0 ? [`--allow-import=${hosts.join(",")}`] : ["--no-remote"];
  if (grantedNet.length === 0) flags.push("--cached-only");
  return flags;
}

async function fingerprintDeno(): Promise<Fingerprint> {
  const execPath = Deno.execPath();
  try {
    await Deno.stat(execPath);
    return { available: true, detail: `deno at ${execPath}`, version: Deno.version.deno };
  } catch (error) {
    return {
      available: false,
      detail: `deno executable ${execPath} cannot be used: ${(error as Error).message}`,
    };
  }
}

async function startDenoStep(spec: AttemptSpec, pool?: WarmPool): Promise<Execution> {
  const messages = validateDenoConfig(spec.config);
  if (messages.length > 0) throw new InvalidStepConfigError("deno", messages);
  const config = spec.config as DenoConfig;
  const runtimeEnv = Object.keys(spec.env).filter((name) => RUNTIME_ENV.test(name));
  if (runtimeEnv.length > 0) {
    return refusedExecution(spec, {
      errorClass: "permission",
      message: `a deno step cannot set ${runtimeEnv.map((name) => `"${name}"`).join(", ")}: ` +
        "it configures the Deno runtime or the process, not the step",
    });
  }
  const modulePath = resolve(spec.baseDir, config.module);
  const context = harnessContext(spec);
  // The context holds paths and names only; secret values travel as env vars.
  const entry = [
    `import { runStep } from ${JSON.stringify(HARNESS_URL)};`,
    `import * as step from ${JSON.stringify(fileUrl(modulePath))};`,
    `await runStep(step, ${JSON.stringify(context)});`,
    "",
  ].join("\n");
  const entryPath = joinPath(spec.workDir, ENTRY_FILE);
  await Deno.writeTextFile(entryPath, entry);
  const runtime = runtimeEnvironment();
  const graph = await inspectModuleGraph(modulePath, {
    entryPath,
    harnessUrl: HARNESS_URL,
    libraryUrl: LIBRARY_URL,
    baseDir: spec.baseDir,
    scratchRoot: spec.scratchRoot,
    cwd: spec.workDir,
    // Remote modules cannot import local files, and the run's own flags
    // bound them: only the harness's origin is fetched from (into the cache
    // a step granted no host loads from), npm packages not at all.
    flags: [
      HARNESS_IMPORT_HOST ? `--allow-import=${HARNESS_IMPORT_HOST}` : "--no-remote",
      "--no-npm",
    ],
    env: runtime,
  });
  if (graph.refusal) return refusedExecution(spec, graph.refusal);

  const plan = pool && graph.loads ? warmPlan(spec, modulePath, graph.loads, runtime) : undefined;
  const execution = pool && plan ? await startPooled(pool, plan, spec) : undefined;
  if (execution) return execution;

  const env: Record<string, string> = { NO_COLOR: "1", ...runtime, ...stepEnv(spec) };
  const nonce = randomHex(NONCE_BYTES);
  env[HARNESS_NONCE_ENV] = nonce;
  const watch = new StepWatch();
  const cold = spawnExecution({
    command: Deno.execPath(),
    args: denoArgs(spec, entryPath),
    cwd: spec.workDir,
    env,
    markerPrefix: markerPrefix(nonce),
    onMarker: watch.onMarker,
    onStderrText: watch.onStderrText,
    finish: (status) => watch.finish(spec, status),
  });
  if (pool && plan) replaceAfter(cold, pool, plan);
  return cold;
}

/** Runs `spec` in a pre-started process of its key, if the pool has one. */
async function startPooled(
  pool: WarmPool,
  plan: WarmPlan,
  spec: AttemptSpec,
): Promise<Execution | undefined> {
  pool.noteStep(plan.key);
  const warm = pool.take<StepWatch>(plan.key);
  const execution = warm ? await startWarm(warm, spec, plan) : undefined;
  if (execution) replaceAfter(execution, pool, plan);
  return execution;
}

/**
 * Pre-starts the next process of `plan`'s key once `execution` has ended:
 * not beside it, where on a busy machine (two cores) its start-up slows the
 * step down by more than it saves the next one.
 */
function replaceAfter(execution: Execution, pool: WarmPool, plan: WarmPlan): void {
  const replace = () => pool.prestart(plan.key, () => launchWarm(plan));
  execution.wait().then(replace, replace);
}

/** What the harness is told of the attempt: paths and names, no secret values. */
function harnessContext(spec: AttemptSpec): HarnessContext {
  const config = spec.config as DenoConfig;
  return {
    inputs: spec.inputs,
    outputs: Object.fromEntries(
      spec.outputs.map((name) => [name, joinPath(spec.outputsDir, name)]),
    ),
    envNames: sandboxPermissions(spec).env.filter((name) => name !== HARNESS_NONCE_ENV),
    matrix: spec.matrix,
    args: config.args ?? [],
    runId: spec.runId,
    stepId: spec.stepId,
    attempt: spec.attempt,
    module: config.module,
  };
}

/** The runner's variables Deno itself needs (its cache, the home it derives paths from). */
function runtimeEnvironment(): Record<string, string> {
  const runtime: Record<string, string> = {};
  for (const name of ["PATH", "HOME", "DENO_DIR"]) {
    const value = Deno.env.get(name);
    if (value !== undefined) runtime[name] = value;
  }
  return runtime;
}

/** The step's own env vars: those it declares (from the runner's), its `env`, and `RUNNEL_*`. */
function stepEnv(spec: AttemptSpec): Record<string, string> {
  const env: Record<string, string> = {};
  for (const name of (spec.config as DenoConfig).permissions?.env ?? []) {
    const value = Deno.env.get(name);
    if (value !== undefined) env[name] = value;
  }
  return Object.assign(env, spec.env, stepEnvironment(spec));
}

/** Watches a step's stderr for the harness's report and Deno's own `error:` line. */
class StepWatch {
  report: ErrorReport | undefined;
  // Deno's own failures (a module that does not resolve, a syntax error)
  // happen before the harness runs; their `error: …` line is the reason.
  #stderrTail = "";
  #denoError: string | undefined;

  onMarker = (payload: string): void => {
    this.report ??= parseReport(payload);
  };

  onStderrText = (text: string): void => {
    if (this.#denoError) return;
    this.#stderrTail = (this.#stderrTail + text).slice(-DENO_ERROR_SCAN_CHARS);
    this.#denoError = /^error: (.+)$/m.exec(this.#stderrTail)?.[1];
  };

  /** The attempt's status from its process's exit. */
  finish(spec: AttemptSpec, status: ExitStatus): Promise<ExitStatus> {
    const fallback = this.#denoError
      ? { errorClass: "application" as const, message: this.#denoError }
      : undefined;
    return missingOutputStatus(spec, classifyExit(status, { report: this.report ?? fallback }));
  }
}

/** What a warm start of a step needs: the pool key and how to lay out a slot. */
interface WarmPlan {
  /**
   * Everything the process's flags, cwd layout and start environment
   * depend on; env var *names* only, never values.
   */
  key: string;
  /** A step of the key (its paths are replaced by the slot's). */
  template: AttemptSpec;
  modulePath: string;
  /** Local files of the step module's graph. */
  loads: string[];
  /** Input name → path relative to the inputs directory. */
  inputs: Record<string, string>;
  runtime: Record<string, string>;
}

/**
 * The warm plan of a step, or undefined when a warm start could not run
 * it exactly as a cold one: its env includes a variable read at start-up,
 * an input lies outside its inputs directory, or runnel is not loaded from
 * local files.
 */
function warmPlan(
  spec: AttemptSpec,
  modulePath: string,
  loads: string[],
  runtime: Record<string, string>,
): WarmPlan | undefined {
  if (!GATE_URL.startsWith("file:") || !HARNESS_URL.startsWith("file:")) return undefined;
  const config = spec.config as DenoConfig;
  const envNames = unique([...Object.keys(spec.env), ...(config.permissions?.env ?? [])]).sort();
  if (envNames.some((name) => STARTUP_ENV.test(name))) return undefined;
  const inputs: Record<string, string> = {};
  for (const [name, path] of Object.entries(spec.inputs)) {
    const inside = relative(spec.inputsDir, path);
    if (!inside || inside.startsWith("..") || isAbsolute(inside)) return undefined;
    inputs[name] = inside;
  }
  // The inputs directory moves into the slot for the step: it must hold nothing else of the attempt.
  if (
    Object.keys(inputs).length > 0 &&
    (isInside(spec.workDir, spec.inputsDir) || isInside(spec.outputsDir, spec.inputsDir))
  ) {
    return undefined;
  }
  const key = JSON.stringify([
    modulePath,
    spec.baseDir,
    spec.scratchRoot,
    config,
    Object.entries(inputs).sort(),
    [...spec.outputs].sort(),
    Object.keys(spec.matrix).sort(),
    envNames,
    loads,
    runtime,
  ]);
  // The template outlives its step (it lays out the next processes): names only, no values.
  const template = {
    ...spec,
    env: Object.fromEntries(Object.keys(spec.env).map((name) => [name, ""])),
  };
  return { key, template, modulePath, loads, inputs, runtime };
}

/** `spec` as run in `slot`: its attempt directories are the slot's. */
function slotSpec(spec: AttemptSpec, slot: string, inputs: Record<string, string>): AttemptSpec {
  return {
    ...spec,
    workDir: slot,
    inputsDir: joinPath(slot, "in"),
    outputsDir: joinPath(slot, "out"),
    inputs: Object.fromEntries(
      Object.entries(inputs).map((
        [name, inside],
      ) => [name, joinPath(joinPath(slot, "in"), inside)]),
    ),
  };
}

/**
 * Pre-starts a process for `plan`'s key: the cold flags of its step laid
 * out in a fresh slot, plus read of the step module's graph until the gate
 * drops it; its environment is the runtime's and its nonce, nothing of a
 * step.
 */
async function launchWarm(plan: WarmPlan): Promise<WarmProcess<StepWatch>> {
  const root = joinPath(plan.template.scratchRoot, WARM_DIR);
  await Deno.mkdir(root, { recursive: true });
  const slot = await Deno.makeTempDir({ dir: root, prefix: "slot-" });
  try {
    await Deno.mkdir(joinPath(slot, "out"));
    const spec = slotSpec(plan.template, slot, plan.inputs);
    const granted = sandboxPermissions(spec);
    const moduleFile = joinPath(slot, WARM_MODULE_FILE);
    const loads = [moduleFile, new URL(GATE_URL).pathname, ...plan.loads];
    for (const path of plan.loads) {
      const real = await Deno.realPath(path).catch(() => path);
      if (real !== path) loads.push(real);
    }
    const grants: LoadGrants = {
      // Files a cold grant covers stay readable: revoking one would take its directory's grant too.
      temporary: unique(loads).filter((path) => !granted.read.some((dir) => isInside(path, dir))),
      kept: granted.read,
    };
    await Deno.writeTextFile(
      moduleFile,
      `import ${JSON.stringify(GATE_URL)};\n` +
        `export * as step from ${JSON.stringify(fileUrl(plan.modulePath))};\n`,
    );
    const entryPath = joinPath(slot, ENTRY_FILE);
    await Deno.writeTextFile(
      entryPath,
      `import { parkStep } from ${JSON.stringify(HARNESS_URL)};\n` +
        `await parkStep(${JSON.stringify(fileUrl(moduleFile))}, ${JSON.stringify(grants)});\n`,
    );
    const nonce = randomHex(NONCE_BYTES);
    const watch = new StepWatch();
    // Markers arrive after the spawn returns, once the process is known.
    const spawned: { process?: WarmProcess<StepWatch> } = {};
    let stdin: WritableStream<Uint8Array> | undefined;
    const execution = spawnExecution({
      command: Deno.execPath(),
      args: sandboxArgs(
        { ...granted, read: [...granted.read, ...grants.temporary] },
        [entryPath, ...((spec.config as DenoConfig).args ?? [])],
      ),
      cwd: slot,
      env: { NO_COLOR: "1", ...plan.runtime, [HARNESS_NONCE_ENV]: nonce },
      markerPrefix: markerPrefix(nonce),
      onMarker: (payload) => {
        if (!spawned.process || !onWarmMarker(spawned.process, payload)) watch.onMarker(payload);
      },
      onStderrText: watch.onStderrText,
      onStdin: (stream) => stdin = stream,
    });
    const process = new WarmProcess(
      plan.key,
      slot,
      parseProcessHandle(execution.handle)!.pid,
      watch,
    );
    spawned.process = process;
    process.bind(execution, stdin!);
    return process;
  } catch (error) {
    await Deno.remove(slot, { recursive: true }).catch(() => {});
    throw error;
  }
}

/**
 * Hands `spec` to a pre-started process: moves its inputs into the slot,
 * sends env and context; undefined (the process stopped, the step left as
 * it was) when that fails, so the step starts cold.
 */
async function startWarm(
  process: WarmProcess<StepWatch>,
  spec: AttemptSpec,
  plan: WarmPlan,
): Promise<Execution | undefined> {
  // Every pre-started deno process is launched with a slot of its own.
  const slotted = slotSpec(spec, process.slot!, plan.inputs);
  const movesInputs = Object.keys(plan.inputs).length > 0;
  try {
    if (movesInputs) await Deno.rename(spec.inputsDir, slotted.inputsDir);
  } catch {
    await process.stop();
    return undefined;
  }
  try {
    await sendWarmStep(process, { env: stepEnv(slotted), context: harnessContext(slotted) });
  } catch {
    await process.stop();
    if (movesInputs) await Deno.rename(slotted.inputsDir, spec.inputsDir).catch(() => {});
    return undefined;
  }
  return warmExecution(process, spec, slotted, movesInputs);
}

/**
 * The execution of a step in a pre-started process: once it has ended,
 * its outputs move from the slot to the attempt's outputs directory and
 * its inputs back, before its status is known.
 */
function warmExecution(
  process: WarmProcess<StepWatch>,
  spec: AttemptSpec,
  slotted: AttemptSpec,
  movedInputs: boolean,
): Execution {
  const inner = process.execution;
  let finalStatus: ExitStatus | undefined;
  const waitPromise = inner.wait().then(async (status): Promise<ExitStatus> => {
    const problem = await restoreSlot(spec, slotted, movedInputs);
    await Deno.remove(process.slot!, { recursive: true }).catch(() => {});
    if (status.errorClass === "cancelled") return status;
    const failed = status.exitCode === 0 ? 1 : status.exitCode;
    const notRun = notRunStatus(status, process);
    if (notRun) return { ...notRun, exitCode: failed };
    if (problem) {
      return { ...status, exitCode: failed, errorClass: "infrastructure", message: problem };
    }
    return process.watch.finish(spec, status);
  });
  waitPromise.then((status) => finalStatus = status, () => {});
  return {
    handle: inner.handle,
    logs: inner.logs,
    wait: () => waitPromise,
    status: () =>
      Promise.resolve(finalStatus ? { state: "exited", exit: finalStatus } : { state: "running" }),
    cancel: (graceMs) => inner.cancel(graceMs),
    async cleanup() {
      await inner.cleanup();
      await waitPromise.catch(() => {});
    },
  };
}

/** Moves what the step wrote to the attempt's outputs directory, and its inputs back; a problem, or undefined. */
async function restoreSlot(
  spec: AttemptSpec,
  slotted: AttemptSpec,
  movedInputs: boolean,
): Promise<string | undefined> {
  let problem: string | undefined;
  try {
    for await (const entry of Deno.readDir(slotted.outputsDir)) {
      await Deno.rename(
        joinPath(slotted.outputsDir, entry.name),
        joinPath(spec.outputsDir, entry.name),
      );
    }
  } catch (error) {
    problem = `could not move the step's outputs from its pre-started process: ${error}`;
  }
  if (movedInputs) {
    await Deno.rename(slotted.inputsDir, spec.inputsDir).catch((error) => {
      problem ??= `could not move the step's inputs back: ${error}`;
    });
  }
  return problem;
}

/**
 * An attempt refused before anything started: its status says why, and so
 * does one line of its log.
 */
function refusedExecution(spec: AttemptSpec, refusal: GraphRefusal): Execution {
  const status: ExitStatus = { exitCode: REFUSED_EXIT_CODE, ...refusal };
  const logs = new LogQueue();
  logs.push({ stream: "stderr", data: new TextEncoder().encode(`runnel: ${refusal.message}\n`) });
  logs.close();
  return {
    // Names no process: recover ignores it.
    handle: `refused:${spec.attemptId}`,
    logs,
    wait: () => Promise.resolve(status),
    status: () => Promise.resolve({ state: "exited", exit: status }),
    cancel: () => Promise.resolve(),
    cleanup: () => Promise.resolve(),
  };
}

function unique(values: string[]): string[] {
  return [...new Set(values)];
}

function isInside(path: string, dir: string): boolean {
  return path === dir || path.startsWith(dir.endsWith("/") ? dir : `${dir}/`);
}

function fileUrl(path: string): string {
  return new URL(`file://${path}`).href;
}

export default createHostedDenoBackend;
