/**
 * An example third-party backend: a step that makes one HTTP request.
 *
 * It shows the whole plugin contract in one page: a default-exported
 * factory of an `ExecutionBackend`, an `Execution` with live logs, wait,
 * status, cancel and cleanup, and a `recover` that has nothing to find (a
 * request does not outlive its host). See docs/writing-a-backend.md.
 *
 * @module
 */

import {
  type AttemptSpec,
  configMessages,
  type Execution,
  type ExecutionBackend,
  type ExecutionState,
  type ExitStatus,
  type Fingerprint,
  InvalidStepConfigError,
  joinPath,
  type RecoveredAttempt,
} from "../../../backends/backend.ts";
import { LogQueue } from "../../../backends/log_queue.ts";
import { type HttpConfig, httpConfigSchema, httpManifest } from "./manifest.ts";

const encoder = new TextEncoder();

/** Creates the `http` backend. */
export function createHttpBackend(): ExecutionBackend {
  return {
    name: "http",
    capabilities: httpManifest.capabilities,
    fingerprint: (): Promise<Fingerprint> =>
      Promise.resolve({ available: true, detail: "fetch is built in", version: "0.1.0" }),
    start: startRequest,
    // Nothing survives a host: there is never anything to re-attach or reap.
    recover: (): Promise<RecoveredAttempt[]> => Promise.resolve([]),
  };
}

function startRequest(spec: AttemptSpec): Promise<Execution> {
  const messages = configMessages(httpConfigSchema, spec.config);
  if (messages.length > 0) return Promise.reject(new InvalidStepConfigError("http", messages));
  const { with: request } = spec.config as HttpConfig;
  const logs = new LogQueue();
  const abort = new AbortController();
  let final: ExitStatus | undefined;
  const log = (stream: "stdout" | "stderr", text: string) =>
    logs.push({ stream, data: encoder.encode(text) });

  const done = (async (): Promise<ExitStatus> => {
    const method = request.method ?? "GET";
    const started = performance.now();
    try {
      const response = await fetch(request.url, {
        method,
        headers: request.headers,
        body: request.body,
        signal: abort.signal,
      });
      const body = await response.text();
      const ms = Math.round(performance.now() - started);
      log(
        "stderr",
        `${method} ${request.url} → ${response.status} ${response.statusText} (${ms} ms)\n`,
      );
      if (request.output) {
        await Deno.writeTextFile(joinPath(spec.outputsDir, request.output), body);
      } else if (body) {
        log("stdout", body.endsWith("\n") ? body : `${body}\n`);
      }
      const ok = request.expect
        ? request.expect.includes(response.status)
        : response.status >= 200 && response.status < 300;
      if (ok) return { exitCode: 0 };
      return {
        exitCode: 1,
        errorClass: "application",
        message: `HTTP ${response.status} from ${request.url}`,
      };
    } catch (error) {
      if (abort.signal.aborted) {
        return { exitCode: 130, errorClass: "cancelled", message: "step was cancelled" };
      }
      // A denied host must surface as the permission error it is.
      if (error instanceof Deno.errors.NotCapable) throw error;
      return {
        exitCode: 1,
        errorClass: "infrastructure",
        message: `request to ${request.url} failed: ${(error as Error).message}`,
      };
    } finally {
      logs.close();
    }
  })();
  done.then((status) => (final = status), () => {});

  return Promise.resolve({
    handle: `${request.method ?? "GET"} ${request.url}`,
    logs,
    wait: () => done,
    status: (): Promise<ExecutionState> =>
      Promise.resolve(final ? { state: "exited", exit: final } : { state: "running" }),
    cancel: () => {
      abort.abort();
      return done.then(() => {}, () => {});
    },
    cleanup: () => done.then(() => {}, () => {}),
  });
}

export default createHttpBackend;
