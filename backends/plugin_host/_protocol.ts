/**
 * The message protocol between the runner and a backend plugin host.
 *
 * One JSON object per line. The runner writes requests to the host's stdin;
 * the host writes its hello, responses and events to its stdout (its own
 * `console` goes to stderr). Requests carry an `id`; the response carries it
 * back. Events (`log`, `logEnd`) name the execution they belong to. The host
 * answers `ping` from its event loop, so a host whose loop is stuck stops
 * answering and the runner replaces it.
 *
 * Bump {@link PROTOCOL_VERSION} on any change a peer of the previous version
 * would misread; the runner refuses a host that says another version.
 *
 * @module
 */

import type {
  AttemptSpec,
  BackendCapabilities,
  DenoPermissions,
  ExecutionState,
  ExitStatus,
  Fingerprint,
  HostContext,
  RecoverOptions,
} from "../backend.ts";

/** Version of this protocol, sent in the host's hello. */
export const PROTOCOL_VERSION = 2;

/** What a host serves: a backend's code, or (sandboxed, no grants) a third-party manifest. */
export type HostRole = "backend" | "manifest";

/** A request from the runner. */
export type Request =
  | { id: number; op: "ping" }
  | { id: number; op: "fingerprint"; context?: HostContext }
  | { id: number; op: "start"; spec: AttemptSpec }
  /** With `cleanup`, the host cleans the execution up (and forgets it) before it answers. */
  | { id: number; op: "wait"; exec: number; cleanup?: boolean }
  | { id: number; op: "status"; exec: number }
  | { id: number; op: "cancel"; exec: number; graceMs?: number }
  | { id: number; op: "cleanup"; exec: number }
  | { id: number; op: "recover"; options: RecoverOptions }
  // Manifest role only.
  | { id: number; op: "describe" }
  | { id: number; op: "validate"; config: Record<string, unknown> }
  | { id: number; op: "permissions"; config: Record<string, unknown>; spec: AttemptSpec }
  | { id: number; op: "hostPermissions"; context: HostContext };

/** The operations, by name. */
export type Op = Request["op"];

/** What each operation answers. */
export interface Results {
  ping: Record<string, never>;
  fingerprint: Fingerprint;
  validate: string[];
  start: { exec: number; handle: string };
  wait: ExitStatus;
  status: ExecutionState;
  cancel: Record<string, never>;
  cleanup: Record<string, never>;
  recover: Array<{ attemptId: string; exec: number; handle: string }>;
  describe: { name: string; version?: string; capabilities: BackendCapabilities };
  permissions: DenoPermissions;
  hostPermissions: DenoPermissions;
}

/** An error as it crosses the protocol. */
export interface WireError {
  /** `not_capable` when the sandbox refused an operation; else the error's own code. */
  code: string;
  name: string;
  message: string;
}

/** A message from the host. */
export type HostMessage =
  | {
    hello: {
      protocol: number;
      role: HostRole;
      backend: string;
      pid: number;
      /** What the served backend declares it can do (backend role). */
      capabilities?: BackendCapabilities;
    };
  }
  | { id: number; ok: true; result: unknown }
  | { id: number; ok: false; error: WireError }
  | { log: number; stream: "stdout" | "stderr"; text: string }
  | { logEnd: number }
  /** An error no request was waiting for (an unhandled rejection in plugin code). */
  | { stray: WireError };

/** True for a well-formed {@link BackendCapabilities} (from plugin code, so checked). */
export function isCapabilities(value: unknown): value is BackendCapabilities {
  const { reattach, usage } = (value ?? {}) as Record<string, unknown>;
  return typeof reattach === "boolean" && typeof usage === "boolean";
}

/** Turns anything thrown into its wire form. */
export function toWireError(error: unknown): WireError {
  if (error instanceof Deno.errors.NotCapable) {
    return { code: "not_capable", name: "NotCapable", message: error.message };
  }
  if (error instanceof Error) {
    const code = (error as { code?: unknown }).code;
    return {
      code: typeof code === "string" ? code : "plugin_error",
      name: error.name,
      message: error.message || error.name,
    };
  }
  return { code: "plugin_error", name: "Error", message: String(error) };
}

/** Splits a text stream into lines; the last partial line is held until it ends. */
export class LineSplitter {
  #pending = "";

  /** Feeds text; returns the complete lines it finished. */
  push(text: string): string[] {
    const joined = this.#pending + text;
    const lines = joined.split("\n");
    this.#pending = lines.pop()!;
    return lines;
  }

  /** The unterminated rest, if any. */
  end(): string {
    const rest = this.#pending;
    this.#pending = "";
    return rest;
  }
}
