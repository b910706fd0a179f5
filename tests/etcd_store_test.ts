/**
 * The etcd engine against real 3-member etcd clusters on loopback: the
 * shared conformance suite, then faults — members SIGKILLed and restarted
 * under watches, elections and CAS writers.
 *
 * @module
 */

import assert from "node:assert/strict";
import { mulberry32, testSeed } from "../core/_random.ts";
import { storeConformance } from "../consensus/conformance.ts";
import { createElection, type Leadership, NotLeaderError } from "../consensus/election.ts";
import {
  type EtcdStore,
  etcdTimingForRtt,
  openEtcdStore,
  StoreUnavailableError,
} from "../consensus/etcd.ts";
import {
  CompactedError,
  LeaseNotFoundError,
  type Store,
  type WatchEvent,
} from "../consensus/store.ts";
import { type EtcdCluster, ignoreWithoutEtcd, startEtcdCluster } from "./_etcd.ts";
import { poll } from "./_helpers.ts";

const ignore = ignoreWithoutEtcd();

/** Options of every test here: etcd clients keep sockets and timers beyond a test. */
const etcdTest = { ignore, sanitizeOps: false, sanitizeResources: false };

/** One cluster for the conformance tests, each test in its own namespace. */
let shared: Promise<EtcdCluster> | undefined;
let namespaces = 0;

function sharedCluster(): Promise<EtcdCluster> {
  shared ??= startEtcdCluster({ members: 3 });
  return shared;
}

// Teardown is a hook, not a test: it is not counted, and it runs however
// the tests were filtered. `stop` kills each member through its process
// handle (by pid) and waits for it to exit.
Deno.test.afterAll(async () => {
  if (shared) await (await shared).stop();
});

async function openShared(): Promise<EtcdStore> {
  const cluster = await sharedCluster();
  return await openEtcdStore({
    endpoints: cluster.endpoints,
    namespace: `conformance/${namespaces++}/`,
  });
}

if (!ignore) storeConformance("etcd 3 members", openShared, { sanitize: false });

/**
 * A write forwarded to a leader that dies is answered only at the request
 * timeout (etcd's own is 5 s + 2 election timeouts): short in fault tests.
 */
const FAULT_REQUEST_TIMEOUT_MS = 1_500;

/** A store that knows only these members, and talks to the first while it answers. */
function openAt(cluster: EtcdCluster, members: number[]): Promise<EtcdStore> {
  return openEtcdStore({
    endpoints: members.map((member) => cluster.endpoints[member]),
    requestTimeoutMs: FAULT_REQUEST_TIMEOUT_MS,
  });
}

/** All members, `first` first. */
function startingAt(first: number): number[] {
  return [0, 1, 2].map((offset) => (first + offset) % 3);
}

/**
 * Creates `key` exactly once, even across failovers: a create-if-absent txn,
 * retried when etcd may not have applied it; a retry that finds the key
 * already there with this value means an earlier attempt did.
 */
async function createOnce(store: Store, key: string, value: string): Promise<void> {
  await poll(async () => {
    try {
      const { succeeded } = await store.txn({
        compare: [{ key, target: "create", op: "==", value: 0 }],
        success: [{ type: "put", key, value }],
      });
      if (!succeeded) assert.equal((await store.get(key))?.value, value);
      return true;
    } catch (error) {
      if (error instanceof StoreUnavailableError) return undefined;
      throw error;
    }
  }, { timeoutMs: 15_000, what: `${key} created` });
}

/** Collects a watch's events in the background; `error` is set if it fails. */
function collect(store: Store, prefix: string, fromRevision: number) {
  const controller = new AbortController();
  const state = { events: [] as WatchEvent[], error: undefined as unknown };
  const done = (async () => {
    try {
      for await (const event of store.watch(prefix, { fromRevision, signal: controller.signal })) {
        state.events.push(event);
      }
    } catch (error) {
      state.error = error;
    }
  })();
  return {
    state,
    /** Waits until `count` events arrived (or the watch failed). */
    async waitFor(count: number, what: string): Promise<void> {
      await poll(
        () => (state.events.length >= count || state.error !== undefined ? true : undefined),
        { timeoutMs: 20_000, what },
      );
      if (state.error !== undefined) throw state.error;
    },
    async stop(): Promise<void> {
      controller.abort();
      await done;
    },
  };
}

Deno.test({
  ...etcdTest,
  name: "etcd: raftState reports the member a store talks to",
  async fn() {
    const cluster = await sharedCluster();
    const leader = await cluster.leader();
    const follower = (leader + 1) % cluster.endpoints.length;
    const atLeader = await openAt(cluster, startingAt(leader));
    const atFollower = await openAt(cluster, startingAt(follower));
    try {
      const leaderState = await atLeader.raftState();
      const followerState = await atFollower.raftState();
      assert.equal(leaderState.state, "leader");
      assert.equal(leaderState.leader, leaderState.node_id);
      assert.equal(leaderState.endpoint, cluster.endpoints[leader]);
      assert.equal(followerState.state, "follower");
      assert.equal(followerState.leader, leaderState.node_id);
      assert.notEqual(followerState.node_id, leaderState.node_id);
      assert.ok(followerState.term >= 1 && followerState.commit_index > 0);
    } finally {
      await atLeader.close();
      await atFollower.close();
    }
  },
});

Deno.test({
  ...etcdTest,
  name: "etcd: namespaces isolate stores sharing a cluster; the empty prefix spans one",
  async fn() {
    const cluster = await sharedCluster();
    const first = await openEtcdStore({ endpoints: cluster.endpoints, namespace: "ns-a/" });
    const second = await openEtcdStore({ endpoints: cluster.endpoints, namespace: "ns-b/" });
    const whole = await openEtcdStore({ endpoints: cluster.endpoints });
    const controller = new AbortController();
    try {
      const watch = first.watch("", { signal: controller.signal })[Symbol.asyncIterator]();
      await second.put("k", "b");
      const revision = await first.put("k", "a");
      const event = await watch.next();
      assert.deepEqual([event.value?.key, event.value?.value, event.value?.revision], [
        "k",
        "a",
        revision,
      ]);
      assert.deepEqual((await first.list("")).items.map((kv) => [kv.key, kv.value]), [["k", "a"]]);
      assert.equal((await second.get("k"))?.value, "b");
      // No namespace: the empty prefix is every key of the cluster.
      const keys = (await whole.list("")).items.map((kv) => kv.key);
      assert.ok(keys.includes("ns-a/k") && keys.includes("ns-b/k"));
      assert.equal((await whole.list("", { limit: 1 })).items.length, 1);
      controller.abort();
      await watch.return?.();
    } finally {
      for (const store of [first, second, whole]) await store.close();
    }
  },
});

Deno.test({
  ...etcdTest,
  name: "etcd: compact reports a revision already compacted, and a future one",
  async fn() {
    const cluster = await sharedCluster();
    const store = await openEtcdStore({ endpoints: cluster.endpoints, namespace: "compact/" });
    try {
      await store.put("a", "1");
      const compactAt = await store.put("a", "2");
      await store.put("a", "3");
      await store.compact(compactAt);
      await assert.rejects(store.compact(compactAt - 1), (error: unknown) => {
        assert.ok(error instanceof CompactedError);
        assert.equal(error.compactRevision, compactAt);
        assert.equal(error.requestedRevision, compactAt - 1);
        return true;
      });
      await assert.rejects(store.compact((await store.revision()) + 10), {
        code: "future_revision",
      });
    } finally {
      await store.close();
    }
  },
});

Deno.test("etcd: timing follows the tuning guide for a round trip", () => {
  assert.deepEqual(etcdTimingForRtt(125), { heartbeatMs: 125, electionMs: 1250 });
  assert.deepEqual(etcdTimingForRtt(0.2), { heartbeatMs: 10, electionMs: 100 });
});

Deno.test({
  ...etcdTest,
  name: "etcd: a watch resumes across SIGKILL and restart of its member, no gap, no duplicate",
  async fn() {
    await using cluster = await startEtcdCluster({ members: 3 });
    // One watcher can reach only member 0 (it must wait for the restart),
    // one can fail over; the writer never talks to member 0.
    const pinned = await openAt(cluster, [0]);
    const roaming = await openAt(cluster, [0, 1, 2]);
    const writer = await openAt(cluster, [1, 2]);
    const watches = [] as ReturnType<typeof collect>[];
    try {
      const start = (await writer.revision()) + 1;
      watches.push(collect(pinned, "w/", start), collect(roaming, "w/", start));
      const total = 30;
      for (let i = 0; i < total; i++) {
        if (i === 10) {
          for (const watch of watches) await watch.waitFor(10, "10 events before the kill");
          await cluster.kill(0);
        }
        if (i === 20) await cluster.restart(0);
        await createOnce(writer, `w/${String(i).padStart(2, "0")}`, String(i));
      }
      for (const watch of watches) {
        await watch.waitFor(total, `${total} events`);
        const keys = watch.state.events.map((event) => event.key);
        assert.deepEqual(
          keys,
          Array.from({ length: total }, (_, i) => `w/${String(i).padStart(2, "0")}`),
        );
        const revisions = watch.state.events.map((event) => event.revision);
        assert.ok(revisions.every((revision, i) => i === 0 || revision > revisions[i - 1]));
      }
    } finally {
      for (const watch of watches) await watch.stop();
      for (const store of [pinned, roaming, writer]) await store.close();
    }
  },
});

Deno.test({
  ...etcdTest,
  name: "etcd: a watcher whose history was compacted while it was cut off relists and resumes",
  async fn() {
    await using cluster = await startEtcdCluster({ members: 3 });
    const watcherStore = await openAt(cluster, [0]);
    const writer = await openAt(cluster, [1, 2]);
    let watch: ReturnType<typeof collect> | undefined;
    try {
      const start = (await writer.revision()) + 1;
      watch = collect(watcherStore, "c/", start);
      for (let i = 0; i < 5; i++) await createOnce(writer, `c/${i}`, String(i));
      await watch.waitFor(5, "5 events before the kill");
      await cluster.kill(0);
      for (let i = 5; i < 10; i++) await createOnce(writer, `c/${i}`, String(i));
      const compactAt = await writer.revision();
      await writer.compact(compactAt);
      // The restarted member serves clients only after applying its log, compaction included.
      await cluster.restart(0);
      await assert.rejects(watch.waitFor(6, "the watch to fail"), (error: unknown) => {
        assert.ok(error instanceof CompactedError, `expected CompactedError, got ${error}`);
        assert.equal(error.compactRevision, compactAt);
        return true;
      });
      assert.equal(watch.state.events.length, 5, "nothing after the cut was delivered");
      await watch.stop();
      // Relist and rebuild, then watch from the listing.
      const listing = await watcherStore.list("c/");
      assert.deepEqual(listing.items.map((kv) => kv.value), [..."0123456789"]);
      watch = collect(watcherStore, "c/", listing.revision + 1);
      await createOnce(writer, "c/10", "10");
      await watch.waitFor(1, "the event after the relist");
      assert.deepEqual(watch.state.events.map((event) => event.key), ["c/10"]);
    } finally {
      await watch?.stop();
      await watcherStore.close();
      await writer.close();
    }
  },
});

Deno.test({
  ...etcdTest,
  name: "etcd: election — the leader's member dies, the other candidate leads, the old fence fails",
  async fn() {
    await using cluster = await startEtcdCluster({ members: 3 });
    const storeA = await openAt(cluster, [0]);
    const storeB = await openAt(cluster, [1, 2]);
    const ttlMs = 1_000;
    let a: Leadership | undefined;
    let b: Leadership | undefined;
    try {
      const electionB = createElection(storeB, { prefix: "election/", candidate: "b", ttlMs });
      a = await createElection(storeA, { prefix: "election/", candidate: "a", ttlMs }).campaign();
      let bLeads = false;
      const bCampaign = electionB.campaign().then((leadership) => {
        bLeads = true;
        return leadership;
      });
      await poll(async () => ((await storeB.list("election/")).items.length === 2 || undefined), {
        what: "b to stand",
      });
      assert.equal((await electionB.leader())?.candidate, "a");
      assert.equal(bLeads, false, "one leader at a time");
      assert.equal(
        (await a.txn({ compare: [], success: [{ type: "put", key: "owner", value: "a" }] }))
          .succeeded,
        true,
      );

      const killedAt = Date.now();
      await cluster.kill(0);
      b = await bCampaign;
      const failoverMs = Date.now() - killedAt;
      assert.ok(failoverMs < 10_000, `b led after ${failoverMs} ms`);
      assert.ok(b.epoch > a.epoch);
      await b.txn({ compare: [], success: [{ type: "put", key: "owner", value: "b" }] });
      // a cannot reach etcd: it gives the lead up once its TTL has passed unrenewed.
      assert.equal(await a.lost, "lease_lost");

      // Back online, a's fence fails in the store, whatever a believes.
      await cluster.restart(0);
      const raw = await storeA.txn({
        compare: [a.fence()],
        success: [{ type: "put", key: "owner", value: "a, deposed" }],
      });
      assert.equal(raw.succeeded, false);
      await assert.rejects(
        a.txn({ compare: [], success: [{ type: "put", key: "owner", value: "a" }] }),
        NotLeaderError,
      );
      assert.equal((await storeA.get("owner"))?.value, "b");
    } finally {
      await b?.resign().catch(() => {});
      await a?.resign().catch(() => {});
      await storeA.close();
      await storeB.close();
    }
  },
});

Deno.test({
  ...etcdTest,
  name:
    "etcd: SIGKILL of the etcd leader under CAS writers loses no acknowledged write, applies none twice",
  async fn() {
    const seed = testSeed();
    const random = mulberry32(seed);
    await using cluster = await startEtcdCluster({ members: 3 });
    const leader = await cluster.leader();
    // The client talks to the leader itself or to a follower: both must hold.
    const first = random() < 0.5 ? leader : (leader + 1) % 3;
    const writerCount = 1 + Math.floor(random() * 3);
    const total = 90;
    const killAfter = 15 + Math.floor(random() * 30);
    const restartAfter = killAfter + 10 + Math.floor(random() * 20);
    const store = await openAt(cluster, startingAt(first));
    const acknowledged = new Set<string>();
    let ambiguous = 0;
    try {
      await store.put("counter", "0");
      let claimed = 0;
      let killed: Promise<void> | undefined;
      let restarted: Promise<void> | undefined;
      /** Kills and restarts the leader from aside, while writes are in flight. */
      const acknowledge = (name: string) => {
        acknowledged.add(name);
        if (acknowledged.size === killAfter) killed = cluster.kill(leader);
        if (acknowledged.size === restartAfter) {
          restarted = killed!.then(() => cluster.restart(leader));
        }
      };
      const writer = async (id: number) => {
        for (let write = claimed++; write < total; write = claimed++) {
          const name = `log/${id}-${write}`;
          for (;;) {
            try {
              const counter = (await store.get("counter"))!;
              const next = Number(counter.value) + 1;
              // The write's own key makes it idempotent: a retry after an
              // unknown outcome cannot apply it twice.
              const { succeeded } = await store.txn({
                compare: [
                  { key: "counter", target: "mod", op: "==", value: counter.modRevision },
                  { key: name, target: "create", op: "==", value: 0 },
                ],
                success: [
                  { type: "put", key: "counter", value: String(next) },
                  { type: "put", key: name, value: String(next) },
                ],
              });
              if (succeeded) {
                acknowledge(name);
                break;
              }
              if ((await store.get(name)) !== undefined) break; // an earlier attempt applied it
            } catch (error) {
              if (!(error instanceof StoreUnavailableError)) throw error;
              ambiguous++; // unknown outcome: the next attempt finds out
            }
          }
        }
      };
      await Promise.all(Array.from({ length: writerCount }, (_, id) => writer(id)));
      assert.ok(killed && restarted, "the leader was killed and restarted mid-run");
      await restarted;

      // Read back through the restarted member once it has caught up.
      const finalRevision = await store.revision();
      const check = await openAt(cluster, [leader]);
      try {
        await poll(async () => ((await check.revision()) >= finalRevision || undefined), {
          what: "the restarted member to catch up",
        });
        const logs = (await check.list("log/")).items;
        const counter = Number((await check.get("counter"))?.value);
        assert.equal(logs.length, total, "every write is present exactly once");
        assert.ok(logs.every((kv) => kv.version === 1), "no write applied twice");
        assert.equal(counter, total);
        assert.deepEqual(
          logs.map((kv) => Number(kv.value)).sort((x, y) => x - y),
          Array.from({ length: total }, (_, i) => i + 1),
          "each increment happened once",
        );
        const present = new Set(logs.map((kv) => kv.key));
        for (const name of acknowledged) assert.ok(present.has(name), `acknowledged ${name}`);
      } finally {
        await check.close();
      }
      console.log(
        `seed ${seed}: ${writerCount} writers, leader killed after ${killAfter} acks, ` +
          `${acknowledged.size} acknowledged, ${ambiguous} unknown outcomes retried`,
      );
    } catch (error) {
      console.error(`etcd leader-kill test failed with RUNNEL_SEED=${seed}`);
      throw error;
    } finally {
      await store.close();
    }
  },
});

Deno.test({
  ...etcdTest,
  name: "etcd: TLS — a store with client certificates works, one without them is refused",
  async fn() {
    await using cluster = await startEtcdCluster({ members: 1, tls: true });
    const store = await openEtcdStore({ endpoints: cluster.endpoints, tls: cluster.tls });
    try {
      const revision = await store.put("tls/a", "1");
      assert.equal((await store.get("tls/a"))?.modRevision, revision);
      assert.equal((await store.raftState()).state, "leader");
    } finally {
      await store.close();
    }
    await assert.rejects(
      openEtcdStore({
        endpoints: cluster.endpoints,
        tls: { caFile: cluster.tls!.caFile, serverName: cluster.tls!.serverName },
        dialTimeoutMs: 1_000,
      }),
      StoreUnavailableError,
    );
  },
});

/** Keep-alive streams a member has seen opened (etcd's own gRPC metrics). */
async function keepAliveStreams(cluster: EtcdCluster, member: number): Promise<number> {
  const text = await (await fetch(`${cluster.metrics[member]}/metrics`)).text();
  const line = text.split("\n").find((line) =>
    line.startsWith("grpc_server_started_total{") && line.includes('grpc_method="LeaseKeepAlive"')
  );
  return line ? Number(line.slice(line.lastIndexOf(" ") + 1)) : 0;
}

Deno.test({
  ...etcdTest,
  name: "etcd: a lease the store ended itself is forgotten once etcd has revoked it",
  async fn() {
    const store = await openShared();
    // What the store remembers of the leases it ended: the sets their ids go into.
    let leaseId: string | undefined;
    const holders: Set<unknown>[] = [];
    const add = Set.prototype.add;
    Set.prototype.add = function (this: Set<unknown>, value: unknown) {
      if (leaseId !== undefined && value === leaseId) holders.push(this);
      return add.call(this, value);
    };
    try {
      // Never kept alive, as an agent's lease once its stream ended: it lapses.
      leaseId = (await store.grantLease(1_000)).id;
      await poll(() => holders.length > 0 || undefined, { timeoutMs: 10_000, what: "a lapse" });
      await poll(() => holders.every((set) => !set.has(leaseId)) || undefined, {
        timeoutMs: 10_000,
        what: "the lapsed lease forgotten",
      });
      await assert.rejects(store.keepAlive(leaseId), LeaseNotFoundError);
    } finally {
      Set.prototype.add = add;
      await store.close();
    }
  },
});

Deno.test({
  ...etcdTest,
  name: "etcd: keep-alives of every lease share one stream per member, and move on when it dies",
  async fn() {
    await using cluster = await startEtcdCluster({ members: 3 });
    // A follower first: what dies is the stream's member, not the raft leader.
    const first = ((await cluster.leader()) + 1) % 3;
    const next = (first + 1) % 3;
    const store = await openEtcdStore({
      endpoints: startingAt(first).map((member) => cluster.endpoints[member]),
    });
    try {
      const leases = await Promise.all([1, 2, 3, 4].map(() => store.grantLease(3_000)));
      const before = await keepAliveStreams(cluster, first);
      for (let round = 0; round < 5; round++) {
        await Promise.all(leases.map((lease) => store.keepAlive(lease.id)));
      }
      assert.equal(await keepAliveStreams(cluster, first) - before, 1, "20 renewals, one stream");
      const atNext = await keepAliveStreams(cluster, next);
      await cluster.kill(first);
      // The stream breaks with its member: renewals go on at the next one.
      for (const lease of leases) await store.keepAlive(lease.id);
      assert.equal(await keepAliveStreams(cluster, next) - atNext, 1);
      await store.revokeLease(leases[0].id);
      await assert.rejects(store.keepAlive(leases[0].id), LeaseNotFoundError);
    } finally {
      await store.close();
    }
  },
});
