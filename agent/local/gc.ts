/**
 * Local mode's garbage collection (`runnel gc`).
 *
 * @module
 */

import { DEFAULT_RETENTION_MS } from "../../core/artifacts/store.ts";
import { isTerminalRunStatus } from "../../core/model.ts";
import { listRuns, openLocalState } from "./state.ts";

/** What {@link collectGarbage} removed (or would remove, in a dry run). */
export interface GcResult {
  recordsRemoved: number;
  blobsRemoved: number;
  bytesFreed: number;
  /** Runs whose scratch directories and logs were removed. */
  runsCleaned: number;
}

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
    return { ...artifacts, runsCleaned };
  } finally {
    await state.close();
  }
}
