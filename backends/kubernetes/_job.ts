/**
 * The objects one attempt becomes: a `batch/v1` Job (one pod, never
 * restarted by Kubernetes: runnel retries with its own policy) and a
 * Secret owned by it holding the step's environment and the artifact plan,
 * so that no value of either is ever written into the Job or pod spec.
 *
 * The pod: an emptyDir at `/runnel`; when the step has inputs or outputs,
 * an init container (the helper image) that fetches the inputs and copies
 * a static busybox into the volume; the step's container, wrapped (when it
 * has outputs) by that busybox so that its exit code lands in
 * `/runnel/exit`; and beside it a helper container that uploads the
 * outputs once that file says 0.
 *
 * @module
 */

import { createHash } from "node:crypto";
import { type AttemptSpec, stepEnvironment } from "../backend.ts";
import { type ArtifactPlan, POD_ARTIFACTS_DIR } from "./_artifacts.ts";
import type { KubernetesConfig } from "./manifest.ts";

/** Label every object runnel creates carries. */
export const MANAGED_BY_LABEL = "app.kubernetes.io/managed-by";
export const MANAGED_BY = "runnel";
/** Labels naming the attempt (values made label-safe; the annotations keep them whole). */
export const AGENT_LABEL = "runnel.dev/agent";
export const RUN_LABEL = "runnel.dev/run";
export const STEP_LABEL = "runnel.dev/step";
export const ATTEMPT_LABEL = "runnel.dev/attempt";
/** Annotations: the attempt id, and where its outputs go on the agent (for recovery). */
export const ATTEMPT_ID_ANNOTATION = "runnel.dev/attempt-id";
export const OUTPUTS_ANNOTATION = "runnel.dev/outputs";
export const OUTPUTS_DIR_ANNOTATION = "runnel.dev/outputs-dir";
export const MEMORY_ANNOTATION = "runnel.dev/memory-bytes";
/** Container names. */
export const STEP_CONTAINER = "step";
export const INPUTS_CONTAINER = "runnel-inputs";
export const OUTPUTS_CONTAINER = "runnel-outputs";
/** Secret key holding the artifact plan (not an env name, so no step variable can clash). */
export const ARTIFACTS_KEY = "runnel.artifacts";
/** The helper image when `RUNNEL_KUBE_HELPER_IMAGE` does not name another. */
export const DEFAULT_HELPER_IMAGE = "runnel/kube-helper:local";
/** Where the helper script lies in the helper image. */
const HELPER_SCRIPT = "/opt/runnel/helper.ts";
/** Finished Jobs are removed by Kubernetes after this long if runnel did not remove them. */
export const TTL_SECONDS_AFTER_FINISHED = 3600;
/** Grace of a pod's containers when the Job is deleted without runnel's own cancel. */
const TERMINATION_GRACE_SECONDS = 10;
/** Environment variable names a container accepts as Secret keys and env names. */
const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

/**
 * Runs the step's argv, forwarding TERM to it, and records its exit code
 * in `/runnel/exit` (atomically) for the outputs helper.
 */
const WRAPPER = [
  `trap 'kill -TERM "$child" 2>/dev/null' TERM INT`,
  `"$@" &`,
  "child=$!",
  `while :; do wait "$child"; code=$?; kill -0 "$child" 2>/dev/null || break; done`,
  `printf '%s' "$code" > ${POD_ARTIFACTS_DIR}/exit.tmp && mv ${POD_ARTIFACTS_DIR}/exit.tmp ${POD_ARTIFACTS_DIR}/exit`,
  `exit "$code"`,
].join("\n");

/** A label value made of what labels allow, at most 63 characters (a digest keeps long ones apart). */
export function labelValue(value: string): string {
  let safe = value.replace(/[^A-Za-z0-9_.-]/g, "-").replace(/^[^A-Za-z0-9]+|[^A-Za-z0-9]+$/g, "");
  if (safe.length > 63 || safe !== value) {
    const digest = createHash("sha256").update(value).digest("hex").slice(0, 8);
    safe = `${safe.slice(0, 54).replace(/[^A-Za-z0-9]+$/, "")}-${digest}`.replace(/^-/, "");
  }
  return safe;
}

/** The Job's name: readable, and the same for the same attempt id (a second start is refused). */
export function jobName(spec: Pick<AttemptSpec, "stepId" | "attemptId">): string {
  const digest = createHash("sha256").update(spec.attemptId).digest("hex").slice(0, 10);
  const step = spec.stepId.toLowerCase().replace(/[^a-z0-9-]+/g, "-").replace(/^-+|-+$/g, "")
    .slice(0, 30).replace(/-+$/, "");
  return `runnel-${step ? `${step}-` : ""}${digest}`;
}

/** The label selector of everything runnel made for an agent. */
export function agentSelector(agentId: string): string {
  return `${MANAGED_BY_LABEL}=${MANAGED_BY},${AGENT_LABEL}=${labelValue(agentId)}`;
}

/** CPU as a quantity in millicores. */
function cpuQuantity(cpu: number): string {
  return `${Math.max(1, Math.round(cpu * 1000))}m`;
}

/** What {@link jobManifest} needs. */
export interface JobOptions {
  spec: AttemptSpec;
  config: KubernetesConfig;
  name: string;
  namespace: string;
  /** Whether the step moves artifacts (then the pod has the helper containers). */
  artifacts: { inputs: boolean; outputs: boolean; podStoreAddress?: string };
  helperImage: string;
}

/** The Job of an attempt. */
export function jobManifest(options: JobOptions): Record<string, unknown> {
  const { spec, config, name } = options;
  const labels = {
    [MANAGED_BY_LABEL]: MANAGED_BY,
    [AGENT_LABEL]: labelValue(spec.agentId),
    [RUN_LABEL]: labelValue(spec.runId),
    [STEP_LABEL]: labelValue(spec.stepId),
    [ATTEMPT_LABEL]: String(spec.attempt),
  };
  const annotations: Record<string, string> = {
    [ATTEMPT_ID_ANNOTATION]: spec.attemptId,
    [OUTPUTS_ANNOTATION]: JSON.stringify(spec.outputs),
    [OUTPUTS_DIR_ANNOTATION]: spec.outputsDir,
  };
  if (spec.resources?.memoryBytes !== undefined) {
    annotations[MEMORY_ANNOTATION] = String(spec.resources.memoryBytes);
  }
  const moves = options.artifacts.inputs || options.artifacts.outputs;
  const wrap = options.artifacts.outputs;
  const podDir = (dir: string) => `${POD_ARTIFACTS_DIR}/${dir}`;
  const standard = stepEnvironment({
    ...spec,
    inputsDir: podDir("in"),
    outputsDir: podDir("out"),
    inputs: Object.fromEntries(
      Object.keys(spec.inputs).map((input) => [input, podDir(`in/${input}`)]),
    ),
  });
  const env: Array<Record<string, unknown>> = Object.entries(standard)
    .filter(([key]) => !(key in spec.env))
    .map(([key, value]) => ({ name: key, value }));
  // Step env and secrets alike come from the Secret: the spec holds their names only.
  for (const key of Object.keys(spec.env)) {
    if (!ENV_NAME.test(key)) continue;
    env.push({ name: key, valueFrom: { secretKeyRef: { name, key } } });
  }
  const argv = config.run !== undefined ? ["/bin/sh", "-c", config.run] : config.command;
  const resources: Record<string, Record<string, string>> = {};
  if (spec.resources?.cpu !== undefined || spec.resources?.memoryBytes !== undefined) {
    const amounts: Record<string, string> = {};
    if (spec.resources.cpu !== undefined) amounts.cpu = cpuQuantity(spec.resources.cpu);
    if (spec.resources.memoryBytes !== undefined) {
      amounts.memory = String(spec.resources.memoryBytes);
    }
    resources.requests = amounts;
    resources.limits = amounts;
  }
  const volumeMounts = moves ? [{ name: "runnel", mountPath: POD_ARTIFACTS_DIR }] : [];
  const step: Record<string, unknown> = {
    name: STEP_CONTAINER,
    image: config.image,
    ...(config["image-pull-policy"] ? { imagePullPolicy: config["image-pull-policy"] } : {}),
    ...(wrap
      ? {
        command: [`${POD_ARTIFACTS_DIR}/bin/busybox`, "sh", "-c", WRAPPER, "runnel-wrapper"],
        args: [...(argv ?? []), ...(config.command && config.args ? config.args : [])],
      }
      : {
        ...(argv ? { command: argv } : {}),
        ...(config.args ? { args: config.args } : {}),
      }),
    ...(config.workdir ? { workingDir: config.workdir } : {}),
    env,
    resources,
    volumeMounts,
  };
  const helper = (containerName: string, mode: string) => ({
    name: containerName,
    image: options.helperImage,
    imagePullPolicy: "IfNotPresent",
    command: [
      "deno",
      "run",
      "--no-config",
      "--no-lock",
      "--quiet",
      `--allow-net=${options.artifacts.podStoreAddress ?? ""}`,
      `--allow-read=${POD_ARTIFACTS_DIR},/bin/busybox`,
      `--allow-write=${POD_ARTIFACTS_DIR}`,
      "--allow-env=RUNNEL_ARTIFACTS",
      HELPER_SCRIPT,
      mode,
    ],
    env: [{ name: "RUNNEL_ARTIFACTS", valueFrom: { secretKeyRef: { name, key: ARTIFACTS_KEY } } }],
    volumeMounts,
  });
  const podSpec: Record<string, unknown> = {
    restartPolicy: "Never",
    terminationGracePeriodSeconds: TERMINATION_GRACE_SECONDS,
    enableServiceLinks: false,
    ...(config["service-account"]
      ? { serviceAccountName: config["service-account"] }
      : { automountServiceAccountToken: false }),
    ...(config["node-selector"] ? { nodeSelector: config["node-selector"] } : {}),
    ...(moves ? { volumes: [{ name: "runnel", emptyDir: {} }] } : {}),
    ...(moves ? { initContainers: [helper(INPUTS_CONTAINER, "fetch")] } : {}),
    containers: [step, ...(wrap ? [helper(OUTPUTS_CONTAINER, "upload")] : [])],
  };
  return {
    apiVersion: "batch/v1",
    kind: "Job",
    metadata: { name, namespace: options.namespace, labels, annotations },
    spec: {
      // runnel retries with its own policy; Kubernetes must not run the step twice.
      backoffLimit: 0,
      ...(spec.timeoutMs !== undefined
        ? { activeDeadlineSeconds: Math.max(1, Math.ceil(spec.timeoutMs / 1000)) }
        : {}),
      ttlSecondsAfterFinished: TTL_SECONDS_AFTER_FINISHED,
      // An evicted pod is not the step's fault: it must not count as the step failing.
      podFailurePolicy: {
        rules: [{
          action: "Ignore",
          onPodConditions: [{ type: "DisruptionTarget", status: "True" }],
        }],
      },
      template: { metadata: { labels }, spec: podSpec },
    },
  };
}

/** The Secret of an attempt, owned by its Job (deleted with it). */
export function secretManifest(options: {
  name: string;
  namespace: string;
  job: { name: string; uid: string };
  labels: Record<string, string>;
  env: Record<string, string>;
  plan?: ArtifactPlan;
}): Record<string, unknown> {
  const data: Record<string, string> = {};
  for (const [key, value] of Object.entries(options.env)) {
    if (ENV_NAME.test(key)) data[key] = base64(value);
  }
  if (options.plan) data[ARTIFACTS_KEY] = base64(JSON.stringify(options.plan));
  return {
    apiVersion: "v1",
    kind: "Secret",
    metadata: {
      name: options.name,
      namespace: options.namespace,
      labels: options.labels,
      ownerReferences: [{
        apiVersion: "batch/v1",
        kind: "Job",
        name: options.job.name,
        uid: options.job.uid,
        blockOwnerDeletion: true,
      }],
    },
    type: "Opaque",
    immutable: true,
    data,
  };
}

function base64(text: string): string {
  const bytes = new TextEncoder().encode(text);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}
