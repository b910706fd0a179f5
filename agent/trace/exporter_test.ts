import assert from "node:assert/strict";
import { openTracer, type SpanData } from "./exporter.ts";
import { newSpanId, newTraceId } from "./context.ts";

/** A collector on loopback answering each request with the next status of `statuses` (then 200). */
function collector(statuses: number[]) {
  const bodies: Array<{ resourceSpans: Array<{ scopeSpans: Array<{ spans: unknown[] }> }> }> = [];
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (request) => {
    bodies.push(await request.json());
    const status = statuses.shift() ?? 200;
    return new Response(status === 200 ? "{}" : "no", { status });
  });
  return {
    url: `http://127.0.0.1:${server.addr.port}/v1/traces`,
    bodies,
    spans: () => bodies.flatMap((body) => body.resourceSpans[0].scopeSpans[0].spans),
    close: () => server.shutdown(),
  };
}

function span(name: string): SpanData {
  return { traceId: newTraceId(), spanId: newSpanId(), name, startMs: 1_000, endMs: 2_000.25 };
}

Deno.test("a batch the collector refuses with 503 is sent again, and then exported", async () => {
  const target = collector([503, 503]);
  const tracer = openTracer({ endpoint: target.url, retryDelayMs: 1, delayMs: 1 });
  try {
    tracer.record(span("a"));
    tracer.record({ ...span("b"), error: "boom", attributes: { n: 3, x: 0.5, ok: false } });
    await tracer.flush();
    assert.deepEqual(tracer.stats, { exported: 2, dropped: 0, failedRequests: 2 });
    assert.equal(target.bodies.length, 3);
    const [a, b] = target.spans() as Array<Record<string, unknown>>;
    assert.equal(a.startTimeUnixNano, "1000000000");
    assert.equal(a.endTimeUnixNano, "2000250000");
    assert.deepEqual(a.status, {});
    assert.deepEqual(b.status, { code: 2, message: "boom" });
    assert.deepEqual(b.attributes, [
      { key: "n", value: { intValue: "3" } },
      { key: "x", value: { doubleValue: 0.5 } },
      { key: "ok", value: { boolValue: false } },
    ]);
    const resource = target.bodies[0].resourceSpans[0] as unknown as {
      resource: { attributes: unknown[] };
    };
    assert.deepEqual(resource.resource.attributes, [
      { key: "service.name", value: { stringValue: "runnel" } },
    ]);
  } finally {
    await tracer.shutdown();
    await target.close();
  }
});

Deno.test("a batch refused for good (400) is dropped at once, and said once", async () => {
  const target = collector([400, 400]);
  const errors: string[] = [];
  const tracer = openTracer({
    endpoint: target.url,
    retryDelayMs: 1,
    delayMs: 1,
    maxBatch: 1,
    onError: (message) => errors.push(message),
  });
  try {
    tracer.record(span("a"));
    tracer.record(span("b"));
    await tracer.flush();
    assert.equal(target.bodies.length, 2, "no retry");
    assert.equal(tracer.stats.dropped, 2);
    assert.equal(errors.length, 1);
    assert.match(
      errors[0],
      /^1 span\(s\) not exported to http:\/\/127\.0\.0\.1:\d+\/v1\/traces: .*400/,
    );
  } finally {
    await tracer.shutdown();
    await target.close();
  }
});

Deno.test("the queue is bounded: spans past it are dropped and counted; batches are split", async () => {
  const target = collector([]);
  const tracer = openTracer({ endpoint: target.url, maxQueue: 10, maxBatch: 4, delayMs: 60_000 });
  try {
    // Four fill a batch, which leaves at once; the rest wait in the queue.
    for (let i = 0; i < 30; i++) tracer.record(span(`s${i}`));
    await tracer.flush();
    const { exported, dropped } = tracer.stats;
    assert.equal(exported + dropped, 30);
    assert.ok(dropped >= 30 - 10 - 4, `dropped ${dropped}`);
    assert.ok(target.bodies.every((body) => body.resourceSpans[0].scopeSpans[0].spans.length <= 4));
  } finally {
    await tracer.shutdown();
    await target.close();
  }
});

Deno.test("a span recorded after shutdown is dropped", async () => {
  const tracer = openTracer({ endpoint: "http://127.0.0.1:1/v1/traces" });
  await tracer.shutdown();
  tracer.record(span("late"));
  assert.equal(tracer.stats.dropped, 1);
});

Deno.test("a stopping process does not wait out a backoff when the collector is down", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const closedPort = (listener.addr as Deno.NetAddr).port;
  listener.close();
  const errors: string[] = [];
  const tracer = openTracer({
    endpoint: `http://127.0.0.1:${closedPort}/v1/traces`,
    maxBatch: 1,
    delayMs: 60_000,
    // A backoff this long (capped at 5 s) would run into shutdown's deadline below, which would
    // cut the tries short.
    retryDelayMs: 60_000,
    onError: (message) => errors.push(message),
  });
  for (const name of ["a", "b", "c"]) tracer.record(span(name));
  await tracer.shutdown({ timeoutMs: 4_000 });
  // Each batch tried twice, back to back, then dropped; said once.
  assert.deepEqual(tracer.stats, { exported: 0, dropped: 3, failedRequests: 6 });
  assert.equal(errors.length, 1);
});
