/**
 * A `runnel server` in the test's own process, on an embedded store in a
 * file, listening on free loopback ports; disposing it closes both.
 *
 * @module
 */

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
