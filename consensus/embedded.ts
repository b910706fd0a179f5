/**
 * The embedded store engine: etcd semantics on one `node:sqlite` file.
 *
 * Durability: WAL journal, and a write's promise resolves only once the WAL
 * has been fsynced after it, so a write that returned survives a SIGKILL or
 * power loss. The fsync is not SQLite's (`synchronous=FULL` would block the
 * event loop for each commit): commits go to the WAL unsynced, and the
 * WAL's `fdatasync` runs on Deno's blocking pool, one for every commit made
 * while the last one ran (group commit). Checkpoints, which copy the WAL
 * into the database before it is reused, run with `synchronous=FULL`, at
 * this store's choosing (SQLite's automatic ones are off) and when the last
 * connection closes, so the database file is synced before frames it needs
 * are overwritten. Inside this process a commit is visible to reads at
 * once; watches are woken once it is durable. Several
 * processes may open the same file: every write is a `BEGIN IMMEDIATE`
 * transaction (one writer at a time, others wait up to the busy timeout),
 * and the revision counter lives in the database, so revisions stay global
 * and monotonic. A watch reads the `history` table from its position; it is
 * woken at once by writes of its own process and, for writes of other
 * processes, by a poll of `PRAGMA data_version`.
 *
 * @module
 */

import { DatabaseSync, type StatementSync } from "node:sqlite";
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
  type OrderedTxn,
  prefixEnd,
  type PutOptions,
  type Store,
  StoreClosedError,
  type TxnOp,
  type TxnRequest,
  type TxnResult,
  type WatchEvent,
  type WatchOptions,
} from "./store.ts";
import { randomHex } from "../core/_bytes.ts";

/** Options of {@link openEmbeddedStore} and {@link openMemoryStore}. */
export interface EmbeddedStoreOptions {
  /** Milliseconds since the epoch; lease expiry is judged by it. Default `Date.now`. */
  clock?: () => number;
  /** How often to look for other processes' writes and expired leases. Default 50 ms. */
  pollIntervalMs?: number;
  /** How long a write waits for another process's transaction. Default 10 s. */
  busyTimeoutMs?: number;
  /**
   * Only look: the file must exist, nothing is created or written, leases
   * are not expired (a read does not delete their keys), and every write is
   * refused with a {@link ReadOnlyStoreError}. On a full disk, where the
   * WAL's shared-memory index cannot be made, the file is read under an
   * exclusive lock with the index in this process's memory.
   */
  readOnly?: boolean;
}

/** A write to a store opened with `readOnly`. */
export class ReadOnlyStoreError extends Error {
  /** Stable error code. */
  readonly code = "store_read_only";

  /** Builds the error naming the store's file. */
  constructor(path: string) {
    super(`Expected a store open for writing; ${path} was opened read-only`);
    this.name = "ReadOnlyStoreError";
  }
}

/** A {@link Store} backed by a SQLite file. */
export interface EmbeddedStore extends Store {
  /** The database path (":memory:" for a memory store). */
  readonly path: string;
}

/** Default period of the cross-process poll (the brief's 50 ms). */
const DEFAULT_POLL_INTERVAL_MS = 50;
/** Long enough to ride out another process's fsync-bound commits. */
const DEFAULT_BUSY_TIMEOUT_MS = 10_000;
/** Commits between two checkpoints of the WAL into the database file. */
const CHECKPOINT_EVERY_COMMITS = 1_000;
/** Events read from history per query, so a far-behind watch streams in pages. */
const WATCH_PAGE_SIZE = 512;

const SCHEMA = `
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) STRICT;
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0), ('compact_revision', 0);
CREATE TABLE IF NOT EXISTS kv (
  key TEXT PRIMARY KEY,
  value TEXT NOT NULL,
  create_revision INTEGER NOT NULL,
  mod_revision INTEGER NOT NULL,
  version INTEGER NOT NULL,
  lease TEXT
) STRICT;
CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease IS NOT NULL;
CREATE TABLE IF NOT EXISTS history (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  revision INTEGER NOT NULL,
  type TEXT NOT NULL,
  key TEXT NOT NULL,
  value TEXT,
  create_revision INTEGER,
  version INTEGER,
  lease TEXT
) STRICT;
CREATE INDEX IF NOT EXISTS history_revision ON history (revision);
CREATE TABLE IF NOT EXISTS leases (
  id TEXT PRIMARY KEY,
  ttl_ms INTEGER NOT NULL,
  expires_at INTEGER NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS leases_expiry ON leases (expires_at);
`;

interface KvRow {
  key: string;
  value: string;
  create_revision: number;
  mod_revision: number;
  version: number;
  lease: string | null;
}

interface HistoryRow {
  id: number;
  revision: number;
  type: string;
  key: string;
  value: string | null;
  create_revision: number | null;
  version: number | null;
  lease: string | null;
}

/** A registered watch, woken when there may be new history. */
interface Waker {
  /** The watched keys: from `prefix` up to `end` (to the last key when undefined). */
  prefix: string;
  end: string | undefined;
  wake(): void;
}

/**
 * Opens (creating if needed) a durable store in the SQLite file at `path`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { openEmbeddedStore } from "./embedded.ts";
 *
 * const dir = await Deno.makeTempDir();
 * const store = openEmbeddedStore(`${dir}/state.db`);
 * await store.put("runs/1", "{}");
 * await store.close();
 * // Durable: a store opened again on the file finds what was written.
 * const reopened = openEmbeddedStore(`${dir}/state.db`);
 * assert.equal((await reopened.get("runs/1"))?.value, "{}");
 * await reopened.close();
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export function openEmbeddedStore(path: string, options: EmbeddedStoreOptions = {}): EmbeddedStore {
  return new SqliteStore(path, options);
}

/**
 * Opens a store held in memory (one process, gone on close); for tests.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { openMemoryStore } from "./embedded.ts";
 *
 * const store = openMemoryStore();
 * await store.put("a", "1");
 * assert.equal((await store.get("a"))?.value, "1");
 * await store.close();
 * ```
 */
export function openMemoryStore(options: EmbeddedStoreOptions = {}): EmbeddedStore {
  return new SqliteStore(":memory:", options);
}

function toKeyValue(row: KvRow): KeyValue {
  const kv: KeyValue = {
    key: row.key,
    value: row.value,
    createRevision: row.create_revision,
    modRevision: row.mod_revision,
    version: row.version,
  };
  if (row.lease !== null) kv.lease = row.lease;
  return kv;
}

function toWatchEvent(row: HistoryRow): WatchEvent {
  if (row.type === "delete") return { type: "delete", key: row.key, revision: row.revision };
  const kv: KeyValue = {
    key: row.key,
    value: row.value ?? "",
    createRevision: row.create_revision ?? row.revision,
    modRevision: row.revision,
    version: row.version ?? 1,
  };
  if (row.lease !== null) kv.lease = row.lease;
  return { type: "put", key: row.key, value: kv.value, revision: row.revision, kv };
}

function compareHolds(compare: Compare, current: KvRow | undefined): boolean {
  let actual: number | string;
  switch (compare.target) {
    case "value":
      // etcd: a value comparison on an absent key is always false.
      if (current === undefined) return false;
      actual = current.value;
      break;
    case "mod":
      actual = current?.mod_revision ?? 0;
      break;
    case "create":
      actual = current?.create_revision ?? 0;
      break;
    case "version":
      actual = current?.version ?? 0;
      break;
    default:
      throw new InvalidStoreArgumentError(
        `Expected a compare target of mod, create, version or value, got "${compare.target}"`,
      );
  }
  const expected = compare.value;
  if (typeof actual !== typeof expected) {
    throw new InvalidStoreArgumentError(
      `Expected a ${typeof actual} to compare "${compare.target}" of "${compare.key}" with, ` +
        `got ${JSON.stringify(expected)}`,
    );
  }
  switch (compare.op) {
    case "==":
      return actual === expected;
    case "!=":
      return actual !== expected;
    case "<":
      return actual < expected;
    case ">":
      return actual > expected;
    default:
      throw new InvalidStoreArgumentError(
        `Expected a compare op of ==, !=, < or >, got "${compare.op}"`,
      );
  }
}

function checkKey(key: string): void {
  if (typeof key !== "string" || key.length === 0) {
    throw new InvalidStoreArgumentError(
      `Expected a non-empty string key, got ${JSON.stringify(key)}`,
    );
  }
}

function newLeaseId(): string {
  return randomHex(8);
}

/**
 * Opens an existing database for reading only (see
 * `EmbeddedStoreOptions.readOnly`). node:sqlite's own read-only mode cannot
 * open a WAL database whose shared-memory file it cannot create, so the
 * handle is a read-write one that SQLite itself keeps from writing
 * (`query_only`).
 */
function openForReading(path: string, busyTimeoutMs: number): DatabaseSync {
  // A missing file is an error, not a new database. (Not SQLite's `mode=rw`:
  // Deno's node:sqlite takes URI file names as paths when permissions are granular.)
  Deno.statSync(path);
  const open = (exclusive: boolean) => {
    const db = new DatabaseSync(path);
    try {
      db.exec(`PRAGMA busy_timeout = ${Math.trunc(busyTimeoutMs)}`);
      db.exec("PRAGMA query_only = 1");
      // Before the first read: the WAL index then lives in this process.
      if (exclusive) db.exec("PRAGMA locking_mode = EXCLUSIVE");
      db.prepare("SELECT value FROM meta WHERE name = 'revision'").get();
      return db;
    } catch (error) {
      db.close();
      throw error;
    }
  };
  try {
    return open(false);
  } catch (error) {
    // SQLITE_IOERR_SHMSIZE and friends: the shared-memory file cannot grow.
    if (!/disk I\/O error|database or disk is full/.test(String(error))) throw error;
    return open(true);
  }
}

class SqliteStore implements EmbeddedStore {
  readonly path: string;
  readonly #db: DatabaseSync;
  readonly #readOnly: boolean;
  readonly #clock: () => number;
  readonly #wakers = new Set<Waker>();
  /** Keys the write in progress changed (see `#write`). */
  #touched: string[] | undefined;
  readonly #timer: ReturnType<typeof setInterval>;
  #closed = false;
  #dataVersion = 0;
  readonly #sql: Record<string, StatementSync>;
  /** Commits are made durable by this store's own WAL fsync (a file, not read-only). */
  readonly #ownSync: boolean;
  /** Commits made, and how many of them are known durable. */
  #commits = 0;
  #synced = 0;
  #checkpointedAt = 0;
  /** Callers waiting for commits up to `upTo` to be durable. */
  #syncWaiters: Array<{ upTo: number; resolve: () => void; reject: (error: unknown) => void }> = [];
  #syncing: Promise<void> | undefined;
  #wal: Deno.FsFile | undefined;
  /** Set when a WAL fsync failed: nothing written since can be trusted durable. */
  #syncFailure: unknown;

  constructor(path: string, options: EmbeddedStoreOptions) {
    this.path = path;
    this.#clock = options.clock ?? Date.now;
    const busyTimeoutMs = options.busyTimeoutMs ?? DEFAULT_BUSY_TIMEOUT_MS;
    this.#readOnly = options.readOnly === true && path !== ":memory:";
    if (this.#readOnly) {
      this.#db = openForReading(path, busyTimeoutMs);
    } else {
      this.#db = new DatabaseSync(path);
      this.#db.exec(`PRAGMA busy_timeout = ${Math.trunc(busyTimeoutMs)}`);
      if (path !== ":memory:") {
        this.#db.exec("PRAGMA journal_mode = WAL");
        this.#db.exec("PRAGMA wal_autocheckpoint = 0");
      }
      // The schema is made as SQLite makes anything durable; every later
      // commit by this store's own fsync of the WAL (see the module doc).
      this.#db.exec("PRAGMA synchronous = FULL");
      this.#immediate(() => this.#db.exec(SCHEMA));
      if (path !== ":memory:") this.#db.exec("PRAGMA synchronous = OFF");
    }
    this.#ownSync = !this.#readOnly && path !== ":memory:";
    const prepare = (sql: string) => this.#db.prepare(sql);
    this.#sql = {
      revision: prepare("SELECT value FROM meta WHERE name = 'revision'"),
      compactRevision: prepare("SELECT value FROM meta WHERE name = 'compact_revision'"),
      setMeta: prepare("UPDATE meta SET value = ? WHERE name = ?"),
      get: prepare("SELECT * FROM kv WHERE key = ?"),
      upsert: prepare(
        `INSERT INTO kv (key, value, create_revision, mod_revision, version, lease)
         VALUES (?, ?, ?, ?, ?, ?)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value,
           mod_revision = excluded.mod_revision, version = excluded.version,
           lease = excluded.lease`,
      ),
      deleteKey: prepare("DELETE FROM kv WHERE key = ?"),
      keysInRange: prepare("SELECT key FROM kv WHERE key >= ? AND key < ? ORDER BY key"),
      keysFrom: prepare("SELECT key FROM kv WHERE key >= ? ORDER BY key"),
      keysOfLease: prepare("SELECT key FROM kv WHERE lease = ? ORDER BY key"),
      record: prepare(
        `INSERT INTO history (revision, type, key, value, create_revision, version, lease)
         VALUES (?, ?, ?, ?, ?, ?, ?)`,
      ),
      listRange: prepare(
        "SELECT * FROM kv WHERE key >= ? AND key < ? AND key > ? ORDER BY key LIMIT ?",
      ),
      listFrom: prepare("SELECT * FROM kv WHERE key >= ? AND key > ? ORDER BY key LIMIT ?"),
      historyRange: prepare(
        `SELECT * FROM history WHERE id > ? AND revision >= ? AND key >= ? AND key < ?
         ORDER BY id LIMIT ?`,
      ),
      historyFrom: prepare(
        `SELECT * FROM history WHERE id > ? AND revision >= ? AND key >= ? ORDER BY id LIMIT ?`,
      ),
      compactHistory: prepare("DELETE FROM history WHERE revision < ?"),
      insertLease: prepare("INSERT INTO leases (id, ttl_ms, expires_at) VALUES (?, ?, ?)"),
      getLease: prepare("SELECT * FROM leases WHERE id = ?"),
      renewLease: prepare("UPDATE leases SET expires_at = ? + ttl_ms WHERE id = ?"),
      deleteLease: prepare("DELETE FROM leases WHERE id = ?"),
      anyExpired: prepare("SELECT 1 AS found FROM leases WHERE expires_at <= ? LIMIT 1"),
      expired: prepare("SELECT id FROM leases WHERE expires_at <= ? ORDER BY id"),
      dataVersion: prepare("PRAGMA data_version"),
    };
    this.#dataVersion = this.#readDataVersion();
    const pollIntervalMs = options.pollIntervalMs ?? DEFAULT_POLL_INTERVAL_MS;
    this.#timer = setInterval(() => this.#tick(), pollIntervalMs);
    // Unref'd: an open store alone must not keep the process alive.
    this.#timer.unref();
  }

  get(key: string): Promise<KeyValue | undefined> {
    return this.#run(() => {
      this.#expireLeases();
      const row = this.#sql.get.get(key) as KvRow | undefined;
      return row === undefined ? undefined : toKeyValue(row);
    });
  }

  list(prefix: string, options: ListOptions = {}): Promise<ListResult> {
    return this.#run(() => {
      this.#expireLeases();
      const limit = options.limit && options.limit > 0 ? options.limit : -1;
      // "" sorts before every key, so it stands for "no startAfter".
      const startAfter = options.startAfter ?? "";
      const end = prefixEnd(prefix);
      return this.#read(() => {
        const rows = (end === undefined
          ? this.#sql.listFrom.all(prefix, startAfter, limit)
          : this.#sql.listRange.all(prefix, end, startAfter, limit)) as unknown as KvRow[];
        return { items: rows.map(toKeyValue), revision: this.#currentRevision() };
      });
    });
  }

  put(key: string, value: string, options: PutOptions = {}): Promise<number> {
    return this.#run(() => {
      checkKey(key);
      this.#expireLeases();
      return this.#write((revision) => {
        if (options.lease !== undefined) this.#requireLease(options.lease);
        this.#applyPut(revision, key, value, options.lease);
        return true;
      });
    });
  }

  delete(key: string): Promise<number> {
    return this.#run(() => {
      checkKey(key);
      this.#expireLeases();
      return this.#write((revision) => this.#applyDelete(revision, key));
    });
  }

  txn(request: TxnRequest): Promise<TxnResult> {
    return this.#run(() => this.#txn(request));
  }

  txnOrdered(request: TxnRequest): Promise<OrderedTxn> {
    try {
      const { value: result, durable } = this.#ordered(() => this.#txn(request));
      // Its failure is the caller's to handle; unobserved, it must not end the process.
      durable.catch(() => {});
      return Promise.resolve({ result, durable });
    } catch (error) {
      return Promise.reject(error);
    }
  }

  #txn(request: TxnRequest): TxnResult {
    for (const compare of request.compare) checkKey(compare.key);
    for (const op of [...request.success, ...(request.failure ?? [])]) {
      if (op.type !== "deletePrefix") checkKey(op.key);
    }
    this.#expireLeases();
    let succeeded = false;
    const revision = this.#write((next) => {
      succeeded = request.compare.every((compare) =>
        compareHolds(compare, this.#sql.get.get(compare.key) as KvRow | undefined)
      );
      const ops = succeeded ? request.success : request.failure ?? [];
      let changed = false;
      for (const op of ops) changed = this.#applyOp(next, op) || changed;
      return changed;
    });
    return { succeeded, revision };
  }

  watch(prefix: string, options: WatchOptions = {}): AsyncIterable<WatchEvent> {
    if (this.#closed) throw new StoreClosedError();
    // The start is fixed at call time so no write between the call and the
    // first `next()` is missed.
    const fromRevision = options.fromRevision ?? this.#currentRevision() + 1;
    return this.#watch(prefix, fromRevision, options.signal);
  }

  grantLease(ttlMs: number): Promise<Lease> {
    return this.#run(() => {
      if (!Number.isFinite(ttlMs) || ttlMs <= 0) {
        throw new InvalidStoreArgumentError(`Expected a positive lease TTL in ms, got ${ttlMs}`);
      }
      const id = newLeaseId();
      const ttl = Math.ceil(ttlMs);
      this.#immediate(() => this.#sql.insertLease.run(id, ttl, this.#clock() + ttl));
      return { id, ttlMs: ttl };
    });
  }

  keepAlive(leaseId: string): Promise<void> {
    return this.#run(() => {
      this.#expireLeases();
      this.#immediate(() => {
        this.#requireLease(leaseId);
        this.#sql.renewLease.run(this.#clock(), leaseId);
      });
    });
  }

  revokeLease(leaseId: string): Promise<void> {
    return this.#run(() => {
      this.#expireLeases();
      this.#write((revision) => {
        this.#requireLease(leaseId);
        return this.#dropLease(revision, leaseId);
      });
    });
  }

  compact(revision: number): Promise<void> {
    return this.#run(() => {
      this.#immediate(() => {
        const current = this.#currentRevision();
        const compacted = this.#compactRevision();
        if (revision > current) throw new FutureRevisionError(revision, current);
        if (revision <= compacted) throw new CompactedError(revision, compacted);
        this.#sql.compactHistory.run(revision);
        this.#sql.setMeta.run(revision, "compact_revision");
      });
    });
  }

  revision(): Promise<number> {
    return this.#run(() => this.#currentRevision());
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    clearInterval(this.#timer);
    for (const waker of this.#wakers) waker.wake();
    this.#wakers.clear();
    let failure: unknown;
    if (this.#ownSync) {
      await this.#syncing?.catch(() => {});
      if (this.#synced < this.#commits && this.#syncFailure === undefined) {
        await this.#syncWal().catch((error) => failure = error);
      }
      this.#wal?.close();
      this.#wal = undefined;
      try {
        // The last connection checkpoints the WAL into the database and
        // deletes it: with the database file synced first.
        this.#db.exec("PRAGMA synchronous = FULL");
      } catch {
        // Closed below all the same.
      }
    }
    this.#db.close();
    this.#settleWaiters(failure ?? this.#syncFailure);
  }

  /**
   * Runs a synchronous body as a promise, refusing work after close; when
   * it committed, the promise waits for the commit to be durable.
   */
  #run<T>(body: () => T): Promise<T> {
    try {
      const { value, durable } = this.#ordered(body);
      return durable.then(() => value);
    } catch (error) {
      return Promise.reject(error);
    }
  }

  /**
   * Runs a synchronous body, refusing work after close (by throwing); when
   * it committed, `durable` waits for the commit to be durable. The WAL is
   * appended in commit order and a sync covers every commit before it, so a
   * later commit made durable makes this one durable too.
   */
  #ordered<T>(body: () => T): { value: T; durable: Promise<void> } {
    if (this.#closed) throw new StoreClosedError();
    const before = this.#commits;
    const value = body();
    const durable = this.#commits === before ? Promise.resolve() : this.#durable(this.#commits);
    return { value, durable };
  }

  /** Resolves once the first `upTo` commits are durable. */
  #durable(upTo: number): Promise<void> {
    if (this.#syncFailure !== undefined) return Promise.reject(this.#syncFailure);
    if (!this.#ownSync || this.#synced >= upTo) return Promise.resolve();
    const waiter = Promise.withResolvers<void>();
    this.#syncWaiters.push({ upTo, resolve: waiter.resolve, reject: waiter.reject });
    this.#syncing ??= this.#syncLoop();
    return waiter.promise;
  }

  /** Fsyncs the WAL while commits wait for it: each round covers every commit made before it. */
  async #syncLoop(): Promise<void> {
    try {
      while (this.#syncWaiters.length > 0 && !this.#closed) {
        try {
          await this.#syncWal();
        } catch (error) {
          this.#syncFailure = error;
        }
        this.#settleWaiters(this.#syncFailure);
        if (this.#syncFailure !== undefined || this.#closed) return;
        if (this.#synced - this.#checkpointedAt >= CHECKPOINT_EVERY_COMMITS) this.#checkpoint();
      }
    } finally {
      // Cleared as the loop ends, not a tick later: a waiter settled just now
      // may commit again at once, and its commit must start a loop of its own.
      this.#syncing = undefined;
    }
  }

  /** One fdatasync of the WAL, covering every commit made before it started. */
  async #syncWal(): Promise<void> {
    const upTo = this.#commits;
    this.#wal ??= await Deno.open(`${this.path}-wal`, { read: true });
    await this.#wal.syncData();
    this.#synced = Math.max(this.#synced, upTo);
  }

  /** Resolves the waiters now durable (all of them, rejected, on `failure`). */
  #settleWaiters(failure?: unknown): void {
    const waiting = this.#syncWaiters;
    this.#syncWaiters = [];
    for (const waiter of waiting) {
      if (failure !== undefined) waiter.reject(failure);
      else if (this.#synced >= waiter.upTo) waiter.resolve();
      else if (this.#closed) waiter.reject(new StoreClosedError());
      else this.#syncWaiters.push(waiter);
    }
  }

  /**
   * Copies the WAL into the database file, syncing both (`synchronous=FULL`
   * for the occasion), so that the WAL can start over. Another process
   * reading an old snapshot may hold part of it back; the next one goes on.
   */
  #checkpoint(): void {
    try {
      this.#db.exec("PRAGMA synchronous = FULL");
      this.#db.exec("PRAGMA wal_checkpoint(PASSIVE)");
      this.#checkpointedAt = this.#synced;
    } catch {
      // Busy: tried again after the next commits.
    } finally {
      this.#db.exec("PRAGMA synchronous = OFF");
    }
  }

  #currentRevision(): number {
    return (this.#sql.revision.get() as { value: number }).value;
  }

  #compactRevision(): number {
    return (this.#sql.compactRevision.get() as { value: number }).value;
  }

  #readDataVersion(): number {
    return (this.#sql.dataVersion.get() as { data_version: number }).data_version;
  }

  /** Runs `body` in a write transaction that takes the file's write lock up front. */
  #immediate<T>(body: () => T): T {
    if (this.#readOnly) throw new ReadOnlyStoreError(this.path);
    if (this.#syncFailure !== undefined) throw this.#syncFailure;
    this.#db.exec("BEGIN IMMEDIATE");
    try {
      const result = body();
      this.#db.exec("COMMIT");
      this.#commits++;
      return result;
    } catch (error) {
      if (this.#db.isTransaction) this.#db.exec("ROLLBACK");
      throw error;
    }
  }

  /** Runs `body` in a read transaction: one consistent snapshot. */
  #read<T>(body: () => T): T {
    this.#db.exec("BEGIN");
    try {
      return body();
    } finally {
      if (this.#db.isTransaction) this.#db.exec("COMMIT");
    }
  }

  /**
   * Runs a write at the next revision. `body` says whether it changed
   * anything; if not, the revision is not consumed (as in etcd). Returns the
   * store revision afterwards.
   */
  #write(body: (revision: number) => boolean): number {
    const touched: string[] = [];
    this.#touched = touched;
    let result: { revision: number; changed: boolean };
    try {
      result = this.#immediate(() => {
        const next = this.#currentRevision() + 1;
        const changed = body(next);
        if (changed) this.#sql.setMeta.run(next, "revision");
        return { revision: changed ? next : next - 1, changed };
      });
    } finally {
      this.#touched = undefined;
    }
    // Only the watches of the keys written (a write elsewhere costs them no
    // read), once the write is durable.
    if (result.changed) {
      this.#durable(this.#commits).then(() => this.#wakeWatchers(touched), () => {});
    }
    return result.revision;
  }

  #applyOp(revision: number, op: TxnOp): boolean {
    switch (op.type) {
      case "put":
        if (op.lease !== undefined) this.#requireLease(op.lease);
        this.#applyPut(revision, op.key, op.value, op.lease);
        return true;
      case "delete":
        return this.#applyDelete(revision, op.key);
      case "deletePrefix": {
        const end = prefixEnd(op.prefix);
        const rows =
          (end === undefined
            ? this.#sql.keysFrom.all(op.prefix)
            : this.#sql.keysInRange.all(op.prefix, end)) as unknown as { key: string }[];
        for (const row of rows) this.#applyDelete(revision, row.key);
        return rows.length > 0;
      }
      default:
        throw new InvalidStoreArgumentError(
          `Expected a txn op of type put, delete or deletePrefix, got ${JSON.stringify(op)}`,
        );
    }
  }

  #applyPut(revision: number, key: string, value: string, lease: string | undefined): void {
    if (typeof value !== "string") {
      throw new InvalidStoreArgumentError(`Expected a string value for "${key}"`);
    }
    const current = this.#sql.get.get(key) as KvRow | undefined;
    const createRevision = current?.create_revision ?? revision;
    const version = (current?.version ?? 0) + 1;
    const leaseId = lease ?? null;
    this.#touched?.push(key);
    this.#sql.upsert.run(key, value, createRevision, revision, version, leaseId);
    this.#sql.record.run(revision, "put", key, value, createRevision, version, leaseId);
  }

  #applyDelete(revision: number, key: string): boolean {
    this.#touched?.push(key);
    const { changes } = this.#sql.deleteKey.run(key);
    if (changes === 0) return false;
    this.#sql.record.run(revision, "delete", key, null, null, null, null);
    return true;
  }

  #requireLease(leaseId: string): void {
    const lease = this.#sql.getLease.get(leaseId) as { expires_at: number } | undefined;
    if (lease === undefined || lease.expires_at <= this.#clock()) {
      throw new LeaseNotFoundError(leaseId);
    }
  }

  /** Deletes a lease and its keys at `revision`; says whether any key went. */
  #dropLease(revision: number, leaseId: string): boolean {
    const keys = this.#sql.keysOfLease.all(leaseId) as unknown as { key: string }[];
    for (const { key } of keys) this.#applyDelete(revision, key);
    this.#sql.deleteLease.run(leaseId);
    return keys.length > 0;
  }

  /** Ends every lease past its expiry, deleting its keys in one revision. */
  #expireLeases(): void {
    // A reader only looks: the next writer expires them.
    if (this.#readOnly) return;
    const now = this.#clock();
    if (this.#sql.anyExpired.get(now) === undefined) return;
    this.#write((revision) => {
      const expired = this.#sql.expired.all(now) as unknown as { id: string }[];
      let changed = false;
      for (const { id } of expired) changed = this.#dropLease(revision, id) || changed;
      return changed;
    });
  }

  /** Wakes the watches of `keys`, or every watch when the keys are not known. */
  #wakeWatchers(keys?: string[]): void {
    for (const waker of this.#wakers) {
      if (
        keys === undefined ||
        keys.some((key) => key >= waker.prefix && (waker.end === undefined || key < waker.end))
      ) waker.wake();
    }
  }

  /** The timer: expire leases, and wake watches if another process wrote. */
  #tick(): void {
    if (this.#closed) return;
    try {
      this.#expireLeases();
      const version = this.#readDataVersion();
      if (version !== this.#dataVersion) {
        this.#dataVersion = version;
        this.#wakeWatchers();
      }
    } catch {
      // A busy database (another process holding the lock past the timeout)
      // is retried on the next tick; reads and writes report their own errors.
    }
  }

  /** Reads one page of history for a watch, in one snapshot. */
  #readHistory(
    prefix: string,
    fromRevision: number,
    afterId: number,
  ): { rows: HistoryRow[]; current: number } {
    return this.#read(() => {
      const compacted = this.#compactRevision();
      if (fromRevision < compacted) throw new CompactedError(fromRevision, compacted);
      const end = prefixEnd(prefix);
      const rows = (end === undefined
        ? this.#sql.historyFrom.all(afterId, fromRevision, prefix, WATCH_PAGE_SIZE)
        : this.#sql.historyRange.all(
          afterId,
          fromRevision,
          prefix,
          end,
          WATCH_PAGE_SIZE,
        )) as unknown as HistoryRow[];
      return { rows, current: this.#currentRevision() };
    });
  }

  async *#watch(
    prefix: string,
    startRevision: number,
    signal: AbortSignal | undefined,
  ): AsyncGenerator<WatchEvent> {
    let fromRevision = startRevision;
    let afterId = 0;
    let dirty = true;
    let resolveWait: (() => void) | undefined;
    const waker: Waker = {
      prefix,
      end: prefixEnd(prefix),
      wake() {
        dirty = true;
        resolveWait?.();
        resolveWait = undefined;
      },
    };
    const onAbort = () => waker.wake();
    signal?.addEventListener("abort", onAbort);
    this.#wakers.add(waker);
    try {
      while (!this.#closed && !signal?.aborted) {
        if (!dirty) {
          await new Promise<void>((resolve) => (resolveWait = resolve));
          continue;
        }
        dirty = false;
        const { rows, current } = this.#readHistory(prefix, fromRevision, afterId);
        for (const row of rows) {
          afterId = row.id;
          yield toWatchEvent(row);
          if (this.#closed || signal?.aborted) return;
        }
        if (rows.length === WATCH_PAGE_SIZE) {
          dirty = true; // more pages to read
        } else {
          // Everything up to `current` has been seen: move the position so a
          // later compaction below it does not fail this watch.
          fromRevision = Math.max(fromRevision, current + 1);
        }
      }
    } finally {
      signal?.removeEventListener("abort", onAbort);
      this.#wakers.delete(waker);
    }
  }
}
