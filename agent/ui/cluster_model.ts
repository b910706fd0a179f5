/**
 * The UI's read model over a cluster's store: runs from the run indexes,
 * a run's plan and steps, live changes and logs from watches, workers from
 * their leased records and the agents' identities (an agent with an
 * identity and no live worker record is offline), the control plane from
 * the election and the store member's Raft status.
 *
 * @module
 */

import { withLastHeartbeats } from "../server/presence.ts";
import type { Store } from "../../consensus/store.ts";
import type { ArtifactStore } from "../../core/artifacts/store.ts";
import { isTerminalRunStatus, type Plan, type StepState } from "../../core/model.ts";
import { clusterKeys, type ClusterRunRecord } from "../server/keys.ts";
import type { RaftState } from "../server/metrics.ts";
import { searchRuns } from "../server/run_index.ts";
import {
  clusterStepStates,
  getClusterRun,
  listWorkers,
  requestCancel,
  RunRequestError,
} from "../server/runs.ts";
import { readArtifact } from "./_artifacts.ts";
import { Channel } from "./_channel.ts";
import {
  followRun,
  type LogChunk,
  type ReadModel,
  type RunChange,
  type RunSummary,
  stepViews,
  stepViewsOf,
  UiNotFoundError,
  type WorkerView,
} from "./model.ts";

/** What the cluster's read model needs from its server. */
export interface ClusterModelOptions {
  serverId: string;
  store: Store;
  /** Heartbeat interval of workers: one is late after 1.5 of them without one. */
  heartbeatMs: number;
  raftState(): Promise<RaftState>;
  schedulerLeader(): Promise<string | undefined>;
  /** The artifact store the agents upload to, when this server was told of it. */
  artifacts?: ArtifactStore;
}

/** The read model of a cluster. */
export function clusterReadModel(options: ClusterModelOptions): ReadModel {
  const { store } = options;
  return {
    mode: "cluster",
    actions: { cancel: true, resume: true, rerun: true },
    async listRuns(query) {
      const page = await searchRuns(store, {
        status: query.status,
        pipeline: query.pipeline,
        limit: query.limit,
        after: query.after,
      });
      return { runs: page.runs.map(summaryOf), ...(page.next ? { next: page.next } : {}) };
    },
    async getRun(runId) {
      const run = await found(getClusterRun(store, runId));
      const planKv = await store.get(clusterKeys.plan(run.runId));
      const steps = await clusterStepStates(store, run.runId);
      return {
        run: summaryOf(run),
        plan: planKv ? stepViews(JSON.parse(planKv.value) as Plan, steps) : stepViewsOf(steps),
        steps,
      };
    },
    watchRun(runId, signal) {
      const changes = new Channel<RunChange>();
      (async () => {
        const runKey = clusterKeys.run(runId);
        const current = await store.get(runKey);
        if (!current) throw new UiNotFoundError(`No run "${runId}" on this cluster`);
        const listed = await store.list(clusterKeys.stepPrefix(runId));
        const revision = Math.max(current.modRevision, listed.revision);
        // Everything as of now, then every change: a view that reconnects misses nothing.
        changes.push({ type: "run", run: summaryOf(JSON.parse(current.value)) });
        for (const kv of listed.items) {
          changes.push({ type: "step", step: JSON.parse(kv.value) as StepState });
        }
        if (isTerminalRunStatus((JSON.parse(current.value) as ClusterRunRecord).status)) return;
        await followRun(
          store,
          { run: runKey, steps: clusterKeys.stepPrefix(runId) },
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
        const prefix = clusterKeys.logs(runId, step, attempt);
        const listed = await store.list(prefix);
        for (const kv of listed.items) chunks.push({ step, attempt, text: kv.value });
        const runKv = await store.get(clusterKeys.run(runId));
        if (!follow || !runKv) return;
        if (isTerminalRunStatus((JSON.parse(runKv.value) as ClusterRunRecord).status)) return;
        const stop = new AbortController();
        const both = AbortSignal.any([signal, stop.signal]);
        const from = Math.max(listed.revision, runKv.modRevision) + 1;
        const ended = (async () => {
          for await (
            const event of store.watch(clusterKeys.run(runId), { fromRevision: from, signal: both })
          ) {
            if (event.type !== "put" || event.key !== clusterKeys.run(runId)) continue;
            if (isTerminalRunStatus((JSON.parse(event.value!) as ClusterRunRecord).status)) return;
          }
        })();
        const lines = (async () => {
          for await (const event of store.watch(prefix, { fromRevision: from, signal: both })) {
            if (event.type === "put") chunks.push({ step, attempt, text: event.value! });
          }
        })();
        await Promise.race([ended, lines]);
        // Batches written just before the end still arrive: drain briefly.
        await Promise.race([lines, new Promise((resolve) => setTimeout(resolve, 300))]);
        stop.abort();
      })().then(() => chunks.close(), (error) => chunks.close(signal.aborted ? undefined : error));
      return chunks;
    },
    async artifact(runId, step, name) {
      if (!options.artifacts) {
        throw new UiNotFoundError(
          "This server was not told where artifacts are (runnel server --artifacts DIR or " +
            "--s3-endpoint URL --s3-bucket B)",
        );
      }
      const run = await found(getClusterRun(store, runId));
      return await readArtifact(options.artifacts, { run: run.runId, step, name });
    },
    async workers() {
      const now = Date.now();
      const [live, identities, assignments, scheduler, raft] = await Promise.all([
        listWorkers(store).then((workers) => withLastHeartbeats(store, workers)),
        store.list("/agents/"),
        store.list(clusterKeys.assignmentPrefix()),
        options.schedulerLeader().catch(() => undefined),
        options.raftState().then(
          (state) => ({
            nodeId: state.node_id,
            state: state.state,
            leader: state.leader,
            term: state.term,
            commitIndex: state.commit_index,
          }),
          (error) => ({ error: error instanceof Error ? error.message : String(error) }),
        ),
      ]);
      const inUse = new Map<string, number>();
      for (const kv of assignments.items) {
        const agent = decodeURIComponent(kv.key.slice("/assign/".length).split("/")[0]);
        inUse.set(agent, (inUse.get(agent) ?? 0) + 1);
      }
      const workers: WorkerView[] = live.map((worker) => ({
        agentId: worker.agentId,
        // A worker's key outlives its last heartbeat by at most 3 intervals.
        status: now - worker.lastHeartbeat > options.heartbeatMs * 1.5 ? "late" : "online",
        labels: worker.labels,
        backends: worker.capabilities.filter((c) => c.available).map((c) => c.backend),
        slots: worker.slots,
        slotsInUse: inUse.get(worker.agentId) ?? 0,
        lastHeartbeat: worker.lastHeartbeat,
        server: worker.server,
        ...(worker.version ? { version: worker.version } : {}),
      }));
      const online = new Set(live.map((worker) => worker.agentId));
      for (const kv of identities.items) {
        if (!kv.key.endsWith("/identity")) continue;
        const agentId = decodeURIComponent(kv.key.slice("/agents/".length, -"/identity".length));
        if (online.has(agentId)) continue;
        // Known to the cluster, its lease gone: 3 heartbeats missed, or stopped.
        workers.push({
          agentId,
          status: "offline",
          labels: {},
          backends: [],
          slots: 0,
          slotsInUse: inUse.get(agentId) ?? 0,
        });
      }
      workers.sort((a, b) => a.agentId.localeCompare(b.agentId));
      return {
        workers,
        controlPlane: { server: options.serverId, scheduler: scheduler ?? null, raft },
      };
    },
    async cancel(runId) {
      return await found(requestCancel(store, runId));
    },
  };
}

/** A run record as the pages show it. */
function summaryOf(run: ClusterRunRecord): RunSummary {
  // The trace id is recorded by the tracing of runs, where it is enabled.
  const extra = run as ClusterRunRecord & { traceId?: string };
  return {
    runId: run.runId,
    pipeline: run.pipeline,
    status: run.status,
    createdAt: run.createdAt,
    ...(run.name ? { name: run.name } : {}),
    ...(run.startedAt ? { startedAt: run.startedAt } : {}),
    ...(run.finishedAt ? { finishedAt: run.finishedAt } : {}),
    ...(run.submittedBy
      ? { submitter: run.submittedBy }
      : run.registered?.tick !== undefined
      ? { submitter: "schedule" }
      : {}),
    ...(run.params ? { params: run.params } : {}),
    ...(run.labels ? { labels: run.labels } : {}),
    ...(run.waiting ? { waiting: run.waiting } : {}),
    ...(extra.traceId ? { traceId: extra.traceId } : {}),
    ...(run.rerunOf ? { rerunOf: run.rerunOf } : {}),
  };
}

/** A run lookup whose "no such run" is the UI's 404. */
async function found<T>(lookup: Promise<T>): Promise<T> {
  try {
    return await lookup;
  } catch (error) {
    if (error instanceof RunRequestError && error.code === "run_not_found") {
      throw new UiNotFoundError(error.message);
    }
    throw error;
  }
}
