/**
 * A small Kubernetes API client on Deno's own `fetch`: requests retried
 * through transient failures, watches and log follows that end the moment
 * they are aborted (the reason `npm:@kubernetes/client-node`'s own are not
 * used here: under Deno, aborting them does not end the request).
 *
 * Transient: connection failures, 5xx answers (among them "etcdserver:
 * leader changed" and "request timed out"), 429 (after its
 * `Retry-After`). Everything else is the caller's to handle.
 *
 * @module
 */

import type { KubeTarget } from "./_kubeconfig.ts";

/** Tries of one request before a transient failure is given up on. */
const MAX_TRIES = 8;
/** First back-off; doubled each try, with jitter, up to {@link MAX_BACKOFF_MS}. */
const BASE_BACKOFF_MS = 100;
const MAX_BACKOFF_MS = 5_000;
/** Longest wait a `Retry-After` is honoured for. */
const MAX_RETRY_AFTER_MS = 30_000;
/** Longest one non-streaming request may take. */
const REQUEST_TIMEOUT_MS = 30_000;

/** An error answer of the API (its `Status` object), or a transport failure (status 0). */
export class KubeApiError extends Error {
  /** Stable error code. */
  readonly code = "kubernetes_api";
  /** HTTP status; 0 when no answer came. */
  readonly status: number;
  /** The Status `reason` (`NotFound`, `AlreadyExists`, `Expired`…). */
  readonly reason: string;

  /** Builds the error from the status, reason and message. */
  constructor(status: number, reason: string, message: string) {
    super(message);
    this.name = "KubeApiError";
    this.status = status;
    this.reason = reason;
  }

  /** Whether trying again may succeed. */
  get transient(): boolean {
    return this.status === 0 || this.status === 429 || this.status >= 500;
  }
}

/** Options of {@link KubeApi.request}. */
export interface RequestOptions {
  body?: unknown;
  query?: Record<string, string>;
  signal?: AbortSignal;
  /** Statuses returned as they are rather than thrown (e.g. 404 on a delete). */
  accept?: number[];
}

export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal!.reason);
    };
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/** The back-off before try `n` (1-based), with full jitter on the upper half. */
export function backoffMs(tries: number): number {
  const ceiling = Math.min(MAX_BACKOFF_MS, BASE_BACKOFF_MS * 2 ** (tries - 1));
  return ceiling / 2 + Math.random() * ceiling / 2;
}

/** A client of one API server. */
export class KubeApi {
  readonly target: KubeTarget;
  readonly #client: Deno.HttpClient;
  /** Requests sent (each try counts), for the benchmark's calls-per-step figure. */
  calls = 0;

  constructor(target: KubeTarget) {
    this.target = target;
    this.#client = Deno.createHttpClient({
      ...(target.caPem ? { caCerts: [target.caPem] } : {}),
      ...(target.certPem && target.keyPem ? { cert: target.certPem, key: target.keyPem } : {}),
    });
  }

  #headers(extra: Record<string, string> = {}): Record<string, string> {
    return {
      accept: "application/json",
      "user-agent": "runnel-kubernetes-backend",
      ...(this.target.token ? { authorization: `Bearer ${this.target.token}` } : {}),
      ...extra,
    };
  }

  async #send(method: string, path: string, options: RequestOptions, stream: boolean) {
    const url = new URL(path, this.target.server);
    for (const [key, value] of Object.entries(options.query ?? {})) {
      url.searchParams.set(key, value);
    }
    const signals = [options.signal, stream ? undefined : AbortSignal.timeout(REQUEST_TIMEOUT_MS)]
      .filter((signal): signal is AbortSignal => signal !== undefined);
    this.calls++;
    try {
      return await fetch(url, {
        method,
        client: this.#client,
        headers: this.#headers(
          options.body === undefined ? {} : { "content-type": "application/json" },
        ),
        body: options.body === undefined ? undefined : JSON.stringify(options.body),
        signal: signals.length > 0 ? AbortSignal.any(signals) : undefined,
      });
    } catch (error) {
      if (options.signal?.aborted) throw error;
      throw new KubeApiError(
        0,
        "ConnectionFailed",
        `cannot reach the Kubernetes API at ${this.target.server}: ${(error as Error).message}`,
      );
    }
  }

  /** Turns an error answer into a {@link KubeApiError} (its body read). */
  static async errorOf(response: Response): Promise<KubeApiError> {
    const text = await response.text().catch(() => "");
    let reason = response.statusText || "Unknown";
    let message = text.slice(0, 500) || `HTTP ${response.status}`;
    try {
      const status = JSON.parse(text);
      if (status?.kind === "Status") {
        reason = status.reason ?? reason;
        message = status.message ?? message;
      }
    } catch { /* not JSON */ }
    return new KubeApiError(response.status, reason, message);
  }

  /**
   * Sends a request and answers its parsed body (text when not JSON), retrying transient
   * failures with back-off (429: after `Retry-After`).
   */
  async request<T>(method: string, path: string, options: RequestOptions = {}): Promise<T> {
    return await this.#withRetries(method, path, options, false, async (response) => {
      if (!response.ok) {
        await response.body?.cancel();
        return undefined as T;
      }
      let text: string;
      try {
        text = await response.text();
      } catch (error) {
        // A connection reset mid-answer: the request may have been applied;
        // trying again is for the caller's idempotence (creates check 409s).
        throw new KubeApiError(
          0,
          "ConnectionReset",
          `the connection to ${this.target.server} broke during the answer: ${
            (error as Error).message
          }`,
        );
      }
      const type = response.headers.get("content-type") ?? "";
      return (type.includes("json") ? JSON.parse(text) : text) as T;
    });
  }

  /** Opens a streaming request (watch, log follow), retrying transient failures to open it. */
  stream(path: string, options: RequestOptions = {}): Promise<Response> {
    return this.#withRetries("GET", path, options, true, (response) => Promise.resolve(response));
  }

  async #withRetries<R>(
    method: string,
    path: string,
    options: RequestOptions,
    stream: boolean,
    read: (response: Response) => Promise<R>,
  ): Promise<R> {
    for (let tries = 1;; tries++) {
      let error: KubeApiError;
      let waitMs: number | undefined;
      try {
        const response = await this.#send(method, path, options, stream);
        if (response.ok || options.accept?.includes(response.status)) return await read(response);
        const retryAfter = response.headers.get("retry-after");
        error = await KubeApi.errorOf(response);
        if (response.status === 429 && retryAfter !== null && /^\d+$/.test(retryAfter)) {
          waitMs = Math.min(Number(retryAfter) * 1000, MAX_RETRY_AFTER_MS);
        }
      } catch (caught) {
        if (!(caught instanceof KubeApiError)) throw caught;
        error = caught;
      }
      if (!error.transient || tries >= MAX_TRIES) throw error;
      await sleep(waitMs ?? backoffMs(tries), options.signal);
    }
  }

  close(): void {
    this.#client.close();
  }
}

/** Splits a byte stream into lines (without their `\n`); a last unterminated line is kept. */
export async function* lines(
  body: ReadableStream<Uint8Array>,
): AsyncGenerator<string> {
  const decoder = new TextDecoder();
  let buffer = "";
  for await (const chunk of body) {
    buffer += decoder.decode(chunk, { stream: true });
    let newline: number;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      yield buffer.slice(0, newline);
      buffer = buffer.slice(newline + 1);
    }
  }
  buffer += decoder.decode();
  if (buffer !== "") yield buffer;
}
