/**
 * The run API of cluster mode over the store: what any server does when a
 * user submits, lists, shows, cancels or resumes a run. None of it needs the
 * scheduler: requests are keys the scheduler watches.
 *
 * @module
 */

import type { Plan, StepState } from "../../core/model.ts";
import type { Compare, Store, TxnOp } from "../../consensus/store.ts";
import { clusterKeys, type ClusterRunRecord, type WorkerRecord } from "./keys.ts";
import { indexOps } from "./run_index.ts";
import { newRunId } from "../local/mod.ts";
import { type BundleStorage, checkBundle, type PipelineBundle, putBundle } from "../bundle.ts";
import { isTerminalRunStatus } from "../../core/model.ts";
import { newTraceId } from "../trace/context.ts";

/** A run API request that cannot be honoured. */
export class RunRequestError extends Error {
  /** Stable error code: `run_not_found`, `run_finished`, `run_succeeded`, `plan_too_large`. */
  readonly code: string;

  /** Builds the error from its code and a full sentence. */
  constructor(code: string, message: string) {
    super(message);
    this.name = "RunRequestError";
    this.code = code;
  }
}

/**
 * The largest plan a run may store, as JSON. The plan is one value of the
 * store, and etcd refuses a request over 1.5 MiB (`--max-request-bytes`);
 * its record and the transaction's framing need the rest.
 */
export const MAX_PLAN_JSON_BYTES = 1024 * 1024;

/** Records a new run (its plan and a pending record); the scheduler starts it. */
export async function submitRun(
  store: Store,
  plan: Plan,
  options: {
    file?: string;
    now?: number;
    bundle?: PipelineBundle;
    /** Where the bundle is kept (default: the state store, within its budget). */
    bundles?: BundleStorage;
    /** Digest of a shipped directory already in the store (a rerun's). */
    bundleDigest?: string;
    /** The run this one reruns steps of. */
    rerunOf?: string;
    /** Labels added to the pipeline's (a submission's `--label`). */
    labels?: Record<string, string>;
    /** The registered pipeline and version it runs (`runnel trigger`, a schedule). */
    registered?: { name: string; version: number; tick?: number };
    /** Its id, when the caller decides it (a child run's, derived from its parent's attempt). */
    runId?: string;
    /** The run whose `pipeline:` step started this one. */
    parent?: ClusterRunRecord["parent"];
    /** The name of the token that asked for it (shown by the web UI). */
    submittedBy?: string;
    /**
     * Compares and writes made in the same transaction as the run (a
     * schedule's fence and its advanced state); the run is not created
     * when a compare fails (`run_conflict`).
     */
    also?: { compare: Compare[]; success: (runId: string) => TxnOp[] };
  } = {},
): Promise<ClusterRunRecord> {
  const planJson = JSON.stringify(plan);
  const planBytes = new TextEncoder().encode(planJson).length;
  if (planBytes > MAX_PLAN_JSON_BYTES) {
    const instances = Object.keys(plan.steps).length;
    throw new RunRequestError(
      "plan_too_large",
      `Expected a plan of at most ${MAX_PLAN_JSON_BYTES} bytes for a cluster run, got ${planBytes} ` +
        `(${instances} step instances): split the pipeline or shrink its matrices`,
    );
  }
  if (options.bundle) {
    checkBundle(options.bundle);
    await putBundle(store, options.bundle, options.bundles);
  }
  const now = options.now ?? Date.now();
  const record: ClusterRunRecord = {
    runId: options.runId ?? newRunId(now),
    pipeline: plan.name,
    file: options.file ?? plan.file,
    planDigest: plan.digest,
    status: "pending",
    createdAt: now,
    // As `RunEngine.start` counts rounds: the first is 1.
    round: 1,
    traceId: newTraceId(),
    ...(options.bundle
      ? { bundle: options.bundle.digest }
      : options.bundleDigest
      ? { bundle: options.bundleDigest }
      : {}),
    ...(options.rerunOf ? { rerunOf: options.rerunOf } : {}),
    ...(plan.labels || options.labels ? { labels: { ...plan.labels, ...options.labels } } : {}),
    ...(plan.runName ? { name: plan.runName } : {}),
    ...(plan.params ? { params: plan.params } : {}),
    ...(options.registered ? { registered: options.registered } : {}),
    ...(options.parent ? { parent: options.parent } : {}),
    ...(options.submittedBy ? { submittedBy: options.submittedBy } : {}),
  };
  // The plan first: the scheduler reads it when it sees the record.
  const result = await store.txn({
    compare: [
      { key: clusterKeys.run(record.runId), target: "create", op: "==", value: 0 },
      ...(options.also?.compare ?? []),
    ],
    success: [
      { type: "put", key: clusterKeys.plan(record.runId), value: planJson },
      { type: "put", key: clusterKeys.run(record.runId), value: JSON.stringify(record) },
      ...indexOps(record),
      ...(options.also?.success(record.runId) ?? []),
    ],
  });
  if (!result.succeeded) {
    throw options.also
      ? new RunRequestError(
        "run_conflict",
        `Run ${record.runId} was not created: its transaction lost a compare`,
      )
      : new RunRequestError("run_exists", `Run ${record.runId} exists`);
  }
  return record;
}

/** Every run, newest first. */
export async function listClusterRuns(store: Store): Promise<ClusterRunRecord[]> {
  const { items } = await store.list(clusterKeys.runPrefix);
  return items.map((kv) => JSON.parse(kv.value) as ClusterRunRecord)
    .sort((a, b) => b.createdAt - a.createdAt);
}

/** A run found by its id or a unique prefix of it. */
export async function getClusterRun(store: Store, idOrPrefix: string): Promise<ClusterRunRecord> {
  const exact = await store.get(clusterKeys.run(idOrPrefix));
  if (exact) return JSON.parse(exact.value);
  // Two tell a unique prefix from an ambiguous one: a short prefix must not read every run.
  const { items } = await store.list(clusterKeys.run(idOrPrefix), { limit: 2 });
  if (items.length === 1) return JSON.parse(items[0].value);
  if (items.length > 1) {
    throw new RunRequestError(
      "run_ambiguous",
      `Run id prefix "${idOrPrefix}" matches several runs`,
    );
  }
  throw new RunRequestError("run_not_found", `No run "${idOrPrefix}" on this cluster`);
}

/** The step states of a run, by step id. */
export async function clusterStepStates(
  store: Store,
  runId: string,
): Promise<Record<string, StepState>> {
  const { items } = await store.list(clusterKeys.stepPrefix(runId));
  const steps: Record<string, StepState> = {};
  for (const kv of items) {
    const step = JSON.parse(kv.value) as StepState;
    steps[step.id] = step;
  }
  return steps;
}

/** Asks the scheduler to cancel a run. */
export async function requestCancel(
  store: Store,
  runId: string,
): Promise<"requested" | "finished"> {
  const record = await getClusterRun(store, runId);
  if (isTerminalRunStatus(record.status)) return "finished";
  await store.put(clusterKeys.request(record.runId, "cancel"), JSON.stringify({ at: Date.now() }));
  return "requested";
}

/** Asks the scheduler to resume a failed or cancelled run. */
export async function requestResume(store: Store, runId: string): Promise<void> {
  const record = await getClusterRun(store, runId);
  if (record.status === "succeeded") {
    throw new RunRequestError("run_succeeded", `Run ${record.runId} already succeeded`);
  }
  await store.put(clusterKeys.request(record.runId, "resume"), JSON.stringify({ at: Date.now() }));
}

/** The registered workers (online ones: offline workers' keys expire with their lease). */
export async function listWorkers(store: Store): Promise<WorkerRecord[]> {
  const { items } = await store.list(clusterKeys.workerPrefix);
  return items.map((kv) => JSON.parse(kv.value) as WorkerRecord);
}

/** Resolves once the run is finished (or the signal aborts); returns its last record. */
export async function waitForClusterRun(
  store: Store,
  runId: string,
  signal?: AbortSignal,
): Promise<ClusterRunRecord> {
  const first = await store.get(clusterKeys.run(runId));
  if (!first) throw new RunRequestError("run_not_found", `No run "${runId}" on this cluster`);
  let record = JSON.parse(first.value) as ClusterRunRecord;
  if (isTerminalRunStatus(record.status)) return record;
  for await (
    const event of store.watch(clusterKeys.run(runId), {
      fromRevision: first.modRevision + 1,
      signal,
    })
  ) {
    if (event.type !== "put" || event.key !== clusterKeys.run(runId)) continue;
    record = JSON.parse(event.value!) as ClusterRunRecord;
    if (isTerminalRunStatus(record.status)) return record;
  }
  return record;
}
