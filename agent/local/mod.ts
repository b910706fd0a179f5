/**
 * Local mode: the embedded control plane and one agent in this process.
 * `runPipeline` runs a plan to its end, `resumeRun` finishes a failed,
 * cancelled or abandoned run, `cancelRun` stops one (its runner alive or
 * killed). The driver is `driver.ts`; attempts run through the lifecycle
 * both drivers share (`../attempt/mod.ts`).
 *
 * @module
 */

import { resolve } from "node:path";
import type { SmtpSettings } from "../effects.ts";
import { SPLIT_BACKEND } from "../../core/fanout.ts";
import { PIPELINE_BACKEND } from "../../core/schema.ts";
import { RunEngine } from "../../core/engine.ts";
import type { EngineEvent, Plan, StepState } from "../../core/model.ts";
import type { PipelineLimits } from "../../core/limits.ts";
import { isTerminalRunStatus } from "../../core/model.ts";
import { PipelineError } from "../../core/errors.ts";
import { loadPipeline } from "../../core/load.ts";
import { unresolvedParams } from "../../core/params.ts";
import { RerunError, selectRerun } from "../../core/rerun.ts";
import { type SecretSource, SecretStore } from "../../core/secrets.ts";
import {
  builtinPlugins,
  PluginHostPool,
  type PluginHostPoolOptions,
  type PluginSource,
  validateStepConfigs,
} from "../../backends/mod.ts";
import { AttemptLifecycle, type AttemptRecord } from "../attempt/mod.ts";
import type { AttemptPolicy } from "../attempt/policy.ts";
import { type ChildRequest, LocalDriver, type RunEvent, type RunSummary } from "./driver.ts";
import { newTraceId } from "../trace/context.ts";
import type { Tracer } from "../trace/exporter.ts";
import {
  assertNoLiveOwner,
  diskFullError,
  getRunRecord,
  isDiskFull,
  liveOwner,
  localKeys,
  LocalRunError,
  type LocalState,
  newRunId,
  openLocalState,
  persistRun,
  readRunState,
  readStepStates,
  type RunRecord,
} from "./state.ts";

export {
  DEFAULT_STATE_DIR,
  getRunRecord,
  listRuns,
  LocalRunError,
  type LocalState,
  logPath,
  newRunId,
  openLocalState,
  readStepStates,
  type RunRecord,
  type StatePaths,
  statePaths,
  waitForRunEnd,
} from "./state.ts";
export type { RunEvent, RunSummary } from "./driver.ts";
export {
  collectGarbage,
  type GcResult,
  type PipelineStorage,
  storageByPipeline,
  storageMetrics,
} from "./gc.ts";
export { deliverWebhook } from "../effects.ts";

/** Options of {@link runPipeline} and {@link resumeRun}. */
export interface LocalRunOptions {
  /** Where state, artifacts and logs live; default `.runnel`. */
  stateDir?: string;
  /**
   * Overrides the pipeline's `concurrency`. When neither says, steps beyond
   * {@link defaultConcurrency} wait for a free slot.
   */
  concurrency?: number;
  /** Called for every progress event, in order. */
  onEvent?: (event: RunEvent) => void;
  /** Aborting cancels the run: running steps are stopped, the run stays resumable. */
  signal?: AbortSignal;
  /**
   * The secrets the user declares as the operator (a `--secrets` file, the
   * `--config` file's `secrets:`): name → env var or file. The pipeline's
   * named references (`DB_PASSWORD: db-password`) resolve through them.
   */
  secrets?: Record<string, SecretSource>;
  /** Where env vars of secrets are read (the pipeline's `{ env }` and declared ones); default `Deno.env.get`. */
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
  /**
   * The run's parameter values: the plan's file is planned again with them
   * (a plan defined in code takes them from `definePipeline(…, { params })`).
   */
  params?: Record<string, unknown>;
  /** The SMTP server email alerts go through (`--smtp HOST:PORT --smtp-from ADDR`). */
  smtp?: SmtpSettings;
  /** Steps the run starts with already succeeded (a rerun's reused ones). */
  reuse?: Record<string, StepState>;
  /** The run a rerun reruns steps of. */
  rerunOf?: string;
  /** The run (and step) this one is the child of (`pipeline:` steps). */
  parent?: RunRecord["parent"];
  /** Labels of the run, added to the pipeline's (`--label`). */
  labels?: Record<string, string>;
  /** Backends' settings of the `--config` file (ssh host aliases), for the run's own pool. */
  settings?: Record<string, unknown>;
  /** Plugin host tuning (idle time, heartbeats) for the run's own pool. */
  hosts?: Pick<PluginHostPoolOptions, "idleMs" | "heartbeatMs" | "heartbeatTimeoutMs">;
  /** Receives plugin host diagnostics (a host's stderr, stray errors). */
  onDiagnostic?: (backend: string, text: string) => void;
  /** What the pipeline may ask of this host; default `localPolicy()`. */
  policy?: AttemptPolicy;
  /** Limits a resume loads the pipeline file again with (default: the defaults). */
  limits?: Partial<PipelineLimits>;
  /**
   * Where the run's spans are recorded (`openTracer`, `--otlp-endpoint`);
   * the caller shuts it down. Without one, steps still get `TRACEPARENT`.
   */
  tracer?: Tracer;
}

/** How long a stopped step may take to exit before it is killed. */
const CANCEL_GRACE_MS = 3_000;

/**
 * Bounds of the default concurrency. Each running step holds a process, its
 * pipes and a log file: 1,000 started at once exhausted the open files (889
 * failed), while a step that waits for a slot costs nothing.
 */
const MIN_DEFAULT_CONCURRENCY = 4;
const MAX_DEFAULT_CONCURRENCY = 64;

/**
 * Steps a local run starts at once when neither the pipeline's
 * `concurrency` nor `--concurrency` says: twice the CPUs (steps often wait
 * on I/O), at least 4 and at most 64.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { defaultConcurrency } from "./mod.ts";
 *
 * assert.equal(defaultConcurrency(2), 4);
 * assert.equal(defaultConcurrency(8), 16);
 * assert.equal(defaultConcurrency(128), 64);
 * ```
 */
export function defaultConcurrency(cpus: number = navigator.hardwareConcurrency): number {
  const doubled = Number.isFinite(cpus) && cpus > 0 ? 2 * Math.floor(cpus) : 0;
  return Math.min(MAX_DEFAULT_CONCURRENCY, Math.max(MIN_DEFAULT_CONCURRENCY, doubled));
}

/** The plan of the same file with the run's parameter values. */
async function withParams(plan: Plan, options: LocalRunOptions): Promise<Plan> {
  const file = `${plan.baseDir}/${basename(plan.file)}`;
  if (!(await isFile(file))) {
    throw new LocalRunError(
      "params_need_file",
      `Expected the file of pipeline "${plan.name}" to plan it with parameters; a pipeline ` +
        `defined in code takes them from definePipeline(pipeline, { params })`,
    );
  }
  const again = await loadPipeline(file, {
    backends: options.plugins?.map((plugin) => plugin.name),
    hostPaths: options.policy?.deno,
    limits: options.limits,
    params: options.params,
  });
  if (again.digest !== plan.digest) {
    throw new LocalRunError("pipeline_changed", `The file of pipeline "${plan.name}" changed`);
  }
  return again;
}

/**
 * Decides a waiting step's approval gate (`runnel approve RUN STEP
 * [--reject]`): the run's runner applies it at once, or when the run is
 * resumed if no runner is alive.
 */
export async function approveStep(
  runId: string,
  stepId: string,
  decision: { approved: boolean; by: string; reason?: string; stateDir?: string },
): Promise<"applied" | "on-resume"> {
  const state = await openLocalState(decision.stateDir);
  try {
    const record = await getRunRecord(state.store, runId);
    const steps = await readStepStates(state.store, record.runId);
    const step = steps[stepId] ??
      Object.values(steps).find((s) => s.id.startsWith(`${stepId}[`) && s.status === "waiting");
    if (!step || step.status !== "waiting") {
      throw new LocalRunError(
        "not_waiting",
        `Step "${stepId}" of run ${record.runId} is not waiting for approval` +
          (step ? ` (it is ${step.status})` : ""),
      );
    }
    await state.store.put(
      localKeys.approve(record.runId, step.id),
      JSON.stringify({
        approved: decision.approved,
        by: decision.by,
        ...(decision.reason ? { reason: decision.reason } : {}),
      }),
    );
    return (await liveOwner(state.store, record.runId)) ? "applied" : "on-resume";
  } finally {
    await state.close();
  }
}

/**
 * Reruns steps of a finished run as a new run (`runnel rerun RUN STEP…`):
 * the chosen steps (with `downstream`, their dependents too) run again,
 * every other step that succeeded is reused with its outputs by digest.
 * The pipeline must be the one the run ran (same source and parameters).
 */
export async function rerunRun(
  runId: string,
  steps: string[],
  options: LocalRunOptions & { downstream?: boolean } = {},
): Promise<RunSummary> {
  const now = options.now ?? Date.now;
  const state = await openLocalState(options.stateDir, { readOnly: true });
  let plan: Plan;
  let reused: Record<string, StepState>;
  let record: RunRecord;
  try {
    record = await getRunRecord(state.store, runId);
    if (!isTerminalRunStatus(record.status)) {
      throw new LocalRunError(
        "run_not_finished",
        `Run ${record.runId} is ${record.status}; rerun steps of a finished run`,
      );
    }
    plan = await planOf(state, record, options.plugins ?? record.plugins ?? [], options);
    if (plan.digest !== record.planDigest) {
      throw new LocalRunError(
        "pipeline_changed",
        `The pipeline of run ${record.runId} (${record.file}) changed since it ran: ` +
          `start a new run instead`,
      );
    }
    const old = await readRunState(state.store, record, plan);
    const digests = Object.values(old.steps).flatMap((step) =>
      Object.values(step.outputs ?? {}).map((ref) => ref.digest)
    );
    const present = new Set<string>();
    for (const digest of new Set(digests)) {
      if (await state.artifacts.hasBlob(digest)) present.add(digest);
    }
    reused = selectRerun(plan, old.steps, steps, {
      downstream: options.downstream ?? false,
      fromRun: record.runId,
      now: now(),
      usable: (digest) => present.has(digest),
    }).reused;
  } catch (error) {
    if (error instanceof RerunError) throw new LocalRunError("bad_rerun", error.message);
    throw error;
  } finally {
    await state.close();
  }
  return await runPipeline(plan, { ...options, reuse: reused, rerunOf: record.runId });
}

/** Runs a pipeline to its end in this process. */
export async function runPipeline(plan: Plan, options: LocalRunOptions = {}): Promise<RunSummary> {
  if (options.params !== undefined) plan = await withParams(plan, options);
  const unset = unresolvedParams(plan.steps);
  if (unset.length > 0) {
    throw new LocalRunError(
      "params_unset",
      `Expected values for the required parameters ${unset.map((n) => `"${n}"`).join(", ")} ` +
        `of ${plan.file}: plan it with loadPipeline(file, { params }) (--param on the command line)`,
    );
  }
  const now = options.now ?? Date.now;
  const state = await openLocalState(options.stateDir);
  try {
    const runId = newRunId(now());
    const effectivePlan = withConcurrency(plan, options.concurrency);
    // The stored plan keeps what was asked; this machine's default is for this runner alone.
    const runPlan = withDefaultConcurrency(effectivePlan);
    const engine = RunEngine.start(runPlan, { runId, now: now(), reuse: options.reuse });
    const record: RunRecord = {
      runId,
      pipeline: plan.name,
      file: `${plan.baseDir}/${basename(plan.file)}`,
      planDigest: plan.digest,
      status: "pending",
      createdAt: now(),
      round: engine.state.round,
      traceId: newTraceId(),
    };
    if (plan.params) record.params = plan.params;
    if (options.rerunOf) record.rerunOf = options.rerunOf;
    if (options.parent) record.parent = options.parent;
    if (plan.labels || options.labels) record.labels = { ...plan.labels, ...options.labels };
    if (plan.runName) record.name = plan.runName;
    if (plan.retention) record.retention = plan.retention;
    if (!(await isFile(record.file))) {
      // Defined in code: a resume takes the plan from the store.
      record.planStored = true;
      await state.store.put(localKeys.plan(runId), JSON.stringify(effectivePlan));
    }
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
      const driver = new LocalDriver(
        runPlan,
        engine,
        driverContext(state, record, pool, options),
      );
      return await driver.drive([{ type: "Start", now: now() }]);
    } finally {
      if (!options.pool) await pool.close();
    }
  } catch (error) {
    // The driver names the run once it is recorded; before that there is none to resume.
    throw sayDiskFull(state, error);
  } finally {
    await state.close();
  }
}

/** An error of a full disk as one that says so, naming the run it left resumable. */
function sayDiskFull(state: LocalState, error: unknown, runId?: string): unknown {
  if (error instanceof LocalRunError || !isDiskFull(error)) return error;
  return diskFullError(state.paths, error, runId);
}

/**
 * The local runner's agent id for a run: its backends label what they
 * start with it, so a resume finds exactly what this run left.
 */
export function localAgentId(runId: string): string {
  return `local-${runId}`;
}

/** A plugin host pool for a local run (built-in plus configured backends). */
export async function openPool(
  state: LocalState,
  options: Pick<LocalRunOptions, "plugins" | "onDiagnostic" | "hosts" | "settings"> & {
    agentId?: string;
  } = {},
): Promise<PluginHostPool> {
  await Deno.mkdir(state.paths.work, { recursive: true });
  const scratchRoot = await Deno.realPath(state.paths.work);
  return new PluginHostPool({
    plugins: [...builtinPlugins(), ...(options.plugins ?? [])],
    context: { scratchRoot, agentId: options.agentId ?? "local", settings: options.settings },
    entryDir: state.paths.hosts,
    onDiagnostic: options.onDiagnostic,
    ...options.hosts,
  });
}

/**
 * Finishes a failed, cancelled or abandoned run: steps that succeeded keep
 * their artifacts, the rest run again. The pipeline file is loaded afresh so
 * a fix made since the failure takes effect. What the dead runner left
 * running is recovered first: a backend that can re-attach (Docker)
 * re-attaches, every other leftover (a shell step's process group) is
 * reaped before its step runs again, so no step runs twice at once.
 */
export async function resumeRun(runId: string, options: LocalRunOptions = {}): Promise<RunSummary> {
  const now = options.now ?? Date.now;
  const state = await openLocalState(options.stateDir);
  let resumable: string | undefined;
  try {
    const record = await getRunRecord(state.store, runId);
    resumable = record.runId;
    if (record.status === "succeeded") {
      throw new LocalRunError("run_succeeded", `Run ${runId} already succeeded; nothing to resume`);
    }
    await assertNoLiveOwner(state.store, record.runId);
    const plugins = options.plugins ?? record.plugins ?? [];
    const plan = withDefaultConcurrency(withConcurrency(
      await planOf(state, record, plugins, {
        policy: options.policy,
        secrets: options.secrets,
        limits: options.limits,
      }),
      options.concurrency,
    ));
    const engine = new RunEngine(plan, await readRunState(state.store, record, plan));
    const pool = options.pool ?? await openPool(state, { ...options, plugins });
    try {
      const context = driverContext(state, record, pool, options);
      const running = engine.runningAttempts();
      const { reattached } = await recoverRun(context.lifecycle, plan, record.runId, {
        keep: running.map((a) => a.attemptId),
        onDiagnostic: options.onDiagnostic,
      });
      const back = new Set(reattached.map(({ record }) => record.attemptId));
      const events: EngineEvent[] = running
        .filter((a) => !back.has(a.attemptId))
        .map((a) => ({
          type: "AttemptLost",
          stepId: a.stepId,
          attemptId: a.attemptId,
          now: now(),
          reason: "the runner that started this attempt stopped before it ended",
        }));
      // A run recorded before it started (its runner stopped, or found the disk
      // full, right after the first write) starts now.
      events.push({ type: engine.state.status === "pending" ? "Start" : "Resume", now: now() });
      // A cancel request left over from the previous round must not cancel this one.
      await state.store.delete(localKeys.cancel(record.runId));
      return await new LocalDriver(plan, engine, context).drive(events, reattached);
    } finally {
      if (!options.pool) await pool.close();
    }
  } catch (error) {
    throw sayDiskFull(state, error, resumable);
  } finally {
    await state.close();
  }
}

/**
 * Asks a run to stop. If its runner is alive it is told through the store
 * and stops the running steps itself; if none is alive (it was killed), the
 * run is marked cancelled here and what its runner left running — process
 * groups and containers — is reaped.
 */
export async function cancelRun(
  runId: string,
  options: { stateDir?: string; now?: () => number; settings?: Record<string, unknown> } = {},
): Promise<"requested" | "cancelled" | "already-finished"> {
  const now = options.now ?? Date.now;
  // A finished run needs no write: say so even when the disk is full.
  const reader = await openLocalState(options.stateDir, { readOnly: true });
  try {
    if (isTerminalRunStatus((await getRunRecord(reader.store, runId)).status)) {
      return "already-finished";
    }
  } finally {
    await reader.close();
  }
  const state = await openLocalState(options.stateDir);
  try {
    const record = await getRunRecord(state.store, runId);
    if (isTerminalRunStatus(record.status)) return "already-finished";
    if (await liveOwner(state.store, record.runId)) {
      await state.store.put(localKeys.cancel(record.runId), JSON.stringify({ at: now() }));
      return "requested";
    }
    const plugins = record.plugins ?? [];
    const plan = await planOf(state, record, plugins).catch(() => undefined);
    const pool = await openPool(state, { plugins, settings: options.settings });
    try {
      const lifecycle = lifecycleOf(state, pool, record.runId);
      await recoverRun(lifecycle, plan, record.runId, { keep: [] });
      if (!plan) {
        await state.store.put(
          localKeys.run(record.runId),
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
      await persistRun(state.store, record, engine);
      return "cancelled";
    } finally {
      await pool.close();
    }
  } catch (error) {
    throw sayDiskFull(state, error);
  } finally {
    await state.close();
  }
}

/**
 * Recovers what a dead runner of `runId` left: its recorded attempts, and
 * whatever the plan's backends find labelled with the run's agent id.
 */
function recoverRun(
  lifecycle: AttemptLifecycle,
  plan: Plan | undefined,
  runId: string,
  options: { keep: string[]; onDiagnostic?: (backend: string, text: string) => void },
) {
  return lifecycle.records((record: AttemptRecord) => record.spec.runId === runId)
    .then((records) =>
      lifecycle.recover({
        agentId: localAgentId(runId),
        records,
        keep: options.keep,
        alsoAsk: plan
          ? [...new Set(Object.values(plan.steps).map((step) => step.backend))]
            .filter((backend) => backend !== SPLIT_BACKEND && backend !== PIPELINE_BACKEND)
          : [],
        onDiagnostic: options.onDiagnostic,
      })
    );
}

function lifecycleOf(
  state: LocalState,
  pool: PluginHostPool,
  runId: string,
  policy?: AttemptPolicy,
  tracer?: Tracer,
): AttemptLifecycle {
  return new AttemptLifecycle({
    policy,
    tracer,
    pool,
    artifacts: state.artifacts,
    recordsDir: state.paths.attempts,
    agentId: localAgentId(runId),
    cancelGraceMs: CANCEL_GRACE_MS,
  });
}

function driverContext(
  state: LocalState,
  record: RunRecord,
  pool: PluginHostPool,
  options: LocalRunOptions,
) {
  return {
    state,
    record,
    pool,
    lifecycle: lifecycleOf(state, pool, record.runId, options.policy, options.tracer),
    now: options.now ?? Date.now,
    onEvent: options.onEvent,
    signal: options.signal,
    env: options.env,
    secrets: new SecretStore(options.secrets, { env: options.env }),
    ...(options.smtp ? { smtp: options.smtp } : {}),
    runChild: (request: ChildRequest) => runChild(request, { ...options, pool }),
    ...(options.tracer ? { tracer: options.tracer } : {}),
  };
}

/**
 * Runs the child of a `pipeline:` step in this process, with the parent's
 * state directory, backends and policy: its file loaded (parameters
 * applied) and run to its end; aborting `signal` cancels it.
 */
async function runChild(request: ChildRequest, options: LocalRunOptions): Promise<RunSummary> {
  const { config } = request;
  if (config.file === undefined) {
    throw new LocalRunError(
      "registered_pipeline",
      `pipeline "${config.name}" is a registered pipeline, which only a cluster has; ` +
        "local mode runs a file (pipeline: { file: ./child.yaml })",
    );
  }
  const plan = await loadPipeline(resolve(request.baseDir, config.file), {
    params: config.params,
    backends: options.plugins?.map((plugin) => plugin.name),
  });
  return await runPipeline(plan, {
    ...options,
    params: undefined,
    reuse: undefined,
    rerunOf: undefined,
    labels: undefined,
    onEvent: request.onEvent,
    signal: request.signal,
    parent: request.parent,
  });
}

/**
 * The plan of a recorded run: its pipeline file loaded afresh (so that a
 * fix made since the failure takes effect), or the stored plan of a
 * pipeline defined in code.
 */
async function planOf(
  state: LocalState,
  record: RunRecord,
  plugins: Array<{ name: string }>,
  options: {
    policy?: AttemptPolicy;
    secrets?: Record<string, SecretSource>;
    limits?: Partial<PipelineLimits>;
  } = {},
): Promise<Plan> {
  if (record.planStored) {
    const kv = await state.store.get(localKeys.plan(record.runId));
    if (!kv) throw new LocalRunError("plan_missing", `Run ${record.runId} has no stored plan`);
    return JSON.parse(kv.value) as Plan;
  }
  return await loadPipeline(record.file, {
    backends: plugins.map((plugin) => plugin.name),
    hostPaths: options.policy?.deno,
    ...(options.secrets ? { secrets: { names: Object.keys(options.secrets) } } : {}),
    limits: options.limits,
    // The values it started with, whatever a resume is given.
    params: record.params ?? {},
  });
}

async function isFile(path: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isFile;
  } catch {
    return false;
  }
}

function withConcurrency(plan: Plan, concurrency: number | undefined): Plan {
  return concurrency === undefined ? plan : { ...plan, concurrency };
}

function withDefaultConcurrency(plan: Plan): Plan {
  return plan.concurrency === undefined ? { ...plan, concurrency: defaultConcurrency() } : plan;
}

function basename(path: string): string {
  return path.slice(path.lastIndexOf("/") + 1);
}
