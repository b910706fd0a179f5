import assert from "node:assert/strict";
import { MAX_LOST_RESCHEDULES, RunEngine } from "./engine.ts";
import { planOf, type PlanSpec, type StepSpec } from "./_testing.ts";
import type { AttemptResult, Effect, Plan, WebhookSpec } from "./model.ts";

const OK: AttemptResult = { ok: true, exitCode: 0, outputs: {} };
const APP_FAIL: AttemptResult = {
  ok: false,
  errorClass: "application",
  exitCode: 1,
  message: "exit 1",
};
const BUSINESS_FAIL: AttemptResult = {
  ok: false,
  errorClass: "business",
  exitCode: 65,
  message: "bad input",
};
const HOOK: WebhookSpec = {
  url: "http://hook",
  headers: {},
  retries: 0,
  backoffMs: 0,
  timeoutMs: 1,
};

function started(steps: StepSpec[], options?: PlanSpec): { engine: RunEngine; effects: Effect[] } {
  const engine = RunEngine.start(planOf(steps, options), { runId: "r", now: 0 });
  const { effects } = engine.step({ type: "Start", now: 0 });
  return { engine, effects };
}

function starts(effects: Effect[]): string[] {
  return effects.flatMap((effect) => effect.type === "StartAttempt" ? [effect.stepId] : []);
}

function ofType<T extends Effect["type"]>(effects: Effect[], type: T) {
  return effects.filter((effect): effect is Extract<Effect, { type: T }> => effect.type === type);
}

function attemptOf(engine: RunEngine, stepId: string): string {
  return engine.state.steps[stepId].attemptId!;
}

function exit(engine: RunEngine, stepId: string, result: AttemptResult, now = 1) {
  return engine.step({
    type: "AttemptExited",
    stepId,
    attemptId: attemptOf(engine, stepId),
    now,
    result,
  });
}

function statuses(engine: RunEngine): Record<string, string> {
  return Object.fromEntries(
    Object.values(engine.state.steps).map((step) => [step.id, step.status]),
  );
}

Deno.test("start schedules roots in plan order with attempt ids", () => {
  const { engine, effects } = started([
    { id: "a" },
    { id: "b" },
    { id: "c", needs: ["a", "b"] },
  ]);
  assert.equal(engine.state.status, "running");
  assert.deepEqual(starts(effects), ["a", "b"]);
  const start = ofType(effects, "StartAttempt")[0];
  assert.equal(start.attemptId, "r/a/1");
  assert.equal(start.attempt, 1);
  assert.equal(engine.state.steps.c.status, "pending");
  assert.deepEqual(engine.runningAttempts(), [
    { stepId: "a", attemptId: "r/a/1" },
    { stepId: "b", attemptId: "r/b/1" },
  ]);
  assert.equal(engine.step({ type: "Start", now: 1 }).rejected, "not-applicable");
});

Deno.test("a step runs only after every need is terminal, then the run succeeds", () => {
  const { engine } = started([{ id: "a" }, { id: "b" }, { id: "c", needs: ["a", "b"] }]);
  engine.step({ type: "AttemptStarted", stepId: "a", attemptId: "r/a/1", now: 1, worker: "w1" });
  assert.equal(engine.state.steps.a.status, "running");
  assert.equal(engine.state.steps.a.attempts[0].worker, "w1");
  const outputs = { "x.txt": { name: "x.txt", digest: "sha256:00", size: 1 } };
  assert.deepEqual(starts(exit(engine, "a", { ok: true, exitCode: 0, outputs }).effects), []);
  assert.deepEqual(engine.state.steps.a.outputs, outputs);
  assert.deepEqual(starts(exit(engine, "b", OK).effects), ["c"]);
  const done = exit(engine, "c", { ...OK, cached: true }, 5);
  assert.equal(engine.state.steps.c.cached, true);
  assert.deepEqual(ofType(done.effects, "RunFinished"), [
    { type: "RunFinished", status: "succeeded", at: 5 },
  ]);
  assert.equal(engine.state.status, "succeeded");
  assert.equal(engine.state.finishedAt, 5);
});

Deno.test("every status change is announced and drained once", () => {
  const { engine, effects } = started([{ id: "a" }, { id: "b", needs: ["a"] }]);
  assert.deepEqual(engine.drainChanged().sort(), ["a", "b"]);
  assert.deepEqual(ofType(effects, "StepStatus").map((e) => [e.stepId, e.status]), [
    ["a", "scheduled"],
  ]);
  exit(engine, "a", OK);
  assert.deepEqual(engine.drainChanged(), ["a", "b"]);
  assert.deepEqual(engine.drainChanged(), []);
});

Deno.test("duplicate and stale reports are rejected without change", () => {
  const { engine } = started([{ id: "a", retry: { max: 1, backoffMs: 10 } }]);
  const started1 = { type: "AttemptStarted" as const, stepId: "a", attemptId: "r/a/1", now: 1 };
  assert.equal(engine.step(started1).rejected, undefined);
  assert.equal(engine.step(started1).rejected, "duplicate");
  const failed = {
    type: "AttemptExited" as const,
    stepId: "a",
    attemptId: "r/a/1",
    now: 2,
    result: APP_FAIL,
  };
  assert.equal(engine.step(failed).rejected, undefined);
  const snapshot = JSON.stringify(engine.state);
  assert.deepEqual(engine.step({ ...failed, now: 3 }), { effects: [], rejected: "duplicate" });
  assert.equal(engine.step({ ...failed, result: OK }).rejected, "stale-attempt");
  assert.equal(JSON.stringify(engine.state), snapshot);
  engine.step({ type: "Tick", now: 12 });
  assert.equal(engine.state.steps.a.attemptId, "r/a/2");
  assert.equal(engine.step({ ...failed, result: OK }).rejected, "stale-attempt");
  assert.equal(engine.step(started1).rejected, "stale-attempt");
  assert.equal(
    engine.step({ ...started1, stepId: "zzz" }).rejected,
    "unknown-step",
  );
  assert.equal(
    engine.step({ ...started1, attemptId: "r/a/9" }).rejected,
    "stale-attempt",
  );
});

Deno.test("retryable failures back off exponentially and retry until the limit", () => {
  const { engine } = started([{
    id: "a",
    retry: { max: 2, backoffMs: 100, factor: 3, maxBackoffMs: 250 },
    onFailure: HOOK,
  }]);
  let result = exit(engine, "a", APP_FAIL, 10);
  assert.equal(engine.state.steps.a.status, "retrying");
  assert.equal(engine.state.steps.a.retryAt, 110);
  assert.deepEqual(ofType(result.effects, "WakeAt"), [{ type: "WakeAt", at: 110 }]);
  assert.deepEqual(starts(engine.step({ type: "Tick", now: 109 }).effects), []);
  assert.deepEqual(starts(engine.step({ type: "Tick", now: 110 }).effects), ["a"]);
  assert.equal(engine.state.steps.a.attemptsThisRound, 2);
  result = exit(engine, "a", APP_FAIL, 200);
  assert.equal(engine.state.steps.a.retryAt, 450, "second delay 300 capped to 250");
  engine.step({ type: "Tick", now: 500 });
  result = exit(engine, "a", APP_FAIL, 600);
  assert.equal(engine.state.steps.a.status, "failed");
  assert.equal(engine.state.steps.a.attempts.length, 3);
  const [notify] = ofType(result.effects, "Notify");
  assert.equal(notify.webhook, HOOK);
  assert.equal(notify.failure.attemptId, "r/a/3");
  assert.equal(notify.failure.exitCode, 1);
  assert.equal(notify.failure.errorClass, "application");
  assert.equal(engine.state.status, "failed");
});

Deno.test("business errors and unlisted classes are not retried", () => {
  const { engine } = started(
    [{ id: "a", retry: { max: 3 } }, { id: "b", retry: { max: 3, onClasses: ["timeout"] } }],
    { onFailure: HOOK },
  );
  const result = exit(engine, "a", BUSINESS_FAIL);
  assert.equal(engine.state.steps.a.status, "failed");
  assert.equal(ofType(result.effects, "Notify").length, 1, "plan-level onFailure applies");
  exit(engine, "b", APP_FAIL);
  assert.equal(engine.state.steps.b.status, "failed");
});

Deno.test("listed exit codes are retried whatever their class", () => {
  const { engine } = started([{ id: "a", retry: { max: 1, onClasses: [], onExitCodes: [75] } }]);
  exit(engine, "a", { ok: false, errorClass: "permission", exitCode: 75, message: "x" });
  assert.equal(engine.state.steps.a.status, "retrying");
});

Deno.test("a timed-out attempt is stopped, retried, and its late reports are stale", () => {
  const { engine, effects } = started([{
    id: "a",
    timeoutMs: 100,
    retry: { max: 1, backoffMs: 5 },
  }]);
  assert.equal(ofType(effects, "StartAttempt")[0].deadline, 100);
  const onStart = engine.step({ type: "AttemptStarted", stepId: "a", attemptId: "r/a/1", now: 20 });
  assert.deepEqual(ofType(onStart.effects, "WakeAt"), [{ type: "WakeAt", at: 120 }]);
  assert.deepEqual(engine.step({ type: "Tick", now: 110 }).effects, [{ type: "WakeAt", at: 120 }]);
  const tick = engine.step({ type: "Tick", now: 120 });
  assert.deepEqual(ofType(tick.effects, "StopAttempt"), [
    { type: "StopAttempt", stepId: "a", attemptId: "r/a/1", reason: "timeout" },
  ]);
  const record = engine.state.steps.a.attempts[0];
  assert.equal(record.result?.ok === false && record.result.errorClass, "timeout");
  assert.equal(engine.state.steps.a.status, "retrying");
  const late = engine.step({
    type: "AttemptExited",
    stepId: "a",
    attemptId: "r/a/1",
    now: 121,
    result: OK,
  });
  assert.equal(late.rejected, "stale-attempt");
  engine.step({ type: "Tick", now: 125 });
  assert.equal(engine.state.steps.a.attemptId, "r/a/2");
  engine.step({ type: "Tick", now: 225 });
  assert.equal(engine.state.steps.a.status, "failed");
  assert.match(engine.state.steps.a.reason!, /^timeout/);
});

Deno.test("a lost attempt fails as infrastructure and is retried", () => {
  const { engine } = started([{ id: "a", retry: { max: 1, backoffMs: 0 } }]);
  const lost = {
    type: "AttemptLost" as const,
    stepId: "a",
    attemptId: "r/a/1",
    now: 3,
    reason: "w1",
  };
  engine.step(lost);
  const record = engine.state.steps.a.attempts[0];
  assert.equal(record.result?.ok === false && record.result.errorClass, "infrastructure");
  assert.equal(engine.step(lost).rejected, "duplicate");
  assert.equal(engine.state.steps.a.status, "retrying");
  assert.deepEqual(starts(engine.step({ type: "Tick", now: 3 }).effects), ["a"]);
});

Deno.test("failed needs skip dependents; continue-on-error counts as success", () => {
  const { engine } = started([
    { id: "a" },
    { id: "soft", continueOnError: true },
    { id: "b", needs: ["a"] },
    { id: "c", needs: ["b"] },
    { id: "d", needs: ["soft"] },
    { id: "e", needs: ["a"], when: "failure()" },
  ]);
  exit(engine, "soft", APP_FAIL);
  assert.equal(engine.state.steps.d.status, "scheduled");
  const result = exit(engine, "a", APP_FAIL);
  assert.equal(engine.state.steps.b.status, "skipped");
  assert.equal(engine.state.steps.b.reason, "needs failed: a");
  assert.equal(engine.state.steps.c.status, "skipped");
  assert.equal(engine.state.steps.c.reason, "needs skipped: b");
  assert.equal(engine.state.steps.e.status, "scheduled");
  assert.deepEqual(starts(result.effects), ["e"]);
  exit(engine, "d", OK);
  exit(engine, "e", OK);
  assert.equal(engine.state.status, "failed");
});

Deno.test("a false when skips the step and the run still succeeds", () => {
  const { engine } = started([
    { id: "a", when: "env.DEPLOY == 'yes'", env: { DEPLOY: "no" } },
    { id: "b", needs: ["a"] },
    { id: "soft", continueOnError: true },
  ]);
  assert.equal(engine.state.steps.a.status, "skipped");
  assert.equal(engine.state.steps.a.reason, "when was false");
  assert.equal(engine.state.steps.b.status, "skipped");
  exit(engine, "soft", APP_FAIL);
  assert.equal(engine.state.status, "succeeded");
});

Deno.test("needs are seen by instance id and by aggregated step name", () => {
  const legs = ["conv[r=eu]", "conv[r=us]"];
  const { engine } = started([
    { id: legs[0], matrix: { r: "eu" } },
    { id: legs[1], matrix: { r: "us" } },
    { id: "byName", needs: legs, when: "steps.conv.outcome == 'failed'" },
    { id: "byLeg", needs: legs, when: "steps['conv[r=eu]'].outcome == 'succeeded'" },
    { id: "fanIn", needs: legs },
  ]);
  exit(engine, legs[0], OK);
  assert.equal(engine.state.steps.fanIn.status, "pending", "fan-in waits for every leg");
  exit(engine, legs[1], BUSINESS_FAIL);
  assert.deepEqual(
    [statuses(engine).byName, statuses(engine).byLeg, statuses(engine).fanIn],
    ["scheduled", "scheduled", "skipped"],
  );
  assert.equal(engine.state.steps.fanIn.reason, "needs failed: conv");
});

Deno.test("a condition that does not parse fails the step", () => {
  const { engine } = started([{ id: "a", when: "success( &&" }]);
  assert.equal(engine.state.steps.a.status, "failed");
  assert.match(engine.state.steps.a.reason!, /^condition failed to evaluate/);
  assert.equal(engine.state.status, "failed");
});

Deno.test("run-wide and per-step concurrency limits hold, in plan order", () => {
  const legs = ["m[1]", "m[2]", "m[3]", "m[4]"];
  const { engine, effects } = started(
    [...legs.map((id) => ({ id, concurrency: 1 })), { id: "x" }, { id: "y" }],
    { concurrency: 2 },
  );
  assert.deepEqual(starts(effects), ["m[1]", "x"]);
  assert.deepEqual(starts(exit(engine, "x", OK).effects), ["y"]);
  assert.deepEqual(starts(exit(engine, "m[1]", OK).effects), ["m[2]"]);
  assert.deepEqual(starts(exit(engine, "y", OK).effects), []);
  assert.deepEqual(starts(exit(engine, "m[2]", OK).effects), ["m[3]"]);
  assert.deepEqual(starts(exit(engine, "m[3]", OK).effects), ["m[4]"]);
});

Deno.test("cancel stops running attempts, cancels the rest and is final", () => {
  const { engine } = started([
    { id: "a" },
    { id: "b", retry: { max: 1 } },
    { id: "c", needs: ["a"] },
    { id: "d" },
  ], { concurrency: 3 });
  exit(engine, "d", OK);
  exit(engine, "b", APP_FAIL);
  const result = engine.step({ type: "Cancel", now: 9, reason: "user" });
  assert.deepEqual(ofType(result.effects, "StopAttempt"), [
    { type: "StopAttempt", stepId: "a", attemptId: "r/a/1", reason: "cancel" },
  ]);
  assert.deepEqual(statuses(engine), {
    a: "cancelled",
    b: "cancelled",
    c: "cancelled",
    d: "succeeded",
  });
  assert.deepEqual(ofType(result.effects, "RunFinished"), [
    { type: "RunFinished", status: "cancelled", at: 9 },
  ]);
  assert.deepEqual(engine.runningAttempts(), []);
  assert.equal(exit(engine, "a", OK).rejected, "stale-attempt");
  assert.equal(engine.step({ type: "Cancel", now: 10 }).rejected, "not-applicable");
  assert.equal(engine.step({ type: "Tick", now: 10_000 }).rejected, "not-applicable");
});

Deno.test("resume re-runs failed, cancelled and skipped steps, keeping successes", () => {
  const { engine } = started([
    { id: "a" },
    { id: "b", needs: ["a"], retry: { max: 1, backoffMs: 0 } },
    { id: "c", needs: ["b"] },
  ]);
  exit(engine, "a", OK);
  exit(engine, "b", APP_FAIL);
  engine.step({ type: "Tick", now: 2 });
  exit(engine, "b", APP_FAIL, 3);
  assert.equal(engine.state.status, "failed");
  assert.equal(engine.step({ type: "Resume", now: 4 }).rejected, undefined);
  assert.equal(engine.state.round, 2);
  assert.equal(engine.state.steps.a.status, "succeeded");
  assert.equal(engine.state.steps.b.attemptId, "r/b/3", "attempt numbers keep counting");
  assert.equal(engine.state.steps.b.attemptsThisRound, 1);
  assert.equal(engine.state.steps.c.status, "pending");
  exit(engine, "b", OK, 5);
  const finished = exit(engine, "c", OK, 6);
  assert.equal(engine.state.status, "succeeded");
  assert.equal(ofType(finished.effects, "RunFinished").length, 1);
  assert.equal(engine.state.steps.a.attempts.length, 1);
  assert.equal(engine.step({ type: "Resume", now: 7 }).rejected, "not-applicable");
});

Deno.test("resume of a running run whose driver died reschedules lost attempts", () => {
  const { engine } = started([{ id: "a" }, { id: "b" }]);
  exit(engine, "b", OK);
  const persisted = JSON.parse(JSON.stringify(engine.state));
  const revived = new RunEngine(planOf([{ id: "a" }, { id: "b" }]), persisted);
  assert.deepEqual(revived.runningAttempts(), [{ stepId: "a", attemptId: "r/a/1" }]);
  revived.step({ type: "AttemptLost", stepId: "a", attemptId: "r/a/1", now: 5, reason: "restart" });
  // Lost is not failed: the step runs again at once, its retry budget intact.
  assert.equal(revived.state.steps.a.status, "retrying");
  const rescheduled = revived.step({ type: "Tick", now: 5 });
  assert.deepEqual(starts(rescheduled.effects), ["a"]);
  assert.equal(revived.state.steps.a.attemptId, "r/a/2");
  assert.equal(revived.state.steps.a.attemptsThisRound, 1);
});

Deno.test("a step whose attempts keep getting lost fails after MAX_LOST_RESCHEDULES", () => {
  const { engine } = started([{ id: "a" }]);
  for (let lost = 1; lost <= MAX_LOST_RESCHEDULES; lost++) {
    const attemptId = engine.state.steps.a.attemptId!;
    engine.step({ type: "AttemptLost", stepId: "a", attemptId, now: lost, reason: "gone" });
    assert.equal(engine.state.steps.a.status, "retrying");
    engine.step({ type: "Tick", now: lost });
  }
  const attemptId = engine.state.steps.a.attemptId!;
  engine.step({ type: "AttemptLost", stepId: "a", attemptId, now: 9, reason: "gone" });
  assert.equal(engine.state.steps.a.status, "failed");
  assert.equal(engine.state.steps.a.attempts.length, MAX_LOST_RESCHEDULES + 1);
});

Deno.test("a rehydrated engine continues exactly like the original", () => {
  const steps: StepSpec[] = [
    { id: "a", timeoutMs: 50, retry: { max: 2, backoffMs: 10, jitter: 1 } },
    { id: "b", needs: ["a"] },
    { id: "c" },
  ];
  const plan: Plan = planOf(steps, { concurrency: 1 });
  const engine = RunEngine.start(plan, { runId: "r", now: 0 });
  engine.step({ type: "Start", now: 0 });
  engine.step({ type: "Tick", now: 60 });
  const twin = new RunEngine(plan, JSON.parse(JSON.stringify(engine.state)));
  for (
    const event of [
      { type: "Tick" as const, now: 200 },
      { type: "AttemptExited" as const, stepId: "c", attemptId: "r/c/1", now: 201, result: OK },
      { type: "Tick" as const, now: 400 },
    ]
  ) {
    assert.deepEqual(twin.step(event), engine.step(event));
    assert.deepEqual(twin.state, engine.state);
  }
});

Deno.test("an empty plan finishes on start", () => {
  const { engine, effects } = started([]);
  assert.deepEqual(effects, [{ type: "RunFinished", status: "succeeded", at: 0 }]);
  assert.equal(engine.state.status, "succeeded");
});

Deno.test("1,000 steps run through quickly; events on 10,000 steps cost O(changes)", () => {
  const chain: StepSpec[] = [];
  for (let i = 0; i < 1000; i++) {
    chain.push({ id: `s${i}`, needs: i >= 10 ? [`s${i - 10}`, `s${i - 1}`] : [] });
  }
  const begin = performance.now();
  const { engine } = started(chain, { concurrency: 8 });
  let guard = 0;
  while (engine.state.status === "running" && guard++ < 5000) {
    for (const { stepId } of engine.runningAttempts()) exit(engine, stepId, OK);
  }
  const elapsed = performance.now() - begin;
  assert.equal(engine.state.status, "succeeded");
  assert.ok(elapsed < 200, `1,000 steps took ${elapsed.toFixed(1)} ms`);

  const wide: StepSpec[] = [{ id: "root" }];
  for (let i = 0; i < 10_000; i++) wide.push({ id: `w${i}`, needs: ["root"] });
  const big = started(wide, { concurrency: 4 }).engine;
  exit(big, "root", OK);
  const t0 = performance.now();
  for (let i = 0; i < 2000; i++) {
    const [{ stepId }] = big.runningAttempts();
    exit(big, stepId, OK);
  }
  const perEvent = (performance.now() - t0) / 2000;
  assert.ok(perEvent < 0.5, `an event on 10,000 steps took ${perEvent.toFixed(3)} ms`);
});

Deno.test("a step running across a resume that re-opens its need waits for it again", () => {
  const steps: StepSpec[] = [
    { id: "a" },
    { id: "b" },
    { id: "d", needs: ["a"], when: "always()", retry: { max: 2 } },
  ];
  const { engine } = started(steps);
  exit(engine, "a", APP_FAIL);
  assert.equal(engine.state.steps.d.status, "scheduled");
  const revived = new RunEngine(planOf(steps), JSON.parse(JSON.stringify(engine.state)));
  revived.step({ type: "AttemptLost", stepId: "b", attemptId: "r/b/1", now: 2, reason: "gone" });
  revived.step({ type: "Resume", now: 3 });
  assert.equal(revived.state.steps.a.status, "scheduled");
  exit(revived, "d", APP_FAIL, 4);
  assert.equal(revived.state.steps.d.status, "pending");
  assert.deepEqual(starts(exit(revived, "a", OK, 5).effects), ["d"]);
});
