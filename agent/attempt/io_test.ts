import assert from "node:assert/strict";
import { openLocalArtifactStore } from "../../core/artifacts/local.ts";
import { Masker } from "../../core/secrets.ts";
import { fileSafe } from "../../core/_paths.ts";
import type { LogChunk } from "../../backends/backend.ts";
import { PluginPermissionError } from "../../backends/mod.ts";
import {
  collectOutputs,
  errorClassOf,
  failureOf,
  inputArtifacts,
  maskedLogs,
  materializeInputs,
} from "./io.ts";

/** A temporary directory, removed when disposed. */
async function tempDir(): Promise<{ path: string } & AsyncDisposable> {
  const path = await Deno.makeTempDir({ prefix: "runnel_attempt_test_" });
  return { path, [Symbol.asyncDispose]: () => Deno.remove(path, { recursive: true }) };
}

Deno.test("a given-up attempt that recorded an output first does not block or shadow the accepted one", async () => {
  const dir = await Deno.makeTempDir({ prefix: "runnel_attempt_" });
  try {
    const store = openLocalArtifactStore(`${dir}/artifacts`);
    const write = async (attempt: number, text: string) => {
      const outputsDir = `${dir}/out-${attempt}`;
      await Deno.mkdir(outputsDir);
      await Deno.writeTextFile(`${outputsDir}/result.txt`, text);
      return await collectOutputs(store, {
        runId: "r1",
        stepId: "make",
        attemptId: `r1/make/${attempt}`,
        outputsDir,
        outputs: ["result.txt"],
      });
    };
    // Attempt 1 was declared lost, but its worker finished and recorded first.
    const lost = await write(1, "from the lost attempt\n");
    const accepted = await write(2, "from the accepted attempt\n");
    assert.notEqual(accepted["result.txt"].digest, lost["result.txt"].digest);
    const ref = accepted["result.txt"];
    const paths = await materializeInputs(store, {
      input: {
        runId: "r1",
        stepId: "make",
        name: "result.txt",
        digest: ref.digest,
        size: ref.size,
      },
    }, `${dir}/in`);
    assert.equal(await Deno.readTextFile(paths.input), "from the accepted attempt\n");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
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

Deno.test("masked logs: a multi-line secret whose lines arrive in separate chunks", async () => {
  const encoder = new TextEncoder();
  const secret = "line-one-of-it\nline-two-of-it";
  async function* chunks(): AsyncGenerator<LogChunk> {
    yield { stream: "stdout", data: encoder.encode("start\nline-one-of-it\n") };
    yield { stream: "stdout", data: encoder.encode("line-two-of-it\n") };
    yield { stream: "stdout", data: encoder.encode(`alone: line-two-of-it ${btoa(secret)}\n`) };
  }
  let text = "";
  for await (const piece of maskedLogs(chunks(), new Masker([secret]))) text += piece.text;
  // Of the base64, only the last group (which also encodes what follows) is left.
  assert.match(text, /^start\n\*{3}\nalone: \*{3} \*{3}\S{0,4}\n$/);
});

Deno.test("exits and errors become results, classified by the backends' classifyExit", () => {
  const masker = new Masker(["topsecret"]);
  assert.equal(failureOf({ exitCode: 0 }, masker), undefined);
  assert.deepEqual(failureOf({ exitCode: 65 }, masker), {
    ok: false,
    errorClass: "business",
    exitCode: 65,
    message: "step reported a business error (exit code 65)",
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
