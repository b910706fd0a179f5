/**
 * Registered pipelines on a cluster: `runnel apply` (versions, unchanged
 * applies), `runnel pipelines`, `runnel trigger` with parameters and a
 * named version, `runnel delete-pipeline`, each with and without the role
 * it needs, against a real server and agent.
 */

import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { RunClient } from "../agent/client/mod.ts";
import { startAgent } from "../agent/worker/mod.ts";
import { openLocalArtifactStore } from "../core/artifacts/local.ts";
import { poll, runCli, sandbox } from "./_helpers.ts";
import { startTestServer } from "./_server.ts";

const ADMIN = "pipelines-admin-token-0123456789";
const JOIN = "pipelines-join-token-0123456789";

const PIPELINE = `name: greet
params:
  who: { type: string, required: true }
steps:
  hello:
    run: echo "hello \${{ params.who }} from v1"
`;

async function tokenOf(http: string, role: string): Promise<string> {
  const response = await fetch(`${http}/api/tokens`, {
    method: "POST",
    headers: { authorization: `Bearer ${ADMIN}` },
    body: JSON.stringify({ name: `${role}-user`, role }),
  });
  assert.equal(response.status, 201);
  return (await response.json()).token;
}

async function finished(client: RunClient, runId: string) {
  for await (const _ of client.events(runId)) { /* until the run ends */ }
  return await client.run(runId);
}

Deno.test("registered pipelines: apply, list, trigger with parameters and versions, delete; roles", async () => {
  await using box = await sandbox();
  await using server = await startTestServer(`${box.dir}/state.db`, {
    token: JOIN,
    adminToken: ADMIN,
  });
  const agent = await startAgent({
    servers: [`127.0.0.1:${server.server.grpcPort}`],
    token: JOIN,
    agentId: "worker-1",
    slots: 2,
    allowShell: true,
    stateDir: `${box.dir}/agent`,
    artifacts: openLocalArtifactStore(`${box.dir}/artifacts`),
    log: () => {},
  });
  try {
    const submitter = await tokenOf(server.http, "submit");
    const reader = await tokenOf(server.http, "read");
    const cli = (args: string[], token = submitter) =>
      runCli([...args, "--server", server.http, "--token", token], { cwd: box.dir });
    const file = await box.write("greet/pipeline.yaml", PIPELINE);

    const first = await cli(["apply", file]);
    assert.equal(first.code, 0, first.stderr);
    assert.equal(first.stdout.trim(), "greet version 1 applied");
    assert.equal((await cli(["apply", file])).stdout.trim(), "greet unchanged (version 1)");
    const refused = await cli(["apply", file], reader);
    assert.notEqual(refused.code, 0);
    assert.match(refused.stderr, /403|submit/);
    await Deno.writeTextFile(file, PIPELINE.replace("from v1", "from v2"));
    assert.equal((await cli(["apply", file])).stdout.trim(), "greet version 2 applied");

    const listed = await cli(["pipelines"], reader);
    assert.match(listed.stdout, /^greet\s+2\s+2\s+/m);
    const versions = await cli(["pipelines", "greet"], reader);
    assert.match(versions.stdout, /^2 \*\s/m);
    assert.match(versions.stdout, /^1\s+\d{4}-/m);

    // A trigger needs its required parameters, checked before anything runs.
    const missing = await cli(["trigger", "greet"]);
    assert.equal(missing.code, 2, missing.stdout + missing.stderr);
    assert.match(missing.stderr, /parameter "who" is required/);
    const triggered = await cli(["trigger", "greet", "--param", "who=world", "--json"]);
    assert.equal(triggered.code, 0, triggered.stderr);
    const started = JSON.parse(triggered.stdout);
    assert.equal(started.version, 2);
    assert.match(started.url, new RegExp(`/runs/${started.runId}$`));
    const client = new RunClient([server.http], { token: ADMIN });
    const { run, steps } = await finished(client, started.runId);
    assert.equal(run.status, "succeeded", JSON.stringify(steps));
    assert.deepEqual(run.registered, { name: "greet", version: 2 });
    assert.deepEqual(run.params, { who: "world" });
    const shown = await cli(["show", started.runId], reader);
    assert.match(shown.stdout, /registered version 2/);
    assert.match(shown.stdout, /^params {4}who=world$/m);

    const old = await client.trigger("greet", { version: 1, params: { who: "past" } });
    assert.equal(old.version, 1);
    const logs: string[] = [];
    await finished(client, old.runId);
    for await (const { event, data } of client.logs(old.runId, {})) {
      if (event === "log") logs.push((data as { text: string }).text);
    }
    assert.match(logs.join(""), /hello past from v1/);
    await assert.rejects(client.trigger("greet", { version: 9 }), /no version 9/);
    assert.equal((await cli(["trigger", "greet", "--param", "who=x"], reader)).code !== 0, true);

    // Deleting is an admin's: a submitter may not; afterwards a trigger is a 404.
    assert.notEqual((await cli(["delete-pipeline", "greet"])).code, 0);
    const deleted = await cli(["delete-pipeline", "greet"], ADMIN);
    assert.equal(deleted.code, 0, deleted.stderr);
    const gone = await fetch(`${server.http}/api/pipelines/greet/trigger`, {
      method: "POST",
      headers: { authorization: `Bearer ${submitter}` },
      body: "{}",
    });
    assert.equal(gone.status, 404);
    assert.match((await gone.json()).message, /No pipeline "greet" is registered/);
    // Its runs stay.
    assert.equal((await client.run(started.runId)).run.status, "succeeded");
  } finally {
    await agent.stop();
  }
});

Deno.test("registered pipelines: a webhook trigger is accepted only with the body signed by its secret", async () => {
  await using box = await sandbox();
  const key = "webhook-key-" + crypto.randomUUID();
  await using server = await startTestServer(`${box.dir}/state.db`, {
    token: JOIN,
    adminToken: ADMIN,
    secrets: { "hook-key": { env: "HOOK_KEY" } },
    env: (name) => name === "HOOK_KEY" ? key : undefined,
  });
  const client = new RunClient([server.http], { token: ADMIN });
  const source = PIPELINE + "webhook: { secret: hook-key }\n";
  assert.equal((await client.apply(source, "p.yaml", box.dir)).version, 1);
  await assert.rejects(
    client.apply(PIPELINE + "webhook: { secret: nope }\n", "p.yaml", box.dir),
    /"webhook.secret" to name a secret this server declares/,
  );
  const body = JSON.stringify({ params: { who: "hook" } });
  const sign = (secret: string, text: string) =>
    "sha256=" + createHmac("sha256", secret).update(text).digest("hex");
  const call = (headers: Record<string, string>, text = body) =>
    fetch(`${server.http}/api/pipelines/greet/webhook`, { method: "POST", headers, body: text });
  const unsigned = await call({});
  assert.equal(unsigned.status, 401);
  await unsigned.body?.cancel();
  const wrong = await call({ "x-runnel-signature-256": sign("guess", body) });
  assert.equal(wrong.status, 401);
  await wrong.body?.cancel();
  // A signature of another body does not carry over (the body was changed in flight).
  const tampered = await call(
    { "x-runnel-signature-256": sign(key, body) },
    body.replace("hook", "evil"),
  );
  assert.equal(tampered.status, 401);
  await tampered.body?.cancel();
  const signed = await call({ "x-runnel-signature-256": sign(key, body) });
  assert.equal(signed.status, 201);
  const { runId } = await signed.json();
  assert.deepEqual((await client.run(runId)).run.params, { who: "hook" });
  // The secret never reaches the store.
  const { items } = await server.store.list("/");
  assert.ok(!items.some((kv) => kv.value.includes(key)));
});

Deno.test("registered pipelines: runnel backfill starts a run per past tick, or lists them with --dry-run", async () => {
  await using box = await sandbox();
  await using server = await startTestServer(`${box.dir}/state.db`, {
    token: JOIN,
    adminToken: ADMIN,
  });
  const file = await box.write(
    "nightly/pipeline.yaml",
    `name: nightly
params:
  day: { type: string, required: true }
schedule:
  cron: "0 3 * * *"
  timezone: Europe/Paris
  logical-date-param: day
steps:
  report: { backend: shell, run: 'echo "report of \${{ params.day }}"' }
`,
  );
  const cli = (args: string[]) =>
    runCli([...args, "--server", server.http, "--token", ADMIN], { cwd: box.dir });
  assert.equal((await cli(["apply", file])).code, 0);
  const range = ["--from", "2026-11-01T00:00:00Z", "--to", "2026-11-03T12:00:00Z"];
  const dry = await cli(["backfill", "nightly", ...range, "--dry-run"]);
  assert.equal(dry.code, 0, dry.stderr);
  assert.equal(
    dry.stdout,
    "nightly: 3 runs would start (dry run):\n" +
      "  2026-11-01T02:00:00.000Z\n  2026-11-02T02:00:00.000Z\n  2026-11-03T02:00:00.000Z\n",
  );
  const client = new RunClient([server.http], { token: ADMIN });
  assert.equal((await client.runs()).length, 0, "a dry run starts nothing");
  const real = await cli(["backfill", "nightly", ...range]);
  assert.equal(real.code, 0, real.stderr);
  const runs = await poll(async () => {
    const found = (await client.runs()).filter((run) => run.registered?.name === "nightly");
    return found.length === 3 ? found : undefined;
  }, { what: "three backfilled runs" });
  assert.deepEqual(
    runs.map((run) => run.params?.day).sort(),
    ["2026-11-01T02:00:00.000Z", "2026-11-02T02:00:00.000Z", "2026-11-03T02:00:00.000Z"],
  );
  const bad = await cli(["backfill", "nightly", "--from", "yesterday", "--to", "now"]);
  assert.notEqual(bad.code, 0);
  assert.match(bad.stderr, /"from" to be a date and time/);
});

Deno.test("registered pipelines: a schedule set apart from the file, checked, kept over re-applies, deleted", async () => {
  await using box = await sandbox();
  await using server = await startTestServer(`${box.dir}/state.db`, {
    token: JOIN,
    adminToken: ADMIN,
  });
  const cli = (args: string[]) =>
    runCli([...args, "--server", server.http, "--token", ADMIN], { cwd: box.dir });
  const file = await box.write("greet/pipeline.yaml", PIPELINE);
  assert.equal((await cli(["apply", file])).code, 0);
  const good = await box.write(
    "weekly.yaml",
    'cron: "0 9 * * 1"\ntimezone: UTC\nparams: { who: team }\n',
  );
  const set = await cli(["schedules", "set", "greet", good]);
  assert.equal(set.code, 0, set.stderr);
  assert.match((await cli(["schedules"])).stdout, /^greet\s+0 9 \* \* 1\s+UTC\s+allow\s+/m);
  // The pipeline's own section does not override it.
  await Deno.writeTextFile(
    file,
    PIPELINE + 'schedule: { cron: "* * * * *", params: { who: x } }\n',
  );
  assert.equal((await cli(["apply", file])).code, 0);
  assert.match((await cli(["schedules"])).stdout, /^greet\s+0 9 \* \* 1\s/m);
  const badCron = await box.write("bad.yaml", 'cron: "61 * * * *"\n');
  assert.match(
    (await cli(["schedules", "set", "greet", badCron])).stderr,
    /invalid cron expression/,
  );
  const badValues = await box.write("values.yaml", 'cron: "0 9 * * 1"\n');
  assert.match(
    (await cli(["schedules", "set", "greet", badValues])).stderr,
    /parameter "who" is required/,
  );
  assert.equal((await cli(["schedules", "delete", "greet"])).code, 0);
  assert.match((await cli(["schedules"])).stdout, /no schedules on this cluster yet/);
});
