/**
 * A single-node Kubernetes API stand-in that really runs pods: the shapes
 * of the real API (discovery, OpenAPI v3 and a minimal v2 for older
 * kubectl, `Status` errors, Jobs, Pods and Secrets with label and field
 * selectors, Table output, watches with resource versions, bookmarks and
 * `410 Expired`, pod logs with `follow`, `timestamps` and `sinceTime`,
 * evictions) over HTTPS, authenticating a bearer token or a client
 * certificate its CA signed; and a Job controller, a garbage collector and
 * a kubelet that runs containers on the local Docker engine (see
 * `_cluster.ts`).
 *
 * No Kubernetes API server, kubelet, kind or k3s can run here; this one is
 * checked against the real `kubectl` (`tests/kubernetes_standin_test.ts`).
 * Faults can be injected for tests: 5xx and 429 answers, connection
 * resets after the request was carried out, dropped watches and log
 * follows, compaction (410), evictions.
 *
 * `deno task kube-dev` runs it for a user to try the `kubernetes` backend.
 *
 * @module
 */

import { Buffer } from "node:buffer";
import {
  createServer as createHttpServer,
  type IncomingMessage,
  type ServerResponse,
} from "node:http";
import { createServer as createHttpsServer } from "node:https";
import type { Socket } from "node:net";
import type { TLSSocket } from "node:tls";
import { stringify as stringifyYaml } from "npm:yaml@2.9.1";
import { Cluster } from "./_cluster.ts";
import {
  batchResources,
  coreResources,
  coreVersions,
  groupList,
  openApiDocument,
  openApiIndex,
  openApiV2Protobuf,
  versionInfo,
} from "./_discovery.ts";
import { DockerEngine } from "./_docker.ts";
import {
  ExpiredError,
  type KubeObject,
  parseFieldSelector,
  parseLabelSelector,
  type WatchEvent,
} from "./_store.ts";

export { INSTANCE_LABEL } from "./_cluster.ts";
export type { KubeObject } from "./_store.ts";

/** How often a watch that asked for bookmarks gets one (the apiserver's is about a minute). */
export const BOOKMARK_INTERVAL_MS = 5_000;
/** Longest a watch stays open without `timeoutSeconds` (the apiserver picks 30–60 min). */
const MAX_WATCH_SECONDS = 1_800;
/** The error a reset fault breaks an answer with. */
const INJECTED_RESET = "connection reset by the stand-in (injected)";
/** The one node's name. */
export const NODE_NAME = "runnel-node";

/** Options of {@link startKubeStandIn}. */
export interface KubeStandInOptions {
  /** Loopback port; default 0 (a free one). */
  port?: number;
  /** Bearer token every request must carry; default a random one. */
  token?: string;
  /** Serve HTTPS with a certificate made for 127.0.0.1 (default true; needs `openssl`). */
  tls?: boolean;
  /** Extra labels of the node (a pod's `nodeSelector` must match). */
  nodeLabels?: Record<string, string>;
  /** Docker socket; default `/var/run/docker.sock`. */
  dockerSocket?: string;
  /** Docker network mode of pods (default `host`: pods reach loopback services such as s3rver). */
  networkMode?: string;
  /** How often a watch that asked for bookmarks gets one (default {@link BOOKMARK_INTERVAL_MS}). */
  bookmarkIntervalMs?: number;
}

/** An injected API error. */
export interface InjectedError {
  /** HTTP status (500, 503, 504, 429…). */
  status: number;
  /** The Status message, e.g. "etcdserver: leader changed". */
  message: string;
  /** The Status reason; default from the status code. */
  reason?: string;
  /** Sent as `Retry-After` (429). */
  retryAfterSeconds?: number;
  /** How many requests fail (default 1). */
  count?: number;
  /** Which requests: default any API request except discovery. */
  match?: (request: { method: string; path: string; watch: boolean }) => boolean;
  /**
   * Instead of an error answer: carry the request out, then break the
   * connection before the answer's body (a reset the client sees after
   * the server acted).
   */
  reset?: boolean;
}

/** One request the stand-in answered, for counting calls. */
export interface RequestRecord {
  method: string;
  path: string;
  watch: boolean;
  follow: boolean;
}

/** Test controls of a running stand-in. */
export interface KubeFaults {
  /** The next matching requests fail with a `Status` error. */
  failNext(error: InjectedError): void;
  /** Ends every open watch now (as an apiserver restart does); returns how many. */
  dropWatches(): number;
  /** Ends every open log follow now; returns how many. */
  dropLogFollows(): number;
  /** Forgets watch history: a watch resuming from an older version gets `410 Expired`. */
  compact(): void;
  /** Compacts past every version handed out: every watch resuming from one gets `410 Expired`. */
  expire(): void;
  /** Evicts a pod (a `DisruptionTarget` condition, then a graceful delete). */
  evict(namespace: string, name: string): void;
}

/** A running stand-in. */
export interface KubeStandIn extends AsyncDisposable {
  /** `https://127.0.0.1:PORT`. */
  server: string;
  port: number;
  token: string;
  /** PEM of the CA that signed the serving certificate (TLS only). */
  caPem?: string;
  /**
   * A client certificate and key the CA signed (TLS only): the stand-in
   * accepts a request that presents it instead of the token.
   */
  client?: { certPem: string; keyPem: string };
  /** Path of a kubeconfig pointing at it (written in its own temporary directory). */
  kubeconfig: string;
  faults: KubeFaults;
  /** Requests answered since start (or since {@link clearRequests}). */
  readonly requests: RequestRecord[];
  clearRequests(): void;
  /** Reads an object straight from the store (no request counted). */
  get(
    resource: "jobs" | "pods" | "secrets",
    namespace: string,
    name: string,
  ): KubeObject | undefined;
  /** Lists objects straight from the store. */
  list(resource: "jobs" | "pods" | "secrets", labelSelector?: string): KubeObject[];
  /** Ids of the Docker containers this stand-in started that still exist. */
  containers(): Promise<string[]>;
  /** Stops the server, every pod and their containers. */
  stop(): Promise<void>;
}

function statusReason(code: number): string {
  const reasons: Record<number, string> = {
    400: "BadRequest",
    401: "Unauthorized",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "AlreadyExists",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
  };
  return reasons[code] ?? "Unknown";
}

/** A `Status` object, as every error answer of the API is. */
function statusObject(code: number, message: string, reason?: string, details?: unknown) {
  return {
    kind: "Status",
    apiVersion: "v1",
    metadata: {},
    status: "Failure",
    message,
    reason: reason ?? statusReason(code),
    ...(details ? { details } : {}),
    code,
  };
}

function json(body: unknown, status = 200, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json", ...headers },
  });
}

function failure(code: number, message: string, reason?: string, details?: unknown): Response {
  return json(statusObject(code, message, reason, details), code);
}

const GROUP_OF: Record<string, string> = { pods: "", secrets: "", jobs: "batch" };
const KIND_OF: Record<string, string> = { pods: "Pod", secrets: "Secret", jobs: "Job" };
const API_VERSION_OF: Record<string, string> = { pods: "v1", secrets: "v1", jobs: "batch/v1" };

function qualified(resource: string): string {
  return GROUP_OF[resource] ? `${resource}.${GROUP_OF[resource]}` : resource;
}

/** Starts the stand-in on a loopback port. */
export async function startKubeStandIn(options: KubeStandInOptions = {}): Promise<KubeStandIn> {
  const token = options.token ?? crypto.randomUUID().replaceAll("-", "");
  const dir = await Deno.makeTempDir({ prefix: "runnel-kube-" });
  const instanceId = crypto.randomUUID().slice(0, 8);
  const docker = new DockerEngine(options.dockerSocket);
  const cluster = new Cluster({
    docker,
    instanceId,
    volumeRoot: `${dir}/volumes`,
    nodeName: NODE_NAME,
    nodeLabels: {
      "kubernetes.io/hostname": NODE_NAME,
      "kubernetes.io/os": "linux",
      "kubernetes.io/arch": "amd64",
      ...options.nodeLabels,
    },
    networkMode: options.networkMode ?? "host",
  });
  const store = cluster.store;
  const namespaces = new Set(["default", "kube-system"]);
  const injected: Array<InjectedError & { left: number }> = [];
  const openWatches = new Set<() => void>();
  const openFollows = new Set<() => void>();
  const requests: RequestRecord[] = [];
  const encoder = new TextEncoder();
  const bookmarkMs = options.bookmarkIntervalMs ?? BOOKMARK_INTERVAL_MS;
  let address = "";

  const tls = options.tls === false ? undefined : await makeCertificates(dir);

  function authorized(request: Request, clientName: string | undefined): boolean {
    return clientName !== undefined ||
      request.headers.get("authorization") === `Bearer ${token}`;
  }

  function injectedFailure(
    method: string,
    path: string,
    watch: boolean,
  ): Response | "reset" | undefined {
    const index = injected.findIndex((fault) =>
      fault.match ? fault.match({ method, path, watch }) : true
    );
    if (index < 0) return undefined;
    const fault = injected[index];
    if (--fault.left <= 0) injected.splice(index, 1);
    if (fault.reset) return "reset";
    return json(
      statusObject(fault.status, fault.message, fault.reason),
      fault.status,
      fault.retryAfterSeconds !== undefined
        ? { "retry-after": String(fault.retryAfterSeconds) }
        : {},
    );
  }

  function filterOf(namespace: string | undefined, url: URL) {
    const labels = parseLabelSelector(url.searchParams.get("labelSelector") ?? "");
    const fields = parseFieldSelector(url.searchParams.get("fieldSelector") ?? "");
    return (object: KubeObject) =>
      (namespace === undefined || object.metadata.namespace === namespace) &&
      labels(object.metadata.labels ?? {}) && fields(object);
  }

  function watchResponse(resource: string, namespace: string | undefined, url: URL): Response {
    const filter = filterOf(namespace, url);
    const rv = url.searchParams.get("resourceVersion");
    const from = rv === null || rv === "" || rv === "0" ? undefined : Number(rv);
    const seconds = Math.min(
      Number(url.searchParams.get("timeoutSeconds") ?? MAX_WATCH_SECONDS),
      MAX_WATCH_SECONDS,
    );
    const bookmarks = url.searchParams.get("allowWatchBookmarks") === "true";
    let cleanup = () => {};
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        let closed = false;
        const send = (event: WatchEvent) => {
          if (closed) return;
          try {
            controller.enqueue(encoder.encode(JSON.stringify(event) + "\n"));
          } catch {
            close();
          }
        };
        const timers: Array<ReturnType<typeof setTimeout>> = [];
        let unsubscribe = () => {};
        const close = () => {
          if (closed) return;
          closed = true;
          unsubscribe();
          for (const timer of timers) clearTimeout(timer);
          openWatches.delete(close);
          try {
            controller.close();
          } catch { /* cancelled */ }
        };
        cleanup = close;
        openWatches.add(close);
        try {
          unsubscribe = store.watch({ resource, filter, send }, from);
        } catch (error) {
          if (!(error instanceof ExpiredError)) throw error;
          send({
            type: "ERROR",
            object: statusObject(410, error.message, "Expired") as unknown as KubeObject,
          });
          close();
          return;
        }
        timers.push(setTimeout(close, seconds * 1000));
        if (bookmarks) {
          const bookmark = () => {
            send({
              type: "BOOKMARK",
              object: {
                kind: KIND_OF[resource],
                apiVersion: API_VERSION_OF[resource],
                metadata: { resourceVersion: String(store.version) },
              },
            });
            timers.push(setTimeout(bookmark, bookmarkMs));
          };
          timers.push(setTimeout(bookmark, bookmarkMs));
        }
      },
      cancel() {
        cleanup();
      },
    });
    return new Response(body, {
      headers: { "content-type": "application/json" },
    });
  }

  async function logResponse(pod: KubeObject, url: URL): Promise<Response> {
    const names = (pod.spec?.containers ?? []).map((c: { name: string }) => c.name);
    const initNames = (pod.spec?.initContainers ?? []).map((c: { name: string }) => c.name);
    let container = url.searchParams.get("container") ?? undefined;
    if (!container) {
      if (names.length !== 1) {
        return failure(
          400,
          `a container name must be specified for pod ${pod.metadata.name}, choose one of: [${
            names.join(" ")
          }]${
            initNames.length > 0 ? ` or one of the init containers: [${initNames.join(" ")}]` : ""
          }`,
          "BadRequest",
        );
      }
      container = names[0];
    }
    if (!names.includes(container) && !initNames.includes(container)) {
      return failure(400, `container ${container} is not valid for pod ${pod.metadata.name}`);
    }
    const id = cluster.containerId(pod, container!);
    if (!id) {
      const statuses = [
        ...(pod.status?.initContainerStatuses ?? []),
        ...(pod.status?.containerStatuses ?? []),
      ];
      const reason = statuses.find((s: { name: string }) =>
        s.name === container
      )?.state?.waiting?.reason ??
        "ContainerCreating";
      return failure(
        400,
        `container "${container}" in pod "${pod.metadata.name}" is waiting to start: ${reason}`,
        "BadRequest",
      );
    }
    const follow = url.searchParams.get("follow") === "true";
    const sinceTime = url.searchParams.get("sinceTime");
    const sinceSeconds = url.searchParams.get("sinceSeconds");
    const since = sinceTime
      ? Date.parse(sinceTime) / 1000
      : sinceSeconds
      ? Date.now() / 1000 - Number(sinceSeconds)
      : undefined;
    const abort = new AbortController();
    const stream = await docker.logs(id, {
      follow,
      timestamps: url.searchParams.get("timestamps") === "true",
      since,
      signal: abort.signal,
    });
    if (!follow) return new Response(stream, { headers: { "content-type": "text/plain" } });
    const reader = stream.getReader();
    let stop = () => {};
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        let done = false;
        stop = () => {
          if (done) return;
          done = true;
          openFollows.delete(stop);
          abort.abort();
          reader.cancel().catch(() => {});
          try {
            controller.close();
          } catch { /* closed */ }
        };
        openFollows.add(stop);
        (async () => {
          try {
            for (;;) {
              const { value, done: ended } = await reader.read();
              if (ended || done) break;
              controller.enqueue(value);
            }
          } catch { /* aborted */ }
          stop();
        })();
      },
      cancel() {
        stop();
      },
    });
    return new Response(body, { headers: { "content-type": "text/plain" } });
  }

  function asTable(
    resource: string,
    items: KubeObject[],
    resourceVersion: number,
    includeObject: string,
  ) {
    const age = (object: KubeObject) => {
      const seconds = Math.max(
        0,
        Math.round((Date.now() - Date.parse(object.metadata.creationTimestamp!)) / 1000),
      );
      return seconds < 120 ? `${seconds}s` : `${Math.round(seconds / 60)}m`;
    };
    const column = (name: string, type = "string") => ({
      name,
      type,
      format: name === "Name" ? "name" : "",
      description: name,
      priority: 0,
    });
    let columns;
    let cells: (object: KubeObject) => unknown[];
    if (resource === "pods") {
      columns = [
        column("Name"),
        column("Ready"),
        column("Status"),
        column("Restarts", "string"),
        column("Age"),
      ];
      cells = (pod) => {
        const statuses = pod.status?.containerStatuses ?? [];
        const ready = statuses.filter((s: { ready: boolean }) => s.ready).length;
        const reason = statuses.map((
          s: { state?: { waiting?: { reason: string }; terminated?: { reason: string } } },
        ) => s.state?.waiting?.reason ?? s.state?.terminated?.reason).find((
          r: string | undefined,
        ) => r && pod.status?.phase !== "Succeeded");
        return [
          pod.metadata.name,
          `${ready}/${pod.spec?.containers?.length ?? 0}`,
          reason ??
            (pod.status?.phase === "Succeeded" ? "Completed" : pod.status?.phase ?? "Pending"),
          "0",
          age(pod),
        ];
      };
    } else if (resource === "jobs") {
      columns = [
        column("Name"),
        column("Status"),
        column("Completions"),
        column("Duration"),
        column("Age"),
      ];
      cells = (job) => {
        const conditions: Array<{ type: string; status: string }> = job.status?.conditions ?? [];
        const state = conditions.some((c) => c.type === "Complete" && c.status === "True")
          ? "Complete"
          : conditions.some((c) => c.type === "Failed" && c.status === "True")
          ? "Failed"
          : "Running";
        const start = job.status?.startTime ? Date.parse(job.status.startTime) : Date.now();
        const end = job.status?.completionTime ? Date.parse(job.status.completionTime) : Date.now();
        return [
          job.metadata.name,
          state,
          `${job.status?.succeeded ?? 0}/${job.spec?.completions ?? 1}`,
          `${Math.round((end - start) / 1000)}s`,
          age(job),
        ];
      };
    } else {
      columns = [column("Name"), column("Type"), column("Data"), column("Age")];
      cells = (
        secret,
      ) => [
        secret.metadata.name,
        secret.type ?? "Opaque",
        Object.keys(secret.data ?? {}).length,
        age(secret),
      ];
    }
    return {
      kind: "Table",
      apiVersion: "meta.k8s.io/v1",
      metadata: { resourceVersion: String(resourceVersion) },
      columnDefinitions: columns,
      rows: items.map((item) => ({
        cells: cells(item),
        object: includeObject === "Object" ? item : {
          kind: "PartialObjectMetadata",
          apiVersion: "meta.k8s.io/v1",
          metadata: item.metadata,
        },
      })),
    };
  }

  function prepareCreate(
    resource: string,
    namespace: string,
    body: KubeObject,
  ): KubeObject | Response {
    if (typeof body !== "object" || body === null || typeof body.metadata !== "object") {
      return failure(400, "the object provided is unrecognized (expected an object with metadata)");
    }
    if (body.kind !== undefined && body.kind !== KIND_OF[resource]) {
      return failure(
        400,
        `the API version in the data (${body.apiVersion}) does not match the expected API version (${
          API_VERSION_OF[resource]
        })`,
      );
    }
    if (body.metadata.namespace !== undefined && body.metadata.namespace !== namespace) {
      return failure(
        400,
        "the namespace of the provided object does not match the namespace sent on the request",
      );
    }
    const object = structuredClone(body);
    object.apiVersion = API_VERSION_OF[resource];
    object.kind = KIND_OF[resource];
    if (!object.metadata.name && object.metadata.generateName) {
      object.metadata.name = `${object.metadata.generateName}${crypto.randomUUID().slice(0, 5)}`;
    }
    const name = object.metadata.name;
    if (!name || !/^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$/.test(name) || name.length > 253) {
      return failure(
        422,
        `${KIND_OF[resource]} "${name ?? ""}" is invalid: metadata.name: Invalid value: "${
          name ?? ""
        }": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'`,
        "Invalid",
      );
    }
    object.metadata.namespace = namespace;
    object.metadata.uid = crypto.randomUUID();
    object.metadata.creationTimestamp = new Date().toISOString().replace(/\.\d+Z$/, "Z");
    delete object.metadata.resourceVersion;
    if (resource === "secrets") {
      const data: Record<string, string> = { ...(object.data as Record<string, string> ?? {}) };
      for (
        const [key, value] of Object.entries(object.stringData as Record<string, string> ?? {})
      ) {
        data[key] = btoa(String.fromCharCode(...new TextEncoder().encode(value)));
      }
      object.data = data;
      delete object.stringData;
      object.type ??= "Opaque";
    }
    if (resource === "jobs") {
      cluster.defaultJob(object);
      const problems = cluster.validateJob(object);
      if (problems.length > 0) {
        return failure(422, `Job.batch "${name}" is invalid: ${problems.join(", ")}`, "Invalid", {
          name,
          group: "batch",
          kind: "Job",
        });
      }
    }
    if (resource === "pods") object.status = { phase: "Pending", qosClass: "BestEffort" };
    return object;
  }

  async function handleResource(
    request: Request,
    url: URL,
    resource: string,
    namespace: string | undefined,
    name: string | undefined,
    subresource: string | undefined,
  ): Promise<Response> {
    const method = request.method;
    if (namespace) namespaces.add(namespace);
    const notFound = () =>
      failure(404, `${qualified(resource)} "${name}" not found`, "NotFound", {
        name,
        group: GROUP_OF[resource],
        kind: resource,
      });
    if (!name) {
      if (method === "GET") {
        if (url.searchParams.get("watch") === "true" || url.searchParams.get("watch") === "1") {
          return watchResponse(resource, namespace, url);
        }
        const { items, resourceVersion } = store.list(resource, filterOf(namespace, url));
        const accept = request.headers.get("accept") ?? "";
        if (accept.includes("as=Table")) {
          return json(
            asTable(
              resource,
              items,
              resourceVersion,
              url.searchParams.get("includeObject") ?? "Metadata",
            ),
          );
        }
        return json({
          kind: `${KIND_OF[resource]}List`,
          apiVersion: API_VERSION_OF[resource],
          metadata: { resourceVersion: String(resourceVersion) },
          items,
        });
      }
      if (method === "POST" && namespace) {
        const prepared = prepareCreate(resource, namespace, await request.json());
        if (prepared instanceof Response) return prepared;
        if (url.searchParams.get("dryRun") === "All") return json(prepared, 201);
        if (store.get(resource, namespace, prepared.metadata.name!)) {
          return failure(
            409,
            `${qualified(resource)} "${prepared.metadata.name}" already exists`,
            "AlreadyExists",
            {
              name: prepared.metadata.name,
              group: GROUP_OF[resource],
              kind: resource,
            },
          );
        }
        const created = store.create(resource, prepared);
        cluster.created(created);
        return json(created, 201);
      }
      return failure(405, `the server does not allow this method on the requested resource`);
    }
    const object = store.get(resource, namespace, name);
    if (subresource === "log" && resource === "pods" && method === "GET") {
      if (!object) return notFound();
      return await logResponse(object, url);
    }
    if (subresource === "eviction" && resource === "pods" && method === "POST") {
      if (!object) return notFound();
      cluster.evictPod(object);
      return json(
        { kind: "Status", apiVersion: "v1", metadata: {}, status: "Success", code: 201 },
        201,
      );
    }
    if (subresource !== undefined && subresource !== "status") {
      return failure(404, "the server could not find the requested resource");
    }
    if (!object) return notFound();
    if (method === "GET") {
      const accept = request.headers.get("accept") ?? "";
      if (accept.includes("as=Table")) {
        return json(
          asTable(
            resource,
            [object],
            store.version,
            url.searchParams.get("includeObject") ?? "Metadata",
          ),
        );
      }
      return json(object);
    }
    if (method === "DELETE") {
      let options: Record<string, unknown> = {};
      const text = await request.text();
      if (text) {
        try {
          options = JSON.parse(text);
        } catch {
          return failure(400, "the body of the request was in an unknown format");
        }
      }
      const preconditions = options.preconditions as { uid?: string } | undefined;
      if (preconditions?.uid && preconditions.uid !== object.metadata.uid) {
        return failure(
          409,
          `Precondition failed: UID in precondition: ${preconditions.uid}, UID in object meta: ${object.metadata.uid}`,
          "Conflict",
        );
      }
      const policy = String(
        url.searchParams.get("propagationPolicy") ?? options.propagationPolicy ??
          (options.orphanDependents === true
            ? "Orphan"
            : resource === "jobs"
            ? "Orphan"
            : "Background"),
      ) as "Background" | "Foreground" | "Orphan";
      const grace = url.searchParams.get("gracePeriodSeconds") ?? options.gracePeriodSeconds;
      if (resource === "pods") {
        const pending = cluster.deletePod(
          object,
          grace === undefined || grace === null ? undefined : Number(grace),
        );
        return json(pending ?? object);
      }
      const result = cluster.deleteObject(object, policy);
      return json(result ?? object);
    }
    if (method === "PATCH" || method === "PUT") {
      let body: KubeObject;
      try {
        body = await request.json();
      } catch {
        return failure(400, "the body of the request was in an unknown format");
      }
      const updated = method === "PUT"
        ? {
          ...body,
          metadata: {
            ...body.metadata,
            uid: object.metadata.uid,
            creationTimestamp: object.metadata.creationTimestamp,
          },
        }
        : mergePatch(object, body) as KubeObject;
      updated.apiVersion = object.apiVersion;
      updated.kind = object.kind;
      updated.metadata.name = object.metadata.name;
      updated.metadata.namespace = object.metadata.namespace;
      updated.metadata.uid = object.metadata.uid;
      if (subresource !== "status") updated.status = object.status;
      const stored = store.update(resource, updated);
      if (resource === "jobs") cluster.syncJob(namespace!, name);
      return json(stored);
    }
    return failure(405, "the server does not allow this method on the requested resource");
  }

  async function handle(request: Request, clientName: string | undefined): Promise<Response> {
    const url = new URL(request.url);
    const path = url.pathname.replace(/\/+$/, "") || "/";
    const watch = url.searchParams.get("watch") === "true" || url.searchParams.get("watch") === "1";
    requests.push({
      method: request.method,
      path,
      watch,
      follow: url.searchParams.get("follow") === "true",
    });
    if (!authorized(request, clientName)) return failure(401, "Unauthorized", "Unauthorized");
    if (path === "/version") return json(versionInfo());
    if (path === "/api") return json(coreVersions(address));
    if (path === "/apis") return json(groupList());
    if (path === "/api/v1") return json(coreResources());
    if (path === "/apis/batch/v1") return json(batchResources());
    if (path === "/openapi/v3") return json(openApiIndex());
    if (path === "/openapi/v2") {
      return new Response(openApiV2Protobuf(), {
        headers: { "content-type": "application/octet-stream" },
      });
    }
    if (path.startsWith("/openapi/v3/")) {
      const document = openApiDocument(path.slice("/openapi/v3/".length));
      return document
        ? json(document)
        : failure(404, "the server could not find the requested resource");
    }
    if (path === "/healthz" || path === "/readyz" || path === "/livez") return new Response("ok");
    const fault = injectedFailure(request.method, path, watch);
    if (fault === "reset") {
      const answer = await route(request, url, path);
      await answer.body?.cancel();
      return new Response(
        new ReadableStream({
          start(controller) {
            controller.error(new Error(INJECTED_RESET));
          },
        }),
        { headers: { "content-type": "application/json" } },
      );
    }
    if (fault) return fault;
    return await route(request, url, path);
  }

  async function route(request: Request, url: URL, path: string): Promise<Response> {
    let match: RegExpExecArray | null;
    if ((match = /^\/api\/v1\/namespaces(?:\/([^/]+))?$/.exec(path))) {
      const namespaceObject = (name: string) => ({
        kind: "Namespace",
        apiVersion: "v1",
        metadata: {
          name,
          uid: name,
          creationTimestamp: "2026-01-01T00:00:00Z",
          labels: { "kubernetes.io/metadata.name": name },
        },
        spec: { finalizers: ["kubernetes"] },
        status: { phase: "Active" },
      });
      if (request.method !== "GET") {
        return failure(405, "the server does not allow this method on the requested resource");
      }
      if (match[1]) return json(namespaceObject(match[1]));
      return json({
        kind: "NamespaceList",
        apiVersion: "v1",
        metadata: { resourceVersion: String(store.version) },
        items: [...namespaces].map(namespaceObject),
      });
    }
    match =
      /^\/(?:api\/v1|apis\/batch\/v1)(?:\/namespaces\/([^/]+))?\/([a-z]+)(?:\/([^/]+))?(?:\/([a-z]+))?$/
        .exec(path);
    if (match) {
      const [, namespace, resource, name, subresource] = match;
      const expectedPrefix = resource === "jobs" ? "/apis/batch/v1" : "/api/v1";
      if (!KIND_OF[resource] || !path.startsWith(expectedPrefix)) {
        return failure(404, "the server could not find the requested resource", "NotFound");
      }
      try {
        return await handleResource(request, url, resource, namespace, name, subresource);
      } catch (error) {
        if (error instanceof SyntaxError) return failure(400, error.message, "BadRequest");
        throw error;
      }
    }
    return failure(404, "the server could not find the requested resource", "NotFound");
  }

  // node:https rather than Deno.serve: it can ask for and verify client
  // certificates (kubeconfig users with client-certificate-data).
  const sockets = new Set<Socket>();
  const serve = (incoming: IncomingMessage, outgoing: ServerResponse) => {
    const socket = incoming.socket as TLSSocket;
    const peer = tls ? socket.getPeerCertificate?.() : undefined;
    const subject = peer?.subject?.CN;
    const clientName = tls && socket.authorized && subject
      ? (Array.isArray(subject) ? subject[0] : subject)
      : undefined;
    answer(incoming, outgoing, (request) => handle(request, clientName), tls !== undefined)
      .catch((error) => {
        console.error(`kube stand-in: ${(error as Error)?.stack ?? error}`);
        outgoing.destroy();
      });
  };
  const server = tls
    ? createHttpsServer({
      key: tls.key,
      cert: tls.cert,
      ca: tls.ca,
      requestCert: true,
      // A request without a certificate may still carry a bearer token.
      rejectUnauthorized: false,
    }, serve)
    : createHttpServer(serve);
  server.on("connection", (socket: Socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
  });
  server.on("secureConnection", (socket: Socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(options.port ?? 0, "127.0.0.1", () => resolve());
  });
  const port = (server.address() as { port: number }).port;
  address = `127.0.0.1:${port}`;
  const endpoint = `${tls ? "https" : "http"}://127.0.0.1:${port}`;
  const kubeconfig = `${dir}/kubeconfig`;
  await Deno.writeTextFile(
    kubeconfig,
    kubeconfigText({ server: endpoint, token, caPem: tls?.ca }),
    { mode: 0o600 },
  );

  let stopped: Promise<void> | undefined;
  const stop = () =>
    stopped ??= (async () => {
      for (const close of [...openWatches, ...openFollows]) close();
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const socket of sockets) socket.destroy();
      });
      await cluster.close();
      docker.close();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    })();
  return {
    server: endpoint,
    port,
    token,
    caPem: tls?.ca,
    client: tls?.client,
    kubeconfig,
    requests,
    clearRequests: () => void requests.splice(0),
    faults: {
      failNext: (error) => void injected.push({ ...error, left: error.count ?? 1 }),
      dropWatches() {
        const closes = [...openWatches];
        for (const close of closes) close();
        return closes.length;
      },
      dropLogFollows() {
        const closes = [...openFollows];
        for (const close of closes) close();
        return closes.length;
      },
      compact: () => store.compact(),
      expire: () => store.expire(),
      evict(namespace, name) {
        const pod = store.get("pods", namespace, name);
        if (pod) cluster.evictPod(pod);
      },
    },
    get: (resource, namespace, name) => store.get(resource, namespace, name),
    list: (resource, labelSelector) =>
      store.list(
        resource,
        (object) => parseLabelSelector(labelSelector ?? "")(object.metadata.labels ?? {}),
      ).items,
    containers: () => docker.containersLabelled(`io.runnel.kube.instance=${instanceId}`),
    stop,
    [Symbol.asyncDispose]: stop,
  };
}

/**
 * Answers a node request with a fetch-style handler: the request body read
 * whole, the answer's headers sent at once (watches and log follows are
 * streams), its body streamed until the client goes. An answer whose body
 * errors breaks the connection (a reset, for the reset fault).
 */
async function answer(
  incoming: IncomingMessage,
  outgoing: ServerResponse,
  handler: (request: Request) => Promise<Response>,
  secure: boolean,
): Promise<void> {
  const chunks: Buffer[] = [];
  for await (const chunk of incoming) chunks.push(chunk as Buffer);
  const headers = new Headers();
  for (const [name, value] of Object.entries(incoming.headers)) {
    if (typeof value === "string") headers.set(name, value);
    else if (Array.isArray(value)) headers.set(name, value.join(", "));
  }
  const method = incoming.method ?? "GET";
  const body = chunks.length > 0 && method !== "GET" && method !== "HEAD"
    ? new Uint8Array(Buffer.concat(chunks))
    : undefined;
  const url = `${secure ? "https" : "http"}://${incoming.headers.host ?? "127.0.0.1"}${
    incoming.url ?? "/"
  }`;
  const response = await handler(new Request(url, { method, headers, body }));
  outgoing.writeHead(response.status, Object.fromEntries(response.headers));
  outgoing.flushHeaders();
  if (!response.body) {
    outgoing.end();
    return;
  }
  const reader = response.body.getReader();
  outgoing.on("close", () => reader.cancel().catch(() => {}));
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      outgoing.write(value);
    }
    outgoing.end();
  } catch {
    outgoing.destroy();
  }
}

/** RFC 7386 JSON merge patch (what `application/merge-patch+json` means; used for strategic too). */
function mergePatch(target: unknown, patch: unknown): unknown {
  if (typeof patch !== "object" || patch === null || Array.isArray(patch)) return patch;
  const result: Record<string, unknown> =
    typeof target === "object" && target !== null && !Array.isArray(target)
      ? { ...(target as Record<string, unknown>) }
      : {};
  for (const [key, value] of Object.entries(patch)) {
    if (value === null) delete result[key];
    else result[key] = mergePatch(result[key], value);
  }
  return result;
}

/** Options of {@link kubeconfigText}: the server, its CA, and a token or a client certificate. */
export interface KubeconfigOptions {
  server: string;
  token?: string;
  caPem?: string;
  client?: { certPem: string; keyPem: string };
  namespace?: string;
}

/** A kubeconfig (YAML) with one cluster, one user and one current context. */
export function kubeconfigText(options: KubeconfigOptions): string {
  const user: Record<string, string> = {};
  if (options.token) user.token = options.token;
  if (options.client) {
    user["client-certificate-data"] = btoa(options.client.certPem);
    user["client-key-data"] = btoa(options.client.keyPem);
  }
  return stringifyYaml({
    apiVersion: "v1",
    kind: "Config",
    clusters: [{
      name: "runnel-standin",
      cluster: {
        server: options.server,
        ...(options.caPem ? { "certificate-authority-data": btoa(options.caPem) } : {}),
      },
    }],
    users: [{ name: "runnel-standin", user }],
    contexts: [{
      name: "runnel-standin",
      context: {
        cluster: "runnel-standin",
        user: "runnel-standin",
        namespace: options.namespace ?? "default",
      },
    }],
    "current-context": "runnel-standin",
  });
}

/**
 * A CA, a serving certificate for 127.0.0.1 and a client certificate
 * (`CN=runnel-client, O=system:masters`), both signed by it, made with
 * `openssl`.
 */
async function makeCertificates(
  dir: string,
): Promise<{ ca: string; cert: string; key: string; client: { certPem: string; keyPem: string } }> {
  const run = async (args: string[]) => {
    const output = await new Deno.Command("openssl", {
      args,
      cwd: dir,
      stdout: "null",
      stderr: "piped",
    }).output();
    if (!output.success) {
      throw new Error(
        `Expected openssl ${args[0]} to succeed: ${new TextDecoder().decode(output.stderr).trim()}`,
      );
    }
  };
  await run([
    "req",
    "-x509",
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
    "-keyout",
    "ca.key",
    "-out",
    "ca.crt",
    "-days",
    "2",
    "-subj",
    "/CN=runnel-standin-ca",
    "-addext",
    "basicConstraints=critical,CA:TRUE",
    "-addext",
    "keyUsage=critical,keyCertSign,cRLSign",
  ]);
  await run([
    "req",
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
    "-keyout",
    "server.key",
    "-out",
    "server.csr",
    "-subj",
    "/CN=127.0.0.1",
  ]);
  await Deno.writeTextFile(
    `${dir}/server.ext`,
    "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
  );
  await run([
    "x509",
    "-req",
    "-in",
    "server.csr",
    "-CA",
    "ca.crt",
    "-CAkey",
    "ca.key",
    "-CAcreateserial",
    "-out",
    "server.crt",
    "-days",
    "2",
    "-extfile",
    "server.ext",
  ]);
  await run([
    "req",
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
    "-keyout",
    "client.key",
    "-out",
    "client.csr",
    "-subj",
    "/O=system:masters/CN=runnel-client",
  ]);
  await Deno.writeTextFile(
    `${dir}/client.ext`,
    "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
  );
  await run([
    "x509",
    "-req",
    "-in",
    "client.csr",
    "-CA",
    "ca.crt",
    "-CAkey",
    "ca.key",
    "-CAcreateserial",
    "-out",
    "client.crt",
    "-days",
    "2",
    "-extfile",
    "client.ext",
  ]);
  const [ca, cert, key, clientCert, clientKey] = await Promise.all(
    ["ca.crt", "server.crt", "server.key", "client.crt", "client.key"].map((name) =>
      Deno.readTextFile(`${dir}/${name}`)
    ),
  );
  for (
    const name of [
      "ca.key",
      "server.csr",
      "server.ext",
      "client.csr",
      "client.ext",
      "client.key",
      "ca.srl",
    ]
  ) {
    await Deno.remove(`${dir}/${name}`).catch(() => {});
  }
  return { ca, cert, key, client: { certPem: clientCert, keyPem: clientKey } };
}
