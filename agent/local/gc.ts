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
      // An output, step or pipeline that says how long it lives wins over --retention.
      retentionOf: (record) => {
        const retention = retentionOfRun.get(record.run);
        const name = record.step.split("[")[0];
        return retention?.outputs?.[`${name}/${record.name}`] ?? retention?.steps?.[name] ??
          retention?.run;
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

/** Bytes and objects of the artifact store that belong to one pipeline's runs. */
export interface PipelineStorage {
  pipeline: string;
  /** Artifact records (outputs of steps) of its runs. */
  objects: number;
  /** Their bytes (a blob shared by two records counts twice). */
  bytes: number;
}

/**
 * What the artifact store holds, by pipeline (`runnel storage`): the
 * `runnel_artifact_bytes` and `runnel_artifact_objects` gauges.
 */
export async function storageByPipeline(
  options: { stateDir?: string } = {},
): Promise<PipelineStorage[]> {
  const state = await openLocalState(options.stateDir, { readOnly: true });
  try {
    const pipelineOf = new Map(
      (await listRuns(state.store)).map((run) => [run.runId, run.pipeline]),
    );
    const totals = new Map<string, PipelineStorage>();
    for (const record of await state.artifacts.list()) {
      const pipeline = pipelineOf.get(record.run) ?? "(unknown run)";
      const total = totals.get(pipeline) ?? { pipeline, objects: 0, bytes: 0 };
      total.objects += 1;
      total.bytes += record.size;
      totals.set(pipeline, total);
    }
    return [...totals.values()].sort((a, b) => a.pipeline.localeCompare(b.pipeline));
  } finally {
    await state.close();
  }
}

/** The storage gauges in Prometheus' text format (for a node_exporter textfile, say). */
export async function storageMetrics(usage: PipelineStorage[]): Promise<string> {
  // Loaded when asked for: `runnel run` (which loads this module) starts without it.
  const { default: client } = await import("npm:prom-client@15.1.3");
  const registry = new client.Registry();
  const bytes = new client.Gauge({
    name: "runnel_artifact_bytes",
    help: "Bytes of artifacts in the store, by pipeline.",
    labelNames: ["pipeline"],
    registers: [registry],
  });
  const objects = new client.Gauge({
    name: "runnel_artifact_objects",
    help: "Artifacts (step outputs) in the store, by pipeline.",
    labelNames: ["pipeline"],
    registers: [registry],
  });
  for (const row of usage) {
    bytes.set({ pipeline: row.pipeline }, row.bytes);
    objects.set({ pipeline: row.pipeline }, row.objects);
  }
  return await registry.metrics();
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
