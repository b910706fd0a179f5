/**
 * The S3 artifact store: blobs and records as objects in one bucket of an
 * S3-compatible service (AWS S3, MinIO, s3rver), through `npm:minio`.
 *
 * Layout, under an optional key prefix:
 * - `blobs/sha256/<hex>`: content, uploaded once. A put first asks whether
 *   the blob exists (`HEAD`) and uploads only when it does not. The upload
 *   reads a private snapshot of the source, so the bytes stored are exactly
 *   the bytes hashed even if the source changes meanwhile.
 * - `records/<run>/<step>/<name>.json`: one immutable record each; every
 *   segment is escaped (`build[os=linux]` becomes `build!5Bos!3Dlinux!5D`,
 *   `encodeSegment` says why not `%`). It is written with
 *   `If-None-Match: *`, which services that honour it (AWS S3, MinIO) turn
 *   into an atomic create across processes; within one process, writers of
 *   a key are serialised, so servers that ignore the header (s3rver) still
 *   see one winner there.
 * - `pins/<run>`: an object per pinned run.
 *
 * Under Deno a store needs `--allow-net` to the endpoint and
 * `--allow-env=READABLE_STREAM` (read by `readable-stream`, a dependency of
 * `npm:minio`, when it loads). `npm:minio` is loaded on first use, so that
 * importing this module needs no permission. Credentials come from the
 * options, never from the environment.
 *
 * @module
 */

import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { Buffer } from "node:buffer";
import type { Client, ClientOptions } from "npm:minio@8.0.7";
import {
  ArtifactExistsError,
  type ArtifactGcOptions,
  type ArtifactGcResult,
  ArtifactIntegrityError,
  type ArtifactListOptions,
  type ArtifactPutMeta,
  type ArtifactRecord,
  type ArtifactStore,
  contentTypeFor,
  digestHex,
  InvalidArtifactError,
  keptByRetention,
} from "./store.ts";
import { compareRecords, copyHashing, writeAll } from "./_io.ts";

/**
 * A blob stored or touched more recently than this is never swept: a
 * concurrent put may have found it and not yet written the record that
 * references it. Same value as the local engine.
 */
const SWEEP_GRACE_MS = 60 * 60 * 1000;
/**
 * A put that reuses a blob re-stamps it only when its stamp is older than
 * this, half the grace period, so a burst of puts of the same content costs
 * one server-side copy rather than one each, and the stamp still covers
 * every put in flight.
 */
const TOUCH_AFTER_MS = SWEEP_GRACE_MS / 2;
/** Longest encoded key segment kept readable; longer ones are hashed (keys are ≤ 1024 bytes). */
const MAX_SEGMENT = 200;
/** Records read at once by `list` and `gc`. */
const READ_CONCURRENCY = 16;
/**
 * User metadata naming when a blob was stored or last reused, in the
 * store's clock (ms), which is what gc's grace period is measured against;
 * the server's `Last-Modified` is another clock.
 */
const STORED_AT_META = "runnel-stored-at";
const BLOB_CONTENT_TYPE = "application/octet-stream";
const RECORD_CONTENT_TYPE = "application/json";
/** Error codes minio reports for a key that does not exist (`HEAD` has no body, hence two). */
const NOT_FOUND_CODES = new Set(["NotFound", "NoSuchKey"]);
/**
 * What a conditional create answers when the key exists (412) or another
 * conditional write to it is in progress (409, AWS S3).
 */
const LOST_RACE_CODES = new Set(["PreconditionFailed", "ConditionalRequestConflict"]);
/** What a key segment may hold unescaped. */
const SAFE_KEY_CHAR = /^[A-Za-z0-9._-]$/;

/** Options of {@link openS3ArtifactStore}. */
export interface S3ArtifactStoreOptions {
  /**
   * The service URL, e.g. `http://127.0.0.1:9000` or
   * `https://s3.eu-west-1.amazonaws.com`: `https:` turns TLS on, `http:`
   * off; the port defaults to the scheme's.
   */
  endpoint: string;
  /** The bucket; it must exist. */
  bucket: string;
  /** Default `us-east-1`. */
  region?: string;
  accessKey: string;
  secretKey: string;
  /** For temporary credentials. */
  sessionToken?: string;
  /** Key prefix under which every object lives (e.g. `runnel/ci`); default none. */
  prefix?: string;
  /**
   * Path-style requests (`host/bucket/key`), which MinIO and s3rver expect;
   * `false` for virtual-hosted style (`bucket.host/key`). Default `true`.
   */
  pathStyle?: boolean;
  /** Milliseconds since the epoch stamped as `created` on records. Default `Date.now`. */
  clock?: () => number;
  /** Where upload snapshots are written. Default the system's temporary directory. */
  tempDir?: string;
}

/** S3 options the store cannot work with. */
export class S3ConfigError extends Error {
  /** Stable error code. */
  readonly code = "s3_config_invalid";

  /** Builds the error with a sentence saying what was expected. */
  constructor(message: string) {
    super(message);
    this.name = "S3ConfigError";
  }
}

/** The configured bucket does not exist on the service. */
export class S3BucketMissingError extends Error {
  /** Stable error code. */
  readonly code = "s3_bucket_missing";
  readonly bucket: string;

  /** Builds the error from the bucket and the endpoint asked. */
  constructor(bucket: string, endpoint: string) {
    super(`Expected S3 bucket "${bucket}" to exist at ${endpoint}`);
    this.name = "S3BucketMissingError";
    this.bucket = bucket;
  }
}

/**
 * Opens the artifact store kept in an S3 bucket. Nothing is contacted
 * until the first call.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { openS3ArtifactStore, S3ConfigError } from "./s3.ts";
 *
 * const options = {
 *   endpoint: "http://127.0.0.1:9000",
 *   bucket: "artifacts",
 *   accessKey: "minioadmin",
 *   secretKey: "minioadmin",
 *   prefix: "runnel",
 * };
 * // Opening connects to nothing (the first request does), but checks the options.
 * const store = openS3ArtifactStore(options);
 * assert.equal(typeof store.put, "function");
 * assert.throws(
 *   () => openS3ArtifactStore({ ...options, endpoint: "127.0.0.1:9000/artifacts" }),
 *   S3ConfigError,
 * );
 * ```
 */
export function openS3ArtifactStore(options: S3ArtifactStoreOptions): ArtifactStore {
  let url: URL;
  try {
    url = new URL(options.endpoint);
  } catch {
    throw new S3ConfigError(
      `Expected an S3 endpoint URL like "http://127.0.0.1:9000", got "${options.endpoint}"`,
    );
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw new S3ConfigError(
      `Expected an S3 endpoint with scheme http: or https:, got "${options.endpoint}"`,
    );
  }
  if (url.pathname !== "/" || url.search || url.username) {
    throw new S3ConfigError(
      `Expected an S3 endpoint with only a scheme, host and port, got "${options.endpoint}"`,
    );
  }
  if (!options.accessKey || !options.secretKey) {
    throw new S3ConfigError("Expected an access key and a secret key for the S3 artifact store");
  }
  const useSSL = url.protocol === "https:";
  const clientOptions: ClientOptions = {
    endPoint: url.hostname.replace(/^\[(.*)\]$/, "$1"),
    port: url.port ? Number(url.port) : useSSL ? 443 : 80,
    useSSL,
    region: options.region ?? "us-east-1",
    accessKey: options.accessKey,
    secretKey: options.secretKey,
    sessionToken: options.sessionToken,
    pathStyle: options.pathStyle ?? true,
  };
  let client: Promise<Client> | undefined;
  const connect = () =>
    client ??= loadMinio().then(({ Client }) => {
      try {
        return new Client(clientOptions);
      } catch (error) {
        throw new S3ConfigError(
          `Expected valid S3 settings for ${options.endpoint}: ${(error as Error).message}`,
        );
      }
    });
  const prefix = (options.prefix ?? "").replace(/^\/+|\/+$/g, "");
  return new S3ArtifactStore({
    connect,
    bucket: options.bucket,
    endpoint: url.origin,
    prefix: prefix ? `${prefix}/` : "",
    clock: options.clock ?? Date.now,
    tempDir: options.tempDir,
  });
}

/**
 * Encodes one key segment so any id is a safe, unique key part: bytes
 * outside `A-Z a-z 0-9 - _ .` become `!XX` (UTF-8, upper-case hex), and the
 * whole segments "." and ".." are escaped too. Only characters AWS lists as
 * safe in keys are produced; `%` in particular is avoided, because servers
 * that ignore `encoding-type=url` (s3rver) list such keys in a form the
 * client then decodes a second time.
 */
function encodeSegment(value: string, what: string): string {
  if (typeof value !== "string" || value.length === 0) {
    throw new InvalidArtifactError(`Expected a non-empty ${what}, got ${JSON.stringify(value)}`);
  }
  let encoded = "";
  for (const byte of new TextEncoder().encode(value)) {
    const char = String.fromCharCode(byte);
    encoded += SAFE_KEY_CHAR.test(char)
      ? char
      : `!${byte.toString(16).toUpperCase().padStart(2, "0")}`;
  }
  // "." and ".." would be folded away by tools that treat keys as paths.
  if (encoded === "." || encoded === "..") encoded = encoded.replaceAll(".", "!2E");
  if (encoded.length <= MAX_SEGMENT) return encoded;
  // "!!" never occurs in an escaped segment, so a hashed one cannot equal another's encoding.
  const hash = createHash("sha256").update(value).digest("hex");
  return `${encoded.slice(0, MAX_SEGMENT - 66)}!!${hash}`;
}

type Minio = typeof import("npm:minio@8.0.7");
let minio: Promise<Minio> | undefined;

/** Loads `npm:minio` once, on first use (see the module note on permissions). */
function loadMinio(): Promise<Minio> {
  return minio ??= import("npm:minio@8.0.7");
}

function errorCode(error: unknown): string | undefined {
  if (typeof error !== "object" || error === null || !("code" in error)) return undefined;
  return String(error.code);
}

function isNotFound(error: unknown): boolean {
  return NOT_FOUND_CODES.has(errorCode(error) ?? "");
}

/** Runs `work` over `items` with at most `limit` in flight; results keep the items' order. */
async function mapLimit<T, R>(
  items: readonly T[],
  limit: number,
  work: (item: T) => Promise<R>,
): Promise<R[]> {
  const results = new Array<R>(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const index = next++;
      results[index] = await work(items[index]);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return results;
}

interface StoreSettings {
  /** The client, made on first use. */
  connect: () => Promise<Client>;
  bucket: string;
  endpoint: string;
  /** Empty, or ends with "/". */
  prefix: string;
  clock: () => number;
  tempDir: string | undefined;
}

interface ListedObject {
  key: string;
  size: number;
}

class S3ArtifactStore implements ArtifactStore {
  readonly #connect: () => Promise<Client>;
  readonly #bucket: string;
  readonly #endpoint: string;
  readonly #prefix: string;
  readonly #clock: () => number;
  readonly #tempDir: string | undefined;
  /** Tails of the per-key queues that serialise this process's writers of one key. */
  readonly #queues = new Map<string, Promise<void>>();

  constructor(settings: StoreSettings) {
    this.#connect = settings.connect;
    this.#bucket = settings.bucket;
    this.#endpoint = settings.endpoint;
    this.#prefix = settings.prefix;
    this.#clock = settings.clock;
    this.#tempDir = settings.tempDir;
  }

  #blobKey(digest: string): string {
    return `${this.#prefix}blobs/sha256/${digestHex(digest)}`;
  }

  #runPrefix(run: string): string {
    return `${this.#prefix}records/${encodeSegment(run, "run id")}/`;
  }

  #recordKey(run: string, step: string, name: string): string {
    return `${this.#runPrefix(run)}${encodeSegment(step, "step id")}/` +
      `${encodeSegment(name, "artifact name")}.json`;
  }

  #pinKey(run: string): string {
    return `${this.#prefix}pins/${encodeSegment(run, "run id")}`;
  }

  /** Turns a missing bucket into an error that names it; other errors pass through. */
  #explain(error: unknown): unknown {
    return errorCode(error) === "NoSuchBucket"
      ? new S3BucketMissingError(this.#bucket, this.#endpoint)
      : error;
  }

  /** Runs `body` after every earlier call for `key` in this process has settled. */
  async #exclusive<T>(key: string, body: () => Promise<T>): Promise<T> {
    const previous = this.#queues.get(key) ?? Promise.resolve();
    const { promise: done, resolve: release } = Promise.withResolvers<void>();
    const tail = previous.then(() => done);
    this.#queues.set(key, tail);
    await previous;
    try {
      return await body();
    } finally {
      release();
      if (this.#queues.get(key) === tail) this.#queues.delete(key);
    }
  }

  /** Metadata of an object, or undefined when there is none. */
  async #stat(key: string) {
    const client = await this.#connect();
    try {
      return await client.statObject(this.#bucket, key);
    } catch (error) {
      if (isNotFound(error)) return undefined;
      throw this.#explain(error);
    }
  }

  async #readJson<T>(key: string): Promise<T | undefined> {
    const client = await this.#connect();
    let stream;
    try {
      stream = await client.getObject(this.#bucket, key);
    } catch (error) {
      if (isNotFound(error)) return undefined;
      throw this.#explain(error);
    }
    const chunks: Buffer[] = [];
    for await (const chunk of stream) chunks.push(chunk as Buffer);
    return JSON.parse(Buffer.concat(chunks).toString("utf8")) as T;
  }

  async #listObjects(prefix: string): Promise<ListedObject[]> {
    const client = await this.#connect();
    const objects: ListedObject[] = [];
    try {
      for await (const item of client.listObjectsV2(this.#bucket, prefix, true)) {
        if (item.name !== undefined) objects.push({ key: item.name, size: item.size });
      }
    } catch (error) {
      throw this.#explain(error);
    }
    return objects;
  }

  async #removeObjects(keys: string[]): Promise<void> {
    if (keys.length === 0) return;
    const client = await this.#connect();
    let responses;
    try {
      responses = await client.removeObjects(this.#bucket, keys);
    } catch (error) {
      throw this.#explain(error);
    }
    const failed = responses.find((response) => response?.Error);
    if (failed?.Error) {
      throw new Error(
        `Expected S3 to delete ${failed.Error.Key}, got ${failed.Error.Code}: ${failed.Error.Message}`,
      );
    }
  }

  async put(file: string, meta: ArtifactPutMeta): Promise<ArtifactRecord> {
    const recordKey = this.#recordKey(meta.run, meta.step, meta.name);
    const { digest, size } = await this.#storeBlob(file);
    const record: ArtifactRecord = {
      run: meta.run,
      step: meta.step,
      name: meta.name,
      digest,
      size,
      contentType: meta.contentType ?? contentTypeFor(meta.name),
      created: this.#clock(),
      sourceStep: meta.step,
    };
    if (meta.attemptId !== undefined) record.attemptId = meta.attemptId;
    return await this.#exclusive(recordKey, () => this.#createRecord(recordKey, record));
  }

  /** Hashes `file` and uploads its content unless the bucket holds it already. */
  async #storeBlob(file: string): Promise<{ digest: string; size: number }> {
    const hashed = await hashFile(file);
    await this.#exclusive(this.#blobKey(hashed.digest), async () => {
      const key = this.#blobKey(hashed.digest);
      const existing = await this.#stat(key);
      if (existing) {
        await this.#touchIfStale(key, existing.metaData?.[STORED_AT_META]);
        return;
      }
      await this.#uploadSnapshot(file, key, hashed.digest);
    });
    return hashed;
  }

  /**
   * Copies `file` aside while hashing it again, then uploads the copy: what
   * is stored under the digest is exactly what was hashed, even if `file`
   * changed since the first read.
   */
  async #uploadSnapshot(file: string, key: string, digest: string): Promise<void> {
    const snapshot = await Deno.makeTempFile({ dir: this.#tempDir, prefix: "runnel-blob-" });
    try {
      const source = await Deno.open(file, { read: true });
      let copied: { digest: string; size: number };
      try {
        const target = await Deno.open(snapshot, { write: true, truncate: true });
        try {
          copied = await copyHashing(source, target);
        } finally {
          target.close();
        }
      } finally {
        source.close();
      }
      if (copied.digest !== digest) {
        throw new InvalidArtifactError(
          `Expected ${file} to stay unchanged while it was stored, but its content changed`,
        );
      }
      const client = await this.#connect();
      const body = createReadStream(snapshot);
      try {
        await client.putObject(this.#bucket, key, body, copied.size, {
          "Content-Type": BLOB_CONTENT_TYPE,
          [STORED_AT_META]: String(this.#clock()),
        });
      } catch (error) {
        throw this.#explain(error);
      } finally {
        // Closes the file when the request failed before reading it to the end.
        body.destroy();
      }
    } finally {
      await Deno.remove(snapshot).catch(() => {});
    }
  }

  /**
   * Re-stamps a reused blob so that a concurrent gc's grace period covers
   * the record about to reference it (a server-side copy onto itself, the
   * S3 way to change metadata).
   */
  async #touchIfStale(key: string, storedAt: string | undefined): Promise<void> {
    const now = this.#clock();
    if (storedAt !== undefined && now - Number(storedAt) < TOUCH_AFTER_MS) return;
    const [client, { CopyDestinationOptions, CopySourceOptions }] = await Promise.all([
      this.#connect(),
      loadMinio(),
    ]);
    try {
      await client.copyObject(
        new CopySourceOptions({ Bucket: this.#bucket, Object: key }),
        new CopyDestinationOptions({
          Bucket: this.#bucket,
          Object: key,
          MetadataDirective: "REPLACE",
          UserMetadata: { [STORED_AT_META]: String(now) },
          Headers: { "Content-Type": BLOB_CONTENT_TYPE },
        }),
      );
    } catch (error) {
      throw this.#explain(error);
    }
  }

  /** Writes a record unless its key exists; an existing key must carry the same digest. */
  async #createRecord(key: string, record: ArtifactRecord): Promise<ArtifactRecord> {
    const existing = await this.#readJson<ArtifactRecord>(key);
    if (existing) return sameOrThrow(existing, record);
    const body = Buffer.from(JSON.stringify(record, null, 2) + "\n");
    const client = await this.#connect();
    try {
      await client.putObject(this.#bucket, key, body, body.length, {
        "Content-Type": RECORD_CONTENT_TYPE,
        // An atomic create where the service supports it: a racing writer gets 412.
        "If-None-Match": "*",
      });
    } catch (error) {
      if (!LOST_RACE_CODES.has(errorCode(error) ?? "")) throw this.#explain(error);
      const winner = await this.#readJson<ArtifactRecord>(key);
      if (!winner) throw error;
      return sameOrThrow(winner, record);
    }
    return record;
  }

  get(run: string, step: string, name: string): Promise<ArtifactRecord | undefined> {
    return this.#readJson<ArtifactRecord>(this.#recordKey(run, step, name));
  }

  async materialize(record: ArtifactRecord, dest: string): Promise<void> {
    const client = await this.#connect();
    let stream;
    try {
      stream = await client.getObject(this.#bucket, this.#blobKey(record.digest));
    } catch (error) {
      if (isNotFound(error)) throw new ArtifactIntegrityError(record, "missing");
      throw this.#explain(error);
    }
    // Written beside dest and renamed only once verified: a corrupt blob never lands at dest.
    const tmpPath = `${dest}.tmp-${crypto.randomUUID()}`;
    try {
      const target = await Deno.open(tmpPath, { write: true, createNew: true });
      const hash = createHash("sha256");
      try {
        for await (const chunk of stream) {
          const bytes = chunk as Uint8Array;
          hash.update(bytes);
          await writeAll(target, bytes);
        }
      } finally {
        target.close();
      }
      const digest = `sha256:${hash.digest("hex")}`;
      if (digest !== record.digest) throw new ArtifactIntegrityError(record, digest);
      await Deno.rename(tmpPath, dest);
    } catch (error) {
      stream.destroy();
      await Deno.remove(tmpPath).catch(() => {});
      throw error;
    }
  }

  async hasBlob(digest: string): Promise<boolean> {
    return (await this.#stat(this.#blobKey(digest))) !== undefined;
  }

  async list(options: ArtifactListOptions = {}): Promise<ArtifactRecord[]> {
    const prefix = options.run === undefined
      ? `${this.#prefix}records/`
      : this.#runPrefix(options.run);
    const keys = (await this.#listObjects(prefix))
      .map((object) => object.key)
      .filter((key) => key.endsWith(".json"));
    // A record removed between the listing and the read (a concurrent gc) is skipped.
    const records = await mapLimit(
      keys,
      READ_CONCURRENCY,
      (key) => this.#readJson<ArtifactRecord>(key),
    );
    return records.filter((record) => record !== undefined).sort(compareRecords);
  }

  async pin(run: string): Promise<void> {
    const body = Buffer.from(run);
    const client = await this.#connect();
    try {
      await client.putObject(this.#bucket, this.#pinKey(run), body, body.length, {
        "Content-Type": "text/plain",
      });
    } catch (error) {
      throw this.#explain(error);
    }
  }

  async unpin(run: string): Promise<void> {
    const client = await this.#connect();
    try {
      // Deleting a key that does not exist succeeds in S3.
      await client.removeObject(this.#bucket, this.#pinKey(run));
    } catch (error) {
      throw this.#explain(error);
    }
  }

  async isPinned(run: string): Promise<boolean> {
    return (await this.#stat(this.#pinKey(run))) !== undefined;
  }

  async gc(options: ArtifactGcOptions): Promise<ArtifactGcResult> {
    const dryRun = options.dryRun ?? false;
    const result: ArtifactGcResult = { recordsRemoved: 0, blobsRemoved: 0, bytesFreed: 0 };
    const pinned = new Set(
      (await this.#listObjects(`${this.#prefix}pins/`)).map((object) => object.key),
    );
    // Mark: every digest a surviving record references.
    const referenced = new Set<string>();
    const expired: string[] = [];
    for (const record of await this.list()) {
      if (pinned.has(this.#pinKey(record.run)) || keptByRetention(record, options)) {
        referenced.add(record.digest);
        continue;
      }
      expired.push(this.#recordKey(record.run, record.step, record.name));
    }
    result.recordsRemoved = expired.length;
    if (!dryRun) await this.#removeObjects(expired);
    // Sweep: blobs nothing references, past the grace period for in-flight puts.
    const blobsPrefix = `${this.#prefix}blobs/sha256/`;
    const candidates = (await this.#listObjects(blobsPrefix))
      .filter((object) => !referenced.has(`sha256:${object.key.slice(blobsPrefix.length)}`));
    const swept = await mapLimit(candidates, READ_CONCURRENCY, async (object) => {
      const info = await this.#stat(object.key);
      if (!info) return undefined;
      const storedAt = Number(info.metaData?.[STORED_AT_META] ?? info.lastModified.getTime());
      return storedAt > options.now - SWEEP_GRACE_MS ? undefined : object;
    });
    const doomed = swept.filter((object) => object !== undefined);
    result.blobsRemoved = doomed.length;
    result.bytesFreed = doomed.reduce((sum, object) => sum + object.size, 0);
    if (!dryRun) await this.#removeObjects(doomed.map((object) => object.key));
    return result;
  }
}

function sameOrThrow(existing: ArtifactRecord, record: ArtifactRecord): ArtifactRecord {
  if (existing.digest !== record.digest) throw new ArtifactExistsError(existing, record.digest);
  return existing;
}

async function hashFile(file: string): Promise<{ digest: string; size: number }> {
  const source = await Deno.open(file, { read: true });
  try {
    return await copyHashing(source, undefined);
  } finally {
    source.close();
  }
}
