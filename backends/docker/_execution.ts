/**
 * A container as an {@link Execution}: its output demultiplexed into log
 * chunks, its exit waited for, its usage sampled from `docker stats`, and
 * its removal left to `cleanup()`.
 *
 * The known traps of the Docker API are avoided here: no AutoRemove (it
 * races with reading the exit and the logs, dockerode#582), no TTY (it
 * merges stdout and stderr, dockerode#479), and a deadline on the output
 * stream after the exit (attach streams may never end, dockerode#422).
 *
 * @module
 */

import type { Buffer } from "node:buffer";
import type { Container, Docker, DockerStream } from "./_dockerode.ts";
import type { Usage } from "../../core/model.ts";
import {
  DEFAULT_CANCEL_GRACE_MS,
  type Execution,
  type ExecutionState,
  type ExitStatus,
  type LogChunk,
} from "../backend.ts";
import type { LogQueue } from "../log_queue.ts";
import { classifyContainerExit } from "./_container.ts";
import { daemonMessage, ignoreGone, isConnectionError, statusCodeOf } from "./_client.ts";
import { raceTimeout } from "../../core/_async.ts";

/**
 * How long output may keep arriving once the container has exited before
 * its stream is abandoned: the stream normally ends within milliseconds.
 */
const DRAIN_DEADLINE_MS = 2_000;

/** Exit code reported when the exit could not be learnt (the daemon went away). */
const UNKNOWN_EXIT_CODE = -1;

/** Adds text to a log queue as one chunk of `stream`. */
export function pushText(queue: LogQueue, stream: LogChunk["stream"], text: string): void {
  if (text) queue.push({ stream, data: encoder.encode(text) });
}

const encoder = new TextEncoder();

/** What {@link watchContainer} needs. */
export interface WatchOptions {
  docker: Docker;
  /** Id of a container that has been started (or has already exited). */
  containerId: string;
  /** Its multiplexed output (an attach stream, or logs), demultiplexed into `queue`. */
  output: DockerStream;
  /** Where the chunks go; may already hold build output. */
  queue: LogQueue;
  /** The container's memory limit, to name it when the container is killed for it. */
  memoryBytes?: number;
  /** False when the container is known to have exited already (no stats to sample). */
  running: boolean;
  /** Refines a status once the container has exited (the outputs check). */
  finish(status: ExitStatus): ExitStatus | Promise<ExitStatus>;
}

/** Wraps a started container as an execution. */
export function watchContainer(options: WatchOptions): Execution {
  const { docker, containerId, queue } = options;
  const container = docker.getContainer(containerId);
  const output = options.output;
  const outputEnded = streamEnded(output);
  // Backpressure: a container printing faster than its log is read waits on the attach stream.
  const pauseIfFull = () => {
    if (!queue.full) return;
    output.pause();
    queue.room().then(() => output.resume());
  };
  docker.modem.demuxStream(
    output,
    chunkWriter(queue, "stdout", pauseIfFull),
    chunkWriter(queue, "stderr", pauseIfFull),
  );
  const sampler = new UsageSampler();
  if (options.running) sampler.start(container);
  let cancelled = false;
  let exited = false;
  let final: ExitStatus | undefined;

  // The container has been started, so "not-running" cannot fire early; it
  // answers at once for a container that has exited already.
  const exitPromise: Promise<{ StatusCode: number }> = container.wait({ condition: "not-running" });

  const waitPromise = exitPromise.then(
    async (result): Promise<ExitStatus> => {
      exited = true;
      if (await raceTimeout(outputEnded, DRAIN_DEADLINE_MS)) output.destroy?.();
      sampler.stop();
      queue.close();
      const exitCode = Number(result.StatusCode);
      let oomKilled = false;
      if (exitCode !== 0 && !cancelled) {
        // Only a failed exit can be an OOM kill, so a success costs no inspect.
        oomKilled = await container.inspect().then(
          (info) => info.State?.OOMKilled === true,
          () => false,
        );
      }
      const status = classifyContainerExit({
        exitCode,
        oomKilled,
        memoryBytes: options.memoryBytes,
        cancelled,
      });
      const usage = sampler.usage();
      if (usage) status.usage = usage;
      return cancelled ? status : await options.finish(status);
    },
    (error): ExitStatus => {
      exited = true;
      output.destroy?.();
      sampler.stop();
      queue.close();
      if (cancelled && statusCodeOf(error) === 404) {
        return {
          exitCode: UNKNOWN_EXIT_CODE,
          errorClass: "cancelled",
          message: "step was cancelled",
        };
      }
      const why = isConnectionError(error)
        ? "lost contact with the Docker daemon"
        : "could not learn how the container ended";
      return {
        exitCode: UNKNOWN_EXIT_CODE,
        errorClass: "infrastructure",
        message: `${why}: ${daemonMessage(error)}`,
      };
    },
  ).then((status) => final = status);

  let cleaning: Promise<void> | undefined;
  return {
    handle: containerId,
    logs: queue,
    wait: () => waitPromise,
    async status(): Promise<ExecutionState> {
      if (final) return { state: "exited", exit: final };
      const info = await container.inspect().catch(() => undefined);
      if (info?.State?.Running) return { state: "running" };
      return { state: "exited", exit: await waitPromise };
    },
    async cancel(graceMs = DEFAULT_CANCEL_GRACE_MS) {
      if (exited) return;
      cancelled = true;
      // `docker stop`: SIGTERM, then SIGKILL once the grace (whole seconds) is over.
      await ignoreGone(container.stop({ t: Math.max(0, Math.ceil(graceMs / 1000)) }));
      await waitPromise;
    },
    cleanup() {
      cleaning ??= (async () => {
        if (!exited) {
          cancelled = true;
          await ignoreGone(container.kill());
        }
        await waitPromise;
        await ignoreGone(container.remove({ force: true, v: true }));
      })().catch((error) => {
        cleaning = undefined; // a later call may try again
        throw error;
      });
      return cleaning;
    },
  };
}

/**
 * An execution that has already ended without a running container: an image
 * build that failed, or a container the runtime could not start.
 */

/** A writable end for `demuxStream` that turns each payload into a log chunk. */
function chunkWriter(
  queue: LogQueue,
  stream: LogChunk["stream"],
  afterPush: () => void,
): NodeJS.WritableStream {
  return {
    write(data: Buffer | string) {
      const bytes = typeof data === "string" ? encoder.encode(data) : new Uint8Array(data);
      if (bytes.byteLength > 0) queue.push({ stream, data: bytes });
      afterPush();
      return true;
    },
  } as unknown as NodeJS.WritableStream;
}

/** Resolves when a stream has ended, closed or failed. */
function streamEnded(stream: NodeJS.ReadableStream): Promise<void> {
  return new Promise((resolve) => {
    stream.once("end", resolve);
    stream.once("close", resolve);
    stream.once("error", () => resolve());
  });
}

/** One sample of the `docker stats` stream, the fields read here. */
interface StatsSample {
  memory_stats?: { usage?: number; max_usage?: number };
  cpu_stats?: { cpu_usage?: { total_usage?: number } };
}

/**
 * Follows `docker stats` while a container runs: peak memory (cgroup v1's
 * `max_usage`, else the highest `usage` seen) and CPU time. The daemon
 * samples about once a second, so a container that lives less than that
 * may end without any usage.
 */
export class UsageSampler {
  #memoryPeakBytes = 0;
  #cpuNanos = 0;
  #stream: DockerStream | undefined;
  #stopped = false;
  #pending = "";

  /** Opens the stats stream; failures only mean no usage. */
  start(container: Container): void {
    container.stats({ stream: true }).then((stream) => {
      this.#stream = stream;
      if (this.#stopped) return stream.destroy?.();
      stream.on("data", (data: Buffer) => this.feed(data.toString()));
      stream.on("error", () => {});
    }, () => {});
  }

  /** Takes a piece of the newline-separated JSON stream. */
  feed(text: string): void {
    const lines = (this.#pending + text).split("\n");
    this.#pending = lines.pop() ?? "";
    for (const line of lines) {
      if (!line.trim()) continue;
      try {
        this.record(JSON.parse(line) as StatsSample);
      } catch {
        // A garbled sample is skipped; usage is best effort.
      }
    }
  }

  /** Takes one sample. */
  record(sample: StatsSample): void {
    const memory = sample.memory_stats;
    this.#memoryPeakBytes = Math.max(
      this.#memoryPeakBytes,
      memory?.max_usage ?? 0,
      memory?.usage ?? 0,
    );
    this.#cpuNanos = Math.max(this.#cpuNanos, sample.cpu_stats?.cpu_usage?.total_usage ?? 0);
  }

  /** Closes the stats stream. */
  stop(): void {
    this.#stopped = true;
    this.#stream?.destroy?.();
  }

  /** What was seen, or undefined when no sample carried any figure. */
  usage(): Usage | undefined {
    const usage: Usage = {};
    if (this.#memoryPeakBytes > 0) usage.memoryPeakBytes = this.#memoryPeakBytes;
    if (this.#cpuNanos > 0) usage.cpuMs = Math.round(this.#cpuNanos / 1e6);
    return Object.keys(usage).length > 0 ? usage : undefined;
  }
}
