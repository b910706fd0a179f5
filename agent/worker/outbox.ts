/**
 * The agent's durable outbox of results.
 *
 * @module
 */

import { fileSafe } from "../../core/_paths.ts";

/** A result waiting for its acknowledgement, as the outbox keeps it. */
export interface OutboxEntry {
  attemptId: string;
  /** core/model.ts `AttemptResult` as JSON. */
  resultJson: string;
  atMs: number;
}

/**
 * The durable outbox of results: one file per result, written before it is
 * sent and removed when the server acknowledges it.
 */
export class Outbox {
  readonly #dir: string;
  readonly #entries = new Map<string, OutboxEntry>();

  /** An outbox in `dir`; call {@link load} before use. */
  constructor(dir: string) {
    this.#dir = dir;
  }

  /** Reads what an earlier process left; unreadable files are skipped. */
  async load(): Promise<OutboxEntry[]> {
    await Deno.mkdir(this.#dir, { recursive: true });
    for await (const file of Deno.readDir(this.#dir)) {
      if (!file.isFile || !file.name.endsWith(".json")) continue;
      const path = `${this.#dir}/${file.name}`;
      try {
        const entry = JSON.parse(await Deno.readTextFile(path));
        if (typeof entry?.attemptId === "string" && typeof entry.resultJson === "string") {
          this.#entries.set(entry.attemptId, entry);
        }
      } catch {
        // A write the process died in (see `add`): that result was never
        // sent, and its attempt's record is still there to recover it.
        await Deno.remove(path).catch(() => {});
      }
    }
    return this.entries();
  }

  /**
   * Records a result durably. One write, no rename: a file cut short by a
   * crash does not parse (a JSON object ends with its last byte) and is
   * dropped at `load` — its result was not sent yet, and the attempt's
   * record, removed only once this returned, is recovered instead.
   * Synchronous underneath, as the attempt records are: the file is a few
   * hundred bytes, and an async write costs several times that in
   * thread-pool hops on every step's path.
   */
  add(entry: OutboxEntry): Promise<void> {
    try {
      Deno.writeTextFileSync(this.#path(entry.attemptId), JSON.stringify(entry));
    } catch (error) {
      return Promise.reject(error);
    }
    this.#entries.set(entry.attemptId, entry);
    return Promise.resolve();
  }

  /** Forgets an acknowledged result; false when it was not there. */
  remove(attemptId: string): Promise<boolean> {
    if (!this.#entries.delete(attemptId)) return Promise.resolve(false);
    try {
      Deno.removeSync(this.#path(attemptId));
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) return Promise.reject(error);
    }
    return Promise.resolve(true);
  }

  /** Whether a result for the attempt waits. */
  has(attemptId: string): boolean {
    return this.#entries.has(attemptId);
  }

  /** The results waiting, oldest first. */
  entries(): OutboxEntry[] {
    return [...this.#entries.values()].sort((a, b) => a.atMs - b.atMs);
  }

  #path(attemptId: string): string {
    return `${this.#dir}/${fileSafe(attemptId)}.json`;
  }
}
