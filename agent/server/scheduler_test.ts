import assert from "node:assert/strict";
import { openMemoryStore } from "../../consensus/embedded.ts";
import type { Store } from "../../consensus/store.ts";
import { parsePipeline } from "../../core/load.ts";
import type { AttemptResult } from "../../core/model.ts";
import {
  type AssignmentRecord,
  clusterKeys,
  type ResultRecord,
  type WorkerRecord,
} from "./keys.ts";
import {
  clusterStepStates,
  requestCancel,
  requestResume,
  submitRun,
  waitForClusterRun,
} from "./runs.ts";
import { DeposedError, type ResultSink, runScheduler, type SchedulerEvent } from "./scheduler.ts";

const PIPELINE = `name: cluster-demo
steps:
  a: { backend: shell, run: "echo a", outputs: [a.txt] }
  b: { backend: shell, run: "echo b", inputs: { a: a/a.txt }, selector: { cloud: gcp } }
`;

function worker(agentId: string, labels: Record<string, string>, slots = 2): WorkerRecord {
  return {
    agentId,
    labels,
    capabilities: [{ backend: "shell", available: true }],
    slots,
    server: "test",
    connectedAt: 0,
    lastHeartbeat: 0,
  };
}

/** Waits for the next assignment under `/assign/`, returning it. */
async function nextAssignment(store: Store, seen: Set<string>): Promise<AssignmentRecord> {
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    const { items } = await store.list(clusterKeys.assignmentPrefix());
    for (const kv of items) {
      if (seen.has(kv.key)) continue;
      seen.add(kv.key);
      return JSON.parse(kv.value);
    }
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  throw new Error("no assignment within 10 s");
}

async function report(store: Store, assignment: AssignmentRecord, result: AttemptResult) {
  const record: ResultRecord = {
    runId: assignment.runId,
    stepId: assignment.stepId,
    attemptId: assignment.attemptId,
    agentId: assignment.agentId,
    result,
    at: Date.now(),
  };
  await store.put(clusterKeys.result(assignment.attemptId), JSON.stringify(record));
}

const OK_A: AttemptResult = {
  ok: true,
  exitCode: 0,
  outputs: { "a.txt": { name: "a.txt", digest: `sha256:${"0".repeat(64)}`, size: 2 } },
};

Deno.test("scheduler: steps go to matching workers, results advance the run, a lost worker's step runs again elsewhere", async () => {
  const store = openMemoryStore();
  const stop = new AbortController();
  const events: SchedulerEvent[] = [];
  try {
    await store.put(clusterKeys.worker("w-aws"), JSON.stringify(worker("w-aws", { cloud: "aws" })));
    await store.put(clusterKeys.worker("w-gcp"), JSON.stringify(worker("w-gcp", { cloud: "gcp" })));
    const scheduler = runScheduler({
      store,
      fence: [],
      signal: stop.signal,
      onEvent: (event) => events.push(event),
    });
    const plan = parsePipeline(PIPELINE, { file: "cluster.yaml", baseDir: "/tmp" });
    const run = await submitRun(store, plan);
    const seen = new Set<string>();
    const first = await nextAssignment(store, seen);
    assert.equal(first.stepId, "a");
    await report(store, first, OK_A);
    const second = await nextAssignment(store, seen);
    assert.equal(second.stepId, "b");
    assert.equal(second.agentId, "w-gcp", "the selector picks the gcp worker");
    assert.deepEqual(second.inputs.a.artifacts.map((a) => a.digest), [
      OK_A.outputs["a.txt"].digest,
    ]);
    // The gcp worker dies (its lease ran out): b gets a new attempt, which
    // waits for a gcp worker.
    await store.delete(clusterKeys.worker("w-gcp"));
    await store.put(
      clusterKeys.worker("w-gcp2"),
      JSON.stringify(worker("w-gcp2", { cloud: "gcp" })),
    );
    const third = await nextAssignment(store, seen);
    assert.equal(third.stepId, "b");
    assert.equal(third.agentId, "w-gcp2");
    assert.notEqual(third.attemptId, second.attemptId);
    // The lost attempt reports late: it is not the step's outcome.
    await report(store, second, {
      ok: false,
      exitCode: 1,
      errorClass: "application",
      message: "late",
    });
    await report(store, third, { ok: true, exitCode: 0, outputs: {} });
    const done = await waitForClusterRun(store, run.runId);
    assert.equal(done.status, "succeeded");
    const steps = await clusterStepStates(store, run.runId);
    assert.equal(steps.b.attempts.length, 2);
    assert.equal(steps.b.attempts[0].result?.ok, false);
    assert.equal(steps.b.status, "succeeded");
    // Everything the run used is tidied away.
    assert.equal((await store.list(clusterKeys.assignmentPrefix())).items.length, 0);
    assert.equal((await store.list(clusterKeys.resultPrefix)).items.length, 0);
    assert.ok(events.some((e) => e.type === "worker-lost" && e.agentId === "w-gcp"));
    stop.abort();
    await scheduler;
  } finally {
    stop.abort();
    store.close();
  }
});

Deno.test("scheduler: a successor picks up where a dead scheduler stopped; cancel reaches the worker", async () => {
  const store = openMemoryStore();
  try {
    await store.put(clusterKeys.worker("w1"), JSON.stringify(worker("w1", {})));
    const plan = parsePipeline(PIPELINE.replace(", selector: { cloud: gcp }", ""), {
      file: "cluster.yaml",
      baseDir: "/tmp",
    });
    const firstLeader = new AbortController();
    const first = runScheduler({ store, fence: [], signal: firstLeader.signal });
    const run = await submitRun(store, plan);
    const seen = new Set<string>();
    const a = await nextAssignment(store, seen);
    firstLeader.abort();
    await first;
    // The result arrives while no scheduler runs; the next one consumes it.
    await report(store, a, OK_A);
    const secondLeader = new AbortController();
    const second = runScheduler({ store, fence: [], signal: secondLeader.signal });
    const b = await nextAssignment(store, seen);
    assert.equal(b.stepId, "b");
    assert.equal(await requestCancel(store, run.runId), "requested");
    const deadline = Date.now() + 10_000;
    while (!(await store.get(clusterKeys.stop("w1", b.attemptId)))) {
      if (Date.now() > deadline) throw new Error("no stop request for the worker");
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    const done = await waitForClusterRun(store, run.runId);
    assert.equal(done.status, "cancelled");
    secondLeader.abort();
    await second;
  } finally {
    store.close();
  }
});

Deno.test("scheduler: a deposed scheduler's write fails its fence and it stops", async () => {
  const store = openMemoryStore();
  try {
    await store.put("/election/epoch", "1");
    await store.put(clusterKeys.worker("w1"), JSON.stringify(worker("w1", {})));
    const fence = [{
      key: "/election/epoch",
      target: "value" as const,
      op: "==" as const,
      value: "1",
    }];
    const leader = runScheduler({ store, fence, signal: new AbortController().signal });
    // Another server is elected: the epoch moves on.
    await store.put("/election/epoch", "2");
    const plan = parsePipeline(PIPELINE, { file: "cluster.yaml", baseDir: "/tmp" });
    await submitRun(store, plan);
    await assert.rejects(leader, DeposedError);
    assert.equal((await store.list(clusterKeys.assignmentPrefix())).items.length, 0);
  } finally {
    store.close();
  }
});

Deno.test("scheduler: affinity pipeline keeps every step of a run on the worker of its first step", async () => {
  const store = openMemoryStore();
  const stop = new AbortController();
  try {
    for (const id of ["w1", "w2", "w3"]) {
      await store.put(clusterKeys.worker(id), JSON.stringify(worker(id, {}, 4)));
    }
    const scheduler = runScheduler({ store, fence: [], signal: stop.signal });
    const plan = parsePipeline(
      `name: sticky
affinity: pipeline
steps:
  a: { backend: shell, run: "true" }
  b: { backend: shell, run: "true", needs: [a] }
  c: { backend: shell, run: "true", needs: [a] }
  d: { backend: shell, run: "true", needs: [b, c] }
`,
      { file: "sticky.yaml", baseDir: "/tmp" },
    );
    const run = await submitRun(store, plan);
    const seen = new Set<string>();
    const agents = new Set<string>();
    for (let i = 0; i < 4; i++) {
      const assignment = await nextAssignment(store, seen);
      agents.add(assignment.agentId);
      await report(store, assignment, { ok: true, exitCode: 0, outputs: {} });
    }
    assert.equal((await waitForClusterRun(store, run.runId)).status, "succeeded");
    assert.equal(agents.size, 1, `steps went to ${[...agents].join(", ")}`);
    stop.abort();
    await scheduler;
  } finally {
    stop.abort();
    store.close();
  }
});

Deno.test("scheduler: a failed run resumes on request; what succeeded is kept", async () => {
  const store = openMemoryStore();
  const stop = new AbortController();
  try {
    await store.put(clusterKeys.worker("w1"), JSON.stringify(worker("w1", {})));
    const scheduler = runScheduler({ store, fence: [], signal: stop.signal });
    const plan = parsePipeline(PIPELINE.replace(", selector: { cloud: gcp }", ""), {
      file: "cluster.yaml",
      baseDir: "/tmp",
    });
    const run = await submitRun(store, plan);
    const seen = new Set<string>();
    await report(store, await nextAssignment(store, seen), OK_A);
    const b = await nextAssignment(store, seen);
    await report(store, b, { ok: false, exitCode: 65, errorClass: "business", message: "bad" });
    assert.equal((await waitForClusterRun(store, run.runId)).status, "failed");
    await requestResume(store, run.runId);
    const again = await nextAssignment(store, seen);
    assert.equal(again.stepId, "b", "only the failed step runs again");
    await report(store, again, { ok: true, exitCode: 0, outputs: {} });
    assert.equal((await waitForClusterRun(store, run.runId)).status, "succeeded");
    const steps = await clusterStepStates(store, run.runId);
    assert.equal(steps.a.attempts.length, 1);
    assert.equal(steps.b.attempts.length, 2);
    stop.abort();
    await scheduler;
  } finally {
    stop.abort();
    store.close();
  }
});

/**
 * A scheduler over `store` with one aws worker, its log lines going to
 * `logs`, and a run of a step only an azure worker may take.
 */
async function unplaceableRun(
  store: Store,
  signal: AbortSignal,
  logs: Array<Record<string, unknown>>,
) {
  await store.put(clusterKeys.worker("w-aws"), JSON.stringify(worker("w-aws", { cloud: "aws" })));
  const scheduler = runScheduler({ store, fence: [], signal, log: (fields) => logs.push(fields) });
  const plan = parsePipeline(
    "name: nowhere\nsteps:\n  a: { backend: shell, run: 'true', selector: { cloud: azure } }\n",
    { file: "nowhere.yaml", baseDir: "/tmp" },
  );
  return { scheduler, run: await submitRun(store, plan) };
}

Deno.test("scheduler: a step no live worker can run waits, and the log says why once", async () => {
  const store = openMemoryStore();
  const stop = new AbortController();
  const logs: Array<Record<string, unknown>> = [];
  try {
    const { scheduler, run } = await unplaceableRun(store, stop.signal, logs);
    const deadline = Date.now() + 5_000;
    while (!logs.some((line) => line.msg === "step waits: no live worker can run it")) {
      if (Date.now() > deadline) throw new Error(`no warning in ${JSON.stringify(logs)}`);
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    const warning = logs.find((line) => line.msg === "step waits: no live worker can run it")!;
    assert.deepEqual(warning.selector, { cloud: "azure" });
    // An azure worker arrives: the step goes there.
    await store.put(
      clusterKeys.worker("w-azure"),
      JSON.stringify(worker("w-azure", { cloud: "azure" })),
    );
    const assignment = await nextAssignment(store, new Set());
    assert.equal(assignment.agentId, "w-azure");
    await report(store, assignment, { ok: true, exitCode: 0, outputs: {} });
    assert.equal((await waitForClusterRun(store, run.runId)).status, "succeeded");
    assert.equal(
      logs.filter((line) => line.msg === "step waits: no live worker can run it").length,
      1,
    );
    stop.abort();
    await scheduler;
  } finally {
    stop.abort();
    store.close();
  }
});

Deno.test("scheduler: a run's warning that no worker can run a step goes when the run ends", async () => {
  const store = openMemoryStore();
  const stop = new AbortController();
  const logs: Array<Record<string, unknown>> = [];
  const warnings = () =>
    logs.filter((line) => line.msg === "step waits: no live worker can run it").length;
  const until = async (what: string, done: () => boolean) => {
    const deadline = Date.now() + 5_000;
    while (!done()) {
      if (Date.now() > deadline) throw new Error(`${what} not within 5 s: ${JSON.stringify(logs)}`);
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
  };
  try {
    const { scheduler, run } = await unplaceableRun(store, stop.signal, logs);
    await until("a warning", () => warnings() === 1);
    await requestCancel(store, run.runId);
    assert.equal((await waitForClusterRun(store, run.runId)).status, "cancelled");
    // Resumed, the run waits anew, and says why anew: its first warning was not kept.
    await requestResume(store, run.runId);
    await until("a second warning", () => warnings() === 2);
    stop.abort();
    await scheduler;
  } finally {
    stop.abort();
    store.close();
  }
});

Deno.test("scheduler: a step goes only to a worker that declares the secrets it is given", async () => {
  const store = openMemoryStore();
  const stop = new AbortController();
  try {
    // The least-loaded tie goes to the lowest id: "w-a" would win if secrets did not count.
    await store.put(
      clusterKeys.worker("w-a"),
      JSON.stringify({ ...worker("w-a", {}), secrets: [] }),
    );
    await store.put(
      clusterKeys.worker("w-b"),
      JSON.stringify({ ...worker("w-b", {}), secrets: ["db-password"] }),
    );
    const scheduler = runScheduler({ store, fence: [], signal: stop.signal });
    const plan = parsePipeline(
      `name: secret-placement
secrets: { DB_PASSWORD: db-password }
steps:
  migrate: { backend: shell, run: "true", secrets: [DB_PASSWORD] }
`,
      {
        file: "secrets.yaml",
        baseDir: "/tmp",
        secrets: { allowSources: false, names: ["db-password"] },
      },
    );
    await submitRun(store, plan);
    const assigned = await nextAssignment(store, new Set());
    assert.equal(assigned.agentId, "w-b");
    stop.abort();
    await scheduler;
  } finally {
    stop.abort();
    await store.close();
  }
});

Deno.test("scheduler: an offered result, the writes that go before it and the next step's assignment are one commit", async () => {
  const store = openMemoryStore();
  const stop = new AbortController();
  let txns = 0;
  const counting = new Proxy(store, {
    get(target, property) {
      if (property === "txn") {
        return (...args: Parameters<Store["txn"]>) => {
          txns++;
          return target.txn(...args);
        };
      }
      const value = Reflect.get(target, property, target);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
  let sink: ResultSink | undefined;
  try {
    await store.put(clusterKeys.worker("w"), JSON.stringify(worker("w", { cloud: "gcp" })));
    const scheduler = runScheduler({
      store: counting,
      fence: [],
      signal: stop.signal,
      onResultSink: (given) => sink = given,
    });
    const plan = parsePipeline(PIPELINE, { file: "cluster.yaml", baseDir: "/tmp" });
    const run = await submitRun(store, plan);
    const seen = new Set<string>();
    const first = await nextAssignment(store, seen);
    const logKey = clusterKeys.logBatch(run.runId, "a", 1, 1);
    const before = txns;
    const committed = await sink!.offer({
      runId: first.runId,
      stepId: first.stepId,
      attemptId: first.attemptId,
      agentId: first.agentId,
      result: OK_A,
      at: Date.now(),
    }, [{ type: "put", key: logKey, value: "a\n" }]);
    assert.equal(committed, true);
    assert.equal(txns - before, 1, "the result, its log's rest and the next assignment: one txn");
    assert.equal((await store.get(logKey))?.value, "a\n");
    const second = await nextAssignment(store, seen);
    assert.equal(second.stepId, "b");
    // An offer of an attempt that is not the agent's is refused, its writes with it.
    const stale = await sink!.offer({
      runId: first.runId,
      stepId: first.stepId,
      attemptId: first.attemptId,
      agentId: "someone-else",
      result: OK_A,
      at: Date.now(),
    }, [{ type: "put", key: `${logKey}-stale`, value: "x" }]);
    assert.equal(stale, false);
    assert.equal(await store.get(`${logKey}-stale`), undefined);
    stop.abort();
    await scheduler;
  } finally {
    stop.abort();
    store.close();
  }
});
