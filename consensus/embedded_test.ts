import assert from "node:assert/strict";
import { storeConformance } from "./conformance.ts";
import { type EmbeddedStoreOptions, openEmbeddedStore, openMemoryStore } from "./embedded.ts";
import { type Store, StoreClosedError, type WatchEvent } from "./store.ts";

/** A fake clock shared by the conformance runs; it only moves forward. */
let fakeNow = 1_700_000_000_000;
const fakeClock: EmbeddedStoreOptions = { clock: () => fakeNow, pollIntervalMs: 10 };
const advanceTime = (ms: number) => {
  fakeNow += ms;
};

storeConformance("embedded :memory:", () => Promise.resolve(openMemoryStore(fakeClock)), {
  advanceTime,
});

storeConformance("embedded file", async () => {
  const dir = await Deno.makeTempDir({ prefix: "runnel-store-" });
  const store = openEmbeddedStore(`${dir}/state.db`, fakeClock);
  const close = store.close.bind(store);
  store.close = async () => {
    await close();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  };
  return store;
}, { advanceTime });

/** Runs this file as a child process with `command` (see the bottom of the file). */
function child(dir: string, args: string[]): Deno.Command {
  return new Deno.Command(Deno.execPath(), {
    args: ["run", `--allow-read=${dir}`, `--allow-write=${dir}`, import.meta.filename!, ...args],
    cwd: new URL("..", import.meta.url).pathname,
    stdout: "piped",
    stderr: "piped",
  });
}

async function withTempDir(body: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "runnel-store-" });
  try {
    await body(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function nextEvent(
  iterator: AsyncIterator<WatchEvent>,
  timeoutMs: number,
): Promise<WatchEvent> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`Expected a watch event in ${timeoutMs} ms`)),
      timeoutMs,
    );
  });
  try {
    const next = await Promise.race([iterator.next(), timeout]);
    assert.equal(next.done, false, "the watch ended");
    return next.value;
  } finally {
    clearTimeout(timer);
  }
}

Deno.test("embedded: a watch sees writes made by another process", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/state.db`;
    const store = openEmbeddedStore(path);
    const controller = new AbortController();
    try {
      const before = await store.put("x/local", "0");
      const iterator = store.watch("x/", { signal: controller.signal })[Symbol.asyncIterator]();
      const output = await child(dir, ["put", path, "x/remote", "from-child"]).output();
      assert.equal(output.code, 0, new TextDecoder().decode(output.stderr));
      const childRevision = Number(new TextDecoder().decode(output.stdout).trim());
      assert.equal(childRevision, before + 1, "revisions are global across processes");
      const event = await nextEvent(iterator, 10_000);
      assert.deepEqual([event.type, event.key, event.value, event.revision], [
        "put",
        "x/remote",
        "from-child",
        childRevision,
      ]);
      assert.equal(await store.put("x/local", "1"), childRevision + 1);
      controller.abort();
      await iterator.return?.();
    } finally {
      await store.close();
    }
  });
});

Deno.test("embedded: every committed txn survives SIGKILL of the writer", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/state.db`;
    const process = child(dir, ["crash-writer", path]).spawn();
    const committed: number[] = [];
    let buffer = "";
    let killed = false;
    const decoder = new TextDecoder();
    for await (const chunk of process.stdout) {
      buffer += decoder.decode(chunk, { stream: true });
      const lines = buffer.split("\n");
      buffer = lines.pop()!;
      for (const line of lines) committed.push(Number(line.split(" ")[0]));
      if (!killed && committed.length >= 200) {
        process.kill("SIGKILL");
        killed = true;
      }
    }
    const status = await process.status;
    await process.stderr.cancel();
    assert.equal(status.signal, "SIGKILL", "the writer should have been killed mid-run");
    const store = openEmbeddedStore(path);
    try {
      const { items } = await store.list("crash/");
      const values = new Map(items.map((kv) => [kv.key, kv.value]));
      for (const i of committed) {
        for (const part of ["a", "b", "c"]) {
          assert.equal(values.get(`crash/${i}/${part}`), String(i), `txn ${i} was acknowledged`);
        }
      }
      // Atomicity: any txn present at all is present whole.
      const txns = new Set(items.map((kv) => kv.key.split("/")[1]));
      assert.equal(items.length, txns.size * 3);
      assert.ok(txns.size >= committed.length);
      // Revisions keep going from where the killed writer stopped.
      const revision = await store.revision();
      assert.equal(await store.put("after", "crash"), revision + 1);
    } finally {
      await store.close();
    }
  });
});

Deno.test("embedded: writes in flight together all resolve, and the WAL is checkpointed (it starts over, bounded)", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/state.db`;
    const store = openEmbeddedStore(path);
    try {
      // Many at once: they share WAL fsyncs; each resolves once durable, in revision order.
      const revisions = await Promise.all(
        Array.from({ length: 300 }, (_, i) => store.put(`burst/${i}`, String(i))),
      );
      assert.deepEqual(revisions, revisions.map((_, i) => i + 1));
      // Until the first checkpoint the WAL only grows; after it, it is reused from its start.
      for (let i = 300; i < 900; i++) await store.put(`seq/${i % 50}`, String(i));
      const before = (await Deno.stat(`${path}-wal`)).size;
      for (let i = 900; i < 3_000; i++) await store.put(`seq/${i % 50}`, String(i));
      const after = (await Deno.stat(`${path}-wal`)).size;
      assert.ok(
        after <= before * 1.5,
        `WAL grew from ${before} to ${after} bytes over 2,100 commits`,
      );
    } finally {
      await store.close();
    }
    // Closed: the WAL was folded into the database, which holds everything.
    const again = openEmbeddedStore(path);
    try {
      assert.equal((await again.list("burst/")).items.length, 300);
      assert.equal((await again.get("seq/49"))?.value, "2999");
      assert.equal(await again.revision(), 3_000);
    } finally {
      await again.close();
    }
  });
});

Deno.test("embedded: an ordered txn is readable at once, then durable; a closed store refuses it", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/state.db`;
    const store = openEmbeddedStore(path);
    const durables: Promise<void>[] = [];
    try {
      for (let i = 0; i < 50; i++) {
        const { result, durable } = await store.txnOrdered!({
          compare: [{ key: "ordered/last", target: "value", op: "==", value: String(i - 1) }],
          success: [{ type: "put", key: "ordered/last", value: String(i) }],
          failure: [{ type: "put", key: "ordered/lost", value: String(i) }],
        });
        assert.equal(result.succeeded, i > 0, `txn ${i}`);
        if (i === 0) await store.put("ordered/last", "0");
        else assert.equal((await store.get("ordered/last"))?.value, String(i));
        durables.push(durable);
      }
      await Promise.all(durables);
    } finally {
      await store.close();
    }
    await assert.rejects(() => store.txnOrdered!({ compare: [], success: [] }), StoreClosedError);
    const again = openEmbeddedStore(path);
    try {
      assert.equal((await again.get("ordered/last"))?.value, "49");
    } finally {
      await again.close();
    }
  });
});

Deno.test("embedded: a write made as soon as an ordered txn is durable becomes durable too", async () => {
  await withTempDir(async (dir) => {
    const store = openEmbeddedStore(`${dir}/state.db`);
    let timer: ReturnType<typeof setTimeout> | undefined;
    try {
      const { durable } = await store.txnOrdered!({
        compare: [],
        success: [{ type: "put", key: "first", value: "1" }],
      });
      await durable;
      // Committed right as the fsync that made `first` durable settles it,
      // before that fsync's loop has let go: nothing else commits after it.
      const second = store.put("second", "2");
      const late = new Promise<string>((resolve) => timer = setTimeout(resolve, 10_000, "late"));
      assert.equal(await Promise.race([second.then(() => "durable"), late]), "durable");
    } finally {
      clearTimeout(timer);
      await store.close();
    }
  });
});

Deno.test("embedded: two connections to one file share one revision sequence", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/state.db`;
    const stores: Store[] = [openEmbeddedStore(path), openEmbeddedStore(path)];
    try {
      const revisions = await Promise.all(
        Array.from({ length: 40 }, (_, i) => stores[i % 2].put(`k/${i % 5}`, String(i))),
      );
      assert.deepEqual([...revisions].sort((a, b) => a - b), revisions.map((_, i) => i + 1));
      assert.equal(await stores[0].revision(), 40);
      assert.equal(await stores[1].revision(), 40);
      const versions = (await stores[1].list("k/")).items.map((kv) => kv.version);
      assert.deepEqual(versions, [8, 8, 8, 8, 8]);
    } finally {
      for (const store of stores) await store.close();
    }
  });
});

Deno.test("embedded: reopening a file keeps keys, revision and compaction", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/state.db`;
    const first = openEmbeddedStore(path);
    await first.put("a", "1");
    const revision = await first.put("a", "2");
    await first.compact(revision);
    await first.close();
    const second = openEmbeddedStore(path);
    try {
      assert.equal(await second.revision(), revision);
      assert.equal((await second.get("a"))?.version, 2);
      await assert.rejects(
        (async () => {
          for await (const _ of second.watch("", { fromRevision: 1 })) break;
        })(),
        { code: "compacted" },
      );
    } finally {
      await second.close();
    }
  });
});

Deno.test("embedded: a read-only store reads, sees a writer's changes, expires nothing and writes nothing", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/state.db`;
    let now = 1_000;
    const writer = openEmbeddedStore(path, { clock: () => now });
    const lease = await writer.grantLease(1_000);
    await writer.put("owner", "me", { lease: lease.id });
    await writer.put("run", "1");
    now += 5_000;
    const reader = openEmbeddedStore(path, { clock: () => now, readOnly: true });
    try {
      // Only a writer expires leases: a read must not need the disk.
      assert.equal((await reader.get("owner"))?.value, "me");
      const revision = await writer.put("run", "2");
      assert.equal((await reader.get("run"))?.value, "2");
      assert.equal(await reader.revision(), revision);
      await assert.rejects(() => reader.put("run", "3"), { code: "store_read_only" });
      await assert.rejects(() => reader.grantLease(1_000), { code: "store_read_only" });
      await assert.rejects(
        () => reader.txn({ compare: [], success: [{ type: "delete", key: "run" }] }),
        { code: "store_read_only" },
      );
      assert.equal(await writer.get("owner"), undefined, "the writer expires it");
    } finally {
      await reader.close();
      await writer.close();
    }
    assert.throws(
      () => openEmbeddedStore(`${dir}/missing.db`, { readOnly: true }),
      Deno.errors.NotFound,
    );
    await assert.rejects(() => Deno.stat(`${dir}/missing.db`), Deno.errors.NotFound);
  });
});

/** Child-process entry points for the cross-process tests above. */
async function childMain(args: string[]): Promise<void> {
  const [command, path, ...rest] = args;
  const store = openEmbeddedStore(path);
  if (command === "put") {
    console.log(await store.put(rest[0], rest[1]));
    await store.close();
    return;
  }
  if (command === "crash-writer") {
    // Bounded so a parent that never kills it cannot leave it running forever.
    for (let i = 0; i < 100_000; i++) {
      const { revision } = await store.txn({
        compare: [],
        success: ["a", "b", "c"].map((part) => ({
          type: "put" as const,
          key: `crash/${i}/${part}`,
          value: String(i),
        })),
      });
      // Printed only after the commit returned: the parent's proof of an ack.
      console.log(`${i} ${revision}`);
    }
    await store.close();
    return;
  }
  throw new Error(`Expected a child command "put" or "crash-writer", got "${command}"`);
}

if (import.meta.main) await childMain(Deno.args);
