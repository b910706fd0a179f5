import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { openLocalArtifactStore } from "./local.ts";
import {
  ArtifactExistsError,
  ArtifactIntegrityError,
  type ArtifactStore,
  contentTypeFor,
  DEFAULT_RETENTION_MS,
} from "./store.ts";

const DAY_MS = 24 * 60 * 60 * 1000;

interface Fixture {
  dir: string;
  root: string;
  store: ArtifactStore;
  now: { value: number };
  /** Writes a source file with `content` and returns its path. */
  file(name: string, content: string | Uint8Array): Promise<string>;
}

async function withStore(body: (fixture: Fixture) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "runnel-artifacts-" });
  const now = { value: 1_700_000_000_000 };
  const root = `${dir}/artifacts`;
  const store = openLocalArtifactStore(root, { clock: () => now.value });
  let files = 0;
  const file = async (name: string, content: string | Uint8Array) => {
    const path = `${dir}/src-${files++}-${name}`;
    if (typeof content === "string") await Deno.writeTextFile(path, content);
    else await Deno.writeFile(path, content);
    return path;
  };
  try {
    await body({ dir, root, store, now, file });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

function sha256(content: string): string {
  return `sha256:${createHash("sha256").update(content).digest("hex")}`;
}

async function blobFiles(root: string): Promise<string[]> {
  const found: string[] = [];
  const shards = `${root}/blobs/sha256`;
  for await (const shard of Deno.readDir(shards)) {
    for await (const blob of Deno.readDir(`${shards}/${shard.name}`)) {
      found.push(`${shards}/${shard.name}/${blob.name}`);
    }
  }
  return found;
}

Deno.test("put stores a record and a read-only blob; materialize copies it back", async () => {
  await withStore(async ({ dir, root, store, file }) => {
    const content = "day,kwh\n1,42\n";
    const record = await store.put(await file("energy.csv", content), {
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
      created: 1_700_000_000_000,
      sourceStep: "generate",
      attemptId: "att-1",
    });
    assert.deepEqual(await store.get("run-1", "generate", "energy.csv"), record);
    assert.equal(await store.get("run-1", "generate", "other.csv"), undefined);
    assert.equal(await store.hasBlob(record.digest), true);
    assert.equal(await store.hasBlob(sha256("nothing")), false);
    const [blob] = await blobFiles(root);
    const hex = record.digest.slice("sha256:".length);
    assert.equal(blob, `${root}/blobs/sha256/${hex.slice(0, 2)}/${hex.slice(2)}`);
    assert.equal((await Deno.stat(blob)).mode! & 0o777, 0o444);
    await store.materialize(record, `${dir}/out.csv`);
    assert.equal(await Deno.readTextFile(`${dir}/out.csv`), content);
  });
});

Deno.test("identical content is stored once across records (dedup)", async () => {
  await withStore(async ({ root, store, file }) => {
    const a = await store.put(await file("a.json", "{}"), { run: "r1", step: "s", name: "a.json" });
    const b = await store.put(await file("b.bin", "{}"), { run: "r2", step: "t", name: "b.bin" });
    assert.equal(a.digest, b.digest);
    assert.equal(b.contentType, "application/octet-stream");
    assert.equal((await blobFiles(root)).length, 1);
    assert.equal((await store.list()).length, 2);
  });
});

Deno.test("records are immutable: same digest returns the record, another is refused", async () => {
  await withStore(async ({ store, file, now }) => {
    const meta = { run: "r", step: "s", name: "out.txt" };
    const first = await store.put(await file("1.txt", "one"), meta);
    now.value += 1000;
    assert.deepEqual(await store.put(await file("2.txt", "one"), meta), first);
    await assert.rejects(store.put(await file("3.txt", "two"), meta), (error: unknown) => {
      assert.ok(error instanceof ArtifactExistsError);
      assert.equal(error.code, "artifact_exists");
      assert.equal(error.existing.digest, sha256("one"));
      assert.equal(error.digest, sha256("two"));
      return true;
    });
    assert.deepEqual(await store.get("r", "s", "out.txt"), first);
  });
});

Deno.test("step ids with [ = , and odd names are encoded into safe, distinct paths", async () => {
  await withStore(async ({ root, store, file }) => {
    const steps = [
      "build[os=linux,arch=x64]",
      "build[os=linux,arch=arm]",
      "..",
      "a/b",
      "x".repeat(300),
    ];
    for (const step of steps) {
      await store.put(await file("f.txt", step), { run: "r/1", step, name: "../f.txt" });
    }
    for (const step of steps) {
      const record = await store.get("r/1", step, "../f.txt");
      assert.equal(record?.step, step);
      assert.equal(record?.digest, sha256(step));
    }
    assert.deepEqual((await store.list({ run: "r/1" })).map((r) => r.step), [...steps].sort());
    // Nothing escaped the records folder.
    const top = [];
    for await (const entry of Deno.readDir(`${root}/records`)) top.push(entry.name);
    assert.deepEqual(top, ["r%2F1"]);
  });
});

Deno.test("materialize fails with artifact_corrupt on a flipped byte or a missing blob", async () => {
  await withStore(async ({ dir, root, store, file }) => {
    const record = await store.put(await file("data.txt", "hello world"), {
      run: "run-9",
      step: "analyze",
      name: "data.txt",
    });
    const [blob] = await blobFiles(root);
    await Deno.chmod(blob, 0o644);
    const bytes = await Deno.readFile(blob);
    bytes[3] ^= 0xff;
    await Deno.writeFile(blob, bytes);
    await assert.rejects(store.materialize(record, `${dir}/out.txt`), (error: unknown) => {
      assert.ok(error instanceof ArtifactIntegrityError);
      assert.equal(error.code, "artifact_corrupt");
      assert.deepEqual([error.run, error.step, error.artifact], ["run-9", "analyze", "data.txt"]);
      assert.equal(error.expected, record.digest);
      assert.equal(error.actual, `sha256:${createHash("sha256").update(bytes).digest("hex")}`);
      assert.match(error.message, /run-9\/analyze\/data\.txt/);
      return true;
    });
    // A corrupt blob never lands at the destination, not even partially.
    assert.deepEqual(
      [...Deno.readDirSync(dir)].map((e) => e.name).filter((n) => n.startsWith("out")),
      [],
    );
    await Deno.remove(blob);
    await assert.rejects(store.materialize(record, `${dir}/out.txt`), (error: unknown) => {
      assert.ok(error instanceof ArtifactIntegrityError);
      assert.equal(error.actual, "missing");
      assert.match(error.message, /missing/);
      return true;
    });
  });
});

Deno.test("gc drops unpinned records past retention, then unreferenced blobs", async () => {
  await withStore(async ({ root, store, file, now }) => {
    const start = now.value;
    await store.put(await file("a", "old-only"), { run: "old", step: "s", name: "a" });
    await store.put(await file("b", "shared"), { run: "old", step: "s", name: "b" });
    await store.put(await file("c", "pinned"), { run: "kept", step: "s", name: "c" });
    await store.pin("kept");
    now.value = start + 10 * DAY_MS;
    await store.put(await file("d", "shared"), { run: "new", step: "s", name: "d" });
    assert.equal(await store.isPinned("kept"), true);
    assert.equal(await store.isPinned("old"), false);

    // Nothing is old enough yet (14 days by default).
    const gcNow = start + DEFAULT_RETENTION_MS - 1;
    assert.deepEqual(await store.gc({ now: gcNow }), {
      recordsRemoved: 0,
      blobsRemoved: 0,
      bytesFreed: 0,
    });
    // A dry run counts without removing.
    const later = start + 15 * DAY_MS;
    const expected = { recordsRemoved: 2, blobsRemoved: 1, bytesFreed: "old-only".length };
    assert.deepEqual(await store.gc({ now: later, dryRun: true }), expected);
    assert.equal((await store.list()).length, 4);
    assert.deepEqual(await store.gc({ now: later }), expected);
    assert.deepEqual((await store.list()).map((r) => `${r.run}/${r.name}`), ["kept/c", "new/d"]);
    assert.equal(await store.hasBlob(sha256("old-only")), false);
    assert.equal(await store.hasBlob(sha256("shared")), true);
    assert.equal(await store.hasBlob(sha256("pinned")), true);
    assert.equal((await blobFiles(root)).length, 2);
    // Unpinned, the run goes too; a shorter retention is honoured.
    await store.unpin("kept");
    const result = await store.gc({ now: later, retentionMs: DAY_MS });
    assert.deepEqual(result, { recordsRemoved: 2, blobsRemoved: 2, bytesFreed: 12 });
    assert.deepEqual(await store.list(), []);
  });
});

Deno.test("concurrent puts of the same content and key all return one record", async () => {
  await withStore(async ({ root, store, file }) => {
    const sources = await Promise.all(
      Array.from({ length: 8 }, (_, i) => file(`same-${i}`, "x".repeat(100_000))),
    );
    const meta = { run: "r", step: "s", name: "same.bin" };
    const records = await Promise.all(sources.map((source) => store.put(source, meta)));
    for (const record of records) assert.deepEqual(record, records[0]);
    assert.equal((await blobFiles(root)).length, 1);
    assert.equal((await store.list()).length, 1);
    // No temporary files are left behind.
    assert.deepEqual([...Deno.readDirSync(`${root}/blobs/tmp`)], []);
    assert.deepEqual([...Deno.readDirSync(`${root}/records/r/s`)].map((e) => e.name), [
      "same%2Ebin.json",
    ]);
  });
});

Deno.test("a put refused after its blob was copied leaves no temporary file", async () => {
  await withStore(async ({ root, store, file }) => {
    const content = "refused at the shard";
    // The shard's directory cannot be made (as on a full disk): a dangling link holds its name.
    const hex = sha256(content).slice("sha256:".length);
    await Deno.mkdir(`${root}/blobs/sha256`, { recursive: true });
    await Deno.symlink(`${root}/nowhere`, `${root}/blobs/sha256/${hex.slice(0, 2)}`);
    const source = await file("a.txt", content);
    await assert.rejects(store.put(source, { run: "r", step: "s", name: "a.txt" }));
    assert.deepEqual([...Deno.readDirSync(`${root}/blobs/tmp`)], []);
    assert.deepEqual(await store.list(), []);
  });
});

Deno.test("concurrent puts of different content to one key: exactly one wins", async () => {
  await withStore(async ({ store, file }) => {
    const sources = await Promise.all(
      Array.from({ length: 6 }, (_, i) => file(`v${i}`, `version ${i}`)),
    );
    const meta = { run: "r", step: "s", name: "race.txt" };
    const results = await Promise.allSettled(sources.map((source) => store.put(source, meta)));
    const won = results.filter((result) => result.status === "fulfilled");
    assert.equal(won.length, 1);
    for (const result of results) {
      if (result.status === "rejected") assert.ok(result.reason instanceof ArtifactExistsError);
    }
    const stored = await store.get("r", "s", "race.txt");
    assert.deepEqual(stored, (won[0] as PromiseFulfilledResult<unknown>).value);
  });
});

Deno.test("contentTypeFor maps common extensions, else octet-stream", () => {
  assert.equal(contentTypeFor("summary.json"), "application/json");
  assert.equal(contentTypeFor("REPORT.HTML"), "text/html");
  assert.equal(contentTypeFor("notes.txt"), "text/plain");
  assert.equal(contentTypeFor("data.csv"), "text/csv");
  assert.equal(contentTypeFor("Makefile"), "application/octet-stream");
  assert.equal(contentTypeFor("archive.weird"), "application/octet-stream");
});
