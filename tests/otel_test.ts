/**
 * OpenTelemetry traces end to end: an OTLP/HTTP receiver written here, on
 * loopback (port 0), collects what local runs, servers and agents export
 * (`POST /v1/traces`, JSON), and the tests read the traces back.
 */

import assert from "node:assert/strict";
import { loadPipeline, runPipeline } from "../mod.ts";
import { openTracer, type Tracer } from "../agent/trace/exporter.ts";
import { parseTraceparent } from "../agent/trace/context.ts";
import { openLocalState } from "../agent/local/mod.ts";
import { getRunRecord } from "../agent/local/state.ts";
import { CLI_PERMISSIONS, linesOf, MAIN, poll, runCli, sandbox, waitForLine } from "./_helpers.ts";
import { RunClient } from "../agent/client/mod.ts";
import { openLocalArtifactStore } from "../core/artifacts/local.ts";

/** A span as the receiver decoded it from OTLP/JSON. */
interface ReceivedSpan {
  traceId: string;
  spanId: string;
  parentSpanId?: string;
  name: string;
  startNs: bigint;
  endNs: bigint;
  attributes: Record<string, string | number | boolean>;
  status: { code?: number; message?: string };
  resource: Record<string, string | number | boolean>;
}

/** An OTLP/HTTP (JSON) traces receiver on a free loopback port. */
interface Receiver extends AsyncDisposable {
  url: string;
  spans: ReceivedSpan[];
  requests: number;
}

function valueOf(value: Record<string, unknown>): string | number | boolean {
  if ("stringValue" in value) return value.stringValue as string;
  if ("boolValue" in value) return value.boolValue as boolean;
  if ("intValue" in value) return Number(value.intValue);
  if ("doubleValue" in value) return value.doubleValue as number;
  throw new Error(`unexpected attribute value ${JSON.stringify(value)}`);
}

function attributesOf(list: Array<{ key: string; value: Record<string, unknown> }> = []) {
  return Object.fromEntries(list.map(({ key, value }) => [key, valueOf(value)]));
}

function startReceiver(): Receiver {
  const spans: ReceivedSpan[] = [];
  const receiver = {
    url: "",
    spans,
    requests: 0,
  } as Receiver;
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (request) => {
    const path = new URL(request.url).pathname;
    if (request.method !== "POST" || path !== "/v1/traces") {
      return new Response("not found", { status: 404 });
    }
    assert.equal(request.headers.get("content-type"), "application/json");
    receiver.requests++;
    const body = await request.json();
    for (const resourceSpans of body.resourceSpans) {
      const resource = attributesOf(resourceSpans.resource?.attributes);
      for (const scope of resourceSpans.scopeSpans) {
        for (const span of scope.spans) {
          assert.match(span.traceId, /^[0-9a-f]{32}$/);
          assert.match(span.spanId, /^[0-9a-f]{16}$/);
          spans.push({
            traceId: span.traceId,
            spanId: span.spanId,
            ...(span.parentSpanId ? { parentSpanId: span.parentSpanId } : {}),
            name: span.name,
            startNs: BigInt(span.startTimeUnixNano),
            endNs: BigInt(span.endTimeUnixNano),
            attributes: attributesOf(span.attributes),
            status: span.status ?? {},
            resource,
          });
        }
      }
    }
    return Response.json({});
  });
  receiver.url = `http://127.0.0.1:${server.addr.port}`;
  receiver[Symbol.asyncDispose] = () => server.shutdown();
  return receiver;
}

/** A loopback port nobody listens on: a collector that is down. */
function closedPort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

const PIPELINE = `
name: traced
steps:
  prepare:
    backend: shell
    run: |
      printf '%s' "$TRACEPARENT" > "$RUNNEL_OUTPUTS/traceparent.txt"
    outputs: [traceparent.txt]
  analyze:
    needs: [prepare]
    backend: deno
    module: ./analyze.ts
    inputs: { seen: prepare/traceparent.txt }
    outputs: [traceparent.txt]
  broken:
    needs: [prepare]
    backend: shell
    run: exit 3
    continue-on-error: true
  slow:
    backend: shell
    run: sleep 30
    timeout: 300ms
    continue-on-error: true
`;

const ANALYZE = `
export default async function (ctx) {
  await Deno.writeTextFile(ctx.outputs["traceparent.txt"], ctx.env.TRACEPARENT ?? "");
}
`;

async function readOutput(stateDir: string, runId: string, stepId: string): Promise<string> {
  const state = await openLocalState(stateDir);
  try {
    const record = await state.artifacts.get(runId, stepId, "traceparent.txt");
    assert.ok(record, `${stepId} wrote traceparent.txt`);
    const path = `${stateDir}/../${stepId}.traceparent`;
    await state.artifacts.materialize(record, path);
    return await Deno.readTextFile(path);
  } finally {
    await state.close();
  }
}

function byId(spans: ReceivedSpan[]): Map<string, ReceivedSpan> {
  return new Map(spans.map((span) => [span.spanId, span]));
}

Deno.test("a local run is one trace: run, attempt and stage spans, and TRACEPARENT in each step", async () => {
  await using box = await sandbox();
  await using receiver = startReceiver();
  await box.write("analyze.ts", ANALYZE);
  const plan = await loadPipeline(await box.write("pipeline.yaml", PIPELINE));
  const tracer = openTracer({ endpoint: `${receiver.url}/v1/traces`, delayMs: 50 });
  let summary;
  try {
    summary = await runPipeline(plan, { stateDir: box.stateDir, tracer });
  } finally {
    await tracer.shutdown();
  }
  assert.equal(summary.status, "succeeded", JSON.stringify(summary.steps, null, 2));
  assert.equal(tracer.stats.dropped, 0);

  // The run's record names its trace; every span is in it.
  const state = await openLocalState(box.stateDir, { readOnly: true });
  const record = await getRunRecord(state.store, summary.runId).finally(() => state.close());
  assert.match(record.traceId ?? "", /^[0-9a-f]{32}$/);
  const traceId = record.traceId!;
  const spans = receiver.spans;
  assert.ok(spans.length > 0);
  assert.deepEqual([...new Set(spans.map((span) => span.traceId))], [traceId]);
  assert.equal(spans[0].resource["service.name"], "runnel");

  // One root: the run.
  const roots = spans.filter((span) => !span.parentSpanId);
  assert.equal(roots.length, 1, JSON.stringify(roots.map((span) => span.name)));
  const run = roots[0];
  assert.equal(run.name, "run traced");
  assert.equal(run.attributes["runnel.run.id"], summary.runId);
  assert.equal(run.attributes["runnel.run.status"], "succeeded");

  // A span per attempt under the run, each with its four stages (shell, deno).
  const ids = byId(spans);
  const attempts = spans.filter((span) => span.parentSpanId === run.spanId);
  assert.deepEqual(attempts.map((span) => span.name).sort(), [
    "step analyze",
    "step broken",
    "step prepare",
    "step slow",
  ]);
  for (const attempt of attempts) {
    const stepId = attempt.attributes["runnel.step.id"] as string;
    assert.equal(attempt.attributes["runnel.run.id"], summary.runId);
    assert.equal(attempt.attributes["runnel.pipeline"], "traced");
    assert.equal(attempt.attributes["runnel.attempt"], 1);
    assert.equal(attempt.attributes["runnel.worker"], "local");
    assert.equal(attempt.attributes["runnel.backend"], stepId === "analyze" ? "deno" : "shell");
    assert.ok(attempt.startNs >= run.startNs && attempt.endNs <= run.endNs);
    const children = spans.filter((span) => span.parentSpanId === attempt.spanId);
    assert.deepEqual(
      children.map((span) => span.name).sort(),
      stepId === "broken" || stepId === "slow"
        ? ["execute", "fetch inputs", "queue wait"]
        : ["execute", "fetch inputs", "queue wait", "upload outputs"],
      stepId,
    );
    for (const child of children) {
      assert.ok(ids.get(child.parentSpanId!) === attempt);
      assert.ok(child.startNs >= attempt.startNs, child.name);
      // A timed-out attempt ends when the engine says; its process is stopped after.
      if (stepId !== "slow") assert.ok(child.endNs <= attempt.endNs, child.name);
      if (child.name !== "queue wait") {
        assert.equal(
          child.attributes["runnel.attempt.id"],
          attempt.attributes["runnel.attempt.id"],
        );
      }
    }
  }
  const broken = attempts.find((span) => span.name === "step broken")!;
  assert.equal(broken.status.code, 2, "a failed attempt's span is an error");
  assert.equal(broken.attributes["runnel.outcome"], "failed");
  assert.equal(broken.attributes["error.type"], "application");
  assert.equal(broken.attributes["runnel.exit_code"], 3);
  const slow = attempts.find((span) => span.name === "step slow")!;
  assert.equal(slow.status.code, 2);
  assert.equal(slow.attributes["runnel.outcome"], "timeout");
  assert.equal(slow.attributes["error.type"], "timeout");
  const prepare = attempts.find((span) => span.name === "step prepare")!;
  assert.equal(prepare.attributes["runnel.outcome"], "succeeded");
  assert.equal(prepare.status.code, undefined);

  // Each step saw its execution span's context: the run's trace id.
  for (const stepId of ["prepare", "analyze"]) {
    const seen = parseTraceparent(await readOutput(box.stateDir, summary.runId, stepId));
    assert.ok(seen, `${stepId} saw a valid TRACEPARENT`);
    assert.equal(seen.traceId, traceId);
    const execute = ids.get(seen.spanId);
    assert.equal(execute?.name, "execute");
    assert.equal(ids.get(execute.parentSpanId!)?.attributes["runnel.step.id"], stepId);
  }

  // `runnel show` names the trace.
  const shown = await runCli(["show", summary.runId, "--state-dir", box.stateDir], {
    cwd: box.dir,
  });
  assert.equal(shown.code, 0, shown.stderr);
  assert.match(shown.stdout, new RegExp(`^trace {5}${traceId}$`, "m"));
});

/** A `runnel` subprocess whose stderr lines are read as they come. */
function spawnRunnel(args: string[], cwd: string) {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", ...CLI_PERMISSIONS, MAIN, ...args],
    cwd,
    env: { NO_COLOR: "1" },
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const seen: string[] = [];
  const lines = linesOf(child.stderr, seen);
  // Keeps reading once the test stops looking, so the pipe never fills.
  const drained = async () => {
    await waitForLine(lines, () => false, 120_000).catch(() => {});
  };
  return {
    child,
    lines,
    seen,
    /** Stops it by its pid (SIGTERM drains an agent) and waits for its end. */
    async stop(): Promise<void> {
      try {
        child.kill("SIGTERM");
      } catch {
        // Already gone.
      }
      const drain = drained();
      await child.status;
      await drain;
    },
  };
}

const CLUSTER_PIPELINE = `
name: traced-cluster
steps:
  make:
    backend: shell
    run: printf '%s' "$TRACEPARENT" > "$RUNNEL_OUTPUTS/traceparent.txt"
    outputs: [traceparent.txt]
  use:
    needs: [make]
    backend: shell
    inputs: { seen: make/traceparent.txt }
    run: cat "$RUNNEL_INPUT_SEEN" > /dev/null
`;

Deno.test("a cluster run's spans come from the server and the agent, in one trace", async () => {
  await using box = await sandbox();
  await using receiver = startReceiver();
  const token = "otel-join-token-0123456789";
  const admin = "otel-admin-token-0123456789";
  const adminFile = await box.write("admin.token", admin);
  const server = spawnRunnel([
    "server",
    "--store",
    `${box.dir}/server.db`,
    "--listen",
    "127.0.0.1:0",
    "--grpc",
    "127.0.0.1:0",
    "--id",
    "server-1",
    "--token",
    token,
    "--admin-token-file",
    adminFile,
    "--otlp-endpoint",
    receiver.url,
  ], box.dir);
  let agent: ReturnType<typeof spawnRunnel> | undefined;
  try {
    const ready = await waitForLine(server.lines, (line) => line.includes(" · agents "));
    const [, http, grpc] = /API (http:\/\/\S+) · agents (\S+)/.exec(ready)!;
    agent = spawnRunnel([
      "agent",
      "--server",
      grpc,
      "--token",
      token,
      "--id",
      "worker-1",
      "--allow-shell",
      "--state-dir",
      `${box.dir}/agent`,
      "--artifacts",
      `${box.dir}/artifacts`,
      "--otlp-endpoint",
      receiver.url,
    ], box.dir);
    const client = new RunClient([http], { token: admin });
    const { runId } = await client.submit(CLUSTER_PIPELINE, "p.yaml", box.dir);
    for await (const _ of client.events(runId)) { /* until the run ends */ }
    const { run, steps } = await client.run(runId);
    assert.equal(run.status, "succeeded", JSON.stringify(steps, null, 2));
    // `GET /api/runs/:id` names the trace.
    assert.match(run.traceId ?? "", /^[0-9a-f]{32}$/);
    const traceId = run.traceId!;

    // The server exports the run's span as the run ends; the agent its stages.
    await poll(() =>
      receiver.spans.some((span) => span.name === "run traced-cluster") &&
        receiver.spans.filter((span) => span.name === "upload outputs").length === 2 || undefined, {
      what: "the run's spans from server and agent",
    });
    const spans = receiver.spans;
    assert.deepEqual([...new Set(spans.map((span) => span.traceId))], [traceId]);
    const roleOf = (span: ReceivedSpan) => span.resource["runnel.role"];
    assert.deepEqual([...new Set(spans.map(roleOf))].sort(), ["agent", "server"]);
    const ids = byId(spans);
    const runSpan = spans.find((span) => !span.parentSpanId)!;
    assert.equal(roleOf(runSpan), "server");
    assert.equal(runSpan.resource["service.instance.id"], "server-1");
    for (const stepId of ["make", "use"]) {
      const attempt = spans.find((span) => span.name === `step ${stepId}`)!;
      assert.ok(attempt, `a span for ${stepId}`);
      assert.equal(roleOf(attempt), "server");
      assert.equal(attempt.parentSpanId, runSpan.spanId);
      assert.equal(attempt.attributes["runnel.worker"], "worker-1");
      assert.equal(attempt.attributes["runnel.outcome"], "succeeded");
      const children = spans.filter((span) => span.parentSpanId === attempt.spanId);
      assert.deepEqual(
        children.map((span) => `${roleOf(span)}:${span.name}`).sort(),
        ["agent:execute", "agent:fetch inputs", "agent:upload outputs", "server:queue wait"],
      );
      for (const child of children.filter((span) => roleOf(span) === "agent")) {
        assert.equal(child.resource["service.instance.id"], "worker-1");
        assert.equal(
          child.attributes["runnel.attempt.id"],
          attempt.attributes["runnel.attempt.id"],
        );
      }
    }

    // The step saw the context the agent's execution span has, through the gRPC stream.
    const artifacts = openLocalArtifactStore(`${box.dir}/artifacts`);
    const record = await artifacts.get(runId, "make", "traceparent.txt");
    assert.ok(record);
    await artifacts.materialize(record, `${box.dir}/seen.txt`);
    const seen = parseTraceparent(await Deno.readTextFile(`${box.dir}/seen.txt`));
    assert.equal(seen?.traceId, traceId);
    assert.equal(ids.get(seen.spanId)?.name, "execute");
  } finally {
    await agent?.stop();
    await server.stop();
  }
});

Deno.test("a collector that is down neither fails nor holds up a run (runnel run --otlp-endpoint)", async () => {
  await using box = await sandbox();
  await box.write("analyze.ts", ANALYZE);
  const file = await box.write("pipeline.yaml", PIPELINE);
  const result = await runCli(
    [
      "run",
      file,
      "--state-dir",
      box.stateDir,
      "--otlp-endpoint",
      `http://127.0.0.1:${closedPort()}`,
    ],
    { cwd: box.dir },
  );
  assert.equal(result.code, 0, result.stderr);
  assert.match(
    result.stderr,
    /warning: \d+ span\(s\) not exported to http:\/\/127\.0\.0\.1:\d+\/v1\/traces/,
  );
  // A bad endpoint is bad input, named with its flag.
  const bad = await runCli(["run", file, "--state-dir", box.stateDir, "--otlp-endpoint", "4318"], {
    cwd: box.dir,
  });
  assert.equal(bad.code, 2, bad.stderr);
  assert.match(
    bad.stderr,
    /^error: Expected an http\(s\) URL of an OTLP collector for --otlp-endpoint/m,
  );
});

Deno.test("a collector that never answers does not hold up a run; shutdown keeps its deadline", async () => {
  await using box = await sandbox();
  await box.write("analyze.ts", ANALYZE);
  const plan = await loadPipeline(await box.write("pipeline.yaml", PIPELINE));
  // It takes connections and requests and never answers.
  const held: Array<() => void> = [];
  let received = 0;
  const hanging = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, () => {
    received++;
    return new Promise<Response>((resolve) => {
      held.push(() => resolve(new Response(null, { status: 503 })));
    });
  });
  const tracer: Tracer = openTracer({
    endpoint: `http://127.0.0.1:${hanging.addr.port}/v1/traces`,
    delayMs: 1,
    maxBatch: 1,
  });
  try {
    const summary = await runPipeline(plan, { stateDir: box.stateDir, tracer });
    assert.equal(summary.status, "succeeded");
    // The run ended while its first export still waited for an answer.
    assert.equal(received, 1, "one request at a time, still unanswered");
    assert.equal(tracer.stats.exported, 0);
    const stopping = Date.now();
    await tracer.shutdown({ timeoutMs: 300 });
    const took = Date.now() - stopping;
    assert.ok(took < 5_000, `shutdown took ${took} ms`);
    assert.ok(tracer.stats.dropped > 0);
  } finally {
    for (const answer of held) answer();
    await hanging.shutdown();
  }
});
