/**
 * Memory and growth (issue 17):
 *
 * 1. A server with 100,000 finished runs (embedded store): latency of a
 *    page of `GET /api/runs` (what `runnel runs` reads) and of
 *    `GET /api/runs/:id` (`runnel show`), the store's size and this
 *    process's RSS. Anchor: the same page on a server with 1,000 runs, in
 *    the same process (target ratio ≈ 1: O(page), not O(runs)); and the old
 *    way, every run listed (`listClusterRuns`), for scale.
 * 2. A local run of 10,000 no-op shell steps: time, peak RSS, the state
 *    store's size before and after `gc` compacts its history, and the
 *    latency of reading the run back (`runnel show`: its record and steps).
 *    Anchor: a 100-step run in the same process.
 *
 * Run: `deno run --allow-all bench/growth_bench.ts [runs] [steps]` (steps 0: listing only).
 *
 * @module
 */

import { openEmbeddedStore } from "../consensus/embedded.ts";
import type { Store, TxnOp } from "../consensus/store.ts";
import { parsePipeline } from "../core/load.ts";
import type { Plan } from "../core/model.ts";
import { startServer } from "../agent/server/mod.ts";
import { standaloneElection } from "../agent/server/mod.ts";
import { clusterKeys, type ClusterRunRecord } from "../agent/server/keys.ts";
import { indexOps } from "../agent/server/run_index.ts";
import { listClusterRuns } from "../agent/server/runs.ts";
import { runPipeline } from "../agent/local/mod.ts";
import { collectGarbage } from "../agent/local/gc.ts";
import { getRunRecord, openLocalState, readStepStates } from "../agent/local/state.ts";
import { median, printTable, type Row } from "./_table.ts";

const ADMIN = "growth-bench-admin-token-0123456789";
const MIB = 1024 * 1024;

/** Writes `count` finished runs straight into a server's store, 500 per txn. */
async function seedRuns(store: Store, plan: Plan, count: number): Promise<string[]> {
  const ids: string[] = [];
  const base = Date.now() - count * 1000;
  for (let at = 0; at < count; at += 500) {
    const ops: TxnOp[] = [];
    for (let i = at; i < Math.min(count, at + 500); i++) {
      const createdAt = base + i * 1000;
      const runId = `${new Date(createdAt).toISOString().replace(/\D/g, "").slice(0, 14)}-${
        i.toString(16).padStart(6, "0")
      }`;
      const record: ClusterRunRecord = {
        runId,
        pipeline: plan.name,
        file: "pipeline.yaml",
        planDigest: plan.digest,
        status: i % 7 === 0 ? "failed" : "succeeded",
        createdAt,
        startedAt: createdAt,
        finishedAt: createdAt + 500,
        round: 1,
        labels: { team: i % 2 === 0 ? "ml" : "web" },
      };
      ids.push(runId);
      ops.push(
        { type: "put", key: clusterKeys.run(runId), value: JSON.stringify(record) },
        {
          type: "put",
          key: clusterKeys.step(runId, "a"),
          value: JSON.stringify({ id: "a", status: record.status, attempts: [] }),
        },
        ...indexOps(record),
      );
    }
    await store.txn({ compare: [], success: ops });
  }
  return ids;
}

async function timeIt(times: number, body: () => Promise<unknown>): Promise<number> {
  const samples: number[] = [];
  for (let i = 0; i < times; i++) {
    const started = performance.now();
    await body();
    samples.push(performance.now() - started);
  }
  return median(samples);
}

async function fileSize(path: string): Promise<number> {
  let total = 0;
  for (const suffix of ["", "-wal"]) {
    total += await Deno.stat(path + suffix).then((info) => info.size, () => 0);
  }
  return total;
}

/** A server over a fresh store holding `count` finished runs. */
interface SeededServer {
  count: number;
  seedMs: number;
  dir: string;
  store: Store;
  ids: string[];
  get(path: string): Promise<unknown>;
  close(): Promise<void>;
}

async function seededServer(count: number, plan: Plan): Promise<SeededServer> {
  const dir = await Deno.makeTempDir({ prefix: "runnel-growth-" });
  const store = openEmbeddedStore(`${dir}/server.db`);
  const server = await startServer({
    serverId: `bench-${count}`,
    store,
    election: standaloneElection(),
    http: { hostname: "127.0.0.1", port: 0 },
    grpc: { address: "127.0.0.1:0" },
    token: "growth-bench-join-token",
    adminToken: ADMIN,
    log: () => {},
    maintenance: { disabled: true },
  });
  const seedStarted = performance.now();
  const ids = await seedRuns(store, plan, count);
  const seedMs = performance.now() - seedStarted;
  const base = `http://127.0.0.1:${server.httpPort}`;
  return {
    count,
    seedMs,
    dir,
    store,
    ids,
    async get(path) {
      const response = await fetch(base + path, { headers: { authorization: `Bearer ${ADMIN}` } });
      if (!response.ok) throw new Error(`${path}: ${response.status}`);
      return await response.json();
    },
    async close() {
      await server.close();
      await store.close();
      await Deno.remove(dir, { recursive: true });
    },
  };
}

/**
 * What reading each server costs, sampled in interleaved rounds so that
 * drift of a shared machine hits every server alike.
 */
async function listings(servers: SeededServer[]): Promise<(Row & { pageMs: number })[]> {
  const samples = servers.map(() => ({
    page: [] as number[],
    label: [] as number[],
    show: [] as number[],
  }));
  const time = async (body: () => Promise<unknown>) => {
    const started = performance.now();
    await body();
    return performance.now() - started;
  };
  for (const server of servers) await server.get("/api/runs?limit=50");
  for (let round = 0; round < 20; round++) {
    for (const [i, server] of servers.entries()) {
      const middle = server.ids[Math.floor(server.ids.length / 2)];
      samples[i].page.push(await time(() => server.get("/api/runs?limit=50")));
      samples[i].label.push(
        await time(() => server.get("/api/runs/search?label=team=ml&limit=50")),
      );
      samples[i].show.push(await time(() => server.get(`/api/runs/${middle}`)));
    }
  }
  const rows = [];
  for (const [i, server] of servers.entries()) {
    const allMs = await timeIt(3, () => listClusterRuns(server.store));
    const pageMs = median(samples[i].page);
    rows.push({
      runs: server.count,
      seed_s: (server.seedMs / 1000).toFixed(1),
      page_ms: pageMs.toFixed(2),
      label_page_ms: median(samples[i].label).toFixed(2),
      show_ms: median(samples[i].show).toFixed(2),
      list_all_ms: allMs.toFixed(0),
      store_mib: ((await fileSize(`${server.dir}/server.db`)) / MIB).toFixed(1),
      pageMs,
    });
  }
  return rows;
}

/** A local run of `count` no-op steps: time, RSS, store size, show latency. */
async function localRunOf(count: number): Promise<Row & { showMs: number }> {
  const dir = await Deno.makeTempDir({ prefix: "runnel-growth-" });
  try {
    const steps = Array.from(
      { length: count },
      (_, i) => `  s${i}: { backend: shell, run: "true" }`,
    )
      .join("\n");
    const plan = parsePipeline(`name: wide\nconcurrency: 4\nsteps:\n${steps}\n`, {
      file: `${dir}/pipeline.yaml`,
      baseDir: dir,
    });
    const stateDir = `${dir}/.runnel`;
    const startRss = Deno.memoryUsage().rss;
    let peakRss = startRss;
    const sampler = setInterval(() => peakRss = Math.max(peakRss, Deno.memoryUsage().rss), 50);
    const started = performance.now();
    const summary = await runPipeline(plan, { stateDir });
    const runMs = performance.now() - started;
    clearInterval(sampler);
    if (summary.status !== "succeeded") throw new Error(`wide run ${summary.status}`);
    const before = await fileSize(`${stateDir}/state.db`);
    const state = await openLocalState(stateDir, { readOnly: true });
    let showMs: number;
    try {
      showMs = await timeIt(5, async () => {
        await getRunRecord(state.store, summary.runId);
        await readStepStates(state.store, summary.runId);
      });
    } finally {
      await state.close();
    }
    const gc = await collectGarbage({ stateDir });
    return {
      steps: count,
      run_s: (runMs / 1000).toFixed(1),
      steps_per_s: (count / runMs * 1000).toFixed(0),
      rss_before_mib: (startRss / MIB).toFixed(0),
      peak_rss_mib: (peakRss / MIB).toFixed(0),
      store_mib: (before / MIB).toFixed(1),
      history_compacted: gc.historyCompacted,
      show_ms: showMs.toFixed(1),
      showMs,
    };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Both parts; prints two tables. */
export async function benchGrowth(runs = 100_000, steps = 10_000): Promise<void> {
  const plan = parsePipeline("name: seeded\nsteps:\n  a: { backend: shell, run: 'true' }\n", {
    file: "pipeline.yaml",
    baseDir: "/tmp",
  });
  // The local runs first: the listing's 100,000 records would stay in this process's heap.
  if (steps > 0) {
    const anchor = await localRunOf(100);
    const wide = await localRunOf(steps);
    printTable(`A local run of ${steps} no-op steps`, [
      { ...strip(anchor), show_ratio: "1.00 (anchor)" },
      { ...strip(wide), show_ratio: (wide.showMs / anchor.showMs).toFixed(1) },
    ]);
  }
  const servers = [await seededServer(1_000, plan), await seededServer(runs, plan)];
  try {
    const [small, large] = await listings(servers);
    printTable(
      `A server with ${runs} finished runs (embedded store), RSS ${
        (Deno.memoryUsage().rss / MIB).toFixed(0)
      } MiB with both`,
      [
        { ...strip(small), ratio: "1.00 (anchor)" },
        { ...strip(large), ratio: (large.pageMs / small.pageMs).toFixed(2) },
      ],
    );
  } finally {
    for (const server of servers) await server.close();
  }
}

function strip(row: Row & { pageMs?: number; showMs?: number }): Row {
  const { pageMs: _page, showMs: _show, ...rest } = row;
  return rest;
}

if (import.meta.main) {
  await benchGrowth(Number(Deno.args[0] ?? 100_000), Number(Deno.args[1] ?? 10_000));
}
