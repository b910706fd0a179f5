import assert from "node:assert/strict";
import { RunEngine, runStateOf, syncHeader } from "./engine.ts";
import { planOf } from "./_testing.ts";
import type { AttemptResult, Effect, RunState } from "./model.ts";

/** The failure of a result (undefined for a success). */
const failure = (result?: AttemptResult) =>
  result && !result.ok ? { errorClass: result.errorClass, message: result.message } : undefined;

const types = (effects: Effect[]) => effects.map((effect) => effect.type);

Deno.test("queue-timeout: an attempt no worker starts in time fails with its own class", () => {
  const plan = planOf([{ id: "a", queueTimeoutMs: 1_000 }, { id: "b", needs: ["a"] }]);
  const engine = RunEngine.start(plan, { runId: "r", now: 0 });
  const started = engine.step({ type: "Start", now: 0 }).effects;
  assert.deepEqual(started.find((e) => e.type === "WakeAt"), { type: "WakeAt", at: 1_000 });
  // Not yet: a tick only re-announces the wake-up.
  assert.deepEqual(engine.step({ type: "Tick", now: 999 }).effects, [{
    type: "WakeAt",
    at: 1_000,
  }]);
  const { effects } = engine.step({ type: "Tick", now: 1_000 });
  assert.deepEqual(effects.find((e) => e.type === "StopAttempt"), {
    type: "StopAttempt",
    stepId: "a",
    attemptId: "r/a/1",
    reason: "timeout",
  });
  const a = engine.state.steps.a;
  assert.equal(a.status, "failed");
  assert.equal(failure(a.attempts[0].result)?.errorClass, "queue-timeout");
  assert.match(failure(a.attempts[0].result)!.message!, /queue-timeout of 1000 ms/);
  assert.equal(engine.state.status, "failed");
});

Deno.test("queue-timeout: a started attempt is not affected; a retried one waits afresh", () => {
  const plan = planOf([{
    id: "a",
    queueTimeoutMs: 1_000,
    retry: { max: 1, backoffMs: 0, onClasses: ["queue-timeout"] },
  }]);
  const engine = RunEngine.start(plan, { runId: "r", now: 0 });
  engine.step({ type: "Start", now: 0 });
  engine.step({ type: "Tick", now: 1_000 });
  assert.equal(engine.state.steps.a.status, "scheduled", "retried at once");
  assert.equal(engine.state.steps.a.attempts.length, 2);
  engine.step({ type: "AttemptStarted", stepId: "a", attemptId: "r/a/2", now: 1_500 });
  assert.ok(!types(engine.step({ type: "Tick", now: 5_000 }).effects).includes("StopAttempt"));
  assert.equal(engine.state.steps.a.status, "running");
});

Deno.test("deadline: past it, running attempts stop, waiting steps never run, the run fails", () => {
  const plan = planOf(
    [{ id: "a" }, { id: "b" }, { id: "c", needs: ["a"] }],
    { deadlineMs: 5_000, concurrency: 1 },
  );
  const engine = RunEngine.start(plan, { runId: "r", now: 0 });
  const first = engine.step({ type: "Start", now: 100 }).effects;
  assert.equal(engine.state.deadlineAt, 5_100);
  assert.deepEqual(first.find((e) => e.type === "WakeAt"), { type: "WakeAt", at: 5_100 });
  engine.step({ type: "AttemptStarted", stepId: "a", attemptId: "r/a/1", now: 200 });
  const { effects } = engine.step({ type: "Tick", now: 5_100 });
  assert.ok(types(effects).includes("RunFinished"), types(effects).join());
  assert.deepEqual(effects.filter((e) => e.type === "StopAttempt"), [
    { type: "StopAttempt", stepId: "a", attemptId: "r/a/1", reason: "timeout" },
  ]);
  assert.equal(engine.state.status, "failed");
  assert.equal(failure(engine.state.steps.a.attempts[0].result)?.errorClass, "deadline");
  assert.equal(engine.state.steps.a.status, "failed");
  assert.equal(engine.state.steps.b.status, "cancelled");
  assert.match(engine.state.steps.c.reason!, /deadline of 5000 ms passed/);
  // A late report of the stopped attempt changes nothing.
  const late = engine.step({
    type: "AttemptExited",
    stepId: "a",
    attemptId: "r/a/1",
    now: 5_200,
    result: { ok: true, exitCode: 0, outputs: {} },
  });
  assert.equal(late.rejected, "stale-attempt");
});

Deno.test("deadline: it survives rehydration, and each resumed round gets its own", () => {
  const plan = planOf([{ id: "a", queueTimeoutMs: 60_000 }], { deadlineMs: 5_000 });
  const engine = RunEngine.start(plan, { runId: "r", now: 0 });
  engine.step({ type: "Start", now: 0 });
  // Persisted as a driver persists it (header + steps), then read back.
  const header = {
    runId: "r",
    pipeline: "test",
    status: engine.state.status,
    createdAt: 0,
    round: 1,
  } as Parameters<typeof syncHeader>[0];
  syncHeader(header, engine.state);
  const stored: RunState = runStateOf(plan, header, structuredClone(engine.state.steps));
  const again = new RunEngine(plan, stored);
  const announced = again.step({ type: "Tick", now: 10 }).effects;
  assert.deepEqual(announced.find((e) => e.type === "WakeAt"), { type: "WakeAt", at: 5_000 });
  again.step({ type: "Tick", now: 5_000 });
  assert.equal(again.state.status, "failed");
  again.step({ type: "Resume", now: 9_000 });
  assert.equal(again.state.deadlineAt, 14_000);
  assert.equal(again.state.status, "running");
  assert.equal(again.state.steps.a.status, "scheduled");
});

Deno.test("approval: a gated step waits; approve runs it, reject fails it, a timeout fails it", () => {
  const gated = () =>
    planOf([{ id: "build" }, { id: "deploy", needs: ["build"], approval: { timeoutMs: 10_000 } }]);
  const ready = () => {
    const engine = RunEngine.start(gated(), { runId: "r", now: 0 });
    engine.step({ type: "Start", now: 0 });
    engine.step({ type: "AttemptStarted", stepId: "build", attemptId: "r/build/1", now: 1 });
    engine.step({
      type: "AttemptExited",
      stepId: "build",
      attemptId: "r/build/1",
      now: 2,
      result: { ok: true, exitCode: 0, outputs: {} },
    });
    assert.equal(engine.state.steps.deploy.status, "waiting");
    assert.deepEqual(engine.state.steps.deploy.approval, { requestedAt: 2 });
    return engine;
  };
  const approved = ready();
  const { effects } = approved.step({
    type: "Approve",
    stepId: "deploy",
    approved: true,
    by: "alice",
    now: 5,
  });
  assert.ok(effects.some((e) => e.type === "StartAttempt" && e.stepId === "deploy"));
  assert.equal(approved.state.steps.deploy.approval?.by, "alice");
  assert.equal(
    approved.step({ type: "Approve", stepId: "deploy", approved: false, by: "bob", now: 6 })
      .rejected,
    "not-applicable",
  );

  const rejected = ready();
  rejected.step({
    type: "Approve",
    stepId: "deploy",
    approved: false,
    by: "bob",
    reason: "not today",
    now: 5,
  });
  assert.equal(rejected.state.steps.deploy.status, "failed");
  assert.equal(rejected.state.steps.deploy.reason, "rejected by bob: not today");
  assert.equal(rejected.state.status, "failed");

  const late = ready();
  late.step({ type: "Tick", now: 10_002 });
  assert.equal(late.state.steps.deploy.status, "failed");
  assert.equal(late.state.steps.deploy.approval?.outcome, "timed-out");
  // A resume asks again.
  late.step({ type: "Resume", now: 20_000 });
  assert.equal(late.state.steps.deploy.status, "waiting");
  assert.deepEqual(late.state.steps.deploy.approval, { requestedAt: 20_000 });
});
