/**
 * The etcd store engine: the {@link Store} interface over an etcd v3 cluster
 * (`npm:etcd3`'s generated gRPC clients; its high-level watch, lease and election
 * helpers are not used, see below).
 *
 * - Keys live under a namespace prefix, so several stores (tests, clusters of
 *   runnel servers) can share one etcd. Revisions are etcd's own.
 * - Each call goes to one member (the first endpoint that answers) and moves
 *   to the next on a connection error. A read is retried until the request
 *   timeout; a write is retried only when etcd cannot have applied it (the
 *   connection was refused, there was no leader). Otherwise the write fails
 *   with {@link StoreUnavailableError}, `maybeApplied: true`: the caller reads
 *   back, or retries a txn that compares a mod revision (if the first attempt
 *   was applied, the retry fails its compare instead of applying twice).
 * - A watch is one etcd watch stream that reconnects, to the next member,
 *   from the revision after the last one it delivered; if etcd has compacted
 *   that revision away it fails with {@link CompactedError} so the caller
 *   relists (the Kubernetes pattern). The stream does not ask etcd to require
 *   a leader (etcd3 offers no call metadata), so a member cut off from the
 *   quorum but alive keeps it open and silent; reads and writes through it
 *   fail, and so do the keep-alives of an election there.
 * - Leases are etcd leases with TTLs in whole seconds. A lease this store
 *   keeps alive ends, for this store, exactly `ttlMs` after the last keep-alive
 *   it sent: the store revokes it itself before its next call. etcd alone would
 *   end it up to one expiry sweep (500 ms) and a raft round later, and the
 *   store contract (and the embedded engine) say "ends `ttlMs` after its last
 *   keep-alive". Keep a lease alive through the store that granted it.
 *
 * etcd3's own `Election` had multi-leader bugs (microsoft/etcd3 #158, #176)
 * and hides the campaign key's revision (#199): the election lives in
 * `election.ts`, over the {@link Store} interface, fenced by that revision.
 *
 * @module
 */

import { Buffer } from "node:buffer";
import {
  Etcd3,
  GRPCDeadlineExceededError,
  GRPCUnavailableError,
  type ICompare,
  type IDuplexStream,
  type IKeyValue,
  type ILeaseKeepAliveRequest,
  type ILeaseKeepAliveResponse,
  type IOptions,
  type IRequestOp,
  type IResponseHeader,
  type IWatchRequest,
  type IWatchResponse,
} from "npm:etcd3@1.1.2";
import {
  CompactedError,
  type Compare,
  FutureRevisionError,
  InvalidStoreArgumentError,
  type KeyValue,
  type Lease,
  LeaseNotFoundError,
  type ListOptions,
  type ListResult,
  type PutOptions,
  type Store,
  StoreClosedError,
  StoreError,
  type TxnOp,
  type TxnRequest,
  type TxnResult,
  type WatchEvent,
  type WatchOptions,
} from "./store.ts";
import { abortableDelay } from "../core/_async.ts";
import { toHex } from "../core/_bytes.ts";

/** Client certificates for an etcd cluster served over TLS. */
export interface EtcdTlsOptions {
  /** PEM file of the CA that signed the members' certificates. */
  caFile: string;
  /** PEM file of this client's certificate (for `--client-cert-auth`). */
  certFile?: string;
  /** PEM file of this client's private key. */
  keyFile?: string;
  /**
   * The name to verify the members' certificates against, instead of the
   * endpoint's host. Needed when endpoints are IP addresses: Deno's TLS does
   * not send an IP as server name, so the certificates must carry a DNS name.
   */
  serverName?: string;
}

/** Options of {@link openEtcdStore}. */
export interface EtcdStoreOptions {
  /** Client URLs of the members, e.g. `http://10.10.0.2:2379`. */
  endpoints: string[];
  /** Prefix of every key of this store in etcd (default none): isolates stores sharing a cluster. */
  namespace?: string;
  /** TLS for the client connections; endpoints then use `https://`. */
  tls?: EtcdTlsOptions;
  /** How long opening waits for a member to answer. Default 5 s. */
  dialTimeoutMs?: number;
  /** How long one call may take, retries included. Default 5 s. */
  requestTimeoutMs?: number;
}

/**
 * The raft state of the member a store talks to, as the server's
 * `/raft-state` returns it. Member ids are etcd's, in hex as `etcdctl` prints them.
 */
export interface RaftState {
  /** The member answering. */
  node_id: string;
  /** Whether that member is the raft leader. */
  state: "leader" | "follower";
  /** The member it believes leads ("0" when there is none). */
  leader: string;
  /** Its raft term. */
  term: number;
  /** Its raft commit index. */
  commit_index: number;
  /** The client URL it was reached at. */
  endpoint: string;
}

/** A {@link Store} on etcd, with what the server needs beyond the interface. */
export interface EtcdStore extends Store {
  /** The key prefix of this store. */
  readonly namespace: string;
  /** The member client URLs, in the order they were given. */
  readonly endpoints: readonly string[];
  /** The client URL calls currently go to. */
  readonly endpoint: string;
  /** The etcd3 client of the current member: for benchmarks and diagnostics. */
  readonly client: Etcd3;
  /** Raft state of the current member (etcd's maintenance `Status`). */
  raftState(): Promise<RaftState>;
  /**
   * The database size of every member (etcd's maintenance `Status` of
   * each); a member that does not answer has `error` instead.
   */
  memberStatus(): Promise<EtcdMemberStatus[]>;
  /**
   * Defragments one member's database (etcd's maintenance `Defragment`):
   * it gives back the space compaction freed. The member answers nothing
   * else while it runs, so defragment one member at a time.
   */
  defragment(endpoint: string, options?: { timeoutMs?: number }): Promise<void>;
}

/** One member's database as {@link EtcdStore.memberStatus} reports it. */
export interface EtcdMemberStatus {
  endpoint: string;
  /** Bytes of the database file (what `--quota-backend-bytes` limits). */
  dbSize: number;
  /** Bytes of it in use; the rest is free pages a defragmentation gives back. */
  dbSizeInUse: number;
  /** Whether this member leads the Raft group. */
  leader: boolean;
  /** Why it did not answer. */
  error?: string;
}

/** How long a defragmentation may take by default (it copies the whole database). */
const DEFAULT_DEFRAGMENT_TIMEOUT_MS = 120_000;

/** etcd could not be reached, or did not answer in time. */
export class StoreUnavailableError extends StoreError {
  /** Whether a write may have been applied despite the error (read it back). */
  readonly maybeApplied: boolean;

  /** Builds the error for an operation and the last error seen. */
  constructor(operation: string, maybeApplied: boolean, cause?: unknown) {
    const reason = cause instanceof Error ? cause.message : String(cause ?? "no member answered");
    super(
      "unavailable",
      `Expected etcd to answer ${operation}, got: ${reason}` +
        (maybeApplied ? "; the write may have been applied, read it back before retrying" : ""),
      { cause },
    );
    this.name = "StoreUnavailableError";
    this.maybeApplied = maybeApplied;
  }
}

/** Heartbeat and election timeout for etcd members, in milliseconds. */
export interface EtcdTiming {
  heartbeatMs: number;
  electionMs: number;
}

/** Below this, etcd's heartbeat costs CPU for no faster failure detection. */
const MIN_HEARTBEAT_MS = 10;

/**
 * etcd's `--heartbeat-interval` and `--election-timeout` for a round trip
 * between members, after etcd's tuning guide: a heartbeat of about one RTT
 * (0.5–1.5×), an election timeout of ten heartbeats (≥ 10× RTT, and etcd
 * requires ≥ 5× the heartbeat).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { etcdTimingForRtt } from "./etcd.ts";
 *
 * assert.deepEqual(etcdTimingForRtt(125), { heartbeatMs: 125, electionMs: 1250 });
 * ```
 */
export function etcdTimingForRtt(rttMs: number): EtcdTiming {
  const heartbeatMs = Math.max(MIN_HEARTBEAT_MS, Math.ceil(rttMs));
  return { heartbeatMs, electionMs: 10 * heartbeatMs };
}

const DEFAULT_DIAL_TIMEOUT_MS = 5_000;
/** Shortest try of one member while dialing: a TCP and TLS handshake, with room to spare. */
const DIAL_ATTEMPT_MIN_MS = 250;
/** Shortest try of one member for a call that may be repeated (a loaded member answers in far less). */
const IDEMPOTENT_ATTEMPT_MIN_MS = 1_000;
/** How long to wait for etcd to cancel a watch below its compaction (it checks every 100 ms). */
const COMPACT_PROBE_MS = 500;
const DEFAULT_REQUEST_TIMEOUT_MS = 5_000;
/** First and longest pause between retries on a failing cluster. */
const RETRY_FIRST_DELAY_MS = 20;
const RETRY_MAX_DELAY_MS = 500;
/**
 * gRPC channel options. A private subchannel pool lets a reset client dial at
 * once instead of inheriting the shared pool's reconnect backoff (up to 120 s
 * by default, far longer than a restarted member takes); keepalive pings find
 * a dead peer on an idle watch (etcd allows one every 5 s).
 */
const GRPC_OPTIONS = {
  "grpc.use_local_subchannel_pool": 1,
  "grpc.initial_reconnect_backoff_ms": 100,
  "grpc.max_reconnect_backoff_ms": 1_000,
  "grpc.keepalive_time_ms": 10_000,
  "grpc.keepalive_timeout_ms": 5_000,
};

/** Errors after which etcd has certainly not applied the request. */
const NOT_APPLIED =
  /ECONNREFUSED|No connection established|Failed to connect|connection refused|etcdserver: no leader|etcdserver: not capable|etcdserver: too many requests|raft proposal dropped/i;
/** Errors of a member or the cluster being (briefly) unable to serve. */
const TRANSIENT =
  /UNAVAILABLE|DEADLINE_EXCEEDED|RST_STREAM|Connection dropped|etcdserver: leader changed|etcdserver: request timed out|etcdserver: server stopped|etcdserver: unhealthy cluster|stream was unexpectedly ended/;

/**
 * Opens a store on an etcd cluster, once a member answers.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { openEtcdStore } from "./etcd.ts";
 *
 * // The cluster etcdctl would talk to; without one the example is only type-checked.
 * const endpoints = Deno.env.get("ETCDCTL_ENDPOINTS")?.split(",");
 * if (endpoints) {
 *   const store = await openEtcdStore({ endpoints, namespace: "runnel-example/" });
 *   try {
 *     await store.put("runs/1", "{}");
 *     assert.equal((await store.get("runs/1"))?.value, "{}");
 *   } finally {
 *     await store.close();
 *   }
 * }
 * ```
 */
export async function openEtcdStore(options: EtcdStoreOptions): Promise<EtcdStore> {
  if (options.endpoints.length === 0) {
    throw new InvalidStoreArgumentError("Expected at least one etcd endpoint, got none");
  }
  const credentials = options.tls === undefined ? undefined : {
    rootCertificate: Buffer.from(await Deno.readFile(options.tls.caFile)),
    certChain: options.tls.certFile === undefined
      ? undefined
      : Buffer.from(await Deno.readFile(options.tls.certFile)),
    privateKey: options.tls.keyFile === undefined
      ? undefined
      : Buffer.from(await Deno.readFile(options.tls.keyFile)),
  };
  const store = new EtcdEngine(options, credentials);
  try {
    await store.dial(options.dialTimeoutMs ?? DEFAULT_DIAL_TIMEOUT_MS);
  } catch (error) {
    await store.close();
    throw error;
  }
  return store;
}

/** etcd's "\0": as a key, the smallest one; as a range end, "no end". */
const NUL = Buffer.from([0]);

/** The etcd key range of every key starting with `prefix`, as clientv3's `WithPrefix`. */
function prefixRange(prefix: Buffer): { key: Buffer; range_end: Buffer } {
  // etcd refuses an empty key: the empty prefix is every key from "\0" on.
  if (prefix.length === 0) return { key: NUL, range_end: NUL };
  const end = Buffer.from(prefix);
  for (let i = end.length - 1; i >= 0; i--) {
    if (end[i] < 0xff) {
      end[i]++;
      return { key: prefix, range_end: end.subarray(0, i + 1) };
    }
  }
  // All 0xff: every key from `prefix` on.
  return { key: prefix, range_end: NUL };
}

/** A lease id of this store (16 hex digits, as etcdctl prints them) as etcd's int64. */
function leaseToEtcd(leaseId: string): string {
  if (!/^[0-9a-f]{1,16}$/.test(leaseId)) throw new LeaseNotFoundError(leaseId);
  return BigInt(`0x${leaseId}`).toString();
}

function leaseFromEtcd(id: string): string {
  return BigInt(id).toString(16).padStart(16, "0");
}

/** A fresh lease id: random, positive as an int64, never 0 (which asks etcd to choose). */
function newLeaseId(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  bytes[0] &= 0x7f;
  bytes[7] |= 0x01;
  return toHex(bytes);
}

function hexId(id: string): string {
  return BigInt(id).toString(16);
}

const COMPARE_TARGETS = {
  mod: "Mod",
  create: "Create",
  version: "Version",
  value: "Value",
} as const;
const COMPARE_RESULTS = { "==": "Equal", "!=": "NotEqual", "<": "Less", ">": "Greater" } as const;

function errorText(error: unknown): string {
  return error instanceof Error ? `${error.name} ${error.message}` : String(error);
}

function isTransient(error: unknown): boolean {
  if (error instanceof GRPCUnavailableError || error instanceof GRPCDeadlineExceededError) {
    return true;
  }
  const text = errorText(error);
  return NOT_APPLIED.test(text) || TRANSIENT.test(text);
}

/**
 * Ends a stream of ours. Half-closing first matters: etcd3 resets every
 * client of a member when one of its streams errors while still writable,
 * and a cancel alone is such an error.
 */
function closeStream(stream: { end(): void; cancel(): void }): void {
  stream.end();
  stream.cancel();
}

/** How a call may be retried after a transient error. */
type RetryMode = "idempotent" | "write";

/** A single-consumer queue of a watch stream's responses, ended by an error or a stop. */
class ResponseQueue {
  #items: IWatchResponse[] = [];
  #failure: { error: unknown } | undefined;
  #stopped = false;
  #wake: (() => void) | undefined;

  push(response: IWatchResponse): void {
    this.#items.push(response);
    this.#notify();
  }

  fail(error: unknown): void {
    this.#failure ??= { error };
    this.#notify();
  }

  stop(): void {
    this.#stopped = true;
    this.#notify();
  }

  /** The next response; `undefined` once stopped; throws the stream's error. */
  async next(): Promise<IWatchResponse | undefined> {
    for (;;) {
      if (this.#stopped) return undefined;
      const item = this.#items.shift();
      if (item !== undefined) return item;
      if (this.#failure !== undefined) throw this.#failure.error;
      await new Promise<void>((resolve) => (this.#wake = resolve));
    }
  }

  #notify(): void {
    this.#wake?.();
    this.#wake = undefined;
  }
}

/**
 * A member's keep-alive stream, shared by every lease a store keeps alive
 * there: etcd answers the requests of one stream in order, each naming its
 * lease. Opened at the first keep-alive, and again after it breaks (every
 * keep-alive waiting on it then fails, and the store's call moves on to the
 * next member); one that goes unanswered past its deadline breaks it too,
 * so a silent member does not hold later keep-alives. A stream per renewal
 * cost a stream's setup and teardown on both sides for every heartbeat.
 */
class KeepAliveStream {
  readonly #client: Etcd3;
  #stream: Promise<IDuplexStream<ILeaseKeepAliveRequest, ILeaseKeepAliveResponse>> | undefined;
  /** Lease id (etcd's decimal) → the keep-alives waiting for etcd's answer, in order. */
  readonly #waiting = new Map<string, KeepAliveWaiter[]>();
  #closed = false;

  constructor(client: Etcd3) {
    this.#client = client;
  }

  async keepAlive(etcdId: string, deadline: number): Promise<number> {
    if (this.#closed) throw new StoreClosedError();
    const opening = this.#open();
    const stream = await opening;
    if (this.#stream !== opening) throw new Error("UNAVAILABLE: the keep-alive stream ended");
    const key = BigInt(etcdId).toString();
    return await new Promise<number>((resolve, reject) => {
      const waiter: KeepAliveWaiter = {
        resolve: (ttl) => {
          clearTimeout(timer);
          resolve(ttl);
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      };
      const timer = setTimeout(() => {
        const error = new Error("DEADLINE_EXCEEDED: no keep-alive answer from etcd");
        this.#break(opening, error);
        // Still waiting (its stream was already replaced): it fails alone.
        const list = this.#waiting.get(key);
        const at = list?.indexOf(waiter) ?? -1;
        if (at >= 0) {
          list!.splice(at, 1);
          if (list!.length === 0) this.#waiting.delete(key);
          waiter.reject(error);
        }
      }, Math.max(0, deadline - Date.now()));
      const list = this.#waiting.get(key);
      if (list) list.push(waiter);
      else this.#waiting.set(key, [waiter]);
      stream.write({ ID: etcdId });
    });
  }

  close(): void {
    this.#closed = true;
    if (this.#stream) this.#break(this.#stream, new StoreClosedError());
  }

  #open(): Promise<IDuplexStream<ILeaseKeepAliveRequest, ILeaseKeepAliveResponse>> {
    if (this.#stream) return this.#stream;
    const opening = this.#client.leaseClient.leaseKeepAlive().then((stream) => {
      stream.on("data", (response: ILeaseKeepAliveResponse) => {
        const key = BigInt(response.ID).toString();
        const list = this.#waiting.get(key);
        const waiter = list?.shift();
        if (list?.length === 0) this.#waiting.delete(key);
        waiter?.resolve(Number(response.TTL));
      });
      stream.on("error", (error: unknown) => this.#break(opening, error));
      stream.on("end", () => {
        this.#break(opening, new Error("UNAVAILABLE: the keep-alive stream ended"));
      });
      if (this.#closed || this.#stream !== opening) closeStream(stream);
      return stream;
    });
    this.#stream = opening;
    // Opening failed: the keep-alive that asked fails with it, the next opens anew.
    opening.catch(() => {
      if (this.#stream === opening) this.#stream = undefined;
    });
    return opening;
  }

  /** The stream `which` is done: every keep-alive waiting on it fails with `error`. */
  #break(
    which: Promise<IDuplexStream<ILeaseKeepAliveRequest, ILeaseKeepAliveResponse>>,
    error: unknown,
  ): void {
    if (this.#stream !== which) return;
    this.#stream = undefined;
    which.then(closeStream, () => {});
    const waiters = [...this.#waiting.values()].flat();
    this.#waiting.clear();
    for (const waiter of waiters) waiter.reject(error);
  }
}

/** A keep-alive waiting for etcd's answer on a {@link KeepAliveStream}. */
interface KeepAliveWaiter {
  resolve(ttl: number): void;
  reject(error: unknown): void;
}

class EtcdEngine implements EtcdStore {
  readonly namespace: string;
  readonly endpoints: readonly string[];
  readonly #clients: Etcd3[];
  readonly #requestTimeoutMs: number;
  #current = 0;
  #closed = false;
  /** Highest revision seen in any response: where a watch without `fromRevision` starts. */
  #lastRevision = 0;
  /** Leases this store keeps alive → when each ends by the store's own count (`performance.now()`). */
  readonly #held = new Map<string, number>();
  #reapTimer: ReturnType<typeof setTimeout> | undefined;
  readonly #watchStops = new Set<() => void>();
  /** Each member's keep-alive stream, shared by every lease (opened at the first keep-alive). */
  readonly #keepAlives: (KeepAliveStream | undefined)[] = [];

  constructor(options: EtcdStoreOptions, credentials: IOptions["credentials"]) {
    this.namespace = options.namespace ?? "";
    this.endpoints = [...options.endpoints];
    this.#requestTimeoutMs = options.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
    // Retries and failover are this engine's (see the module doc): etcd3's
    // default policies retry writes blindly and open a 5 s circuit breaker.
    const passThrough = {
      execute: (fn: (context: { signal: AbortSignal }) => unknown) =>
        Promise.resolve().then(() => fn({ signal: new AbortController().signal })),
    } as unknown as NonNullable<IOptions["faultHandling"]>["global"];
    const grpcOptions = options.tls?.serverName === undefined
      ? GRPC_OPTIONS
      : { ...GRPC_OPTIONS, "grpc.ssl_target_name_override": options.tls.serverName };
    this.#clients = this.endpoints.map((endpoint) => {
      const host = options.tls && endpoint.startsWith("http://")
        ? `https://${endpoint.slice("http://".length)}`
        : endpoint;
      return new Etcd3({
        hosts: [host],
        credentials,
        grpcOptions,
        faultHandling: { global: passThrough, host: () => passThrough! },
      });
    });
  }

  get endpoint(): string {
    return this.endpoints[this.#current];
  }

  get client(): Etcd3 {
    return this.#clients[this.#current];
  }

  /** Waits until some member answers, then starts from its revision. */
  async dial(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    let delayMs = RETRY_FIRST_DELAY_MS;
    let lastError: unknown;
    while (Date.now() < deadline) {
      const index = this.#current;
      try {
        // Each member gets a share of the time, so one that never answers
        // (a blackholed address) does not use it all.
        const attemptDeadline = Math.min(
          deadline,
          Date.now() + Math.max(DIAL_ATTEMPT_MIN_MS, timeoutMs / this.#clients.length),
        );
        const response = await this.#clients[index].kv.range(
          { key: NUL, count_only: true },
          { deadline: attemptDeadline },
        );
        this.#observe(response.header);
        return;
      } catch (error) {
        lastError = error;
        this.#rotate(index);
        await abortableDelay(Math.min(delayMs, Math.max(0, deadline - Date.now())));
        delayMs = Math.min(delayMs * 2, RETRY_MAX_DELAY_MS);
      }
    }
    throw new StoreUnavailableError(
      `within ${timeoutMs} ms at ${this.endpoints.join(", ")}`,
      false,
      lastError,
    );
  }

  async get(key: string): Promise<KeyValue | undefined> {
    this.#checkKey(key);
    const response = await this.#call(
      "idempotent",
      "get",
      (client, callOptions) => client.kv.range({ key: this.#key(key) }, callOptions),
    );
    this.#observe(response.header);
    const kv = response.kvs[0];
    return kv === undefined ? undefined : this.#toKeyValue(kv);
  }

  async list(prefix: string, options: ListOptions = {}): Promise<ListResult> {
    const range = prefixRange(this.#key(prefix));
    let key = range.key;
    if (options.startAfter !== undefined) {
      // Strictly after: the key itself followed by the smallest byte.
      const after = Buffer.concat([this.#key(options.startAfter), NUL]);
      if (Buffer.compare(after, key) > 0) key = after;
    }
    const response = await this.#call(
      "idempotent",
      "list",
      (client, callOptions) =>
        client.kv.range({
          key,
          range_end: range.range_end,
          limit: options.limit && options.limit > 0 ? options.limit : 0,
        }, callOptions),
    );
    this.#observe(response.header);
    return {
      items: response.kvs.map((kv) => this.#toKeyValue(kv)),
      revision: Number(response.header.revision),
    };
  }

  async put(key: string, value: string, options: PutOptions = {}): Promise<number> {
    this.#checkKey(key);
    this.#checkValue(key, value);
    const lease = options.lease === undefined ? undefined : leaseToEtcd(options.lease);
    const response = await this.#call("write", "put", (client, callOptions) =>
      client.kv.put({
        key: this.#key(key),
        value: Buffer.from(value),
        lease,
      }, callOptions), options.lease);
    return this.#observe(response.header);
  }

  async delete(key: string): Promise<number> {
    this.#checkKey(key);
    const response = await this.#call(
      "write",
      "delete",
      (client, callOptions) => client.kv.deleteRange({ key: this.#key(key) }, callOptions),
    );
    return this.#observe(response.header);
  }

  async txn(request: TxnRequest): Promise<TxnResult> {
    const compare = request.compare.map((condition) => this.#toCompare(condition));
    const success = request.success.map((op) => this.#toRequestOp(op));
    const failure = (request.failure ?? []).map((op) => this.#toRequestOp(op));
    const readOnly = success.length === 0 && failure.length === 0;
    const leases = [...request.success, ...(request.failure ?? [])]
      .map((op) => (op.type === "put" ? op.lease : undefined))
      .find((lease) => lease !== undefined);
    const response = await this.#call(
      readOnly ? "idempotent" : "write",
      "txn",
      (client, callOptions) => client.kv.txn({ compare, success, failure }, callOptions),
      leases,
    );
    return { succeeded: response.succeeded, revision: this.#observe(response.header) };
  }

  watch(prefix: string, options: WatchOptions = {}): AsyncIterable<WatchEvent> {
    if (this.#closed) throw new StoreClosedError();
    // Fixed at call time so no write after the call is missed: every write
    // this store has seen acknowledged is at or below #lastRevision.
    const implicitStart = options.fromRevision === undefined;
    const fromRevision = options.fromRevision ?? this.#lastRevision + 1;
    return this.#watch(prefix, fromRevision, implicitStart, options.signal);
  }

  async grantLease(ttlMs: number): Promise<Lease> {
    if (!Number.isFinite(ttlMs) || ttlMs <= 0) {
      throw new InvalidStoreArgumentError(`Expected a positive lease TTL in ms, got ${ttlMs}`);
    }
    // etcd counts TTLs in whole seconds (and may raise a short one to its minimum).
    const ttlSeconds = Math.ceil(ttlMs / 1000);
    // The id is chosen here so a retried grant is recognised ("already exists").
    const id = newLeaseId();
    const sentAt = performance.now();
    let attempt = 0;
    const response = await this.#call("idempotent", "grantLease", async (client, callOptions) => {
      try {
        return await client.leaseClient.leaseGrant(
          { ID: leaseToEtcd(id), TTL: ttlSeconds },
          callOptions,
        );
      } catch (error) {
        if (attempt++ > 0 && /lease already exists/.test(errorText(error))) {
          return { header: undefined, ID: leaseToEtcd(id), TTL: String(ttlSeconds), error: "" };
        }
        throw error;
      }
    });
    if (response.header) this.#observe(response.header);
    const granted = Number(response.TTL) * 1000;
    this.#hold(id, granted, sentAt);
    return { id, ttlMs: granted };
  }

  async keepAlive(leaseId: string): Promise<void> {
    const etcdId = leaseToEtcd(leaseId);
    const sentAt = performance.now();
    const ttlSeconds = await this.#call(
      "idempotent",
      "keepAlive",
      (client, callOptions) => this.#keepAliveOnce(client, etcdId, callOptions.deadline),
      leaseId,
    );
    if (ttlSeconds <= 0) {
      this.#held.delete(leaseId);
      throw new LeaseNotFoundError(leaseId);
    }
    this.#hold(leaseId, ttlSeconds * 1000, sentAt);
  }

  async revokeLease(leaseId: string): Promise<void> {
    const etcdId = leaseToEtcd(leaseId);
    this.#held.delete(leaseId);
    let attempt = 0;
    await this.#call("idempotent", "revokeLease", async (client, callOptions) => {
      try {
        const response = await client.leaseClient.leaseRevoke({ ID: etcdId }, callOptions);
        this.#observe(response.header);
      } catch (error) {
        // A retry that finds the lease gone means the first attempt revoked it.
        if (
          attempt++ > 0 && /requested lease not found|Lease .* is expired/.test(errorText(error))
        ) {
          return;
        }
        throw error;
      }
    }, leaseId);
  }

  async compact(revision: number): Promise<void> {
    let attempt = 0;
    try {
      await this.#call("idempotent", "compact", async (client, callOptions) => {
        try {
          const response = await client.kv.compact({ revision, physical: true }, callOptions);
          this.#observe(response.header);
        } catch (error) {
          // A retry that finds the revision compacted means the first attempt did it.
          if (attempt++ > 0 && /required revision has been compacted/.test(errorText(error))) {
            return;
          }
          throw error;
        }
      });
    } catch (error) {
      if (error instanceof CompactedError) {
        throw new CompactedError(revision, await this.#compactRevision(revision));
      }
      if (error instanceof FutureRevisionError) {
        throw new FutureRevisionError(revision, await this.revision());
      }
      throw error;
    }
  }

  async revision(): Promise<number> {
    const response = await this.#call(
      "idempotent",
      "revision",
      (client, callOptions) =>
        client.kv.range({ key: this.#key("\0"), count_only: true }, callOptions),
    );
    return this.#observe(response.header);
  }

  async raftState(): Promise<RaftState> {
    let endpoint = this.endpoint;
    const status = await this.#call("idempotent", "status", (client, callOptions) => {
      endpoint = this.endpoints[this.#clients.indexOf(client)];
      return client.maintenance.status(callOptions);
    });
    const memberId = status.header.member_id;
    return {
      node_id: hexId(memberId),
      state: status.leader === memberId ? "leader" : "follower",
      leader: hexId(status.leader),
      term: Number(status.raftTerm),
      commit_index: Number(status.raftIndex),
      endpoint,
    };
  }

  async memberStatus(): Promise<EtcdMemberStatus[]> {
    if (this.#closed) throw new StoreClosedError();
    return await Promise.all(this.#clients.map(async (client, index) => {
      const endpoint = this.endpoints[index];
      try {
        const status = await client.maintenance.status({
          deadline: Date.now() + this.#requestTimeoutMs,
        });
        return {
          endpoint,
          dbSize: Number(status.dbSize),
          dbSizeInUse: Number(status.dbSizeInUse),
          leader: status.leader === status.header.member_id,
        };
      } catch (error) {
        return { endpoint, dbSize: 0, dbSizeInUse: 0, leader: false, error: errorText(error) };
      }
    }));
  }

  async defragment(endpoint: string, options: { timeoutMs?: number } = {}): Promise<void> {
    if (this.#closed) throw new StoreClosedError();
    const index = this.endpoints.indexOf(endpoint);
    if (index < 0) {
      throw new InvalidStoreArgumentError(
        `Expected one of the store's endpoints (${this.endpoints.join(", ")}), got "${endpoint}"`,
      );
    }
    try {
      await this.#clients[index].maintenance.defragment({
        deadline: Date.now() + (options.timeoutMs ?? DEFAULT_DEFRAGMENT_TIMEOUT_MS),
      });
    } catch (error) {
      throw new StoreError(
        "etcd",
        `Expected etcd member ${endpoint} to defragment, got: ${errorText(error)}`,
        { cause: error },
      );
    }
  }

  close(): Promise<void> {
    if (!this.#closed) {
      this.#closed = true;
      clearTimeout(this.#reapTimer);
      for (const stop of this.#watchStops) stop();
      this.#watchStops.clear();
      for (const stream of this.#keepAlives) stream?.close();
      for (const client of this.#clients) client.close();
    }
    return Promise.resolve();
  }

  // --- calls, retries, failover ---

  /**
   * Runs `body` against the current member, moving on to the next on a
   * transient error and retrying until the request timeout when `mode`
   * allows. Lapsed leases of this store are revoked first; a call about
   * one of them (`lease`) fails as etcd will answer once it has caught up.
   */
  async #call<T>(
    mode: RetryMode,
    operation: string,
    body: (client: Etcd3, callOptions: { deadline: number }) => Promise<T>,
    lease?: string,
  ): Promise<T> {
    if (this.#closed) throw new StoreClosedError();
    await this.#reapLapsedLeases();
    if (lease !== undefined && !this.#held.has(lease) && this.#lapsed.has(lease)) {
      // The store ended this lease itself; etcd may not have caught up yet.
      this.#lapsed.delete(lease);
      throw new LeaseNotFoundError(lease);
    }
    const deadline = Date.now() + this.#requestTimeoutMs;
    let delayMs = RETRY_FIRST_DELAY_MS;
    for (;;) {
      const index = this.#current;
      try {
        // A read may be sent again, so one member that does not answer (dead
        // without a reset: a blackholed address) gets only its share of the
        // time before the next is tried, as in dialling; a write keeps the
        // whole of it (once sent, it may have been applied).
        const attemptDeadline = mode === "idempotent"
          ? Math.min(
            deadline,
            Date.now() +
              Math.max(IDEMPOTENT_ATTEMPT_MIN_MS, this.#requestTimeoutMs / this.#clients.length),
          )
          : deadline;
        return await body(this.#clients[index], { deadline: attemptDeadline });
      } catch (error) {
        if (this.#closed) throw new StoreClosedError();
        if (error instanceof StoreError) throw error;
        const mapped = this.#mapError(error, lease);
        if (mapped !== undefined) throw mapped;
        if (!isTransient(error)) {
          const message = `Expected etcd to accept ${operation}, got: ${errorText(error)}`;
          throw new StoreError("etcd", message, { cause: error });
        }
        this.#rotate(index);
        const retriable = mode === "idempotent" || NOT_APPLIED.test(errorText(error));
        if (!retriable) throw new StoreUnavailableError(operation, true, error);
        if (Date.now() + delayMs >= deadline) {
          throw new StoreUnavailableError(
            `${operation} within ${this.#requestTimeoutMs} ms`,
            mode === "write",
            error,
          );
        }
        await abortableDelay(delayMs);
        delayMs = Math.min(delayMs * 2, RETRY_MAX_DELAY_MS);
        if (this.#closed) throw new StoreClosedError();
      }
    }
  }

  /** The store's error for an etcd error that means something to callers, if any. */
  #mapError(error: unknown, lease: string | undefined): StoreError | undefined {
    const text = errorText(error);
    if (/requested lease not found|Lease .* is expired/.test(text)) {
      return new LeaseNotFoundError(lease ?? "unknown");
    }
    if (/required revision has been compacted/.test(text)) {
      // The compaction revision is not in the message: -1 asks the caller to look it up.
      return new CompactedError(-1, -1);
    }
    if (/required revision is a future revision/.test(text)) {
      return new FutureRevisionError(-1, this.#lastRevision);
    }
    if (/duplicate key given in txn request/.test(text)) {
      return new InvalidStoreArgumentError(`Expected each key at most once in a txn, got: ${text}`);
    }
    if (/too many operations in txn request|request is too large|key is not provided/.test(text)) {
      return new InvalidStoreArgumentError(`Expected a request etcd accepts, got: ${text}`);
    }
    return undefined;
  }

  /** After a failure of member `index`, later calls go to the next one. */
  #rotate(index: number): void {
    if (this.#current === index) this.#current = (index + 1) % this.#clients.length;
  }

  #observe(header: IResponseHeader): number {
    const revision = Number(header.revision);
    if (revision > this.#lastRevision) this.#lastRevision = revision;
    return revision;
  }

  /**
   * etcd's compaction revision, known to be at or after `atLeast` (etcd does
   * not report it but to a watch that starts before it, which it cancels).
   */
  async #compactRevision(atLeast: number): Promise<number> {
    const controller = new AbortController();
    const iterator = this.#watch("", atLeast, false, controller.signal)[Symbol.asyncIterator]();
    // No cancellation soon (etcd syncs watches every 100 ms) means it is `atLeast` itself.
    const timer = setTimeout(() => controller.abort(), COMPACT_PROBE_MS);
    try {
      await iterator.next();
      return atLeast;
    } catch (error) {
      if (error instanceof CompactedError) return error.compactRevision;
      throw error;
    } finally {
      clearTimeout(timer);
      await iterator.return(undefined);
    }
  }

  /**
   * One keep-alive on the member's shared keep-alive stream; the TTL etcd
   * answers (≤ 0: no such lease).
   */
  #keepAliveOnce(client: Etcd3, etcdId: string, deadline: number): Promise<number> {
    const index = this.#clients.indexOf(client);
    let stream = this.#keepAlives[index];
    if (!stream) stream = this.#keepAlives[index] = new KeepAliveStream(client);
    return stream.keepAlive(etcdId, deadline);
  }

  // --- leases this store keeps alive ---

  /** Leases this store ended itself, remembered so a call on them reports it. */
  readonly #lapsed = new Set<string>();
  /** The earliest end of a held lease (`#armReaper` keeps it with `#held`). */
  #firstLapse = Infinity;

  #hold(leaseId: string, ttlMs: number, sentAt: number): void {
    // Counted from when the request left: etcd's own expiry is later still.
    this.#held.set(leaseId, sentAt + ttlMs);
    this.#lapsed.delete(leaseId);
    this.#armReaper();
  }

  #armReaper(): void {
    clearTimeout(this.#reapTimer);
    this.#reapTimer = undefined;
    let next = Infinity;
    for (const deadline of this.#held.values()) if (deadline < next) next = deadline;
    this.#firstLapse = next;
    if (this.#closed || this.#held.size === 0) return;
    this.#reapTimer = setTimeout(() => {
      this.#reapTimer = undefined;
      this.#reapLapsedLeases().catch(() => {
        // Retried before the next call; etcd's own expiry is the backstop.
      });
    }, Math.max(0, next - performance.now()));
    // An open store alone must not keep the process alive.
    Deno.unrefTimer(this.#reapTimer as unknown as number);
  }

  /** Revokes the leases of this store whose TTL has run out since their last keep-alive. */
  async #reapLapsedLeases(): Promise<void> {
    const now = performance.now();
    // Every call passes here: nothing to look for before the first deadline.
    if (now < this.#firstLapse) return;
    const lapsed = [...this.#held].filter(([, deadline]) => deadline <= now);
    if (lapsed.length === 0) return;
    for (const [id] of lapsed) {
      this.#held.delete(id);
      this.#lapsed.add(id);
    }
    this.#armReaper();
    await Promise.all(lapsed.map(async ([id]) => {
      try {
        await this.#call("idempotent", "revokeLease", async (client, callOptions) => {
          const response = await client.leaseClient.leaseRevoke(
            { ID: leaseToEtcd(id) },
            callOptions,
          );
          this.#observe(response.header);
        });
      } catch (error) {
        if (!(error instanceof LeaseNotFoundError)) throw error;
      }
      // etcd has it gone now and says so itself. Remembered on, every lease that ever
      // lapsed (one per agent connection a server held) stayed for the store's life.
      this.#lapsed.delete(id);
    }));
  }

  // --- conversions ---

  #key(key: string): Buffer {
    return Buffer.from(this.namespace + key);
  }

  #checkKey(key: string): void {
    if (typeof key !== "string" || key.length === 0) {
      throw new InvalidStoreArgumentError(
        `Expected a non-empty string key, got ${JSON.stringify(key)}`,
      );
    }
  }

  #checkValue(key: string, value: string): void {
    if (typeof value !== "string") {
      throw new InvalidStoreArgumentError(`Expected a string value for "${key}"`);
    }
  }

  #toKeyValue(kv: IKeyValue): KeyValue {
    const result: KeyValue = {
      key: kv.key.toString("utf8").slice(this.namespace.length),
      value: kv.value.toString("utf8"),
      createRevision: Number(kv.create_revision),
      modRevision: Number(kv.mod_revision),
      version: Number(kv.version),
    };
    if (kv.lease !== "0" && kv.lease !== undefined) result.lease = leaseFromEtcd(kv.lease);
    return result;
  }

  #toCompare(compare: Compare): ICompare {
    this.#checkKey(compare.key);
    const target = COMPARE_TARGETS[compare.target];
    const result = COMPARE_RESULTS[compare.op];
    if (target === undefined) {
      throw new InvalidStoreArgumentError(
        `Expected a compare target of mod, create, version or value, got "${compare.target}"`,
      );
    }
    if (result === undefined) {
      throw new InvalidStoreArgumentError(
        `Expected a compare op of ==, !=, < or >, got "${compare.op}"`,
      );
    }
    const expectString = compare.target === "value";
    if (expectString !== (typeof compare.value === "string")) {
      throw new InvalidStoreArgumentError(
        `Expected a ${expectString ? "string" : "number"} to compare "${compare.target}" of ` +
          `"${compare.key}" with, got ${JSON.stringify(compare.value)}`,
      );
    }
    const condition: ICompare = { key: this.#key(compare.key), target, result };
    switch (compare.target) {
      case "mod":
        condition.mod_revision = compare.value;
        break;
      case "create":
        condition.create_revision = compare.value;
        break;
      case "version":
        condition.version = compare.value;
        break;
      case "value":
        condition.value = Buffer.from(compare.value as string);
        break;
    }
    return condition;
  }

  #toRequestOp(op: TxnOp): IRequestOp {
    switch (op.type) {
      case "put":
        this.#checkKey(op.key);
        this.#checkValue(op.key, op.value);
        return {
          request_put: {
            key: this.#key(op.key),
            value: Buffer.from(op.value),
            lease: op.lease === undefined ? undefined : leaseToEtcd(op.lease),
          },
        };
      case "delete":
        this.#checkKey(op.key);
        return { request_delete_range: { key: this.#key(op.key) } };
      case "deletePrefix": {
        return { request_delete_range: prefixRange(this.#key(op.prefix)) };
      }
      default:
        throw new InvalidStoreArgumentError(
          `Expected a txn op of type put, delete or deletePrefix, got ${JSON.stringify(op)}`,
        );
    }
  }

  #toWatchEvent(event: IWatchResponse["events"][number]): WatchEvent {
    const key = event.kv.key.toString("utf8").slice(this.namespace.length);
    const revision = Number(event.kv.mod_revision);
    if (event.type === "Delete") return { type: "delete", key, revision };
    const kv = this.#toKeyValue(event.kv);
    return { type: "put", key, value: kv.value, revision, kv };
  }

  // --- watches ---

  async *#watch(
    prefix: string,
    startRevision: number,
    implicitStart: boolean,
    signal: AbortSignal | undefined,
  ): AsyncGenerator<WatchEvent> {
    /** The next revision to deliver; a reconnect asks etcd for it. */
    let next = startRevision;
    let delivered = false;
    let delayMs = RETRY_FIRST_DELAY_MS;
    const range = prefixRange(this.#key(prefix));
    while (!this.#closed && !signal?.aborted) {
      const index = this.#current;
      const queue = new ResponseQueue();
      const stop = () => queue.stop();
      this.#watchStops.add(stop);
      signal?.addEventListener("abort", stop);
      let stream: IDuplexStream<IWatchRequest, IWatchResponse> | undefined;
      try {
        stream = await this.#clients[index].watchClient.watch();
        stream.on("data", (response) => queue.push(response));
        stream.on("error", (error) => queue.fail(error));
        stream.on("end", () => queue.fail(new Error("UNAVAILABLE: the watch stream ended")));
        // Progress notifications move `next` on while the prefix is quiet, so a
        // reconnect after a compaction needs no relist when nothing was missed.
        stream.write({
          create_request: { ...range, start_revision: next, progress_notify: true },
        });
        for (;;) {
          const response = await queue.next();
          if (response === undefined) return;
          if (response.compact_revision !== "0" && response.compact_revision !== undefined) {
            const compactRevision = Number(response.compact_revision);
            if (implicitStart && !delivered) {
              // Nothing delivered yet, so starting at the compaction misses nothing the caller saw.
              next = compactRevision;
              break;
            }
            throw new CompactedError(next, compactRevision);
          }
          if (response.canceled) {
            throw new Error(`UNAVAILABLE: etcd cancelled the watch: ${response.cancel_reason}`);
          }
          if (response.created) {
            delayMs = RETRY_FIRST_DELAY_MS;
            continue;
          }
          this.#observe(response.header);
          if (response.events.length === 0) {
            // A progress notification: etcd sends it only to a watch that has
            // delivered everything up to the header's revision.
            next = Math.max(next, Number(response.header.revision) + 1);
            continue;
          }
          for (const event of response.events) {
            const watchEvent = this.#toWatchEvent(event);
            delivered = true;
            yield watchEvent;
            if (this.#closed || signal?.aborted) return;
          }
          // etcd sends a revision's events in one response: all of them are delivered.
          const last = response.events[response.events.length - 1];
          if (last !== undefined) next = Number(last.kv.mod_revision) + 1;
        }
      } catch (error) {
        if (this.#closed || signal?.aborted) return;
        if (error instanceof StoreError || !isTransient(error)) throw error;
        this.#rotate(index);
        await abortableDelay(delayMs);
        delayMs = Math.min(delayMs * 2, RETRY_MAX_DELAY_MS);
      } finally {
        this.#watchStops.delete(stop);
        signal?.removeEventListener("abort", stop);
        if (stream !== undefined) closeStream(stream);
      }
    }
  }
}
