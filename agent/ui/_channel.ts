/**
 * A small queue between producers that push and one consumer that iterates:
 * what turns several watches into one stream of changes.
 *
 * @module
 */

/** Items pushed by producers, iterated once by a consumer, until closed. */
export class Channel<T> implements AsyncIterable<T> {
  #items: T[] = [];
  #wake?: () => void;
  #closed = false;
  #error: unknown;

  /** Adds an item (ignored once closed). */
  push(item: T): void {
    if (this.#closed) return;
    this.#items.push(item);
    this.#wake?.();
  }

  /** Ends the iteration after the items pushed so far; with an error, throws it then. */
  close(error?: unknown): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#error = error;
    this.#wake?.();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<T> {
    while (true) {
      while (this.#items.length > 0) yield this.#items.shift()!;
      if (this.#closed) {
        if (this.#error !== undefined) throw this.#error;
        return;
      }
      await new Promise<void>((resolve) => this.#wake = resolve);
      this.#wake = undefined;
    }
  }
}
