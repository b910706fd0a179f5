/**
 * A simulated agent for the scale harness: one real gRPC stream to a server
 * speaking the agent protocol as `agent/worker/mod.ts` does — Hello with the
 * join token and, after its first registration, the credential the servers
 * issued it; heartbeats at the interval the Welcome names; `started` and
 * `result` for every assignment; failover to the next server when its
 * stream breaks, saying which results are still unacknowledged and sending
 * them again — but running nothing: an assignment completes at once or
 * after a configured delay.
 *
 * @module
 */

import { randomHex } from "../../core/_bytes.ts";
import { openAgentStream, type ServerConnection } from "../../proto/mod.ts";

/** What a simulated agent reports to the harness. */
export interface SimRecorder {
  /** An assignment arrived (first time only). */
  assigned(attemptId: string, at: number): void;
  /** A result was acknowledged as recorded. */
  acked(attemptId: string, at: number): void;
  /** A stream was welcomed. */
  welcomed(agentId: string, server: string): void;
}

/** Options of {@link SimAgent}. */
export interface SimAgentOptions {
  agentId: string;
  /** gRPC addresses; the agent starts at `first` and fails over in order. */
  servers: string[];
  first: number;
  token: string;
  slots: number;
  /** Time an assignment "runs" before its result is sent (0: at once). */
  delayMs: number;
  recorder: SimRecorder;
}

/** The successful result of a no-op attempt. */
const OK_RESULT = JSON.stringify({ ok: true, exitCode: 0, outputs: {} });

/** First pause before dialling the next server after a broken stream. */
const RECONNECT_FIRST_MS = 50;
const RECONNECT_MAX_MS = 1_000;

/** One simulated agent; `start` connects, `stop` ends its stream. */
export class SimAgent {
  readonly agentId: string;
  readonly #options: SimAgentOptions;
  readonly #sessionId = randomHex(16);
  #credential = "";
  #server: number;
  #stream: ServerConnection | undefined;
  #heartbeat: ReturnType<typeof setInterval> | undefined;
  #stopped = false;
  /** Attempts received, not yet reported. */
  readonly #running = new Set<string>();
  /** Attempts received at any time (a resent assignment is not run twice). */
  readonly #seen = new Set<string>();
  /** Results sent and not yet acknowledged: resent on the next stream. */
  readonly #unacked = new Set<string>();
  #loop: Promise<void> | undefined;
  #welcomed!: () => void;
  /** Resolves at the first Welcome. */
  readonly ready: Promise<void>;

  constructor(options: SimAgentOptions) {
    this.#options = options;
    this.agentId = options.agentId;
    this.#server = options.first % options.servers.length;
    this.ready = new Promise((resolve) => this.#welcomed = resolve);
  }

  /** Connects (and keeps reconnecting until {@link stop}). */
  start(): void {
    this.#loop ??= this.#connectLoop();
  }

  /** Ends the stream; resolves once the connect loop has returned. */
  async stop(): Promise<void> {
    this.#stopped = true;
    clearInterval(this.#heartbeat);
    this.#stream?.end();
    const stream = this.#stream;
    const timer = setTimeout(() => stream?.cancel("stopped"), 2_000);
    await this.#loop;
    clearTimeout(timer);
  }

  async #connectLoop(): Promise<void> {
    let delayMs = RECONNECT_FIRST_MS;
    while (!this.#stopped) {
      const welcomed = await this.#serve(this.#options.servers[this.#server]);
      if (this.#stopped) return;
      if (welcomed) delayMs = RECONNECT_FIRST_MS;
      // The next server, as an agent fails over after a broken stream.
      this.#server = (this.#server + 1) % this.#options.servers.length;
      await new Promise((resolve) => setTimeout(resolve, delayMs));
      delayMs = Math.min(delayMs * 2, RECONNECT_MAX_MS);
    }
  }

  async #serve(server: string): Promise<boolean> {
    const stream = openAgentStream(server);
    this.#stream = stream;
    let welcomed = false;
    await stream.send({
      hello: {
        agentId: this.agentId,
        token: this.#options.token,
        labels: { sim: "1" },
        capabilities: [{ backend: "shell", available: true, version: "sim", detail: "" }],
        version: "sim",
        runningAttemptIds: [...this.#running],
        slots: this.#options.slots,
        pendingResultAttemptIds: [...this.#unacked],
        credential: this.#credential,
        session: this.#sessionId,
        secretNames: [],
      },
    });
    for await (const message of stream) {
      switch (message.body) {
        case "welcome": {
          welcomed = true;
          if (message.welcome.credential) this.#credential = message.welcome.credential;
          clearInterval(this.#heartbeat);
          const every = Number(message.welcome.heartbeatIntervalMs) || 5_000;
          this.#heartbeat = setInterval(() => {
            stream.send({
              heartbeat: {
                sentAtMs: Date.now(),
                runningAttemptIds: [...this.#running],
                draining: false,
              },
            }).catch(() => {});
          }, every);
          this.#options.recorder.welcomed(this.agentId, server);
          this.#welcomed();
          // Results the last stream did not see acknowledged go again.
          for (const attemptId of this.#unacked) this.#sendResult(stream, attemptId);
          break;
        }
        case "reject":
          stream.cancel(message.reject.message);
          break;
        case "assign":
          this.#assigned(stream, message.assign.attemptId);
          break;
        case "ack":
          if (this.#unacked.delete(message.ack.attemptId) && message.ack.accepted) {
            this.#options.recorder.acked(message.ack.attemptId, Date.now());
          }
          break;
        case "cancel":
          this.#running.delete(message.cancel.attemptId);
          break;
        case "bundle":
          break;
      }
    }
    clearInterval(this.#heartbeat);
    await stream.closed;
    return welcomed;
  }

  #assigned(stream: ServerConnection, attemptId: string): void {
    if (this.#seen.has(attemptId)) return;
    this.#seen.add(attemptId);
    this.#running.add(attemptId);
    this.#options.recorder.assigned(attemptId, Date.now());
    stream.send({ started: { attemptId, handle: "sim", atMs: Date.now() } }).catch(() => {});
    const finish = () => {
      if (!this.#running.delete(attemptId)) return;
      this.#unacked.add(attemptId);
      // Whatever stream is current by now (the agent may have failed over).
      if (this.#stream) this.#sendResult(this.#stream, attemptId);
    };
    if (this.#options.delayMs > 0) setTimeout(finish, this.#options.delayMs);
    else queueMicrotask(finish);
  }

  #sendResult(stream: ServerConnection, attemptId: string): void {
    stream.send({ result: { attemptId, resultJson: OK_RESULT, atMs: Date.now() } })
      .catch(() => {});
  }
}
