/**
 * Approval gates: a step waits for a person (`runnel approve RUN STEP`),
 * locally and on a cluster (with the role the step asks for), rejected,
 * timed out, cancelled while waiting, and decided after a SIGKILL of the
 * scheduling server.
 */

import assert from "node:assert/strict";
import { RunClient } from "../agent/client/mod.ts";
import { ignoreWithoutEtcd } from "./_etcd.ts";
import { poll, runCli, sandbox, spawnCli, waitForLine } from "./_helpers.ts";
import { startTestServer } from "./_server.ts";
import { ADMIN_TOKEN, startProcessCluster } from "./security/_cluster.ts";

const PIPELINE = (timeout = "1h") =>
  `name: gated
steps:
  build: { backend: shell, run: echo built }
  deploy:
    backend: shell
    needs: [build]
    approval: { message: "Deploy to prod?", timeout: ${timeout} }
    run: echo deployed
`;

Deno.test("approval (local): the run waits; approve lets it go on, reject fails it, a timeout fails it", async () => {
  await using box = await sandbox();
  const file = await box.write("p.yaml", PIPELINE());
  const cli = (args: string[]) => runCli([...args, "--state-dir", box.stateDir], { cwd: box.dir });
  const waiting = async () => {
    const { child, lines } = spawnCli(["run", file, "--state-dir", box.stateDir, "--logs"], {
      cwd: box.dir,
    });
    const runId = (await waitForLine(lines, (l) => l.startsWith("run "))).split(" ")[1];
    await poll(async () => {
      const shown = JSON.parse((await cli(["show", runId, "--json"])).stdout);
      return shown.steps.deploy.status === "waiting" || undefined;
    }, { what: "deploy waiting for approval" });
    return { child, lines, runId };
  };

  const first = await waiting();
  const shownWaiting = await cli(["show", first.runId]);
  assert.match(shownWaiting.stdout, /deploy\s+waiting.*Deploy to prod\?/);
  const approved = await cli(["approve", first.runId, "deploy"]);
  assert.equal(approved.code, 0, approved.stderr);
  assert.equal((await first.child.status).code, 0);
  await first.child.stderr.cancel();
  const done = JSON.parse((await cli(["show", first.runId, "--json"])).stdout);
  assert.equal(done.steps.deploy.status, "succeeded");
  assert.equal(done.steps.deploy.approval.outcome, "approved");

  const second = await waiting();
  const rejected = await cli(["approve", second.runId, "deploy", "--reject", "--reason", "freeze"]);
  assert.equal(rejected.code, 0, rejected.stderr);
  assert.equal((await second.child.status).code, 1);
  await second.child.stderr.cancel();
  const failed = JSON.parse((await cli(["show", second.runId, "--json"])).stdout);
  assert.match(failed.steps.deploy.reason, /^rejected by .*: freeze$/);
  assert.match((await cli(["approve", second.runId, "deploy"])).stderr, /not waiting for approval/);

  await Deno.writeTextFile(file, PIPELINE("300ms"));
  const late = await cli(["run", file, "--json"]);
  assert.equal(late.code, 1);
  const lateId = JSON.parse(late.stdout.split("\n")[0]).runId;
  const timedOut = JSON.parse((await cli(["show", lateId, "--json"])).stdout);
  assert.equal(timedOut.steps.deploy.approval.outcome, "timed-out");
});

Deno.test("approval (cluster): the step's role decides; cancel while waiting; not waiting is a 409", async () => {
  await using box = await sandbox();
  await using server = await startTestServer(`${box.dir}/state.db`, {
    token: "approval-join-token-0123456789",
    adminToken: "approval-admin-token-0123456789",
  });
  const admin = new RunClient([server.http], { token: "approval-admin-token-0123456789" });
  const tokenOf = async (role: string) =>
    (await (await fetch(`${server.http}/api/tokens`, {
      method: "POST",
      headers: { authorization: "Bearer approval-admin-token-0123456789" },
      body: JSON.stringify({ name: `${role}-user`, role }),
    })).json()).token as string;
  const reader = new RunClient([server.http], { token: await tokenOf("read") });
  const { startAgent } = await import("../agent/worker/mod.ts");
  const { openLocalArtifactStore } = await import("../core/artifacts/local.ts");
  const agent = await startAgent({
    servers: [`127.0.0.1:${server.server.grpcPort}`],
    token: "approval-join-token-0123456789",
    agentId: "worker-1",
    slots: 2,
    allowShell: true,
    stateDir: `${box.dir}/agent`,
    artifacts: openLocalArtifactStore(`${box.dir}/artifacts`),
    log: () => {},
  });
  try {
    const source = PIPELINE().replace(
      'approval: { message: "Deploy to prod?", timeout: 1h }',
      "approval: { timeout: 1h, role: admin }",
    );
    const { runId } = await admin.submit(source, "p.yaml", box.dir);
    await poll(
      async () => (await admin.run(runId)).steps.deploy?.status === "waiting" || undefined,
      {
        what: "deploy waiting",
      },
    );
    await assert.rejects(reader.approve(runId, "deploy", true), /role admin/);
    await admin.approve(runId, "deploy", true, "go");
    for await (const _ of admin.events(runId)) { /* until the run ends */ }
    const { run, steps } = await admin.run(runId);
    assert.equal(run.status, "succeeded");
    assert.match(steps.deploy.approval?.by ?? "", /admin/);
    await assert.rejects(admin.approve(runId, "deploy", true), /not waiting for approval/);

    const second = await admin.submit(source, "p.yaml", box.dir);
    await poll(
      async () => (await admin.run(second.runId)).steps.deploy?.status === "waiting" || undefined,
      {
        what: "deploy waiting again",
      },
    );
    await admin.cancel(second.runId);
    for await (const _ of admin.events(second.runId)) { /* until the run ends */ }
    assert.equal((await admin.run(second.runId)).steps.deploy.status, "cancelled");
  } finally {
    await agent.stop();
  }
});

Deno.test({
  name: "approval (cluster): decided after a SIGKILL of the scheduling server while waiting",
  ignore: ignoreWithoutEtcd(),
  async fn() {
    await using box = await sandbox();
    await using cluster = await startProcessCluster(box.dir);
    const client = new RunClient([cluster.survivor.http], { token: ADMIN_TOKEN });
    const { runId } = await client.submit(PIPELINE(), "p.yaml", box.dir);
    await poll(
      async () => (await client.run(runId)).steps.deploy?.status === "waiting" || undefined,
      {
        what: "deploy waiting",
        timeoutMs: 30_000,
      },
    );
    await cluster.leader.kill();
    await client.approve(runId, "deploy", true);
    const run = await poll(async () => {
      const { run } = await client.run(runId);
      return run.status === "succeeded" || run.status === "failed" ? run : undefined;
    }, { what: "the run finished under the new scheduler", timeoutMs: 60_000, retryOnError: true });
    assert.equal(run.status, "succeeded");
  },
});
