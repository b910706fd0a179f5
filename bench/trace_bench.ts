/**
 * What tracing costs a local run: the same no-op shell steps without a
 * tracer (the anchor), exporting to an OTLP receiver on loopback, and
 * exporting to a collector that is down (a closed port). Each is run
 * several times, interleaved in a rotating order after an unmeasured
 * warm-up run, and summarised by its median; the tracer is
 * shut down inside the measured time (as `runnel run` does).
 *
 * Run with `deno task bench` (or this file alone).
 *
 * @module
 */

import { parsePipeline, runPipeline } from "../mod.ts";
import { openTracer, type Tracer } from "../agent/trace/exporter.ts";
import { newSpanId } from "../agent/trace/context.ts";
import { RunTrace } from "../agent/trace/run_spans.ts";
import type { Plan, RunState } from "../core/model.ts";
import { median, printTable } from "./_table.ts";

/** No-op shell steps with and without traces exported. */
export async function benchTraces(count = 200, rounds = 9): Promise<void> {
  const dir = await Deno.realPath(await Deno.makeTempDir({ prefix: "runnel-bench-" }));
  let spans = 0;
  const receiver = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (req) => {
    const body = await req.json();
    for (const resource of body.resourceSpans) {
      for (const scope of resource.scopeSpans) spans += scope.spans.length;
    }
    return Response.json({});
  });
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const closedPort = (listener.addr as Deno.NetAddr).port;
  listener.close();
  try {
    const steps = Array.from(
      { length: count },
      (_, i) => `  s${i}: { backend: shell, run: "true" }`,
    ).join("\n");
    const plan = parsePipeline(`name: traced\nconcurrency: 2\nsteps:\n${steps}\n`, {
      file: `${dir}/pipeline.yaml`,
      baseDir: dir,
    });
    const variants: Array<[string, () => Tracer | undefined]> = [
      ["no tracer (anchor)", () => undefined],
      [
        "OTLP receiver on loopback",
        () => openTracer({ endpoint: `http://127.0.0.1:${receiver.addr.port}/v1/traces` }),
      ],
      [
        "collector down (closed port)",
        () => openTracer({ endpoint: `http://127.0.0.1:${closedPort}/v1/traces` }),
      ],
    ];
    const samples = new Map<string, number[]>(variants.map(([name]) => [name, []]));
    let run = 0;
    // Unmeasured: the first run of a process pays for compiling and warming what all share.
    await runPipeline(plan, { stateDir: `${dir}/state-warm` });
    for (let round = 0; round < rounds; round++) {
      // Each round in another order: a variant is not always the one after the same other.
      const order = variants.map((_, i) => variants[(i + round) % variants.length]);
      for (const [name, open] of order) {
        const tracer = open();
        const started = performance.now();
        const summary = await runPipeline(plan, {
          stateDir: `${dir}/state-${run++}`,
          ...(tracer ? { tracer } : {}),
        });
        await tracer?.shutdown();
        samples.get(name)!.push(performance.now() - started);
        if (summary.status !== "succeeded") throw new Error(`traced run ${summary.status}`);
      }
    }
    const anchor = median(samples.get(variants[0][0])!);
    printTable(
      `${count} no-op shell steps, concurrency 2, median of ${rounds} (spans: ${spans} received)`,
      variants.map(([name]) => {
        const ms = median(samples.get(name)!);
        return {
          what: name,
          total_ms: ms.toFixed(0),
          per_step_ms: (ms / count).toFixed(2),
          overhead_ms_per_step: ((ms - anchor) / count).toFixed(3),
          ratio: (ms / anchor).toFixed(2),
        };
      }),
    );
  } finally {
    await receiver.shutdown();
    await Deno.remove(dir, { recursive: true });
  }
}

/**
 * The tracing work itself, without the noise of spawning steps: the spans
 * of `count` attempts (step, queue wait and three stages) recorded and
 * exported to a receiver on loopback, against the same loop recording
 * nothing (the anchor).
 */
export async function benchSpanCost(count = 20_000): Promise<void> {
  let spans = 0;
  const receiver = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (req) => {
    const body = await req.json();
    for (const resource of body.resourceSpans) {
      for (const scope of resource.scopeSpans) spans += scope.spans.length;
    }
    return Response.json({});
  });
  try {
    const steps: RunState["steps"] = {};
    const plan = { steps: {} } as Plan;
    for (let i = 0; i < count; i++) {
      const id = `s${i}`;
      steps[id] = {
        id,
        status: "succeeded",
        attemptsThisRound: 1,
        attempts: [{
          attemptId: `r/${id}/1`,
          attempt: 1,
          scheduledAt: 1_000,
          startedAt: 1_001,
          endedAt: 1_010,
          worker: "local",
          result: { ok: true, exitCode: 0, outputs: {} },
        }],
      };
      (plan.steps as Record<string, unknown>)[id] = { name: id, backend: "shell" };
    }
    const state = { runId: "r", pipeline: "p", status: "succeeded", createdAt: 0, round: 1, steps };
    const measure = async (tracer: Tracer | undefined) => {
      const trace = new RunTrace({ runId: "r", pipeline: "p" }, tracer);
      const started = performance.now();
      for (let i = 0; i < count; i++) {
        const attemptId = `r/s${i}/1`;
        trace.queueWait(state as RunState, `s${i}`, attemptId, 1_001, "local");
        const parent = trace.attemptParent(attemptId);
        for (const name of ["fetch inputs", "execute", "upload outputs"]) {
          tracer?.record({
            traceId: parent.traceId,
            spanId: newSpanId(),
            parentSpanId: parent.spanId,
            name,
            startMs: 1_001,
            endMs: 1_009,
            attributes: { "runnel.run.id": "r", "runnel.step.id": `s${i}`, "runnel.attempt": 1 },
          });
        }
        trace.attemptEnded(plan, state as RunState, `s${i}`, attemptId);
      }
      await tracer?.shutdown({ timeoutMs: 60_000 });
      return performance.now() - started;
    };
    const anchorMs = await measure(undefined);
    // Big enough a queue that nothing is dropped: this measures the work, not the bound.
    const tracer = openTracer({
      endpoint: `http://127.0.0.1:${receiver.addr.port}/v1/traces`,
      maxQueue: count * 5,
    });
    const tracedMs = await measure(tracer);
    printTable(`spans of ${count} attempts (5 each), recorded and exported to loopback`, [
      {
        what: "no tracer (anchor)",
        total_ms: anchorMs.toFixed(0),
        us_per_attempt: (anchorMs / count * 1000).toFixed(1),
        ratio: "1.00",
      },
      {
        what: `exported (${spans} spans received, ${tracer.stats.dropped} dropped)`,
        total_ms: tracedMs.toFixed(0),
        us_per_attempt: (tracedMs / count * 1000).toFixed(1),
        ratio: (tracedMs / anchorMs).toFixed(2),
      },
    ]);
  } finally {
    await receiver.shutdown();
  }
}

if (import.meta.main) {
  await benchSpanCost();
  await benchTraces();
}
