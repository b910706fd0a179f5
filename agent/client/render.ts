/**
 * How the `runnel` command line prints runs: one renderer for a run of
 * local mode (`runnel show RUN`) and of a cluster (`runnel show RUN
 * --server URL`), so both read the same — steps in the order they ran,
 * their attempts, durations, where they ran, and the run's artifacts.
 *
 * @module
 */

import type { RunHeader } from "../../core/engine.ts";
import type { StepState } from "../../core/model.ts";

/** A run's record as both drivers keep it: the engine's header and the pipeline file. */
export interface RunSummaryRecord extends RunHeader {
  /** The pipeline file (absolute path locally, as submitted on a cluster). */
  file: string;
  /** The run's parameter values. */
  params?: Record<string, string | number | boolean>;
  /** The run this one reruns steps of (`runnel rerun`). */
  rerunOf?: string;
  parent?: { runId: string; stepId: string };
  /** Why it has not started (a full concurrency key). */
  waiting?: string;
  /** Its name (`run-name`) and labels. */
  name?: string;
  labels?: Record<string, string>;
  /** The registered pipeline version it runs (cluster, `runnel trigger`). */
  registered?: { name: string; version: number; tick?: number };
  /** Its OpenTelemetry trace id. */
  traceId?: string;
}

/** An artifact a run produced, as `runnel show` lists it. */
export interface ArtifactRow {
  step: string;
  name: string;
  size: number;
  /** `sha256:<hex>`. */
  digest: string;
}

/** Everything `runnel show` prints of a run. */
export interface RunView {
  run: RunSummaryRecord;
  steps: Record<string, StepState>;
  artifacts: ArtifactRow[];
  /** Whether gc keeps its artifacts (local mode); absent where pins do not exist. */
  pinned?: boolean;
}

/**
 * The text of `runnel show`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { renderRun } from "./render.ts";
 * const text = renderRun({
 *   run: { runId: "r1", pipeline: "demo", file: "p.yaml", status: "succeeded", createdAt: 0, round: 0 },
 *   steps: {},
 *   artifacts: [],
 * });
 * assert.match(text, /^run {7}r1$/m);
 * ```
 */
export function renderRun(view: RunView): string {
  const { run } = view;
  const lines = [
    `run       ${run.runId}${view.pinned ? " (pinned)" : ""}`,
    `pipeline  ${run.pipeline} (${run.file})${
      run.registered ? ` · registered version ${run.registered.version}` : ""
    }`,
    `status    ${run.status}`,
    `created   ${new Date(run.createdAt).toISOString()}`,
  ];
  if (run.startedAt && run.finishedAt) {
    lines.push(`duration  ${formatMs(run.finishedAt - run.startedAt)}`);
  }
  if (run.traceId) lines.push(`trace     ${run.traceId}`);
  if (run.rerunOf) lines.push(`rerun of ${run.rerunOf}`);
  if (run.parent) lines.push(`child of ${run.parent.runId} (step ${run.parent.stepId})`);
  if (run.waiting && run.status === "pending") lines.push(`waiting   ${run.waiting}`);
  if (run.name) lines.push(`name      ${run.name}`);
  const labels = Object.entries(run.labels ?? {});
  if (labels.length > 0) {
    lines.push(`labels    ${labels.map(([key, value]) => `${key}=${value}`).join(" ")}`);
  }
  const params = Object.entries(run.params ?? {});
  if (params.length > 0) {
    lines.push(
      `params    ${
        params.map(([name, value]) =>
          `${name}=${
            typeof value === "string" && /[\s"]|^$/.test(value) ? JSON.stringify(value) : value
          }`
        ).join(" ")
      }`,
    );
  }
  lines.push(
    "",
    table(["STEP", "STATUS", "ATTEMPTS", "DURATION", "WORKER", "DETAIL"], stepRows(view.steps)),
  );
  const published = orderSteps(view.steps).filter((step) => step.values);
  if (published.length > 0) {
    lines.push(
      "",
      table(
        ["STEP", "VALUES"],
        published.map((step) => [
          step.id,
          Object.entries(step.values!).map(([key, value]) =>
            `${key}=${value.length > 60 ? `${value.slice(0, 57)}...` : value}`
          ).join(" "),
        ]),
      ),
    );
  }
  if (view.artifacts.length) {
    // By the step that made them, in the steps' order, then by name.
    const position = new Map(orderSteps(view.steps).map((step, index) => [step.id, index]));
    const rank = (row: ArtifactRow) => position.get(row.step) ?? position.size;
    const artifacts = [...view.artifacts].sort((a, b) =>
      rank(a) - rank(b) || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0)
    );
    lines.push(
      "",
      table(
        ["ARTIFACT", "SIZE", "DIGEST"],
        artifacts.map((a) => [`${a.step}/${a.name}`, formatBytes(a.size), a.digest.slice(0, 19)]),
      ),
    );
  }
  return lines.join("\n");
}

/**
 * Steps in the order they ran, which is the DAG's: a step is scheduled only
 * after what it needs; steps that never ran come last, by id.
 */
export function orderSteps(steps: Record<string, StepState>): StepState[] {
  const started = (step: StepState) => step.attempts[0]?.scheduledAt ?? Number.MAX_SAFE_INTEGER;
  return Object.values(steps).sort((a, b) =>
    started(a) - started(b) || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0)
  );
}

/** A cluster's artifacts, from its steps' outputs (a cluster run lists no artifact store). */
export function artifactsOfSteps(steps: Record<string, StepState>): ArtifactRow[] {
  return Object.values(steps).flatMap((step) =>
    Object.values(step.outputs ?? {}).map((ref) => ({
      step: step.id,
      name: ref.name,
      size: ref.size,
      digest: ref.digest,
    }))
  );
}

/** A run's row in `runnel runs`. */
export interface RunListRow {
  runId: string;
  pipeline: string;
  status: string;
  createdAt: number;
  startedAt?: number;
  finishedAt?: number;
}

/** The text of `runnel runs`: newest first, as given. */
export function renderRunList(runs: RunListRow[]): string {
  return table(
    ["RUN", "PIPELINE", "STATUS", "CREATED", "DURATION"],
    runs.map((r) => [
      r.runId,
      r.pipeline,
      r.status,
      new Date(r.createdAt).toISOString().replace("T", " ").slice(0, 19),
      r.finishedAt && r.startedAt ? formatMs(r.finishedAt - r.startedAt) : "",
    ]),
  );
}

function stepRows(steps: Record<string, StepState>): string[][] {
  return orderSteps(steps).map((step) => {
    const last = step.attempts.at(-1);
    const duration = last?.startedAt && last.endedAt ? formatMs(last.endedAt - last.startedAt) : "";
    const result = last?.result;
    const usage = result?.usage;
    const detail = [
      step.cached ? "cached" : "",
      result && !result.ok ? `${result.errorClass}: ${result.message}` : "",
      step.reason && step.status !== "failed" ? step.reason : "",
      usage?.memoryPeakBytes ? `mem ${formatBytes(usage.memoryPeakBytes)}` : "",
      usage?.cpuMs ? `cpu ${formatMs(usage.cpuMs)}` : "",
    ].filter(Boolean).join(" · ");
    return [
      step.id,
      step.status,
      String(step.attempts.length),
      duration,
      last?.worker ?? "",
      detail,
    ];
  });
}

/** `850ms`, `12.5s`, `3m20s`. */
export function formatMs(ms: number): string {
  if (ms < 1000) return `${ms}ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)}s`;
  return `${Math.floor(ms / 60_000)}m${Math.round((ms % 60_000) / 1000)}s`;
}

/** `512 B`, `1.5 KiB`, `3.0 MiB`, `1.2 GiB`. */
export function formatBytes(bytes: number): string {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 ** 2) return `${(bytes / 1024).toFixed(1)} KiB`;
  if (bytes < 1024 ** 3) return `${(bytes / 1024 ** 2).toFixed(1)} MiB`;
  return `${(bytes / 1024 ** 3).toFixed(1)} GiB`;
}

/** Columns padded to their widest cell, two spaces apart; the last one is not padded. */
export function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (cells: string[]) =>
    cells.map((c, i) => i === cells.length - 1 ? c : c.padEnd(widths[i])).join("  ").trimEnd();
  return [line(header), ...rows.map(line)].join("\n");
}
