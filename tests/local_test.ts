/**
 * Local mode end to end: real subprocesses, the real embedded store and the
 * real artifact store in a temporary directory.
 */

import assert from "node:assert/strict";
import {
  collectGarbage,
  createProgress,
  definePipeline,
  loadPipeline,
  openLocalState,
  readStepStates,
  resumeRun,
  type RunEvent,
  runPipeline,
} from "../mod.ts";
import { ROOT, runCli, sandbox, spawnCli, waitForLine } from "./_helpers.ts";

Deno.test("the energy example runs end to end and its report is right", async () => {
  await using box = await sandbox();
  const plan = await loadPipeline(`${ROOT}/examples/energy/pipeline.yaml`);
  const events: RunEvent[] = [];
  const summary = await runPipeline(plan, {
    stateDir: box.stateDir,
    onEvent: (e) => events.push(e),
  });
  assert.equal(summary.status, "succeeded", JSON.stringify(summary.steps, null, 2));
  assert.deepEqual(Object.keys(summary.steps).sort(), ["analyze", "generate", "report"]);
  const state = await openLocalState(box.stateDir);
  try {
    const record = await state.artifacts.get(summary.runId, "report", "energy_report.csv");
    assert.ok(record, "energy_report.csv recorded");
    const out = `${box.dir}/report.csv`;
    await state.artifacts.materialize(record, out);
    const lines = (await Deno.readTextFile(out)).trim().split("\n");
    assert.equal(
      lines[0],
      "region,readings,consumption_kwh,production_kwh,net_kwh,peak_kwh,self_sufficiency",
    );
    assert.equal(lines.length, 5, "one line per region");
    const analysis = await state.artifacts.get(summary.runId, "analyze", "output1.json");
    assert.equal(analysis?.contentType, "application/json");
  } finally {
    await state.close();
  }
  const order = events.filter((e) => e.type === "step" && e.status === "succeeded")
    .map((e) => (e as { stepId: string }).stepId);
  assert.deepEqual(order, ["generate", "analyze", "report"]);
});

Deno.test("matrix fan-out and fan-in, retry of one leg, and cache on the second run", async () => {
  await using box = await sandbox();
  const plan = await loadPipeline(`${ROOT}/examples/fanout/pipeline.yaml`);
  const first = await runPipeline(plan, { stateDir: box.stateDir });
  assert.equal(first.status, "succeeded", JSON.stringify(first.steps, null, 2));
  const legs = Object.keys(first.steps).filter((id) => id.startsWith("measure["));
  assert.equal(legs.length, 3);
  const eu = legs.find((id) => id.includes("eu-central"))!;
  assert.equal(first.steps[eu].attempts.length, 2, "the flaky leg was retried once");
  assert.equal(first.steps[eu].attempts[0].result?.ok, false);
  for (const leg of legs.filter((id) => id !== eu)) {
    assert.equal(first.steps[leg].attempts.length, 1);
  }
  // merge started only after every leg ended
  const mergeStart = first.steps.merge.attempts[0].startedAt!;
  for (const leg of legs) assert.ok(first.steps[leg].finishedAt! <= mergeStart);
  const state = await openLocalState(box.stateDir);
  try {
    const total = await state.artifacts.get(first.runId, "merge", "total.json");
    assert.ok(total);
    await state.artifacts.materialize(total, `${box.dir}/total.json`);
    const merged = JSON.parse(await Deno.readTextFile(`${box.dir}/total.json`));
    assert.equal(merged.legs, 3);
  } finally {
    await state.close();
  }
  const second = await runPipeline(plan, { stateDir: box.stateDir });
  assert.equal(second.status, "succeeded");
  assert.equal(second.steps.prepare.cached, true, "prepare came from the cache");
  assert.notEqual(second.steps.merge.cached, true, "merge has no cache: it ran");
});

Deno.test("secrets are masked in stored logs and events", async () => {
  await using box = await sandbox();
  const file = await box.write(
    "pipeline.yaml",
    `name: secret-demo
secrets:
  TOKEN: { env: RUNNEL_TEST_TOKEN }
steps:
  leak:
    backend: shell
    secrets: [TOKEN]
    run: |
      echo "token is $TOKEN"
      printf 'half %s' "$TOKEN" | cut -c1-200
      echo
      echo "stderr $TOKEN" >&2
`,
  );
  const secret = "s3cr3t-value-Zq9";
  const events: RunEvent[] = [];
  const summary = await runPipeline(await loadPipeline(file), {
    stateDir: box.stateDir,
    env: (name) => name === "RUNNEL_TEST_TOKEN" ? secret : undefined,
    onEvent: (e) => events.push(e),
  });
  assert.equal(summary.status, "succeeded", JSON.stringify(summary.steps));
  const logs = events.filter((e) => e.type === "log").map((e) => (e as { text: string }).text)
    .join("");
  assert.match(logs, /token is \*\*\*/);
  assert.ok(!logs.includes(secret));
  const result = await runCli(["logs", summary.runId, "--state-dir", box.stateDir], {
    cwd: box.dir,
  });
  assert.equal(result.code, 0, result.stderr);
  assert.match(result.stdout, /token is \*\*\*/);
  assert.match(result.stdout, /stderr \*\*\*/);
  assert.ok(!result.stdout.includes(secret));
});

Deno.test("a failed run resumes from its failure point, reusing what succeeded", async () => {
  await using box = await sandbox();
  const flag = `${box.dir}/fixed`;
  const file = await box.write(
    "pipeline.yaml",
    `name: resume-demo
steps:
  first:
    backend: shell
    run: echo one > "$RUNNEL_OUTPUT_ONE_TXT"
    outputs: [one.txt]
  second:
    backend: shell
    inputs: { one: first/one.txt }
    run: |
      test -f "${flag}" || { echo "not fixed yet" >&2; exit 1; }
      cat "$RUNNEL_INPUT_ONE" > "$RUNNEL_OUTPUT_TWO_TXT"
    outputs: [two.txt]
`,
  );
  const failed = await runPipeline(await loadPipeline(file), { stateDir: box.stateDir });
  assert.equal(failed.status, "failed");
  assert.equal(failed.steps.first.status, "succeeded");
  assert.equal(failed.steps.second.status, "failed");
  await Deno.writeTextFile(flag, "");
  const resumed = await resumeRun(failed.runId, { stateDir: box.stateDir });
  assert.equal(resumed.status, "succeeded", JSON.stringify(resumed.steps, null, 2));
  assert.equal(resumed.runId, failed.runId);
  assert.equal(resumed.steps.first.attempts.length, 1, "first was not run again");
  assert.equal(resumed.steps.second.attempts.length, 2);
  assert.equal(resumed.steps.second.attempts[1].attempt, 2, "attempt numbers keep counting");
});

Deno.test("a business error is not retried; an application error is", async () => {
  await using box = await sandbox();
  const file = await box.write(
    "pipeline.yaml",
    `name: classes
steps:
  business:
    backend: shell
    retry: { max: 3, backoff: 10ms }
    run: exit 65
  application:
    backend: shell
    retry: { max: 2, backoff: 10ms }
    run: exit 3
`,
  );
  const summary = await runPipeline(await loadPipeline(file), { stateDir: box.stateDir });
  assert.equal(summary.status, "failed");
  assert.equal(summary.steps.business.attempts.length, 1);
  const result = summary.steps.business.attempts[0].result;
  assert.ok(result && !result.ok && result.errorClass === "business");
  assert.equal(summary.steps.application.attempts.length, 3);
});

Deno.test("a step past its timeout is stopped and fails with class timeout", async () => {
  await using box = await sandbox();
  const file = await box.write(
    "pipeline.yaml",
    `name: timeouts
steps:
  slow:
    backend: shell
    timeout: 300ms
    run: sleep 30
`,
  );
  const started = Date.now();
  const summary = await runPipeline(await loadPipeline(file), { stateDir: box.stateDir });
  assert.ok(Date.now() - started < 15_000, "did not wait for sleep 30");
  assert.equal(summary.status, "failed");
  const result = summary.steps.slow.attempts[0].result;
  assert.ok(result && !result.ok && result.errorClass === "timeout", JSON.stringify(result));
});

Deno.test("on-failure webhook receives the failure metadata without blocking the run", async () => {
  await using box = await sandbox();
  const received: unknown[] = [];
  let calls = 0;
  await using server = Deno.serve(
    { port: 0, hostname: "127.0.0.1", onListen() {} },
    async (req) => {
      calls++;
      // The first delivery fails: the runner must retry it.
      if (calls === 1) return new Response("busy", { status: 503 });
      received.push(await req.json());
      return new Response("ok");
    },
  );
  const file = await box.write(
    "pipeline.yaml",
    `name: hooks
on-failure: { webhook: "http://127.0.0.1:${server.addr.port}/hook", retries: 3, backoff: 10ms }
steps:
  broken:
    backend: shell
    run: echo boom >&2; exit 4
  independent:
    backend: shell
    run: echo fine
`,
  );
  const summary = await runPipeline(await loadPipeline(file), { stateDir: box.stateDir });
  assert.equal(summary.status, "failed");
  assert.equal(summary.steps.independent.status, "succeeded");
  assert.equal(received.length, 1);
  const body = received[0] as Record<string, unknown>;
  assert.equal(body.stepId, "broken");
  assert.equal(body.exitCode, 4);
  assert.equal(body.errorClass, "application");
  assert.equal(body.runId, summary.runId);
});

Deno.test("SIGKILL mid-run loses no completed step; resume finishes the run", async () => {
  await using box = await sandbox();
  const gate = `${box.dir}/gate`;
  const file = await box.write(
    "pipeline.yaml",
    `name: crash
steps:
  done-before-crash:
    backend: shell
    run: echo kept > "$RUNNEL_OUTPUT_KEPT_TXT"
    outputs: [kept.txt]
  blocked:
    backend: shell
    needs: [done-before-crash]
    inputs: { kept: done-before-crash/kept.txt }
    run: |
      while [ ! -f "${gate}" ]; do sleep 0.05; done
      cp "$RUNNEL_INPUT_KEPT" "$RUNNEL_OUTPUT_OUT_TXT"
    outputs: [out.txt]
`,
  );
  const { child, lines } = spawnCli(["run", file, "--state-dir", box.stateDir], { cwd: box.dir });
  const header = await waitForLine(lines, (l) => l.startsWith("run "));
  const runId = header.split(" ")[1];
  await waitForLine(lines, (l) => l.includes("blocked started"));
  child.kill("SIGKILL");
  await child.status;
  await child.stderr.cancel();
  await Deno.writeTextFile(gate, "");
  const state = await openLocalState(box.stateDir);
  try {
    const steps = await readStepStates(state.store, runId);
    assert.equal(steps["done-before-crash"].status, "succeeded", "completed step survived");
  } finally {
    await state.close();
  }
  // The owner lease of the killed process must expire before resume accepts the run.
  let resumed;
  const deadline = Date.now() + 20_000;
  while (true) {
    const result = await runCli(["resume", runId, "--state-dir", box.stateDir], { cwd: box.dir });
    if (result.code === 0) {
      resumed = result;
      break;
    }
    assert.match(result.stderr, /still being executed/, result.stderr + result.stdout);
    assert.ok(Date.now() < deadline, "owner lease never expired");
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
  assert.match(resumed.stdout, /succeeded/);
  const after = await openLocalState(box.stateDir);
  try {
    const steps = await readStepStates(after.store, runId);
    assert.equal(steps["done-before-crash"].attempts.length, 1, "not run again");
    assert.equal(steps.blocked.status, "succeeded");
    assert.equal(steps.blocked.attempts.length, 2, "lost attempt replaced by a new one");
  } finally {
    await after.close();
  }
});

Deno.test("Ctrl-C cancels running steps cleanly and leaves a resumable run", async () => {
  await using box = await sandbox();
  const gate = `${box.dir}/gate`;
  const file = await box.write(
    "pipeline.yaml",
    `name: interrupt
steps:
  wait:
    backend: shell
    run: while [ ! -f "${gate}" ]; do sleep 0.05; done
`,
  );
  const { child, lines } = spawnCli(["run", file, "--state-dir", box.stateDir], { cwd: box.dir });
  const header = await waitForLine(lines, (l) => l.startsWith("run "));
  const runId = header.split(" ")[1];
  await waitForLine(lines, (l) => l.includes("wait started"));
  child.kill("SIGINT");
  const status = await child.status;
  await child.stderr.cancel();
  assert.equal(status.code, 130);
  const show = await runCli(["show", runId, "--state-dir", box.stateDir, "--json"], {
    cwd: box.dir,
  });
  assert.equal(JSON.parse(show.stdout).status, "cancelled");
  await Deno.writeTextFile(gate, "");
  const resumed = await runCli(["resume", runId, "--state-dir", box.stateDir], { cwd: box.dir });
  assert.equal(resumed.code, 0, resumed.stderr + resumed.stdout);
});

Deno.test("runnel cancel from another process stops a running run", async () => {
  await using box = await sandbox();
  const file = await box.write(
    "pipeline.yaml",
    `name: cancel-me
steps:
  forever:
    backend: shell
    run: sleep 60
`,
  );
  const { child, lines } = spawnCli(["run", file, "--state-dir", box.stateDir], { cwd: box.dir });
  const runId = (await waitForLine(lines, (l) => l.startsWith("run "))).split(" ")[1];
  await waitForLine(lines, (l) => l.includes("forever started"));
  const cancel = await runCli(["cancel", runId, "--state-dir", box.stateDir], { cwd: box.dir });
  assert.equal(cancel.code, 0, cancel.stderr);
  assert.match(cancel.stdout, /cancel requested/);
  const status = await child.status;
  await child.stderr.cancel();
  assert.equal(status.code, 1);
});

Deno.test("bad input gets located errors, exit code 2 and no stack trace", async () => {
  await using box = await sandbox();
  const file = await box.write(
    "pipeline.yaml",
    `name: bad
steps:
  analyze:
    backend: shell
    run: echo
    neds: [generate]
    timeout: ten minutes
`,
  );
  const result = await runCli(["run", file, "--state-dir", box.stateDir], { cwd: box.dir });
  assert.equal(result.code, 2);
  assert.match(result.stderr, /pipeline\.yaml:6:5: unknown key "neds".*did you mean "needs"/);
  assert.match(result.stderr, /pipeline\.yaml:7:\d+: .*duration/);
  assert.ok(!/\bat .*\.ts:\d+/.test(result.stderr), "no stack trace");
  const missing = await runCli(["validate", `${box.dir}/nope.yaml`], { cwd: box.dir });
  assert.equal(missing.code, 2, missing.stderr);
  assert.match(missing.stderr, /nope\.yaml/);
  const usage = await runCli(["frobnicate"], { cwd: box.dir });
  assert.equal(usage.code, 2);
  assert.match(usage.stderr, /unknown command "frobnicate"/);
  const unknownRun = await runCli(["show", "nope", "--state-dir", box.stateDir], { cwd: box.dir });
  assert.equal(unknownRun.code, 1);
  assert.match(unknownRun.stderr, /No run "nope"/);
});

Deno.test("runs, show and plan print what a user expects", async () => {
  await using box = await sandbox();
  const file = await box.write(
    "pipeline.yaml",
    `name: tiny
steps:
  a: { backend: shell, run: "echo a > $RUNNEL_OUTPUT_A_TXT", outputs: [a.txt] }
  b: { backend: shell, needs: [a], run: echo b }
`,
  );
  const run = await runCli(["run", file, "--state-dir", box.stateDir], { cwd: box.dir });
  assert.equal(run.code, 0, run.stderr + run.stdout);
  const runs = await runCli(["runs", "--state-dir", box.stateDir], { cwd: box.dir });
  assert.match(runs.stdout, /tiny\s+succeeded/);
  const runId = runs.stdout.split("\n")[1].split(/\s+/)[0];
  const show = await runCli(["show", runId.slice(0, 12), "--state-dir", box.stateDir], {
    cwd: box.dir,
  });
  assert.equal(show.code, 0, show.stderr);
  assert.match(show.stdout, /a\.txt/);
  assert.match(show.stdout, /b\s+succeeded/);
  const mermaid = await runCli(["plan", file, "--mermaid"], { cwd: box.dir });
  assert.match(mermaid.stdout, /flowchart/);
  assert.match(mermaid.stdout, /s0 --> s1/);
  const json = await runCli(["run", file, "--state-dir", box.stateDir, "--json"], {
    cwd: box.dir,
  });
  const events = json.stdout.trim().split("\n").map((line) => JSON.parse(line));
  const runEvents = events.filter((event) => event.type === "run");
  assert.equal(runEvents.at(-1).status, "succeeded");
  // Last, the run's plugin host counters: two shell steps, one cold host.
  assert.deepEqual(events.at(-1), {
    type: "hosts",
    runId: runEvents[0].runId,
    coldStarts: 1,
    warmHits: 1,
    hostsAlive: 1,
    hostsLost: 0,
  });
});

Deno.test("gc removes artifacts, scratch and logs of old unpinned runs and keeps pinned ones", async () => {
  await using box = await sandbox();
  const file = await box.write(
    "pipeline.yaml",
    `name: gc-demo
steps:
  make: { backend: shell, run: "echo making; echo data > $RUNNEL_OUTPUT_DATA_TXT", outputs: [data.txt] }
  broken: { backend: shell, needs: [make], run: "exit 1" }
`,
  );
  const plan = await loadPipeline(file);
  const old = await runPipeline(plan, { stateDir: box.stateDir });
  const pinned = await runPipeline(plan, { stateDir: box.stateDir });
  const state = await openLocalState(box.stateDir);
  await state.artifacts.pin(pinned.runId);
  await state.close();
  const later = Date.now() + 15 * 24 * 3600 * 1000;
  const dry = await collectGarbage({ stateDir: box.stateDir, now: later, dryRun: true });
  assert.equal(dry.recordsRemoved, 1);
  assert.equal(dry.runsCleaned, 1);
  await Deno.stat(`${box.stateDir}/logs/${old.runId}`); // still there after a dry run
  const result = await collectGarbage({ stateDir: box.stateDir, now: later });
  assert.equal(result.recordsRemoved, 1);
  assert.equal(result.runsCleaned, 1);
  await assert.rejects(() => Deno.stat(`${box.stateDir}/logs/${old.runId}`));
  await assert.rejects(() => Deno.stat(`${box.stateDir}/work/${old.runId}`));
  await Deno.stat(`${box.stateDir}/work/${pinned.runId}`); // the failed attempt's scratch, kept
  const after = await openLocalState(box.stateDir);
  try {
    assert.equal(await after.artifacts.get(old.runId, "make", "data.txt"), undefined);
    assert.ok(await after.artifacts.get(pinned.runId, "make", "data.txt"));
  } finally {
    await after.close();
  }
  const cli = await runCli(["gc", "--state-dir", box.stateDir, "--retention", "14d"], {
    cwd: box.dir,
  });
  assert.equal(cli.code, 0, cli.stderr);
  assert.match(cli.stdout, /removed 0 artifact records/);
});

Deno.test("logs --follow streams a running step's output until the run ends", async () => {
  await using box = await sandbox();
  const gate = `${box.dir}/gate`;
  const file = await box.write(
    "pipeline.yaml",
    `name: follow
steps:
  talk:
    backend: shell
    run: |
      echo first line
      while [ ! -f "${gate}" ]; do sleep 0.05; done
      echo last line
`,
  );
  const { child, lines } = spawnCli(["run", file, "--state-dir", box.stateDir], { cwd: box.dir });
  const runId = (await waitForLine(lines, (l) => l.startsWith("run "))).split(" ")[1];
  await waitForLine(lines, (l) => l.includes("talk started"));
  const follower = spawnCli(["logs", runId, "--follow", "--state-dir", box.stateDir], {
    cwd: box.dir,
  });
  await waitForLine(follower.lines, (l) => l.includes("first line"));
  await Deno.writeTextFile(gate, "");
  await waitForLine(follower.lines, (l) => l.includes("last line"));
  assert.equal((await follower.child.status).code, 0, "follow ends with the run");
  await follower.child.stderr.cancel();
  assert.equal((await child.status).code, 0);
  await child.stderr.cancel();
});

Deno.test("on a terminal, progress redraws running steps in place", () => {
  const written: string[] = [];
  let now = 1_000;
  const progress = createProgress({
    tty: true,
    color: false,
    write: (t) => written.push(t),
    now: () => now,
  });
  progress.onEvent({
    type: "run",
    runId: "r1",
    pipeline: "p",
    status: "running",
    at: 1_000,
    steps: ["a"],
  });
  progress.onEvent({
    type: "step",
    runId: "r1",
    stepId: "a",
    status: "running",
    attempt: 1,
    at: 1_000,
  });
  progress.onEvent({
    type: "log",
    runId: "r1",
    stepId: "a",
    attempt: 1,
    stream: "stdout",
    text: "working\n",
  });
  now = 2_500;
  progress.onEvent({
    type: "step",
    runId: "r1",
    stepId: "a",
    status: "succeeded",
    attempt: 1,
    at: 2_500,
  });
  progress.onEvent({
    type: "run",
    runId: "r1",
    pipeline: "p",
    status: "succeeded",
    at: 2_500,
    steps: ["a"],
  });
  progress.close();
  const text = written.join("");
  assert.match(text, /▶ a \d+ms\n/, "a live line for the running step");
  // deno-lint-ignore no-control-regex -- ANSI cursor-up and erase-below are the point
  assert.match(text, /\x1b\[\d+A\x1b\[0J/, "the live block is erased before it is redrawn");
  assert.match(text, /✓ a 1\.5s/);
  assert.match(text, /succeeded in 1\.5s \(1 succeeded\)/);
});

Deno.test("a pipeline defined in code resumes from its stored plan (it has no file)", async () => {
  await using box = await sandbox();
  const flag = `${box.dir}/fixed`;
  const plan = definePipeline({
    name: "in-code",
    steps: {
      flaky: { backend: "shell", run: `test -f "${flag}"`, retry: { max: 0 } },
    },
  }, { baseDir: box.dir });
  const failed = await runPipeline(plan, { stateDir: box.stateDir });
  assert.equal(failed.status, "failed");
  await Deno.writeTextFile(flag, "");
  const resumed = await resumeRun(failed.runId, { stateDir: box.stateDir });
  assert.equal(resumed.status, "succeeded");
  assert.equal(resumed.steps.flaky.attempts.length, 2);
});
