import assert from "node:assert/strict";
import { definePipeline } from "./define.ts";
import { PipelineError } from "./errors.ts";
import { parseLimit, pipelineLimits } from "./limits.ts";
import { parsePipeline } from "./load.ts";
import { expandMatrix, legSizeBound, type MatrixFile, matrixLegBound } from "./plan.ts";
import type { PipelineFile } from "./schema.ts";

/** The diagnostics a pipeline source fails with. */
function problems(source: string, options: Parameters<typeof parsePipeline>[1]) {
  try {
    parsePipeline(source, options);
  } catch (error) {
    if (error instanceof PipelineError) return error.diagnostics;
    throw error;
  }
  assert.fail("expected the pipeline to be refused");
}

function values(prefix: string, n: number): string {
  return `[${Array.from({ length: n }, (_, i) => `${prefix}${i}`).join(", ")}]`;
}

Deno.test("the bound of a matrix is never below its legs", () => {
  const matrix: MatrixFile = {
    os: ["linux", "mac", "win"],
    v: [1, 2],
    exclude: [{ os: "mac", v: 1 }],
    include: [{ os: "bsd", v: 9 }, { os: "linux", v: 1 }, {}],
  };
  const bound = matrixLegBound(matrix);
  assert.deepEqual(bound, { legs: 8, factors: [3, 2] });
  assert.ok(expandMatrix(matrix).length <= bound.legs);
  assert.equal(matrixLegBound({ include: [{ a: 1 }] }).legs, 1);
});

Deno.test("a leg's size counts each matrix reference at its longest value", () => {
  const long = "y".repeat(1000);
  const plain = legSizeBound({ run: "echo", matrix: { x: [long, "z"] } });
  const twice = legSizeBound({ run: "echo ${{ matrix.x }}${{ matrix.x }}", matrix: { x: [long] } });
  assert.ok(plain >= 1000 && plain < 1100, String(plain));
  assert.ok(twice >= 3000, String(twice));
});

Deno.test("a matrix of a million legs is refused at its key before it is expanded", () => {
  const source = [
    "name: bomb",
    "steps:",
    "  s:",
    "    run: echo ${{ matrix.a }}",
    "    matrix:",
    `      a: ${values("a", 100)}`,
    `      b: ${values("b", 100)}`,
    `      c: ${values("c", 100)}`,
    "",
  ].join("\n");
  const started = performance.now();
  const found = problems(source, { file: "bomb.yaml" });
  // It took 19.7 s and 3.26 GB when the legs were expanded first.
  assert.ok(performance.now() - started < 2_000, "refused without expanding");
  assert.deepEqual(found.map((d) => [d.code, d.line, d.col, d.key]), [
    ["too_many_legs", 5, 5, "matrix"],
  ]);
  assert.equal(
    found[0].message,
    'matrix of step "s" expands to up to 1,000,000 legs (100 × 100 × 100); ' +
      "the limit is 10,000 legs per step",
  );
});

Deno.test("the limits are options: a larger matrix passes when allowed", () => {
  const source = `name: wide\nsteps:\n  s:\n    run: echo\n    matrix: { a: ${
    values("a", 150)
  }, b: ${values("b", 100)} }\n`;
  assert.equal(problems(source, { file: "wide.yaml" })[0].code, "too_many_legs");
  const plan = parsePipeline(source, { file: "wide.yaml", limits: { maxMatrixLegs: 15_000 } });
  assert.equal(plan.order.length, 15_000);
});

Deno.test("step instances, dependencies and plan size are bounded per run", () => {
  const legs = `{ a: ${values("a", 100)}, b: ${values("b", 90)} }`;
  const many = ["name: many", "steps:"];
  for (let i = 0; i < 12; i++) many.push(`  s${i}:`, "    run: echo", `    matrix: ${legs}`);
  const instances = problems(many.join("\n") + "\n", { file: "many.yaml" });
  assert.deepEqual(instances.map((d) => [d.code, d.line, d.col]), [
    ["too_many_instances", 2, 1],
  ]);
  assert.match(instances[0].message, /up to 108,000 step instances; the limit is 100,000 per run/);

  const pair = [
    "name: pair",
    "steps:",
    "  a:",
    "    run: echo",
    `    matrix: ${legs}`,
    "  b:",
    "    run: echo",
    "    needs: a",
    `    matrix: ${legs}`,
    "",
  ].join("\n");
  const dependencies = problems(pair, { file: "pair.yaml" });
  assert.deepEqual(dependencies.map((d) => [d.code, d.line, d.col]), [
    ["too_many_dependencies", 6, 3],
  ]);
  assert.match(dependencies[0].message, /up to 81,000,000 times \(step "b"/);

  const text = "x".repeat(100_000);
  const heavy =
    `name: heavy\nsteps:\n  a:\n    run: "${text} \${{ matrix.a }}"\n    matrix: ${legs}\n`;
  const size = problems(heavy, { file: "heavy.yaml" });
  assert.deepEqual(size.map((d) => [d.code, d.line, d.col]), [["plan_too_large", 3, 3]]);
  assert.match(size[0].message, /take up to 858\.\d MiB .*the limit is 64 MiB/);
});

Deno.test("a large file (the fast path) reports the limit at the matrix key too", () => {
  const padding = Array.from({ length: 3_000 }, (_, i) => `  p${i}: { run: echo ${i} }`);
  const source = [
    "name: big",
    "steps:",
    ...padding,
    "  s:",
    "    run: echo",
    `    matrix: { a: ${values("a", 200)}, b: ${values("b", 200)} }`,
    "",
  ].join("\n");
  assert.ok(source.length > 64 * 1024);
  const found = problems(source, { file: "big.yaml" });
  assert.deepEqual(found.map((d) => [d.code, d.line, d.col]), [
    ["too_many_legs", 3_000 + 5, 5],
  ]);
});

Deno.test("a pipeline defined in code is bounded the same way, located by key path", () => {
  const pipeline: PipelineFile = {
    name: "coded",
    steps: {
      s: {
        run: "echo",
        matrix: { a: [...Array(200).keys()], b: [...Array(200).keys()] },
      },
    },
  };
  assert.throws(() => definePipeline(pipeline), (error: unknown) => {
    assert.ok(error instanceof PipelineError);
    assert.deepEqual(error.diagnostics.map((d) => [d.code, d.path]), [
      ["too_many_legs", "steps.s.matrix"],
    ]);
    return true;
  });
  assert.equal(
    definePipeline(pipeline, { limits: { maxMatrixLegs: 40_000 } }).order.length,
    40_000,
  );
});

Deno.test("limits parse from NAME=VALUE and refuse what is not a positive integer", () => {
  assert.deepEqual(parseLimit("step-instances=5"), { maxStepInstances: 5 });
  assert.deepEqual(parseLimit("plan-bytes=1048576"), { maxPlanBytes: 1_048_576 });
  for (const bad of ["legs=5", "matrix-legs", "matrix-legs=0", "matrix-legs=1.5", "plan-bytes=x"]) {
    assert.throws(() => parseLimit(bad), { name: "QuantityError" }, bad);
  }
  assert.throws(() => pipelineLimits({ maxDependencies: -1 }), /positive integer/);
});

Deno.test("an alias bomb in a file large enough for the fast path is refused as well", () => {
  const lines = ["name: bomb", "a: &a [x, x, x, x, x, x, x, x, x, x]"];
  for (let i = 0, previous = "a"; i < 9; i++, previous = `l${i - 1}`) {
    lines.push(`l${i}: &l${i} [${Array(10).fill(`*${previous}`).join(", ")}]`);
  }
  lines.push("steps:", "  s: { run: 'true' }", `# ${"padding ".repeat(10_000)}`, "");
  const source = lines.join("\n");
  assert.ok(source.length > 64 * 1024);
  const started = performance.now();
  assert.deepEqual(problems(source, { file: "bomb.yaml" }).map((d) => d.code), ["yaml_aliases"]);
  assert.ok(performance.now() - started < 2_000);
});
