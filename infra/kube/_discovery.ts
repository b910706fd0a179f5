/**
 * What the stand-in says about itself: `/version`, the legacy discovery
 * documents (`/api`, `/apis`, `/api/v1`, `/apis/batch/v1`) and the
 * `/openapi/v3` documents `kubectl` reads before `create -f`/`apply -f`
 * (the group-version-kind of each schema, and whether the POST of a
 * resource takes `fieldValidation`, which turns on server-side validation).
 *
 * @module
 */

/** The Kubernetes minor version reported (kubectl's dispatcher picks its binary by it). */
export const MINOR_VERSION = "32";

const VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"];

/** `GET /version`. */
export function versionInfo(): Record<string, string> {
  return {
    major: "1",
    minor: MINOR_VERSION,
    gitVersion: `v1.${MINOR_VERSION}.0-runnel-standin`,
    gitCommit: "0000000000000000000000000000000000000000",
    gitTreeState: "clean",
    buildDate: "2026-01-01T00:00:00Z",
    goVersion: "go1.23.0",
    compiler: "gc",
    platform: "linux/amd64",
  };
}

/** `GET /api`. */
export function coreVersions(serverAddress: string): unknown {
  return {
    kind: "APIVersions",
    versions: ["v1"],
    serverAddressByClientCIDRs: [{ clientCIDR: "0.0.0.0/0", serverAddress }],
  };
}

/** `GET /apis`. */
export function groupList(): unknown {
  const version = { groupVersion: "batch/v1", version: "v1" };
  return {
    kind: "APIGroupList",
    apiVersion: "v1",
    groups: [{ name: "batch", versions: [version], preferredVersion: version }],
  };
}

/** `GET /api/v1`. */
export function coreResources(): unknown {
  return {
    kind: "APIResourceList",
    groupVersion: "v1",
    resources: [
      {
        name: "namespaces",
        singularName: "namespace",
        namespaced: false,
        kind: "Namespace",
        verbs: ["get", "list", "watch"],
        shortNames: ["ns"],
      },
      {
        name: "pods",
        singularName: "pod",
        namespaced: true,
        kind: "Pod",
        verbs: VERBS,
        shortNames: ["po"],
        categories: ["all"],
      },
      {
        name: "pods/eviction",
        singularName: "",
        namespaced: true,
        group: "policy",
        version: "v1",
        kind: "Eviction",
        verbs: ["create"],
      },
      { name: "pods/log", singularName: "", namespaced: true, kind: "Pod", verbs: ["get"] },
      {
        name: "pods/status",
        singularName: "",
        namespaced: true,
        kind: "Pod",
        verbs: ["get", "patch", "update"],
      },
      { name: "secrets", singularName: "secret", namespaced: true, kind: "Secret", verbs: VERBS },
    ],
  };
}

/** `GET /apis/batch/v1`. */
export function batchResources(): unknown {
  return {
    kind: "APIResourceList",
    apiVersion: "v1",
    groupVersion: "batch/v1",
    resources: [
      {
        name: "jobs",
        singularName: "job",
        namespaced: true,
        kind: "Job",
        verbs: VERBS,
        categories: ["all"],
      },
      {
        name: "jobs/status",
        singularName: "",
        namespaced: true,
        kind: "Job",
        verbs: ["get", "patch", "update"],
      },
    ],
  };
}

/** The group-versions with an OpenAPI v3 document. */
const OPENAPI_DOCUMENTS: Record<string, Array<{ kind: string; plural: string; group: string }>> = {
  "api/v1": [
    { kind: "Pod", plural: "pods", group: "" },
    { kind: "Secret", plural: "secrets", group: "" },
    { kind: "Namespace", plural: "namespaces", group: "" },
  ],
  "apis/batch/v1": [{ kind: "Job", plural: "jobs", group: "batch" }],
};

/** `GET /openapi/v3`: where each group-version's document is. */
export function openApiIndex(): unknown {
  const paths: Record<string, { serverRelativeURL: string }> = {};
  for (const path of Object.keys(OPENAPI_DOCUMENTS)) {
    paths[path] = { serverRelativeURL: `/openapi/v3/${path}?hash=${documentHash(path)}` };
  }
  return { paths };
}

function documentHash(path: string): string {
  let hash = 0;
  for (const char of path + MINOR_VERSION) hash = (hash * 31 + char.charCodeAt(0)) >>> 0;
  return hash.toString(16).toUpperCase().padStart(16, "0");
}

/** `GET /openapi/v3/<path>`, or undefined for an unknown path. */
export function openApiDocument(path: string): unknown {
  const kinds = OPENAPI_DOCUMENTS[path];
  if (!kinds) return undefined;
  const version = "v1";
  const schemas: Record<string, unknown> = {
    "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta": {
      type: "object",
      properties: {
        name: { type: "string" },
        generateName: { type: "string" },
        namespace: { type: "string" },
        labels: { type: "object", additionalProperties: { type: "string", default: "" } },
        annotations: { type: "object", additionalProperties: { type: "string", default: "" } },
        uid: { type: "string" },
        resourceVersion: { type: "string" },
      },
    },
  };
  const paths: Record<string, unknown> = {};
  for (const { kind, plural, group } of kinds) {
    const packageName = group === "" ? "core" : group;
    const name = `io.k8s.api.${packageName}.${version}.${kind}`;
    schemas[name] = {
      type: "object",
      description: `${kind} as the runnel stand-in serves it.`,
      properties: {
        apiVersion: { type: "string" },
        kind: { type: "string" },
        metadata: {
          default: {},
          allOf: [{ $ref: "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta" }],
        },
        spec: { type: "object", "x-kubernetes-preserve-unknown-fields": true },
        status: { type: "object", "x-kubernetes-preserve-unknown-fields": true },
        ...(kind === "Secret"
          ? {
            data: { type: "object", additionalProperties: { type: "string", format: "byte" } },
            stringData: { type: "object", additionalProperties: { type: "string" } },
            type: { type: "string" },
            immutable: { type: "boolean" },
          }
          : {}),
      },
      "x-kubernetes-group-version-kind": [{ group, kind, version }],
    };
    const base = group === "" ? `/api/${version}` : `/apis/${group}/${version}`;
    const ref = { $ref: `#/components/schemas/${name}` };
    const body = { content: { "application/json": { schema: ref } }, required: true };
    const query = (param: string) => ({ name: param, in: "query", schema: { type: "string" } });
    const gvk = { group, version, kind };
    paths[`${base}/namespaces/{namespace}/${plural}`] = {
      get: {
        operationId: `list${kind}`,
        "x-kubernetes-action": "list",
        "x-kubernetes-group-version-kind": gvk,
      },
      post: {
        operationId: `createNamespaced${kind}`,
        requestBody: body,
        parameters: [query("dryRun"), query("fieldManager"), query("fieldValidation")],
        "x-kubernetes-action": "post",
        "x-kubernetes-group-version-kind": gvk,
      },
      parameters: [{ name: "namespace", in: "path", required: true, schema: { type: "string" } }],
    };
    paths[`${base}/namespaces/{namespace}/${plural}/{name}`] = {
      get: {
        operationId: `read${kind}`,
        "x-kubernetes-action": "get",
        "x-kubernetes-group-version-kind": gvk,
      },
      put: {
        operationId: `replace${kind}`,
        requestBody: body,
        parameters: [query("dryRun"), query("fieldManager"), query("fieldValidation")],
        "x-kubernetes-action": "put",
        "x-kubernetes-group-version-kind": gvk,
      },
      patch: {
        operationId: `patch${kind}`,
        parameters: [
          query("dryRun"),
          query("fieldManager"),
          query("fieldValidation"),
          query("force"),
        ],
        "x-kubernetes-action": "patch",
        "x-kubernetes-group-version-kind": gvk,
      },
      delete: {
        operationId: `delete${kind}`,
        "x-kubernetes-action": "delete",
        "x-kubernetes-group-version-kind": gvk,
      },
    };
  }
  return {
    openapi: "3.0.0",
    info: { title: "Kubernetes", version: `v1.${MINOR_VERSION}.0` },
    paths,
    components: { schemas },
  };
}

/**
 * `GET /openapi/v2`: older kubectl (Debian's 1.20) fetches this in
 * protobuf (gnostic's `openapi.v2.Document`) before `create -f`/`apply -f`
 * to validate on the client. The stand-in serves a minimal document
 * (version and title, no definitions): kubectl then finds no schema to
 * hold an object against and leaves validation to the server, as it does
 * for a kind the server does not describe.
 */
export function openApiV2Protobuf(): Uint8Array<ArrayBuffer> {
  const info = concat(
    field(1, text("Kubernetes")),
    field(2, text(`v1.${MINOR_VERSION}.0`)),
  );
  return concat(field(1, text("2.0")), field(2, info));
}

function text(value: string): Uint8Array {
  return new TextEncoder().encode(value);
}

/** A length-delimited protobuf field (wire type 2). */
function field(number: number, bytes: Uint8Array): Uint8Array {
  return concat(varint((number << 3) | 2), varint(bytes.length), bytes);
}

function varint(value: number): Uint8Array {
  const bytes: number[] = [];
  while (value > 0x7f) {
    bytes.push((value & 0x7f) | 0x80);
    value >>>= 7;
  }
  bytes.push(value);
  return new Uint8Array(bytes);
}

function concat(...parts: Uint8Array[]): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(parts.reduce((sum, part) => sum + part.length, 0));
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}
