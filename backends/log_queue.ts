/**
 * The log queue every backend can use for `Execution.logs`.
 *
 * @module
 */

import type { LogChunk } from "./backend.ts";

const DONE: IteratorReturnResult<undefined> = { done: true, value: undefined };

/**
 * An unbounded single-consumer queue of log chunks: what a backend hands
 * out as `Execution.logs`. Push chunks as they arrive, close it at the
 * end; the reader gets everything pushed, in order, then finishes.
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
  #waiter: ((result: IteratorResult<LogChunk>) => void) | undefined;
  #closed = false;

  /** Adds a chunk (or hands it to a waiting reader). */
  push(chunk: LogChunk): void {
    const waiter = this.#waiter;
    if (waiter) {
      this.#waiter = undefined;
      waiter({ done: false, value: chunk });
      return;
    }
    this.#items.push(chunk);
  }

  /** Ends the queue: the reader finishes after what is buffered. */
  close(): void {
    this.#closed = true;
    const waiter = this.#waiter;
    this.#waiter = undefined;
    waiter?.(DONE);
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
        return Promise.resolve(DONE);
      },
    };
  }

  /** The next result if one is ready now. */
  #take(): IteratorResult<LogChunk> | undefined {
    if (this.#head < this.#items.length) {
      const chunk = this.#items[this.#head];
      this.#items[this.#head++] = undefined as unknown as LogChunk;
      if (this.#head === this.#items.length) {
        this.#items = [];
        this.#head = 0;
      }
      return { done: false, value: chunk };
    }
    return this.#closed ? DONE : undefined;
  }
}
