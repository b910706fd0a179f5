/**
 * A benchmark in a process of its own, for the one that can crash at its
 * exit: Deno 2.9.6's `node:http2` can abort inside nghttp2 while a GOAWAY
 * closes an etcd client's session (denoland/deno#36788), after the cluster
 * bench's tables are printed. In `deno task bench`'s own process that ended
 * every benchmark after it, and left the bench's etcd members running (no
 * `unload` handler runs on an abort).
 *
 * The child gets a temporary directory of its own as `TMPDIR`, so every
 * etcd data directory it makes is inside it. Once it has exited, however it
 * did, any process still running with a `--data-dir` there is killed by its
 * pid (found with `ps`), and the directory is removed.
 *
 * @module
 */

import { PS_PATHS, usableTool } from "../backends/_tools.ts";

/** How a benchmark's process ended. */
export interface IsolatedOutcome {
  code: number;
  signal: Deno.Signal | null;
  /** Pids of the processes it left behind, killed here. */
  killed: number[];
}

/**
 * Runs `module` (a path next to this file) with `deno run` and the bench
 * task's permissions, its output going straight to this process's, and
 * ends whatever it left running.
 */
export async function runIsolated(module: string, args: string[] = []): Promise<IsolatedOutcome> {
  const tmp = await Deno.realPath(await Deno.makeTempDir({ prefix: "runnel-bench-isolated-" }));
  try {
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "--lock=deno.lock",
        "--allow-read",
        "--allow-write",
        "--allow-run",
        "--allow-env",
        "--allow-net",
        "--allow-sys",
        new URL(module, import.meta.url).pathname,
        ...args,
      ],
      cwd: new URL("..", import.meta.url).pathname,
      env: { TMPDIR: tmp },
      stdin: "null",
      stdout: "inherit",
      stderr: "inherit",
    }).spawn();
    const { code, signal } = await child.status;
    return { code, signal, killed: await killLeftBehind(tmp) };
  } finally {
    await Deno.remove(tmp, { recursive: true }).catch(() => {});
  }
}

/**
 * Kills (SIGKILL) every process whose command line names a path inside
 * `dir`; their pids. The command lines come from `ps`: Deno reads nothing
 * under `/proc` without `--allow-all`, which the bench task does not have.
 */
async function killLeftBehind(dir: string): Promise<number[]> {
  const ps = usableTool(PS_PATHS);
  if (!ps) {
    console.error(`bench: no ps(1) to find what the benchmark left running; see pkill -f ${dir}/`);
    return [];
  }
  // `-ww`: whole command lines, however long.
  const { stdout } = await new Deno.Command(ps, {
    args: ["-ww", "-eo", "pid=,args="],
    stdin: "null",
    stdout: "piped",
    stderr: "null",
  }).output();
  const killed: number[] = [];
  for (const line of new TextDecoder().decode(stdout).split("\n")) {
    const match = /^\s*(\d+)\s(.*)$/.exec(line);
    if (!match || !match[2].includes(`${dir}/`)) continue;
    const pid = Number(match[1]);
    if (pid === Deno.pid) continue;
    try {
      Deno.kill(pid, "SIGKILL");
      killed.push(pid);
    } catch {
      // Exited meanwhile.
    }
  }
  return killed;
}
