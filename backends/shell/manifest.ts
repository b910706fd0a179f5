/**
 * Manifest of the `shell` backend: a trusted local command.
 *
 * @module
 */

import { z } from "zod";
import type { AttemptSpec, BackendManifest, DenoPermissions } from "../backend.ts";

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
  configSchema: shellConfigSchema,
  permissions(config: ShellConfig, spec: AttemptSpec): DenoPermissions {
    // The command itself is trusted and unsandboxed; these are what the
    // backend needs to start it and to check its outputs.
    return {
      read: [spec.baseDir, spec.outputsDir],
      write: [],
      net: [],
      env: ["PATH", "HOME", "LANG", "TERM"],
      run: [config.shell ?? DEFAULT_SHELL],
    };
  },
};
