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
      return await host.use(() => host.request("fingerprint", { context: this.hosts.context }));
    } catch (error) {
      return { available: false, detail: errorMessage(error) };
    }
  }

  async start(written: AttemptSpec): Promise<Execution> {
    const manifest = await this.hosts.manifest();
    const spec = { ...written, config: manifest.resolve(written.config, this.hosts.context) };
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
    const context = this.hosts.context;
    const settings = context.settings;
    const asks: Array<{ permissions: DenoPermissions; options: RecoverOptions }> = [];
    const { attempts = [], ...common } = options;
    let byHost = common;
    if (this.capabilities.recoverPerAttempt && attempts.length > 0) {
      // Each recorded attempt is reached again with its own step's grant;
      // attempts of the same grant share one host.
      const groups = new Map<string, { permissions: DenoPermissions; attempts: typeof attempts }>();
      for (const attempt of attempts) {
        const spec = { ...attempt.spec, config: manifest.resolve(attempt.spec.config, context) };
        let permissions: DenoPermissions;
        try {
          if ((await manifest.validate(spec.config)).length > 0) continue;
          permissions = await manifest.permissions(spec.config, spec);
        } catch {
          continue;
        }
        const key = JSON.stringify(permissions);
        const group = groups.get(key) ?? { permissions, attempts: [] };
        group.attempts.push({ ...attempt, spec });
        groups.set(key, group);
      }
      const handled = new Set<string>();
      for (const group of groups.values()) {
        const ids = new Set(group.attempts.map((attempt) => attempt.attemptId));
        group.attempts.forEach((attempt) => handled.add(attempt.handle));
        asks.push({
          permissions: group.permissions,
          options: {
            agentId: options.agentId,
            keep: options.keep.filter((id) => ids.has(id)),
            handles: group.attempts.map((attempt) => attempt.handle),
            attempts: group.attempts,
            settings,
          },
        });
      }
      byHost = {
        ...common,
        keep: options.keep.filter((id) => !attempts.some((a) => a.attemptId === id)),
        handles: (options.handles ?? []).filter((handle) => !handled.has(handle)),
      };
    }
    asks.push({
      permissions: await manifest.hostPermissions(context),
      options: { ...byHost, settings },
    });
    const found: RecoveredAttempt[] = [];
    const errors: unknown[] = [];
    for (const ask of asks) {
      try {
        const host = await this.hosts.acquire(ask.permissions);
        const answers = await host.use(() => host.request("recover", { options: ask.options }));
        for (const { attemptId, exec, handle } of answers) {
          host.retain();
          found.push({ attemptId, execution: new RemoteExecution(host, exec, handle) });
        }
      } catch (error) {
        errors.push(error);
      }
    }
    // What was found is handed back even when another grant failed to answer.
    if (found.length === 0 && errors.length > 0) throw errors[0];
    return found;
  }
}

/** An execution living in a plugin host. */
class RemoteExecution implements Execution {
  readonly logs: LogQueue;
  #wait: Promise<ExitStatus> | undefined;
  /** Its exit, once the host answered the wait (and cleaned it up). */
  #exit: ExitStatus | undefined;
  #released = false;

  constructor(readonly host: PluginHost, readonly exec: number, readonly handle: string) {
    this.logs = host.logQueue(exec, handle);
    // Asked at once, so the answer arrives as the attempt ends instead of a
    // round trip after the caller asks. Every caller cleans an execution up
    // once it has ended: the host does it before it answers, which saves
    // the cleanup's own round trip at the end of every attempt.
    this.wait();
  }

  wait(): Promise<ExitStatus> {
    this.#wait ??= this.host.request("wait", { exec: this.exec, cleanup: true }).then(
      (status) => this.#exit = status,
      (error) => statusOfError(error),
    );
    return this.#wait;
  }

  async status(): Promise<ExecutionState> {
    if (this.#exit) return { state: "exited", exit: this.#exit };
    try {
      return await this.host.request("status", { exec: this.exec });
    } catch (error) {
      return { state: "exited", exit: statusOfError(error) };
    }
  }

  async cancel(graceMs?: number): Promise<void> {
    if (!this.host.alive || this.#exit) return;
    await this.host.request("cancel", { exec: this.exec, graceMs }).catch(() => {});
  }

  async cleanup(): Promise<void> {
    try {
      if (this.host.alive && !this.#exit) await this.host.request("cleanup", { exec: this.exec });
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
