/**
 * Manifest of the `ssh` backend: a step run on a remote host over SSH, its
 * inputs uploaded and its outputs downloaded over SFTP.
 *
 * The backend host is granted the one address the step names
 * (`--allow-net=HOST:PORT`), read of its key file and known_hosts file,
 * read of the scratch root (the inputs) and write of it (the outputs).
 * A path starting with `~/` needs `HOME`, which is then granted too.
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
  for (const key of ["host", "user", "run"] as const) {
    if (merged[key] === undefined) {
      context.addIssue({ code: "custom", path: [key], message: `Expected "${key}"` });
    }
  }
  if ((merged["known-hosts"] === undefined) === (merged["host-key"] === undefined)) {
    context.addIssue({
      code: "custom",
      path: ["known-hosts"],
      message: 'Expected either "known-hosts" or "host-key" (exactly one of them): ' +
        "host keys are always verified",
    });
  }
  if (merged.identity === undefined) {
    context.addIssue({
      code: "custom",
      path: ["identity"],
      message: 'Expected "identity" (a private key file); ssh-agent auth is not supported yet',
    });
  }
});

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

/** The `ssh` backend's manifest. */
export const sshManifest: BackendManifest<SshStepConfig> = {
  name: "ssh",
  version: "0.1.0",
  // A handle names no credentials, so a restarted host cannot reach the remote attempt yet.
  capabilities: { reattach: false, usage: false },
  configSchema: sshConfigSchema,
  hostPermissions(_context: HostContext): DenoPermissions {
    return { read: [], write: [], net: [], env: [], run: [] };
  },
  permissions(config: SshStepConfig, spec: AttemptSpec): DenoPermissions {
    const merged = normalizeSshConfig(config);
    const read = [spec.scratchRoot];
    const env: string[] = [];
    for (const path of [merged.identity, merged["known-hosts"]]) {
      if (path === undefined) continue;
      if (path.startsWith("~")) env.push("HOME");
      read.push(localFile(path, spec.baseDir, homeValue()));
    }
    return {
      read,
      write: [spec.scratchRoot],
      net: [`${merged.host}:${merged.port}`],
      env: [...new Set(env)],
      run: [],
    };
  },
};

/** The manifest, as plugin hosts load it (a module's default export). */
export default sshManifest;
