/**
 * The worker that parses submitted pipelines for a server (see
 * `parse_worker.ts`): parsing a large file is CPU work that must not hold
 * up the server's event loop (its `/health`, its agents' heartbeats).
 *
 * @module
 */

/// <reference lib="deno.worker" />

import { parsePipeline } from "../../core/load.ts";
import { PipelineError } from "../../core/errors.ts";
import { bundleFile } from "../bundle.ts";
import type { ParseRequest, ParseResponse } from "./parse_worker.ts";

self.onmessage = (event: MessageEvent<ParseRequest>) => {
  const { id, source, file, baseDir, bundle, secretNames, limits, params } = event.data;
  let response: ParseResponse;
  try {
    const plan = parsePipeline(source, {
      file,
      baseDir,
      // Step modules are read from the shipped directory, and never from
      // the server's own disk: a caller may not probe the server's files.
      readFile: bundle ? (path) => bundleFile(bundle, baseDir, path) : () => undefined,
      // Declared names only: never an env var or file of the server.
      secrets: { names: secretNames, allowSources: false },
      limits,
      // Absent for an apply: its required parameters come with each trigger.
      params,
    });
    response = { id, plan };
  } catch (error) {
    response = error instanceof PipelineError
      ? { id, diagnostics: error.diagnostics }
      : { id, error: error instanceof Error ? error.message : String(error) };
  }
  self.postMessage(response);
};
