/**
 * Schedules of registered pipelines: kept at `/schedules/<name>` (written
 * by `runnel apply`, suspended and resumed over the API) and fired by the
 * elected scheduler only.
 *
 * Exactly once per tick across failover: a run is created in the same
 * transaction that advances the schedule's next fire time, compared on the
 * election's fence and on the schedule's revision. A scheduler killed
 * before that transaction leaves the tick to its successor; one killed
 * after it has both the run and the advanced time written, so its
 * successor does not fire the tick again.
 *
 * @module
 */

import type { Compare, Store, TxnOp } from "../../consensus/store.ts";
import { nextFire, type ScheduleSpec, tickParams } from "../../core/schedule.ts";
import { abortableDelay } from "../../core/_async.ts";
import { isTerminalRunStatus, type Plan } from "../../core/model.ts";
import type { PipelineBundle } from "../bundle.ts";
import { clusterKeys, type ClusterRunRecord } from "./keys.ts";
import { requestCancel, submitRun } from "./runs.ts";

/** A schedule and where it stands. */
export interface ScheduleState extends ScheduleSpec {
  name: string;
  /** Suspended over the API (wins over the spec's `suspend` until the spec changes). */
  suspended: boolean;
  /** The next tick to fire (ms), absent when the expression has no more. */
  next?: number;
  /** The last tick it fired (or skipped) and the run it started. */
  last?: number;
  lastRun?: string;
  /** Runs it started, newest first, at most `historyLimit`. */
  runs: string[];
  /** Ticks skipped: past the starting deadline, or forbidden by a running run. */
  skipped: number;
  /** JSON of the spec it was made from: an apply of the same spec keeps the state. */
  specKey: string;
  /** Where it comes from: the pipeline's `schedule:` (re-applies change it) or the API's `set`. */
  origin?: "pipeline" | "api";
}

/** Key of a pipeline's schedule. */
export const scheduleKey = (name: string) => `/schedules/${name}`;
const SCHEDULE_PREFIX = "/schedules/";

/**
 * Writes (or removes) a registered pipeline's schedule after an apply: an
 * unchanged spec keeps its state (next tick, history, a suspension).
 */
export async function syncSchedule(
  store: Store,
  name: string,
  spec: ScheduleSpec | undefined,
  now: number,
  origin: "pipeline" | "api" = "pipeline",
): Promise<void> {
  const kv = await store.get(scheduleKey(name));
  const old = kv ? JSON.parse(kv.value) as ScheduleState : undefined;
  if (!spec) {
    // An apply without a schedule leaves one set over the API alone.
    if (old && (origin === "api" || old.origin !== "api")) await store.delete(scheduleKey(name));
    return;
  }
  // The pipeline's section does not override a schedule set over the API.
  if (origin === "pipeline" && old?.origin === "api") return;
  const specKey = JSON.stringify(spec);
  if (old?.specKey === specKey) return;
  const next = nextFire(spec, now);
  const state: ScheduleState = {
    ...spec,
    name,
    suspended: spec.suspend,
    ...(next !== undefined ? { next } : {}),
    ...(old?.last !== undefined ? { last: old.last } : {}),
    ...(old?.lastRun ? { lastRun: old.lastRun } : {}),
    runs: old?.runs ?? [],
    skipped: old?.skipped ?? 0,
    specKey,
    origin,
  };
  await store.put(scheduleKey(name), JSON.stringify(state));
}

/** Every schedule. */
export async function listSchedules(store: Store): Promise<ScheduleState[]> {
  const { items } = await store.list(SCHEDULE_PREFIX);
  return items.map((kv) => JSON.parse(kv.value) as ScheduleState)
    .sort((a, b) => a.name < b.name ? -1 : a.name > b.name ? 1 : 0);
}

/** Suspends or resumes a schedule; false when there is none. */
export async function setSuspended(
  store: Store,
  name: string,
  suspended: boolean,
  now: number,
): Promise<boolean> {
  for (;;) {
    const kv = await store.get(scheduleKey(name));
    if (!kv) return false;
    const state = JSON.parse(kv.value) as ScheduleState;
    // A resumed schedule starts from now: the ticks it slept through are not owed.
    const next = suspended ? state.next : nextFire(state, now);
    const updated = { ...state, suspended, ...(next !== undefined ? { next } : {}) };
    const written = await store.txn({
      compare: [{ key: kv.key, target: "mod", op: "==", value: kv.modRevision }],
      success: [{ type: "put", key: kv.key, value: JSON.stringify(updated) }],
    });
    if (written.succeeded) return true;
  }
}

/** What a fired tick starts: the plan of the pipeline's current version with the schedule's values. */
export interface ScheduledRun {
  plan: Plan;
  file: string;
  bundle?: PipelineBundle;
  version: number;
}

/** Something the firing loop did, for logs and tests. */
export type ScheduleEvent =
  | { type: "fired"; name: string; tick: number; runId: string }
  | { type: "skipped"; name: string; tick: number; reason: string }
  | { type: "replaced"; name: string; runId: string }
  | { type: "failed"; name: string; tick: number; error: string };

/** Options of {@link runSchedules}. */
export interface ScheduleLoopOptions {
  store: Store;
  /** The election's fence: writes of a deposed scheduler fail. */
  fence: Compare[];
  signal: AbortSignal;
  /** Plans a run of a registered pipeline's current version with these values. */
  plan: (name: string, params: Record<string, unknown>) => Promise<ScheduledRun>;
  now?: () => number;
  onEvent?: (event: ScheduleEvent) => void;
}

/** Longest sleep between two looks at the schedules (new ones, changed ones). */
const LOOK_EVERY_MS = 1_000;

/** A backfill of a schedule: one run per past tick, started as its concurrency policy allows. */
export interface Backfill {
  name: string;
  /** Ticks not started yet, oldest first. */
  ticks: number[];
  /** The run of the tick started last. */
  current?: string;
  /** Runs it started, oldest first. */
  started: string[];
  total: number;
  createdAt: number;
  createdBy?: string;
}

/** Key of a schedule's backfill. */
export const backfillKey = (name: string) => `/backfills/${name}`;
const BACKFILL_PREFIX = "/backfills/";

/** Records a backfill; false when one of the same schedule is still going. */
export async function startBackfill(store: Store, backfill: Backfill): Promise<boolean> {
  const written = await store.txn({
    compare: [{ key: backfillKey(backfill.name), target: "create", op: "==", value: 0 }],
    success: [{ type: "put", key: backfillKey(backfill.name), value: JSON.stringify(backfill) }],
  });
  return written.succeeded;
}

/** Every backfill still going. */
export async function listBackfills(store: Store): Promise<Backfill[]> {
  const { items } = await store.list(BACKFILL_PREFIX);
  return items.map((kv) => JSON.parse(kv.value) as Backfill);
}

/** Starts what each backfill may start now (all at once with `allow`, else one at a time). */
async function progressBackfills(options: ScheduleLoopOptions, at: number): Promise<void> {
  const { store } = options;
  for (const kv of (await store.list(BACKFILL_PREFIX)).items) {
    if (options.signal.aborted) return;
    let backfill = JSON.parse(kv.value) as Backfill;
    let revision = kv.modRevision;
    const scheduleKv = await store.get(scheduleKey(backfill.name));
    const guard = () => [
      ...options.fence,
      { key: kv.key, target: "mod" as const, op: "==" as const, value: revision },
    ];
    if (!scheduleKv) {
      // Its schedule is gone (the pipeline deleted): so is the backfill.
      await store.txn({ compare: guard(), success: [{ type: "delete", key: kv.key }] });
      continue;
    }
    const state = JSON.parse(scheduleKv.value) as ScheduleState;
    while (backfill.ticks.length > 0) {
      const running = backfill.current ? await runningRun(store, backfill.current) : undefined;
      if (running && state.concurrency !== "allow") break;
      const [tick, ...rest] = backfill.ticks;
      const planned = await planTick(options, state, tick);
      if (!planned) return;
      const next: Backfill = {
        ...backfill,
        ticks: rest,
        started: [...backfill.started],
      };
      const record = await submitRun(store, planned.plan, {
        file: planned.file,
        // Read back from where it is kept: already stored.
        bundleDigest: planned.bundle?.digest,
        registered: { name: state.name, version: planned.version, tick },
        now: at,
        also: {
          compare: guard(),
          success: (runId) => [{
            type: "put",
            key: kv.key,
            value: JSON.stringify({ ...next, current: runId, started: [...next.started, runId] }),
          }],
        },
      }).catch((error) => {
        if (error instanceof Error && error.name === "RunRequestError") return undefined;
        throw error;
      });
      if (!record) return; // another scheduler leads, or it changed: look again later
      options.onEvent?.({ type: "fired", name: state.name, tick, runId: record.runId });
      const fresh = await store.get(kv.key);
      if (!fresh) return;
      backfill = JSON.parse(fresh.value) as Backfill;
      revision = fresh.modRevision;
    }
    if (backfill.ticks.length === 0) {
      const running = backfill.current ? await runningRun(store, backfill.current) : undefined;
      if (!running) {
        await store.txn({ compare: guard(), success: [{ type: "delete", key: kv.key }] });
      }
    }
  }
}

/**
 * One look at every schedule: fires (or skips) each one due, and moves
 * backfills on. Returns when to look again (the earliest next tick, at
 * most {@link LOOK_EVERY_MS} on).
 */
export async function fireDue(options: ScheduleLoopOptions): Promise<number> {
  const now = options.now ?? Date.now;
  let wake = now() + LOOK_EVERY_MS;
  await progressBackfills(options, now());
  for (const kv of (await options.store.list(SCHEDULE_PREFIX)).items) {
    if (options.signal.aborted) break;
    const state = JSON.parse(kv.value) as ScheduleState;
    if (state.suspended || state.next === undefined) continue;
    if (state.next > now()) {
      wake = Math.min(wake, state.next);
      continue;
    }
    const next = await fire(options, state, kv.modRevision, now());
    if (next !== undefined) wake = Math.min(wake, next);
  }
  return wake;
}

/** Fires due schedules until `signal` aborts. */
export async function runSchedules(options: ScheduleLoopOptions): Promise<void> {
  const now = options.now ?? Date.now;
  while (!options.signal.aborted) {
    let wake = now() + LOOK_EVERY_MS;
    try {
      wake = await fireDue(options);
    } catch (error) {
      // The store failed (a leader change, say): look again shortly; the fence keeps it exact.
      options.onEvent?.({
        type: "failed",
        name: "*",
        tick: now(),
        error: error instanceof Error ? error.message : String(error),
      });
    }
    const delay = Math.max(0, wake - now());
    // Not a listener of its own: one added after an abort during fireDue would never run.
    await abortableDelay(delay, options.signal);
  }
}

/** Fires (or skips) the due tick of one schedule, in one fenced transaction. */
async function fire(
  options: ScheduleLoopOptions,
  state: ScheduleState,
  revision: number,
  at: number,
): Promise<number | undefined> {
  const { store } = options;
  const tick = state.next!;
  const following = nextFire(state, at);
  const advanced = (runId?: string, skipped = false): ScheduleState => {
    const next = following;
    const runs = runId ? [runId, ...state.runs].slice(0, state.historyLimit) : state.runs;
    const updated: ScheduleState = {
      ...state,
      last: tick,
      runs,
      skipped: state.skipped + (skipped ? 1 : 0),
      ...(runId ? { lastRun: runId } : {}),
    };
    if (next === undefined) delete updated.next;
    else updated.next = next;
    return updated;
  };
  const guard: Compare[] = [
    ...options.fence,
    { key: scheduleKey(state.name), target: "mod", op: "==", value: revision },
  ];
  const skip = async (reason: string) => {
    const written = await store.txn({
      compare: guard,
      success: [{
        type: "put",
        key: scheduleKey(state.name),
        value: JSON.stringify(advanced(undefined, true)),
      }],
    });
    if (written.succeeded) options.onEvent?.({ type: "skipped", name: state.name, tick, reason });
    return following;
  };
  if (state.startingDeadlineMs !== undefined && at - tick > state.startingDeadlineMs) {
    return await skip(`missed by ${at - tick} ms, past its starting deadline`);
  }
  const running = state.lastRun ? await runningRun(store, state.lastRun) : undefined;
  if (running && state.concurrency === "forbid") {
    return await skip(`its last run ${running.runId} is still ${running.status}`);
  }
  const planned = await planTick(options, state, tick);
  if (!planned) return await skip("its pipeline could not be planned");
  if (running && state.concurrency === "replace") {
    await requestCancel(store, running.runId).catch(() => {});
    options.onEvent?.({ type: "replaced", name: state.name, runId: running.runId });
  }
  const extra: TxnOp[] = [];
  const record = await submitRun(store, planned.plan, {
    file: planned.file,
    bundleDigest: planned.bundle?.digest,
    registered: { name: state.name, version: planned.version, tick },
    now: at,
    also: {
      compare: guard,
      success: (runId) => [
        ...extra,
        { type: "put", key: scheduleKey(state.name), value: JSON.stringify(advanced(runId)) },
      ],
    },
  }).catch((error) => {
    // Another scheduler leads, or the schedule changed under this one: not ours to fire.
    if (error instanceof Error && error.name === "RunRequestError") return undefined;
    throw error;
  });
  if (record) options.onEvent?.({ type: "fired", name: state.name, tick, runId: record.runId });
  return following;
}

/** The run a tick starts, or undefined (and a `failed` event) when it cannot be planned. */
async function planTick(
  options: ScheduleLoopOptions,
  state: ScheduleState,
  tick: number,
): Promise<ScheduledRun | undefined> {
  try {
    return await options.plan(state.name, tickParams(state, tick));
  } catch (error) {
    options.onEvent?.({
      type: "failed",
      name: state.name,
      tick,
      error: error instanceof Error ? error.message : String(error),
    });
    return undefined;
  }
}

async function runningRun(store: Store, runId: string): Promise<ClusterRunRecord | undefined> {
  const kv = await store.get(clusterKeys.run(runId));
  if (!kv) return undefined;
  const record = JSON.parse(kv.value) as ClusterRunRecord;
  return isTerminalRunStatus(record.status) ? undefined : record;
}
