/**
 * Registered pipelines (cluster): `runnel apply` stores a pipeline's source
 * and shipped directory under its name as a new version (an unchanged one
 * keeps its version), `runnel trigger NAME` starts a run of its current
 * (or a named) version with parameters, and every run records the version
 * it ran.
 *
 * | key | what |
 * | --- | --- |
 * | `/pipelines/<name>/meta` | {@link PipelineMeta} |
 * | `/pipelines/<name>/versions/<version, 10 digits>` | {@link PipelineVersion} |
 *
 * A new version is written in one transaction with the meta it bumps,
 * compared on the meta's revision: two concurrent applies never write the
 * same version number.
 *
 * @module
 */

import type { Store } from "../../consensus/store.ts";
import { type BundleStorage, checkBundle, type PipelineBundle, putBundle } from "../bundle.ts";

/** A registered pipeline. */
export interface PipelineMeta {
  name: string;
  /** The version `trigger` runs unless told otherwise. */
  current: number;
  /** The highest version written. */
  latest: number;
  createdAt: number;
  updatedAt: number;
  /** Who applied the latest version (the token's name). */
  updatedBy?: string;
  /** The operator secret that signs webhook triggers (the current version's `webhook.secret`). */
  webhookSecret?: string;
}

/** One version of a registered pipeline: what a run of it is planned from. */
export interface PipelineVersion {
  name: string;
  version: number;
  source: string;
  file: string;
  baseDir: string;
  /** Digest of its shipped directory, kept under `/bundle/<digest>/`. */
  bundle?: string;
  /** sha256 of the source: an apply of the same source and directory is no new version. */
  digest: string;
  createdAt: number;
  createdBy?: string;
}

/** A request of the registry a caller can act on (`not_found`, `conflict`). */
export class PipelineRegistryError extends Error {
  /** Stable code. */
  readonly code: string;
  /** Builds the error from its code and a full sentence. */
  constructor(code: string, message: string) {
    super(message);
    this.name = "PipelineRegistryError";
    this.code = code;
  }
}

/** Key layout of the registry. */
export const pipelineKeys = {
  prefix: "/pipelines/",
  of: (name: string) => `/pipelines/${name}/`,
  meta: (name: string) => `/pipelines/${name}/meta`,
  version: (name: string, version: number) =>
    `/pipelines/${name}/versions/${String(version).padStart(10, "0")}`,
  versions: (name: string) => `/pipelines/${name}/versions/`,
};

/** Attempts of an apply that lost a race before it gives up. */
const APPLY_ATTEMPTS = 10;

/**
 * Stores `version` (its number assigned here) as the pipeline's newest and
 * current version; an apply of what the current version already holds
 * changes nothing and says so.
 */
export async function applyPipeline(
  store: Store,
  entry: Omit<PipelineVersion, "version" | "createdAt">,
  options: {
    bundle?: PipelineBundle;
    bundles?: BundleStorage;
    now?: number;
    webhookSecret?: string;
  } = {},
): Promise<{ version: number; unchanged: boolean }> {
  if (options.bundle) {
    checkBundle(options.bundle);
    await putBundle(store, options.bundle, options.bundles);
  }
  for (let attempt = 0; attempt < APPLY_ATTEMPTS; attempt++) {
    const now = options.now ?? Date.now();
    const kv = await store.get(pipelineKeys.meta(entry.name));
    const meta = kv ? JSON.parse(kv.value) as PipelineMeta : undefined;
    if (meta) {
      const current = await getVersion(store, entry.name, meta.current);
      if (current && current.digest === entry.digest && current.bundle === entry.bundle) {
        return { version: meta.current, unchanged: true };
      }
    }
    const version = (meta?.latest ?? 0) + 1;
    const next: PipelineMeta = {
      name: entry.name,
      current: version,
      latest: version,
      createdAt: meta?.createdAt ?? now,
      updatedAt: now,
      ...(entry.createdBy ? { updatedBy: entry.createdBy } : {}),
      ...(options.webhookSecret ? { webhookSecret: options.webhookSecret } : {}),
    };
    const written = await store.txn({
      compare: [{
        key: pipelineKeys.meta(entry.name),
        target: "mod",
        op: "==",
        value: kv?.modRevision ?? 0,
      }],
      success: [
        { type: "put", key: pipelineKeys.meta(entry.name), value: JSON.stringify(next) },
        {
          type: "put",
          key: pipelineKeys.version(entry.name, version),
          value: JSON.stringify({ ...entry, version, createdAt: now }),
        },
      ],
    });
    if (written.succeeded) return { version, unchanged: false };
  }
  throw new PipelineRegistryError(
    "conflict",
    `Expected to register "${entry.name}", but it kept changing under this apply; try again`,
  );
}

/** A version of a pipeline, or undefined. */
export async function getVersion(
  store: Store,
  name: string,
  version: number,
): Promise<PipelineVersion | undefined> {
  const kv = await store.get(pipelineKeys.version(name, version));
  return kv ? JSON.parse(kv.value) as PipelineVersion : undefined;
}

/** A registered pipeline's meta, or a `not_found` error naming it. */
export async function getPipeline(store: Store, name: string): Promise<PipelineMeta> {
  const kv = await store.get(pipelineKeys.meta(name));
  if (!kv) {
    throw new PipelineRegistryError("not_found", `No pipeline "${name}" is registered`);
  }
  return JSON.parse(kv.value) as PipelineMeta;
}

/** The version `trigger` runs: `version`, or the current one. */
export async function versionToRun(
  store: Store,
  name: string,
  version?: number,
): Promise<PipelineVersion> {
  const meta = await getPipeline(store, name);
  const wanted = version ?? meta.current;
  const found = await getVersion(store, name, wanted);
  if (!found) {
    throw new PipelineRegistryError(
      "not_found",
      `Pipeline "${name}" has no version ${wanted} (versions 1 to ${meta.latest})`,
    );
  }
  return found;
}

/** Every registered pipeline, by name. */
export async function listPipelines(store: Store): Promise<PipelineMeta[]> {
  const { items } = await store.list(pipelineKeys.prefix);
  return items.filter((kv) => kv.key.endsWith("/meta"))
    .map((kv) => JSON.parse(kv.value) as PipelineMeta)
    .sort((a, b) => a.name < b.name ? -1 : a.name > b.name ? 1 : 0);
}

/** A pipeline's versions, newest first, without their sources. */
export async function listVersions(
  store: Store,
  name: string,
): Promise<Array<Omit<PipelineVersion, "source">>> {
  await getPipeline(store, name);
  const { items } = await store.list(pipelineKeys.versions(name));
  return items.map((kv) => {
    const { source: _source, ...rest } = JSON.parse(kv.value) as PipelineVersion;
    return rest;
  }).sort((a, b) => b.version - a.version);
}

/** Removes a pipeline and every version of it (runs of it keep their plans). */
export async function deletePipeline(store: Store, name: string): Promise<void> {
  await getPipeline(store, name);
  await store.txn({
    compare: [],
    success: [{ type: "deletePrefix", prefix: pipelineKeys.of(name) }],
  });
}
