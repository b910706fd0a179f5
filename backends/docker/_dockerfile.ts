/**
 * The Dockerfile a step's `build:` section stands for, and the tag that
 * names its image by content: pure functions, no Docker involved.
 *
 * Layer order follows the usual caching advice: the dependency file is
 * copied and `install` run before the rest of the sources, so editing a
 * source file rebuilds only the layers after it.
 *
 * @module
 */

import { createHash } from "node:crypto";
import type { DockerBuild } from "./manifest.ts";

/** Name of the generated Dockerfile inside the build context (kept apart from a user's own). */
export const DOCKERFILE_NAME = ".runnel.Dockerfile";

/** Repository under which built images are tagged: `runnel-build/<step>:<digest>`. */
export const BUILD_REPOSITORY = "runnel-build";

/** Hex digits of the content digest kept in a tag: 64 bits, ample for one host's images. */
const TAG_DIGEST_LENGTH = 16;

/** A file of the build context as the image will hold it. */
export interface ContextFile {
  /** Path relative to the context directory, `/`-separated, no leading `./`. */
  path: string;
  /** Permission bits (`0o755`, …). */
  mode: number;
  /** Contents of a regular file. */
  data?: Uint8Array;
  /** Target of a symbolic link (copied as a link, like `docker build` does). */
  linkTarget?: string;
}

/** `steps/`, `./steps` → `steps`: the form every context path is compared in. */
export function normaliseContextPath(path: string): string {
  return path.replace(/^(\.\/)+/, "").replace(/\/+$/, "").replace(/\/{2,}/g, "/");
}

/** The context paths a build uses, dependency file first, each once. */
export function contextEntries(build: DockerBuild): string[] {
  const entries = [build.dependencies, ...(build.copy ?? [])]
    .filter((path): path is string => path !== undefined)
    .map(normaliseContextPath)
    .filter((path) => path !== "" && path !== ".");
  return [...new Set(entries)];
}

/**
 * The Dockerfile for a `build:` section.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { generateDockerfile } from "./_dockerfile.ts";
 *
 * assert.equal(
 *   generateDockerfile({ from: "runnel/deno:local", copy: ["steps"] }),
 *   'FROM runnel/deno:local\nCOPY ["steps", "./steps"]\n',
 * );
 * ```
 */
export function generateDockerfile(build: DockerBuild): string {
  const lines = [`FROM ${build.from}`];
  if (build.workdir !== undefined) lines.push(`WORKDIR ${escapeWord(build.workdir)}`);
  for (const [name, value] of Object.entries(build.env ?? {}).sort(byKey)) {
    lines.push(`ENV ${name}="${escapeWord(value).replaceAll('"', '\\"')}"`);
  }
  if (build.dependencies !== undefined) lines.push(copyLine(build.dependencies));
  // Exec form: the command reaches the shell as written, newlines and quotes included.
  if (build.install !== undefined) lines.push(`RUN ${json(["/bin/sh", "-c", build.install])}`);
  const dependency = build.dependencies && normaliseContextPath(build.dependencies);
  for (const path of build.copy ?? []) {
    if (normaliseContextPath(path) !== dependency) lines.push(copyLine(path));
  }
  if (build.entrypoint !== undefined) lines.push(`ENTRYPOINT ${json(build.entrypoint)}`);
  return lines.join("\n") + "\n";
}

/**
 * The tag of the image built from `dockerfile` and `files`:
 * `runnel-build/<step>:<first 16 hex digits of a SHA-256>` over the
 * Dockerfile and every context file's path, mode and bytes. The same
 * sources give the same tag on any host, so an existing tag is a cache hit.
 */
export function imageTag(stepName: string, dockerfile: string, files: ContextFile[]): string {
  const hash = createHash("sha256");
  hash.update(`dockerfile\0${dockerfile}`);
  for (const file of [...files].sort((a, b) => compare(a.path, b.path))) {
    // Lengths before contents, so that no two different inputs run together.
    hash.update(`\0${file.path.length}:${file.path}\0${(file.mode & 0o111) ? "x" : "-"}\0`);
    if (file.linkTarget !== undefined) {
      hash.update(`link:${file.linkTarget}`);
    } else {
      const data = file.data ?? new Uint8Array();
      hash.update(`${data.byteLength}:`);
      hash.update(data);
    }
  }
  const digest = hash.digest("hex").slice(0, TAG_DIGEST_LENGTH);
  return `${BUILD_REPOSITORY}/${repositoryName(stepName)}:${digest}`;
}

/**
 * A step id as a Docker repository path component: the step's name without
 * its matrix suffix (legs share one image), lower case, runs of other
 * characters turned into `-`.
 */
export function repositoryName(stepId: string): string {
  const name = stepId.replace(/\[.*$/, "").toLowerCase()
    .replace(/[^a-z0-9]+/g, "-")
    .replace(/^-+|-+$/g, "")
    .slice(0, 64)
    .replace(/-+$/, "");
  return name || "step";
}

function copyLine(path: string): string {
  const source = normaliseContextPath(path);
  // The same relative path in the workdir, so the image mirrors the context.
  return `COPY ${json([source, `./${source}`])}`;
}

/** Escapes what Dockerfile word processing would otherwise interpret. */
function escapeWord(text: string): string {
  return text.replaceAll("\\", "\\\\").replaceAll("$", "\\$");
}

function json(items: string[]): string {
  return `[${items.map((item) => JSON.stringify(item)).join(", ")}]`;
}

function byKey(a: [string, string], b: [string, string]): number {
  return compare(a[0], b[0]);
}

function compare(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}
