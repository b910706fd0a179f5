/**
 * A schedule of every second on a real cluster (3-member etcd, two
 * `runnel server`s, an agent, each a process): the scheduling server is
 * SIGKILLed mid-way, and every tick still has at most one run, the tick
 * missed during the failover runs once (the policy without a starting
 * deadline), and the schedule goes on under the new scheduler.
 */

import assert from "node:assert/strict";
import { RunClient } from "../agent/client/mod.ts";
import { ignoreWithoutEtcd } from "./_etcd.ts";
import { poll, runCli, sandbox } from "./_helpers.ts";
import { ADMIN_TOKEN, startProcessCluster } from "./security/_cluster.ts";

const PIPELINE = `name: every-second
params:
  who: { type: string, required: true }
schedule:
  cron: "* * * * * *"
  params: { who: scheduled }
steps:
  tick:
    backend: shell
    run: echo "tick for \${{ params.who }}"
`;

Deno.test({
  name: "schedules: a cron of every second fires once per tick across a SIGKILL of the scheduler",
  ignore: ignoreWithoutEtcd(),
  async fn() {
    await using box = await sandbox();
    await using cluster = await startProcessCluster(box.dir, {});
    const { servers, leader, survivor } = cluster;
    {
      const file = await box.write("every/pipeline.yaml", PIPELINE);
      const applied = await runCli(
        ["apply", file, "--server", servers[0].http, "--token", ADMIN_TOKEN],
        { cwd: box.dir },
      );
      assert.equal(applied.code, 0, applied.stderr);

      const client = new RunClient([survivor.http], { token: ADMIN_TOKEN });
      const scheduled = async () =>
        (await client.runs()).filter((run) => run.registered?.name === "every-second");
      await poll(async () => (await scheduled()).length >= 3 || undefined, {
        what: "three scheduled runs",
        timeoutMs: 30_000,
      });
      await leader.kill();
      const killedAt = Date.now();
      const before = (await scheduled()).length;
      await poll(async () => (await scheduled()).length >= before + 4 || undefined, {
        what: "four more runs under the new scheduler",
        timeoutMs: 60_000,
        retryOnError: true,
      });
      const runs = await scheduled();
      const ticks = runs.map((run) => run.registered!.tick!).sort((a, b) => a - b);
      const gaps = ticks.slice(1).map((tick, i) => tick - ticks[i]);
      const trace = `ticks ${ticks.map((t) => new Date(t).toISOString().slice(17, 23)).join(" ")}` +
        ` (killed at ${new Date(killedAt).toISOString().slice(17, 23)})`;
      // Never two runs for a tick.
      assert.ok(gaps.every((gap) => gap >= 1000), trace);
      // The ticks missed while no scheduler led run once: one jump at most, after the tick
      // right after the last one fired before the kill.
      assert.ok(gaps.filter((gap) => gap !== 1000).length <= 1, trace);
      const last = await poll(async () => {
        const done = (await scheduled()).filter((run) => run.status === "succeeded");
        return done.length >= 3 ? done : undefined;
      }, { what: "scheduled runs finishing", timeoutMs: 30_000 });
      assert.deepEqual(last[0].params, { who: "scheduled" });
      const listed = await runCli(
        ["schedules", "--server", survivor.http, "--token", ADMIN_TOKEN],
        { cwd: box.dir },
      );
      assert.match(listed.stdout, /^every-second\s+\* \* \* \* \* \*\s+UTC\s+allow\s+/m);
      await client.suspendSchedule("every-second", true);
    }
  },
});
