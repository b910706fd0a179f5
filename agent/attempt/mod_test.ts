import assert from "node:assert/strict";
import { openLocalArtifactStore } from "../../core/artifacts/local.ts";
import { builtinPlugins, PluginHostPool } from "../../backends/mod.ts";
import { type AttemptJob, AttemptLifecycle, type AttemptRecord, type MaskedText } from "./mod.ts";
import { LogQueue } from "../../backends/log_queue.ts";
import type { Execution, ExitStatus } from "../../backends/backend.ts";

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
    secrets: {},
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
      secrets: { TOKEN: "hunter2" },
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
  // The record names the secret; its value is nowhere on disk.
  assert.deepEqual(kept.secrets, ["TOKEN"]);
  assert.equal(kept.spec.env.TOKEN, undefined);
  assert.ok(!(await Deno.readTextFile(`${box.dir}/attempts/r1~2Fs~2F1.json`)).includes("hunter2"));
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

/** An execution standing for one a backend re-attached: logs pushed by the test, then an exit. */
function reattached(): { execution: Execution; logs: LogQueue; exit(status: ExitStatus): void } {
  const logs = new LogQueue();
  let exit!: (status: ExitStatus) => void;
  const exited = new Promise<ExitStatus>((resolve) => exit = resolve);
  return {
    logs,
    exit: (status) => {
      logs.close();
      exit(status);
    },
    execution: {
      handle: "fake",
      logs,
      wait: () => exited,
      status: () => Promise.resolve({ state: "running" }),
      cancel: () => Promise.resolve(),
      cleanup: () => Promise.resolve(),
    },
  };
}

function recordOf(attemptId: string, secrets: string[]): AttemptRecord {
  return {
    attemptId,
    backend: "shell",
    secrets,
    recordedAt: 0,
    spec: {
      agentId: "test",
      scratchRoot: "/nonexistent",
      runId: "r1",
      stepId: "s",
      attemptId,
      attempt: 1,
      config: {},
      baseDir: "/",
      workDir: "/nonexistent/w",
      inputs: {},
      inputsDir: "/nonexistent/w/in",
      outputsDir: "/nonexistent/w/out",
      outputs: [],
      env: {},
      matrix: {},
    },
  };
}

Deno.test("lifecycle: an adopted attempt's output waits for its secrets, and is withheld without them", async () => {
  await using box = await lifecycle();
  const encoder = new TextEncoder();
  // The values come later (a server re-sends them): the output waits and is masked.
  let give!: (values: Record<string, string> | undefined) => void;
  const later = new Promise<Record<string, string> | undefined>((resolve) => give = resolve);
  const first = reattached();
  const seen: string[] = [];
  const adopted = box.attempts.adopt(
    { record: recordOf("r1/s/1", ["TOKEN"]), execution: first.execution },
    { onLog: ({ text }) => void seen.push(text) },
    { secrets: later },
  );
  first.logs.push({ stream: "stdout", data: encoder.encode("token=hunter2-SECRET\n") });
  first.exit({ exitCode: 0 });
  give({ TOKEN: "hunter2-SECRET" });
  assert.equal((await adopted.result).ok, true);
  assert.deepEqual(seen, ["token=***\n"]);

  // Never had again: nothing the attempt printed is passed on, its failure says why.
  const second = reattached();
  const withheld: string[] = [];
  const blind = box.attempts.adopt(
    { record: recordOf("r1/s/2", ["TOKEN"]), execution: second.execution },
    { onLog: ({ text }) => void withheld.push(text) },
    { secrets: Promise.resolve(undefined) },
  );
  second.logs.push({ stream: "stdout", data: encoder.encode("token=hunter2-SECRET\n") });
  second.exit({ exitCode: 1, message: "failed with hunter2-SECRET" });
  const result = await blind.result;
  assert.equal(result.ok, false);
  assert.match(result.ok ? "" : result.message ?? "", /^\[runnel\] output withheld/);
  assert.equal(withheld.length, 1);
  assert.match(withheld[0], /^\[runnel\] output withheld: the runner restarted/);
  assert.ok(!JSON.stringify([withheld, result]).includes("hunter2"));
});

Deno.test("lifecycle: an attempt that cannot start for want of open files is lost, not failed; a full disk fails it", async () => {
  const dir = await Deno.realPath(await Deno.makeTempDir({ prefix: "runnel_lifecycle_" }));
  let refusal = "";
  // A pool whose backend refuses to start, as the shell backend did with 1,000 steps at once.
  const pool = {
    context: { scratchRoot: dir, agentId: "test" },
    source: () => ({}),
    declaredCapabilities: () => undefined,
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
