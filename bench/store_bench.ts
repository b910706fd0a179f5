/**
 * The etcd store's cost for the write the run engine makes most: one step
 * state transition, a txn that compares the run key's mod revision and the
 * scheduler's election fence, then puts the step state and the run record.
 *
 * Anchor: the same txn written with `npm:etcd3`'s own builder on the same
 * client (the store's current member), against a 3-member etcd cluster on
 * loopback (target: store / anchor median ≤ 1.5). A batched variant puts ten
 * transitions (ten runs) in one txn and is reported per transition.
 *
 * Run: `deno run --allow-all bench/store_bench.ts` (needs `etcd`).
 *
 * @module
 */

import { createElection } from "../consensus/election.ts";
import { openEtcdStore } from "../consensus/etcd.ts";
import type { Compare, TxnOp } from "../consensus/store.ts";
import { etcdInstalled, startEtcdCluster } from "../tests/_etcd.ts";
import { median, printTable } from "./_table.ts";

/** Options of {@link benchStore}. */
export interface StoreBenchOptions {
  /** Sequential txns per variant (default 300), run in interleaved rounds. */
  transitions?: number;
  /** Transitions per txn in the batched variant (default 10). */
  batch?: number;
}

/** The figures, in milliseconds. */
export interface StoreBenchResult {
  /** Median of one transition as a raw etcd3 txn. */
  rawMedianMs: number;
  /** Median of one transition through the store. */
  storeMedianMs: number;
  /** store / raw medians (target ≤ 1.5). */
  ratio: number;
  /** Median per transition when `batch` share one txn through the store. */
  batchedPerTransitionMs: number;
}

/** Interleaved rounds, so drift in the cluster (compaction, fsync) hits every variant alike. */
const ROUNDS = 5;
const WARMUP = 20;
const NAMESPACE = "bench/";

/** A step state and a run record of realistic size (the run engine's JSON shapes). */
function stepState(run: number, step: number, i: number): string {
  return JSON.stringify({
    run: `run-${run}`,
    step: `step-${step}`,
    attempt: 1,
    state: i % 2 === 0 ? "running" : "succeeded",
    worker: "worker-aws-1",
    startedAt: "2026-01-01T00:00:00.000Z",
    exitCode: i % 2 === 0 ? null : 0,
    outputs: { digest: "sha256:0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0" },
  });
}

function runRecord(run: number, i: number): string {
  return JSON.stringify({
    id: `run-${run}`,
    pipeline: "energy",
    state: "running",
    transitions: i,
    updatedAt: new Date(1_767_225_600_000 + i).toISOString(),
    steps: { done: Math.floor(i / 2), running: 1, pending: 7 },
  });
}

/** Measures the figures, prints the table, and returns them (undefined without etcd). */
export async function benchStore(
  options: StoreBenchOptions = {},
): Promise<StoreBenchResult | undefined> {
  if (!etcdInstalled()) {
    console.log("\nstore bench skipped: no etcd binary (apt-get install etcd-server)");
    return undefined;
  }
  const transitions = options.transitions ?? 300;
  const batch = options.batch ?? 10;
  await using cluster = await startEtcdCluster({ members: 3 });
  // The client talks to a follower, as most servers of a cluster do.
  const leader = await cluster.leader();
  const endpoints = [1, 2, 0].map((offset) => cluster.endpoints[(leader + offset) % 3]);
  const store = await openEtcdStore({ endpoints, namespace: NAMESPACE });
  try {
    const leadership = await createElection(store, {
      prefix: "election/scheduler/",
      candidate: "bench",
      ttlMs: 10_000,
    }).campaign();
    const fence = leadership.fence();
    const client = store.client;
    const runKey = (run: number) => `runs/run-${run}`;
    const stepKey = (run: number, i: number) => `runs/run-${run}/steps/step-${i % 8}`;
    const revisions = new Map<number, number>();
    for (let run = 0; run <= batch; run++) {
      revisions.set(run, await store.put(runKey(run), runRecord(run, 0)));
    }
    let counter = 0;

    // Run 0 for the single variants (both chain on its mod revision), 1..batch for the batch.
    const raw = async () => {
      const i = counter++;
      const response = await client
        .if(NAMESPACE + runKey(0), "Mod", "==", revisions.get(0)!)
        .and(NAMESPACE + fence.key, "Create", "==", fence.value as number)
        .then(
          client.put(NAMESPACE + stepKey(0, i)).value(stepState(0, i, i)),
          client.put(NAMESPACE + runKey(0)).value(runRecord(0, i)),
        )
        .commit();
      if (!response.succeeded) throw new Error("Expected the raw transition to succeed");
      revisions.set(0, Number(response.header.revision));
    };
    const viaStore = async () => {
      const i = counter++;
      const result = await store.txn({
        compare: [{ key: runKey(0), target: "mod", op: "==", value: revisions.get(0)! }, fence],
        success: [
          { type: "put", key: stepKey(0, i), value: stepState(0, i, i) },
          { type: "put", key: runKey(0), value: runRecord(0, i) },
        ],
      });
      if (!result.succeeded) throw new Error("Expected the store transition to succeed");
      revisions.set(0, result.revision);
    };
    const batched = async () => {
      const i = counter++;
      const compare: Compare[] = [fence];
      const success: TxnOp[] = [];
      for (let run = 1; run <= batch; run++) {
        compare.push({ key: runKey(run), target: "mod", op: "==", value: revisions.get(run)! });
        success.push(
          { type: "put", key: stepKey(run, i), value: stepState(run, i, i) },
          { type: "put", key: runKey(run), value: runRecord(run, i) },
        );
      }
      const result = await store.txn({ compare, success });
      if (!result.succeeded) throw new Error("Expected the batched transitions to succeed");
      for (let run = 1; run <= batch; run++) revisions.set(run, result.revision);
    };

    const variants = { raw, store: viaStore, batched };
    const samples: Record<keyof typeof variants, number[]> = { raw: [], store: [], batched: [] };
    for (const body of Object.values(variants)) {
      for (let i = 0; i < WARMUP; i++) await body();
    }
    const perRound = Math.ceil(transitions / ROUNDS);
    for (let round = 0; round < ROUNDS; round++) {
      for (const [name, body] of Object.entries(variants)) {
        for (let i = 0; i < perRound; i++) {
          const start = performance.now();
          await body();
          samples[name as keyof typeof variants].push(performance.now() - start);
        }
      }
    }
    await leadership.resign();

    const rawMedianMs = median(samples.raw);
    const storeMedianMs = median(samples.store);
    const batchedMedianMs = median(samples.batched);
    const result: StoreBenchResult = {
      rawMedianMs,
      storeMedianMs,
      ratio: storeMedianMs / rawMedianMs,
      batchedPerTransitionMs: batchedMedianMs / batch,
    };
    const row = (variant: string, perTxn: number, perTransition: number) => ({
      variant,
      txns: perRound * ROUNDS,
      "median ms/txn": perTxn.toFixed(3),
      "ms/transition": perTransition.toFixed(3),
      "vs raw": (perTransition / rawMedianMs).toFixed(2),
    });
    printTable(
      `store: one step transition (compare run mod + fence, put step + run), ` +
        `3-member etcd on loopback, client at a follower — target store/raw ≤ 1.5`,
      [
        row("raw etcd3 txn (anchor)", rawMedianMs, rawMedianMs),
        row("Store.txn on etcd", storeMedianMs, storeMedianMs),
        row(`Store.txn, ${batch} transitions per txn`, batchedMedianMs, batchedMedianMs / batch),
      ],
    );
    return result;
  } finally {
    await store.close();
  }
}

if (import.meta.main) await benchStore();
