import assert from "node:assert/strict";
import {
  attemptSpanId,
  derivedTraceId,
  newSpanId,
  newTraceId,
  parseTraceparent,
  runSpanId,
  traceIdOfRun,
} from "./context.ts";

Deno.test("a traceparent from the wire is checked before it is trusted", () => {
  const trace = "4bf92f3577b34da6a3ce929d0e0e4736";
  const span = "00f067aa0ba902b7";
  assert.deepEqual(parseTraceparent(`00-${trace}-${span}-01`), { traceId: trace, spanId: span });
  assert.deepEqual(parseTraceparent(`00-${trace}-${span}-00`), { traceId: trace, spanId: span });
  for (
    const hostile of [
      "",
      undefined,
      `01-${trace}-${span}-01`, // an unknown version
      `00-${trace.toUpperCase()}-${span}-01`,
      `00-${"0".repeat(32)}-${span}-01`, // invalid ids
      `00-${trace}-${"0".repeat(16)}-01`,
      `00-${trace}-${span}-01\nX-Injected: 1`,
      `00-${trace}-${span}-01 `,
      `00-${trace}-${span}`,
      `00-${trace}${span}-01`,
      "00-" + "g".repeat(32) + `-${span}-01`,
      "x".repeat(1_000_000),
    ]
  ) {
    assert.equal(parseTraceparent(hostile), undefined, JSON.stringify(hostile?.slice(0, 80)));
  }
});

Deno.test("ids: random ones are valid, derived ones are stable and distinct", () => {
  assert.match(newTraceId(), /^[0-9a-f]{32}$/);
  assert.match(newSpanId(), /^[0-9a-f]{16}$/);
  const trace = newTraceId();
  assert.equal(attemptSpanId(trace, "r/a/1"), attemptSpanId(trace, "r/a/1"));
  assert.notEqual(attemptSpanId(trace, "r/a/1"), attemptSpanId(newTraceId(), "r/a/1"));
  assert.notEqual(runSpanId(trace, 1), runSpanId(trace, 2));
  // A run recorded before traces gets one derived from its id; a bad stored id is not used.
  assert.equal(traceIdOfRun({ runId: "r1" }), derivedTraceId("r1"));
  assert.equal(traceIdOfRun({ runId: "r1", traceId: "nope" }), derivedTraceId("r1"));
  assert.equal(traceIdOfRun({ runId: "r1", traceId: trace }), trace);
});
