/**
 * The read model of the web UI: what its pages show, as one interface that
 * the cluster store (`cluster_model.ts`) and a local state directory
 * (`local_model.ts`) both implement, so the pages are one code.
 *
 * Everything here is a view: the fields a page shows, never a step's
 * config, env or secrets.
 *
 * @module
 */

import { expandPlan } from "../../core/fanout.ts";
import type { Plan, RunStatus, StepState } from "../../core/model.ts";
import { isTerminalRunStatus } from "../../core/model.ts";
import type { Store } from "../../consensus/store.ts";

/** A run as the runs page lists it. */
export interface RunSummary {
  runId: string;
  pipeline: string;
  /** Its `run-name`, when it has one. */
  name?: string;
  status: RunStatus;
  createdAt: number;
  startedAt?: number;
  finishedAt?: number;
  /** Who started it: a token's name, `schedule`, or `local`. */
  submitter?: string;
  params?: Record<string, string | number | boolean>;
  labels?: Record<string, string>;
  /** Why it has not started (a full concurrency key). */
  waiting?: string;
  /** The OpenTelemetry trace of the run, when one was recorded. */
  traceId?: string;
  rerunOf?: string;
}

/** A page of runs, newest first, and the cursor of the next page. */
export interface RunListPage {
  runs: RunSummary[];
  next?: string;
}

/** What the runs page asks for. */
export interface RunListQuery {
  status?: string;
  pipeline?: string;
  /** Runs per page (1 to 200). */
  limit: number;
  /** The `next` of the previous page. */
  after?: string;
}

/** A planned step instance as the run page needs it (no config, env or secrets). */
export interface StepView {
  id: string;
  /** The step's name (matrix legs share it). */
  name: string;
  backend: string;
  needs: string[];
  matrix?: Record<string, string | number | boolean>;
}

/** A run with its plan and step states. */
export interface RunDetail {
  run: RunSummary;
  /** Step instances in plan (DAG) order. */
  plan: StepView[];
  steps: Record<string, StepState>;
}

/** A change of a run, as the live view receives it. */
export type RunChange =
  | { type: "run"; run: RunSummary }
  | { type: "step"; step: StepState };

/** A batch of one attempt's (masked) log text. */
export interface LogChunk {
  step: string;
  attempt: number;
  text: string;
}

/** An artifact's bytes, verified against its digest before any is served. */
export interface ArtifactDownload {
  name: string;
  digest: string;
  size: number;
  body: ReadableStream<Uint8Array>;
}

/** A worker as the workers page shows it. */
export interface WorkerView {
  agentId: string;
  status: "online" | "late" | "offline";
  labels: Record<string, string>;
  /** Backends it can run (available ones). */
  backends: string[];
  slots: number;
  slotsInUse: number;
  lastHeartbeat?: number;
  server?: string;
  version?: string;
}

/** The control plane as the workers page shows it. */
export interface ControlPlaneView {
  /** The server answering this page. */
  server: string;
  /** The server that runs the scheduler, if one is elected. */
  scheduler: string | null;
  /** The Raft status of the store member this server talks to. */
  raft: { nodeId: string; state: string; leader: string; term: number; commitIndex: number } | {
    error: string;
  };
}

/** The workers page's content. */
export interface WorkersView {
  workers: WorkerView[];
  /** Absent in local mode. */
  controlPlane?: ControlPlaneView;
}

/** What a mode lets a role do from the pages. */
export interface Capabilities {
  cancel: boolean;
  resume: boolean;
  rerun: boolean;
}

/** The state the pages read, from a cluster or from a local state directory. */
export interface ReadModel {
  /** `cluster` or `local`: shown on the pages. */
  readonly mode: "cluster" | "local";
  /** The actions this mode offers (before roles). */
  readonly actions: Capabilities;
  /** A page of runs, newest first. */
  listRuns(query: RunListQuery): Promise<RunListPage>;
  /** A run, its plan and its step states; throws {@link UiNotFoundError} for no such run. */
  getRun(runId: string): Promise<RunDetail>;
  /** Changes of a run after `detail` was read, until it ends or `signal` aborts. */
  watchRun(runId: string, signal: AbortSignal): AsyncIterable<RunChange>;
  /** An attempt's log: what is recorded, then with `follow` new text until the run ends. */
  logs(
    runId: string,
    options: { step: string; attempt: number; follow: boolean; signal: AbortSignal },
  ): AsyncIterable<LogChunk>;
  /** An artifact a step produced; throws {@link UiNotFoundError} when there is none. */
  artifact(runId: string, step: string, name: string): Promise<ArtifactDownload>;
  /** The workers and the control plane. */
  workers(): Promise<WorkersView>;
  /** Asks for a run to be cancelled (only where `actions.cancel`). */
  cancel?(runId: string): Promise<string>;
}

/** Something a page asked for that does not exist (a 404). */
export class UiNotFoundError extends Error {
  /** Stable error code. */
  readonly code = "not_found";

  /** Builds the error from a full sentence. */
  constructor(message: string) {
    super(message);
    this.name = "UiNotFoundError";
  }
}

/** The step views of a plan, in its order. */
export function stepViews(plan: Plan, steps?: Record<string, StepState>): StepView[] {
  // The legs that split nodes made at run time (`batch:`, `foreach:`) are steps too.
  if (steps) expandPlan(plan, steps);
  return plan.order.map((id) => {
    const step = plan.steps[id];
    return {
      id,
      name: step.name,
      backend: step.backend,
      needs: step.needs,
      ...(step.matrix ? { matrix: step.matrix } : {}),
    };
  });
}

/** The step views of a run whose plan cannot be read: its steps alone, without edges. */
export function stepViewsOf(steps: Record<string, StepState>): StepView[] {
  return Object.keys(steps).sort().map((id) => ({
    id,
    name: id.replace(/\[.*$/, ""),
    backend: "?",
    needs: [],
  }));
}

/**
 * Follows a run's record and its steps in `store` from `fromRevision`
 * until the run ends (or `signal` aborts), pushing each change as the view
 * reads it; both read models (cluster and local) watch this way.
 */
export async function followRun<R extends { status: RunStatus }>(
  store: Store,
  keys: { run: string; steps: string },
  fromRevision: number,
  signal: AbortSignal,
  push: (change: RunChange) => void,
  summaryOf: (record: R) => RunSummary,
): Promise<void> {
  const stop = new AbortController();
  const both = AbortSignal.any([signal, stop.signal]);
  await Promise.race([
    (async () => {
      for await (const event of store.watch(keys.run, { fromRevision, signal: both })) {
        if (event.type !== "put" || event.key !== keys.run) continue;
        const record = JSON.parse(event.value!) as R;
        push({ type: "run", run: summaryOf(record) });
        if (isTerminalRunStatus(record.status)) return;
      }
    })(),
    (async () => {
      for await (const event of store.watch(keys.steps, { fromRevision, signal: both })) {
        if (event.type === "put") {
          push({ type: "step", step: JSON.parse(event.value!) as StepState });
        }
      }
    })(),
  ]).finally(() => stop.abort());
}
