/**
 * The run API as a client sees it: what `runnel submit|runs|show|logs|cancel|
 * resume|token --server URL` call. Several server URLs may be given: a call
 * goes to the first that answers (any server accepts any call). Calls carry
 * an API token (`Authorization: Bearer`); an `https://` server's
 * certificate may chain to a CA of the caller's (`caCerts`).
 *
 * @module
 */

import type { PipelineMeta, PipelineVersion } from "../server/pipelines.ts";
import type { ScheduleState } from "../server/schedules.ts";
import type { RunPage, RunQuery } from "../server/run_index.ts";
import type { Diagnostic } from "../../core/errors.ts";
import { PipelineError } from "../../core/errors.ts";
import type { StepState } from "../../core/model.ts";
import type { ClusterRunRecord } from "../server/keys.ts";
import type { Role, TokenInfo } from "../server/auth.ts";

export type { Role, TokenInfo } from "../server/auth.ts";

/** Options of {@link RunClient}. */
export interface RunClientOptions {
  /** The API token sent with every call (`rnl_…`, or an admin token file's content). */
  token?: string;
  /** PEM CA certificates an `https://` server's certificate may chain to (besides the system's). */
  caCerts?: string[];
}

/** A token as the server hands it out once: its secret and its record. */
export interface IssuedToken extends TokenInfo {
  /** The secret form, `rnl_<id>_<secret>`: the server never shows it again. */
  token: string;
}

/** A server could not be reached or refused a call. */
export class ServerRequestError extends Error {
  /** Stable error code (the server's, or `unreachable`). */
  readonly code: string;
  /** HTTP status, 0 when no server answered. */
  readonly status: number;

  /** Builds the error from its parts. */
  constructor(code: string, status: number, message: string) {
    super(message);
    this.name = "ServerRequestError";
    this.code = code;
    this.status = status;
  }
}

/**
 * A run API client over one or more server URLs.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { RunClient, ServerRequestError } from "./mod.ts";
 *
 * const client = new RunClient(["http://127.0.0.1:9"], { token: "rnl_example" });
 * await assert.rejects(client.runs(), (error) => error instanceof ServerRequestError);
 * client.close();
 * ```
 */
export class RunClient {
  readonly #servers: string[];
  readonly #token: string | undefined;
  readonly #http: Deno.HttpClient | undefined;

  /** Builds a client; `servers` are base URLs such as `https://10.0.0.1:8080`. */
  constructor(servers: string[], options: RunClientOptions = {}) {
    if (servers.length === 0) throw new ServerRequestError("no_server", 0, "Expected --server URL");
    this.#servers = servers.map((url) => url.replace(/\/+$/, ""));
    this.#token = options.token;
    this.#http = options.caCerts?.length
      ? Deno.createHttpClient({ caCerts: options.caCerts })
      : undefined;
  }

  /** Releases the TLS client made for `caCerts`, if any. */
  close(): void {
    this.#http?.close();
  }

  /** {@link close}, for `using`. */
  [Symbol.dispose](): void {
    this.close();
  }

  /** Makes the cluster's first admin token; refused once any admin exists. */
  async bootstrap(): Promise<IssuedToken> {
    return await this.#json("POST", "/api/acl/bootstrap");
  }

  /** Makes a token (admin only); its secret is in the answer, and only there. */
  async createToken(options: { name: string; role: Role }): Promise<IssuedToken> {
    return await this.#json("POST", "/api/tokens", options);
  }

  /** Revokes a token by id (admin only). */
  async revokeToken(id: string): Promise<TokenInfo> {
    return (await this.#json("DELETE", `/api/tokens/${encodeURIComponent(id)}`)).revoked;
  }

  /**
   * Revokes an agent's identity (admin only): it is cut off, its worker goes
   * offline, and its id is refused until forgotten.
   */
  async revokeAgent(agentId: string): Promise<void> {
    await this.#json("POST", `/api/agents/${encodeURIComponent(agentId)}/revoke`);
  }

  /** Forgets an agent's identity (admin only): the id may register again. */
  async forgetAgent(agentId: string): Promise<void> {
    await this.#json("DELETE", `/api/agents/${encodeURIComponent(agentId)}/identity`);
  }

  /** Every token, without secrets (admin only). */
  async listTokens(): Promise<TokenInfo[]> {
    return await this.#json("GET", "/api/tokens");
  }

  /**
   * Submits a pipeline's text (and, in `files`, its directory packed as path
   * → base64, so agents need not have it); located diagnostics come back as
   * a {@link PipelineError}.
   */
  async submit(
    source: string,
    file: string,
    baseDir: string,
    files?: Record<string, string>,
    params?: Record<string, unknown>,
    labels?: Record<string, string>,
  ): Promise<{ runId: string }> {
    const response = await this.#call("POST", "/api/runs", {
      source,
      file,
      baseDir,
      ...(files ? { files } : {}),
      ...(params ? { params } : {}),
      ...(labels ? { labels } : {}),
    });
    const body = await response.json().catch(() => ({}));
    if (response.status === 400 && Array.isArray(body.diagnostics)) {
      throw new PipelineError(body.diagnostics as Diagnostic[]);
    }
    if (!response.ok) throw await this.#error(response, body);
    return body;
  }

  /**
   * Registers a pipeline under its name (`runnel apply`): a new version
   * unless the current one holds the same source and directory.
   */
  async apply(
    source: string,
    file: string,
    baseDir: string,
    files?: Record<string, string>,
  ): Promise<{ name: string; version: number; unchanged: boolean }> {
    const response = await this.#call("POST", "/api/pipelines", {
      source,
      file,
      baseDir,
      ...(files ? { files } : {}),
    });
    const body = await response.json().catch(() => ({}));
    if (response.status === 400 && Array.isArray(body.diagnostics)) {
      throw new PipelineError(body.diagnostics as Diagnostic[]);
    }
    if (!response.ok) throw await this.#error(response, body);
    return body;
  }

  /** The registered pipelines. */
  async pipelines(): Promise<PipelineMeta[]> {
    return await this.#json("GET", "/api/pipelines");
  }

  /** A registered pipeline and its versions, newest first. */
  async pipeline(
    name: string,
  ): Promise<{ pipeline: PipelineMeta; versions: Array<Omit<PipelineVersion, "source">> }> {
    return await this.#json("GET", `/api/pipelines/${encodeURIComponent(name)}`);
  }

  /** Starts a run of a registered pipeline (its current version unless `version` says). */
  async trigger(
    name: string,
    options: {
      params?: Record<string, unknown>;
      version?: number;
      labels?: Record<string, string>;
    } = {},
  ): Promise<{ runId: string; pipeline: string; version: number; url: string }> {
    const response = await this.#call(
      "POST",
      `/api/pipelines/${encodeURIComponent(name)}/trigger`,
      {
        ...(options.params ? { params: options.params } : {}),
        ...(options.version !== undefined ? { version: options.version } : {}),
        ...(options.labels ? { labels: options.labels } : {}),
      },
    );
    const body = await response.json().catch(() => ({}));
    if (response.status === 400 && Array.isArray(body.diagnostics)) {
      throw new PipelineError(body.diagnostics as Diagnostic[]);
    }
    if (!response.ok) throw await this.#error(response, body);
    return body;
  }

  /** The schedules of registered pipelines. */
  async schedules(): Promise<ScheduleState[]> {
    return await this.#json("GET", "/api/schedules");
  }

  /** Backfills a schedule: a run per tick in `[from, to]` (or only the ticks, with `dryRun`). */
  async backfill(
    name: string,
    options: { from: string; to: string; dryRun?: boolean },
  ): Promise<{ ticks: string[]; dryRun?: boolean }> {
    return await this.#json("POST", `/api/schedules/${encodeURIComponent(name)}/backfill`, {
      from: options.from,
      to: options.to,
      ...(options.dryRun ? { dryRun: true } : {}),
    });
  }

  /** Sets a registered pipeline's schedule apart from its file (a `schedule:` section's keys). */
  async setSchedule(name: string, schedule: Record<string, unknown>): Promise<void> {
    await this.#json("PUT", `/api/schedules/${encodeURIComponent(name)}`, schedule);
  }

  /** Removes a registered pipeline's schedule. */
  async deleteSchedule(name: string): Promise<void> {
    await this.#json("DELETE", `/api/schedules/${encodeURIComponent(name)}`);
  }

  /** Suspends or resumes a registered pipeline's schedule. */
  async suspendSchedule(name: string, suspended: boolean): Promise<void> {
    await this.#json(
      "POST",
      `/api/schedules/${encodeURIComponent(name)}/${suspended ? "suspend" : "resume"}`,
      {},
    );
  }

  /** Removes a registered pipeline and its versions (admin). */
  async deletePipeline(name: string): Promise<void> {
    await this.#json("DELETE", `/api/pipelines/${encodeURIComponent(name)}`);
  }

  /** Decides a waiting step's approval gate. */
  async approve(runId: string, step: string, approve: boolean, reason?: string): Promise<void> {
    await this.#json("POST", `/api/runs/${encodeURIComponent(runId)}/approve`, {
      step,
      approve,
      ...(reason ? { reason } : {}),
    });
  }

  /** Reruns steps of a finished run as a new run (with `downstream`, their dependents too). */
  async rerun(
    runId: string,
    steps: string[],
    downstream = false,
  ): Promise<{ runId: string; rerun: string[] }> {
    return await this.#json("POST", `/api/runs/${encodeURIComponent(runId)}/rerun`, {
      steps,
      downstream,
    });
  }

  /** A page of the runs matching `query`, newest first, read from the cluster's indexes. */
  async searchRuns(query: RunQuery): Promise<RunPage> {
    const search = new URLSearchParams();
    for (const [key, value] of Object.entries(query.labels ?? {})) {
      search.append("label", `${key}=${value}`);
    }
    if (query.status) search.set("status", query.status);
    if (query.pipeline) search.set("pipeline", query.pipeline);
    if (query.limit) search.set("limit", String(query.limit));
    if (query.after) search.set("after", query.after);
    return await this.#json("GET", `/api/runs/search?${search}`);
  }

  /**
   * The newest runs (a page of `limit`, default 100), newest first; the
   * next page with `searchRuns({ after })`.
   */
  async runs(options: { limit?: number } = {}): Promise<ClusterRunRecord[]> {
    return await this.#json("GET", `/api/runs${options.limit ? `?limit=${options.limit}` : ""}`);
  }

  /** A run and its steps. */
  async run(id: string): Promise<{ run: ClusterRunRecord; steps: Record<string, StepState> }> {
    return await this.#json("GET", `/api/runs/${encodeURIComponent(id)}`);
  }

  /** Asks for a cancel. */
  async cancel(id: string): Promise<string> {
    return (await this.#json("POST", `/api/runs/${encodeURIComponent(id)}/cancel`)).outcome;
  }

  /** Asks for a resume. */
  async resume(id: string): Promise<void> {
    await this.#json("POST", `/api/runs/${encodeURIComponent(id)}/resume`);
  }

  /** A run's events (`run`, `step`, `end`) as they happen, until the run ends. */
  events(id: string, signal?: AbortSignal): AsyncIterable<{ event: string; data: unknown }> {
    return this.#sse(`/api/runs/${encodeURIComponent(id)}/events`, signal);
  }

  /** A run's log batches; with `follow`, until the run ends. */
  logs(
    id: string,
    options: { step?: string; follow?: boolean; signal?: AbortSignal } = {},
  ): AsyncIterable<{ event: string; data: unknown }> {
    const query = new URLSearchParams();
    if (options.step) query.set("step", options.step);
    if (options.follow) query.set("follow", "1");
    return this.#sse(`/api/runs/${encodeURIComponent(id)}/logs?${query}`, options.signal);
  }

  async *#sse(path: string, signal?: AbortSignal): AsyncIterable<{ event: string; data: unknown }> {
    const response = await this.#call("GET", path, undefined, signal);
    if (!response.ok) throw await this.#error(response, await response.json().catch(() => ({})));
    let buffer = "";
    for await (const text of response.body!.pipeThrough(new TextDecoderStream())) {
      buffer += text;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const event = /^event: (.*)$/m.exec(block)?.[1] ?? "message";
        const data = /^data: (.*)$/m.exec(block)?.[1];
        // A comment block (`: keep-alive`) carries nothing.
        if (data === undefined && !/^event: /m.test(block)) continue;
        const parsed = data === undefined ? undefined : JSON.parse(data);
        if (event === "error") {
          throw new ServerRequestError(
            "stream_failed",
            0,
            String(parsed?.message ?? "stream failed"),
          );
        }
        yield { event, data: parsed };
        if (event === "end") return;
      }
    }
  }

  async #json(method: string, path: string, body?: unknown) {
    const response = await this.#call(method, path, body);
    const parsed = await response.json().catch(() => ({}));
    if (!response.ok) throw await this.#error(response, parsed);
    return parsed;
  }

  /** Tries the servers in order; the first that answers (any status) wins. */
  async #call(
    method: string,
    path: string,
    body?: unknown,
    signal?: AbortSignal,
  ): Promise<Response> {
    const problems: string[] = [];
    for (const server of this.#servers) {
      try {
        const headers: Record<string, string> = {};
        if (body !== undefined) headers["content-type"] = "application/json";
        if (this.#token !== undefined) headers.authorization = `Bearer ${this.#token}`;
        return await fetch(`${server}${path}`, {
          method,
          signal,
          headers,
          body: body === undefined ? undefined : JSON.stringify(body),
          ...(this.#http ? { client: this.#http } : {}),
        });
      } catch (error) {
        if (signal?.aborted) throw error;
        problems.push(`${server}: ${describeFailure(error)}`);
      }
    }
    throw new ServerRequestError(
      "unreachable",
      0,
      `No server answered (${problems.join("; ")}). Is "runnel server" running there?`,
    );
  }

  // deno-lint-ignore require-await
  async #error(response: Response, body: { error?: string; message?: string }) {
    return new ServerRequestError(
      body.error ?? "http_error",
      response.status,
      body.message ?? `The server answered ${response.status} ${response.statusText}`,
    );
  }
}

/** Why a fetch failed: Deno puts the reason (refused, TLS…) in the error's cause. */
function describeFailure(error: unknown): string {
  if (!(error instanceof Error)) return String(error);
  const cause = error.cause instanceof Error ? error.cause.message : undefined;
  const reason = cause && !error.message.includes(cause)
    ? `${error.message}: ${cause}`
    : error.message;
  return /certificate/i.test(reason)
    ? `${reason} (trust the server's CA with --tls-ca FILE)`
    : reason;
}
