/**
 * W3C trace context for runs: trace and span ids, and the `traceparent`
 * header (`00-<32 hex trace id>-<16 hex span id>-01`) that carries them to
 * agents and into each step's environment as `TRACEPARENT`.
 *
 * The spans a run is made of are named by ids derived from the run's trace
 * id (the run span from its round, an attempt's span from its attempt id):
 * whichever process emits a span — the scheduler that placed an attempt,
 * its successor after a failover, the agent that ran it — names it the same
 * without asking anyone.
 *
 * @module
 */

import { randomHex, sha256Hex } from "../../core/_bytes.ts";

/** Where a span sits in its trace: the trace and the span a child hangs under. */
export interface TraceParent {
  /** 32 lower-case hex digits, not all zero. */
  traceId: string;
  /** 16 lower-case hex digits, not all zero. */
  spanId: string;
}

/** The environment variable a step finds its trace context in (W3C, as OpenTelemetry SDKs read it). */
export const TRACEPARENT_ENV = "TRACEPARENT";

const TRACEPARENT = /^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$/;
const ZERO_TRACE = "0".repeat(32);
const ZERO_SPAN = "0".repeat(16);

/** A new random trace id. */
export function newTraceId(): string {
  for (;;) {
    const id = randomHex(16);
    if (id !== ZERO_TRACE) return id;
  }
}

/** A new random span id. */
export function newSpanId(): string {
  for (;;) {
    const id = randomHex(8);
    if (id !== ZERO_SPAN) return id;
  }
}

/**
 * A span id derived from `parts` within a trace: the same parts always
 * name the same span.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { derivedSpanId } from "./context.ts";
 * const trace = "4bf92f3577b34da6a3ce929d0e0e4736";
 * assert.equal(derivedSpanId(trace, "attempt", "r/a/1"), derivedSpanId(trace, "attempt", "r/a/1"));
 * assert.notEqual(derivedSpanId(trace, "attempt", "r/a/1"), derivedSpanId(trace, "attempt", "r/a/2"));
 * assert.match(derivedSpanId(trace, "run", "1"), /^[0-9a-f]{16}$/);
 * ```
 */
export function derivedSpanId(traceId: string, ...parts: string[]): string {
  const id = sha256Hex([traceId, ...parts].join("\u0000")).slice(0, 16);
  // One chance in 2^64; the all-zero id is invalid, so it is nudged.
  return id === ZERO_SPAN ? "0000000000000001" : id;
}

/**
 * The trace id of a run that has none recorded (a run from before traces):
 * derived from its run id, so every process agrees on it.
 */
export function derivedTraceId(runId: string): string {
  const id = sha256Hex(`runnel-trace\u0000${runId}`).slice(0, 32);
  return id === ZERO_TRACE ? "00000000000000000000000000000001" : id;
}

/** The trace id a run's record names, or the one derived from its run id. */
export function traceIdOfRun(run: { runId: string; traceId?: string }): string {
  return run.traceId && isTraceId(run.traceId) ? run.traceId : derivedTraceId(run.runId);
}

/** Whether `text` is a valid trace id (32 lower-case hex digits, not all zero). */
export function isTraceId(text: string): boolean {
  return /^[0-9a-f]{32}$/.test(text) && text !== ZERO_TRACE;
}

/**
 * The `traceparent` of a span (always sampled: runnel exports every span
 * it records).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { formatTraceparent, parseTraceparent } from "./context.ts";
 * const parent = { traceId: "4bf92f3577b34da6a3ce929d0e0e4736", spanId: "00f067aa0ba902b7" };
 * const header = formatTraceparent(parent);
 * assert.equal(header, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
 * assert.deepEqual(parseTraceparent(header), parent);
 * assert.equal(parseTraceparent("00-" + "0".repeat(32) + "-00f067aa0ba902b7-01"), undefined);
 * ```
 */
export function formatTraceparent(parent: TraceParent): string {
  return `00-${parent.traceId}-${parent.spanId}-01`;
}

/**
 * Reads a `traceparent` (version 00); undefined for anything else, such as
 * all-zero ids: a context from the wire is checked before it is trusted.
 */
export function parseTraceparent(text: string | undefined): TraceParent | undefined {
  if (typeof text !== "string" || text.length !== 55) return undefined;
  const match = TRACEPARENT.exec(text);
  if (!match || match[1] === ZERO_TRACE || match[2] === ZERO_SPAN) return undefined;
  return { traceId: match[1], spanId: match[2] };
}

/** The span id of a run's span in its round (round 1 is the trace's root). */
export function runSpanId(traceId: string, round: number): string {
  return derivedSpanId(traceId, "run", String(Math.max(1, round)));
}

/** The span id of a step attempt's span. */
export function attemptSpanId(traceId: string, attemptId: string): string {
  return derivedSpanId(traceId, "attempt", attemptId);
}
