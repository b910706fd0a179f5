/**
 * runnel's cluster mode as a library (`@runnel/runnel/cluster`): the etcd
 * store and election, the server, the worker agent and the API client. Kept
 * apart from the main entry so that local mode does not load gRPC and etcd.
 *
 * @example A server on an embedded store, an agent that joins it, API tokens
 * ```ts
 * import assert from "node:assert/strict";
 * import { openMemoryStore } from "../mod.ts";
 * import { openLocalArtifactStore } from "../core/artifacts/local.ts";
 * import {
 *   RunClient,
 *   ServerRequestError,
 *   standaloneElection,
 *   startAgent,
 *   startServer,
 * } from "./mod.ts";
 *
 * const dir = await Deno.makeTempDir();
 * const admin = crypto.randomUUID(); // what --admin-token-file would hold
 * const server = await startServer({
 *   serverId: "cp-1",
 *   store: openMemoryStore(),
 *   election: standaloneElection(),
 *   http: { hostname: "127.0.0.1", port: 0 },
 *   grpc: { address: "127.0.0.1:0" },
 *   token: "s3cret",
 *   adminToken: admin,
 *   log: () => {},
 * });
 * const agent = await startAgent({
 *   servers: [`127.0.0.1:${server.grpcPort}`],
 *   token: "s3cret",
 *   labels: { cloud: "gcp" },
 *   stateDir: `${dir}/agent`,
 *   artifacts: openLocalArtifactStore(`${dir}/artifacts`),
 *   log: () => {},
 * });
 * assert.ok(agent.connected);
 * const api = `http://127.0.0.1:${server.httpPort}`;
 * const { token } = await new RunClient([api], { token: admin })
 *   .createToken({ name: "ci", role: "submit" });
 * const client = new RunClient([api], { token });
 * assert.deepEqual(await client.runs(), []);
 * await assert.rejects(
 *   new RunClient([api]).runs(),
 *   (error) => error instanceof ServerRequestError && error.status === 401,
 * );
 * await agent.stop();
 * await server.close();
 * await Deno.remove(dir, { recursive: true });
 * ```
 *
 * @module
 */

export {
  type EtcdStore,
  type EtcdStoreOptions,
  etcdTimingForRtt,
  type EtcdTlsOptions,
  openEtcdStore,
  StoreUnavailableError,
} from "../consensus/etcd.ts";
export {
  createElection,
  type Election,
  type ElectionOptions,
  type Leadership,
  NotLeaderError,
} from "../consensus/election.ts";
export {
  type LeaderElection,
  type RunningServer,
  type ServerListener,
  ServerListenError,
  type ServerOptions,
  standaloneElection,
  startServer,
} from "./server/mod.ts";
export {
  type AgentOptions,
  AgentRejectedError,
  type RunningAgent,
  startAgent,
} from "./worker/mod.ts";
export {
  type IssuedToken,
  RunClient,
  type RunClientOptions,
  ServerRequestError,
} from "./client/mod.ts";
export {
  type Caller,
  type CreatedToken,
  createToken,
  type CreateTokenOptions,
  listTokens,
  revokeToken,
  type Role,
  ROLES,
  type TokenInfo,
} from "./server/auth.ts";
export { WebhookAllowList } from "./effects.ts";
export { openEtcdCluster, schedulerElection } from "./server/etcd.ts";
export { runScheduler, type SchedulerOptions } from "./server/scheduler.ts";
export { clientCredentials, serverCredentials } from "../proto/mod.ts";
