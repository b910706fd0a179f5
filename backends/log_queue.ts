/**
 * The log queue every backend can use for `Execution.logs`.
 *
 * @module
 */

import type { LogChunk } from "./backend.ts";

const DONE: IteratorReturnResult<undefined> = { done: true, value: undefined };

/**
 * Bytes of unread log a queue keeps in memory. Past it, chunks go to a
 * spill file (unlinked at once, so nothing is left behind) and come back
 * in order as the reader catches up: a step printing faster than its
 * reader takes costs disk, not memory.
 */
export const LOG_QUEUE_MEMORY_BYTES = 4 * 1024 * 1024;

/** Options of {@link LogQueue}. */
export interface LogQueueOptions {
  /** Unread bytes kept in memory before spilling (default {@link LOG_QUEUE_MEMORY_BYTES}). */
  memoryBytes?: number;
  /** Where spill files go (default the system's temporary directory). */
  spillDir?: string;
}

/** A spill record's header: stream (1 byte), then the data's length (4 bytes). */
const HEADER_BYTES = 5;

/**
 * A single-consumer queue of log chunks: what a backend hands out as
 * `Execution.logs`. Push chunks as they arrive, close it at the end; the
 * reader gets everything pushed, in order, then finishes. Unread chunks
 * past {@link LOG_QUEUE_MEMORY_BYTES} wait in a spill file; where no file
 * can be written (a sandboxed plugin host, whose reader is the relay that
 * drains it at once) they stay in memory.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { LogQueue } from "./log_queue.ts";
 *
 * const logs = new LogQueue();
 * logs.push({ stream: "stdout", data: new TextEncoder().encode("hi\n") });
 * logs.push({ stream: "stderr", data: new TextEncoder().encode("oops\n") });
 * logs.close();
 * const seen: string[] = [];
 * for await (const chunk of logs) {
 *   seen.push(`${chunk.stream}: ${new TextDecoder().decode(chunk.data)}`);
 * }
 * assert.deepEqual(seen, ["stdout: hi\n", "stderr: oops\n"]);
 * ```
 */
export class LogQueue implements AsyncIterable<LogChunk> {
  #items: LogChunk[] = [];
  #head = 0;
  #memoryBytes = 0;
  #waiter: ((result: IteratorResult<LogChunk>) => void) | undefined;
  #closed = false;
  readonly #limit: number;
  readonly #spillDir: string | undefined;
  /** The spill file, once one was needed; kept (empty) for the next burst. */
  #file: Deno.FsFile | undefined;
  /** Bytes written to and read from the spill file: unread ones mean every new chunk goes there, for order. */
  #written = 0;
  #read = 0;
  /** The spill file could not be made: memory it is. */
  #spillFailed = false;
  /** The reader stopped early: nothing pushed is read any more. */
  #abandoned = false;
  /** Producers waiting for room (see `room`). */
  #roomWaiters: (() => void)[] = [];

  /** Makes an empty queue. */
  constructor(options: LogQueueOptions = {}) {
    this.#limit = options.memoryBytes ?? LOG_QUEUE_MEMORY_BYTES;
    this.#spillDir = options.spillDir;
  }

  /** Bytes of unread log held in memory now (for tests and metrics). */
  get memoryBytes(): number {
    return this.#memoryBytes;
  }

  /**
   * Resolves once the producer may push on: at once while memory is under
   * its budget or a spill file takes the rest, else when the reader has
   * caught up (or stopped). A producer that can wait (a pipe reader) awaits
   * it, so a queue that cannot spill still stays bounded.
   */
  room(): Promise<void> {
    if (!this.full) return Promise.resolve();
    return new Promise((resolve) => this.#roomWaiters.push(resolve));
  }

  /**
   * Whether a producer should pause (memory is at its budget and no spill
   * file takes more): one fed by events pauses its source and resumes it
   * when {@link LogQueue.room} resolves.
   */
  get full(): boolean {
    return !(this.#closed || this.#abandoned || this.#memoryBytes < this.#limit ||
      this.#written > this.#read || this.#openSpill());
  }

  #wakeProducers(): void {
    const waiters = this.#roomWaiters;
    this.#roomWaiters = [];
    for (const wake of waiters) wake();
  }

  /** Adds a chunk (or hands it to a waiting reader). */
  push(chunk: LogChunk): void {
    if (this.#abandoned) return;
    const waiter = this.#waiter;
    if (waiter) {
      this.#waiter = undefined;
      waiter({ done: false, value: chunk });
      return;
    }
    if (
      this.#written > this.#read ||
      (this.#memoryBytes + chunk.data.length > this.#limit && this.#openSpill())
    ) {
      this.#write(chunk);
      return;
    }
    this.#items.push(chunk);
    this.#memoryBytes += chunk.data.length;
  }

  /** Ends the queue: the reader finishes after what is buffered. */
  close(): void {
    this.#closed = true;
    const waiter = this.#waiter;
    this.#waiter = undefined;
    waiter?.(DONE);
    if (waiter) this.#dropSpill();
    this.#wakeProducers();
  }

  [Symbol.asyncIterator](): AsyncIterator<LogChunk> {
    let finished = false;
    return {
      next: () => {
        if (finished) return Promise.resolve(DONE);
        const result = this.#take();
        if (result) {
          if (result.done) finished = true;
          return Promise.resolve(result);
        }
        return new Promise((resolve) => {
          this.#waiter = resolve;
        });
      },
      return: () => {
        finished = true;
        this.#abandoned = true;
        this.#items = [];
        this.#memoryBytes = 0;
        this.#wakeProducers();
        this.#dropSpill();
        return Promise.resolve(DONE);
      },
    };
  }

  /** The next result if one is ready now. */
  #take(): IteratorResult<LogChunk> | undefined {
    if (this.#head < this.#items.length) {
      const chunk = this.#items[this.#head];
      this.#items[this.#head++] = undefined as unknown as LogChunk;
      this.#memoryBytes -= chunk.data.length;
      if (this.#roomWaiters.length > 0 && this.#memoryBytes < this.#limit) this.#wakeProducers();
      if (this.#head === this.#items.length) {
        this.#items = [];
        this.#head = 0;
      }
      return { done: false, value: chunk };
    }
    if (this.#written > this.#read) return { done: false, value: this.#readSpilled() };
    if (this.#closed) {
      this.#dropSpill();
      return DONE;
    }
    return undefined;
  }

  #openSpill(): boolean {
    if (this.#file) return true;
    if (this.#spillFailed || this.#closed) return false;
    try {
      const path = Deno.makeTempFileSync({ dir: this.#spillDir, prefix: "runnel-log-" });
      this.#file = Deno.openSync(path, { read: true, write: true });
      Deno.removeSync(path);
      return true;
    } catch {
      this.#file?.close();
      this.#file = undefined;
      this.#spillFailed = true;
      return false;
    }
  }

  #dropSpill(): void {
    this.#file?.close();
    this.#file = undefined;
    this.#written = 0;
    this.#read = 0;
  }

  #write(chunk: LogChunk): void {
    const file = this.#file!;
    const record = new Uint8Array(HEADER_BYTES + chunk.data.length);
    record[0] = chunk.stream === "stdout" ? 0 : 1;
    new DataView(record.buffer).setUint32(1, chunk.data.length);
    record.set(chunk.data, HEADER_BYTES);
    file.seekSync(this.#written, Deno.SeekMode.Start);
    for (let at = 0; at < record.length;) at += file.writeSync(record.subarray(at));
    this.#written += record.length;
  }

  #readSpilled(): LogChunk {
    const file = this.#file!;
    file.seekSync(this.#read, Deno.SeekMode.Start);
    const header = readExactly(file, HEADER_BYTES);
    const length = new DataView(header.buffer).getUint32(1);
    const data = readExactly(file, length);
    this.#read += HEADER_BYTES + length;
    if (this.#read === this.#written) {
      // Drained: back to memory, and the file starts over.
      file.truncateSync(0);
      this.#written = 0;
      this.#read = 0;
    }
    return { stream: header[0] === 0 ? "stdout" : "stderr", data };
  }
}

function readExactly(file: Deno.FsFile, length: number): Uint8Array {
  const buffer = new Uint8Array(length);
  for (let at = 0; at < length;) {
    const read = file.readSync(buffer.subarray(at));
    if (read === null || read === 0) {
      throw new Error("Expected the log spill file to hold what was written");
    }
    at += read;
  }
  return buffer;
}
