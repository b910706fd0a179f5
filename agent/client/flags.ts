/**
 * The `runnel` command line's flags, parsed once for every command (local
 * and cluster), the parsers of their values, and the one error a bad
 * command line raises.
 *
 * @module
 */

import { OtlpEndpointError, otlpTracesUrl } from "../trace/exporter.ts";
import { parseArgs } from "node:util";
import { parse as parseYaml } from "npm:yaml@2.9.1";
import { LABEL_KEY_PATTERN, LABEL_VALUE_PATTERN } from "../../core/schema.ts";
import { isDuration, parseDuration } from "../../core/duration.ts";
import { parseLimit, type PipelineLimits } from "../../core/limits.ts";
import denoConfig from "../../deno.json" with { type: "json" };

/** runnel's version, as `deno.json` (the package's manifest) gives it. */
export const VERSION: string = denoConfig.version;

/** Exit code for bad input (usage or pipeline file), in the spirit of BSD's EX_USAGE. */
export const EXIT_BAD_INPUT = 2;
/** Conventional exit code after SIGINT (128 + 2). */
export const EXIT_INTERRUPTED = 130;

/** The help text of `runnel --help`. */
export const USAGE = `runnel ${VERSION} — a pipeline step runner

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
  approve RUN STEP     let a step waiting for approval run (--reject [--reason R] to fail it)
  rerun RUN STEP…      a new run of a finished run: those steps run again (--downstream: and
                       what depends on them), every other step is reused by digest
  gc                   delete artifacts of unpinned runs older than --retention
  storage              the artifact store's bytes and objects by pipeline [--prometheus]
  pin RUN | unpin RUN  keep (or stop keeping) a run's artifacts through gc
  backends             list the backends and whether this host can run them
  ui                   the web UI over local runs (--listen 127.0.0.1:PORT, default :8090)

Cluster mode:
  server               serve the API and agents (--etcd URLS, or --store FILE alone)
  agent                run steps for a cluster (--server HOST:PORT --token T --labels k=v,…)
  submit FILE          submit a pipeline to a cluster (--server URL [--follow] [--param k=v])
  apply FILE           register a pipeline (and its directory) under its name, as a new version
  pipelines [NAME]     the registered pipelines, or one's versions
  trigger NAME         run a registered pipeline (--param k=v, --pipeline-version N, --follow)
  delete-pipeline NAME remove a registered pipeline and its versions (admin; its runs stay)
  schedules [suspend|resume NAME]   schedules of registered pipelines: next and last tick
  schedules set NAME FILE | delete NAME   a schedule apart from the pipeline's file
  backfill NAME        a run per missed tick: --from T --to T (ISO 8601) [--dry-run]
  runs|show|logs|cancel|resume with --server URL talk to a cluster instead
  token bootstrap      make the cluster's first admin API token (once; --server URL)
  token create|revoke ID|list   API tokens (--role read|submit|admin --name N; admin only)
  agents revoke|forget ID       an agent's identity: cut it off, or let it register again (admin)

Options:
  --state-dir DIR      where runs, logs and artifacts live (default .runnel)
  --json               machine-readable output (events as JSON lines for run/resume)
  --logs               print step log lines while running
  --concurrency N      override the pipeline's concurrency (local default: 2 × CPUs, 4 to 64)
  --limit NAME=N       raise or lower a pipeline limit (repeatable): matrix-legs (10000),
                       step-instances (100000), dependencies (1000000), plan-bytes (64Mi)
  --param NAME=VALUE   a run parameter (repeatable; run, resume-less submit, validate, plan)
  --params-file FILE   run parameters from a YAML or JSON map (--param wins)
  --smtp H:P --smtp-from ADDR   (run, resume, server) the SMTP server of email alerts
  --label, -l K=V      (run, submit, trigger) a label of the run, with the pipeline's (repeatable);
                       (runs) only runs with this label; with --status S, --pipeline P,
                       --page-size N (50) and --after CURSOR (the last page's "next")
  --mermaid            (plan) print a Mermaid flowchart
  --follow, -f         (logs) keep printing until the run ends
  --retention D        (gc) keep artifacts younger than D (default 14d);
                       (server) keep finished runs in the store that long (default 14d)
  --dry-run            (gc) report what would be deleted
  --plugin NAME=WHERE  load a third-party backend from a path or URL (repeatable)
  --config FILE        agent config (YAML): "plugins: { NAME: path-or-url }", "secrets: {…}"
  --secrets FILE       secrets you declare as the operator (server, agent, local run):
                       "NAME: { env: VAR }" or "NAME: { file: PATH }" per line
  --server URL         (cluster) a server's API URL, or for agents its gRPC HOST:PORT
  --token T            (server, agent) the join token (or RUNNEL_TOKEN);
                       (API commands) the API token (or RUNNEL_API_TOKEN, or "token:" in
                       $RUNNEL_CONFIG or ~/.config/runnel/cli.yaml, mode 0600)
  --labels k=v,…       (agent) labels steps select on
  --slots N            (agent) attempts at once (default 2)
  --allow-shell        (agent) run trusted shell steps
  --artifacts DIR      (agent, server) a shared artifact directory (a server serves the UI's
                       downloads from it and keeps shipped pipeline directories there), or:
  --s3-endpoint URL --s3-bucket B [--s3-region R]   (agent, server) S3 artifacts (AWS_* env keys)
  --kubeconfig FILE    (run, agent) the cluster of kubernetes steps (default: KUBECONFIG,
                       ~/.kube/config, then the in-cluster service account)
  --listen H:P --grpc H:P   (server) API and agent addresses (127.0.0.1:8080, :7070);
                       (ui) the web UI's loopback address (127.0.0.1:8090)
  --etcd URLS | --store FILE   (server) the state store
  --id NAME --peers H:P,… --heartbeat D   (server) id, agents' failover list, heartbeat; (agent) --id NAME
  --tls-ca/--tls-cert/--tls-key FILE      TLS for the agents' gRPC (and the API without
                                          --http-tls-*); (API commands) --tls-ca trusts a CA
  --http-tls-cert/--http-tls-key FILE     (server) serve the HTTP API over TLS
  --admin-token-file FILE  (server) a token accepted as admin; closes the bootstrap
  --metrics-public     (server) serve /metrics without a token (default: read role)
  --otlp-endpoint URL  (run, resume, rerun, server, agent) export OpenTelemetry traces over
                       OTLP/HTTP to this collector (default: $OTEL_EXPORTER_OTLP_ENDPOINT)
  --webhook-allow H[:P],…  (server) hosts on-failure webhooks may reach (default none)
  --role R --name N    (token create) the new token's role and name
  --etcd-ca/--etcd-cert/--etcd-key FILE   TLS towards etcd
  -h, --help           this help
  -V, --version        print the version

Exit codes: 0 every step succeeded · 1 the run failed · 2 bad input · 130 interrupted`;

/** Every flag of every command: one table, so a flag means the same everywhere. */
const OPTIONS = {
  "state-dir": { type: "string" },
  json: { type: "boolean" },
  logs: { type: "boolean" },
  concurrency: { type: "string" },
  limit: { type: "string", multiple: true },
  param: { type: "string", multiple: true },
  "params-file": { type: "string" },
  "pipeline-version": { type: "string" },
  from: { type: "string" },
  downstream: { type: "boolean" },
  reject: { type: "boolean" },
  smtp: { type: "string" },
  "smtp-from": { type: "string" },
  reason: { type: "string" },
  label: { type: "string", multiple: true, short: "l" },
  status: { type: "string" },
  pipeline: { type: "string" },
  "page-size": { type: "string" },
  after: { type: "string" },
  to: { type: "string" },
  mermaid: { type: "boolean" },
  follow: { type: "boolean", short: "f" },
  retention: { type: "string" },
  "dry-run": { type: "boolean" },
  prometheus: { type: "boolean" },
  plugin: { type: "string", multiple: true },
  config: { type: "string" },
  secrets: { type: "string" },
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
  kubeconfig: { type: "string" },
  "tls-ca": { type: "string" },
  "tls-cert": { type: "string" },
  "tls-key": { type: "string" },
  "etcd-ca": { type: "string" },
  "etcd-cert": { type: "string" },
  "etcd-key": { type: "string" },
  "http-tls-cert": { type: "string" },
  "http-tls-key": { type: "string" },
  "admin-token-file": { type: "string" },
  "metrics-public": { type: "boolean" },
  "otlp-endpoint": { type: "string" },
  "webhook-allow": { type: "string", multiple: true },
  role: { type: "string" },
  name: { type: "string" },
  help: { type: "boolean", short: "h" },
  version: { type: "boolean", short: "V" },
} as const;

/** The flags of a command line, by long name (absent when not given). */
export type CliFlags = ReturnType<typeof parseArgs<{ options: typeof OPTIONS }>>["values"];

/** A command line, parsed. */
export interface CommandLine {
  /** The command (`run`, `show`, `server`…), absent for a bare `runnel`. */
  command?: string;
  /** The positional arguments after the command. */
  args: string[];
  /** The flags. */
  flags: CliFlags;
}

/** A command line runnel cannot act on; reported as bad input (exit 2), never as a crash. */
export class UsageError extends Error {
  /** Stable error code. */
  readonly code = "usage";

  /** Builds the error from a full sentence saying what was expected. */
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

/**
 * Parses `argv` (without the program name) against the one flag table.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseCommandLine } from "./flags.ts";
 * const line = parseCommandLine(["show", "20260101", "--json"]);
 * assert.deepEqual([line.command, line.args, line.flags.json], ["show", ["20260101"], true]);
 * ```
 */
export function parseCommandLine(argv: string[]): CommandLine {
  try {
    const { values, positionals } = parseArgs({
      args: argv,
      allowPositionals: true,
      strict: true,
      options: OPTIONS,
    });
    const [command, ...args] = positionals;
    return { command, args, flags: values };
  } catch (error) {
    // node:util's messages already name the flag; they become usage errors.
    if (String((error as { code?: unknown }).code).startsWith("ERR_PARSE_ARGS")) {
      throw new UsageError((error as Error).message);
    }
    throw error;
  }
}

/** The value of a flag that takes a positive integer, such as `--slots 4`. */
export function positiveInt(text: string, flag: string): number {
  const value = Number(text);
  if (!Number.isInteger(value) || value < 1) {
    throw new UsageError(`Expected a positive integer for ${flag}, got "${text}"`);
  }
  return value;
}

/** The value of a flag that takes a duration, such as `--heartbeat 5s`, in milliseconds. */
export function durationFlag(
  text: string,
  flag: string,
  bounds: { minMs?: number; maxMs?: number } = {},
): number {
  try {
    return parseDuration(text, bounds);
  } catch (error) {
    const detail = isDuration(text) ? `: ${(error as Error).message}` : "";
    throw new UsageError(`Expected a duration like "5s" for ${flag}, got "${text}"${detail}`);
  }
}

/**
 * Bounds of `--heartbeat`: agents beat this often and are declared offline
 * after 3 missed beats, so it must fit a timer and leave the lease room.
 */
export const HEARTBEAT_BOUNDS = { minMs: 50, maxMs: 10 * 60_000 };

/** The values of `--limit NAME=N` (repeatable), as load options take them. */
export function limitsFlag(values: string[] | undefined): Partial<PipelineLimits> {
  try {
    return Object.assign({}, ...(values ?? []).map(parseLimit));
  } catch (error) {
    throw new UsageError(`${(error as Error).message} (--limit)`);
  }
}

/** `--smtp HOST:PORT` and `--smtp-from ADDR`: the SMTP server of email alerts, if named. */
export function smtpFlag(
  smtp: string | undefined,
  from: string | undefined,
): { host: string; port: number; from: string } | undefined {
  if (smtp === undefined) return undefined;
  const [host, port] = hostPort(smtp, "--smtp");
  if (from !== undefined && !/^[^\s@]+@[^\s@]+$/.test(from)) {
    throw new UsageError(`Expected --smtp-from ADDRESS, got "${from}"`);
  }
  return { host, port, from: from ?? "runnel@localhost" };
}

/** The values of `--label K=V` (repeatable), as a map; undefined when none is given. */
export function labelsFlag(values: string[] | undefined): Record<string, string> | undefined {
  if (!values?.length) return undefined;
  const labels: Record<string, string> = {};
  for (const value of values) {
    const at = value.indexOf("=");
    const key = value.slice(0, at);
    const text = value.slice(at + 1);
    if (at <= 0 || !LABEL_KEY_PATTERN.test(key) || !LABEL_VALUE_PATTERN.test(text)) {
      throw new UsageError(
        `Expected --label KEY=VALUE (KEY of [A-Za-z0-9_./-], VALUE of [A-Za-z0-9_.-]), got "${value}"`,
      );
    }
    labels[key] = text;
  }
  return labels;
}

/**
 * The run parameters of `--params-file FILE` (a YAML or JSON map of scalars)
 * and `--param NAME=VALUE` (repeatable, winning over the file); undefined
 * when neither is given.
 */
export async function paramsFlag(
  values: string[] | undefined,
  file: string | undefined,
): Promise<Record<string, unknown> | undefined> {
  if (!values?.length && file === undefined) return undefined;
  const params: Record<string, unknown> = {};
  if (file !== undefined) {
    let parsed: unknown;
    try {
      parsed = parseYaml(await Deno.readTextFile(file));
    } catch (error) {
      throw new UsageError(
        `Expected a readable YAML map of parameters in ${file}: ${
          (error as Error).message
        } (--params-file)`,
      );
    }
    if (!parsed || typeof parsed !== "object" || Array.isArray(parsed)) {
      throw new UsageError(`Expected a map of NAME: VALUE in ${file} (--params-file)`);
    }
    for (const [name, value] of Object.entries(parsed)) {
      if (!["string", "number", "boolean"].includes(typeof value)) {
        throw new UsageError(
          `Expected a string, number or boolean for "${name}" in ${file} (--params-file)`,
        );
      }
      params[name] = value;
    }
  }
  for (const value of values ?? []) {
    const at = value.indexOf("=");
    if (at <= 0) throw new UsageError(`Expected --param NAME=VALUE, got "${value}"`);
    params[value.slice(0, at)] = value.slice(at + 1);
  }
  return params;
}

/**
 * The value of a flag that takes an address, such as `--listen 127.0.0.1:8080`;
 * an empty host (`:8080`) means every interface.
 */
export function hostPort(text: string, flag: string): [hostname: string, port: number] {
  const match = /^(.*):(\d+)$/.exec(text);
  if (!match || Number(match[2]) > 65535) {
    throw new UsageError(`Expected ${flag} HOST:PORT, got "${text}"`);
  }
  return [match[1] || "0.0.0.0", Number(match[2])];
}

/** `--labels cloud=gcp,region=us-east1` → `{cloud: "gcp", region: "us-east1"}`. */
export function parseLabels(text?: string): Record<string, string> {
  const labels: Record<string, string> = {};
  for (const pair of commaList(text)) {
    const at = pair.indexOf("=");
    if (at <= 0) throw new UsageError(`Expected --labels key=value,…, got "${pair}"`);
    labels[pair.slice(0, at)] = pair.slice(at + 1);
  }
  return labels;
}

/**
 * The items of a comma-separated flag, trimmed, empty ones dropped; a
 * repeatable flag (`--server a --server b,c`) gives them all.
 */
export function commaList(values?: string | string[]): string[] {
  return [values ?? []].flat().flatMap((value) => value.split(","))
    .map((item) => item.trim()).filter(Boolean);
}

/**
 * The collector's traces URL of `--otlp-endpoint URL` (else of the OTLP env
 * vars), or undefined when none is named.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { otlpFlag } from "./flags.ts";
 * assert.equal(otlpFlag("http://127.0.0.1:4318"), "http://127.0.0.1:4318/v1/traces");
 * assert.throws(() => otlpFlag("127.0.0.1:4318"), /--otlp-endpoint/);
 * ```
 */
export function otlpFlag(
  text: string | undefined,
  env?: (name: string) => string | undefined,
): string | undefined {
  try {
    return otlpTracesUrl(text, env);
  } catch (error) {
    if (error instanceof OtlpEndpointError) throw new UsageError(error.message);
    throw error;
  }
}
