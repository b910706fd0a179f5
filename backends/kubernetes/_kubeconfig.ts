/**
 * Where the Kubernetes API is and how to authenticate, as `kubectl` finds
 * it: the first file of `KUBECONFIG`, else `~/.kube/config`, else the
 * in-cluster service account (`KUBERNETES_SERVICE_HOST` and the mounted
 * token and CA). Bearer tokens (inline or `tokenFile`), client
 * certificates and CAs (inline `-data` or files, relative paths against
 * the kubeconfig's directory) are supported; exec and auth-provider
 * plugins are not (they would run arbitrary commands in the sandbox).
 *
 * Read synchronously: the manifest derives the backend host's permissions
 * (the API server's address, the files to read) from the same answer.
 *
 * @module
 */

import { dirname, isAbsolute, resolve } from "node:path";
import { parse as parseYaml } from "npm:yaml@2.9.1";

/** Where a pod's service account is mounted. */
export const SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount";

/** Environment variables the lookup may read. */
export const KUBECONFIG_ENV = [
  "KUBECONFIG",
  "HOME",
  "KUBERNETES_SERVICE_HOST",
  "KUBERNETES_SERVICE_PORT",
];

/** The API server and credentials of the current context. */
export interface KubeTarget {
  /** `https://host:port` (or `http:`). */
  server: string;
  /** `host:port` of the server, as `--allow-net` names it. */
  address: string;
  /** Namespace of the context (default `default`). */
  namespace: string;
  token?: string;
  caPem?: string;
  certPem?: string;
  keyPem?: string;
  /** Files the lookup read (the kubeconfig and what it references). */
  files: string[];
  /** Environment variables the lookup read. */
  env: string[];
  /** Where it came from, for messages. */
  source: string;
}

/** A kubeconfig that cannot be used. */
export class KubeconfigError extends Error {
  /** Stable error code. */
  readonly code = "kubeconfig_invalid";

  /** Builds the error from a sentence saying what was expected. */
  constructor(message: string) {
    super(message);
    this.name = "KubeconfigError";
  }
}

/** Reads an environment variable only when this process may (a sandboxed host may not). */
export function envValue(name: string): string | undefined {
  try {
    return Deno.permissions.querySync({ name: "env", variable: name }).state === "granted"
      ? Deno.env.get(name)
      : undefined;
  } catch {
    return undefined;
  }
}

/** The kubeconfig path `kubectl` would use, with the env variables that chose it. */
export function kubeconfigPath(
  env: (name: string) => string | undefined = envValue,
): { path?: string; env: string[] } {
  const list = env("KUBECONFIG");
  if (list) {
    const path = list.split(":").find((entry) => entry !== "");
    if (path) return { path: resolve(path), env: ["KUBECONFIG"] };
  }
  const home = env("HOME");
  if (home) {
    const path = `${home}/.kube/config`;
    try {
      Deno.statSync(path);
      return { path, env: ["KUBECONFIG", "HOME"] };
    } catch {
      // No file: maybe in a cluster.
    }
  }
  return { env: ["KUBECONFIG", "HOME"] };
}

type Named<T> = Array<{ name: string } & T>;

/**
 * Loads the current context of the kubeconfig (or the in-cluster account,
 * from `options.serviceAccountDir`, default {@link SERVICE_ACCOUNT_DIR}).
 */
export function loadKubeTarget(
  env: (name: string) => string | undefined = envValue,
  options: { serviceAccountDir?: string } = {},
): KubeTarget {
  const accountDir = options.serviceAccountDir ?? SERVICE_ACCOUNT_DIR;
  const found = kubeconfigPath(env);
  if (!found.path) {
    const host = env("KUBERNETES_SERVICE_HOST");
    const port = env("KUBERNETES_SERVICE_PORT") ?? "443";
    if (!host) {
      throw new KubeconfigError(
        "Expected a kubeconfig (KUBECONFIG or ~/.kube/config) or an in-cluster service account " +
          "(KUBERNETES_SERVICE_HOST), found neither",
      );
    }
    const hostPart = host.includes(":") ? `[${host}]` : host;
    const read = (name: string) => Deno.readTextFileSync(`${accountDir}/${name}`);
    let namespace = "default";
    try {
      namespace = read("namespace").trim() || "default";
    } catch { /* optional */ }
    return {
      server: `https://${hostPart}:${port}`,
      address: `${hostPart}:${port}`,
      namespace,
      token: read("token").trim(),
      caPem: read("ca.crt"),
      files: [accountDir],
      env: [...found.env, "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"],
      source: "the in-cluster service account",
    };
  }
  const path = found.path;
  let text: string;
  try {
    text = Deno.readTextFileSync(path);
  } catch (error) {
    throw new KubeconfigError(
      `Expected a readable kubeconfig at ${path}: ${(error as Error).message}`,
    );
  }
  // deno-lint-ignore no-explicit-any
  let config: any;
  try {
    config = parseYaml(text);
  } catch (error) {
    throw new KubeconfigError(
      `Expected ${path} to be a YAML kubeconfig: ${(error as Error).message}`,
    );
  }
  const contextName = config?.["current-context"];
  const contexts: Named<{ context: { cluster: string; user?: string; namespace?: string } }> =
    config?.contexts ?? [];
  const context = contexts.find((entry) => entry.name === contextName)?.context;
  if (!context) {
    throw new KubeconfigError(
      `Expected ${path} to have a current-context naming one of its contexts, got "${
        contextName ?? ""
      }"`,
    );
  }
  const clusters: Named<{ cluster: Record<string, string | boolean> }> = config.clusters ?? [];
  const cluster = clusters.find((entry) => entry.name === context.cluster)?.cluster;
  if (!cluster || typeof cluster.server !== "string") {
    throw new KubeconfigError(
      `Expected ${path} to define cluster "${context.cluster}" with a server`,
    );
  }
  const users: Named<{ user: Record<string, unknown> }> = config.users ?? [];
  const user = (context.user ? users.find((entry) => entry.name === context.user)?.user : {}) ?? {};
  if (user.exec || user["auth-provider"]) {
    throw new KubeconfigError(
      `Expected user "${context.user}" of ${path} to use a token or a client certificate: ` +
        "exec and auth-provider plugins are not supported",
    );
  }
  if (cluster["insecure-skip-tls-verify"] === true) {
    throw new KubeconfigError(
      `Expected cluster "${context.cluster}" of ${path} to verify TLS: insecure-skip-tls-verify is not supported`,
    );
  }
  const files = [path];
  const base = dirname(path);
  const material = (inline: unknown, file: unknown, what: string): string | undefined => {
    if (typeof inline === "string" && inline !== "") return atobText(inline, what);
    if (typeof file === "string" && file !== "") {
      const full = isAbsolute(file) ? file : resolve(base, file);
      files.push(full);
      try {
        return Deno.readTextFileSync(full);
      } catch (error) {
        throw new KubeconfigError(`Expected ${what} at ${full}: ${(error as Error).message}`);
      }
    }
    return undefined;
  };
  let url: URL;
  try {
    url = new URL(cluster.server);
  } catch {
    throw new KubeconfigError(
      `Expected cluster "${context.cluster}" to have a server URL, got "${cluster.server}"`,
    );
  }
  const port = url.port || (url.protocol === "https:" ? "443" : "80");
  const token = typeof user.token === "string"
    ? user.token
    : material(undefined, user.tokenFile, "a token file")?.trim();
  return {
    server: `${url.protocol}//${url.host}`,
    address: `${url.hostname}:${port}`,
    namespace: context.namespace ?? "default",
    token,
    caPem: material(
      cluster["certificate-authority-data"],
      cluster["certificate-authority"],
      "a CA file",
    ),
    certPem: material(
      user["client-certificate-data"],
      user["client-certificate"],
      "a client certificate",
    ),
    keyPem: material(user["client-key-data"], user["client-key"], "a client key"),
    files,
    env: found.env,
    source: path,
  };
}

function atobText(value: string, what: string): string {
  try {
    return new TextDecoder().decode(Uint8Array.from(atob(value), (char) => char.charCodeAt(0)));
  } catch {
    throw new KubeconfigError(`Expected ${what} as base64`);
  }
}
