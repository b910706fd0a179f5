/**
 * Manifest of the example `http` backend: a step that calls a URL.
 *
 * The runner evaluates a third-party manifest in a plugin host granted
 * nothing at all, so it must be plain code: no file, env or net access.
 *
 * @module
 */

import { z } from "npm:zod@4.6.7";
import type {
  AttemptSpec,
  BackendManifest,
  DenoPermissions,
  HostContext,
} from "../../../backends/backend.ts";

/** Config of an `http` step: everything sits under `with`. */
export const httpConfigSchema = z.strictObject({
  with: z.strictObject({
    /** The URL to call (http or https). */
    url: z.url({ protocol: /^https?$/, error: "Expected an http(s) URL for with.url" }),
    /** HTTP method (default GET). */
    method: z.enum(["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH"]).optional(),
    /** Request headers. */
    headers: z.record(z.string(), z.string()).optional(),
    /** Request body (text). */
    body: z.string().optional(),
    /** Status codes that count as success (default: any 2xx). */
    expect: z.array(z.number().int().min(100).max(599)).optional(),
    /** Declared output the response body is written to (default: the log). */
    output: z.string().optional(),
  }),
});

/** A validated `http` step config. */
export type HttpConfig = z.infer<typeof httpConfigSchema>;

/** The `http` backend's manifest: net access to the one host the step calls. */
export const httpManifest: BackendManifest<HttpConfig> = {
  name: "http",
  version: "0.1.0",
  // A request does not outlive its host: nothing to re-attach, no usage figures.
  capabilities: { reattach: false, usage: false },
  configSchema: httpConfigSchema,
  hostPermissions(_context: HostContext): DenoPermissions {
    return { read: [], write: [], net: [], env: [], run: [] };
  },
  permissions(config: HttpConfig, spec: AttemptSpec): DenoPermissions {
    const url = new URL(config.with.url);
    const port = url.port || (url.protocol === "https:" ? "443" : "80");
    return {
      read: [],
      // Only to write the response body into the declared output.
      write: config.with.output ? [spec.scratchRoot] : [],
      net: [`${url.hostname}:${port}`],
      env: [],
      run: [],
    };
  },
};

export default httpManifest;
