/**
 * Concurrency keys on a cluster: runs sharing a key run at most `limit` at
 * once, first come first served (queue), or the newcomer is cancelled
 * (cancel-new), or the running one makes way (cancel-running).
 */

import assert from "node:assert/strict";
import { RunClient } from "../agent/client/mod.ts";
import { startAgent } from "../agent/worker/mod.ts";
import { openLocalArtifactStore } from "../core/artifacts/local.ts";
import { poll, sandbox } from "./_helpers.ts";
import { startTestServer } from "./_server.ts";

function pipeline(log: string, onConflict: string, seconds = 1): string {
  return `name: deploy
params:
  env: { type: string, required: true }
  n: { type: number }
concurrency-key: { key: "deploy-\${{ params.env }}", limit: 1, on-conflict: ${onConflict} }
steps:
  go:
    backend: shell
    run: |
      echo "start \${{ params.env }} \${{ params.n }} $(date +%s%N)" >> ${log}
      sleep ${seconds}
      echo "end \${{ params.env }} \${{ params.n }} $(date +%s%N)" >> ${log}
`;
}

async function cluster(dir: string) {
  const server = await startTestServer(`${dir}/state.db`, {
    token: "key-join-token-0123456789",
    adminToken: "key-admin-token-0123456789",
  });
  const agent = await startAgent({
    servers: [`127.0.0.1:${server.server.grpcPort}`],
    token: "key-join-token-0123456789",
    agentId: "worker-1",
    slots: 4,
    allowShell: true,
    stateDir: `${dir}/agent`,
    artifacts: openLocalArtifactStore(`${dir}/artifacts`),
    log: () => {},
  });
  const client = new RunClient([server.http], { token: "key-admin-token-0123456789" });
  await poll(async () => {
    const state = await (await fetch(`${server.http}/cluster-state`, {
      headers: { authorization: "Bearer key-admin-token-0123456789" },
    })).json();
    return state.workers.length === 1 || undefined;
  }, { what: "the worker online" });
  return {
    client,
    submit: (source: string, params: Record<string, unknown>) =>
      client.submit(source, "p.yaml", dir, undefined, params),
    finished: async (runId: string) => {
      for await (const _ of client.events(runId)) { /* until it ends */ }
      return await client.run(runId);
    },
    async [Symbol.asyncDispose]() {
      await agent.stop();
      await server[Symbol.asyncDispose]();
    },
  };
}

/** [env, n, start ns, end ns] of each step run, from its log lines. */
async function intervals(log: string): Promise<Array<[string, string, bigint, bigint]>> {
  const lines = (await Deno.readTextFile(log)).trim().split("\n").map((line) => line.split(" "));
  return lines.filter((l) => l[0] === "start").map(([, env, n, start]) => {
    const end = lines.find((l) => l[0] === "end" && l[1] === env && l[2] === n)![3];
    return [env, n, BigInt(start), BigInt(end)];
  });
}

Deno.test("concurrency key: runs of a key one at a time, in the order they came; other keys alongside", async () => {
  await using box = await sandbox();
  const log = `${box.dir}/runs.log`;
  await using c = await cluster(box.dir);
  const source = pipeline(log, "queue");
  const ids: string[] = [];
  for (let n = 1; n <= 3; n++) ids.push((await c.submit(source, { env: "prod", n })).runId);
  ids.push((await c.submit(source, { env: "staging", n: 9 })).runId);
  await poll(async () => {
    const run = (await c.client.run(ids[2])).run;
    return run.waiting ? run : undefined;
  }, { what: "the third run waiting in line" }).then((run) => {
    assert.match(run.waiting!, /concurrency key "deploy-prod" is held by/);
  });
  for (const id of ids) assert.equal((await c.finished(id)).run.status, "succeeded");
  const ran = await intervals(log);
  const prod = ran.filter(([env]) => env === "prod");
  assert.deepEqual(prod.map(([, n]) => n), ["1", "2", "3"], "first come, first served");
  for (let i = 1; i < prod.length; i++) {
    assert.ok(
      prod[i][2] >= prod[i - 1][3],
      `prod runs overlap: ${JSON.stringify(ran, (_, v) => typeof v === "bigint" ? String(v) : v)}`,
    );
  }
  const staging = ran.find(([env]) => env === "staging")!;
  assert.ok(staging[2] < prod[0][3], "another key runs alongside");
});

Deno.test("concurrency key: cancel-new cancels the newcomer; cancel-running makes the running run give way", async () => {
  await using box = await sandbox();
  const log = `${box.dir}/runs.log`;
  await using c = await cluster(box.dir);
  const first = await c.submit(pipeline(log, "cancel-new", 5), { env: "prod", n: 1 });
  await poll(async () => (await c.client.run(first.runId)).run.status === "running" || undefined, {
    what: "the first run started",
  });
  const second = await c.submit(pipeline(log, "cancel-new", 5), { env: "prod", n: 2 });
  const refused = await c.finished(second.runId);
  assert.equal(refused.run.status, "cancelled");
  assert.match(
    JSON.stringify(refused.steps),
    /concurrency key \\"deploy-prod\\" is held by .*on-conflict: cancel-new/,
  );

  const third = await c.submit(pipeline(log, "cancel-running", 0), { env: "prod", n: 3 });
  const replaced = await c.finished(first.runId);
  assert.equal(replaced.run.status, "cancelled");
  assert.match(JSON.stringify(replaced.steps), new RegExp(`replaced by run ${third.runId}`));
  assert.equal((await c.finished(third.runId)).run.status, "succeeded");
});
