/**
 * The HTTP face of every server: health, readiness, `/raft-state`,
 * `/cluster-state`, `/metrics`, and the run API (submit, list, get, cancel,
 * resume, live logs and step events as server-sent events). Any server
 * answers any call: everything is read from, or written to, the store.
 *
 * | method and path | answer |
 * | --- | --- |
 * | `GET /health` | 200 while the process serves |
 * | `GET /ready` | 200 once the store answers, else 503 |
 * | `GET /raft-state` | `{node_id, state, leader, term, commit_index}` |
 * | `GET /cluster-state` | workers with labels, capabilities, status, last heartbeat |
 * | `GET /metrics` | Prometheus text |
 * | `POST /api/runs` | `{source, file?, baseDir?, files?}` → 201 `{runId}`, or 400 with located diagnostics; `files` ships the pipeline directory (path → base64) |
 * | `GET /api/runs` | every run, newest first |
 * | `GET /api/runs/:id` | `{run, steps}` |
 * | `POST /api/runs/:id/cancel`, `/resume` | 202 |
 * | `GET /api/runs/:id/events` | SSE: `run` and `step` records as they change, until the run ends |
 * | `GET /api/runs/:id/logs?step=S&follow=1` | SSE: `log` batches (`{step, attempt, text}`) |
 * | `GET /api/runs/:id/mermaid` | the DAG as Mermaid, nodes coloured by status |
 * | `GET /runs/:id` | a page drawing the DAG live (Mermaid from a CDN, SSE) |
 *
 * @module
 */

import { PipelineError } from "../../core/errors.ts";
import { parsePipeline, type PipelineLimits } from "../../core/load.ts";
import { isTerminalRunStatus } from "../../core/model.ts";
import type { Plan, StepState } from "../../core/model.ts";
import { renderMermaid } from "../../core/mermaid.ts";
import type { Store } from "../../consensus/store.ts";
import { clusterKeys, type ClusterRunRecord } from "./keys.ts";
import {
  clusterStepStates,
  getClusterRun,
  listClusterRuns,
  listWorkers,
  requestCancel,
  requestResume,
  RunRequestError,
  submitRun,
} from "./runs.ts";
import type { RaftState, ServerMetrics } from "./metrics.ts";
import { bundleDigest, bundleFile, checkBundle, type PipelineBundle } from "../bundle.ts";

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
  /** Limits on what a submitted pipeline may expand to (default: the defaults). */
  pipelineLimits?: Partial<PipelineLimits>;
}

/** Largest submission: a pipeline and its packed directory (base64 grows 8 MiB to ~11). */
const MAX_REQUEST_BYTES = 16 * 1024 * 1024;

/** Builds the request handler of a server. */
export function createApiHandler(
  context: ApiContext,
): (request: Request, info?: Deno.ServeHandlerInfo) => Promise<Response> {
  return async (request, info) => {
    const url = new URL(request.url);
    // Streams stop when the client is gone: when the response is over.
    const gone = new AbortController();
    info?.completed?.finally(() => gone.abort());
    try {
      return await route(context, request, url, gone.signal);
    } catch (error) {
      if (error instanceof RunRequestError) {
        return json({ error: error.code, message: error.message }, {
          status: error.code === "run_not_found" ? 404 : 409,
        });
      }
      return json({
        error: "internal",
        message: error instanceof Error ? error.message : String(error),
      }, { status: 500 });
    }
  };
}

async function route(
  context: ApiContext,
  request: Request,
  url: URL,
  clientGone: AbortSignal,
): Promise<Response> {
  const { store } = context;
  const path = url.pathname.replace(/\/+$/, "") || "/";
  const method = request.method;
  if (method === "GET" && path === "/health") {
    return json({ status: "ok", server: context.serverId });
  }
  if (method === "GET" && path === "/ready") {
    try {
      await store.revision();
      return json({ status: "ready", server: context.serverId });
    } catch (error) {
      return json({ status: "unavailable", message: String(error) }, { status: 503 });
    }
  }
  if (method === "GET" && path === "/raft-state") {
    const state = await context.raftState();
    context.metrics.observeRaft(state);
    return json(state);
  }
  if (method === "GET" && path === "/cluster-state") {
    const workers = await listWorkers(store);
    context.metrics.setWorkers(workers.length);
    const now = Date.now();
    return json({
      server: context.serverId,
      scheduler: (await context.schedulerLeader()) ?? null,
      workers: workers.map((worker) => ({
        ...worker,
        // A worker's key outlives its last heartbeat by at most 3 intervals.
        status: now - worker.lastHeartbeat > context.heartbeatMs * 1.5 ? "late" : "online",
      })),
    });
  }
  if (method === "GET" && path === "/metrics") {
    try {
      context.metrics.observeRaft(await context.raftState());
      context.metrics.setWorkers((await listWorkers(store)).length);
    } catch {
      // The store is unreachable: serve what was measured last.
    }
    return new Response(await context.metrics.render(), {
      headers: { "content-type": context.metrics.contentType },
    });
  }
  const page = /^\/runs\/([^/]+)$/.exec(path);
  if (page && method === "GET") {
    const run = await getClusterRun(store, page[1]);
    return new Response(runPage(run), {
      headers: { "content-type": "text/html; charset=utf-8" },
    });
  }
  if (path === "/api/runs" && method === "POST") return await submit(context, request);
  if (path === "/api/runs" && method === "GET") return json(await listClusterRuns(store));
  const match = /^\/api\/runs\/([^/]+)(?:\/(cancel|resume|events|logs|mermaid))?$/.exec(path);
  if (match) {
    const [, id, action] = match;
    if (!action && method === "GET") {
      const run = await getClusterRun(store, id);
      return json({ run, steps: await clusterStepStates(store, run.runId) });
    }
    if (action === "cancel" && method === "POST") {
      return json({ outcome: await requestCancel(store, id) }, { status: 202 });
    }
    if (action === "resume" && method === "POST") {
      await requestResume(store, id);
      return json({ outcome: "requested" }, { status: 202 });
    }
    if (action === "mermaid" && method === "GET") {
      const run = await getClusterRun(store, id);
      const plan = await store.get(clusterKeys.plan(run.runId));
      if (!plan) return json({ error: "not_found", message: "No plan" }, { status: 404 });
      const steps = await clusterStepStates(store, run.runId);
      const statuses = Object.fromEntries(
        Object.values(steps).map((step) => [step.id, step.status]),
      );
      return new Response(renderMermaid(JSON.parse(plan.value) as Plan, statuses), {
        headers: { "content-type": "text/plain; charset=utf-8" },
      });
    }
    if (action === "events" && method === "GET") {
      return streamEvents(store, await getClusterRun(store, id), clientGone);
    }
    if (action === "logs" && method === "GET") {
      const run = await getClusterRun(store, id);
      return streamLogs(store, run, {
        step: url.searchParams.get("step") ?? undefined,
        follow: url.searchParams.get("follow") === "1",
        signal: clientGone,
      });
    }
  }
  return json({ error: "not_found", message: `No route for ${method} ${path}` }, { status: 404 });
}

async function submit(context: ApiContext, request: Request): Promise<Response> {
  let body: { source?: unknown; file?: unknown; baseDir?: unknown; files?: unknown };
  try {
    const text = await request.text();
    if (text.length > MAX_REQUEST_BYTES) {
      return json({
        error: "too_large",
        message: "Expected a pipeline and its directory of at most 16 MiB",
      }, { status: 413 });
    }
    body = JSON.parse(text);
  } catch {
    return json({ error: "bad_request", message: 'Expected JSON: {"source": "<pipeline yaml>"}' }, {
      status: 400,
    });
  }
  if (typeof body.source !== "string") {
    return json({ error: "bad_request", message: 'Expected "source" to hold the pipeline text' }, {
      status: 400,
    });
  }
  const file = typeof body.file === "string" ? body.file : "pipeline.yaml";
  const baseDir = typeof body.baseDir === "string" ? body.baseDir : "/";
  let bundle: PipelineBundle | undefined;
  if (body.files !== undefined) {
    const files = body.files as Record<string, unknown>;
    if (
      typeof files !== "object" || files === null ||
      Object.values(files).some((content) => typeof content !== "string")
    ) {
      return json({
        error: "bad_request",
        message: 'Expected "files" to map relative paths to base64 contents',
      }, { status: 400 });
    }
    bundle = {
      digest: bundleDigest(files as Record<string, string>),
      files: files as Record<string, string>,
    };
    try {
      checkBundle(bundle);
    } catch (error) {
      return json({ error: "bad_request", message: (error as Error).message }, { status: 400 });
    }
  }
  try {
    // With a shipped directory, modules are checked (and digested) in it.
    const shipped = bundle;
    const plan = parsePipeline(body.source, {
      file,
      baseDir,
      readFile: shipped ? (path) => bundleFile(shipped, baseDir, path) : undefined,
      limits: context.pipelineLimits,
    });
    const record = await submitRun(context.store, plan, { file, bundle });
    return json({ runId: record.runId, pipeline: record.pipeline }, { status: 201 });
  } catch (error) {
    if (error instanceof PipelineError) {
      return json({
        error: "invalid_pipeline",
        message: error.message,
        diagnostics: error.diagnostics,
      }, { status: 400 });
    }
    throw error;
  }
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

/**
 * A server-sent-events response: `produce` sends events until it returns
 * (the stream then ends) or the client goes away (`stop` aborts).
 */
function sse(
  clientGone: AbortSignal,
  produce: (
    send: (event: string, data: unknown) => void,
    stop: AbortSignal,
  ) => Promise<void>,
): Response {
  const encoder = new TextEncoder();
  const stop = new AbortController();
  clientGone.addEventListener("abort", () => stop.abort(), { once: true });
  const body = new ReadableStream<Uint8Array>({
    async start(controller) {
      const send = (event: string, data: unknown) => {
        if (stop.signal.aborted) return;
        controller.enqueue(encoder.encode(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`));
      };
      try {
        await produce(send, stop.signal);
        send("end", {});
      } catch (error) {
        send("error", { message: error instanceof Error ? error.message : String(error) });
      } finally {
        stop.abort();
        try {
          controller.close();
        } catch {
          // The client went away first.
        }
      }
    },
    cancel() {
      stop.abort();
    },
  });
  return new Response(body, {
    headers: {
      "content-type": "text/event-stream",
      "cache-control": "no-cache",
      "x-accel-buffering": "no",
    },
  });
}

/**
 * A page that draws a run's DAG (Mermaid, loaded by the browser) and
 * redraws it as step events arrive: SPEC §7's live view.
 */
function runPage(run: ClusterRunRecord): string {
  const id = JSON.stringify(run.runId);
  const title = `${run.pipeline} · ${run.runId}`.replace(/[<>&"]/g, "");
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>${title}</title>
<style>body{font:14px system-ui,sans-serif;margin:2rem}#status{color:#555}</style></head>
<body><h1>${title}</h1><p id="status">${run.status}</p><div id="dag"></div>
<script type="module">
import mermaid from "https://cdn.jsdelivr.net/npm/mermaid@11/dist/mermaid.esm.min.mjs";
mermaid.initialize({ startOnLoad: false, securityLevel: "strict" });
const run = ${id};
let pending;
async function draw() {
  const text = await (await fetch(\`/api/runs/\${encodeURIComponent(run)}/mermaid\`)).text();
  const { svg } = await mermaid.render("dag-svg", text);
  document.getElementById("dag").innerHTML = svg;
}
function later() { clearTimeout(pending); pending = setTimeout(draw, 200); }
const events = new EventSource(\`/api/runs/\${encodeURIComponent(run)}/events\`);
events.addEventListener("step", later);
events.addEventListener("run", (e) => {
  document.getElementById("status").textContent = JSON.parse(e.data).status;
  later();
});
events.addEventListener("end", () => events.close());
draw();
</script></body></html>
`;
}

function json(value: unknown, init: ResponseInit = {}): Response {
  return new Response(JSON.stringify(value, null, 2) + "\n", {
    ...init,
    headers: { "content-type": "application/json", ...init.headers },
  });
}
