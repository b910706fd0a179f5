/**
 * The agent side of the agent stream: {@link openAgentStream} dials a
 * server, over TLS when given {@link ClientCredentials}.
 *
 * @module
 */

import { isIP } from "node:net";
import { checkServerIdentity, type PeerCertificate } from "node:tls";
import * as grpc from "npm:@grpc/grpc-js@1.14.7";
import type { AgentMessageInit, ServerMessage } from "./messages.ts";
import { agentService, DEFAULT_KEEPALIVE_MS, KEEPALIVE_TIMEOUT_MS } from "./service.ts";
import { GrpcMessageStream, type RawCall, type ServerConnection } from "./stream.ts";
import type { ClientCredentials } from "./tls.ts";

/**
 * The largest message an agent takes from its server: an assignment may
 * carry a shipped pipeline directory (`agent/bundle.ts`, at most 8 MiB,
 * ≈ 11 MiB as base64 in JSON), past grpc-js's default of 4 MiB. The
 * server is trusted; what agents send it keeps the default.
 */
const MAX_SERVER_MESSAGE_BYTES = 16 * 1024 * 1024;

/** Options of {@link openAgentStream}. */
export interface OpenAgentStreamOptions {
  /** TLS (`clientCredentials`); plain TCP when absent. */
  credentials?: ClientCredentials;
  /** Keepalive ping period (default {@link DEFAULT_KEEPALIVE_MS}). */
  keepaliveMs?: number;
}

/**
 * Opens the agent stream to a server at `address` (`host:port`; a
 * `grpc://`, `grpcs://`, `http://` or `https://` prefix is ignored). The
 * connection is made on first use; a server that cannot be reached shows as
 * a stream that closes with `UNAVAILABLE`.
 *
 * @example A server that is not there
 * ```ts
 * import assert from "node:assert/strict";
 * import { GrpcStatus, openAgentStream } from "./mod.ts";
 *
 * // Nothing listens on port 1.
 * const stream = openAgentStream("grpc://127.0.0.1:1");
 * await stream.send({ hello: { agentId: "a1", token: "secret", slots: 2 } });
 * assert.deepEqual(await Array.fromAsync(stream), []); // nothing comes
 * assert.equal((await stream.closed).code, GrpcStatus.UNAVAILABLE);
 * assert.equal(stream.open, false);
 * ```
 */
export function openAgentStream(
  address: string,
  options: OpenAgentStreamOptions = {},
): ServerConnection {
  const target = address.replace(/^(grpcs?|https?):\/\//, "").replace(/\/+$/, "");
  const keepaliveMs = options.keepaliveMs ?? DEFAULT_KEEPALIVE_MS;
  const channelOptions: grpc.ChannelOptions = {
    "grpc.keepalive_time_ms": keepaliveMs,
    "grpc.keepalive_timeout_ms": KEEPALIVE_TIMEOUT_MS,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.max_receive_message_length": MAX_SERVER_MESSAGE_BYTES,
  };
  let credentials = grpc.credentials.createInsecure();
  if (options.credentials) {
    const host = hostOf(target);
    const tls = options.credentials;
    const serverName = tls.serverName ?? host;
    credentials = grpc.credentials.createSsl(tls.ca ?? null, tls.key ?? null, tls.cert ?? null, {
      // Checked against the name or IP address the caller dialled (or the
      // configured server name), whatever name goes into SNI below.
      checkServerIdentity: (_host: string, certificate: PeerCertificate) =>
        checkServerIdentity(serverName, certificate),
    });
    // Deno refuses an IP address as the TLS server name (SNI), which grpc-js
    // passes by default: send the name "localhost" instead; the certificate is
    // still checked against the IP address above.
    channelOptions["grpc.ssl_target_name_override"] = isIP(serverName) ? "localhost" : serverName;
  }
  const Client = agentService();
  const client = new Client(target, credentials, channelOptions);
  const call = (client as unknown as { Connect(): RawCall }).Connect();
  const stream = new GrpcMessageStream<ServerMessage, AgentMessageInit>(call, "client", target);
  stream.closed.then(() => client.close());
  return stream;
}

function hostOf(target: string): string {
  if (target.startsWith("[")) return target.slice(1, target.indexOf("]"));
  const colon = target.lastIndexOf(":");
  return colon > 0 && target.indexOf(":") === colon ? target.slice(0, colon) : target;
}
