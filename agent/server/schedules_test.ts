import assert from "node:assert/strict";
import { openEmbeddedStore } from "../../consensus/embedded.ts";
import { parsePipeline } from "../../core/load.ts";
import { nextFire, scheduleProblem, scheduleSpec } from "../../core/schedule.ts";
import { PipelineError } from "../../core/errors.ts";
import { clusterKeys, type ClusterRunRecord } from "./keys.ts";
import {
  fireDue,
  listSchedules,
  runSchedules,
  type ScheduleEvent,
  scheduleKey,
  type ScheduleLoopOptions,
  setSuspended,
  syncSchedule,
} from "./schedules.ts";

const SOURCE = `name: nightly
params:
  who: { type: string, required: true }
steps:
  s: { run: 'echo "\${{ params.who }}"' }
`;

/** A store, a fake clock and a loop that plans the pipeline above. */
async function harness(spec: Parameters<typeof scheduleSpec>[0]) {
  const dir = await Deno.makeTempDir();
  const store = openEmbeddedStore(`${dir}/state.db`);
  let clock = Date.parse("2026-12-03T10:00:00.250Z");
  const events: ScheduleEvent[] = [];
  const options: ScheduleLoopOptions = {
    store,
    fence: [],
    signal: new AbortController().signal,
    now: () => clock,
    plan: (_name, params) =>
      Promise.resolve({
        plan: parsePipeline(SOURCE, { file: "p.yaml", baseDir: "/tmp", params }),
        file: "p.yaml",
        version: 1,
      }),
    onEvent: (event) => events.push(event),
  };
  await syncSchedule(store, "nightly", scheduleSpec(spec), clock);
  return {
    store,
    events,
    at: (iso: string) => clock = Date.parse(iso),
    fire: () => fireDue(options),
    runs: async () =>
      (await store.list(clusterKeys.runPrefix)).items.map((kv) =>
        JSON.parse(kv.value) as ClusterRunRecord
      ).sort((a, b) => a.registered!.tick! - b.registered!.tick!),
    state: async () => (await listSchedules(store))[0],
    async [Symbol.asyncDispose]() {
      await store.close();
      await Deno.remove(dir, { recursive: true });
    },
  };
}

Deno.test("schedule: one run per tick with the schedule's values, the next tick advanced with it", async () => {
  await using h = await harness({ cron: "* * * * *", params: { who: "cron" } });
  assert.equal((await h.state()).next, Date.parse("2026-12-03T10:01:00Z"));
  assert.equal(await h.fire(), Date.parse("2026-12-03T10:00:01.250Z"));
  assert.equal((await h.runs()).length, 0, "not due yet");
  h.at("2026-12-03T10:01:00.010Z");
  await h.fire();
  await h.fire(); // the same tick again: nothing
  const runs = await h.runs();
  assert.equal(runs.length, 1);
  assert.deepEqual(runs[0].registered, {
    name: "nightly",
    version: 1,
    tick: Date.parse("2026-12-03T10:01:00Z"),
  });
  assert.deepEqual(runs[0].params, { who: "cron" });
  const state = await h.state();
  assert.equal(state.next, Date.parse("2026-12-03T10:02:00Z"));
  assert.equal(state.lastRun, runs[0].runId);
});

Deno.test("schedule: ticks missed while down run once, or are skipped past the starting deadline", async () => {
  {
    await using h = await harness({ cron: "* * * * *", params: { who: "x" } });
    h.at("2026-12-03T10:05:30Z"); // down through five ticks
    await h.fire();
    await h.fire();
    assert.equal((await h.runs()).length, 1);
    assert.equal((await h.state()).next, Date.parse("2026-12-03T10:06:00Z"));
  }
  {
    await using h = await harness({
      cron: "* * * * *",
      params: { who: "x" },
      "starting-deadline": "10s",
    });
    h.at("2026-12-03T10:05:30Z");
    await h.fire();
    assert.equal((await h.runs()).length, 0);
    assert.equal((await h.state()).skipped, 1);
    assert.match((h.events[0] as { reason: string }).reason, /past its starting deadline/);
    h.at("2026-12-03T10:06:05Z"); // within the deadline
    await h.fire();
    assert.equal((await h.runs()).length, 1);
  }
});

Deno.test("schedule: forbid skips a tick while the last run goes on; replace cancels it", async () => {
  {
    await using h = await harness({
      cron: "* * * * *",
      params: { who: "x" },
      concurrency: "forbid",
    });
    h.at("2026-12-03T10:01:00.010Z");
    await h.fire();
    h.at("2026-12-03T10:02:00.010Z");
    await h.fire();
    assert.equal((await h.runs()).length, 1, "the first run is still pending");
    assert.equal((await h.state()).skipped, 1);
    // Once it has ended, the next tick fires.
    const [first] = await h.runs();
    await h.store.put(
      clusterKeys.run(first.runId),
      JSON.stringify({ ...first, status: "succeeded" }),
    );
    h.at("2026-12-03T10:03:00.010Z");
    await h.fire();
    assert.equal((await h.runs()).length, 2);
  }
  {
    await using h = await harness({
      cron: "* * * * *",
      params: { who: "x" },
      concurrency: "replace",
    });
    h.at("2026-12-03T10:01:00.010Z");
    await h.fire();
    h.at("2026-12-03T10:02:00.010Z");
    await h.fire();
    const runs = await h.runs();
    assert.equal(runs.length, 2);
    assert.ok(await h.store.get(clusterKeys.request(runs[0].runId, "cancel")));
    assert.ok(h.events.some((event) => event.type === "replaced"));
  }
});

Deno.test("schedule: suspended, it does not fire; resumed, it owes nothing for the time asleep", async () => {
  await using h = await harness({ cron: "* * * * *", params: { who: "x" } });
  assert.equal(await setSuspended(h.store, "nightly", true, Date.now()), true);
  h.at("2026-12-03T10:03:00.010Z");
  await h.fire();
  assert.equal((await h.runs()).length, 0);
  await setSuspended(h.store, "nightly", false, Date.parse("2026-12-03T10:03:00.010Z"));
  assert.equal((await h.state()).next, Date.parse("2026-12-03T10:04:00Z"));
  assert.equal(await setSuspended(h.store, "other", true, 0), false);
});

Deno.test("schedule: a deposed scheduler's fence fails: no run, no advance", async () => {
  await using h = await harness({ cron: "* * * * *", params: { who: "x" } });
  h.at("2026-12-03T10:01:00.010Z");
  const options = {
    store: h.store,
    fence: [{ key: "/election/none", target: "create" as const, op: "!=" as const, value: 0 }],
    signal: new AbortController().signal,
    now: () => Date.parse("2026-12-03T10:01:00.010Z"),
    plan: () =>
      Promise.resolve({
        plan: parsePipeline(SOURCE, { file: "p.yaml", baseDir: "/tmp", params: { who: "x" } }),
        file: "p.yaml",
        version: 1,
      }),
  };
  await fireDue(options);
  assert.equal((await h.runs()).length, 0);
  assert.equal((await h.state()).next, Date.parse("2026-12-03T10:01:00Z"));
});

Deno.test("schedule: an unchanged spec keeps its state; a changed one starts over; none removes it", async () => {
  await using h = await harness({ cron: "* * * * *", params: { who: "x" } });
  h.at("2026-12-03T10:01:00.010Z");
  await h.fire();
  const before = await h.state();
  await syncSchedule(
    h.store,
    "nightly",
    scheduleSpec({ cron: "* * * * *", params: { who: "x" } }),
    0,
  );
  assert.deepEqual(await h.state(), before);
  await syncSchedule(
    h.store,
    "nightly",
    scheduleSpec({ cron: "0 3 * * *", timezone: "Europe/Paris", params: { who: "x" } }),
    Date.parse("2026-12-03T10:01:00Z"),
  );
  const changed = await h.state();
  assert.equal(changed.next, Date.parse("2026-12-04T02:00:00Z"));
  assert.equal(changed.lastRun, before.lastRun);
  await syncSchedule(h.store, "nightly", undefined, 0);
  assert.equal(await h.store.get(scheduleKey("nightly")), undefined);
});

Deno.test("schedule: bad expressions, time zones and values are located errors", () => {
  assert.match(scheduleProblem({ cron: "61 * * * *" })!.message, /invalid cron expression/);
  assert.equal(scheduleProblem({ cron: "0 3 * * *", timezone: "Mars/Base" })!.key, "timezone");
  assert.equal(
    nextFire({ cron: "0 0 1 1 *" }, Date.parse("2026-06-01T00:00:00Z")),
    Date.parse("2027-01-01T00:00:00Z"),
  );
  const source = `name: p
params:
  n: { type: number, required: true }
schedule:
  cron: "0 3 * * *"
  timezone: Mars/Base
  params: { n: lots, m: 1 }
steps:
  s: { run: "true" }
`;
  assert.throws(
    () => parsePipeline(source, { file: "p.yaml", baseDir: "/tmp" }),
    (error: unknown) => {
      assert.ok(error instanceof PipelineError);
      const text = error.diagnostics.map((d) => `${d.line}:${d.col} ${d.message}`).join("\n");
      assert.match(text, /^6:\d+ unknown time zone "Mars\/Base"/m);
      assert.match(text, /schedule: parameter "m" was given/);
      assert.match(text, /schedule: expected a number for "n", got "lots"/);
      return true;
    },
  );
});

Deno.test("backfill: a run per tick with its logical date, all at once or one at a time", async () => {
  const { startBackfill, listBackfills } = await import("./schedules.ts");
  const { ticksBetween } = await import("../../core/schedule.ts");
  const withDate = SOURCE.replace(
    "who: { type: string, required: true }",
    "who: { type: string, required: true }\n  day: { type: string }",
  );
  for (const concurrency of ["allow", "forbid"] as const) {
    await using h = await harness({
      cron: "0 3 * * *",
      params: { who: "backfill" },
      concurrency,
      "logical-date-param": "day",
    });
    const ticks = ticksBetween(
      { cron: "0 3 * * *" },
      Date.parse("2026-11-01T00:00:00Z"),
      Date.parse("2026-11-03T12:00:00Z"),
    );
    assert.deepEqual(ticks.map((t) => new Date(t).toISOString()), [
      "2026-11-01T03:00:00.000Z",
      "2026-11-02T03:00:00.000Z",
      "2026-11-03T03:00:00.000Z",
    ]);
    assert.equal(
      await startBackfill(h.store, {
        name: "nightly",
        ticks,
        started: [],
        total: 3,
        createdAt: 0,
      }),
      true,
    );
    assert.equal(
      await startBackfill(h.store, { name: "nightly", ticks, started: [], total: 3, createdAt: 0 }),
      false,
      "one backfill at a time",
    );
    // The plan function of the harness plans SOURCE; plan the one with a day instead.
    const plan = (_name: string, params: Record<string, unknown>) =>
      Promise.resolve({
        plan: parsePipeline(withDate, { file: "p.yaml", baseDir: "/tmp", params }),
        file: "p.yaml",
        version: 1,
      });
    const options = {
      store: h.store,
      fence: [],
      signal: new AbortController().signal,
      now: () => Date.parse("2026-12-03T10:00:00.250Z"),
      plan,
    };
    await fireDue(options);
    let runs = await h.runs();
    if (concurrency === "allow") {
      assert.equal(runs.length, 3);
    } else {
      assert.equal(runs.length, 1, "one at a time");
      for (let i = 0; i < 2; i++) {
        const last = runs.at(-1)!;
        await h.store.put(
          clusterKeys.run(last.runId),
          JSON.stringify({ ...last, status: "succeeded" }),
        );
        await fireDue(options);
        runs = await h.runs();
      }
      assert.equal(runs.length, 3);
    }
    assert.deepEqual(runs.map((run) => run.params?.day), [
      "2026-11-01T03:00:00.000Z",
      "2026-11-02T03:00:00.000Z",
      "2026-11-03T03:00:00.000Z",
    ]);
    for (const run of runs) {
      await h.store.put(
        clusterKeys.run(run.runId),
        JSON.stringify({ ...run, status: "succeeded" }),
      );
    }
    await fireDue(options);
    assert.deepEqual(await listBackfills(h.store), [], "done: removed");
  }
});

Deno.test("schedule loop: stopped while it looks at the schedules, it ends without its sleep", async () => {
  const dir = await Deno.makeTempDir();
  const store = openEmbeddedStore(`${dir}/state.db`);
  const controller = new AbortController();
  let clock = Date.parse("2026-12-03T10:00:00Z");
  try {
    const loop = runSchedules({
      store,
      fence: [],
      signal: controller.signal,
      // The stop comes once the loop is under way; each reading of the clock
      // goes an hour back, so the sleep after the look would be hours long.
      now: () => {
        controller.abort();
        return clock -= 3_600_000;
      },
      plan: () => Promise.reject(new Error("no schedule to plan")),
    });
    let timer: ReturnType<typeof setTimeout> | undefined;
    const late = new Promise<string>((resolve) => timer = setTimeout(resolve, 10_000, "late"));
    try {
      assert.equal(await Promise.race([loop.then(() => "ended"), late]), "ended");
    } finally {
      clearTimeout(timer);
    }
  } finally {
    await store.close();
    await Deno.remove(dir, { recursive: true });
  }
});
