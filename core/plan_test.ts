import assert from "node:assert/strict";
import { parsePipeline } from "./load.ts";
import { canonicalJson, expandMatrix, mayMention, renderPlanText } from "./plan.ts";

const dir = Deno.makeTempDirSync({ prefix: "runnel_plan_test_" });

function plan(source: string) {
  return parsePipeline(source, { file: "p.yaml", baseDir: dir });
}

Deno.test("matrix legs, interpolation and fan-in", () => {
  const p = plan(`name: m
steps:
  convert:
    run: convert --region \${{ matrix.region }} --size \${{matrix.size}}
    env: { REGION: "\${{ matrix.region }}" }
    matrix: { region: [eu, us], size: [1, 2], exclude: [{ region: us, size: 2 }], include: [{ region: ap, size: 9 }] }
    outputs: [out.csv]
  merge:
    run: merge
    inputs: { parts: convert/out.csv }
`);
  assert.deepEqual(p.order, [
    "convert[region=eu,size=1]",
    "convert[region=eu,size=2]",
    "convert[region=us,size=1]",
    "convert[region=ap,size=9]",
    "merge",
  ]);
  const leg = p.steps["convert[region=us,size=1]"];
  assert.equal(leg.config.run, "convert --region us --size 1");
  assert.deepEqual(leg.env, { REGION: "us" });
  assert.deepEqual(leg.matrix, { region: "us", size: 1 });
  assert.deepEqual(p.steps.merge.needs, p.order.slice(0, 4));
  assert.deepEqual(p.steps.merge.inputs.parts, {
    step: "convert",
    output: "out.csv",
    from: p.order.slice(0, 4),
    fanIn: true,
  });
});

Deno.test("defaults, retry and webhook normalisation", () => {
  const p = plan(`name: d
selector: { cloud: gcp }
on-failure: { webhook: "https://hooks.example/x" }
defaults: { timeout: 1h30m, retry: 2, env: { A: 1 }, resources: { cpu: 500m } }
steps:
  a:
    run: x
    env: { B: true }
    resources: { memory: 64Mi }
    retry: { backoff: 2s, on: [137, timeout] }
`);
  const a = p.steps.a;
  assert.equal(a.timeoutMs, 5_400_000);
  assert.deepEqual(a.env, { A: "1", B: "true" });
  assert.deepEqual(a.resources, { cpu: 0.5, memoryBytes: 64 * 1024 * 1024 });
  assert.deepEqual(a.retry, {
    max: 2,
    backoffMs: 2000,
    maxBackoffMs: 60_000,
    factor: 2,
    jitter: 0.2,
    onClasses: ["timeout"],
    onExitCodes: [137],
  });
  assert.deepEqual(a.selector, { cloud: "gcp" });
  assert.deepEqual(p.onFailure, {
    url: "https://hooks.example/x",
    headers: {},
    retries: 3,
    backoffMs: 1000,
    timeoutMs: 10_000,
  });
});

Deno.test("specDigest changes with the spec and with the deno module's contents", () => {
  Deno.writeTextFileSync(`${dir}/step.ts`, "export default () => 1;\n");
  const source = "name: x\nsteps:\n  a: { module: ./step.ts }\n  b: { run: echo }\n";
  const first = plan(source);
  assert.equal(first.steps.a.specDigest, plan(source).steps.a.specDigest);
  assert.match(first.digest, /^[0-9a-f]{64}$/);
  Deno.writeTextFileSync(`${dir}/step.ts`, "export default () => 2;\n");
  const second = plan(source);
  assert.notEqual(second.steps.a.specDigest, first.steps.a.specDigest);
  assert.equal(second.steps.b.specDigest, first.steps.b.specDigest);
  const third = plan(source.replace("echo", "echo hi"));
  assert.notEqual(third.steps.b.specDigest, first.steps.b.specDigest);
});

Deno.test("order is topological with file-order ties and handles 10,000 steps", () => {
  const p = plan("name: o\nsteps:\n  c: { run: x, needs: b }\n  a: { run: x }\n  b: { run: x }\n");
  assert.deepEqual(p.order, ["a", "b", "c"]);
  const lines = ["name: big", "steps:"];
  for (let i = 0; i < 10_000; i++) {
    lines.push(`  s${i}: { run: x${i > 0 ? `, needs: s${i - 1}` : ""} }`);
  }
  const big = plan(lines.join("\n") + "\n");
  assert.equal(big.order.length, 10_000);
  assert.equal(big.order.at(-1), "s9999");
});

Deno.test("renderPlanText shows waves, backends and needs", () => {
  const p = plan(
    "name: t\nsteps:\n  a: { run: x }\n  b: { run: x, needs: a }\n  c: { image: i }\n",
  );
  assert.equal(
    renderPlanText(p),
    "pipeline t: 3 steps in 2 waves\nwave 1\n  a [shell]\n  c [docker]\nwave 2\n  b [shell]  ← a\n",
  );
});

Deno.test("helpers", () => {
  assert.equal(canonicalJson({ b: 1, a: [{ d: 1, c: undefined }] }), '{"a":[{"d":1}],"b":1}');
  assert.deepEqual(expandMatrix({ include: [{ x: 1 }] }), [{ x: 1 }]);
});

Deno.test("mayMention finds what a search of the step's JSON finds", () => {
  const steps: unknown[] = [
    { run: "echo ${{ item }}" },
    { run: "echo", env: { A: "x.values.y" } },
    { with: { "${{ k }}": 1 } },
    { args: ["a", "b\n${{ matrix.x }}"] },
    { run: 'say "hi"\t', needs: ["a"] },
    { with: { when: new Date(0) } },
    { with: { n: 1.5, t: true, z: null } },
  ];
  for (const step of steps) {
    for (const text of ["${{", ".values."]) {
      if (JSON.stringify(step).includes(text)) assert.ok(mayMention(step, text), text);
    }
  }
  assert.equal(mayMention({ run: 'say "hi"\t', needs: ["a"] }, "${{"), false);
  // A value with a JSON of its own may say anything.
  assert.equal(mayMention({ with: { when: new Date(0) } }, "${{"), true);
});
