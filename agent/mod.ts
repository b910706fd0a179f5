/**
 * runnel's cluster mode as a library (`@runnel/runnel/cluster`): the etcd
 * store and election, the server, the worker agent and the API client. Kept
 * apart from the main entry so that local mode does not load gRPC and etcd.
 *
 * @example
 * ```ts ignore
 * import { openEtcdCluster, startServer } from "@runnel/runnel/cluster";
 * const etcd = await openEtcdCluster({ endpoints: ["http://127.0.0.1:2379"] });
 * const server = await startServer({
 *   serverId: "cp-1",
 *   ...etcd,
 *   http: { hostname: "127.0.0.1", port: 8080 },
 *   grpc: { address: "127.0.0.1:7070" },
 *   token: Deno.env.get("RUNNEL_TOKEN")!,
 * });
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
export { RunClient, ServerRequestError } from "./client/mod.ts";
export { openEtcdCluster, schedulerElection } from "./server/etcd.ts";
export { runScheduler, type SchedulerOptions } from "./server/scheduler.ts";
export { clientCredentials, serverCredentials } from "../proto/mod.ts";
