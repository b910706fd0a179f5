/**
 * A `runnel run` killed with SIGKILL leaves its steps' process groups
 * behind (each step leads its own). `runnel resume` and `runnel cancel`
 * must reap them from the attempt records before anything runs again, so
 * a step's side effects never happen twice beside each other.
 */

import assert from "node:assert/strict";
import { poll, processesMentioning, runCli, sandbox, spawnCli, waitForLine } from "./_helpers.ts";
import { openLocalState, readStepStates } from "../agent/local/mod.ts";

/** Whether a process is alive (a zombie counts as gone). */
async function alive(pid: number): Promise<boolean> {
  const output = await new Deno.Command("ps", {
    args: ["-o", "stat=", "-p", String(pid)],
    stdout: "piped",
    stderr: "null",
  }).output();
  const stat = new TextDecoder().decode(output.stdout).trim();
  return stat !== "" && !stat.startsWith("Z");
}

async function readPid(path: string): Promise<number | undefined> {
  try {
    const pid = Number((await Deno.readTextFile(path)).trim());
    return Number.isInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

/** Kills what a failed test may have left, by pid. */
function killAll(pids: Array<number | undefined>): void {
  for (const pid of pids) {
    if (!pid) continue;
    try {
      Deno.kill(-pid, "SIGKILL");
    } catch {
      // Gone already.
    }
  }
}

const PIPELINE = `name: crash-twice
defaults: { retry: { max: 0 } }
steps:
  side-effect:
    backend: shell
    run: |
      echo "$RUNNEL_ATTEMPT" >> pids/shell.attempts
      if [ "$RUNNEL_ATTEMPT" = 1 ]; then echo $$ > pids/shell.1; sleep 60; fi
      if ps -o stat= -p "$(cat pids/shell.1)" | grep -qv Z; then ps -o pid,stat,args -p "$(cat pids/shell.1)" >&2; echo "attempt 1 is still running" >&2; exit 3; fi
      echo done > "$RUNNEL_OUTPUT_OUT_TXT"
    outputs: [out.txt]
  sandboxed:
    backend: deno
    module: ./wait.ts
    permissions: { write: [pids] }
    outputs: [out.txt]
`;

/** A deno step that records its pid and, on its first attempt, waits a minute. */
function waitModule(pidsDir: string): string {
  return `
export default async function (ctx) {
  await Deno.writeTextFile(\`${pidsDir}/deno.\${ctx.attempt}\`, String(Deno.pid));
  if (ctx.attempt === 1) await new Promise((resolve) => setTimeout(resolve, 60_000));
  await Deno.writeTextFile(ctx.outputs["out.txt"], "done");
}
`;
}

/** A run whose runner was SIGKILLed while both steps ran their first attempt. */
interface CrashedRun extends AsyncDisposable {
  dir: string;
  stateDir: string;
  runId: string;
  shellPid: number;
  denoPid: number;
}

/** Starts `runnel run`, waits until both steps run, and SIGKILLs the runner. */
async function crashMidStep(): Promise<CrashedRun> {
  const box = await sandbox();
  await Deno.mkdir(`${box.dir}/pids`);
  const file = await box.write("pipeline.yaml", PIPELINE);
  await box.write("wait.ts", waitModule(`${box.dir}/pids`));
  const { child, lines } = spawnCli(["run", file, "--state-dir", box.stateDir], { cwd: box.dir });
  const pids: Array<number | undefined> = [];
  const dispose = async () => {
    killAll(pids);
    try {
      child.kill("SIGKILL");
      await child.status;
      await child.stderr.cancel();
    } catch {
      // Ended already.
    }
    await box[Symbol.asyncDispose]();
  };
  try {
    const header = await waitForLine(lines, (l) => l.startsWith("run "));
    const runId = header.split(" ")[1];
    const shellPid = await poll(() => readPid(`${box.dir}/pids/shell.1`), { what: "shell step" });
    pids.push(shellPid);
    const denoPid = await poll(() => readPid(`${box.dir}/pids/deno.1`), { what: "deno step" });
    pids.push(denoPid);
    child.kill("SIGKILL");
    await child.status;
    await child.stderr.cancel();
    return {
      dir: box.dir,
      stateDir: box.stateDir,
      runId,
      shellPid,
      denoPid,
      [Symbol.asyncDispose]: dispose,
    };
  } catch (error) {
    await dispose();
    throw error;
  }
}

Deno.test("SIGKILL of runnel run mid-step: resume reaps the dead runner's shell and deno steps before running them again", async () => {
  await using run = await crashMidStep();
  const { dir, stateDir, runId, shellPid, denoPid } = run;
  // The defect this guards against: both steps outlive their runner.
  assert.ok(await alive(shellPid), "the shell step outlived its runner");
  assert.ok(await alive(denoPid), "the deno step outlived its runner");

  const resumed = await runCli(["resume", runId, "--state-dir", stateDir], { cwd: dir });
  const shown = await runCli(["show", runId, "--state-dir", stateDir], { cwd: dir });
  assert.equal(resumed.code, 0, resumed.stderr + resumed.stdout + shown.stdout);
  assert.equal(await alive(shellPid), false, "the old shell attempt was reaped");
  assert.equal(await alive(denoPid), false, "the old deno attempt was reaped");
  const attempts = (await Deno.readTextFile(`${dir}/pids/shell.attempts`)).trim();
  assert.equal(attempts, "1\n2", "the side effect ran once per attempt, one at a time");

  const state = await openLocalState(stateDir);
  try {
    const steps = await readStepStates(state.store, runId);
    assert.equal(steps["side-effect"].status, "succeeded");
    assert.equal(steps.sandboxed.status, "succeeded");
    assert.equal(steps["side-effect"].attempts.length, 2);
  } finally {
    await state.close();
  }
  // Nothing of the dead runner remains: not its steps, not its plugin hosts.
  await poll(
    async () => (await processesMentioning(dir)).length === 0 ? true : undefined,
    { what: "every process of the run to end" },
  ).catch(async (error) => {
    const left = await processesMentioning(dir);
    throw new Error(`${error.message}: ${left.map((p) => `${p.pid} ${p.args}`).join("; ")}`);
  });
});

Deno.test("runnel cancel of a run whose runner was SIGKILLed reaps its steps' processes", async () => {
  await using run = await crashMidStep();
  const { dir, stateDir, runId, shellPid, denoPid } = run;
  const cancelled = await runCli(["cancel", runId, "--state-dir", stateDir], { cwd: dir });
  assert.equal(cancelled.code, 0, cancelled.stderr + cancelled.stdout);
  assert.equal(await alive(shellPid), false, "the shell step was reaped");
  assert.equal(await alive(denoPid), false, "the deno step was reaped");
  const show = await runCli(["show", runId, "--state-dir", stateDir, "--json"], { cwd: dir });
  assert.equal(JSON.parse(show.stdout).status, "cancelled");
});
