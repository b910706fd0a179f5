import assert from "node:assert/strict";
import { definePipeline } from "./define.ts";
import { type Diagnostic, formatDiagnostic, PipelineError } from "./errors.ts";
import { parsePipeline } from "./load.ts";
import type { PipelineFile } from "./schema.ts";

const dir = Deno.makeTempDirSync({ prefix: "runnel_define_test_" });
Deno.mkdirSync(`${dir}/steps`);
Deno.writeTextFileSync(`${dir}/steps/analyze.ts`, "export default () => {};\n");

/** The diagnostics `definePipeline` throws for a pipeline (typed loosely, as from JavaScript). */
function problems(pipeline: unknown, name = "demo"): Diagnostic[] {
  try {
    definePipeline(pipeline as PipelineFile, { baseDir: dir, name });
  } catch (error) {
    assert.ok(error instanceof PipelineError, String(error));
    return error.diagnostics;
  }
  assert.fail("expected a PipelineError");
}

const ENERGY: PipelineFile = {
  name: "energy-report",
  defaults: { backend: "docker", timeout: "10m", retry: { max: 2, backoff: "2s" } },
  env: { LEVEL: 3 },
  steps: {
    generate: {
      image: "runnel/python:local",
      run: "python gen.py --size ${{ matrix.size }}",
      outputs: ["energy.csv"],
      matrix: { size: [1, 2] },
    },
    analyze: {
      needs: ["generate"],
      backend: "deno",
      module: "./steps/analyze.ts",
      inputs: { data: "generate/energy.csv" },
      outputs: ["summary.json"],
    },
    report: {
      needs: ["analyze"],
      backend: "ssh",
      host: "reports.internal",
      run: "./make-report.sh",
      inputs: { summary: "analyze/summary.json" },
    },
  },
};

const ENERGY_YAML = `name: energy-report
defaults: { backend: docker, timeout: 10m, retry: { max: 2, backoff: 2s } }
env: { LEVEL: 3 }
steps:
  generate:
    image: runnel/python:local
    run: python gen.py --size \${{ matrix.size }}
    outputs: [energy.csv]
    matrix: { size: [1, 2] }
  analyze:
    needs: [generate]
    backend: deno
    module: ./steps/analyze.ts
    inputs: { data: generate/energy.csv }
    outputs: [summary.json]
  report:
    needs: [analyze]
    backend: ssh
    host: reports.internal
    run: ./make-report.sh
    inputs: { summary: analyze/summary.json }
`;

Deno.test("a pipeline defined in code plans as the same pipeline in YAML", () => {
  const defined = definePipeline(ENERGY, { baseDir: dir });
  const parsed = parsePipeline(ENERGY_YAML, { file: "pipeline.yaml", baseDir: dir });
  const withoutSource = (plan: typeof defined) =>
    Object.values(plan.steps).map(({ source: _, ...step }) => step);
  assert.deepEqual(withoutSource(defined), withoutSource(parsed));
  assert.deepEqual(defined.order, parsed.order);
  assert.deepEqual(defined.order, [
    "generate[size=1]",
    "generate[size=2]",
    "analyze",
    "report",
  ]);
  assert.deepEqual(defined.env, { LEVEL: "3" });
  assert.equal(defined.baseDir, dir);
  assert.equal(defined.name, "energy-report");
  // No file: the plan is named after the pipeline, its steps have no position.
  assert.equal(defined.file, "energy-report");
  assert.deepEqual(defined.steps.analyze.source, { file: "energy-report", line: 0, col: 0 });
  assert.equal(definePipeline(ENERGY, { baseDir: dir, name: "energy.ts" }).file, "energy.ts");
});

Deno.test("equal definitions have equal digests, and the plan is a copy", () => {
  const pipeline: PipelineFile = {
    name: "x",
    env: { A: "1" },
    steps: { a: { run: "echo hi", env: { B: "2" } } },
  };
  const plan = definePipeline(pipeline);
  const reordered = definePipeline({ steps: pipeline.steps, env: { A: "1" }, name: "x" });
  assert.equal(plan.digest, reordered.digest);
  assert.match(plan.digest, /^[0-9a-f]{64}$/);
  pipeline.steps.a.run = "rm -rf /";
  pipeline.env!.A = "changed";
  assert.equal(plan.steps.a.config.run, "echo hi");
  assert.deepEqual(plan.env, { A: "1" });
  assert.notEqual(definePipeline(pipeline).digest, plan.digest);
});

Deno.test("problems are located by key path and name the key and what was expected", () => {
  const found = problems({
    name: "demo",
    secrets: { TOKEN: { env: "TOK" } },
    steps: {
      generate: { run: "echo", outputs: ["energy.csv"] },
      analyze: {
        run: "echo",
        needs: ["generat"],
        neds: ["generate"],
        timeout: "ten minutes",
        secrets: ["TOKN"],
        inputs: { data: "generate/energy.cvs" },
      },
      lint: { backend: "dockr", image: "x" },
      test: { backend: "deno" },
    },
  });
  // In the order of the definition's keys.
  assert.deepEqual(found.map((d) => [d.code, d.path, d.line, d.col]), [
    ["unknown_step", "steps.analyze.needs[0]", 0, 0],
    ["unknown_key", "steps.analyze.neds", 0, 0],
    ["invalid_value", "steps.analyze.timeout", 0, 0],
    ["unknown_secret", "steps.analyze.secrets[0]", 0, 0],
    ["unknown_output", "steps.analyze.inputs.data", 0, 0],
    ["unknown_backend", "steps.lint.backend", 0, 0],
    ["missing_key", "steps.test.module", 0, 0],
  ]);
  assert.deepEqual(found.map(formatDiagnostic), [
    'demo: steps.analyze.needs[0]: step "analyze" needs unknown step "generat" — did you mean "generate"?',
    'demo: steps.analyze.neds: unknown key "neds" in step "analyze" — did you mean "needs"?',
    'demo: steps.analyze.timeout: Expected a duration like "10m" for "timeout", got "ten minutes" in step "analyze"',
    'demo: steps.analyze.secrets[0]: step "analyze" uses undeclared secret "TOKN" — did you mean "TOKEN"?',
    'demo: steps.analyze.inputs.data: input "data" of step "analyze" names output "energy.cvs" that step "generate" does not declare — did you mean "energy.csv"?',
    'demo: steps.lint.backend: unknown backend "dockr" for step "lint" — did you mean "docker"?',
    'demo: steps.test.module: missing required key "module" in step "test" (backend deno)',
  ]);
  assert.equal(found[6].key, "module");
  assert.match(found[5].expected!, /deno, shell, docker/);
});

Deno.test("types, missing keys and cycles in code", () => {
  const found = problems({ steps: { a: { run: 3, needs: "b" }, b: { run: "x", needs: ["a"] } } });
  assert.deepEqual(found.map((d) => [d.code, d.path, d.key, d.expected]), [
    ["missing_key", "name", "name", "string"],
    ["cycle", "steps.a", undefined, undefined],
    ["invalid_type", "steps.a.run", "run", "string"],
  ]);
  assert.equal(found[1].message, "cycle between steps: b → a → b");
  assert.equal(found[2].message, 'expected string for "run" in step "a", got number 3');
  assert.equal(
    formatDiagnostic(found[0]),
    'demo: name: missing required key "name" at the top level',
  );
});

Deno.test("values JSON cannot hold are reported at their key path", () => {
  const cyclic: Record<string, unknown> = { depth: 1 };
  cyclic.self = cyclic;
  const found = problems({
    name: "demo",
    steps: {
      a: { backend: "lambda", with: { fn: () => 1, when: new Date(0), n: NaN, cyclic } },
      b: { run: "x", needs: [undefined] },
    },
  });
  assert.deepEqual(found.map((d) => [d.code, d.path]), [
    ["invalid_type", "steps.a.with.fn"],
    ["invalid_type", "steps.a.with.when"],
    ["invalid_type", "steps.a.with.n"],
    ["invalid_type", "steps.a.with.cyclic.self"],
    ["invalid_type", "steps.b.needs[0]"],
  ]);
  assert.match(
    found[0].message,
    /^expected JSON data .* for "fn" in "with" of step "a", got a function$/,
  );
  assert.match(found[1].message, /got an instance of Date$/);
  assert.match(found[3].message, /got a reference to a mapping or list it is in$/);
  assert.deepEqual(problems(undefined).map(formatDiagnostic), [
    "demo: expected a mapping at the top level, got undefined",
  ]);
  assert.deepEqual(problems(["a"]).map((d) => d.message), [
    "expected a mapping at the top level, got a list",
  ]);
  // Optional keys given as undefined are absent, as in YAML.
  const plan = definePipeline({ name: "x", steps: { a: { run: "x", needs: undefined } } });
  assert.deepEqual(plan.steps.a.needs, []);
});

Deno.test("module paths resolve against baseDir, default the working directory", () => {
  const pipeline: PipelineFile = { name: "x", steps: { a: { module: "./steps/analyze.ts" } } };
  assert.equal(definePipeline(pipeline, { baseDir: dir }).steps.a.backend, "deno");
  const cwd = Deno.cwd();
  Deno.chdir(dir);
  try {
    assert.equal(definePipeline(pipeline).baseDir, Deno.cwd());
  } finally {
    Deno.chdir(cwd);
  }
  const missing = problems({ name: "x", steps: { a: { module: "./nope.ts" } } });
  assert.deepEqual(missing.map((d) => [d.code, d.path]), [["missing_module", "steps.a.module"]]);
  assert.match(missing[0].message, new RegExp(`looked for ${dir}/nope\\.ts`));
});

Deno.test("plugin backends are accepted when named", () => {
  const pipeline: PipelineFile = { name: "x", steps: { a: { backend: "lambda", with: { f: 1 } } } };
  assert.deepEqual(problems(pipeline).map((d) => d.code), ["unknown_backend"]);
  const plan = definePipeline(pipeline, { backends: ["lambda"] });
  assert.deepEqual(plan.steps.a.config, { with: { f: 1 } });
});
