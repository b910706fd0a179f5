import assert from "node:assert/strict";
import { PipelineError } from "../../core/errors.ts";
import { ParseTimeoutError, PipelineParser } from "./parse_worker.ts";

/** A pipeline of `count` tiny steps: seconds of parsing for a large count. */
function manySteps(count: number): string {
  const steps = Array.from({ length: count }, (_, i) => `  s${i}: { backend: shell, run: "true" }`);
  return `name: large\nsteps:\n${steps.join("\n")}\n`;
}

Deno.test("parser: a large pipeline parses in the worker while this event loop runs on", async () => {
  const parser = new PipelineParser();
  try {
    let ticks = 0;
    const ticker = setInterval(() => ticks++, 1);
    const plan = await parser.parse({
      source: manySteps(20_000),
      file: "large.yaml",
      baseDir: "/",
    });
    clearInterval(ticker);
    assert.equal(plan.order.length, 20_000);
    // On this thread the parse would have held every timer until it ended.
    assert.ok(ticks > 2, `timers ran during the parse (${ticks} ticks)`);
  } finally {
    parser.close();
  }
});

Deno.test("parser: problems come back located; a parse past the limit is refused and the next one works", async () => {
  const parser = new PipelineParser();
  try {
    await assert.rejects(
      parser.parse({
        source: "name: x\nsteps:\n  a: { neds: [] }\n",
        file: "x.yaml",
        baseDir: "/",
      }),
      (error) =>
        error instanceof PipelineError && error.diagnostics.some((d) => d.file === "x.yaml"),
    );
    await assert.rejects(
      parser.parse({ source: manySteps(50_000), file: "huge.yaml", baseDir: "/" }, {
        timeoutMs: 20,
      }),
      ParseTimeoutError,
    );
    const small = await parser.parse({
      source: "name: y\nsteps:\n  a: { backend: shell, run: 'true' }\n",
      file: "y.yaml",
      baseDir: "/",
    });
    assert.deepEqual(small.order, ["a"]);
  } finally {
    parser.close();
  }
});
