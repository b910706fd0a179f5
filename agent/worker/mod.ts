/**
 * The worker agent of cluster mode (`runnel agent`).
 *
 * An agent keeps one gRPC stream to a server (`proto/`): it says Hello with
 * its join token, labels, capabilities (the fingerprint of each backend of
 * its plugin host pool) and the attempts it still holds; it heartbeats,
 * runs the attempts it is assigned in sandboxed plugin hosts, streams their
 * masked logs, puts their outputs into the artifact store and reports each
 * result until the server acknowledges it.
 *
 * Secret values are never written down: an assignment names its secrets;
 * the agent reads those its own config declares and takes the rest from the
 * assignment as its server sent them, in memory only. After a restart, a
 * re-attached attempt's output waits until a server sends its assignment
 * again (it does for every attempt a Hello lists as running).
 *
 * Three promises hold whatever happens to the stream:
 * - **Results are never dropped.** A result is written to a durable outbox
 *   (`<stateDir>/outbox/`) before it is sent, and resent after every
 *   reconnect (and restart) until a `ResultAck` arrives. The server dedups
 *   by attempt id, so from its side each result arrives once.
 * - **Nothing else is sent twice.** A log chunk handed to a stream that
 *   breaks is not resent (its tail may be lost); chunks produced while no
 *   server is connected wait in a bounded backlog.
 * - **A restart reconciles.** Each attempt is recorded (`<stateDir>/attempts/`)
 *   before it starts. On startup, before Hello, the backends are asked to
 *   `recover` them: re-attached ones go on (logs, result), the rest of what
 *   the old process left is reaped. Hello then lists the re-attached ones as
 *   running and the unacknowledged results as pending.
 *
 * When the stream breaks, running attempts go on; the agent reconnects to
 * the next server in its list (round robin, capped exponential backoff with
 * jitter) and says Hello again.
 *
 * @module
 */

import { DEFAULT_RETENTION_MS } from "../../core/artifacts/store.ts";
import type { AttemptResult as ModelResult, ErrorClass, SecretRef } from "../../core/model.ts";
import { SecretNotFoundError, SecretStore } from "../../core/secrets.ts";
import { retryDelay } from "../../core/backoff.ts";
import { abortableDelay } from "../../core/_async.ts";
import { builtinPlugins, PluginHostPool } from "../../backends/mod.ts";
import { SPLIT_BACKEND } from "../../core/fanout.ts";
import type { Execution } from "../../backends/backend.ts";
import {
  type AssignmentSpec,
  type Capability,
  openAgentStream,
  type Reject,
  type ServerConnection,
  type Welcome,
} from "../../proto/mod.ts";
import type * as wire from "../../proto/mod.ts";
import { bundleDir, BundleError, type PipelineBundle, unpackBundle } from "../bundle.ts";
import {
  type AttemptJob,
  AttemptLifecycle,
  type AttemptRecord,
  type AttemptSink,
  type RunningAttempt,
  type SecretValues,
} from "../attempt/mod.ts";
import { agentPolicy } from "../attempt/policy.ts";
import { parseTraceparent } from "../trace/context.ts";
import {
  type AgentEvent,
  type AgentOptions,
  AgentOptionsError,
  AgentRejectedError,
  BUNDLE_WAIT_MS,
  CAPABILITY_TTL_MS,
  DEFAULT_AGENT_HEARTBEAT_MS,
  DEFAULT_AGENT_SLOTS,
  DEFAULT_HELLO_TIMEOUT_MS,
  DEFAULT_RECONNECT_INITIAL_MS,
  DEFAULT_RECONNECT_MAX_MS,
  EVENT_HISTORY,
  EVENT_LEVELS,
  EVENT_MESSAGES,
  type RunningAgent,
  STOP_ACK_WAIT_MS,
  STOP_CLOSE_GRACE_MS,
} from "./options.ts";
import {
  type AgentPaths,
  agentPaths,
  loadAgentId,
  loadCredential,
  saveCredential,
} from "./identity.ts";
import { lockStateDir, type StateDirLock } from "./lock.ts";
import { randomHex } from "../../core/_bytes.ts";
import { Outbox, type OutboxEntry } from "./outbox.ts";
import { sweepScratch } from "./scratch.ts";
import { SendQueue } from "./send_queue.ts";

export * from "./options.ts";
export * from "./identity.ts";
export * from "./lock.ts";
export * from "./outbox.ts";
export * from "./scratch.ts";

/** An attempt waiting for its run's bundle from a server. */
interface BundleWait {
  resolve(unpacking: Promise<string>): void;
  reject(error: Error): void;
}

/** One attempt this agent runs. */
interface ActiveAttempt {
  attemptId: string;
  running: RunningAttempt;
  done: Promise<void>;
}

/**
 * Starts an agent: loads its id, outbox and in-flight attempts, reconciles
 * what an earlier process left through the backends' `recover`, then
 * connects. Resolves once a server welcomed it, or once every server was
 * tried without an answer (it keeps trying in the background); rejects with
 * {@link AgentRejectedError} when a server refuses its join token.
 *
 * @example With no server answering, it keeps trying in the background
 * ```ts
 * import assert from "node:assert/strict";
 * import { startAgent } from "./mod.ts";
 * import { openLocalArtifactStore } from "../../core/artifacts/local.ts";
 * const dir = await Deno.makeTempDir();
 * const agent = await startAgent({
 *   servers: ["127.0.0.1:1"], // nobody listens there
 *   token: "s3cret",
 *   stateDir: `${dir}/agent`,
 *   artifacts: openLocalArtifactStore(`${dir}/artifacts`),
 *   log: () => {},
 * });
 * assert.equal(agent.connected, false);
 * assert.ok(agent.events.some((event) => event.type === "connect_failed"));
 * await agent.stop();
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function startAgent(options: AgentOptions): Promise<RunningAgent> {
  if (options.servers.length === 0) {
    throw new AgentOptionsError("Expected at least one server address (--server host:port)");
  }
  const slots = options.slots ?? DEFAULT_AGENT_SLOTS;
  if (!Number.isInteger(slots) || slots < 1) {
    throw new AgentOptionsError(`Expected a whole number of slots of 1 or more, got ${slots}`);
  }
  const paths = agentPaths(options.stateDir);
  // Before anything in it is read or written: one agent per state dir.
  const lock = await lockStateDir(paths.root);
  let agent: Agent;
  let scratchRoot: string;
  try {
    await Deno.mkdir(paths.work, { recursive: true });
    const agentId = options.agentId ?? await loadAgentId(paths.root);
    const credential = await loadCredential(paths.root, agentId);
    scratchRoot = await Deno.realPath(paths.work);
    agent = new Agent(options, { agentId, credential, lock, paths, scratchRoot, slots });
  } catch (error) {
    lock.release();
    throw error;
  }
  // Failed attempts' scratch directories are kept for inspection, not forever.
  sweepScratch(scratchRoot, options.scratchRetentionMs ?? DEFAULT_RETENTION_MS).catch(() => {});
  try {
    await agent.reconcile();
  } catch (error) {
    await agent.stop();
    throw error;
  }
  return await agent.connect();
}

interface AgentContext {
  agentId: string;
  /** The credential a server issued to the id ("" before its first registration). */
  credential: string;
  lock: StateDirLock;
  paths: AgentPaths;
  scratchRoot: string;
  slots: number;
}

class Agent implements RunningAgent {
  readonly agentId: string;
  readonly done: Promise<void>;
  readonly #options: AgentOptions;
  readonly #paths: AgentPaths;
  readonly #lock: StateDirLock;
  #credential: string;
  /**
   * A random id of this process, sent in every Hello: servers let a
   * reconnect of the process that holds the id's live connection take it
   * over, and refuse any other process while that connection lives.
   */
  readonly #sessionId = randomHex(16);
  /** Pipeline bundles unpacked (or being unpacked) by this agent, by digest. */
  readonly #bundles = new Map<string, Promise<string>>();
  /** Run directories looked up lately (`#isDirectory`). */
  readonly #directories = new Map<string, { is: boolean; at: number }>();
  /** Attempts waiting for a bundle asked of the servers: digest → attempt id → wait. */
  readonly #bundleWaits = new Map<string, Map<string, BundleWait>>();
  readonly #lifecycle: AttemptLifecycle;
  readonly #slots: number;
  readonly #pool: PluginHostPool;
  readonly #servers: string[];
  readonly #outbox: Outbox;
  readonly #active = new Map<string, ActiveAttempt>();
  /** Attempts whose result is in the outbox and whose record is being removed. */
  readonly #forgetting = new Map<string, Promise<void>>();
  /** The secrets this host's operator declares. */
  readonly #secrets: SecretStore;
  /** Re-attached attempts waiting for their assignment again, to learn their secrets. */
  readonly #awaitingSecrets = new Map<string, (values: SecretValues | undefined) => void>();
  readonly #events: AgentEvent[] = [];
  readonly #listeners = new Set<(event: AgentEvent) => void>();
  readonly #log: (fields: Record<string, unknown>) => void;
  /** What waits to be sent: started, log and result messages, in order. */
  readonly #outgoing = new SendQueue((error) => this.#failed(error));
  #stream: ServerConnection | undefined;
  #server: string | undefined;
  #heartbeatMs: number;
  #heartbeat: ReturnType<typeof setInterval> | undefined;
  #capabilities: { at: number; list: Capability[] } | undefined;
  #draining = false;
  /** A stop that does not wait for running steps (a plain stop, or a second signal). */
  #hurry = false;
  #stopping: Promise<void> | undefined;
  #shutdownDone: Promise<void> | undefined;
  readonly #abort = new AbortController();
  #loop: Promise<void> | undefined;
  #resolveDone!: () => void;
  #rejectDone!: (error: Error) => void;
  /** Settled once the first round of connection tries has an answer. */
  #firstAnswer:
    | { resolve: () => void; reject: (error: Error) => void; settled: boolean }
    | undefined;
  /** Wakes the stop that waits for the outbox to drain. */
  #acked: (() => void) | undefined;

  constructor(options: AgentOptions, context: AgentContext) {
    this.agentId = context.agentId;
    this.#options = options;
    this.#paths = context.paths;
    this.#lock = context.lock;
    this.#credential = context.credential;
    this.#slots = context.slots;
    this.#pool = new PluginHostPool({
      plugins: [...builtinPlugins(), ...(options.plugins ?? [])],
      context: {
        scratchRoot: context.scratchRoot,
        agentId: context.agentId,
        settings: options.settings,
      },
      entryDir: context.paths.hosts,
      onDiagnostic: (backend, text) => this.emit({ type: "diagnostic", backend, text }),
      ...options.hosts,
    });
    this.#lifecycle = new AttemptLifecycle({
      pool: this.#pool,
      artifacts: options.artifacts,
      recordsDir: context.paths.attempts,
      agentId: context.agentId,
      cancelGraceMs: options.cancelGraceMs,
      tracer: options.tracer,
      policy: options.policy ??
        agentPolicy({}, { plugins: (options.plugins ?? []).map((plugin) => plugin.name) }),
    });
    this.#servers = [...options.servers];
    this.#secrets = new SecretStore(options.secrets);
    this.#outbox = new Outbox(context.paths.outbox);
    this.#heartbeatMs = options.heartbeatMs ?? DEFAULT_AGENT_HEARTBEAT_MS;
    this.#log = options.log ?? printJsonLine;
    this.done = new Promise<void>((resolve, reject) => {
      this.#resolveDone = resolve;
      this.#rejectDone = reject;
    });
    // A caller that only awaits `startAgent` must not see an unhandled rejection.
    this.done.catch(() => {});
  }

  get connected(): boolean {
    return this.#stream !== undefined;
  }

  get server(): string | undefined {
    return this.#stream ? this.#server : undefined;
  }

  get running(): string[] {
    return [...this.#active.keys()];
  }

  get pendingResults(): string[] {
    return this.#outbox.entries().map((entry) => entry.attemptId);
  }

  get events(): readonly AgentEvent[] {
    return this.#events;
  }

  on(listener: (event: AgentEvent) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  emit(event: AgentEvent): void {
    this.#events.push(event);
    if (this.#events.length > EVENT_HISTORY) this.#events.shift();
    const { type, ...fields } = event;
    try {
      this.#log({
        time: new Date().toISOString(),
        level: EVENT_LEVELS[type] ?? "info",
        component: "agent",
        agent: this.agentId,
        msg: EVENT_MESSAGES[type],
        ...fields,
      });
    } catch {
      // A broken log sink must not stop the agent.
    }
    for (const listener of this.#listeners) listener(event);
  }

  // -------------------------------------------------------------------------
  // Startup.

  /**
   * Loads the outbox and the attempts an earlier process left, and asks
   * their backends to recover them: re-attached ones are supervised again,
   * the rest are reaped (by the backends) and forgotten here.
   */
  async reconcile(): Promise<void> {
    await this.#outbox.load();
    const left: AttemptRecord[] = [];
    for (const record of await this.#lifecycle.records()) {
      // Finished before the restart: its result is in the outbox.
      if (this.#outbox.has(record.attemptId)) await this.#lifecycle.forget(record.attemptId);
      else left.push(record);
    }
    const { reattached, lost } = await this.#lifecycle.recover({
      agentId: this.agentId,
      records: left,
      // The SSH hosts of its config may hold directories no record names
      // (an attempt started just before a crash): they are swept too.
      alsoAsk: this.#options.settings?.ssh ? ["ssh"] : [],
      onDiagnostic: (backend, text) => this.emit({ type: "diagnostic", backend, text }),
    });
    for (const { record, execution } of reattached) {
      this.emit({ type: "recovered", attemptId: record.attemptId });
      // Its secrets' values come with its assignment, sent again after Hello.
      const secrets = (record.secrets ?? []).length === 0
        ? undefined
        : new Promise<SecretValues | undefined>((resolve) =>
          this.#awaitingSecrets.set(record.attemptId, resolve)
        );
      this.#supervise(record, execution, secrets);
    }
    for (const record of lost) {
      // The server learns of it from Hello, which does not list it.
      this.emit({
        type: "lost",
        attemptId: record.attemptId,
        reason: "its backend could not re-attach to it after the agent restarted",
      });
    }
  }

  /** Starts the connection loop; settles as {@link startAgent} says. */
  connect(): Promise<RunningAgent> {
    const first = new Promise<void>((resolve, reject) => {
      this.#firstAnswer = { resolve, reject, settled: false };
    });
    this.#loop = this.#connectLoop();
    return first.then(() => this as RunningAgent);
  }

  #answered(error?: Error): void {
    if (!this.#firstAnswer || this.#firstAnswer.settled) return;
    this.#firstAnswer.settled = true;
    if (error) this.#firstAnswer.reject(error);
    else this.#firstAnswer.resolve();
  }

  // -------------------------------------------------------------------------
  // Connection.

  async #connectLoop(): Promise<void> {
    const signal = this.#abort.signal;
    let index = 0;
    let failures = 0;
    let tries = 0;
    while (!signal.aborted) {
      const server = this.#servers[index % this.#servers.length];
      let outcome: { welcomed: boolean; rejected?: Reject };
      try {
        outcome = await this.#session(server);
      } catch (error) {
        // A bad address, say: this server is skipped like an unreachable one.
        this.emit({ type: "connect_failed", server, reason: messageOf(error) });
        outcome = { welcomed: false };
      }
      // A wrong join token or identity will not get better by trying again.
      if (outcome.rejected?.code === "bad_token" || outcome.rejected?.code === "bad_identity") {
        const error = new AgentRejectedError(server, outcome.rejected);
        await this.#shutdown(error);
        this.#rejectDone(error);
        return;
      }
      if (signal.aborted) return;
      tries++;
      if (tries >= this.#servers.length) this.#answered();
      failures = outcome.welcomed ? 0 : failures + 1;
      // Another process holds this id's connection: the same server says
      // when it would give it up (if that process is gone by then).
      const duplicate = outcome.rejected?.code === "duplicate_agent";
      if (!duplicate) index++;
      const maxMs = this.#options.reconnect?.maxMs ?? DEFAULT_RECONNECT_MAX_MS;
      const delay = duplicate && outcome.rejected!.retryAfterMs > 0
        ? Math.min(outcome.rejected!.retryAfterMs, maxMs) + Math.floor(Math.random() * 100)
        : retryDelay(
          {
            backoffMs: this.#options.reconnect?.initialMs ?? DEFAULT_RECONNECT_INITIAL_MS,
            maxBackoffMs: maxMs,
            factor: 2,
            jitter: 0.5,
          },
          { retry: failures + 1, key: `${this.agentId}/${tries}` },
        );
      this.emit({
        type: "reconnecting",
        server: this.#servers[index % this.#servers.length],
        afterMs: delay,
      });
      await abortableDelay(delay, signal);
    }
  }

  /** One stream to one server, from Hello to its end. */
  async #session(
    server: string,
  ): Promise<{ welcomed: boolean; rejected?: Reject }> {
    const hello = await this.#hello();
    if (this.#abort.signal.aborted) return { welcomed: false };
    const stream = openAgentStream(server, {
      credentials: this.#options.credentials,
      keepaliveMs: this.#options.keepaliveMs,
    });
    // Stopping ends the stream cleanly; a server that does not end its side
    // in time gets it broken.
    let closeTimer: ReturnType<typeof setTimeout> | undefined;
    const onAbort = () => {
      stream.end();
      closeTimer = setTimeout(() => stream.cancel(), STOP_CLOSE_GRACE_MS);
    };
    this.#abort.signal.addEventListener("abort", onAbort, { once: true });
    let welcomed = false;
    let rejected: Reject | undefined;
    let helloTimedOut = false;
    const helloTimer = setTimeout(() => {
      helloTimedOut = true;
      stream.cancel();
    }, this.#options.helloTimeoutMs ?? DEFAULT_HELLO_TIMEOUT_MS);
    try {
      await stream.send({ hello });
      for await (const message of stream) {
        switch (message.body) {
          case "welcome":
            clearTimeout(helloTimer);
            if (message.welcome.credential) await this.#keepCredential(message.welcome.credential);
            welcomed = true;
            this.#welcomed(stream, server, message.welcome);
            break;
          case "reject":
            clearTimeout(helloTimer);
            rejected = message.reject;
            this.emit({ type: "rejected", server, ...message.reject });
            stream.cancel();
            break;
          case "assign":
            this.#assigned(message.assign);
            break;
          case "cancel":
            this.#cancelled(message.cancel);
            break;
          case "ack":
            await this.#acknowledged(message.ack);
            break;
          case "bundle":
            this.#bundleArrived(message.bundle);
            break;
        }
      }
    } finally {
      clearTimeout(helloTimer);
      this.#abort.signal.removeEventListener("abort", onAbort);
    }
    const end = await stream.closed;
    clearTimeout(closeTimer);
    if (this.#stream === stream) this.#detach();
    if (welcomed) {
      this.emit({ type: "disconnected", server, reason: end.ok ? "the stream ended" : end.reason });
    } else if (!rejected && !this.#abort.signal.aborted) {
      const reason = helloTimedOut ? "no answer to Hello in time" : end.reason;
      this.emit({ type: "connect_failed", server, reason });
    }
    return { welcomed, rejected };
  }

  async #hello(): Promise<Partial<wire.Hello>> {
    return {
      agentId: this.agentId,
      token: this.#options.token,
      labels: this.#options.labels ?? {},
      capabilities: await this.#fingerprint(),
      version: this.#options.version ?? "",
      runningAttemptIds: this.running,
      // With slots 0 a draining agent's Hello asks for nothing.
      slots: this.#draining ? 0 : this.#slots,
      pendingResultAttemptIds: this.pendingResults,
      credential: this.#credential,
      session: this.#sessionId,
      secretNames: this.#secrets.names,
    };
  }

  /**
   * Keeps the credential a server issued at registration, before anything
   * else: a later Hello without it is refused. Should the file not be
   * written, this process still has it (and a server issues it anew to this
   * process's session), but a restart would be refused: said loudly.
   */
  async #keepCredential(credential: string): Promise<void> {
    this.#credential = credential;
    try {
      await saveCredential(this.#paths.root, { agentId: this.agentId, credential });
    } catch (error) {
      this.#failed(error);
    }
  }

  /** The fingerprint of every backend of the pool; shell is off unless allowed. */
  async #fingerprint(): Promise<Capability[]> {
    const now = Date.now();
    if (this.#capabilities && now - this.#capabilities.at < CAPABILITY_TTL_MS) {
      return this.#capabilities.list;
    }
    const list = await Promise.all(this.#pool.names.map(async (backend): Promise<Capability> => {
      if (backend === "shell" && !this.#options.allowShell) {
        return {
          backend,
          available: false,
          version: "",
          detail: SHELL_OFF,
        };
      }
      const refused = this.#lifecycle.backendRefusal(backend);
      if (refused) return { backend, available: false, version: "", detail: refused };
      const found = await this.#pool.backend(backend).fingerprint();
      return {
        backend,
        available: found.available,
        version: found.version ?? "",
        detail: found.detail,
      };
    }));
    // Every agent splits (`batch:` / `foreach:`): runnel's own work, no backend.
    list.push({
      backend: SPLIT_BACKEND,
      available: true,
      version: "",
      detail: "runnel's splitter",
    });
    this.#capabilities = { at: now, list };
    return list;
  }

  #welcomed(stream: ServerConnection, server: string, welcome: Welcome): void {
    for (const other of welcome.servers) {
      if (other && !this.#servers.includes(other)) this.#servers.push(other);
    }
    if (welcome.heartbeatIntervalMs > 0) this.#heartbeatMs = welcome.heartbeatIntervalMs;
    this.#stream = stream;
    this.#server = server;
    clearInterval(this.#heartbeat);
    this.#heartbeat = setInterval(() => this.#beat(), this.#heartbeatMs);
    this.emit({
      type: "connected",
      server,
      serverId: welcome.serverId,
      heartbeatMs: this.#heartbeatMs,
    });
    this.#answered();
    this.#outgoing.attach(stream, this.#outbox.entries());
    for (const digest of this.#bundleWaits.keys()) this.#askForBundle(digest);
  }

  #detach(): void {
    this.#stream = undefined;
    clearInterval(this.#heartbeat);
    this.#heartbeat = undefined;
    this.#outgoing.detach();
  }

  #beat(): void {
    this.#stream?.send({
      heartbeat: {
        sentAtMs: Date.now(),
        runningAttemptIds: this.running,
        draining: this.#draining,
      },
    }).catch((error) => this.#failed(error));
  }

  async #acknowledged(ack: wire.ResultAck): Promise<void> {
    // Its record goes first: a restart in between must find its result or no record.
    await this.#forgetting.get(ack.attemptId)?.catch(() => {});
    if (!(await this.#outbox.remove(ack.attemptId))) return;
    this.emit({ type: "acked", ...ack });
    this.#acked?.();
  }

  // -------------------------------------------------------------------------
  // Attempts.

  #assigned(assignment: wire.Assignment): void {
    const { attemptId, backend } = assignment;
    this.emit({ type: "assignment", attemptId, backend });
    // Kept whatever becomes of this assignment: the run's later ones count on it.
    if (assignment.bundleJson) this.#receiveBundle(assignment.bundleJson);
    // Repeated (a resent assignment): the attempt runs, or its result is on its way.
    if (this.#active.has(attemptId) || this.#outbox.has(attemptId)) {
      this.#secretsCame(assignment);
      return;
    }
    const refusal = this.#refusal(assignment);
    if (refusal) {
      this.emit({ type: "refused", attemptId, reason: refusal.message });
      this.#deliver(attemptId, { ok: false, ...refusal }).catch((error) => this.#failed(error));
      return;
    }
    let spec: AssignmentSpec;
    let secrets: SecretValues;
    try {
      spec = parseAssignmentSpec(assignment.specJson);
      secrets = this.#secretValues(spec.secrets ?? {}, assignment.secrets ?? {});
    } catch (error) {
      const message = messageOf(error);
      const errorClass = error instanceof SecretNotFoundError ? error.errorClass : "infrastructure";
      this.emit({ type: "refused", attemptId, reason: message });
      this.#deliver(attemptId, { ok: false, errorClass, message })
        .catch((error) => this.#failed(error));
      return;
    }
    const job: AttemptJob = {
      runId: spec.runId,
      stepId: spec.stepId,
      attemptId,
      attempt: spec.attempt,
      backend,
      config: spec.config ?? {},
      baseDir: spec.baseDir ?? "",
      inputs: spec.inputs ?? {},
      outputs: spec.outputs ?? [],
      ...(spec.keepPartial === true ? { keepPartial: true } : {}),
      env: spec.env ?? {},
      secrets,
      matrix: spec.matrix ?? {},
      ...(spec.timeoutMs !== undefined ? { timeoutMs: spec.timeoutMs } : {}),
      ...(spec.resources ? { resources: spec.resources } : {}),
    };
    // Checked, as all a server sends: a malformed context only goes untraced.
    const trace = parseTraceparent(assignment.traceparent);
    if (trace) job.trace = trace;
    const running = this.#lifecycle.run(job, this.#sink(attemptId), {
      resolveBaseDir: () => this.#baseDir(job, spec.bundleDigest),
    });
    this.#track(running);
  }

  /**
   * The values of an assignment's secrets: read from this agent's own store
   * when it declares the name, else as the server sent them. Throws
   * {@link SecretNotFoundError} for one neither has.
   */
  #secretValues(refs: Record<string, SecretRef>, sent: Record<string, string>): SecretValues {
    const values: SecretValues = {};
    for (const [env, ref] of Object.entries(refs)) {
      if (ref.secret === undefined) {
        throw new SecretNotFoundError(
          env,
          `Secret "${env}" reads an env var or file of the runner; a cluster resolves only ` +
            "secrets its operator declared",
        );
      }
      if (this.#secrets.has(ref.secret)) values[env] = this.#secrets.read(ref.secret);
      else if (Object.hasOwn(sent, env)) values[env] = sent[env];
      else {
        throw new SecretNotFoundError(
          env,
          `Secret "${env}" names "${ref.secret}", which neither agent ${this.agentId}'s config ` +
            `nor its server (${this.#server ?? "unknown"}) declares`,
        );
      }
    }
    return values;
  }

  /** A re-attached attempt's assignment came again: its output can be masked now. */
  #secretsCame(assignment: wire.Assignment): void {
    const give = this.#awaitingSecrets.get(assignment.attemptId);
    if (!give) return;
    this.#awaitingSecrets.delete(assignment.attemptId);
    try {
      const spec = parseAssignmentSpec(assignment.specJson);
      give(this.#secretValues(spec.secrets ?? {}, assignment.secrets ?? {}));
    } catch (error) {
      this.emit({
        type: "diagnostic",
        backend: "agent",
        text: `attempt ${assignment.attemptId}: its output is withheld: ${messageOf(error)}`,
      });
      give(undefined);
    }
  }

  /** No secrets will come for a re-attached attempt (stopped): its output is withheld. */
  #giveUpSecrets(attemptId?: string): void {
    for (const [id, give] of this.#awaitingSecrets) {
      if (attemptId !== undefined && id !== attemptId) continue;
      this.#awaitingSecrets.delete(id);
      give(undefined);
    }
  }

  /** Keeps an attempt as running until its result is delivered. */
  #track(running: RunningAttempt): void {
    const active: ActiveAttempt = {
      attemptId: running.attemptId,
      running,
      done: Promise.resolve(),
    };
    this.#active.set(running.attemptId, active);
    active.done = running.result
      .then((result) => this.#deliver(running.attemptId, result))
      .catch((error) => this.#failed(error));
  }

  /** Where an attempt's start and masked output go: the stream to the server. */
  #sink(attemptId: string): AttemptSink {
    return {
      onStarted: (handle) => {
        this.#outgoing.push({ started: { attemptId, handle, atMs: Date.now() } });
        this.emit({ type: "started", attemptId, handle });
      },
      onLog: ({ stream, text }) => {
        this.#outgoing.push({ log: { attemptId, stream, text } });
        // Backpressure: the attempt reads on once the server has taken enough.
        return this.#outgoing.room();
      },
    };
  }

  /**
   * The directory an attempt runs in. A run that shipped its pipeline
   * directory runs in the copy unpacked here (once per digest), wherever
   * the submitter kept it; otherwise in the server's pipeline directory if
   * this machine has it, else in the attempt's own work directory (a deno
   * step's module must then be there to be found).
   */
  async #baseDir(job: AttemptJob, bundleDigest: string | undefined): Promise<string> {
    if (bundleDigest) {
      // The first assignment of a run on a stream carries the bundle; the
      // others wait for its unpacking.
      const unpacking = this.#bundles.get(bundleDigest);
      if (unpacking) return await unpacking;
      const dir = bundleDir(this.#bundleRoot, bundleDigest);
      if (await isDirectory(dir)) return dir;
      // The assignment that carried it went to a server that died: ask.
      return await this.#fetchBundle(job.attemptId, bundleDigest);
    }
    if (job.baseDir && this.#isDirectory(job.baseDir)) return job.baseDir;
    return this.#lifecycle.workDirOf(job);
  }

  /**
   * Whether a run's directory is on this machine: asked for every attempt,
   * and answered from a second-old look (most runs' attempts share one).
   */
  #isDirectory(path: string): boolean {
    const now = performance.now();
    const known = this.#directories.get(path);
    if (known && now - known.at < DIRECTORY_LOOK_MS) return known.is;
    let is = false;
    try {
      is = Deno.statSync(path).isDirectory;
    } catch {
      // Not here (or not readable): the attempt's own directory is used.
    }
    if (this.#directories.size >= MAX_DIRECTORY_LOOKS) this.#directories.clear();
    this.#directories.set(path, { is, at: now });
    return is;
  }

  get #bundleRoot(): string {
    return `${this.#paths.root}/bundles`;
  }

  /** Unpacks a bundle a server sent (once per digest); wakes the attempts waiting for it. */
  #receiveBundle(json: string): Promise<string> | undefined {
    let bundle: PipelineBundle;
    try {
      bundle = JSON.parse(json);
      if (typeof bundle?.digest !== "string") throw new Error("no digest");
    } catch (error) {
      this.#failed(new BundleError(`Expected a pipeline bundle as JSON: ${messageOf(error)}`));
      return undefined;
    }
    let unpacking = this.#bundles.get(bundle.digest);
    if (!unpacking) {
      unpacking = unpackBundle(bundle, this.#bundleRoot);
      this.#bundles.set(bundle.digest, unpacking);
      unpacking.catch(() => this.#bundles.delete(bundle.digest));
    }
    for (const wait of this.#bundleWaits.get(bundle.digest)?.values() ?? []) {
      wait.resolve(unpacking);
    }
    return unpacking;
  }

  /**
   * Asks the servers for a bundle (again after each reconnect) and waits
   * for it. An attempt that cannot get it is given back as lost: the
   * control plane failed it, not the step, so it runs again without using
   * the step's retries.
   */
  async #fetchBundle(attemptId: string, digest: string): Promise<string> {
    // It came while this attempt looked on disk.
    const unpacking = this.#bundles.get(digest);
    if (unpacking) return await unpacking;
    const waits = this.#bundleWaits.get(digest) ?? new Map<string, BundleWait>();
    this.#bundleWaits.set(digest, waits);
    const asked = waits.size > 0;
    const arrived = new Promise<string>((resolve, reject) => {
      const timer = setTimeout(
        () =>
          reject(
            new BundleError(
              `Expected the pipeline bundle ${digest} from a server within ` +
                `${BUNDLE_WAIT_MS / 1000} s; none sent it`,
            ),
          ),
        BUNDLE_WAIT_MS,
      );
      waits.set(attemptId, {
        resolve: (unpacking) => {
          clearTimeout(timer);
          resolve(unpacking);
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      });
    });
    if (!asked) this.#askForBundle(digest);
    try {
      return await arrived;
    } catch (error) {
      this.#active.get(attemptId)?.running.stop({ kind: "shutdown", message: messageOf(error) });
      throw error;
    } finally {
      waits.delete(attemptId);
      if (waits.size === 0 && this.#bundleWaits.get(digest) === waits) {
        this.#bundleWaits.delete(digest);
      }
    }
  }

  #askForBundle(digest: string): void {
    this.#stream?.send({ bundleRequest: { digest } }).catch((error) => this.#failed(error));
  }

  /** A server's answer to a bundle request. */
  #bundleArrived(answer: wire.Bundle): void {
    if (answer.bundleJson && this.#receiveBundle(answer.bundleJson)) return;
    const error = new BundleError(
      `Expected the pipeline bundle ${answer.digest} from the server: ` +
        (answer.message || "it sent none"),
    );
    for (const wait of this.#bundleWaits.get(answer.digest)?.values() ?? []) wait.reject(error);
  }

  /** Stops waiting for bundles: for one attempt, or for all. */
  #stopBundleWaits(reason: string, attemptId?: string): void {
    for (const waits of this.#bundleWaits.values()) {
      for (const [waiting, wait] of waits) {
        if (attemptId === undefined || waiting === attemptId) wait.reject(new Error(reason));
      }
    }
  }

  /** The agent's own disk failed it (the outbox cannot be written): say so loudly. */
  #failed(error: unknown): void {
    this.emit({
      type: "diagnostic",
      backend: "agent",
      text: `internal error: ${messageOf(error)}`,
    });
  }

  /** Why an assignment cannot run here, as the failure reported for it. */
  #refusal(
    assignment: wire.Assignment,
  ): { errorClass: ErrorClass; message: string; lost?: true } | undefined {
    // Refusals that are no fault of the step's come back as lost: the step
    // runs again without using its retries.
    if (this.#draining || this.#stopping) {
      return {
        errorClass: "infrastructure",
        message: `agent ${this.agentId} is stopping`,
        lost: true,
      };
    }
    if (assignment.backend === "shell" && !this.#options.allowShell) {
      return { errorClass: "permission", message: `agent ${this.agentId}: ${SHELL_OFF}` };
    }
    if (assignment.backend !== SPLIT_BACKEND && !this.#pool.source(assignment.backend)) {
      return {
        errorClass: "infrastructure",
        message: `backend "${assignment.backend}" is not available on agent ${this.agentId}`,
      };
    }
    if (this.#active.size >= this.#slots) {
      // The scheduler counted a slot free that is not (yet): a control plane race.
      return {
        errorClass: "infrastructure",
        message:
          `agent ${this.agentId} has no free slot (${this.#active.size} of ${this.#slots} busy)`,
        lost: true,
      };
    }
    return undefined;
  }

  /** Supervises an execution a backend re-attached after a restart. */
  #supervise(
    record: AttemptRecord,
    execution: Execution,
    secrets: Promise<SecretValues | undefined> | undefined,
  ): void {
    this.#track(
      this.#lifecycle.adopt({ record, execution }, this.#sink(record.attemptId), { secrets }),
    );
  }

  /**
   * Records a result in the outbox (durably, before anything else), sends
   * it, and forgets the attempt meanwhile: once the outbox holds its result,
   * a restart forgets the attempt's record anyway (`reconcile`), so the
   * result need not wait for that removal.
   */
  async #deliver(attemptId: string, result: ModelResult): Promise<void> {
    const entry: OutboxEntry = { attemptId, resultJson: JSON.stringify(result), atMs: Date.now() };
    await this.#outbox.add(entry);
    this.#active.delete(attemptId);
    // On its way first: the next step of its run waits for it.
    this.#outgoing.push({ result: entry });
    const forgetting = this.#lifecycle.forget(attemptId);
    this.#forgetting.set(attemptId, forgetting);
    this.emit({
      type: "finished",
      attemptId,
      ok: result.ok,
      ...(result.ok ? {} : { errorClass: result.errorClass }),
    });
    try {
      await forgetting;
    } finally {
      this.#forgetting.delete(attemptId);
    }
  }

  #cancelled(cancel: wire.CancelAttempt): void {
    const active = this.#active.get(cancel.attemptId);
    this.emit({
      type: "cancel",
      attemptId: cancel.attemptId,
      reason: cancel.reason,
      known: active !== undefined,
    });
    active?.running.stop(
      cancel.reason === "timeout"
        ? { kind: "timeout" }
        : { kind: "cancel", message: cancel.reason || "cancelled by the server" },
    );
    this.#stopBundleWaits("cancelled", cancel.attemptId);
    this.#giveUpSecrets(cancel.attemptId);
  }

  // -------------------------------------------------------------------------
  // Stopping.

  stop(options: { drain?: boolean } = {}): Promise<void> {
    if (this.#stopping && !options.drain && this.#draining) {
      // Asked to stop now while draining: cut the drain short.
      this.#hurry = true;
      this.#cancelActive();
      this.#acked?.();
      return this.#stopping;
    }
    this.#stopping ??= (async () => {
      if (options.drain) {
        this.#draining = true;
        this.#beat();
      } else {
        this.#hurry = true;
        this.#cancelActive();
      }
      await Promise.allSettled([...this.#active.values()].map((active) => active.done));
      await Promise.allSettled(this.#forgetting.values());
      await this.#waitForAcks(STOP_ACK_WAIT_MS);
      this.#abort.abort();
      await this.#loop;
      await this.#shutdown();
      this.#resolveDone();
    })();
    return this.#stopping;
  }

  /** Waits until every result is acknowledged, or `ms` passed, or no server is connected. */
  /** Cancels every attempt still running (reported as infrastructure failures). */
  #cancelActive(): void {
    for (const active of this.#active.values()) {
      active.running.stop({
        kind: "shutdown",
        message: "the agent stopped before the attempt ended",
      });
    }
    this.#stopBundleWaits("the agent stopped");
    this.#giveUpSecrets();
  }

  /**
   * Waits for the outbox to be acknowledged: without end while draining,
   * `hurryMs` at most once asked to stop now.
   */
  async #waitForAcks(hurryMs: number): Promise<void> {
    const started = Date.now();
    const deadline = () => this.#hurry ? started + hurryMs : Infinity;
    while (this.#outbox.entries().length > 0 && this.#stream && Date.now() < deadline()) {
      const left = deadline() - Date.now();
      await new Promise<void>((resolve) => {
        const timer = Number.isFinite(left) ? setTimeout(resolve, left) : undefined;
        this.#acked = () => {
          clearTimeout(timer);
          resolve();
        };
        // A stream that breaks meanwhile ends the wait (see the loop's condition).
        this.#stream?.closed.then(() => {
          clearTimeout(timer);
          resolve();
        });
      });
      this.#acked = undefined;
    }
  }

  /** Stops everything; `startAgent`, if still waiting, rejects with `error` or resolves. */
  #shutdown(error?: Error): Promise<void> {
    this.#shutdownDone ??= (async () => {
      this.#abort.abort();
      clearInterval(this.#heartbeat);
      this.#stream?.end();
      await this.#pool.close();
      this.#lock.release();
      this.#answered(error);
      this.emit({ type: "stopped" });
    })();
    return this.#shutdownDone;
  }
}

/** How long a look at whether a run's directory is on this machine holds. */
const DIRECTORY_LOOK_MS = 1_000;

/** Run directories whose look is kept at most. */
const MAX_DIRECTORY_LOOKS = 1_000;

/** Sentence of a shell capability (and refusal) on an agent that does not run shell steps. */
const SHELL_OFF =
  "shell steps are off on agents (they run unsandboxed); start the agent with --allow-shell to run them";

/** Reads `Assignment.specJson`; throws a plain error for anything but an assignment spec. */
function parseAssignmentSpec(json: string): AssignmentSpec {
  let spec: AssignmentSpec;
  try {
    spec = JSON.parse(json);
  } catch (error) {
    throw new Error(`Expected the assignment's spec as JSON: ${messageOf(error)}`);
  }
  if (typeof spec !== "object" || spec === null || Array.isArray(spec)) {
    throw new Error("Expected the assignment's spec as a JSON object");
  }
  for (const key of ["runId", "stepId"] as const) {
    if (typeof spec[key] !== "string" || !spec[key]) {
      throw new Error(`Expected "${key}" in the assignment's spec`);
    }
  }
  spec.attempt ??= 1;
  return spec;
}

async function isDirectory(path: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isDirectory;
  } catch {
    return false;
  }
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

function printJsonLine(fields: Record<string, unknown>): void {
  console.error(JSON.stringify(fields));
}
