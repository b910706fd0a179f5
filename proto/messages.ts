/**
 * The messages of the agent stream as TypeScript sees them.
 *
 * Each message of `proto/runnel.proto` is an interface of
 * `proto/_messages.ts`, written from the .proto by `deno task proto`:
 * camelCase fields, int64 as number, every field present with its proto3
 * default. The `body` oneof of `AgentMessage` and `ServerMessage` is a
 * discriminated union on `body` for what is received
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
import type { InputLocator, SecretRef } from "../core/model.ts";
import type { AgentMessageBodies, ServerMessageBodies } from "./_messages.ts";

export type * from "./_messages.ts";
export type { ArtifactLocator, FanInLocator, InputLocator } from "../core/model.ts";

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

/** Stable codes of `Reject.code`. */
export type RejectCode = "bad_token" | "bad_hello" | "bad_identity" | "duplicate_agent";

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
  /** Keep a failed attempt's outputs as `NAME.partial-ATTEMPT` (`keep-partial`). */
  keepPartial?: boolean;
  /** Digest of the run's pipeline bundle: the agent runs the step in its unpacked copy. */
  bundleDigest?: string;
  /**
   * The step's secrets: env name → the operator's secret name. Their values
   * come from the agent's own config, else in `Assignment.secrets`.
   */
  secrets?: Record<string, SecretRef>;
}
