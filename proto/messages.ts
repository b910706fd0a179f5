/**
 * The messages of the agent stream (`runnel.v1`), as grpc-js hands them
 * over with the loader options of `definition.ts`: camelCase fields, int64
 * as number, every field present with its proto3 default. The `body`
 * oneof of `AgentMessage` and `ServerMessage` is a discriminated union on
 * `body` for what is received
 * (`switch (message.body) { case "hello": message.hello… }`), and one key
 * naming the member for what is sent (`send({ hello: {…} })`), whose
 * omitted fields take their defaults.
 *
 * The JSON carried in string fields (`Assignment.specJson`) is typed here
 * too.
 *
 * @module
 */

import type { AttemptSpec } from "../backends/backend.ts";
import type { InputLocator } from "../core/model.ts";

export type { ArtifactLocator, FanInLocator, InputLocator } from "../core/model.ts";

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

/**
 * What `Assignment.specJson` holds: a backend `AttemptSpec` whose inputs are
 * artifact locators. The agent fills in `agentId`, `workDir`, `inputsDir`,
 * `outputsDir` and `scratchRoot` (its own scratch space), and defaults
 * `baseDir` to the attempt's work directory.
 */
export interface AssignmentSpec extends
  Omit<
    AttemptSpec,
    "agentId" | "scratchRoot" | "workDir" | "inputsDir" | "outputsDir" | "inputs" | "baseDir"
  > {
  baseDir?: string;
  inputs: Record<string, InputLocator>;
  /** Digest of the run's pipeline bundle: the agent runs the step in its unpacked copy. */
  bundleDigest?: string;
}
