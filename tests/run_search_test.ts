/**
 * Labels, run names and search: 10,000 cluster runs, found by label,
 * status and pipeline from the run indexes a page at a time, through the
 * API and `runnel runs`; and the same filters in local mode.
 */

import assert from "node:assert/strict";
import { RunClient } from "../agent/client/mod.ts";
import { submitRun } from "../agent/server/runs.ts";
import { clusterKeys } from "../agent/server/keys.ts";
import { statusIndexOps } from "../agent/server/run_index.ts";
import { openEmbeddedStore } from "../consensus/embedded.ts";
import { parsePipeline } from "../core/load.ts";
import { runCli, sandbox } from "./_helpers.ts";
import { startTestServer } from "./_server.ts";

const RUNS = 10_000;

Deno.test("runs search: 10,000 runs, by label, status and pipeline, paged from the indexes", async () => {
  await using box = await sandbox();
  // tmpfs when there is one: the point is the query, not 10,000 fsyncs.
  const dir = await Deno.stat("/dev/shm").then(
    () => Deno.makeTempDir({ dir: "/dev/shm" }),
    () => box.dir,
  );
  try {
    const db = `${dir}/state.db`;
    const store = openEmbeddedStore(db);
    const plans = ["etl", "train"].map((name) =>
      parsePipeline(
        `name: ${name}\nlabels: { team: ${name === "train" ? "ml" : "data"} }\n` +
          `run-name: "${name} nightly"\nsteps:\n  s: { backend: shell, run: "true" }\n`,
        { file: "p.yaml", baseDir: "/tmp" },
      )
    );
    const began = performance.now();
    const failed: string[] = [];
    for (let i = 0; i < RUNS; i++) {
      const plan = plans[i % 2];
      const record = await submitRun(store, plan, {
        now: Date.UTC(2026, 0, 1) + i * 1_000,
        ...(i % 100 === 0 ? { labels: { priority: "high" } } : {}),
      });
      {
        // Finished (as its scheduler would have left it): a server adopts no pending run.
        const before = record.status;
        const done = { ...record, status: i % 14 === 0 ? "failed" : "succeeded" } as const;
        if (done.status === "failed" && plan.name === "train" && i % 100 === 0) {
          failed.push(record.runId);
        }
        await store.txn({
          compare: [],
          success: [
            { type: "put", key: clusterKeys.run(record.runId), value: JSON.stringify(done) },
            ...statusIndexOps(done, before),
          ],
        });
      }
    }
    console.log(`  ${RUNS} runs written in ${Math.round(performance.now() - began)} ms`);
    await store.close();

    await using server = await startTestServer(db, {
      token: "search-join-token-0123456789",
      adminToken: "search-admin-token-0123456789",
    });
    const client = new RunClient([server.http], { token: "search-admin-token-0123456789" });
    const queried = performance.now();
    const first = await client.searchRuns({ labels: { team: "ml" }, limit: 20 });
    assert.equal(first.runs.length, 20);
    assert.ok(first.runs.every((run) => run.labels?.team === "ml" && run.pipeline === "train"));
    assert.equal(first.runs[0].name, "train nightly");
    // Newest first, and the next page goes on where this one ended.
    const created = first.runs.map((run) => run.createdAt);
    assert.deepEqual(created, [...created].sort((a, b) => b - a));
    const second = await client.searchRuns({
      labels: { team: "ml" },
      limit: 20,
      after: first.next,
    });
    assert.ok(second.runs[0].createdAt < created.at(-1)!);
    assert.equal(
      new Set([...first.runs, ...second.runs].map((run) => run.runId)).size,
      40,
    );
    // Every condition at once, the whole result in pages.
    const found: string[] = [];
    let after: string | undefined;
    do {
      const page = await client.searchRuns({
        labels: { team: "ml", priority: "high" },
        status: "failed",
        pipeline: "train",
        limit: 7,
        after,
      });
      found.push(...page.runs.map((run) => run.runId));
      after = page.next;
    } while (after);
    assert.deepEqual(found.sort(), failed.sort());
    const byStatus = await client.searchRuns({ status: "failed", limit: 1000 });
    assert.equal(byStatus.runs.length, 715);
    console.log(`  queries answered in ${Math.round(performance.now() - queried)} ms`);

    const cli = await runCli(
      [
        "runs",
        "-l",
        "team=ml",
        "--status",
        "succeeded",
        "--page-size",
        "3",
        "--server",
        server.http,
        "--token",
        "search-admin-token-0123456789",
      ],
      { cwd: box.dir },
    );
    assert.equal(cli.code, 0, cli.stderr);
    assert.equal(cli.stdout.trim().split("\n").length, 5, cli.stdout); // header, 3 runs, "more:"
    assert.match(cli.stdout, /^more: runnel runs … --after \S+$/m);
    const bad = await fetch(`${server.http}/api/runs/search?limit=0`, {
      headers: { authorization: "Bearer search-admin-token-0123456789" },
    });
    assert.equal(bad.status, 400);
    await bad.body?.cancel();
  } finally {
    if (dir !== box.dir) await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("runs search (local): --label, --status and --pipeline filter the runs", async () => {
  await using box = await sandbox();
  const file = await box.write(
    "p.yaml",
    'name: local\nlabels: { team: ml }\nrun-name: "try ${{ params.n }}"\nparams:\n' +
      '  n: { type: number, default: 1 }\nsteps:\n  s: { run: "true" }\n',
  );
  const run = (args: string[]) => runCli([...args, "--state-dir", box.stateDir], { cwd: box.dir });
  assert.equal((await run(["run", file, "--param", "n=2", "--label", "ticket=T-1"])).code, 0);
  assert.equal((await run(["run", file])).code, 0);
  const tagged = await run(["runs", "-l", "ticket=T-1", "--json"]);
  const runs = JSON.parse(tagged.stdout);
  assert.equal(runs.length, 1);
  assert.deepEqual(runs[0].labels, { team: "ml", ticket: "T-1" });
  assert.equal(runs[0].name, "try 2");
  assert.equal(JSON.parse((await run(["runs", "-l", "team=ml", "--json"])).stdout).length, 2);
  assert.equal(JSON.parse((await run(["runs", "--status", "failed", "--json"])).stdout).length, 0);
  const bad = await run(["runs", "-l", "no equals"]);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /Expected --label KEY=VALUE/);
});
