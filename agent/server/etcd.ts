/**
 * Cluster mode on etcd: the etcd engine of the store, its Raft status, and
 * the scheduler election with its fence, as `runnel server --etcd` uses
 * them.
 *
 * @module
 */

import { createElection } from "../../consensus/election.ts";
import { type EtcdStoreOptions, openEtcdStore } from "../../consensus/etcd.ts";
import type { Store } from "../../consensus/store.ts";
import { clusterKeys } from "./keys.ts";
import type { RaftState } from "./metrics.ts";
import type { LeaderElection } from "./mod.ts";
import type { MemberMaintenance } from "./maintenance.ts";

/** How long a scheduling server that stopped renewing keeps the lead (its lease TTL). */
export const SCHEDULER_LEASE_MS = 3_000;

/** The scheduler election over any store (etcd in a cluster). */
export function schedulerElection(store: Store, ttlMs = SCHEDULER_LEASE_MS): LeaderElection {
  return {
    async campaign(candidate, signal) {
      const election = createElection(store, {
        prefix: clusterKeys.electionPrefix,
        candidate,
        ttlMs,
      });
      const leadership = await election.campaign({ signal });
      return {
        fence: [leadership.fence()],
        lost: leadership.signal,
        resign: () => leadership.resign(),
      };
    },
    async leader() {
      const election = createElection(store, {
        prefix: clusterKeys.electionPrefix,
        candidate: "",
        ttlMs,
      });
      return (await election.leader())?.candidate;
    },
  };
}

/** What {@link openEtcdCluster} opens: the parts of a server's options etcd provides, and a close. */
export interface EtcdCluster {
  store: Store;
  election: LeaderElection;
  raftState: () => Promise<RaftState>;
  /** The members' sizes and their defragmentation (`maintenance.ts`). */
  members: MemberMaintenance;
  /** Closes the store's connections. */
  close(): Promise<void>;
}

/** Opens the etcd store, its election and its Raft status for a server. */
export async function openEtcdCluster(
  options: EtcdStoreOptions & { electionTtlMs?: number },
): Promise<EtcdCluster> {
  const store = await openEtcdStore(options);
  return {
    store: store as Store,
    election: schedulerElection(store, options.electionTtlMs),
    raftState: async (): Promise<RaftState> => {
      const state = await store.raftState();
      return {
        node_id: state.node_id,
        state: state.state,
        leader: state.leader,
        term: state.term,
        commit_index: state.commit_index,
      };
    },
    members: store,
    close: () => store.close(),
  };
}
