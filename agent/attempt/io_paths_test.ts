/**
 * Inputs and outputs never make the runner reach outside the attempt's
 * directories: a name from a plan that would leave its directory is
 * refused, and an output that is not a regular file (a link to
 * `/etc/shadow`, say) is refused, never followed.
 */

import assert from "node:assert/strict";
import { openLocalArtifactStore } from "../../core/artifacts/local.ts";
import { collectOutputs, errorClassOf, materializeInputs, StepOutputError } from "./io.ts";

/** A temporary directory, removed when disposed. */
async function tempDir(): Promise<{ path: string } & AsyncDisposable> {
  const path = await Deno.makeTempDir({ prefix: "runnel_io_paths_test_" });
  return { path, [Symbol.asyncDispose]: () => Deno.remove(path, { recursive: true }) };
}

async function exists(path: string): Promise<boolean> {
  return await Deno.lstat(path).then(() => true, () => false);
}

Deno.test("inputs: a name from an unvalidated plan cannot leave the inputs directory", async () => {
  await using temp = await tempDir();
  const dir = temp.path;
  const store = openLocalArtifactStore(`${dir}/artifacts`);
  await Deno.writeTextFile(`${dir}/upload`, "ssh-ed25519 AAAA attacker\n");
  const record = await store.put(`${dir}/upload`, { run: "r", step: "gen", name: "keys" });
  const artifact = { runId: "r", stepId: "gen", name: "keys", digest: record.digest };
  const cases: Array<[string, Parameters<typeof materializeInputs>[1], RegExp]> = [
    ["input name", { "../../planted": artifact }, /input name "\.\.\/\.\.\/planted"/],
    ["dot input", { "..": artifact }, /input name "\.\."/],
    ["artifact name", { data: { ...artifact, name: "../../planted" } }, /artifact name/],
    [
      "fan-in leg",
      { parts: { fanIn: true, artifacts: [{ ...artifact, leg: ".." }] } },
      /fan-in leg name "\.\."/,
    ],
  ];
  for (const [what, inputs, expected] of cases) {
    await assert.rejects(
      materializeInputs(store, inputs, `${dir}/work/in`),
      (error: Error) => expected.test(error.message) && errorClassOf(error) === "permission",
      what,
    );
  }
  assert.equal(await exists(`${dir}/planted`), false);
  assert.equal(await exists(`${dir}/work/planted`), false);
});

Deno.test("outputs: a link, a directory or a replaced outputs directory is refused, not followed", async () => {
  await using temp = await tempDir();
  const dir = temp.path;
  const store = openLocalArtifactStore(`${dir}/artifacts`);
  const secret = `${dir}/host-secret`;
  await Deno.writeTextFile(secret, "root:$6$hunter2-SECRET:19000::::::\n");
  const collect = (outputsDir: string, outputs: string[]) =>
    collectOutputs(store, { runId: "r", stepId: "s", attemptId: "r/s/1", outputsDir, outputs });

  await Deno.mkdir(`${dir}/a/out`, { recursive: true });
  await Deno.symlink(secret, `${dir}/a/out/shadow`);
  await assert.rejects(collect(`${dir}/a/out`, ["shadow"]), (error: Error) => {
    assert.ok(error instanceof StepOutputError);
    assert.equal(errorClassOf(error), "permission");
    assert.match(error.message, /declared output "shadow" is a symbolic link/);
    return true;
  });

  await Deno.mkdir(`${dir}/b/out/tree`, { recursive: true });
  await assert.rejects(
    collect(`${dir}/b/out`, ["tree"]),
    /declared output "tree" is a directory; an output must be a regular file/,
  );

  // A step that replaced its outputs directory with a link to another one.
  await Deno.mkdir(`${dir}/c`);
  await Deno.symlink(dir, `${dir}/c/out`);
  await assert.rejects(collect(`${dir}/c/out`, ["host-secret"]), /outputs directory was replaced/);

  await assert.rejects(
    collect(`${dir}/a/out`, ["../host-secret"]),
    (error: Error) =>
      /not a plain file name/.test(error.message) && errorClassOf(error) === "permission",
  );
  assert.deepEqual(await store.list(), [], "nothing was stored");
  assert.equal(await Deno.readTextFile(secret), "root:$6$hunter2-SECRET:19000::::::\n");
});

Deno.test("outputs: regular files are stored; the outputs are moved out of the step's reach first", async () => {
  await using temp = await tempDir();
  const dir = temp.path;
  const store = openLocalArtifactStore(`${dir}/artifacts`);
  await Deno.mkdir(`${dir}/work/out`, { recursive: true });
  await Deno.writeTextFile(`${dir}/work/out/result.txt`, "42\n");
  const outputs = await collectOutputs(store, {
    runId: "r",
    stepId: "s",
    attemptId: "r/s/1",
    outputsDir: `${dir}/work/out`,
    outputs: ["result.txt"],
  });
  assert.equal(outputs["result.txt"].size, 3);
  assert.equal(await exists(`${dir}/work/out/result.txt`), false);
  // The holding directory is gone too.
  assert.deepEqual([...Deno.readDirSync(`${dir}/work`)].map((entry) => entry.name), ["out"]);
  assert.deepEqual(
    await collectOutputs(store, {
      runId: "r",
      stepId: "s",
      attemptId: "r/s/1",
      outputsDir: `${dir}/work/out`,
      outputs: [],
    }),
    {},
  );
});
