/**
 * The HTTP face of every server: health, readiness, `/raft-state`,
 * `/cluster-state`, `/metrics`, the run API (submit, list, get, cancel,
 * resume, live logs and step events as server-sent events) and the token
 * API. Any server answers any call: everything is read from, or written to,
 * the store.
 *
 * Every call but `/health`, `/ready` and the one-time bootstrap presents an
 * API token (`Authorization: Bearer <token>`, see `auth.ts`) whose role is
 * at least the one in the table: 401 without a valid token, 403 with one
 * too weak. A browser may send the token as the password of HTTP Basic
 * credentials for `GET`s only (the run page and its live updates cannot set
 * headers; a browser replays Basic credentials on its own, so they must
 * never be able to change anything). Submit, cancel, resume and every token
 * change leave an audit line (`component: "audit"`) with the token's name
 * and id, never its secret.
 *
 * | method and path | role | answer |
 * | --- | --- | --- |
 * | `GET /health` | none | 200 while the process serves |
 * | `GET /ready` | none | 200 once the store answers, else 503 |
 * | `GET /raft-state` | read | `{node_id, state, leader, term, commit_index}` |
 * | `GET /cluster-state` | read | workers with labels, capabilities, status, last heartbeat |
 * | `GET /metrics` | read, or none with `metricsPublic` | Prometheus text |
 * | `POST /api/runs` | submit | `{source, file?, baseDir?, files?, params?}` → 201 `{runId}`, or 400 with located diagnostics; `files` ships the pipeline directory (path → base64); `params` the run's parameter values |
 * | `POST /api/pipelines` | submit | as `POST /api/runs` without `params` → 201 `{name, version}` (200 and `unchanged` when the current version holds the same) |
 * | `GET /api/pipelines`, `GET /api/pipelines/:name` | read | registered pipelines; one with its versions |
 * | `DELETE /api/pipelines/:name` | admin | removes it and its versions (its runs stay) |
 * | `POST /api/pipelines/:name/trigger` | submit | `{params?, version?}` → 201 `{runId, pipeline, version, url}` |
 * | `POST /api/pipelines/:name/webhook` | none: the body signed with the pipeline's `webhook.secret` (`X-Runnel-Signature-256: sha256=<hex HMAC>`) | as a trigger; 401 unsigned |
 * | `GET /api/schedules` | read | schedules: next and last tick, the runs they started |
 * | `POST /api/schedules/:name/suspend`, `/resume` | submit | 200 `{pipeline, suspended}` |
 * | `PUT /api/schedules/:name`, `DELETE …` | submit | a schedule set apart from the pipeline's file (its `schedule:` section's keys), or removed |
 * | `POST /api/schedules/:name/backfill` | submit | `{from, to, dryRun?}` → 202 `{ticks}`: a run per tick, as its concurrency policy allows |
 * | `GET /api/runs?limit=N&after=C` | read | a page of runs (default 100, at most 1,000), newest first, as an array; a `Link: <…>; rel="next"` header (and `X-Next-Cursor`) names the next page |
 * | `GET /api/runs/search?label=K=V&status=S&pipeline=P&limit=N&after=C` | read | `{runs, next?}`: a page of an index, newest first |
 * | `GET /api/runs/:id` | read | `{run, steps}` |
 * | `POST /api/runs/:id/cancel`, `/resume` | submit | 202 |
 * | `POST /api/runs/:id/approve` | the step's `approval.role` (default submit) | `{step, approve, reason?}` → 202: decides a waiting step's gate |
 * | `POST /api/runs/:id/rerun` | submit | `{steps, downstream?}` → 201 `{runId, rerun}`: a new run reusing every other succeeded step's outputs |
 * | `GET /api/runs/:id/events` | read | SSE: `run` and `step` records as they change, until the run ends |
 * | `GET /api/runs/:id/logs?step=S&follow=1` | read | SSE: `log` batches (`{step, attempt, text}`) |
 * | `GET /api/runs/:id/mermaid` | read | the DAG as Mermaid, nodes coloured by status |
 * | `GET /api/runs/:id/artifacts/:step/:name` | read | an artifact, verified against its digest, as an attachment (needs the server's `--artifacts` or `--s3-*`) |
 * | `GET /`, `GET /runs/:id` | none | redirects to the web UI: `/ui/`, `/ui/runs/:id` |
 * | `GET /ui/…` pages and assets | none | the web UI (`agent/ui/`): pages without data, loading nothing from another origin |
 * | `GET /ui/api/…` | read | what the UI's pages show (`agent/ui/routes.ts`) |
 * | `POST /api/acl/bootstrap` | none, once | 201 `{token, id, name, role}`: the first admin token; 409 after |
 * | `GET /api/tokens` | admin | every token (id, name, role, created at/by; no secrets) |
 * | `POST /api/tokens` | admin | `{name, role}` → 201 `{token, id, …}`: the secret, shown this once |
 * | `DELETE /api/tokens/:id` | admin | 200 `{revoked}` |
 *
 * Every error is a JSON body `{error, message}`; a body that is too large,
 * not JSON or not of the expected shape is a 4xx naming what was expected,
 * never a 500.
 *
 * @module
 */

import { sseResponse } from "./_sse.ts";
import { Buffer } from "node:buffer";
import { createHmac, timingSafeEqual } from "node:crypto";
import { LineCounter, parseDocument } from "npm:yaml@2.9.1";
import type { Diagnostic } from "../../core/errors.ts";
import { PipelineError } from "../../core/errors.ts";
import { Locator, type PipelineLimits } from "../../core/load.ts";
import { isTerminalRunStatus } from "../../core/model.ts";
import type { Plan, StepState } from "../../core/model.ts";
import { renderMermaid } from "../../core/mermaid.ts";
import { expandPlan } from "../../core/fanout.ts";
import { type Store, StoreError } from "../../consensus/store.ts";
import { clusterKeys, type ClusterRunRecord } from "./keys.ts";
import {
  clusterStepStates,
  getClusterRun,
  listWorkers,
  requestCancel,
  requestResume,
  RunRequestError,
  submitRun,
} from "./runs.ts";
import type { RaftState, ServerMetrics } from "./metrics.ts";
import { listSchedules, setSuspended, startBackfill, syncSchedule } from "./schedules.ts";
import { scheduleProblem, scheduleSpec, tickParams, ticksBetween } from "../../core/schedule.ts";
import { RerunError, selectRerun } from "../../core/rerun.ts";
import { type RunQuery, searchRuns } from "./run_index.ts";
import { LABEL_KEY_PATTERN, LABEL_VALUE_PATTERN, ScheduleSchema } from "../../core/schema.ts";
import { planRegistered } from "./trigger.ts";
import {
  applyPipeline,
  deletePipeline,
  getPipeline,
  listPipelines,
  listVersions,
  PipelineRegistryError,
} from "./pipelines.ts";
import {
  bundleDigest,
  type BundleStorage,
  checkBundle,
  MAX_BUNDLE_BYTES,
  MAX_BUNDLE_FILES,
  type PipelineBundle,
} from "../bundle.ts";
import {
  aclKeys,
  ADMIN_FILE_TOKEN_ID,
  type Authenticator,
  bootstrapAcl,
  type Caller,
  createToken,
  isRole,
  listTokens,
  revokeToken,
  type Role,
  roleAllows,
  TokenRequestError,
} from "./auth.ts";
import { ParseTimeoutError, type PipelineParser } from "./parse_worker.ts";
import { CONNECTION_SILENT_HEARTBEATS, forgetAgent, revokeAgent } from "./identity.ts";
import { withLastHeartbeats } from "./presence.ts";
import { type WebhookAllowList, webhookHost } from "../effects.ts";
import type { ArtifactStore } from "../../core/artifacts/store.ts";
import {
  clusterReadModel,
  createUiHandler,
  download,
  isUiPath,
  type ReadModel,
} from "../ui/mod.ts";

/** What the API needs from its server. */
export interface ApiContext {
  serverId: string;
  store: Store;
  metrics: ServerMetrics;
  /** The Raft status of the store member this server talks to. */
  raftState(): Promise<RaftState>;
  /** Id of the server that runs the scheduler, if one is elected. */
  schedulerLeader(): Promise<string | undefined>;
  /** Heartbeat interval of workers (a worker is offline after 3 missed ones). */
  heartbeatMs: number;
  /** Secret names a submitted pipeline may use (this server's and connected agents'). */
  secretNames?: () => Promise<string[]>;
  /** Checks the tokens callers present. */
  auth: Authenticator;
  /** Whether `/metrics` answers without a token. */
  metricsPublic: boolean;
  /**
   * Whether this server takes the one-time bootstrap; not when it has an
   * admin token file (which also closes the bootstrap in the store, for the
   * servers that have none).
   */
  bootstrapOpen: boolean;
  /** The hosts `on-failure` webhooks may reach; a pipeline naming another is refused. */
  webhookAllow: WebhookAllowList;
  /** Structured log line: audit lines and internal errors go here. */
  log: (fields: Record<string, unknown>) => void;
  /** Limits on what a submitted pipeline may expand to (default: the defaults). */
  pipelineLimits?: Partial<PipelineLimits>;
  /** Parses submitted pipelines off the event loop. */
  parser: PipelineParser;
  /**
   * The value of a secret this server's operator declares (`--secrets`),
   * or undefined: what signs a registered pipeline's webhook triggers.
   */
  readSecret?: (name: string) => string | undefined;
  /** The artifact store the agents upload to, for downloads (none: downloads answer 404). */
  artifacts?: ArtifactStore;
  /**
   * Aborts when the server closes: live streams (a UI page left open) end
   * then, instead of holding the shutdown until their runs end.
   */
  closing?: AbortSignal;
  /** Where shipped directories are kept (`agent/bundle.ts`). */
  bundles?: BundleStorage;
}

/** Largest submission: a pipeline and its packed directory (base64 grows 8 MiB to ~11). */
export const MAX_REQUEST_BYTES = 16 * 1024 * 1024;
/** Largest body of a token call: a name and a role. */
const MAX_TOKEN_REQUEST_BYTES = 16 * 1024;

/** Who may call a route: anyone, or a token of at least this role. */
type Access = Role | "anyone";

/** One call as a route handler sees it. */
interface Call {
  context: ApiContext;
  request: Request;
  url: URL;
  /** The route's captured path parts (a run or token id). */
  params: string[];
  /** The token's owner; absent on routes open to anyone. */
  caller?: Caller;
  /** Fields the audit line of this call adds (run id, token made…). */
  audit: Record<string, unknown>;
  /** Aborts when the client is gone (the response is over). */
  clientGone: AbortSignal;
}

interface Route {
  method: string;
  path: RegExp;
  access: (context: ApiContext) => Access;
  /** The audit action: calls of this route are audited, allowed or not. */
  audit?: string;
  handle(call: Call): Promise<Response> | Response;
}

const anyone = (): Access => "anyone";
const needs = (role: Role) => (): Access => role;

const ROUTES: Route[] = [
  { method: "GET", path: /^\/health$/, access: anyone, handle: health },
  { method: "GET", path: /^\/ready$/, access: anyone, handle: ready },
  { method: "GET", path: /^\/raft-state$/, access: needs("read"), handle: raftStateOf },
  { method: "GET", path: /^\/cluster-state$/, access: needs("read"), handle: clusterState },
  {
    method: "GET",
    path: /^\/metrics$/,
    access: (context) => context.metricsPublic ? "anyone" : "read",
    handle: metrics,
  },
  { method: "GET", path: /^\/$/, access: anyone, handle: () => redirect("/ui/") },
  {
    method: "GET",
    path: /^\/runs\/([^/]+)$/,
    access: anyone,
    handle: ({ params }) => redirect(`/ui/runs/${encodeURIComponent(params[0])}`),
  },
  { method: "GET", path: /^\/ui\/api\/.+$/, access: needs("read"), handle: uiCall },
  { method: "GET", path: /^\/ui(\/.*)?$/, access: anyone, handle: uiCall },
  {
    method: "GET",
    path: /^\/api\/runs\/([^/]+)\/artifacts\/([^/]+)\/([^/]+)$/,
    access: needs("read"),
    handle: ({ context, params }) =>
      download(readModelOf(context), { runId: params[0], step: params[1], name: params[2] }),
  },
  {
    method: "POST",
    path: /^\/api\/runs$/,
    access: needs("submit"),
    audit: "run.submit",
    handle: submit,
  },
  {
    method: "GET",
    path: /^\/api\/runs$/,
    access: needs("read"),
    handle: listRunsPage,
  },
  {
    method: "GET",
    path: /^\/api\/runs\/search$/,
    access: needs("read"),
    handle: async ({ context, url }) => json(await searchRuns(context.store, runQueryOf(url))),
  },
  { method: "GET", path: /^\/api\/runs\/([^/]+)$/, access: needs("read"), handle: runOf },
  {
    method: "POST",
    path: /^\/api\/runs\/([^/]+)\/cancel$/,
    access: needs("submit"),
    audit: "run.cancel",
    handle: cancel,
  },
  {
    method: "POST",
    path: /^\/api\/runs\/([^/]+)\/resume$/,
    access: needs("submit"),
    audit: "run.resume",
    handle: resume,
  },
  {
    method: "POST",
    path: /^\/api\/runs\/([^/]+)\/approve$/,
    // The least role is the step's own (`approval.role`), checked in the handler.
    access: needs("read"),
    audit: "run.approve",
    handle: approve,
  },
  {
    method: "POST",
    path: /^\/api\/runs\/([^/]+)\/rerun$/,
    access: needs("submit"),
    audit: "run.rerun",
    handle: rerun,
  },
  {
    method: "GET",
    path: /^\/api\/runs\/([^/]+)\/mermaid$/,
    access: needs("read"),
    handle: mermaid,
  },
  { method: "GET", path: /^\/api\/runs\/([^/]+)\/events$/, access: needs("read"), handle: events },
  { method: "GET", path: /^\/api\/runs\/([^/]+)\/logs$/, access: needs("read"), handle: logs },
  {
    method: "POST",
    path: /^\/api\/pipelines$/,
    access: needs("submit"),
    audit: "pipeline.apply",
    handle: apply,
  },
  {
    method: "GET",
    path: /^\/api\/pipelines$/,
    access: needs("read"),
    handle: async ({ context }) => json(await listPipelines(context.store)),
  },
  {
    method: "GET",
    path: /^\/api\/pipelines\/([^/]+)$/,
    access: needs("read"),
    handle: async ({ context, params }) =>
      json({
        pipeline: await getPipeline(context.store, params[0]),
        versions: await listVersions(context.store, params[0]),
      }),
  },
  {
    method: "DELETE",
    path: /^\/api\/pipelines\/([^/]+)$/,
    access: needs("admin"),
    audit: "pipeline.delete",
    handle: async ({ context, params, audit }) => {
      audit.pipeline = params[0];
      await deletePipeline(context.store, params[0]);
      // Its schedule goes with it, however it was set.
      await syncSchedule(context.store, params[0], undefined, Date.now(), "api");
      return json({ deleted: params[0] });
    },
  },
  {
    method: "POST",
    path: /^\/api\/pipelines\/([^/]+)\/trigger$/,
    access: needs("submit"),
    audit: "pipeline.trigger",
    handle: trigger,
  },
  {
    method: "POST",
    path: /^\/api\/pipelines\/([^/]+)\/webhook$/,
    // No token: the caller proves it holds the pipeline's webhook secret instead.
    access: anyone,
    audit: "pipeline.webhook",
    handle: webhook,
  },
  {
    method: "GET",
    path: /^\/api\/schedules$/,
    access: needs("read"),
    handle: async ({ context }) => json(await listSchedules(context.store)),
  },
  {
    method: "PUT",
    path: /^\/api\/schedules\/([^/]+)$/,
    access: needs("submit"),
    audit: "schedule.set",
    handle: setSchedule,
  },
  {
    method: "DELETE",
    path: /^\/api\/schedules\/([^/]+)$/,
    access: needs("submit"),
    audit: "schedule.delete",
    handle: async ({ context, params, audit }) => {
      audit.pipeline = params[0];
      await syncSchedule(context.store, params[0], undefined, Date.now(), "api");
      return json({ pipeline: params[0], deleted: true });
    },
  },
  {
    method: "POST",
    path: /^\/api\/schedules\/([^/]+)\/backfill$/,
    access: needs("submit"),
    audit: "schedule.backfill",
    handle: backfill,
  },
  {
    method: "POST",
    path: /^\/api\/schedules\/([^/]+)\/(suspend|resume)$/,
    access: needs("submit"),
    audit: "schedule.change",
    handle: async ({ context, params, audit }) => {
      audit.pipeline = params[0];
      audit.change = params[1];
      const found = await setSuspended(
        context.store,
        params[0],
        params[1] === "suspend",
        Date.now(),
      );
      if (!found) {
        throw new PipelineRegistryError("not_found", `No schedule for pipeline "${params[0]}"`);
      }
      return json({ pipeline: params[0], suspended: params[1] === "suspend" });
    },
  },
  {
    method: "POST",
    path: /^\/api\/agents\/([^/]+)\/revoke$/,
    access: needs("admin"),
    audit: "agent.revoke",
    handle: agentRevoke,
  },
  {
    method: "DELETE",
    path: /^\/api\/agents\/([^/]+)\/identity$/,
    access: needs("admin"),
    audit: "agent.forget",
    handle: agentForget,
  },
  {
    method: "POST",
    path: /^\/api\/acl\/bootstrap$/,
    access: anyone,
    audit: "token.bootstrap",
    handle: bootstrap,
  },
  {
    method: "GET",
    path: /^\/api\/tokens$/,
    access: needs("admin"),
    handle: async ({ context }) => json(await listTokens(context.store)),
  },
  {
    method: "POST",
    path: /^\/api\/tokens$/,
    access: needs("admin"),
    audit: "token.create",
    handle: tokenCreate,
  },
  {
    method: "DELETE",
    path: /^\/api\/tokens\/([^/]+)$/,
    access: needs("admin"),
    audit: "token.revoke",
    handle: tokenRevoke,
  },
];

/** The challenge of a 401: bearer tokens for programs, Basic for a browser's reads. */
const CHALLENGE = 'Bearer realm="runnel", Basic realm="runnel"';

/** Builds the request handler of a server. */
export function createApiHandler(
  context: ApiContext,
): (request: Request, info?: Deno.ServeHandlerInfo) => Promise<Response> {
  return async (request, info) => {
    const url = new URL(request.url);
    // Streams stop when the client is gone: when the response is over.
    const ended = new AbortController();
    info?.completed?.finally(() => ended.abort());
    const gone = {
      signal: context.closing ? AbortSignal.any([ended.signal, context.closing]) : ended.signal,
    };
    const path = url.pathname.replace(/\/+$/, "") || "/";
    const remote = info?.remoteAddr
      ? `${(info.remoteAddr as Deno.NetAddr).hostname}:${(info.remoteAddr as Deno.NetAddr).port}`
      : undefined;
    let route: Route | undefined;
    let params: string[] = [];
    for (const candidate of ROUTES) {
      const match = candidate.method === request.method ? candidate.path.exec(path) : null;
      if (match) {
        route = candidate;
        params = match.slice(1).map(decodeSegment);
        break;
      }
    }
    if (!route) {
      return json({ error: "not_found", message: `No route for ${request.method} ${path}` }, {
        status: 404,
      });
    }
    const call: Call = { context, request, url, params, audit: {}, clientGone: gone.signal };
    let response: Response;
    try {
      const refused = await authorize(call, route.access(context));
      response = refused ?? await route.handle(call);
    } catch (error) {
      response = errorResponse(context, error, { method: request.method, path });
    }
    // A refused request's body is left unread, never cancelled: Deno reads a cancelled body
    // to its end to keep the connection alive, racing the answer (a test's sender got 143 MiB
    // in before it saw its 413). Left unread, the sender is held by its socket's buffers
    // until it reads the answer.
    if (route.audit) {
      context.log({
        component: "audit",
        msg: route.audit,
        action: route.audit,
        outcome: response.status < 400
          ? "allowed"
          : response.status === 401 || response.status === 403
          ? "denied"
          : "failed",
        status: response.status,
        token: call.caller ? { id: call.caller.tokenId, name: call.caller.tokenName } : null,
        role: call.caller?.role ?? null,
        remote: remote ?? null,
        server: context.serverId,
        ...(params[0] !== undefined && route.audit !== "token.revoke" ? { runId: params[0] } : {}),
        ...call.audit,
      });
    }
    return response;
  };
}

/** Finds the caller of a call that needs a role; a response when it is refused. */
async function authorize(call: Call, access: Access): Promise<Response | undefined> {
  if (access === "anyone") return undefined;
  const header = call.request.headers.get("authorization") ?? "";
  const [scheme, credentials = ""] = header.trim().split(/\s+/, 2);
  let token: string | undefined;
  if (/^bearer$/i.test(scheme)) {
    token = credentials;
  } else if (/^basic$/i.test(scheme)) {
    if (call.request.method !== "GET") {
      return unauthorized(
        access,
        "Basic credentials are accepted for reading only; send Authorization: Bearer <token>",
      );
    }
    // `anything:token`: the password is the token (a browser prompts for both).
    const decoded = Buffer.from(credentials, "base64").toString("utf8");
    token = decoded.slice(decoded.indexOf(":") + 1);
  }
  if (!token) {
    return unauthorized(
      access,
      `This call needs an API token with the ${access} role: send ` +
        `"Authorization: Bearer <token>" (runnel: --token, RUNNEL_API_TOKEN or the CLI config file)`,
    );
  }
  const caller = await call.context.auth.authenticate(token);
  if (!caller) {
    return unauthorized(
      access,
      `The API token presented is not valid (unknown, revoked or malformed); this call needs ` +
        `one with the ${access} role`,
    );
  }
  call.caller = caller;
  if (!roleAllows(caller.role, access)) {
    return json({
      error: "forbidden",
      message: `This call needs a token with the ${access} role; token "${caller.tokenName}" ` +
        `(${caller.tokenId}) has the ${caller.role} role`,
      needed: access,
      role: caller.role,
    }, { status: 403 });
  }
  return undefined;
}

function unauthorized(needed: Role, message: string): Response {
  return json({ error: "unauthorized", message, needed }, {
    status: 401,
    headers: { "www-authenticate": CHALLENGE },
  });
}

/** A request whose body cannot be used; answered with its status, never a 500. */
class RequestBodyError extends Error {
  /** Stable error code: `too_large` or `bad_request`. */
  readonly code: "too_large" | "bad_request";
  /** 413 or 400. */
  readonly status: number;

  /** Builds the error from its code and a full sentence. */
  constructor(code: "too_large" | "bad_request", message: string) {
    super(message);
    this.name = "RequestBodyError";
    this.code = code;
    this.status = code === "too_large" ? 413 : 400;
  }
}

/** An error as an answer: the caller's mistakes by their code, the server's own as a 500 without details. */
function errorResponse(
  context: ApiContext,
  error: unknown,
  where: { method: string; path: string },
): Response {
  if (error instanceof RequestBodyError) {
    return json({ error: error.code, message: error.message }, { status: error.status });
  }
  if (error instanceof ParseTimeoutError) {
    return json({ error: error.code, message: error.message }, { status: 400 });
  }
  if (error instanceof RunRequestError) {
    return json({ error: error.code, message: error.message }, {
      status: error.code === "run_not_found" ? 404 : error.code === "plan_too_large" ? 413 : 409,
    });
  }
  if (error instanceof PipelineRegistryError) {
    return json({ error: error.code, message: error.message }, {
      status: error.code === "not_found" ? 404 : 409,
    });
  }
  if (error instanceof TokenRequestError) {
    const status = { bad_request: 400, token_not_found: 404, bootstrap_done: 409 }[error.code];
    return json({ error: error.code, message: error.message }, { status });
  }
  if (error instanceof StoreError && error.code === "unavailable") {
    return json({ error: "unavailable", message: "The state store is unavailable; try again" }, {
      status: 503,
    });
  }
  // The message of an unexpected error may name paths or internals: it goes
  // to the server's log, the caller gets an id to quote.
  const requestId = crypto.randomUUID();
  context.log({
    level: "error",
    msg: "API call failed",
    requestId,
    method: where.method,
    path: where.path,
    error: error instanceof Error ? error.message : String(error),
  });
  return json({
    error: "internal",
    message: `The server could not answer this call (request ${requestId} in its log)`,
  }, { status: 500 });
}

/**
 * A request's body, read as a stream and given up as soon as it passes
 * `limit` bytes: a large body (with or without a Content-Length) is never
 * held in memory.
 */
async function readBody(request: Request, limit: number): Promise<Uint8Array> {
  const tooLarge = () =>
    new RequestBodyError(
      "too_large",
      `Expected a request body of at most ${formatBytes(limit)}`,
    );
  const declared = Number(request.headers.get("content-length") ?? "0");
  if (declared > limit) throw tooLarge();
  if (!request.body) return new Uint8Array();
  const reader = request.body.getReader();
  const chunks: Uint8Array[] = [];
  let size = 0;
  while (true) {
    const { done, value } = await reader.read();
    if (done) break;
    size += value.byteLength;
    if (size > limit) {
      // The rest is left unread, so the sender stalls until it reads the 413 (see createApiHandler).
      throw tooLarge();
    }
    chunks.push(value);
  }
  const body = new Uint8Array(size);
  let at = 0;
  for (const chunk of chunks) {
    body.set(chunk, at);
    at += chunk.byteLength;
  }
  return body;
}

/** A request's body as a JSON object, or a 400 saying what was expected. */
async function readJsonObject(
  request: Request,
  limit: number,
  shape: string,
): Promise<Record<string, unknown>> {
  const bytes = await readBody(request, limit);
  let value: unknown;
  try {
    value = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch {
    throw new RequestBodyError("bad_request", `Expected a JSON body: ${shape}`);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new RequestBodyError("bad_request", `Expected a JSON object: ${shape}`);
  }
  return value as Record<string, unknown>;
}

function health({ context }: Call): Response {
  return json({ status: "ok", server: context.serverId });
}

async function ready({ context }: Call): Promise<Response> {
  try {
    await context.store.revision();
    return json({ status: "ready", server: context.serverId });
  } catch {
    return json({ status: "unavailable", message: "The state store does not answer" }, {
      status: 503,
    });
  }
}

async function raftStateOf({ context }: Call): Promise<Response> {
  const state = await context.raftState();
  context.metrics.observeRaft(state);
  return json(state);
}

async function clusterState({ context }: Call): Promise<Response> {
  const workers = await withLastHeartbeats(context.store, await listWorkers(context.store));
  context.metrics.setWorkers(workers.length);
  const now = Date.now();
  return json({
    server: context.serverId,
    scheduler: (await context.schedulerLeader()) ?? null,
    workers: workers.map((worker) => ({
      ...worker,
      // A worker's key outlives its last heartbeat by at most 3 intervals;
      // its server writes heartbeats every half interval, so a live one is
      // seen at most 1.5 intervals late.
      status: now - worker.lastHeartbeat > context.heartbeatMs * CONNECTION_SILENT_HEARTBEATS
        ? "late"
        : "online",
    })),
  });
}

async function metrics({ context }: Call): Promise<Response> {
  try {
    context.metrics.observeRaft(await context.raftState());
    context.metrics.setWorkers((await listWorkers(context.store)).length);
  } catch {
    // The store is unreachable: serve what was measured last.
  }
  return new Response(await context.metrics.render(), {
    headers: { "content-type": context.metrics.contentType },
  });
}

/** The UI's read model of a server's context, made once per context. */
const readModels = new WeakMap<ApiContext, ReadModel>();

function readModelOf(context: ApiContext): ReadModel {
  let model = readModels.get(context);
  if (!model) {
    model = clusterReadModel({
      serverId: context.serverId,
      store: context.store,
      heartbeatMs: context.heartbeatMs,
      raftState: () => context.raftState(),
      schedulerLeader: () => context.schedulerLeader(),
      artifacts: context.artifacts,
    });
    readModels.set(context, model);
  }
  return model;
}

const uiHandlers = new WeakMap<ReadModel, ReturnType<typeof createUiHandler>>();

/** A call of the web UI (`agent/ui/`): its pages, assets and reads, as the caller's role. */
async function uiCall({ context, request, url, caller, clientGone }: Call): Promise<Response> {
  const model = readModelOf(context);
  let handler = uiHandlers.get(model);
  if (!handler) {
    handler = createUiHandler(model);
    uiHandlers.set(model, handler);
  }
  if (!isUiPath(url.pathname)) return json({ error: "not_found" }, { status: 404 });
  return await handler(request, { role: caller?.role ?? "read", signal: clientGone });
}

function redirect(location: string): Response {
  return new Response(null, { status: 302, headers: { location } });
}

async function runOf({ context, params }: Call): Promise<Response> {
  const run = await getClusterRun(context.store, params[0]);
  return json({ run, steps: await clusterStepStates(context.store, run.runId) });
}

const APPROVE_SHAPE = '{"step": "<step id>", "approve": <boolean>, "reason"?: "…"}';

/**
 * `POST /api/runs/:id/approve`: decides a waiting step's approval gate, as
 * the caller (a token of at least the step's `approval.role`); the
 * scheduler applies it and records who decided.
 */
async function approve({ context, request, params, audit, caller }: Call): Promise<Response> {
  const body = await readJsonObject(request, MAX_TOKEN_REQUEST_BYTES, APPROVE_SHAPE);
  if (typeof body.step !== "string" || typeof body.approve !== "boolean") {
    throw new RequestBodyError("bad_request", `Expected ${APPROVE_SHAPE}`);
  }
  if (body.reason !== undefined && (typeof body.reason !== "string" || body.reason.length > 1000)) {
    throw new RequestBodyError(
      "bad_request",
      'Expected "reason" to be text (1000 characters at most)',
    );
  }
  const run = await getClusterRun(context.store, params[0]);
  audit.runId = run.runId;
  audit.step = body.step;
  audit.approved = body.approve;
  const planKv = await context.store.get(clusterKeys.plan(run.runId));
  const plan = planKv ? JSON.parse(planKv.value) as Plan : undefined;
  const step = plan?.steps[body.step];
  if (!plan || !step?.approval) {
    throw new RunRequestError(
      "run_not_found",
      `Run ${run.runId} has no step "${body.step}" with an approval gate`,
    );
  }
  const needed = step.approval.role ?? "submit";
  if (!caller || !roleAllows(caller.role, needed)) {
    return json({
      error: "forbidden",
      message: `Deciding "${body.step}" needs a token of role ${needed} or more`,
    }, { status: 403 });
  }
  const states = await clusterStepStates(context.store, run.runId);
  if (states[body.step]?.status !== "waiting") {
    throw new RunRequestError(
      "not_waiting",
      `Step "${body.step}" of run ${run.runId} is not waiting for approval` +
        (states[body.step] ? ` (it is ${states[body.step].status})` : ""),
    );
  }
  await context.store.put(
    clusterKeys.approval(run.runId, body.step),
    JSON.stringify({
      approved: body.approve,
      by: caller.tokenName,
      ...(body.reason ? { reason: body.reason } : {}),
    }),
  );
  return json({ runId: run.runId, step: body.step, approved: body.approve }, { status: 202 });
}

const RERUN_SHAPE = '{"steps": ["<step name or instance id>", …], "downstream"?: <boolean>}';

/**
 * `POST /api/runs/:id/rerun`: a new run of a finished run's plan in which
 * the chosen steps (and with `downstream` their dependents) run again and
 * every other step that succeeded is reused, its outputs by digest.
 */
async function rerun({ context, request, params, audit, caller }: Call): Promise<Response> {
  const body = await readJsonObject(request, MAX_TOKEN_REQUEST_BYTES, RERUN_SHAPE);
  const steps = body.steps;
  if (
    !Array.isArray(steps) || steps.length === 0 || steps.length > 1_000 ||
    !steps.every((step) => typeof step === "string" && step.length > 0 && step.length <= 512)
  ) {
    throw new RequestBodyError(
      "bad_request",
      `Expected "steps" to list step names: ${RERUN_SHAPE}`,
    );
  }
  const old = await getClusterRun(context.store, params[0]);
  audit.rerunOf = old.runId;
  if (!isTerminalRunStatus(old.status)) {
    throw new RunRequestError(
      "run_not_finished",
      `Run ${old.runId} is ${old.status}; rerun steps of a finished run`,
    );
  }
  const planKv = await context.store.get(clusterKeys.plan(old.runId));
  if (!planKv) throw new RunRequestError("run_not_found", `Run ${old.runId} has no plan`);
  const plan = JSON.parse(planKv.value) as Plan;
  const states = await clusterStepStates(context.store, old.runId);
  let selection;
  try {
    selection = selectRerun(plan, states, steps as string[], {
      downstream: body.downstream === true,
      fromRun: old.runId,
      now: Date.now(),
    });
  } catch (error) {
    if (error instanceof RerunError) throw new RequestBodyError("bad_request", error.message);
    throw error;
  }
  const record = await submitRun(context.store, plan, {
    file: old.file,
    ...(old.bundle ? { bundleDigest: old.bundle } : {}),
    ...(old.registered
      ? { registered: { name: old.registered.name, version: old.registered.version } }
      : {}),
    rerunOf: old.runId,
    submittedBy: caller?.tokenName,
    also: {
      compare: [],
      success: (runId) =>
        Object.values(selection.reused).map((step) => ({
          type: "put" as const,
          key: clusterKeys.step(runId, step.id),
          value: JSON.stringify(step),
        })),
    },
  });
  audit.runId = record.runId;
  return json({ runId: record.runId, rerun: selection.rerun }, { status: 201 });
}

async function cancel({ context, params, audit }: Call): Promise<Response> {
  const outcome = await requestCancel(context.store, params[0]);
  audit.result = outcome;
  return json({ outcome }, { status: 202 });
}

async function resume({ context, params }: Call): Promise<Response> {
  await requestResume(context.store, params[0]);
  return json({ outcome: "requested" }, { status: 202 });
}

async function mermaid({ context, params }: Call): Promise<Response> {
  const run = await getClusterRun(context.store, params[0]);
  const plan = await context.store.get(clusterKeys.plan(run.runId));
  if (!plan) return json({ error: "not_found", message: "No plan" }, { status: 404 });
  const steps = await clusterStepStates(context.store, run.runId);
  const statuses = Object.fromEntries(
    Object.values(steps).map((step) => [step.id, step.status]),
  );
  const parsed = JSON.parse(plan.value) as Plan;
  // Legs that split nodes made at run time are steps of the DAG too.
  expandPlan(parsed, steps);
  return new Response(renderMermaid(parsed, statuses), {
    headers: { "content-type": "text/plain; charset=utf-8" },
  });
}

async function events(call: Call): Promise<Response> {
  const { context, params } = call;
  const run = await getClusterRun(context.store, params[0]);
  return streamEvents(context.store, run, whileAllowed(call));
}

async function logs(call: Call): Promise<Response> {
  const { context, params, url } = call;
  const run = await getClusterRun(context.store, params[0]);
  return streamLogs(context.store, run, {
    step: url.searchParams.get("step") ?? undefined,
    follow: url.searchParams.get("follow") === "1",
    signal: whileAllowed(call),
  });
}

/**
 * Aborts when the client goes away or the caller's token is revoked: a
 * stream opened with a token must not outlive it (Kubernetes cuts watches
 * the same way). A token from the admin token file has no record to revoke.
 */
function whileAllowed({ context, caller, clientGone }: Call): AbortSignal {
  if (!caller || caller.tokenId === ADMIN_FILE_TOKEN_ID) return clientGone;
  const revoked = new AbortController();
  const stop = AbortSignal.any([clientGone, revoked.signal]);
  (async () => {
    const key = aclKeys.token(caller.tokenId);
    const current = await context.store.get(key);
    if (!current) return revoked.abort();
    for await (
      const event of context.store.watch(key, {
        fromRevision: current.modRevision + 1,
        signal: stop,
      })
    ) {
      if (event.type === "delete") return revoked.abort();
    }
  })().catch(() => revoked.abort());
  return stop;
}

const SUBMIT_SHAPE = '{"source": "<pipeline yaml>", "file"?: "…", "baseDir"?: "/…", ' +
  '"files"?: {"<relative path>": "<base64>"}, "params"?: {"<name>": <string|number|boolean>}}';

/** The `params` of a submission: a map of scalars, checked against the pipeline by the parser. */
function paramsOf(params: unknown): Record<string, unknown> | undefined {
  if (params === undefined) return undefined;
  if (typeof params !== "object" || params === null || Array.isArray(params)) {
    throw new RequestBodyError("bad_request", 'Expected "params" to map names to values');
  }
  for (const [name, value] of Object.entries(params)) {
    if (!["string", "number", "boolean"].includes(typeof value)) {
      throw new RequestBodyError(
        "bad_request",
        `Expected "params.${name}" to be a string, number or boolean`,
      );
    }
  }
  return params as Record<string, unknown>;
}

/**
 * Strict base64 (RFC 4648 §4, padded), as `runnel submit` packs files. One
 * character class and a length check: a grouped repetition backtracks
 * through V8's stack and overflows it on a file of a few MiB.
 */
function isBase64(text: string): boolean {
  return text.length % 4 === 0 && /^[A-Za-z0-9+/]*={0,2}$/.test(text);
}

/** What a submission (or an apply) ships: the pipeline's text, where it came from, its directory. */
interface Submission {
  source: string;
  file: string;
  baseDir: string;
  bundle?: PipelineBundle;
}

function submissionOf(body: Record<string, unknown>): Submission {
  if (typeof body.source !== "string") {
    throw new RequestBodyError("bad_request", 'Expected "source" to hold the pipeline text');
  }
  for (const key of ["file", "baseDir"] as const) {
    if (body[key] !== undefined && typeof body[key] !== "string") {
      throw new RequestBodyError("bad_request", `Expected "${key}" to be a string`);
    }
  }
  return {
    source: body.source,
    file: (body.file as string | undefined) ?? "pipeline.yaml",
    baseDir: (body.baseDir as string | undefined) ?? "/",
    bundle: body.files === undefined ? undefined : bundleOf(body.files),
  };
}

/** Plans a submission off the event loop; its problems as a 400 with located diagnostics. */
async function planSubmission(
  context: ApiContext,
  submission: Submission,
  params: Record<string, unknown> | undefined,
  audit: Record<string, unknown>,
): Promise<Plan | Response> {
  try {
    // Off the event loop: a large file is seconds of CPU (see parse_worker.ts).
    const plan = await context.parser.parse({
      source: submission.source,
      file: submission.file,
      baseDir: submission.baseDir,
      bundle: submission.bundle,
      secretNames: await context.secretNames?.(),
      limits: context.pipelineLimits,
      params,
    });
    const refused = refusedWebhooks(
      plan,
      submission.source,
      submission.file,
      context.webhookAllow,
    );
    if (refused.length > 0) throw new PipelineError(refused);
    return plan;
  } catch (error) {
    if (error instanceof PipelineError) {
      audit.problems = error.diagnostics.length;
      return json({
        error: "invalid_pipeline",
        message: error.message,
        diagnostics: error.diagnostics,
      }, { status: 400 });
    }
    throw error;
  }
}

async function submit({ context, request, audit, caller }: Call): Promise<Response> {
  const body = await readJsonObject(request, MAX_REQUEST_BYTES, SUBMIT_SHAPE);
  const submission = submissionOf(body);
  audit.file = submission.file;
  const plan = await planSubmission(context, submission, paramsOf(body.params) ?? {}, audit);
  if (plan instanceof Response) return plan;
  const record = await submitRun(context.store, plan, {
    file: submission.file,
    bundle: submission.bundle,
    bundles: context.bundles,
    labels: labelsOf(body.labels),
    submittedBy: caller?.tokenName,
  });
  audit.runId = record.runId;
  audit.pipeline = record.pipeline;
  return json({ runId: record.runId, pipeline: record.pipeline }, { status: 201 });
}

/** `POST /api/pipelines`: registers the pipeline under its name, as a new version if it changed. */
async function apply({ context, request, audit, caller }: Call): Promise<Response> {
  const body = await readJsonObject(request, MAX_REQUEST_BYTES, SUBMIT_SHAPE);
  const submission = submissionOf(body);
  audit.file = submission.file;
  // Checked as a run would be, without values: required parameters come with each trigger.
  const plan = await planSubmission(context, submission, undefined, audit);
  if (plan instanceof Response) return plan;
  if (plan.webhookSecret !== undefined && context.readSecret?.(plan.webhookSecret) === undefined) {
    throw new RequestBodyError(
      "bad_request",
      `Expected "webhook.secret" to name a secret this server declares (--secrets), ` +
        `got "${plan.webhookSecret}"`,
    );
  }
  const { version, unchanged } = await applyPipeline(context.store, {
    name: plan.name,
    source: submission.source,
    file: submission.file,
    baseDir: submission.baseDir,
    digest: plan.digest,
    ...(submission.bundle ? { bundle: submission.bundle.digest } : {}),
    ...(caller ? { createdBy: caller.tokenName } : {}),
  }, { bundle: submission.bundle, bundles: context.bundles, webhookSecret: plan.webhookSecret });
  await syncSchedule(context.store, plan.name, plan.schedule, Date.now());
  audit.pipeline = plan.name;
  audit.version = version;
  return json({ name: plan.name, version, unchanged }, { status: unchanged ? 200 : 201 });
}

const TRIGGER_SHAPE = '{"params"?: {"<name>": <string|number|boolean>}, "version"?: <number>}';

/** `?label=k=v&status=S&pipeline=P&limit=N&after=C` as a query of the run indexes. */
function runQueryOf(url: URL): RunQuery {
  const labels: Record<string, string> = {};
  for (const label of url.searchParams.getAll("label")) {
    const at = label.indexOf("=");
    if (at <= 0) {
      throw new RequestBodyError("bad_request", `Expected label=KEY=VALUE, got "${label}"`);
    }
    labels[label.slice(0, at)] = label.slice(at + 1);
  }
  const limit = url.searchParams.get("limit");
  if (limit !== null && !/^[1-9][0-9]{0,3}$/.test(limit)) {
    throw new RequestBodyError("bad_request", "Expected limit to be a number from 1 to 1000");
  }
  const pick = (name: string) => url.searchParams.get(name) ?? undefined;
  return {
    labels,
    status: pick("status"),
    pipeline: pick("pipeline"),
    ...(limit !== null ? { limit: Number(limit) } : {}),
    after: pick("after"),
  };
}

/** Runs per page of `GET /api/runs` when the caller names no limit. */
const DEFAULT_RUNS_PAGE = 100;

/**
 * `GET /api/runs`: a page of the run index, newest first. The body stays an
 * array (as when it listed every run); the next page is in the headers, so
 * a server with 100,000 runs answers in the time of one page.
 */
async function listRunsPage({ context, url }: Call): Promise<Response> {
  const query = runQueryOf(url);
  const page = await searchRuns(context.store, {
    limit: query.limit ?? DEFAULT_RUNS_PAGE,
    after: query.after,
  });
  const headers: Record<string, string> = {};
  if (page.next !== undefined) {
    const next = new URLSearchParams({
      limit: String(query.limit ?? DEFAULT_RUNS_PAGE),
      after: page.next,
    });
    headers.link = `</api/runs?${next}>; rel="next"`;
    headers["x-next-cursor"] = page.next;
  }
  return json(page.runs, { headers });
}

/** The `labels` of a submission: a map of label keys to values. */
function labelsOf(labels: unknown): Record<string, string> | undefined {
  if (labels === undefined) return undefined;
  if (typeof labels !== "object" || labels === null || Array.isArray(labels)) {
    throw new RequestBodyError("bad_request", 'Expected "labels" to map keys to values');
  }
  for (const [key, value] of Object.entries(labels)) {
    if (
      !LABEL_KEY_PATTERN.test(key) || typeof value !== "string" || !LABEL_VALUE_PATTERN.test(value)
    ) {
      throw new RequestBodyError(
        "bad_request",
        `Expected label "${key}" of [A-Za-z0-9_./-] with a value of [A-Za-z0-9_.-] (63 at most)`,
      );
    }
  }
  return labels as Record<string, string>;
}

const SCHEDULE_SHAPE = '{"cron": "0 3 * * *", "timezone"?: "Europe/Paris", "params"?: {…}, ' +
  '"concurrency"?: "allow|forbid|replace", "starting-deadline"?: "10m", …}';

/**
 * `PUT /api/schedules/:name`: a schedule for a registered pipeline, set
 * apart from its file (the file's `schedule:` no longer changes it until
 * it is deleted); checked as the file's section is, and by planning the
 * pipeline's current version with the schedule's values.
 */
async function setSchedule({ context, request, params, audit }: Call): Promise<Response> {
  const body = await readJsonObject(request, MAX_TOKEN_REQUEST_BYTES, SCHEDULE_SHAPE);
  const name = params[0];
  audit.pipeline = name;
  const parsed = ScheduleSchema.safeParse(body);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new RequestBodyError(
      "bad_request",
      `Expected a schedule: ${
        issue.path.join(".") || "body"
      }: ${issue.message} (${SCHEDULE_SHAPE})`,
    );
  }
  const wrong = scheduleProblem(parsed.data);
  if (wrong) throw new RequestBodyError("bad_request", wrong.message);
  const spec = scheduleSpec(parsed.data);
  try {
    await planRegistered(
      {
        store: context.store,
        parser: context.parser,
        secretNames: context.secretNames,
        limits: context.pipelineLimits,
        bundles: context.bundles,
      },
      name,
      { params: tickParams(spec, Date.now()) },
    );
  } catch (error) {
    if (error instanceof PipelineError) {
      return json({
        error: "invalid_schedule",
        message: `The schedule's values do not fit pipeline "${name}": ${error.message}`,
        diagnostics: error.diagnostics,
      }, { status: 400 });
    }
    throw error;
  }
  await syncSchedule(context.store, name, spec, Date.now(), "api");
  return json({ pipeline: name, schedule: spec });
}

const BACKFILL_SHAPE = '{"from": "<ISO 8601>", "to": "<ISO 8601>", "dryRun"?: <boolean>}';

/**
 * `POST /api/schedules/:name/backfill`: one run per tick of the schedule
 * in `[from, to]`, each with its logical date, started as the schedule's
 * concurrency policy allows; `dryRun` lists the ticks only.
 */
async function backfill({ context, request, params, audit, caller }: Call): Promise<Response> {
  const body = await readJsonObject(request, MAX_TOKEN_REQUEST_BYTES, BACKFILL_SHAPE);
  const time = (key: "from" | "to") => {
    const value = typeof body[key] === "string" ? Date.parse(body[key] as string) : NaN;
    if (!Number.isFinite(value)) {
      throw new RequestBodyError(
        "bad_request",
        `Expected "${key}" to be a date and time (ISO 8601): ${BACKFILL_SHAPE}`,
      );
    }
    return value;
  };
  const [from, to] = [time("from"), time("to")];
  if (to < from) throw new RequestBodyError("bad_request", 'Expected "to" not before "from"');
  const name = params[0];
  audit.pipeline = name;
  const state = (await listSchedules(context.store)).find((s) => s.name === name);
  if (!state) throw new PipelineRegistryError("not_found", `No schedule for pipeline "${name}"`);
  let ticks: number[];
  try {
    ticks = ticksBetween(state, from, to);
  } catch (error) {
    throw new RequestBodyError("bad_request", (error as Error).message);
  }
  const iso = ticks.map((tick) => new Date(tick).toISOString());
  audit.ticks = ticks.length;
  if (body.dryRun === true) return json({ pipeline: name, dryRun: true, ticks: iso });
  if (ticks.length === 0) return json({ pipeline: name, ticks: [] });
  const started = await startBackfill(context.store, {
    name,
    ticks,
    started: [],
    total: ticks.length,
    createdAt: Date.now(),
    ...(caller ? { createdBy: caller.tokenName } : {}),
  });
  if (!started) {
    throw new PipelineRegistryError(
      "conflict",
      `A backfill of "${name}" is still going; wait for it to end`,
    );
  }
  return json({ pipeline: name, ticks: iso, concurrency: state.concurrency }, { status: 202 });
}

/** `POST /api/pipelines/:name/trigger`: a run of the current (or a named) version. */
async function trigger({ context, request, params, audit, url }: Call): Promise<Response> {
  const body = await readJsonObject(request, MAX_TOKEN_REQUEST_BYTES, TRIGGER_SHAPE);
  return await startTriggered(context, params[0], body, url, audit);
}

/** Largest body of a webhook trigger. */
const MAX_WEBHOOK_BYTES = 64 * 1024;
/** The header a webhook caller signs its body in (GitHub's scheme, runnel's name). */
const SIGNATURE_HEADER = "x-runnel-signature-256";

/**
 * `POST /api/pipelines/:name/webhook`: a trigger without a token, its body
 * signed with the pipeline's webhook secret (`X-Runnel-Signature-256:
 * sha256=<hex HMAC-SHA256 of the body>`), compared in constant time.
 */
async function webhook({ context, request, params, audit, url }: Call): Promise<Response> {
  const name = params[0];
  audit.pipeline = name;
  const bytes = await readBody(request, MAX_WEBHOOK_BYTES);
  const meta = await getPipeline(context.store, name);
  const secret = meta.webhookSecret ? context.readSecret?.(meta.webhookSecret) : undefined;
  const refused = (why: string) => {
    audit.refused = why;
    return json({
      error: "unauthorized",
      message: `Expected a body signed with the webhook secret of "${name}" in ` +
        `${SIGNATURE_HEADER}: sha256=<hex>`,
    }, { status: 401 });
  };
  if (!secret) return refused("the pipeline takes no webhook");
  const given = request.headers.get(SIGNATURE_HEADER) ?? "";
  const expected = "sha256=" + createHmac("sha256", secret).update(bytes).digest("hex");
  const a = new TextEncoder().encode(given);
  const b = new TextEncoder().encode(expected);
  if (a.length !== b.length || !timingSafeEqual(a, b)) return refused("bad signature");
  let body: unknown = {};
  if (bytes.length > 0) {
    try {
      body = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
    } catch {
      throw new RequestBodyError("bad_request", `Expected a JSON body: ${TRIGGER_SHAPE}`);
    }
  }
  if (typeof body !== "object" || body === null || Array.isArray(body)) {
    throw new RequestBodyError("bad_request", `Expected a JSON object: ${TRIGGER_SHAPE}`);
  }
  return await startTriggered(context, name, body as Record<string, unknown>, url, audit);
}

/** Plans and starts a run of a registered pipeline: a trigger's and a webhook's work. */
async function startTriggered(
  context: ApiContext,
  name: string,
  body: Record<string, unknown>,
  url: URL,
  audit: Record<string, unknown>,
): Promise<Response> {
  if (
    body.version !== undefined &&
    !(typeof body.version === "number" && Number.isInteger(body.version) && body.version > 0)
  ) {
    throw new RequestBodyError("bad_request", 'Expected "version" to be a positive integer');
  }
  audit.pipeline = name;
  let planned;
  try {
    planned = await planRegistered(
      {
        store: context.store,
        parser: context.parser,
        secretNames: context.secretNames,
        limits: context.pipelineLimits,
        bundles: context.bundles,
      },
      name,
      { version: body.version as number | undefined, params: paramsOf(body.params) ?? {} },
    );
  } catch (error) {
    if (error instanceof PipelineError) {
      audit.problems = error.diagnostics.length;
      return json({
        error: "invalid_pipeline",
        message: error.message,
        diagnostics: error.diagnostics,
      }, { status: 400 });
    }
    throw error;
  }
  audit.version = planned.version.version;
  const record = await submitRun(context.store, planned.plan, {
    file: planned.version.file,
    // Read back from where it is kept: already stored.
    bundleDigest: planned.bundle?.digest,
    registered: { name, version: planned.version.version },
    labels: labelsOf(body.labels),
  });
  audit.runId = record.runId;
  return json({
    runId: record.runId,
    pipeline: name,
    version: planned.version.version,
    url: `${url.origin}/ui/runs/${record.runId}`,
  }, { status: 201 });
}

/** The shipped directory of a submission, checked: paths, base64, counts, sizes. */
function bundleOf(files: unknown): PipelineBundle {
  if (typeof files !== "object" || files === null || Array.isArray(files)) {
    throw new RequestBodyError(
      "bad_request",
      'Expected "files" to map relative paths to base64 contents',
    );
  }
  const entries = Object.entries(files as Record<string, unknown>);
  if (entries.length > MAX_BUNDLE_FILES) {
    throw new RequestBodyError(
      "too_large",
      `Expected at most ${MAX_BUNDLE_FILES} files in "files", got ${entries.length}`,
    );
  }
  let bytes = 0;
  for (const [path, content] of entries) {
    if (typeof content !== "string" || !isBase64(content)) {
      throw new RequestBodyError(
        "bad_request",
        `Expected the content of "files" entry ${JSON.stringify(path)} to be base64`,
      );
    }
    bytes += content.length / 4 * 3 - (content.endsWith("==") ? 2 : content.endsWith("=") ? 1 : 0);
  }
  if (bytes > MAX_BUNDLE_BYTES) {
    throw new RequestBodyError(
      "too_large",
      `Expected the files of a pipeline to hold at most ${formatBytes(MAX_BUNDLE_BYTES)}`,
    );
  }
  const checked = files as Record<string, string>;
  const bundle = { digest: bundleDigest(checked), files: checked };
  try {
    checkBundle(bundle);
  } catch (error) {
    throw new RequestBodyError("bad_request", (error as Error).message);
  }
  return bundle;
}

/**
 * The `on-failure` webhooks of a plan this server may not call, each
 * located at its `webhook` key in the source (parsed again only when one
 * is refused).
 */
function refusedWebhooks(
  plan: Plan,
  source: string,
  file: string,
  allow: WebhookAllowList,
): Diagnostic[] {
  const targets: Array<{ url: string; path: string[] }> = [];
  for (const key of ["onFailure", "onSuccess", "onExit"] as const) {
    const hook = plan[key];
    const name = { onFailure: "on-failure", onSuccess: "on-success", onExit: "on-exit" }[key];
    if (hook) targets.push({ url: hook.url, path: [name, "webhook"] });
  }
  const seen = new Set<string>();
  for (const step of Object.values(plan.steps)) {
    // Matrix legs share their step's key: one problem per step.
    if (!step.onFailure || seen.has(step.name)) continue;
    seen.add(step.name);
    targets.push({ url: step.onFailure.url, path: ["steps", step.name, "on-failure", "webhook"] });
  }
  const refused = targets.filter((target) => !allow.allows(target.url));
  if (refused.length === 0) return [];
  const lines = new LineCounter();
  const locator = new Locator(file, lines, parseDocument(source, { lineCounter: lines }));
  return refused.map((target) => ({
    code: "webhook_not_allowed",
    message: `Expected a webhook (${target.path.at(-2)}) on a host this cluster allows ` +
      `(--webhook-allow: ${allow.describe()}), got ${webhookHost(target.url)}`,
    file,
    ...locator.at(target.path, { key: true }),
    path: target.path.join("."),
    key: "webhook",
    expected: "a host in the server's --webhook-allow list",
    hint: "ask the cluster's operator to allow the host, or remove the webhook",
  }));
}

async function bootstrap({ context, audit }: Call): Promise<Response> {
  if (!context.bootstrapOpen) {
    throw new TokenRequestError(
      "bootstrap_done",
      "This server takes its admin token from --admin-token-file: the ACL bootstrap is closed",
    );
  }
  const { token, info } = await bootstrapAcl(context.store);
  audit.created = { id: info.id, name: info.name, role: info.role };
  return json({ token, ...info }, { status: 201 });
}

async function tokenCreate({ context, request, caller, audit }: Call): Promise<Response> {
  const body = await readJsonObject(
    request,
    MAX_TOKEN_REQUEST_BYTES,
    '{"name": "ci", "role": "read" | "submit" | "admin"}',
  );
  if (typeof body.name !== "string" || !isRole(body.role)) {
    throw new TokenRequestError(
      "bad_request",
      'Expected {"name": "<name>", "role": "read" | "submit" | "admin"}',
    );
  }
  const { token, info } = await createToken(context.store, {
    name: body.name,
    role: body.role,
    createdBy: caller!.tokenId,
  });
  audit.created = { id: info.id, name: info.name, role: info.role };
  return json({ token, ...info }, { status: 201 });
}

async function tokenRevoke({ context, params, audit }: Call): Promise<Response> {
  const revoked = await revokeToken(context.store, params[0]);
  audit.revoked = { id: revoked.id, name: revoked.name, role: revoked.role };
  return json({ revoked });
}

/**
 * Revokes an agent's identity: its connection is cut, its worker goes
 * offline (its steps run elsewhere), and its id is refused until forgotten.
 */
async function agentRevoke({ context, params, audit }: Call): Promise<Response> {
  const agentId = decodeSegment(params[0]);
  audit.agent = agentId;
  if (!(await revokeAgent(context.store, agentId))) {
    return json({ error: "agent_not_found", message: `No agent "${agentId}" has registered` }, {
      status: 404,
    });
  }
  return json({ revoked: agentId });
}

/** Forgets an agent's identity: the id may register again (with a new credential). */
async function agentForget({ context, params, audit }: Call): Promise<Response> {
  const agentId = decodeSegment(params[0]);
  audit.agent = agentId;
  await forgetAgent(context.store, agentId);
  return json({ forgotten: agentId });
}

function decodeSegment(segment: string): string {
  try {
    return decodeURIComponent(segment);
  } catch {
    return segment;
  }
}

function formatBytes(bytes: number): string {
  return bytes % (1024 * 1024) === 0
    ? `${bytes / 1024 / 1024} MiB`
    : bytes % 1024 === 0
    ? `${bytes / 1024} KiB`
    : `${bytes} bytes`;
}

/** SSE of a run's record and step states as they change, ending with the run. */
function streamEvents(store: Store, run: ClusterRunRecord, signal: AbortSignal): Response {
  return sse(signal, async (send, stop) => {
    const listed = await store.list(clusterKeys.stepPrefix(run.runId));
    const current = await store.get(clusterKeys.run(run.runId));
    const revision = Math.max(listed.revision, current?.modRevision ?? 0);
    let record = current ? JSON.parse(current.value) as ClusterRunRecord : run;
    send("run", record);
    for (const kv of listed.items) send("step", JSON.parse(kv.value) as StepState);
    if (isTerminalRunStatus(record.status)) return;
    const watches = [clusterKeys.run(run.runId), clusterKeys.stepPrefix(run.runId)];
    await Promise.race(watches.map(async (prefix) => {
      for await (const event of store.watch(prefix, { fromRevision: revision + 1, signal: stop })) {
        if (event.type !== "put") continue;
        if (prefix === clusterKeys.run(run.runId)) {
          if (event.key !== prefix) continue;
          record = JSON.parse(event.value!) as ClusterRunRecord;
          send("run", record);
          if (isTerminalRunStatus(record.status)) return;
        } else {
          send("step", JSON.parse(event.value!) as StepState);
        }
      }
    }));
  });
}

/** SSE of a run's log batches, in order; with `follow`, until the run ends. */
function streamLogs(
  store: Store,
  run: ClusterRunRecord,
  options: { step?: string; follow: boolean; signal: AbortSignal },
): Response {
  return sse(options.signal, async (send, stop) => {
    const prefix = clusterKeys.logsOfRun(run.runId);
    const wanted = (key: string) => {
      const [step, attempt] = key.slice(prefix.length).split("/");
      const stepId = decodeURIComponent(step);
      return options.step === undefined || stepId === options.step ||
          stepId.startsWith(`${options.step}[`)
        ? { step: stepId, attempt: Number(attempt) }
        : undefined;
    };
    const listed = await store.list(prefix);
    for (const kv of listed.items) {
      const where = wanted(kv.key);
      if (where) send("log", { ...where, text: kv.value });
    }
    if (!options.follow || isTerminalRunStatus(run.status)) return;
    const ended = (async () => {
      for await (
        const event of store.watch(clusterKeys.run(run.runId), {
          fromRevision: listed.revision + 1,
          signal: stop,
        })
      ) {
        if (event.type === "put" && event.key === clusterKeys.run(run.runId)) {
          const record = JSON.parse(event.value!) as ClusterRunRecord;
          if (isTerminalRunStatus(record.status)) return;
        }
      }
    })();
    const logs = (async () => {
      for await (
        const event of store.watch(prefix, { fromRevision: listed.revision + 1, signal: stop })
      ) {
        if (event.type !== "put") continue;
        const where = wanted(event.key);
        if (where) send("log", { ...where, text: event.value });
      }
    })();
    await ended;
    // Log batches written just before the end still arrive: drain briefly.
    await Promise.race([logs, new Promise((resolve) => setTimeout(resolve, 200))]);
  });
}

/** A server-sent-events response (`_sse.ts`). */
const sse = sseResponse;

function json(value: unknown, init: ResponseInit = {}): Response {
  return new Response(JSON.stringify(value, null, 2) + "\n", {
    ...init,
    headers: { "content-type": "application/json", ...init.headers },
  });
}
