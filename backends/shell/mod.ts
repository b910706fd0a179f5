/**
 * The `shell` backend: runs a step's `run` script with `/bin/sh -e -c` in
 * its own process group. Trusted commands only: nothing is sandboxed.
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
  type Fingerprint,
  InvalidStepConfigError,
  missingOutputStatus,
  stepEnvironment,
} from "../backend.ts";
import { reapProcessGroups, spawnExecution } from "../_process.ts";
import { DEFAULT_SHELL, type ShellConfig, shellConfigSchema, shellManifest } from "./manifest.ts";

/** Used when the runner's own environment has no `PATH`. */
const FALLBACK_PATH = "/usr/local/bin:/usr/bin:/bin";

/** Creates the `shell` backend. */
export function createShellBackend(): ExecutionBackend {
  return {
    name: "shell",
    capabilities: shellManifest.capabilities,
    fingerprint: fingerprintShell,
    start: startShellStep,
    recover: reapProcessGroups,
  };
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

function startShellStep(spec: AttemptSpec): Promise<Execution> {
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
  return Promise.resolve(spawnExecution({
    command: config.shell ?? DEFAULT_SHELL,
    args: ["-e", "-c", config.run],
    cwd,
    env,
    // With no declared outputs there is nothing to check: stay synchronous.
    finish: spec.outputs.length === 0
      ? (status) => classifyExit(status)
      : (status) => missingOutputStatus(spec, classifyExit(status)),
  }));
}

export default createShellBackend;
