import assert from "node:assert/strict";
import { openLocalArtifactStore } from "../../core/artifacts/local.ts";
import { builtinPlugins, PluginHostPool } from "../../backends/mod.ts";
import { type AttemptJob, AttemptLifecycle, type MaskedText } from "./mod.ts";

/** A lifecycle over the built-in backends in a temporary directory; disposed with it. */
async function lifecycle() {
  const dir = await Deno.realPath(await Deno.makeTempDir({ prefix: "runnel_lifecycle_" }));
  await Deno.mkdir(`${dir}/work`);
  const pool = new PluginHostPool({
    plugins: builtinPlugins(),
    context: { scratchRoot: `${dir}/work`, agentId: "test" },
    entryDir: `${dir}/hosts`,
  });
  const artifacts = openLocalArtifactStore(`${dir}/artifacts`);
  const attempts = new AttemptLifecycle({
    pool,
    artifacts,
    recordsDir: `${dir}/attempts`,
    agentId: "test",
    cancelGraceMs: 500,
  });
  return {
    dir,
    attempts,
    artifacts,
    async [Symbol.asyncDispose]() {
      await pool.close();
      await Deno.remove(dir, { recursive: true });
    },
  };
}

function shellJob(run: string, extra: Partial<AttemptJob> = {}): AttemptJob {
  return {
    runId: "r1",
    stepId: "s",
    attemptId: "r1/s/1",
    attempt: 1,
    backend: "shell",
    config: { run },
    baseDir: "/",
    inputs: {},
    outputs: [],
    env: {},
    mask: [],
    matrix: {},
    ...extra,
  };
}

Deno.test("lifecycle: a success stores its outputs, masks its logs, removes its scratch; its record goes when forgotten", async () => {
  await using box = await lifecycle();
  const logs: MaskedText[] = [];
  let handle = "";
  const running = box.attempts.run(
    shellJob('echo "token=$TOKEN"; echo 42 > "$RUNNEL_OUTPUT_ANSWER_TXT"', {
      outputs: ["answer.txt"],
      env: { TOKEN: "hunter2" },
      mask: ["hunter2"],
    }),
    { onStarted: (h) => handle = h, onLog: (text) => void logs.push(text) },
  );
  const result = await running.result;
  assert.equal(result.ok, true, JSON.stringify(result));
  assert.ok(handle, "the backend's handle was announced");
  assert.equal(logs.map((l) => l.text).join(""), "token=***\n");
  const record = await box.artifacts.get("r1", "s", "answer.txt");
  assert.equal(record?.digest, result.ok ? result.outputs?.["answer.txt"].digest : undefined);
  await assert.rejects(Deno.stat(box.attempts.workDirOf({ runId: "r1", stepId: "s", attempt: 1 })));
  const [kept] = await box.attempts.records();
  assert.equal(kept.attemptId, "r1/s/1");
  assert.equal(kept.handle, handle, "the handle is recorded for recovery");
  assert.equal(kept.spec.env.TOKEN, "hunter2");
  assert.equal((await Deno.stat(`${box.dir}/attempts/r1~2Fs~2F1.json`)).mode! & 0o777, 0o600);
  await box.attempts.forget("r1/s/1");
  assert.deepEqual(await box.attempts.records(), []);
});

Deno.test("lifecycle: exits become classified failures; a stop says why; a bad input is an artifact failure", async () => {
  await using box = await lifecycle();
  const quiet = { onLog: () => {} };
  const business = await box.attempts.run(shellJob("exit 65"), quiet).result;
  assert.equal(business.ok ? "ok" : business.errorClass, "business");
  const missing = await box.attempts.run(shellJob("true", { outputs: ["x.txt"] }), quiet).result;
  assert.equal(missing.ok ? "ok" : missing.errorClass, "application");
  assert.match(missing.ok ? "" : missing.message ?? "", /did not write declared output "x.txt"/);

  let started!: () => void;
  const isStarted = new Promise<void>((resolve) => started = resolve);
  const slow = box.attempts.run(shellJob("sleep 30", { attemptId: "r1/s/2", attempt: 2 }), {
    onStarted: () => started(),
    onLog: () => {},
  });
  await isStarted;
  slow.stop({ kind: "timeout" });
  const timedOut = await slow.result;
  assert.equal(timedOut.ok ? "ok" : timedOut.errorClass, "timeout");

  const shutdown = box.attempts.run(
    shellJob("sleep 30", { attemptId: "r1/s/3", attempt: 3 }),
    quiet,
  );
  shutdown.stop({ kind: "shutdown", message: "the agent stopped" });
  const lost = await shutdown.result;
  assert.deepEqual(lost, {
    ok: false,
    errorClass: "infrastructure",
    message: "the agent stopped",
    lost: true,
  });

  const noInput = await box.attempts.run(
    shellJob("true", {
      attemptId: "r1/s/4",
      attempt: 4,
      inputs: {
        data: { runId: "r0", stepId: "gen", name: "d.csv", digest: `sha256:${"0".repeat(64)}` },
      },
    }),
    quiet,
  ).result;
  assert.equal(noInput.ok ? "ok" : noInput.errorClass, "artifact");
});

Deno.test("lifecycle: recover reaps a recorded process group a dead runner left and reports it lost", async () => {
  await using box = await lifecycle();
  let handle = "";
  const running = box.attempts.run(shellJob("sleep 30 & wait"), {
    onStarted: (h) => handle = h,
    onLog: () => {},
  });
  // Stand for a runner that died: the record stays, nobody waits for the result.
  while (!handle) await new Promise((resolve) => setTimeout(resolve, 10));
  const records = await box.attempts.records();
  assert.equal(records.length, 1);
  const recovered = await box.attempts.recover({ agentId: "test", records });
  assert.deepEqual(recovered.reattached, []);
  assert.deepEqual(recovered.lost.map((record) => record.attemptId), ["r1/s/1"]);
  assert.deepEqual(await box.attempts.records(), [], "a lost attempt's record is removed");
  const result = await running.result;
  assert.equal(result.ok, false, "the process group was killed");
});

Deno.test("lifecycle: an attempt that cannot start for want of open files is lost, not failed; a full disk fails it", async () => {
  const dir = await Deno.realPath(await Deno.makeTempDir({ prefix: "runnel_lifecycle_" }));
  let refusal = "";
  // A pool whose backend refuses to start, as the shell backend did with 1,000 steps at once.
  const pool = {
    context: { scratchRoot: dir, agentId: "test" },
    source: () => ({}),
    backend: () => ({ start: () => Promise.reject(new Error(refusal)) }),
  } as unknown as PluginHostPool;
  const attempts = new AttemptLifecycle({
    pool,
    artifacts: openLocalArtifactStore(`${dir}/artifacts`),
    recordsDir: `${dir}/attempts`,
    agentId: "test",
  });
  try {
    refusal = "Failed to spawn '/usr/bin/setsid': Too many open files (os error 24)";
    const starved = await attempts.run(shellJob("true"), { onLog: () => {} }).result;
    assert.deepEqual(starved, {
      ok: false,
      errorClass: "infrastructure",
      message: `The machine ran out of resources to start the attempt: ${refusal}`,
      lost: true,
    });
    refusal = "No space left on device (os error 28)";
    const full = await attempts.run(shellJob("true", { attemptId: "r1/s/2", attempt: 2 }), {
      onLog: () => {},
    }).result;
    assert.deepEqual(full, { ok: false, errorClass: "infrastructure", message: refusal });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
