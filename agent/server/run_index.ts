/**
 * Indexes of cluster runs, so that `runnel runs -l team=ml --status failed
 * --pipeline P` reads a page of one index instead of every run:
 *
 * | key | written |
 * | --- | --- |
 * | `/index/runs/<order>` | at submit |
 * | `/index/pipeline/<name>/<order>` | at submit |
 * | `/index/label/<key>=<value>/<order>` | at submit, one per label |
 * | `/index/status/<status>/<order>` | at submit, then moved by the scheduler with the status |
 * | `/index/bundle/<hex>/<order>` | at submit, for a run with a shipped directory (what keeps it) |
 *
 * `<order>` is the inverted creation time and the run id, so an ascending
 * listing is newest first; the value is the run id. A query reads pages of
 * its most selective index and checks the other conditions on the records.
 *
 * @module
 */

import type { Store, TxnOp } from "../../consensus/store.ts";
import { clusterKeys, type ClusterRunRecord } from "./keys.ts";

/** Largest creation time the inverted order handles (year 2286). */
export const MAX_TIME = 9_999_999_999_999;

/** The sort key of a run in every index: newest first, then by id. */
export function runOrder(record: Pick<ClusterRunRecord, "createdAt" | "runId">): string {
  return `${String(MAX_TIME - record.createdAt).padStart(13, "0")}_${record.runId}`;
}

const enc = encodeURIComponent;

/** Index keys, in one place. */
export const indexKeys = {
  runs: "/index/runs/",
  pipeline: (name: string) => `/index/pipeline/${enc(name)}/`,
  label: (key: string, value: string) => `/index/label/${enc(key)}=${enc(value)}/`,
  status: (status: string) => `/index/status/${status}/`,
  bundle: (hex: string) => `/index/bundle/${hex}/`,
};

/** The index entries of a new run (written with its record). */
export function indexOps(record: ClusterRunRecord): TxnOp[] {
  const order = runOrder(record);
  const put = (prefix: string): TxnOp => ({
    type: "put",
    key: prefix + order,
    value: record.runId,
  });
  return [
    put(indexKeys.runs),
    put(indexKeys.pipeline(record.pipeline)),
    put(indexKeys.status(record.status)),
    ...Object.entries(record.labels ?? {}).map(([key, value]) => put(indexKeys.label(key, value))),
    ...(record.bundle ? [put(indexKeys.bundle(record.bundle.replace(/^sha256:/, "")))] : []),
  ];
}

/** Moves a run between status indexes (the scheduler, when its status changes). */
export function statusIndexOps(record: ClusterRunRecord, before: string): TxnOp[] {
  if (before === record.status) return [];
  const order = runOrder(record);
  return [
    { type: "delete", key: indexKeys.status(before) + order },
    { type: "put", key: indexKeys.status(record.status) + order, value: record.runId },
  ];
}

/** What `runnel runs` asks for. */
export interface RunQuery {
  labels?: Record<string, string>;
  status?: string;
  pipeline?: string;
  /** Runs per page (default 50, at most 1,000). */
  limit?: number;
  /** The `next` of the previous page. */
  after?: string;
}

/** A page of runs, newest first, and the cursor of the next one when there is more. */
export interface RunPage {
  runs: ClusterRunRecord[];
  next?: string;
}

/** Index entries read per round trip while filling a page. */
const SCAN_BATCH = 200;

/** Runs matching `query`, a page at a time, from the most selective index. */
export async function searchRuns(store: Store, query: RunQuery): Promise<RunPage> {
  const limit = Math.min(Math.max(query.limit ?? 50, 1), 1_000);
  const labels = Object.entries(query.labels ?? {});
  // One index drives; the others are checked on the records read.
  const prefix = labels.length > 0
    ? indexKeys.label(labels[0][0], labels[0][1])
    : query.pipeline !== undefined
    ? indexKeys.pipeline(query.pipeline)
    : query.status !== undefined
    ? indexKeys.status(query.status)
    : indexKeys.runs;
  const matches = (run: ClusterRunRecord) =>
    (query.status === undefined || run.status === query.status) &&
    (query.pipeline === undefined || run.pipeline === query.pipeline) &&
    labels.every(([key, value]) => run.labels?.[key] === value);
  // Conditions the driving index does not already hold: without any, every
  // entry is a match, and a page reads exactly its own entries.
  const checked = labels.length + (query.pipeline !== undefined ? 1 : 0) +
    (query.status !== undefined ? 1 : 0);
  const batch = checked > 1 ? SCAN_BATCH : limit;
  const runs: ClusterRunRecord[] = [];
  let after = query.after === undefined ? undefined : prefix + query.after;
  for (;;) {
    const { items } = await store.list(prefix, {
      limit: batch,
      ...(after !== undefined ? { startAfter: after } : {}),
    });
    const records = await Promise.all(
      items.map(async (item) => await store.get(clusterKeys.run(item.value))),
    );
    for (const [i, item] of items.entries()) {
      after = item.key;
      const kv = records[i];
      if (!kv) continue;
      const run = JSON.parse(kv.value) as ClusterRunRecord;
      if (!matches(run)) continue;
      runs.push(run);
      if (runs.length === limit) return { runs, next: item.key.slice(prefix.length) };
    }
    if (items.length < batch) return { runs };
  }
}
