/**
 * Seeded simulation of the run engine: random DAGs driven by a random,
 * misbehaving scheduler (reordered, duplicated and stale reports, hangs,
 * lost workers, cancels, resumes, driver restarts), with the engine's
 * invariants checked after every event. Reproduce a failure with
 * `RUNNEL_SEED=<seed> deno test --allow-env core/engine_sim_test.ts`.
 */

import assert from "node:assert/strict";
import { RunEngine } from "./engine.ts";
import { planOf, stepOf, type StepSpec } from "./_testing.ts";
import { mulberry32, testSeed } from "./_random.ts";
import type {
  AttemptResult,
  Effect,
  EngineEvent,
  ErrorClass,
  Plan,
  RunState,
  StepState,
  StepStatus,
} from "./model.ts";

const SEED = testSeed();
/** Enough DAGs to meet every interleaving class many times, within ~10 s on 2 cores. */
const DAGS = 1000;
const MAX_EVENTS_PER_RUN = 400;
const TERMINAL = new Set<StepStatus>(["succeeded", "failed", "cancelled", "skipped"]);
const ACTIVE = new Set<StepStatus>(["scheduled", "running"]);
const RETRY_CLASSES: ErrorClass[] = ["application", "timeout", "infrastructure", "business"];

class Dice {
  constructor(readonly next: () => number) {}
  int(min: number, max: number): number {
    return min + Math.floor(this.next() * (max - min + 1));
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  pick<T>(items: readonly T[]): T {
    return items[Math.floor(this.next() * items.length)];
  }
}

function randomPlan(dice: Dice): Plan {
  const names: Array<{ name: string; ids: string[] }> = [];
  const specs: StepSpec[] = [];
  let total = 0;
  const nameCount = dice.int(1, 14);
  for (let n = 0; n < nameCount && total < 40; n++) {
    const name = `s${n}`;
    const legs = dice.chance(0.3) ? dice.int(2, Math.min(4, 40 - total)) : 1;
    const ids = legs === 1 ? [name] : Array.from({ length: legs }, (_, i) => `${name}[i=${i}]`);
    const needNames = names.filter(() => dice.chance(0.3));
    const needs = needNames.flatMap((need) => need.ids);
    const whenChoices: Array<string | undefined> = [undefined, undefined, undefined, "always()"];
    whenChoices.push("failure()", "!cancelled() && success()");
    if (needNames.length > 0) {
      whenChoices.push(`steps.${dice.pick(needNames).name}.outcome != 'failed'`);
    }
    if (legs > 1) whenChoices.push("matrix.i != 1");
    const when = dice.pick(whenChoices);
    const retry = {
      max: dice.int(0, 3),
      backoffMs: dice.int(0, 50),
      factor: dice.pick([1, 2, 3]),
      maxBackoffMs: dice.int(0, 120),
      jitter: dice.pick([0, 0.5, 1]),
      onClasses: RETRY_CLASSES.filter(() => dice.chance(0.6)),
      onExitCodes: dice.chance(0.3) ? [75] : [],
    };
    const concurrency = legs > 1 && dice.chance(0.4) ? dice.int(1, 2) : undefined;
    const timeoutMs = dice.chance(0.4) ? dice.int(20, 200) : undefined;
    if (legs === 1 && dice.chance(0.2)) {
      // A split node (`foreach:`): its legs appear when it succeeds.
      const leg = stepOf({ id: name, needs, retry, continueOnError: dice.chance(0.15) });
      const { id: _id, source: _source, ...template } = leg;
      specs.push({
        id: name,
        needs,
        backend: "split",
        config: { input: "items", maxLegs: 4, mode: "foreach", fields: [] },
        ...(dice.chance(0.4) ? { concurrency: dice.int(1, 2) } : {}),
        fanOut: { kind: "foreach", leg: template },
      });
      names.push({ name, ids });
      total += 5;
      continue;
    }
    ids.forEach((id, i) =>
      specs.push({
        id,
        name,
        needs,
        retry,
        continueOnError: dice.chance(0.15),
        ...(legs > 1 ? { matrix: { i } } : {}),
        ...(when !== undefined ? { when } : {}),
        ...(concurrency !== undefined ? { concurrency } : {}),
        ...(timeoutMs !== undefined ? { timeoutMs } : {}),
        ...(dice.chance(0.2)
          ? { onFailure: { url: "http://h", headers: {}, retries: 0, backoffMs: 0, timeoutMs: 1 } }
          : {}),
      })
    );
    names.push({ name, ids });
    total += legs;
  }
  return planOf(specs, dice.chance(0.4) ? { concurrency: dice.int(1, 5) } : {});
}

type Report = Extract<EngineEvent, { stepId: string }>;

interface InFlight {
  stepId: string;
  attemptId: string;
  started: boolean;
  /** The attempt never reports an exit; only its timeout ends it. */
  hung: boolean;
}

/** Checks everything that must hold after `event` turned `before` into the engine's state. */
function checkInvariants(
  plan: Plan,
  engine: RunEngine,
  event: EngineEvent,
  before: RunState,
  result: { effects: Effect[]; rejected?: string },
  changed: string[],
): void {
  const state = engine.state;
  const steps = Object.values(state.steps);
  if (result.rejected) {
    assert.deepEqual(state, before, `rejected ${event.type} must change nothing`);
    assert.deepEqual(result.effects, []);
    return;
  }
  for (const effect of result.effects) {
    if (effect.type === "StartAttempt") {
      for (const need of plan.steps[effect.stepId].needs) {
        assert.ok(
          TERMINAL.has(state.steps[need].status),
          `${effect.stepId} scheduled before its need ${need} was terminal`,
        );
      }
      assert.equal(effect.attemptId, `${state.runId}/${effect.stepId}/${effect.attempt}`);
    }
  }
  const changedSet = new Set(changed);
  let active = 0;
  const activeByName = new Map<string, number>();
  let hardFailures = 0;
  for (const step of steps) {
    const planned = plan.steps[step.id];
    const previous: StepState | undefined = before.steps[step.id];
    if (previous === undefined) {
      // A leg its split node just made.
      assert.ok(changedSet.has(step.id), `new leg ${step.id} was not drained`);
      assert.ok(plan.steps[planned.needs.at(-1)!].fanOut, `${step.id} appeared from nowhere`);
    } else if (JSON.stringify(previous) !== JSON.stringify(step)) {
      assert.ok(changedSet.has(step.id), `${step.id} changed but was not drained`);
    }
    if (previous && TERMINAL.has(previous.status) && event.type !== "Resume") {
      assert.deepEqual(step, previous, `terminal ${step.id} changed on ${event.type}`);
    }
    assert.ok(
      step.attemptsThisRound <= planned.retry.max + 1,
      `${step.id} made ${step.attemptsThisRound} attempts this round, max ${planned.retry.max}`,
    );
    const successes = step.attempts.filter((attempt) => attempt.result?.ok).length;
    assert.equal(successes, step.status === "succeeded" ? 1 : 0, `${step.id} success records`);
    step.attempts.forEach((attempt, i) => {
      assert.equal(attempt.attempt, i + 1);
      assert.equal(attempt.attemptId, `${state.runId}/${step.id}/${i + 1}`);
      if (i < step.attempts.length - 1) assert.ok(attempt.endedAt !== undefined);
    });
    const last = step.attempts.at(-1);
    if (ACTIVE.has(step.status)) {
      active++;
      activeByName.set(planned.name, (activeByName.get(planned.name) ?? 0) + 1);
      assert.ok(last && last.endedAt === undefined && step.attemptId === last.attemptId);
      assert.equal(step.status === "running", last.startedAt !== undefined);
    } else if (last) {
      assert.ok(last.endedAt !== undefined, `${step.id} ${step.status} with an open attempt`);
    }
    if (step.status === "retrying") assert.ok(last?.result && !last.result.ok);
    if (step.status === "failed" && !planned.continueOnError) hardFailures++;
    if (planned.concurrency !== undefined) {
      assert.ok((activeByName.get(planned.name) ?? 0) <= planned.concurrency, "step concurrency");
    }
  }
  if (plan.concurrency !== undefined) assert.ok(active <= plan.concurrency, "run concurrency");
  // Dynamic legs exist exactly when their split node succeeded, one per leg it reported.
  for (const planned of Object.values(plan.steps)) {
    if (!planned.fanOut) continue;
    const split = state.steps[planned.id];
    const legIds = Object.keys(state.steps).filter((id) => id.startsWith(`${planned.id}[`));
    if (split.status === "succeeded") {
      assert.ok(split.fanOut, `${planned.id} succeeded without its legs`);
      assert.equal(legIds.length, split.fanOut.legs.length, `${planned.id}: one step per leg`);
      for (const leg of legIds) assert.ok(plan.order.includes(leg));
    } else {
      assert.equal(legIds.length, 0, `${planned.id} has legs before it split`);
    }
  }
  assert.equal(engine.runningAttempts().length, active);
  const allTerminal = steps.every((step) => TERMINAL.has(step.status));
  if (state.status === "succeeded" || state.status === "failed" || state.status === "cancelled") {
    assert.ok(allTerminal, `run ${state.status} with steps not terminal`);
  }
  if (state.status === "running") assert.ok(!allTerminal, "every step terminal, run still running");
  if (state.status === "succeeded") assert.equal(hardFailures, 0);
  if (state.status === "failed") assert.ok(hardFailures > 0);
  const finished = result.effects.filter((effect) => effect.type === "RunFinished");
  assert.ok(finished.length <= 1);
  if (finished.length === 1) assert.notEqual(before.status, state.status);
}

function simulate(seed: number): { events: number; statuses: string } {
  const dice = new Dice(mulberry32(seed));
  const plan = randomPlan(dice);
  let engine = RunEngine.start(plan, { runId: "run", now: 0 });
  let twin = new RunEngine(plan, structuredClone(engine.state));
  engine.drainChanged();
  let now = 0;
  let inflight: InFlight[] = [];
  let outbox: Report[] = [];
  const history: Report[] = [];
  const wakes: number[] = [];
  let resumes = 0;
  let events = 0;

  const feed = (event: EngineEvent) => {
    events++;
    const before = structuredClone(engine.state);
    const result = engine.step(event);
    const changed = engine.drainChanged();
    checkInvariants(plan, engine, event, before, result, changed);
    const twinResult = twin.step(event);
    assert.deepEqual(twinResult, result, `rehydrated engine diverged on ${event.type}`);
    assert.deepEqual(twin.state, engine.state);
    assert.deepEqual(twin.runningAttempts(), engine.runningAttempts());
    twin.drainChanged();
    if (dice.chance(0.1)) {
      twin = new RunEngine(plan, JSON.parse(JSON.stringify(engine.state)));
    }
    for (const effect of result.effects) {
      if (effect.type === "StartAttempt") {
        const timeoutMs = plan.steps[effect.stepId].timeoutMs;
        inflight.push({
          stepId: effect.stepId,
          attemptId: effect.attemptId,
          started: false,
          hung: timeoutMs !== undefined && dice.chance(0.1),
        });
      } else if (effect.type === "StopAttempt") {
        inflight = inflight.filter((flight) => flight.attemptId !== effect.attemptId);
        if (dice.chance(0.3)) {
          outbox.push({
            type: "AttemptExited",
            stepId: effect.stepId,
            attemptId: effect.attemptId,
            now,
            result: { ok: true, exitCode: 0, outputs: {} },
          });
        }
      } else if (effect.type === "WakeAt") {
        wakes.push(effect.at);
      }
    }
    return result;
  };

  const exitResult = (stepId: string): AttemptResult => {
    const roll = dice.next();
    if (roll < 0.55 && plan.steps[stepId].fanOut) {
      const count = dice.int(0, 4);
      const fanOut = Array.from({ length: count }, (_, i) => ({ key: `k${i}`, item: i }));
      // Now and then what a hostile agent would report: too many legs, a key twice.
      if (dice.chance(0.05)) fanOut.push(...fanOut, { key: "k9", item: 9 }, { key: "k8", item: 8 });
      return { ok: true, exitCode: 0, outputs: {}, fanOut };
    }
    if (roll < 0.55) return { ok: true, exitCode: 0, outputs: {}, cached: dice.chance(0.1) };
    if (roll < 0.75) return { ok: false, errorClass: "application", exitCode: 1, message: "x" };
    if (roll < 0.82) return { ok: false, errorClass: "business", exitCode: 65, message: "x" };
    if (roll < 0.9) return { ok: false, errorClass: "infrastructure", message: "x" };
    return { ok: false, errorClass: "permission", exitCode: 75, message: "x" };
  };

  const progress = (flight: InFlight, result: (stepId: string) => AttemptResult) => {
    if (!flight.started) {
      flight.started = true;
      outbox.push({ type: "AttemptStarted", ...flight, now, worker: "w" });
    } else {
      inflight = inflight.filter((other) => other !== flight);
      outbox.push({ type: "AttemptExited", ...flight, now, result: result(flight.stepId) });
    }
  };

  const nextWake = () => {
    const future = wakes.filter((at) => at > now);
    return future.length > 0 ? Math.min(...future) : undefined;
  };

  feed({ type: "Start", now });
  while (events < MAX_EVENTS_PER_RUN) {
    now += dice.int(0, 5);
    const status = engine.state.status;
    if (status !== "running") {
      if (resumes >= 3 || dice.chance(0.3)) break;
      resumes++;
      feed({ type: "Resume", now });
      continue;
    }
    const roll = dice.next();
    if (roll < 0.3 && inflight.length > 0) {
      const flight = dice.pick(inflight);
      if (!flight.hung || !flight.started) progress(flight, exitResult);
    } else if (roll < 0.65 && outbox.length > 0) {
      const i = dice.int(0, outbox.length - 1);
      const report = { ...outbox[i], now };
      if (!dice.chance(0.15)) outbox.splice(i, 1);
      history.push(report);
      feed(report);
    } else if (roll < 0.8) {
      const wake = nextWake();
      now = wake !== undefined && dice.chance(0.7) ? Math.max(now, wake) : now + dice.int(0, 80);
      feed({ type: "Tick", now });
    } else if (roll < 0.86 && history.length > 0) {
      feed({ ...dice.pick(history), now });
    } else if (roll < 0.89 && inflight.length > 0) {
      const flight = dice.pick(inflight);
      inflight = inflight.filter((other) => other !== flight);
      feed({ type: "AttemptLost", ...flight, now, reason: "worker gone" });
    } else if (roll < 0.9) {
      feed({ type: "Cancel", now, reason: "sim" });
    } else if (roll < 0.91 && resumes < 3) {
      // The driver dies: a new one rehydrates, reports what it lost, resumes.
      resumes++;
      engine = new RunEngine(plan, JSON.parse(JSON.stringify(engine.state)));
      twin = new RunEngine(plan, JSON.parse(JSON.stringify(engine.state)));
      outbox = [];
      for (const flight of engine.runningAttempts()) {
        feed({ type: "AttemptLost", ...flight, now, reason: "driver restarted" });
      }
      inflight = [];
      feed({ type: "Resume", now });
    }
  }

  // Drain: a well-behaved scheduler must bring any run to an end.
  for (let guard = 0; engine.state.status === "running"; guard++) {
    assert.ok(guard < 5000, "run did not finish under a well-behaved scheduler");
    now += 1;
    if (outbox.length > 0) {
      feed({ ...outbox.shift()!, now });
    } else if (inflight.length > 0 && !inflight[0].hung) {
      progress(
        inflight[0],
        (stepId) =>
          plan.steps[stepId].fanOut
            ? { ok: true, exitCode: 0, outputs: {}, fanOut: [{ key: "last", item: 0 }] }
            : { ok: true, exitCode: 0, outputs: {} },
      );
    } else {
      const wake = nextWake();
      assert.ok(wake !== undefined, "run is stuck: nothing in flight and no wake-up announced");
      now = Math.max(now, wake);
      feed({ type: "Tick", now });
      inflight = inflight.filter((flight) =>
        engine.state.steps[flight.stepId].attemptId === flight.attemptId &&
        ACTIVE.has(engine.state.steps[flight.stepId].status)
      );
    }
  }
  return { events, statuses: engine.state.status };
}

Deno.test(`engine simulation over ${DAGS} random DAGs (RUNNEL_SEED=${SEED})`, () => {
  const master = mulberry32(SEED);
  let events = 0;
  const outcomes: Record<string, number> = {};
  for (let dag = 0; dag < DAGS; dag++) {
    const seed = Math.floor(master() * 2 ** 31);
    try {
      const result = simulate(seed);
      events += result.events;
      outcomes[result.statuses] = (outcomes[result.statuses] ?? 0) + 1;
    } catch (error) {
      console.error(`engine simulation failed: RUNNEL_SEED=${SEED} (DAG ${dag}, seed ${seed})`);
      throw error;
    }
  }
  assert.ok(events > DAGS * 10, `only ${events} events simulated`);
  for (const status of ["succeeded", "failed", "cancelled"]) {
    assert.ok((outcomes[status] ?? 0) > 0, `no run ended ${status}: ${JSON.stringify(outcomes)}`);
  }
});
