/**
 * What an agent sends its server besides heartbeats — attempts started,
 * log chunks, results — in order, over whichever stream is up.
 *
 * - A message handed to a stream that breaks is not resent, except
 *   results: they are resent from the durable outbox after every Welcome
 *   (the server dedups them by attempt id), so the queue drops its copies
 *   when the stream breaks.
 * - Log text waiting while no server is connected is bounded
 *   ({@link MAX_LOG_BACKLOG_CHARS}): past it, an attempt's output is dropped
 *   and one marker line says so once a server is back.
 *
 * @module
 */

import type { AgentMessageInit, ServerConnection } from "../../proto/mod.ts";
import type { OutboxEntry } from "./outbox.ts";
import { MAX_LOG_BACKLOG_CHARS } from "./options.ts";

/**
 * Log text queued for a connected server past which a step's log writer
 * waits (a quarter of the backlog's cap, so a writer never meets the cap
 * while connected).
 */
export const LOG_SEND_HIGH_WATER_CHARS = MAX_LOG_BACKLOG_CHARS / 4;

/** Stands for the output an agent could not keep while no server was connected. */
export const DROPPED_LOG_MARKER =
  "[runnel agent: output dropped while no server was connected (backlog full)]\n";

/** The agent's outgoing messages, sent in order while a stream is attached. */
export class SendQueue {
  readonly #queue: AgentMessageInit[] = [];
  #logChars = 0;
  /** Attempts whose output was dropped during this disconnection (one marker line each). */
  readonly #dropped = new Set<string>();
  #pumping = false;
  #stream: ServerConnection | undefined;
  /** Log writers waiting for the backlog to shrink (see `room`). */
  #roomWaiters: (() => void)[] = [];

  /** `onError` hears of a send that failed unexpectedly. */
  constructor(readonly onError: (error: unknown) => void) {}

  /** Queues a message; it goes at once while a stream is attached. */
  push(message: AgentMessageInit): void {
    if ("log" in message) {
      const size = message.log.text?.length ?? 0;
      if (this.#logChars + size > MAX_LOG_BACKLOG_CHARS) {
        this.#dropped.add(message.log.attemptId ?? "");
        return;
      }
      this.#logChars += size;
    }
    this.#queue.push(message);
    this.#pump();
  }

  /**
   * Sends over `stream` from now on (a server welcomed the agent): first the
   * unacknowledged results, in the order they ended, unless already queued
   * behind their logs, then a marker for each attempt whose output was dropped.
   */
  attach(stream: ServerConnection, unacknowledged: OutboxEntry[]): void {
    for (const entry of unacknowledged) {
      const queued = this.#queue.some((message) =>
        "result" in message && message.result.attemptId === entry.attemptId
      );
      if (!queued) this.#queue.push({ result: entry });
    }
    for (const attemptId of this.#dropped) {
      this.#queue.push({ log: { attemptId, stream: "stderr", text: DROPPED_LOG_MARKER } });
    }
    this.#dropped.clear();
    this.#stream = stream;
    this.#pump();
  }

  /**
   * Resolves once a step's log may go on: at once while the backlog is
   * under {@link LOG_SEND_HIGH_WATER_CHARS} or no server is connected (then
   * the backlog's cap applies), else when sends have shrunk it. A step
   * printing faster than the server takes is slowed down, not cut: its
   * reader stops, its unread output waits in its backend's log queue.
   */
  room(): Promise<void> {
    if (!this.#stream || this.#logChars < LOG_SEND_HIGH_WATER_CHARS) return Promise.resolve();
    return new Promise((resolve) => this.#roomWaiters.push(resolve));
  }

  #wakeWriters(): void {
    const waiters = this.#roomWaiters;
    this.#roomWaiters = [];
    for (const wake of waiters) wake();
  }

  /** The stream is gone: results queued for it go again from the outbox after the next Welcome. */
  detach(): void {
    this.#stream = undefined;
    this.#wakeWriters();
    for (let i = this.#queue.length - 1; i >= 0; i--) {
      if ("result" in this.#queue[i]) this.#queue.splice(i, 1);
    }
  }

  #pump(): void {
    this.#drain().catch(this.onError);
  }

  /** Sends what is queued, in order, while a stream is attached. */
  async #drain(): Promise<void> {
    if (this.#pumping) return;
    this.#pumping = true;
    let broken: ServerConnection | undefined;
    try {
      // The stream is read anew on every turn: a Welcome on a new stream
      // while a send on the old one was pending carries on with the new one.
      while (this.#stream && this.#stream !== broken && this.#queue.length > 0) {
        const stream = this.#stream;
        const message = this.#queue[0];
        if (!(await stream.send(message))) {
          // Not taken by the transport: it stays queued for the next stream.
          broken = stream;
          continue;
        }
        // A result may have been taken out of the queue meanwhile (detach).
        if (this.#queue[0] === message) this.#queue.shift();
        if ("log" in message) {
          this.#logChars -= message.log.text?.length ?? 0;
          if (this.#logChars < LOG_SEND_HIGH_WATER_CHARS) this.#wakeWriters();
        }
      }
    } finally {
      this.#pumping = false;
    }
  }
}
