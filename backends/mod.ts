/**
 * The built-in execution backends, by name.
 *
 * @module
 */

import type { ExecutionBackend } from "./backend.ts";
import { createDenoBackend } from "./deno/mod.ts";
import { createShellBackend } from "./shell/mod.ts";

/** A backend name no built-in backend answers to. */
export class UnknownBackendError extends Error {
  /** Stable error code. */
  readonly code = "unknown_backend";

  /** Builds the error from the requested name and the known ones. */
  constructor(name: string, known: string[]) {
    super(`Expected a backend name among ${known.map((k) => `"${k}"`).join(", ")}, got "${name}"`);
    this.name = "UnknownBackendError";
  }
}

/** A fresh instance of every built-in backend, keyed by name. */
export function builtinBackends(): Record<string, ExecutionBackend> {
  const backends = [createDenoBackend(), createShellBackend()];
  return Object.fromEntries(backends.map((backend) => [backend.name, backend]));
}

/** Built once: `getBackend` is called for every attempt. */
let registry: Record<string, ExecutionBackend> | undefined;

/** The built-in backend called `name`; throws {@link UnknownBackendError} for others. */
export function getBackend(name: string): ExecutionBackend {
  const backends = registry ??= builtinBackends();
  const backend = backends[name];
  if (!backend) throw new UnknownBackendError(name, Object.keys(backends));
  return backend;
}
