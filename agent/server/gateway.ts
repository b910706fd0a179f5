/**
 * The agent gateway of a server: the server's side of the agents' gRPC
 * streams. It admits an agent (join token, then the identity the servers
 * issued it, one live connection per agent id: `identity.ts`), registers it
 * as a worker under a lease of three heartbeat intervals, pushes it the
 * assignments and stops the scheduler writes for it, and turns what the
 * agent reports into store writes: log batches, and results (create-only,
 * so a result reported twice is recorded once; a result of an attempt that
 * is no longer the agent's is refused: fencing). It accepts what an agent
 * says only of the attempts assigned to it: anything else is counted,
 * logged and dropped.
 *
 * Secret values are resolved here, as an assignment is pushed: the store
 * names a step's secrets, and the values of those the agent does not declare
 * itself are read from this server's secret store and sent on the agent's
 * stream only.
 *
 * The gateway never talks to the scheduler directly: any server can hold
 * any agent's stream.
 *
 * @module
 */

import { valuesProblem } from "../../core/values.ts";
import { timingSafeEqual } from "node:crypto";
import type { Compare, Store, TxnOp } from "../../consensus/store.ts";
import type {
  AgentConnection,
  AgentMessage,
  AssignmentSpec,
  Hello,
  RejectCode,
} from "../../proto/mod.ts";
import {
  type AgentConnectionRecord,
  type AgentIdentityRecord,
  type AssignmentRecord,
  clusterKeys,
  type ResultRecord,
  type WorkerRecord,
} from "./keys.ts";
import { admitAgent } from "./identity.ts";
import { Presence } from "./presence.ts";
import type { ResultSink } from "./scheduler.ts";
import type { AttemptResult, StepState } from "../../core/model.ts";
import { DEFAULT_RETENTION_MS } from "../../core/artifacts/store.ts";
import { type BundleStorage, getBundle } from "../bundle.ts";
import type { SecretStore } from "../../core/secrets.ts";
import { SECRET_NAME_PATTERN } from "../../core/schema.ts";

/** The seed's rule: a worker is offline after this many missed heartbeats. */
export const MISSED_HEARTBEATS_OFFLINE = 3;

/** Default heartbeat interval of agents (the 5 s). */
export const DEFAULT_HEARTBEAT_MS = 5_000;

/** How long a new stream may take to say Hello. */
const HELLO_TIMEOUT_MS = 10_000;

/** How often buffered log text is written to the store. */
const LOG_FLUSH_MS = 200;

/**
 * Log characters a stream may have waiting for the store before its next
 * message is read: gRPC's flow control then slows the agent, whose step's
 * unread output waits on the agent's disk (`backends/log_queue.ts`).
 */
const LOG_HIGH_WATER_CHARS = 1024 * 1024;

/**
 * Log characters the cluster stores per attempt (16 MiB of ASCII). etcd
 * keeps its whole database mapped in memory under a quota (2 GiB by
 * default) that stops the cluster when full: one step printing 100 MB must
 * not take a twentieth of it. Past this the log is counted, and a line says
 * how much was not stored; `runnel run` locally keeps everything.
 */
export const MAX_STORED_LOG_CHARS = 16 * 1024 * 1024;

/** A new log lease each day (see `rollingLease`). */
const LEASE_ROLL_MS = 24 * 60 * 60 * 1000;

/** Largest log batch written as one key (etcd's request limit is 1.5 MiB). */
const LOG_BATCH_CHARS = 64 * 1024;

/**
 * Most log characters that go in a result's commit (more are flushed on
 * their own): a commit of many results stays far below etcd's request limit.
 */
const MERGED_LOG_CHARS = 4 * 1024;

/** The log lease must live this much longer for a rest of log to wait in a result's commit. */
const MERGED_LEASE_MARGIN_MS = 60_000;

/** Options of {@link createGateway}. */
export interface GatewayOptions {
  serverId: string;
  store: Store;
  /** The cluster's join token. */
  token: string;
  /** The secrets this server's operator declares; their values go to agents as assignments do. */
  secrets?: SecretStore;
  /** Heartbeat interval agents keep (default 5 s). */
  heartbeatMs?: number;
  /** gRPC addresses of every server, for the agents' failover. */
  servers?: () => string[];
  /** Structured log line. */
  log?: (fields: Record<string, unknown>) => void;
  /** The scheduler's result sink while this server schedules (`scheduler.ts`). */
  resultSink?: () => ResultSink | undefined;
  /** How long step logs stay in the store (default 14 days, as artifacts). */
  logRetentionMs?: number;
  /**
   * Counts an agent refused at Hello (its `RejectCode`) or a message dropped
   * because it spoke of an attempt that is not the sender's (its kind).
   */
  onRefused?: (what: RejectCode | RefusedKind) => void;
  /** Where shipped directories are kept (`agent/bundle.ts`). */
  bundles?: BundleStorage;
}

/** What an agent sent about an attempt that is not its own. */
export type RefusedKind = "log" | "started" | "result" | "bundle";

/**
 * Results of one stream being recorded at once (see `serveAgent`): past it,
 * the stream is read on once one is done (an agent has as many in flight as
 * it has slots, and an ack is all it waits for).
 */
const MAX_RESULTS_IN_FLIGHT = 64;

/** Refused messages logged per stream (all are counted): a flood must not flood the log. */
const MAX_REFUSALS_LOGGED = 100;

/** A gateway: `onConnect` serves one agent stream. */
export interface Gateway {
  onConnect(stream: AgentConnection): Promise<void>;
  /** Agents connected to this server now. */
  readonly connected: number;
  /** Stops its batched writes (after the agent streams have ended). */
  close(): Promise<void>;
}

/** Builds the gateway of a server. */
export function createGateway(options: GatewayOptions): Gateway {
  let connected = 0;
  const logLease = rollingLease(options.store, options.logRetentionMs ?? DEFAULT_RETENTION_MS);
  const presence = new Presence(options.store, {
    serverId: options.serverId,
    heartbeatMs: options.heartbeatMs ?? DEFAULT_HEARTBEAT_MS,
    log: options.log,
  });
  const results = new ResultWriter(options.store);
  return {
    get connected() {
      return connected;
    },
    async onConnect(stream) {
      connected++;
      try {
        await serveAgent(options, stream, logLease, presence, results);
      } finally {
        connected--;
      }
    },
    close: () => presence.close(),
  };
}

async function serveAgent(
  options: GatewayOptions,
  stream: AgentConnection,
  logLease: LogLease,
  presence: Presence,
  results: ResultWriter,
): Promise<void> {
  const { store } = options;
  const log = (fields: Record<string, unknown>) =>
    options.log?.({ component: "gateway", server: options.serverId, peer: stream.peer, ...fields });
  const heartbeatMs = options.heartbeatMs ?? DEFAULT_HEARTBEAT_MS;
  const incoming = stream[Symbol.asyncIterator]();
  const refuseHello = async (
    code: RejectCode,
    message: string,
    fields: Record<string, unknown>,
    retryAfterMs = 0,
  ) => {
    options.onRefused?.(code);
    log({ level: "warn", msg: "agent refused", code, ...fields });
    await stream.send({ reject: { code, message, retryAfterMs } });
    stream.end();
  };
  const first = await nextWithin(incoming, HELLO_TIMEOUT_MS);
  if (!first || first.body !== "hello") {
    return await refuseHello("bad_hello", "Expected Hello first", { reason: "no hello" });
  }
  const hello = first.hello;
  if (!tokenMatches(hello.token, options.token)) {
    return await refuseHello(
      "bad_token",
      hello.token
        ? "wrong join token (check --token against the server's)"
        : "missing join token (pass --token)",
      { agent: hello.agentId, reason: hello.token ? "wrong join token" : "missing join token" },
    );
  }
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/.test(hello.agentId)) {
    return await refuseHello(
      "bad_hello",
      `Expected an agent id of letters, digits, ".", "_" or "-", got "${hello.agentId}"`,
      { reason: "bad agent id" },
    );
  }
  const agentId = hello.agentId;
  const agentSecrets = new Set(
    (hello.secretNames ?? []).filter((name) => SECRET_NAME_PATTERN.test(name)),
  );
  const lease = await store.grantLease(heartbeatMs * MISSED_HEARTBEATS_OFFLINE);
  const now = Date.now();
  const worker: WorkerRecord = {
    agentId,
    labels: hello.labels,
    capabilities: hello.capabilities.map((c) => ({
      backend: c.backend,
      available: c.available,
      version: c.version,
      detail: c.detail,
    })),
    // A draining agent says Hello with 0 slots: it gets no new work.
    slots: Math.max(0, hello.slots),
    server: options.serverId,
    secrets: [...new Set([...agentSecrets, ...(options.secrets?.names ?? [])])].sort(),
    version: hello.version,
    connectedAt: now,
    lastHeartbeat: now,
  };
  const admission = await admitAgent(
    { agentId, credential: hello.credential, session: hello.session },
    {
      store,
      serverId: options.serverId,
      lease: lease.id,
      heartbeatMs,
      alsoWrite: () => [workerPut(worker, lease.id)],
    },
  );
  if (!admission.ok) {
    await store.revokeLease(lease.id).catch(() => {});
    return await refuseHello(
      admission.code,
      admission.message,
      { agent: agentId, reason: admission.message },
      admission.retryAfterMs,
    );
  }
  const connection: LiveConnection = {
    record: admission.connection,
    revision: admission.revision,
    credentialHash: admission.credentialHash,
  };
  log({
    msg: admission.issued ? "agent registered: credential issued" : "agent connected",
    agent: agentId,
    labels: hello.labels,
    slots: worker.slots,
  });
  await stream.send({
    welcome: {
      serverId: options.serverId,
      heartbeatIntervalMs: heartbeatMs,
      servers: options.servers?.() ?? [],
      credential: admission.issued ?? "",
    },
  });

  const stop = new AbortController();
  const logs = new LogBuffer(store, log, logLease);
  const sent = new Set<string>(hello.runningAttemptIds);
  const pending = new Set<string>(hello.pendingResultAttemptIds ?? []);
  const own = new OwnAssignments();
  try {
    const secretsOf = (record: AssignmentRecord) =>
      secretValues(record, agentSecrets, options.secrets, log);
    const watchers = [
      pushAssignments(
        store,
        agentId,
        stream,
        sent,
        pending,
        own,
        secretsOf,
        stop.signal,
        options.bundles,
      ),
      pushStops(store, agentId, stream, stop.signal),
    ];
    watchers.forEach((watcher) =>
      watcher.catch((error) => {
        own.fail();
        log({ level: "error", msg: "watch failed", agent: agentId, error: String(error) });
        stream.cancel("the server lost its store watch");
      })
    );
    watchConnection(store, agentId, connection, stop.signal).then(async (cut) => {
      if (!cut) return;
      log({ level: "warn", msg: "agent connection cut", agent: agentId, reason: cut.reason });
      // A revoked (or forgotten) agent is offline at once: its claim and
      // worker key go, and its attempts are rescheduled.
      if (cut.identity) await store.revokeLease(lease.id).catch(() => {});
      stream.cancel(cut.reason);
    }, (error) => {
      log({ level: "error", msg: "watch failed", agent: agentId, error: String(error) });
      stream.cancel("the server lost its store watch");
    });
    const context: HandleContext = {
      options,
      store,
      stream,
      worker,
      lease: lease.id,
      connection,
      own,
      refused: new Set(),
      logs,
      presence,
      results,
      log,
    };
    // Results are recorded side by side: each waits for its commit (the
    // scheduler's group commit, or this server's `ResultWriter`), and the
    // stream's next messages are not held up behind it — otherwise an
    // agent's results went to etcd one commit at a time, whatever its slots.
    // Everything else stays in the stream's order (logs before their result:
    // a result flushes what its attempt's log messages added before it).
    const recording = new Set<Promise<void>>();
    let failure: { error: unknown } | undefined;
    try {
      for (;;) {
        const next = await incoming.next();
        if (next.done || failure) break;
        if (next.value.body !== "result") {
          await handle(next.value, context);
          continue;
        }
        while (recording.size >= MAX_RESULTS_IN_FLIGHT) await Promise.race(recording);
        const task: Promise<void> = handle(next.value, context).catch((error) => {
          // As an error of the stream's loop: the stream is cut, the agent resends.
          failure ??= { error };
          stream.cancel(error instanceof Error ? error.message : String(error));
        }).finally(() => recording.delete(task));
        recording.add(task);
      }
    } finally {
      // Acks of results being recorded go out before this side ends.
      await Promise.all(recording);
    }
    if (failure) throw failure.error;
  } finally {
    stop.abort();
    own.fail();
    presence.gone(agentId);
    // The agent ended its side (or it broke): end ours, so the stream closes now.
    stream.end();
    await logs.close();
    // The lease is left to expire: if the agent comes back (here or on
    // another server) within three heartbeats, it was never offline.
    const end = await stream.closed;
    log({ msg: "agent disconnected", agent: agentId, reason: end.reason || "stream ended" });
  }
}

/** The stream's hold on its agent's live-connection claim. */
interface LiveConnection {
  record: AgentConnectionRecord;
  /** Revision of this stream's last write of the claim. */
  revision: number;
  /** The identity's credential hash when the agent was admitted. */
  credentialHash: string;
}

interface HandleContext {
  options: GatewayOptions;
  store: Store;
  stream: AgentConnection;
  worker: WorkerRecord;
  lease: string;
  connection: LiveConnection;
  own: OwnAssignments;
  /** Kinds and attempts already logged as refused (each is logged once per stream). */
  refused: Set<string>;
  logs: LogBuffer;
  presence: Presence;
  results: ResultWriter;
  log: (fields: Record<string, unknown>) => void;
}

async function handle(message: AgentMessage, context: HandleContext): Promise<void> {
  const { store, worker, own } = context;
  switch (message.body) {
    case "heartbeat": {
      // The lease carries liveness (a renewal is no write in etcd); the
      // time goes into this server's batched presence key.
      await store.keepAlive(context.lease);
      worker.lastHeartbeat = Date.now();
      context.presence.seen(worker.agentId, worker.lastHeartbeat);
      // A draining agent finishes what it runs and takes nothing new: the
      // one heartbeat that changes the worker key writes it.
      if (message.heartbeat.draining && worker.slots !== 0) {
        worker.slots = 0;
        const key = clusterKeys.agentConnection(worker.agentId);
        const write = await store.txn({
          // Only while this stream holds the agent's claim.
          compare: [{ key, target: "mod", op: "==", value: context.connection.revision }],
          success: [workerPut(worker, context.lease)],
        });
        if (!write.succeeded) {
          context.stream.cancel(`another connection of agent ${worker.agentId} took over`);
        }
      }
      return;
    }
    case "log":
      if (await own.owns(message.log.attemptId)) {
        context.logs.add(message.log.attemptId, message.log.text);
        // Backpressure: this stream's next message waits until the store has caught up.
        await context.logs.room();
      } else refuse(context, "log", message.log.attemptId);
      return;
    case "started":
      if (!(await own.owns(message.started.attemptId))) {
        refuse(context, "started", message.started.attemptId);
      }
      return;
    case "result":
      await recordResult(context, message.result.attemptId, message.result.resultJson);
      return;
    case "bundleRequest":
      await sendBundle(context, message.bundleRequest.digest);
      return;
    case "hello":
      context.log({ level: "warn", msg: "second hello ignored", agent: worker.agentId });
      return;
  }
}

/**
 * Drops a message about an attempt that is not the sender's: counted, and
 * logged once per stream and attempt.
 */
function refuse(context: HandleContext, kind: RefusedKind, attemptId: string): void {
  context.options.onRefused?.(kind);
  const key = `${kind} ${attemptId}`;
  if (context.refused.has(key) || context.refused.size >= MAX_REFUSALS_LOGGED) return;
  context.refused.add(key);
  context.log({
    level: "warn",
    msg: "agent message refused: not its assignment",
    agent: context.worker.agentId,
    kind,
    attemptId,
  });
}

/** Sends a bundle the agent asked for, if one of its assignments uses it. */
async function sendBundle(context: HandleContext, digest: string): Promise<void> {
  const { stream, worker } = context;
  if (!(await context.own.usesBundle(digest))) {
    refuse(context, "bundle", digest);
    await stream.send({
      bundle: { digest, message: `No assignment of agent ${worker.agentId} uses bundle ${digest}` },
    });
    return;
  }
  const bundle = await getBundle(context.store, digest, context.options.bundles);
  await stream.send({
    bundle: bundle
      ? { digest, bundleJson: JSON.stringify(bundle) }
      : { digest, message: `The store holds no bundle ${digest}` },
  });
}

/**
 * Resolves with a reason to cut the stream: another connection took the
 * agent's claim over, its lease ended, or (`identity`) an operator revoked
 * or deleted its identity. Resolves undefined when `signal` aborts.
 */
async function watchConnection(
  store: Store,
  agentId: string,
  connection: LiveConnection,
  signal: AbortSignal,
): Promise<{ reason: string; identity?: true } | undefined> {
  const claimKey = clusterKeys.agentConnection(agentId);
  const identityKey = clusterKeys.agentIdentity(agentId);
  for await (
    const event of store.watch(clusterKeys.agentPrefix(agentId), {
      fromRevision: connection.revision + 1,
      signal,
    })
  ) {
    if (event.key === claimKey) {
      if (event.type === "delete") {
        return { reason: "the agent's connection lease ended (missed heartbeats)" };
      }
      const claim = JSON.parse(event.value!) as AgentConnectionRecord;
      if (claim.connectionId !== connection.record.connectionId) {
        return { reason: `another connection of agent ${agentId} took over (${claim.server})` };
      }
    } else if (event.key === identityKey) {
      if (event.type === "delete") {
        return { reason: `the identity of agent ${agentId} was deleted`, identity: true };
      }
      const identity = JSON.parse(event.value!) as AgentIdentityRecord;
      if (identity.revokedAt !== undefined) {
        return { reason: `agent ${agentId} was revoked`, identity: true };
      }
      if (identity.credentialHash !== connection.credentialHash) {
        return { reason: `agent ${agentId} was issued another credential`, identity: true };
      }
    }
  }
  return undefined;
}

/**
 * The attempts assigned to the agent of a stream (with the bundle each
 * uses), as its assignment watch sees them: kept before each is pushed, so
 * the agent cannot speak of an assignment the gateway does not know yet.
 */
class OwnAssignments {
  readonly #bundles = new Map<string, string | undefined>();
  readonly #listed: Promise<void>;
  #resolveListed!: () => void;

  constructor() {
    this.#listed = new Promise((resolve) => this.#resolveListed = resolve);
  }

  add(record: AssignmentRecord): void {
    this.#bundles.set(record.attemptId, record.spec.bundleDigest);
  }

  delete(attemptId: string): void {
    this.#bundles.delete(attemptId);
  }

  /** The first listing is in (or the watch failed: then nothing is owned). */
  listed(): void {
    this.#resolveListed();
  }

  fail(): void {
    this.#bundles.clear();
    this.#resolveListed();
  }

  async owns(attemptId: string): Promise<boolean> {
    await this.#listed;
    return this.#bundles.has(attemptId);
  }

  async usesBundle(digest: string): Promise<boolean> {
    await this.#listed;
    return [...this.#bundles.values()].includes(digest);
  }
}

function workerPut(worker: WorkerRecord, lease: string): TxnOp {
  return {
    type: "put",
    key: clusterKeys.worker(worker.agentId),
    value: JSON.stringify(worker),
    lease,
  };
}

/**
 * Records a result once; refuses one of an attempt that is no longer this
 * agent's (its worker was declared offline and the step went elsewhere).
 */
async function recordResult(
  context: HandleContext,
  attemptId: string,
  resultJson: string,
): Promise<void> {
  const { store, worker, stream } = context;
  const assignmentKey = clusterKeys.assignment(worker.agentId, attemptId);
  const resultKey = clusterKeys.result(attemptId);
  if (!(await context.own.owns(attemptId))) {
    if (await alreadyRecorded(store, resultKey, attemptId, worker.agentId)) {
      // Reported before (the ack was lost with a connection): already recorded.
      await stream.send({ ack: { attemptId, accepted: true, message: "already recorded" } });
      return;
    }
    refuse(context, "result", attemptId);
    await stream.send({
      ack: {
        attemptId,
        accepted: false,
        message: `attempt ${attemptId} is not assigned to agent ${worker.agentId} ` +
          "(or no longer: its worker was declared offline and the step was rescheduled)",
      },
    });
    return;
  }
  let result: AttemptResult;
  try {
    result = JSON.parse(resultJson);
  } catch {
    await stream.send({
      ack: { attemptId, accepted: false, message: "Expected the result as JSON" },
    });
    return;
  }
  const badValues = result?.ok ? valuesProblem(result.values) : undefined;
  if (badValues) {
    // The step's (or a hostile agent's) doing: the attempt fails, the server stays bounded.
    result = {
      ok: false,
      errorClass: "application",
      message: `Its values were refused: ${badValues}`,
    };
  }
  // Logs first: a reader who sees the result sees the whole log. The rest
  // of it goes in the result's own commit where it can (one etcd round trip
  // instead of two for a step that printed anything).
  context.logs.end(attemptId);
  const rest = await context.logs.takeRest(attemptId);
  const [runId, stepId] = splitAttemptId(attemptId);
  const record: ResultRecord = {
    runId,
    stepId,
    attemptId,
    agentId: worker.agentId,
    result,
    at: Date.now(),
  };
  // On the scheduling server, the scheduler commits it with the step's end.
  const sink = context.options.resultSink?.();
  if (sink && await sink.offer(record, rest).catch(() => false)) {
    await stream.send({ ack: { attemptId, accepted: true, message: "recorded" } });
    return;
  }
  const written = await context.results.write({
    compare: [
      { key: assignmentKey, target: "create", op: ">", value: 0 },
      { key: resultKey, target: "create", op: "==", value: 0 },
    ],
    put: { type: "put", key: resultKey, value: JSON.stringify(record) },
    before: rest,
  });
  // Not recorded (a repeat, or stale): the rest of its log is kept all the same.
  if (!written && rest.length > 0) await context.logs.write(rest);
  if (written) {
    await stream.send({ ack: { attemptId, accepted: true, message: "recorded" } });
    return;
  }
  if (await store.get(resultKey)) {
    // Reported before (the ack was lost with a connection): already recorded.
    await stream.send({ ack: { attemptId, accepted: true, message: "already recorded" } });
    return;
  }
  context.log({ level: "warn", msg: "stale result refused", agent: worker.agentId, attemptId });
  await stream.send({
    ack: {
      attemptId,
      accepted: false,
      message: "this attempt is no longer current: its worker was declared offline " +
        "and the step was rescheduled",
    },
  });
}

/** One result to record: its put, if its compares hold. */
interface ResultWrite {
  compare: Compare[];
  put: TxnOp & { type: "put" };
  /** Writes that land with it, first (the rest of its attempt's log). */
  before?: TxnOp[];
}

/**
 * Results per transaction: two compares each (and at most two puts: the
 * result, and the rest of its log), under etcd's default `--max-txn-ops` of 128.
 */
const RESULTS_PER_TXN = 50;

/** Bytes of results per transaction, well under etcd's 1.5 MiB request limit. */
const RESULT_TXN_BYTES = 512 * 1024;

/**
 * The results of every agent of a server, recorded in group commits: those
 * that arrive while a transaction is in flight go out together in the next
 * (as the scheduler applies them), so a thousand agents reporting at once
 * cost etcd tens of transactions, not a thousand. A batch is all or
 * nothing in etcd: when one of its results fails its compares (a stale or
 * repeated report), each of that batch is written again alone, to learn
 * which.
 */
class ResultWriter {
  readonly #store: Store;
  readonly #queue: Array<
    { write: ResultWrite; done: (ok: boolean) => void; fail: (error: unknown) => void }
  > = [];
  #writing = false;

  constructor(store: Store) {
    this.#store = store;
  }

  /** Whether the result was recorded (false: one of its compares failed). */
  write(write: ResultWrite): Promise<boolean> {
    return new Promise((done, fail) => {
      this.#queue.push({ write, done, fail });
      if (!this.#writing) this.#drain();
    });
  }

  async #drain(): Promise<void> {
    this.#writing = true;
    try {
      while (this.#queue.length > 0) {
        let bytes = 0;
        let count = 0;
        // A key twice in one txn is refused by etcd: a repeat waits for the next batch.
        const keys = new Set<string>();
        for (; count < this.#queue.length && count < RESULTS_PER_TXN; count++) {
          const { put, before = [] } = this.#queue[count].write;
          if (keys.has(put.key)) break;
          const size = before.reduce((sum, op) =>
            sum + (op.type === "put" ? op.value.length : 0), 0) +
            put.value.length;
          if (count > 0 && bytes + size > RESULT_TXN_BYTES) break;
          keys.add(put.key);
          bytes += size;
        }
        const batch = this.#queue.splice(0, count);
        try {
          const together = await this.#store.txn({
            compare: batch.flatMap((entry) => entry.write.compare),
            success: batch.flatMap((entry) => writesOf(entry.write)),
          });
          if (together.succeeded || batch.length === 1) {
            for (const entry of batch) entry.done(together.succeeded);
            continue;
          }
          for (const entry of batch) {
            const alone = await this.#store.txn({
              compare: entry.write.compare,
              success: writesOf(entry.write),
            });
            entry.done(alone.succeeded);
          }
        } catch (error) {
          for (const entry of batch) entry.fail(error);
        }
      }
    } finally {
      this.#writing = false;
    }
  }
}

/** The ops of a result's write: what goes before it, then its put. */
function writesOf(write: ResultWrite): TxnOp[] {
  return write.before?.length ? [...write.before, write.put] : [write.put];
}

/**
 * Whether the agent's result of an attempt that is no longer assigned was
 * recorded before (its ack was lost with a connection): still waiting in
 * `/results/`, or already applied to the step (a result the scheduling
 * server committed directly never has a `/results/` key).
 */
async function alreadyRecorded(
  store: Store,
  resultKey: string,
  attemptId: string,
  agentId: string,
): Promise<boolean> {
  const recorded = await store.get(resultKey);
  if (recorded) return (JSON.parse(recorded.value) as ResultRecord).agentId === agentId;
  const [runId, stepId] = splitAttemptId(attemptId);
  const step = await store.get(clusterKeys.step(runId, stepId));
  if (!step) return false;
  const attempt = (JSON.parse(step.value) as StepState).attempts?.find((a) =>
    a.attemptId === attemptId
  );
  const result = attempt?.result;
  // An attempt given up as lost (its worker went offline) was not recorded from the agent.
  return attempt?.worker === agentId && result !== undefined && !(!result.ok && result.lost);
}

/** Pushes the agent its assignments (existing ones, then new ones). */
async function pushAssignments(
  store: Store,
  agentId: string,
  stream: AgentConnection,
  running: Set<string>,
  pendingResults: Set<string>,
  own: OwnAssignments,
  secretsOf: (record: AssignmentRecord) => Record<string, string>,
  signal: AbortSignal,
  bundleStorage: BundleStorage | undefined,
): Promise<void> {
  const prefix = clusterKeys.assignmentPrefix(agentId);
  const listed = await store.list(prefix);
  const wanted = new Set<string>();
  // Bundles this stream has carried: each goes once per stream.
  const bundles = new Set<string>();
  const send = async (record: AssignmentRecord) => {
    own.add(record);
    wanted.add(record.attemptId);
    if (pendingResults.has(record.attemptId)) return;
    // One the agent runs already is sent again (it ignores the repeat): if
    // it restarted, its secret values were in memory only.
    const again = running.has(record.attemptId);
    running.add(record.attemptId);
    const spec: AssignmentSpec = {
      runId: record.runId,
      stepId: record.stepId,
      attemptId: record.attemptId,
      attempt: record.attempt,
      config: record.spec.config,
      baseDir: record.spec.baseDir,
      env: record.spec.env,
      outputs: record.spec.outputs,
      matrix: record.spec.matrix,
      timeoutMs: record.spec.timeoutMs,
      resources: record.spec.resources,
      inputs: record.inputs,
      ...(record.spec.bundleDigest ? { bundleDigest: record.spec.bundleDigest } : {}),
      ...(record.spec.keepPartial ? { keepPartial: true } : {}),
      secrets: record.secrets ?? {},
    };
    let bundleJson = "";
    const digest = record.spec.bundleDigest;
    if (digest && !again && !bundles.has(digest)) {
      const bundle = await getBundle(store, digest, bundleStorage);
      if (bundle) {
        bundleJson = JSON.stringify(bundle);
        bundles.add(digest);
      }
    }
    await stream.send({
      assign: {
        attemptId: record.attemptId,
        specJson: JSON.stringify(spec),
        backend: record.backend,
        bundleJson,
        secrets: secretsOf(record),
        traceparent: record.traceparent ?? "",
      },
    });
  };
  for (const kv of listed.items) own.add(JSON.parse(kv.value) as AssignmentRecord);
  own.listed();
  for (const kv of listed.items) await send(JSON.parse(kv.value) as AssignmentRecord);
  // Attempts the agent still runs that the scheduler gave up on: stop them.
  for (const attemptId of running) {
    if (!wanted.has(attemptId) && !pendingResults.has(attemptId)) {
      await stream.send({
        cancel: { attemptId, reason: "the scheduler no longer wants this attempt" },
      });
    }
  }
  for await (const event of store.watch(prefix, { fromRevision: listed.revision + 1, signal })) {
    if (event.type === "put") await send(JSON.parse(event.value!) as AssignmentRecord);
    else {
      const attemptId = decodeURIComponent(event.key.slice(prefix.length));
      running.delete(attemptId);
      own.delete(attemptId);
    }
  }
}

/**
 * The values of an assignment's secrets that this server resolves: those
 * named in its store and not declared by the agent itself (whose own value
 * wins). One it cannot read is left out and logged (never its value): the
 * agent then fails the attempt, naming the secret.
 */
function secretValues(
  record: AssignmentRecord,
  agentSecrets: Set<string>,
  secrets: SecretStore | undefined,
  log: (fields: Record<string, unknown>) => void,
): Record<string, string> {
  const values: Record<string, string> = {};
  for (const [env, ref] of Object.entries(record.secrets ?? {})) {
    const name = ref.secret;
    if (name === undefined || agentSecrets.has(name) || !secrets?.has(name)) continue;
    try {
      values[env] = secrets.read(name);
    } catch (error) {
      log({
        level: "error",
        msg: "secret not readable",
        secret: name,
        attemptId: record.attemptId,
        error: (error as Error).message,
      });
    }
  }
  return values;
}

/** Pushes the agent the stops the scheduler writes for it. */
async function pushStops(
  store: Store,
  agentId: string,
  stream: AgentConnection,
  signal: AbortSignal,
): Promise<void> {
  const prefix = clusterKeys.stopPrefix(agentId);
  const listed = await store.list(prefix);
  const cancel = (key: string, value: string) => {
    const { reason } = JSON.parse(value) as { reason: string };
    return stream.send({
      cancel: { attemptId: decodeURIComponent(key.slice(prefix.length)), reason },
    });
  };
  for (const kv of listed.items) await cancel(kv.key, kv.value);
  for await (const event of store.watch(prefix, { fromRevision: listed.revision + 1, signal })) {
    if (event.type === "put") await cancel(event.key, event.value!);
  }
}

/** Log text per attempt, written to the store in batches. */
class LogBuffer {
  readonly #buffers = new Map<string, string>();
  /** Characters added and not yet written (buffered or in a flush). */
  #pending = 0;
  #roomWaiters: (() => void)[] = [];
  /** Per attempt of this stream: characters stored, and those past the cap not stored. */
  readonly #kept = new Map<string, { stored: number; dropped: number }>();
  readonly #store: Store;
  readonly #log: (fields: Record<string, unknown>) => void;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #flushing: Promise<void> = Promise.resolve();
  #counter = 0;

  readonly #lease: LogLease;

  constructor(
    store: Store,
    log: (fields: Record<string, unknown>) => void,
    lease: LogLease,
  ) {
    this.#store = store;
    this.#log = log;
    this.#lease = lease;
  }

  add(attemptId: string, text: string): void {
    const kept = this.#kept.get(attemptId) ?? { stored: 0, dropped: 0 };
    this.#kept.set(attemptId, kept);
    const room = Math.max(0, MAX_STORED_LOG_CHARS - kept.stored);
    if (text.length > room) {
      const first = kept.dropped === 0;
      kept.dropped += text.length - room;
      text = text.slice(0, room);
      if (first) {
        text += `\n[runnel: this attempt's log passed the ${MAX_STORED_LOG_CHARS} characters ` +
          "the cluster stores per attempt; the rest is counted, not stored]\n";
      }
    }
    kept.stored += text.length;
    if (text.length === 0) return;
    this.#pending += text.length;
    this.#buffers.set(attemptId, (this.#buffers.get(attemptId) ?? "") + text);
    if ((this.#buffers.get(attemptId)?.length ?? 0) >= LOG_BATCH_CHARS) {
      this.flush();
      return;
    }
    this.#timer ??= setTimeout(() => {
      this.#timer = undefined;
      this.flush();
    }, LOG_FLUSH_MS);
  }

  /** Resolves once less than {@link LOG_HIGH_WATER_CHARS} wait to be written. */
  room(): Promise<void> {
    if (this.#pending < LOG_HIGH_WATER_CHARS) return Promise.resolve();
    return new Promise((resolve) => this.#roomWaiters.push(resolve));
  }

  /** An attempt's log is complete (its result came): says how much was not stored, if any. */
  end(attemptId: string): void {
    const kept = this.#kept.get(attemptId);
    this.#kept.delete(attemptId);
    if (!kept?.dropped) return;
    const notice = `[runnel: ${kept.dropped} characters of this attempt's log were not stored ` +
      `(the cluster keeps ${MAX_STORED_LOG_CHARS} per attempt)]\n`;
    this.#pending += notice.length;
    this.#buffers.set(attemptId, (this.#buffers.get(attemptId) ?? "") + notice);
  }

  /** Writes what is buffered; resolves once it is in the store. */
  flush(): Promise<void> {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    const batches = [...this.#buffers];
    this.#buffers.clear();
    if (batches.length === 0) return this.#flushing;
    const chars = batches.reduce((sum, [, text]) => sum + text.length, 0);
    this.#flushing = this.#flushing.then(async () => {
      const lease = await this.#lease.id().catch(() => undefined);
      try {
        await this.write(this.#opsOf(batches, lease));
      } finally {
        this.#written(chars);
      }
    });
    return this.#flushing;
  }

  /**
   * The writes of the rest of an attempt's log, taken out of the buffer to
   * go in its result's commit (a result never lands before its log: the
   * batches of earlier flushes land first). A long rest is flushed on its
   * own as before, and so is one whose lease might end before the commit.
   */
  async takeRest(attemptId: string): Promise<TxnOp[]> {
    const text = this.#buffers.get(attemptId);
    if (text === undefined) {
      await this.#flushing;
      return [];
    }
    const lease = text.length <= MERGED_LOG_CHARS
      ? await this.#lease.freshFor(MERGED_LEASE_MARGIN_MS)
      : undefined;
    // Taken after the wait: log messages meanwhile are in the text now.
    const rest = this.#buffers.get(attemptId);
    if (lease === undefined || rest === undefined || rest.length > MERGED_LOG_CHARS) {
      await this.flush();
      return [];
    }
    this.#buffers.delete(attemptId);
    await this.#flushing;
    this.#written(rest.length);
    return this.#opsOf([[attemptId, rest]], lease);
  }

  /** Writes log batches in a commit of their own. */
  async write(ops: TxnOp[]): Promise<void> {
    try {
      await this.#store.txn({ compare: [], success: ops });
    } catch (error) {
      this.#log({ level: "warn", msg: "log batch lost", error: String(error) });
    }
  }

  #opsOf(batches: [string, string][], lease: string | undefined): TxnOp[] {
    const ops: TxnOp[] = [];
    for (const [attemptId, text] of batches) {
      const [runId, stepId, attempt] = splitAttemptId(attemptId);
      // Time-ordered and unique across reconnects and servers.
      const seq = Date.now() * 1000 + (this.#counter++ % 1000);
      for (let at = 0; at < text.length; at += LOG_BATCH_CHARS) {
        ops.push({
          type: "put",
          key: clusterKeys.logBatch(runId, stepId, attempt, seq + at / LOG_BATCH_CHARS),
          value: text.slice(at, at + LOG_BATCH_CHARS),
          ...(lease ? { lease } : {}),
        });
      }
    }
    return ops;
  }

  /** `chars` of log are written (or taken to be): writers held back may go on. */
  #written(chars: number): void {
    this.#pending -= chars;
    if (this.#pending < LOG_HIGH_WATER_CHARS) {
      const waiters = this.#roomWaiters;
      this.#roomWaiters = [];
      for (const wake of waiters) wake();
    }
  }

  async close(): Promise<void> {
    await this.flush();
  }
}

/**
 * The lease log batches are written under: one a day, each living the
 * retention period, so a log stays between retention − 1 day and
 * retention, and etcd deletes a day's logs at once when its lease ends.
 */
function rollingLease(store: Store, retentionMs: number): LogLease {
  const rollMs = Math.min(LEASE_ROLL_MS, retentionMs);
  let current: { id: Promise<string>; until: number; ends: number } | undefined;
  const id = () => {
    const now = Date.now();
    if (!current || now >= current.until) {
      const id = store.grantLease(retentionMs).then((lease) => lease.id);
      current = { id, until: now + rollMs, ends: now + retentionMs };
      id.catch(() => {
        current = undefined;
      });
    }
    return current.id;
  };
  return {
    id,
    async freshFor(ms) {
      const lease = await id().catch(() => undefined);
      return lease !== undefined && current && current.ends - Date.now() >= ms ? lease : undefined;
    },
  };
}

/** The lease log batches are written under (see {@link rollingLease}). */
interface LogLease {
  id(): Promise<string>;
  /** The lease, if it lives at least `ms` more (else undefined). */
  freshFor(ms: number): Promise<string | undefined>;
}

/** `run/step/3` → `[run, step, 3]` (run ids never hold `/`; the step is the middle). */
export function splitAttemptId(attemptId: string): [string, string, number] {
  const first = attemptId.indexOf("/");
  const last = attemptId.lastIndexOf("/");
  return [
    attemptId.slice(0, first),
    attemptId.slice(first + 1, last),
    Number(attemptId.slice(last + 1)),
  ];
}

function tokenMatches(given: string, expected: string): boolean {
  const a = new TextEncoder().encode(given);
  const b = new TextEncoder().encode(expected);
  return a.length === b.length && a.length > 0 && timingSafeEqual(a, b);
}

async function nextWithin<T>(iterator: AsyncIterator<T>, ms: number): Promise<T | undefined> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    const result = await Promise.race([
      iterator.next(),
      new Promise<undefined>((resolve) => timer = setTimeout(() => resolve(undefined), ms)),
    ]);
    return result && !result.done ? result.value : undefined;
  } finally {
    clearTimeout(timer);
  }
}

export type { Hello };
