/**
 * The S3 artifact engine against a real S3-compatible server (`npm:s3rver`,
 * one per test, in a child process), cross-checked with the real `aws` CLI.
 *
 * Needs the `aws` CLI for the cross-check: with `CI=true` a missing CLI
 * fails that test; otherwise it is skipped with the reason printed. Every
 * test stops its server and removes its temporary directories.
 *
 * @module
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { Buffer } from "node:buffer";
import { Client } from "npm:minio@8.0.7";
import { artifactStoreConformance, type ConformanceTarget } from "../core/artifacts/conformance.ts";
import {
  openS3ArtifactStore,
  type S3ArtifactStoreOptions,
  S3BucketMissingError,
  S3ConfigError,
} from "../core/artifacts/s3.ts";
import { ArtifactIntegrityError, type ArtifactStore, digestHex } from "../core/artifacts/store.ts";
import { findAwsCli, runAws, type S3Server, startS3Server } from "./_s3.ts";

const IN_CI = Deno.env.get("CI") === "true";
const AWS = findAwsCli();
if (!AWS && !IN_CI) {
  console.log("%cskipping the aws CLI cross-check: no `aws` on PATH", "color: yellow");
}
/** Tests use a key prefix, so that prefix handling is exercised everywhere. */
const PREFIX = "runnel/ci";
const START_MS = 1_700_000_000_000;
const HOUR_MS = 60 * 60 * 1000;

function sha256(content: string | Uint8Array): string {
  return `sha256:${createHash("sha256").update(content).digest("hex")}`;
}

/** A client of its own, for what the tests do behind the store's back. */
function rawClient(server: S3Server): Client {
  const url = new URL(server.endpoint);
  return new Client({
    endPoint: url.hostname,
    port: Number(url.port),
    useSSL: false,
    region: server.region,
    accessKey: server.accessKey,
    secretKey: server.secretKey,
    pathStyle: true,
  });
}

function storeOptions(server: S3Server): S3ArtifactStoreOptions {
  return {
    endpoint: server.endpoint,
    bucket: server.bucket,
    region: server.region,
    accessKey: server.accessKey,
    secretKey: server.secretKey,
    prefix: PREFIX,
  };
}

async function listKeys(client: Client, bucket: string, prefix = ""): Promise<string[]> {
  const keys: string[] = [];
  for await (const item of client.listObjectsV2(bucket, prefix, true)) {
    if (item.name !== undefined) keys.push(item.name);
  }
  return keys.sort();
}

async function readObject(client: Client, bucket: string, key: string): Promise<Uint8Array> {
  const chunks: Buffer[] = [];
  for await (const chunk of await client.getObject(bucket, key)) chunks.push(chunk as Buffer);
  return new Uint8Array(Buffer.concat(chunks));
}

function blobKey(digest: string): string {
  return `${PREFIX}/blobs/sha256/${digestHex(digest)}`;
}

artifactStoreConformance("s3", {
  async open({ clock }): Promise<ConformanceTarget> {
    const server = await startS3Server();
    const client = rawClient(server);
    const blobsPrefix = `${PREFIX}/blobs/sha256/`;
    return {
      store: openS3ArtifactStore({ ...storeOptions(server), clock }),
      async blobDigests() {
        const keys = await listKeys(client, server.bucket, blobsPrefix);
        return keys.map((key) => `sha256:${key.slice(blobsPrefix.length)}`);
      },
      async overwriteBlob(digest, bytes) {
        await client.putObject(server.bucket, blobKey(digest), Buffer.from(bytes));
      },
      async deleteBlob(digest) {
        await client.removeObject(server.bucket, blobKey(digest));
      },
      [Symbol.asyncDispose]: () => server.stop(),
    };
  },
});

interface S3Fixture {
  server: S3Server;
  client: Client;
  store: ArtifactStore;
  dir: string;
  now: { value: number };
  /** Writes a source file with `content` and returns its path. */
  file(name: string, content: string | Uint8Array): Promise<string>;
}

/** Runs `body` against a fresh server and store; stops and removes everything after. */
async function withS3(
  body: (fixture: S3Fixture) => Promise<void>,
  options: Partial<S3ArtifactStoreOptions> = {},
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "runnel-s3-test-" });
  try {
    await using server = await startS3Server();
    const now = { value: START_MS };
    const store = openS3ArtifactStore({
      ...storeOptions(server),
      clock: () => now.value,
      ...options,
    });
    let files = 0;
    const file = async (name: string, content: string | Uint8Array) => {
      const path = `${dir}/src-${files++}-${name}`;
      if (typeof content === "string") await Deno.writeTextFile(path, content);
      else await Deno.writeFile(path, content);
      return path;
    };
    await body({ server, client: rawClient(server), store, dir, now, file });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("s3: objects are laid out as blobs/sha256/<hex>, records/…/<name>.json, pins/<run>", async () => {
  await withS3(async ({ server, client, store, file }) => {
    const record = await store.put(await file("e.csv", "day,kwh\n"), {
      run: "run-1",
      step: "build[os=linux,arch=x64]",
      name: "energy.csv",
    });
    await store.pin("run-1");
    const hex = digestHex(record.digest);
    assert.deepEqual(await listKeys(client, server.bucket), [
      `${PREFIX}/blobs/sha256/${hex}`,
      `${PREFIX}/pins/run-1`,
      `${PREFIX}/records/run-1/build!5Bos!3Dlinux!2Carch!3Dx64!5D/energy.csv.json`,
    ]);
    const recordKey = `${PREFIX}/records/run-1/build!5Bos!3Dlinux!2Carch!3Dx64!5D/energy.csv.json`;
    const stored = JSON.parse(
      new TextDecoder().decode(await readObject(client, server.bucket, recordKey)),
    );
    assert.deepEqual(stored, record);
    const recordInfo = await client.statObject(server.bucket, recordKey);
    assert.equal(recordInfo.metaData["content-type"], "application/json");
    const blobInfo = await client.statObject(server.bucket, `${PREFIX}/blobs/sha256/${hex}`);
    assert.equal(blobInfo.metaData["content-type"], "application/octet-stream");
    assert.equal(blobInfo.metaData["runnel-stored-at"], String(START_MS));
  });
});

Deno.test("s3: a stored blob is not uploaded again; reusing it re-stamps it once stale", async () => {
  await withS3(async ({ server, client, store, file, now }) => {
    const first = await store.put(await file("a", "shared bytes"), {
      run: "r1",
      step: "s",
      name: "a",
    });
    const key = blobKey(first.digest);
    // Rewrite the blob behind the store's back with the same bytes and a marker:
    // an upload by the next put would drop the marker.
    await client.putObject(server.bucket, key, Buffer.from("shared bytes"), undefined, {
      "runnel-stored-at": String(START_MS),
      marker: "original",
    });
    now.value = START_MS + 10 * 60 * 1000;
    await store.put(await file("b", "shared bytes"), { run: "r2", step: "s", name: "b" });
    let info = await client.statObject(server.bucket, key);
    assert.equal(info.metaData.marker, "original");
    assert.equal(info.metaData["runnel-stored-at"], String(START_MS));
    // Two hours on, a reuse stamps the blob again so that gc's grace period covers it.
    now.value = START_MS + 2 * HOUR_MS;
    await store.put(await file("c", "shared bytes"), { run: "r3", step: "s", name: "c" });
    info = await client.statObject(server.bucket, key);
    assert.equal(info.metaData["runnel-stored-at"], String(now.value));
    assert.equal(
      new TextDecoder().decode(await readObject(client, server.bucket, key)),
      "shared bytes",
    );
    assert.equal((await listKeys(client, server.bucket, `${PREFIX}/blobs/`)).length, 1);
    // All three records expire; the blob, stamped at the last reuse, stays an hour more.
    const swept = await store.gc({ now: now.value + 30 * 60 * 1000, retentionMs: 0 });
    assert.deepEqual(swept, { recordsRemoved: 3, blobsRemoved: 0, bytesFreed: 0 });
    const later = await store.gc({ now: now.value + 2 * HOUR_MS, retentionMs: 0 });
    assert.deepEqual(later, { recordsRemoved: 0, blobsRemoved: 1, bytesFreed: 12 });
  });
});

Deno.test("s3: stores under different prefixes share a bucket without seeing each other", async () => {
  await withS3(async ({ server, client, store, file }) => {
    const other = openS3ArtifactStore({
      ...storeOptions(server),
      prefix: "/other/",
      clock: () => START_MS,
    });
    await store.put(await file("a", "mine"), { run: "r", step: "s", name: "a" });
    await other.put(await file("b", "theirs"), { run: "r", step: "s", name: "a" });
    await other.pin("r");
    assert.deepEqual((await store.list()).map((r) => r.digest), [sha256("mine")]);
    assert.deepEqual((await other.list()).map((r) => r.digest), [sha256("theirs")]);
    assert.equal(await store.isPinned("r"), false);
    assert.equal(await store.hasBlob(sha256("theirs")), false);
    const result = await store.gc({ now: START_MS + 30 * 24 * HOUR_MS });
    assert.deepEqual(result, { recordsRemoved: 1, blobsRemoved: 1, bytesFreed: 4 });
    assert.deepEqual(await listKeys(client, server.bucket, "other/"), [
      `other/blobs/sha256/${digestHex(sha256("theirs"))}`,
      "other/pins/r",
      "other/records/r/s/a.json",
    ]);
  });
});

Deno.test("s3: upload snapshots are removed, whether the blob is new or reused", async () => {
  const tempDir = await Deno.makeTempDir({ prefix: "runnel-s3-snapshots-" });
  try {
    await withS3(async ({ store, file }) => {
      await store.put(await file("a", "one"), { run: "r", step: "s", name: "a" });
      await store.put(await file("b", "one"), { run: "r", step: "s", name: "b" });
      await store.put(await file("c", new Uint8Array(2 << 20)), { run: "r", step: "s", name: "c" });
      assert.deepEqual([...Deno.readDirSync(tempDir)], []);
    }, { tempDir });
  } finally {
    await Deno.remove(tempDir, { recursive: true });
  }
});

Deno.test("s3: a missing bucket is named; endpoints that are not http(s) URLs are refused", async () => {
  await withS3(async ({ server, file }) => {
    const store = openS3ArtifactStore({ ...storeOptions(server), bucket: "no-such-bucket" });
    await assert.rejects(
      store.put(await file("a", "x"), { run: "r", step: "s", name: "a" }),
      (error: unknown) => {
        assert.ok(error instanceof S3BucketMissingError);
        assert.equal(error.code, "s3_bucket_missing");
        assert.match(error.message, /"no-such-bucket".*127\.0\.0\.1/);
        return true;
      },
    );
    await assert.rejects(store.list(), S3BucketMissingError);
  });
  const base = { bucket: "b", accessKey: "k", secretKey: "s" };
  for (const endpoint of ["127.0.0.1:9000", "ftp://127.0.0.1", "http://127.0.0.1:9000/path"]) {
    assert.throws(() => openS3ArtifactStore({ ...base, endpoint }), (error: unknown) => {
      assert.ok(error instanceof S3ConfigError);
      assert.equal(error.code, "s3_config_invalid");
      assert.ok(error.message.includes(endpoint));
      return true;
    });
  }
  assert.throws(
    () => openS3ArtifactStore({ ...base, endpoint: "http://h", secretKey: "" }),
    S3ConfigError,
  );
});

Deno.test({
  name: "aws CLI: lists and reads what runnel wrote; runnel detects a blob aws overwrote",
  ignore: !AWS && !IN_CI,
  async fn() {
    if (!AWS) throw new Error("Expected the aws CLI on PATH in CI (Debian package awscli)");
    await withS3(async ({ server, store, dir, file }) => {
      // Bytes that are not UTF-8, so that `aws s3 cp … -` must pass them through untouched.
      const binary = new Uint8Array(70_000).map((_, i) => (i * 31 + 7) & 0xff);
      const csv = "day,kwh\n1,42\n";
      const records = [
        await store.put(await file("data.bin", binary), {
          run: "run-1",
          step: "gen",
          name: "data.bin",
        }),
        await store.put(await file("e.csv", csv), {
          run: "run-1",
          step: "build[os=linux,arch=x64]",
          name: "energy.csv",
        }),
      ];
      await store.pin("run-1");
      const decoder = new TextDecoder();

      const listing = await runAws(AWS, server, [
        "s3",
        "ls",
        `s3://${server.bucket}/`,
        "--recursive",
      ]);
      assert.equal(listing.code, 0, listing.stderr);
      // Lines are "DATE TIME SIZE KEY".
      const listed = new Map(
        decoder.decode(listing.stdout).trim().split("\n").map((line) => {
          const [, , size, ...key] = line.trim().split(/\s+/);
          return [key.join(" "), Number(size)] as const;
        }),
      );
      const recordKey =
        `${PREFIX}/records/run-1/build!5Bos!3Dlinux!2Carch!3Dx64!5D/energy.csv.json`;
      for (const record of records) assert.equal(listed.get(blobKey(record.digest)), record.size);
      assert.ok(listed.has(recordKey), [...listed.keys()].join("\n"));
      assert.ok(listed.has(`${PREFIX}/records/run-1/gen/data.bin.json`));
      assert.ok(listed.has(`${PREFIX}/pins/run-1`));
      assert.equal(listed.size, 5);

      const blob = await runAws(AWS, server, [
        "s3",
        "cp",
        `s3://${server.bucket}/${blobKey(records[0].digest)}`,
        "-",
      ]);
      assert.equal(blob.code, 0, blob.stderr);
      assert.deepEqual(blob.stdout, binary);
      const recordJson = await runAws(AWS, server, [
        "s3",
        "cp",
        `s3://${server.bucket}/${recordKey}`,
        "-",
      ]);
      assert.equal(recordJson.code, 0, recordJson.stderr);
      assert.deepEqual(JSON.parse(decoder.decode(recordJson.stdout)), records[1]);

      // A blob replaced from outside (shorter, different bytes) is caught on read.
      const tampered = await runAws(
        AWS,
        server,
        ["s3", "cp", "-", `s3://${server.bucket}/${blobKey(records[1].digest)}`],
        { stdin: new TextEncoder().encode("day,kwh\n1,41\n") },
      );
      assert.equal(tampered.code, 0, tampered.stderr);
      await assert.rejects(store.materialize(records[1], `${dir}/energy.csv`), (error: unknown) => {
        assert.ok(error instanceof ArtifactIntegrityError);
        assert.equal(error.actual, sha256("day,kwh\n1,41\n"));
        return true;
      });
      assert.equal(await Deno.stat(`${dir}/energy.csv`).catch(() => undefined), undefined);
      await store.materialize(records[0], `${dir}/data.bin`);
      assert.deepEqual(await Deno.readFile(`${dir}/data.bin`), binary);
    });
  },
});
