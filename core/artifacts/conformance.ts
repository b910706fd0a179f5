/**
 * The behaviours every {@link ArtifactStore} engine must share, as one test
 * suite: an engine's test file calls {@link artifactStoreConformance} with a
 * way to open a fresh, empty store, and gets one `Deno.test` per behaviour.
 *
 * What only one engine can check (file modes, temporary files, object
 * keys) stays in that engine's own tests.
 *
 * @module
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import {
  ArtifactExistsError,
  ArtifactIntegrityError,
  type ArtifactStore,
  DEFAULT_RETENTION_MS,
  InvalidArtifactError,
} from "./store.ts";

const DAY_MS = 24 * 60 * 60 * 1000;
/** Any fixed instant: records carry it as `created`. */
const START_MS = 1_700_000_000_000;

/** What {@link ConformanceOptions.open} gets. */
export interface OpenConformanceTargetOptions {
  /** The clock the store must stamp records (and blob ages) with. */
  clock: () => number;
}

/** A fresh store plus access to its blobs behind its back. */
export interface ConformanceTarget extends AsyncDisposable {
  store: ArtifactStore;
  /** Digests of the blobs stored, read directly from the engine's storage. */
  blobDigests(): Promise<string[]>;
  /** Replaces a stored blob's bytes, as a disk fault or a stray writer would. */
  overwriteBlob(digest: string, bytes: Uint8Array): Promise<void>;
  /** Deletes a stored blob behind the store's back. */
  deleteBlob(digest: string): Promise<void>;
}

/** Options of {@link artifactStoreConformance}. */
export interface ConformanceOptions {
  /** Opens an empty store; called once per test and disposed at its end. */
  open(options: OpenConformanceTargetOptions): Promise<ConformanceTarget>;
  /** Skips every test (the caller prints why). */
  ignore?: boolean;
}

interface Fixture {
  dir: string;
  target: ConformanceTarget;
  store: ArtifactStore;
  now: { value: number };
  /** Writes a source file with `content` and returns its path. */
  file(name: string, content: string | Uint8Array): Promise<string>;
}

type Case = [name: string, body: (fixture: Fixture) => Promise<void>];

function sha256(content: string | Uint8Array): string {
  return `sha256:${createHash("sha256").update(content).digest("hex")}`;
}

const CASES: Case[] = [
  ["put stores a record; get, hasBlob and materialize read it back", async (f) => {
    const content = "day,kwh\n1,42\n";
    const record = await f.store.put(await f.file("energy.csv", content), {
      run: "run-1",
      step: "generate",
      name: "energy.csv",
      attemptId: "att-1",
    });
    assert.deepEqual(record, {
      run: "run-1",
      step: "generate",
      name: "energy.csv",
      digest: sha256(content),
      size: content.length,
      contentType: "text/csv",
      created: START_MS,
      sourceStep: "generate",
      attemptId: "att-1",
    });
    assert.deepEqual(await f.store.get("run-1", "generate", "energy.csv"), record);
    assert.equal(await f.store.get("run-1", "generate", "other.csv"), undefined);
    assert.equal(await f.store.get("run-2", "generate", "energy.csv"), undefined);
    assert.equal(await f.store.hasBlob(record.digest), true);
    assert.equal(await f.store.hasBlob(sha256("nothing")), false);
    assert.deepEqual(await f.target.blobDigests(), [record.digest]);
    await f.store.materialize(record, `${f.dir}/out.csv`);
    assert.equal(await Deno.readTextFile(`${f.dir}/out.csv`), content);
  }],

  ["an explicit content type wins; empty and multi-megabyte files round-trip", async (f) => {
    const empty = await f.store.put(await f.file("empty", ""), {
      run: "r",
      step: "s",
      name: "empty.log",
      contentType: "application/x-custom",
    });
    assert.equal(empty.size, 0);
    assert.equal(empty.contentType, "application/x-custom");
    assert.equal(empty.attemptId, undefined);
    assert.equal("attemptId" in empty, false);
    await f.store.materialize(empty, `${f.dir}/empty.out`);
    assert.equal((await Deno.stat(`${f.dir}/empty.out`)).size, 0);
    // Several read chunks' worth of bytes that are not valid UTF-8.
    const big = new Uint8Array(3 * 1024 * 1024 + 17);
    for (let i = 0; i < big.length; i++) big[i] = (i * 7919 + (i >> 11)) & 0xff;
    const record = await f.store.put(await f.file("big", big), { run: "r", step: "s", name: "b" });
    assert.equal(record.size, big.length);
    assert.equal(record.digest, sha256(big));
    await f.store.materialize(record, `${f.dir}/big.out`);
    assert.deepEqual(await Deno.readFile(`${f.dir}/big.out`), big);
    // Materializing again replaces the file.
    await Deno.writeTextFile(`${f.dir}/big.out`, "stale");
    await f.store.materialize(record, `${f.dir}/big.out`);
    assert.equal((await Deno.stat(`${f.dir}/big.out`)).size, big.length);
  }],

  ["identical content is stored once across records (dedup)", async (f) => {
    const a = await f.store.put(await f.file("a.json", "{}"), {
      run: "r1",
      step: "s",
      name: "a.json",
    });
    const b = await f.store.put(await f.file("b.bin", "{}"), {
      run: "r2",
      step: "t",
      name: "b.bin",
    });
    assert.equal(a.digest, b.digest);
    assert.equal(a.contentType, "application/json");
    assert.equal(b.contentType, "application/octet-stream");
    assert.deepEqual(await f.target.blobDigests(), [a.digest]);
    assert.equal((await f.store.list()).length, 2);
  }],

  ["records are immutable: same digest returns the record, another is refused", async (f) => {
    const meta = { run: "r", step: "s", name: "out.txt" };
    const first = await f.store.put(await f.file("1.txt", "one"), meta);
    f.now.value += 1000;
    assert.deepEqual(await f.store.put(await f.file("2.txt", "one"), meta), first);
    await assert.rejects(f.store.put(await f.file("3.txt", "two"), meta), (error: unknown) => {
      assert.ok(error instanceof ArtifactExistsError);
      assert.equal(error.code, "artifact_exists");
      assert.equal(error.existing.digest, sha256("one"));
      assert.equal(error.digest, sha256("two"));
      assert.match(error.message, /r\/s\/out\.txt/);
      return true;
    });
    assert.deepEqual(await f.store.get("r", "s", "out.txt"), first);
  }],

  ["odd run, step and artifact names round-trip and stay distinct", async (f) => {
    const steps = [
      "build[os=linux,arch=x64]",
      "build[os=linux,arch=arm]",
      "..",
      ".",
      "a/b",
      "a%2Fb",
      "with space+plus",
      "ünïcødé",
      "x".repeat(300),
    ];
    for (const step of steps) {
      await f.store.put(await f.file("f.txt", step), { run: "r/1", step, name: "../f.txt" });
    }
    for (const step of steps) {
      const record = await f.store.get("r/1", step, "../f.txt");
      assert.equal(record?.step, step);
      assert.equal(record?.digest, sha256(step));
    }
    assert.deepEqual((await f.store.list({ run: "r/1" })).map((r) => r.step), [...steps].sort());
    assert.deepEqual(await f.store.list({ run: "r" }), []);
    assert.equal(await f.store.get("r", "1/" + steps[0], "../f.txt"), undefined);
  }],

  ["list is sorted by run, step and name and filters by run", async (f) => {
    assert.deepEqual(await f.store.list(), []);
    const keys = [["r2", "b", "z"], ["r1", "b", "y"], ["r1", "a", "x"], ["r10", "a", "a"]];
    for (const [run, step, name] of keys) {
      await f.store.put(await f.file(name, `${run}${step}${name}`), { run, step, name });
    }
    const all = (await f.store.list()).map((r) => `${r.run}/${r.step}/${r.name}`);
    assert.deepEqual(all, ["r1/a/x", "r1/b/y", "r10/a/a", "r2/b/z"]);
    // "r1" is not a prefix match of "r10".
    const r1 = (await f.store.list({ run: "r1" })).map((r) => `${r.run}/${r.step}/${r.name}`);
    assert.deepEqual(r1, ["r1/a/x", "r1/b/y"]);
    assert.deepEqual(await f.store.list({ run: "absent" }), []);
  }],

  ["materialize fails with artifact_corrupt on a flipped byte or a missing blob", async (f) => {
    const content = "hello world";
    const record = await f.store.put(await f.file("data.txt", content), {
      run: "run-9",
      step: "analyze",
      name: "data.txt",
    });
    const bytes = new TextEncoder().encode(content);
    bytes[3] ^= 0xff;
    await f.target.overwriteBlob(record.digest, bytes);
    await assert.rejects(f.store.materialize(record, `${f.dir}/out.txt`), (error: unknown) => {
      assert.ok(error instanceof ArtifactIntegrityError);
      assert.equal(error.code, "artifact_corrupt");
      assert.deepEqual([error.run, error.step, error.artifact], ["run-9", "analyze", "data.txt"]);
      assert.equal(error.expected, record.digest);
      assert.equal(error.actual, sha256(bytes));
      assert.match(error.message, /run-9\/analyze\/data\.txt/);
      return true;
    });
    // A corrupt blob never lands at the destination, not even partially.
    const left = () =>
      [...Deno.readDirSync(f.dir)].map((e) => e.name).filter((n) => n.startsWith("out"));
    assert.deepEqual(left(), []);
    await f.target.deleteBlob(record.digest);
    assert.equal(await f.store.hasBlob(record.digest), false);
    await assert.rejects(f.store.materialize(record, `${f.dir}/out.txt`), (error: unknown) => {
      assert.ok(error instanceof ArtifactIntegrityError);
      assert.equal(error.actual, "missing");
      assert.match(error.message, /missing/);
      return true;
    });
    assert.deepEqual(left(), []);
  }],

  ["pins are per run, idempotent, and survive an unpin of another run", async (f) => {
    assert.equal(await f.store.isPinned("a"), false);
    await f.store.unpin("a"); // unpinning what is not pinned is fine
    await f.store.pin("a");
    await f.store.pin("a");
    await f.store.pin("a/b");
    assert.equal(await f.store.isPinned("a"), true);
    assert.equal(await f.store.isPinned("a/b"), true);
    assert.equal(await f.store.isPinned("ab"), false);
    await f.store.unpin("a/b");
    assert.equal(await f.store.isPinned("a"), true);
    assert.equal(await f.store.isPinned("a/b"), false);
    await f.store.unpin("a");
    assert.equal(await f.store.isPinned("a"), false);
  }],

  ["gc drops unpinned records past retention, then unreferenced blobs", async (f) => {
    const { store, now, file } = f;
    await store.put(await file("a", "old-only"), { run: "old", step: "s", name: "a" });
    await store.put(await file("b", "shared"), { run: "old", step: "s", name: "b" });
    await store.put(await file("c", "pinned"), { run: "kept", step: "s", name: "c" });
    await store.pin("kept");
    now.value = START_MS + 10 * DAY_MS;
    await store.put(await file("d", "shared"), { run: "new", step: "s", name: "d" });
    assert.equal(await store.isPinned("kept"), true);
    assert.equal(await store.isPinned("old"), false);

    // Nothing is old enough yet (14 days by default).
    const gcNow = START_MS + DEFAULT_RETENTION_MS - 1;
    assert.deepEqual(await store.gc({ now: gcNow }), {
      recordsRemoved: 0,
      blobsRemoved: 0,
      bytesFreed: 0,
    });
    // A dry run counts without removing.
    const later = START_MS + 15 * DAY_MS;
    const expected = { recordsRemoved: 2, blobsRemoved: 1, bytesFreed: "old-only".length };
    assert.deepEqual(await store.gc({ now: later, dryRun: true }), expected);
    assert.equal((await store.list()).length, 4);
    assert.equal(await store.hasBlob(sha256("old-only")), true);
    assert.deepEqual(await store.gc({ now: later }), expected);
    assert.deepEqual((await store.list()).map((r) => `${r.run}/${r.name}`), ["kept/c", "new/d"]);
    assert.equal(await store.get("old", "s", "a"), undefined);
    assert.equal(await store.hasBlob(sha256("old-only")), false);
    assert.equal(await store.hasBlob(sha256("shared")), true);
    assert.equal(await store.hasBlob(sha256("pinned")), true);
    assert.equal((await f.target.blobDigests()).length, 2);
    // Unpinned, the run goes too; a shorter retention is honoured.
    await store.unpin("kept");
    const result = await store.gc({ now: later, retentionMs: DAY_MS });
    assert.deepEqual(result, { recordsRemoved: 2, blobsRemoved: 2, bytesFreed: 12 });
    assert.deepEqual(await store.list(), []);
    assert.deepEqual(await f.target.blobDigests(), []);
    // Nothing left to collect.
    assert.deepEqual(await store.gc({ now: later, retentionMs: 0 }), {
      recordsRemoved: 0,
      blobsRemoved: 0,
      bytesFreed: 0,
    });
  }],

  ["gc spares a blob stored within the last hour that no record references yet", async (f) => {
    const record = await f.store.put(await f.file("a", "fresh"), {
      run: "r",
      step: "s",
      name: "a",
    });
    // The record goes at once; its blob stays while a put in flight might still reference it.
    const now = START_MS + 30 * 60 * 1000;
    assert.deepEqual(await f.store.gc({ now, retentionMs: 0 }), {
      recordsRemoved: 1,
      blobsRemoved: 0,
      bytesFreed: 0,
    });
    assert.equal(await f.store.hasBlob(record.digest), true);
    const result = await f.store.gc({ now: START_MS + 2 * 60 * 60 * 1000, retentionMs: 0 });
    assert.deepEqual(result, { recordsRemoved: 0, blobsRemoved: 1, bytesFreed: 5 });
  }],

  ["concurrent puts of the same content and key all return one record", async (f) => {
    const sources = await Promise.all(
      Array.from({ length: 8 }, (_, i) => f.file(`same-${i}`, "x".repeat(100_000))),
    );
    const meta = { run: "r", step: "s", name: "same.bin" };
    const records = await Promise.all(sources.map((source) => f.store.put(source, meta)));
    for (const record of records) assert.deepEqual(record, records[0]);
    assert.equal((await f.target.blobDigests()).length, 1);
    assert.equal((await f.store.list()).length, 1);
  }],

  ["concurrent puts of different content to one key: exactly one wins", async (f) => {
    const sources = await Promise.all(
      Array.from({ length: 6 }, (_, i) => f.file(`v${i}`, `version ${i}`)),
    );
    const meta = { run: "r", step: "s", name: "race.txt" };
    const results = await Promise.allSettled(sources.map((source) => f.store.put(source, meta)));
    const won = results.filter((result) => result.status === "fulfilled");
    assert.equal(won.length, 1);
    for (const result of results) {
      if (result.status === "rejected") assert.ok(result.reason instanceof ArtifactExistsError);
    }
    const stored = await f.store.get("r", "s", "race.txt");
    assert.deepEqual(stored, (won[0] as PromiseFulfilledResult<unknown>).value);
  }],

  ["empty ids and malformed digests are refused with invalid_artifact", async (f) => {
    const source = await f.file("x", "x");
    const invalid = (error: unknown) => {
      assert.ok(error instanceof InvalidArtifactError);
      assert.equal(error.code, "invalid_artifact");
      return true;
    };
    await assert.rejects(f.store.put(source, { run: "", step: "s", name: "x" }), invalid);
    await assert.rejects(f.store.put(source, { run: "r", step: "", name: "x" }), invalid);
    await assert.rejects(f.store.put(source, { run: "r", step: "s", name: "" }), invalid);
    // Wrapped: an engine may throw before it returns its promise.
    await assert.rejects(async () => await f.store.get("r", "", "x"), invalid);
    await assert.rejects(async () => await f.store.isPinned(""), invalid);
    await assert.rejects(async () => await f.store.hasBlob("md5:abc"), invalid);
    await assert.rejects(async () => await f.store.hasBlob(`sha256:${"A".repeat(64)}`), invalid);
    assert.deepEqual(await f.store.list(), []);
  }],
];

/**
 * Registers the shared artifact store tests, named `NAME: behaviour`.
 *
 * @example The test module of an engine
 * ```ts
 * import assert from "node:assert/strict";
 * import { artifactStoreConformance } from "./conformance.ts";
 * import { openLocalArtifactStore } from "./local.ts";
 * import { digestHex } from "./store.ts";
 *
 * // The target reaches the engine's blobs behind its back: here, files under `root`.
 * artifactStoreConformance("local", {
 *   async open({ clock }) {
 *     const root = await Deno.makeTempDir();
 *     const shards = `${root}/blobs/sha256`;
 *     const blob = (digest: string) => {
 *       const hex = digestHex(digest);
 *       return `${shards}/${hex.slice(0, 2)}/${hex.slice(2)}`;
 *     };
 *     return {
 *       store: openLocalArtifactStore(root, { clock }),
 *       async blobDigests() {
 *         const digests: string[] = [];
 *         const shardNames = await Array.fromAsync(Deno.readDir(shards)).catch(() => []);
 *         for (const shard of shardNames) {
 *           for await (const file of Deno.readDir(`${shards}/${shard.name}`)) {
 *             digests.push(`sha256:${shard.name}${file.name}`);
 *           }
 *         }
 *         return digests.sort();
 *       },
 *       async overwriteBlob(digest, bytes) {
 *         await Deno.chmod(blob(digest), 0o644); // blobs are read-only
 *         await Deno.writeFile(blob(digest), bytes);
 *       },
 *       deleteBlob: (digest) => Deno.remove(blob(digest)),
 *       [Symbol.asyncDispose]: () => Deno.remove(root, { recursive: true }),
 *     };
 *   },
 * });
 *
 * // What only this engine can check sits beside the shared tests.
 * Deno.test("local: a fresh store lists nothing", async () => {
 *   const root = await Deno.makeTempDir();
 *   assert.deepEqual(await openLocalArtifactStore(root).list(), []);
 *   await Deno.remove(root, { recursive: true });
 * });
 * ```
 */
export function artifactStoreConformance(name: string, options: ConformanceOptions): void {
  for (const [behaviour, body] of CASES) {
    Deno.test({
      name: `${name}: ${behaviour}`,
      ignore: options.ignore ?? false,
      async fn() {
        const dir = await Deno.makeTempDir({ prefix: "runnel-conformance-" });
        const now = { value: START_MS };
        let files = 0;
        const file = async (fileName: string, content: string | Uint8Array) => {
          const path = `${dir}/src-${files++}-${fileName}`;
          if (typeof content === "string") await Deno.writeTextFile(path, content);
          else await Deno.writeFile(path, content);
          return path;
        };
        try {
          await using target = await options.open({ clock: () => now.value });
          await body({ dir, target, store: target.store, now, file });
        } finally {
          await Deno.remove(dir, { recursive: true });
        }
      },
    });
  }
}
