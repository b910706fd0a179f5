import assert from "node:assert/strict";
import { loadPipeline, parsePipeline } from "./load.ts";
import { type Diagnostic, formatDiagnostic, PipelineError } from "./errors.ts";

const dir = Deno.makeTempDirSync({ prefix: "runnel_load_test_" });
Deno.mkdirSync(`${dir}/steps`);
Deno.writeTextFileSync(`${dir}/steps/analyze.ts`, "export default () => {};\n");

function problems(source: string, backends?: string[]): Diagnostic[] {
  try {
    parsePipeline(source, { file: "pipeline.yaml", baseDir: dir, backends });
  } catch (error) {
    assert.ok(error instanceof PipelineError, String(error));
    return error.diagnostics;
  }
  assert.fail("expected a PipelineError");
}

function lines(source: string): string[] {
  return problems(source).map(formatDiagnostic);
}

const ENERGY = `name: energy-report
defaults: { backend: docker, timeout: 10m, retry: { max: 2, backoff: 2s } }
steps:
  generate:
    image: runnel/python:local
    run: python gen.py
    outputs: [energy.csv]
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

Deno.test("the seed pipeline loads", () => {
  const plan = parsePipeline(ENERGY, { file: "pipeline.yaml", baseDir: dir });
  assert.deepEqual(plan.order, ["generate", "analyze", "report"]);
  assert.equal(plan.steps.analyze.backend, "deno");
  assert.equal(plan.steps.analyze.timeoutMs, 600_000);
  assert.equal(plan.steps.generate.retry.max, 2);
  assert.equal(plan.steps.generate.source.line, 4);
});

Deno.test("unknown key is located at the key with did-you-mean", () => {
  const source = ENERGY.replace("    needs: [generate]", "    neds: [generate]");
  assert.deepEqual(lines(source), [
    'pipeline.yaml:9:5: unknown key "neds" in step "analyze" — did you mean "needs"?',
  ]);
  assert.equal(problems(source)[0].path, "steps.analyze.neds");
});

Deno.test("every problem of the file is reported, in source order", () => {
  const source = `name: x
secrets: { TOKEN: { env: TOK } }
steps:
  a:
    run: echo
    timeout: ten minutes
    needs: [b, nope]
    secrets: [TOKN]
    when: "success() &&"
    outputs: [out.txt]
  b:
    run: echo
    needs: a
    inputs: { x: a/missing.txt }
  c:
    backend: dockr
    image: x
  d:
    backend: deno
`;
  const found = lines(source);
  assert.deepEqual(found, [
    "pipeline.yaml:4:3: cycle between steps: b → a → b — remove one of these needs",
    'pipeline.yaml:6:14: Expected a duration like "10m" for "timeout", got "ten minutes" in step "a"',
    'pipeline.yaml:7:16: step "a" needs unknown step "nope"',
    'pipeline.yaml:8:15: step "a" uses undeclared secret "TOKN" — did you mean "TOKEN"?',
    'pipeline.yaml:9:24: invalid condition in "when" of step "a": Expected a value, got the end of the condition',
    'pipeline.yaml:14:18: input "x" of step "b" names output "missing.txt" that step "a" does not declare',
    'pipeline.yaml:16:14: unknown backend "dockr" for step "c" — did you mean "docker"?',
    'pipeline.yaml:18:3: missing required key "module" in step "d" (backend deno)',
  ]);
  assert.deepEqual(problems(source).map((d) => d.path), [
    "steps.a",
    "steps.a.timeout",
    "steps.a.needs[1]",
    "steps.a.secrets[0]",
    "steps.a.when",
    "steps.b.inputs.x",
    "steps.c.backend",
    "steps.d.module",
  ]);
});

Deno.test("yaml syntax errors and duplicate steps", () => {
  const [syntax] = problems("name: x\nsteps:\n  a: [unclosed\n");
  assert.equal(syntax.code, "yaml_syntax");
  assert.ok(syntax.line >= 3);
  const duplicate = problems("name: x\nsteps:\n  a: { run: x }\n  a: { run: y }\n");
  assert.deepEqual(duplicate.map((d) => [d.code, d.line, d.col, d.message]), [
    ["duplicate_step", 4, 3, 'duplicate step "a"'],
  ]);
});

Deno.test("types, sizes and missing required keys", () => {
  const found = problems(
    "steps:\n  a:\n    run: 3\n    resources: { memory: lots }\n    retry: { max: 1, on: [business] }\n",
  );
  const text = found.map(formatDiagnostic);
  assert.equal(text[0], 'pipeline.yaml:1:1: missing required key "name" at the top level');
  assert.equal(text[1], 'pipeline.yaml:3:10: expected string for "run" in step "a", got number 3');
  assert.match(text[2], /^pipeline\.yaml:4:26: Expected a size like "64Mi"/);
  assert.match(text[3], /^pipeline\.yaml:5:27: expected one of "application"/);
});

Deno.test("backend inference, plugins and start_node", () => {
  const plan = parsePipeline(
    "name: x\nstart_node: a\nsteps:\n  a: { run: x, next_node: b }\n  b: { backend: lambda, with: { fn: f } }\n",
    { file: "p.yaml", baseDir: dir, backends: ["lambda"] },
  );
  assert.deepEqual(plan.steps.b.needs, ["a"]);
  assert.equal(plan.steps.a.backend, "shell");
  assert.deepEqual(plan.steps.b.config, { with: { fn: "f" } });
  const unreachable = lines("name: x\nstart_node: a\nsteps:\n  a: { run: x }\n  b: { run: y }\n");
  assert.match(unreachable[0], /^pipeline\.yaml:5:3: step "b" is unreachable from start_node "a"/);
  assert.match(
    lines("name: x\nstart_node: aa\nsteps:\n  a: { run: x }\n")[0],
    /did you mean "a"\?/,
  );
});

Deno.test("missing module and matrix expanding to nothing", () => {
  const missing = lines("name: x\nsteps:\n  a: { module: ./nope.ts }\n");
  assert.match(
    missing[0],
    /^pipeline\.yaml:3:16: module "\.\/nope\.ts" of step "a" does not exist/,
  );
  const empty = lines(
    "name: x\nsteps:\n  a:\n    run: x\n    matrix: { os: [a], exclude: [{ os: a }] }\n",
  );
  assert.match(empty[0], /^pipeline\.yaml:5:5: matrix of step "a" expands to no legs/);
  assert.match(lines("name: x\nsteps:\n  a: { run: x, matrix: { os: [] } }\n")[0], /has no values/);
});

Deno.test("input limits are located errors", () => {
  assert.deepEqual(problems("").map((d) => [d.code, d.line, d.col]), [["empty", 1, 1]]);
  assert.deepEqual(problems("# only a comment\n").map((d) => d.code), ["empty"]);
  assert.deepEqual(problems("name: x\0").map((d) => d.code), ["binary"]);
  assert.deepEqual(problems("x".repeat(5 * 1024 * 1024 + 1)).map((d) => d.code), ["too_large"]);
  assert.deepEqual(problems("- a\n- b\n").map((d) => d.code), ["invalid_type"]);
  const bomb = ["a: &a [x, x, x, x, x, x, x, x, x, x]"];
  for (let i = 1; i < 9; i++) {
    bomb.push(
      `${"b".repeat(i)}: &${"b".repeat(i)} [${
        Array(10).fill(i === 1 ? "*a" : "*" + "b".repeat(i - 1)).join(", ")
      }]`,
    );
  }
  assert.deepEqual(problems(bomb.join("\n") + "\n").map((d) => d.code), ["yaml_aliases"]);
});

Deno.test("loadPipeline reads files and reports unreadable ones", async () => {
  Deno.writeTextFileSync(`${dir}/pipeline.yaml`, ENERGY);
  const plan = await loadPipeline(`${dir}/pipeline.yaml`);
  assert.equal(plan.baseDir, dir);
  assert.equal(plan.file, `${dir}/pipeline.yaml`);
  for (const path of [dir, `${dir}/absent.yaml`]) {
    await assert.rejects(() => loadPipeline(path), (error: unknown) => {
      assert.ok(error instanceof PipelineError);
      assert.equal(error.diagnostics[0].code, "unreadable");
      assert.equal(error.diagnostics[0].line, 1);
      return true;
    });
  }
  Deno.writeFileSync(`${dir}/latin1.yaml`, new Uint8Array([0x6e, 0x3a, 0x20, 0xe9, 0x0a]));
  await assert.rejects(() => loadPipeline(`${dir}/latin1.yaml`), /UTF-8/);
});

Deno.test("the fast path for large files plans exactly what the located path plans", async () => {
  const { parseLocated } = await import("./load.ts");
  const lines = [
    "name: big",
    "concurrency: 3",
    "defaults: { retry: { max: 2, backoff: 1s }, timeout: 5m }",
    "env: { A: '1' }",
    "steps:",
  ];
  for (let i = 0; i < 1500; i++) {
    lines.push(`  s${i}:`, "    backend: shell", `    run: echo ${i} > $RUNNEL_OUTPUT_OUT_TXT`);
    lines.push("    outputs: [out.txt]");
    if (i > 0) lines.push(`    needs: [s${Math.floor(i / 2)}]`);
    if (i > 0) lines.push(`    inputs: { prev: s${i - 1}/out.txt }`);
    if (i % 100 === 0) lines.push("    matrix: { region: [eu, us] }", "    cache: true");
  }
  const source = lines.join("\n") + "\n";
  assert.ok(source.length > 64 * 1024, "large enough for the fast path");
  const options = { file: "big.yaml", baseDir: "/tmp" };
  const fast = parsePipeline(source, options);
  const located = parseLocated(source, options);
  assert.deepEqual(fast, located);
});

Deno.test("a large file with an error still gets a located diagnostic", () => {
  const lines = ["name: big", "steps:"];
  for (let i = 0; i < 3000; i++) lines.push(`  s${i}: { backend: shell, run: echo ${i} }`);
  lines.push("  broken: { backend: shell, run: echo, neds: [s1] }");
  assert.throws(
    () => parsePipeline(lines.join("\n") + "\n", { file: "big.yaml", baseDir: "/tmp" }),
    (error: unknown) => {
      assert.ok(error instanceof PipelineError);
      assert.equal(error.diagnostics[0].line, 3003);
      assert.match(formatDiagnostic(error.diagnostics[0]), /did you mean "needs"/);
      return true;
    },
  );
});

/** A DAG of `steps` steps, one line each, each needing up to three earlier ones. */
function generatedDag(steps: number): { source: string; needs: string[][] } {
  let state = 7;
  const next = () => (state = (state * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
  const lines = ["name: scale", "defaults: { timeout: 10m, retry: 2 }", "steps:"];
  const needs: string[][] = [];
  for (let i = 0; i < steps; i++) {
    const mine = new Set<string>();
    for (let k = 0; i > 0 && k < 1 + Math.floor(next() * 3); k++) {
      mine.add(`s${Math.floor(next() * i)}`);
    }
    needs.push([...mine]);
    lines.push(` s${i}: {run: echo ${i}${mine.size > 0 ? `, needs: [${[...mine]}]` : ""}}`);
  }
  return { source: lines.join("\n") + "\n", needs };
}

for (const steps of [10_000, 100_000]) {
  Deno.test(`a generated ${steps}-step DAG plans every step after its needs`, () => {
    const { source, needs } = generatedDag(steps);
    const plan = parsePipeline(source, { file: "scale.yaml", baseDir: "/tmp" });
    assert.equal(plan.order.length, steps);
    assert.equal(new Set(plan.order).size, steps);
    const place = new Map(plan.order.map((id, i) => [id, i]));
    for (let i = 0; i < steps; i++) {
      const step = plan.steps[`s${i}`];
      assert.deepEqual(step.needs, needs[i], `needs of s${i}`);
      for (const need of step.needs) assert.ok(place.get(need)! < place.get(step.id)!);
    }
    // Ties go in file order: the first step, then the first whose needs are done.
    assert.equal(plan.order[0], "s0");
    const last = plan.steps[`s${steps - 1}`];
    assert.deepEqual(last.source, { file: "scale.yaml", line: steps + 3, col: 2 });
    assert.equal(last.retry.max, 2);
    assert.equal(last.timeoutMs, 600_000);
    assert.match(last.specDigest, /^[0-9a-f]{64}$/);
  });
}
