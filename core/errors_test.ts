import assert from "node:assert/strict";
import { ConditionSyntaxError, formatDiagnostic, PipelineError } from "./errors.ts";

Deno.test("formatDiagnostic renders file:line:col, message and hint", () => {
  const diagnostic = {
    code: "unknown_key",
    message: 'unknown key "neds" in step "analyze"',
    file: "pipeline.yaml",
    line: 7,
    col: 14,
    hint: 'did you mean "needs"?',
  };
  assert.equal(
    formatDiagnostic(diagnostic),
    'pipeline.yaml:7:14: unknown key "neds" in step "analyze" — did you mean "needs"?',
  );
  const error = new PipelineError([diagnostic]);
  assert.equal(error.code, "invalid_pipeline");
  assert.match(error.message, /1 problem:\npipeline\.yaml:7:14/);
  assert.equal(new ConditionSyntaxError("x", 3).offset, 3);
});

Deno.test("formatDiagnostic locates a problem without a position by its key path", () => {
  const diagnostic = {
    code: "unknown_step",
    message: 'step "analyze" needs unknown step "generat"',
    file: "demo",
    line: 0,
    col: 0,
    path: "steps.analyze.needs[0]",
    hint: 'did you mean "generate"?',
  };
  assert.equal(
    formatDiagnostic(diagnostic),
    'demo: steps.analyze.needs[0]: step "analyze" needs unknown step "generat" — did you mean "generate"?',
  );
  assert.equal(
    formatDiagnostic({ ...diagnostic, path: undefined, hint: undefined }),
    `demo: ${diagnostic.message}`,
  );
});
