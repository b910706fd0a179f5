/**
 * Local mode's state directory (`.runnel/`): its layout, the embedded store
 * and its keys, run records, and the owner lease that tells whether a run's
 * runner is still alive.
 *
 * @module
 */

import { type RunHeader, runStateOf, syncHeader } from "../../core/engine.ts";
import type { RunEngine } from "../../core/engine.ts";
import type { Plan, RunState, StepState } from "../../core/model.ts";
import { isTerminalRunStatus } from "../../core/model.ts";
import type { Store, TxnOp, TxnRequest } from "../../consensus/store.ts";
import { openEmbeddedStore, openMemoryStore } from "../../consensus/embedded.ts";
import type { ArtifactStore } from "../../core/artifacts/store.ts";
import { openLocalArtifactStore } from "../../core/artifacts/local.ts";
import { fileSafe } from "../../core/_paths.ts";
import { randomHex } from "../../core/_bytes.ts";

/** The state directory used when none is given. */
export const DEFAULT_STATE_DIR = ".runnel";

/**
 * How long a run's owner lease lives without a keep-alive. A `resume` or a
 * `cancel` from another process treats a run without a live owner as
 * abandoned (its runner was killed).
 */
export const OWNER_LEASE_TTL_MS = 6_000;

/** The record of a run, as `runnel runs` and `runnel show` list it. */
export interface RunRecord extends RunHeader {
  /** Absolute path of the pipeline file. */
  file: string;
  planDigest: string;
  /**
   * The plan is kept in the store (`/plan/<run>`) rather than read again
   * from `file`: a pipeline defined in code has no file.
   */
  planStored?: boolean;
  /** The run this one reruns steps of (`runnel rerun`). */
  rerunOf?: string;
  /** The run (and its `pipeline:` step) that started this one as its child. */
  parent?: { runId: string; stepId: string; attemptId: string };
  /** Its labels (the pipeline's and `--label`'s). */
  labels?: Record<string, string>;
  /** Its name (`run-name`). */
  name?: string;
  /** How long `gc` keeps its artifacts (the pipeline's and steps' `retention:`). */
  retention?: Plan["retention"];
  /** The run's parameter values; a resume plans the file again with them. */
  params?: Record<string, string | number | boolean>;
  /** Third-party backends the run was started with; a resume loads them again. */
  plugins?: Array<{ name: string; module: string; manifestModule?: string }>;
  /** The run's OpenTelemetry trace id (32 hex digits): its spans, and its steps' `TRACEPARENT`. */
  traceId?: string;
}

/** Errors of local mode that a user can act on. */
export class LocalRunError extends Error {
  /** Stable code. */
  readonly code: string;
  /** Builds the error from its code and a full sentence. */
  constructor(code: string, message: string) {
    super(message);
    this.name = "LocalRunError";
    this.code = code;
  }
}

/** Store keys, in one place. */
export const localKeys = {
  run: (runId: string) => `/run/${runId}`,
  runPrefix: "/run/",
  step: (runId: string, stepId: string) => `/steps/${runId}/${stepId}`,
  stepPrefix: (runId: string) => `/steps/${runId}/`,
  owner: (runId: string) => `/owner/${runId}`,
  cancel: (runId: string) => `/cancel/${runId}`,
  approve: (runId: string, stepId: string) => `/approve/${runId}/${encodeURIComponent(stepId)}`,
  approvePrefix: (runId: string) => `/approve/${runId}/`,
  cache: (key: string) => `/cache/${key}`,
  plan: (runId: string) => `/plan/${runId}`,
};

/** Paths under the state directory. */
export interface StatePaths {
  root: string;
  db: string;
  /** Space held back for the store: given up when the disk is full, so the run can be recorded. */
  reserve: string;
  artifacts: string;
  logs: string;
  work: string;
  /** One record per attempt in flight (backend and handle), for recovery. */
  attempts: string;
  /** Plugin host entry files. */
  hosts: string;
}

/** The layout of a state directory. */
export function statePaths(stateDir: string = DEFAULT_STATE_DIR): StatePaths {
  return {
    root: stateDir,
    db: `${stateDir}/state.db`,
    reserve: `${stateDir}/reserve`,
    artifacts: `${stateDir}/artifacts`,
    logs: `${stateDir}/logs`,
    work: `${stateDir}/work`,
    attempts: `${stateDir}/attempts`,
    hosts: `${stateDir}/hosts`,
  };
}

/** Path of the log file of one attempt. */
export function logPath(paths: StatePaths, runId: string, stepId: string, attempt: number): string {
  return `${paths.logs}/${runId}/${fileSafe(stepId)}.${attempt}.log`;
}

/** A new run id: sortable by creation time, unique enough for one machine. */
export function newRunId(now: number): string {
  const iso = new Date(now).toISOString(); // 2026-11-24T16:25:12.345Z
  const stamp = iso.slice(0, 19).replaceAll("-", "").replaceAll(":", "").replace("T", "-");
  return `${stamp}-${randomHex(3)}`;
}

/** An open state directory: store and artifacts. Close it when done. */
export interface LocalState {
  paths: StatePaths;
  store: Store;
  artifacts: ArtifactStore;
  close(): Promise<void>;
}

/**
 * Room the state directory keeps for its store: 1 MiB, 256 pages of the
 * WAL, a hundred or so transactions of a run's records. Given up when a
 * write finds the disk full, it lets the runner record the run as failed
 * instead of leaving it running; taken again by the next runner that finds
 * the space.
 */
export const RESERVE_BYTES = 1024 * 1024;

/** Options of {@link openLocalState}. */
export interface OpenStateOptions {
  /**
   * Only read (`runs`, `show`, `logs`): nothing is created, and a full disk
   * does not stop it. A directory without a store reads as empty.
   */
  readOnly?: boolean;
}

/** Opens (creating if needed) the state directory. */
export async function openLocalState(
  stateDir: string = DEFAULT_STATE_DIR,
  options: OpenStateOptions = {},
): Promise<LocalState> {
  const paths = statePaths(stateDir);
  let store: Store;
  if (options.readOnly) {
    store = await pathExists(paths.db)
      ? openEmbeddedStore(paths.db, { readOnly: true })
      : openMemoryStore();
  } else {
    try {
      await Deno.mkdir(paths.root, { recursive: true });
      store = openEmbeddedStore(paths.db);
    } catch (error) {
      throw isDiskFull(error) ? diskFullError(paths, error) : error;
    }
    await keepReserve(paths);
  }
  const artifacts = openLocalArtifactStore(paths.artifacts);
  return { paths, store, artifacts, close: () => store.close() };
}

/** Writes the reserve if it is missing; without the space, goes on without it. */
async function keepReserve(paths: StatePaths): Promise<void> {
  if (await pathExists(paths.reserve)) return;
  try {
    await Deno.writeFile(paths.reserve, new Uint8Array(RESERVE_BYTES));
  } catch {
    await Deno.remove(paths.reserve).catch(() => {});
  }
}

/**
 * Gives up the reserve (see {@link RESERVE_BYTES}); says whether there was
 * one to give.
 */
export async function releaseReserve(paths: StatePaths): Promise<boolean> {
  try {
    await Deno.remove(paths.reserve);
    return true;
  } catch {
    return false;
  }
}

/** Whether something is at `path` (a link counts, unfollowed). */
export async function pathExists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch {
    return false;
  }
}

/**
 * Whether an error says the disk is full: a write that found no space
 * (ENOSPC, a quota), or SQLite unable to grow its files on it.
 */
export function isDiskFull(error: unknown): boolean {
  const code = (error as { code?: unknown })?.code;
  const text = `${error instanceof Error ? error.message : String(error)} ${
    typeof code === "string" ? code : ""
  }`;
  return /no space left on device|os error (?:28|122)\b|\bENOSPC\b|\bEDQUOT\b|disk quota exceeded|database or disk is full|disk I\/O error/i
    .test(text);
}

/**
 * The error of a command that cannot write the state directory because its
 * disk is full; `runId` names a run left resumable.
 */
export function diskFullError(paths: StatePaths, error: unknown, runId?: string): LocalRunError {
  const detail = error instanceof Error ? error.message : String(error);
  const run = runId
    ? ` Run ${runId} stays resumable: free some space, then "runnel resume ${runId}".`
    : " Free some space, then try again.";
  return new LocalRunError(
    "disk_full",
    `Expected to write the state in ${paths.root}, but its disk is full (${detail}).${run} ` +
      `"runnel runs", "show", "logs" and "gc" (which frees what old runs left) still work.`,
  );
}

/** Lists runs, newest first. */
export async function listRuns(store: Store): Promise<RunRecord[]> {
  const { items } = await store.list(localKeys.runPrefix);
  return items.map((kv) => JSON.parse(kv.value) as RunRecord).sort((a, b) =>
    b.createdAt - a.createdAt
  );
}

/** Reads one run record, or throws a located "no such run" error. */
export async function getRunRecord(store: Store, runId: string): Promise<RunRecord> {
  const kv = await store.get(localKeys.run(runId));
  if (!kv) {
    const runs = await listRuns(store);
    const prefixed = runs.filter((r) => r.runId.startsWith(runId));
    if (prefixed.length === 1) return prefixed[0];
    const hint = prefixed.length > 1
      ? ` (${prefixed.length} runs start with "${runId}"; give more of the id)`
      : runs.length
      ? ` (latest is ${runs[0].runId}; see "runnel runs")`
      : " (no runs recorded yet)";
    throw new LocalRunError("run_not_found", `No run "${runId}"${hint}`);
  }
  return JSON.parse(kv.value) as RunRecord;
}

/** Reads the step states of a run. */
export async function readStepStates(
  store: Store,
  runId: string,
): Promise<Record<string, StepState>> {
  const { items } = await store.list(localKeys.stepPrefix(runId));
  const steps: Record<string, StepState> = {};
  for (const kv of items) {
    const step = JSON.parse(kv.value) as StepState;
    steps[step.id] = step;
  }
  return steps;
}

/** The engine state of a recorded run, for a resume or a cancel. */
export async function readRunState(
  store: Store,
  record: RunRecord,
  plan: Plan,
): Promise<RunState> {
  return runStateOf(plan, record, await readStepStates(store, record.runId));
}

/** Watches a run's record until it is terminal; resolves with the final record. */
export async function waitForRunEnd(
  store: Store,
  runId: string,
  signal?: AbortSignal,
): Promise<RunRecord> {
  const record = await getRunRecord(store, runId);
  if (isTerminalRunStatus(record.status)) return record;
  const { revision } = await store.list(localKeys.run(runId));
  for await (
    const event of store.watch(localKeys.run(runId), { fromRevision: revision + 1, signal })
  ) {
    if (event.type === "put" && event.value) {
      const next = JSON.parse(event.value) as RunRecord;
      if (isTerminalRunStatus(next.status)) return next;
    }
  }
  return await getRunRecord(store, runId);
}

/**
 * Writes the run record and the changed steps in one transaction; with
 * `all`, every step (after a failed write, whose changes were drained).
 */
export async function persistRun(
  store: Store,
  record: RunRecord,
  engine: RunEngine,
  options: { all?: boolean } = {},
): Promise<void> {
  await store.txn(runTxn(record, engine, options));
}

/**
 * As {@link persistRun}, but resolves once the write is ordered in a store
 * that says so (see `Store.txnOrdered`), with the promise of its
 * durability; in any other store once it is durable.
 */
export async function persistRunOrdered(
  store: Store,
  record: RunRecord,
  engine: RunEngine,
  options: { all?: boolean } = {},
): Promise<{ durable: Promise<void> }> {
  const request = runTxn(record, engine, options);
  if (store.txnOrdered) return { durable: (await store.txnOrdered(request)).durable };
  await store.txn(request);
  return { durable: Promise.resolve() };
}

function runTxn(record: RunRecord, engine: RunEngine, options: { all?: boolean }): TxnRequest {
  const state = engine.state;
  syncHeader(record, state);
  const ops: TxnOp[] = [{
    type: "put",
    key: localKeys.run(record.runId),
    value: JSON.stringify(record),
  }];
  const changed = engine.drainChanged();
  for (const stepId of options.all ? Object.keys(state.steps) : changed) {
    ops.push({
      type: "put",
      key: localKeys.step(record.runId, stepId),
      value: JSON.stringify(state.steps[stepId]),
    });
  }
  return { compare: [], success: ops };
}

/** Who executes a run, as its owner key records it. */
export interface RunOwner {
  pid: number;
  host: string;
  since: number;
}

/**
 * Takes ownership of a run under a lease kept alive until the returned
 * release is called.
 */
export async function claimRun(
  store: Store,
  runId: string,
  now: number,
): Promise<() => Promise<void>> {
  const lease = await store.grantLease(OWNER_LEASE_TTL_MS);
  const owner: RunOwner = { pid: Deno.pid, host: Deno.hostname(), since: now };
  await store.put(localKeys.owner(runId), JSON.stringify(owner), { lease: lease.id });
  // A third of the TTL, so that two keep-alives can be missed.
  const keepAlive = setInterval(() => {
    store.keepAlive(lease.id).catch(() => {});
  }, OWNER_LEASE_TTL_MS / 3);
  return async () => {
    clearInterval(keepAlive);
    await store.revokeLease(lease.id).catch(() => {});
  };
}

/**
 * The process executing a run, if one is alive. An owner recorded on this
 * machine whose process is gone (killed) is cleared at once instead of
 * waiting for its lease to lapse; the txn compares the revision so a new
 * owner is never removed.
 */
export async function liveOwner(store: Store, runId: string): Promise<RunOwner | undefined> {
  const owner = await store.get(localKeys.owner(runId));
  if (!owner) return undefined;
  const found = JSON.parse(owner.value) as RunOwner;
  if (found.host === Deno.hostname() && !(await processAlive(found.pid))) {
    await store.txn({
      compare: [{ key: localKeys.owner(runId), target: "mod", op: "==", value: owner.modRevision }],
      success: [{ type: "delete", key: localKeys.owner(runId) }],
    });
    return undefined;
  }
  return found;
}

/** Throws a `run_active` error when a live process executes the run. */
export async function assertNoLiveOwner(store: Store, runId: string): Promise<void> {
  const owner = await liveOwner(store, runId);
  if (owner) {
    throw new LocalRunError(
      "run_active",
      `Run ${runId} is still being executed by process ${owner.pid} on ${owner.host}; cancel it first with "runnel cancel ${runId}"`,
    );
  }
}

/**
 * Whether a local process is alive. Deno guards other processes' /proc
 * entries behind --allow-all, so ask `ps`; where it cannot answer, the
 * process counts as alive and the owner lease decides.
 */
async function processAlive(pid: number): Promise<boolean> {
  try {
    const output = await new Deno.Command("ps", {
      args: ["-p", String(pid), "-o", "stat="],
      stdout: "piped",
      stderr: "null",
    }).output();
    const state = new TextDecoder().decode(output.stdout).trim();
    // No line: no such process. "Z": exited, not yet reaped by its parent.
    if (state === "") return output.code !== 1;
    return !state.startsWith("Z");
  } catch {
    return true;
  }
}
