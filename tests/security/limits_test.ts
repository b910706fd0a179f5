/**
 * Issue 10, items 9, 11, 12 and 13 replayed with real processes: bad input
 * and a busy or full machine must not exhaust a runner or a server.
 *
 * - 9: a 971-byte file describing a million matrix legs is refused at its
 *   `matrix` key in milliseconds, by `runnel validate` and by a server,
 *   whose `/health` keeps answering; `--limit` raises the limit.
 * - 11: 1,000 no-op shell steps on a runner allowed 256 open files all
 *   succeed: by default a few run at once, and with `--concurrency 1000`
 *   the attempts that find no file descriptor are lost and run again, never
 *   failed.
 * - 12: a 30-day timeout, a zero timeout and a 99999999-day backoff are
 *   refused where they are written; the longest accepted ones run without
 *   a single `TimeoutOverflowWarning`.
 * - 13: with the state directory on a 4 MiB tmpfs, a step that fills it with
 *   output fails as `infrastructure` and the run is recorded as failed;
 *   `runs`, `show`, `logs` and `cancel` answer on the full disk; a run that
 *   cannot be recorded ends with a clear message and stays resumable; once
 *   there is space, `resume` finishes every run. Mounting needs root: where
 *   it is refused the test is skipped and says why, except under `CI=true`.
 *
 * @module
 */

import assert from "node:assert/strict";
import { defaultConcurrency } from "../../mod.ts";
import { CLI_PERMISSIONS, MAIN, runCli, sandbox } from "../_helpers.ts";

/** The matrix of the report: 3 keys × 100 values, 10^6 legs, in under 1 KiB. */
function matrixBomb(): string {
  const values = (_key: string) => `[${Array.from({ length: 100 }, (_, i) => i).join(",")}]`;
  return [
    "name: bomb",
    "steps:",
    "  fan:",
    "    run: echo ${{ matrix.a }}",
    "    matrix:",
    `      a: ${values("a")}`,
    `      b: ${values("b")}`,
    `      c: ${values("c")}`,
    "",
  ].join("\n");
}

/** A matrix of `a × b × c` legs (20,000 by default: twice the default limit). */
function wideMatrix(a = 2, b = 100, c = 100): string {
  const values = (n: number) => `[${Array.from({ length: n }, (_, i) => i).join(",")}]`;
  return `name: wide\nsteps:\n  fan:\n    run: echo\n    matrix: { a: ${values(a)}, b: ${
    values(b)
  }, c: ${values(c)} }\n`;
}

const BOMB_MESSAGE = 'bomb.yaml:5:5: matrix of step "fan" expands to up to 1,000,000 legs ' +
  "(100 × 100 × 100); the limit is 10,000 legs per step";

Deno.test("9: runnel validate refuses a million-leg matrix at its key, at once", async () => {
  await using box = await sandbox();
  const file = await box.write("bomb.yaml", matrixBomb());
  assert.ok((await Deno.stat(file)).size < 1024);
  const started = performance.now();
  const result = await runCli(["validate", "bomb.yaml"], { cwd: box.dir });
  const elapsedMs = performance.now() - started;
  assert.equal(result.code, 2, result.stderr);
  assert.ok(result.stderr.includes(BOMB_MESSAGE), result.stderr);
  // The CLI's own start-up included; the expanding validate took 19.7 s.
  assert.ok(elapsedMs < 15_000, `validate took ${elapsedMs} ms`);
});

Deno.test("9: --limit raises a limit for a pipeline that needs it", async () => {
  await using box = await sandbox();
  await box.write("wide.yaml", wideMatrix());
  const refused = await runCli(["validate", "wide.yaml"], { cwd: box.dir });
  assert.equal(refused.code, 2);
  assert.match(refused.stderr, /up to 20,000 legs \(2 × 100 × 100\); the limit is 10,000/);
  const allowed = await runCli(["validate", "wide.yaml", "--limit", "matrix-legs=20000"], {
    cwd: box.dir,
  });
  assert.equal(allowed.code, 0, allowed.stderr);
  assert.match(allowed.stdout, /valid · pipeline "wide" · 20000 step instances/);
  const bad = await runCli(["validate", "wide.yaml", "--limit", "legs=1"], { cwd: box.dir });
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /Expected a limit NAME=VALUE with NAME one of matrix-legs, /);
});

Deno.test("9: a server refuses the matrix bomb with a located 400 and stays healthy", async () => {
  await using box = await sandbox();
  const adminToken = "limits-test-admin-token-0123456789";
  const tokenFile = await box.write("admin.token", adminToken);
  const server = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      ...CLI_PERMISSIONS,
      MAIN,
      "server",
      "--store",
      `${box.dir}/server.db`,
      "--listen",
      "127.0.0.1:0",
      "--grpc",
      "127.0.0.1:0",
      // Lowered, so that the limit is seen to reach the server's parser.
      "--limit",
      "matrix-legs=500",
      "--admin-token-file",
      tokenFile,
    ],
    cwd: box.dir,
    env: { NO_COLOR: "1", RUNNEL_TOKEN: "test-token" },
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  // Read to the end: a server whose stderr pipe fills up blocks on its next log line.
  let log = "";
  const api = Promise.withResolvers<string>();
  const drained = (async () => {
    for await (const text of server.stderr.pipeThrough(new TextDecoderStream())) {
      log += text;
      const found = /API (http:\/\/\S+)/.exec(log);
      if (found) api.resolve(found[1]);
    }
  })();
  try {
    const url = await Promise.race([api.promise, server.status.then(() => assert.fail(log))]);
    const submit = (source: string, file: string) =>
      fetch(`${url}/api/runs`, {
        method: "POST",
        headers: { "content-type": "application/json", authorization: `Bearer ${adminToken}` },
        body: JSON.stringify({ source, file }),
      });
    const started = performance.now();
    const [refused, health] = await Promise.all([
      submit(matrixBomb(), "bomb.yaml"),
      fetch(`${url}/health`),
    ]);
    const elapsedMs = performance.now() - started;
    await health.body?.cancel();
    assert.equal(health.status, 200);
    assert.equal(refused.status, 400);
    const body = await refused.json();
    assert.equal(body.error, "invalid_pipeline");
    assert.deepEqual(
      body.diagnostics.map((d: { code: string; line: number; col: number }) => [
        d.code,
        d.line,
        d.col,
      ]),
      [["too_many_legs", 5, 5]],
    );
    // It took 30 s and 3.77 GB, and answered 500 "Invalid string length".
    assert.ok(elapsedMs < 5_000, `the server took ${elapsedMs} ms`);
    assert.match(body.diagnostics[0].message, /the limit is 500 legs per step/);
    // The server's --limit decides: 600 legs are refused, 400 accepted.
    const over = await submit(wideMatrix(6, 10, 10), "wide.yaml");
    assert.equal(over.status, 400);
    assert.match((await over.json()).message, /up to 600 legs .* the limit is 500/);
    const accepted = await submit(wideMatrix(4, 10, 10), "wide.yaml");
    assert.equal(accepted.status, 201, await accepted.text());
  } finally {
    try {
      server.kill("SIGTERM");
    } catch {
      // It exited already; the assertion above says why.
    }
    await server.status;
    await drained;
  }
});

/** From `--json` events: each step's last status, the most steps active at once, the losses. */
function summarize(jsonLines: string) {
  const status = new Map<string, string>();
  const active = (s?: string) => s === "scheduled" || s === "running";
  let current = 0;
  let peak = 0;
  let lost = 0;
  for (const line of jsonLines.split("\n")) {
    if (!line.startsWith("{")) continue;
    const event = JSON.parse(line);
    if (event.type !== "step") continue;
    const before = status.get(event.stepId);
    status.set(event.stepId, event.status);
    if (active(event.status) && !active(before)) current++;
    if (!active(event.status) && active(before)) current--;
    peak = Math.max(peak, current);
    if (/was lost; rescheduled/.test(event.reason ?? "")) lost++;
  }
  const succeeded = [...status.values()].filter((s) => s === "succeeded").length;
  return { succeeded, peak, lost };
}

/** What a failed run said: its failed steps and the end of its stderr. */
function failures(result: { stdout: string; stderr: string }): string {
  const failed = result.stdout.split("\n").filter((line) => line.includes('"status":"failed"'));
  return [...failed.slice(0, 5), result.stderr.slice(-2_000)].join("\n");
}

function noopSteps(count: number): string {
  const lines = ["name: noop", "steps:"];
  for (let i = 0; i < count; i++) lines.push(`  s${i}: { run: "true" }`);
  return lines.join("\n") + "\n";
}

Deno.test("11: 1,000 no-op shell steps all succeed; by default a few run at once", async () => {
  await using box = await sandbox();
  await box.write("noop.yaml", noopSteps(1_000));
  const args = ["run", "noop.yaml", "--json", "--state-dir", box.stateDir];
  const result = await runCli(args, { cwd: box.dir, openFiles: 256 });
  assert.equal(result.code, 0, failures(result));
  const { succeeded, peak } = summarize(result.stdout);
  assert.equal(succeeded, 1_000);
  assert.ok(peak <= defaultConcurrency(), `${peak} steps ran at once`);
});

Deno.test("11: with --concurrency 1000, attempts short of open files are lost and run again", async () => {
  await using box = await sandbox();
  await box.write("noop.yaml", noopSteps(1_000));
  const args = ["run", "noop.yaml", "--json", "--concurrency", "1000", "--state-dir", box.stateDir];
  const result = await runCli(args, { cwd: box.dir, openFiles: 256 });
  // 889 of them failed with "Too many open files" before.
  assert.equal(result.code, 0, failures(result));
  const { succeeded, lost } = summarize(result.stdout);
  assert.equal(succeeded, 1_000);
  assert.doesNotMatch(result.stdout, /"status":"failed"/);
  // 256 descriptors cannot hold 1,000 steps: the losses show the limit was met.
  assert.ok(lost > 0, "no attempt ran short of open files");
});

Deno.test("12: durations past their bounds are refused where they are written", async () => {
  await using box = await sandbox();
  await box.write(
    "durations.yaml",
    [
      "name: durations",
      "steps:",
      "  long: { run: 'true', timeout: 30d }",
      "  zero: { run: 'true', timeout: 0s }",
      "  never:",
      "    run: 'true'",
      "    retry: { max: 1, backoff: 99999999d, max-backoff: 99999999d }",
      "",
    ].join("\n"),
  );
  const result = await runCli(["validate", "durations.yaml"], { cwd: box.dir });
  assert.equal(result.code, 2);
  for (
    const line of [
      'durations.yaml:3:33: expected a duration from 1ms to 7d for "timeout" in step "long", got the string "30d"',
      'durations.yaml:4:33: expected a duration from 1ms to 7d for "timeout" in step "zero", got the string "0s"',
      'durations.yaml:7:31: expected a duration from 0s to 7d for "backoff" in "retry" of step "never", got the string "99999999d"',
      'durations.yaml:7:55: expected a duration from 0s to 7d for "max-backoff" in "retry" of step "never", got the string "99999999d"',
    ]
  ) assert.ok(result.stderr.includes(line), `${line}\n---\n${result.stderr}`);
});

Deno.test("12: the longest timeout and backoff run without overflowing a timer", async () => {
  await using box = await sandbox();
  await box.write(
    "week.yaml",
    [
      "name: week",
      "defaults: { timeout: 7d }",
      "steps:",
      "  flaky:",
      // Fails once, then succeeds: the retry waits the capped backoff of 1s.
      `    run: test -e "${box.dir}/again" || { touch "${box.dir}/again"; exit 1; }`,
      "    retry: { max: 1, backoff: 7d, max-backoff: 1s, jitter: 0 }",
      "",
    ].join("\n"),
  );
  const result = await runCli(["run", "week.yaml", "--state-dir", box.stateDir], {
    cwd: box.dir,
  });
  assert.equal(result.code, 0, result.stderr);
  // 744 of them in 2 s before: a 30-day wait overflowed into a 1 ms loop.
  assert.doesNotMatch(result.stderr, /TimeoutOverflowWarning/);
});

/** Why a tmpfs cannot be mounted here, or undefined when it can (tried once, at load). */
function tmpfsRefusal(): string | undefined {
  const dir = Deno.makeTempDirSync({ prefix: "runnel-tmpfs-probe-" });
  try {
    const mounted = new Deno.Command("mount", {
      args: ["-t", "tmpfs", "-o", "size=1m", "tmpfs", dir],
      stdout: "null",
      stderr: "piped",
    }).outputSync();
    if (!mounted.success) return new TextDecoder().decode(mounted.stderr).trim() || "mount failed";
    new Deno.Command("umount", { args: [dir] }).outputSync();
    return undefined;
  } catch (error) {
    return error instanceof Error ? error.message : String(error);
  } finally {
    Deno.removeSync(dir);
  }
}

const TMPFS_REFUSAL = tmpfsRefusal();
const SKIP_DISK_FULL = TMPFS_REFUSAL !== undefined && Deno.env.get("CI") !== "true";
if (SKIP_DISK_FULL) {
  console.warn(`skipping the disk-full replay (13): cannot mount a tmpfs: ${TMPFS_REFUSAL}`);
}

/** A pipeline whose first step prints `bytes` of output; `after` needs it. */
function loudPipeline(bytes: number): string {
  return [
    "name: loud",
    "steps:",
    "  loud:",
    `    run: head -c ${bytes} /dev/zero | tr '\\0' x | fold -w 100`,
    "  after:",
    "    run: echo after",
    "    needs: loud",
    "",
  ].join("\n");
}

Deno.test({
  name: "13: a full disk fails the step, records the run, keeps reads working; resume finishes",
  ignore: SKIP_DISK_FULL,
  async fn() {
    await using box = await sandbox();
    const disk = `${box.dir}/disk`;
    await Deno.mkdir(disk);
    const mount = await new Deno.Command("mount", {
      args: ["-t", "tmpfs", "-o", "size=4m", "tmpfs", disk],
    }).output();
    assert.ok(mount.success, `cannot mount a tmpfs (CI=true does not skip): ${TMPFS_REFUSAL}`);
    const state = ["--state-dir", `${disk}/.runnel`];
    const cli = (...args: string[]) => runCli([...args, ...state], { cwd: box.dir });
    const filler = `${disk}/filler`;
    /** Fills the disk but for `spareKiB`. */
    const fill = async (spareKiB: number) => {
      await Deno.remove(filler).catch(() => {});
      const df = await new Deno.Command("df", { args: ["--output=avail", "-k", disk] }).output();
      const availableKiB = Number(new TextDecoder().decode(df.stdout).trim().split("\n").pop());
      const size = Math.max(0, availableKiB - spareKiB) * 1024;
      const file = await Deno.open(filler, { create: true, write: true });
      try {
        await file.write(new Uint8Array(size)).catch(() => 0);
      } finally {
        file.close();
      }
    };
    const runIds = async () => {
      const listed = await cli("runs", "--json");
      assert.equal(listed.code, 0, listed.stderr);
      return (JSON.parse(listed.stdout) as Array<{ runId: string; status: string }>);
    };
    try {
      await box.write("loud.yaml", loudPipeline(8_000_000));

      // The step's output fills the disk: it fails, and the run is recorded as failed.
      const first = await cli("run", "loud.yaml");
      assert.equal(first.code, 1, first.stderr);
      assert.doesNotMatch(first.stderr, /internal error|^\s+at /m);
      const [failed] = await runIds();
      assert.equal(failed.status, "failed");

      // On a disk with no byte left, the read commands still answer.
      await fill(0);
      const show = await cli("show", failed.runId, "--json");
      assert.equal(show.code, 0, show.stderr);
      const steps = JSON.parse(show.stdout).steps;
      assert.equal(steps.loud.status, "failed");
      assert.match(steps.loud.reason, /^infrastructure: .*No space left on device/);
      assert.equal(steps.after.status, "skipped");
      const logs = await cli("logs", failed.runId, "loud");
      assert.equal(logs.code, 0, logs.stderr);
      assert.match(logs.stdout, /^x{100}$/m);
      const cancel = await cli("cancel", failed.runId);
      assert.equal(cancel.code, 0, cancel.stderr);
      assert.match(cancel.stdout, /has already finished/);
      // A write cannot happen: it says so, and what still works.
      const refused = await cli("resume", failed.runId);
      assert.equal(refused.code, 1);
      assert.match(
        refused.stderr,
        /^error: Expected to write the state in .*, but its disk is full/m,
      );
      assert.match(refused.stderr, /"runnel runs", "show", "logs" and "gc" .* still work/);

      // Room to start, none to finish (no reserve left): a clear message, a resumable run.
      await Deno.remove(`${disk}/.runnel/reserve`).catch(() => {});
      await fill(100);
      const stuck = await cli("run", "loud.yaml");
      assert.equal(stuck.code, 1);
      const message =
        /^error: Expected to write the state in .*, but its disk is full .*Run (\S+) stays resumable: free some space, then "runnel resume \1"/m
          .exec(stuck.stderr);
      assert.ok(message, stuck.stderr);
      assert.doesNotMatch(stuck.stderr, /internal error|^\s+at /m);
      const listed = await runIds();
      // Recorded, not finished: pending or running, as far as the disk allowed.
      assert.match(
        listed.find((run) => run.runId === message[1])?.status ?? "",
        /^(pending|running)$/,
      );

      // gc answers on the full disk, and frees what the finished run left.
      const gc = await cli("gc", "--retention", "0s");
      assert.equal(gc.code, 0, gc.stderr);
      assert.match(gc.stdout, /scratch and logs of 1 runs/);

      // Space is back and the step is fixed: resume finishes both runs.
      await Deno.remove(filler);
      await box.write("loud.yaml", loudPipeline(1_000));
      for (const runId of [failed.runId, message[1]]) {
        const resumed = await cli("resume", runId);
        assert.equal(resumed.code, 0, resumed.stderr);
      }
      assert.deepEqual((await runIds()).map((run) => run.status), ["succeeded", "succeeded"]);
    } finally {
      await new Deno.Command("umount", { args: [disk] }).output();
    }
  },
});
