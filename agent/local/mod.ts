/**
 * Local mode: the embedded control plane and one agent in this process.
 *
 * This is a driver of the pure engine in `core/engine.ts`, in the manner of
 * an etcd-io/raft application: feed it an event, persist the step states it
 * changed (one store transaction), then perform the effects it returned —
 * start an attempt on a backend, stop one, arm a timer, call a webhook.
 * Persisting before acting is what makes a SIGKILL at any instant safe: the
 * store never records less than what was acted upon, so `resume` can always
 * finish the run.
 *
 * @module
 */

import { RunEngine, type RunHeader, runStateOf, syncHeader } from "../../core/engine.ts";
import type {
  ArtifactRef,
  AttemptResult,
  Effect,
  EngineEvent,
  FailureInfo,
  Plan,
  PlannedStep,
  RunState,
  RunStatus,
  StepState,
  StepStatus,
  WebhookSpec,
} from "../../core/model.ts";
import { BUSINESS_EXIT_CODE } from "../../core/model.ts";
import type { Store, TxnOp } from "../../consensus/store.ts";
import { openEmbeddedStore } from "../../consensus/embedded.ts";
import type { ArtifactStore } from "../../core/artifacts/store.ts";
import { openLocalArtifactStore } from "../../core/artifacts/local.ts";
import { DEFAULT_RETENTION_MS } from "../../core/artifacts/store.ts";
import {
  builtinPlugins,
  PluginHostPool,
  type PluginHostPoolOptions,
  type PluginSource,
  type PoolMetrics,
  validateStepConfigs,
} from "../../backends/mod.ts";
import { PipelineError } from "../../core/errors.ts";
import type { AttemptSpec, Execution } from "../../backends/backend.ts";
import { Masker, resolveSecrets } from "../../core/secrets.ts";
import {
  collectOutputs,
  describeExit,
  errorClassOf,
  fileSafe,
  legName,
  maskedLogs,
  materializeInputs,
} from "../attempt/io.ts";
import type { InputLocator } from "../../core/model.ts";

export { fileSafe };
import { loadPipeline } from "../../core/load.ts";

/** The state directory used when none is given. */
export const DEFAULT_STATE_DIR = ".runnel";

/**
 * How long a run's owner lease lives without a keep-alive. A `resume` or a
 * `cancel` from another process treats a run without a live owner as
 * abandoned (its runner was killed).
 */
const OWNER_LEASE_TTL_MS = 6_000;
/** Keep-alive period: a third of the TTL, so two can be missed. */
const OWNER_KEEPALIVE_MS = OWNER_LEASE_TTL_MS / 3;
/** How long a stopped step may take to exit before it is killed. */
const CANCEL_GRACE_MS = 3_000;
/** Longest the run waits, after finishing, for on-failure webhooks still in flight. */
const WEBHOOK_DRAIN_MS = 15_000;

/** Something a user interface may show while a run goes on. */
export type RunEvent =
  | { type: "run"; runId: string; pipeline: string; status: RunStatus; at: number; steps: string[] }
  | {
    type: "step";
    runId: string;
    stepId: string;
    status: StepStatus;
    attempt: number;
    at: number;
    reason?: string;
    cached?: boolean;
  }
  | {
    type: "log";
    runId: string;
    stepId: string;
    attempt: number;
    stream: "stdout" | "stderr";
    text: string;
  }
  | { type: "webhook"; runId: string; stepId: string; ok: boolean; detail: string };

/** Options of {@link runPipeline} and {@link resumeRun}. */
export interface LocalRunOptions {
  /** Where state, artifacts and logs live; default `.runnel`. */
  stateDir?: string;
  /** Overrides the pipeline's `concurrency`. */
  concurrency?: number;
  /** Called for every progress event, in order. */
  onEvent?: (event: RunEvent) => void;
  /** Aborting cancels the run: running steps are stopped, the run stays resumable. */
  signal?: AbortSignal;
  /** Where secrets of kind `env` are read; default `Deno.env.get`. */
  env?: (name: string) => string | undefined;
  /** Clock, for tests. */
  now?: () => number;
  /** Third-party backends, besides the built-in ones. */
  plugins?: PluginSource[];
  /**
   * Plugin hosts to run steps in; by default the run starts its own pool and
   * stops it at the end. A pool passed here is shared (its hosts stay warm)
   * and must have the run's scratch root, `<stateDir>/work`, in its context.
   */
  pool?: PluginHostPool;
  /** Plugin host tuning (idle time, heartbeats) for the run's own pool. */
  hosts?: Pick<PluginHostPoolOptions, "idleMs" | "heartbeatMs" | "heartbeatTimeoutMs">;
  /** Receives plugin host diagnostics (a host's stderr, stray errors). */
  onDiagnostic?: (backend: string, text: string) => void;
}

/** What a finished (or cancelled) run amounts to. */
export interface RunSummary {
  runId: string;
  status: RunStatus;
  steps: Record<string, StepState>;
  /** Plugin host counters of the run's pool (cold starts, warm hits). */
  hosts?: PoolMetrics;
  startedAt: number;
  finishedAt: number;
}

/** The record of a run, as `runnel runs` and `runnel show` list it. */
export interface RunRecord extends RunHeader {
  /** Absolute path of the pipeline file. */
  file: string;
  planDigest: string;
  /** Third-party backends the run was started with; a resume loads them again. */
  plugins?: Array<{ name: string; module: string; manifestModule?: string }>;
}

/** Errors of local mode that a user can act on. */
export class LocalRunError extends Error {
  /** Stable code. */
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.name = "LocalRunError";
    this.code = code;
  }
}

/** Store keys, in one place. */
const keys = {
  run: (runId: string) => `/run/${runId}`,
  runPrefix: "/run/",
  step: (runId: string, stepId: string) => `/steps/${runId}/${stepId}`,
  stepPrefix: (runId: string) => `/steps/${runId}/`,
  owner: (runId: string) => `/owner/${runId}`,
  cancel: (runId: string) => `/cancel/${runId}`,
  cache: (key: string) => `/cache/${key}`,
};

/** Paths under the state directory. */
export interface StatePaths {
  root: string;
  db: string;
  artifacts: string;
  logs: string;
  work: string;
}

/** The layout of a state directory. */
export function statePaths(stateDir: string = DEFAULT_STATE_DIR): StatePaths {
  return {
    root: stateDir,
    db: `${stateDir}/state.db`,
    artifacts: `${stateDir}/artifacts`,
    logs: `${stateDir}/logs`,
    work: `${stateDir}/work`,
  };
}

/** Encodes a step id (which may hold `[`, `=`, `,`) for use as a file name. */

/** Path of the log file of one attempt. */
export function logPath(paths: StatePaths, runId: string, stepId: string, attempt: number): string {
  return `${paths.logs}/${runId}/${fileSafe(stepId)}.${attempt}.log`;
}

/** A new run id: sortable by creation time, unique enough for one machine. */
export function newRunId(now: number): string {
  const iso = new Date(now).toISOString(); // 2026-11-24T16:25:12.345Z
  const stamp = iso.slice(0, 19).replaceAll("-", "").replaceAll(":", "").replace("T", "-");
  const random = crypto.getRandomValues(new Uint8Array(3));
  return `${stamp}-${[...random].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
}

/** An open state directory: store and artifacts. Close it when done. */
export interface LocalState {
  paths: StatePaths;
  store: Store;
  artifacts: ArtifactStore;
  close(): Promise<void>;
}

/** Opens (creating if needed) the state directory. */
export async function openLocalState(stateDir: string = DEFAULT_STATE_DIR): Promise<LocalState> {
  const paths = statePaths(stateDir);
  await Deno.mkdir(paths.root, { recursive: true });
  const store = openEmbeddedStore(paths.db);
  const artifacts = openLocalArtifactStore(paths.artifacts);
  return { paths, store, artifacts, close: () => store.close() };
}

/** Runs a pipeline to its end in this process. */
export async function runPipeline(plan: Plan, options: LocalRunOptions = {}): Promise<RunSummary> {
  const now = options.now ?? Date.now;
  const state = await openLocalState(options.stateDir);
  try {
    const runId = newRunId(now());
    const effectivePlan = withConcurrency(plan, options.concurrency);
    const engine = RunEngine.start(effectivePlan, { runId, now: now() });
    const record: RunRecord = {
      runId,
      pipeline: plan.name,
      file: `${plan.baseDir}/${basename(plan.file)}`,
      planDigest: plan.digest,
      status: "pending",
      createdAt: now(),
      round: engine.state.round,
    };
    if (options.plugins?.length) {
      record.plugins = options.plugins.map(({ name, module, manifestModule }) => ({
        name,
        module,
        ...(manifestModule ? { manifestModule } : {}),
      }));
    }
    const pool = options.pool ?? await openPool(state, options);
    try {
      // A step config its backend rejects fails the file, not the step.
      const problems = await validateStepConfigs(effectivePlan, pool);
      if (problems.length > 0) throw new PipelineError(problems);
      const driver = new LocalDriver(effectivePlan, engine, state, record, options, pool);
      return await driver.drive([{ type: "Start", now: now() }]);
    } finally {
      if (!options.pool) await pool.close();
    }
  } finally {
    await state.close();
  }
}

/** The local runner's agent id for a run: its backends label what they start with it. */
export function localAgentId(runId: string): string {
  return `local-${runId}`;
}

/** A plugin host pool for a local run (built-in plus configured backends). */
export async function openPool(
  state: LocalState,
  options: Pick<LocalRunOptions, "plugins" | "onDiagnostic" | "hosts"> & { agentId?: string } = {},
): Promise<PluginHostPool> {
  const scratchRoot = await Deno.realPath(await mkdirp(state.paths.work));
  return new PluginHostPool({
    plugins: [...builtinPlugins(), ...(options.plugins ?? [])],
    context: { scratchRoot, agentId: options.agentId ?? "local" },
    entryDir: `${state.paths.root}/hosts`,
    onDiagnostic: options.onDiagnostic,
    ...options.hosts,
  });
}

/**
 * Finishes a failed, cancelled or abandoned run: steps that succeeded keep
 * their artifacts, the rest run again. The pipeline file is loaded afresh so
 * a fix made since the failure takes effect.
 */
export async function resumeRun(runId: string, options: LocalRunOptions = {}): Promise<RunSummary> {
  const now = options.now ?? Date.now;
  const state = await openLocalState(options.stateDir);
  try {
    const record = await getRunRecord(state.store, runId);
    if (record.status === "succeeded") {
      throw new LocalRunError("run_succeeded", `Run ${runId} already succeeded; nothing to resume`);
    }
    await assertNoLiveOwner(state.store, runId);
    const plugins = options.plugins ?? record.plugins ?? [];
    const plan = withConcurrency(
      await loadPipeline(record.file, { backends: plugins.map((plugin) => plugin.name) }),
      options.concurrency,
    );
    const runState = await readRunState(state.store, record, plan);
    const engine = new RunEngine(plan, runState);
    const pool = options.pool ?? await openPool(state, { ...options, plugins });
    try {
      // Attempts the dead runner left running: a backend that can find them
      // again (Docker, by label) re-attaches; the rest are lost and retried.
      const recovered = await recoverAttempts(pool, plan, engine, runId, options.onDiagnostic);
      const events: EngineEvent[] = engine.runningAttempts()
        .filter((a) => !recovered.has(a.attemptId))
        .map((a) => ({
          type: "AttemptLost",
          stepId: a.stepId,
          attemptId: a.attemptId,
          now: now(),
          reason: "the runner that started this attempt stopped before it ended",
        }));
      events.push({ type: "Resume", now: now() });
      // A cancel request left over from the previous round must not cancel this one.
      await state.store.delete(keys.cancel(runId));
      const driver = new LocalDriver(plan, engine, state, record, options, pool);
      return await driver.drive(events, recovered);
    } finally {
      if (!options.pool) await pool.close();
    }
  } finally {
    await state.close();
  }
}

/**
 * Asks every backend the run used to recover what the run's dead runner
 * left: running attempts it still wants come back re-attached, everything
 * else the run started is reaped. A backend that fails to answer recovers
 * nothing (its attempts are retried).
 */
async function recoverAttempts(
  pool: PluginHostPool,
  plan: Plan,
  engine: RunEngine,
  runId: string,
  onDiagnostic?: (backend: string, text: string) => void,
): Promise<Map<string, Execution>> {
  const running = engine.runningAttempts();
  const byBackend = new Map<string, string[]>();
  for (const step of Object.values(plan.steps)) {
    if (!pool.source(step.backend) || byBackend.has(step.backend)) continue;
    byBackend.set(step.backend, []);
  }
  for (const { stepId, attemptId } of running) {
    byBackend.get(plan.steps[stepId].backend)?.push(attemptId);
  }
  const recovered = new Map<string, Execution>();
  await Promise.all([...byBackend].map(async ([name, keep]) => {
    try {
      const found = await pool.backend(name).recover({ agentId: localAgentId(runId), keep });
      for (const { attemptId, execution } of found) {
        if (keep.includes(attemptId)) recovered.set(attemptId, execution);
        else await execution.cleanup().catch(() => {});
      }
    } catch (error) {
      onDiagnostic?.(name, `recover failed: ${error instanceof Error ? error.message : error}`);
    }
  }));
  return recovered;
}

/**
 * Asks a run to stop. If its runner is alive it is told through the store
 * and stops the running steps itself; if none is alive (it was killed), the
 * run is marked cancelled here.
 */
export async function cancelRun(
  runId: string,
  options: { stateDir?: string; now?: () => number } = {},
): Promise<"requested" | "cancelled" | "already-finished"> {
  const now = options.now ?? Date.now;
  const state = await openLocalState(options.stateDir);
  try {
    const record = await getRunRecord(state.store, runId);
    if (["succeeded", "failed", "cancelled"].includes(record.status)) return "already-finished";
    if (await liveOwner(state.store, runId)) {
      await state.store.put(keys.cancel(runId), JSON.stringify({ at: now() }));
      return "requested";
    }
    const plugins = record.plugins ?? [];
    const plan = await loadPipeline(record.file, {
      backends: plugins.map((plugin) => plugin.name),
    }).catch(() => undefined);
    if (!plan) {
      await state.store.put(
        keys.run(runId),
        JSON.stringify({ ...record, status: "cancelled", finishedAt: now() }),
      );
      return "cancelled";
    }
    const engine = new RunEngine(plan, await readRunState(state.store, record, plan));
    for (const a of engine.runningAttempts()) {
      engine.step({
        type: "AttemptLost",
        stepId: a.stepId,
        attemptId: a.attemptId,
        now: now(),
        reason: "runner gone",
      });
    }
    engine.step({ type: "Cancel", now: now(), reason: "cancelled by user" });
    await persist(state.store, record, engine);
    // What the dead runner left running (containers) is stopped and removed.
    const pool = await openPool(state, { plugins });
    try {
      await recoverAttempts(pool, plan, new RunEngine(plan, engine.state), runId);
    } finally {
      await pool.close();
    }
    return "cancelled";
  } finally {
    await state.close();
  }
}

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
  const state = await openLocalState(options.stateDir);
  try {
    const artifacts = await state.artifacts.gc({ now, retentionMs, dryRun: options.dryRun });
    let runsCleaned = 0;
    for (const run of await listRuns(state.store)) {
      const ended = run.finishedAt ?? run.createdAt;
      if (!isTerminalRun(run.status) || now - ended <= retentionMs) continue;
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

/** Lists runs, newest first. */
export async function listRuns(store: Store): Promise<RunRecord[]> {
  const { items } = await store.list(keys.runPrefix);
  return items.map((kv) => JSON.parse(kv.value) as RunRecord).sort((a, b) =>
    b.createdAt - a.createdAt
  );
}

/** Reads one run record, or throws a located "no such run" error. */
export async function getRunRecord(store: Store, runId: string): Promise<RunRecord> {
  const kv = await store.get(keys.run(runId));
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
  const { items } = await store.list(keys.stepPrefix(runId));
  const steps: Record<string, StepState> = {};
  for (const kv of items) {
    const step = JSON.parse(kv.value) as StepState;
    steps[step.id] = step;
  }
  return steps;
}

/** Watches a run's record until it is terminal; resolves with the final record. */
export async function waitForRunEnd(
  store: Store,
  runId: string,
  signal?: AbortSignal,
): Promise<RunRecord> {
  const record = await getRunRecord(store, runId);
  if (isTerminalRun(record.status)) return record;
  const { revision } = await store.list(keys.run(runId));
  for await (const event of store.watch(keys.run(runId), { fromRevision: revision + 1, signal })) {
    if (event.type === "put" && event.value) {
      const next = JSON.parse(event.value) as RunRecord;
      if (isTerminalRun(next.status)) return next;
    }
  }
  return await getRunRecord(store, runId);
}

/** True for a run status that will not change without a resume. */
export function isTerminalRun(status: RunStatus): boolean {
  return status === "succeeded" || status === "failed" || status === "cancelled";
}

function withConcurrency(plan: Plan, concurrency: number | undefined): Plan {
  return concurrency === undefined ? plan : { ...plan, concurrency };
}

function basename(path: string): string {
  return path.slice(path.lastIndexOf("/") + 1);
}

/**
 * The process executing a run, if one is alive. An owner recorded on this
 * machine whose process is gone (killed) is cleared at once instead of
 * waiting for its lease to lapse; the txn compares the revision so a new
 * owner is never removed.
 */
async function liveOwner(
  store: Store,
  runId: string,
): Promise<{ pid: number; host: string } | undefined> {
  const owner = await store.get(keys.owner(runId));
  if (!owner) return undefined;
  const found = JSON.parse(owner.value) as { pid: number; host: string };
  if (found.host === Deno.hostname() && !(await processAlive(found.pid))) {
    await store.txn({
      compare: [{ key: keys.owner(runId), target: "mod", op: "==", value: owner.modRevision }],
      success: [{ type: "delete", key: keys.owner(runId) }],
    });
    return undefined;
  }
  return found;
}

async function assertNoLiveOwner(store: Store, runId: string): Promise<void> {
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

async function readRunState(store: Store, record: RunRecord, plan: Plan): Promise<RunState> {
  return runStateOf(plan, record, await readStepStates(store, record.runId));
}

/** Writes the run record and the changed steps in one transaction. */
async function persist(store: Store, record: RunRecord, engine: RunEngine): Promise<void> {
  const state = engine.state;
  syncHeader(record, state);
  const ops: TxnOp[] = [{
    type: "put",
    key: keys.run(record.runId),
    value: JSON.stringify(record),
  }];
  for (const stepId of engine.drainChanged()) {
    ops.push({
      type: "put",
      key: keys.step(record.runId, stepId),
      value: JSON.stringify(state.steps[stepId]),
    });
  }
  await store.txn({ compare: [], success: ops });
}

/** One attempt in flight. */
interface ActiveAttempt {
  stepId: string;
  attemptId: string;
  execution?: Execution;
  stopped?: "cancel" | "timeout";
  done: Promise<void>;
}

class LocalDriver {
  readonly #plan: Plan;
  readonly #engine: RunEngine;
  readonly #state: LocalState;
  readonly #record: RunRecord;
  readonly #options: LocalRunOptions;
  readonly #pool: PluginHostPool;
  readonly #now: () => number;
  readonly #active = new Map<string, ActiveAttempt>();
  readonly #webhooks = new Set<Promise<void>>();
  #queue: Promise<void> = Promise.resolve();
  readonly #pending: Array<{ event: EngineEvent; ignoreFinish: boolean }> = [];
  #draining = false;
  #logDirReady?: Promise<string>;
  #workRoot?: Promise<string>;
  #timer?: ReturnType<typeof setTimeout>;
  #wakeAt = Infinity;
  #finished?: (status: RunStatus) => void;
  #failed?: (error: unknown) => void;

  constructor(
    plan: Plan,
    engine: RunEngine,
    state: LocalState,
    record: RunRecord,
    options: LocalRunOptions,
    pool: PluginHostPool,
  ) {
    this.#plan = plan;
    this.#engine = engine;
    this.#state = state;
    this.#record = record;
    this.#options = options;
    this.#pool = pool;
    this.#now = options.now ?? Date.now;
  }

  async drive(
    initial: EngineEvent[],
    recovered: Map<string, Execution> = new Map(),
  ): Promise<RunSummary> {
    const store = this.#state.store;
    const runId = this.#record.runId;
    const lease = await store.grantLease(OWNER_LEASE_TTL_MS);
    await store.put(
      keys.owner(runId),
      JSON.stringify({ pid: Deno.pid, host: Deno.hostname(), since: this.#now() }),
      { lease: lease.id },
    );
    const keepAlive = setInterval(() => {
      store.keepAlive(lease.id).catch(() => {});
    }, OWNER_KEEPALIVE_MS);
    const watchAbort = new AbortController();
    const finished = new Promise<RunStatus>((resolve, reject) => {
      this.#finished = resolve;
      this.#failed = reject;
    });
    const onAbort = () => this.#submit({ type: "Cancel", now: this.#now(), reason: "interrupted" });
    this.#options.signal?.addEventListener("abort", onAbort, { once: true });
    this.#watchCancelRequests(watchAbort.signal);
    try {
      await persist(store, this.#record, this.#engine);
      this.#emit({
        type: "run",
        runId,
        pipeline: this.#plan.name,
        status: "running",
        at: this.#now(),
        steps: this.#plan.order,
      });
      // Only the last initial event may finish the run: an AttemptLost
      // replayed before a Resume can end the run for a moment, and that
      // passing end is not the outcome.
      for (const [attemptId, execution] of recovered) this.#adopt(attemptId, execution);
      initial.forEach((event, i) => this.#submit(event, i < initial.length - 1));
      if (this.#options.signal?.aborted) onAbort();
      // A run resumed when every step is already terminal finishes at once.
      this.#submit({ type: "Tick", now: this.#now() });
      const status = await finished;
      await this.#queue;
      // Stopped steps: wait for their processes to be gone before returning.
      await Promise.allSettled([...this.#active.values()].map((a) => a.done));
      await this.#drainWebhooks();
      this.#emit({
        type: "run",
        runId,
        pipeline: this.#plan.name,
        status,
        at: this.#now(),
        steps: this.#plan.order,
      });
      return {
        runId,
        status,
        steps: structuredClone(this.#engine.state.steps),
        hosts: this.#pool.metrics(),
        startedAt: this.#engine.state.startedAt ?? this.#record.createdAt,
        finishedAt: this.#engine.state.finishedAt ?? this.#now(),
      };
    } finally {
      this.#options.signal?.removeEventListener("abort", onAbort);
      watchAbort.abort();
      clearInterval(keepAlive);
      clearTimeout(this.#timer);
      await store.revokeLease(lease.id).catch(() => {});
    }
  }

  /** Queues an event: events are applied one at a time, in order. */
  /**
   * Queues an event. Events are applied in order, and every event that
   * arrived while the last batch was being persisted is applied as one batch
   * with one store transaction (group commit): fewer fsyncs, same guarantee.
   */
  #submit(event: EngineEvent, ignoreFinish = false): void {
    this.#pending.push({ event, ignoreFinish });
    if (!this.#draining) this.#queue = this.#drain();
  }

  async #drain(): Promise<void> {
    this.#draining = true;
    try {
      while (this.#pending.length > 0) {
        const batch = this.#pending.splice(0);
        const effects: Effect[] = [];
        for (const { event, ignoreFinish } of batch) {
          for (const effect of this.#engine.step(event).effects) {
            // Replayed losses before a resume end the run (and may fail steps)
            // only for a moment: showing or announcing that would mislead.
            const passing = effect.type === "RunFinished" || effect.type === "StepStatus" ||
              effect.type === "Notify";
            if (ignoreFinish && passing) continue;
            effects.push(effect);
          }
        }
        // Persist before acting: the store never knows less than was done.
        await persist(this.#state.store, this.#record, this.#engine);
        for (const effect of effects) this.#perform(effect);
      }
    } catch (error) {
      this.#failed?.(error);
    } finally {
      this.#draining = false;
    }
  }

  /** Supervises an attempt a backend re-attached after a runner restart. */
  #adopt(attemptId: string, execution: Execution): void {
    const running = this.#engine.runningAttempts().find((a) => a.attemptId === attemptId);
    if (!running) {
      execution.cleanup().catch(() => {});
      return;
    }
    const active: ActiveAttempt = {
      stepId: running.stepId,
      attemptId,
      execution,
      done: Promise.resolve(),
    };
    this.#active.set(attemptId, active);
    const attempt = this.#engine.state.steps[running.stepId].attempts
      .find((record) => record.attemptId === attemptId)!.attempt;
    active.done = this.#runAttempt(active, attempt, execution).finally(() => {
      this.#active.delete(attemptId);
    });
  }

  #perform(effect: Effect): void {
    switch (effect.type) {
      case "StartAttempt": {
        const active: ActiveAttempt = {
          stepId: effect.stepId,
          attemptId: effect.attemptId,
          done: Promise.resolve(),
        };
        this.#active.set(effect.attemptId, active);
        active.done = this.#runAttempt(active, effect.attempt).finally(() => {
          this.#active.delete(effect.attemptId);
        });
        break;
      }
      case "StopAttempt": {
        const active = this.#active.get(effect.attemptId);
        if (active) {
          active.stopped = effect.reason;
          active.execution?.cancel(CANCEL_GRACE_MS).catch(() => {});
        }
        break;
      }
      case "WakeAt":
        this.#arm(effect.at);
        break;
      case "Notify":
        this.#notify(effect.webhook, effect.failure);
        break;
      case "StepStatus": {
        const step = this.#engine.state.steps[effect.stepId];
        this.#emit({
          type: "step",
          runId: this.#record.runId,
          stepId: effect.stepId,
          status: effect.status,
          attempt: effect.attempt,
          at: effect.at,
          reason: effect.reason,
          cached: step?.cached,
        });
        break;
      }
      case "RunFinished":
        this.#finished?.(effect.status);
        break;
    }
  }

  #arm(at: number): void {
    if (at >= this.#wakeAt) return;
    this.#wakeAt = at;
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => {
      this.#wakeAt = Infinity;
      this.#submit({ type: "Tick", now: this.#now() });
    }, Math.max(0, at - this.#now()));
  }

  #emit(event: RunEvent): void {
    this.#options.onEvent?.(event);
  }

  async #watchCancelRequests(signal: AbortSignal): Promise<void> {
    const store = this.#state.store;
    const key = keys.cancel(this.#record.runId);
    try {
      const revision = await store.revision();
      for await (const event of store.watch(key, { fromRevision: revision + 1, signal })) {
        if (event.type === "put") {
          this.#submit({ type: "Cancel", now: this.#now(), reason: "cancelled by user" });
        }
      }
    } catch (error) {
      if (!signal.aborted) this.#failed?.(error);
    }
  }

  /**
   * Runs one attempt end to end and reports what happened to the engine;
   * with `recovered`, supervises an execution a backend re-attached instead
   * of starting one.
   */
  async #runAttempt(active: ActiveAttempt, attempt: number, recovered?: Execution): Promise<void> {
    const step = this.#plan.steps[active.stepId];
    const report = (result: AttemptResult) =>
      this.#submit({
        type: "AttemptExited",
        stepId: step.id,
        attemptId: active.attemptId,
        now: this.#now(),
        result,
      });
    if (!recovered) {
      this.#submit({
        type: "AttemptStarted",
        stepId: step.id,
        attemptId: active.attemptId,
        now: this.#now(),
        worker: "local",
      });
    }
    let logFile: Deno.FsFile | undefined;
    let execution = recovered;
    let cleaned: Promise<void> | undefined;
    try {
      const paths = this.#state.paths;
      const workDir = `${await this.#runWorkDir()}/${fileSafe(step.id)}/${attempt}`;
      const inputsDir = `${workDir}/in`;
      const outputsDir = await mkdirp(`${workDir}/out`);
      let cacheKey: string | undefined;
      let spec: AttemptSpec | undefined;
      const secrets = resolveSecrets(this.#plan.secrets, step.secrets, {
        env: this.#options.env,
      });
      const masker = new Masker(Object.values(secrets));
      if (!execution) {
        const inputs = this.#inputArtifacts(step);
        cacheKey = step.cache ? await cacheKeyOf(step, inputs) : undefined;
        if (cacheKey && await this.#restoreFromCache(cacheKey, outputsDir)) {
          const outputs = await this.#collectOutputs(step, active.attemptId, outputsDir);
          report({ ok: true, exitCode: 0, outputs, cached: true });
          return await Deno.remove(workDir, { recursive: true }).catch(() => {});
        }
        const inputPaths = await this.#materializeInputs(step, inputs, inputsDir);
        spec = {
          agentId: localAgentId(this.#record.runId),
          scratchRoot: this.#pool.context.scratchRoot,
          runId: this.#record.runId,
          stepId: step.id,
          attemptId: active.attemptId,
          attempt,
          config: step.config,
          baseDir: this.#plan.baseDir,
          workDir,
          inputs: inputPaths,
          inputsDir,
          outputsDir,
          outputs: step.outputs,
          env: { ...this.#plan.env, ...step.env, ...secrets },
          matrix: step.matrix ?? {},
          timeoutMs: step.timeoutMs,
          resources: step.resources,
        };
      }
      this.#logDirReady ??= mkdirp(`${paths.logs}/${this.#record.runId}`);
      await this.#logDirReady;
      logFile = await Deno.open(logPath(paths, this.#record.runId, step.id, attempt), {
        create: true,
        append: true,
      });
      if (!execution) {
        if (active.stopped) return;
        execution = await this.#pool.backend(step.backend).start(spec!);
        active.execution = execution;
      }
      if (active.stopped) await execution.cancel(CANCEL_GRACE_MS);
      const logsDone = this.#pumpLogs(step, attempt, execution, masker, logFile);
      const exit = await execution.wait();
      await logsDone;
      // Released while the outputs are collected; the attempt ends after both.
      cleaned = execution.cleanup().catch(() => {});
      if (active.stopped) return; // the engine already recorded the outcome
      if (exit.exitCode !== 0 || exit.errorClass) {
        return report({
          ok: false,
          errorClass: exit.errorClass ??
            (exit.exitCode === BUSINESS_EXIT_CODE ? "business" : "application"),
          exitCode: exit.exitCode,
          message: masker.mask(exit.message ?? describeExit(exit.exitCode, exit.signal)),
          usage: exit.usage,
        });
      }
      const outputs = await this.#collectOutputs(step, active.attemptId, outputsDir);
      if (cacheKey) {
        const entry: CacheEntry = { runId: this.#record.runId, stepId: step.id, outputs };
        await this.#state.store.put(keys.cache(cacheKey), JSON.stringify(entry));
      }
      report({ ok: true, exitCode: 0, outputs, usage: exit.usage });
      // The outputs are in the artifact store now; a failed attempt's scratch
      // directory is kept for inspection until `runnel gc`.
      await Deno.remove(workDir, { recursive: true }).catch(() => {});
    } catch (error) {
      if (active.stopped) return;
      report({
        ok: false,
        errorClass: errorClassOf(error),
        message: error instanceof Error ? error.message : String(error),
      });
    } finally {
      logFile?.close();
      await cleaned;
    }
  }

  /** The run's scratch directory, absolute (backends need absolute paths). */
  #runWorkDir(): Promise<string> {
    this.#workRoot ??= mkdirp(`${this.#state.paths.work}/${this.#record.runId}`).then((dir) =>
      Deno.realPath(dir)
    );
    return this.#workRoot;
  }

  async #pumpLogs(
    step: PlannedStep,
    attempt: number,
    execution: Execution,
    masker: Masker,
    logFile: Deno.FsFile,
  ): Promise<void> {
    const encoder = new TextEncoder();
    for await (const { stream, text } of maskedLogs(execution.logs, masker)) {
      await logFile.write(encoder.encode(text));
      this.#emit({
        type: "log",
        runId: this.#record.runId,
        stepId: step.id,
        attempt,
        stream,
        text,
      });
    }
  }

  /** The artifacts each input reads, by input name, in leg order. */
  #inputArtifacts(step: PlannedStep): Record<string, Array<{ from: string; ref: ArtifactRef }>> {
    const result: Record<string, Array<{ from: string; ref: ArtifactRef }>> = {};
    for (const [name, input] of Object.entries(step.inputs)) {
      result[name] = input.from.map((from) => {
        const ref = this.#engine.state.steps[from]?.outputs?.[input.output];
        if (!ref) {
          throw new LocalRunError(
            "input_missing",
            `Input "${name}" of step "${step.id}" expects output "${input.output}" of step "${from}", which has none`,
          );
        }
        return { from, ref };
      });
    }
    return result;
  }

  #materializeInputs(
    step: PlannedStep,
    inputs: Record<string, Array<{ from: string; ref: ArtifactRef }>>,
    inputsDir: string,
  ): Promise<Record<string, string>> {
    const locators: Record<string, InputLocator> = {};
    for (const [name, sources] of Object.entries(inputs)) {
      const input = step.inputs[name];
      locators[name] = {
        fanIn: input.fanIn,
        artifacts: sources.map(({ from, ref }) => ({
          runId: this.#record.runId,
          stepId: from,
          name: input.output,
          digest: ref.digest,
          size: ref.size,
          leg: legName(this.#plan, from),
        })),
      };
    }
    return materializeInputs(this.#state.artifacts, locators, inputsDir);
  }

  #collectOutputs(
    step: PlannedStep,
    attemptId: string,
    outputsDir: string,
  ): Promise<Record<string, ArtifactRef>> {
    return collectOutputs(this.#state.artifacts, {
      runId: this.#record.runId,
      stepId: step.id,
      attemptId,
      outputsDir,
      outputs: step.outputs,
    });
  }

  /**
   * Copies a cached success's outputs (verified) into this attempt's output
   * directory. A cache entry whose artifacts were garbage-collected or fail
   * their integrity check is a miss, never an error.
   */
  async #restoreFromCache(cacheKey: string, outputsDir: string): Promise<boolean> {
    const kv = await this.#state.store.get(keys.cache(cacheKey));
    if (!kv) return false;
    const entry = JSON.parse(kv.value) as CacheEntry;
    try {
      for (const name of Object.keys(entry.outputs)) {
        const record = await this.#state.artifacts.get(entry.runId, entry.stepId, name);
        if (!record) return false;
        await this.#state.artifacts.materialize(record, `${outputsDir}/${name}`);
      }
      return true;
    } catch {
      return false;
    }
  }

  #notify(webhook: WebhookSpec, failure: FailureInfo): void {
    const delivery = deliverWebhook(webhook, failure).then(
      (detail) =>
        this.#emit({
          type: "webhook",
          runId: failure.runId,
          stepId: failure.stepId,
          ok: true,
          detail,
        }),
      (error) =>
        this.#emit({
          type: "webhook",
          runId: failure.runId,
          stepId: failure.stepId,
          ok: false,
          detail: error instanceof Error ? error.message : String(error),
        }),
    );
    this.#webhooks.add(delivery);
    delivery.finally(() => this.#webhooks.delete(delivery));
  }

  async #drainWebhooks(): Promise<void> {
    if (this.#webhooks.size === 0) return;
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([
      Promise.allSettled([...this.#webhooks]),
      new Promise((resolve) => timer = setTimeout(resolve, WEBHOOK_DRAIN_MS)),
    ]);
    clearTimeout(timer);
  }
}

/** What the cache remembers of a success: where its outputs are recorded. */
interface CacheEntry {
  runId: string;
  stepId: string;
  outputs: Record<string, ArtifactRef>;
}

/** A step ran but did not produce what it promised. */

/** The cache key: the step's spec digest and the digests of everything it reads. */
async function cacheKeyOf(
  step: PlannedStep,
  inputs: Record<string, Array<{ from: string; ref: ArtifactRef }>>,
): Promise<string> {
  const material = JSON.stringify([
    step.specDigest,
    Object.keys(inputs).sort().map((name) => [name, inputs[name].map((i) => i.ref.digest)]),
  ]);
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(material));
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

async function mkdirp(path: string): Promise<string> {
  await Deno.mkdir(path, { recursive: true });
  return path;
}

/**
 * POSTs the failure metadata to a webhook, retrying with exponential
 * backoff. Runs beside the run and never holds it up.
 */
export async function deliverWebhook(webhook: WebhookSpec, failure: FailureInfo): Promise<string> {
  let lastError = "";
  for (let attempt = 0; attempt <= webhook.retries; attempt++) {
    if (attempt > 0) {
      await new Promise((resolve) =>
        setTimeout(resolve, Math.min(webhook.backoffMs * 2 ** (attempt - 1), 30_000))
      );
    }
    try {
      const response = await fetch(webhook.url, {
        method: "POST",
        headers: { "content-type": "application/json", ...webhook.headers },
        body: JSON.stringify({ event: "step.failed", ...failure }),
        signal: AbortSignal.timeout(webhook.timeoutMs),
      });
      await response.body?.cancel();
      if (response.ok) return `delivered to ${webhook.url} (HTTP ${response.status})`;
      lastError = `HTTP ${response.status}`;
      // A 4xx other than 408/429 will not change on a retry.
      if (response.status < 500 && response.status !== 408 && response.status !== 429) break;
    } catch (error) {
      lastError = error instanceof Error ? error.message : String(error);
    }
  }
  throw new Error(`on-failure webhook ${webhook.url} failed: ${lastError}`);
}
