/**
 * What validation refuses because it would reach outside a directory on
 * the host: names that become paths or env vars, and deno paths that leave
 * the pipeline directory. Each is a located error naming what was expected.
 */

import assert from "node:assert/strict";
import { parsePipeline } from "./load.ts";
import { type Diagnostic, PipelineError } from "./errors.ts";
import { ENV_NAME_PATTERN, SAFE_NAME_PATTERN } from "./schema.ts";

function problems(source: string) {
  try {
    parsePipeline(source, { file: "p.yaml", baseDir: "/srv/pipeline" });
  } catch (error) {
    if (error instanceof PipelineError) return error.diagnostics;
    throw error;
  }
  return [];
}

function located(d: Diagnostic): string {
  return `${d.line}:${d.col} ${d.code} ${d.key}: ${d.expected}`;
}

Deno.test("names: input, output, env and secret names match a safe pattern", () => {
  const found = problems(`name: p
env: { "LD_PRELOAD=x": a }
secrets: { "bad name": { env: X } }
steps:
  a:
    run: "true"
    outputs: [".ssh", "../x", "ok.txt"]
    secrets: ["x y"]
  b:
    run: "true"
    inputs: { "../../../../root/.ssh": a/ok.txt }
`);
  assert.deepEqual(found.map(located), [
    `2:8 invalid_key LD_PRELOAD=x: an env var name of letters, digits, _ not starting with a digit ([A-Za-z_][A-Za-z0-9_]*)`,
    `3:12 invalid_key bad name: a secret name of letters, digits, _ not starting with a digit ([A-Za-z_][A-Za-z0-9_]*)`,
    `7:15 invalid_value outputs[0]: a file name of letters, digits, _ . - not starting with . or - ([A-Za-z0-9_][A-Za-z0-9_.-]*)`,
    `7:23 invalid_value outputs[1]: a file name of letters, digits, _ . - not starting with . or - ([A-Za-z0-9_][A-Za-z0-9_.-]*)`,
    `8:15 invalid_value secrets[0]: a secret name of letters, digits, _ not starting with a digit ([A-Za-z_][A-Za-z0-9_]*)`,
    `11:15 invalid_key ../../../../root/.ssh: an input name of letters, digits, _ . - not starting with . or - ([A-Za-z0-9_][A-Za-z0-9_.-]*)`,
  ]);
  assert.match(
    found.at(-1)!.message,
    /^invalid key "\.\.\/\.\.\/\.\.\/\.\.\/root\/\.ssh" in "inputs" of step "b"/,
  );
});

Deno.test("names: the patterns", () => {
  for (const name of ["data", "energy_data.csv", "a-b.1", "_x", "9"]) {
    assert.ok(SAFE_NAME_PATTERN.test(name), name);
  }
  for (const name of ["", ".", "..", ".ssh", "-x", "a/b", "a\\b", "a b", "x".repeat(129)]) {
    assert.ok(!SAFE_NAME_PATTERN.test(name), name);
  }
  assert.ok(ENV_NAME_PATTERN.test("API_KEY") && !ENV_NAME_PATTERN.test("1X"));
});
