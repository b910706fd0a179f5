/**
 * Run parameters end to end: `runnel run --param/--params-file`, values as
 * data in a shell step, `runnel show`, a resume keeping the values, and a
 * cluster submission over the API.
 */

import assert from "node:assert/strict";
import { RunClient } from "../agent/client/mod.ts";
import { PipelineError } from "../core/errors.ts";
import { runCli, sandbox } from "./_helpers.ts";
import { startTestServer } from "./_server.ts";

const PIPELINE = `name: params-demo
params:
  message: { type: string, required: true, description: what to write }
  copies: { type: number, default: 1 }
steps:
  write:
    run: |
      test -f gate || exit 3
      i=0
      while [ $i -lt \${{ params.copies }} ]; do
        echo "[\${{ params.message }}]" >> "$RUNNEL_OUTPUT_OUT_TXT"; i=$((i+1))
      done
      cat "$RUNNEL_OUTPUT_OUT_TXT"
    outputs: [out.txt]
    retry: { max: 0 }
`;

Deno.test("params: a hostile value stays data; a params file and --param; show; resume keeps the values", async () => {
  await using box = await sandbox();
  const file = await box.write("p.yaml", PIPELINE);
  await box.write("values.yaml", "message: from the file\ncopies: 2\n");
  const hostile = `$(touch pwned1); touch pwned2 \`touch pwned3\` "'`;
  await Deno.writeTextFile(`${box.dir}/gate`, "");
  const ran = await runCli(
    [
      "run",
      file,
      "--state-dir",
      box.stateDir,
      "--logs",
      "--params-file",
      `${box.dir}/values.yaml`,
      "--param",
      `message=${hostile}`,
    ],
    { cwd: box.dir },
  );
  assert.equal(ran.code, 0, ran.stderr + ran.stdout);
  assert.equal(
    ran.stdout.split("\n").filter((line) => line.startsWith("  write │")).join("\n"),
    `  write │ [${hostile}]\n  write │ [${hostile}]`,
  );
  for (const name of ["pwned1", "pwned2", "pwned3"]) {
    await assert.rejects(Deno.stat(`${box.dir}/${name}`), Deno.errors.NotFound);
  }
  const runId = /^run (\S+)/m.exec(ran.stdout)![1];
  const shown = await runCli(["show", runId, "--state-dir", box.stateDir], { cwd: box.dir });
  assert.match(shown.stdout, /^params {4}message=.*copies=2$/m);

  // A failed run resumed without --param keeps the values it started with.
  await Deno.remove(`${box.dir}/gate`);
  const failed = await runCli(
    ["run", file, "--state-dir", box.stateDir, "--param", "message=first", "--param", "copies=1"],
    { cwd: box.dir },
  );
  assert.equal(failed.code, 1, failed.stderr + failed.stdout);
  const failedId = /^run (\S+)/m.exec(failed.stdout)![1];
  await Deno.writeTextFile(`${box.dir}/gate`, "");
  const resumed = await runCli(["resume", failedId, "--state-dir", box.stateDir, "--logs"], {
    cwd: box.dir,
  });
  assert.equal(resumed.code, 0, resumed.stderr + resumed.stdout);
  assert.match(resumed.stdout, /write │ \[first\]/);

  const bad = await runCli(["run", file, "--state-dir", box.stateDir, "--param", "copies=abc"], {
    cwd: box.dir,
  });
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /p\.yaml:4:\d+: expected a number for "copies", got "abc"/);
  assert.match(bad.stderr, /parameter "message" is required: give it with --param message=VALUE/);
});

Deno.test("params: a cluster submission carries them, checked before anything runs", async () => {
  await using box = await sandbox();
  await using server = await startTestServer(`${box.dir}/state.db`, {
    token: "params-join-token-0123456789",
    adminToken: "params-admin-token-0123456789",
  });
  const client = new RunClient([server.http], { token: "params-admin-token-0123456789" });
  const { runId } = await client.submit(PIPELINE, "p.yaml", box.dir, undefined, {
    message: "hello",
    copies: 3,
  });
  const { run } = await client.run(runId);
  assert.deepEqual(run.params, { message: "hello", copies: 3 });
  await assert.rejects(
    client.submit(PIPELINE, "p.yaml", box.dir, undefined, { message: "x", copies: "many" }),
    (error: unknown) =>
      error instanceof PipelineError &&
      /expected a number for "copies", got "many"/.test(error.message),
  );
  const raw = await fetch(`${server.http}/api/runs`, {
    method: "POST",
    headers: { authorization: "Bearer params-admin-token-0123456789" },
    body: JSON.stringify({ source: PIPELINE, params: { message: { nested: true } } }),
  });
  assert.equal(raw.status, 400);
  assert.match((await raw.json()).message, /"params.message" to be a string, number or boolean/);
});
