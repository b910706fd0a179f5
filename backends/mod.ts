/**
 * The backends a runner can use: the built-in ones and third-party plugins
 * named in agent config, each run in sandboxed plugin hosts
 * ({@link PluginHostPool}). Only manifests are imported here; no backend
 * code runs in the runner's process.
 *
 * @module
 */

import { isAbsolute, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { denoManifest } from "./deno/manifest.ts";
import { dockerManifest } from "./docker/manifest.ts";
import { kubernetesManifest } from "./kubernetes/manifest.ts";
import { shellManifest } from "./shell/manifest.ts";
import { sshManifest } from "./ssh/manifest.ts";
import type { PluginHostPool, PluginSource } from "./plugin_host/pool.ts";
import type { Diagnostic } from "../core/errors.ts";
import type { Plan } from "../core/model.ts";

export {
  DEFAULT_HEARTBEAT_MS,
  DEFAULT_HEARTBEAT_TIMEOUT_MS,
  DEFAULT_HOST_IDLE_MS,
  PluginHostPool,
  type PluginHostPoolOptions,
  type PluginSource,
  type PoolMetrics,
} from "./plugin_host/pool.ts";
export {
  PluginError,
  PluginHostError,
  PluginPermissionError,
  UnknownPluginError,
} from "./plugin_host/errors.ts";
export { permissionFlags } from "./plugin_host/_host_process.ts";

/** The built-in backends as plugin sources (their manifests evaluated in process). */
export function builtinPlugins(): PluginSource[] {
  return [
    {
      name: "deno",
      module: new URL("./deno/mod.ts", import.meta.url).href,
      manifest: denoManifest,
    },
    {
      name: "shell",
      module: new URL("./shell/mod.ts", import.meta.url).href,
      manifest: shellManifest,
    },
    {
      name: "docker",
      module: new URL("./docker/mod.ts", import.meta.url).href,
      manifest: dockerManifest,
    },
    {
      name: "ssh",
      module: new URL("./ssh/mod.ts", import.meta.url).href,
      manifest: sshManifest,
    },
    {
      name: "kubernetes",
      module: new URL("./kubernetes/mod.ts", import.meta.url).href,
      manifest: kubernetesManifest,
    },
  ];
}

/** A third-party plugin source as agent config names it. */
export class PluginSpecError extends Error {
  /** Stable error code. */
  readonly code = "bad_plugin";

  /** Builds the error from a full sentence. */
  constructor(message: string) {
    super(message);
    this.name = "PluginSpecError";
  }
}

/**
 * A third-party backend from a path (relative to `baseDir`) or a URL: a
 * folder holding `mod.ts` and `manifest.ts`, or the `mod.ts` itself.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { pluginFromLocation } from "./mod.ts";
 *
 * assert.deepEqual(pluginFromLocation("http", "https://plugins.example/http/", "/srv"), {
 *   name: "http",
 *   module: "https://plugins.example/http/mod.ts",
 * });
 * ```
 */
export function pluginFromLocation(name: string, location: string, baseDir: string): PluginSource {
  if (!/^[a-z][a-z0-9_-]*$/.test(name)) {
    throw new PluginSpecError(
      `Expected a backend name of lower-case letters, digits, "-" or "_", got "${name}"`,
    );
  }
  if (/^https?:\/\//.test(location) || location.startsWith("file:")) {
    const url = new URL(location);
    const module = url.pathname.endsWith(".ts") || url.pathname.endsWith(".js")
      ? url
      : new URL("mod.ts", url.href.endsWith("/") ? url : `${url.href}/`);
    return { name, module: module.href };
  }
  const path = isAbsolute(location) ? location : resolve(baseDir, location);
  let module = path;
  try {
    if (Deno.statSync(path).isDirectory) module = `${path}/mod.ts`;
  } catch {
    throw new PluginSpecError(`Expected backend plugin "${name}" at ${path}, found nothing`);
  }
  try {
    Deno.statSync(module);
  } catch {
    throw new PluginSpecError(`Expected backend plugin "${name}" to have ${module}`);
  }
  return { name, module: pathToFileURL(module).href };
}

/**
 * Checks every step's backend config against its backend's manifest (a
 * third-party manifest in its sandboxed host) and returns one located
 * diagnostic per problem, at the step's position in the pipeline file.
 * Identical configs (matrix legs) are checked once.
 */
export async function validateStepConfigs(
  plan: Plan,
  pool: PluginHostPool,
): Promise<Diagnostic[]> {
  const diagnostics: Diagnostic[] = [];
  const seen = new Set<string>();
  for (const stepId of plan.order) {
    // A split node's legs are checked before they exist, by their template.
    const step = plan.steps[stepId].fanOut
      ? {
        ...plan.steps[stepId].fanOut!.leg,
        name: plan.steps[stepId].name,
        source: plan.steps[stepId].source,
      }
      : plan.steps[stepId];
    if (!pool.source(step.backend)) continue;
    const key = JSON.stringify([step.name, step.backend, step.config]);
    if (seen.has(key)) continue;
    seen.add(key);
    let messages: string[];
    try {
      messages = await pool.validate(step.backend, step.config);
    } catch (error) {
      messages = [
        `its backend could not check it: ${error instanceof Error ? error.message : error}`,
      ];
    }
    for (const message of messages) {
      diagnostics.push({
        code: "invalid_step_config",
        message: `step "${step.name}" (backend ${step.backend}): ${message}`,
        ...step.source,
      });
    }
  }
  return diagnostics;
}
