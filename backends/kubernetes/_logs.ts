/**
 * Follows one container's log (`pods/{pod}/log?follow=true&timestamps=true`)
 * from the moment it runs to its end. Each line carries the kubelet's
 * timestamp; a follow that drops while the container runs is resumed with
 * `sinceTime` (whole seconds, as the API takes it) and the lines already
 * passed on — up to the last timestamp, and as many at that timestamp as
 * were seen — are skipped, so nothing is repeated and nothing is lost.
 * A partial line at a drop is held back (it comes again whole).
 *
 * @module
 */

import { backoffMs, type KubeApi, sleep } from "./_api.ts";
import type { KubeObject } from "./_watch.ts";

/** Longest partial line held back (the kubelet splits lines at 16 KiB). */
const MAX_LINE_CHARS = 1024 * 1024;

/** Options of {@link LogFollower}. */
export interface LogFollowerOptions {
  api: KubeApi;
  namespace: string;
  container: string;
  /** Only lines from this time on (RFC 3339); default the whole log. */
  since?: string;
  /** Receives whole lines (with their `\n`) without their timestamps. */
  push(text: string): void;
  /** Resolves when more may be pushed: the next read waits for it (backpressure). */
  room?(): Promise<void>;
}

/** A timestamp as a key that sorts by time (the API trims trailing zeros of the fraction). */
export function timestampKey(timestamp: string): string | undefined {
  const match = /^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?Z$/.exec(timestamp);
  if (!match) return undefined;
  const seconds = Date.parse(`${match[1]}Z`) / 1000;
  if (!Number.isFinite(seconds)) return undefined;
  return `${String(seconds).padStart(12, "0")}.${(match[2] ?? "").padEnd(9, "0")}`;
}

/** The follow of one container of the latest pod. */
export class LogFollower {
  readonly #options: LogFollowerOptions;
  readonly #abort = new AbortController();
  #pod: string | undefined;
  #terminated = false;
  #running: Promise<void> | undefined;
  #changed = Promise.withResolvers<void>();
  /** Key of the last timestamp passed on, and how many lines carried it. */
  #lastKey = "";
  #atLast = 0;
  #since: string | undefined;

  constructor(options: LogFollowerOptions) {
    this.#options = options;
    this.#since = options.since;
  }

  /** Takes the pod's latest state: starts the follow once the container has run. */
  observe(pod: KubeObject): void {
    const statuses = [
      ...(pod.status?.initContainerStatuses ?? []),
      ...(pod.status?.containerStatuses ?? []),
    ] as Array<{ name: string; state?: { running?: unknown; terminated?: unknown } }>;
    const state = statuses.find((status) => status.name === this.#options.container)?.state;
    if (this.#pod !== undefined && this.#pod !== pod.metadata.name) return;
    if (state?.terminated) this.#terminated = true;
    if (!this.#running && (state?.running || state?.terminated) && !this.#abort.signal.aborted) {
      this.#pod = pod.metadata.name;
      this.#running = this.#run(pod.metadata.name);
    }
    const changed = this.#changed;
    this.#changed = Promise.withResolvers();
    changed.resolve();
  }

  /** Waits up to `drainMs` for the follow to reach the log's end, then stops it. */
  async finish(drainMs: number): Promise<void> {
    if (!this.#running) {
      this.#abort.abort();
      return;
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([
      this.#running,
      new Promise<void>((resolve) => timer = setTimeout(resolve, drainMs)),
    ]);
    clearTimeout(timer);
    this.#abort.abort();
    await this.#running;
  }

  async #run(pod: string): Promise<void> {
    const { api, namespace, container } = this.#options;
    const signal = this.#abort.signal;
    const path = `/api/v1/namespaces/${encodeURIComponent(namespace)}/pods/${
      encodeURIComponent(pod)
    }/log`;
    let failures = 0;
    while (!signal.aborted) {
      try {
        const response = await api.stream(path, {
          query: {
            container,
            follow: "true",
            timestamps: "true",
            ...(this.#since ? { sinceTime: this.#since } : {}),
          },
          signal,
          accept: [400, 404],
        });
        if (response.status === 404) {
          await response.body?.cancel();
          return;
        }
        if (response.status === 400) {
          // Not started yet (or already removed): wait for the pod to change.
          await response.body?.cancel();
          if (this.#terminated) return;
          await Promise.race([this.#changed.promise, sleep(backoffMs(++failures), signal)]);
          continue;
        }
        const terminatedBefore = this.#terminated;
        await this.#consume(response.body!, signal);
        if (terminatedBefore || signal.aborted) return;
        // The follow ended: the container exited (its status may still be on
        // its way) or the stream dropped. Resume from the last timestamp.
        failures++;
        await Promise.race([this.#changed.promise, sleep(backoffMs(failures), signal)]);
      } catch {
        if (signal.aborted) return;
        await sleep(backoffMs(++failures), signal).catch(() => {});
      }
    }
  }

  async #consume(body: ReadableStream<Uint8Array>, signal: AbortSignal): Promise<void> {
    const decoder = new TextDecoder();
    let buffer = "";
    let atLastHere = 0;
    const take = (line: string) => {
      const space = line.indexOf(" ");
      const key = space > 0 ? timestampKey(line.slice(0, space)) : undefined;
      if (key === undefined) {
        this.#options.push(`${line}\n`);
        return;
      }
      if (key < this.#lastKey) return;
      if (key === this.#lastKey) {
        atLastHere++;
        if (atLastHere <= this.#atLast) return;
        this.#atLast++;
      } else {
        this.#lastKey = key;
        this.#atLast = 1;
        atLastHere = 1;
      }
      const timestamp = line.slice(0, space);
      this.#since = `${timestamp.slice(0, 19)}Z`;
      this.#options.push(`${line.slice(space + 1)}\n`);
    };
    const reader = body.getReader();
    const onAbort = () => reader.cancel().catch(() => {});
    signal.addEventListener("abort", onAbort, { once: true });
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let newline: number;
        while ((newline = buffer.indexOf("\n")) >= 0) {
          take(buffer.slice(0, newline));
          buffer = buffer.slice(newline + 1);
        }
        // The kubelet splits long lines; a server that does not must not
        // make this buffer grow without bound.
        if (buffer.length > MAX_LINE_CHARS) {
          take(buffer);
          buffer = "";
        }
        await this.#options.room?.();
      }
    } catch {
      // Dropped: what was whole was taken.
    } finally {
      signal.removeEventListener("abort", onAbort);
    }
    buffer += decoder.decode();
    // A last line without its newline is whole only once the container ended.
    if (buffer !== "" && this.#terminated) take(buffer);
  }
}
