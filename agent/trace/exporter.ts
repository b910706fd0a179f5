/**
 * A tracer that exports finished spans over OTLP/HTTP with the JSON
 * encoding (`POST <endpoint>/v1/traces`) to the collector an operator
 * names.
 *
 * Hand-written rather than `npm:@opentelemetry/sdk-trace` with its OTLP
 * exporter: runnel's spans are recorded after the fact, from the times the
 * run's store holds, under ids derived from run and attempt ids (so a
 * scheduler's successor names a span as its predecessor would), which the
 * SDK's tracer cannot be told; and the exporter needs read access to every
 * `OTEL_*` variable and pulls in 20 MB of packages (the transformer brings
 * the logs and metrics SDKs along).
 *
 * Exporting never holds a run up: {@link Tracer.record} only queues (a
 * bounded queue: past {@link DEFAULT_MAX_QUEUE} spans, new ones are dropped
 * and counted), batches go out in the background one request at a time,
 * a failed request is retried with capped exponential backoff, and
 * {@link Tracer.shutdown} gives up after its deadline.
 *
 * @module
 */

import { abortableDelay } from "../../core/_async.ts";

/** A span attribute's value. */
export type AttributeValue = string | number | boolean;

/** A finished span, as the drivers and the attempt lifecycle record it. */
export interface SpanData {
  /** 32 lower-case hex digits. */
  traceId: string;
  /** 16 lower-case hex digits. */
  spanId: string;
  /** Absent for the trace's root. */
  parentSpanId?: string;
  /** Low-cardinality: `run <pipeline>`, `step <step id>`, `execute`… */
  name: string;
  /** Epoch milliseconds (fractions allowed). */
  startMs: number;
  /** Epoch milliseconds; a span ending before it starts is given no length. */
  endMs: number;
  /** Undefined values are left out. */
  attributes?: Record<string, AttributeValue | undefined>;
  /** Set when the span failed: its status is ERROR with this message. */
  error?: string;
}

/** What a tracer did, for tests and diagnostics. */
export interface TracerStats {
  /** Spans the collector accepted. */
  exported: number;
  /** Spans given up on: the queue was full, or their batch failed every try. */
  dropped: number;
  /** Requests that failed (each retry counts). */
  failedRequests: number;
}

/** Records finished spans; how they leave the process is the tracer's business. */
export interface Tracer {
  /** Queues a finished span. Never throws, never waits. */
  record(span: SpanData): void;
  /** Sends what is queued now; resolves when it was sent (or given up on). */
  flush(): Promise<void>;
  /**
   * Sends what is queued, then stops: at most `timeoutMs` (default
   * {@link DEFAULT_SHUTDOWN_MS}), however the collector fares.
   */
  shutdown(options?: { timeoutMs?: number }): Promise<void>;
  /** What it did so far. */
  readonly stats: TracerStats;
}

/** Options of {@link openTracer}. */
export interface TracerOptions {
  /** The collector's traces URL (see {@link otlpTracesUrl}). */
  endpoint: string;
  /** Resource attributes besides `service.name=runnel`. */
  resource?: Record<string, AttributeValue | undefined>;
  /** Extra request headers (an API key of a hosted collector). */
  headers?: Record<string, string>;
  /** Spans kept waiting at most; default {@link DEFAULT_MAX_QUEUE}. */
  maxQueue?: number;
  /** Spans per request at most; default {@link DEFAULT_MAX_BATCH}. */
  maxBatch?: number;
  /** How long a span waits for others to share its request; default {@link DEFAULT_DELAY_MS}. */
  delayMs?: number;
  /** Per request; default {@link DEFAULT_TIMEOUT_MS}. */
  timeoutMs?: number;
  /** Tries per batch; default {@link DEFAULT_TRIES}. */
  tries?: number;
  /** First retry delay (doubled each time, capped at {@link MAX_RETRY_DELAY_MS}); default 250 ms. */
  retryDelayMs?: number;
  /** Told when a batch is given up on, once until a batch gets through again. */
  onError?: (message: string) => void;
}

/** The OTel SDKs' default queue of its batch span processor (2048). */
export const DEFAULT_MAX_QUEUE = 2048;
/** The OTel SDKs' default batch (512). */
export const DEFAULT_MAX_BATCH = 512;
/** Shorter than the SDKs' 5 s: a run's trace shows up while one looks at the run. */
export const DEFAULT_DELAY_MS = 500;
/** Per request: a collector slower than this is treated as down. */
export const DEFAULT_TIMEOUT_MS = 5_000;
/** Tries per batch before its spans are dropped. */
export const DEFAULT_TRIES = 5;
/** Cap of the retry backoff. */
export const MAX_RETRY_DELAY_MS = 5_000;
/** How long a stopping process waits for its last spans to leave. */
export const DEFAULT_SHUTDOWN_MS = 2_000;

/** The service name every runnel process exports under. */
export const SERVICE_NAME = "runnel";

/** A bad `--otlp-endpoint` (or OTLP env var). */
export class OtlpEndpointError extends Error {
  /** Stable error code. */
  readonly code = "bad_otlp_endpoint";
  /** Builds the error from a full sentence. */
  constructor(message: string) {
    super(message);
    this.name = "OtlpEndpointError";
  }
}

/**
 * The traces URL of a collector: `--otlp-endpoint URL` (a base URL, as
 * `OTEL_EXPORTER_OTLP_ENDPOINT`, to which `/v1/traces` is added unless it
 * ends so), else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is), else
 * `OTEL_EXPORTER_OTLP_ENDPOINT`; undefined when none is set.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { otlpTracesUrl } from "./exporter.ts";
 * const none = () => undefined;
 * assert.equal(otlpTracesUrl("http://127.0.0.1:4318", none), "http://127.0.0.1:4318/v1/traces");
 * assert.equal(otlpTracesUrl("http://c:4318/v1/traces", none), "http://c:4318/v1/traces");
 * assert.equal(otlpTracesUrl(undefined, none), undefined);
 * assert.equal(
 *   otlpTracesUrl(undefined, (name) => name === "OTEL_EXPORTER_OTLP_ENDPOINT" ? "http://c:4318/" : undefined),
 *   "http://c:4318/v1/traces",
 * );
 * ```
 */
export function otlpTracesUrl(
  flag: string | undefined,
  env: (name: string) => string | undefined = readEnv,
): string | undefined {
  if (flag !== undefined) return withTracesPath(checkedUrl(flag, "--otlp-endpoint"));
  const traces = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
  if (traces) return checkedUrl(traces, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").href;
  const base = env("OTEL_EXPORTER_OTLP_ENDPOINT");
  if (base) return withTracesPath(checkedUrl(base, "OTEL_EXPORTER_OTLP_ENDPOINT"));
  return undefined;
}

function readEnv(name: string): string | undefined {
  try {
    return Deno.env.get(name);
  } catch {
    // Not granted: the operator did not mean it to be read.
    return undefined;
  }
}

function checkedUrl(text: string, where: string): URL {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new OtlpEndpointError(
      `Expected an http(s) URL of an OTLP collector for ${where}, such as ` +
        `"http://127.0.0.1:4318", got "${text}"`,
    );
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw new OtlpEndpointError(
      `Expected an http(s) URL of an OTLP collector for ${where} (OTLP/HTTP), got "${text}"`,
    );
  }
  if (url.username || url.password) {
    throw new OtlpEndpointError(
      `Expected no credentials in the URL of ${where}: they would be logged; got "${url.host}"`,
    );
  }
  return url;
}

function withTracesPath(url: URL): string {
  if (!url.pathname.endsWith("/v1/traces")) {
    url.pathname = `${url.pathname.replace(/\/+$/, "")}/v1/traces`;
  }
  return url.href;
}

/**
 * A tracer exporting to `options.endpoint`.
 *
 * @example Spans are queued, and shutdown gives up after its deadline
 * ```ts
 * import assert from "node:assert/strict";
 * import { openTracer } from "./exporter.ts";
 * const tracer = openTracer({ endpoint: "http://127.0.0.1:1/v1/traces", tries: 1 });
 * tracer.record({
 *   traceId: "4bf92f3577b34da6a3ce929d0e0e4736",
 *   spanId: "00f067aa0ba902b7",
 *   name: "run demo",
 *   startMs: 0,
 *   endMs: 1,
 * });
 * await tracer.shutdown({ timeoutMs: 1_000 });
 * assert.equal(tracer.stats.dropped, 1);
 * ```
 */
export function openTracer(options: TracerOptions): Tracer {
  return new OtlpTracer(options);
}

class OtlpTracer implements Tracer {
  readonly stats: TracerStats = { exported: 0, dropped: 0, failedRequests: 0 };
  readonly #options: TracerOptions;
  readonly #resource: unknown[];
  readonly #queue: SpanData[] = [];
  readonly #maxQueue: number;
  readonly #maxBatch: number;
  #timer: ReturnType<typeof setTimeout> | undefined;
  /** The loop sending batches, while one runs. */
  #sending: Promise<void> | undefined;
  #closed = false;
  /** Aborted at the shutdown deadline: the request in flight and the backoff end. */
  readonly #abort = new AbortController();
  /** Aborted when shutdown begins: a backoff ends, for one last try. */
  readonly #closing = new AbortController();
  #reported = false;

  constructor(options: TracerOptions) {
    this.#options = options;
    this.#maxQueue = options.maxQueue ?? DEFAULT_MAX_QUEUE;
    this.#maxBatch = options.maxBatch ?? DEFAULT_MAX_BATCH;
    this.#resource = attributesOf({ "service.name": SERVICE_NAME, ...options.resource });
  }

  record(span: SpanData): void {
    if (this.#closed || this.#queue.length >= this.#maxQueue) {
      this.stats.dropped++;
      return;
    }
    this.#queue.push(span);
    if (this.#queue.length >= this.#maxBatch) this.#send();
    else if (this.#timer === undefined && !this.#sending) {
      const timer = setTimeout(() => {
        this.#timer = undefined;
        this.#send();
      }, this.#options.delayMs ?? DEFAULT_DELAY_MS);
      // A process with nothing else to do need not wait for it: shutdown flushes.
      Deno.unrefTimer(timer);
      this.#timer = timer;
    }
  }

  async flush(): Promise<void> {
    while (this.#queue.length > 0 || this.#sending) {
      if (this.#abort.signal.aborted) return;
      this.#send();
      await this.#sending;
    }
  }

  async shutdown(options: { timeoutMs?: number } = {}): Promise<void> {
    this.#closed = true;
    this.#closing.abort();
    const timeoutMs = options.timeoutMs ?? DEFAULT_SHUTDOWN_MS;
    let deadline: ReturnType<typeof setTimeout> | undefined;
    const expired = new Promise<void>((resolve) => {
      deadline = setTimeout(resolve, timeoutMs);
    });
    try {
      await Promise.race([this.flush(), expired]);
    } finally {
      clearTimeout(deadline);
      this.#abort.abort();
      clearTimeout(this.#timer);
      this.#timer = undefined;
      await this.#sending;
      this.stats.dropped += this.#queue.splice(0).length;
    }
  }

  /** Starts the send loop unless it runs. */
  #send(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#sending ??= this.#loop().finally(() => {
      this.#sending = undefined;
    });
  }

  async #loop(): Promise<void> {
    while (this.#queue.length > 0 && !this.#abort.signal.aborted) {
      const batch = this.#queue.splice(0, this.#maxBatch);
      if (await this.#deliver(batch)) {
        this.stats.exported += batch.length;
        this.#reported = false;
      } else this.stats.dropped += batch.length;
    }
  }

  /** Sends one batch, retrying; whether the collector took it. */
  async #deliver(batch: SpanData[]): Promise<boolean> {
    const body = JSON.stringify(this.#request(batch));
    const tries = this.#options.tries ?? DEFAULT_TRIES;
    let problem = "";
    for (let attempt = 1; attempt <= tries; attempt++) {
      const signal = this.#abort.signal;
      if (signal.aborted) break;
      let retryAfterMs: number | undefined;
      try {
        const response = await fetch(this.#options.endpoint, {
          method: "POST",
          headers: { ...this.#options.headers, "content-type": "application/json" },
          body,
          signal: AbortSignal.any([
            signal,
            AbortSignal.timeout(this.#options.timeoutMs ?? DEFAULT_TIMEOUT_MS),
          ]),
        });
        await response.body?.cancel().catch(() => {});
        if (response.ok) return true;
        problem = `the collector answered ${response.status} ${response.statusText}`.trim();
        // OTLP/HTTP: only these are worth another try; anything else will be refused again.
        if (![429, 502, 503, 504].includes(response.status)) {
          this.stats.failedRequests++;
          break;
        }
        const after = Number(response.headers.get("retry-after"));
        if (Number.isFinite(after) && after > 0) retryAfterMs = after * 1000;
      } catch (error) {
        problem = error instanceof Error ? error.message : String(error);
      }
      this.stats.failedRequests++;
      // A stopping process tries each batch once more, without waiting: it has no time to lose.
      if (attempt === tries || signal.aborted || (this.#closed && attempt > 1)) break;
      const base = (this.#options.retryDelayMs ?? 250) * 2 ** (attempt - 1);
      const delay = Math.min(MAX_RETRY_DELAY_MS, retryAfterMs ?? base * (0.5 + Math.random()));
      await abortableDelay(delay, AbortSignal.any([signal, this.#closing.signal]));
    }
    if (!this.#reported) {
      this.#reported = true;
      this.#options.onError?.(
        `${batch.length} span(s) not exported to ${redacted(this.#options.endpoint)}: ${problem}`,
      );
    }
    return false;
  }

  /** An OTLP/JSON `ExportTraceServiceRequest`. */
  #request(batch: SpanData[]): unknown {
    return {
      resourceSpans: [{
        resource: { attributes: this.#resource },
        scopeSpans: [{
          scope: { name: SERVICE_NAME },
          spans: batch.map((span) => ({
            traceId: span.traceId,
            spanId: span.spanId,
            ...(span.parentSpanId ? { parentSpanId: span.parentSpanId } : {}),
            name: span.name,
            // SPAN_KIND_INTERNAL
            kind: 1,
            startTimeUnixNano: unixNano(span.startMs),
            endTimeUnixNano: unixNano(Math.max(span.startMs, span.endMs)),
            attributes: attributesOf(span.attributes ?? {}),
            // STATUS_CODE_ERROR with the message, else UNSET.
            status: span.error !== undefined ? { code: 2, message: span.error } : {},
          })),
        }],
      }],
    };
  }
}

/** OTLP/JSON key-value list; undefined values are left out. */
function attributesOf(attributes: Record<string, AttributeValue | undefined>): unknown[] {
  const list: unknown[] = [];
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined) continue;
    if (typeof value === "string") list.push({ key, value: { stringValue: value } });
    else if (typeof value === "boolean") list.push({ key, value: { boolValue: value } });
    else if (Number.isSafeInteger(value)) list.push({ key, value: { intValue: String(value) } });
    else list.push({ key, value: { doubleValue: value } });
  }
  return list;
}

/**
 * Epoch milliseconds as a decimal string of nanoseconds (a uint64 does not
 * fit a double).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { unixNano } from "./exporter.ts";
 * assert.equal(unixNano(1_700_000_000_123.5), "1700000000123500000");
 * assert.equal(unixNano(0), "0");
 * ```
 */
export function unixNano(ms: number): string {
  const whole = Math.max(0, Math.floor(ms));
  const fraction = Math.min(999_999, Math.round((ms - Math.floor(ms)) * 1e6));
  return whole === 0 && fraction === 0
    ? "0"
    : `${whole}${String(Math.max(0, fraction)).padStart(6, "0")}`.replace(/^0+(?=\d)/, "");
}

/** A URL without its query (which may hold a key) for a message. */
function redacted(url: string): string {
  try {
    const parsed = new URL(url);
    return `${parsed.origin}${parsed.pathname}`;
  } catch {
    return "the collector";
  }
}
