/**
 * The state store does not grow without bound: shipped pipeline
 * directories go to the artifact store (or stay within a budget in etcd),
 * finished runs are deleted after their retention, history is compacted and
 * etcd's members are defragmented one at a time; `GET /api/runs` answers a
 * page, not every run. Over a real 3-member etcd started with a 256 MiB
 * `--quota-backend-bytes` (an eighth of the default 2 GiB), so that what
 * would fill the default quota at scale fills this one in seconds.
 *
 * @module
 */

import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { RunClient } from "../agent/client/mod.ts";
import { startAgent } from "../agent/worker/mod.ts";
import { openEtcdStore } from "../consensus/etcd.ts";
import { openEmbeddedStore, openMemoryStore } from "../consensus/embedded.ts";
import { openLocalArtifactStore } from "../core/artifacts/local.ts";
import { schedulerElection } from "../agent/server/etcd.ts";
import { startServer } from "../agent/server/mod.ts";
import {
  bundleDigest,
  BundleError,
  getBundle,
  type PipelineBundle,
  storedBundleBytes,
} from "../agent/bundle.ts";
import { maintainOnce } from "../agent/server/maintenance.ts";
import { submitRun } from "../agent/server/runs.ts";
import { clusterKeys, type ClusterRunRecord } from "../agent/server/keys.ts";
import { indexKeys, statusIndexOps } from "../agent/server/run_index.ts";
import { parsePipeline } from "../core/load.ts";
import type { Plan } from "../core/model.ts";
import type { Store } from "../consensus/store.ts";
import { ignoreWithoutEtcd, startEtcdCluster } from "./_etcd.ts";
import { poll, sandbox } from "./_helpers.ts";
import { startTestServer } from "./_server.ts";

const QUOTA_BYTES = 256 * 1024 * 1024;
const MIB = 1024 * 1024;
const DAY = 24 * 3600 * 1000;
const TOKEN = "growth-join-token-0123456789";
const ADMIN = "growth-admin-token-0123456789";

/** 8 MiB less room for the other files: the largest bundle a submit takes. */
const DATA_BYTES = 8 * MIB - 4096;
/** One random payload; each bundle changes its first base64 quantum, so every digest differs. */
let payload: string | undefined;
function distinctData(index: number): string {
  payload ??= Buffer.from(randomBytes(DATA_BYTES)).toString("base64");
  return index.toString(36).padStart(4, "0") + payload.slice(4);
}

function randomBytes(count: number): Uint8Array {
  const bytes = new Uint8Array(count);
  for (let at = 0; at < count; at += 65_536) {
    crypto.getRandomValues(bytes.subarray(at, Math.min(at + 65_536, count)));
  }
  return bytes;
}

function pipelineSource(pool: string, gate: string): string {
  return `name: shipped
steps:
  check:
    backend: shell
    selector: { pool: ${pool} }
    env: { GATE: "${gate}" }
    run: cat marker.txt && test -f "$GATE"
`;
}

function filesOf(index: number, source: string): Record<string, string> {
  const b64 = (text: string) => Buffer.from(text).toString("base64");
  return {
    "pipeline.yaml": b64(source),
    "marker.txt": b64(`bundle ${index}\n`),
    "data.bin": distinctData(index),
  };
}

async function finished(client: RunClient, runId: string) {
  for await (const _ of client.events(runId)) { /* until the run ends */ }
  return await client.run(runId);
}

async function logText(client: RunClient, runId: string): Promise<string> {
  let text = "";
  for await (const { event, data } of client.logs(runId, { step: "check" })) {
    if (event === "log") text += (data as { text: string }).text;
  }
  return text;
}

Deno.test({
  name:
    "store growth: 300 distinct 8 MiB bundles leave etcd far under its quota; an old run resumes on a fresh agent",
  ignore: ignoreWithoutEtcd(),
  async fn() {
    await using box = await sandbox();
    await using etcd = await startEtcdCluster({
      extraArgs: [`--quota-backend-bytes=${QUOTA_BYTES}`],
    });
    const store = await openEtcdStore({ endpoints: etcd.endpoints });
    const artifacts = openLocalArtifactStore(`${box.dir}/artifacts`);
    const server = await startServer({
      serverId: "growth",
      store,
      election: schedulerElection(store),
      http: { hostname: "127.0.0.1", port: 0 },
      grpc: { address: "127.0.0.1:0" },
      token: TOKEN,
      adminToken: ADMIN,
      log: (fields) => {
        if (fields.level === "error" || Deno.env.get("GROWTH_DEBUG")) {
          console.error("server", JSON.stringify(fields));
        }
      },
      heartbeatMs: 500,
      artifacts,
      maintenance: { disabled: true },
    });
    const agents: { stop(): Promise<void> }[] = [];
    const agent = async (name: string) => {
      const running = await startAgent({
        servers: [`127.0.0.1:${server.grpcPort}`],
        token: TOKEN,
        agentId: name,
        labels: { pool: "main" },
        allowShell: true,
        stateDir: `${box.dir}/${name}`,
        artifacts,
        log: (f) => Deno.env.get("GROWTH_DEBUG") && console.error("agent", JSON.stringify(f)),
      });
      agents.push(running);
      return running;
    };
    try {
      const client = new RunClient([`http://127.0.0.1:${server.httpPort}`], { token: ADMIN });
      const gate = `${box.dir}/gate`;
      // The oldest run: its step reads the shipped directory, then fails on the missing gate.
      const first = await agent("first");
      const main = pipelineSource("main", gate);
      const old = await client.submit(main, "pipeline.yaml", "/nowhere", filesOf(0, main));
      const failed = await finished(client, old.runId);
      assert.equal(failed.run.status, "failed");
      assert.equal(await logText(client, old.runId), "bundle 0\n");
      await first.stop();

      // 299 more distinct directories, to a pool no agent serves: they only wait. Every
      // 50th goes through the API; the rest take the same path from the plan on (parsing
      // 11 MiB of JSON 300 times would make this test a benchmark of JSON.parse).
      const bulk = pipelineSource("bulk", gate);
      const bulkPlan = planOf(bulk);
      const started = performance.now();
      let next = 1;
      const submitter = async () => {
        for (let index = next++; index < 300; index = next++) {
          const files = filesOf(index, bulk);
          if (index % 50 === 0) {
            await client.submit(bulk, "pipeline.yaml", "/nowhere", files);
          } else {
            const bundle = { digest: bundleDigest(files), files };
            await submitRun(store, bulkPlan, { bundle, bundles: { artifacts } });
          }
        }
      };
      await Promise.all([submitter(), submitter()]);
      const submitMs = performance.now() - started;
      const members = await store.memberStatus();
      const largest = Math.max(...members.map((member) => member.dbSize));
      console.log(
        `300 bundles of ${(DATA_BYTES / MIB).toFixed(2)} MiB submitted in ${
          (submitMs / 1000).toFixed(1)
        } s; etcd db ${members.map((m) => (m.dbSize / MIB).toFixed(2)).join(" / ")} MiB ` +
          `(quota ${QUOTA_BYTES / MIB} MiB); bundle bytes in etcd: ${await storedBundleBytes(
            store,
          )}`,
      );
      assert.ok(members.every((member) => member.error === undefined), JSON.stringify(members));
      assert.ok(largest < QUOTA_BYTES / 8, `etcd holds ${largest} bytes`);
      assert.equal(await storedBundleBytes(store), 0);
      assert.equal((await artifacts.list({ run: ".bundles" })).length, 300);

      // Within retention the oldest run resumes, on an agent that never saw its directory.
      const report = await maintainOnce({
        store,
        fence: [],
        bundles: { artifacts },
        compactTo: await store.revision(),
        settings: { members: store, defragFreeBytes: 0, defragFreeRatio: 0 },
      });
      assert.equal(report.runsDeleted, 0);
      assert.equal(report.bundlesDeleted, 0);
      await Deno.writeTextFile(gate, "");
      await agent("fresh");
      await client.resume(old.runId);
      // The record says "failed" until the scheduler takes the request: wait for the second round.
      const resumed = await poll(async () => {
        const run = await client.run(old.runId);
        return run.run.round === 2 && ["succeeded", "failed"].includes(run.run.status)
          ? run
          : undefined;
      }, { timeoutMs: 60_000, what: "the resumed run to finish" });
      assert.equal(resumed.run.status, "succeeded", JSON.stringify(resumed.steps));
      assert.match(await logText(client, old.runId), /bundle 0\n$/);
      await Deno.stat(`${box.dir}/fresh/bundles`);
    } finally {
      for (const running of agents) await running.stop().catch(() => {});
      await server.close();
      await store.close();
    }
  },
});

Deno.test({
  name:
    "store growth: without an artifact store the bundle budget refuses before etcd's quota; retention, compaction and defragmentation give the space back",
  ignore: ignoreWithoutEtcd(),
  async fn() {
    await using etcd = await startEtcdCluster({
      extraArgs: [`--quota-backend-bytes=${QUOTA_BYTES}`],
    });
    const store = await openEtcdStore({ endpoints: etcd.endpoints, requestTimeoutMs: 30_000 });
    try {
      const plan = planOf(pipelineSource("main", "/nowhere"));
      const budgetBytes = 48 * MIB;
      const bundle = (index: number): PipelineBundle => {
        const files = filesOf(index, "");
        return { digest: bundleDigest(files), files };
      };
      const runs: ClusterRunRecord[] = [];
      let index = 0;
      let refused: unknown;
      for (; index < 10; index++) {
        try {
          runs.push(
            await submitRun(store, plan, {
              bundle: bundle(index),
              bundles: { budgetBytes },
              now: Date.now() - 20 * DAY,
            }),
          );
        } catch (error) {
          refused = error;
          break;
        }
      }
      assert.ok(refused instanceof BundleError, String(refused));
      assert.match(refused.message, /artifact store/);
      assert.equal(index, 4, "four 11 MiB directories fit 48 MiB");
      // Every run finished long ago: past the 14-day retention.
      for (const run of runs) await finish(store, run, Date.now());
      const before = await store.memberStatus();
      const round = {
        store,
        now: Date.now() + 15 * DAY,
        fence: [],
        settings: { members: store, defragFreeBytes: 0, defragFreeRatio: 0 },
      };
      // Two rounds, as the server runs them: the second compacts past the first one's deletes.
      const report = await maintainOnce({ ...round, compactTo: await store.revision() });
      const second = await maintainOnce({ ...round, compactTo: await store.revision() });
      const after = await store.memberStatus();
      const sizes = (members: typeof before) =>
        members.map((member) => (member.dbSize / MIB).toFixed(2)).join(" / ");
      console.log(
        `etcd db before maintenance ${sizes(before)} MiB, after ${sizes(after)} MiB; ` +
          `defragmented ${second.defragmented.join(", ")} one at a time`,
      );
      assert.equal(report.runsDeleted, 4);
      assert.equal(report.bundlesDeleted, 4);
      assert.equal(second.defragmented.length, 3);
      assert.equal(await storedBundleBytes(store), 0);
      for (const [i, member] of after.entries()) {
        assert.ok(member.dbSize < before[i].dbSize / 2, `${sizes(before)} → ${sizes(after)}`);
      }
      assert.equal((await store.list(clusterKeys.runPrefix)).items.length, 0);
      assert.equal((await store.list("/index/")).items.length, 0);
      // The budget is free again.
      await submitRun(store, plan, { bundle: bundle(99), bundles: { budgetBytes } });
    } finally {
      await store.close();
    }
  },
});

Deno.test("store growth: GET /api/runs answers pages of bounded size with a cursor; retention keeps young and forever runs", async () => {
  await using box = await sandbox();
  await using server = await startTestServer(`${box.dir}/state.db`, {
    token: TOKEN,
    adminToken: ADMIN,
    maintenance: { disabled: true },
  });
  const plan = planOf(pipelineSource("main", "/nowhere"));
  const base = Date.now() - 30 * DAY;
  const ids: string[] = [];
  for (let i = 0; i < 250; i++) {
    ids.push((await submitRun(server.store, plan, { now: base + i })).runId);
  }
  const newestFirst = [...ids].reverse();
  const call = (path: string) =>
    fetch(`${server.http}${path}`, { headers: { authorization: `Bearer ${ADMIN}` } });
  // The default page is bounded; the cursor walks every run exactly once.
  const first = await call("/api/runs");
  const firstPage = await first.json() as ClusterRunRecord[];
  assert.equal(firstPage.length, 100);
  assert.match(
    first.headers.get("link") ?? "",
    /^<\/api\/runs\?limit=100&after=[^>]+>; rel="next"$/,
  );
  const seen: string[] = [];
  let path: string | undefined = "/api/runs?limit=64";
  while (path) {
    const response = await call(path);
    const page = await response.json() as ClusterRunRecord[];
    assert.ok(page.length <= 64);
    seen.push(...page.map((run) => run.runId));
    path = /^<([^>]+)>; rel="next"$/.exec(response.headers.get("link") ?? "")?.[1];
  }
  assert.deepEqual(seen, newestFirst);
  assert.equal((await call("/api/runs?limit=0")).status, 400);
});

Deno.test("store growth: retention deletes finished runs past it, from the end of the index; young, running and forever runs stay", async () => {
  const store = openMemoryStore();
  const plan = planOf(pipelineSource("main", "/nowhere"));
  const kept = planOf(`name: kept
retention: forever
steps:
  a: { backend: shell, run: "true" }
`);
  const base = Date.now() - 30 * DAY;
  const ids: string[] = [];
  for (let i = 0; i < 250; i++) {
    const record = await submitRun(store, i % 50 === 0 ? kept : plan, { now: base + i });
    ids.push(record.runId);
  }
  const server = { store };
  // Finished 20 days ago: past the 14-day default, except those kept forever.
  for (const id of ids.slice(0, 200)) {
    const kv = await server.store.get(clusterKeys.run(id));
    await finish(server.store, JSON.parse(kv!.value), base + 10 * DAY);
  }
  const report = await maintainOnce({ store: server.store, fence: [] });
  assert.equal(report.runsDeleted, 196, "200 finished, 4 of them kept forever");
  const left = (await server.store.list(indexKeys.runs)).items.map((kv) => kv.value);
  assert.equal(left.length, 54);
  assert.equal((await server.store.list(clusterKeys.plan(ids[1]))).items.length, 0);
  assert.ok(await server.store.get(clusterKeys.run(ids[0])), "retention: forever");
  assert.ok(await server.store.get(clusterKeys.run(ids[249])), "not finished");
  // A second round finds nothing more to do.
  assert.equal((await maintainOnce({ store: server.store, fence: [] })).runsDeleted, 0);
  await store.close();
});

Deno.test("store growth: gc compacts the embedded store's history", async () => {
  await using box = await sandbox();
  await Deno.mkdir(box.stateDir, { recursive: true });
  const store = openEmbeddedStore(`${box.stateDir}/state.db`);
  for (let i = 0; i < 3_000; i++) await store.put(`/scratch/${i % 10}`, "x".repeat(100));
  await store.close();
  const { collectGarbage } = await import("../agent/local/gc.ts");
  const result = await collectGarbage({ stateDir: box.stateDir });
  assert.equal(result.historyCompacted, 2_000);
  assert.equal((await collectGarbage({ stateDir: box.stateDir })).historyCompacted, 0);
});

function planOf(source: string): Plan {
  return parsePipeline(source, { file: "pipeline.yaml", baseDir: "/nowhere" });
}

/** Marks a run finished (as the scheduler would) at `at`. */
async function finish(store: Store, run: ClusterRunRecord, at: number): Promise<void> {
  const before = run.status;
  const record = { ...run, status: "succeeded" as const, finishedAt: at };
  await store.txn({
    compare: [],
    success: [
      { type: "put", key: clusterKeys.run(run.runId), value: JSON.stringify(record) },
      ...statusIndexOps(record, before),
    ],
  });
}

Deno.test("store growth: a shipped directory in the artifact store goes with the last run naming it", async () => {
  await using box = await sandbox();
  const store = openMemoryStore();
  const artifacts = openLocalArtifactStore(`${box.dir}/artifacts`);
  try {
    const plan = planOf(pipelineSource("main", "/nowhere"));
    const b64 = (text: string) => Buffer.from(text).toString("base64");
    const shared = { "marker.txt": b64("shared\n") };
    const alone = { "marker.txt": b64("alone\n") };
    const bundle = (files: Record<string, string>) => ({ digest: bundleDigest(files), files });
    const bundles = { artifacts };
    const old = await submitRun(store, plan, { bundle: bundle(shared), bundles });
    const other = await submitRun(store, plan, { bundle: bundle(alone), bundles });
    // A rerun names the old directory by digest and is still young at the sweep.
    const young = await submitRun(store, plan, { bundleDigest: old.bundle, rerunOf: old.runId });
    for (const run of [old, other]) await finish(store, run, Date.now());
    const report = await maintainOnce({
      store,
      fence: [],
      bundles,
      now: Date.now() + 15 * DAY,
    });
    assert.equal(report.runsDeleted, 2);
    assert.equal(report.bundlesDeleted, 1);
    const left = (await artifacts.list({ run: ".bundles" })).map((record) => record.step);
    assert.deepEqual(left, [old.bundle!.replace("sha256:", "")]);
    assert.ok(await getBundle(store, young.bundle!, bundles));
  } finally {
    await store.close();
  }
});
