/**
 * Backend plugins, run out of process: the runner never imports a backend's
 * code. Each backend runs inside a `deno run` subprocess (a *plugin host*)
 * granted exactly the permissions its manifest asks for the step at hand,
 * with its environment cleared except the variables the manifest names, and
 * the runner talks to it over the line protocol of `_protocol.ts`. Files by
 * concern: `_host_process.ts` (one host subprocess), `_remote_backend.ts`
 * (the backend the runner holds), `_manifests.ts`, `_serve.ts` (the host
 * side), `errors.ts`.
 *
 * Hosts are pooled per (backend, permission set, granted env): the first
 * step on a set pays a cold start, later ones reuse the warm host, and a
 * host idle for {@link PluginHostPoolOptions.idleMs} is stopped. A host that
 * crashes or stops answering heartbeats is killed; the steps it carried
 * fail with an `infrastructure` error (so they are retried), what they had
 * started is reaped through a fresh host's `recover`, and the next step gets
 * a new host. A plugin that reaches past its grant gets Deno's `NotCapable`;
 * the step fails with a `permission` error naming what it lacked.
 *
 * Built-in manifests are the runner's own code and are evaluated in
 * process; a third-party manifest is evaluated in a host granted nothing.
 *
 * @module
 */

import type {
  BackendCapabilities,
  BackendManifest,
  DenoPermissions,
  ExecutionBackend,
  HostContext,
} from "../backend.ts";
import type { HostRole } from "./_protocol.ts";
import { PluginHost, writeHostEntry } from "./_host_process.ts";
import { LocalManifest, type ManifestAccess, RemoteManifest } from "./_manifests.ts";
import { RemoteBackend } from "./_remote_backend.ts";
import { PluginHostError, UnknownPluginError } from "./errors.ts";

/** Where a backend plugin's code lives. */
export interface PluginSource {
  /** Backend name as steps write it. */
  name: string;
  /** URL (`file:`, `https:`) of the module whose default export is the backend factory. */
  module: string;
  /** URL of the manifest module; defaults to `manifest.ts` beside `module`. */
  manifestModule?: string;
  /**
   * The manifest itself, for built-in backends (trusted, evaluated in
   * process). Third-party manifests are evaluated in a host granted nothing.
   */
  // deno-lint-ignore no-explicit-any
  manifest?: BackendManifest<any>;
}

/** Options of {@link PluginHostPool}. */
export interface PluginHostPoolOptions {
  /** The backends the pool can run. */
  plugins: PluginSource[];
  /** Scratch root and agent id every host works under. */
  context: HostContext;
  /** Directory for the generated host entry files; a temporary one by default. */
  entryDir?: string;
  /** A host with nothing to do for this long is stopped (default 60 s). */
  idleMs?: number;
  /** How often a busy host is pinged (default 1 s). */
  heartbeatMs?: number;
  /** A host silent this long is declared hung and replaced (default 10 s). */
  heartbeatTimeoutMs?: number;
  /** Longest wait for a new host's hello, module download included (default 60 s). */
  startTimeoutMs?: number;
  /** Environment the granted variables are copied from (default: the runner's). */
  env?: (name: string) => string | undefined;
  /** Receives a line of host diagnostics (stderr of a host, stray errors). */
  onDiagnostic?: (backend: string, text: string) => void;
}

/** Counters of a pool, for `/metrics` and benchmarks. */
export interface PoolMetrics {
  /** Hosts started. */
  coldStarts: number;
  /** Host requests answered by a host that was already running. */
  warmHits: number;
  /** Hosts running now. */
  hostsAlive: number;
  /** Hosts that crashed or stopped answering. */
  hostsLost: number;
}

/** Default idle time before a host is stopped. */
export const DEFAULT_HOST_IDLE_MS = 60_000;
/** Default ping period of a busy host. */
export const DEFAULT_HEARTBEAT_MS = 1_000;
/** Default silence after which a host is declared hung: ten missed pings. */
export const DEFAULT_HEARTBEAT_TIMEOUT_MS = 10_000;
/** Default deadline of a host's hello (a first start may download modules). */
export const DEFAULT_HOST_START_TIMEOUT_MS = 60_000;

/** Variables Deno itself needs to find its module cache (not granted to the plugin). */
const DENO_RUNTIME_ENV = ["HOME", "DENO_DIR", "XDG_CACHE_HOME"];

/**
 * Runs backends in pooled, sandboxed plugin hosts.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { builtinPlugins, PluginHostPool } from "../mod.ts";
 *
 * const scratchRoot = await Deno.makeTempDir();
 * const pool = new PluginHostPool({
 *   plugins: builtinPlugins(),
 *   context: { scratchRoot, agentId: "local" },
 * });
 * try {
 *   const shell = pool.backend("shell");
 *   assert.deepEqual(shell.capabilities, { reattach: false, usage: false });
 *   assert.equal((await shell.fingerprint()).available, true);
 *   assert.deepEqual(pool.metrics(), { coldStarts: 1, warmHits: 0, hostsAlive: 1, hostsLost: 0 });
 * } finally {
 *   await pool.close();
 *   await Deno.remove(scratchRoot, { recursive: true });
 * }
 * ```
 */
export class PluginHostPool {
  readonly #options: PluginHostPoolOptions;
  readonly #sources = new Map<string, PluginSource>();
  readonly #backends = new Map<string, RemoteBackend>();
  readonly #hosts = new Map<string, PluginHost>();
  readonly #starting = new Map<string, Promise<PluginHost>>();
  readonly #manifests = new Map<string, Promise<RemoteManifest>>();
  /** Capabilities the sandboxed manifests of third-party backends declared. */
  readonly #described = new Map<string, BackendCapabilities>();
  #entryDirMade: Promise<string> | undefined;
  #ownsEntryDir = false;
  #heartbeat: ReturnType<typeof setInterval> | undefined;
  #closed = false;
  readonly #metrics: PoolMetrics = { coldStarts: 0, warmHits: 0, hostsAlive: 0, hostsLost: 0 };

  /** Builds a pool; no host starts until a backend is used. */
  constructor(options: PluginHostPoolOptions) {
    this.#options = options;
    for (const source of options.plugins) this.#sources.set(source.name, source);
  }

  /** Names of the backends this pool can run. */
  get names(): string[] {
    return [...this.#sources.keys()];
  }

  /** The source of a backend, or undefined. */
  source(name: string): PluginSource | undefined {
    return this.#sources.get(name);
  }

  /** A snapshot of the counters. */
  metrics(): PoolMetrics {
    return { ...this.#metrics, hostsAlive: this.#hosts.size };
  }

  /** The backend called `name`, run in plugin hosts; throws for unknown names. */
  backend(name: string): ExecutionBackend {
    let backend = this.#backends.get(name);
    if (!backend) {
      const source = this.#sources.get(name);
      if (!source) {
        throw new UnknownPluginError(name, this.names);
      }
      backend = new RemoteBackend(name, {
        context: this.#options.context,
        manifest: () => this.#manifestOf(source),
        acquire: (permissions) => this.#acquire(source, permissions),
        capabilities: () => this.capabilities(name),
      });
      this.#backends.set(name, backend);
    }
    return backend;
  }

  /**
   * What a backend declares it can do: a built-in's from its manifest; a
   * third-party one's once its sandboxed manifest has been read (by any
   * call of the backend, or {@link validate}); none before that.
   */
  capabilities(name: string): BackendCapabilities {
    return this.declaredCapabilities(name) ?? NO_CAPABILITIES;
  }

  /** Like {@link capabilities}, but undefined while a third-party backend's are unknown. */
  declaredCapabilities(name: string): BackendCapabilities | undefined {
    const source = this.#sources.get(name);
    if (!source) throw new UnknownPluginError(name, this.names);
    return source.manifest?.capabilities ?? this.#described.get(name);
  }

  /**
   * Checks a step config with the backend's manifest, as this host would
   * run it (host aliases resolved); human messages, empty when valid.
   */
  async validate(name: string, config: Record<string, unknown>): Promise<string[]> {
    const source = this.#sources.get(name);
    if (!source) throw new UnknownPluginError(name, this.names);
    const manifest = await this.#manifestOf(source);
    return await manifest.validate(manifest.resolve(config, this.#options.context));
  }

  /** Stops every host and removes a temporary entry directory. */
  async close(): Promise<void> {
    this.#closed = true;
    if (this.#heartbeat !== undefined) clearInterval(this.#heartbeat);
    const starting = [...this.#starting.values()];
    await Promise.allSettled(starting);
    const manifests = await Promise.allSettled([...this.#manifests.values()]);
    const hosts = [
      ...this.#hosts.values(),
      ...manifests.flatMap((m) => m.status === "fulfilled" ? [m.value.host] : []),
    ];
    this.#hosts.clear();
    await Promise.allSettled(hosts.map((host) => host.stop()));
    if (this.#ownsEntryDir && this.#entryDirMade) {
      await Deno.remove(await this.#entryDirMade, { recursive: true }).catch(() => {});
    }
  }

  /** The manifest of a source: in process for built-ins, else a sandboxed one. */
  async #manifestOf(source: PluginSource): Promise<ManifestAccess> {
    if (source.manifest) return new LocalManifest(source.manifest);
    let remote = this.#manifests.get(source.name);
    if (!remote) {
      remote = this.#spawnHost(source, "manifest", EMPTY_PERMISSIONS).then(async (host) => {
        const { capabilities } = await host.request("describe", {});
        this.#described.set(source.name, capabilities);
        return new RemoteManifest(host, capabilities);
      });
      this.#manifests.set(source.name, remote);
      remote.catch(() => this.#manifests.delete(source.name));
    }
    const manifest = await remote;
    if (!manifest.host.alive) {
      this.#manifests.delete(source.name);
      return this.#manifestOf(source);
    }
    return manifest;
  }

  /** A host of `source` granted `permissions`: warm if one exists, else a new one. */
  async #acquire(source: PluginSource, permissions: DenoPermissions): Promise<PluginHost> {
    if (this.#closed) throw new PluginHostError("Expected an open plugin host pool");
    const env = this.#grantedEnv(permissions);
    const key = JSON.stringify([source.module, normalize(permissions), env]);
    const warm = this.#hosts.get(key);
    if (warm?.alive) {
      this.#metrics.warmHits++;
      return warm;
    }
    let starting = this.#starting.get(key);
    if (!starting) {
      starting = this.#spawnHost(source, "backend", permissions).then(async (host) => {
        const declared = (await this.#manifestOf(source)).capabilities;
        if (!sameCapabilities(host.capabilities, declared)) {
          await host.stop();
          throw new PluginHostError(
            `backend "${source.name}" declares capabilities ${
              JSON.stringify(host.capabilities)
            } but its manifest ${JSON.stringify(declared)}: expected the same`,
          );
        }
        this.#hosts.set(key, host);
        host.exited.then(() => {
          if (this.#hosts.get(key) === host) this.#hosts.delete(key);
        });
        return host;
      }).finally(() => this.#starting.delete(key));
      this.#starting.set(key, starting);
    } else {
      this.#metrics.warmHits++;
    }
    return await starting;
  }

  /** Called by a host that died (with executions in flight, or not). */
  #hostLost(source: PluginSource, permissions: DenoPermissions, handles: string[]): void {
    this.#metrics.hostsLost++;
    if (handles.length === 0 || this.#closed) return;
    // Reap what the lost host had started, from a fresh host on the same grant.
    this.#acquire(source, permissions)
      .then((host) =>
        host.request("recover", {
          options: { agentId: this.#options.context.agentId, keep: [], handles },
        })
      )
      .catch((error) =>
        this.#options.onDiagnostic?.(source.name, `reaping after a lost host failed: ${error}`)
      );
  }

  /** Scratch root and agent id every host works under. */
  get context(): HostContext {
    return this.#options.context;
  }

  #grantedEnv(permissions: DenoPermissions): Record<string, string> {
    const read = this.#options.env ?? ((name: string) => Deno.env.get(name));
    const env: Record<string, string> = {};
    for (const name of permissions.env) {
      const value = read(name);
      if (value !== undefined) env[name] = value;
    }
    return env;
  }

  async #spawnHost(
    source: PluginSource,
    role: HostRole,
    permissions: DenoPermissions,
  ): Promise<PluginHost> {
    const dir = await this.#entryDir();
    const module = role === "backend"
      ? source.module
      : (source.manifestModule ?? new URL("./manifest.ts", source.module).href);
    const entry = await writeHostEntry(dir, { name: source.name, role, module });
    const env: Record<string, string> = { NO_COLOR: "1" };
    const read = this.#options.env ?? ((name: string) => Deno.env.get(name));
    for (const name of DENO_RUNTIME_ENV) {
      const value = read(name);
      if (value !== undefined) env[name] = value;
    }
    Object.assign(env, this.#grantedEnv(permissions));
    this.#metrics.coldStarts++;
    const host = await PluginHost.spawn({
      name: source.name,
      module,
      role,
      permissions,
      entry,
      lockFile: `${dir}/remote_plugins.lock`,
      env,
      startTimeoutMs: this.#options.startTimeoutMs ?? DEFAULT_HOST_START_TIMEOUT_MS,
      idleMs: this.#options.idleMs ?? DEFAULT_HOST_IDLE_MS,
      onDiagnostic: (text) => this.#options.onDiagnostic?.(source.name, text),
      onLost: (handles) => this.#hostLost(source, permissions, handles),
    });
    this.#startHeartbeat();
    return host;
  }

  #startHeartbeat(): void {
    if (this.#heartbeat !== undefined) return;
    const period = this.#options.heartbeatMs ?? DEFAULT_HEARTBEAT_MS;
    const timeout = this.#options.heartbeatTimeoutMs ?? DEFAULT_HEARTBEAT_TIMEOUT_MS;
    const timer = setInterval(() => {
      const now = performance.now();
      for (const host of this.#hosts.values()) host.heartbeat(now, period, timeout);
      for (const manifest of this.#manifests.values()) {
        manifest.then((m) => m.host.heartbeat(now, period, timeout), () => {});
      }
    }, period);
    Deno.unrefTimer(timer);
    this.#heartbeat = timer;
  }

  /** The directory of the generated entry files, made on first use. */
  #entryDir(): Promise<string> {
    this.#entryDirMade ??= this.#options.entryDir
      ? Deno.mkdir(this.#options.entryDir, { recursive: true }).then(() => this.#options.entryDir!)
      : Deno.makeTempDir({ prefix: "runnel_hosts_" }).then((dir) => {
        this.#ownsEntryDir = true;
        return dir;
      });
    return this.#entryDirMade;
  }
}

const EMPTY_PERMISSIONS: DenoPermissions = { read: [], write: [], net: [], env: [], run: [] };

/** What a backend is taken to be able to do before it has said. */
const NO_CAPABILITIES: BackendCapabilities = { reattach: false, usage: false };

function sameCapabilities(a: BackendCapabilities | undefined, b: BackendCapabilities): boolean {
  return a !== undefined && a.reattach === b.reattach && a.usage === b.usage;
}

function normalize(permissions: DenoPermissions): DenoPermissions {
  const sorted = (values: string[]) => [...new Set(values)].sort();
  return {
    read: sorted(permissions.read),
    write: sorted(permissions.write),
    net: sorted(permissions.net),
    env: sorted(permissions.env),
    run: sorted(permissions.run),
  };
}
