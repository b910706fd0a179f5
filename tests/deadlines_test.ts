/**
 * Deadlines beyond a step's timeout: a run's `deadline` stops what still
 * runs (no process of it remains) and fails the run; a step's
 * `queue-timeout` fails an attempt no worker takes in time, each with its
 * own error class.
 */

import assert from "node:assert/strict";
import { RunClient } from "../agent/client/mod.ts";
import { poll, processesMentioning, runCli, sandbox } from "./_helpers.ts";
import { startTestServer } from "./_server.ts";

Deno.test("deadline: a local run past its deadline stops its steps and fails", async () => {
  await using box = await sandbox();
  const marker = `sleep 71.${Date.now() % 1000}`;
  const file = await box.write(
    "p.yaml",
    `name: late
deadline: 1500ms
steps:
  slow: { run: "${marker}" }
  after: { needs: [slow], run: "true" }
`,
  );
  const began = Date.now();
  const ran = await runCli(["run", file, "--state-dir", box.stateDir, "--json"], { cwd: box.dir });
  assert.equal(ran.code, 1, ran.stderr);
  assert.ok(Date.now() - began < 20_000);
  const steps = ran.stdout.trim().split("\n").map((line) => JSON.parse(line))
    .filter((event) => event.type === "step");
  assert.ok(
    steps.some((event) => event.stepId === "slow" && event.status === "failed"),
    JSON.stringify(steps),
  );
  const runId = steps[0].runId;
  const shown = JSON.parse(
    (await runCli(["show", runId, "--state-dir", box.stateDir, "--json"], { cwd: box.dir })).stdout,
  );
  assert.equal(shown.steps.slow.attempts[0].result.errorClass, "deadline");
  assert.equal(shown.steps.after.status, "cancelled");
  await poll(async () => (await processesMentioning(marker)).length === 0 || undefined, {
    what: "the stopped step's process gone",
  });
});

Deno.test("queue-timeout: a cluster step no worker can take fails with its own class", async () => {
  await using box = await sandbox();
  await using server = await startTestServer(`${box.dir}/state.db`, {
    token: "deadlines-join-token-0123456789",
    adminToken: "deadlines-admin-token-0123456789",
  });
  const client = new RunClient([server.http], { token: "deadlines-admin-token-0123456789" });
  const { runId } = await client.submit(
    `name: unplaceable
steps:
  gpu:
    backend: shell
    selector: { pool: gpu }
    queue-timeout: 500ms
    retry: { max: 0 }
    run: "true"
`,
    "p.yaml",
    box.dir,
  );
  for await (const _ of client.events(runId)) { /* until the run ends */ }
  const { run, steps } = await client.run(runId);
  assert.equal(run.status, "failed");
  const result = steps.gpu.attempts[0].result!;
  assert.equal(result.ok, false);
  assert.equal(!result.ok && result.errorClass, "queue-timeout");
});
