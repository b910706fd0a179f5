/**
 * A local subprocess as an {@link Execution}: its own process group (so a
 * cancel reaches grandchildren), live log chunks, and an optional marker
 * line on stderr through which a cooperating child reports why it failed.
 *
 * Its handle is `<pid>@<start time in epoch ms>`: a pid alone cannot tell
 * the step's process from a later one that reuses the number (after a
 * reboot, say), so `recover` kills a group only while its leader is still
 * the process started then.
 *
 * Shared by the `deno` and `shell` backends; internal to `backends/`.
 *
 * @module
 */

import {
  DEFAULT_CANCEL_GRACE_MS,
  type Execution,
  type ExitStatus,
  type RecoveredAttempt,
  type RecoverOptions,
} from "./backend.ts";
import { LogQueue } from "./log_queue.ts";
import { raceTimeout } from "../core/_async.ts";
import { isExecutable, KILL_PATHS, mayRun, PS_PATHS, SETSID_PATHS, usableTool } from "./_tools.ts";
import { ShellSignaller } from "./_signal.ts";

/**
 * How long output may keep arriving after the process exited before the
 * pipes are abandoned; leftover group members are killed first, so this only
 * guards against a process that escaped the group yet holds the pipe.
 */
const DRAIN_DEADLINE_MS = 2_000;

/** Options of {@link spawnExecution}. */
export interface SpawnOptions {
  command: string;
  args: string[];
  cwd: string;
  /** The whole environment of the child (nothing is inherited). */
  env: Record<string, string>;
  /** Stderr lines starting with this are taken out of the logs and handed to `onMarker`. */
  markerPrefix?: string;
  /** Receives the text after `markerPrefix` of each marker line. */
  onMarker?: (payload: string) => void;
  /** Sees the stderr text passed on to the logs (only with `markerPrefix`). */
  onStderrText?: (text: string) => void;
  /** Refines the status once the process has ended and its output is drained. */
  finish?: (status: ExitStatus) => ExitStatus | Promise<ExitStatus>;
  /**
   * Receives the child's stdin, piped, right after the spawn (a pre-started
   * `deno` step reads its step there); without it stdin is `/dev/null`.
   */
  onStdin?: (stdin: WritableStream<Uint8Array>) => void;
}

/**
 * How far ps(1)'s start time of a process may be from the one recorded at
 * spawn: ps prints whole seconds, computed from the boot time.
 */
const PROCESS_START_SLACK_MS = 3_000;

/** Bytes read from a pipe at once; Deno's own default chunk size. */
const READ_BUFFER_BYTES = 64 * 1024;

/** Read buffers kept for later executions (two per execution in flight is plenty). */
const MAX_POOLED_BUFFERS = 8;

/** Idle read buffers, reused so that an execution does not allocate 64 KiB per pipe. */
const bufferPool: ArrayBuffer[] = [];

/** The usable `setsid(1)` path, `null` when there is none; computed on first use. */
let setsidPath: string | null | undefined;

/** Absolute command paths known to be executable files (they rarely change). */
const executableCommands = new Map<string, boolean>();

/** Spawns a command in a new process group and wraps it as an execution. */
export function spawnExecution(options: SpawnOptions): Execution {
  const launcher = groupLauncher(options.command);
  const child = new Deno.Command(launcher ?? options.command, {
    args: launcher ? [options.command, ...options.args] : options.args,
    cwd: options.cwd,
    env: options.env,
    clearEnv: true,
    stdin: options.onStdin ? "piped" : "null",
    stdout: "piped",
    stderr: "piped",
    // The child must lead a new session and process group whose id is its
    // pid, so that `kill(-pid)` reaches everything it started. `setsid(1)`
    // does that and then execs the command in place (same pid); it lets Deno
    // use posix_spawn, where `detached` needs a fork of the whole runner,
    // which holds the runner's main thread about three times as long.
    detached: launcher === undefined,
  }).spawn();
  const startMs = Date.now();
  options.onStdin?.(child.stdin);
  const queue = new LogQueue();
  const readers: ReadableStreamBYOBReader[] = [];
  const stdoutPump = pump(
    child.stdout,
    readers,
    // The read buffer is reused: a chunk kept for the logs needs its own copy.
    (data) => {
      queue.push({ stream: "stdout", data: data.slice() });
      return queue.room();
    },
  );
  const stderrFilter = options.markerPrefix
    ? new MarkerFilter(options.markerPrefix, options.onMarker ?? (() => {}))
    : undefined;
  const pushStderrText = (text: string) => {
    if (!text) return;
    options.onStderrText?.(text);
    queue.push({ stream: "stderr", data: encoder.encode(text) });
  };
  const pushStderr = (data: Uint8Array) => {
    queue.push({ stream: "stderr", data: data.slice() });
    return queue.room();
  };
  const stderrPump = pump(
    child.stderr,
    readers,
    stderrFilter
      ? (data) => {
        pushStderrText(stderrFilter.write(data));
        return queue.room();
      }
      : pushStderr,
  ).then(() => {
    if (stderrFilter) pushStderrText(stderrFilter.end());
  });
  let pipesDrained = false;
  const markDrained = () => {
    pipesDrained = true;
  };
  const drained = Promise.all([stdoutPump, stderrPump]);
  drained.then(markDrained, markDrained);
  let cancelled = false;
  let exited = false;
  const exitPromise = child.status.then((status) => {
    exited = true;
    return status;
  });

  const killGroup = async (signal: Deno.Signal): Promise<void> => {
    if (await signalGroup(child.pid, signal)) return;
    // No such group: either it is gone (nothing left to signal), or
    // `setsid(1)` has not made it yet, and the child is still alone.
    if (launcher && !exited) {
      try {
        child.kill(signal);
      } catch {
        // Already gone.
      }
    }
  };

  const waitPromise = exitPromise.then(async (status): Promise<ExitStatus> => {
    // A step's processes must not outlive it: reap what it left behind.
    // Through kill(1) (a sandboxed host) this costs a spawn; it need not
    // hold up the result unless something still holds the pipes.
    const reaped = killGroup("SIGKILL");
    if (!pipesDrained) await reaped;
    // The pipes have usually reached end-of-file by now; only wait with a
    // deadline (and a timer) when they have not.
    if (!pipesDrained && await raceTimeout(drained, DRAIN_DEADLINE_MS)) {
      await Promise.allSettled(readers.map((reader) => reader.cancel()));
    }
    await drained;
    queue.close();
    const result: ExitStatus = { exitCode: status.code };
    if (status.signal) result.signal = status.signal;
    if (cancelled) {
      result.errorClass = "cancelled";
      result.message = "step was cancelled";
      return result;
    }
    return options.finish ? options.finish(result) : result;
  });

  let finalStatus: ExitStatus | undefined;
  waitPromise.then((status) => {
    finalStatus = status;
  }, () => {});

  return {
    handle: processHandle(child.pid, startMs),
    logs: queue,
    wait: () => waitPromise,
    status: () =>
      Promise.resolve(
        finalStatus ? { state: "exited", exit: finalStatus } : { state: "running" },
      ),
    async cancel(graceMs = DEFAULT_CANCEL_GRACE_MS) {
      if (exited) return;
      cancelled = true;
      await killGroup("SIGTERM");
      if (await raceTimeout(exitPromise, graceMs)) {
        await killGroup("SIGKILL");
        await exitPromise;
      }
    },
    cleanup() {
      if (!exited) {
        cancelled = true;
        killGroup("SIGKILL");
      }
      return waitPromise.then(() => {});
    },
  };
}

const encoder = new TextEncoder();

/** The handle of a process execution: `<pid>@<start time in epoch ms>`. */
export function processHandle(pid: number, startMs: number): string {
  return `${pid}@${startMs}`;
}

/** The pid and start time a process handle names; undefined for anything else. */
export function parseProcessHandle(handle: string): { pid: number; startMs: number } | undefined {
  const match = /^(\d{1,10})@(\d{1,15})$/.exec(handle);
  if (!match) return undefined;
  const pid = Number(match[1]);
  // Never pid 0 or 1: kill(-1) would signal every process it may.
  if (pid <= 1) return undefined;
  return { pid, startMs: Number(match[2]) };
}

/**
 * `recover` of the process backends: their steps cannot be found again
 * after the runner lost them (no labels on a process), so nothing is
 * re-attached; the process group of each handle is killed, but only while
 * its leader is still the process started then. Any recorded handle may
 * come back, however stale: a gone or reused pid, or a handle that is not
 * a process handle at all, is left alone.
 */
export async function reapProcessGroups(options: RecoverOptions): Promise<RecoveredAttempt[]> {
  for (const handle of options.handles ?? []) {
    const process = parseProcessHandle(handle);
    if (process && await isStartedAt(process.pid, process.startMs)) {
      await signalGroup(process.pid, "SIGKILL");
    }
  }
  return [];
}

/** True while `pid` names a process that started at `startMs` (give or take ps's precision). */
async function isStartedAt(pid: number, startMs: number): Promise<boolean> {
  const started = await processStartMs(pid);
  return started !== undefined && Math.abs(started - startMs) <= PROCESS_START_SLACK_MS;
}

/** `ps(1)`'s path; computed on first need. */
let psCommand: string | null | undefined;

/**
 * When the process `pid` started, in epoch ms, by ps(1) (Deno reads `/proc`
 * only under --allow-all); undefined when there is no such process.
 */
async function processStartMs(pid: number): Promise<number | undefined> {
  psCommand ??= usableTool(PS_PATHS) ?? null;
  if (psCommand === null) return undefined;
  try {
    const { stdout } = await new Deno.Command(psCommand, {
      args: ["-p", String(pid), "-o", "lstart="],
      // "Thu Dec  3 06:53:59 2026", in English and in UTC as asked.
      env: { LC_ALL: "C", TZ: "UTC" },
      clearEnv: true,
      stdin: "null",
      stdout: "piped",
      stderr: "null",
    }).output();
    const text = new TextDecoder().decode(stdout).trim();
    if (!text) return undefined;
    const parsed = Date.parse(`${text.replace(/\s+/g, " ")} UTC`);
    return Number.isNaN(parsed) ? undefined : parsed;
  } catch {
    return undefined;
  }
}

/**
 * The `setsid(1)` to start `command` through, or undefined to use Deno's
 * `detached` instead: only on Linux, only for an absolute path to an
 * executable file (so a missing command still fails `spawn()` itself rather
 * than becoming an exit code of `setsid`), and only with permission to run
 * `setsid` (a sandboxed backend host is granted its command alone).
 */
function groupLauncher(command: string): string | undefined {
  if (Deno.build.os !== "linux" || !command.startsWith("/")) return undefined;
  if (setsidPath === undefined) {
    setsidPath = usableTool(SETSID_PATHS) ?? null;
  }
  if (setsidPath === null) return undefined;
  let ok = executableCommands.get(command);
  if (ok === undefined) {
    ok = isExecutable(command);
    executableCommands.set(command, ok);
  }
  return ok ? setsidPath : undefined;
}

/** `kill(1)`'s path when `Deno.kill` is not granted; computed on first need. */
let killCommand: string | null | undefined;

/** The shell whose builtin `kill` signals groups when `Deno.kill` is not granted. */
const SIGNAL_SHELL = "/bin/sh";

/** The long-lived shell signalling for this host, `null` when it may not run one. */
let signaller: ShellSignaller | null | undefined;

/**
 * Sends `signal` to the process group `pgid`; false when there is no such
 * group. `Deno.kill` needs an unrestricted run grant, which a plugin host
 * does not have: there, its shell's builtin `kill` does it (see
 * `_signal.ts`), or `kill(1)` (granted by name) when it has no shell.
 */
async function signalGroup(pgid: number, signal: Deno.Signal): Promise<boolean> {
  try {
    Deno.kill(-pgid, signal);
    return true;
  } catch (error) {
    if (!(error instanceof Deno.errors.NotCapable)) return false;
  }
  if (signaller === undefined) {
    signaller = isExecutable(SIGNAL_SHELL) && mayRun(SIGNAL_SHELL)
      ? new ShellSignaller(SIGNAL_SHELL)
      : null;
  }
  const delivered = await signaller?.signal(pgid, signal);
  if (delivered !== undefined) return delivered;
  killCommand ??= usableTool(KILL_PATHS) ?? null;
  if (killCommand === null) return false;
  try {
    const { success } = await new Deno.Command(killCommand, {
      args: ["-s", signal.replace(/^SIG/, ""), "--", `-${pgid}`],
      stdin: "null",
      stdout: "null",
      stderr: "null",
    }).output();
    return success;
  } catch {
    return false;
  }
}

/**
 * Reads `stream` to its end into a pooled buffer; `onChunk` sees a view that
 * is only valid until it returns.
 */
async function pump(
  stream: ReadableStream<Uint8Array>,
  readers: ReadableStreamBYOBReader[],
  onChunk: (data: Uint8Array) => void | Promise<void>,
): Promise<void> {
  const reader = stream.getReader({ mode: "byob" });
  readers.push(reader);
  let buffer = bufferPool.pop() ?? new ArrayBuffer(READ_BUFFER_BYTES);
  try {
    while (true) {
      const { done, value } = await reader.read(new Uint8Array(buffer));
      // Reading transfers the buffer; the view handed back holds it now.
      if (value) buffer = value.buffer as ArrayBuffer;
      if (done) break;
      // Backpressure: the next read waits for the log's reader (the pipe fills, the step waits).
      if (value.byteLength > 0) await onChunk(value);
    }
    if (buffer.byteLength === READ_BUFFER_BYTES && bufferPool.length < MAX_POOLED_BUFFERS) {
      bufferPool.push(buffer);
    }
  } catch {
    // A cancelled reader ends the pump; what was read has been delivered.
  } finally {
    reader.releaseLock();
  }
}

/**
 * Removes marker lines from a byte stream while passing everything else on
 * at once: only a partial line that may still become a marker is held back.
 */
export class MarkerFilter {
  #decoder = new TextDecoder();
  #pending = "";
  #atLineStart = true;

  /** Builds a filter for lines starting with `prefix`. */
  constructor(readonly prefix: string, readonly onMarker: (payload: string) => void) {}

  /** Feeds bytes; returns the text to pass on. */
  write(data: Uint8Array): string {
    return this.#process(this.#decoder.decode(data, { stream: true }));
  }

  /** Ends the stream; returns what was held back. */
  end(): string {
    const text = this.#process(this.#decoder.decode());
    const rest = this.#pending;
    this.#pending = "";
    if (rest.startsWith(this.prefix)) {
      this.onMarker(rest.slice(this.prefix.length));
      return text;
    }
    return text + rest;
  }

  #process(chunk: string): string {
    let text = this.#pending + chunk;
    this.#pending = "";
    let out = "";
    while (text.length > 0) {
      const newline = text.indexOf("\n");
      if (this.#atLineStart) {
        const line = newline === -1 ? text : text.slice(0, newline);
        if (line.startsWith(this.prefix)) {
          if (newline === -1) {
            this.#pending = text;
            break;
          }
          this.onMarker(line.slice(this.prefix.length));
          text = text.slice(newline + 1);
          continue;
        }
        if (newline === -1 && this.prefix.startsWith(line)) {
          this.#pending = text;
          break;
        }
      }
      if (newline === -1) {
        out += text;
        this.#atLineStart = false;
        break;
      }
      out += text.slice(0, newline + 1);
      this.#atLineStart = true;
      text = text.slice(newline + 1);
    }
    return out;
  }
}
