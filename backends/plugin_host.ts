/**
 * Backend plugins, run out of process: the runner never imports a backend's
 * code. Each backend runs inside a `deno run` subprocess (a *plugin host*)
 * granted exactly the permissions its manifest asks for the step at hand,
 * with its environment cleared except the variables the manifest names, and
 * the runner talks to it over the line protocol of `_protocol.ts`.
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
  AttemptSpec,
  BackendCapabilities,
  BackendManifest,
  DenoPermissions,
  Execution,
  ExecutionBackend,
  ExecutionState,
  ExitStatus,
  Fingerprint,
  HostContext,
  RecoveredAttempt,
  RecoverOptions,
} from "./backend.ts";
import { configMessages, InvalidStepConfigError } from "./backend.ts";
import { LogQueue } from "./log_queue.ts";
import { raceTimeout } from "./_async.ts";
import {
  type HostMessage,
  type HostRole,
  LineSplitter,
  type Op,
  PROTOCOL_VERSION,
  type Request,
  type Results,
  type WireError,
} from "./_protocol.ts";

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

/** Default idle time before a host is stopped. */
export const DEFAULT_HOST_IDLE_MS = 60_000;
/** Default ping period of a busy host. */
export const DEFAULT_HEARTBEAT_MS = 1_000;
/** Default silence after which a host is declared hung: ten missed pings. */
export const DEFAULT_HEARTBEAT_TIMEOUT_MS = 10_000;
/** Default deadline of a host's hello (a first start may download modules). */
export const DEFAULT_HOST_START_TIMEOUT_MS = 60_000;

/** How long a host told to stop (its stdin closed) may take to exit before it is killed. */
const HOST_STOP_GRACE_MS = 2_000;

/** How much of a host's stderr is kept to explain a crash. */
const STDERR_TAIL_CHARS = 2_000;

const ROOT_URL = new URL("../", import.meta.url);
const HOST_MODULE_URL = new URL("./_host.ts", import.meta.url).href;
/** Variables Deno itself needs to find its module cache (not granted to the plugin). */
const DENO_RUNTIME_ENV = ["HOME", "DENO_DIR", "XDG_CACHE_HOME"];

/**
 * Runs backends in pooled, sandboxed plugin hosts.
 *
 * @example
 * ```ts ignore
 * import { builtinPlugins, PluginHostPool } from "./mod.ts";
 * const pool = new PluginHostPool({
 *   plugins: builtinPlugins(),
 *   context: { scratchRoot: "/tmp/work", agentId: "local" },
 * });
 * console.log(await pool.backend("shell").fingerprint());
 * await pool.close();
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
  #entryDir: Promise<string> | undefined;
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
      backend = new RemoteBackend(this, source);
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
    const source = this.#sources.get(name);
    if (!source) throw new UnknownPluginError(name, this.names);
    return source.manifest?.capabilities ?? this.#described.get(name) ?? NO_CAPABILITIES;
  }

  /** Checks a step config with the backend's manifest; human messages, empty when valid. */
  async validate(name: string, config: Record<string, unknown>): Promise<string[]> {
    const source = this.#sources.get(name);
    if (!source) throw new UnknownPluginError(name, this.names);
    return await (await this.manifestOf(source)).validate(config);
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
    if (this.#ownsEntryDir && this.#entryDir) {
      await Deno.remove(await this.#entryDir, { recursive: true }).catch(() => {});
    }
  }

  /** @internal The manifest of a source: in process for built-ins, else a sandboxed one. */
  async manifestOf(source: PluginSource): Promise<ManifestAccess> {
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
      return this.manifestOf(source);
    }
    return manifest;
  }

  /** @internal A host of `source` granted `permissions`: warm if one exists, else a new one. */
  async acquire(source: PluginSource, permissions: DenoPermissions): Promise<PluginHost> {
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
        const declared = (await this.manifestOf(source)).capabilities;
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

  /** @internal Called by a host that died with executions in flight. */
  hostLost(source: PluginSource, permissions: DenoPermissions, handles: string[]): void {
    this.#metrics.hostsLost++;
    if (handles.length === 0 || this.#closed) return;
    // Reap what the lost host had started, from a fresh host on the same grant.
    this.acquire(source, permissions)
      .then((host) =>
        host.request("recover", {
          options: { agentId: this.#options.context.agentId, keep: [], handles },
        })
      )
      .catch((error) =>
        this.#options.onDiagnostic?.(source.name, `reaping after a lost host failed: ${error}`)
      );
  }

  /** @internal The pool's host context. */
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
    const entry = await this.#entryFile(source, role);
    const env: Record<string, string> = { NO_COLOR: "1" };
    const read = this.#options.env ?? ((name: string) => Deno.env.get(name));
    for (const name of DENO_RUNTIME_ENV) {
      const value = read(name);
      if (value !== undefined) env[name] = value;
    }
    Object.assign(env, this.#grantedEnv(permissions));
    this.#metrics.coldStarts++;
    const host = await PluginHost.spawn({
      source,
      role,
      permissions,
      entry: entry.path,
      entryModule: entry.module,
      lockFile: `${entry.path.slice(0, entry.path.lastIndexOf("/"))}/remote_plugins.lock`,
      env,
      startTimeoutMs: this.#options.startTimeoutMs ?? DEFAULT_HOST_START_TIMEOUT_MS,
      idleMs: this.#options.idleMs ?? DEFAULT_HOST_IDLE_MS,
      onDiagnostic: (text) => this.#options.onDiagnostic?.(source.name, text),
      onLost: (handles) => this.hostLost(source, permissions, handles),
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

  async #entryFile(
    source: PluginSource,
    role: HostRole,
  ): Promise<{ path: string; module: string }> {
    this.#entryDir ??= this.#options.entryDir
      ? Deno.mkdir(this.#options.entryDir, { recursive: true }).then(() => this.#options.entryDir!)
      : Deno.makeTempDir({ prefix: "runnel_hosts_" }).then((dir) => {
        this.#ownsEntryDir = true;
        return dir;
      });
    const dir = await this.#entryDir;
    const module = role === "backend"
      ? source.module
      : (source.manifestModule ?? new URL("./manifest.ts", source.module).href);
    const serve = role === "backend" ? "serveBackend" : "serveManifest";
    const text = [
      "// Generated by runnel: a plugin host entry. The host module is imported",
      "// first so its set-up runs before the plugin's code.",
      `import { ${serve} } from ${JSON.stringify(HOST_MODULE_URL)};`,
      `import * as plugin from ${JSON.stringify(module)};`,
      `await ${serve}(plugin, ${JSON.stringify(source.name)});`,
      "",
    ].join("\n");
    const digest = await sha256Hex(text);
    const path = `${dir}/${role}_${fileSafe(source.name)}_${digest.slice(0, 16)}.ts`;
    try {
      if (await Deno.readTextFile(path) === text) return { path, module };
    } catch {
      // Not written yet.
    }
    const temp = `${path}.${crypto.randomUUID()}.tmp`;
    await Deno.writeTextFile(temp, text);
    await Deno.rename(temp, path);
    return { path, module };
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

const EMPTY_PERMISSIONS: DenoPermissions = { read: [], write: [], net: [], env: [], run: [] };

/** What a backend is taken to be able to do before it has said. */
const NO_CAPABILITIES: BackendCapabilities = { reattach: false, usage: false };

function sameCapabilities(a: BackendCapabilities | undefined, b: BackendCapabilities): boolean {
  return a !== undefined && a.reattach === b.reattach && a.usage === b.usage;
}

/** What the runner asks of a manifest, wherever it is evaluated. */
interface ManifestAccess {
  readonly capabilities: BackendCapabilities;
  validate(config: Record<string, unknown>): Promise<string[]>;
  permissions(config: Record<string, unknown>, spec: AttemptSpec): Promise<DenoPermissions>;
  hostPermissions(context: HostContext): Promise<DenoPermissions>;
}

class LocalManifest implements ManifestAccess {
  // deno-lint-ignore no-explicit-any
  constructor(readonly manifest: BackendManifest<any>) {}

  get capabilities(): BackendCapabilities {
    return this.manifest.capabilities;
  }

  validate(config: Record<string, unknown>): Promise<string[]> {
    return Promise.resolve(configMessages(this.manifest.configSchema, config));
  }

  permissions(config: Record<string, unknown>, spec: AttemptSpec): Promise<DenoPermissions> {
    return Promise.resolve(this.manifest.permissions(config, spec));
  }

  hostPermissions(context: HostContext): Promise<DenoPermissions> {
    return Promise.resolve(this.manifest.hostPermissions(context));
  }
}

class RemoteManifest implements ManifestAccess {
  constructor(readonly host: PluginHost, readonly capabilities: BackendCapabilities) {}

  validate(config: Record<string, unknown>): Promise<string[]> {
    return this.host.request("validate", { config });
  }

  permissions(config: Record<string, unknown>, spec: AttemptSpec): Promise<DenoPermissions> {
    return this.host.request("permissions", { config, spec });
  }

  hostPermissions(context: HostContext): Promise<DenoPermissions> {
    return this.host.request("hostPermissions", { context });
  }
}

/** An {@link ExecutionBackend} whose every call runs in a pooled plugin host. */
class RemoteBackend implements ExecutionBackend {
  readonly name: string;

  constructor(readonly pool: PluginHostPool, readonly source: PluginSource) {
    this.name = source.name;
  }

  get capabilities(): BackendCapabilities {
    return this.pool.capabilities(this.name);
  }

  async fingerprint(): Promise<Fingerprint> {
    try {
      const manifest = await this.pool.manifestOf(this.source);
      const permissions = await manifest.hostPermissions(this.pool.context);
      const host = await this.pool.acquire(this.source, permissions);
      return await host.use(() => host.request("fingerprint", {}));
    } catch (error) {
      return { available: false, detail: errorMessage(error) };
    }
  }

  async start(spec: AttemptSpec): Promise<Execution> {
    const manifest = await this.pool.manifestOf(this.source);
    const messages = await manifest.validate(spec.config);
    if (messages.length > 0) throw new InvalidStepConfigError(this.name, messages);
    const permissions = await manifest.permissions(spec.config, spec);
    const host = await this.pool.acquire(this.source, permissions);
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
    const manifest = await this.pool.manifestOf(this.source);
    const permissions = await manifest.hostPermissions(this.pool.context);
    const host = await this.pool.acquire(this.source, permissions);
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

interface SpawnHostOptions {
  source: PluginSource;
  /** The module the entry imports (the backend or its manifest). */
  entryModule: string;
  /** The lock file of remote plugins' modules. */
  lockFile: string;
  role: HostRole;
  permissions: DenoPermissions;
  entry: string;
  env: Record<string, string>;
  startTimeoutMs: number;
  idleMs: number;
  onDiagnostic: (text: string) => void;
  onLost: (handles: string[]) => void;
}

interface Pending {
  op: Op;
  resolve: (value: unknown) => void;
  reject: (error: unknown) => void;
}

/** One plugin host subprocess and its side of the protocol. */
class PluginHost {
  readonly #child: Deno.ChildProcess;
  readonly #options: SpawnHostOptions;
  readonly #pending = new Map<number, Pending>();
  readonly #logs = new Map<number, { queue: LogQueue; handle: string }>();
  readonly #encoder = new TextEncoder();
  readonly #writer: WritableStreamDefaultWriter<Uint8Array>;
  #outbox: string[] = [];
  #flushing = false;
  #nextId = 1;
  #lastHeard = performance.now();
  #lastPing = 0;
  #users = 0;
  #idleTimer: ReturnType<typeof setTimeout> | undefined;
  #stderrTail = "";
  #stopping = false;
  #death: string | undefined;
  #hello: PromiseWithResolvers<void> = Promise.withResolvers();
  /** What the served backend declared in its hello (backend role). */
  capabilities: BackendCapabilities | undefined;
  /** Resolves once the subprocess has exited. */
  readonly exited: Promise<void>;

  private constructor(options: SpawnHostOptions) {
    this.#options = options;
    const args = ["run", "--no-prompt", "--quiet"];
    const config = new URL("deno.json", ROOT_URL);
    if (config.protocol === "file:") args.push(`--config=${config.pathname}`);
    args.push(...permissionFlags(options.permissions));
    // A plugin loaded from a URL may import from its own server, nothing
    // else; its modules' hashes go to a lock file of the pool's, not to
    // runnel's own.
    const origin = remoteOrigin(
      options.role === "backend" ? options.source.module : options.entryModule,
    );
    if (origin) args.push(`--allow-import=${origin}`, `--lock=${options.lockFile}`);
    args.push(options.entry, `--runnel-env=${options.permissions.env.join(",")}`);
    this.#child = new Deno.Command(Deno.execPath(), {
      args,
      env: options.env,
      clearEnv: true,
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#writer = this.#child.stdin.getWriter();
    this.#readStdout();
    this.#readStderr();
    this.exited = this.#child.status.then((status) => {
      const why = this.#stopping
        ? "was stopped"
        : status.signal
        ? `was killed by ${status.signal}`
        : `exited with code ${status.code}`;
      this.#die(why);
    });
  }

  /** Starts a host and waits for its hello. */
  static async spawn(options: SpawnHostOptions): Promise<PluginHost> {
    const host = new PluginHost(options);
    let timer: ReturnType<typeof setTimeout> | undefined;
    const deadline = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        reject(
          new PluginHostError(
            `backend "${options.source.name}" host did not start within ${options.startTimeoutMs} ms`,
          ),
        );
      }, options.startTimeoutMs);
    });
    try {
      await Promise.race([host.#hello.promise, deadline]);
    } catch (error) {
      host.kill();
      throw error;
    } finally {
      clearTimeout(timer);
    }
    host.#armIdle();
    return host;
  }

  /** True while the host takes requests (not once it is being stopped). */
  get alive(): boolean {
    return this.#death === undefined && !this.#stopping;
  }

  get pid(): number {
    return this.#child.pid;
  }

  /** Counts a user (an execution in flight); a host with users is never idle-stopped. */
  retain(): void {
    this.#users++;
    if (this.#idleTimer !== undefined) {
      clearTimeout(this.#idleTimer);
      this.#idleTimer = undefined;
    }
  }

  release(): void {
    this.#users = Math.max(0, this.#users - 1);
    this.#armIdle();
  }

  /** Runs `work` as a user of the host. */
  async use<T>(work: () => Promise<T>): Promise<T> {
    this.retain();
    try {
      return await work();
    } finally {
      this.release();
    }
  }

  /** The log queue of an execution, which now has its handle. */
  logQueue(exec: number, handle: string): LogQueue {
    const queue = this.#logQueue(exec);
    this.#logs.get(exec)!.handle = handle;
    return queue;
  }

  #logQueue(exec: number): LogQueue {
    let entry = this.#logs.get(exec);
    if (!entry) {
      entry = { queue: new LogQueue(), handle: "" };
      this.#logs.set(exec, entry);
    }
    return entry.queue;
  }

  forget(exec: number): void {
    this.#logs.get(exec)?.queue.close();
    this.#logs.delete(exec);
  }

  request<O extends Op>(
    op: O,
    fields: Omit<Extract<Request, { op: O }>, "id" | "op">,
  ): Promise<Results[O]> {
    if (!this.alive) return Promise.reject(this.#lostError());
    const id = this.#nextId++;
    const { promise, resolve, reject } = Promise.withResolvers<Results[O]>();
    this.#pending.set(id, { op, resolve: resolve as (value: unknown) => void, reject });
    this.#send(JSON.stringify({ id, op, ...fields }));
    return promise;
  }

  /** Pings a busy host; kills one that has been silent past `timeoutMs`. */
  heartbeat(now: number, periodMs: number, timeoutMs: number): void {
    if (!this.alive || (this.#pending.size === 0 && this.#users === 0)) {
      this.#lastHeard = now;
      return;
    }
    if (now - this.#lastHeard > timeoutMs) {
      this.#death ??= `stopped answering heartbeats for ${Math.round(timeoutMs / 1000)} s`;
      this.kill();
      return;
    }
    if (now - this.#lastHeard >= periodMs && now - this.#lastPing >= periodMs) {
      this.#lastPing = now;
      this.request("ping", {}).catch(() => {});
    }
  }

  /** Closes stdin (the host exits on end of input) and waits; kills it if it lingers. */
  async stop(): Promise<void> {
    if (this.#death !== undefined) return await this.exited;
    this.#stopping = true;
    await this.#writer.close().catch(() => {});
    if (await raceTimeout(this.exited, HOST_STOP_GRACE_MS)) this.kill();
    await this.exited;
  }

  kill(): void {
    try {
      this.#child.kill("SIGKILL");
    } catch {
      // Already gone.
    }
  }

  #armIdle(): void {
    if (this.#users > 0 || this.#idleTimer !== undefined || !this.alive) return;
    this.#idleTimer = setTimeout(() => {
      this.#idleTimer = undefined;
      if (this.#users === 0 && this.#pending.size === 0) this.stop();
    }, this.#options.idleMs);
    Deno.unrefTimer(this.#idleTimer);
  }

  #send(line: string): void {
    this.#outbox.push(line + "\n");
    if (this.#flushing) return;
    this.#flushing = true;
    queueMicrotask(async () => {
      try {
        while (this.#outbox.length > 0) {
          const text = this.#outbox.join("");
          this.#outbox = [];
          await this.#writer.write(this.#encoder.encode(text));
        }
      } catch {
        // The host is gone; its exit handler fails what was pending.
        this.#outbox = [];
      } finally {
        this.#flushing = false;
      }
    });
  }

  async #readStdout(): Promise<void> {
    const lines = new LineSplitter();
    try {
      // A plain reader: a decoding stream stage adds latency to every message.
      const reader = this.#child.stdout.getReader();
      const decoder = new TextDecoder();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        this.#lastHeard = performance.now();
        for (const line of lines.push(decoder.decode(value, { stream: true }))) {
          this.#receive(line);
        }
      }
    } catch {
      // The pipe broke with the process; the exit handler reports it.
    }
    const rest = lines.end();
    if (rest) this.#receive(rest);
  }

  async #readStderr(): Promise<void> {
    const lines = new LineSplitter();
    try {
      for await (const text of this.#child.stderr.pipeThrough(new TextDecoderStream())) {
        this.#stderrTail = (this.#stderrTail + text).slice(-STDERR_TAIL_CHARS);
        for (const line of lines.push(text)) if (line) this.#options.onDiagnostic(line);
      }
    } catch {
      // As above.
    }
  }

  #receive(line: string): void {
    if (!line) return;
    let message: HostMessage;
    try {
      message = JSON.parse(line);
    } catch {
      // Plugin code that wrote to stdout directly: not a message.
      this.#options.onDiagnostic(`stray output: ${line.slice(0, 200)}`);
      return;
    }
    // A host relays logs as soon as an execution starts, so they may arrive
    // before the answer to `start`: the queue is made by whichever is first.
    if ("log" in message) {
      this.#logQueue(message.log).push({
        stream: message.stream,
        data: this.#encoder.encode(message.text),
      });
    } else if ("logEnd" in message) {
      this.#logQueue(message.logEnd).close();
    } else if ("id" in message) {
      const pending = this.#pending.get(message.id);
      if (!pending) return;
      this.#pending.delete(message.id);
      if (message.ok) pending.resolve(message.result);
      else pending.reject(this.#errorOf(message.error));
    } else if ("hello" in message) {
      if (message.hello.protocol !== PROTOCOL_VERSION) {
        this.#death = `speaks protocol ${message.hello.protocol}, expected ${PROTOCOL_VERSION}`;
        this.#hello.reject(this.#lostError());
        this.kill();
        return;
      }
      this.capabilities = message.hello.capabilities;
      this.#hello.resolve();
    } else if ("stray" in message) {
      this.#options.onDiagnostic(`unhandled error in plugin: ${message.stray.message}`);
    }
  }

  #errorOf(error: WireError): Error {
    if (error.code === "not_capable") {
      return new PluginPermissionError(this.#options.source.name, error.message);
    }
    if (error.code === "invalid_step_config") {
      const invalid = new InvalidStepConfigError(this.#options.source.name, []);
      invalid.message = error.message;
      return invalid;
    }
    return new PluginError(error);
  }

  #die(why: string): void {
    this.#death ??= why;
    if (this.#idleTimer !== undefined) clearTimeout(this.#idleTimer);
    this.#hello.reject(this.#lostError());
    this.#hello.promise.catch(() => {});
    const error = this.#lostError();
    for (const pending of this.#pending.values()) pending.reject(error);
    this.#pending.clear();
    const handles = [...this.#logs.values()].map((entry) => entry.handle).filter(Boolean);
    for (const entry of this.#logs.values()) entry.queue.close();
    this.#logs.clear();
    if (!this.#stopping || handles.length > 0) this.#options.onLost(handles);
  }

  #lostError(): PluginHostError {
    const tail = this.#stderrTail.trim().split("\n").slice(-5).join("\n");
    const name = this.#options.source.name;
    const what = this.#options.role === "backend" ? "host" : "manifest host";
    return new PluginHostError(
      `backend "${name}" ${what} ${this.#death ?? "is gone"}` +
        (this.#stopping ? "" : "; it will be replaced") + (tail ? `:\n${tail}` : ""),
    );
  }
}

/** The `deno run` permission flags of a grant; an empty list grants nothing. */
export function permissionFlags(permissions: DenoPermissions): string[] {
  const flags: string[] = [];
  for (const kind of ["read", "write", "net", "env", "run"] as const) {
    const values = [...new Set(permissions[kind])];
    if (values.length > 0) flags.push(`--allow-${kind}=${values.join(",")}`);
  }
  return flags;
}

/** `host:port` of an http(s) module URL, for `--allow-import`; undefined for local files. */
function remoteOrigin(module: string): string | undefined {
  const url = new URL(module);
  if (url.protocol !== "http:" && url.protocol !== "https:") return undefined;
  return `${url.hostname}:${url.port || (url.protocol === "https:" ? "443" : "80")}`;
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

function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

function fileSafe(name: string): string {
  return name.replace(/[^A-Za-z0-9_.-]/g, "_");
}

async function sha256Hex(text: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return Array.from(new Uint8Array(digest), (byte) => byte.toString(16).padStart(2, "0")).join("");
}
