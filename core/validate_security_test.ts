/**
 * What validation refuses because it would reach outside a directory on
 * the host: names that become paths or env vars, and deno paths that leave
 * the pipeline directory. Each is a located error naming what was expected.
 */

import assert from "node:assert/strict";
import { parsePipeline } from "./load.ts";
import { definePipeline } from "./define.ts";
import { type Diagnostic, PipelineError } from "./errors.ts";
import { ENV_NAME_PATTERN } from "./schema.ts";
import { SAFE_NAME_PATTERN } from "./model.ts";

function problems(source: string, options: { hostPaths?: { read?: string[] } } = {}) {
  try {
    parsePipeline(source, { file: "p.yaml", baseDir: "/srv/pipeline", ...options });
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

Deno.test("paths: a deno module or permission path outside the pipeline directory is located", () => {
  const source = `name: p
steps:
  a:
    module: ../evil.ts
    permissions: { read: ["/etc", data, "x/../../up", /data/shared/in], write: [out/../.., "\${{ matrix.d }}"] }
    matrix: { d: [x] }
  b:
    module: /etc/passwd
`;
  const found = problems(source);
  assert.deepEqual(found.map((d) => `${d.line}:${d.col} ${d.code} ${d.path}`), [
    "4:13 path_escape steps.a.module",
    "5:27 path_escape steps.a.permissions.read[0]",
    "5:41 path_escape steps.a.permissions.read[2]",
    "5:55 path_escape steps.a.permissions.read[3]",
    "5:81 path_escape steps.a.permissions.write[0]",
    "8:13 path_escape steps.b.module",
  ]);
  assert.equal(
    found[1].message,
    'deno read path "/etc" of step "a" is outside the pipeline directory',
  );
  assert.equal(
    found[1].hint,
    "an operator allows a host path with policy.deno.read in the agent config",
  );
  // The runner's policy may allow a host path; the module never leaves.
  const allowed = problems(source, { hostPaths: { read: ["/data/shared"] } });
  assert.deepEqual(allowed.map((d) => d.path), [
    "steps.a.module",
    "steps.a.permissions.read[0]",
    "steps.a.permissions.read[2]",
    "steps.a.permissions.write[0]",
    "steps.b.module",
  ]);
});

Deno.test("paths: the same checks for a pipeline defined in code", () => {
  assert.throws(
    () =>
      definePipeline({
        name: "p",
        steps: { a: { backend: "deno", module: "step.ts", permissions: { write: ["/tmp"] } } },
      }, { baseDir: "/srv/pipeline" }),
    (error: unknown) =>
      error instanceof PipelineError &&
      error.diagnostics.some((d) =>
        d.code === "path_escape" && d.path === "steps.a.permissions.write[0]"
      ),
  );
});
