/**
 * The conformance suite every {@link Store} engine must pass.
 *
 * Tests never assume where revisions start (an etcd cluster is shared), only
 * how they move. Each test opens its own store through `open` and closes it.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  CompactedError,
  type KeyValue,
  LeaseNotFoundError,
  type Store,
  StoreClosedError,
  type WatchEvent,
} from "./store.ts";

/** Options of {@link storeConformance}. */
export interface ConformanceOptions {
  /**
   * Moves the engine's clock forward (an engine opened with a fake clock).
   * Without it, lease tests wait in real time.
   */
  advanceTime?: (ms: number) => void;
  /** Lease TTL the lease tests use. Default 1000 ms (etcd's floor is seconds). */
  leaseTtlMs?: number;
  /** Deadline for any awaited event. Default 10 s. */
  eventTimeoutMs?: number;
  /** Passed to `Deno.test` for engines whose client keeps sockets open. Default true. */
  sanitize?: boolean;
}

/**
 * Registers the conformance tests for a store engine with `Deno.test`.
 *
 * @example The test module of an engine
 * ```ts
 * import assert from "node:assert/strict";
 * import { storeConformance } from "./conformance.ts";
 * import { openMemoryStore } from "./embedded.ts";
 *
 * // A short lease TTL keeps the lease tests quick on an engine with a real clock.
 * storeConformance("memory", () => Promise.resolve(openMemoryStore()), { leaseTtlMs: 200 });
 *
 * // What only this engine can check sits beside the shared tests.
 * Deno.test("memory: a fresh store is empty", async () => {
 *   const store = openMemoryStore();
 *   assert.equal(await store.get("runs/1"), undefined);
 *   await store.close();
 * });
 * ```
 */
export function storeConformance(
  name: string,
  open: () => Promise<Store>,
  options: ConformanceOptions = {},
): void {
  const ttlMs = options.leaseTtlMs ?? 1000;
  const eventTimeoutMs = options.eventTimeoutMs ?? 10_000;
  const sanitize = options.sanitize ?? true;

  function define(title: string, body: (store: Store) => Promise<void>): void {
    Deno.test({
      name: `${name}: ${title}`,
      sanitizeOps: sanitize,
      sanitizeResources: sanitize,
      fn: async () => {
        const store = await open();
        try {
          await body(store);
        } finally {
          await store.close();
        }
      },
    });
  }

  /** Lets `ms` of the engine's time pass: a fake clock moves, a real one is waited on. */
  async function pass(ms: number): Promise<void> {
    if (options.advanceTime) options.advanceTime(ms);
    else await new Promise((resolve) => setTimeout(resolve, ms));
  }

  /** Opens a watch with a deadline after which it is aborted. */
  function openWatch(store: Store, prefix: string, fromRevision?: number) {
    const controller = new AbortController();
    const iterator = store.watch(prefix, { fromRevision, signal: controller.signal })
      [Symbol.asyncIterator]();
    return {
      /** The next `count` events, failing if they do not come in time. */
      async take(count: number): Promise<WatchEvent[]> {
        const events: WatchEvent[] = [];
        while (events.length < count) {
          let timer: ReturnType<typeof setTimeout> | undefined;
          const timeout = new Promise<never>((_, reject) => {
            timer = setTimeout(() => {
              controller.abort();
              reject(new Error(`Expected ${count} watch events within ${eventTimeoutMs} ms`));
            }, eventTimeoutMs);
          });
          try {
            const next = await Promise.race([iterator.next(), timeout]);
            if (next.done) throw new Error(`Expected ${count} watch events, the watch ended`);
            events.push(next.value);
          } finally {
            clearTimeout(timer);
          }
        }
        return events;
      },
      async close(): Promise<void> {
        controller.abort();
        await iterator.return?.();
      },
    };
  }

  function brief(events: WatchEvent[]) {
    return events.map((event) => [event.type, event.key, event.value, event.revision]);
  }

  define("put, get and delete keep etcd's revisions and versions", async (store) => {
    const start = await store.revision();
    assert.equal(await store.get("a"), undefined);
    const r1 = await store.put("a", "1");
    assert.equal(r1, start + 1);
    assert.deepEqual(await store.get("a"), {
      key: "a",
      value: "1",
      createRevision: r1,
      modRevision: r1,
      version: 1,
    });
    const r2 = await store.put("a", "2");
    assert.equal(r2, r1 + 1);
    const kv = await store.get("a") as KeyValue;
    assert.deepEqual([kv.value, kv.createRevision, kv.modRevision, kv.version], ["2", r1, r2, 2]);
    const r3 = await store.delete("a");
    assert.equal(r3, r2 + 1);
    assert.equal(await store.get("a"), undefined);
    // Deleting an absent key changes nothing, so it consumes no revision.
    assert.equal(await store.delete("a"), r3);
    const r4 = await store.put("a", "3");
    const again = await store.get("a") as KeyValue;
    assert.deepEqual([again.createRevision, again.version], [r4, 1]);
    assert.equal(await store.revision(), r4);
  });

  define("list by prefix pages with limit and startAfter", async (store) => {
    for (const key of ["p/c", "p/a", "q/a", "p/b", "p", "p/d/e"]) await store.put(key, key);
    const all = await store.list("p/");
    assert.deepEqual(all.items.map((kv) => kv.key), ["p/a", "p/b", "p/c", "p/d/e"]);
    assert.equal(all.revision, await store.revision());
    const first = await store.list("p/", { limit: 2 });
    assert.deepEqual(first.items.map((kv) => kv.key), ["p/a", "p/b"]);
    const second = await store.list("p/", { limit: 2, startAfter: "p/b" });
    assert.deepEqual(second.items.map((kv) => kv.key), ["p/c", "p/d/e"]);
    const third = await store.list("p/", { limit: 2, startAfter: "p/d/e" });
    assert.deepEqual(third.items, []);
    assert.deepEqual((await store.list("p/a")).items.map((kv) => kv.value), ["p/a"]);
    assert.deepEqual((await store.list("zz/")).items, []);
  });

  define("txn compares mod, create, version and value, absent keys as 0", async (store) => {
    const r1 = await store.put("k", "v");
    const r2 = await store.put("k", "w");
    const holds = async (compare: Parameters<Store["txn"]>[0]["compare"][number]) =>
      (await store.txn({ compare: [compare], success: [] })).succeeded;
    assert.equal(await holds({ key: "k", target: "mod", op: "==", value: r2 }), true);
    assert.equal(await holds({ key: "k", target: "mod", op: "==", value: r1 }), false);
    assert.equal(await holds({ key: "k", target: "mod", op: ">", value: r1 }), true);
    assert.equal(await holds({ key: "k", target: "create", op: "==", value: r1 }), true);
    assert.equal(await holds({ key: "k", target: "create", op: "<", value: r2 }), true);
    assert.equal(await holds({ key: "k", target: "version", op: "==", value: 2 }), true);
    assert.equal(await holds({ key: "k", target: "version", op: "!=", value: 2 }), false);
    assert.equal(await holds({ key: "k", target: "value", op: "==", value: "w" }), true);
    assert.equal(await holds({ key: "k", target: "value", op: "<", value: "x" }), true);
    assert.equal(await holds({ key: "k", target: "value", op: "!=", value: "w" }), false);
    // An absent key reads as revision/version 0: the "create if absent" idiom.
    assert.equal(await holds({ key: "none", target: "mod", op: "==", value: 0 }), true);
    assert.equal(await holds({ key: "none", target: "create", op: "==", value: 0 }), true);
    assert.equal(await holds({ key: "none", target: "version", op: "==", value: 0 }), true);
    assert.equal(await holds({ key: "none", target: "version", op: ">", value: 0 }), false);
    const created = await store.txn({
      compare: [{ key: "new", target: "create", op: "==", value: 0 }],
      success: [{ type: "put", key: "new", value: "1" }],
      failure: [{ type: "put", key: "lost", value: "1" }],
    });
    assert.equal(created.succeeded, true);
    assert.equal((await store.get("new"))?.modRevision, created.revision);
    const second = await store.txn({
      compare: [{ key: "new", target: "create", op: "==", value: 0 }],
      success: [{ type: "put", key: "new", value: "2" }],
      failure: [{ type: "put", key: "lost", value: "1" }],
    });
    assert.equal(second.succeeded, false);
    assert.equal((await store.get("new"))?.value, "1");
    assert.equal((await store.get("lost"))?.value, "1");
  });

  define("txn is atomic: one revision for all writes, nothing on error", async (store) => {
    await store.put("t/old", "x");
    await store.put("t/gone/1", "x");
    await store.put("t/gone/2", "x");
    const before = await store.revision();
    const watch = openWatch(store, "t/", before + 1);
    const result = await store.txn({
      compare: [{ key: "t/old", target: "version", op: "==", value: 1 }],
      success: [
        { type: "put", key: "t/a", value: "1" },
        { type: "put", key: "t/b", value: "2" },
        { type: "delete", key: "t/old" },
        { type: "deletePrefix", prefix: "t/gone/" },
      ],
    });
    assert.deepEqual(result, { succeeded: true, revision: before + 1 });
    assert.equal((await store.get("t/a"))?.modRevision, before + 1);
    assert.equal((await store.get("t/b"))?.modRevision, before + 1);
    const events = await watch.take(5);
    await watch.close();
    assert.ok(events.every((event) => event.revision === before + 1));
    assert.deepEqual(
      events.map((event) => `${event.type} ${event.key}`).sort(),
      ["delete t/gone/1", "delete t/gone/2", "delete t/old", "put t/a", "put t/b"],
    );
    // A failing op (an unknown lease) rolls the whole transaction back.
    await assert.rejects(
      store.txn({
        compare: [],
        success: [
          { type: "put", key: "t/c", value: "3" },
          { type: "put", key: "t/d", value: "4", lease: "no-such-lease" },
        ],
      }),
    );
    assert.equal(await store.get("t/c"), undefined);
    assert.equal(await store.revision(), before + 1);
    // A transaction that writes nothing consumes no revision.
    const empty = await store.txn({ compare: [], success: [] });
    assert.deepEqual(empty, { succeeded: true, revision: before + 1 });
  });

  define("CAS race: of two writers comparing the same mod revision, one wins", async (store) => {
    const base = await store.put("cas", "0");
    const attempt = (value: string) =>
      store.txn({
        compare: [{ key: "cas", target: "mod", op: "==", value: base }],
        success: [{ type: "put", key: "cas", value }],
      });
    const results = await Promise.all([attempt("a"), attempt("b")]);
    assert.equal(results.filter((result) => result.succeeded).length, 1);
    const winner = results[0].succeeded ? "a" : "b";
    assert.equal((await store.get("cas"))?.value, winner);
    // Optimistic increments with retry never lose an update.
    const writers = 8;
    await store.put("counter", "0");
    await Promise.all(Array.from({ length: writers }, async () => {
      for (;;) {
        const kv = await store.get("counter") as KeyValue;
        const { succeeded } = await store.txn({
          compare: [{ key: "counter", target: "mod", op: "==", value: kv.modRevision }],
          success: [{ type: "put", key: "counter", value: String(Number(kv.value) + 1) }],
        });
        if (succeeded) return;
      }
    }));
    assert.equal((await store.get("counter"))?.value, String(writers));
  });

  define("watch from a revision replays history in order, then goes live", async (store) => {
    const r1 = await store.put("w/a", "1");
    await store.put("other", "x");
    const r3 = await store.put("w/b", "2");
    const r4 = await store.delete("w/a");
    const watch = openWatch(store, "w/", r1);
    const replay = await watch.take(3);
    assert.deepEqual(brief(replay), [
      ["put", "w/a", "1", r1],
      ["put", "w/b", "2", r3],
      ["delete", "w/a", undefined, r4],
    ]);
    assert.deepEqual(replay[1].kv, {
      key: "w/b",
      value: "2",
      createRevision: r3,
      modRevision: r3,
      version: 1,
    });
    const r5 = await store.put("w/c", "3");
    await store.put("x/ignored", "0");
    const r7 = await store.put("w/b", "4");
    const live = await watch.take(2);
    assert.deepEqual(brief(live), [["put", "w/c", "3", r5], ["put", "w/b", "4", r7]]);
    assert.equal(live[1].kv?.version, 2);
    await watch.close();
    // Without fromRevision, a watch sees only what comes after the call.
    const fresh = openWatch(store, "w/");
    const r8 = await store.put("w/d", "5");
    assert.deepEqual(brief(await fresh.take(1)), [["put", "w/d", "5", r8]]);
    await fresh.close();
  });

  define("watch resumes after close from the last seen revision without gap", async (store) => {
    const start = await store.revision();
    const first = openWatch(store, "r/", start + 1);
    for (let i = 0; i < 5; i++) await store.put(`r/${i}`, String(i));
    const seen = await first.take(3);
    await first.close();
    for (let i = 5; i < 8; i++) await store.put(`r/${i}`, String(i));
    const last = seen[seen.length - 1].revision;
    const second = openWatch(store, "r/", last + 1);
    const rest = await second.take(5);
    await second.close();
    const keys = [...seen, ...rest].map((event) => event.key);
    assert.deepEqual(keys, ["r/0", "r/1", "r/2", "r/3", "r/4", "r/5", "r/6", "r/7"]);
    const revisions = [...seen, ...rest].map((event) => event.revision);
    assert.deepEqual(revisions, revisions.map((_, i) => start + 1 + i));
  });

  define("a compacted watch fails with CompactedError; relist and watch again", async (store) => {
    const r1 = await store.put("c/a", "1");
    await store.put("c/b", "2");
    const r3 = await store.put("c/a", "3");
    await store.compact(r3);
    let caught: unknown;
    try {
      for await (const _ of store.watch("c/", { fromRevision: r1 })) break;
    } catch (error) {
      caught = error;
    }
    assert.ok(caught instanceof CompactedError, `expected CompactedError, got ${caught}`);
    assert.equal(caught.code, "compacted");
    assert.equal(caught.compactRevision, r3);
    // The recovery: list, then watch from the listing's revision + 1.
    const listing = await store.list("c/");
    assert.deepEqual(listing.items.map((kv) => kv.value), ["3", "2"]);
    const watch = openWatch(store, "c/", listing.revision + 1);
    const r4 = await store.put("c/b", "4");
    assert.deepEqual(brief(await watch.take(1)), [["put", "c/b", "4", r4]]);
    await watch.close();
    // Watching from the compaction revision itself is allowed.
    const atCompaction = openWatch(store, "c/", r3);
    assert.deepEqual(brief(await atCompaction.take(1)), [["put", "c/a", "3", r3]]);
    await atCompaction.close();
  });

  define("an expired lease deletes its keys and watchers see the deletes", async (store) => {
    const lease = await store.grantLease(ttlMs);
    assert.equal(lease.ttlMs, ttlMs);
    await store.put("l/a", "1", { lease: lease.id });
    await store.txn({
      compare: [],
      success: [{ type: "put", key: "l/b", value: "2", lease: lease.id }],
    });
    await store.put("l/keep", "3");
    assert.equal((await store.get("l/a"))?.lease, lease.id);
    const watch = openWatch(store, "l/", (await store.revision()) + 1);
    await pass(ttlMs + 1);
    const deletes = await watch.take(2);
    await watch.close();
    assert.deepEqual(deletes.map((event) => `${event.type} ${event.key}`), [
      "delete l/a",
      "delete l/b",
    ]);
    assert.equal(await store.get("l/a"), undefined);
    assert.equal((await store.get("l/keep"))?.value, "3");
    await assert.rejects(store.keepAlive(lease.id), LeaseNotFoundError);
    await assert.rejects(store.put("l/c", "4", { lease: lease.id }), (error: unknown) => {
      assert.ok(error instanceof LeaseNotFoundError);
      assert.equal(error.code, "lease_not_found");
      return true;
    });
  });

  define("keepAlive holds a lease past its TTL", async (store) => {
    const lease = await store.grantLease(ttlMs);
    await store.put("h/a", "1", { lease: lease.id });
    for (let i = 0; i < 4; i++) {
      await pass(Math.floor(ttlMs / 2));
      await store.keepAlive(lease.id);
    }
    assert.equal((await store.get("h/a"))?.value, "1");
    await pass(ttlMs + 1);
    assert.equal(await store.get("h/a"), undefined);
  });

  define("revokeLease deletes the lease's keys at once", async (store) => {
    const lease = await store.grantLease(60_000);
    await store.put("v/a", "1", { lease: lease.id });
    await store.put("v/b", "2", { lease: lease.id });
    const watch = openWatch(store, "v/", (await store.revision()) + 1);
    await store.revokeLease(lease.id);
    const deletes = await watch.take(2);
    await watch.close();
    assert.equal(deletes[0].revision, deletes[1].revision);
    assert.deepEqual((await store.list("v/")).items, []);
    await assert.rejects(store.revokeLease(lease.id), LeaseNotFoundError);
    await assert.rejects(store.keepAlive(lease.id), LeaseNotFoundError);
  });

  define("random writes agree with a model, and watch replays them", async (store) => {
    const seed = Number(Deno.env.get("RUNNEL_SEED") ?? Math.floor(Math.random() * 2 ** 31));
    let state = seed >>> 0;
    const random = (n: number) => {
      // mulberry32: small, seedable, good enough to pick test operations.
      state = (state + 0x6d2b79f5) >>> 0;
      let t = state;
      t = Math.imul(t ^ (t >>> 15), t | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      return (((t ^ (t >>> 14)) >>> 0) / 4294967296 * n) | 0;
    };
    try {
      const model = new Map<string, string>();
      const start = await store.revision();
      const watch = openWatch(store, "m/", start + 1);
      let expectedEvents = 0;
      for (let i = 0; i < 200; i++) {
        const key = `m/${random(12)}`;
        const choice = random(10);
        if (choice < 6) {
          await store.put(key, String(i));
          model.set(key, String(i));
          expectedEvents++;
        } else if (choice < 8) {
          await store.delete(key);
          if (model.delete(key)) expectedEvents++;
        } else {
          const current = await store.get(key);
          const { succeeded } = await store.txn({
            compare: [{ key, target: "version", op: "==", value: current?.version ?? 0 }],
            success: [{ type: "put", key, value: `t${i}` }, { type: "put", key: "m/x", value: "" }],
          });
          assert.equal(succeeded, true);
          model.set(key, `t${i}`).set("m/x", "");
          expectedEvents += 2;
        }
      }
      const listing = await store.list("m/");
      assert.deepEqual(
        listing.items.map((kv) => [kv.key, kv.value]),
        [...model.entries()].sort(([a], [b]) => (a < b ? -1 : 1)),
      );
      const replayed = new Map<string, string>();
      for (const event of await watch.take(expectedEvents)) {
        if (event.type === "put") replayed.set(event.key, event.value ?? "");
        else replayed.delete(event.key);
      }
      await watch.close();
      assert.deepEqual(replayed, model);
    } catch (error) {
      console.error(`store conformance random test failed with RUNNEL_SEED=${seed}`);
      throw error;
    }
  });

  define("a closed store refuses calls with StoreClosedError", async (store) => {
    const watch = openWatch(store, "z/");
    // The rejection handler is attached before close so it is never unhandled.
    const ended = assert.rejects(watch.take(1), /the watch ended/);
    await store.close();
    await ended;
    await assert.rejects(store.get("a"), (error: unknown) => {
      assert.ok(error instanceof StoreClosedError);
      assert.equal(error.code, "store_closed");
      return true;
    });
  });
}
