import assert from "node:assert/strict";
import { runIsolated } from "./_isolated.ts";

/** A "benchmark" that leaves a process running with a path in its TMPDIR, then exits. */
const LEAVER = `
const file = Deno.env.get("TMPDIR") + "/left.log";
Deno.writeTextFileSync(file, "");
const child = new Deno.Command("tail", { args: ["-f", file], stdout: "null", stderr: "null" }).spawn();
Deno.writeTextFileSync(Deno.args[0], String(child.pid));
Deno.exit(3);
`;

Deno.test("runIsolated: what a benchmark leaves running is killed by its pid, without /proc access", async () => {
  // The test's permissions, like the bench task's, read nothing under /proc.
  const dir = await Deno.makeTempDir({ prefix: "runnel-isolated-test-" });
  const pidFile = `${dir}/pid`;
  let pid = 0;
  try {
    await Deno.writeTextFile(`${dir}/leaver.ts`, LEAVER);
    const outcome = await runIsolated(`file://${dir}/leaver.ts`, [pidFile]);
    pid = Number(await Deno.readTextFile(pidFile));
    assert.equal(outcome.code, 3);
    assert.deepEqual(outcome.killed, [pid]);
    // Killed: it exits (it was this test's grandchild, reaped by init).
    const deadline = Date.now() + 10_000;
    while (isRunning(pid)) {
      assert.ok(Date.now() < deadline, `process ${pid} still runs`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  } finally {
    pid ||= Number(await Deno.readTextFile(pidFile).catch(() => "0"));
    if (pid > 0 && isRunning(pid)) Deno.kill(pid, "SIGKILL");
    await Deno.remove(dir, { recursive: true });
  }
});

/** Whether `pid` names a live process (a zombie counts as gone). */
function isRunning(pid: number): boolean {
  const { stdout } = new Deno.Command("ps", {
    args: ["-o", "stat=", "-p", String(pid)],
    stdout: "piped",
    stderr: "null",
  })
    .outputSync();
  const state = new TextDecoder().decode(stdout).trim();
  return state !== "" && !state.startsWith("Z");
}
