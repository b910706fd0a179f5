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
  type Fingerprint,
  InvalidStepConfigError,
  joinPath,
  missingOutputStatus,
  stepEnvironment,
} from "../backend.ts";
import { reapProcessGroups, spawnExecution } from "../_process.ts";
import {
  type ErrorReport,
  HARNESS_NONCE_ENV,
  type HarnessContext,
  markerPrefix,
  parseReport,
} from "./_report.ts";
import { randomHex } from "../../core/_bytes.ts";
import { type DenoConfig, denoConfigSchema, denoManifest } from "./manifest.ts";

/** Name of the generated entry file inside the attempt's workDir. */
export const ENTRY_FILE = "runnel_step_entry.ts";

/** How much recent stderr is scanned for Deno's own `error:` line. */
const DENO_ERROR_SCAN_CHARS = 4_096;

/** Random bytes in an attempt's marker nonce: 128 bits, not to be guessed. */
const NONCE_BYTES = 16;

const HARNESS_URL = new URL("./_harness.ts", import.meta.url).href;

/**
 * Hosts Deno lets a program import from when `--allow-import` is not
 * given (Deno's documented default list). A step granted the harness's
 * origin keeps them: granting one host must not take the others away.
 */
const DEFAULT_IMPORT_HOSTS = [
  "deno.land:443",
  "jsr.io:443",
  "esm.sh:443",
  "cdn.jsdelivr.net:443",
  "raw.githubusercontent.com:443",
  "user.githubusercontent.com:443",
];

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
  if (HARNESS_IMPORT_HOST && !DEFAULT_IMPORT_HOSTS.includes(HARNESS_IMPORT_HOST)) {
    args.push(`--allow-import=${[...DEFAULT_IMPORT_HOSTS, HARNESS_IMPORT_HOST].join(",")}`);
  }
  args.push(entryPath, ...((spec.config as DenoConfig).args ?? []));
  return args;
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

  const env: Record<string, string> = { NO_COLOR: "1" };
  for (const name of ["PATH", "HOME", "DENO_DIR", ...(config.permissions?.env ?? [])]) {
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

function unique(values: string[]): string[] {
  return [...new Set(values)];
}

export default createDenoBackend;
