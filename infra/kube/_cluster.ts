/**
 * The stand-in's controllers and its one node: a Job controller (one pod
 * at a time, `backoffLimit`, `activeDeadlineSeconds`,
 * `ttlSecondsAfterFinished`, `podFailurePolicy`, conditions in the 1.31+
 * order), a garbage collector for owner references (Background,
 * Foreground and Orphan propagation) and a kubelet that runs each pod's
 * init containers, then its containers, on the local Docker engine, so
 * that exit codes, logs, OOM kills and missing images are real.
 *
 * @module
 */

import { type DockerEngine, DockerError } from "./_docker.ts";
import { type KubeObject, ObjectStore, type OwnerReference } from "./_store.ts";

/** Label every container the stand-in starts carries: the id of the stand-in that started it. */
export const INSTANCE_LABEL = "io.runnel.kube.instance";
/** How often a kubelet retries what Kubernetes' kubelet retries (image pull, container config). */
const RETRY_MS = 250;
/** `terminationGracePeriodSeconds` when the pod does not say. */
const DEFAULT_GRACE_SECONDS = 30;
/** A reference `docker`/containerd would accept (the kubelet rejects the rest as InvalidImageName). */
const IMAGE_REFERENCE =
  /^(?:[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?\/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:\/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::[\w][\w.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$/;

/** Which resource a kind is stored under. */
export const RESOURCES: Record<string, string> = { Pod: "pods", Secret: "secrets", Job: "jobs" };

/** Options of {@link Cluster}. */
export interface ClusterOptions {
  docker: DockerEngine;
  /** Distinguishes this stand-in's containers from any other's. */
  instanceId: string;
  /** Where emptyDir and secret volumes live (one directory per pod). */
  volumeRoot: string;
  nodeName: string;
  /** Labels of the one node (a pod's nodeSelector must match them). */
  nodeLabels: Record<string, string>;
  /** Docker network mode of pods; `host` lets pods reach loopback services. */
  networkMode: string;
}

interface PodRun {
  /** Docker container ids by container name. */
  containers: Map<string, string>;
  /** Set once the pod is being deleted: the run stops what it runs. */
  stopping?: { graceSeconds: number };
  done: Promise<void>;
}

function now(): string {
  return new Date().toISOString().replace(/\.\d+Z$/, "Z");
}

function randomSuffix(): string {
  const alphabet = "bcdfghjklmnpqrstvwxz2456789";
  let text = "";
  for (const byte of crypto.getRandomValues(new Uint8Array(5))) {
    text += alphabet[byte % alphabet.length];
  }
  return text;
}

function condition(type: string, status: string, reason?: string, message?: string) {
  const time = now();
  return {
    type,
    status,
    ...(reason ? { reason } : {}),
    ...(message ? { message } : {}),
    lastProbeTime: null,
    lastTransitionTime: time,
  };
}

/** Parses a Kubernetes quantity (`4Gi`, `500m`, `2`) into a number of units. */
export function parseQuantity(value: string | number): number {
  if (typeof value === "number") return value;
  const match = /^([0-9.]+)(m|k|Ki|M|Mi|G|Gi|T|Ti|E|Ei|P|Pi)?$/.exec(value.trim());
  if (!match) throw new SyntaxError(`quantities must match the regular expression: "${value}"`);
  const factors: Record<string, number> = {
    m: 1e-3,
    k: 1e3,
    Ki: 1024,
    M: 1e6,
    Mi: 1024 ** 2,
    G: 1e9,
    Gi: 1024 ** 3,
    T: 1e12,
    Ti: 1024 ** 4,
    P: 1e15,
    Pi: 1024 ** 5,
    E: 1e18,
    Ei: 1024 ** 6,
  };
  return Number(match[1]) * (match[2] ? factors[match[2]] : 1);
}

/** The controllers and the node, over one object store. */
export class Cluster {
  readonly store = new ObjectStore();
  readonly #options: ClusterOptions;
  readonly #runs = new Map<string, PodRun>();
  readonly #timers = new Set<ReturnType<typeof setTimeout>>();
  /** Failed pods a Job has accounted for, by job uid. */
  readonly #counted = new Map<string, Set<string>>();
  /** Jobs whose deadline passed, by uid. */
  readonly #overdue = new Set<string>();
  readonly #syncing = new Map<string, Promise<void>>();
  #closed = false;

  constructor(options: ClusterOptions) {
    this.#options = options;
  }

  #later(ms: number, body: () => void): void {
    if (this.#closed) return;
    const timer = setTimeout(() => {
      this.#timers.delete(timer);
      if (!this.#closed) body();
    }, ms);
    this.#timers.add(timer);
  }

  /** Called after an object is created through the API. */
  created(object: KubeObject): void {
    if (object.kind === "Job") this.syncJob(object.metadata.namespace!, object.metadata.name!);
    if (object.kind === "Pod") this.#startPod(object);
    this.#collectIfOrphaned(object);
  }

  // --- Jobs ---------------------------------------------------------------

  /** Defaults a new Job as the API server does (selector, template labels, limits). */
  defaultJob(job: KubeObject): void {
    const uid = job.metadata.uid!;
    const spec = job.spec ??= {};
    spec.completions ??= 1;
    spec.parallelism ??= 1;
    spec.backoffLimit ??= 6;
    spec.completionMode ??= "NonIndexed";
    spec.suspend ??= false;
    spec.podReplacementPolicy ??= spec.podFailurePolicy ? "Failed" : "TerminatingOrFailed";
    const selectorLabels = { "batch.kubernetes.io/controller-uid": uid };
    spec.selector ??= { matchLabels: selectorLabels };
    const template = spec.template ??= {};
    template.metadata ??= {};
    template.metadata.labels = {
      ...template.metadata.labels,
      ...selectorLabels,
      "batch.kubernetes.io/job-name": job.metadata.name,
      "controller-uid": uid,
      "job-name": job.metadata.name,
    };
    template.spec ??= {};
    template.spec.terminationGracePeriodSeconds ??= DEFAULT_GRACE_SECONDS;
    job.status = {};
  }

  /** Problems of a Job spec the API server would reject (422), empty when valid. */
  validateJob(job: KubeObject): string[] {
    const problems: string[] = [];
    const podSpec = job.spec?.template?.spec;
    if (!podSpec || !Array.isArray(podSpec.containers) || podSpec.containers.length === 0) {
      problems.push("spec.template.spec.containers: Required value");
      return problems;
    }
    if (!["Never", "OnFailure"].includes(podSpec.restartPolicy)) {
      problems.push(
        'spec.template.spec.restartPolicy: Required value: valid values: "OnFailure", "Never"',
      );
    }
    if (job.spec.podFailurePolicy && podSpec.restartPolicy !== "Never") {
      problems.push(
        'spec.template.spec.restartPolicy: Invalid value: "OnFailure": only "Never" is supported when podFailurePolicy is specified',
      );
    }
    for (const container of [...podSpec.containers, ...(podSpec.initContainers ?? [])]) {
      if (!container.name) problems.push("spec.template.spec.containers[].name: Required value");
      if (!container.image) problems.push("spec.template.spec.containers[].image: Required value");
    }
    return problems;
  }

  /** Reconciles one Job; calls for the same Job run one after another. */
  syncJob(namespace: string, name: string): void {
    const key = `${namespace}/${name}`;
    const previous = this.#syncing.get(key) ?? Promise.resolve();
    const next = previous.then(() => this.#syncJob(namespace, name)).catch((error) =>
      console.error(`kube stand-in: job ${key}: ${error?.stack ?? error}`)
    );
    this.#syncing.set(key, next);
    next.finally(() => {
      if (this.#syncing.get(key) === next) this.#syncing.delete(key);
    });
  }

  #ownedBy(resource: string, uid: string): KubeObject[] {
    return this.store.list(
      resource,
      (object) => (object.metadata.ownerReferences ?? []).some((owner) => owner.uid === uid),
    ).items;
  }

  #syncJob(namespace: string, name: string): void {
    if (this.#closed) return;
    const job = this.store.get("jobs", namespace, name);
    if (!job || job.metadata.deletionTimestamp) return;
    const uid = job.metadata.uid!;
    const status = job.status ??= {};
    const conditions: Array<{ type: string; status: string }> = status.conditions ??= [];
    const has = (type: string) => conditions.some((c) => c.type === type && c.status === "True");
    if (has("Complete") || has("Failed")) return;
    if (job.spec.suspend) return;
    const update = () => this.store.update("jobs", job);

    if (!status.startTime) {
      status.startTime = now();
      status.active = 0;
      status.ready = 0;
      status.terminating = 0;
      status.uncountedTerminatedPods = {};
      const deadline = job.spec.activeDeadlineSeconds;
      if (typeof deadline === "number") {
        this.#later(deadline * 1000, () => {
          this.#overdue.add(uid);
          this.syncJob(namespace, name);
        });
      }
      update();
    }
    const pods = this.#ownedBy("pods", uid);
    const terminal = (pod: KubeObject) =>
      pod.status?.phase === "Succeeded" || pod.status?.phase === "Failed";
    const active = pods.filter((pod) => !terminal(pod) && !pod.metadata.deletionTimestamp);
    const terminating = pods.filter((pod) => !terminal(pod) && pod.metadata.deletionTimestamp);
    const counted = this.#counted.get(uid) ?? new Set<string>();
    this.#counted.set(uid, counted);
    let failJob: { reason: string; message: string } | undefined;
    for (const pod of pods) {
      if (pod.status?.phase !== "Failed" || counted.has(pod.metadata.uid!)) continue;
      counted.add(pod.metadata.uid!);
      const action = podFailureAction(job, pod);
      if (action.action === "Ignore") continue;
      if (action.action === "FailJob") {
        failJob = { reason: "PodFailurePolicy", message: action.message };
        continue;
      }
      status.failed = (status.failed ?? 0) + 1;
    }
    const succeeded = pods.filter((pod) => pod.status?.phase === "Succeeded").length;
    const previous = JSON.stringify([
      status.active,
      status.failed,
      status.succeeded,
      status.terminating,
    ]);
    status.active = active.length;
    status.terminating = terminating.length;
    if (succeeded > 0) status.succeeded = succeeded;
    if (
      JSON.stringify([status.active, status.failed, status.succeeded, status.terminating]) !==
        previous
    ) {
      update();
    }

    const target = conditions.find((c) => c.type === "FailureTarget" && c.status === "True") as
      | { reason?: string; message?: string }
      | undefined;
    if (!target) {
      if (failJob === undefined && (status.failed ?? 0) > job.spec.backoffLimit) {
        failJob = {
          reason: "BackoffLimitExceeded",
          message: "Job has reached the specified backoff limit",
        };
      }
      if (failJob === undefined && this.#overdue.has(uid)) {
        failJob = {
          reason: "DeadlineExceeded",
          message: "Job was active longer than specified deadline",
        };
      }
      if (failJob) {
        conditions.push(condition("FailureTarget", "True", failJob.reason, failJob.message));
        update();
        for (const pod of active) this.deletePod(pod, pod.spec?.terminationGracePeriodSeconds);
        this.syncJob(namespace, name);
        return;
      }
    } else {
      if (active.length > 0 || terminating.length > 0) return;
      conditions.push(condition("Failed", "True", target.reason, target.message));
      status.active = 0;
      update();
      this.#finished(job);
      return;
    }

    if (succeeded > 0) {
      if (!has("SuccessCriteriaMet")) {
        conditions.push(
          condition(
            "SuccessCriteriaMet",
            "True",
            "CompletionsReached",
            "Reached expected number of succeeded pods",
          ),
        );
        update();
      }
      if (active.length > 0 || terminating.length > 0) return;
      conditions.push(
        condition(
          "Complete",
          "True",
          "CompletionsReached",
          "Reached expected number of succeeded pods",
        ),
      );
      status.completionTime = now();
      update();
      this.#finished(job);
      return;
    }
    if (active.length === 0 && terminating.length === 0) this.#createJobPod(job);
  }

  #finished(job: KubeObject): void {
    const ttl = job.spec.ttlSecondsAfterFinished;
    if (typeof ttl !== "number") return;
    this.#later(ttl * 1000, () => {
      const current = this.store.get("jobs", job.metadata.namespace, job.metadata.name!);
      if (current && current.metadata.uid === job.metadata.uid) {
        this.deleteObject(current, "Background");
      }
    });
  }

  #createJobPod(job: KubeObject): void {
    const template = structuredClone(job.spec.template);
    const pod: KubeObject = {
      apiVersion: "v1",
      kind: "Pod",
      metadata: {
        name: `${job.metadata.name}-${randomSuffix()}`,
        generateName: `${job.metadata.name}-`,
        namespace: job.metadata.namespace,
        uid: crypto.randomUUID(),
        creationTimestamp: now(),
        labels: template.metadata?.labels ?? {},
        annotations: template.metadata?.annotations,
        ownerReferences: [{
          apiVersion: "batch/v1",
          kind: "Job",
          name: job.metadata.name!,
          uid: job.metadata.uid!,
          controller: true,
          blockOwnerDeletion: true,
        }],
        finalizers: ["batch.kubernetes.io/job-tracking"],
      },
      spec: template.spec,
      status: { phase: "Pending", qosClass: "BestEffort" },
    };
    this.store.create("pods", pod);
    this.#startPod(pod);
  }

  // --- Garbage collection -------------------------------------------------

  /**
   * Deletes an object with a propagation policy, as `DELETE` does:
   * Background removes it now and its dependents after; Foreground removes
   * its dependents first; Orphan strips their owner references.
   */
  deleteObject(
    object: KubeObject,
    policy: "Background" | "Foreground" | "Orphan",
  ): KubeObject | undefined {
    if (object.kind === "Pod") return this.deletePod(object);
    const resource = RESOURCES[object.kind];
    const uid = object.metadata.uid!;
    if (policy === "Orphan") {
      for (const dependentResource of Object.values(RESOURCES)) {
        for (const dependent of this.#ownedBy(dependentResource, uid)) {
          dependent.metadata.ownerReferences = dependent.metadata.ownerReferences!.filter((owner) =>
            owner.uid !== uid
          );
          this.store.update(dependentResource, dependent);
        }
      }
      return this.store.remove(resource, object.metadata.namespace, object.metadata.name!);
    }
    if (policy === "Foreground") {
      object.metadata.deletionTimestamp = now();
      object.metadata.finalizers = [...(object.metadata.finalizers ?? []), "foregroundDeletion"];
      const marked = this.store.update(resource, object);
      const dependents = this.#deleteDependents(uid);
      dependents.then(() => {
        const current = this.store.get(resource, object.metadata.namespace, object.metadata.name!);
        if (current?.metadata.uid === uid) {
          this.store.remove(resource, object.metadata.namespace, object.metadata.name!);
        }
      });
      return marked;
    }
    const removed = this.store.remove(resource, object.metadata.namespace, object.metadata.name!);
    queueMicrotask(() => this.#deleteDependents(uid));
    return removed;
  }

  async #deleteDependents(uid: string): Promise<void> {
    const waits: Promise<unknown>[] = [];
    for (const resource of Object.values(RESOURCES)) {
      for (const dependent of this.#ownedBy(resource, uid)) {
        if (dependent.kind === "Pod") {
          this.deletePod(dependent);
          waits.push(this.#runs.get(dependent.metadata.uid!)?.done ?? Promise.resolve());
        } else {
          this.deleteObject(dependent, "Background");
        }
      }
    }
    await Promise.all(waits);
  }

  /** A dependent created after its owner is gone is collected (the GC's orphan sweep). */
  #collectIfOrphaned(object: KubeObject): void {
    const owners = object.metadata.ownerReferences ?? [];
    if (owners.length === 0) return;
    const alive = (owner: OwnerReference) => {
      const resource = RESOURCES[owner.kind];
      if (!resource) return true;
      const found = this.store.get(resource, object.metadata.namespace, owner.name);
      return found?.metadata.uid === owner.uid;
    };
    if (owners.some(alive)) return;
    const current = this.store.get(
      RESOURCES[object.kind],
      object.metadata.namespace,
      object.metadata.name!,
    );
    if (current) this.deleteObject(current, "Background");
  }

  // --- The kubelet --------------------------------------------------------

  /** Marks a pod for deletion and has the kubelet stop it; the object goes once its containers are gone. */
  deletePod(pod: KubeObject, graceSeconds?: number): KubeObject | undefined {
    const current = this.store.get("pods", pod.metadata.namespace, pod.metadata.name!);
    if (!current || current.metadata.uid !== pod.metadata.uid) return undefined;
    const grace = graceSeconds ?? current.spec?.terminationGracePeriodSeconds ??
      DEFAULT_GRACE_SECONDS;
    if (!current.metadata.deletionTimestamp) {
      current.metadata.deletionTimestamp = now();
      current.metadata.deletionGracePeriodSeconds = grace;
      this.store.update("pods", current);
    }
    const run = this.#runs.get(current.metadata.uid!);
    if (run) {
      run.stopping = { graceSeconds: grace };
      for (const id of run.containers.values()) {
        this.#options.docker.stop(id, grace).catch(() => {});
      }
      run.done.then(() => this.#removePod(current));
    } else {
      this.#removePod(current);
    }
    this.#syncOwner(current);
    return this.store.get("pods", current.metadata.namespace, current.metadata.name!);
  }

  /** Evicts a pod: a `DisruptionTarget` condition, then a graceful delete. */
  evictPod(pod: KubeObject): void {
    const current = this.store.get("pods", pod.metadata.namespace, pod.metadata.name!);
    if (!current) return;
    current.status.conditions = [
      ...(current.status.conditions ?? []),
      condition("DisruptionTarget", "True", "EvictionByEvictionAPI", "Eviction API: evicting"),
    ];
    this.store.update("pods", current);
    this.deletePod(current);
  }

  async #removePod(pod: KubeObject): Promise<void> {
    const current = this.store.get("pods", pod.metadata.namespace, pod.metadata.name!);
    if (!current || current.metadata.uid !== pod.metadata.uid) return;
    if (current.status?.phase !== "Succeeded" && current.status?.phase !== "Failed") {
      current.status.phase = "Failed";
      this.store.update("pods", current);
      this.#syncOwner(current);
    }
    const run = this.#runs.get(pod.metadata.uid!);
    if (run) {
      for (const id of run.containers.values()) {
        await this.#options.docker.remove(id).catch(() => {});
      }
      this.#runs.delete(pod.metadata.uid!);
    }
    await Deno.remove(`${this.#options.volumeRoot}/${pod.metadata.uid}`, { recursive: true }).catch(
      () => {},
    );
    this.store.remove("pods", pod.metadata.namespace, pod.metadata.name!);
    this.#syncOwner(current);
  }

  #syncOwner(pod: KubeObject): void {
    const owner = pod.metadata.ownerReferences?.find((reference) => reference.kind === "Job");
    if (owner) this.syncJob(pod.metadata.namespace!, owner.name);
  }

  #startPod(pod: KubeObject): void {
    const run: PodRun = { containers: new Map(), done: Promise.resolve() };
    this.#runs.set(pod.metadata.uid!, run);
    run.done = this.#runPod(pod, run).catch((error) =>
      console.error(`kube stand-in: pod ${pod.metadata.name}: ${error?.stack ?? error}`)
    );
  }

  /** Applies `change` to the stored pod (if it is still this pod) and stores it. */
  #patchPod(pod: KubeObject, change: (current: KubeObject) => void): KubeObject | undefined {
    const current = this.store.get("pods", pod.metadata.namespace, pod.metadata.name!);
    if (!current || current.metadata.uid !== pod.metadata.uid) return undefined;
    current.status ??= {};
    change(current);
    const stored = this.store.update("pods", current);
    this.#syncOwner(stored);
    return stored;
  }

  async #runPod(pod: KubeObject, run: PodRun): Promise<void> {
    const spec = pod.spec;
    const selector: Record<string, string> = spec.nodeSelector ?? {};
    const unmatched = Object.entries(selector).some(([key, value]) =>
      this.#options.nodeLabels[key] !== value
    );
    if (unmatched) {
      this.#patchPod(pod, (current) => {
        current.status.conditions = [
          condition(
            "PodScheduled",
            "False",
            "Unschedulable",
            "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. " +
              "preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling.",
          ),
        ];
      });
      return;
    }
    const initContainers: Array<Record<string, unknown>> = spec.initContainers ?? [];
    const containers: Array<Record<string, unknown>> = spec.containers ?? [];
    const waiting = (reason: string) => ({ waiting: { reason } });
    const statusOf = (container: Record<string, unknown>, state: unknown) => ({
      name: container.name,
      image: container.image,
      imageID: "",
      ready: false,
      restartCount: 0,
      started: false,
      state,
      lastState: {},
    });
    this.#patchPod(pod, (current) => {
      current.spec.nodeName = this.#options.nodeName;
      current.status = {
        phase: "Pending",
        conditions: [
          condition("PodReadyToStartContainers", "True"),
          condition("Initialized", initContainers.length > 0 ? "False" : "True"),
          condition("Ready", "False", "ContainersNotReady"),
          condition("ContainersReady", "False", "ContainersNotReady"),
          condition("PodScheduled", "True"),
        ],
        hostIP: "127.0.0.1",
        podIP: "127.0.0.1",
        startTime: now(),
        qosClass: current.status?.qosClass ?? "BestEffort",
        ...(initContainers.length > 0
          ? {
            initContainerStatuses: initContainers.map((c) =>
              statusOf(c, waiting("PodInitializing"))
            ),
          }
          : {}),
        containerStatuses: containers.map((c) =>
          statusOf(c, waiting(initContainers.length > 0 ? "PodInitializing" : "ContainerCreating"))
        ),
      };
    });
    const volumeDir = `${this.#options.volumeRoot}/${pod.metadata.uid}`;
    await Deno.mkdir(volumeDir, { recursive: true });
    for (const volume of spec.volumes ?? []) {
      await Deno.mkdir(`${volumeDir}/${volume.name}`, { recursive: true, mode: 0o777 });
      await Deno.chmod(`${volumeDir}/${volume.name}`, 0o777);
    }

    for (let index = 0; index < initContainers.length; index++) {
      const exit = await this.#runContainer(
        pod,
        run,
        initContainers[index],
        "initContainerStatuses",
        index,
      );
      if (exit === undefined) return;
      if (exit !== 0) {
        this.#patchPod(pod, (current) => {
          current.status.phase = "Failed";
          for (const status of current.status.containerStatuses) {
            status.state = { terminated: { exitCode: 137, reason: "ContainerStatusUnknown" } };
          }
        });
        return;
      }
    }
    if (initContainers.length > 0) {
      this.#patchPod(pod, (current) => {
        for (const c of current.status.conditions) {
          if (c.type === "Initialized") c.status = "True";
        }
        for (const status of current.status.containerStatuses) {
          status.state = waiting("ContainerCreating");
        }
      });
    }
    const exits = await Promise.all(
      containers.map((container, index) =>
        this.#runContainer(pod, run, container, "containerStatuses", index)
      ),
    );
    this.#patchPod(pod, (current) => {
      current.status.phase = exits.every((exit) => exit === 0) ? "Succeeded" : "Failed";
      for (const c of current.status.conditions) {
        if (c.type === "Ready" || c.type === "ContainersReady") {
          c.status = "False";
          c.reason = "PodCompleted";
        }
      }
    });
  }

  /**
   * Runs one container to its end; returns its exit code, or undefined
   * when the pod was deleted before it could start.
   */
  async #runContainer(
    pod: KubeObject,
    run: PodRun,
    container: Record<string, unknown>,
    statusKey: "initContainerStatuses" | "containerStatuses",
    index: number,
  ): Promise<number | undefined> {
    const docker = this.#options.docker;
    const image = String(container.image);
    const setState = (state: unknown, extra: Record<string, unknown> = {}) =>
      this.#patchPod(pod, (current) => {
        const status = current.status[statusKey][index];
        Object.assign(status, extra, { state });
      });
    if (!IMAGE_REFERENCE.test(image)) {
      setState({
        waiting: {
          reason: "InvalidImageName",
          message: `Failed to apply default image tag "${image}": couldn't parse image name ` +
            `"${image}": invalid reference format`,
        },
      });
      return undefined;
    }
    let pulls = 0;
    while (!(await docker.hasImage(image))) {
      if (run.stopping || this.#closed) return undefined;
      pulls++;
      setState({
        waiting: pulls % 2 === 1
          ? {
            reason: "ErrImagePull",
            message: `failed to pull and unpack image "${image}": failed to resolve reference ` +
              `"${image}": pull access denied, repository does not exist or may require ` +
              "authorization: no image registry is reachable from this stand-in",
          }
          : { reason: "ImagePullBackOff", message: `Back-off pulling image "${image}"` },
      });
      await new Promise((resolve) => setTimeout(resolve, RETRY_MS * 4));
    }
    let env: string[];
    for (;;) {
      if (run.stopping || this.#closed) return undefined;
      try {
        env = this.#containerEnv(pod, container);
        break;
      } catch (error) {
        setState({
          waiting: { reason: "CreateContainerConfigError", message: (error as Error).message },
        });
        await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
      }
    }
    const volumeDir = `${this.#options.volumeRoot}/${pod.metadata.uid}`;
    const mounts = ((container.volumeMounts ?? []) as Array<Record<string, unknown>>).map((
      mount,
    ) => ({
      Type: "bind" as const,
      Source: `${volumeDir}/${mount.name}`,
      Target: String(mount.mountPath),
      ReadOnly: mount.readOnly === true,
    }));
    const resources = (container.resources ?? {}) as { limits?: Record<string, string> };
    const memory = resources.limits?.memory
      ? Math.floor(parseQuantity(resources.limits.memory))
      : undefined;
    const cpu = resources.limits?.cpu ? parseQuantity(resources.limits.cpu) : undefined;
    const security = (container.securityContext ?? pod.spec.securityContext ?? {}) as {
      runAsUser?: number;
    };
    const id = await docker.create(
      `k8s_${container.name}_${pod.metadata.name}_${pod.metadata.namespace}_${pod.metadata.uid}_0`,
      {
        Image: image,
        ...(Array.isArray(container.command)
          ? { Entrypoint: container.command as string[], Cmd: null }
          : {}),
        ...(Array.isArray(container.args) ? { Cmd: container.args as string[] } : {}),
        Env: env,
        WorkingDir: typeof container.workingDir === "string" ? container.workingDir : undefined,
        User: security.runAsUser !== undefined ? String(security.runAsUser) : undefined,
        Labels: {
          [INSTANCE_LABEL]: this.#options.instanceId,
          "io.kubernetes.pod.name": pod.metadata.name!,
          "io.kubernetes.pod.namespace": pod.metadata.namespace!,
          "io.kubernetes.pod.uid": pod.metadata.uid!,
          "io.kubernetes.container.name": String(container.name),
        },
        HostConfig: {
          NetworkMode: this.#options.networkMode,
          Mounts: mounts,
          ...(memory ? { Memory: memory, MemorySwap: memory } : {}),
          ...(cpu ? { NanoCpus: Math.round(cpu * 1e9) } : {}),
        },
      },
    );
    run.containers.set(String(container.name), id);
    if (run.stopping) return undefined;
    try {
      await docker.start(id);
    } catch (error) {
      setState({
        terminated: {
          exitCode: 128,
          reason: "StartError",
          message: error instanceof DockerError ? error.message : String(error),
          containerID: `docker://${id}`,
        },
      });
      return 128;
    }
    const started = await docker.inspect(id);
    this.#patchPod(pod, (current) => {
      Object.assign(current.status[statusKey][index], {
        state: { running: { startedAt: started.State.StartedAt.replace(/\.\d+Z$/, "Z") } },
        containerID: `docker://${id}`,
        imageID: `docker-pullable://${image}`,
        started: true,
        ready: statusKey === "containerStatuses",
      });
      if (statusKey === "containerStatuses" && current.status.phase === "Pending") {
        current.status.phase = "Running";
        for (const c of current.status.conditions ?? []) {
          if (c.type === "Ready" || c.type === "ContainersReady") {
            c.status = "True";
            delete c.reason;
          }
        }
      }
    });
    const exitCode = await docker.waitExit(id);
    let ended = await docker.inspect(id);
    // Docker learns of an OOM kill from a cgroup event that may come after the
    // exit: a SIGKILL under a memory limit that no deletion sent is looked at
    // again, then taken for what the kernel did (as containerd reports it).
    const suspect = exitCode === 137 && memory !== undefined && !run.stopping;
    for (let look = 0; suspect && !ended.State.OOMKilled && look < 5; look++) {
      await new Promise((resolve) => setTimeout(resolve, 50));
      ended = await docker.inspect(id);
    }
    const oomKilled = ended.State.OOMKilled || suspect;
    setState({
      terminated: {
        exitCode,
        reason: oomKilled ? "OOMKilled" : exitCode === 0 ? "Completed" : "Error",
        startedAt: ended.State.StartedAt.replace(/\.\d+Z$/, "Z"),
        finishedAt: ended.State.FinishedAt.replace(/\.\d+Z$/, "Z"),
        containerID: `docker://${id}`,
      },
    }, { ready: false, started: false });
    return exitCode;
  }

  /** The container's environment, secret references resolved (throws as the kubelet reports). */
  #containerEnv(pod: KubeObject, container: Record<string, unknown>): string[] {
    const namespace = pod.metadata.namespace;
    const env: string[] = [];
    const secretOf = (name: string) => {
      const secret = this.store.get("secrets", namespace, name);
      if (!secret) throw new Error(`secret "${name}" not found`);
      return secret;
    };
    for (const source of (container.envFrom ?? []) as Array<Record<string, { name: string }>>) {
      if (!source.secretRef) continue;
      for (const [key, value] of Object.entries(secretOf(source.secretRef.name).data ?? {})) {
        env.push(`${key}=${decodeBase64(String(value))}`);
      }
    }
    for (const variable of (container.env ?? []) as Array<Record<string, unknown>>) {
      const name = String(variable.name);
      if (typeof variable.value === "string") {
        env.push(`${name}=${variable.value}`);
        continue;
      }
      const from = variable.valueFrom as Record<string, Record<string, unknown>> | undefined;
      if (from?.secretKeyRef) {
        const secret = secretOf(String(from.secretKeyRef.name));
        const data = secret.data as Record<string, string> | undefined;
        const value = data?.[String(from.secretKeyRef.key)];
        if (value === undefined) {
          throw new Error(
            `couldn't find key ${from.secretKeyRef.key} in Secret ${namespace}/${from.secretKeyRef.name}`,
          );
        }
        env.push(`${name}=${decodeBase64(value)}`);
      } else if (from?.fieldRef) {
        const path = String(from.fieldRef.fieldPath);
        const fields: Record<string, string | undefined> = {
          "metadata.name": pod.metadata.name,
          "metadata.namespace": pod.metadata.namespace,
          "metadata.uid": pod.metadata.uid,
          "spec.nodeName": this.#options.nodeName,
          "status.podIP": "127.0.0.1",
        };
        env.push(`${name}=${fields[path] ?? ""}`);
      } else {
        env.push(`${name}=`);
      }
    }
    return env;
  }

  /** The Docker container of a pod's container, once it was created. */
  containerId(pod: KubeObject, container: string): string | undefined {
    const run = this.#runs.get(pod.metadata.uid!);
    const fromRun = run?.containers.get(container);
    if (fromRun) return fromRun;
    for (const key of ["initContainerStatuses", "containerStatuses"]) {
      for (const status of pod.status?.[key] ?? []) {
        if (status.name === container && typeof status.containerID === "string") {
          return status.containerID.replace(/^docker:\/\//, "");
        }
      }
    }
    return undefined;
  }

  get docker(): DockerEngine {
    return this.#options.docker;
  }

  /** Stops every pod (their containers removed) and every timer. */
  async close(): Promise<void> {
    this.#closed = true;
    for (const timer of this.#timers) clearTimeout(timer);
    const docker = this.#options.docker;
    for (const run of this.#runs.values()) run.stopping = { graceSeconds: 0 };
    const ids = await docker.containersLabelled(`${INSTANCE_LABEL}=${this.#options.instanceId}`)
      .catch(() => [] as string[]);
    await Promise.all(ids.map((id) => docker.remove(id).catch(() => {})));
    await Promise.all([...this.#runs.values()].map((run) => run.done));
    await Deno.remove(this.#options.volumeRoot, { recursive: true }).catch(() => {});
  }
}

/** What a Job's podFailurePolicy says about a failed pod (`Count` when no rule matches). */
function podFailureAction(job: KubeObject, pod: KubeObject): { action: string; message: string } {
  const rules = job.spec.podFailurePolicy?.rules ?? [];
  for (const [index, rule] of rules.entries()) {
    if (rule.onPodConditions) {
      const matched = rule.onPodConditions.some((pattern: { type: string; status?: string }) =>
        (pod.status?.conditions ?? []).some((c: { type: string; status: string }) =>
          c.type === pattern.type && c.status === (pattern.status ?? "True")
        )
      );
      if (matched) {
        return {
          action: rule.action,
          message: `Pod ${pod.metadata.namespace}/${pod.metadata.name} has condition ${
            rule.onPodConditions[0].type
          } matching ${rule.action} rule at index ${index}`,
        };
      }
    }
    if (rule.onExitCodes) {
      const { containerName, operator, values } = rule.onExitCodes;
      for (const status of pod.status?.containerStatuses ?? []) {
        if (containerName && status.name !== containerName) continue;
        const code = status.state?.terminated?.exitCode;
        if (code === undefined || code === 0) continue;
        const inValues = values.includes(code);
        if ((operator === "In") === inValues) {
          return {
            action: rule.action,
            message:
              `Container ${status.name} for pod ${pod.metadata.namespace}/${pod.metadata.name} failed with exit code ${code} matching ${rule.action} rule at index ${index}`,
          };
        }
      }
    }
  }
  return { action: "Count", message: "" };
}

function decodeBase64(text: string): string {
  return new TextDecoder().decode(Uint8Array.from(atob(text), (char) => char.charCodeAt(0)));
}
