import assert from "node:assert/strict";
import { CORE_SCHEMA, load } from "npm:js-yaml@4.1.0";
import { PipelineSchema } from "./schema.ts";
import { parsePipelineFast } from "./_fast_schema.ts";

const yaml = (text: string): unknown => load(text, { schema: CORE_SCHEMA, json: false });

/** What zod gives, as JSON (key order included), or undefined when it refuses. */
function viaZod(raw: unknown): string | undefined {
  const parsed = PipelineSchema.safeParse(raw);
  return parsed.success ? JSON.stringify(sortedSteps(parsed.data)) : undefined;
}

/** A pipeline with each step's keys sorted (the fast schema keeps a step's own order). */
function sortedSteps(pipeline: unknown): unknown {
  const { steps, ...rest } = pipeline as { steps: Record<string, Record<string, unknown>> };
  const sorted: Record<string, unknown> = {};
  for (const [name, step] of Object.entries(steps)) {
    sorted[name] = Object.fromEntries(Object.entries(step).sort(([a], [b]) => a < b ? -1 : 1));
  }
  // `steps` is the schema's last key.
  return { ...rest, steps: sorted };
}

Deno.test("the fast schema gives what zod gives (a step's own keys as written)", () => {
  const sources = [
    "name: a\nsteps:\n  a: { run: x }\n  b: { needs: a, run: y }\n",
    // Keys out of the schema's order, nested objects zod rebuilds, values zod checks.
    `name: b
description: d
defaults: { retry: { on: [application], max: 2 }, timeout: 10m, env: { A: 1 } }
env: { X: 1 }
steps:
  a:
    run: x
    needs: [b]
    permissions: { write: [o], read: [i] }
    outputs: [o.txt, { retention: 1d, name: p.txt }]
    env: { B: true }
    timeout: 5s
    retry: { max: 3, backoff: 1s }
    matrix: { x: [1, 2] }
    args: [a, b]
    cache: true
    backend: shell
  b: { module: ./m.ts, inputs: { i: a/o.txt }, when: "\${{ always() }}" }
  c: { foreach: { input: a/o.txt, key: id }, run: echo }
`,
  ];
  for (const examples of ["energy/pipeline.yaml", "fanout/pipeline.yaml", "batch/pipeline.yaml"]) {
    sources.push(Deno.readTextFileSync(new URL(`../examples/${examples}`, import.meta.url)));
  }
  for (const source of sources) {
    const expected = viaZod(yaml(source));
    assert.ok(expected !== undefined);
    assert.equal(JSON.stringify(sortedSteps(parsePipelineFast(yaml(source)))), expected);
  }
  // A step zod would copy unchanged is kept, and so are the steps when all of them are.
  const raw = yaml("name: a\nsteps:\n  a: { run: x, needs: [b] }\n  b: { run: y }\n") as {
    steps: unknown;
  };
  assert.equal(parsePipelineFast(raw)?.steps, raw.steps);
});

Deno.test("the fast schema has a doubt wherever zod refuses", () => {
  const wrong = [
    "name: a\nsteps: {}\n",
    "name: a b\nsteps:\n  a: { run: x }\n",
    "name: a\nsteps:\n  1a: { run: x }\n",
    "name: a\nsteps:\n  a: { run: 1 }\n",
    "name: a\nsteps:\n  a: { run: x, needs: [1] }\n",
    "name: a\nsteps:\n  a: { run: x, cache: yes please }\n",
    "name: a\nsteps:\n  a: { run: x, tiemout: 5s }\n",
    "name: a\nsteps:\n  a: { run: x, timeout: ten minutes }\n",
    "name: a\nsteps:\n  a: { run: x, outputs: [../x] }\n",
    "name: a\nsteps:\n  a: { run: x, args: [1] }\n",
    "name: a\nsteps:\n  a: { run: x, permissions: { exec: [y] } }\n",
    "name: a\nsteps:\n  a: null\n",
    "name: a\nsteps:\n  a: [run]\n",
    "name: a\nunknown: 1\nsteps:\n  a: { run: x }\n",
    "name: a\nsteps:\n  a: { image: x, services: [{ name: a, image: y }] }\n",
  ];
  for (const source of wrong) {
    assert.equal(viaZod(yaml(source)), undefined, source);
    assert.equal(parsePipelineFast(yaml(source)), undefined, source);
  }
  // Services are left to zod (their secrets are checked across the step), valid or not.
  const services = "name: a\nsteps:\n  a: { image: x, services: [{ name: db, image: y }] }\n";
  assert.ok(viaZod(yaml(services)) !== undefined);
  assert.equal(parsePipelineFast(yaml(services)), undefined);
});
