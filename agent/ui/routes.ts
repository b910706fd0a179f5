/**
 * The web UI's HTTP face, the same in both modes: three pages (runs, a
 * run, workers), their one script and stylesheet, and the JSON and
 * server-sent-event calls the script makes, all answered from a
 * {@link ReadModel}.
 *
 * | method and path | answer |
 * | --- | --- |
 * | `GET /ui/`, `/ui/runs/:id`, `/ui/workers` | a page (no data: the script fetches it) |
 * | `GET /ui/assets/app.js`, `/ui/assets/app.css` | the script and the stylesheet |
 * | `GET /ui/api/session` | `{mode, role, actions}`: what the caller may do from the pages |
 * | `GET /ui/api/runs?status=S&pipeline=P&after=C&limit=N` | `{runs, next?}`, newest first |
 * | `GET /ui/api/runs/:id` | `{run, plan, steps, layout}`: the DAG laid out on the server |
 * | `GET /ui/api/runs/:id/events` | SSE: `run` and `step` records, first as they are, then as they change |
 * | `GET /ui/api/runs/:id/logs?step=S&attempt=N&follow=1` | SSE: `log` batches of one attempt |
 * | `GET /ui/api/runs/:id/artifacts/:step/:name` | the artifact, as an attachment |
 * | `GET /ui/api/workers` | `{workers, controlPlane?}` |
 * | `POST /api/runs/:id/cancel` | (local mode; a cluster's own API answers it there) 202 |
 *
 * Who may call what is decided by the caller of {@link createUiHandler}:
 * the cluster's API checks tokens and roles as for its own calls; `runnel
 * ui` serves one user on loopback. Every answer forbids loading anything
 * from another origin (Content-Security-Policy), and an artifact is always
 * an attachment of type `application/octet-stream`, never a page.
 *
 * @module
 */

import { sseResponse } from "../server/_sse.ts";
import { layoutDag } from "./layout.ts";
import { type Capabilities, type ReadModel, UiNotFoundError } from "./model.ts";
import { pageHtml } from "./pages.ts";

/** A role of the API (`agent/server/auth.ts`), or the one user of local mode. */
export type UiRole = "read" | "submit" | "admin";

/** What the handler knows of a call besides its request. */
export interface UiCall {
  /** The caller's role (already checked to be at least `read`). */
  role: UiRole;
  /** Aborts when the client is gone: live streams stop. */
  signal: AbortSignal;
}

/**
 * What a page may load: its own script and style, calls to its own origin,
 * nothing else — no CDN, no inline script, no frames.
 */
export const UI_POLICY = "default-src 'none'; script-src 'self'; style-src 'self'; " +
  "connect-src 'self'; img-src 'self' data: blob:; base-uri 'none'; form-action 'self'; " +
  "frame-ancestors 'none'";

/** Headers of every UI answer. */
const SAFE_HEADERS = {
  "content-security-policy": UI_POLICY,
  "x-content-type-options": "nosniff",
  "referrer-policy": "no-referrer",
  "x-frame-options": "DENY",
};

/** Runs per page of the runs list, at most. */
const MAX_PAGE = 200;

/** Whether a path is one the UI answers (the pages, their assets, their calls). */
export function isUiPath(path: string): boolean {
  return path === "/ui" || path.startsWith("/ui/");
}

/** Builds the UI's request handler over a read model. */
export function createUiHandler(
  model: ReadModel,
): (request: Request, call: UiCall) => Promise<Response> {
  return async (request, call) => {
    const url = new URL(request.url);
    const path = url.pathname.replace(/\/+$/, "") || "/";
    try {
      return await route(model, request, url, path, call) ??
        answer({ error: "not_found", message: `No page or call ${request.method} ${path}` }, 404);
    } catch (error) {
      if (error instanceof UiNotFoundError) {
        return answer({ error: error.code, message: error.message }, 404);
      }
      if (error instanceof UiRequestError) {
        return answer({ error: "bad_request", message: error.message }, 400);
      }
      throw error;
    }
  };
}

/** A query a page should not have sent; a 400. */
class UiRequestError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UiRequestError";
  }
}

/** What the caller's role may do in this mode. */
export function capabilitiesOf(model: ReadModel, role: UiRole): Capabilities {
  const submit = role === "submit" || role === "admin";
  return {
    cancel: submit && model.actions.cancel,
    resume: submit && model.actions.resume,
    rerun: submit && model.actions.rerun,
  };
}

async function route(
  model: ReadModel,
  request: Request,
  url: URL,
  path: string,
  call: UiCall,
): Promise<Response | undefined> {
  let match: RegExpExecArray | null;
  if (request.method === "POST") {
    match = /^\/api\/runs\/([^/]+)\/cancel$/.exec(path);
    if (match && model.cancel && capabilitiesOf(model, call.role).cancel) {
      return answer({ outcome: await model.cancel(decode(match[1])) }, 202);
    }
    return undefined;
  }
  if (request.method !== "GET" && request.method !== "HEAD") return undefined;
  if (path === "/ui") return page("runs");
  if (path === "/ui/workers") return page("workers");
  if ((match = /^\/ui\/runs\/([^/]+)$/.exec(path))) return page("run", decode(match[1]));
  if (path === "/ui/assets/app.js") return await asset("app.js", "text/javascript");
  if (path === "/ui/assets/app.css") return await asset("app.css", "text/css");
  if (path === "/ui/api/session") {
    return answer({ mode: model.mode, role: call.role, actions: capabilitiesOf(model, call.role) });
  }
  if (path === "/ui/api/runs") {
    const limit = Number(url.searchParams.get("limit") ?? "50");
    if (!Number.isInteger(limit) || limit < 1 || limit > MAX_PAGE) {
      throw new UiRequestError(`Expected limit to be a number from 1 to ${MAX_PAGE}`);
    }
    const pick = (name: string) => url.searchParams.get(name) || undefined;
    return answer(
      await model.listRuns({
        status: pick("status"),
        pipeline: pick("pipeline"),
        after: pick("after"),
        limit,
      }),
    );
  }
  if (path === "/ui/api/workers") return answer(await model.workers());
  if ((match = /^\/ui\/api\/runs\/([^/]+)$/.exec(path))) {
    const detail = await model.getRun(decode(match[1]));
    return answer({ ...detail, layout: layoutDag(detail.plan) });
  }
  if ((match = /^\/ui\/api\/runs\/([^/]+)\/events$/.exec(path))) {
    const runId = decode(match[1]);
    return sse(call.signal, async (send, stop) => {
      for await (const change of model.watchRun(runId, stop)) {
        send(change.type, change.type === "run" ? change.run : change.step);
      }
    });
  }
  if ((match = /^\/ui\/api\/runs\/([^/]+)\/logs$/.exec(path))) {
    const runId = decode(match[1]);
    const step = url.searchParams.get("step");
    const attempt = Number(url.searchParams.get("attempt"));
    if (!step || !Number.isInteger(attempt) || attempt < 1) {
      throw new UiRequestError("Expected ?step=STEP&attempt=N (N from 1)");
    }
    const follow = url.searchParams.get("follow") === "1";
    return sse(call.signal, async (send, stop) => {
      for await (const chunk of model.logs(runId, { step, attempt, follow, signal: stop })) {
        send("log", chunk);
      }
    });
  }
  if ((match = /^\/ui\/api\/runs\/([^/]+)\/artifacts\/([^/]+)\/([^/]+)$/.exec(path))) {
    return await download(model, {
      runId: decode(match[1]),
      step: decode(match[2]),
      name: decode(match[3]),
    });
  }
  return undefined;
}

/**
 * An artifact as a download: always an attachment of an opaque type with
 * `nosniff` and a sandboxing policy, so step output (which may be HTML) is
 * never rendered as a page of this origin.
 */
export async function download(
  model: ReadModel,
  which: { runId: string; step: string; name: string },
): Promise<Response> {
  const artifact = await model.artifact(which.runId, which.step, which.name);
  const fallback = artifact.name.replace(/[^A-Za-z0-9._-]/g, "_") || "artifact";
  return new Response(artifact.body, {
    headers: {
      ...SAFE_HEADERS,
      "content-security-policy": "default-src 'none'; sandbox",
      "content-type": "application/octet-stream",
      "content-length": String(artifact.size),
      "content-disposition": `attachment; filename="${fallback}"; filename*=UTF-8''${
        encodeURIComponent(artifact.name)
      }`,
      "x-runnel-digest": artifact.digest,
      "cache-control": "no-store",
    },
  });
}

function page(kind: "runs" | "run" | "workers", runId?: string): Response {
  return new Response(pageHtml(kind, runId), {
    headers: { ...SAFE_HEADERS, "content-type": "text/html; charset=utf-8" },
  });
}

/** The static files, read once. */
const assets = new Map<string, string>();

async function asset(name: string, type: string): Promise<Response> {
  let text = assets.get(name);
  if (text === undefined) {
    const url = new URL(`./static/${name}`, import.meta.url);
    text = url.protocol === "file:"
      ? await Deno.readTextFile(url)
      : await (await fetch(url)).text();
    assets.set(name, text);
  }
  return new Response(text, {
    headers: {
      ...SAFE_HEADERS,
      "content-type": `${type}; charset=utf-8`,
      "cache-control": "no-cache",
    },
  });
}

function answer(value: unknown, status = 200): Response {
  return new Response(JSON.stringify(value), {
    status,
    headers: { ...SAFE_HEADERS, "content-type": "application/json", "cache-control": "no-store" },
  });
}

function decode(segment: string): string {
  try {
    return decodeURIComponent(segment);
  } catch {
    return segment;
  }
}

/** A server-sent-events answer with the UI's headers (see `../server/_sse.ts`). */
function sse(
  clientGone: AbortSignal,
  produce: (send: (event: string, data: unknown) => void, stop: AbortSignal) => Promise<void>,
): Response {
  return sseResponse(clientGone, produce, SAFE_HEADERS);
}
