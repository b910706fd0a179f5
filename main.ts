/**
 * The `runnel` command line: parses the flags, calls the command, turns
 * errors into exit codes. The commands are in `agent/client/`: the local
 * ones call the library (`mod.ts`); the cluster ones, loaded only when used
 * so that local mode starts without gRPC or etcd, talk to servers.
 *
 * @module
 */

import { localPolicy } from "./agent/attempt/policy.ts";
import { AgentConfigError, loadAgentConfig } from "./agent/config.ts";
import { formatDiagnostic, PipelineError } from "./core/errors.ts";
import {
  type CommandLine,
  durationFlag,
  EXIT_BAD_INPUT,
  labelsFlag,
  limitsFlag,
  paramsFlag,
  parseCommandLine,
  positiveInt,
  smtpFlag,
  USAGE,
  UsageError,
  VERSION,
} from "./agent/client/flags.ts";
import * as local from "./agent/client/local_commands.ts";
import { resolve } from "node:path";

/** The run commands that talk to a cluster when given `--server URL`. */
const REMOTE_COMMANDS = ["runs", "show", "logs", "cancel", "resume", "rerun", "approve"];

async function main(line: CommandLine): Promise<number> {
  const { command, args, flags } = line;
  if (flags.version) return print(VERSION);
  if (flags.help || !command || command === "help") return print(USAGE);
  // Kubernetes steps use the runner's KUBECONFIG (their plugin hosts are granted it).
  if (flags.kubeconfig) Deno.env.set("KUBECONFIG", resolve(flags.kubeconfig));
  const need = (what: string) => {
    if (!args[0]) throw new UsageError(`"runnel ${command}" needs ${what}`);
    return args[0];
  };
  const config = await loadAgentConfig({
    file: flags.config,
    pluginFlags: flags.plugin ?? [],
    secretsFile: flags.secrets,
  });
  const { plugins, hosts, secrets, settings } = config;
  const policy = localPolicy(config.policy, { configFile: config.file });
  const stateDir = flags["state-dir"];
  const json = flags.json;
  const limits = limitsFlag(flags.limit);
  const params = await paramsFlag(flags.param, flags["params-file"]);
  const execute = {
    stateDir,
    json,
    logs: flags.logs,
    concurrency: flags.concurrency === undefined
      ? undefined
      : positiveInt(flags.concurrency, "--concurrency"),
    plugins,
    hosts,
    policy,
    secrets,
    settings,
    limits,
    params: params ?? {},
    labels: labelsFlag(flags.label),
    smtp: smtpFlag(flags.smtp, flags["smtp-from"]),
    otlpEndpoint: flags["otlp-endpoint"],
  };

  const cluster = () => import("./agent/client/cli.ts");
  if (flags.server && REMOTE_COMMANDS.includes(command)) {
    return await (await cluster()).remoteCommand(command, args, flags);
  }
  switch (command) {
    case "server":
      return await (await cluster()).serverCommand(flags);
    case "agent":
      return await (await cluster()).agentCommand(flags, config);
    case "submit":
      return await (await cluster()).submitCommand(need("a pipeline file"), flags);
    case "apply":
      return await (await cluster()).applyCommand(need("a pipeline file"), flags);
    case "pipelines":
      return await (await cluster()).pipelinesCommand(args, flags);
    case "trigger":
      return await (await cluster()).triggerCommand(need("a pipeline name"), flags);
    case "backfill":
      return await (await cluster()).backfillCommand(need("a pipeline name"), flags);
    case "schedules":
      return await (await cluster()).schedulesCommand(args, flags);
    case "delete-pipeline":
      return await (await cluster()).deletePipelineCommand(need("a pipeline name"), flags);
    case "token":
      return await (await cluster()).tokenCommand(args, flags);
    case "agents":
      return await (await cluster()).agentsCommand(args, flags);
    case "validate":
      return await local.validateCommand(need("a pipeline file"), {
        plugins,
        settings,
        policy,
        secrets,
        limits,
        params,
      });
    case "plan":
      return await local.planCommand(need("a pipeline file"), {
        plugins,
        policy,
        mermaid: flags.mermaid,
        limits,
        params,
      });
    case "schema":
      return local.schemaCommand();
    case "run":
      return await local.runCommand(need("a pipeline file"), execute);
    case "resume":
      return await local.resumeCommand(need("a run id"), execute);
    case "approve":
      return await local.approveCommand(need("a run id"), args[1], {
        stateDir,
        reject: flags.reject,
        reason: flags.reason,
      });
    case "rerun":
      return await local.rerunCommand(need("a run id"), args.slice(1), {
        ...execute,
        downstream: flags.downstream,
      });
    case "cancel":
      return await local.cancelCommand(need("a run id"), { stateDir, settings });
    case "runs":
      return await local.runsCommand({
        stateDir,
        json,
        labels: labelsFlag(flags.label),
        status: flags.status,
        pipeline: flags.pipeline,
        pageSize: flags["page-size"] ? positiveInt(flags["page-size"], "--page-size") : undefined,
      });
    case "show":
      return await local.showCommand(need("a run id"), { stateDir, json });
    case "logs":
      return await local.logsCommand(need("a run id"), {
        step: args[1],
        stateDir,
        follow: flags.follow,
      });
    case "gc":
      return await local.gcCommand({
        stateDir,
        retentionMs: flags.retention ? durationFlag(flags.retention, "--retention") : undefined,
        dryRun: flags["dry-run"],
      });
    case "storage":
      return await local.storageCommand({
        stateDir,
        json: flags.json,
        prometheus: flags.prometheus,
      });
    case "pin":
    case "unpin":
      return await local.pinCommand(need("a run id"), { pin: command === "pin", stateDir });
    case "backends":
      return await local.backendsCommand(plugins, json, settings);
    case "ui":
      return await local.uiCommand({ stateDir, listen: flags.listen });
    default:
      throw new UsageError(`unknown command "${command}"; see "runnel --help"`);
  }
}

function print(text: string): number {
  console.log(text);
  return 0;
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
  if (error instanceof UsageError || error instanceof AgentConfigError) {
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
    code = await main(parseCommandLine(Deno.args));
  } catch (error) {
    code = report(error);
  }
  Deno.exit(code);
}
