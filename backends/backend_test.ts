import assert from "node:assert/strict";
import { BUSINESS_EXIT_CODE, ERROR_CLASSES } from "../core/model.ts";
import { classifyExit, type ExitStatus, missingOutputStatus } from "./backend.ts";

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

Deno.test("missingOutputStatus: an output must be a regular file; links are not followed", async () => {
  const dir = await Deno.makeTempDir({ prefix: "runnel_backend_test_" });
  try {
    await Deno.mkdir(`${dir}/out`);
    await Deno.writeTextFile(`${dir}/out/ok.txt`, "ok");
    await Deno.writeTextFile(`${dir}/secret`, "host file");
    await Deno.symlink(`${dir}/secret`, `${dir}/out/link`);
    await Deno.mkdir(`${dir}/out/dir`);
    const check = (outputs: string[]) =>
      missingOutputStatus({ outputsDir: `${dir}/out`, outputs }, { exitCode: 0 });
    assert.deepEqual(await check(["ok.txt"]), { exitCode: 0 });
    assert.deepEqual(await check(["ok.txt", "gone"]), {
      exitCode: 0,
      errorClass: "application",
      message: 'step did not write declared output "gone"',
    });
    assert.equal((await check(["link"])).errorClass, "permission");
    assert.match((await check(["link"])).message!, /"link" is a symbolic link/);
    assert.match((await check(["dir"])).message!, /"dir" is a directory/);
    assert.match((await check(["../secret"])).message!, /not a plain file name/);
    // A failed status passes through.
    assert.deepEqual(
      await missingOutputStatus({ outputsDir: dir, outputs: ["x"] }, { exitCode: 2 }),
      {
        exitCode: 2,
      },
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
