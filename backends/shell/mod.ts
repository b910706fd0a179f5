/**
 * The `shell` backend: runs a step's `run` script with `/bin/sh -e -c` in
 * its own process group. Trusted commands only: nothing is sandboxed.
 *
 * Served by a plugin host (the default export), steps of the default shell
 * run in shells parked before their step was known, once such steps repeat
 * (see `_parked.ts`): their start costs no process start.
 *
 * @module
 */

import { resolve } from "node:path";
import {
  type AttemptSpec,
  classifyExit,
  configMessages,
  type Execution,
  type ExecutionBackend,
  type ExitStatus,
  type Fingerprint,
  InvalidStepConfigError,
  missingOutputStatus,
  stepEnvironment,
} from "../backend.ts";
import { reapProcessGroups, spawnExecution } from "../_process.ts";
import { DEFAULT_SHELL, type ShellConfig, shellConfigSchema, shellManifest } from "./manifest.ts";
import { ParkedShells } from "./_parked.ts";
import { WarmPool, type WarmPoolOptions } from "../_warm.ts";

/** Used when the runner's own environment has no `PATH`. */
const FALLBACK_PATH = "/usr/local/bin:/usr/bin:/bin";

/** Options of {@link createShellBackend}. */
export interface ShellBackendOptions {
  /**
   * Park shells for steps of the default shell (`true` for the default
   * limits). Off by default: a backend that parks holds processes until
   * {@link ShellBackend.close}.
   */
  parked?: boolean | WarmPoolOptions;
}

/** The `shell` backend; `close` stops the shells it parked. */
export interface ShellBackend extends ExecutionBackend {
  /** The parked shells, when parking is on. */
  readonly parkedPool: WarmPool | undefined;
  /** Kills every parked shell and parks no more. */
  close(): Promise<void>;
}

/** Creates the `shell` backend. */
export function createShellBackend(options: ShellBackendOptions = {}): ShellBackend {
  const parked = options.parked
    ? new ParkedShells(new WarmPool(options.parked === true ? {} : options.parked))
    : undefined;
  return {
    name: "shell",
    capabilities: shellManifest.capabilities,
    fingerprint: fingerprintShell,
    start: (spec) => startShellStep(spec, parked),
    recover: reapProcessGroups,
    parkedPool: parked?.pool,
    close: () => parked?.close() ?? Promise.resolve(),
  };
}

/**
 * The backend a plugin host serves: parked shells on. The host lives across
 * steps, so a shell parked after one step serves the next; parked shells
 * exit with the host (their stdin ends).
 */
export function createHostedShellBackend(): ShellBackend {
  return createShellBackend({ parked: true });
}

/** Checks a `shell` step config; returns human messages, empty when valid. */
export function validateShellConfig(config: Record<string, unknown>): string[] {
  return configMessages(shellConfigSchema, config);
}

async function fingerprintShell(): Promise<Fingerprint> {
  try {
    const info = await Deno.stat(DEFAULT_SHELL);
    if (!info.isFile) return { available: false, detail: `${DEFAULT_SHELL} is not a file` };
    return { available: true, detail: `${DEFAULT_SHELL} found`, version: Deno.build.os };
  } catch (error) {
    return {
      available: false,
      detail: `${DEFAULT_SHELL} cannot be used: ${(error as Error).message}`,
    };
  }
}

function startShellStep(spec: AttemptSpec, parked?: ParkedShells): Promise<Execution> {
  const messages = validateShellConfig(spec.config);
  if (messages.length > 0) {
    return Promise.reject(new InvalidStepConfigError("shell", messages));
  }
  const config = spec.config as ShellConfig;
  const cwd = resolve(spec.baseDir, config.workdir ?? ".");
  const env: Record<string, string> = { PATH: Deno.env.get("PATH") ?? FALLBACK_PATH };
  for (const name of ["HOME", "LANG", "TERM"]) {
    const value = Deno.env.get(name);
    if (value !== undefined) env[name] = value;
  }
  Object.assign(env, spec.env, stepEnvironment(spec));
  // With no declared outputs there is nothing to check: stay synchronous.
  const finish = spec.outputs.length === 0
    ? (status: ExitStatus) => classifyExit(status)
    : (status: ExitStatus) => missingOutputStatus(spec, classifyExit(status));
  const shell = config.shell ?? DEFAULT_SHELL;
  const cold = () =>
    spawnExecution({ command: shell, args: ["-e", "-c", config.run], cwd, env, finish });
  if (!parked || shell !== DEFAULT_SHELL) return Promise.resolve(cold());
  return parked.run({ cwd, env, run: config.run, finish }, cold);
}

export default createHostedShellBackend;
