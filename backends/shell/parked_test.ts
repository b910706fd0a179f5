import assert from "node:assert/strict";
import { BUSINESS_EXIT_CODE } from "../../core/model.ts";
import { type Execution, isSuccess } from "../backend.ts";
import { processAlive, waitUntil } from "../_testing.ts";
import { runToEnd, type ScratchAttempt, scratchSpec } from "../testing.ts";
import { parseProcessHandle } from "../_process.ts";
import { createShellBackend, type ShellBackend } from "./mod.ts";
import { parkable, stepScript } from "./_parked.ts";

const cold = createShellBackend();

/** A backend that parks shells, with one parked (after two steps of the default shell). */
async function primed(): Promise<ShellBackend> {
  const backend = createShellBackend({ parked: true });
  const spec = await scratchSpec({ run: "true" });
  try {
    for (let i = 0; i < 2; i++) await runToEnd(await backend.start(spec));
    await waitUntil(() => backend.parkedPool!.size > 0, "a parked shell");
    await backend.parkedPool!.settled();
    return backend;
  } finally {
    await spec.remove();
  }
}

/** Starts `spec` and checks it ran in the shell parked before it. */
async function startParked(backend: ShellBackend, spec: ScratchAttempt): Promise<Execution> {
  const parked = backend.parkedPool!.pids();
  const execution = await backend.start(spec);
  assert.ok(
    parked.includes(parseProcessHandle(execution.handle)!.pid),
    `Expected the step in a parked shell (${parked}), got ${execution.handle}`,
  );
  return execution;
}

Deno.test("parked shells: a step sees exactly what a cold one sees", async () => {
  if (Deno.build.os !== "linux") return;
  const backend = await primed();
  // A working directory reached through a symlink, values with quotes and
  // newlines, stdin, flags, $0, the session: all as `sh -e -c` has them.
  const spec = await scratchSpec(
    {
      run: [
        "env | sort",
        "pwd",
        'echo "flags=$- zero=$0 args=$#"',
        "cat",
        "read -r _ _ _ _ group session _ < /proc/$$/stat",
        'echo "leader=$(( $$ == group && group == session ))"',
        "umask",
        'echo "$GREETING"',
      ].join("\n"),
      workdir: "link",
    },
    {
      files: { "real/.keep": "" },
      spec: { env: { GREETING: 'it\'s "quoted"\n$(touch pwned) `id`\\', EMPTY: "" } },
    },
  );
  try {
    await Deno.symlink(`${spec.baseDir}/real`, `${spec.baseDir}/link`);
    const expected = await runToEnd(await cold.start(spec));
    const got = await runToEnd(await startParked(backend, spec));
    assert.ok(isSuccess(got.status), JSON.stringify(got));
    assert.deepEqual(got.status, expected.status);
    assert.equal(got.stdout, expected.stdout);
    assert.equal(got.stderr, expected.stderr);
    assert.match(got.stdout, /leader=1\n/);
    assert.match(got.stdout, new RegExp(`^PWD=${spec.baseDir}/real$`, "m"));
    assert.equal(await Deno.stat(`${spec.baseDir}/real/pwned`).catch(() => null), null);
  } finally {
    await backend.close();
    await spec.remove();
  }
});

Deno.test("parked shells: exit codes, errexit and errors as a cold step's", async () => {
  const backend = createShellBackend({ parked: true });
  try {
    for (
      const [run, exitCode, errorClass] of [
        ["true", 0, undefined],
        ["exit 3", 3, "application"],
        [`exit ${BUSINESS_EXIT_CODE}`, BUSINESS_EXIT_CODE, "business"],
        ["false; echo unreachable", 1, "application"],
        ["runnel-no-such-command; echo unreachable", 127, "application"],
        ["if then", 2, "application"],
        ["kill -TERM $$", 143, undefined],
      ] as const
    ) {
      const spec = await scratchSpec({ run });
      try {
        // Three times: cold twice, then parked once the step repeats.
        for (let i = 0; i < 3; i++) {
          const { status, stdout, stderr } = await runToEnd(await backend.start(spec));
          assert.equal(status.exitCode ?? 128 + 15, exitCode, `${run} (#${i})`);
          if (errorClass) assert.equal(status.errorClass, errorClass, run);
          assert.equal(stdout, "", "-e stops at the first failure");
          if (exitCode === 127) assert.match(stderr, /runnel-no-such-command: not found/);
        }
      } finally {
        await spec.remove();
      }
      await waitUntil(() => backend.parkedPool!.size > 0, "a parked shell");
    }
  } finally {
    await backend.close();
  }
});

Deno.test("parked shells: a parked shell holds nothing of a step, and secrets reach only theirs", async () => {
  if (Deno.build.os !== "linux") return;
  const backend = await primed();
  const [pid] = backend.parkedPool!.pids();
  const spec = await scratchSpec(
    { run: 'echo "$API_TOKEN"' },
    { spec: { env: { API_TOKEN: "s3cr3t-value" } } },
  );
  try {
    // ps as this user: the parked shell's command line and environment.
    const ps = await new Deno.Command("ps", {
      args: ["eww", "-o", "args=", "-p", String(pid)],
      stdout: "piped",
    }).output();
    const seen = new TextDecoder().decode(ps.stdout).trim();
    assert.equal(seen, "/bin/sh -c . /dev/stdin");
    const { status, stdout } = await runToEnd(await startParked(backend, spec));
    assert.ok(isSuccess(status));
    assert.equal(stdout, "s3cr3t-value\n");
  } finally {
    await backend.close();
    await spec.remove();
  }
});

Deno.test("parked shells: cancel kills the whole group, grandchildren too", async () => {
  const backend = await primed();
  const marker = `runnel-parked-${crypto.randomUUID()}`;
  const spec = await scratchSpec({ run: `sh -c 'sleep 300; : ${marker}' & sleep 300` });
  try {
    const execution = await startParked(backend, spec);
    const { pid } = parseProcessHandle(execution.handle)!;
    await waitUntil(async () => (await pgrep(marker)).length > 0, "the grandchild");
    await execution.cancel(5_000);
    const status = await execution.wait();
    assert.equal(status.errorClass, "cancelled");
    assert.equal(await processAlive(pid), false);
    await waitUntil(async () => (await pgrep(marker)).length === 0, "the grandchild's end");
    await execution.cleanup();
  } finally {
    await backend.close();
    await spec.remove();
  }
});

Deno.test("parked shells: steps a shell would see differently start cold, as before", async () => {
  const backend = await primed();
  const missing = await scratchSpec({ run: "true", workdir: "no-such-dir" });
  const special = await scratchSpec({ run: 'echo "[$IFS]"' }, { spec: { env: { IFS: ":" } } });
  const parked = backend.parkedPool!.pids();
  try {
    await assert.rejects(async () => await backend.start(missing), Deno.errors.NotFound);
    const execution = await backend.start(special);
    assert.ok(!parked.includes(parseProcessHandle(execution.handle)!.pid));
    const { stdout } = await runToEnd(execution);
    assert.equal(stdout, (await runToEnd(await cold.start(special))).stdout);
    assert.deepEqual(backend.parkedPool!.pids(), parked, "the parked shell is still there");
  } finally {
    await backend.close();
    await missing.remove();
    await special.remove();
  }
  assert.equal(parkable({ cwd: "/", env: { "A-B": "x" }, run: "true", finish: (s) => s }), false);
  assert.equal(parkable({ cwd: "/", env: { PWD: "/x" }, run: "true", finish: (s) => s }), false);
  assert.equal(
    stepScript({ cwd: "/a'b", env: { A: "x'y" }, run: "echo 'hi'", finish: (s) => s }),
    "cd -P -- '/a'\\''b' || exit 126\nunset OLDPWD\nexport A='x'\\''y'\nset -e\n" +
      "eval 'echo '\\''hi'\\''' </dev/null\n",
  );
});

Deno.test("parked shells: close, and the idle limit, kill every parked shell by pid", async () => {
  const backend = await primed();
  const pids = backend.parkedPool!.pids();
  assert.ok(pids.length > 0);
  await backend.close();
  for (const pid of pids) assert.equal(await processAlive(pid), false, `parked ${pid}`);
  const spec = await scratchSpec({ run: "true" });
  assert.ok(isSuccess((await runToEnd(await backend.start(spec))).status), "cold after close");
  assert.equal(backend.parkedPool!.size, 0);

  const idle = createShellBackend({ parked: { idleMs: 50 } });
  try {
    for (let i = 0; i < 2; i++) await runToEnd(await idle.start(spec));
    await waitUntil(() => idle.parkedPool!.pids().length > 0, "a parked shell");
    const [pid] = idle.parkedPool!.pids();
    await waitUntil(async () => !(await processAlive(pid)), "the idle shell's end");
    assert.equal(idle.parkedPool!.size, 0);
  } finally {
    await idle.close();
    await spec.remove();
  }
});

/** Pids of processes whose command line contains `text`. */
async function pgrep(text: string): Promise<string[]> {
  const { stdout } = await new Deno.Command("pgrep", { args: ["-f", text], stdout: "piped" })
    .output();
  return new TextDecoder().decode(stdout).split("\n").filter(Boolean);
}
