/**
 * Manifest of the `ssh` backend: a step run on a remote host over SSH, its
 * inputs uploaded and its outputs downloaded over SFTP.
 *
 * The backend host is granted the one address the step names
 * (`--allow-net=HOST:PORT`), read of its key file and known_hosts file
 * (write of the latter in trust-on-first-use mode), the ssh-agent socket
 * with `agent: true`, read of the scratch root (the inputs) and write of it
 * (the outputs). A path starting with `~/` needs `HOME`, which is then
 * granted too.
 *
 * A step may name a host alias of the agent config instead
 * (`ssh: { hosts: { reports: {...} } }`): the alias's connection replaces
 * whatever the step says of it (the operator's keys are the operator's),
 * and on an agent only aliases are allowed unless its policy says
 * otherwise.
 *
 * @module
 */

import { isAbsolute, resolve } from "node:path";
import { z } from "npm:zod@4.6.7";
import type { AttemptSpec, BackendManifest, DenoPermissions, HostContext } from "../backend.ts";

/** Default remote root of the per-attempt work directories, relative to the remote home. */
export const DEFAULT_WORK_ROOT = ".runnel/work";

/** A host name or address: no whitespace, no leading `-` (never an option to anything). */
const HOST = /^(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})|\[?[0-9A-Fa-f:.]+\]?)$/;
/** A login name as `useradd` accepts it. */
const USER = /^[A-Za-z_][A-Za-z0-9_.-]{0,31}$/;
/** An OpenSSH SHA256 fingerprint: `SHA256:` and 43 unpadded base64 characters. */
const FINGERPRINT = /^SHA256:[A-Za-z0-9+/]{43}$/;
/** A remote path below the remote home (or absolute), made of safe segments only. */
const REMOTE_ROOT = /^\/?(?:[A-Za-z0-9_][A-Za-z0-9_.-]*)(?:\/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$/;

/** An env var name: where a secret of the step is found. */
const SECRET_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

const localPath = (what: string) =>
  z.string().min(1, { message: `Expected a path for "${what}"` }).refine(
    (path) => !/[\0\r\n]/.test(path),
    { message: `Expected a single-line path for "${what}"` },
  );

/** The SSH connection and where the attempt runs remotely (keys also accepted under `with:`). */
const sshKeys = {
  /** Remote host name or address. */
  host: z.string().regex(HOST, {
    message: 'Expected a host name or address for "host" (no spaces, not starting with "-")',
  }),
  /** SSH port (default 22). */
  port: z.number().int().min(1).max(65535).optional(),
  /** Login name on the remote host. */
  user: z.string().regex(USER, { message: 'Expected a login name for "user"' }),
  /** Private key file (OpenSSH or PEM; ed25519, RSA, ECDSA), relative to the pipeline directory or `~/`. */
  identity: localPath("identity").optional(),
  /** known_hosts file (plain, hashed and `[host]:port` entries). */
  "known-hosts": localPath("known-hosts").optional(),
  /** Authenticate with the ssh-agent at `SSH_AUTH_SOCK`. */
  agent: z.boolean().optional(),
  /** Name of one of the step's secrets holding the key's passphrase (never sent remotely). */
  "passphrase-secret": z.string().regex(SECRET_NAME, {
    message: 'Expected "passphrase-secret" to name one of the step\'s secrets',
  }).optional(),
  /** Name of one of the step's secrets holding the login password (never sent remotely). */
  "password-secret": z.string().regex(SECRET_NAME, {
    message: 'Expected "password-secret" to name one of the step\'s secrets',
  }).optional(),
  /**
   * Trust an unknown host's key on first use and record it in the
   * `known-hosts` file; a changed key is still refused. Off unless set.
   */
  "trust-on-first-use": z.boolean().optional(),
  /** Pinned host key fingerprint, `SHA256:…` as `ssh-keygen -lf` prints it. */
  "host-key": z.string().regex(FINGERPRINT, {
    message: 'Expected "host-key" like "SHA256:" followed by 43 base64 characters ' +
      "(ssh-keygen -l -E sha256 -f KEY.pub)",
  }).optional(),
  /** Remote root of the per-attempt work directories (default `.runnel/work`, below the remote home). */
  "work-root": z.string().regex(REMOTE_ROOT, {
    message: 'Expected "work-root" as a path of [A-Za-z0-9_.-] segments without ".."',
  }).refine((path) => !path.split("/").includes(".."), {
    message: 'Expected "work-root" without ".."',
  }).optional(),
  /** Keep the remote work directory of a failed attempt (default false). */
  "keep-on-failure": z.boolean().optional(),
  /** Script run with `/bin/sh` in the remote work directory. */
  run: z.string().min(1, { message: 'Expected a non-empty command for "run"' }),
};

const sshKeysSchema = z.object(sshKeys).partial();

/** Config of an `ssh` step, as checked; see {@link normalizeSshConfig} for the merged view. */
export const sshConfigSchema = z.looseObject({
  ...sshKeys,
  host: sshKeys.host.optional(),
  user: sshKeys.user.optional(),
  run: sshKeys.run.optional(),
  /** The same keys, for pipelines whose schema does not know them yet. */
  with: sshKeysSchema.optional(),
}).superRefine((config, context) => {
  const merged = normalizeSshConfig(config);
  for (const key of ["host", "run"] as const) {
    if (merged[key] === undefined) {
      context.addIssue({ code: "custom", path: [key], message: `Expected "${key}"` });
    }
  }
  // A step naming nothing of the connection but its host names an alias of
  // the agent config; it is checked once resolved, on the host that runs it.
  if (isAliasReference(merged)) return;
  for (const message of connectionProblems(merged)) {
    context.addIssue({ code: "custom", path: [message.key], message: message.text });
  }
});

/** Keys that describe the connection (an alias supplies all of them). */
export const CONNECTION_KEYS = [
  "port",
  "user",
  "identity",
  "known-hosts",
  "host-key",
  "agent",
  "passphrase-secret",
  "password-secret",
  "trust-on-first-use",
] as const;

/** True when the config names only a host: an alias the agent config resolves. */
export function isAliasReference(config: Record<string, unknown>): boolean {
  return CONNECTION_KEYS.every((key) => key === "port" || config[key] === undefined);
}

/** What a resolved connection lacks or contradicts, by key. */
export function connectionProblems(
  merged: Record<string, unknown>,
): Array<{ key: string; text: string }> {
  const problems: Array<{ key: string; text: string }> = [];
  if (merged.user === undefined) problems.push({ key: "user", text: 'Expected "user"' });
  if ((merged["known-hosts"] === undefined) === (merged["host-key"] === undefined)) {
    problems.push({
      key: "known-hosts",
      text: 'Expected either "known-hosts" or "host-key" (exactly one of them): ' +
        "host keys are always verified",
    });
  }
  if (merged["trust-on-first-use"] === true && merged["known-hosts"] === undefined) {
    problems.push({
      key: "trust-on-first-use",
      text: 'Expected "known-hosts" with "trust-on-first-use": the key is recorded there',
    });
  }
  if (
    merged.identity === undefined && merged.agent !== true &&
    merged["password-secret"] === undefined
  ) {
    problems.push({
      key: "identity",
      text: 'Expected "identity" (a private key file), "agent: true" (ssh-agent) or ' +
        '"password-secret" (a secret of the step)',
    });
  }
  if (merged["passphrase-secret"] !== undefined && merged.identity === undefined) {
    problems.push({
      key: "passphrase-secret",
      text: 'Expected "identity" with "passphrase-secret": it unlocks that key',
    });
  }
  return problems;
}

/** A validated `ssh` step config, as the step wrote it. */
export type SshStepConfig = z.infer<typeof sshConfigSchema>;

/** The connection and run keys, top-level keys winning over `with:`. */
export interface SshConfig {
  host: string;
  port: number;
  user: string;
  identity?: string;
  "known-hosts"?: string;
  "host-key"?: string;
  agent?: boolean;
  "passphrase-secret"?: string;
  "password-secret"?: string;
  "trust-on-first-use"?: boolean;
  /** The agent config's alias the connection came from, if any. */
  alias?: string;
  "work-root": string;
  "keep-on-failure": boolean;
  run: string;
}

/** Merges `with:` and top-level keys, with defaults (fields may be missing before validation). */
export function normalizeSshConfig(config: Record<string, unknown>): Partial<SshConfig> & {
  port: number;
  "work-root": string;
  "keep-on-failure": boolean;
} {
  const withKeys =
    (typeof config.with === "object" && config.with !== null ? config.with : {}) as Record<
      string,
      unknown
    >;
  const merged: Record<string, unknown> = { ...withKeys };
  for (const key of Object.keys(sshKeys)) {
    if (config[key] !== undefined) merged[key] = config[key];
  }
  if (typeof config.alias === "string") merged.alias = config.alias;
  return {
    ...merged,
    port: (merged.port as number | undefined) ?? 22,
    "work-root": (merged["work-root"] as string | undefined) ?? DEFAULT_WORK_ROOT,
    "keep-on-failure": (merged["keep-on-failure"] as boolean | undefined) ?? false,
  } as Partial<SshConfig> & { port: number; "work-root": string; "keep-on-failure": boolean };
}

/**
 * A local path of the config as the backend opens it: `~/` against `home`,
 * a relative path against the pipeline directory.
 */
export function localFile(path: string, baseDir: string, home: string | undefined): string {
  if (path === "~" || path.startsWith("~/")) {
    if (home === undefined) throw new Error(`Expected HOME to be set to resolve "${path}"`);
    return resolve(home, path.slice(2));
  }
  return isAbsolute(path) ? path : resolve(baseDir, path);
}

function homeValue(): string | undefined {
  try {
    const state = Deno.permissions.querySync({ name: "env", variable: "HOME" }).state;
    return state === "granted" ? Deno.env.get("HOME") : undefined;
  } catch {
    return undefined;
  }
}

/** An alias name as a step's `host:` writes it. */
const ALIAS = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$/;

/** One host of the agent config's `ssh.hosts`: the connection a step's alias stands for. */
const sshHostSchema = z.strictObject({
  host: sshKeys.host,
  port: sshKeys.port,
  user: sshKeys.user,
  identity: sshKeys.identity,
  "known-hosts": sshKeys["known-hosts"],
  "host-key": sshKeys["host-key"],
  agent: sshKeys.agent,
  "trust-on-first-use": sshKeys["trust-on-first-use"],
  "work-root": sshKeys["work-root"],
}).superRefine((entry, context) => {
  for (const problem of connectionProblems(entry)) {
    context.addIssue({ code: "custom", path: [problem.key], message: problem.text });
  }
});

/**
 * The agent config's `ssh:` section: host aliases steps may name.
 *
 * ```yaml
 * ssh:
 *   hosts:
 *     reports:                         # a step's `host: reports`
 *       host: reports.internal
 *       user: runner
 *       identity: keys/reports_ed25519 # relative to the config file
 *       known-hosts: known_hosts       # or host-key: "SHA256:…"
 * ```
 */
export const sshSettingsSchema = z.strictObject({
  hosts: z.record(
    z.string().regex(ALIAS, { message: "Expected an alias name ([A-Za-z0-9_.-])" }),
    sshHostSchema,
  ).optional(),
});

/** The agent config's `ssh:` section, as checked. */
export type SshSettings = z.infer<typeof sshSettingsSchema>;

/** One configured host, local paths absolute. */
export type SshHostEntry = z.infer<typeof sshHostSchema>;

/**
 * The `ssh` settings with local paths made absolute against `baseDir` (the
 * config file's directory); `~/` paths are kept for the host to resolve.
 */
export function absoluteSettings(settings: SshSettings, baseDir: string): SshSettings {
  const hosts: Record<string, SshHostEntry> = {};
  for (const [name, entry] of Object.entries(settings.hosts ?? {})) {
    const fix = (path: string | undefined) =>
      path === undefined || path.startsWith("~") || isAbsolute(path)
        ? path
        : resolve(baseDir, path);
    hosts[name] = {
      ...entry,
      ...(entry.identity ? { identity: fix(entry.identity) } : {}),
      ...(entry["known-hosts"] ? { "known-hosts": fix(entry["known-hosts"]) } : {}),
    };
  }
  return { hosts };
}

/** The configured hosts of a host context (unchecked settings are ignored). */
export function configuredHosts(context: HostContext | undefined): Record<string, SshHostEntry> {
  const parsed = sshSettingsSchema.safeParse(context?.settings?.ssh ?? {});
  return parsed.success ? parsed.data.hosts ?? {} : {};
}

/**
 * A step's config as this host runs it: when its `host` is an alias of the
 * agent config, the alias's connection replaces the step's (the step keeps
 * `run`, and `work-root` unless the alias sets one).
 */
export function resolveSshConfig(
  config: Record<string, unknown>,
  context: HostContext | undefined,
): Record<string, unknown> {
  const merged = normalizeSshConfig(config);
  if (typeof merged.host !== "string") return config;
  const entry = configuredHosts(context)[merged.host];
  if (!entry) return config;
  const resolved: Record<string, unknown> = { run: merged.run, alias: merged.host };
  if (merged["keep-on-failure"]) resolved["keep-on-failure"] = true;
  if (
    config["work-root"] !== undefined || (config.with as Record<string, unknown>)?.["work-root"]
  ) {
    resolved["work-root"] = merged["work-root"];
  }
  for (const [key, value] of Object.entries(entry)) {
    if (value !== undefined) resolved[key] = value;
  }
  return resolved;
}

/** Read (and, trusting on first use, write) of a connection's local files; HOME when needed. */
function connectionGrant(
  entry: Record<string, unknown>,
  baseDir: string,
): { read: string[]; write: string[]; env: string[]; net: string[] } {
  const read: string[] = [];
  const write: string[] = [];
  const env: string[] = [];
  for (const key of ["identity", "known-hosts"] as const) {
    const path = entry[key];
    if (typeof path !== "string") continue;
    if (path.startsWith("~")) env.push("HOME");
    const local = localFile(path, baseDir, homeValue());
    read.push(local);
    if (key === "known-hosts" && entry["trust-on-first-use"] === true) write.push(local);
  }
  const net: string[] = [];
  if (entry.agent === true) {
    env.push("SSH_AUTH_SOCK");
    const socket = agentSocket();
    if (socket) {
      // node:net's unix sockets under Deno ask for all three.
      net.push(`unix:${socket}`);
      read.push(socket);
      write.push(socket);
    }
  }
  return { read, write, env, net };
}

/** The ssh-agent socket of this process's environment, when it may be read. */
export function agentSocket(): string | undefined {
  try {
    const state = Deno.permissions.querySync({ name: "env", variable: "SSH_AUTH_SOCK" }).state;
    return state === "granted" ? Deno.env.get("SSH_AUTH_SOCK") || undefined : undefined;
  } catch {
    return undefined;
  }
}

/** The `ssh` backend's manifest. */
export const sshManifest: BackendManifest<SshStepConfig> = {
  name: "ssh",
  version: "0.2.0",
  // Remote attempts are reached again only with the step's own connection.
  capabilities: { reattach: false, usage: false, recoverPerAttempt: true },
  configSchema: sshConfigSchema,
  resolveConfig: resolveSshConfig,
  /** The configured hosts, for `runnel backends` to probe and `recover` to sweep. */
  hostPermissions(context: HostContext): DenoPermissions {
    const read: string[] = [];
    const write: string[] = [];
    const env: string[] = [];
    const net: string[] = [];
    for (const entry of Object.values(configuredHosts(context))) {
      net.push(`${entry.host}:${entry.port ?? 22}`);
      const grant = connectionGrant({ ...entry, "trust-on-first-use": false }, "/");
      net.push(...grant.net);
      read.push(...grant.read);
      write.push(...grant.write);
      env.push(...grant.env);
    }
    return {
      read: [...new Set(read)],
      write: [...new Set(write)],
      net: [...new Set(net)],
      env: [...new Set(env)],
      run: [],
    };
  },
  permissions(config: SshStepConfig, spec: AttemptSpec): DenoPermissions {
    const merged = normalizeSshConfig(config);
    const grant = connectionGrant(merged, spec.baseDir);
    return {
      read: [spec.scratchRoot, ...grant.read],
      write: [spec.scratchRoot, ...grant.write],
      net: [`${merged.host}:${merged.port}`, ...grant.net],
      env: [...new Set(grant.env)],
      run: [],
    };
  },
};

/** The manifest, as plugin hosts load it (a module's default export). */
export default sshManifest;
