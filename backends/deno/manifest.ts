/**
 * Manifest of the `deno` backend: a TypeScript module run in a Deno
 * subprocess granted only what the step declares.
 *
 * @module
 */

import { z } from "npm:zod@4.6.7";
import type { AttemptSpec, BackendManifest, DenoPermissions, HostContext } from "../backend.ts";
import { PROCESS_TOOL_PATHS } from "../_tools.ts";

const pathList = z.array(z.string().min(1));

/** Config of a `deno` step. */
export const denoConfigSchema = z.strictObject({
  /** The step module, relative to the pipeline directory. */
  module: z.string().min(1, { message: 'Expected a module path for "module"' }),
  /** Passed to the module as `ctx.args` (and `Deno.args`). */
  args: z.array(z.string()).optional(),
  /** What the step may reach beyond its inputs, outputs and own env vars. */
  permissions: z.strictObject({
    /** Hosts (`host` or `host:port`) the step may connect to. */
    net: z.array(z.string().min(1)).optional(),
    /** Env var names of the runner the step may read; they are passed through. */
    env: z.array(
      z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, {
        message: "Expected an environment variable name",
      }),
    ).optional(),
    /** Extra paths (relative to the pipeline directory) the step may read. */
    read: pathList.optional(),
    /** Extra paths (relative to the pipeline directory) the step may write. */
    write: pathList.optional(),
  }).optional(),
});

/** A validated `deno` step config. */
export type DenoConfig = z.infer<typeof denoConfigSchema>;

/** The `deno` backend's manifest. */
export const denoManifest: BackendManifest<DenoConfig> = {
  name: "deno",
  // A step's process cannot be watched again once its runner is gone: recover only reaps.
  capabilities: { reattach: false, usage: false },
  configSchema: denoConfigSchema,
  hostPermissions(context: HostContext): DenoPermissions {
    // recover checks a lost step's process by ps(1), then kills its group by kill(1).
    return {
      read: [Deno.execPath(), context.scratchRoot, ...PROCESS_TOOL_PATHS],
      write: [],
      net: [],
      env: [],
      run: [Deno.execPath(), ...PROCESS_TOOL_PATHS],
    };
  },
  permissions(config: DenoConfig, spec: AttemptSpec): DenoPermissions {
    // What the host needs to start the sandbox: read the module, write the
    // entry file, check outputs, spawn deno (through setsid), signal its process group (kill), and pass the
    // declared env through. Granted by the pipeline directory and the
    // scratch root, not per attempt, so that steps share a warm host.
    const { scratchRoot } = spec;
    return {
      read: [spec.baseDir, scratchRoot, Deno.execPath(), ...PROCESS_TOOL_PATHS],
      write: [scratchRoot],
      net: [],
      env: ["PATH", "HOME", "DENO_DIR", ...(config.permissions?.env ?? [])].sort(),
      run: [Deno.execPath(), ...PROCESS_TOOL_PATHS],
    };
  },
};

export default denoManifest;
