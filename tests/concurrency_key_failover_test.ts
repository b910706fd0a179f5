/**
 * A concurrency key across a SIGKILL of the scheduling server (3-member
 * etcd, two `runnel server`s and an agent, each a process): the runs of
 * the key still run one at a time, in the order they were submitted.
 */

import assert from "node:assert/strict";
import { RunClient } from "../agent/client/mod.ts";
import { ignoreWithoutEtcd } from "./_etcd.ts";
import { poll, sandbox } from "./_helpers.ts";
import { ADMIN_TOKEN, startProcessCluster } from "./security/_cluster.ts";

Deno.test({
  name:
    "concurrency key: one run at a time, first come first served, across a SIGKILL of the scheduler",
  ignore: ignoreWithoutEtcd(),
  async fn() {
    await using box = await sandbox();
    const log = `${box.dir}/runs.log`;
    await Deno.writeTextFile(log, "");
    await using cluster = await startProcessCluster(box.dir, { slots: 4 });
    const { leader, survivor } = cluster;
    {
      const client = new RunClient([survivor.http, leader.http], { token: ADMIN_TOKEN });
      const source = `name: deploy
params:
  n: { type: number, required: true }
concurrency-key: deploy-prod
steps:
  go:
    backend: shell
    run: |
      echo "start \${{ params.n }} $(date +%s%N)" >> ${log}
      sleep 1.5
      echo "end \${{ params.n }} $(date +%s%N)" >> ${log}
`;
      const ids: string[] = [];
      for (let n = 1; n <= 4; n++) {
        ids.push((await client.submit(source, "p.yaml", box.dir, undefined, { n })).runId);
      }
      await poll(async () => (await Deno.readTextFile(log)).includes("start 2") || undefined, {
        what: "the second run started",
        timeoutMs: 30_000,
      });
      await leader.kill();
      const survivorOnly = new RunClient([survivor.http], { token: ADMIN_TOKEN });
      for (const id of ids) {
        const run = await poll(async () => {
          const { run } = await survivorOnly.run(id);
          return run.status === "succeeded" || run.status === "failed" ? run : undefined;
        }, { what: `run ${id} finished`, timeoutMs: 60_000, retryOnError: true });
        assert.equal(run.status, "succeeded", JSON.stringify(run));
      }
      const lines = (await Deno.readTextFile(log)).trim().split("\n").map((line) =>
        line.split(" ")
      );
      const runs = lines.filter((l) => l[0] === "start").map(([, n, start]) => ({
        n,
        start: BigInt(start),
        end: BigInt(lines.find((l) => l[0] === "end" && l[1] === n)![2]),
      }));
      // A step may run twice if its attempt was lost with the scheduler: each attempt counts.
      const order = [...new Set(runs.map((run) => run.n))];
      assert.deepEqual(order, ["1", "2", "3", "4"], "first come, first served");
      for (let i = 1; i < runs.length; i++) {
        assert.ok(
          runs[i].start >= runs[i - 1].end,
          `two runs of the key at once: ${lines.map((l) => l.join(" ")).join(" | ")}`,
        );
      }
    }
  },
});
