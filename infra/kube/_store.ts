/**
 * The stand-in's object store: what etcd and the apiserver's watch cache
 * are to a real cluster. Every change gets the next resource version; the
 * last {@link HISTORY_LIMIT} changes are kept so that a watch can resume
 * from a version, and a watch from an older version is told `410 Expired`
 * (as after an etcd compaction).
 *
 * @module
 */

/** Object metadata, as far as the stand-in reads or writes it. */
export interface ObjectMeta {
  name?: string;
  generateName?: string;
  namespace?: string;
  uid?: string;
  resourceVersion?: string;
  creationTimestamp?: string;
  deletionTimestamp?: string;
  deletionGracePeriodSeconds?: number;
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
  ownerReferences?: OwnerReference[];
  finalizers?: string[];
  [key: string]: unknown;
}

/** `metav1.OwnerReference`. */
export interface OwnerReference {
  apiVersion: string;
  kind: string;
  name: string;
  uid: string;
  controller?: boolean;
  blockOwnerDeletion?: boolean;
}

/** Any API object. */
export interface KubeObject {
  apiVersion: string;
  kind: string;
  metadata: ObjectMeta;
  // deno-lint-ignore no-explicit-any
  spec?: any;
  // deno-lint-ignore no-explicit-any
  status?: any;
  [key: string]: unknown;
}

/** A watch event as the API streams it. */
export interface WatchEvent {
  type: "ADDED" | "MODIFIED" | "DELETED" | "BOOKMARK" | "ERROR";
  object: KubeObject;
}

/** How many changes are kept for watches to resume from (the apiserver's watch cache is ~100/resource). */
export const HISTORY_LIMIT = 2_000;

interface Change {
  resourceVersion: number;
  resource: string;
  event: WatchEvent;
}

/** A filter on objects (namespace, label and field selectors). */
export type ObjectFilter = (object: KubeObject) => boolean;

/** A live subscription to changes of one resource. */
export interface Subscription {
  resource: string;
  filter: ObjectFilter;
  send(event: WatchEvent): void;
}

/** The resource version is older than what history keeps. */
export class ExpiredError extends Error {
  constructor(requested: number, oldest: number) {
    super(`too old resource version: ${requested} (${oldest})`);
    this.name = "ExpiredError";
  }
}

/** The objects of every resource, their history and their watchers. */
export class ObjectStore {
  #version = 1;
  #objects = new Map<string, Map<string, KubeObject>>();
  #history: Change[] = [];
  /** Oldest version a watch may resume from. */
  #oldest = 1;
  #subscribers = new Set<Subscription>();

  /** The current resource version. */
  get version(): number {
    return this.#version;
  }

  #bucket(resource: string): Map<string, KubeObject> {
    let bucket = this.#objects.get(resource);
    if (!bucket) this.#objects.set(resource, bucket = new Map());
    return bucket;
  }

  /** The stored object, a deep copy (callers may change it). */
  get(resource: string, namespace: string | undefined, name: string): KubeObject | undefined {
    const object = this.#bucket(resource).get(key(namespace, name));
    return object ? structuredClone(object) : undefined;
  }

  /** Objects of a resource that pass `filter`, with the version they were read at. */
  list(resource: string, filter: ObjectFilter): { items: KubeObject[]; resourceVersion: number } {
    const items = [...this.#bucket(resource).values()].filter(filter).map((object) =>
      structuredClone(object)
    );
    items.sort((a, b) =>
      `${a.metadata.namespace}/${a.metadata.name}`.localeCompare(
        `${b.metadata.namespace}/${b.metadata.name}`,
      )
    );
    return { items, resourceVersion: this.#version };
  }

  /** Stores a new object (its name must be free). */
  create(resource: string, object: KubeObject): KubeObject {
    return this.#write(resource, object, "ADDED");
  }

  /** Replaces a stored object. */
  update(resource: string, object: KubeObject): KubeObject {
    return this.#write(resource, object, "MODIFIED");
  }

  /** Removes an object; returns its last state, or undefined when there was none. */
  remove(resource: string, namespace: string | undefined, name: string): KubeObject | undefined {
    const bucket = this.#bucket(resource);
    const existing = bucket.get(key(namespace, name));
    if (!existing) return undefined;
    bucket.delete(key(namespace, name));
    const last = structuredClone(existing);
    last.metadata.resourceVersion = String(++this.#version);
    this.#record(resource, { type: "DELETED", object: last });
    return structuredClone(last);
  }

  #write(resource: string, object: KubeObject, type: "ADDED" | "MODIFIED"): KubeObject {
    const stored = structuredClone(object);
    stored.metadata.resourceVersion = String(++this.#version);
    this.#bucket(resource).set(key(stored.metadata.namespace, stored.metadata.name!), stored);
    this.#record(resource, { type, object: structuredClone(stored) });
    return structuredClone(stored);
  }

  #record(resource: string, event: WatchEvent): void {
    this.#history.push({ resourceVersion: this.#version, resource, event });
    if (this.#history.length > HISTORY_LIMIT) {
      const dropped = this.#history.splice(0, this.#history.length - HISTORY_LIMIT);
      this.#oldest = dropped[dropped.length - 1].resourceVersion;
    }
    for (const subscriber of this.#subscribers) {
      if (subscriber.resource === resource && subscriber.filter(event.object)) {
        subscriber.send(structuredClone(event));
      }
    }
  }

  /**
   * Subscribes to changes after `fromVersion` (replayed from history first),
   * or, without one, to the current objects as `ADDED` and then changes.
   * Throws {@link ExpiredError} for a version history no longer holds.
   */
  watch(subscription: Subscription, fromVersion?: number): () => void {
    if (fromVersion === undefined) {
      for (const object of this.list(subscription.resource, subscription.filter).items) {
        subscription.send({ type: "ADDED", object });
      }
    } else {
      if (fromVersion < this.#oldest) throw new ExpiredError(fromVersion, this.#oldest);
      for (const change of this.#history) {
        if (
          change.resourceVersion > fromVersion && change.resource === subscription.resource &&
          subscription.filter(change.event.object)
        ) {
          subscription.send(structuredClone(change.event));
        }
      }
    }
    this.#subscribers.add(subscription);
    return () => this.#subscribers.delete(subscription);
  }

  /** Forgets all history, as an etcd compaction does: every watch from an older version gets 410. */
  compact(): void {
    this.#history = [];
    // A watch from the current version still works: it asks for what comes after.
    this.#oldest = this.#version;
  }

  /**
   * Moves past every version handed out so far and compacts there (a write
   * to an object nobody watches, then a compaction; or an apiserver whose
   * watch cache restarted later): every watch resuming from a version it
   * was given gets 410.
   */
  expire(): void {
    this.#version++;
    this.compact();
  }
}

function key(namespace: string | undefined, name: string): string {
  return `${namespace ?? ""}/${name}`;
}

/**
 * Parses a label selector (`a=b,c!=d,e in (x,y),f notin (z),g,!h`) into a
 * predicate on labels; throws on a malformed one.
 */
export function parseLabelSelector(text: string): (labels: Record<string, string>) => boolean {
  const requirements: Array<(labels: Record<string, string>) => boolean> = [];
  const parts = splitSelector(text);
  for (const raw of parts) {
    const part = raw.trim();
    if (part === "") continue;
    let match: RegExpExecArray | null;
    if ((match = /^([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)$/.exec(part))) {
      const [, name, operator, list] = match;
      const values = new Set(list.split(",").map((value) => value.trim()));
      requirements.push(
        operator === "in"
          ? (labels) => name in labels && values.has(labels[name])
          : (labels) => !(name in labels) || !values.has(labels[name]),
      );
    } else if ((match = /^([\w./-]+)\s*(==|=|!=)\s*([\w.-]*)$/.exec(part))) {
      const [, name, operator, value] = match;
      requirements.push(
        operator === "!=" ? (labels) => labels[name] !== value : (labels) => labels[name] === value,
      );
    } else if ((match = /^!([\w./-]+)$/.exec(part))) {
      const name = match[1];
      requirements.push((labels) => !(name in labels));
    } else if ((match = /^([\w./-]+)$/.exec(part))) {
      const name = match[1];
      requirements.push((labels) => name in labels);
    } else {
      throw new SyntaxError(`unable to parse requirement: "${part}"`);
    }
  }
  return (labels) => requirements.every((requirement) => requirement(labels));
}

/** Splits on commas outside parentheses. */
function splitSelector(text: string): string[] {
  const parts: string[] = [];
  let depth = 0;
  let current = "";
  for (const char of text) {
    if (char === "(") depth++;
    if (char === ")") depth--;
    if (char === "," && depth === 0) {
      parts.push(current);
      current = "";
    } else {
      current += char;
    }
  }
  parts.push(current);
  return parts;
}

/** Parses a field selector (`metadata.name=x,status.phase!=Running`) into a predicate. */
export function parseFieldSelector(text: string): (object: KubeObject) => boolean {
  const requirements: Array<(object: KubeObject) => boolean> = [];
  for (const raw of text.split(",")) {
    const part = raw.trim();
    if (part === "") continue;
    const match = /^([\w.]+)\s*(==|=|!=)\s*(.*)$/.exec(part);
    if (!match) throw new SyntaxError(`invalid selector: '${part}'; can't understand '${part}'`);
    const [, path, operator, value] = match;
    const read = (object: KubeObject) => {
      // deno-lint-ignore no-explicit-any
      let current: any = object;
      for (const segment of path.split(".")) current = current?.[segment];
      return current === undefined || current === null ? "" : String(current);
    };
    requirements.push(
      operator === "!=" ? (object) => read(object) !== value : (object) => read(object) === value,
    );
  }
  return (object) => requirements.every((requirement) => requirement(object));
}
