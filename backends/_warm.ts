/**
 * Processes started before their step is known, parked until a backend
 * hands each one step over stdin: the pool the `deno` backend's warm starts
 * (see `deno/_warm.ts`) and the `shell` backend's parked shells (see
 * `shell/_parked.ts`) share.
 *
 * A process runs at most one step, then exits. The pool bounds how many it
 * holds per key, in all, and for how long one may idle; every process it
 * holds is killed by process group on `close`, on its idle timeout, and when
 * the process that started it exits (`unload`). A parked process also exits
 * by itself once its stdin reaches end-of-file (the host that started it is
 * gone).
 *
 * Internal to `backends/`.
 *
 * @module
 */

import type { Execution } from "./backend.ts";
import { KILL_PATHS } from "./_tools.ts";

/** Limits of a {@link WarmPool}. */
export interface WarmPoolOptions {
  /** Processes kept ready per key (default 2). */
  perKey?: number;
  /** Processes kept ready in all (default 4: each is a Deno runtime of ~40 MB). */
  total?: number;
  /** A process not taken for this long is stopped (default 30 s). */
  idleMs?: number;
}

/**
 * Default of {@link WarmPoolOptions.perKey}: steps of one key back to back
 * each find a process that has had two steps' time to start (measured on
 * two cores: about 0.6× a cold start, against 1.1× with one).
 */
export const DEFAULT_WARM_PER_KEY = 2;
/** Default of {@link WarmPoolOptions.total}: two cores' worth of repeated steps, twice. */
export const DEFAULT_WARM_TOTAL = 4;
/** Keys whose steps a pool counts; the least recent is forgotten first. */
const MAX_KEYS_NOTED = 256;

/** Default of {@link WarmPoolOptions.idleMs}: half the plugin host's idle time. */
export const DEFAULT_WARM_IDLE_MS = 30_000;

/** A pre-started process, from spawn to the one step it runs. */
export class WarmProcess<Watch = unknown> {
  /** Resolves once the harness is parked (or the process is gone). */
  readonly parked: Promise<void>;
  #markParked!: () => void;
  #stdin: WritableStream<Uint8Array> | undefined;
  #idleTimer: ReturnType<typeof setTimeout> | undefined;
  #taken = false;
  #exited = false;
  /** The harness read its step. */
  started = false;
  /** The harness refused to run a step it could not make safe. */
  unsafe = false;

  /**
   * Wraps a spawned process; its creator passes the process's marker lines
   * on to {@link onMarker} and binds its execution with {@link bind}.
   */
  constructor(
    readonly key: string,
    /** A directory of the process's own, removed when it stops; none for a process without one. */
    readonly slot: string | undefined,
    readonly pid: number,
    /** What the backend learns from the process's stderr. */
    readonly watch: Watch,
  ) {
    this.parked = new Promise((resolve) => this.#markParked = resolve);
  }

  #execution: Execution | undefined;

  /** The process execution; set once, right after the spawn. */
  get execution(): Execution {
    return this.#execution!;
  }

  /** Binds the spawned execution and its stdin. */
  bind(execution: Execution, stdin: WritableStream<Uint8Array>): void {
    this.#execution = execution;
    this.#stdin = stdin;
    const ended = () => {
      this.#exited = true;
      this.#markParked();
    };
    execution.wait().then(ended, ended);
  }

  /** True while the process may still be handed a step. */
  get usable(): boolean {
    return !this.#taken && !this.#exited && !this.unsafe;
  }

  /** The process is ready for its step (its creator learnt so). */
  markParked(): void {
    this.#markParked();
  }

  /** Takes the process for one step; stops its idle timer. */
  take(): void {
    this.#taken = true;
    this.clearIdle();
  }

  /** Arms the idle timer. */
  armIdle(ms: number, onIdle: () => void): void {
    this.clearIdle();
    const timer = setTimeout(onIdle, ms);
    Deno.unrefTimer(timer);
    this.#idleTimer = timer;
  }

  /** Stops the idle timer. */
  clearIdle(): void {
    if (this.#idleTimer !== undefined) clearTimeout(this.#idleTimer);
    this.#idleTimer = undefined;
  }

  /**
   * Hands the process its step, as `text` on stdin, then ends its stdin: a
   * step reading stdin reads nothing, as from /dev/null. Rejects when it
   * cannot be delivered.
   */
  async send(text: string): Promise<void> {
    const stdin = this.#stdin;
    if (!stdin) throw new Error("Expected a pre-started process with its stdin open");
    this.#stdin = undefined;
    const writer = stdin.getWriter();
    try {
      await writer.write(new TextEncoder().encode(text));
      await writer.close();
    } finally {
      writer.releaseLock();
    }
  }

  /** Ends the process's stdin without a step: a parked harness exits. */
  async closeStdin(): Promise<void> {
    const stdin = this.#stdin;
    this.#stdin = undefined;
    await stdin?.close().catch(() => {});
  }

  /** Kills the process group (by pid) and waits for the process to end. */
  async stop(): Promise<void> {
    this.clearIdle();
    this.#taken = true;
    const stdin = this.#stdin;
    this.#stdin = undefined;
    await stdin?.abort().catch(() => {});
    await this.#execution?.cleanup();
    if (this.slot !== undefined) await Deno.remove(this.slot, { recursive: true }).catch(() => {});
  }
}

/**
 * Pre-started processes by key, bounded per key, in all, and in idle time.
 * {@link take} hands out a process at most once; the backend asks for its
 * replacement with {@link prestart}.
 */
export class WarmPool {
  readonly #perKey: number;
  readonly #total: number;
  readonly #idleMs: number;
  /** Processes not taken yet (starting or parked), by key. */
  readonly #ready = new Map<string, WarmProcess<unknown>[]>();
  /** Launches in flight, by key. */
  readonly #launching = new Map<string, number>();
  readonly #inFlight = new Set<Promise<unknown>>();
  /** Steps seen per recent key, oldest first. */
  readonly #steps = new Map<string, number>();
  #closed = false;
  readonly #onUnload = () => this.killNow();

  /**
   * Builds an empty pool. Until {@link close}, the processes it holds are
   * also killed when this process exits (`Deno.exit` in a plugin host whose
   * runner closed its stdin): they would end by themselves once their
   * stdin closes, but a moment after the runner, which must leave nothing.
   */
  constructor(options: WarmPoolOptions = {}) {
    this.#perKey = options.perKey ?? DEFAULT_WARM_PER_KEY;
    this.#total = options.total ?? DEFAULT_WARM_TOTAL;
    this.#idleMs = options.idleMs ?? DEFAULT_WARM_IDLE_MS;
    globalThis.addEventListener("unload", this.#onUnload);
  }

  /**
   * Kills the process group of every held process at once, synchronously
   * (an `unload` listener cannot wait): by `Deno.kill`, or kill(1) in a
   * host granted only that.
   */
  killNow(): void {
    for (const process of [...this.#ready.values()].flat()) killGroupSync(process.pid);
  }

  /** Processes held now (starting or parked) plus launches in flight. */
  get size(): number {
    let size = 0;
    for (const list of this.#ready.values()) size += list.length;
    for (const count of this.#launching.values()) size += count;
    return size;
  }

  /** Pids of the processes held now, for tests. */
  pids(): number[] {
    return [...this.#ready.values()].flat().map((process) => process.pid);
  }

  /** Resolves once every process held now has ended (killed, say). */
  async ended(): Promise<void> {
    const held = [...this.#ready.values()].flat();
    await Promise.allSettled(held.map((process) => process.execution.wait()));
  }

  /** The keys with processes held now, for tests. */
  keys(): string[] {
    return [...this.#ready.keys()];
  }

  /** A process for `key` not handed out before, or undefined. */
  take<Watch>(key: string): WarmProcess<Watch> | undefined {
    const list = this.#ready.get(key);
    while (list && list.length > 0) {
      const process = list.shift()!;
      if (list.length === 0) this.#ready.delete(key);
      if (process.usable) {
        process.take();
        return process as WarmProcess<Watch>;
      }
      process.stop();
    }
    return undefined;
  }

  /** Records a step of `key` (see {@link prestart}). */
  noteStep(key: string): void {
    const steps = (this.#steps.get(key) ?? 0) + 1;
    this.#steps.delete(key);
    this.#steps.set(key, steps);
    if (this.#steps.size > MAX_KEYS_NOTED) this.#steps.delete(this.#steps.keys().next().value!);
  }

  /**
   * Tops the processes of `key` up in the background, within the total
   * bound; nothing once the pool is closed. A key gets processes only once
   * it repeats: one after its second step, up to the per-key bound after
   * its third. Most keys of a pipeline (a module, its config) run once per
   * run, and a process started for a key that never comes back costs a
   * start-up the machine's other steps pay for.
   */
  prestart<Watch>(key: string, launch: () => Promise<WarmProcess<Watch>>): void {
    const wanted = Math.min(this.#perKey, (this.#steps.get(key) ?? 0) - 1);
    while (!this.#closed) {
      const forKey = (this.#ready.get(key)?.length ?? 0) + (this.#launching.get(key) ?? 0);
      if (forKey >= wanted || this.size >= this.#total) return;
      this.#launchOne(key, launch);
    }
  }

  #launchOne<Watch>(key: string, launch: () => Promise<WarmProcess<Watch>>): void {
    this.#launching.set(key, (this.#launching.get(key) ?? 0) + 1);
    const done = launch().then(
      (process) => {
        if (this.#closed) return process.stop();
        const list = this.#ready.get(key) ?? [];
        list.push(process);
        this.#ready.set(key, list);
        process.armIdle(this.#idleMs, () => this.#drop(process));
        const drop = () => this.#drop(process);
        process.execution.wait().then(drop, drop);
      },
      // A launch that fails leaves the next step of the key to a cold start.
      () => {},
    ).finally(() => {
      const left = (this.#launching.get(key) ?? 1) - 1;
      if (left > 0) this.#launching.set(key, left);
      else this.#launching.delete(key);
      this.#inFlight.delete(done);
    });
    this.#inFlight.add(done);
  }

  /** Resolves once every launch in flight has ended and every held process is parked. */
  async settled(): Promise<void> {
    while (this.#inFlight.size > 0) await Promise.allSettled([...this.#inFlight]);
    await Promise.all([...this.#ready.values()].flat().map((process) => process.parked));
  }

  /** Kills every held process (by process group) and refuses new ones. */
  async close(): Promise<void> {
    this.#closed = true;
    globalThis.removeEventListener("unload", this.#onUnload);
    while (this.#inFlight.size > 0) await Promise.allSettled([...this.#inFlight]);
    const held = [...this.#ready.values()].flat();
    this.#ready.clear();
    await Promise.allSettled(held.map((process) => process.stop()));
  }

  #drop(process: WarmProcess<unknown>): void {
    const list = this.#ready.get(process.key);
    const index = list?.indexOf(process) ?? -1;
    if (index === -1) return;
    list!.splice(index, 1);
    if (list!.length === 0) this.#ready.delete(process.key);
    process.stop();
  }
}

/** Sends SIGKILL to the process group `pgid` and returns without waiting for it to end. */
function killGroupSync(pgid: number): void {
  // Never pid 0 or 1: kill(-1) would signal every process it may.
  if (pgid <= 1) return;
  try {
    Deno.kill(-pgid, "SIGKILL");
    return;
  } catch (error) {
    if (!(error instanceof Deno.errors.NotCapable)) return;
  }
  for (const path of KILL_PATHS) {
    try {
      new Deno.Command(path, {
        args: ["-s", "KILL", "--", `-${pgid}`],
        stdin: "null",
        stdout: "null",
        stderr: "null",
      }).outputSync();
      return;
    } catch {
      // Not there, or not granted: the next one.
    }
  }
}
