/**
 * One shared informer per (namespace, agent): a list, then a watch from
 * its resource version, of the Jobs and of the Pods runnel started for
 * this agent, kept in a cache that every attempt of the backend reads.
 * However many steps run, that is two long-lived watches, not a poll per
 * step. A watch that ends is resumed from the last version seen (bookmarks
 * keep it fresh); one answered `410 Expired` re-lists and resumes, telling
 * subscribers what changed meanwhile (deletions included).
 *
 * @module
 */

import { backoffMs, type KubeApi, KubeApiError, lines, sleep } from "./_api.ts";

/** Seconds a watch asks to stay open before it is renewed. */
const WATCH_TIMEOUT_SECONDS = 290;

/** The part of an object the backend reads. */
export interface KubeObject {
  apiVersion?: string;
  kind?: string;
  metadata: {
    name: string;
    namespace?: string;
    uid: string;
    resourceVersion?: string;
    creationTimestamp?: string;
    deletionTimestamp?: string;
    labels?: Record<string, string>;
    annotations?: Record<string, string>;
  };
  // deno-lint-ignore no-explicit-any
  spec?: any;
  // deno-lint-ignore no-explicit-any
  status?: any;
}

/** What changed for one Job: its latest state and its pods' (undefined once deleted). */
export interface JobView {
  job?: KubeObject;
  /** The Job was seen and is gone. */
  jobDeleted: boolean;
  pods: KubeObject[];
}

type Listener = (view: JobView) => void;

/** Which Job a pod belongs to (its `job-name` label). */
const JOB_NAME_LABEL = "batch.kubernetes.io/job-name";

interface ResourceLoop {
  plural: "jobs" | "pods";
  path: string;
  cache: Map<string, KubeObject>;
  synced: PromiseWithResolvers<void>;
}

/** The shared informer of one namespace and label selector. */
export class JobInformer {
  readonly #api: KubeApi;
  readonly #selector: string;
  readonly #listeners = new Map<string, Set<Listener>>();
  readonly #loops: ResourceLoop[];
  readonly #seenJobs = new Set<string>();
  #abort: AbortController | undefined;
  #running: Promise<unknown> | undefined;
  /** Restarts after a 410, for tests and the benchmark. */
  relists = 0;

  constructor(api: KubeApi, namespace: string, selector: string) {
    this.#api = api;
    this.#selector = selector;
    const ns = encodeURIComponent(namespace);
    this.#loops = [
      {
        plural: "jobs",
        path: `/apis/batch/v1/namespaces/${ns}/jobs`,
        cache: new Map(),
        synced: Promise.withResolvers(),
      },
      {
        plural: "pods",
        path: `/api/v1/namespaces/${ns}/pods`,
        cache: new Map(),
        synced: Promise.withResolvers(),
      },
    ];
  }

  /**
   * Calls `listener` with the Job's view now (once the caches are synced)
   * and after every change; returns the unsubscribe function. The watches
   * run while anyone listens.
   */
  subscribe(jobName: string, listener: Listener): () => void {
    let set = this.#listeners.get(jobName);
    if (!set) this.#listeners.set(jobName, set = new Set());
    set.add(listener);
    this.#start();
    Promise.all(this.#loops.map((loop) => loop.synced.promise)).then(() => {
      if (set!.has(listener)) listener(this.view(jobName));
    }, () => {});
    return () => {
      set!.delete(listener);
      if (set!.size === 0) this.#listeners.delete(jobName);
      if (this.#listeners.size === 0) this.#stop();
    };
  }

  /** The cached view of a Job. */
  view(jobName: string): JobView {
    const [jobs, pods] = this.#loops;
    const job = [...jobs.cache.values()].find((candidate) => candidate.metadata.name === jobName);
    return {
      job,
      jobDeleted: !job && this.#seenJobs.has(jobName),
      pods: [...pods.cache.values()]
        .filter((pod) => pod.metadata.labels?.[JOB_NAME_LABEL] === jobName)
        .sort((a, b) =>
          (a.metadata.creationTimestamp ?? "").localeCompare(b.metadata.creationTimestamp ?? "")
        ),
    };
  }

  #notify(jobName: string | undefined): void {
    if (!jobName) return;
    const set = this.#listeners.get(jobName);
    if (!set) return;
    const view = this.view(jobName);
    for (const listener of [...set]) listener(view);
  }

  #jobNameOf(loop: ResourceLoop, object: KubeObject): string | undefined {
    return loop.plural === "jobs" ? object.metadata.name : object.metadata.labels?.[JOB_NAME_LABEL];
  }

  #start(): void {
    if (this.#abort) return;
    const abort = this.#abort = new AbortController();
    for (const loop of this.#loops) loop.synced = Promise.withResolvers();
    this.#running = Promise.all(this.#loops.map((loop) => this.#run(loop, abort.signal)));
  }

  #stop(): void {
    this.#abort?.abort();
    this.#abort = undefined;
  }

  /** Stops the watches (pending subscribers get nothing more). */
  async close(): Promise<void> {
    this.#listeners.clear();
    this.#stop();
    await this.#running?.catch(() => {});
  }

  /** Lists into the cache, telling subscribers of what changed; returns the list's version. */
  async #list(loop: ResourceLoop, signal: AbortSignal): Promise<string> {
    const list = await this.#api.request<
      { metadata: { resourceVersion: string }; items: KubeObject[] }
    >(
      "GET",
      loop.path,
      { query: { labelSelector: this.#selector }, signal },
    );
    const fresh = new Map(list.items.map((item) => [item.metadata.uid, item]));
    const changed = new Set<string | undefined>();
    for (const [uid, old] of loop.cache) {
      if (!fresh.has(uid)) changed.add(this.#jobNameOf(loop, old));
    }
    for (const [uid, item] of fresh) {
      if (loop.cache.get(uid)?.metadata.resourceVersion !== item.metadata.resourceVersion) {
        changed.add(this.#jobNameOf(loop, item));
      }
      if (loop.plural === "jobs") this.#seenJobs.add(item.metadata.name);
    }
    loop.cache.clear();
    for (const [uid, item] of fresh) loop.cache.set(uid, item);
    loop.synced.resolve();
    for (const name of changed) this.#notify(name);
    return list.metadata.resourceVersion;
  }

  async #run(loop: ResourceLoop, signal: AbortSignal): Promise<void> {
    let version: string | undefined;
    let failures = 0;
    let expired = 0;
    while (!signal.aborted) {
      try {
        version ??= await this.#list(loop, signal);
        const response = await this.#api.stream(loop.path, {
          query: {
            watch: "true",
            labelSelector: this.#selector,
            resourceVersion: version,
            allowWatchBookmarks: "true",
            timeoutSeconds: String(WATCH_TIMEOUT_SECONDS),
          },
          signal,
        });
        let received = 0;
        for await (const line of lines(response.body!)) {
          if (line.trim() === "") continue;
          const event = JSON.parse(line) as {
            type: string;
            object: KubeObject & { code?: number };
          };
          if (event.type === "ERROR") {
            if (event.object.code === 410) {
              // Expired: history no longer holds our version; list again.
              version = undefined;
              this.relists++;
            }
            expired++;
            break;
          }
          expired = 0;
          failures = 0;
          received++;
          version = event.object.metadata.resourceVersion ?? version;
          if (event.type === "BOOKMARK") continue;
          const object = event.object;
          if (event.type === "DELETED") loop.cache.delete(object.metadata.uid);
          else loop.cache.set(object.metadata.uid, object);
          if (loop.plural === "jobs") this.#seenJobs.add(object.metadata.name);
          this.#notify(this.#jobNameOf(loop, object));
        }
        // A watch that ends at once, again and again, is resumed with back-off.
        if (received === 0 && expired === 0) {
          await sleep(backoffMs(++failures), signal).catch(() => {});
        }
      } catch (error) {
        if (signal.aborted) return;
        if (error instanceof KubeApiError && error.status === 410) {
          version = undefined;
          this.relists++;
          expired++;
        } else {
          failures++;
          await sleep(backoffMs(failures), signal).catch(() => {});
          continue;
        }
      }
      // A server that keeps answering 410 is not hammered with lists.
      if (expired > 1) await sleep(backoffMs(expired - 1), signal).catch(() => {});
    }
  }
}
