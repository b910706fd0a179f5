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
 * pid (found in `/proc`), and the directory is removed.
 *
 * @module
 */

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

/** Kills (SIGKILL) every process whose command line names a path inside `dir`; their pids. */
async function killLeftBehind(dir: string): Promise<number[]> {
  const killed: number[] = [];
  for await (const entry of Deno.readDir("/proc")) {
    const pid = Number(entry.name);
    if (!Number.isInteger(pid) || pid === Deno.pid) continue;
    let commandLine: string;
    try {
      commandLine = await Deno.readTextFile(`/proc/${pid}/cmdline`);
    } catch {
      continue; // Gone meanwhile, or not ours to read.
    }
    if (!commandLine.split("\0").some((arg) => arg.includes(`${dir}/`))) continue;
    try {
      Deno.kill(pid, "SIGKILL");
      killed.push(pid);
    } catch {
      // Exited meanwhile.
    }
  }
  return killed;
}
