import assert from "node:assert/strict";
import { parsePipeline } from "./load.ts";
import { PipelineError } from "./errors.ts";
import { coerceParam } from "./params.ts";

const PIPELINE = `name: p
params:
  count: { type: number, default: 3 }
  target: { type: string, required: true }
  fast: { type: boolean, default: false }
  region: { type: enum, values: [eu, us], default: eu }
steps:
  build:
    backend: docker
    image: "app:\${{ params.target }}"
    args: [--count, "\${{ params.count }}"]
    selector: { region: "\${{ params.region }}" }
    env: { FAST: "\${{ params.fast }}" }
  deploy:
    needs: [build]
    run: deploy --to "\${{ params.target }}" --count \${{ params.count }}
    matrix: { zone: [a, "\${{ params.region }}-b"] }
  other:
    run: echo unrelated
`;

function plan(params?: Record<string, unknown>) {
  return parsePipeline(PIPELINE, { file: "p.yaml", baseDir: "/tmp", params });
}

function problems(source: string, params?: Record<string, unknown>): string[] {
  try {
    parsePipeline(source, { file: "p.yaml", baseDir: "/tmp", params });
  } catch (error) {
    if (error instanceof PipelineError) {
      return error.diagnostics.map((d) => `${d.line}:${d.col} ${d.message}`);
    }
    throw error;
  }
  return [];
}

Deno.test("params: values are typed, defaults applied, and used in every place a step takes", () => {
  const planned = plan({ target: "prod", count: "7", region: "us" });
  assert.deepEqual(planned.params, { count: 7, target: "prod", fast: false, region: "us" });
  const build = planned.steps.build;
  assert.equal(build.config.image, "app:prod");
  assert.deepEqual(build.config.args, ["--count", "7"]);
  assert.deepEqual(build.selector, { region: "us" });
  assert.equal(build.env.FAST, "false");
  // In a run script, an env var reference: the value is data, never script text.
  const deploy = planned.steps["deploy[zone=a]"];
  assert.equal(
    deploy.config.run,
    'deploy --to "${RUNNEL_PARAM_TARGET}" --count ${RUNNEL_PARAM_COUNT}',
  );
  assert.equal(deploy.env.RUNNEL_PARAM_TARGET, "prod");
  assert.equal(deploy.env.RUNNEL_PARAM_COUNT, "7");
  assert.ok(planned.steps["deploy[zone=us-b]"], Object.keys(planned.steps).join(","));
});

Deno.test("params: a value is part of the spec of the steps it affects, and of no other", () => {
  const a = plan({ target: "prod" });
  const b = plan({ target: "staging" });
  assert.notEqual(a.steps["deploy[zone=a]"].specDigest, b.steps["deploy[zone=a]"].specDigest);
  assert.notEqual(a.steps.build.specDigest, b.steps.build.specDigest);
  assert.equal(a.steps.other.specDigest, b.steps.other.specDigest);
});

Deno.test("params: bad values, missing required ones and unknown names are located errors", () => {
  assert.deepEqual(problems(PIPELINE, { target: "x", count: "abc" }), [
    '3:10 expected a number for "count", got "abc"',
  ]);
  assert.deepEqual(problems(PIPELINE, { target: "x", region: "asia" }), [
    '6:11 expected one of "eu", "us" for "region", got "asia"',
  ]);
  assert.deepEqual(problems(PIPELINE, { target: "x", fast: "maybe" }), [
    '5:9 expected true or false for "fast", got "maybe"',
  ]);
  assert.deepEqual(problems(PIPELINE, {}), [
    '4:11 parameter "target" is required: give it with --param target=VALUE',
  ]);
  assert.match(problems(PIPELINE, { target: "x", tagret: "y" })[0], /"tagret" was given/);
  // A validate gives no values: required ones may be missing, references must still exist.
  assert.deepEqual(problems(PIPELINE), []);
  const typo = PIPELINE.replace("--count ${{ params.count }}", "--count ${{ params.cuont }}");
  assert.deepEqual(problems(typo), [
    '16:10 "${{ params.cuont }}" names no parameter of the pipeline ' +
    '(it declares "count", "target", "fast", "region")',
  ]);
});

Deno.test("params: declarations are checked", () => {
  const bad = `name: p
params:
  a: { type: enum }
  b: { type: number, default: "x" }
  c: { type: string, default: "y", required: true }
  d: { type: string, values: [x] }
  D: { type: string }
steps:
  s: { run: "true" }
`;
  const found = problems(bad).join("\n");
  assert.match(found, /"a" is an enum without "values"/);
  assert.match(found, /default of parameter "b" is not a number/);
  assert.match(found, /"c" is required and has a default/);
  assert.match(found, /"d" has "values" but is not an enum/);
  assert.match(found, /"d" and "D" differ only in case/);
});

Deno.test("params: coercion of text and JSON values", () => {
  assert.deepEqual(coerceParam("n", { type: "number" }, "2.5"), { value: 2.5 });
  assert.deepEqual(coerceParam("n", { type: "number" }, 4), { value: 4 });
  assert.ok("problem" in coerceParam("n", { type: "number" }, ""));
  assert.ok("problem" in coerceParam("n", { type: "number" }, "Infinity"));
  assert.deepEqual(coerceParam("b", { type: "boolean" }, "YES"), { value: true });
  assert.deepEqual(coerceParam("s", { type: "string" }, 3), { value: "3" });
  assert.deepEqual(coerceParam("e", { type: "enum", values: [1, 2] }, "2"), { value: 2 });
  assert.ok("problem" in coerceParam("s", { type: "string" }, { a: 1 }));
});

Deno.test("params: a plan made without a required value names it, and does not run", async () => {
  const { unresolvedParams } = await import("./params.ts");
  const { runPipeline } = await import("../agent/local/mod.ts");
  const planned = plan();
  assert.deepEqual(unresolvedParams(planned.steps), ["target"]);
  assert.deepEqual(unresolvedParams(plan({ target: "x" }).steps), []);
  await assert.rejects(runPipeline(planned), /required parameters "target"/);
});

Deno.test("params: runPipeline(plan, { params }) plans the file again with them", async () => {
  const { runPipeline } = await import("../agent/local/mod.ts");
  const { loadPipeline } = await import("./load.ts");
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(
      `${dir}/p.yaml`,
      'name: lib\nparams:\n  who: { type: string, required: true }\nsteps:\n  s:\n    run: echo "${{ params.who }}" > "$RUNNEL_OUTPUT_OUT_TXT"\n    outputs: [out.txt]\n',
    );
    const plan = await loadPipeline(`${dir}/p.yaml`);
    const summary = await runPipeline(plan, {
      params: { who: "library" },
      stateDir: `${dir}/.runnel`,
    });
    assert.equal(summary.status, "succeeded");
    await assert.rejects(
      runPipeline(plan, { params: { who: 3, extra: 1 }, stateDir: `${dir}/.runnel` }),
      /"extra" was given/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
