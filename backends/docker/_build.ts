/**
 * Builds a step's image from its `build:` section: the generated Dockerfile
 * plus only the context files it uses, tagged by their content digest so
 * that an unchanged step reuses its image instead of rebuilding it.
 *
 * Offline by design: the classic builder, no pull; the base image must be
 * on the host already.
 *
 * @module
 */

import { Buffer } from "node:buffer";
import { resolve } from "node:path";
import { type Docker, type DockerStream, tarPack } from "./_dockerode.ts";
import {
  contextEntries,
  type ContextFile,
  DOCKERFILE_NAME,
  generateDockerfile,
  imageTag,
} from "./_dockerfile.ts";
import { daemonMessage, statusCodeOf } from "./_client.ts";
import type { DockerBuild } from "./manifest.ts";

/** A build that could not produce its image: a missing file, or a failing Dockerfile step. */
export class ImageBuildError extends Error {
  /** Stable error code. */
  readonly code = "image_build_failed";

  /** Builds the error from its message. */
  constructor(message: string) {
    super(message);
    this.name = "ImageBuildError";
  }
}

/** What {@link ensureStepImage} needs. */
export interface StepImageOptions {
  docker: Docker;
  /** Step id (its name, without a matrix suffix, names the repository). */
  stepId: string;
  /** Pipeline directory; `build.context` resolves against it. */
  baseDir: string;
  build: DockerBuild;
  /** Receives build progress, line by line with their newlines. */
  log(text: string): void;
  /** Builds already under way on this backend, by tag, so that concurrent legs build once. */
  inFlight: Map<string, Promise<void>>;
}

/** The image a step runs, and whether it was already there. */
export interface StepImage {
  tag: string;
  cached: boolean;
}

/** Returns the tag of the step's image, building it unless an image with that tag exists. */
export async function ensureStepImage(options: StepImageOptions): Promise<StepImage> {
  const contextDir = resolve(options.baseDir, options.build.context ?? ".");
  const files = await collectContext(contextDir, contextEntries(options.build));
  const dockerfile = generateDockerfile(options.build);
  const tag = imageTag(options.stepId, dockerfile, files);
  const pending = options.inFlight.get(tag);
  if (pending) {
    await pending;
    options.log(`runnel: using image ${tag}, built by a concurrent attempt\n`);
    return { tag, cached: true };
  }
  if (await imageExists(options.docker, tag)) {
    options.log(`runnel: using cached image ${tag} (no rebuild)\n`);
    return { tag, cached: true };
  }
  options.log(`runnel: building image ${tag} from ${options.build.from}\n`);
  const build = buildImage(options.docker, tag, dockerfile, files, options.log);
  options.inFlight.set(tag, build);
  try {
    await build;
  } finally {
    options.inFlight.delete(tag);
  }
  return { tag, cached: false };
}

/** True when the daemon has an image by that name. */
export async function imageExists(docker: Docker, name: string): Promise<boolean> {
  try {
    await docker.getImage(name).inspect();
    return true;
  } catch (error) {
    if (statusCodeOf(error) === 404) return false;
    throw error;
  }
}

/**
 * Reads the context entries the Dockerfile copies: files, directories
 * (recursively) and symbolic links (as links). Every entry must exist and
 * stay inside the context directory, links resolved.
 */
export async function collectContext(
  contextDir: string,
  entries: string[],
): Promise<ContextFile[]> {
  let realContext: string;
  try {
    realContext = await Deno.realPath(contextDir);
  } catch {
    throw new ImageBuildError(`Expected a build context directory at ${contextDir}`);
  }
  const files: ContextFile[] = [];
  for (const entry of entries) {
    const path = resolve(realContext, entry);
    let real: string;
    try {
      real = await Deno.realPath(path);
    } catch {
      throw new ImageBuildError(`Expected "${entry}" in the build context ${contextDir}`);
    }
    if (!isWithin(real, realContext) || !isWithin(path, realContext)) {
      throw new ImageBuildError(
        `Expected "${entry}" to stay inside the build context ${contextDir}, but it leads to ${real}`,
      );
    }
    await collectPath(realContext, entry, files);
  }
  return files;
}

async function collectPath(contextDir: string, relative: string, files: ContextFile[]) {
  const path = `${contextDir}/${relative}`;
  const info = await Deno.lstat(path);
  const mode = (info.mode ?? 0o644) & 0o7777;
  if (info.isSymlink) {
    files.push({ path: relative, mode, linkTarget: await Deno.readLink(path) });
  } else if (info.isDirectory) {
    const names: string[] = [];
    for await (const child of Deno.readDir(path)) names.push(child.name);
    for (const name of names.sort()) await collectPath(contextDir, `${relative}/${name}`, files);
  } else if (info.isFile) {
    files.push({ path: relative, mode, data: await Deno.readFile(path) });
  }
  // Sockets, fifos and devices are not copied by `docker build` either.
}

/** Packs the context and builds it with the classic builder, streaming its output to `log`. */
async function buildImage(
  docker: Docker,
  tag: string,
  dockerfile: string,
  files: ContextFile[],
  log: (text: string) => void,
): Promise<void> {
  const pack = tarPack();
  // A fixed mtime: the same sources give the same tar, whenever they were touched.
  const mtime = new Date(0);
  pack.entry({ name: DOCKERFILE_NAME, mode: 0o644, mtime }, dockerfile);
  for (const file of files) {
    if (file.linkTarget !== undefined) {
      pack.entry({
        name: file.path,
        type: "symlink",
        linkname: file.linkTarget,
        mode: file.mode,
        mtime,
      });
    } else {
      pack.entry({ name: file.path, mode: file.mode, mtime }, Buffer.from(file.data ?? []));
    }
  }
  pack.finalize();
  let stream: DockerStream;
  try {
    stream = await docker.buildImage(pack, {
      t: tag,
      dockerfile: DOCKERFILE_NAME,
      // The classic builder, and no pull: there is no registry to pull from.
      version: "1",
      rm: true,
      forcerm: true,
    });
  } catch (error) {
    throw new ImageBuildError(`image build of ${tag} failed: ${daemonMessage(error)}`);
  }
  await new Promise<void>((resolvePromise, reject) => {
    let pending = "";
    let step = "";
    let failure: string | undefined;
    const take = (line: string) => {
      if (!line.trim()) return;
      let message: { stream?: string; error?: string; errorDetail?: { message?: string } };
      try {
        message = JSON.parse(line);
      } catch {
        log(`${line}\n`);
        return;
      }
      if (message.stream !== undefined) {
        log(message.stream);
        const stepLine = /^Step \d+\/\d+ : .*/m.exec(message.stream);
        if (stepLine) step = stepLine[0].trim();
      }
      const error = message.errorDetail?.message ?? message.error;
      if (error !== undefined) {
        failure ??= error.trim();
        log(`${error.trim()}\n`);
      }
    };
    stream.on("data", (data: Buffer) => {
      const lines = (pending + data.toString()).split("\n");
      pending = lines.pop() ?? "";
      lines.forEach(take);
    });
    stream.on("error", (error: Error) => {
      failure ??= error.message;
    });
    let settled = false;
    const settle = () => {
      if (settled) return;
      settled = true;
      take(pending);
      if (failure === undefined) return resolvePromise();
      const where = step ? ` at "${step}"` : "";
      reject(new ImageBuildError(`image build of ${tag} failed${where}: ${failure}`));
    };
    stream.on("end", settle);
    stream.on("close", settle);
  });
}

function isWithin(path: string, dir: string): boolean {
  return path === dir || path.startsWith(dir.endsWith("/") ? dir : `${dir}/`);
}
