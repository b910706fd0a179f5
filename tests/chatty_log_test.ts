/**
 * A chatty step (100 MiB of log) costs bounded memory: in local mode the
 * runner and its plugin host, in a cluster the agent, its plugin host and
 * the server. Peak resident memory (`VmHWM` of /proc/PID/status, read with
 * grep: Deno guards other processes' /proc entries behind --allow-all) of
 * each process is compared with the same processes running a quiet step.
 * Locally the whole log is kept; the cluster stores 16 MiB per attempt and
 * says how much more there was.
 *
 * @module
 */

import assert from "node:assert/strict";
import { RunClient } from "../agent/client/mod.ts";
import { MAX_STORED_LOG_CHARS } from "../agent/server/gateway.ts";
import { CLI_PERMISSIONS, MAIN, poll, sandbox, spawnCli } from "./_helpers.ts";

const MIB = 1024 * 1024;
const LOG_BYTES = 100 * MIB;
/** Growth of peak memory a chatty step may cost any one process (the brief's generous bound). */
const MAX_GROWTH_BYTES = 250 * MIB;
const TOKEN = "chatty-join-token-0123456789";
const ADMIN = "chatty-admin-token-0123456789";

function pipeline(bytes: number): string {
  return `name: chatty
steps:
  talk:
    backend: shell
    run: yes 0123456789012345678901234567890123456789012345678901234567890123456789 | head -c ${bytes}
`;
}

/** Peak resident bytes (VmHWM) of each pid and its descendants still alive, by pid. */
async function peaks(pids: number[]): Promise<Map<number, number>> {
  const script = `for p in ${
    pids.join(" ")
  }; do for c in $p $(pgrep -P $p); do echo "$c $(grep VmHWM /proc/$c/status 2>/dev/null)"; done; done`;
  const output = await new Deno.Command("sh", { args: ["-c", script], stdout: "piped" }).output();
  const found = new Map<number, number>();
  for (const line of new TextDecoder().decode(output.stdout).split("\n")) {
    const match = /^(\d+) VmHWM:\s+(\d+) kB/.exec(line);
    if (match) found.set(Number(match[1]), Number(match[2]) * 1024);
  }
  return found;
}

/** Samples the peaks of `pids` (and children) until stopped; returns the last seen per pid. */
function sampler(pids: () => number[]) {
  const seen = new Map<number, number>();
  let stopped = false;
  const done = (async () => {
    while (!stopped) {
      for (const [pid, bytes] of await peaks(pids())) {
        seen.set(pid, Math.max(bytes, seen.get(pid) ?? 0));
      }
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  })();
  return {
    async stop(): Promise<Map<number, number>> {
      stopped = true;
      await done;
      return seen;
    },
  };
}

async function localRun(dir: string, bytes: number): Promise<{ peak: number[]; log: number }> {
  await Deno.writeTextFile(`${dir}/chatty.yaml`, pipeline(bytes));
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", ...CLI_PERMISSIONS, MAIN, "run", "chatty.yaml", "--json"],
    cwd: dir,
    env: { NO_COLOR: "1" },
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const memory = sampler(() => [child.pid]);
  const output = await child.output();
  const seen = await memory.stop();
  assert.equal(output.code, 0, new TextDecoder().decode(output.stderr));
  const runner = seen.get(child.pid) ?? 0;
  const others = [...seen].filter(([pid]) => pid !== child.pid).map(([, peak]) => peak);
  let log = 0;
  for await (const run of Deno.readDir(`${dir}/.runnel/logs`)) {
    log += await sizeOf(`${dir}/.runnel/logs/${run.name}`);
  }
  return { peak: [runner, Math.max(0, ...others)], log };
}

async function sizeOf(path: string): Promise<number> {
  const info = await Deno.stat(path);
  if (!info.isDirectory) return info.size;
  let total = 0;
  for await (const entry of Deno.readDir(path)) total += await sizeOf(`${path}/${entry.name}`);
  return total;
}

function mib(bytes: number): string {
  return `${(bytes / MIB).toFixed(0)} MiB`;
}

Deno.test("chatty step, local: 100 MiB of log in bounded memory, all of it kept", async () => {
  await using quiet = await sandbox();
  await using loud = await sandbox();
  const base = await localRun(quiet.dir, 1_000);
  const chatty = await localRun(loud.dir, LOG_BYTES);
  console.log(
    `local peak RSS: runner ${mib(base.peak[0])} → ${mib(chatty.peak[0])}, plugin host ${
      mib(base.peak[1])
    } → ${mib(chatty.peak[1])}; log kept ${mib(chatty.log)}`,
  );
  assert.ok(chatty.peak[0] - base.peak[0] < MAX_GROWTH_BYTES, "runner");
  assert.ok(chatty.peak[1] - base.peak[1] < MAX_GROWTH_BYTES, "plugin host");
  assert.ok(chatty.log >= LOG_BYTES, `${chatty.log} bytes of log kept`);
});

Deno.test("chatty step, cluster: 100 MiB of log in bounded memory on agent and server; the stored part says what it left out", async () => {
  await using box = await sandbox();
  const token = await box.write("admin.token", ADMIN);
  const server = spawnCli([
    "server",
    "--store",
    `${box.dir}/server.db`,
    "--listen",
    "127.0.0.1:0",
    "--grpc",
    "127.0.0.1:0",
    "--token",
    TOKEN,
    "--admin-token-file",
    token,
  ], { cwd: box.dir });
  let agent: ReturnType<typeof spawnCli> | undefined;
  try {
    const started = await new Promise<string>((resolve, reject) => {
      (async () => {
        const reader = server.child.stderr.pipeThrough(new TextDecoderStream());
        let text = "";
        for await (const chunk of reader) {
          text += chunk;
          const match = /API http:\/\/([\d.:]+) · agents ([\d.]+:\d+)/.exec(text);
          if (match) return resolve(`${match[1]} ${match[2]}`);
        }
        reject(new Error(`server ended: ${text}`));
      })().catch(reject);
    });
    const [http, grpc] = started.split(" ");
    agent = spawnCli([
      "agent",
      "--server",
      grpc,
      "--token",
      TOKEN,
      "--allow-shell",
      "--state-dir",
      `${box.dir}/agent`,
      "--artifacts",
      `${box.dir}/artifacts`,
    ], { cwd: box.dir });
    const client = new RunClient([`http://${http}`], { token: ADMIN });
    await poll(async () => {
      const response = await fetch(`http://${http}/cluster-state`, {
        headers: { authorization: `Bearer ${ADMIN}` },
      });
      const state = await response.json() as { workers?: unknown[] };
      return (state.workers?.length ?? 0) === 1 || undefined;
    }, { retryOnError: true, what: "the agent to register" });
    const pids = () => [server.child.pid, agent!.child.pid];
    const run = async (bytes: number) => {
      const memory = sampler(pids);
      const { runId } = await client.submit(pipeline(bytes), "chatty.yaml", box.dir);
      const finished = await poll(async () => {
        const { run } = await client.run(runId);
        return ["succeeded", "failed"].includes(run.status) ? run : undefined;
      }, { timeoutMs: 120_000, what: "the chatty run" });
      const seen = await memory.stop();
      assert.equal(finished.status, "succeeded");
      return { runId, seen };
    };
    const quiet = await run(1_000);
    const loud = await run(LOG_BYTES);
    const peakOf = (seen: Map<number, number>, pid: number) => seen.get(pid) ?? 0;
    const hostOf = (seen: Map<number, number>) =>
      Math.max(
        0,
        ...[...seen].filter(([pid]) => !pids().includes(pid)).map(([, peak]) => peak),
      );
    let text = "";
    for await (const { event, data } of client.logs(loud.runId, { step: "talk" })) {
      if (event === "log") text += (data as { text: string }).text;
    }
    console.log(
      `cluster peak RSS: server ${mib(peakOf(quiet.seen, server.child.pid))} → ${
        mib(peakOf(loud.seen, server.child.pid))
      }, agent ${mib(peakOf(quiet.seen, agent.child.pid))} → ${
        mib(peakOf(loud.seen, agent.child.pid))
      }, plugin host ${mib(hostOf(quiet.seen))} → ${mib(hostOf(loud.seen))}; log stored ${
        mib(text.length)
      }`,
    );
    for (const pid of pids()) {
      assert.ok(peakOf(loud.seen, pid) - peakOf(quiet.seen, pid) < MAX_GROWTH_BYTES, `pid ${pid}`);
    }
    assert.ok(hostOf(loud.seen) - hostOf(quiet.seen) < MAX_GROWTH_BYTES, "plugin host");
    assert.ok(text.length >= MAX_STORED_LOG_CHARS && text.length < MAX_STORED_LOG_CHARS + 1024);
    const dropped = /\[runnel: (\d+) characters of this attempt's log were not stored/.exec(text);
    assert.ok(dropped, text.slice(-500));
    assert.equal(Number(dropped[1]), LOG_BYTES - MAX_STORED_LOG_CHARS);
  } finally {
    for (const child of [agent?.child, server.child]) {
      try {
        child?.kill("SIGKILL");
      } catch {
        // Already gone.
      }
      await child?.status;
      await child?.stdout.cancel().catch(() => {});
    }
    await server.child.stderr.cancel().catch(() => {});
    await agent?.child.stderr.cancel().catch(() => {});
  }
});
