/**
 * Artifacts of a Kubernetes step through the object store, the Argo
 * pattern: the backend uploads the attempt's inputs under a per-attempt
 * prefix and hands the pod presigned URLs (a GET per input file, a PUT per
 * declared output and one for its SHA-256), so the pod never holds S3
 * credentials; an init container fetches the inputs, a helper container
 * uploads the outputs once the step exited 0, and the backend downloads
 * them and checks each digest.
 *
 * The store is the operator's, named by the runner's environment:
 * `RUNNEL_KUBE_S3_ENDPOINT`, `RUNNEL_KUBE_S3_BUCKET`,
 * `RUNNEL_KUBE_S3_REGION` (default `us-east-1`),
 * `RUNNEL_KUBE_S3_POD_ENDPOINT` (the endpoint as pods reach it; default the
 * same) and `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` /
 * `AWS_SESSION_TOKEN`.
 *
 * @module
 */

import { createHash } from "node:crypto";
import type { Client } from "npm:minio@8.0.7";
import { envValue } from "./_kubeconfig.ts";

/** Environment variables naming the artifact store. */
export const S3_ENV = [
  "RUNNEL_KUBE_S3_ENDPOINT",
  "RUNNEL_KUBE_S3_BUCKET",
  "RUNNEL_KUBE_S3_REGION",
  "RUNNEL_KUBE_S3_POD_ENDPOINT",
  "AWS_ACCESS_KEY_ID",
  "AWS_SECRET_ACCESS_KEY",
  "AWS_SESSION_TOKEN",
  // Read by readable-stream (a dependency of npm:minio) when it loads.
  "READABLE_STREAM",
];

/** Where the pod's artifacts live (an emptyDir shared by its containers). */
export const POD_ARTIFACTS_DIR = "/runnel";
/** Longest a presigned URL may live (S3's limit, 7 days). */
const MAX_PRESIGN_SECONDS = 7 * 24 * 3600;
/** URLs outlive the step's timeout by this much (scheduling, image pulls, uploads). */
const PRESIGN_MARGIN_SECONDS = 3600;
/** Presigned lifetime when the step has no timeout. */
const DEFAULT_PRESIGN_SECONDS = 24 * 3600;

/** The object store settings, from the environment. */
export interface S3Settings {
  endpoint: URL;
  podEndpoint: URL;
  bucket: string;
  region: string;
  accessKey: string;
  secretKey: string;
  sessionToken?: string;
}

/** What the pod's helper containers do, handed to them through the attempt's Secret. */
export interface ArtifactPlan {
  /** Input files: path below {@link POD_ARTIFACTS_DIR}, presigned GET. */
  inputs: Array<{ path: string; url: string }>;
  /** Declared outputs: presigned PUT of the file and of its hex SHA-256. */
  outputs: Array<{ name: string; url: string; digestUrl: string }>;
}

/** No object store is configured, or it cannot be used. */
export class ArtifactStoreError extends Error {
  /** Stable error code. */
  readonly code = "kubernetes_artifacts";

  /** Builds the error from a sentence. */
  constructor(message: string) {
    super(message);
    this.name = "ArtifactStoreError";
  }
}

/** The settings from the environment, or undefined when none are set. */
export function s3Settings(
  env: (name: string) => string | undefined = envValue,
): S3Settings | undefined {
  const endpoint = env("RUNNEL_KUBE_S3_ENDPOINT");
  if (!endpoint) return undefined;
  const bucket = env("RUNNEL_KUBE_S3_BUCKET");
  const accessKey = env("AWS_ACCESS_KEY_ID");
  const secretKey = env("AWS_SECRET_ACCESS_KEY");
  if (!bucket || !accessKey || !secretKey) {
    throw new ArtifactStoreError(
      "Expected RUNNEL_KUBE_S3_BUCKET, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY beside RUNNEL_KUBE_S3_ENDPOINT",
    );
  }
  const parse = (value: string, name: string) => {
    try {
      const url = new URL(value);
      if (url.protocol === "http:" || url.protocol === "https:") return url;
    } catch { /* below */ }
    throw new ArtifactStoreError(`Expected ${name} to be an http(s) URL, got "${value}"`);
  };
  return {
    endpoint: parse(endpoint, "RUNNEL_KUBE_S3_ENDPOINT"),
    podEndpoint: parse(
      env("RUNNEL_KUBE_S3_POD_ENDPOINT") ?? endpoint,
      "RUNNEL_KUBE_S3_POD_ENDPOINT",
    ),
    bucket,
    region: env("RUNNEL_KUBE_S3_REGION") ?? "us-east-1",
    accessKey,
    secretKey,
    sessionToken: env("AWS_SESSION_TOKEN"),
  };
}

/** `host:port` of a URL, as `--allow-net` names it. */
export function netAddress(url: URL): string {
  return `${url.hostname}:${url.port || (url.protocol === "https:" ? "443" : "80")}`;
}

async function client(settings: S3Settings, endpoint: URL): Promise<Client> {
  const { Client } = await import("npm:minio@8.0.7");
  return new Client({
    endPoint: endpoint.hostname.replace(/^\[(.*)\]$/, "$1"),
    port: Number(endpoint.port || (endpoint.protocol === "https:" ? 443 : 80)),
    useSSL: endpoint.protocol === "https:",
    region: settings.region,
    accessKey: settings.accessKey,
    secretKey: settings.secretKey,
    sessionToken: settings.sessionToken,
    pathStyle: true,
  });
}

/** One attempt's objects under `runnel-kube/<job>/`. */
export class AttemptArtifacts {
  readonly #settings: S3Settings;
  readonly prefix: string;
  #store?: Promise<Client>;
  #signer?: Promise<Client>;

  constructor(settings: S3Settings, jobName: string) {
    this.#settings = settings;
    this.prefix = `runnel-kube/${jobName}/`;
  }

  #client(): Promise<Client> {
    return this.#store ??= client(this.#settings, this.#settings.endpoint);
  }

  /** Presigning is offline (the region is given), with the host pods use. */
  #presigner(): Promise<Client> {
    return this.#signer ??= client(this.#settings, this.#settings.podEndpoint);
  }

  /**
   * Uploads the inputs (files, or directories for fan-in, links skipped)
   * and presigns everything the pod needs. Input `name` lands at
   * `/runnel/in/<name>` in the pod: the file itself, or the directory of a
   * fan-in input (as the `docker` backend mounts them).
   */
  async prepare(options: {
    inputs: Record<string, string>;
    outputs: string[];
    lifetimeSeconds?: number;
  }): Promise<ArtifactPlan> {
    const store = await this.#client();
    const signer = await this.#presigner();
    const seconds = Math.min(
      MAX_PRESIGN_SECONDS,
      options.lifetimeSeconds !== undefined
        ? options.lifetimeSeconds + PRESIGN_MARGIN_SECONDS
        : DEFAULT_PRESIGN_SECONDS,
    );
    const files: Array<{ local: string; path: string }> = [];
    const walk = async (local: string, path: string) => {
      const info = await Deno.lstat(local);
      if (info.isSymlink) return;
      if (info.isDirectory) {
        for await (const entry of Deno.readDir(local)) {
          await walk(`${local}/${entry.name}`, `${path}/${entry.name}`);
        }
        return;
      }
      if (info.isFile) files.push({ local, path });
    };
    for (const [name, local] of Object.entries(options.inputs)) {
      await walk(local, `in/${name}`);
    }
    const bucket = this.#settings.bucket;
    const inputs = await Promise.all(files.map(async ({ local, path }) => {
      const key = `${this.prefix}${path}`;
      await store.fPutObject(bucket, key, local, {});
      return { path, url: await signer.presignedGetObject(bucket, key, seconds) };
    }));
    const outputs = await Promise.all(options.outputs.map(async (name) => ({
      name,
      url: await signer.presignedPutObject(bucket, `${this.prefix}out/${name}`, seconds),
      digestUrl: await signer.presignedPutObject(
        bucket,
        `${this.prefix}out/${name}.sha256`,
        seconds,
      ),
    })));
    return { inputs, outputs };
  }

  /**
   * Downloads each uploaded output into `outputsDir`, checking its SHA-256
   * against the one the pod computed; an output the pod did not upload is
   * left for the outputs check to name. Throws on a digest mismatch.
   */
  async download(outputs: string[], outputsDir: string): Promise<void> {
    const store = await this.#client();
    const bucket = this.#settings.bucket;
    for (const name of outputs) {
      let expected: string;
      try {
        expected = (await new Response(
          await store.getObject(
            bucket,
            `${this.prefix}out/${name}.sha256`,
          ) as unknown as ReadableStream,
        ).text()).trim();
      } catch {
        continue;
      }
      const target = `${outputsDir}/${name}`;
      await store.fGetObject(bucket, `${this.prefix}out/${name}`, target);
      const hash = createHash("sha256");
      using file = await Deno.open(target);
      for await (const chunk of file.readable) hash.update(chunk);
      const actual = hash.digest("hex");
      if (actual !== expected) {
        await Deno.remove(target).catch(() => {});
        throw new ArtifactStoreError(
          `Expected output "${name}" to have sha256 ${expected} as the pod computed, got ${actual}`,
        );
      }
    }
  }

  /** Removes every object of the attempt. */
  async remove(): Promise<void> {
    const store = await this.#client();
    const names: string[] = [];
    const stream = store.listObjectsV2(this.#settings.bucket, this.prefix, true);
    for await (const item of stream as AsyncIterable<{ name?: string }>) {
      if (item.name) names.push(item.name);
    }
    if (names.length > 0) await store.removeObjects(this.#settings.bucket, names);
  }
}
