/**
 * Leader election with fencing, over any {@link Store} (etcd in a cluster,
 * the embedded engine in one process): etcd's election recipe, written on
 * the store's primitives.
 *
 * Each candidate puts a key `prefix + leaseId` attached to its own lease;
 * the key with the lowest create revision leads, the others wait for a
 * delete under the prefix and look again. The leader's key create revision
 * is its **epoch**: epochs grow from leader to leader.
 *
 * An election alone is not mutual exclusion (a paused or partitioned leader
 * goes on believing it leads — Jepsen's etcd 3.4.3 analysis), so a leader
 * does not write on belief: every write carries {@link Leadership.fence}, a
 * compare that its election key still exists with its epoch as create
 * revision. The store checks it atomically with the write; once the key is
 * gone (lease expired, resigned, deleted) a deposed leader's writes fail
 * instead of racing the new leader's.
 *
 * @module
 */

import {
  CompactedError,
  type Compare,
  InvalidStoreArgumentError,
  type KeyValue,
  LeaseNotFoundError,
  type Store,
  StoreError,
  type TxnRequest,
  type TxnResult,
} from "./store.ts";

/** Options of {@link createElection}. */
export interface ElectionOptions {
  /** Key prefix of this election, e.g. `"election/scheduler/"`. */
  prefix: string;
  /** This candidate's name, the value of its key (what {@link Election.leader} reports). */
  candidate: string;
  /**
   * TTL of the candidate's lease: how long a leader that stopped renewing
   * (crashed, partitioned) keeps the lead. Default 3 s.
   */
  ttlMs?: number;
  /** How often the lease is renewed. Default a third of the TTL. */
  keepAliveIntervalMs?: number;
}

/** Options of {@link Election.campaign}. */
export interface CampaignOptions {
  /** Gives up the campaign: it rejects with the signal's reason and withdraws the candidate. */
  signal?: AbortSignal;
}

/** The current leader as the store shows it. */
export interface LeaderInfo {
  /** The leader's candidate name. */
  candidate: string;
  /** Its epoch: the create revision of its election key. */
  epoch: number;
  /** Its election key. */
  key: string;
}

/** Why a leadership ended. */
export type LeadershipEnd =
  | "resigned"
  | "lease_lost"
  | "key_deleted"
  | "fenced";

/** An election among the candidates sharing a prefix. */
export interface Election {
  /** Campaigns until this candidate leads; resolves with its leadership. */
  campaign(options?: CampaignOptions): Promise<Leadership>;
  /** The current leader, if any. */
  leader(): Promise<LeaderInfo | undefined>;
}

/** The lead, held until resigned or lost. */
export interface Leadership {
  /** This candidate's name. */
  readonly candidate: string;
  /** The election key (`prefix + leaseId`). */
  readonly key: string;
  /** The election key's create revision: larger than every earlier leader's. */
  readonly epoch: number;
  /** The lease the key is attached to. */
  readonly leaseId: string;
  /** Whether this candidate still believes it leads. Belief only: writes use the fence. */
  readonly isLeader: boolean;
  /** Resolves, with the reason, when the leadership ends. */
  readonly lost: Promise<LeadershipEnd>;
  /** Aborted when the leadership ends: hand it to the work done as leader. */
  readonly signal: AbortSignal;
  /**
   * The compare to add to every txn written as leader: it fails once this
   * leadership has ended in the store. A fenced txn must have no `failure`
   * ops, or a deposed leader would still write them.
   */
  fence(): Compare;
  /**
   * Runs a txn with the fence added. When the fence fails, the leadership
   * ends and this throws {@link NotLeaderError}; a failure of the caller's
   * own compares returns `succeeded: false` as usual.
   */
  txn(request: TxnRequest): Promise<TxnResult>;
  /** Gives up the lead (revokes the lease, so the next candidate leads at once). */
  resign(): Promise<void>;
}

/** A write as leader by a candidate that no longer leads. */
export class NotLeaderError extends StoreError {
  /** The epoch of the ended leadership. */
  readonly epoch: number;

  /** Builds the error for a candidate and its ended epoch. */
  constructor(candidate: string, epoch: number, reason: string) {
    super(
      "not_leader",
      `Expected "${candidate}" to lead (epoch ${epoch}), but its leadership ended: ${reason}`,
    );
    this.name = "NotLeaderError";
    this.epoch = epoch;
  }
}

const DEFAULT_TTL_MS = 3_000;
/** Pause before retrying a keep-alive that failed for want of the store (not of the lease). */
const KEEPALIVE_RETRY_MS = 50;

/**
 * Creates an election over a store.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { openMemoryStore } from "./embedded.ts";
 * import { createElection } from "./election.ts";
 *
 * const store = openMemoryStore();
 * const election = createElection(store, { prefix: "election/", candidate: "server-1" });
 * const leadership = await election.campaign();
 * assert.equal(leadership.isLeader, true);
 * // Written only while this candidate still leads (the txn carries its fence).
 * const result = await leadership.txn({
 *   compare: [],
 *   success: [{ type: "put", key: "state", value: "1" }],
 * });
 * assert.equal(result.succeeded, true);
 * assert.equal((await store.get("state"))?.value, "1");
 * await leadership.resign();
 * assert.equal(leadership.isLeader, false);
 * await store.close();
 * ```
 */
export function createElection(store: Store, options: ElectionOptions): Election {
  const ttlMs = options.ttlMs ?? DEFAULT_TTL_MS;
  const keepAliveIntervalMs = options.keepAliveIntervalMs ?? ttlMs / 3;
  return {
    async campaign(campaignOptions: CampaignOptions = {}): Promise<Leadership> {
      const signal = campaignOptions.signal;
      for (;;) {
        signal?.throwIfAborted();
        const lease = await store.grantLease(ttlMs);
        const keeper = new LeaseKeeper(store, lease.id, lease.ttlMs, keepAliveIntervalMs);
        const key = options.prefix + lease.id;
        try {
          const created = await store.txn({
            compare: [{ key, target: "create", op: "==", value: 0 }],
            success: [{ type: "put", key, value: options.candidate, lease: lease.id }],
          });
          if (!created.succeeded) {
            throw new StoreError("election", `Expected a fresh election key "${key}", it exists`);
          }
          const epoch = created.revision;
          if (await waitToLead(store, { prefix: options.prefix, key, epoch, keeper, signal })) {
            return new StoreLeadership(store, {
              candidate: options.candidate,
              key,
              epoch,
              leaseId: lease.id,
              keeper,
            });
          }
          // The key went before it led (the lease lapsed): stand again.
          keeper.stop();
          await store.revokeLease(lease.id).catch(() => {});
        } catch (error) {
          keeper.stop();
          await store.revokeLease(lease.id).catch(() => {});
          throw error;
        }
      }
    },
    async leader(): Promise<LeaderInfo | undefined> {
      const first = lowest((await store.list(options.prefix)).items);
      return first && { candidate: first.value, epoch: first.createRevision, key: first.key };
    },
  };
}

/** The candidate key that leads: the lowest create revision. */
function lowest(items: KeyValue[]): KeyValue | undefined {
  let first: KeyValue | undefined;
  for (const item of items) {
    if (first === undefined || item.createRevision < first.createRevision) first = item;
  }
  return first;
}

/**
 * Waits until `key` has the lowest create revision under `prefix` (true), or
 * is gone (false). Watches for deletes in between; a compacted watch relists.
 */
async function waitToLead(
  store: Store,
  candidacy: {
    prefix: string;
    key: string;
    epoch: number;
    keeper: LeaseKeeper;
    signal: AbortSignal | undefined;
  },
): Promise<boolean> {
  const { prefix, key, epoch, signal } = candidacy;
  const leaseEnded = candidacy.keeper.signal;
  for (;;) {
    signal?.throwIfAborted();
    const listing = await store.list(prefix);
    const mine = listing.items.find((item) => item.key === key);
    if (mine === undefined || mine.createRevision !== epoch || leaseEnded.aborted) return false;
    if (lowest(listing.items)?.key === key) return true;
    const stop = new AbortController();
    const stopWatch = () => stop.abort();
    leaseEnded.addEventListener("abort", stopWatch);
    signal?.addEventListener("abort", stopWatch);
    // Aborted while the list was read: no "abort" event comes any more.
    if (signal?.aborted) stop.abort();
    try {
      const events = store.watch(prefix, {
        fromRevision: listing.revision + 1,
        signal: stop.signal,
      });
      for await (const event of events) {
        // A delete may have removed the key ahead of ours; a new key never comes before it.
        if (event.type === "delete") break;
      }
    } catch (error) {
      if (!(error instanceof CompactedError)) throw error;
    } finally {
      leaseEnded.removeEventListener("abort", stopWatch);
      signal?.removeEventListener("abort", stopWatch);
    }
  }
}

/**
 * Renews a lease in the background. Its signal aborts once the lease is
 * known gone, or once its TTL has passed since the last renewal that
 * succeeded — from then on the lease may have expired in the store.
 */
class LeaseKeeper {
  readonly #controller = new AbortController();
  readonly #store: Store;
  readonly #leaseId: string;
  readonly #ttlMs: number;
  readonly #intervalMs: number;
  #deadlineTimer: ReturnType<typeof setTimeout> | undefined;
  #renewTimer: ReturnType<typeof setTimeout> | undefined;
  /** Why the lease ended, once it has. */
  reason: LeadershipEnd | undefined;

  constructor(store: Store, leaseId: string, ttlMs: number, intervalMs: number) {
    this.#store = store;
    this.#leaseId = leaseId;
    this.#ttlMs = ttlMs;
    this.#intervalMs = intervalMs;
    this.#armDeadline(performance.now());
    this.#schedule(intervalMs);
  }

  get signal(): AbortSignal {
    return this.#controller.signal;
  }

  /** Stops renewing; `reason` is recorded if the lease had not ended yet. */
  stop(reason: LeadershipEnd = "resigned"): void {
    clearTimeout(this.#deadlineTimer);
    clearTimeout(this.#renewTimer);
    if (!this.#controller.signal.aborted) {
      this.reason = reason;
      this.#controller.abort(reason);
    }
  }

  #armDeadline(renewedAt: number): void {
    clearTimeout(this.#deadlineTimer);
    this.#deadlineTimer = setTimeout(
      () => this.stop("lease_lost"),
      Math.max(0, renewedAt + this.#ttlMs - performance.now()),
    );
  }

  #schedule(delayMs: number): void {
    this.#renewTimer = setTimeout(() => this.#renew(), delayMs);
  }

  async #renew(): Promise<void> {
    if (this.signal.aborted) return;
    const sentAt = performance.now();
    try {
      await this.#store.keepAlive(this.#leaseId);
      if (this.signal.aborted) return;
      this.#armDeadline(sentAt);
      this.#schedule(this.#intervalMs);
    } catch (error) {
      if (this.signal.aborted) return;
      if (error instanceof LeaseNotFoundError) {
        this.stop("lease_lost");
        return;
      }
      // The store could not be reached: keep trying until the deadline timer gives up.
      this.#schedule(Math.min(KEEPALIVE_RETRY_MS, this.#intervalMs));
    }
  }
}

class StoreLeadership implements Leadership {
  readonly candidate: string;
  readonly key: string;
  readonly epoch: number;
  readonly leaseId: string;
  readonly lost: Promise<LeadershipEnd>;
  readonly #store: Store;
  readonly #keeper: LeaseKeeper;
  readonly #watchStop = new AbortController();

  constructor(
    store: Store,
    won: { candidate: string; key: string; epoch: number; leaseId: string; keeper: LeaseKeeper },
  ) {
    const keeper = won.keeper;
    this.#store = store;
    this.candidate = won.candidate;
    this.key = won.key;
    this.epoch = won.epoch;
    this.leaseId = won.leaseId;
    this.#keeper = keeper;
    this.lost = new Promise((resolve) => {
      const done = () => {
        this.#watchStop.abort();
        resolve(keeper.reason ?? "lease_lost");
      };
      if (keeper.signal.aborted) done();
      else keeper.signal.addEventListener("abort", done, { once: true });
    });
    this.#watchOwnKey();
  }

  get isLeader(): boolean {
    return !this.#keeper.signal.aborted;
  }

  get signal(): AbortSignal {
    return this.#keeper.signal;
  }

  fence(): Compare {
    return { key: this.key, target: "create", op: "==", value: this.epoch };
  }

  async txn(request: TxnRequest): Promise<TxnResult> {
    if (request.failure !== undefined && request.failure.length > 0) {
      throw new InvalidStoreArgumentError(
        "Expected a fenced txn without failure ops: a deposed leader would still write them",
      );
    }
    if (!this.isLeader) {
      throw new NotLeaderError(this.candidate, this.epoch, this.#keeper.reason ?? "lease_lost");
    }
    const result = await this.#store.txn({
      compare: [...request.compare, this.fence()],
      success: request.success,
    });
    if (!result.succeeded) {
      const current = await this.#store.get(this.key);
      if (current?.createRevision !== this.epoch) {
        this.#keeper.stop("fenced");
        throw new NotLeaderError(this.candidate, this.epoch, "fenced");
      }
    }
    return result;
  }

  async resign(): Promise<void> {
    const wasLeader = this.isLeader;
    this.#keeper.stop("resigned");
    if (wasLeader) {
      await this.#store.revokeLease(this.leaseId).catch((error) => {
        // Already gone is what resigning wants.
        if (!(error instanceof LeaseNotFoundError)) throw error;
      });
    }
  }

  /** Ends the leadership if the key is deleted (by its lease's expiry, or by hand). */
  async #watchOwnKey(): Promise<void> {
    let from = this.epoch + 1;
    while (!this.#watchStop.signal.aborted) {
      try {
        for await (
          const event of this.#store.watch(this.key, {
            fromRevision: from,
            signal: this.#watchStop.signal,
          })
        ) {
          if (event.key === this.key && event.type === "delete") {
            this.#keeper.stop("key_deleted");
            return;
          }
        }
        return;
      } catch (error) {
        if (this.#watchStop.signal.aborted) return;
        if (!(error instanceof CompactedError)) {
          // The store failed (closed, unreachable): the fence still guards every write.
          return;
        }
        const listing = await this.#store.list(this.key).catch(() => undefined);
        const mine = listing?.items.find((item) => item.key === this.key);
        if (listing === undefined || mine?.createRevision !== this.epoch) {
          this.#keeper.stop("key_deleted");
          return;
        }
        from = listing.revision + 1;
      }
    }
  }
}
