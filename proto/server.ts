/**
 * The server side of the agent stream: {@link serveAgentService} listens
 * for agents and hands each stream to the caller.
 *
 * @module
 */

import * as grpc from "npm:@grpc/grpc-js@1.14.7";
import type { AgentMessage, ServerMessageInit } from "./messages.ts";
import { agentService, DEFAULT_KEEPALIVE_MS, KEEPALIVE_TIMEOUT_MS } from "./service.ts";
import { type AgentConnection, GrpcMessageStream, type RawCall } from "./stream.ts";

/** Options of {@link serveAgentService}. */
export interface ServeAgentServiceOptions {
  /** `host:port` to listen on; port 0 picks a free one. */
  address: string;
  /** TLS (`serverCredentials`); plain TCP when absent. */
  credentials?: grpc.ServerCredentials;
  /**
   * Called for every agent stream. The stream is the caller's: iterate it,
   * answer, end it. A promise that rejects breaks the stream.
   */
  onConnect(stream: AgentConnection): void | Promise<void>;
  /** Keepalive ping period towards agents (default {@link DEFAULT_KEEPALIVE_MS}). */
  keepaliveMs?: number;
}

/** A listening AgentService. */
export interface AgentServiceServer {
  /** The bound port. */
  port: number;
  /**
   * Stops listening and breaks the streams still open (the agents see their
   * stream fail, as with a dead server). With `graceMs`, streams first get
   * that long to end by themselves.
   */
  close(options?: { graceMs?: number }): Promise<void>;
}

/**
 * Serves `AgentService.Connect` on `options.address`.
 *
 * @example A server that turns every agent away
 * ```ts
 * import assert from "node:assert/strict";
 * import { openAgentStream, serveAgentService } from "./mod.ts";
 *
 * const server = await serveAgentService({
 *   address: "127.0.0.1:0",
 *   onConnect: (agent) => agent.cancel("no agents wanted"),
 * });
 * assert.notEqual(server.port, 0); // port 0 picked a free one
 * const stream = openAgentStream(`127.0.0.1:${server.port}`);
 * await stream.send({ hello: { agentId: "a1" } });
 * assert.deepEqual(await Array.fromAsync(stream), []); // nothing comes
 * assert.equal((await stream.closed).reason, "no agents wanted");
 * await server.close();
 * ```
 */
export async function serveAgentService(
  options: ServeAgentServiceOptions,
): Promise<AgentServiceServer> {
  const keepaliveMs = options.keepaliveMs ?? DEFAULT_KEEPALIVE_MS;
  const server = new grpc.Server({
    "grpc.keepalive_time_ms": keepaliveMs,
    "grpc.keepalive_timeout_ms": KEEPALIVE_TIMEOUT_MS,
  });
  const streams = new Set<GrpcMessageStream<AgentMessage, ServerMessageInit>>();
  server.addService(agentService().service, {
    Connect(call: RawCall) {
      const stream = new GrpcMessageStream<AgentMessage, ServerMessageInit>(
        call,
        "server",
        call.getPeer(),
      );
      streams.add(stream);
      stream.closed.then(() => streams.delete(stream));
      try {
        Promise.resolve(options.onConnect(stream)).catch((error) =>
          stream.cancel(error instanceof Error ? error.message : String(error))
        );
      } catch (error) {
        stream.cancel(error instanceof Error ? error.message : String(error));
      }
    },
  });
  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync(
      options.address,
      options.credentials ?? grpc.ServerCredentials.createInsecure(),
      (error, bound) => error ? reject(error) : resolve(bound),
    );
  });
  let closing: Promise<void> | undefined;
  return {
    port,
    close(closeOptions = {}) {
      closing ??= (async () => {
        const graceMs = closeOptions.graceMs ?? 0;
        if (graceMs > 0) {
          let timer: ReturnType<typeof setTimeout> | undefined;
          await Promise.race([
            new Promise<void>((resolve) => server.tryShutdown(() => resolve())),
            new Promise<void>((resolve) => timer = setTimeout(resolve, graceMs)),
          ]);
          clearTimeout(timer);
        }
        for (const stream of streams) stream.cancel("the server is shutting down");
        server.forceShutdown();
        await Promise.all([...streams].map((stream) => stream.closed));
      })();
      return closing;
    },
  };
}
