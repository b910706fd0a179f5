/**
 * Local mode's garbage collection (`runnel gc`).
 *
 * @module
 */

import { DEFAULT_RETENTION_MS } from "../../core/artifacts/store.ts";
import { isTerminalRunStatus } from "../../core/model.ts";
import { listRuns, openLocalState } from "./state.ts";
import { openEmbeddedStore } from "../../consensus/embedded.ts";
import { CompactedError, type Store } from "../../consensus/store.ts";

/** What {@link collectGarbage} removed (or would remove, in a dry run). */
export interface GcResult {
  recordsRemoved: number;
  blobsRemoved: number;
  bytesFreed: number;
  /** Runs whose scratch directories and logs were removed. */
  runsCleaned: number;
  /** Store revisions of history dropped by compaction (0 in a dry run or on a full disk). */
  historyCompacted: number;
}

/**
 * Revisions of the store's history gc leaves: a `logs --follow` or a run in
 * another process watching from a little behind does not have to relist.
 */
export const LOCAL_HISTORY_WINDOW = 1_000;

/**
 * Removes what the retention period no longer keeps: artifacts of unpinned
 * runs older than it (then blobs nothing references), and the scratch
 * directories and logs of finished, unpinned runs older than it. Run
 * records stay, so `runnel runs` still lists them.
 */
export async function collectGarbage(
  options: { stateDir?: string; now?: number; retentionMs?: number; dryRun?: boolean } = {},
): Promise<GcResult> {
  const now = options.now ?? Date.now();
  const retentionMs = options.retentionMs ?? DEFAULT_RETENTION_MS;
  // The store is only read: gc is what frees a full disk.
  const state = await openLocalState(options.stateDir, { readOnly: true });
  try {
    const runs = await listRuns(state.store);
    const retentionOfRun = new Map(runs.map((run) => [run.runId, run.retention]));
    const artifacts = await state.artifacts.gc({
      now,
      retentionMs,
      dryRun: options.dryRun,
      // A pipeline (or step) that says how long its outputs live wins over --retention.
      retentionOf: (record) => {
        const retention = retentionOfRun.get(record.run);
        const name = record.step.split("[")[0];
        return retention?.steps?.[name] ?? retention?.run;
      },
    });
    let runsCleaned = 0;
    for (const run of runs) {
      const ended = run.finishedAt ?? run.createdAt;
      const own = run.retention?.run;
      const keep = own === "forever" ? Infinity : own ?? retentionMs;
      if (!isTerminalRunStatus(run.status) || now - ended <= keep) continue;
      if (await state.artifacts.isPinned(run.runId)) continue;
      const dirs = [`${state.paths.work}/${run.runId}`, `${state.paths.logs}/${run.runId}`];
      let present = false;
      for (const dir of dirs) {
        try {
          await Deno.stat(dir);
          present = true;
          if (!options.dryRun) await Deno.remove(dir, { recursive: true });
        } catch (error) {
          if (!(error instanceof Deno.errors.NotFound)) throw error;
        }
      }
      if (present) runsCleaned++;
    }
    const historyCompacted = options.dryRun ? 0 : await compactHistory(state.paths.db);
    return { ...artifacts, runsCleaned, historyCompacted };
  } finally {
    await state.close();
  }
}

/**
 * Drops the embedded store's history older than the window: every write
 * is kept there (with its value) for watches, so without compaction the
 * store grows with every step ever run. Returns the revisions dropped.
 */
async function compactHistory(db: string): Promise<number> {
  try {
    await Deno.stat(db);
  } catch {
    return 0; // no store yet
  }
  let store;
  try {
    store = openEmbeddedStore(db);
  } catch {
    return 0; // a full disk or a read-only directory: gc still did the rest
  }
  try {
    const target = (await store.revision()) - LOCAL_HISTORY_WINDOW;
    const before = await compactedRevision(store, target);
    if (target <= before) return 0;
    await store.compact(target);
    return target - before;
  } catch {
    return 0; // compacted meanwhile, or no room to write
  } finally {
    await store.close();
  }
}

/** The store's compaction revision: a compaction below it says where it is. */
async function compactedRevision(store: Store, atMost: number): Promise<number> {
  try {
    await store.compact(0);
  } catch (error) {
    if (error instanceof CompactedError) return Math.min(error.compactRevision, atMost);
  }
  return 0;
}
