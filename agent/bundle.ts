/**
 * The pipeline directory, shipped with a run: `runnel submit` packs the
 * files next to the pipeline (step modules and what they import), the
 * server keeps them in the store by content digest, the agent's server
 * sends them with the first assignment of a run on each stream, and the
 * agent unpacks them once per digest and runs the steps there. So a deno
 * step's module need not exist at the same path on every worker.
 *
 * @module
 */

import { createHash } from "node:crypto";
import { Buffer } from "node:buffer";
import type { Store, TxnOp } from "../consensus/store.ts";
import type { ArtifactStore } from "../core/artifacts/store.ts";

/** Files of a pipeline directory: relative path → base64 content. */
export interface PipelineBundle {
  /** `sha256:<hex>` over the sorted paths and contents. */
  digest: string;
  files: Record<string, string>;
}

/** The most a bundle may hold (etcd is not a file server). */
export const MAX_BUNDLE_BYTES = 8 * 1024 * 1024;
/** The most files a bundle may hold. */
export const MAX_BUNDLE_FILES = 2_000;
/** Bundle bytes per store value (etcd's request limit is 1.5 MiB). */
const CHUNK_CHARS = 512 * 1024;

/** A directory that cannot be shipped as it is. */
export class BundleError extends Error {
  /** Stable error code. */
  readonly code = "bad_bundle";

  /** Builds the error from a full sentence. */
  constructor(message: string) {
    super(message);
    this.name = "BundleError";
  }
}

/** The digest of a set of files, independent of their order. */
export function bundleDigest(files: Record<string, string>): string {
  const hash = createHash("sha256");
  for (const path of Object.keys(files).sort()) {
    hash.update(path).update("\0").update(files[path]).update("\0");
  }
  return `sha256:${hash.digest("hex")}`;
}

/**
 * Packs a pipeline directory: every regular file below it except hidden
 * entries (`.runnel`, `.git`, …) and `node_modules`.
 */
export async function collectBundle(dir: string): Promise<PipelineBundle> {
  const files: Record<string, string> = {};
  let bytes = 0;
  const walk = async (relative: string): Promise<void> => {
    for await (const entry of Deno.readDir(relative ? `${dir}/${relative}` : dir)) {
      if (entry.name.startsWith(".") || entry.name === "node_modules") continue;
      const path = relative ? `${relative}/${entry.name}` : entry.name;
      if (entry.isDirectory) {
        await walk(path);
      } else if (entry.isFile) {
        const content = await Deno.readFile(`${dir}/${path}`);
        bytes += content.length;
        if (bytes > MAX_BUNDLE_BYTES || Object.keys(files).length >= MAX_BUNDLE_FILES) {
          throw new BundleError(
            `Expected the pipeline directory ${dir} to hold at most ${MAX_BUNDLE_FILES} files ` +
              `and ${MAX_BUNDLE_BYTES / 1024 / 1024} MiB to ship with the run; ` +
              "move data to the artifact store or a Docker image",
          );
        }
        files[path] = Buffer.from(content).toString("base64");
      }
    }
  };
  await walk("");
  return { digest: bundleDigest(files), files };
}

/** Checks a bundle received over the wire: its paths stay inside, its digest holds. */
export function checkBundle(bundle: PipelineBundle): void {
  for (const path of Object.keys(bundle.files)) {
    if (path.startsWith("/") || path.split("/").some((part) => part === ".." || part === "")) {
      throw new BundleError(`Expected relative paths inside the bundle, got "${path}"`);
    }
  }
  if (bundleDigest(bundle.files) !== bundle.digest) {
    throw new BundleError(`Expected the bundle's files to match its digest ${bundle.digest}`);
  }
}

/**
 * Where a server keeps shipped bundles. With an artifact store, a bundle is
 * one content-addressed blob there and the state store (etcd) holds nothing
 * of it; without one, the state store keeps it in chunks, under a size
 * budget, because etcd is not a file server: its whole database has a quota
 * (2 GiB by default) and a full one refuses every write of the cluster.
 */
export interface BundleStorage {
  /** The artifact store bundles go to (the agents' shared one, `--artifacts`/`--s3-*`). */
  artifacts?: ArtifactStore;
  /** The most bundle bytes the state store keeps when there is no artifact store. */
  budgetBytes?: number;
}

/**
 * Default budget of bundle bytes in the state store: an eighth of etcd's
 * default 2 GiB quota, so bundles alone can never fill it.
 */
export const DEFAULT_BUNDLE_BUDGET_BYTES = 256 * 1024 * 1024;

/** The artifact run under which bundles are kept, one record per digest. */
export const BUNDLE_ARTIFACT_RUN = ".bundles";
const BUNDLE_ARTIFACT_NAME = "bundle.json";

/** What the state store records of a bundle kept there: `/bundles/<hex>`. */
export interface StoredBundleMeta {
  /** Chunks under `/bundle/<hex>/`. */
  chunks: number;
  /** Characters of the chunks in all. */
  bytes: number;
  /** When it was first kept (ms since the epoch). */
  at: number;
}

/** The prefix of the state store's bundle index (one small value per bundle kept there). */
export const BUNDLE_INDEX_PREFIX = "/bundles/";

/**
 * Keeps a bundle once per digest: in the artifact store when `storage` has
 * one, else in the state store within its budget.
 *
 * @throws {BundleError} when the state store's bundle budget is spent.
 */
export async function putBundle(
  store: Store,
  bundle: PipelineBundle,
  storage: BundleStorage = {},
): Promise<void> {
  const hex = bundle.digest.replace(/^sha256:/, "");
  if (storage.artifacts) {
    if (await storage.artifacts.get(BUNDLE_ARTIFACT_RUN, hex, BUNDLE_ARTIFACT_NAME)) return;
    const file = await Deno.makeTempFile({ prefix: "runnel-bundle-" });
    try {
      await Deno.writeTextFile(file, JSON.stringify(bundle.files));
      await storage.artifacts.put(file, {
        run: BUNDLE_ARTIFACT_RUN,
        step: hex,
        name: BUNDLE_ARTIFACT_NAME,
        contentType: "application/json",
      });
    } finally {
      await Deno.remove(file).catch(() => {});
    }
    return;
  }
  const prefix = bundleKey(bundle.digest);
  if (await store.get(`${prefix}meta`)) return;
  const text = JSON.stringify(bundle.files);
  const budget = storage.budgetBytes ?? DEFAULT_BUNDLE_BUDGET_BYTES;
  const used = await storedBundleBytes(store);
  if (used + text.length > budget) {
    throw new BundleError(
      `Expected the shipped directories kept in the state store to stay within ` +
        `${budget} bytes, but ${used} are kept and this one needs ${text.length}: ` +
        "give the servers an artifact store (--artifacts DIR or --s3-endpoint), " +
        "or wait for the retention of old runs",
    );
  }
  const ops: TxnOp[] = [];
  let chunks = 0;
  for (let at = 0; at < text.length; at += CHUNK_CHARS, chunks++) {
    ops.push({ type: "put", key: `${prefix}${chunks}`, value: text.slice(at, at + CHUNK_CHARS) });
  }
  // The chunks first, then the meta key that says they are complete.
  for (const op of ops) await store.txn({ compare: [], success: [op] });
  const meta: StoredBundleMeta = { chunks, bytes: text.length, at: Date.now() };
  await store.txn({
    compare: [],
    success: [
      { type: "put", key: `${prefix}meta`, value: JSON.stringify(meta) },
      { type: "put", key: `${BUNDLE_INDEX_PREFIX}${hex}`, value: JSON.stringify(meta) },
    ],
  });
}

/** Bundle bytes the state store keeps (from its small index, not the chunks). */
export async function storedBundleBytes(store: Store): Promise<number> {
  const { items } = await store.list(BUNDLE_INDEX_PREFIX);
  return items.reduce((sum, kv) => sum + (JSON.parse(kv.value) as StoredBundleMeta).bytes, 0);
}

/**
 * A bundle from the artifact store (when `storage` has one) or the state
 * store, or undefined if neither holds it (wholly).
 */
export async function getBundle(
  store: Store,
  digest: string,
  storage: BundleStorage = {},
): Promise<PipelineBundle | undefined> {
  if (storage.artifacts) {
    const hex = digest.replace(/^sha256:/, "");
    const record = await storage.artifacts.get(BUNDLE_ARTIFACT_RUN, hex, BUNDLE_ARTIFACT_NAME);
    if (record) {
      const file = await Deno.makeTempFile({ prefix: "runnel-bundle-" });
      try {
        await storage.artifacts.materialize(record, file);
        return { digest, files: JSON.parse(await Deno.readTextFile(file)) };
      } finally {
        await Deno.remove(file).catch(() => {});
      }
    }
    // Kept before the server had an artifact store: still in the state store.
  }
  const prefix = bundleKey(digest);
  const meta = await store.get(`${prefix}meta`);
  if (!meta) return undefined;
  const { chunks } = JSON.parse(meta.value) as { chunks: number };
  let text = "";
  for (let i = 0; i < chunks; i++) {
    const chunk = await store.get(`${prefix}${i}`);
    if (!chunk) return undefined;
    text += chunk.value;
  }
  return { digest, files: JSON.parse(text) };
}

/** Removes a bundle from the state store (its chunks, meta and index entry). */
export async function deleteStoredBundle(store: Store, digest: string): Promise<void> {
  await store.txn({
    compare: [],
    success: [
      { type: "deletePrefix", prefix: bundleKey(digest) },
      { type: "delete", key: `${BUNDLE_INDEX_PREFIX}${digest.replace(/^sha256:/, "")}` },
    ],
  });
}

/**
 * Unpacks a bundle under `root` (once per digest) and returns its
 * directory. Written beside and renamed into place, so a reader never sees
 * half a bundle.
 */
export async function unpackBundle(bundle: PipelineBundle, root: string): Promise<string> {
  checkBundle(bundle);
  const dir = bundleDir(root, bundle.digest);
  try {
    if ((await Deno.stat(dir)).isDirectory) return dir;
  } catch {
    // Not unpacked yet.
  }
  await Deno.mkdir(root, { recursive: true });
  const temporary = await Deno.makeTempDir({ dir: root, prefix: ".unpacking-" });
  for (const [path, content] of Object.entries(bundle.files)) {
    const target = `${temporary}/${path}`;
    await Deno.mkdir(target.slice(0, target.lastIndexOf("/")), { recursive: true });
    await Deno.writeFile(target, Buffer.from(content, "base64"));
  }
  try {
    await Deno.rename(temporary, dir);
  } catch {
    // Another attempt unpacked it first.
    await Deno.remove(temporary, { recursive: true }).catch(() => {});
  }
  return dir;
}

/** A file of the bundle by its absolute path under `baseDir`; undefined if it has none. */
export function bundleFile(
  bundle: PipelineBundle,
  baseDir: string,
  path: string,
): Uint8Array | undefined {
  const prefix = baseDir.endsWith("/") ? baseDir : `${baseDir}/`;
  if (!path.startsWith(prefix)) return undefined;
  const content = bundle.files[path.slice(prefix.length)];
  return content === undefined ? undefined : Buffer.from(content, "base64");
}

/** Where a bundle is unpacked under `root`. */
export function bundleDir(root: string, digest: string): string {
  return `${root}/${digest.replace(/^sha256:/, "")}`;
}

function bundleKey(digest: string): string {
  return `/bundle/${digest.replace(/^sha256:/, "")}/`;
}
