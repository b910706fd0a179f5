/**
 * A `runnel server` in the test's own process, on an embedded store in a
 * file, listening on free loopback ports; disposing it closes both.
 *
 * @module
 */

import { RunClient } from "../agent/client/mod.ts";
import { openEmbeddedStore } from "../consensus/embedded.ts";
import type { Store } from "../consensus/store.ts";
import {
  type RunningServer,
  type ServerOptions,
  standaloneElection,
  startServer,
} from "../agent/server/mod.ts";

/** A started in-process server and its store. */
export interface TestServer extends AsyncDisposable {
  server: RunningServer;
  store: Store;
  /** `http://127.0.0.1:<port>` of its API. */
  http: string;
}

/** Starts a server over `dbPath`; `options` add to or replace the defaults. */
export async function startTestServer(
  dbPath: string,
  options: Partial<ServerOptions> & Pick<ServerOptions, "token">,
): Promise<TestServer> {
  const store = openEmbeddedStore(dbPath);
  const server = await startServer({
    serverId: "test-server",
    store,
    election: standaloneElection(),
    http: { hostname: "127.0.0.1", port: 0 },
    grpc: { address: "127.0.0.1:0" },
    log: () => {},
    ...options,
  });
  return {
    server,
    store,
    http: `http://127.0.0.1:${server.httpPort}`,
    async [Symbol.asyncDispose]() {
      await server.close();
      await store.close();
    },
  };
}

/** An in-process server with one in-process shell agent, and an admin client. */
export interface TestCluster extends AsyncDisposable {
  server: TestServer;
  client: RunClient;
  /** The admin token. */
  admin: string;
}

/** Starts a server over `${dir}/state.db` and an agent (`worker-1`, shell allowed, 2 slots). */
export async function startTestCluster(
  dir: string,
  name: string,
  agent: { slots?: number } = {},
): Promise<TestCluster> {
  const token = `${name}-join-token-0123456789`;
  const admin = `${name}-admin-token-0123456789`;
  const server = await startTestServer(`${dir}/state.db`, { token, adminToken: admin });
  const { startAgent } = await import("../agent/worker/mod.ts");
  const { openLocalArtifactStore } = await import("../core/artifacts/local.ts");
  const worker = await startAgent({
    servers: [`127.0.0.1:${server.server.grpcPort}`],
    token,
    agentId: "worker-1",
    slots: agent.slots ?? 2,
    allowShell: true,
    stateDir: `${dir}/agent`,
    artifacts: openLocalArtifactStore(`${dir}/artifacts`),
    log: () => {},
  });
  return {
    server,
    client: new RunClient([server.http], { token: admin }),
    admin,
    async [Symbol.asyncDispose]() {
      await worker.stop();
      await server[Symbol.asyncDispose]();
    },
  };
}
