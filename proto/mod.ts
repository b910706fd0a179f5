/**
 * The gRPC glue of cluster mode: `proto/runnel.proto` loaded with
 * `npm:@grpc/proto-loader`, served and dialled with `npm:@grpc/grpc-js`,
 * and typed.
 *
 * One bidirectional stream per agent (`AgentService.Connect`). Both ends get
 * the raw grpc-js duplex wrapped in a {@link MessageStream}: `send` with
 * back-pressure, `for await` over incoming messages, `end` for a clean
 * finish, `cancel` to break it, and `closed` saying how it ended.
 *
 * By concern:
 * - `messages.ts`: the messages, their interfaces written from the .proto
 *   into `_messages.ts` by `deno task proto` (`_gen.ts`), and the JSON some
 *   of them carry;
 * - `stream.ts`: {@link MessageStream} over a grpc-js call;
 * - `server.ts` and `client.ts`: {@link serveAgentService} and
 *   {@link openAgentStream}, over `definition.ts` and `service.ts` (the
 *   .proto, its loader options, the shared keepalive);
 * - `tls.ts`: credentials from PEM files.
 *
 * grpc-js is pinned to 1.14.7: 1.13.0 cannot connect under Deno
 * (denoland/deno#28566). `proto/mod_test.ts` opens a real stream.
 *
 * @example An agent says Hello, the server answers Welcome, both end
 * ```ts
 * import assert from "node:assert/strict";
 * import { openAgentStream, serveAgentService, type Welcome } from "./mod.ts";
 *
 * const server = await serveAgentService({
 *   address: "127.0.0.1:0",
 *   async onConnect(agent) {
 *     for await (const message of agent) {
 *       if (message.body === "hello") {
 *         await agent.send({ welcome: { serverId: "s1", heartbeatIntervalMs: 5_000 } });
 *       }
 *     }
 *     agent.end();
 *   },
 * });
 * const stream = openAgentStream(`127.0.0.1:${server.port}`);
 * await stream.send({ hello: { agentId: "a1", token: "secret" } });
 * const welcomes: Welcome[] = [];
 * for await (const message of stream) {
 *   if (message.body === "welcome") welcomes.push(message.welcome);
 *   stream.end();
 * }
 * // Fields the server left out arrive with their defaults.
 * assert.deepEqual(welcomes, [
 *   { serverId: "s1", heartbeatIntervalMs: 5_000, servers: [], credential: "" },
 * ]);
 * assert.equal((await stream.closed).ok, true);
 * await server.close();
 * ```
 *
 * @module
 */

export type * from "./messages.ts";
export { PROTO_FILE } from "./definition.ts";
export { DEFAULT_KEEPALIVE_MS } from "./service.ts";
export {
  type AgentConnection,
  GrpcStatus,
  type MessageStream,
  type ServerConnection,
  type StreamEnd,
} from "./stream.ts";
export {
  type AgentServiceServer,
  serveAgentService,
  type ServeAgentServiceOptions,
} from "./server.ts";
export { openAgentStream, type OpenAgentStreamOptions } from "./client.ts";
export {
  type ClientCredentials,
  clientCredentials,
  type ClientTlsFiles,
  serverCredentials,
  type ServerTlsFiles,
  TlsConfigError,
} from "./tls.ts";
