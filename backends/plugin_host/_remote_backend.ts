/**
 * A backend, and the executions it starts, as the runner holds them: every
 * call a request to a pooled plugin host.
 *
 * @module
 */

import {
  type AttemptSpec,
  type BackendCapabilities,
  type DenoPermissions,
  type Execution,
  type ExecutionBackend,
  type ExecutionState,
  type ExitStatus,
  type Fingerprint,
  type HostContext,
  InvalidStepConfigError,
  type RecoveredAttempt,
  type RecoverOptions,
} from "../backend.ts";
import type { LogQueue } from "../log_queue.ts";
import type { PluginHost } from "./_host_process.ts";
import type { ManifestAccess } from "./_manifests.ts";
import { errorMessage } from "./errors.ts";

/** What a {@link RemoteBackend} needs of its pool, for its one backend. */
export interface BackendHosts {
  /** The pool's host context: what `fingerprint` and `recover` hosts are granted by. */
  readonly context: HostContext;
  /** The backend's manifest, wherever it is evaluated. */
  manifest(): Promise<ManifestAccess>;
  /** A host of the backend granted `permissions`: a warm one if there is one. */
  acquire(permissions: DenoPermissions): Promise<PluginHost>;
  /** What the backend declares it can do. */
  capabilities(): BackendCapabilities;
}

/** An {@link ExecutionBackend} whose every call runs in a pooled plugin host. */
export class RemoteBackend implements ExecutionBackend {
  /** Builds the backend `name` over its pool's hosts. */
  constructor(readonly name: string, readonly hosts: BackendHosts) {}

  /** What the plugin declares it can do (see {@link BackendHosts.capabilities}). */
  get capabilities(): BackendCapabilities {
    return this.hosts.capabilities();
  }

  async fingerprint(): Promise<Fingerprint> {
    try {
      const manifest = await this.hosts.manifest();
      const permissions = await manifest.hostPermissions(this.hosts.context);
      const host = await this.hosts.acquire(permissions);
      return await host.use(() => host.request("fingerprint", {}));
    } catch (error) {
      return { available: false, detail: errorMessage(error) };
    }
  }

  async start(spec: AttemptSpec): Promise<Execution> {
    const manifest = await this.hosts.manifest();
    const messages = await manifest.validate(spec.config);
    if (messages.length > 0) throw new InvalidStepConfigError(this.name, messages);
    const permissions = await manifest.permissions(spec.config, spec);
    const host = await this.hosts.acquire(permissions);
    host.retain();
    try {
      const started = await host.request("start", { spec });
      return new RemoteExecution(host, started.exec, started.handle);
    } catch (error) {
      host.release();
      throw error;
    }
  }

  async recover(options: RecoverOptions): Promise<RecoveredAttempt[]> {
    const manifest = await this.hosts.manifest();
    const permissions = await manifest.hostPermissions(this.hosts.context);
    const host = await this.hosts.acquire(permissions);
    const found = await host.use(() => host.request("recover", { options }));
    return found.map(({ attemptId, exec, handle }) => {
      host.retain();
      return { attemptId, execution: new RemoteExecution(host, exec, handle) };
    });
  }
}

/** An execution living in a plugin host. */
class RemoteExecution implements Execution {
  readonly logs: LogQueue;
  #wait: Promise<ExitStatus> | undefined;
  #released = false;

  constructor(readonly host: PluginHost, readonly exec: number, readonly handle: string) {
    this.logs = host.logQueue(exec, handle);
    // Asked at once, so the answer arrives as the attempt ends instead of a
    // round trip after the caller asks.
    this.wait();
  }

  wait(): Promise<ExitStatus> {
    this.#wait ??= this.host.request("wait", { exec: this.exec }).catch((error) =>
      statusOfError(error)
    );
    return this.#wait;
  }

  async status(): Promise<ExecutionState> {
    try {
      return await this.host.request("status", { exec: this.exec });
    } catch (error) {
      return { state: "exited", exit: statusOfError(error) };
    }
  }

  async cancel(graceMs?: number): Promise<void> {
    if (!this.host.alive) return;
    await this.host.request("cancel", { exec: this.exec, graceMs }).catch(() => {});
  }

  async cleanup(): Promise<void> {
    try {
      if (this.host.alive) await this.host.request("cleanup", { exec: this.exec });
    } finally {
      if (!this.#released) {
        this.#released = true;
        this.host.forget(this.exec);
        this.host.release();
      }
    }
  }
}

/** The exit status of an attempt whose wait failed in transport or in the plugin. */
function statusOfError(error: unknown): ExitStatus {
  const errorClass = (error as { errorClass?: ExitStatus["errorClass"] }).errorClass ??
    "infrastructure";
  return { exitCode: -1, errorClass, message: errorMessage(error) };
}
