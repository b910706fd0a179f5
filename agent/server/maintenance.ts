/**
 * Keeping the state store small, on the scheduling server only:
 *
 * - **retention**: a finished run older than its retention (its pipeline's
 *   `retention:`, else the server's, 14 days by default) is deleted with
 *   everything it left in the store (plan, steps, results, requests, logs,
 *   index entries); shipped directories no run nor registered pipeline
 *   names any more go after it.
 * - **compaction**: each round compacts the store's history to the revision
 *   the previous round saw, so history older than one interval (5 min by
 *   default, as kube-apiserver compacts etcd) is dropped. A watch that falls
 *   behind it relists (`CompactedError`).
 * - **defragmentation** (etcd): compaction frees pages inside etcd's
 *   database but does not shrink the file its quota counts; a member with
 *   enough free pages is defragmented, one member at a time (the member
 *   answers nothing while it runs), the Raft leader last.
 *
 * Expired runs are found from the end of the run index (`run_index.ts`),
 * whose order is the inverted creation time: a round reads only the runs
 * past the retention, never every run.
 *
 * @module
 */

import type { Compare, Store, TxnOp } from "../../consensus/store.ts";
import { CompactedError } from "../../consensus/store.ts";
import type { EtcdMemberStatus } from "../../consensus/etcd.ts";
import type { Plan } from "../../core/model.ts";
import { isTerminalRunStatus } from "../../core/model.ts";
import { DEFAULT_RETENTION_MS } from "../../core/artifacts/store.ts";
import { abortableDelay } from "../../core/_async.ts";
import {
  BUNDLE_ARTIFACT_RUN,
  BUNDLE_INDEX_PREFIX,
  type BundleStorage,
  deleteStoredBundle,
  type StoredBundleMeta,
} from "../bundle.ts";
import { clusterKeys, type ClusterRunRecord } from "./keys.ts";
import { indexKeys, indexOps, MAX_TIME } from "./run_index.ts";
import { pipelineKeys, type PipelineVersion } from "./pipelines.ts";

/** What maintenance needs of etcd's members (an `EtcdStore` is one). */
export interface MemberMaintenance {
  /** Every member's database size. */
  memberStatus(): Promise<EtcdMemberStatus[]>;
  /** Defragments one member. */
  defragment(endpoint: string): Promise<void>;
}

/** How a server maintains its store; every field has a default. */
export interface MaintenanceSettings {
  /** How long finished runs stay without a `retention:` of their own (default 14 days). */
  runRetentionMs?: number;
  /** Time between two rounds; history older than one round is compacted (default 5 min). */
  intervalMs?: number;
  /** Defragment a member once its free pages reach this many bytes (default 128 MiB)… */
  defragFreeBytes?: number;
  /** …or this share of its database (default 0.5), whichever is larger. */
  defragFreeRatio?: number;
  /** etcd's members (none for the embedded store: SQLite reuses its free pages). */
  members?: MemberMaintenance;
  /** Turns maintenance off (tests that count writes). */
  disabled?: boolean;
}

/** Default time between maintenance rounds. */
export const DEFAULT_MAINTENANCE_INTERVAL_MS = 5 * 60 * 1000;
const DEFAULT_DEFRAG_FREE_BYTES = 128 * 1024 * 1024;
const DEFAULT_DEFRAG_FREE_RATIO = 0.5;
/** Expired runs deleted per round at most: a backlog drains over rounds, never in one burst. */
const MAX_PRUNED_PER_ROUND = 2_000;
/** Index entries read per page while looking for expired runs. */
const PRUNE_PAGE = 200;

/** What one round did. */
export interface MaintenanceReport {
  runsDeleted: number;
  bundlesDeleted: number;
  /** The revision history was compacted to, if it was. */
  compactedTo?: number;
  /** Members defragmented, in order. */
  defragmented: string[];
  /** Member sizes after the round (etcd only). */
  members?: EtcdMemberStatus[];
}

/** Options of {@link maintainOnce}. */
export interface MaintenanceRound {
  store: Store;
  /** The scheduler's fence: a deposed server deletes nothing. */
  fence: Compare[];
  settings?: MaintenanceSettings;
  bundles?: BundleStorage;
  /** The current time (injected so tests control age). */
  now?: number;
  /** Compact to this revision (the one the previous round saw). */
  compactTo?: number;
  log?: (fields: Record<string, unknown>) => void;
}

/**
 * One round: deletes expired runs and unreferenced bundles, compacts to
 * `compactTo`, defragments members with enough free pages.
 */
export async function maintainOnce(round: MaintenanceRound): Promise<MaintenanceReport> {
  const { store, fence } = round;
  const settings = round.settings ?? {};
  const now = round.now ?? Date.now();
  const retentionMs = settings.runRetentionMs ?? DEFAULT_RETENTION_MS;
  const report: MaintenanceReport = { runsDeleted: 0, bundlesDeleted: 0, defragmented: [] };
  report.runsDeleted = await pruneRuns(store, fence, now, retentionMs);
  report.bundlesDeleted = await sweepBundles(store, round.bundles ?? {}, now, retentionMs);
  if (round.compactTo !== undefined && round.compactTo > 0) {
    try {
      await store.compact(round.compactTo);
      report.compactedTo = round.compactTo;
    } catch (error) {
      // Compacted there already (by an earlier scheduler, or etcd's own auto-compaction).
      if (!(error instanceof CompactedError)) throw error;
    }
  }
  if (settings.members) {
    report.defragmented = await defragmentMembers(settings.members, settings, round.log);
    report.members = await settings.members.memberStatus();
  }
  return report;
}

/**
 * Runs rounds every `intervalMs` until `signal` aborts; a failed round is
 * logged and the next one tries again.
 */
export async function runMaintenance(
  round: Omit<MaintenanceRound, "now" | "compactTo">,
  signal: AbortSignal,
): Promise<void> {
  const settings = round.settings ?? {};
  if (settings.disabled) return;
  const intervalMs = settings.intervalMs ?? DEFAULT_MAINTENANCE_INTERVAL_MS;
  let seen: number | undefined;
  while (!signal.aborted) {
    await abortableDelay(intervalMs, signal).catch(() => {});
    if (signal.aborted) return;
    try {
      const revision = await round.store.revision();
      const report = await maintainOnce({ ...round, compactTo: seen });
      seen = revision;
      if (report.runsDeleted || report.bundlesDeleted || report.defragmented.length) {
        round.log?.({ component: "maintenance", msg: "store maintained", ...report });
      }
    } catch (error) {
      round.log?.({
        level: "warn",
        component: "maintenance",
        msg: "round failed",
        error: String(error),
      });
    }
  }
}

/** Deletes finished runs past their retention, oldest first; returns how many. */
export async function pruneRuns(
  store: Store,
  fence: Compare[],
  now: number,
  retentionMs: number,
): Promise<number> {
  // Index keys of runs created before the cutoff sort after this one.
  const cutoff = indexKeys.runs + String(MAX_TIME - (now - retentionMs)).padStart(13, "0");
  let after = cutoff;
  let deleted = 0;
  while (deleted < MAX_PRUNED_PER_ROUND) {
    const { items } = await store.list(indexKeys.runs, { startAfter: after, limit: PRUNE_PAGE });
    for (const item of items) {
      after = item.key;
      const kv = await store.get(clusterKeys.run(item.value));
      if (!kv) {
        // An index entry whose run is gone (a crash between two writes): drop it.
        await store.txn({ compare: fence, success: [{ type: "delete", key: item.key }] });
        continue;
      }
      const record = JSON.parse(kv.value) as ClusterRunRecord;
      if (!isTerminalRunStatus(record.status)) continue;
      if (!await expired(store, record, now, retentionMs)) continue;
      const result = await store.txn({
        compare: [...fence, { key: kv.key, target: "mod", op: "==", value: kv.modRevision }],
        success: runDeletes(record),
      });
      if (result.succeeded) deleted++;
    }
    if (items.length < PRUNE_PAGE) break;
  }
  return deleted;
}

/** Whether a finished run is past its own retention (its plan's), else the server's. */
async function expired(
  store: Store,
  record: ClusterRunRecord,
  now: number,
  retentionMs: number,
): Promise<boolean> {
  const ended = record.finishedAt ?? record.createdAt;
  if (now - ended <= retentionMs) return false;
  const planKv = await store.get(clusterKeys.plan(record.runId));
  const own = planKv ? (JSON.parse(planKv.value) as Plan).retention?.run : undefined;
  if (own === "forever") return false;
  return own === undefined || now - ended > own;
}

/** Every write that removes a run from the store. */
function runDeletes(record: ClusterRunRecord): TxnOp[] {
  const runId = record.runId;
  return [
    { type: "delete", key: clusterKeys.run(runId) },
    { type: "delete", key: clusterKeys.plan(runId) },
    { type: "deletePrefix", prefix: clusterKeys.stepPrefix(runId) },
    { type: "deletePrefix", prefix: clusterKeys.logsOfRun(runId) },
    { type: "deletePrefix", prefix: `${clusterKeys.requestPrefix}${runId}/` },
    // Attempt ids start with the run id and "/" (encoded in the key).
    {
      type: "deletePrefix",
      prefix: `${clusterKeys.resultPrefix}${encodeURIComponent(`${runId}/`)}`,
    },
    ...indexOps(record).map((op): TxnOp => ({ type: "delete", key: (op as { key: string }).key })),
  ];
}

/**
 * Deletes shipped directories older than the retention that no run and no
 * registered pipeline version names; returns how many.
 */
export async function sweepBundles(
  store: Store,
  storage: BundleStorage,
  now: number,
  retentionMs: number,
): Promise<number> {
  const candidates = new Set<string>();
  const { items } = await store.list(BUNDLE_INDEX_PREFIX);
  for (const kv of items) {
    const meta = JSON.parse(kv.value) as StoredBundleMeta;
    if (now - meta.at > retentionMs) candidates.add(kv.key.slice(BUNDLE_INDEX_PREFIX.length));
  }
  const shelved = storage.artifacts
    ? (await storage.artifacts.list({ run: BUNDLE_ARTIFACT_RUN }))
      .filter((record) => now - record.created > retentionMs)
      .map((record) => record.step)
    : [];
  for (const hex of shelved) candidates.add(hex);
  if (candidates.size === 0) return 0;
  for (const hex of await pipelineBundles(store)) candidates.delete(hex);
  for (const hex of [...candidates]) {
    const { items: users } = await store.list(indexKeys.bundle(hex), { limit: 1 });
    if (users.length > 0) candidates.delete(hex);
  }
  if (candidates.size === 0) return 0;
  for (const kv of items) {
    const hex = kv.key.slice(BUNDLE_INDEX_PREFIX.length);
    if (candidates.has(hex)) await deleteStoredBundle(store, `sha256:${hex}`);
  }
  if (storage.artifacts && shelved.some((hex) => candidates.has(hex))) {
    // Only these records go: every other artifact is the agents' and `runnel gc`'s.
    await storage.artifacts.gc({
      now,
      retentionOf: (record) =>
        record.run === BUNDLE_ARTIFACT_RUN && candidates.has(record.step) ? 0 : "forever",
    });
  }
  return candidates.size;
}

/** Digests (hex) of the bundles registered pipeline versions name. */
async function pipelineBundles(store: Store): Promise<Set<string>> {
  const { items } = await store.list(pipelineKeys.prefix);
  const digests = new Set<string>();
  for (const kv of items) {
    if (!kv.key.includes("/versions/")) continue;
    const version = JSON.parse(kv.value) as PipelineVersion;
    if (version.bundle) digests.add(version.bundle.replace(/^sha256:/, ""));
  }
  return digests;
}

/**
 * Defragments members whose free pages pass the threshold, one at a time,
 * the leader last (a leader busy defragmenting delays every write).
 */
async function defragmentMembers(
  members: MemberMaintenance,
  settings: MaintenanceSettings,
  log?: (fields: Record<string, unknown>) => void,
): Promise<string[]> {
  const statuses = (await members.memberStatus())
    .filter((member) => member.error === undefined)
    .sort((a, b) => Number(a.leader) - Number(b.leader));
  const done: string[] = [];
  for (const member of statuses) {
    const free = member.dbSize - member.dbSizeInUse;
    const threshold = Math.max(
      settings.defragFreeBytes ?? DEFAULT_DEFRAG_FREE_BYTES,
      (settings.defragFreeRatio ?? DEFAULT_DEFRAG_FREE_RATIO) * member.dbSize,
    );
    if (free < threshold || free <= 0) continue;
    try {
      await members.defragment(member.endpoint);
      done.push(member.endpoint);
    } catch (error) {
      log?.({
        level: "warn",
        component: "maintenance",
        msg: "defragmentation failed",
        member: member.endpoint,
        error: String(error),
      });
    }
  }
  return done;
}
