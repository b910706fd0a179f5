/**
 * When each agent was last heard from, batched per server. An agent's
 * heartbeat renews its lease (etcd keeps leases out of its key space: a
 * renewal is no write) and is noted here; every half heartbeat interval the
 * server writes one key, `/presence/<server>`, with the last heartbeat of
 * every agent it holds. So 1,000 agents heartbeating every 5 s cost etcd a
 * few writes a second in all instead of 400 puts a second (a claim and a
 * worker key each), and the scheduler, which watches worker keys, is not
 * woken by heartbeats at all.
 *
 * Readers: the liveness check of a connection claim (`identity.ts`: may
 * another process of the agent take over?) and `/cluster-state` ("late").
 * A server that dies leaves its key behind, unchanged: its agents then look
 * silent, as they are to it.
 *
 * @module
 */

import type { Store } from "../../consensus/store.ts";
import { clusterKeys, type WorkerRecord } from "./keys.ts";

/** What `/presence/<server>` holds. */
export interface PresenceRecord {
  server: string;
  /** When it was written (the server's clock). */
  at: number;
  /** Agent id → its last heartbeat (the server's clock). */
  agents: Record<string, number>;
}

/** The heartbeats a server has seen, written in batches. */
export class Presence {
  readonly #store: Store;
  readonly #serverId: string;
  readonly #seen = new Map<string, number>();
  readonly #timer: ReturnType<typeof setInterval>;
  readonly #log: (fields: Record<string, unknown>) => void;
  #dirty = false;
  #writing: Promise<void> = Promise.resolve();

  /** Flushes every half `heartbeatMs`: a live agent never looks silent for two intervals. */
  constructor(
    store: Store,
    options: {
      serverId: string;
      heartbeatMs: number;
      log?: (fields: Record<string, unknown>) => void;
    },
  ) {
    this.#store = store;
    this.#serverId = options.serverId;
    this.#log = options.log ?? (() => {});
    this.#timer = setInterval(() => this.flush(), Math.max(50, options.heartbeatMs / 2));
    Deno.unrefTimer(this.#timer as unknown as number);
  }

  /** Notes a heartbeat of an agent this server holds. */
  seen(agentId: string, at: number): void {
    this.#seen.set(agentId, at);
    this.#dirty = true;
  }

  /** Forgets an agent whose stream ended here. */
  gone(agentId: string): void {
    if (this.#seen.delete(agentId)) this.#dirty = true;
  }

  /** Writes the batch if anything changed since the last write. */
  flush(): Promise<void> {
    if (!this.#dirty) return this.#writing;
    this.#dirty = false;
    const record: PresenceRecord = {
      server: this.#serverId,
      at: Date.now(),
      agents: Object.fromEntries(this.#seen),
    };
    this.#writing = this.#writing.then(() =>
      this.#store.put(clusterKeys.presence(this.#serverId), JSON.stringify(record)).then(
        () => {},
        (error) => {
          this.#dirty = true;
          this.#log({ level: "warn", msg: "presence not written", error: String(error) });
        },
      )
    );
    return this.#writing;
  }

  /** Stops the batches (the key stays: its agents look silent from now on). */
  async close(): Promise<void> {
    clearInterval(this.#timer);
    await this.#writing;
  }
}

/** An agent's last heartbeat as its server last wrote it; undefined when not there. */
export async function lastHeartbeatOf(
  store: Store,
  server: string,
  agentId: string,
): Promise<number | undefined> {
  const kv = await store.get(clusterKeys.presence(server));
  if (!kv) return undefined;
  return (JSON.parse(kv.value) as PresenceRecord).agents[agentId];
}

/** Workers with `lastHeartbeat` brought up to date from their servers' presence. */
export async function withLastHeartbeats(
  store: Store,
  workers: WorkerRecord[],
): Promise<WorkerRecord[]> {
  const { items } = await store.list(clusterKeys.presencePrefix);
  const servers = new Map(
    items.map((kv) => {
      const record = JSON.parse(kv.value) as PresenceRecord;
      return [record.server, record.agents] as const;
    }),
  );
  return workers.map((worker) => {
    const seen = servers.get(worker.server)?.[worker.agentId];
    return seen !== undefined && seen > worker.lastHeartbeat
      ? { ...worker, lastHeartbeat: seen }
      : worker;
  });
}
