/**
 * Manifest of the `shell` backend: a trusted local command.
 *
 * @module
 */

import { z } from "npm:zod@4.6.7";
import type { AttemptSpec, BackendManifest, DenoPermissions, HostContext } from "../backend.ts";
import { PROCESS_TOOL_PATHS } from "../_tools.ts";

/** Shell used when a step does not name one. */
export const DEFAULT_SHELL = "/bin/sh";

/** Config of a `shell` step. */
export const shellConfigSchema = z.strictObject({
  /** Script passed to `<shell> -e -c`. */
  run: z.string().min(1, { message: 'Expected a non-empty command for "run"' }),
  /** Working directory, relative to the pipeline directory (default: the pipeline directory). */
  workdir: z.string().min(1).optional(),
  /** Shell executable (default `/bin/sh`). */
  shell: z.string().min(1).optional(),
});

/** A validated `shell` step config. */
export type ShellConfig = z.infer<typeof shellConfigSchema>;

/** The `shell` backend's manifest. */
export const shellManifest: BackendManifest<ShellConfig> = {
  name: "shell",
  // A step's process cannot be watched again once its runner is gone: recover only reaps.
  capabilities: { reattach: false, usage: false },
  configSchema: shellConfigSchema,
  hostPermissions(_context: HostContext): DenoPermissions {
    // recover checks a lost step's process by ps(1), then kills its group by kill(1).
    return {
      read: [DEFAULT_SHELL, ...PROCESS_TOOL_PATHS],
      write: [],
      net: [],
      env: [],
      run: PROCESS_TOOL_PATHS,
    };
  },
  permissions(config: ShellConfig, spec: AttemptSpec): DenoPermissions {
    // The command itself is trusted and unsandboxed; these are what the
    // host needs to start it (through setsid), signal it (kill) and to check its outputs.
    const shell = config.shell ?? DEFAULT_SHELL;
    return {
      read: [spec.baseDir, spec.scratchRoot, shell, ...PROCESS_TOOL_PATHS],
      write: [],
      net: [],
      env: ["HOME", "LANG", "PATH", "TERM"],
      run: [shell, ...PROCESS_TOOL_PATHS],
    };
  },
};

export default shellManifest;
