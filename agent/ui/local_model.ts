/**
 * The UI's read model over a local state directory (`.runnel/`): the runs
 * `runnel run` recorded, read only, with live changes from the embedded
 * store's watches (which see other processes' writes) and logs tailed from
 * their files. The one action is cancel, as `runnel cancel` does it.
 *
 * @module
 */

import { loadPipeline } from "../../core/load.ts";
import { isTerminalRunStatus, type Plan, type StepState } from "../../core/model.ts";
import { cancelRun } from "../local/mod.ts";
import {
  getRunRecord,
  listRuns,
  localKeys,
  LocalRunError,
  type LocalState,
  logPath,
  openLocalState,
  pathExists,
  readStepStates,
  type RunRecord,
  statePaths,
} from "../local/state.ts";
import { readArtifact } from "./_artifacts.ts";
import { Channel } from "./_channel.ts";
import {
  followRun,
  type LogChunk,
  type ReadModel,
  type RunChange,
  type RunSummary,
  type StepView,
  stepViews,
  stepViewsOf,
  UiNotFoundError,
} from "./model.ts";

/** How often a followed log file is read for new text (a file has no watch here). */
const LOG_POLL_MS = 250;

/** A read model over a state directory and the function that closes it. */
export interface LocalModel extends ReadModel {
  close(): Promise<void>;
}

/** The read model of the state directory `stateDir`. */
export function localReadModel(stateDir: string): LocalModel {
  let opened: LocalState | undefined;
  let onDisk = false;
  const plans = new Map<string, StepView[]>();
  // Opened on first use; opened again while the directory has no store yet (no run so far).
  const state = async (): Promise<LocalState> => {
    if (opened && (onDisk || !(await pathExists(statePaths(stateDir).db)))) return opened;
    await opened?.close();
    onDisk = await pathExists(statePaths(stateDir).db);
    opened = await openLocalState(stateDir, { readOnly: true });
    return opened;
  };
  const record = async (runId: string): Promise<RunRecord> => {
    try {
      return await getRunRecord((await state()).store, runId);
    } catch (error) {
      if (error instanceof LocalRunError) throw new UiNotFoundError(error.message);
      throw error;
    }
  };
  const planOf = async (run: RunRecord, steps: Record<string, StepState>) => {
    const cached = plans.get(`${run.runId}/${run.round}/${Object.keys(steps).length}`);
    if (cached) return cached;
    let views: StepView[];
    try {
      let plan: Plan;
      if (run.planStored) {
        const kv = await (await state()).store.get(localKeys.plan(run.runId));
        if (!kv) throw new Error("no stored plan");
        plan = JSON.parse(kv.value) as Plan;
      } else {
        plan = await loadPipeline(run.file, {
          backends: (run.plugins ?? []).map((plugin) => plugin.name),
          params: run.params ?? {},
        });
      }
      views = stepViews(plan, steps);
    } catch {
      // The file changed or went away since: the steps alone, without edges.
      views = stepViewsOf(steps);
    }
    plans.set(`${run.runId}/${run.round}/${Object.keys(steps).length}`, views);
    return views;
  };
  return {
    mode: "local",
    actions: { cancel: true, resume: false, rerun: false },
    async listRuns(query) {
      const all = (await listRuns((await state()).store)).filter((run) =>
        (query.status === undefined || run.status === query.status) &&
        (query.pipeline === undefined || run.pipeline === query.pipeline)
      );
      // Newest first: the cursor is the last run id shown.
      const start = query.after === undefined
        ? 0
        : all.findIndex((run) => run.runId === query.after) + 1;
      const runs = all.slice(start, start + query.limit);
      const more = start + query.limit < all.length;
      return { runs: runs.map(summaryOf), ...(more ? { next: runs.at(-1)!.runId } : {}) };
    },
    async getRun(runId) {
      const run = await record(runId);
      const steps = await readStepStates((await state()).store, run.runId);
      return { run: summaryOf(run), plan: await planOf(run, steps), steps };
    },
    watchRun(runId, signal) {
      const changes = new Channel<RunChange>();
      (async () => {
        const { store } = await state();
        const run = await record(runId);
        const listed = await store.list(localKeys.stepPrefix(run.runId));
        const current = await store.get(localKeys.run(run.runId));
        const revision = Math.max(listed.revision, current?.modRevision ?? 0);
        changes.push({ type: "run", run: summaryOf(run) });
        for (const kv of listed.items) {
          changes.push({ type: "step", step: JSON.parse(kv.value) as StepState });
        }
        if (isTerminalRunStatus(run.status)) return;
        await followRun(
          store,
          { run: localKeys.run(run.runId), steps: localKeys.stepPrefix(run.runId) },
          revision + 1,
          signal,
          (change) => changes.push(change),
          summaryOf,
        );
      })().then(
        () => changes.close(),
        (error) => changes.close(signal.aborted ? undefined : error),
      );
      return changes;
    },
    logs(runId, { step, attempt, follow, signal }) {
      const chunks = new Channel<LogChunk>();
      (async () => {
        const { paths, store } = await state();
        const path = logPath(paths, runId, step, attempt);
        let offset = 0;
        const readNew = async () => {
          let file: Deno.FsFile;
          try {
            file = await Deno.open(path, { read: true });
          } catch {
            return; // Not written yet.
          }
          try {
            await file.seek(offset, Deno.SeekMode.Start);
            const decoder = new TextDecoder();
            for await (const bytes of file.readable) {
              offset += bytes.byteLength;
              const text = decoder.decode(bytes, { stream: true });
              if (text) chunks.push({ step, attempt, text });
            }
          } catch {
            // The file went away (gc): what was read stays shown.
          }
        };
        await readNew();
        while (follow && !signal.aborted) {
          const kv = await store.get(localKeys.run(runId));
          const ended = !kv || isTerminalRunStatus((JSON.parse(kv.value) as RunRecord).status);
          await new Promise((resolve) => setTimeout(resolve, LOG_POLL_MS));
          await readNew();
          if (ended) break;
        }
      })().then(() => chunks.close(), (error) => chunks.close(signal.aborted ? undefined : error));
      return chunks;
    },
    async artifact(runId, step, name) {
      const run = await record(runId);
      return await readArtifact((await state()).artifacts, { run: run.runId, step, name });
    },
    workers() {
      // Local mode has no workers: this machine runs every step.
      return Promise.resolve({ workers: [] });
    },
    async cancel(runId) {
      const run = await record(runId);
      return await cancelRun(run.runId, { stateDir });
    },
    async close() {
      await opened?.close();
    },
  };
}

function summaryOf(run: RunRecord): RunSummary {
  return {
    runId: run.runId,
    pipeline: run.pipeline,
    status: run.status,
    createdAt: run.createdAt,
    submitter: "local",
    ...(run.name ? { name: run.name } : {}),
    ...(run.startedAt ? { startedAt: run.startedAt } : {}),
    ...(run.finishedAt ? { finishedAt: run.finishedAt } : {}),
    ...(run.params ? { params: run.params } : {}),
    ...(run.labels ? { labels: run.labels } : {}),
    ...(run.rerunOf ? { rerunOf: run.rerunOf } : {}),
    ...((run as RunRecord & { traceId?: string }).traceId
      ? { traceId: (run as RunRecord & { traceId?: string }).traceId }
      : {}),
  };
}
