/**
 * Agent config: which third-party backends to load and how plugin hosts
 * are tuned. Read from a YAML (or JSON) file named by `--config`, plus
 * `--plugin NAME=WHERE` flags.
 *
 * ```yaml
 * plugins:
 *   http: ./examples/backends/http        # a path (relative to this file) or a URL
 * plugin-hosts:
 *   idle: 60s                             # stop a host idle this long
 *   heartbeat: 1s                         # ping a busy host this often
 *   heartbeat-timeout: 10s                # replace a host silent this long
 * secrets:                                # secrets this host's operator declares, by name
 *   db-password: { env: DB_PASSWORD }     # an env var of the agent
 *   deploy-key: { file: ./deploy-key }    # a file (relative to this file)
 * ```
 *
 * Steps naming a secret of `secrets:` (`DB_PASSWORD: db-password` in the
 * pipeline) get its value from this agent, never from a server; a
 * `--secrets FILE` flag adds (and overrides) names the same way.
 *
 * @module
 */

import { dirname, resolve } from "node:path";
import { z } from "npm:zod@4.6.7";
import { parse as parseYaml } from "npm:yaml@2.9.1";
import {
  builtinPlugins,
  pluginFromLocation,
  type PluginHostPoolOptions,
  type PluginSource,
} from "../backends/mod.ts";
import { parseDuration } from "../core/duration.ts";
import { SecretSourcesSchema } from "../core/schema.ts";
import {
  loadSecretsFile,
  parseSecretSources,
  SecretsFileError,
  type SecretSource,
} from "../core/secrets.ts";

const duration = z.string().refine((text) => {
  try {
    return parseDuration(text) > 0;
  } catch {
    return false;
  }
}, { message: 'Expected a duration like "30s" or "2m"' });

/** The agent config file's schema. */
export const AgentConfigSchema = z.strictObject({
  plugins: z.record(z.string(), z.string().min(1, { message: "Expected a path or URL" }))
    .optional(),
  "plugin-hosts": z.strictObject({
    idle: duration.optional(),
    heartbeat: duration.optional(),
    "heartbeat-timeout": duration.optional(),
  }).optional(),
  secrets: SecretSourcesSchema.optional(),
});

/** Plugin host tuning, as {@link PluginHostPoolOptions} takes it. */
export type HostTuning = Pick<
  PluginHostPoolOptions,
  "idleMs" | "heartbeatMs" | "heartbeatTimeoutMs"
>;

/** What an agent runs with. */
export interface AgentConfig {
  /** Third-party backends. */
  plugins: PluginSource[];
  /** Plugin host tuning (absent keys keep the defaults). */
  hosts: HostTuning;
  /** Secrets this host's operator declares: name → env var or file (absolute paths). */
  secrets: Record<string, SecretSource>;
}

/** A config file or flag an agent cannot use. */
export class AgentConfigError extends Error {
  /** Stable error code. */
  readonly code = "bad_agent_config";

  /** Builds the error from a full sentence. */
  constructor(message: string) {
    super(message);
    this.name = "AgentConfigError";
  }
}

/** Options of {@link loadAgentConfig}. */
export interface LoadAgentConfigOptions {
  /** The config file, if any. */
  file?: string;
  /** `NAME=WHERE` plugin flags; they win over the file. */
  pluginFlags?: string[];
  /** Where flag paths resolve (default: the working directory). */
  cwd?: string;
  /** A secrets file (`--secrets`); its names win over the config's `secrets:`. */
  secretsFile?: string;
}

/**
 * Reads the agent config.
 *
 * @example
 * ```ts
 * import { loadAgentConfig } from "./config.ts";
 * const config = await loadAgentConfig({ pluginFlags: ["http=https://plugins.example/http/"] });
 * config.plugins[0].module; // "https://plugins.example/http/mod.ts"
 * ```
 */
export async function loadAgentConfig(options: LoadAgentConfigOptions = {}): Promise<AgentConfig> {
  const byName = new Map<string, PluginSource>();
  const hosts: HostTuning = {};
  let secrets: Record<string, SecretSource> = {};
  const file = options.file;
  if (file) {
    let raw: unknown;
    try {
      raw = parseYaml(await Deno.readTextFile(file)) ?? {};
    } catch (error) {
      throw new AgentConfigError(
        `Expected a readable YAML agent config at ${file}: ${(error as Error).message}`,
      );
    }
    const parsed = AgentConfigSchema.safeParse(raw);
    if (!parsed.success) {
      const problems = parsed.error.issues.map((issue) =>
        `${issue.path.length ? `"${issue.path.join(".")}": ` : ""}${issue.message}`
      );
      throw new AgentConfigError(`${file}: ${problems.join("; ")}`);
    }
    const baseDir = dirname(resolve(file));
    for (const [name, where] of Object.entries(parsed.data.plugins ?? {})) {
      byName.set(name, plugin(name, where, baseDir, file));
    }
    const tuning = parsed.data["plugin-hosts"] ?? {};
    if (tuning.idle) hosts.idleMs = parseDuration(tuning.idle);
    if (tuning.heartbeat) hosts.heartbeatMs = parseDuration(tuning.heartbeat);
    if (tuning["heartbeat-timeout"]) {
      hosts.heartbeatTimeoutMs = parseDuration(tuning["heartbeat-timeout"]);
    }
    secrets = parseSecretSources(parsed.data.secrets, { baseDir, origin: file });
  }
  if (options.secretsFile) {
    try {
      secrets = { ...secrets, ...await loadSecretsFile(options.secretsFile) };
    } catch (error) {
      if (!(error instanceof SecretsFileError)) throw error;
      throw new AgentConfigError(error.message);
    }
  }
  for (const flag of options.pluginFlags ?? []) {
    const at = flag.indexOf("=");
    if (at <= 0) throw new AgentConfigError(`Expected --plugin NAME=PATH-OR-URL, got "${flag}"`);
    const name = flag.slice(0, at);
    byName.set(name, plugin(name, flag.slice(at + 1), options.cwd ?? Deno.cwd(), "--plugin"));
  }
  return { plugins: [...byName.values()], hosts, secrets };
}

function plugin(name: string, where: string, baseDir: string, origin: string): PluginSource {
  if (builtinPlugins().some((source) => source.name === name)) {
    throw new AgentConfigError(
      `${origin}: expected a plugin name other than "${name}", which is a built-in backend`,
    );
  }
  try {
    return pluginFromLocation(name, where, baseDir);
  } catch (error) {
    throw new AgentConfigError(`${origin}: ${(error as Error).message}`);
  }
}
