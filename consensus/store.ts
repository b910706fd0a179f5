/**
 * The state store interface shared by every consensus engine.
 *
 * It is shaped after etcd's v3 API so that the embedded engine (local mode)
 * and the etcd engine (cluster mode) are interchangeable: one global,
 * monotonic revision counter; per-key create/mod revisions and versions;
 * compare-and-swap transactions; watches resumable from a revision; leases.
 *
 * @module
 */

/** A stored key with its revision bookkeeping, as etcd's `mvccpb.KeyValue`. */
export interface KeyValue {
  key: string;
  value: string;
  /** Revision of the put that created the key (since its last delete). */
  createRevision: number;
  /** Revision of the last put to the key. */
  modRevision: number;
  /** Number of puts since the key was created; 1 after the first put. */
  version: number;
  /** Lease the key is attached to, if any. */
  lease?: string;
}

/**
 * One condition of a transaction. For an absent key, `mod`, `create` and
 * `version` read as 0, and every `value` comparison is false (as in etcd).
 */
export type Compare = {
  key: string;
  target: "mod" | "create" | "version" | "value";
  op: "==" | "!=" | "<" | ">";
  value: number | string;
};

/** One write of a transaction. */
export type TxnOp =
  | { type: "put"; key: string; value: string; lease?: string }
  | { type: "delete"; key: string }
  | { type: "deletePrefix"; prefix: string };

/** Outcome of a transaction. */
export interface TxnResult {
  /** Whether every comparison held (so the `success` branch ran). */
  succeeded: boolean;
  /** The store revision after the transaction. */
  revision: number;
}

/** A change seen by a watch. Events of one revision come together, in write order. */
export type WatchEvent = {
  type: "put" | "delete";
  key: string;
  /** The new value of a put. */
  value?: string;
  /** Revision of the write that made the change. */
  revision: number;
  /** The key after a put. */
  kv?: KeyValue;
};

/** A granted lease. */
export interface Lease {
  id: string;
  ttlMs: number;
}

/** A request for {@link Store.txn}. */
export interface TxnRequest {
  compare: Compare[];
  success: TxnOp[];
  failure?: TxnOp[];
}

/** Options of {@link Store.list}. */
export interface ListOptions {
  /** At most this many items (all when absent or 0). */
  limit?: number;
  /** Only keys strictly greater than this one (for paging). */
  startAfter?: string;
}

/** Result of {@link Store.list}. */
export interface ListResult {
  /** Matching keys in ascending key order. */
  items: KeyValue[];
  /** The store revision the listing was read at; watch from `revision + 1`. */
  revision: number;
}

/** Options of {@link Store.watch}. */
export interface WatchOptions {
  /** First revision to deliver; when absent, only changes after the call. */
  fromRevision?: number;
  /** Ends the watch (the iteration finishes without error). */
  signal?: AbortSignal;
}

/** Options of {@link Store.put}. */
export interface PutOptions {
  /** Attach the key to this lease; it is deleted when the lease ends. */
  lease?: string;
}

/** A transaction in the store's log, and when it is durable (see {@link Store.txnOrdered}). */
export interface OrderedTxn {
  result: TxnResult;
  /** Resolves once the transaction would survive a crash; rejects if it cannot be made to. */
  durable: Promise<void>;
}

/** A revisioned key-value store with CAS transactions, watches and leases. */
export interface Store {
  /** Reads one key. */
  get(key: string): Promise<KeyValue | undefined>;
  /** Reads the keys under a prefix, in key order, with the revision read at. */
  list(prefix: string, options?: ListOptions): Promise<ListResult>;
  /** Writes a key; returns the new store revision. */
  put(key: string, value: string, options?: PutOptions): Promise<number>;
  /** Deletes a key; returns the store revision (unchanged if the key was absent). */
  delete(key: string): Promise<number>;
  /** Runs a transaction atomically; all its writes share one revision. */
  txn(request: TxnRequest): Promise<TxnResult>;
  /**
   * Runs a transaction as {@link txn} does, but resolves once it is
   * *ordered*: applied, and in the store's log after every write before it
   * and before every write after it, so that any later write surviving a
   * crash means this one survives too. `durable` resolves once it would
   * survive a crash itself (what {@link txn} waits for). Only a store with
   * such a log on this machine has it (the embedded one); a caller without
   * it waits for {@link txn}.
   */
  txnOrdered?(request: TxnRequest): Promise<OrderedTxn>;
  /**
   * Streams the changes under a prefix: events with revision ≥ `fromRevision`
   * in order, then live ones. Throws {@link CompactedError} when
   * `fromRevision` (or the watch's position) has been compacted away.
   */
  watch(prefix: string, options?: WatchOptions): AsyncIterable<WatchEvent>;
  /** Grants a lease that ends `ttlMs` after its last keep-alive. */
  grantLease(ttlMs: number): Promise<Lease>;
  /** Renews a lease; throws {@link LeaseNotFoundError} if it already ended. */
  keepAlive(leaseId: string): Promise<void>;
  /** Ends a lease now, deleting its keys. */
  revokeLease(leaseId: string): Promise<void>;
  /** Drops the history below `revision`; watches from before it then fail. */
  compact(revision: number): Promise<void>;
  /** The current store revision. */
  revision(): Promise<number>;
  /** Releases the store; later calls throw {@link StoreClosedError}. */
  close(): Promise<void>;
}

/** Base class of the store's errors; `code` is stable across engines. */
export class StoreError extends Error {
  /** Stable error code. */
  readonly code: string;

  /** Builds an error with its code and message. */
  constructor(code: string, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "StoreError";
    this.code = code;
  }
}

/** A call on a store that has been closed. */
export class StoreClosedError extends StoreError {
  /** Builds the error. */
  constructor() {
    super("store_closed", "Expected an open store, but it has been closed");
    this.name = "StoreClosedError";
  }
}

/** A read of history that compaction has already dropped. */
export class CompactedError extends StoreError {
  /** The oldest revision still available. */
  readonly compactRevision: number;
  /** The revision that was asked for. */
  readonly requestedRevision: number;

  /** Builds the error from the asked and the oldest available revision. */
  constructor(requestedRevision: number, compactRevision: number) {
    super(
      "compacted",
      `Expected a revision at or after ${compactRevision} (the store is compacted there), ` +
        `got ${requestedRevision}; list again and watch from the listing's revision`,
    );
    this.name = "CompactedError";
    this.compactRevision = compactRevision;
    this.requestedRevision = requestedRevision;
  }
}

/** A revision after the store's current one. */
export class FutureRevisionError extends StoreError {
  /** Builds the error from the asked and the current revision. */
  constructor(requestedRevision: number, currentRevision: number) {
    super(
      "future_revision",
      `Expected a revision at or before the current ${currentRevision}, got ${requestedRevision}`,
    );
    this.name = "FutureRevisionError";
  }
}

/** A lease that does not exist (never granted, expired or revoked). */
export class LeaseNotFoundError extends StoreError {
  /** The lease asked for. */
  readonly leaseId: string;

  /** Builds the error for a lease id. */
  constructor(leaseId: string) {
    super("lease_not_found", `Expected a live lease, but lease "${leaseId}" does not exist`);
    this.name = "LeaseNotFoundError";
    this.leaseId = leaseId;
  }
}

/** An argument the store cannot accept (empty key, bad TTL…). */
export class InvalidStoreArgumentError extends StoreError {
  /** Builds the error with a sentence saying what was expected. */
  constructor(message: string) {
    super("invalid_argument", message);
    this.name = "InvalidStoreArgumentError";
  }
}

/**
 * The smallest key greater than every key starting with `prefix`
 * (etcd's range end for a prefix), or undefined when there is none.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { prefixEnd } from "./store.ts";
 *
 * assert.equal(prefixEnd("runs/"), "runs0");
 * ```
 */
export function prefixEnd(prefix: string): string | undefined {
  const codePoints = Array.from(prefix);
  while (codePoints.length > 0) {
    const last = codePoints.pop()!.codePointAt(0)!;
    if (last < 0x10ffff) {
      // Skip the surrogate range: those code points cannot be encoded in UTF-8.
      const next = last + 1 === 0xd800 ? 0xe000 : last + 1;
      return codePoints.join("") + String.fromCodePoint(next);
    }
  }
  return undefined;
}
