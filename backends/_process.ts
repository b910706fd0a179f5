/**
 * A local subprocess as an {@link Execution}: its own process group (so a
 * cancel reaches grandchildren), live log chunks, and an optional marker
 * line on stderr through which a cooperating child reports why it failed.
 *
 * Shared by the `deno` and `shell` backends; internal to `backends/`.
 *
 * @module
 */

import {
  DEFAULT_CANCEL_GRACE_MS,
  type Execution,
  type ExitStatus,
  type LogChunk,
} from "./backend.ts";

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
}

/** Spawns a command in a new process group and wraps it as an execution. */
export function spawnExecution(options: SpawnOptions): Execution {
  const child = new Deno.Command(options.command, {
    args: options.args,
    cwd: options.cwd,
    env: options.env,
    clearEnv: true,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    // `detached` makes the child call setsid(): it leads a new process group
    // whose id is its pid, so `kill(-pid)` reaches everything it started.
    detached: true,
  }).spawn();
  const queue = new ChunkQueue();
  const readers: ReadableStreamDefaultReader<Uint8Array>[] = [];
  const stdoutPump = pump(child.stdout, readers, (data) => queue.push({ stream: "stdout", data }));
  const stderrFilter = options.markerPrefix
    ? new MarkerFilter(options.markerPrefix, options.onMarker ?? (() => {}))
    : undefined;
  const encoder = new TextEncoder();
  const pushStderr = (data: Uint8Array) => {
    if (!stderrFilter) return queue.push({ stream: "stderr", data });
    const text = stderrFilter.write(data);
    if (text) options.onStderrText?.(text);
    if (text) queue.push({ stream: "stderr", data: encoder.encode(text) });
  };
  const stderrPump = pump(child.stderr, readers, pushStderr).then(() => {
    const rest = stderrFilter?.end();
    if (rest) options.onStderrText?.(rest);
    if (rest) queue.push({ stream: "stderr", data: encoder.encode(rest) });
  });
  let cancelled = false;
  let exited = false;
  const exitPromise = child.status.then((status) => {
    exited = true;
    return status;
  });

  const killGroup = (signal: Deno.Signal) => {
    try {
      Deno.kill(-child.pid, signal);
    } catch {
      // The group is already gone (ESRCH); nothing left to signal.
    }
  };

  const waitPromise = (async (): Promise<ExitStatus> => {
    const status = await exitPromise;
    // A step's processes must not outlive it: reap what it left behind.
    killGroup("SIGKILL");
    const drained = Promise.all([stdoutPump, stderrPump]);
    const timedOut = await raceTimeout(drained, DRAIN_DEADLINE_MS);
    if (timedOut) {
      await Promise.allSettled(readers.map((reader) => reader.cancel()));
      await Promise.allSettled([stdoutPump, stderrPump]);
    }
    queue.close();
    let result: ExitStatus = { exitCode: status.code };
    if (status.signal) result.signal = status.signal;
    if (cancelled) {
      result.errorClass = "cancelled";
      result.message = "step was cancelled";
      return result;
    }
    if (options.finish) result = await options.finish(result);
    return result;
  })();

  return {
    handle: String(child.pid),
    logs: queue,
    wait: () => waitPromise,
    async cancel(graceMs = DEFAULT_CANCEL_GRACE_MS) {
      if (exited) return;
      cancelled = true;
      killGroup("SIGTERM");
      if (await raceTimeout(exitPromise, graceMs)) {
        killGroup("SIGKILL");
        await exitPromise;
      }
    },
    async cleanup() {
      if (!exited) {
        cancelled = true;
        killGroup("SIGKILL");
      }
      await waitPromise;
    },
  };
}

/** Resolves true if `promise` has not settled within `ms`. */
async function raceTimeout(promise: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const deadline = new Promise<boolean>((resolve) => {
    timer = setTimeout(() => resolve(true), ms);
  });
  try {
    return await Promise.race([promise.then(() => false, () => false), deadline]);
  } finally {
    clearTimeout(timer);
  }
}

async function pump(
  stream: ReadableStream<Uint8Array>,
  readers: ReadableStreamDefaultReader<Uint8Array>[],
  onChunk: (data: Uint8Array) => void,
): Promise<void> {
  const reader = stream.getReader();
  readers.push(reader);
  try {
    while (true) {
      const { done, value } = await reader.read();
      if (done) return;
      if (value.byteLength > 0) onChunk(value);
    }
  } catch {
    // A cancelled reader ends the pump; what was read has been delivered.
  } finally {
    reader.releaseLock();
  }
}

/** An unbounded single-consumer queue of log chunks. */
class ChunkQueue implements AsyncIterable<LogChunk> {
  #items: LogChunk[] = [];
  #wake: (() => void) | undefined;
  #closed = false;

  push(chunk: LogChunk): void {
    this.#items.push(chunk);
    this.#wake?.();
  }

  close(): void {
    this.#closed = true;
    this.#wake?.();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<LogChunk> {
    while (true) {
      if (this.#items.length > 0) {
        yield this.#items.shift()!;
        continue;
      }
      if (this.#closed) return;
      await new Promise<void>((resolve) => {
        this.#wake = resolve;
      });
      this.#wake = undefined;
    }
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
