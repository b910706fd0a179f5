/**
 * The `kubernetes` backend: each attempt a `batch/v1` Job (see `_job.ts`)
 * on the cluster of the runner's kubeconfig, its environment and secrets
 * in a Secret the Job owns, its artifacts through the object store with
 * presigned URLs (see `_artifacts.ts`).
 *
 * Status comes from one shared watch of this agent's Jobs and one of their
 * Pods (see `_watch.ts`): container states (`OOMKilled`, image pull and
 * config errors), scheduling (`Unschedulable` beyond a configurable time)
 * and Job conditions (`FailureTarget`/`SuccessCriteriaMet` before
 * `Failed`/`Complete`, `DeadlineExceeded`). Logs are followed from
 * `pods/{pod}/log?follow=true&timestamps=true`; a follow that drops is
 * resumed from the last timestamp seen, without repeating a line. Cancel
 * deletes the pods (with the cancel's grace), the Job with
 * `propagationPolicy: Background` (without it a Job's pods are orphaned)
 * and the Secret. Transient API failures are retried (`_api.ts`).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import createKubernetesBackend from "./mod.ts";
 *
 * const backend = createKubernetesBackend();
 * assert.deepEqual(backend.capabilities, { reattach: true, usage: false });
 * ```
 *
 * @module
 */

import {
  type AttemptSpec,
  classifyExit,
  configMessages,
  DEFAULT_CANCEL_GRACE_MS,
  type Execution,
  type ExecutionBackend,
  type ExitStatus,
  type Fingerprint,
  InvalidStepConfigError,
  missingOutputStatus,
  type RecoveredAttempt,
  type RecoverOptions,
} from "../backend.ts";
import { formatBytes } from "../docker/_container.ts";
import { LogQueue } from "../log_queue.ts";
import { failedExecution } from "../settled.ts";
import { parseDuration } from "../../core/duration.ts";
import { SAFE_NAME_PATTERN } from "../../core/model.ts";
import { KubeApi, KubeApiError } from "./_api.ts";
import { ArtifactStoreError, AttemptArtifacts, netAddress, s3Settings } from "./_artifacts.ts";
import {
  agentSelector,
  ATTEMPT_ID_ANNOTATION,
  DEFAULT_HELPER_IMAGE,
  INPUTS_CONTAINER,
  jobManifest,
  jobName,
  MEMORY_ANNOTATION,
  OUTPUTS_ANNOTATION,
  OUTPUTS_CONTAINER,
  OUTPUTS_DIR_ANNOTATION,
  secretManifest,
  STEP_CONTAINER,
} from "./_job.ts";
import { envValue, KubeconfigError, loadKubeTarget } from "./_kubeconfig.ts";
import { LogFollower } from "./_logs.ts";
import { JobInformer, type JobView, type KubeObject } from "./_watch.ts";
import {
  DEFAULT_UNSCHEDULABLE_TIMEOUT,
  type KubernetesConfig,
  kubernetesConfigSchema,
} from "./manifest.ts";

export { KubeApiError } from "./_api.ts";
export { KubeconfigError } from "./_kubeconfig.ts";

/** Exit code reported when the end could not be learnt. */
const UNKNOWN_EXIT_CODE = -1;
/** Waiting reasons that mean the image will not come: the step fails with them. */
const IMAGE_FAILURES = new Set(["ErrImagePull", "ImagePullBackOff", "InvalidImageName"]);
/**
 * How long `CreateContainerConfigError` may last before it fails the step:
 * the pod may start before its Secret is created (the Secret needs the
 * Job's uid), and the kubelet retries until it is there.
 */
const CONFIG_ERROR_GRACE_MS = 10_000;
/** How long output may keep arriving after the step's end is known. */
const LOG_DRAIN_MS = 5_000;
/** How long fingerprint waits for the API server. */
const FINGERPRINT_TIMEOUT_MS = 5_000;

const encoder = new TextEncoder();

/** One API server: its client and the shared informers (per namespace and agent). */
class Cluster {
  readonly api: KubeApi;
  readonly #informers = new Map<string, JobInformer>();

  constructor(api: KubeApi) {
    this.api = api;
  }

  informer(namespace: string, agentId: string): JobInformer {
    const key = `${namespace}\n${agentId}`;
    let informer = this.#informers.get(key);
    if (!informer) {
      informer = new JobInformer(this.api, namespace, agentSelector(agentId));
      this.#informers.set(key, informer);
    }
    return informer;
  }
}

/** Creates the `kubernetes` backend; each instance keeps its own client and watches. */
export function createKubernetesBackend(): ExecutionBackend {
  let cluster: Cluster | undefined;
  const connect = (): Cluster => cluster ??= new Cluster(new KubeApi(loadKubeTarget()));
  return {
    name: "kubernetes",
    capabilities: { reattach: true, usage: false },
    fingerprint: () => fingerprintKubernetes(connect),
    start: (spec) => startJob(connect, spec),
    recover: (options) => recoverJobs(connect, options),
  };
}

/** Checks a `kubernetes` step config; returns human messages, empty when valid. */
export function validateKubernetesConfig(config: Record<string, unknown>): string[] {
  return configMessages(kubernetesConfigSchema, config);
}

async function fingerprintKubernetes(connect: () => Cluster): Promise<Fingerprint> {
  let cluster: Cluster;
  try {
    cluster = connect();
  } catch (error) {
    return { available: false, detail: (error as Error).message };
  }
  try {
    const version = await cluster.api.request<{ gitVersion: string }>("GET", "/version", {
      signal: AbortSignal.timeout(FINGERPRINT_TIMEOUT_MS),
    });
    return {
      available: true,
      version: version.gitVersion,
      detail: `Kubernetes ${version.gitVersion} at ${cluster.api.target.server}`,
    };
  } catch (error) {
    return {
      available: false,
      detail: `Kubernetes API at ${cluster.api.target.server} cannot be used: ${
        (error as Error).message
      }`,
    };
  }
}

function failure(errorClass: ExitStatus["errorClass"], message: string): ExitStatus {
  return { exitCode: UNKNOWN_EXIT_CODE, errorClass, message };
}

function helperImage(): string {
  return envValue("RUNNEL_KUBE_HELPER_IMAGE") ?? DEFAULT_HELPER_IMAGE;
}

async function startJob(connect: () => Cluster, spec: AttemptSpec): Promise<Execution> {
  const messages = validateKubernetesConfig(spec.config);
  if (messages.length > 0) throw new InvalidStepConfigError("kubernetes", messages);
  const config = spec.config as KubernetesConfig;
  const name = jobName(spec);
  let cluster: Cluster;
  try {
    cluster = connect();
  } catch (error) {
    const errorClass = error instanceof KubeconfigError ? "permission" : "infrastructure";
    return failedExecution(name, failure(errorClass, (error as Error).message));
  }
  const api = cluster.api;
  const namespace = config.namespace ?? api.target.namespace;
  const handle = `${namespace}/${name}`;
  const hasInputs = Object.keys(spec.inputs).length > 0;
  const moves = hasInputs || spec.outputs.length > 0;
  let artifacts: AttemptArtifacts | undefined;
  let plan;
  let podStoreAddress: string | undefined;
  if (moves) {
    try {
      const settings = s3Settings();
      if (!settings) {
        throw new ArtifactStoreError(
          "Expected an object store for the inputs and outputs of kubernetes steps: set " +
            "RUNNEL_KUBE_S3_ENDPOINT, RUNNEL_KUBE_S3_BUCKET, AWS_ACCESS_KEY_ID and " +
            "AWS_SECRET_ACCESS_KEY for the runner",
        );
      }
      podStoreAddress = netAddress(settings.podEndpoint);
      artifacts = new AttemptArtifacts(settings, name);
      plan = await artifacts.prepare({
        inputs: spec.inputs,
        outputs: spec.outputs,
        lifetimeSeconds: spec.timeoutMs !== undefined ? spec.timeoutMs / 1000 : undefined,
      });
    } catch (error) {
      await artifacts?.remove().catch(() => {});
      return failedExecution(
        handle,
        failure("infrastructure", `cannot stage the artifacts: ${(error as Error).message}`),
      );
    }
  }
  const manifest = jobManifest({
    spec,
    config,
    name,
    namespace,
    artifacts: { inputs: hasInputs, outputs: spec.outputs.length > 0, podStoreAddress },
    helperImage: helperImage(),
  });
  const jobs = `/apis/batch/v1/namespaces/${encodeURIComponent(namespace)}/jobs`;
  let job: KubeObject | undefined;
  try {
    job = await createOnce(api, jobs, manifest, spec.attemptId);
    const secretNeeded = Object.keys(spec.env).length > 0 || plan !== undefined;
    if (secretNeeded) {
      await createOnce(
        api,
        `/api/v1/namespaces/${encodeURIComponent(namespace)}/secrets`,
        secretManifest({
          name,
          namespace,
          job: { name, uid: job.metadata.uid },
          labels: (manifest.metadata as { labels: Record<string, string> }).labels,
          env: spec.env,
          plan,
        }),
        undefined,
      );
    }
  } catch (error) {
    await artifacts?.remove().catch(() => {});
    if (job) {
      // The Secret could not be made: the Job would wait for it forever.
      await api.request("DELETE", `${jobs}/${name}`, {
        body: { kind: "DeleteOptions", apiVersion: "v1", propagationPolicy: "Background" },
        accept: [404],
      }).catch(() => {});
    }
    const message = error instanceof KubeApiError
      ? `cannot create Job ${handle}: ${error.message}`
      : `cannot create Job ${handle}: ${(error as Error).message}`;
    const errorClass =
      error instanceof KubeApiError && (error.status === 401 || error.status === 403)
        ? "permission"
        : "infrastructure";
    return failedExecution(handle, failure(errorClass, message));
  }
  return watchJob({
    cluster,
    namespace,
    name,
    agentId: spec.agentId,
    outputs: spec.outputs,
    outputsDir: spec.outputsDir,
    memoryBytes: spec.resources?.memoryBytes,
    wrapped: spec.outputs.length > 0,
    unschedulableMs: parseDuration(
      config["unschedulable-timeout"] ?? DEFAULT_UNSCHEDULABLE_TIMEOUT,
    ),
    artifacts,
  });
}

/**
 * Creates an object; on a 409 (a retried create whose first answer was
 * lost) the stored object is taken when it names the same attempt (or is
 * the attempt's Secret); anything else with the name is refused.
 */
async function createOnce(
  api: KubeApi,
  collection: string,
  body: Record<string, unknown>,
  attemptId: string | undefined,
): Promise<KubeObject> {
  try {
    return await api.request<KubeObject>("POST", collection, { body });
  } catch (error) {
    if (!(error instanceof KubeApiError && error.status === 409)) throw error;
    const name = (body.metadata as { name: string }).name;
    const existing = await api.request<KubeObject>("GET", `${collection}/${name}`);
    // Ours: a retried create whose first answer was lost, or the same attempt again.
    if (attemptId === undefined) return existing;
    if (existing.metadata.annotations?.[ATTEMPT_ID_ANNOTATION] === attemptId) return existing;
    throw new KubeApiError(409, "AlreadyExists", `attempt already started as ${name}`);
  }
}

/** What {@link watchJob} needs. */
interface WatchOptions {
  cluster: Cluster;
  namespace: string;
  name: string;
  agentId: string;
  outputs: string[];
  outputsDir: string;
  memoryBytes?: number;
  /** The step container is wrapped: outputs are uploaded by the helper beside it. */
  wrapped: boolean;
  unschedulableMs: number;
  artifacts?: AttemptArtifacts;
  /** Re-attached after a restart: logs from now on. */
  logsSince?: string;
}

type ContainerStatus = {
  name: string;
  state?: {
    waiting?: { reason?: string; message?: string };
    running?: { startedAt?: string };
    terminated?: { exitCode: number; reason?: string; message?: string; signal?: number };
  };
};

function containerStatus(pod: KubeObject, name: string): ContainerStatus | undefined {
  const statuses: ContainerStatus[] = [
    ...(pod.status?.initContainerStatuses ?? []),
    ...(pod.status?.containerStatuses ?? []),
  ];
  return statuses.find((status) => status.name === name);
}

function conditionOf(
  object: KubeObject | undefined,
  type: string,
): { status: string; reason?: string; message?: string } | undefined {
  return (object?.status?.conditions ?? []).find((c: { type: string }) => c.type === type);
}

function watchJob(options: WatchOptions): Execution {
  const { cluster, namespace, name } = options;
  const api = cluster.api;
  const ns = encodeURIComponent(namespace);
  const handle = `${namespace}/${name}`;
  const queue = new LogQueue();
  const informer = cluster.informer(namespace, options.agentId);
  const follower = new LogFollower({
    api,
    namespace,
    container: STEP_CONTAINER,
    since: options.logsSince,
    push: (text) => queue.push({ stream: "stdout", data: encoder.encode(text) }),
    room: () => queue.room(),
  });
  let decided: ExitStatus | undefined;
  let final: ExitStatus | undefined;
  let cancelled = false;
  let unschedulableTimer: ReturnType<typeof setTimeout> | undefined;
  let configTimer: ReturnType<typeof setTimeout> | undefined;
  let latest: JobView = { jobDeleted: false, pods: [] };
  let readingInputsFailure = false;
  const ended = Promise.withResolvers<ExitStatus>();

  const decide = (status: ExitStatus, drainMs = LOG_DRAIN_MS) => {
    if (decided) return;
    decided = status;
    clearTimeout(unschedulableTimer);
    clearTimeout(configTimer);
    (async () => {
      let result = status;
      await follower.finish(drainMs);
      unsubscribe();
      if (!cancelled && result.exitCode === 0 && !result.errorClass && options.outputs.length > 0) {
        try {
          await options.artifacts?.download(options.outputs, options.outputsDir);
          result = await missingOutputStatus(options, result);
        } catch (error) {
          result = failure("artifact", `cannot take the outputs: ${(error as Error).message}`);
        }
      }
      return result;
    })().then((result) => {
      final = result;
      queue.close();
      ended.resolve(result);
    }, (error) => {
      final = failure("infrastructure", (error as Error).message);
      queue.close();
      ended.resolve(final);
    });
  };

  const stepExit = (
    terminated: NonNullable<NonNullable<ContainerStatus["state"]>["terminated"]>,
  ) => {
    const exitCode = terminated.exitCode;
    if (terminated.reason === "OOMKilled") {
      const limit = options.memoryBytes === undefined ? "" : ` ${formatBytes(options.memoryBytes)}`;
      return {
        exitCode,
        signal: "SIGKILL",
        errorClass: "application" as const,
        message: `killed: memory limit${limit} exceeded`,
      };
    }
    return classifyExit({ exitCode });
  };

  const inputsFailure = async (pod: KubeObject) => {
    const text = await api.request<string>(
      "GET",
      `/api/v1/namespaces/${ns}/pods/${pod.metadata.name}/log`,
      {
        query: { container: INPUTS_CONTAINER, tailLines: "5" },
        accept: [400, 404],
      },
    ).catch(() => undefined);
    return typeof text === "string" ? text.trim() : "";
  };

  const onView = (view: JobView) => {
    latest = view;
    if (decided) return;
    const job = view.job;
    if (!job && view.jobDeleted) {
      decide(failure("infrastructure", `Job ${handle} was deleted outside runnel`), 1_000);
      return;
    }
    const failureTarget = conditionOf(job, "FailureTarget") ?? conditionOf(job, "Failed");
    if (failureTarget?.status === "True" && failureTarget.reason === "DeadlineExceeded") {
      decide({
        exitCode: UNKNOWN_EXIT_CODE,
        errorClass: "timeout",
        message:
          `step exceeded its deadline (activeDeadlineSeconds ${job?.spec?.activeDeadlineSeconds}): ${
            failureTarget.message ?? "DeadlineExceeded"
          }`,
      }, 1_000);
      return;
    }
    const pod = view.pods[view.pods.length - 1];
    if (pod) {
      follower.observe(pod);
      const disruption = conditionOf(pod, "DisruptionTarget");
      if (disruption?.status === "True") {
        decide(
          failure(
            "infrastructure",
            `pod ${pod.metadata.name} was disrupted (${disruption.reason ?? "DisruptionTarget"}): ${
              disruption.message ?? "evicted"
            }`,
          ),
          1_000,
        );
        return;
      }
      const scheduled = conditionOf(pod, "PodScheduled");
      if (scheduled?.status === "False" && scheduled.reason === "Unschedulable") {
        unschedulableTimer ??= setTimeout(() => {
          const message =
            conditionOf(latest.pods[latest.pods.length - 1], "PodScheduled")?.message ??
              scheduled.message;
          decide(
            failure(
              "infrastructure",
              `pod ${pod.metadata.name} stayed unschedulable for ${
                options.unschedulableMs / 1000
              } s: Unschedulable: ${message}`,
            ),
            0,
          );
        }, options.unschedulableMs);
      } else if (unschedulableTimer !== undefined) {
        clearTimeout(unschedulableTimer);
        unschedulableTimer = undefined;
      }
      let configError: { container: string; message: string } | undefined;
      for (const containerName of [INPUTS_CONTAINER, STEP_CONTAINER, OUTPUTS_CONTAINER]) {
        const waiting = containerStatus(pod, containerName)?.state?.waiting;
        if (!waiting?.reason) continue;
        if (IMAGE_FAILURES.has(waiting.reason)) {
          const helper = containerName !== STEP_CONTAINER ? " (the runnel helper image)" : "";
          decide(
            failure(
              waiting.reason === "InvalidImageName" && !helper ? "application" : "infrastructure",
              `container ${containerName}${helper} cannot start: ${waiting.reason}: ${
                waiting.message ?? ""
              }`
                .trim(),
            ),
            0,
          );
          return;
        }
        if (waiting.reason === "CreateContainerConfigError") {
          configError = { container: containerName, message: waiting.message ?? "" };
        }
      }
      if (configError) {
        configTimer ??= setTimeout(() => {
          decide(
            failure(
              "infrastructure",
              `container ${configError!.container} cannot start: CreateContainerConfigError: ${
                configError!.message
              }`,
            ),
            0,
          );
        }, CONFIG_ERROR_GRACE_MS);
      } else if (configTimer !== undefined) {
        clearTimeout(configTimer);
        configTimer = undefined;
      }
      const inputs = containerStatus(pod, INPUTS_CONTAINER)?.state?.terminated;
      if (inputs && inputs.exitCode !== 0) {
        if (!readingInputsFailure) {
          readingInputsFailure = true;
          inputsFailure(pod).then((text) =>
            decide(
              failure(
                "infrastructure",
                `cannot fetch the inputs in the pod: ${text || `exit ${inputs.exitCode}`}`,
              ),
              0,
            )
          );
        }
        return;
      }
      const step = containerStatus(pod, STEP_CONTAINER)?.state?.terminated;
      if (step) {
        const status = stepExit(step);
        if (status.exitCode !== 0 || status.errorClass || !options.wrapped) {
          decide(status);
          return;
        }
        const upload = containerStatus(pod, OUTPUTS_CONTAINER)?.state?.terminated;
        if (upload) {
          decide(
            upload.exitCode === 0 ? status : failure(
              "artifact",
              `the pod could not upload its outputs (exit ${upload.exitCode})`,
            ),
          );
          return;
        }
      }
    }
    // Since 1.31 SuccessCriteriaMet comes first; Complete follows once the pods ended.
    const succeeded = conditionOf(job, "SuccessCriteriaMet")?.status === "True" ||
      conditionOf(job, "Complete")?.status === "True";
    if (succeeded && !options.wrapped) {
      decide({ exitCode: 0 });
      return;
    }
    const failed = conditionOf(job, "Failed");
    if (failed?.status === "True" && !pod) {
      decide(
        failure("application", `Job ${handle} failed: ${failed.reason}: ${failed.message ?? ""}`),
      );
    }
  };
  const unsubscribe = informer.subscribe(name, onView);

  const deleteQuietly = async (
    path: string,
    query: Record<string, string> = {},
    body?: unknown,
  ) => {
    await api.request("DELETE", path, { query, body, accept: [404] }).catch(() => {});
  };
  const deleteJob = async (graceMs: number) => {
    const graceSeconds = String(Math.max(0, Math.ceil(graceMs / 1000)));
    // Running pods first, with the cancel's grace: the Job's own delete leaves
    // them to the garbage collector with their default grace. Pods that ended
    // go with the Job.
    const running = latest.pods.filter((pod) =>
      pod.status?.phase !== "Succeeded" && pod.status?.phase !== "Failed"
    );
    await Promise.all(
      running.map((pod) =>
        deleteQuietly(`/api/v1/namespaces/${ns}/pods/${pod.metadata.name}`, {
          gracePeriodSeconds: graceSeconds,
        })
      ),
    );
    await deleteQuietly(`/apis/batch/v1/namespaces/${ns}/jobs/${name}`, {}, {
      kind: "DeleteOptions",
      apiVersion: "v1",
      propagationPolicy: "Background",
    });
  };

  let cleaning: Promise<void> | undefined;
  return {
    handle,
    logs: queue,
    wait: () => ended.promise,
    status: () => Promise.resolve(final ? { state: "exited", exit: final } : { state: "running" }),
    async cancel(graceMs = DEFAULT_CANCEL_GRACE_MS) {
      if (decided) {
        await ended.promise;
        return;
      }
      cancelled = true;
      decide({
        exitCode: UNKNOWN_EXIT_CODE,
        errorClass: "cancelled",
        message: "step was cancelled",
      }, 0);
      await deleteJob(graceMs);
      await deleteQuietly(`/api/v1/namespaces/${ns}/secrets/${name}`);
      await ended.promise;
    },
    cleanup() {
      cleaning ??= (async () => {
        if (!decided) {
          cancelled = true;
          decide(failure("cancelled", "step was cancelled"), 0);
        }
        await ended.promise;
        // Final logs were read (wait resolved after the drain): the Job may go.
        await deleteJob(0);
        await options.artifacts?.remove().catch(() => {});
      })();
      return cleaning;
    },
  };
}

async function recoverJobs(
  connect: () => Cluster,
  options: RecoverOptions,
): Promise<RecoveredAttempt[]> {
  const cluster = connect();
  const api = cluster.api;
  const namespaces = new Set([api.target.namespace]);
  for (const handle of options.handles ?? []) {
    const namespace = handle.split("/")[0];
    if (/^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/.test(namespace)) namespaces.add(namespace);
  }
  const keep = new Set(options.keep);
  const recovered: RecoveredAttempt[] = [];
  let settings;
  try {
    settings = s3Settings();
  } catch {
    settings = undefined;
  }
  for (const namespace of namespaces) {
    const ns = encodeURIComponent(namespace);
    const list = await api.request<{ items: KubeObject[] }>(
      "GET",
      `/apis/batch/v1/namespaces/${ns}/jobs`,
      { query: { labelSelector: agentSelector(options.agentId) } },
    );
    for (const job of list.items) {
      const annotations = job.metadata.annotations ?? {};
      const attemptId = annotations[ATTEMPT_ID_ANNOTATION];
      const name = job.metadata.name;
      const artifacts = settings ? new AttemptArtifacts(settings, name) : undefined;
      if (attemptId === undefined || !keep.has(attemptId) || job.metadata.deletionTimestamp) {
        await api.request("DELETE", `/apis/batch/v1/namespaces/${ns}/jobs/${name}`, {
          body: { kind: "DeleteOptions", apiVersion: "v1", propagationPolicy: "Background" },
          accept: [404],
        });
        await artifacts?.remove().catch(() => {});
        continue;
      }
      // The annotations are read back from the cluster: whoever may edit Jobs
      // there must not steer where this host writes (the sandbox bounds it too).
      let outputs: string[] = [];
      try {
        const parsed = JSON.parse(annotations[OUTPUTS_ANNOTATION] ?? "[]");
        if (Array.isArray(parsed)) {
          outputs = parsed.filter((entry): entry is string =>
            typeof entry === "string" && SAFE_NAME_PATTERN.test(entry)
          );
        }
      } catch { /* none */ }
      const outputsDir = annotations[OUTPUTS_DIR_ANNOTATION] ?? "";
      if (
        outputs.length > 0 && (!outputsDir.startsWith("/") || outputsDir.split("/").includes(".."))
      ) {
        outputs = [];
      }
      const memory = Number(annotations[MEMORY_ANNOTATION]);
      recovered.push({
        attemptId,
        execution: watchJob({
          cluster,
          namespace,
          name,
          agentId: options.agentId,
          outputs,
          outputsDir,
          memoryBytes: Number.isFinite(memory) && memory > 0 ? memory : undefined,
          wrapped: outputs.length > 0,
          unschedulableMs: parseDuration(DEFAULT_UNSCHEDULABLE_TIMEOUT),
          artifacts,
          logsSince: new Date().toISOString().replace(/\.\d+Z$/, "Z"),
        }),
      });
    }
  }
  return recovered;
}

/** The backend factory, as plugin hosts load it (a module's default export). */
export default createKubernetesBackend;
