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
import { poll, ROOT, runCli, sandbox } from "./_helpers.ts";

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
      stepId === "broken"
        ? ["execute", "fetch inputs", "queue wait"]
        : ["execute", "fetch inputs", "queue wait", "upload outputs"],
      stepId,
    );
    for (const child of children) {
      assert.ok(ids.get(child.parentSpanId!) === attempt);
      assert.ok(child.startNs >= attempt.startNs && child.endNs <= attempt.endNs, child.name);
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
