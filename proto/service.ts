/**
 * `AgentService` as grpc-js loads it from `proto/runnel.proto`, and the
 * connection settings both ends share.
 *
 * @module
 */

import * as grpc from "npm:@grpc/grpc-js@1.14.7";
import * as protoLoader from "npm:@grpc/proto-loader@0.8.1";
import { LOADER_OPTIONS, PROTO_FILE } from "./definition.ts";

/**
 * Keepalive pings on an idle connection, so that a server (or agent) that
 * vanished without closing its socket is noticed within seconds instead of
 * at the next write's TCP timeout.
 */
export const DEFAULT_KEEPALIVE_MS = 10_000;
/** How long a keepalive ping may go unanswered before the connection is dropped. */
export const KEEPALIVE_TIMEOUT_MS = 5_000;

let serviceConstructor: grpc.ServiceClientConstructor | undefined;

/** The AgentService client constructor (its `.service` is the server definition). */
export function agentService(): grpc.ServiceClientConstructor {
  if (!serviceConstructor) {
    const definition = protoLoader.loadSync(PROTO_FILE, LOADER_OPTIONS);
    const root = grpc.loadPackageDefinition(definition) as unknown as {
      runnel: { v1: { AgentService: grpc.ServiceClientConstructor } };
    };
    serviceConstructor = root.runnel.v1.AgentService;
  }
  return serviceConstructor;
}
