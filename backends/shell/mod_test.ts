import assert from "node:assert/strict";
import { BUSINESS_EXIT_CODE } from "../../core/model.ts";
import { isSuccess } from "../backend.ts";
import { processAlive, waitUntil } from "../_testing.ts";
import { checkBackendConformance, runToEnd, scratchSpec } from "../testing.ts";
import { parseProcessHandle } from "../_process.ts";
import { createShellBackend, validateShellConfig } from "./mod.ts";

const backend = createShellBackend();

Deno.test("shell: runs the script with the standard env and a minimal host env", async () => {
  Deno.env.set("RUNNEL_TEST_LEAK", "leaked");
  const spec = await scratchSpec(
    {
      run:
        'echo "$RUNNEL_STEP $GREETING $RUNNEL_OUTPUT_OUT_TXT ${RUNNEL_TEST_LEAK:-none} $RUNNEL_MATRIX_REGION_NAME $RUNNEL_ATTEMPT"; echo oops >&2; pwd; echo hi > "$RUNNEL_OUTPUTS/out.txt"',
      workdir: "sub",
    },
    {
      files: { "sub/.keep": "" },
      spec: { outputs: ["out.txt"], env: { GREETING: "hello" }, matrix: { "region-name": "eu" } },
    },
  );
  try {
    const result = await runToEnd(await backend.start(spec));
    assert.ok(isSuccess(result.status), JSON.stringify(result));
    assert.equal(
      result.stdout,
      `step hello ${spec.outputsDir}/out.txt none eu 1\n${spec.baseDir}/sub\n`,
    );
    assert.equal(result.stderr, "oops\n");
    assert.equal(await Deno.readTextFile(`${spec.outputsDir}/out.txt`), "hi\n");
  } finally {
    Deno.env.delete("RUNNEL_TEST_LEAK");
    await spec.remove();
  }
});

Deno.test("shell: exit codes map to error classes", async () => {
  for (
    const [run, exitCode, errorClass] of [
      ["exit 3", 3, "application"],
      [`exit ${BUSINESS_EXIT_CODE}`, BUSINESS_EXIT_CODE, "business"],
      ["false; echo unreachable", 1, "application"],
    ] as const
  ) {
    const spec = await scratchSpec({ run });
    try {
      const { status, stdout } = await runToEnd(await backend.start(spec));
      assert.equal(status.exitCode, exitCode, run);
      assert.equal(status.errorClass, errorClass, run);
      assert.equal(stdout, "", "-e stops at the first failure");
    } finally {
      await spec.remove();
    }
  }
});

Deno.test("shell: a missing declared output fails the attempt", async () => {
  const spec = await scratchSpec({ run: "true" }, { spec: { outputs: ["summary.json"] } });
  try {
    const { status } = await runToEnd(await backend.start(spec));
    assert.equal(status.exitCode, 0);
    assert.equal(status.errorClass, "application");
    assert.equal(status.message, 'step did not write declared output "summary.json"');
    assert.equal(isSuccess(status), false);
  } finally {
    await spec.remove();
  }
});

Deno.test("shell: logs stream live, before the step ends", async () => {
  const spec = await scratchSpec({
    run: 'echo first; while [ ! -f "$RUNNEL_OUTPUTS/go" ]; do sleep 0.02; done; echo second',
  });
  try {
    const execution = await backend.start(spec);
    const iterator = execution.logs[Symbol.asyncIterator]();
    const first = await iterator.next();
    assert.equal(new TextDecoder().decode(first.value!.data), "first\n");
    await Deno.writeTextFile(`${spec.outputsDir}/go`, "");
    const second = await iterator.next();
    assert.equal(new TextDecoder().decode(second.value!.data), "second\n");
    assert.equal((await iterator.next()).done, true);
    assert.equal((await execution.wait()).exitCode, 0);
  } finally {
    await spec.remove();
  }
});

Deno.test("shell: cancel kills the whole process group, grandchildren too", async () => {
  const spec = await scratchSpec({
    run: 'sleep 300 & echo $! > "$RUNNEL_OUTPUTS/pid"; wait',
  });
  try {
    const execution = await backend.start(spec);
    const pidFile = `${spec.outputsDir}/pid`;
    await waitUntil(
      async () => (await Deno.readTextFile(pidFile).catch(() => "")).endsWith("\n"),
      "the pid file",
    );
    const grandchild = Number((await Deno.readTextFile(pidFile)).trim());
    assert.ok(await processAlive(grandchild));
    const started = Date.now();
    await execution.cancel();
    const status = await execution.wait();
    assert.ok(Date.now() - started < 2_000, "SIGTERM is enough, no grace wait");
    assert.equal(status.errorClass, "cancelled");
    assert.equal(status.signal, "SIGTERM");
    await waitUntil(async () => !await processAlive(grandchild), "the grandchild to die");
    await execution.cleanup();
  } finally {
    await spec.remove();
  }
});

Deno.test("shell: cancel escalates to SIGKILL after the grace period", async () => {
  const spec = await scratchSpec({
    run: `trap '' TERM; echo ready; while :; do sleep 0.05; done`,
  });
  try {
    const execution = await backend.start(spec);
    const iterator = execution.logs[Symbol.asyncIterator]();
    await iterator.next(); // "ready": the trap is installed
    await execution.cancel(200);
    const status = await execution.wait();
    assert.equal(status.signal, "SIGKILL");
    assert.equal(status.errorClass, "cancelled");
  } finally {
    await spec.remove();
  }
});

Deno.test("shell: a background process left behind does not hold the attempt open", async () => {
  const spec = await scratchSpec({ run: 'sleep 300 & echo $! > "$RUNNEL_OUTPUTS/pid"' });
  try {
    const { status } = await runToEnd(await backend.start(spec));
    assert.equal(status.exitCode, 0);
    const leftover = Number((await Deno.readTextFile(`${spec.outputsDir}/pid`)).trim());
    await waitUntil(async () => !await processAlive(leftover), "the leftover process to be reaped");
  } finally {
    await spec.remove();
  }
});

Deno.test("shell: validate, capabilities and fingerprint", async () => {
  assert.deepEqual(backend.capabilities, { reattach: false, usage: false });
  assert.deepEqual(validateShellConfig({ run: "echo" }), []);
  assert.equal(validateShellConfig({}).length, 1);
  assert.match(validateShellConfig({ run: "x", extra: 1 }).join(), /extra/);
  await assert.rejects(
    () => backend.start({ config: {} } as never),
    /Expected a valid "shell" step config/,
  );
  const fingerprint = await backend.fingerprint();
  assert.equal(fingerprint.available, true);
});

Deno.test("shell: the step leads its own session and process group", async () => {
  if (Deno.build.os !== "linux") return;
  const spec = await scratchSpec({
    run: 'read -r _ _ _ _ group session _ < /proc/$$/stat; echo "$$ $group $session"',
  });
  try {
    const execution = await backend.start(spec);
    const { status, stdout } = await runToEnd(execution);
    assert.ok(isSuccess(status), JSON.stringify(status));
    const { pid } = parseProcessHandle(execution.handle)!;
    assert.equal(stdout, `${pid} ${pid} ${pid}\n`);
  } finally {
    await spec.remove();
  }
});

Deno.test("shell: a cancel right after start still stops the step", async () => {
  const spec = await scratchSpec({ run: "sleep 300" });
  try {
    for (let i = 0; i < 20; i++) {
      const execution = await backend.start(spec);
      await execution.cancel(5_000);
      const status = await execution.wait();
      assert.equal(status.errorClass, "cancelled");
      assert.equal(status.signal, "SIGTERM");
      await execution.cleanup();
    }
  } finally {
    await spec.remove();
  }
});

Deno.test("shell: large and concurrent outputs arrive intact", async () => {
  const spec = await scratchSpec({ run: "seq 1 60000; seq 1 30000 >&2" });
  const numbers = (count: number) => Array.from({ length: count }, (_, i) => `${i + 1}\n`).join("");
  try {
    const results = await Promise.all(
      [0, 1, 2].map(async () => runToEnd(await backend.start(spec))),
    );
    for (const { status, stdout, stderr } of results) {
      assert.ok(isSuccess(status), JSON.stringify(status));
      assert.equal(stdout, numbers(60000));
      assert.equal(stderr, numbers(30000));
    }
  } finally {
    await spec.remove();
  }
});

Deno.test("shell: a shell that does not exist fails the start", async () => {
  const spec = await scratchSpec({ run: "true", shell: "/nonexistent/runnel-sh" });
  try {
    await assert.rejects(async () => await backend.start(spec), Deno.errors.NotFound);
  } finally {
    await spec.remove();
  }
});

Deno.test("shell: recover kills a handle's group only while its pid is the process started then", async () => {
  const spec = await scratchSpec({ run: "sleep 30 & sleep 30" });
  try {
    const execution = await backend.start(spec);
    const { pid, startMs } = parseProcessHandle(execution.handle)!;
    assert.ok(Math.abs(startMs - Date.now()) < 5_000, execution.handle);
    const recover = (handles: string[]) => backend.recover({ agentId: "test", keep: [], handles });
    // Stale handles: the pid now names a process started at another time
    // (as a reused pid would), a bare pid that proves nothing, garbage.
    const stale = [
      `${pid}@${startMs - 60_000}`,
      `${pid}@${startMs + 60_000}`,
      String(pid),
      `${Deno.pid}@0`,
      "1@0",
      "0@0",
      `-${pid}@${startMs}`,
      "",
      "garbage",
      "4e3@1",
    ];
    assert.deepEqual(await recover(stale), []);
    assert.equal(await processAlive(pid), true, "a stale handle is not killed");
    assert.equal((await execution.status()).state, "running");

    assert.deepEqual(await recover([execution.handle]), []);
    const status = await execution.wait();
    assert.equal(status.signal, "SIGKILL");
    assert.equal(await processAlive(pid), false, "a live handle's group is killed");
    await execution.cleanup();
  } finally {
    await spec.remove();
  }
});

Deno.test("shell: keeps the backend contract", async () => {
  const report = await checkBackendConformance({
    backend: createShellBackend,
    echo: { config: { run: "echo hello" }, stdout: "hello\n" },
    long: { config: { run: "sleep 60" } },
  });
  assert.deepEqual(report.skipped, ["re-attaches after a restart"]);
});
