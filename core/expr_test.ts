import assert from "node:assert/strict";
import {
  type ConditionContext,
  ConditionSyntaxError,
  evaluateCondition,
  parseCondition,
} from "./expr.ts";

function ctx(overrides: Partial<ConditionContext> = {}): ConditionContext {
  return {
    needs: { build: { outcome: "succeeded" }, "test[os=linux]": { outcome: "failed" } },
    runCancelled: false,
    matrix: { os: "linux", size: 2, fast: true },
    env: { MODE: "prod" },
    ...overrides,
  };
}

Deno.test("functions read the needs and the run", () => {
  assert.equal(evaluateCondition("success()", ctx()), false);
  assert.equal(evaluateCondition("failure()", ctx()), true);
  assert.equal(evaluateCondition("always()", ctx()), true);
  assert.equal(evaluateCondition("cancelled()", ctx()), false);
  assert.equal(evaluateCondition("cancelled()", ctx({ runCancelled: true })), true);
  const ok = ctx({ needs: { a: { outcome: "succeeded" } } });
  assert.equal(evaluateCondition("${{ success() }}", ok), true);
  assert.equal(evaluateCondition("success()", ctx({ needs: {} })), true);
});

Deno.test("paths, literals and operators", () => {
  const c = ctx();
  assert.equal(evaluateCondition("steps.build.outcome == 'succeeded'", c), true);
  assert.equal(evaluateCondition('needs.build.outcome != "failed"', c), true);
  assert.equal(evaluateCondition("steps['test[os=linux]'].outcome == 'failed'", c), true);
  assert.equal(evaluateCondition("steps.nope.outcome == 'failed'", c), false);
  assert.equal(evaluateCondition("steps.nope.outcome == null", c), false);
  assert.equal(evaluateCondition("env.MODE == 'prod' && matrix.os == 'linux'", c), true);
  assert.equal(evaluateCondition("matrix.size >= 2 && matrix.size < 3", c), true);
  assert.equal(evaluateCondition("matrix.size == '2'", c), true);
  assert.equal(evaluateCondition("matrix.fast == true", c), true);
  assert.equal(evaluateCondition("!(matrix.os == 'mac') || false", c), true);
  assert.equal(evaluateCondition("env.__proto__ == null", c), false);
  assert.equal(evaluateCondition("env.toString", c), false);
  assert.equal(evaluateCondition("-1 < 0 && 1.5e1 == 15", c), true);
  assert.equal(evaluateCondition("'it''s' == \"it's\"", c), true);
  assert.equal(evaluateCondition("env.MISSING || 'x' == 'x'", c), true);
});

Deno.test("syntax errors carry the offset", () => {
  const cases: Array<[string, number]> = [
    ["success() &&", 12],
    ["steps.a.result == 'x'", 8],
    ["foo()", 0],
    ["bogus == 1", 0],
    ["'open", 0],
    ["1 == 1 )", 7],
    ["${{ 1 = 1 }}", 6],
    ["${{ success() ", 14],
    ["", 0],
    ["a # b", 2],
  ];
  for (const [src, offset] of cases) {
    assert.throws(() => parseCondition(src), (error: unknown) => {
      assert.ok(error instanceof ConditionSyntaxError, src);
      assert.equal(error.code, "condition_syntax");
      assert.equal(error.offset, offset, `${src}: ${error.message}`);
      return true;
    });
  }
});

Deno.test("deep nesting and long input are bounded", () => {
  assert.throws(
    () => parseCondition("(".repeat(10_000) + "true" + ")".repeat(10_000)),
    ConditionSyntaxError,
  );
  assert.throws(() => parseCondition("!".repeat(10_000) + "true"), ConditionSyntaxError);
  assert.throws(() => parseCondition("true && ".repeat(1000) + "true"), ConditionSyntaxError);
  assert.equal(evaluateCondition("true && ".repeat(300) + "true", ctx()), true);
});
