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
 * @module
 */

import { resolve } from "node:path";
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
import { reapProcessGroups, spawnExecution } from "../_process.ts";
import { LogQueue } from "../log_queue.ts";
import { checkModuleGraph, type GraphRefusal } from "./_imports.ts";
import {
  type ErrorReport,
  HARNESS_NONCE_ENV,
  type HarnessContext,
  markerPrefix,
  parseReport,
  PERMISSION_EXIT_CODE,
} from "./_report.ts";
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

/** Creates the `deno` backend. */
export function createDenoBackend(): ExecutionBackend {
  return {
    name: "deno",
    capabilities: denoManifest.capabilities,
    fingerprint: fingerprintDeno,
    start: startDenoStep,
    recover: reapProcessGroups,
  };
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
  const granted = sandboxPermissions(spec);
  const args = ["run", "--no-prompt"];
  for (const kind of ["read", "write", "net", "env"] as const) {
    // An empty `--allow-read=` would be rejected; leaving it out denies all.
    if (granted[kind].length > 0) args.push(`--allow-${kind}=${granted[kind].join(",")}`);
  }
  args.push(...importFlags(granted.net));
  args.push(entryPath, ...((spec.config as DenoConfig).args ?? []));
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

async function startDenoStep(spec: AttemptSpec): Promise<Execution> {
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
  const granted = sandboxPermissions(spec);
  const context: HarnessContext = {
    inputs: spec.inputs,
    outputs: Object.fromEntries(
      spec.outputs.map((name) => [name, joinPath(spec.outputsDir, name)]),
    ),
    envNames: granted.env.filter((name) => name !== HARNESS_NONCE_ENV),
    matrix: spec.matrix,
    args: config.args ?? [],
    runId: spec.runId,
    stepId: spec.stepId,
    attempt: spec.attempt,
    module: config.module,
  };
  // The context holds paths and names only; secret values travel as env vars.
  const entry = [
    `import { runStep } from ${JSON.stringify(HARNESS_URL)};`,
    `import * as step from ${JSON.stringify(new URL(`file://${modulePath}`).href)};`,
    `await runStep(step, ${JSON.stringify(context)});`,
    "",
  ].join("\n");
  const entryPath = joinPath(spec.workDir, ENTRY_FILE);
  await Deno.writeTextFile(entryPath, entry);
  const runtime: Record<string, string> = {};
  for (const name of ["PATH", "HOME", "DENO_DIR"]) {
    const value = Deno.env.get(name);
    if (value !== undefined) runtime[name] = value;
  }
  const refusal = await checkModuleGraph(modulePath, {
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
  if (refusal) return refusedExecution(spec, refusal);

  const env: Record<string, string> = { NO_COLOR: "1", ...runtime };
  for (const name of config.permissions?.env ?? []) {
    const value = Deno.env.get(name);
    if (value !== undefined) env[name] = value;
  }
  Object.assign(env, spec.env, stepEnvironment(spec));
  const nonce = randomHex(NONCE_BYTES);
  env[HARNESS_NONCE_ENV] = nonce;

  let report: ErrorReport | undefined;
  // Deno's own failures (a module that does not resolve, a syntax error)
  // happen before the harness runs; their `error: …` line is the reason.
  let stderrTail = "";
  let denoError: string | undefined;
  return spawnExecution({
    command: Deno.execPath(),
    args: denoArgs(spec, entryPath),
    cwd: spec.workDir,
    env,
    markerPrefix: markerPrefix(nonce),
    onMarker: (payload) => {
      report ??= parseReport(payload);
    },
    onStderrText: (text) => {
      if (denoError) return;
      stderrTail = (stderrTail + text).slice(-DENO_ERROR_SCAN_CHARS);
      denoError = /^error: (.+)$/m.exec(stderrTail)?.[1];
    },
    finish: (status) => {
      const fallback = denoError
        ? { errorClass: "application" as const, message: denoError }
        : undefined;
      return missingOutputStatus(spec, classifyExit(status, { report: report ?? fallback }));
    },
  });
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

export default createDenoBackend;
