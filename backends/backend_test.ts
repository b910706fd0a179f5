import assert from "node:assert/strict";
import { BUSINESS_EXIT_CODE, ERROR_CLASSES } from "../core/model.ts";
import { classifyExit, type ExitStatus } from "./backend.ts";

Deno.test("classifyExit: exit 0 succeeds, 65 is business, a signal or other code application", () => {
  assert.deepEqual(classifyExit({ exitCode: 0 }), { exitCode: 0 });
  assert.deepEqual(classifyExit({ exitCode: BUSINESS_EXIT_CODE }), {
    exitCode: BUSINESS_EXIT_CODE,
    errorClass: "business",
    message: `step reported a business error (exit code ${BUSINESS_EXIT_CODE})`,
  });
  assert.deepEqual(classifyExit({ exitCode: 3 }), {
    exitCode: 3,
    errorClass: "application",
    message: "step exited with code 3",
  });
  assert.deepEqual(classifyExit({ exitCode: 137, signal: "SIGKILL" }), {
    exitCode: 137,
    signal: "SIGKILL",
    errorClass: "application",
    message: "step was killed by SIGKILL",
  });
  // A signal is a failure even when the code reads 0.
  assert.equal(classifyExit({ exitCode: 0, signal: "SIGTERM" }).errorClass, "application");
});

Deno.test("classifyExit: a report decides a failed exit only", () => {
  const report = { errorClass: "permission" as const, message: "step needs net access" };
  assert.deepEqual(classifyExit({ exitCode: 77 }, { report }), { exitCode: 77, ...report });
  assert.deepEqual(classifyExit({ exitCode: 0 }, { report }), { exitCode: 0 });
});

Deno.test("classifyExit: a classified status passes through unchanged (idempotent)", () => {
  for (const errorClass of ERROR_CLASSES) {
    const status: ExitStatus = { exitCode: BUSINESS_EXIT_CODE, errorClass, message: "as it was" };
    assert.deepEqual(classifyExit(status), status, errorClass);
  }
  for (const status of [{ exitCode: 0 }, { exitCode: 9 }, { exitCode: 1, signal: "SIGTERM" }]) {
    const once = classifyExit(status);
    assert.deepEqual(classifyExit(once), once);
  }
});
