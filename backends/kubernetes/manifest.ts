/**
 * Manifest of the `kubernetes` backend: each attempt a `batch/v1` Job on
 * the cluster of the runner's kubeconfig (`KUBECONFIG`, `~/.kube/config`
 * or the in-cluster service account), its artifacts through the object
 * store named by `RUNNEL_KUBE_S3_*` (see `_artifacts.ts`).
 *
 * The backend host is granted the API server's `host:port` only, read of
 * the kubeconfig and the files it references, the env variables that
 * located it, and, for a step with inputs or outputs, the object store's
 * `host:port`, its env variables and the scratch root (inputs read,
 * outputs written). Which cluster and credentials are used is the
 * operator's choice, never the pipeline's: no step key names a kubeconfig.
 *
 * @module
 */

import { z } from "npm:zod@4.6.7";
import type { AttemptSpec, BackendManifest, DenoPermissions, HostContext } from "../backend.ts";
import { isDuration } from "../../core/duration.ts";
import { KUBECONFIG_ENV, type KubeTarget, loadKubeTarget } from "./_kubeconfig.ts";
import { netAddress, S3_ENV, s3Settings } from "./_artifacts.ts";

/** A DNS-1123 label (namespaces, service accounts). */
const DNS_LABEL = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;
/** A label key (optional DNS prefix and `/`) as node selectors use them. */
const LABEL_KEY =
  /^([a-z0-9]([-a-z0-9.]*[a-z0-9])?\/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$/;
/** A label value. */
const LABEL_VALUE = /^(|[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$/;

/** How long a pod may stay unschedulable before the step fails, when the step does not say. */
export const DEFAULT_UNSCHEDULABLE_TIMEOUT = "60s";

/** Config of a `kubernetes` step. */
export const kubernetesConfigSchema = z.strictObject({
  /** Image of the step's container, as the cluster pulls it. */
  image: z.string().regex(/^\S+$/, { message: 'Expected an image reference for "image"' }),
  /** Script run with `/bin/sh -c` (the image's entrypoint is replaced). */
  run: z.string().min(1, { message: 'Expected a non-empty command for "run"' }).optional(),
  /** The command, exec form (replaces the image's entrypoint). */
  command: z.array(z.string()).min(1).optional(),
  /** Arguments of `command` (or of the image's entrypoint). */
  args: z.array(z.string()).optional(),
  /** Namespace of the Job; default the kubeconfig context's. */
  namespace: z.string().regex(DNS_LABEL, {
    message: 'Expected a namespace name (lower-case letters, digits, "-") for "namespace"',
  }).max(63).optional(),
  /** Service account of the pod; without it no API token is mounted into the pod. */
  "service-account": z.string().regex(DNS_LABEL, {
    message: 'Expected a service account name for "service-account"',
  }).max(253).optional(),
  /** Node labels the pod must be scheduled on. */
  "node-selector": z.record(
    z.string().regex(LABEL_KEY, { message: "Expected a label key" }),
    z.string().regex(LABEL_VALUE, { message: "Expected a label value" }),
  ).optional(),
  /** Working directory in the container (absolute). */
  workdir: z.string().refine((path) => path.startsWith("/") && !/[\r\n]/.test(path), {
    message: 'Expected an absolute path in the container for "workdir"',
  }).optional(),
  /** `imagePullPolicy` of the step's container. */
  "image-pull-policy": z.enum(["Always", "IfNotPresent", "Never"]).optional(),
  /** How long the pod may stay unschedulable before the step fails (default 60s). */
  "unschedulable-timeout": z.string().refine(isDuration, {
    message: 'Expected a duration like "2m" for "unschedulable-timeout"',
  }).optional(),
  /** Free configuration; accepted and ignored. */
  with: z.record(z.string(), z.unknown()).optional(),
}).refine((config) => !(config.run !== undefined && config.command !== undefined), {
  message: 'Expected "run" or "command", not both',
}).refine((config) => config.run !== undefined || config.command !== undefined, {
  message: 'Expected "run" (a script) or "command" (exec form)',
});

/** A validated `kubernetes` step config. */
export type KubernetesConfig = z.infer<typeof kubernetesConfigSchema>;

function target(): KubeTarget | undefined {
  try {
    return loadKubeTarget((name) => Deno.env.get(name));
  } catch {
    // The backend reports the problem on the step; it needs nothing to do so.
    return undefined;
  }
}

function presentEnv(names: string[]): string[] {
  return names.filter((name) => {
    try {
      return Deno.env.get(name) !== undefined;
    } catch {
      return false;
    }
  });
}

/** What talking to the API server takes. */
function apiPermissions(): DenoPermissions {
  const found = target();
  return {
    read: found?.files ?? [],
    write: [],
    net: found ? [found.address] : [],
    env: presentEnv(found?.env ?? KUBECONFIG_ENV),
    run: [],
  };
}

/** What the object store takes (nothing when none is configured). */
function storePermissions(scratchRoot: string): DenoPermissions {
  let settings;
  try {
    settings = s3Settings((name) => Deno.env.get(name));
  } catch {
    settings = undefined;
  }
  // READABLE_STREAM is read (when npm:minio loads) whether or not it is set.
  const env = [...new Set([...presentEnv(S3_ENV), "READABLE_STREAM"])];
  if (!settings) return { read: [scratchRoot], write: [scratchRoot], net: [], env, run: [] };
  return {
    read: [scratchRoot],
    write: [scratchRoot],
    net: [netAddress(settings.endpoint)],
    env,
    run: [],
  };
}

function merge(a: DenoPermissions, b: DenoPermissions): DenoPermissions {
  const union = (x: string[], y: string[]) => [...new Set([...x, ...y])];
  return {
    read: union(a.read, b.read),
    write: union(a.write, b.write),
    net: union(a.net, b.net),
    env: union(a.env, b.env),
    run: union(a.run, b.run),
  };
}

/** The `kubernetes` backend's manifest. */
export const kubernetesManifest: BackendManifest<KubernetesConfig> = {
  name: "kubernetes",
  version: "0.1.0",
  // Jobs outlive the runner and are found again by label; no usage figures (no metrics API).
  capabilities: { reattach: true, usage: false },
  configSchema: kubernetesConfigSchema,
  hostPermissions(context: HostContext): DenoPermissions {
    // Recovery downloads the outputs of attempts that finished meanwhile.
    return merge(apiPermissions(), storePermissions(context.scratchRoot));
  },
  permissions(_config: KubernetesConfig, spec: AttemptSpec): DenoPermissions {
    const api = apiPermissions();
    if (Object.keys(spec.inputs).length === 0 && spec.outputs.length === 0) return api;
    return merge(api, storePermissions(spec.scratchRoot));
  },
};

/** The manifest, as plugin hosts load it (a module's default export). */
export default kubernetesManifest;
