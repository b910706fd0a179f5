/**
 * The `runnel` command line: parses flags, calls the library, prints.
 *
 * @module
 */

import { parseArgs } from "node:util";
import {
  builtinPlugins,
  cancelRun,
  collectGarbage,
  createProgress,
  formatDiagnostic,
  getRunRecord,
  isTerminalRunStatus,
  listRuns,
  loadPipeline,
  logPath,
  openLocalState,
  parseDuration,
  PipelineError,
  pipelineJsonSchema,
  PluginHostPool,
  type PluginSource,
  readStepStates,
  renderMermaid,
  renderPlanText,
  resumeRun,
  runPipeline,
  type RunSummary,
  statePaths,
  validateStepConfigs,
  waitForRunEnd,
} from "./mod.ts";
import type { StepState } from "./core/model.ts";
import { AgentConfigError, loadAgentConfig } from "./agent/config.ts";
import type { StoreFactory } from "./agent/client/cli.ts";

/** `--etcd URLS`: the etcd engine, its election and Raft status. */
const storeFactory: StoreFactory = {
  etcd: async (endpoints, flags) =>
    (await import("./agent/server/etcd.ts")).openEtcdCluster({
      endpoints,
      tls: flags["etcd-ca"]
        ? { caFile: flags["etcd-ca"], certFile: flags["etcd-cert"], keyFile: flags["etcd-key"] }
        : undefined,
    }),
};

const VERSION = "0.1.0";

const USAGE = `runnel ${VERSION} — a pipeline step runner

Usage: runnel <command> [options]

Commands:
  run FILE             run a pipeline locally (embedded store, local agent)
  validate FILE        check a pipeline file and report every problem
  plan FILE            print the execution plan (--mermaid for a Mermaid graph)
  schema               print the JSON Schema of pipeline files
  runs                 list runs, newest first
  show RUN             show a run's steps, attempts, artifacts and timings
  logs RUN [STEP]      print step logs (--follow to stream until the run ends)
  cancel RUN           stop a running run (it stays resumable)
  resume RUN           finish a failed or cancelled run from where it stopped
  gc                   delete artifacts of unpinned runs older than --retention
  pin RUN | unpin RUN  keep (or stop keeping) a run's artifacts through gc
  backends             list the backends and whether this host can run them

Cluster mode:
  server               serve the API and agents (--etcd URLS, or --store FILE alone)
  agent                run steps for a cluster (--server HOST:PORT --token T --labels k=v,…)
  submit FILE          submit a pipeline to a cluster (--server URL [--follow])
  runs|show|logs|cancel|resume with --server URL talk to a cluster instead

Options:
  --state-dir DIR      where runs, logs and artifacts live (default .runnel)
  --json               machine-readable output (events as JSON lines for run/resume)
  --logs               print step log lines while running
  --concurrency N      override the pipeline's concurrency
  --mermaid            (plan) print a Mermaid flowchart
  --follow, -f         (logs) keep printing until the run ends
  --retention D        (gc) keep artifacts younger than D (default 14d)
  --dry-run            (gc) report what would be deleted
  --plugin NAME=WHERE  load a third-party backend from a path or URL (repeatable)
  --config FILE        agent config (YAML): "plugins: { NAME: path-or-url }"
  --server URL         (cluster) a server's API URL, or for agents its gRPC HOST:PORT
  --token T            (cluster) the join token (or RUNNEL_TOKEN)
  --labels k=v,…       (agent) labels steps select on
  --slots N            (agent) attempts at once (default 2)
  --allow-shell        (agent) run trusted shell steps
  --artifacts DIR      (agent) a shared artifact directory, or:
  --s3-endpoint URL --s3-bucket B [--s3-region R]   (agent) S3 artifacts (AWS_* env keys)
  --listen H:P --grpc H:P   (server) API and agent addresses (127.0.0.1:8080, :7070)
  --etcd URLS | --store FILE   (server) the state store
  --id NAME --peers H:P,… --heartbeat D   (server) id, agents' failover list, heartbeat
  --tls-ca/--tls-cert/--tls-key FILE      TLS for the agents' gRPC
  --etcd-ca/--etcd-cert/--etcd-key FILE   TLS towards etcd
  -h, --help           this help
  -V, --version        print the version

Exit codes: 0 every step succeeded · 1 the run failed · 2 bad input · 130 interrupted`;

/** Exit code for bad input (usage or pipeline file), as BSD's EX_USAGE spirit. */
const EXIT_BAD_INPUT = 2;
/** Conventional exit code after SIGINT (128 + 2). */
const EXIT_INTERRUPTED = 130;

async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    strict: true,
    options: {
      "state-dir": { type: "string" },
      json: { type: "boolean" },
      logs: { type: "boolean" },
      concurrency: { type: "string" },
      mermaid: { type: "boolean" },
      follow: { type: "boolean", short: "f" },
      retention: { type: "string" },
      "dry-run": { type: "boolean" },
      plugin: { type: "string", multiple: true },
      config: { type: "string" },
      server: { type: "string", multiple: true },
      token: { type: "string" },
      labels: { type: "string" },
      slots: { type: "string" },
      "allow-shell": { type: "boolean" },
      listen: { type: "string" },
      grpc: { type: "string" },
      store: { type: "string" },
      etcd: { type: "string" },
      id: { type: "string" },
      peers: { type: "string" },
      heartbeat: { type: "string" },
      artifacts: { type: "string" },
      "s3-endpoint": { type: "string" },
      "s3-bucket": { type: "string" },
      "s3-region": { type: "string" },
      "tls-ca": { type: "string" },
      "tls-cert": { type: "string" },
      "tls-key": { type: "string" },
      "etcd-ca": { type: "string" },
      "etcd-cert": { type: "string" },
      "etcd-key": { type: "string" },
      help: { type: "boolean", short: "h" },
      version: { type: "boolean", short: "V" },
    },
  });
  const [command, ...rest] = positionals;
  if (values.version) return print(VERSION);
  if (values.help || !command || command === "help") return print(USAGE);
  const stateDir = values["state-dir"];
  const concurrency = values.concurrency === undefined
    ? undefined
    : positiveInt(values.concurrency, "--concurrency");
  const agentConfig = await loadAgentConfig({
    file: values.config,
    pluginFlags: values.plugin ?? [],
  });
  const plugins = agentConfig.plugins;
  const hosts = agentConfig.hosts;
  const load = (file: string) =>
    loadPipeline(file, { backends: plugins.map((plugin) => plugin.name) });
  const need = (what: string) => {
    if (!rest[0]) throw new UsageError(`"runnel ${command}" needs ${what}`);
    return rest[0];
  };

  // With --server, the run commands talk to a cluster.
  // Cluster commands load gRPC and etcd only when used: local mode starts fast.
  const cluster = () => import("./agent/client/cli.ts");
  if (values.server && ["runs", "show", "logs", "cancel", "resume"].includes(command)) {
    return await (await cluster()).remoteCommand(command, rest, values);
  }
  switch (command) {
    case "server":
      return await (await cluster()).serverCommand(values, storeFactory);
    case "agent":
      return await (await cluster()).agentCommand(values, agentConfig);
    case "submit":
      return await (await cluster()).submitCommand(need("a pipeline file"), values);
    case "validate": {
      const plan = await load(need("a pipeline file"));
      const pool = new PluginHostPool({
        plugins: [...builtinPlugins(), ...plugins],
        context: { scratchRoot: Deno.cwd(), agentId: "validate" },
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
    case "plan": {
      const plan = await load(need("a pipeline file"));
      return print(values.mermaid ? renderMermaid(plan) : renderPlanText(plan));
    }
    case "schema":
      return print(JSON.stringify(pipelineJsonSchema(), null, 2));
    case "run": {
      const plan = await load(need("a pipeline file"));
      return await execute(
        (options) => runPipeline(plan, { ...options, plugins, hosts }),
        { json: values.json, logs: values.logs, stateDir, concurrency },
      );
    }
    case "resume": {
      const runId = await resolveRunId(need("a run id"), stateDir);
      return await execute(
        (options) =>
          resumeRun(runId, { ...options, plugins: plugins.length ? plugins : undefined }),
        { json: values.json, logs: values.logs, stateDir, concurrency },
      );
    }
    case "cancel": {
      const runId = await resolveRunId(need("a run id"), stateDir);
      const outcome = await cancelRun(runId, { stateDir });
      return print(
        outcome === "requested"
          ? `cancel requested: the runner of ${runId} is stopping its steps`
          : outcome === "cancelled"
          ? `${runId} cancelled (its runner was gone); "runnel resume ${runId}" finishes it`
          : `${runId} has already finished`,
      );
    }
    case "runs":
      return await showRuns(stateDir, values.json);
    case "show":
      return await showRun(need("a run id"), stateDir, values.json);
    case "logs":
      return await showLogs(need("a run id"), rest[1], stateDir, values.follow);
    case "gc": {
      const result = await collectGarbage({
        stateDir,
        retentionMs: values.retention ? parseDuration(values.retention) : undefined,
        dryRun: values["dry-run"],
      });
      return print(
        `${
          values["dry-run"] ? "would remove" : "removed"
        } ${result.recordsRemoved} artifact records, ${result.blobsRemoved} blobs (${
          formatBytes(result.bytesFreed)
        }), scratch and logs of ${result.runsCleaned} runs`,
      );
    }
    case "pin":
    case "unpin": {
      const runId = await resolveRunId(need("a run id"), stateDir);
      const state = await openLocalState(stateDir);
      try {
        await (command === "pin" ? state.artifacts.pin(runId) : state.artifacts.unpin(runId));
        return print(`${runId} ${command === "pin" ? "pinned" : "unpinned"}`);
      } finally {
        await state.close();
      }
    }
    case "backends":
      return await showBackends(plugins, values.json);
    default:
      throw new UsageError(`unknown command "${command}"; see "runnel --help"`);
  }
}

async function showBackends(plugins: PluginSource[], json?: boolean): Promise<number> {
  const pool = new PluginHostPool({
    plugins: [...builtinPlugins(), ...plugins],
    context: { scratchRoot: Deno.cwd(), agentId: "backends" },
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

interface ExecuteOptions {
  json?: boolean;
  logs?: boolean;
  stateDir?: string;
  concurrency?: number;
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
  }
}

async function resolveRunId(prefix: string, stateDir?: string): Promise<string> {
  const state = await openLocalState(stateDir);
  try {
    return (await getRunRecord(state.store, prefix)).runId;
  } finally {
    await state.close();
  }
}

async function showRuns(stateDir?: string, json?: boolean): Promise<number> {
  const state = await openLocalState(stateDir);
  try {
    const runs = await listRuns(state.store);
    if (json) return print(JSON.stringify(runs, null, 2));
    if (runs.length === 0) return print('no runs yet; start one with "runnel run FILE"');
    const rows = runs.map((r) => [
      r.runId,
      r.pipeline,
      r.status,
      new Date(r.createdAt).toISOString().replace("T", " ").slice(0, 19),
      r.finishedAt && r.startedAt ? formatMs(r.finishedAt - r.startedAt) : "",
    ]);
    return print(table(["RUN", "PIPELINE", "STATUS", "CREATED", "DURATION"], rows));
  } finally {
    await state.close();
  }
}

async function showRun(prefix: string, stateDir?: string, json?: boolean): Promise<number> {
  const state = await openLocalState(stateDir);
  try {
    const record = await getRunRecord(state.store, prefix);
    const steps = await readStepStates(state.store, record.runId);
    const artifacts = await state.artifacts.list({ run: record.runId });
    const pinned = await state.artifacts.isPinned(record.runId);
    if (json) return print(JSON.stringify({ ...record, pinned, steps, artifacts }, null, 2));
    const lines = [
      `run       ${record.runId}${pinned ? " (pinned)" : ""}`,
      `pipeline  ${record.pipeline} (${record.file})`,
      `status    ${record.status}`,
      `created   ${new Date(record.createdAt).toISOString()}`,
    ];
    if (record.startedAt && record.finishedAt) {
      lines.push(`duration  ${formatMs(record.finishedAt - record.startedAt)}`);
    }
    lines.push("", table(["STEP", "STATUS", "ATTEMPTS", "DURATION", "DETAIL"], stepRows(steps)));
    if (artifacts.length) {
      lines.push(
        "",
        table(
          ["ARTIFACT", "SIZE", "DIGEST"],
          artifacts.map((a) => [`${a.step}/${a.name}`, formatBytes(a.size), a.digest.slice(0, 19)]),
        ),
      );
    }
    return print(lines.join("\n"));
  } finally {
    await state.close();
  }
}

function stepRows(steps: Record<string, StepState>): string[][] {
  // In the order they ran (steps that never ran last), not the store's key order.
  const started = (step: StepState) => step.attempts[0]?.scheduledAt ?? Number.MAX_SAFE_INTEGER;
  return Object.values(steps).sort((a, b) => started(a) - started(b)).map((step) => {
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
    return [step.id, step.status, String(step.attempts.length), duration, detail];
  });
}

async function showLogs(
  prefix: string,
  stepId: string | undefined,
  stateDir?: string,
  follow?: boolean,
): Promise<number> {
  const state = await openLocalState(stateDir);
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

class UsageError extends Error {
  readonly code = "usage";
}

function positiveInt(text: string, flag: string): number {
  const n = Number(text);
  if (!Number.isInteger(n) || n < 1) {
    throw new UsageError(`Expected a positive integer for ${flag}, got "${text}"`);
  }
  return n;
}

function print(text: string): number {
  console.log(text);
  return 0;
}

function formatMs(ms: number): string {
  if (ms < 1000) return `${ms}ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)}s`;
  return `${Math.floor(ms / 60_000)}m${Math.round((ms % 60_000) / 1000)}s`;
}

function formatBytes(bytes: number): string {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 ** 2) return `${(bytes / 1024).toFixed(1)} KiB`;
  if (bytes < 1024 ** 3) return `${(bytes / 1024 ** 2).toFixed(1)} MiB`;
  return `${(bytes / 1024 ** 3).toFixed(1)} GiB`;
}

function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (cells: string[]) =>
    cells.map((c, i) => i === cells.length - 1 ? c : c.padEnd(widths[i])).join("  ").trimEnd();
  return [line(header), ...rows.map(line)].join("\n");
}

/** Prints an error for a person: located diagnostics, never a stack trace for bad input. */
function report(error: unknown): number {
  if (error instanceof PipelineError) {
    for (const diagnostic of error.diagnostics) console.error(formatDiagnostic(diagnostic));
    const n = error.diagnostics.length;
    console.error(`${n} error${n === 1 ? "" : "s"}; nothing was run`);
    return EXIT_BAD_INPUT;
  }
  const code = (error as { code?: unknown })?.code;
  const message = error instanceof Error ? error.message : String(error);
  if (
    error instanceof UsageError || error instanceof AgentConfigError ||
    (error instanceof Error && error.name === "ClusterUsageError") ||
    (typeof code === "string" && code.startsWith("ERR_PARSE_ARGS"))
  ) {
    console.error(`error: ${message}`);
    return EXIT_BAD_INPUT;
  }
  if (typeof code === "string") {
    console.error(`error: ${message}`);
    return 1;
  }
  console.error(`internal error: ${message}`);
  if (Deno.env.get("RUNNEL_DEBUG")) console.error(error);
  else console.error("(set RUNNEL_DEBUG=1 for a stack trace, and please report it)");
  return 1;
}

if (import.meta.main) {
  let code: number;
  try {
    code = await main(Deno.args);
  } catch (error) {
    code = report(error);
  }
  Deno.exit(code);
}
