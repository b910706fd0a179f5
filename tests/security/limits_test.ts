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
        headers: { "content-type": "application/json" },
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

/** `runnel ARGS` in `cwd` with at most `files` open files (`ulimit -n`), to its end. */
async function runCliWithOpenFiles(args: string[], cwd: string, files: number) {
  const command = [Deno.execPath(), "run", ...CLI_PERMISSIONS, MAIN, ...args]
    .map((word) => `'${word.replaceAll("'", `'\\''`)}'`).join(" ");
  const output = await new Deno.Command("sh", {
    args: ["-c", `ulimit -n ${files} && exec ${command}`],
    cwd,
    env: { NO_COLOR: "1" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decoder = new TextDecoder();
  return {
    code: output.code,
    stdout: decoder.decode(output.stdout),
    stderr: decoder.decode(output.stderr),
  };
}

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
  const result = await runCliWithOpenFiles(args, box.dir, 256);
  assert.equal(result.code, 0, failures(result));
  const { succeeded, peak } = summarize(result.stdout);
  assert.equal(succeeded, 1_000);
  assert.ok(peak <= defaultConcurrency(), `${peak} steps ran at once`);
});

Deno.test("11: with --concurrency 1000, attempts short of open files are lost and run again", async () => {
  await using box = await sandbox();
  await box.write("noop.yaml", noopSteps(1_000));
  const args = ["run", "noop.yaml", "--json", "--concurrency", "1000", "--state-dir", box.stateDir];
  const result = await runCliWithOpenFiles(args, box.dir, 256);
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
