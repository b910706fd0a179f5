/**
 * The plugin host: runs inside a sandboxed `deno run` subprocess and serves
 * one backend (or one third-party manifest) over the line protocol of
 * `_protocol.ts` on stdin/stdout.
 *
 * The generated entry file imports this module before the plugin, so the
 * set-up below is done before any plugin code evaluates:
 * - `console` writes to stderr, leaving stdout to the protocol;
 * - Node's `process.env` becomes a plain object holding only the env vars
 *   the host was granted. npm packages (`debug`, for one) enumerate
 *   `process.env`, which Deno refuses without a grant of the whole
 *   environment; the host's environment is cleared except for the granted
 *   names anyway, so the copy shows the same values and nothing more.
 *
 * @module
 */

import process from "node:process";
import type {
  BackendCapabilities,
  BackendManifest,
  Execution,
  ExecutionBackend,
} from "../backend.ts";
import { configMessages } from "../backend.ts";
import {
  type HostMessage,
  type HostRole,
  isCapabilities,
  LineSplitter,
  PROTOCOL_VERSION,
  type Request,
  toWireError,
} from "./_protocol.ts";

/** Command-line flag of the entry file naming the granted env vars. */
export const ENV_NAMES_FLAG = "--runnel-env=";

const grantedEnv: Record<string, string> = {};
for (const arg of Deno.args) {
  if (!arg.startsWith(ENV_NAMES_FLAG)) continue;
  for (const name of arg.slice(ENV_NAMES_FLAG.length).split(",").filter(Boolean)) {
    try {
      const value = Deno.env.get(name);
      if (value !== undefined) grantedEnv[name] = value;
    } catch {
      // Not granted after all: the plugin does not see it.
    }
  }
}
Object.defineProperty(process, "env", {
  value: grantedEnv,
  writable: true,
  configurable: true,
  enumerable: true,
});
console.log = console.error;
console.info = console.error;
console.debug = console.error;

const encoder = new TextEncoder();
/** Bytes read from stdin at once. */
const READ_BUFFER_BYTES = 64 * 1024;
let outbox: string[] = [];
let flushing = false;
/** Characters queued or being written to the runner. */
let unsent = 0;
/** Log relays waiting for the outbox to shrink (see `outboxRoom`). */
let roomWaiters: (() => void)[] = [];
/**
 * Characters of messages waiting for the runner past which log relays
 * wait: a step printing faster than the runner reads is slowed down (its
 * pipe fills) instead of filling this host's memory.
 */
const OUTBOX_HIGH_WATER_CHARS = 1024 * 1024;

/** Resolves once the outbox is under its high-water mark. */
function outboxRoom(): Promise<void> {
  if (unsent < OUTBOX_HIGH_WATER_CHARS) return Promise.resolve();
  return new Promise((resolve) => roomWaiters.push(resolve));
}

/** Queues a message; all queued in one tick leave in one write. */
function send(message: HostMessage): void {
  const line = JSON.stringify(message) + "\n";
  unsent += line.length;
  outbox.push(line);
  if (!flushing) {
    flushing = true;
    queueMicrotask(flush);
  }
}

function flush(): void {
  try {
    while (outbox.length > 0) {
      const text = outbox.join("");
      const bytes = encoder.encode(text);
      outbox = [];
      // Synchronous: an async write of stdout costs a thread-pool hop, about
      // ten times the write itself, on every message. It blocks only while
      // the runner is a full pipe (64 KiB) behind, which is backpressure all
      // the same; the runner always reads.
      let written = 0;
      while (written < bytes.length) written += Deno.stdout.writeSync(bytes.subarray(written));
      unsent -= text.length;
      if (unsent < OUTBOX_HIGH_WATER_CHARS) {
        const waiters = roomWaiters;
        roomWaiters = [];
        for (const wake of waiters) wake();
      }
    }
  } catch {
    // The runner is gone: nobody is left to answer.
    Deno.exit(0);
  } finally {
    flushing = false;
  }
}

globalThis.addEventListener("unhandledrejection", (event) => {
  event.preventDefault();
  send({ stray: toWireError(event.reason) });
});
globalThis.addEventListener("error", (event) => {
  event.preventDefault();
  send({ stray: toWireError(event.error) });
});

type Handler = (request: Request) => unknown;

async function serve(
  role: HostRole,
  name: string,
  handle: Handler,
  capabilities?: BackendCapabilities,
): Promise<never> {
  send({ hello: { protocol: PROTOCOL_VERSION, role, backend: name, pid: Deno.pid, capabilities } });
  const lines = new LineSplitter();
  const dispatch = async (line: string) => {
    if (!line) return;
    let request: Request;
    try {
      request = JSON.parse(line);
    } catch {
      send({ stray: { code: "bad_request", name: "SyntaxError", message: "unparsable request" } });
      return;
    }
    try {
      send({ id: request.id, ok: true, result: (await handle(request)) ?? {} });
    } catch (error) {
      send({ id: request.id, ok: false, error: toWireError(error) });
    }
  };
  // Plain reads: a stream pipeline adds latency to every message.
  const decoder = new TextDecoder();
  const buffer = new Uint8Array(READ_BUFFER_BYTES);
  for (;;) {
    const read = await Deno.stdin.read(buffer);
    if (read === null) break;
    for (const line of lines.push(decoder.decode(buffer.subarray(0, read), { stream: true }))) {
      dispatch(line);
    }
  }
  // End of stdin: the runner closed the pool or died. Executions a backend
  // started are left to its `recover`.
  await dispatch(lines.end());
  Deno.exit(0);
}

interface Served {
  execution: Execution;
  /** Resolves once every log chunk has been sent. */
  logsSent: Promise<void>;
}

/**
 * Serves a backend module: its default export is a factory of an
 * {@link ExecutionBackend} (or the backend itself).
 */
export function serveBackend(module: Record<string, unknown>, name: string): Promise<never> {
  const exported = module.default;
  const backend = (typeof exported === "function" ? exported() : exported) as ExecutionBackend;
  if (!backend || typeof backend.start !== "function") {
    throw new Error(
      `Expected backend module "${name}" to export a default backend factory, got ${typeof exported}`,
    );
  }
  if (!isCapabilities(backend.capabilities)) {
    throw new Error(
      `Expected backend "${name}" to declare its capabilities as { reattach, usage } booleans`,
    );
  }
  const executions = new Map<number, Served>();
  let nextExec = 1;
  const adopt = (execution: Execution): number => {
    const exec = nextExec++;
    executions.set(exec, { execution, logsSent: relayLogs(exec, execution) });
    return exec;
  };
  const served = (exec: number): Served => {
    const entry = executions.get(exec);
    if (!entry) throw new Error(`Expected a live execution ${exec} in this host`);
    return entry;
  };
  return serve("backend", name, async (request) => {
    switch (request.op) {
      case "ping":
        return {};
      case "fingerprint":
        return await backend.fingerprint(request.context);
      case "start": {
        const execution = await backend.start(request.spec);
        return { exec: adopt(execution), handle: execution.handle };
      }
      case "wait": {
        const entry = served(request.exec);
        const status = await entry.execution.wait();
        await entry.logsSent;
        if (request.cleanup) {
          // As a "cleanup" request would, without its round trip; its own
          // errors would be ignored by the runner all the same.
          await entry.execution.cleanup().catch(() => {});
          executions.delete(request.exec);
        }
        return status;
      }
      case "status":
        return await served(request.exec).execution.status();
      case "cancel":
        await served(request.exec).execution.cancel(request.graceMs);
        return {};
      case "cleanup": {
        const entry = executions.get(request.exec);
        if (!entry) return {};
        await entry.execution.cleanup();
        executions.delete(request.exec);
        return {};
      }
      case "recover": {
        const found = await backend.recover(request.options);
        return found.map(({ attemptId, execution }) => ({
          attemptId,
          exec: adopt(execution),
          handle: execution.handle,
        }));
      }
      default:
        throw new Error(`Expected a backend operation, got "${request.op}"`);
    }
  }, backend.capabilities);
}

/** Serves a manifest module (default export, or `manifest`) in a host granted nothing. */
export function serveManifest(module: Record<string, unknown>, name: string): Promise<never> {
  const manifest = (module.default ?? module.manifest) as BackendManifest<unknown>;
  if (!manifest || typeof manifest.permissions !== "function") {
    throw new Error(`Expected manifest module "${name}" to export a default manifest`);
  }
  if (!isCapabilities(manifest.capabilities)) {
    throw new Error(
      `Expected manifest "${name}" to declare its capabilities as { reattach, usage } booleans`,
    );
  }
  return serve("manifest", name, (request) => {
    switch (request.op) {
      case "ping":
        return {};
      case "describe":
        return {
          name: manifest.name,
          version: manifest.version,
          capabilities: manifest.capabilities,
        };
      case "validate":
        return configMessages(manifest.configSchema, request.config);
      case "permissions": {
        const messages = configMessages(manifest.configSchema, request.config);
        if (messages.length > 0) throw new Error(messages.join("; "));
        return manifest.permissions(
          manifest.configSchema.parse(request.config),
          request.spec,
        );
      }
      case "hostPermissions":
        return manifest.hostPermissions(request.context);
      default:
        throw new Error(`Expected a manifest operation, got "${request.op}"`);
    }
  });
}

async function relayLogs(exec: number, execution: Execution): Promise<void> {
  const decoders = { stdout: new TextDecoder(), stderr: new TextDecoder() };
  try {
    for await (const chunk of execution.logs) {
      const text = decoders[chunk.stream].decode(chunk.data, { stream: true });
      if (text) send({ log: exec, stream: chunk.stream, text });
      await outboxRoom();
    }
  } catch (error) {
    send({ stray: toWireError(error) });
  }
  for (const stream of ["stdout", "stderr"] as const) {
    const text = decoders[stream].decode();
    if (text) send({ log: exec, stream, text });
  }
  send({ logEnd: exec });
}
