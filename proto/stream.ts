/**
 * {@link MessageStream}: one end of the agent stream over a raw grpc-js
 * duplex call, for the server ({@link AgentConnection}) and for the agent
 * ({@link ServerConnection}).
 *
 * @module
 */

import * as grpc from "npm:@grpc/grpc-js@1.14.7";
import type {
  AgentMessage,
  AgentMessageInit,
  ServerMessage,
  ServerMessageInit,
} from "./messages.ts";

/** How a stream ended. */
export interface StreamEnd {
  /** True for a clean end (gRPC status OK). */
  ok: boolean;
  /** The gRPC status code (`grpc.status`). */
  code: number;
  /** Human reason: the status details. */
  reason: string;
}

/**
 * One end of the agent stream. Iterate it (once) for incoming messages: the
 * iteration ends when the stream ends, cleanly or not (see `closed`).
 */
export interface MessageStream<In, Out> extends AsyncIterable<In> {
  /** Address of the other end. */
  readonly peer: string;
  /** False once the stream ended or was broken. */
  readonly open: boolean;
  /**
   * Sends a message; resolves true once the transport took it (waiting out
   * back-pressure), false when the stream is closed (the message is lost).
   */
  send(message: Out): Promise<boolean>;
  /** Ends this side cleanly; the stream closes once the other side ends too. */
  end(): void;
  /** Breaks the stream at once; the other end sees it fail. */
  cancel(reason?: string): void;
  /** Settles (never rejects) once the stream is over, saying how it ended. */
  readonly closed: Promise<StreamEnd>;
}

/**
 * The server's end of one agent's stream. Its iteration ends when the agent
 * ends its side (a stopping agent) or the stream breaks; call `end()` then:
 * `closed` settles once the server has ended its side too (or the agent
 * went away), and the agent waits for that end.
 */
export type AgentConnection = MessageStream<AgentMessage, ServerMessageInit>;
/** The agent's end of its stream to a server. */
export type ServerConnection = MessageStream<ServerMessage, AgentMessageInit>;

/** gRPC status codes, re-exported for callers that inspect {@link StreamEnd.code}. */
export const GrpcStatus = grpc.status;

/** A grpc-js duplex call, client or server side (they share the events used here). */
// deno-lint-ignore no-explicit-any
export type RawCall = any;

/**
 * A {@link MessageStream} over a grpc-js duplex call. The client side
 * learns how the stream ended from its `status` event, the server side from
 * `finish`, `cancelled` or `error`.
 */
export class GrpcMessageStream<In, Out> implements MessageStream<In, Out> {
  readonly peer: string;
  readonly closed: Promise<StreamEnd>;
  readonly #call: RawCall;
  readonly #side: "client" | "server";
  readonly #queue: In[] = [];
  #wake: (() => void) | undefined;
  #inputDone = false;
  #open = true;
  #ended = false;
  #iterated = false;
  /** Sends waiting out back-pressure, woken when the stream closes (see `send`). */
  readonly #drainWaiters = new Set<() => void>();

  /** Wraps `call`, the `side` end of a stream whose other end is `peer`. */
  constructor(call: RawCall, side: "client" | "server", peer: string) {
    this.#call = call;
    this.#side = side;
    this.peer = peer;
    let settle!: (end: StreamEnd) => void;
    this.closed = new Promise((resolve) => settle = resolve);
    const finish = (end: StreamEnd) => {
      this.#open = false;
      this.#finishInput();
      for (const wake of this.#drainWaiters) wake();
      settle(end);
    };
    call.on("data", (message: In) => {
      this.#queue.push(message);
      this.#wakeUp();
    });
    call.on("end", () => this.#finishInput());
    // An 'error' without a listener would be thrown by the EventEmitter.
    call.on("error", (error: { code?: number; details?: string; message?: string }) => {
      if (side === "server") {
        finish({
          ok: false,
          code: error.code ?? grpc.status.UNKNOWN,
          reason: error.details ?? error.message ?? "stream failed",
        });
      }
      // The client learns the outcome from 'status', which always follows.
    });
    if (side === "client") {
      call.on("status", (status: grpc.StatusObject) => {
        finish({ ok: status.code === grpc.status.OK, code: status.code, reason: status.details });
      });
    } else {
      call.on("cancelled", (reason: string) => {
        finish({
          ok: false,
          code: grpc.status.CANCELLED,
          reason: reason === "cancelled" ? "the agent went away" : reason,
        });
      });
      call.on("finish", () => finish({ ok: true, code: grpc.status.OK, reason: "OK" }));
    }
  }

  get open(): boolean {
    return this.#open;
  }

  async send(message: Out): Promise<boolean> {
    if (!this.#open || this.#ended) return false;
    const flushed = this.#call.write(message);
    if (flushed) return true;
    return await new Promise<boolean>((resolve) => {
      // Not a reaction to `closed`: that promise lives as long as the stream
      // (weeks for an agent's), and would keep every send that ever waited.
      const done = () => {
        this.#call.off("drain", done);
        this.#drainWaiters.delete(done);
        resolve(this.#open);
      };
      this.#call.on("drain", done);
      this.#drainWaiters.add(done);
      // Closed while it was written: no wake-up comes any more.
      if (!this.#open) done();
    });
  }

  end(): void {
    if (this.#ended || !this.#open) return;
    this.#ended = true;
    this.#call.end();
  }

  cancel(reason = "cancelled"): void {
    if (!this.#open) return;
    if (this.#side === "client") {
      this.#call.cancel();
    } else {
      // A server call has no cancel: finishing it with an error status is
      // what the agent sees of a server that dropped it.
      this.#call.emit("error", { code: grpc.status.UNAVAILABLE, details: reason });
    }
  }

  [Symbol.asyncIterator](): AsyncIterator<In> {
    if (this.#iterated) throw new Error("Expected a message stream to be iterated once");
    this.#iterated = true;
    return {
      next: async (): Promise<IteratorResult<In>> => {
        while (this.#queue.length === 0 && !this.#inputDone) {
          await new Promise<void>((resolve) => this.#wake = resolve);
        }
        if (this.#queue.length > 0) return { done: false, value: this.#queue.shift()! };
        return { done: true, value: undefined };
      },
      return: (): Promise<IteratorResult<In>> => {
        this.#finishInput();
        return Promise.resolve({ done: true, value: undefined });
      },
    };
  }

  #finishInput(): void {
    this.#inputDone = true;
    this.#wakeUp();
  }

  #wakeUp(): void {
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.();
  }
}
