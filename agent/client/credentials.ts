/**
 * What the cluster commands of the CLI present to a server: the API token
 * (from `--token`, then `RUNNEL_API_TOKEN`, then the CLI config file) and
 * the CA an `https://` server's certificate chains to (`--tls-ca`, then the
 * config file).
 *
 * The config file is `$RUNNEL_CONFIG`, else `~/.config/runnel/cli.yaml`:
 *
 * ```yaml
 * token: rnl_…            # an API token
 * tls-ca: /etc/runnel/ca.pem
 * ```
 *
 * It holds a secret, so a file other users can read is reported (and still used).
 *
 * @module
 */

import { parse as parseYaml } from "npm:yaml@2.9.1";
import { type CliFlags, UsageError } from "./flags.ts";

/** The keys of the CLI config file. */
export interface CliConfig {
  /** An API token. */
  token?: string;
  /** A PEM CA file for `https://` servers. */
  "tls-ca"?: string;
}

/** What a client presents: a token (if any) and extra CA certificates. */
export interface ApiCredentials {
  token?: string;
  caCerts?: string[];
  /** Where the token came from, for messages: `--token`, `RUNNEL_API_TOKEN` or the file's path. */
  tokenSource?: string;
}

const CONFIG_KEYS = ["token", "tls-ca"];

/** Where the CLI config file is looked for, or undefined without `$HOME`. */
export function cliConfigPath(): { path: string; explicit: boolean } | undefined {
  const explicit = Deno.env.get("RUNNEL_CONFIG");
  if (explicit) return { path: explicit, explicit: true };
  const home = Deno.env.get("HOME");
  return home ? { path: `${home}/.config/runnel/cli.yaml`, explicit: false } : undefined;
}

/**
 * Reads the CLI config file; none at the default place is no config.
 * `warn` receives a sentence when other users can read the file.
 *
 * @throws {UsageError} for a file named by `$RUNNEL_CONFIG` that is missing, or one that is not the expected YAML.
 */
export async function loadCliConfig(
  where: { path: string; explicit: boolean } | undefined = cliConfigPath(),
  warn: (message: string) => void = (message) => console.error(`warning: ${message}`),
): Promise<CliConfig> {
  if (!where) return {};
  let text: string;
  let mode: number | null;
  try {
    mode = (await Deno.stat(where.path)).mode;
    text = await Deno.readTextFile(where.path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound && !where.explicit) return {};
    throw new UsageError(
      `Expected a readable CLI config file at ${where.path} ($RUNNEL_CONFIG): ${
        (error as Error).message
      }`,
    );
  }
  if (mode !== null && (mode & 0o077) !== 0) {
    warn(
      `${where.path} can be read by other users (mode ${(mode & 0o777).toString(8)}) and may ` +
        `hold an API token; run "chmod 600 ${where.path}"`,
    );
  }
  let value: unknown;
  try {
    value = parseYaml(text);
  } catch (error) {
    throw new UsageError(`Expected YAML in ${where.path}: ${(error as Error).message}`);
  }
  if (value === null || value === undefined) return {};
  if (typeof value !== "object" || Array.isArray(value)) {
    throw new UsageError(`Expected ${where.path} to be a mapping of ${CONFIG_KEYS.join(", ")}`);
  }
  for (const [key, item] of Object.entries(value)) {
    if (!CONFIG_KEYS.includes(key)) {
      throw new UsageError(
        `Unknown key "${key}" in ${where.path}; expected ${CONFIG_KEYS.join(", ")}`,
      );
    }
    if (typeof item !== "string") {
      throw new UsageError(`Expected "${key}" in ${where.path} to be a string`);
    }
  }
  return value as CliConfig;
}

/**
 * The token and CA of a cluster command, each from the first place that
 * has one: flag, environment, config file (read only when needed).
 */
export async function apiCredentials(flags: CliFlags): Promise<ApiCredentials> {
  let config: CliConfig | undefined;
  const fromFile = async () => config ??= await loadCliConfig();
  const credentials: ApiCredentials = {};
  const env = Deno.env.get("RUNNEL_API_TOKEN");
  if (flags.token) {
    credentials.token = flags.token;
    credentials.tokenSource = "--token";
  } else if (env) {
    credentials.token = env;
    credentials.tokenSource = "RUNNEL_API_TOKEN";
  } else if ((await fromFile()).token) {
    credentials.token = config!.token;
    credentials.tokenSource = cliConfigPath()?.path;
  }
  const ca = flags["tls-ca"] ?? (await fromFile())["tls-ca"];
  if (ca) {
    try {
      credentials.caCerts = [await Deno.readTextFile(ca)];
    } catch (error) {
      throw new UsageError(
        `Expected a readable PEM file for --tls-ca at ${ca}: ${(error as Error).message}`,
      );
    }
  }
  return credentials;
}

/**
 * Whether sending a token to `url` would cross a network in clear: plain
 * `http://` to a host other than this machine.
 */
export function sendsTokenInClear(url: string): boolean {
  const parsed = new URL(url);
  return parsed.protocol === "http:" &&
    !["localhost", "127.0.0.1", "[::1]"].includes(parsed.hostname) &&
    !parsed.hostname.startsWith("127.");
}
