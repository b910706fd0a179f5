/**
 * Exit handlers: `on-success` and `on-exit` webhooks told when a run ends,
 * in runnel's JSON or as a Slack incoming-webhook message; on a cluster,
 * only to hosts its allow-list names.
 */

import assert from "node:assert/strict";
import { RunClient } from "../agent/client/mod.ts";
import { PipelineError } from "../core/errors.ts";
import { poll, runCli, sandbox } from "./_helpers.ts";
import { startTestServer } from "./_server.ts";

Deno.test("handlers: on-success and on-exit webhooks, JSON and Slack-shaped, never blocking the run", async () => {
  await using box = await sandbox();
  const received: Array<{ path: string; body: Record<string, unknown> }> = [];
  await using hook = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    async (request) => {
      received.push({ path: new URL(request.url).pathname, body: await request.json() });
      return new Response("ok");
    },
  );
  const url = `http://127.0.0.1:${hook.addr.port}`;
  const pipeline = (fail: boolean) =>
    `name: handled
on-success: { webhook: "${url}/success", format: slack }
on-exit: { webhook: "${url}/exit" }
steps:
  a: { run: "${fail ? "exit 4" : "true"}", retry: { max: 0 } }
`;
  const ok = await box.write("ok.yaml", pipeline(false));
  assert.equal((await runCli(["run", ok, "--state-dir", box.stateDir], { cwd: box.dir })).code, 0);
  await poll(() => received.length >= 2 || undefined, { what: "two deliveries" });
  const slack = received.find((r) => r.path === "/success")!.body;
  assert.match(String(slack.text), /^:white_check_mark: \*handled\*: run \S+ succeeded$/);
  const exit = received.find((r) => r.path === "/exit")!.body;
  assert.equal(exit.event, "run.succeeded");
  assert.deepEqual(exit.failedSteps, []);

  received.length = 0;
  const bad = await box.write("bad.yaml", pipeline(true));
  assert.equal((await runCli(["run", bad, "--state-dir", box.stateDir], { cwd: box.dir })).code, 1);
  await poll(() => received.length >= 1 || undefined, { what: "the on-exit delivery" });
  assert.deepEqual(received.map((r) => r.path), ["/exit"], "on-success is not told of a failure");
  assert.equal(received[0].body.event, "run.failed");
  assert.deepEqual(received[0].body.failedSteps, ["a"]);
});

Deno.test("handlers: a cluster refuses an on-exit webhook to a host it does not allow", async () => {
  await using box = await sandbox();
  await using server = await startTestServer(`${box.dir}/state.db`, {
    token: "handlers-join-token-0123456789",
    adminToken: "handlers-admin-token-0123456789",
  });
  const client = new RunClient([server.http], { token: "handlers-admin-token-0123456789" });
  await assert.rejects(
    client.submit(
      `name: leak\non-exit: { webhook: "http://169.254.169.254/latest" }\nsteps:\n  a: { run: "true" }\n`,
      "p.yaml",
      box.dir,
    ),
    (error: unknown) =>
      error instanceof PipelineError && error.diagnostics[0].code === "webhook_not_allowed" &&
      /webhook \(on-exit\)/.test(error.diagnostics[0].message),
  );
});

Deno.test("exit handlers are steps: after the DAG, by outcome, told the outcome; nothing may need one", async () => {
  await using box = await sandbox();
  const run = (args: string[]) => runCli([...args, "--state-dir", box.stateDir], { cwd: box.dir });
  const pipeline = (fail: boolean) =>
    `name: handled
steps:
  build: { run: "echo built" }
  test: { needs: [build], run: "${fail ? "exit 4" : "true"}", retry: { max: 0 } }
  flaky: { run: "exit 1", continue-on-error: true }
  cleanup:
    handler: exit
    run: echo "cleanup status=$RUNNEL_RUN_STATUS failed=$RUNNEL_FAILED_STEPS"
  notify:
    handler: failure
    run: echo "notify $RUNNEL_RUN_STATUS"
  promote:
    handler: success
    run: echo promote
`;
  const ok = await run(["run", await box.write("ok.yaml", pipeline(false)), "--logs"]);
  assert.equal(ok.code, 0, ok.stderr + ok.stdout);
  assert.match(ok.stdout, /cleanup │ cleanup status=succeeded failed=flaky\n/);
  assert.match(ok.stdout, /promote │ promote\n/);
  assert.doesNotMatch(ok.stdout, /notify │/);
  // Handlers start only once every other step has ended.
  const order = ok.stdout.split("\n").filter((line) => /^[▶✓✗]/.test(line));
  const lastDag = Math.max(
    ...["build", "test", "flaky"].map((s) =>
      order.findIndex((line) => new RegExp(`^[✓✗] ${s}\\b`).test(line))
    ),
  );
  assert.ok(order.findIndex((line) => line.startsWith("▶ cleanup")) > lastDag, order.join("\n"));

  const failed = await run(["run", await box.write("fail.yaml", pipeline(true)), "--logs"]);
  assert.equal(failed.code, 1, failed.stderr + failed.stdout);
  assert.match(failed.stdout, /cleanup │ cleanup status=failed failed=test,flaky\n/);
  assert.match(failed.stdout, /notify │ notify failed\n/);
  assert.doesNotMatch(failed.stdout, /promote │/);

  const bad = await box.write(
    "bad.yaml",
    `name: bad
steps:
  a: { run: "true" }
  done: { handler: exit, needs: [a], run: "true", outputs: [x.txt] }
  b: { needs: [done], run: "true" }
`,
  );
  const located = await run(["validate", bad]);
  assert.equal(located.code, 2);
  assert.match(located.stderr, /bad\.yaml:4:26: step "done" is an exit handler/);
  assert.match(located.stderr, /bad\.yaml:5:16: step "b" needs exit handler "done"/);
});
