/**
 * `runnel rerun RUN STEP… [--downstream]`, locally and on a cluster: a new
 * run in which the chosen steps run again and every other step that
 * succeeded is reused, its outputs by digest, without running.
 */

import assert from "node:assert/strict";
import { runCli, sandbox } from "./_helpers.ts";
import { startTestCluster } from "./_server.ts";

/** a → b → c, and d alone; each appends its name to ran.log and passes a file on. */
function pipeline(log: string): string {
  const step = (name: string, input?: string) =>
    `  ${name}:
    backend: shell
${
      input
        ? `    needs: [${input}]\n    inputs: { prev: ${input}/${input}.txt }\n`
        : ""
    }    outputs: [${name}.txt]
    run: |
      echo ${name} >> ${log}
      { ${
      input ? 'cat "$RUNNEL_INPUT_PREV"; ' : ""
    }echo ${name}; } > "$RUNNEL_OUTPUT_${name.toUpperCase()}_TXT"
`;
  return `name: chain\nsteps:\n${step("a")}${step("b", "a")}${step("c", "b")}${step("d")}`;
}

Deno.test("rerun (local): the chosen step runs again, the rest is reused; --downstream reruns its dependents", async () => {
  await using box = await sandbox();
  const log = `${box.dir}/ran.log`;
  const file = await box.write("p.yaml", pipeline(log));
  const run = (args: string[]) => runCli([...args, "--state-dir", box.stateDir], { cwd: box.dir });
  const first = await run(["run", file]);
  assert.equal(first.code, 0, first.stderr + first.stdout);
  const runId = /^run (\S+)/m.exec(first.stdout)![1];
  assert.deepEqual((await Deno.readTextFile(log)).trim().split("\n").sort(), ["a", "b", "c", "d"]);

  await Deno.writeTextFile(log, "");
  const only = await run(["rerun", runId, "b"]);
  assert.equal(only.code, 0, only.stderr + only.stdout);
  assert.equal((await Deno.readTextFile(log)).trim(), "b");
  const onlyId = /^run (\S+)/m.exec(only.stdout)![1];
  const shown = JSON.parse((await run(["show", onlyId, "--json"])).stdout);
  assert.equal(shown.rerunOf, runId);
  assert.equal(shown.steps.a.reason, `reused from run ${runId}`);
  assert.equal(shown.steps.c.status, "succeeded");

  await Deno.writeTextFile(log, "");
  const down = await run(["rerun", runId, "b", "--downstream"]);
  assert.equal(down.code, 0, down.stderr + down.stdout);
  assert.deepEqual((await Deno.readTextFile(log)).trim().split("\n"), ["b", "c"]);

  const unknown = await run(["rerun", runId, "nope"]);
  assert.notEqual(unknown.code, 0);
  assert.match(
    unknown.stderr,
    /Expected a step of pipeline "chain", got "nope" \(its steps: a, b, c, d\)/,
  );
});

Deno.test("rerun (cluster): the same through the API, reused outputs flowing to the rerun steps", async () => {
  await using box = await sandbox();
  const log = `${box.dir}/ran.log`;
  await using cluster = await startTestCluster(box.dir, "rerun");
  {
    const client = cluster.client;
    const finished = async (runId: string) => {
      for await (const _ of client.events(runId)) { /* until the run ends */ }
      return await client.run(runId);
    };
    const { runId } = await client.submit(pipeline(log), "p.yaml", box.dir);
    assert.equal((await finished(runId)).run.status, "succeeded");
    await Deno.writeTextFile(log, "");
    const again = await client.rerun(runId, ["c"]);
    assert.deepEqual(again.rerun, ["c"]);
    const { run, steps } = await finished(again.runId);
    assert.equal(run.status, "succeeded", JSON.stringify(steps));
    assert.equal(run.rerunOf, runId);
    assert.equal((await Deno.readTextFile(log)).trim(), "c");
    // c read b's reused output: its own output holds the whole chain.
    assert.equal(steps.c.outputs?.["c.txt"]?.size, "a\nb\nc\n".length);
  }
});
