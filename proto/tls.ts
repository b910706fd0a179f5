/**
 * TLS for the agent stream, from PEM files: {@link serverCredentials} for
 * `runnel server`, {@link clientCredentials} for `runnel agent`.
 *
 * @module
 */

import { Buffer } from "node:buffer";
import * as grpc from "npm:@grpc/grpc-js@1.14.7";

/** PEM files of a server's TLS identity. */
export interface ServerTlsFiles {
  /** CA bundle agents' client certificates must chain to; when given, agents must present one. */
  ca?: string;
  /** The server's certificate chain. */
  cert: string;
  /** The server's private key. */
  key: string;
}

/** A TLS-related problem a user can fix (a missing or unreadable PEM file). */
export class TlsConfigError extends Error {
  /** Stable error code. */
  readonly code = "bad_tls_config";

  /** Builds the error from a full sentence. */
  constructor(message: string) {
    super(message);
    this.name = "TlsConfigError";
  }
}

/**
 * TLS credentials for `serveAgentService`, from PEM file paths. With
 * `ca`, the server asks agents for a client certificate signed by it.
 *
 * @example A file missing, as `runnel server --tls-cert --tls-key` reports it
 * ```ts
 * import assert from "node:assert/strict";
 * import { serverCredentials, TlsConfigError } from "./mod.ts";
 *
 * assert.throws(
 *   () => serverCredentials({ cert: "/nonexistent/server.pem", key: "/nonexistent/key.pem" }),
 *   (error) =>
 *     error instanceof TlsConfigError && error.code === "bad_tls_config" &&
 *     error.message.startsWith("Expected a readable PEM file for --tls-cert at /nonexistent/"),
 * );
 * ```
 */
export function serverCredentials(files: ServerTlsFiles): grpc.ServerCredentials {
  const ca = files.ca ? readPem(files.ca, "--tls-ca") : undefined;
  const certChain = readPem(files.cert, "--tls-cert");
  return grpc.ServerCredentials.createSsl(
    // Under Deno a secure server without any `ca` answers in plain text
    // ("wrong version number" at the agent). The CA only checks client
    // certificates, which are not asked for without one, so the server's
    // own chain stands in.
    ca ?? certChain,
    [{ cert_chain: certChain, private_key: readPem(files.key, "--tls-key") }],
    ca !== undefined,
  );
}

/** PEM files of an agent's TLS settings. */
export interface ClientTlsFiles {
  /** CA bundle the server's certificate must chain to (default: the system's roots). */
  ca?: string;
  /** The agent's certificate, for servers that require client certificates. */
  cert?: string;
  /** The agent's private key (with `cert`). */
  key?: string;
  /** Name the server's certificate must carry (default: the host dialled). */
  serverName?: string;
}

/** TLS settings of an agent, read from PEM files by {@link clientCredentials}. */
export interface ClientCredentials {
  ca?: Buffer;
  cert?: Buffer;
  key?: Buffer;
  serverName?: string;
}

/**
 * TLS settings for `openAgentStream`, from PEM file paths.
 *
 * @example A server whose certificate chains to the system's roots
 * ```ts
 * import assert from "node:assert/strict";
 * import { clientCredentials } from "./mod.ts";
 *
 * // No file to read: the certificate must carry the name "runnel.example".
 * assert.deepEqual(clientCredentials({ serverName: "runnel.example" }), {
 *   serverName: "runnel.example",
 * });
 * // A client certificate needs its key.
 * assert.throws(
 *   () => clientCredentials({ cert: "agent.pem" }),
 *   /Expected both a client certificate and its key/,
 * );
 * ```
 */
export function clientCredentials(files: ClientTlsFiles): ClientCredentials {
  if ((files.cert === undefined) !== (files.key === undefined)) {
    throw new TlsConfigError(
      "Expected both a client certificate and its key (--tls-cert and --tls-key), or neither",
    );
  }
  return {
    ...(files.ca ? { ca: readPem(files.ca, "--tls-ca") } : {}),
    ...(files.cert ? { cert: readPem(files.cert, "--tls-cert") } : {}),
    ...(files.key ? { key: readPem(files.key, "--tls-key") } : {}),
    ...(files.serverName ? { serverName: files.serverName } : {}),
  };
}

function readPem(path: string, flag: string): Buffer {
  let text: string;
  try {
    text = Deno.readTextFileSync(path);
  } catch (error) {
    throw new TlsConfigError(
      `Expected a readable PEM file for ${flag} at ${path}: ${(error as Error).message}`,
    );
  }
  if (!text.includes("-----BEGIN ")) {
    throw new TlsConfigError(`Expected a PEM file for ${flag} at ${path}, found no "-----BEGIN"`);
  }
  return Buffer.from(text);
}
