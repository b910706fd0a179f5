/**
 * Agent config: which third-party backends to load, how plugin hosts are
 * tuned, and what a submitted pipeline may ask of this host (its policy,
 * see `attempt/policy.ts`). Read from a YAML (or JSON) file named by
 * `--config`, plus `--plugin NAME=WHERE` flags. `runnel run` reads the same
 * file: its `policy` then adds to local mode's defaults.
 *
 * ```yaml
 * plugins:
 *   http: ./examples/backends/http        # a path (relative to this file) or a URL
 * plugin-hosts:
 *   idle: 60s                             # stop a host idle this long
 *   heartbeat: 1s                         # ping a busy host this often
 *   heartbeat-timeout: 10s                # replace a host silent this long
 * policy:                                 # absent keys keep the defaults (agent / local)
 *   backends: [deno, docker]              # agent default: deno, shell (with --allow-shell), plugins
 *   pipeline-dirs: [/srv/pipelines]       # where a plan's own pipeline directory may be (agent
 *                                         # default: only the bundles it was sent)
 *   deno:
 *     read: [/srv/shared]                 # host paths a deno step may be granted (default none)
 *     write: []
 *     net: [api.example.com:443]          # hosts it may reach; "*" any (agent default none)
 *     env: [AWS_REGION]                   # agent env vars it may read; "*" any (agent default none)
 *   docker:
 *     network: false                      # may a docker step have a network (agent default false)
 *     root: false                         # may it run as root (agent default false)
 *     build-contexts: []                  # host dirs a build context may be outside its pipeline
 *   ssh:
 *     inline-hosts: false                 # may a step name its own host and key files (agent
 *                                         # default false: only the aliases of ssh.hosts)
 * ssh:
 *   hosts:                                # aliases a step names as its `host:`
 *     reports:
 *       host: reports.internal
 *       user: runner
 *       identity: keys/reports_ed25519    # relative to this file; or agent: true (SSH_AUTH_SOCK)
 *       known-hosts: known_hosts          # or host-key: "SHA256:…"
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
import { absoluteSettings, sshSettingsSchema } from "../backends/ssh/manifest.ts";
import {
  loadSecretsFile,
  parseSecretSources,
  SecretsFileError,
  type SecretSource,
} from "../core/secrets.ts";
import type { PolicyOverrides } from "./attempt/policy.ts";

const duration = z.string().refine((text) => {
  try {
    return parseDuration(text) > 0;
  } catch {
    return false;
  }
}, { message: 'Expected a duration like "30s" or "2m"' });

/** A host path: absolute, or relative to the config file. */
const hostPath = z.string().min(1, { message: "Expected a path" });

/** The `policy` section: what a submitted pipeline may ask of this host. */
export const PolicySchema = z.strictObject({
  backends: z.array(z.string().regex(/^[a-z][a-z0-9_-]*$/, { message: "Expected a backend name" }))
    .optional(),
  "pipeline-dirs": z.array(hostPath).optional(),
  deno: z.strictObject({
    read: z.array(hostPath).optional(),
    write: z.array(hostPath).optional(),
    net: z.array(
      z.string().regex(/^(\*|[^\s,/]+)$/, { message: 'Expected a host, host:port or "*"' }),
    )
      .optional(),
    env: z.array(
      z.string().regex(/^(\*|[A-Za-z_][A-Za-z0-9_]*)$/, {
        message: 'Expected an env var name or "*"',
      }),
    ).optional(),
  }).optional(),
  docker: z.strictObject({
    network: z.boolean().optional(),
    root: z.boolean().optional(),
    "build-contexts": z.array(hostPath).optional(),
  }).optional(),
  ssh: z.strictObject({
    "inline-hosts": z.boolean().optional(),
  }).optional(),
});

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
  policy: PolicySchema.optional(),
  ssh: sshSettingsSchema.optional(),
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
  /**
   * The file's `policy`, paths made absolute (absent keys keep the
   * defaults of the mode: `agentPolicy` or `localPolicy`).
   */
  policy: PolicyOverrides;
  /** The config file, if any (refusals of its policy name it). */
  file?: string;
  /**
   * Each built-in backend's section of the file (`ssh:` with its host
   * aliases, local paths absolute), as plugin hosts get it.
   */
  settings: Record<string, unknown>;
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
  let policy: PolicyOverrides = {};
  const settings: Record<string, unknown> = {};
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
    policy = policyOverrides(parsed.data.policy ?? {}, baseDir);
    if (parsed.data.ssh) {
      const ssh = absoluteSettings(parsed.data.ssh, baseDir);
      settings.ssh = ssh;
      policy.ssh = { ...policy.ssh, hosts: Object.keys(ssh.hosts ?? {}) };
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
  return {
    plugins: [...byName.values()],
    hosts,
    policy,
    secrets,
    settings,
    ...(file ? { file } : {}),
  };
}

/** The `policy` section as overrides, its paths resolved against the config file's directory. */
function policyOverrides(
  section: z.infer<typeof PolicySchema>,
  baseDir: string,
): PolicyOverrides {
  const paths = (list: string[] | undefined) => list?.map((path) => resolve(baseDir, path));
  const overrides: PolicyOverrides = {};
  if (section.backends) overrides.backends = section.backends;
  if (section["pipeline-dirs"]) overrides.pipelineDirs = paths(section["pipeline-dirs"]);
  if (section.deno) {
    const { read, write, net, env } = section.deno;
    overrides.deno = {
      ...(read ? { read: paths(read) } : {}),
      ...(write ? { write: paths(write) } : {}),
      ...(net ? { net } : {}),
      ...(env ? { env } : {}),
    };
  }
  if (section.docker) {
    const { network, root } = section.docker;
    const contexts = section.docker["build-contexts"];
    overrides.docker = {
      ...(network !== undefined ? { network } : {}),
      ...(root !== undefined ? { root } : {}),
      ...(contexts ? { buildContexts: paths(contexts) } : {}),
    };
  }
  if (section.ssh?.["inline-hosts"] !== undefined) {
    overrides.ssh = { inlineHosts: section.ssh["inline-hosts"] };
  }
  return overrides;
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
