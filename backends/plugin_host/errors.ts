/**
 * How a plugin host fails, as the runner sees it: the host itself failed
 * (`infrastructure`, retried), the plugin reached past its grant
 * (`permission`), or plugin code threw.
 *
 * @module
 */

import type { WireError } from "./_protocol.ts";

/** A plugin host failed (crashed, hung, refused to start): the step's state is unknown. */
export class PluginHostError extends Error {
  /** Stable error code. */
  readonly code = "plugin_host_failed";
  /** How the runner classifies the attempt: retryable. */
  readonly errorClass = "infrastructure";

  /** Builds the error from a full sentence. */
  constructor(message: string) {
    super(message);
    this.name = "PluginHostError";
  }
}

/** A plugin reached past its grant: Deno refused with `NotCapable`. */
export class PluginPermissionError extends Error {
  /** Stable error code. */
  readonly code = "not_capable";
  /** How the runner classifies the attempt: not retried by default. */
  readonly errorClass = "permission";

  /** Builds the error from the backend name and Deno's message. */
  constructor(backend: string, denoMessage: string) {
    super(`backend "${backend}" ${describeDenial(denoMessage)}`);
    this.name = "PluginPermissionError";
  }
}

/** An error thrown by plugin code, carried over the protocol. */
export class PluginError extends Error {
  /** The plugin's own error code. */
  readonly code: string;

  /** Builds the error from its wire form. */
  constructor(error: WireError) {
    super(error.message);
    this.name = error.name;
    this.code = error.code;
  }
}

/** A backend name the pool does not know. */
export class UnknownPluginError extends Error {
  /** Stable error code. */
  readonly code = "unknown_backend";

  /** Builds the error from the requested name and the known ones. */
  constructor(name: string, known: string[]) {
    super(`Expected a backend name among ${known.map((k) => `"${k}"`).join(", ")}, got "${name}"`);
    this.name = "UnknownPluginError";
  }
}

/** The message of anything thrown. */
export function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/**
 * Rewrites Deno's `Requires read access to "/etc/shadow", run again with the
 * --allow-read flag` into what happened.
 */
function describeDenial(denoMessage: string): string {
  const match = /^Requires (\w+) access(?: to (.+?))?, run again/.exec(denoMessage);
  if (!match) return `was denied an operation: ${denoMessage}`;
  const [, kind, target] = match;
  return `was denied ${kind} access${
    target ? ` to ${target}` : ""
  }: its manifest does not grant it for this step`;
}
