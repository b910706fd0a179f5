/**
 * The local commands of the `runnel` CLI (`run`, `resume`, `show`, `logs`,
 * `gc`…): each calls the library (`mod.ts`) and prints. main.ts parses the
 * flags and calls these; the cluster commands are in `cli.ts`.
 *
 * @module
 */

import type { AttemptPolicy } from "../../agent/attempt/policy.ts";
import type { HostTuning } from "../../agent/config.ts";
import {
  approveStep,
  cancelRun,
  collectGarbage,
  getRunRecord,
  listRuns,
  logPath,
  openLocalState,
  readStepStates,
  rerunRun,
  resumeRun,
  runPipeline,
  type RunSummary,
  statePaths,
  storageByPipeline,
  storageMetrics,
  waitForRunEnd,
} from "../../agent/local/mod.ts";
import { createProgress } from "../../agent/local/progress.ts";
import {
  builtinPlugins,
  PluginHostPool,
  type PluginSource,
  validateStepConfigs,
} from "../../backends/mod.ts";
import { PipelineError } from "../../core/errors.ts";
import type { PipelineLimits } from "../../core/limits.ts";
import { loadPipeline } from "../../core/load.ts";
import { renderMermaid } from "../../core/mermaid.ts";
import { renderPlanText } from "../../core/plan.ts";
import { pipelineJsonSchema } from "../../core/schema.ts";
import type { SecretSource } from "../../core/secrets.ts";
import {
  EXIT_BAD_INPUT,
  EXIT_INTERRUPTED,
  hostPort,
  otlpFlag,
  UsageError,
  VERSION,
} from "./flags.ts";
import { isTerminalRunStatus } from "../../core/model.ts";
import { openTracer } from "../trace/exporter.ts";
import { LocalUiAddressError, serveLocalUi } from "../ui/mod.ts";
import { formatBytes, renderRun, renderRunList } from "./render.ts";

/** Options every command that reads a state directory takes. */
export interface StateOptions {
  /** Where runs, logs and artifacts live (default `.runnel`). */
  stateDir?: string;
  /** Print JSON instead of text. */
  json?: boolean;
}

/** Options of `runnel run` and `runnel resume`. */
export interface ExecuteOptions extends StateOptions {
  /** Print step log lines while running. */
  logs?: boolean;
  /** Override the pipeline's concurrency. */
  concurrency?: number;
  /** Third-party backends (`--plugin`, `--config`). */
  plugins: PluginSource[];
  /** Plugin host tuning (`--config`). */
  hosts?: HostTuning;
  /** Backends' settings of the `--config` file (ssh host aliases). */
  settings?: Record<string, unknown>;
  /** Labels of the run (`--label`). */
  labels?: Record<string, string>;
  /** The SMTP server of email alerts (`--smtp`). */
  smtp?: { host: string; port: number; from: string };
  /** What a pipeline may ask of this host: `localPolicy` with the `--config` file's `policy`. */
  policy?: AttemptPolicy;
  /** The secrets the user declares (`--secrets`, the `--config` file's `secrets:`). */
  secrets?: Record<string, SecretSource>;
  /** Limits on what the pipeline may expand to (`--limit`). */
  limits?: Partial<PipelineLimits>;
  /** Run parameters (`--param`, `--params-file`). */
  params?: Record<string, unknown>;
  /** `--otlp-endpoint URL`: the collector the run's spans go to (default: the OTLP env vars). */
  otlpEndpoint?: string;
}

/** Options of the commands that load a pipeline file without running it. */
export interface LoadCommandOptions {
  /** Third-party backends (`--plugin`, `--config`). */
  plugins: PluginSource[];
  /** Backends' settings of the `--config` file (ssh host aliases). */
  settings?: Record<string, unknown>;
  /** The policy whose host paths deno steps may name (`--config`). */
  policy?: AttemptPolicy;
  /** The secrets the user declares: a pipeline naming another is refused (`validate`). */
  secrets?: Record<string, SecretSource>;
  /** Limits on what the pipeline may expand to (`--limit`). */
  limits?: Partial<PipelineLimits>;
  /** Run parameters (`--param`, `--params-file`). */
  params?: Record<string, unknown>;
}

/** `runnel validate FILE`: every problem at once, or one line saying it is valid. */
export async function validateCommand(file: string, options: LoadCommandOptions): Promise<number> {
  const { plugins } = options;
  const plan = await loadPipeline(file, {
    backends: plugins.map((plugin) => plugin.name),
    hostPaths: options.policy?.deno,
    secrets: { names: Object.keys(options.secrets ?? {}) },
    limits: options.limits,
    params: options.params,
  });
  const pool = new PluginHostPool({
    plugins: [...builtinPlugins(), ...plugins],
    context: { scratchRoot: Deno.cwd(), agentId: "validate", settings: options.settings },
  });
  try {
    const problems = await validateStepConfigs(plan, pool);
    if (problems.length > 0) throw new PipelineError(problems);
  } finally {
    await pool.close();
  }
  return print(
    `${plan.file}: valid · pipeline "${plan.name}" · ${plan.order.length} step instances`,
  );
}

/** `runnel plan FILE [--mermaid]`. */
export async function planCommand(
  file: string,
  options: LoadCommandOptions & { mermaid?: boolean },
): Promise<number> {
  const plan = await loadPipeline(file, {
    backends: options.plugins.map((plugin) => plugin.name),
    hostPaths: options.policy?.deno,
    limits: options.limits,
    params: options.params,
  });
  return print(options.mermaid ? renderMermaid(plan) : renderPlanText(plan));
}

/** `runnel schema`: the JSON Schema of pipeline files. */
export function schemaCommand(): number {
  return print(JSON.stringify(pipelineJsonSchema(), null, 2));
}

/** `runnel run FILE`. */
export async function runCommand(file: string, options: ExecuteOptions): Promise<number> {
  const plan = await loadPipeline(file, {
    backends: options.plugins.map((plugin) => plugin.name),
    hostPaths: options.policy?.deno,
    secrets: { names: Object.keys(options.secrets ?? {}) },
    limits: options.limits,
    params: options.params,
  });
  return await execute(
    (runOptions) =>
      runPipeline(plan, {
        ...runOptions,
        plugins: options.plugins,
        hosts: options.hosts,
        settings: options.settings,
        policy: options.policy,
        secrets: options.secrets,
        labels: options.labels,
        smtp: options.smtp,
      }),
    options,
  );
}

/** `runnel approve RUN STEP [--reject] [--reason R]`. */
export async function approveCommand(
  prefix: string,
  step: string | undefined,
  options: StateOptions & { reject?: boolean; reason?: string },
): Promise<number> {
  if (!step) throw new UsageError(`"runnel approve" needs a run id and a step`);
  const runId = await resolveRunId(prefix, options.stateDir);
  let by = "local user";
  try {
    by = Deno.env.get("USER") || by;
  } catch { /* not granted */ }
  const outcome = await approveStep(runId, step, {
    approved: !options.reject,
    by,
    reason: options.reason,
    stateDir: options.stateDir,
  });
  return print(
    `${options.reject ? "rejected" : "approved"} ${step} of run ${runId}` +
      (outcome === "on-resume" ? ` (its runner is gone: "runnel resume ${runId}" applies it)` : ""),
  );
}

/** `runnel rerun RUN STEP… [--downstream]`. */
export async function rerunCommand(
  prefix: string,
  steps: string[],
  options: ExecuteOptions & { downstream?: boolean },
): Promise<number> {
  if (steps.length === 0) throw new UsageError(`"runnel rerun" needs a run id and step names`);
  const runId = await resolveRunId(prefix, options.stateDir);
  return await execute(
    (runOptions) =>
      rerunRun(runId, steps, {
        ...runOptions,
        plugins: options.plugins.length ? options.plugins : undefined,
        hosts: options.hosts,
        settings: options.settings,
        policy: options.policy,
        secrets: options.secrets,
        limits: options.limits,
        downstream: options.downstream,
      }),
    options,
  );
}

/** `runnel resume RUN`. */
export async function resumeCommand(prefix: string, options: ExecuteOptions): Promise<number> {
  const runId = await resolveRunId(prefix, options.stateDir);
  return await execute(
    (runOptions) =>
      resumeRun(runId, {
        ...runOptions,
        plugins: options.plugins.length ? options.plugins : undefined,
        hosts: options.hosts,
        settings: options.settings,
        policy: options.policy,
        secrets: options.secrets,
        limits: options.limits,
        smtp: options.smtp,
      }),
    options,
  );
}

/** `runnel cancel RUN`. */
export async function cancelCommand(
  prefix: string,
  options: StateOptions & { settings?: Record<string, unknown> },
): Promise<number> {
  const runId = await resolveRunId(prefix, options.stateDir);
  const outcome = await cancelRun(runId, {
    stateDir: options.stateDir,
    settings: options.settings,
  });
  return print(
    outcome === "requested"
      ? `cancel requested: the runner of ${runId} is stopping its steps`
      : outcome === "cancelled"
      ? `${runId} cancelled (its runner was gone); "runnel resume ${runId}" finishes it`
      : `${runId} has already finished`,
  );
}

/** `runnel runs`: newest first. */
export async function runsCommand(
  options: StateOptions & {
    labels?: Record<string, string>;
    status?: string;
    pipeline?: string;
    pageSize?: number;
  },
): Promise<number> {
  // Read-only: on a full disk the runs can still be seen.
  const state = await openLocalState(options.stateDir, { readOnly: true });
  try {
    const runs = (await listRuns(state.store)).filter((run) =>
      (options.status === undefined || run.status === options.status) &&
      (options.pipeline === undefined || run.pipeline === options.pipeline) &&
      Object.entries(options.labels ?? {}).every(([key, value]) => run.labels?.[key] === value)
    ).slice(0, options.pageSize);
    if (options.json) return print(JSON.stringify(runs, null, 2));
    if (runs.length === 0) return print('no runs yet; start one with "runnel run FILE"');
    return print(renderRunList(runs));
  } finally {
    await state.close();
  }
}

/** `runnel show RUN`: the same view as `runnel show RUN --server URL`. */
export async function showCommand(prefix: string, options: StateOptions): Promise<number> {
  const state = await openLocalState(options.stateDir, { readOnly: true });
  try {
    const record = await getRunRecord(state.store, prefix);
    const steps = await readStepStates(state.store, record.runId);
    const artifacts = await state.artifacts.list({ run: record.runId });
    const pinned = await state.artifacts.isPinned(record.runId);
    if (options.json) {
      return print(JSON.stringify({ ...record, pinned, steps, artifacts }, null, 2));
    }
    return print(renderRun({ run: record, steps, artifacts, pinned }));
  } finally {
    await state.close();
  }
}

/** `runnel logs RUN [STEP] [--follow]`. */
export async function logsCommand(
  prefix: string,
  options: { step?: string; stateDir?: string; follow?: boolean },
): Promise<number> {
  const { step: stepId, stateDir, follow } = options;
  const state = await openLocalState(stateDir, { readOnly: true });
  try {
    const record = await getRunRecord(state.store, prefix);
    const paths = statePaths(stateDir);
    const offsets = new Map<string, number>();
    const encoder = new TextEncoder();
    const dump = async () => {
      const steps = await readStepStates(state.store, record.runId);
      if (stepId && !steps[stepId]) {
        throw new UsageError(
          `run ${record.runId} has no step "${stepId}"; its steps are: ${
            Object.keys(steps).join(", ")
          }`,
        );
      }
      for (const step of Object.values(steps)) {
        if (stepId && step.id !== stepId) continue;
        for (const attempt of step.attempts) {
          const file = logPath(paths, record.runId, step.id, attempt.attempt);
          const offset = offsets.get(file) ?? 0;
          let data: Uint8Array;
          try {
            data = await Deno.readFile(file);
          } catch {
            continue;
          }
          if (data.length <= offset) continue;
          const prefixText = stepId ? "" : `${step.id}#${attempt.attempt} │ `;
          const text = new TextDecoder().decode(data.subarray(offset));
          const complete = follow ? text.slice(0, text.lastIndexOf("\n") + 1) : text;
          for (const line of complete.split("\n")) {
            if (line) Deno.stdout.writeSync(encoder.encode(prefixText + line + "\n"));
          }
          offsets.set(file, offset + encoder.encode(complete).length);
        }
      }
    };
    await dump();
    if (follow) {
      const done = waitForRunEnd(state.store, record.runId);
      let finished = false;
      done.then(() => finished = true, () => finished = true);
      while (!finished) {
        await new Promise((resolve) => setTimeout(resolve, 200));
        await dump();
      }
      await dump();
    }
    const final = await getRunRecord(state.store, record.runId);
    if (!isTerminalRunStatus(final.status) && !follow) {
      console.error(`(run ${final.runId} is ${final.status}; --follow streams until it ends)`);
    }
    return 0;
  } finally {
    await state.close();
  }
}

/** `runnel gc [--retention D] [--dry-run]`. */
export async function gcCommand(
  options: { stateDir?: string; retentionMs?: number; dryRun?: boolean },
): Promise<number> {
  const result = await collectGarbage(options);
  return print(
    `${
      options.dryRun ? "would remove" : "removed"
    } ${result.recordsRemoved} artifact records, ${result.blobsRemoved} blobs (${
      formatBytes(result.bytesFreed)
    }), scratch and logs of ${result.runsCleaned} runs${
      result.historyCompacted ? `; compacted ${result.historyCompacted} revisions of history` : ""
    }`,
  );
}

/** `runnel storage [--json | --prometheus]`: the artifact store's bytes and objects by pipeline. */
export async function storageCommand(
  options: { stateDir?: string; json?: boolean; prometheus?: boolean },
): Promise<number> {
  const usage = await storageByPipeline(options);
  if (options.prometheus) {
    await Deno.stdout.write(new TextEncoder().encode(await storageMetrics(usage)));
    return 0;
  }
  if (options.json) return print(JSON.stringify(usage, null, 2));
  const width = Math.max(8, ...usage.map((row) => row.pipeline.length));
  const lines = [`${"PIPELINE".padEnd(width)}  OBJECTS  BYTES`];
  for (const row of usage) {
    lines.push(
      `${row.pipeline.padEnd(width)}  ${String(row.objects).padStart(7)}  ${
        formatBytes(row.bytes)
      }`,
    );
  }
  return print(lines.join("\n"));
}

/** `runnel pin RUN` and `runnel unpin RUN`. */
export async function pinCommand(
  prefix: string,
  options: { pin: boolean; stateDir?: string },
): Promise<number> {
  const runId = await resolveRunId(prefix, options.stateDir);
  const state = await openLocalState(options.stateDir);
  try {
    await (options.pin ? state.artifacts.pin(runId) : state.artifacts.unpin(runId));
    return print(`${runId} ${options.pin ? "pinned" : "unpinned"}`);
  } finally {
    await state.close();
  }
}

/** `runnel backends`: which backends this host can run. */
export async function backendsCommand(
  plugins: PluginSource[],
  json?: boolean,
  settings?: Record<string, unknown>,
): Promise<number> {
  const pool = new PluginHostPool({
    plugins: [...builtinPlugins(), ...plugins],
    context: { scratchRoot: Deno.cwd(), agentId: "backends", settings },
  });
  try {
    const rows = await Promise.all(pool.names.map(async (name) => {
      const fingerprint = await pool.backend(name).fingerprint();
      const source = pool.source(name)!;
      return { name, ...fingerprint, source: source.manifest ? "built-in" : source.module };
    }));
    if (json) return print(rows.map((row) => JSON.stringify(row)).join("\n"));
    const width = Math.max(...rows.map((row) => row.name.length));
    return print(
      rows.map((row) =>
        `${row.name.padEnd(width)}  ${
          row.available ? "available  " : "unavailable"
        }  ${row.detail}${row.source === "built-in" ? "" : `  (${row.source})`}`
      ).join("\n"),
    );
  } finally {
    await pool.close();
  }
}

async function execute(
  start: (options: Parameters<typeof runPipeline>[1]) => Promise<RunSummary>,
  options: ExecuteOptions,
): Promise<number> {
  const progress = createProgress({
    tty: Deno.stdout.isTerminal() && !options.json,
    json: options.json,
    logs: options.logs,
    color: Deno.stdout.isTerminal() && !Deno.env.get("NO_COLOR"),
  });
  const endpoint = otlpFlag(options.otlpEndpoint);
  const tracer = endpoint
    ? openTracer({
      endpoint,
      resource: {
        "service.version": VERSION,
        "service.instance.id": "local",
        "runnel.role": "local",
      },
      onError: (message) => console.error(`warning: ${message}`),
    })
    : undefined;
  const interrupt = new AbortController();
  let interrupts = 0;
  const onSignal = () => {
    interrupts++;
    if (interrupts > 1) {
      // A second Ctrl-C while steps are stopping: leave now, resume later.
      Deno.exit(EXIT_INTERRUPTED);
    }
    interrupt.abort();
  };
  Deno.addSignalListener("SIGINT", onSignal);
  Deno.addSignalListener("SIGTERM", onSignal);
  try {
    const summary = await start({
      stateDir: options.stateDir,
      concurrency: options.concurrency,
      signal: interrupt.signal,
      tracer,
      onEvent: (event) => progress.onEvent(event),
      // A plugin's own console output (its host's stderr) is for debugging it.
      onDiagnostic: options.logs
        ? (backend, text) => console.error(`[backend ${backend}] ${text}`)
        : undefined,
    });
    progress.close();
    if (options.json && summary.hosts) {
      console.log(JSON.stringify({ type: "hosts", runId: summary.runId, ...summary.hosts }));
    }
    if (summary.status === "succeeded") return 0;
    if (summary.status === "cancelled" && interrupt.signal.aborted) {
      console.error(`interrupted; "runnel resume ${summary.runId}" finishes the run`);
      return EXIT_INTERRUPTED;
    }
    if (summary.status !== "cancelled" && !options.json) {
      console.error(`"runnel resume ${summary.runId}" retries what failed, once it is fixed`);
    }
    return 1;
  } finally {
    progress.close();
    Deno.removeSignalListener("SIGINT", onSignal);
    Deno.removeSignalListener("SIGTERM", onSignal);
    // Bounded: a collector that is down costs the command at most this.
    await tracer?.shutdown();
  }
}

async function resolveRunId(prefix: string, stateDir?: string): Promise<string> {
  const state = await openLocalState(stateDir, { readOnly: true });
  try {
    return (await getRunRecord(state.store, prefix)).runId;
  } finally {
    await state.close();
  }
}

function print(text: string): number {
  console.log(text);
  return 0;
}

/** Options of `runnel ui`. */
export interface UiCommandOptions extends StateOptions {
  /** `HOST:PORT` on loopback (default 127.0.0.1:8090). */
  listen?: string;
}

/** `runnel ui`: the web UI over the state directory's runs, until SIGINT/SIGTERM. */
export async function uiCommand(options: UiCommandOptions): Promise<number> {
  const [hostname, port] = hostPort(options.listen ?? "127.0.0.1:8090", "--listen");
  let ui;
  try {
    ui = serveLocalUi({ stateDir: options.stateDir, hostname, port });
  } catch (error) {
    if (error instanceof LocalUiAddressError) throw new UsageError(`--listen: ${error.message}`);
    if (error instanceof Deno.errors.AddrInUse) {
      console.error(`error: --listen ${hostname}:${port} is already in use; choose a free port`);
      return EXIT_BAD_INPUT;
    }
    throw error;
  }
  console.log(`runnel ui: ${ui.url}/ui/ (state ${options.stateDir ?? ".runnel"}; Ctrl-C stops)`);
  await new Promise<void>((resolve) => {
    const stop = () => {
      Deno.removeSignalListener("SIGINT", stop);
      Deno.removeSignalListener("SIGTERM", stop);
      resolve();
    };
    Deno.addSignalListener("SIGINT", stop);
    Deno.addSignalListener("SIGTERM", stop);
  });
  await ui[Symbol.asyncDispose]();
  return 0;
}
