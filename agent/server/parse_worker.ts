/**
 * Parses submitted pipelines off the server's event loop, in one worker
 * reused across submits: a large file is seconds of CPU, and meanwhile the
 * server must keep answering `/health` and its agents' heartbeats. A parse
 * that runs past {@link MAX_PARSE_MS} is abandoned (the worker is replaced).
 *
 * @module
 */

import type { Diagnostic } from "../../core/errors.ts";
import { PipelineError } from "../../core/errors.ts";
import type { PipelineLimits } from "../../core/limits.ts";
import type { Plan } from "../../core/model.ts";
import type { PipelineBundle } from "../bundle.ts";

/** Longest a submitted pipeline may take to parse before it is refused. */
export const MAX_PARSE_MS = 30_000;

/** What the worker is asked. */
export interface ParseRequest {
  id: number;
  source: string;
  file: string;
  baseDir: string;
  bundle?: PipelineBundle;
  secretNames?: string[];
  limits?: Partial<PipelineLimits>;
  /** The run's parameter values as submitted. */
  params?: Record<string, unknown>;
}

/** What the worker answers: a plan, the pipeline's problems, or an error. */
export type ParseResponse =
  | { id: number; plan: Plan }
  | { id: number; diagnostics: Diagnostic[] }
  | { id: number; error: string };

/** A parse took longer than {@link MAX_PARSE_MS}. */
export class ParseTimeoutError extends Error {
  /** Stable error code. */
  readonly code = "parse_timeout";

  /** Builds the error from the limit it passed. */
  constructor(ms: number) {
    super(`Expected the pipeline to parse within ${ms / 1000} s; it took longer`);
    this.name = "ParseTimeoutError";
  }
}

/** A worker that parses submitted pipelines, one at a time. */
export class PipelineParser {
  #worker: Worker | undefined;
  #next = 0;
  #queue: Promise<unknown> = Promise.resolve();
  readonly #timeoutMs: number;

  /** A parser whose parses may take `timeoutMs` each. */
  constructor(options: { timeoutMs?: number } = {}) {
    this.#timeoutMs = options.timeoutMs ?? MAX_PARSE_MS;
  }

  /**
   * Parses in the worker; rejects with a {@link PipelineError} for a bad
   * pipeline, {@link ParseTimeoutError} past the time limit (the parser's,
   * or `options.timeoutMs`).
   */
  parse(request: Omit<ParseRequest, "id">, options: { timeoutMs?: number } = {}): Promise<Plan> {
    const timeoutMs = options.timeoutMs ?? this.#timeoutMs;
    const run = this.#queue.then(() => this.#parse({ ...request, id: ++this.#next }, timeoutMs));
    this.#queue = run.catch(() => {});
    return run;
  }

  /** Stops the worker. */
  close(): void {
    this.#worker?.terminate();
    this.#worker = undefined;
  }

  #parse(request: ParseRequest, timeoutMs: number): Promise<Plan> {
    this.#worker ??= new Worker(new URL("./_parse_entry.ts", import.meta.url).href, {
      type: "module",
    });
    const worker = this.#worker;
    return new Promise<Plan>((resolve, reject) => {
      const timer = setTimeout(() => {
        // A runaway parse cannot be interrupted inside the worker: replace it.
        done();
        this.close();
        reject(new ParseTimeoutError(timeoutMs));
      }, timeoutMs);
      const onMessage = (event: MessageEvent<ParseResponse>) => {
        const answer = event.data;
        if (answer.id !== request.id) return;
        done();
        if ("plan" in answer) resolve(answer.plan);
        else if ("diagnostics" in answer) reject(new PipelineError(answer.diagnostics));
        else reject(new Error(answer.error));
      };
      const onError = (event: ErrorEvent) => {
        event.preventDefault();
        done();
        this.close();
        reject(new Error(`The pipeline parser failed: ${event.message}`));
      };
      const done = () => {
        clearTimeout(timer);
        worker.removeEventListener("message", onMessage);
        worker.removeEventListener("error", onError);
      };
      worker.addEventListener("message", onMessage);
      worker.addEventListener("error", onError);
      worker.postMessage(request);
    });
  }
}
