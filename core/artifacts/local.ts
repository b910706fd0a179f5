/**
 * The local artifact store: blobs and records as files under one root
 * (runnel uses `.runnel/artifacts`).
 *
 * Layout:
 * - `blobs/sha256/<2 hex>/<62 hex>`: content, written to a temporary file,
 *   fsynced, renamed into place and made read-only.
 * - `records/<run>/<step>/<name>.json`: one immutable record each; every
 *   segment is percent-encoded (step ids such as `build[os=linux,arch=x64]`
 *   carry `[`, `=`, `,`). A record is created with a hard link, which fails
 *   if the name exists, so two racing writers cannot both win.
 * - `pins/<run>`: an empty file per pinned run.
 *
 * @module
 */

import { createHash } from "node:crypto";
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
import { compareRecords, copyHashing } from "./_io.ts";

/**
 * A blob younger than this is never swept: a concurrent put may have stored
 * it and not yet written the record that references it.
 */
const SWEEP_GRACE_MS = 60 * 60 * 1000;
/** Longest encoded path segment kept readable; longer ones are hashed (NAME_MAX is 255). */
const MAX_SEGMENT = 200;

/** Options of {@link openLocalArtifactStore}. */
export interface LocalArtifactStoreOptions {
  /** Milliseconds since the epoch stamped as `created` on records. Default `Date.now`. */
  clock?: () => number;
}

/**
 * Opens the artifact store rooted at `root` (created on first write).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { openLocalArtifactStore } from "./local.ts";
 *
 * const root = await Deno.makeTempDir();
 * const store = openLocalArtifactStore(root);
 * assert.equal(await store.isPinned("run-1"), false);
 * await store.pin("run-1");
 * assert.equal(await store.isPinned("run-1"), true);
 * await Deno.remove(root, { recursive: true });
 * ```
 */
export function openLocalArtifactStore(
  root: string,
  options: LocalArtifactStoreOptions = {},
): ArtifactStore {
  return new LocalArtifactStore(root, options.clock ?? Date.now);
}

/** Percent-encodes one path segment so any id is a safe, unique file name. */
function encodeSegment(value: string, what: string): string {
  if (typeof value !== "string" || value.length === 0) {
    throw new InvalidArtifactError(`Expected a non-empty ${what}, got ${JSON.stringify(value)}`);
  }
  // encodeURIComponent leaves "." alone; "." and ".." must not name directories.
  const encoded = encodeURIComponent(value).replaceAll(".", "%2E").replaceAll("*", "%2A");
  if (encoded.length <= MAX_SEGMENT) return encoded;
  const hash = createHash("sha256").update(value).digest("hex");
  return `${encoded.slice(0, MAX_SEGMENT - 66)}~${hash}`;
}

function tempSuffix(): string {
  return `.tmp-${crypto.randomUUID()}`;
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}

async function readJson<T>(path: string): Promise<T | undefined> {
  try {
    return JSON.parse(await Deno.readTextFile(path)) as T;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return undefined;
    throw error;
  }
}

async function readDirNames(path: string): Promise<string[]> {
  const names: string[] = [];
  try {
    for await (const entry of Deno.readDir(path)) names.push(entry.name);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return [];
    throw error;
  }
  return names.sort();
}

/** Makes a directory entry durable (a rename or link is only durable once its directory is). */
async function fsyncDirectory(path: string): Promise<void> {
  const directory = await Deno.open(path, { read: true });
  try {
    await directory.sync();
  } catch {
    // Some filesystems refuse fsync on directories; the data itself is synced.
  } finally {
    directory.close();
  }
}

class LocalArtifactStore implements ArtifactStore {
  readonly #root: string;
  readonly #clock: () => number;

  constructor(root: string, clock: () => number) {
    this.#root = root;
    this.#clock = clock;
  }

  #blobPath(digest: string): string {
    const hex = digestHex(digest);
    return `${this.#root}/blobs/sha256/${hex.slice(0, 2)}/${hex.slice(2)}`;
  }

  #recordDir(run: string, step?: string): string {
    const runDir = `${this.#root}/records/${encodeSegment(run, "run id")}`;
    return step === undefined ? runDir : `${runDir}/${encodeSegment(step, "step id")}`;
  }

  #recordPath(run: string, step: string, name: string): string {
    return `${this.#recordDir(run, step)}/${encodeSegment(name, "artifact name")}.json`;
  }

  #pinPath(run: string): string {
    return `${this.#root}/pins/${encodeSegment(run, "run id")}`;
  }

  async put(file: string, meta: ArtifactPutMeta): Promise<ArtifactRecord> {
    const recordPath = this.#recordPath(meta.run, meta.step, meta.name);
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
    return await this.#createRecord(recordPath, record);
  }

  /** Hashes `file` into a temporary blob and moves it into place unless it is there already. */
  async #storeBlob(file: string): Promise<{ digest: string; size: number }> {
    const tmpDir = `${this.#root}/blobs/tmp`;
    await Deno.mkdir(tmpDir, { recursive: true });
    const tmpPath = `${tmpDir}/blob${tempSuffix()}`;
    const source = await Deno.open(file, { read: true });
    let result: { digest: string; size: number };
    try {
      const target = await Deno.open(tmpPath, { write: true, createNew: true, mode: 0o644 });
      try {
        result = await copyHashing(source, target);
        await target.sync();
      } finally {
        target.close();
      }
    } catch (error) {
      await Deno.remove(tmpPath).catch(() => {});
      throw error;
    } finally {
      source.close();
    }
    const blobPath = this.#blobPath(result.digest);
    if (await exists(blobPath)) {
      // Stored already (dedup). Touch it so a concurrent gc's grace period
      // covers the record about to reference it.
      await Deno.remove(tmpPath);
      await this.#touch(blobPath);
      return result;
    }
    const blobDir = blobPath.slice(0, blobPath.lastIndexOf("/"));
    try {
      await Deno.mkdir(blobDir, { recursive: true });
      await Deno.chmod(tmpPath, 0o444);
      // Concurrent puts of the same content rename identical files: last one wins, harmlessly.
      await Deno.rename(tmpPath, blobPath);
    } catch (error) {
      // gc sweeps only blobs/sha256: a copy left in blobs/tmp (a full disk
      // refusing the shard's directory) would stay for good.
      await Deno.remove(tmpPath).catch(() => {});
      throw error;
    }
    await this.#touch(blobPath);
    await fsyncDirectory(blobDir);
    return result;
  }

  /** Stamps a blob's mtime with the store's clock, the time gc's grace period is measured in. */
  async #touch(blobPath: string): Promise<void> {
    const now = new Date(this.#clock());
    await Deno.utime(blobPath, now, now).catch(() => {});
  }

  /** Writes a record unless its key exists; an existing key must carry the same digest. */
  async #createRecord(recordPath: string, record: ArtifactRecord): Promise<ArtifactRecord> {
    const existing = await readJson<ArtifactRecord>(recordPath);
    if (existing) return this.#sameOrThrow(existing, record);
    const recordDir = recordPath.slice(0, recordPath.lastIndexOf("/"));
    await Deno.mkdir(recordDir, { recursive: true });
    const tmpPath = `${recordPath}${tempSuffix()}`;
    const body = new TextEncoder().encode(JSON.stringify(record, null, 2) + "\n");
    const file = await Deno.open(tmpPath, { write: true, createNew: true, mode: 0o444 });
    try {
      await file.write(body);
      await file.sync();
    } finally {
      file.close();
    }
    try {
      // link(2) fails if the name exists: exactly one of racing writers creates the record.
      await Deno.link(tmpPath, recordPath);
    } catch (error) {
      if (!(error instanceof Deno.errors.AlreadyExists)) throw error;
      const winner = await readJson<ArtifactRecord>(recordPath);
      if (!winner) throw error;
      return this.#sameOrThrow(winner, record);
    } finally {
      await Deno.remove(tmpPath).catch(() => {});
    }
    await fsyncDirectory(recordDir);
    return record;
  }

  #sameOrThrow(existing: ArtifactRecord, record: ArtifactRecord): ArtifactRecord {
    if (existing.digest !== record.digest) throw new ArtifactExistsError(existing, record.digest);
    return existing;
  }

  get(run: string, step: string, name: string): Promise<ArtifactRecord | undefined> {
    return readJson<ArtifactRecord>(this.#recordPath(run, step, name));
  }

  async materialize(record: ArtifactRecord, dest: string): Promise<void> {
    let source: Deno.FsFile;
    try {
      source = await Deno.open(this.#blobPath(record.digest), { read: true });
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) {
        throw new ArtifactIntegrityError(record, "missing");
      }
      throw error;
    }
    // Written beside dest and renamed only once verified: a corrupt blob never lands at dest.
    const tmpPath = `${dest}${tempSuffix()}`;
    try {
      const target = await Deno.open(tmpPath, { write: true, createNew: true });
      let digest: string;
      try {
        ({ digest } = await copyHashing(source, target));
      } finally {
        target.close();
      }
      if (digest !== record.digest) throw new ArtifactIntegrityError(record, digest);
      await Deno.rename(tmpPath, dest);
    } catch (error) {
      await Deno.remove(tmpPath).catch(() => {});
      throw error;
    } finally {
      source.close();
    }
  }

  hasBlob(digest: string): Promise<boolean> {
    return exists(this.#blobPath(digest));
  }

  async list(options: ArtifactListOptions = {}): Promise<ArtifactRecord[]> {
    const recordsDir = `${this.#root}/records`;
    const runDirs = options.run === undefined
      ? (await readDirNames(recordsDir)).map((name) => `${recordsDir}/${name}`)
      : [this.#recordDir(options.run)];
    const records: ArtifactRecord[] = [];
    for (const runDir of runDirs) {
      for (const stepName of await readDirNames(runDir)) {
        for (const fileName of await readDirNames(`${runDir}/${stepName}`)) {
          if (!fileName.endsWith(".json")) continue; // skips in-flight temporary files
          const record = await readJson<ArtifactRecord>(`${runDir}/${stepName}/${fileName}`);
          if (record) records.push(record);
        }
      }
    }
    return records.sort(compareRecords);
  }

  async pin(run: string): Promise<void> {
    const path = this.#pinPath(run);
    await Deno.mkdir(`${this.#root}/pins`, { recursive: true });
    await Deno.writeTextFile(path, run);
  }

  async unpin(run: string): Promise<void> {
    await Deno.remove(this.#pinPath(run)).catch((error) => {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
    });
  }

  isPinned(run: string): Promise<boolean> {
    return exists(this.#pinPath(run));
  }

  async gc(options: ArtifactGcOptions): Promise<ArtifactGcResult> {
    const dryRun = options.dryRun ?? false;
    const result: ArtifactGcResult = { recordsRemoved: 0, blobsRemoved: 0, bytesFreed: 0 };
    // Mark: every digest a surviving record references.
    const referenced = new Set<string>();
    const pinned = new Map<string, boolean>();
    for (const record of await this.list()) {
      if (!pinned.has(record.run)) pinned.set(record.run, await this.isPinned(record.run));
      if (pinned.get(record.run) || keptByRetention(record, options)) {
        referenced.add(record.digest);
        continue;
      }
      result.recordsRemoved++;
      if (!dryRun) {
        await Deno.remove(this.#recordPath(record.run, record.step, record.name));
        await this.#removeEmptyDirs(record.run, record.step);
      }
    }
    // Sweep: blobs nothing references, past the grace period for in-flight puts.
    const shardsDir = `${this.#root}/blobs/sha256`;
    for (const shard of await readDirNames(shardsDir)) {
      for (const rest of await readDirNames(`${shardsDir}/${shard}`)) {
        const digest = `sha256:${shard}${rest}`;
        if (referenced.has(digest)) continue;
        const path = `${shardsDir}/${shard}/${rest}`;
        const info = await Deno.stat(path).catch(() => undefined);
        if (!info || (info.mtime?.getTime() ?? 0) > options.now - SWEEP_GRACE_MS) continue;
        result.blobsRemoved++;
        result.bytesFreed += info.size;
        if (!dryRun) await Deno.remove(path).catch(() => {});
      }
    }
    return result;
  }

  async #removeEmptyDirs(run: string, step: string): Promise<void> {
    for (const dir of [this.#recordDir(run, step), this.#recordDir(run)]) {
      // Fails harmlessly when the directory still has entries.
      await Deno.remove(dir).catch(() => {});
    }
  }
}
