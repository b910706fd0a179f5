/**
 * The artifact store interface: content-addressed blobs plus immutable
 * records naming them, engine-agnostic (local disk, S3-compatible).
 *
 * A record `{run}/{step}/{name}` is written once and never changes; its blob
 * is addressed by `sha256:<hex>` and stored once however many records name
 * it. Every read verifies the digest.
 *
 * @module
 */

/** An immutable record of one produced artifact. */
export interface ArtifactRecord {
  run: string;
  step: string;
  name: string;
  /** `sha256:<hex>` of the content. */
  digest: string;
  size: number;
  contentType: string;
  /** Milliseconds since the epoch when the record was written. */
  created: number;
  /** The step that produced it (same as `step`; kept for consumers that copy records). */
  sourceStep: string;
  /** The attempt that produced it, when known. */
  attemptId?: string;
}

/** What {@link ArtifactStore.put} needs beside the file. */
export interface ArtifactPutMeta {
  run: string;
  step: string;
  name: string;
  /** Defaults to the type guessed from the name's extension. */
  contentType?: string;
  attemptId?: string;
}

/** Options of {@link ArtifactStore.gc}. */
export interface ArtifactGcOptions {
  /** The current time in ms since the epoch (injected so tests control age). */
  now: number;
  /** Records older than this are dropped unless their run is pinned. Default 14 days. */
  retentionMs?: number;
  /** Count what would go without removing anything. */
  dryRun?: boolean;
  /**
   * A record's own retention (its pipeline's or step's `retention:`), when
   * it has one: ms, or forever; undefined keeps `retentionMs`.
   */
  retentionOf?: (record: ArtifactRecord) => number | "forever" | undefined;
}

/** Whether `gc` keeps a record: its own retention, else `retentionMs`, from its creation. */
export function keptByRetention(record: ArtifactRecord, options: ArtifactGcOptions): boolean {
  const own = options.retentionOf?.(record);
  if (own === "forever") return true;
  return record.created + (own ?? options.retentionMs ?? DEFAULT_RETENTION_MS) > options.now;
}

/** What {@link ArtifactStore.gc} removed (or would remove, in a dry run). */
export interface ArtifactGcResult {
  recordsRemoved: number;
  blobsRemoved: number;
  bytesFreed: number;
}

/** Options of {@link ArtifactStore.list}. */
export interface ArtifactListOptions {
  /** Only the records of this run. */
  run?: string;
}

/** A content-addressed artifact store. */
export interface ArtifactStore {
  /**
   * Hashes `file`, stores its blob once and writes an immutable record. The
   * same key with the same digest returns the existing record; with another
   * digest it throws {@link ArtifactExistsError}.
   */
  put(file: string, meta: ArtifactPutMeta): Promise<ArtifactRecord>;
  /** Reads a record. */
  get(run: string, step: string, name: string): Promise<ArtifactRecord | undefined>;
  /**
   * Copies a record's blob to `dest`, verifying its digest while reading;
   * throws {@link ArtifactIntegrityError} on a mismatch or a missing blob.
   */
  materialize(record: ArtifactRecord, dest: string): Promise<void>;
  /** Whether a blob with this digest is stored. */
  hasBlob(digest: string): Promise<boolean>;
  /** Lists records, sorted by run, step and name. */
  list(options?: ArtifactListOptions): Promise<ArtifactRecord[]>;
  /** Keeps a run's records from garbage collection. */
  pin(run: string): Promise<void>;
  /** Lets a run's records be collected again. */
  unpin(run: string): Promise<void>;
  /** Whether a run is pinned. */
  isPinned(run: string): Promise<boolean>;
  /**
   * Drops the records of unpinned runs older than the retention, then the
   * blobs no remaining record references (mark and sweep).
   */
  gc(options: ArtifactGcOptions): Promise<ArtifactGcResult>;
}

/** Default retention of artifacts: the spec's 14 days. */
export const DEFAULT_RETENTION_MS = 14 * 24 * 60 * 60 * 1000;

/** A record key that already names different content. */
export class ArtifactExistsError extends Error {
  /** Stable error code. */
  readonly code = "artifact_exists";
  /** The record already stored. */
  readonly existing: ArtifactRecord;
  /** Digest of the content that was refused. */
  readonly digest: string;

  /** Builds the error from the stored record and the refused digest. */
  constructor(existing: ArtifactRecord, digest: string) {
    super(
      `Expected artifact ${existing.run}/${existing.step}/${existing.name} to be written once, ` +
        `but it already holds ${existing.digest} and the new content is ${digest}`,
    );
    this.name = "ArtifactExistsError";
    this.existing = existing;
    this.digest = digest;
  }
}

/** A blob whose content does not match its record's digest, or is gone. */
export class ArtifactIntegrityError extends Error {
  /** Stable error code. */
  readonly code = "artifact_corrupt";
  readonly run: string;
  readonly step: string;
  readonly artifact: string;
  /** The record's digest. */
  readonly expected: string;
  /** The digest actually read, or `"missing"` when the blob is gone. */
  readonly actual: string;

  /** Builds the error from the record and what was read. */
  constructor(record: ArtifactRecord, actual: string) {
    const found = actual === "missing" ? "the blob is missing" : `read ${actual}`;
    super(
      `Expected artifact ${record.run}/${record.step}/${record.name} to have digest ` +
        `${record.digest}, but ${found}`,
    );
    this.name = "ArtifactIntegrityError";
    this.run = record.run;
    this.step = record.step;
    this.artifact = record.name;
    this.expected = record.digest;
    this.actual = actual;
  }
}

/** An artifact key or digest the store cannot accept. */
export class InvalidArtifactError extends Error {
  /** Stable error code. */
  readonly code = "invalid_artifact";

  /** Builds the error with a sentence saying what was expected. */
  constructor(message: string) {
    super(message);
    this.name = "InvalidArtifactError";
  }
}

const CONTENT_TYPES: Record<string, string> = {
  csv: "text/csv",
  tsv: "text/tab-separated-values",
  json: "application/json",
  ndjson: "application/x-ndjson",
  jsonl: "application/x-ndjson",
  txt: "text/plain",
  log: "text/plain",
  md: "text/markdown",
  html: "text/html",
  htm: "text/html",
  css: "text/css",
  js: "text/javascript",
  ts: "text/typescript",
  xml: "application/xml",
  yaml: "application/yaml",
  yml: "application/yaml",
  svg: "image/svg+xml",
  png: "image/png",
  jpg: "image/jpeg",
  jpeg: "image/jpeg",
  gif: "image/gif",
  webp: "image/webp",
  pdf: "application/pdf",
  zip: "application/zip",
  gz: "application/gzip",
  tgz: "application/gzip",
  tar: "application/x-tar",
  parquet: "application/vnd.apache.parquet",
  wasm: "application/wasm",
};

/**
 * The content type for a file name, from its extension.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { contentTypeFor } from "./store.ts";
 *
 * assert.equal(contentTypeFor("energy.csv"), "text/csv");
 * assert.equal(contentTypeFor("model.bin"), "application/octet-stream");
 * ```
 */
export function contentTypeFor(name: string): string {
  const dot = name.lastIndexOf(".");
  const extension = dot >= 0 ? name.slice(dot + 1).toLowerCase() : "";
  return CONTENT_TYPES[extension] ?? "application/octet-stream";
}

const DIGEST_PATTERN = /^sha256:[0-9a-f]{64}$/;

/**
 * Checks a digest is `sha256:<64 lowercase hex>` and returns its hex part.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { digestHex } from "./store.ts";
 *
 * assert.equal(digestHex("sha256:" + "0".repeat(64)), "0".repeat(64));
 * assert.throws(() => digestHex("md5:0"), /Expected a digest like "sha256:<64 hex>"/);
 * ```
 */
export function digestHex(digest: string): string {
  if (!DIGEST_PATTERN.test(digest)) {
    throw new InvalidArtifactError(`Expected a digest like "sha256:<64 hex>", got "${digest}"`);
  }
  return digest.slice("sha256:".length);
}
