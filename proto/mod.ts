/**
 * The gRPC glue of cluster mode: `proto/runnel.proto` loaded with
 * `npm:@grpc/proto-loader`, served and dialled with `npm:@grpc/grpc-js`,
 * and typed.
 *
 * One bidirectional stream per agent (`AgentService.Connect`). Both ends get
 * the raw grpc-js duplex wrapped in a {@link MessageStream}: `send` with
 * back-pressure, `for await` over incoming messages, `end` for a clean
 * finish, `cancel` to break it, and `closed` saying how it ended.
 *
 * Messages are plain objects with camelCase fields; int64 fields are
 * numbers; the `body` oneof is a discriminated union on `body` for what is
 * received (`switch (message.body) { case "hello": message.hello… }`), and
 * one key naming the member for what is sent (`send({ hello: {…} })`).
 * Fields left out of a sent message take their proto3 defaults.
 *
 * grpc-js is pinned to 1.14.7: 1.13.0 cannot connect under Deno
 * (denoland/deno#28566). `proto/mod_test.ts` opens a real stream.
 *
 * @example
 * ```ts ignore
 * import { openAgentStream, serveAgentService } from "./mod.ts";
 * const server = await serveAgentService({
 *   address: "127.0.0.1:0",
 *   async onConnect(agent) {
 *     for await (const message of agent) {
 *       if (message.body === "hello") {
 *         await agent.send({ welcome: { serverId: "s1", heartbeatIntervalMs: 5000 } });
 *       }
 *     }
 *   },
 * });
 * const stream = openAgentStream(`127.0.0.1:${server.port}`);
 * await stream.send({ hello: { agentId: "a1", token: "secret" } });
 * for await (const message of stream) if (message.body === "welcome") break;
 * stream.end();
 * await server.close();
 * ```
 *
 * @module
 */

import { Buffer } from "node:buffer";
import { isIP } from "node:net";
import { checkServerIdentity, type PeerCertificate } from "node:tls";
import { fileURLToPath } from "node:url";
import * as grpc from "npm:@grpc/grpc-js@1.14.7";
import * as protoLoader from "npm:@grpc/proto-loader@0.8.1";
import type { AttemptSpec } from "../backends/backend.ts";
import type { InputLocator } from "../core/model.ts";

export type { ArtifactLocator, FanInLocator, InputLocator } from "../core/model.ts";

// ---------------------------------------------------------------------------
// Messages (runnel.v1), as grpc-js hands them over with the loader options
// below: camelCase, int64 as number, every field present with its default.

/** First message of every stream, from the agent. */
export interface Hello {
  agentId: string;
  /** The cluster's join token; a wrong or missing one is rejected. */
  token: string;
  labels: Record<string, string>;
  capabilities: Capability[];
  version: string;
  /** Attempts this agent is running (after a reconnect, or re-attached after a restart). */
  runningAttemptIds: string[];
  /** How many attempts the agent runs at once. */
  slots: number;
  /**
   * Attempts that ended while no server heard of it; their results follow
   * the Hello. Neither running nor lost: wait for their results.
   */
  pendingResultAttemptIds: string[];
}

/** What the agent can run: one per backend, from its fingerprint. */
export interface Capability {
  backend: string;
  available: boolean;
  version: string;
  detail: string;
}

/** The server accepted the agent. */
export interface Welcome {
  serverId: string;
  /** The heartbeat period the agent must keep. */
  heartbeatIntervalMs: number;
  /** Other servers the agent may fail over to (their gRPC addresses). */
  servers: string[];
}

/** Stable codes of {@link Reject}. */
export type RejectCode = "bad_token" | "bad_hello" | "duplicate_agent";

/** The server refused the agent; it closes the stream after this. */
export interface Reject {
  /** A {@link RejectCode}. */
  code: string;
  /** Human sentence, shown to the agent's operator. */
  message: string;
}

/** Liveness of the agent, every heartbeat interval. */
export interface Heartbeat {
  sentAtMs: number;
  runningAttemptIds: string[];
  /** The agent stops once its attempts end: assign it nothing more. */
  draining: boolean;
}

/** An attempt handed to the agent. */
export interface Assignment {
  attemptId: string;
  /** An {@link AssignmentSpec} as JSON. */
  specJson: string;
  backend: string;
  /** Secret values to mask in the logs the agent sends. */
  mask: string[];
  /**
   * The run's pipeline directory as JSON (`agent/bundle.ts`), with the first
   * assignment of a run on a stream; empty otherwise.
   */
  bundleJson: string;
}

/** Stop an attempt (cancelled run, timeout, an attempt the server no longer wants). */
export interface CancelAttempt {
  attemptId: string;
  reason: string;
}

/** The agent started an attempt. */
export interface AttemptStarted {
  attemptId: string;
  /** Backend handle (container id, pid), for the record. */
  handle: string;
  atMs: number;
}

/** A piece of an attempt's output, already masked by the agent. */
export interface LogChunk {
  attemptId: string;
  /** `stdout` or `stderr`. */
  stream: string;
  text: string;
}

/** How an attempt ended. */
export interface AttemptResult {
  attemptId: string;
  /** core/model.ts `AttemptResult` as JSON (outputs already in the artifact store). */
  resultJson: string;
  atMs: number;
}

/** The server recorded (or refused, for a stale attempt) a result. */
export interface ResultAck {
  attemptId: string;
  /** False when the result was rejected (a stale attempt). */
  accepted: boolean;
  message: string;
}

/** The members of `AgentMessage.body`. */
export interface AgentMessageBodies {
  hello: Hello;
  heartbeat: Heartbeat;
  log: LogChunk;
  started: AttemptStarted;
  result: AttemptResult;
}

/** The members of `ServerMessage.body`. */
export interface ServerMessageBodies {
  welcome: Welcome;
  reject: Reject;
  assign: Assignment;
  cancel: CancelAttempt;
  ack: ResultAck;
}

/** A received oneof: `body` names the member, which is present. */
export type Received<B> = {
  [K in keyof B]: { body: K } & { [P in K]: B[K] };
}[keyof B];

/** A oneof to send: exactly one member, whose omitted fields take their defaults. */
export type ToSend<B> = {
  [K in keyof B]: { [P in K]: Partial<B[K]> };
}[keyof B];

/** A message from an agent, as the server receives it. */
export type AgentMessage = Received<AgentMessageBodies>;
/** A message from an agent, as the agent sends it. */
export type AgentMessageInit = ToSend<AgentMessageBodies>;
/** A message from a server, as the agent receives it. */
export type ServerMessage = Received<ServerMessageBodies>;
/** A message from a server, as the server sends it. */
export type ServerMessageInit = ToSend<ServerMessageBodies>;

// ---------------------------------------------------------------------------
// The JSON carried by Assignment.specJson.

/**
 * What `Assignment.specJson` holds: a backend `AttemptSpec` whose inputs are
 * artifact locators. The agent fills in `agentId`, `workDir`, `inputsDir`,
 * `outputsDir` and `scratchRoot` (its own scratch space), and defaults
 * `baseDir` to the attempt's work directory.
 */
export interface AssignmentSpec extends
  Omit<
    AttemptSpec,
    | "agentId"
    | "scratchRoot"
    | "workDir"
    | "inputsDir"
    | "outputsDir"
    | "inputs"
    | "baseDir"
    | "matrix"
  > {
  baseDir?: string;
  /** This leg's matrix values; absent for a plain step (the agent passes `{}`). */
  matrix?: Record<string, string | number | boolean>;
  inputs: Record<string, InputLocator>;
  /** Digest of the run's pipeline bundle: the agent runs the step in its unpacked copy. */
  bundleDigest?: string;
}

// ---------------------------------------------------------------------------
// Streams.

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

/**
 * Keepalive pings on an idle connection, so that a server (or agent) that
 * vanished without closing its socket is noticed within seconds instead of
 * at the next write's TCP timeout.
 */
export const DEFAULT_KEEPALIVE_MS = 10_000;
/** How long a keepalive ping may go unanswered before the connection is dropped. */
const KEEPALIVE_TIMEOUT_MS = 5_000;

// deno-lint-ignore no-explicit-any
type RawCall = any;

class GrpcMessageStream<In, Out> implements MessageStream<In, Out> {
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

  constructor(call: RawCall, side: "client" | "server", peer: string) {
    this.#call = call;
    this.#side = side;
    this.peer = peer;
    let settle!: (end: StreamEnd) => void;
    this.closed = new Promise((resolve) => settle = resolve);
    const finish = (end: StreamEnd) => {
      this.#open = false;
      this.#finishInput();
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
      const onDrain = () => {
        this.#call.off("drain", onDrain);
        resolve(this.#open);
      };
      this.#call.on("drain", onDrain);
      this.closed.then(() => {
        this.#call.off("drain", onDrain);
        resolve(false);
      });
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

// ---------------------------------------------------------------------------
// Loading the service.

const LOADER_OPTIONS: protoLoader.Options = {
  keepCase: false,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
};

let serviceConstructor: grpc.ServiceClientConstructor | undefined;

/** The protocol definition, on the local file system beside this module. */
export const PROTO_FILE: string = fileURLToPath(new URL("./runnel.proto", import.meta.url));

/** The AgentService client constructor (its `.service` is the server definition). */
function agentService(): grpc.ServiceClientConstructor {
  if (!serviceConstructor) {
    const definition = protoLoader.loadSync(PROTO_FILE, LOADER_OPTIONS);
    const root = grpc.loadPackageDefinition(definition) as unknown as {
      runnel: { v1: { AgentService: grpc.ServiceClientConstructor } };
    };
    serviceConstructor = root.runnel.v1.AgentService;
  }
  return serviceConstructor;
}

// ---------------------------------------------------------------------------
// Server side.

/** Options of {@link serveAgentService}. */
export interface ServeAgentServiceOptions {
  /** `host:port` to listen on; port 0 picks a free one. */
  address: string;
  /** TLS ({@link serverCredentials}); plain TCP when absent. */
  credentials?: grpc.ServerCredentials;
  /**
   * Called for every agent stream. The stream is the caller's: iterate it,
   * answer, end it. A promise that rejects breaks the stream.
   */
  onConnect(stream: AgentConnection): void | Promise<void>;
  /** Keepalive ping period towards agents (default {@link DEFAULT_KEEPALIVE_MS}). */
  keepaliveMs?: number;
}

/** A listening AgentService. */
export interface AgentServiceServer {
  /** The bound port. */
  port: number;
  /**
   * Stops listening and breaks the streams still open (the agents see their
   * stream fail, as with a dead server). With `graceMs`, streams first get
   * that long to end by themselves.
   */
  close(options?: { graceMs?: number }): Promise<void>;
}

/**
 * Serves `AgentService.Connect` on `options.address`.
 *
 * @example
 * ```ts ignore
 * import { serveAgentService } from "./mod.ts";
 * const server = await serveAgentService({
 *   address: "127.0.0.1:0",
 *   onConnect: (agent) => agent.end(),
 * });
 * console.log(server.port);
 * await server.close();
 * ```
 */
export async function serveAgentService(
  options: ServeAgentServiceOptions,
): Promise<AgentServiceServer> {
  const keepaliveMs = options.keepaliveMs ?? DEFAULT_KEEPALIVE_MS;
  const server = new grpc.Server({
    "grpc.keepalive_time_ms": keepaliveMs,
    "grpc.keepalive_timeout_ms": KEEPALIVE_TIMEOUT_MS,
  });
  const streams = new Set<GrpcMessageStream<AgentMessage, ServerMessageInit>>();
  server.addService(agentService().service, {
    Connect(call: RawCall) {
      const stream = new GrpcMessageStream<AgentMessage, ServerMessageInit>(
        call,
        "server",
        call.getPeer(),
      );
      streams.add(stream);
      stream.closed.then(() => streams.delete(stream));
      try {
        Promise.resolve(options.onConnect(stream)).catch((error) =>
          stream.cancel(error instanceof Error ? error.message : String(error))
        );
      } catch (error) {
        stream.cancel(error instanceof Error ? error.message : String(error));
      }
    },
  });
  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync(
      options.address,
      options.credentials ?? grpc.ServerCredentials.createInsecure(),
      (error, bound) => error ? reject(error) : resolve(bound),
    );
  });
  let closing: Promise<void> | undefined;
  return {
    port,
    close(closeOptions = {}) {
      closing ??= (async () => {
        const graceMs = closeOptions.graceMs ?? 0;
        if (graceMs > 0) {
          let timer: ReturnType<typeof setTimeout> | undefined;
          await Promise.race([
            new Promise<void>((resolve) => server.tryShutdown(() => resolve())),
            new Promise<void>((resolve) => timer = setTimeout(resolve, graceMs)),
          ]);
          clearTimeout(timer);
        }
        for (const stream of streams) stream.cancel("the server is shutting down");
        server.forceShutdown();
        await Promise.all([...streams].map((stream) => stream.closed));
      })();
      return closing;
    },
  };
}

// ---------------------------------------------------------------------------
// Client side.

/** Options of {@link openAgentStream}. */
export interface OpenAgentStreamOptions {
  /** TLS ({@link clientCredentials}); plain TCP when absent. */
  credentials?: ClientCredentials;
  /** Keepalive ping period (default {@link DEFAULT_KEEPALIVE_MS}). */
  keepaliveMs?: number;
}

/**
 * Opens the agent stream to a server at `address` (`host:port`; a
 * `grpc://`, `grpcs://`, `http://` or `https://` prefix is ignored). The
 * connection is made on first use; a server that cannot be reached shows as
 * a stream that closes with `UNAVAILABLE`.
 *
 * @example
 * ```ts ignore
 * import { openAgentStream } from "./mod.ts";
 * const stream = openAgentStream("127.0.0.1:7070");
 * await stream.send({ hello: { agentId: "a1", token: "secret", slots: 2 } });
 * ```
 */
export function openAgentStream(
  address: string,
  options: OpenAgentStreamOptions = {},
): ServerConnection {
  const target = address.replace(/^(grpcs?|https?):\/\//, "").replace(/\/+$/, "");
  const keepaliveMs = options.keepaliveMs ?? DEFAULT_KEEPALIVE_MS;
  const channelOptions: grpc.ChannelOptions = {
    "grpc.keepalive_time_ms": keepaliveMs,
    "grpc.keepalive_timeout_ms": KEEPALIVE_TIMEOUT_MS,
    "grpc.keepalive_permit_without_calls": 1,
  };
  let credentials = grpc.credentials.createInsecure();
  if (options.credentials) {
    const host = hostOf(target);
    const tls = options.credentials;
    const serverName = tls.serverName ?? host;
    credentials = grpc.credentials.createSsl(tls.ca ?? null, tls.key ?? null, tls.cert ?? null, {
      // Checked against the name or IP address the caller dialled (or the
      // configured server name), whatever name goes into SNI below.
      checkServerIdentity: (_host: string, certificate: PeerCertificate) =>
        checkServerIdentity(serverName, certificate),
    });
    // Deno refuses an IP address as the TLS server name (SNI), which grpc-js
    // passes by default: send the name "localhost" instead; the certificate is
    // still checked against the IP address above.
    channelOptions["grpc.ssl_target_name_override"] = isIP(serverName) ? "localhost" : serverName;
  }
  const Client = agentService();
  const client = new Client(target, credentials, channelOptions);
  const call = (client as unknown as { Connect(): RawCall }).Connect();
  const stream = new GrpcMessageStream<ServerMessage, AgentMessageInit>(call, "client", target);
  stream.closed.then(() => client.close());
  return stream;
}

function hostOf(target: string): string {
  if (target.startsWith("[")) return target.slice(1, target.indexOf("]"));
  const colon = target.lastIndexOf(":");
  return colon > 0 && target.indexOf(":") === colon ? target.slice(0, colon) : target;
}

// ---------------------------------------------------------------------------
// TLS.

/** PEM files of a server's TLS identity. */
export interface ServerTlsFiles {
  /** CA bundle agents' client certificates must chain to; when given, agents must present one. */
  ca?: string;
  /** The server's certificate chain. */
  cert: string;
  /** The server's private key. */
  key: string;
}

/** A TLS-related problem a user can fix (a missing or unreadable PEM file). */
export class TlsConfigError extends Error {
  /** Stable error code. */
  readonly code = "bad_tls_config";

  /** Builds the error from a full sentence. */
  constructor(message: string) {
    super(message);
    this.name = "TlsConfigError";
  }
}

/**
 * TLS credentials for {@link serveAgentService}, from PEM file paths. With
 * `ca`, the server asks agents for a client certificate signed by it.
 *
 * @example
 * ```ts ignore
 * import { serverCredentials } from "./mod.ts";
 * const credentials = serverCredentials({ cert: "server.pem", key: "server-key.pem" });
 * ```
 */
export function serverCredentials(files: ServerTlsFiles): grpc.ServerCredentials {
  const ca = files.ca ? readPem(files.ca, "--tls-ca") : undefined;
  const certChain = readPem(files.cert, "--tls-cert");
  return grpc.ServerCredentials.createSsl(
    // Under Deno a secure server without any `ca` answers in plain text
    // ("wrong version number" at the agent). The CA only checks client
    // certificates, which are not asked for without one, so the server's
    // own chain stands in.
    ca ?? certChain,
    [{ cert_chain: certChain, private_key: readPem(files.key, "--tls-key") }],
    ca !== undefined,
  );
}

/** PEM files of an agent's TLS settings. */
export interface ClientTlsFiles {
  /** CA bundle the server's certificate must chain to (default: the system's roots). */
  ca?: string;
  /** The agent's certificate, for servers that require client certificates. */
  cert?: string;
  /** The agent's private key (with `cert`). */
  key?: string;
  /** Name the server's certificate must carry (default: the host dialled). */
  serverName?: string;
}

/** TLS settings of an agent, read from PEM files by {@link clientCredentials}. */
export interface ClientCredentials {
  ca?: Buffer;
  cert?: Buffer;
  key?: Buffer;
  serverName?: string;
}

/**
 * TLS settings for {@link openAgentStream}, from PEM file paths.
 *
 * @example
 * ```ts ignore
 * import { clientCredentials } from "./mod.ts";
 * const credentials = clientCredentials({ ca: "ca.pem" });
 * ```
 */
export function clientCredentials(files: ClientTlsFiles): ClientCredentials {
  if ((files.cert === undefined) !== (files.key === undefined)) {
    throw new TlsConfigError(
      "Expected both a client certificate and its key (--tls-cert and --tls-key), or neither",
    );
  }
  return {
    ...(files.ca ? { ca: readPem(files.ca, "--tls-ca") } : {}),
    ...(files.cert ? { cert: readPem(files.cert, "--tls-cert") } : {}),
    ...(files.key ? { key: readPem(files.key, "--tls-key") } : {}),
    ...(files.serverName ? { serverName: files.serverName } : {}),
  };
}

function readPem(path: string, flag: string): Buffer {
  let text: string;
  try {
    text = Deno.readTextFileSync(path);
  } catch (error) {
    throw new TlsConfigError(
      `Expected a readable PEM file for ${flag} at ${path}: ${(error as Error).message}`,
    );
  }
  if (!text.includes("-----BEGIN ")) {
    throw new TlsConfigError(`Expected a PEM file for ${flag} at ${path}, found no "-----BEGIN"`);
  }
  return Buffer.from(text);
}
