import assert from "node:assert/strict";
import { agentPaths, loadAgentId, Outbox } from "./mod.ts";
import {
  errorClassOf,
  failureOf,
  fileSafe,
  inputArtifacts,
  maskedLogs,
  materializeInputs,
} from "../attempt/io.ts";
import { Masker } from "../../core/secrets.ts";
import { openLocalArtifactStore } from "../../core/artifacts/local.ts";
import type { LogChunk } from "../../backends/backend.ts";
import { PluginPermissionError } from "../../backends/mod.ts";

/** A temporary directory, removed when disposed. */
async function tempDir(): Promise<{ path: string } & AsyncDisposable> {
  const path = await Deno.makeTempDir({ prefix: "runnel_worker_test_" });
  return { path, [Symbol.asyncDispose]: () => Deno.remove(path, { recursive: true }) };
}

Deno.test("loadAgentId makes an id once and keeps it in agent.json", async () => {
  await using temp = await tempDir();
  const dir = temp.path;
  const stateDir = `${dir}/state`;
  const first = await loadAgentId(stateDir);
  assert.match(first, /^[a-z0-9-]+-[0-9a-f]{6}$/);
  assert.equal(await loadAgentId(stateDir), first);
  assert.deepEqual(JSON.parse(await Deno.readTextFile(agentPaths(stateDir).identity)), {
    agentId: first,
  });
  // A damaged file gets a new id rather than stopping the agent.
  await Deno.writeTextFile(agentPaths(stateDir).identity, "{");
  assert.notEqual(await loadAgentId(stateDir), first);
});

Deno.test("the outbox keeps results across processes until removed", async () => {
  await using temp = await tempDir();
  const dir = temp.path;
  const outbox = new Outbox(`${dir}/outbox`);
  assert.deepEqual(await outbox.load(), []);
  await outbox.add({ attemptId: "r/b/1", resultJson: '{"ok":true}', atMs: 2 });
  await outbox.add({ attemptId: "r/a[x=1]/1", resultJson: '{"ok":false}', atMs: 1 });
  await Deno.writeTextFile(`${dir}/outbox/stray.json`, "not json");

  const reopened = new Outbox(`${dir}/outbox`);
  const entries = await reopened.load();
  assert.deepEqual(entries.map((entry) => entry.attemptId), ["r/a[x=1]/1", "r/b/1"]);
  assert.equal(reopened.has("r/b/1"), true);
  assert.equal(await reopened.remove("r/b/1"), true);
  assert.equal(await reopened.remove("r/b/1"), false);
  assert.deepEqual(
    (await new Outbox(`${dir}/outbox`).load()).map((entry) => entry.attemptId),
    ["r/a[x=1]/1"],
  );
  // Attempt ids hold "/": one flat file each.
  assert.ok(
    [...Deno.readDirSync(`${dir}/outbox`)].some((f) => f.name === `${fileSafe("r/a[x=1]/1")}.json`),
  );
});

Deno.test("inputs: one artifact is a file, a fan-in a directory per leg", async () => {
  await using temp = await tempDir();
  const dir = temp.path;
  const store = openLocalArtifactStore(`${dir}/artifacts`);
  const put = async (step: string, name: string, text: string) => {
    await Deno.writeTextFile(`${dir}/upload`, text);
    const record = await store.put(`${dir}/upload`, { run: "r", step, name });
    return { runId: "r", stepId: step, name, digest: record.digest };
  };
  const data = await put("gen", "data.csv", "a,b\n");
  const eu = { ...await put("convert[region=eu]", "part.csv", "eu\n"), leg: "region=eu" };
  const us = await put("convert[region=us]", "part.csv", "us\n");
  assert.deepEqual(inputArtifacts(data), { fanIn: false, artifacts: [data] });
  assert.deepEqual(inputArtifacts([eu, us]), { fanIn: true, artifacts: [eu, us] });

  const paths = await materializeInputs(
    store,
    { data, parts: { fanIn: true, artifacts: [eu, us] } },
    `${dir}/in`,
  );
  assert.deepEqual(paths, { data: `${dir}/in/data/data.csv`, parts: `${dir}/in/parts` });
  assert.equal(await Deno.readTextFile(paths.data), "a,b\n");
  assert.equal(
    await Deno.readTextFile(`${dir}/in/parts/${fileSafe("region=eu")}/part.csv`),
    "eu\n",
  );
  // Without a leg name, the step id names the directory.
  assert.equal(
    await Deno.readTextFile(`${dir}/in/parts/${fileSafe("convert[region=us]")}/part.csv`),
    "us\n",
  );

  await assert.rejects(
    materializeInputs(store, { data: { ...data, digest: `sha256:${"1".repeat(64)}` } }, `${dir}/x`),
    (error: Error & { code?: string }) =>
      error.code === "artifact_missing" && errorClassOf(error) === "artifact",
  );
});

Deno.test("masked logs: whole lines, a secret split across chunks still masked", async () => {
  const encoder = new TextEncoder();
  async function* chunks(): AsyncGenerator<LogChunk> {
    yield { stream: "stdout", data: encoder.encode("key: hunt") };
    yield { stream: "stderr", data: encoder.encode("warn\n") };
    yield { stream: "stdout", data: encoder.encode("er2\nnext hunter2 line\npartial") };
  }
  const pieces = [];
  for await (const piece of maskedLogs(chunks(), new Masker(["hunter2"]))) pieces.push(piece);
  assert.deepEqual(pieces, [
    { stream: "stderr", text: "warn\n" },
    { stream: "stdout", text: "key: ***\nnext *** line\n" },
    { stream: "stdout", text: "partial" },
  ]);
});

Deno.test("exits and errors become results with the local mode's classes", () => {
  const masker = new Masker(["topsecret"]);
  assert.equal(failureOf({ exitCode: 0 }, masker), undefined);
  assert.deepEqual(failureOf({ exitCode: 65 }, masker), {
    ok: false,
    errorClass: "business",
    exitCode: 65,
    message: "business error (exit code 65)",
  });
  assert.deepEqual(
    failureOf({ exitCode: 1, message: "bad topsecret", usage: { cpuMs: 5 } }, masker),
    {
      ok: false,
      errorClass: "application",
      exitCode: 1,
      message: "bad ***",
      usage: { cpuMs: 5 },
    },
  );
  assert.equal(failureOf({ exitCode: 0, errorClass: "timeout" }, masker)?.ok, false);
  assert.equal(
    errorClassOf(new PluginPermissionError("deno", "Requires read access")),
    "permission",
  );
  assert.equal(
    errorClassOf(Object.assign(new Error("x"), { code: "invalid_step_config" })),
    "application",
  );
  assert.equal(errorClassOf(new Error("socket closed")), "infrastructure");
});
