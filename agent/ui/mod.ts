/**
 * runnel's web UI: runs, a run's live DAG, step logs and artifacts, and
 * workers, served by runnel itself with nothing loaded from another origin.
 * One set of pages over a {@link ReadModel}: every `runnel server` serves
 * them at `/ui/` over the cluster's store (behind the API's tokens), and
 * `runnel ui` serves them over a local state directory on loopback.
 *
 * @module
 */

import { createUiHandler, type UiRole } from "./routes.ts";
import { localReadModel } from "./local_model.ts";

export { capabilitiesOf, createUiHandler, download, isUiPath, UI_POLICY } from "./routes.ts";
export type { UiCall, UiRole } from "./routes.ts";
export { clusterReadModel } from "./cluster_model.ts";
export type { ClusterModelOptions } from "./cluster_model.ts";
export { localReadModel } from "./local_model.ts";
export type { LocalModel } from "./local_model.ts";
export { layoutDag } from "./layout.ts";
export type { DagLayout, LayoutEdge, LayoutNode } from "./layout.ts";
export * from "./model.ts";

/** Options of {@link serveLocalUi}. */
export interface LocalUiOptions {
  /** The state directory (default `.runnel`). */
  stateDir?: string;
  /** A loopback address (default 127.0.0.1). */
  hostname?: string;
  /** Default 0: a free port. */
  port?: number;
  /** Stops serving when aborted. */
  signal?: AbortSignal;
}

/** A running local UI. */
export interface LocalUi extends AsyncDisposable {
  /** `http://HOST:PORT`. */
  url: string;
  /** Resolves when the server has stopped. */
  finished: Promise<void>;
}

/** Names a browser may call this machine by while the UI listens on loopback. */
const LOOPBACK_NAMES = new Set(["127.0.0.1", "localhost", "[::1]", "::1"]);

/** A `runnel ui` address that is not this machine's loopback. */
export class LocalUiAddressError extends Error {
  /** Stable error code. */
  readonly code = "not_loopback";

  /** Builds the error from the refused address. */
  constructor(hostname: string) {
    super(
      `Expected a loopback address for "runnel ui" (127.0.0.1, ::1 or localhost), got ` +
        `"${hostname}": its pages show and cancel this machine's runs without a token`,
    );
    this.name = "LocalUiAddressError";
  }
}

/**
 * Serves the pages over a local state directory, on loopback only: the one
 * user of this machine has every role. Two checks stand in for a token: a
 * request must name this machine (`Host`), so a web page cannot reach the
 * server through a DNS name rebound to 127.0.0.1; and a cancel must come
 * from the UI's own origin (`Origin`), so another site's form cannot post it.
 */
export function serveLocalUi(options: LocalUiOptions = {}): LocalUi {
  const hostname = options.hostname ?? "127.0.0.1";
  if (!LOOPBACK_NAMES.has(hostname)) throw new LocalUiAddressError(hostname);
  const model = localReadModel(options.stateDir ?? ".runnel");
  const ui = createUiHandler(model);
  const role: UiRole = "admin";
  const stop = new AbortController();
  options.signal?.addEventListener("abort", () => stop.abort(), { once: true });
  const server = Deno.serve({
    hostname: hostname === "localhost" ? "127.0.0.1" : hostname.replace(/^\[(.*)\]$/, "$1"),
    port: options.port ?? 0,
    signal: stop.signal,
    onListen: () => {},
  }, async (request, info) => {
    const url = new URL(request.url);
    const host = (request.headers.get("host") ?? "").replace(/:\d+$/, "");
    if (!LOOPBACK_NAMES.has(host)) {
      return new Response("This UI answers requests for 127.0.0.1 or localhost only\n", {
        status: 421,
      });
    }
    if (request.method !== "GET" && request.method !== "HEAD") {
      const origin = request.headers.get("origin");
      if (origin !== url.origin) {
        return Response.json({
          error: "forbidden",
          message: "Expected a request from this UI's own pages (Origin)",
        }, { status: 403 });
      }
    }
    if (url.pathname === "/") return Response.redirect(new URL("/ui/", url), 302);
    const gone = new AbortController();
    info.completed.finally(() => gone.abort());
    try {
      return await ui(request, { role, signal: gone.signal });
    } catch (error) {
      console.error(`runnel ui: ${request.method} ${url.pathname}: ${(error as Error).message}`);
      return Response.json({ error: "internal", message: "The UI could not answer this call" }, {
        status: 500,
      });
    }
  });
  const address = server.addr as Deno.NetAddr;
  const shown = address.hostname.includes(":") ? `[${address.hostname}]` : address.hostname;
  const finished = server.finished.then(() => model.close());
  return {
    url: `http://${shown}:${address.port}`,
    finished,
    async [Symbol.asyncDispose]() {
      stop.abort();
      await finished;
    },
  };
}
