/**
 * Offline container images for tests, benchmarks and examples, built from
 * binaries of this host with `docker import` (no registry is reachable):
 *
 * - `runnel/busybox:local`: a statically linked busybox with symlinks for
 *   the usual commands, `/etc/passwd` with `root` and `nobody` (65534), and
 *   a world-writable `/tmp`.
 * - `runnel/deno:local`: the same, plus this host's `deno` binary and the
 *   shared libraries it needs (with the dynamic loader).
 * - `runnel/kube-helper:local`: the deno image plus the `kubernetes`
 *   backend's in-pod helper (`/opt/runnel/helper.ts`), which fetches a
 *   pod's inputs and uploads its outputs through presigned URLs.
 * - `runnel/energy:local`: the deno image plus the energy example's step
 *   modules under `/app` (`examples/energy/pipeline.kubernetes.yaml`).
 *
 * Each image carries a `runnel.content` label, a digest of what went into
 * it, so that an unchanged image is not rebuilt.
 *
 * Run: `deno run --allow-run=docker,ldd --allow-read infra/images.ts`
 *
 * @module
 */

import { createHash } from "node:crypto";
import { Buffer } from "node:buffer";
import tarStream from "npm:tar-stream@2.2.0";

/** Tag of the busybox image. */
export const BUSYBOX_IMAGE = "runnel/busybox:local";
/** Tag of the deno image. */
export const DENO_IMAGE = "runnel/deno:local";

/** Tag of the `kubernetes` backend's helper image. */
export const KUBE_HELPER_IMAGE = "runnel/kube-helper:local";

/** Image label holding the digest of the image's contents. */
export const CONTENT_LABEL = "runnel.content";

/** Bump when the layout below changes, so that images built by an older version are rebuilt. */
const LAYOUT_VERSION = "1";

/** Where Debian's `busybox-static` installs busybox. */
const BUSYBOX_PATHS = ["/bin/busybox", "/usr/bin/busybox"];

/** Commands linked to busybox in both images (all applets of Debian's busybox-static). */
// deno-fmt-ignore
export const BUSYBOX_APPLETS = [
  "sh", "echo", "cat", "ls", "sleep", "true", "false", "env", "wc", "head", "tail", "mkdir",
  "cp", "id", "dd", "yes", "grep", "sed", "awk", "sort", "tr", "seq", "date", "printf",
  "test", "[", "rm", "mv", "touch", "kill", "ps", "cut", "tee", "chmod", "ln", "pwd",
  "basename", "dirname", "find", "xargs", "uname", "whoami", "hostname", "stat", "wget", "nc",
  "md5sum", "sha256sum", "timeout", "uniq", "nproc", "readlink", "realpath", "mktemp",
  "gzip", "gunzip", "tar", "od", "expr", "which",
];

/** `PATH` of both images. */
const IMAGE_PATH = "/usr/local/bin:/usr/bin:/bin";

/** Where the deno binary goes in the deno image. */
const DENO_IN_IMAGE = "/usr/local/bin/deno";

/** A source binary an image needs is not on this host. */
export class ImageSourceMissingError extends Error {
  /** Stable error code. */
  readonly code = "image_source_missing";

  /** Builds the error from what was expected and how to get it. */
  constructor(message: string) {
    super(message);
    this.name = "ImageSourceMissingError";
  }
}

/** Building an image with the `docker` CLI failed. */
export class ImageImportError extends Error {
  /** Stable error code. */
  readonly code = "image_import_failed";

  /** Builds the error from the tag and the CLI's complaint. */
  constructor(tag: string, detail: string) {
    super(`Expected \`docker import\` to build ${tag}, but it failed: ${detail}`);
    this.name = "ImageImportError";
  }
}

/**
 * The part of tar-stream used here (the package ships no types; see
 * `backends/docker/_dockerode.ts` for why `@types/*` are not used).
 */
interface TarPack extends AsyncIterable<Uint8Array> {
  entry(
    header: {
      name: string;
      mode: number;
      mtime: Date;
      uid: number;
      gid: number;
      type?: "directory" | "symlink";
      linkname?: string;
    },
    data?: Uint8Array,
  ): void;
  finalize(): void;
  destroy(error?: Error): void;
}

/** One entry of an image's root filesystem. */
interface RootEntry {
  /** Absolute path in the image. */
  path: string;
  kind: "dir" | "file" | "symlink";
  mode: number;
  /** File contents given inline. */
  text?: string;
  /** File contents read from this host path. */
  source?: string;
  /** Link target of a symlink. */
  target?: string;
}

/** Builds `runnel/busybox:local` unless an image with the same contents exists; returns its tag. */
export async function ensureBusyboxImage(): Promise<string> {
  const entries = [...baseEntries(), ...busyboxEntries(await findBusybox())];
  await ensureImage(BUSYBOX_IMAGE, entries, [`ENV PATH=${IMAGE_PATH}`]);
  return BUSYBOX_IMAGE;
}

/** Builds `runnel/deno:local` unless an image with the same contents exists; returns its tag. */
export async function ensureDenoImage(): Promise<string> {
  const deno = await Deno.realPath(Deno.execPath());
  const entries = [
    ...baseEntries(),
    ...busyboxEntries(await findBusybox()),
    { path: DENO_IN_IMAGE, kind: "file" as const, mode: 0o755, source: deno },
    ...(await sharedLibraries(deno)).map((path) => ({
      path: path.image,
      kind: "file" as const,
      mode: 0o755,
      source: path.host,
    })),
  ];
  await ensureImage(DENO_IMAGE, entries, [
    `ENV PATH=${IMAGE_PATH}`,
    "ENV HOME=/tmp",
    "ENV DENO_DIR=/tmp/deno",
    "ENV DENO_NO_UPDATE_CHECK=1",
    "ENV NO_COLOR=1",
  ]);
  return DENO_IMAGE;
}

/** Tag of the energy example's image (its steps as Kubernetes Jobs). */
export const ENERGY_IMAGE = "runnel/energy:local";

/** Files of this repository the energy image holds under `/app`. */
const ENERGY_FILES = [
  "backends/deno/context.ts",
  "examples/energy/docker/run_step.ts",
  "examples/energy/steps/analyze.ts",
  "examples/energy/steps/generate.ts",
  "examples/energy/steps/report.ts",
];

/** Where the helper script lies in the helper image. */
export const KUBE_HELPER_SCRIPT = "/opt/runnel/helper.ts";

/**
 * Builds `runnel/kube-helper:local` unless an image with the same contents
 * exists; returns its tag.
 */
export async function ensureKubeHelperImage(): Promise<string> {
  const deno = await Deno.realPath(Deno.execPath());
  const helper = new URL("../backends/kubernetes/_helper.ts", import.meta.url).pathname;
  const entries = [
    ...baseEntries(),
    ...busyboxEntries(await findBusybox()),
    { path: DENO_IN_IMAGE, kind: "file" as const, mode: 0o755, source: deno },
    ...(await sharedLibraries(deno)).map((path) => ({
      path: path.image,
      kind: "file" as const,
      mode: 0o755,
      source: path.host,
    })),
    { path: "/opt", kind: "dir" as const, mode: 0o755 },
    { path: "/opt/runnel", kind: "dir" as const, mode: 0o755 },
    { path: KUBE_HELPER_SCRIPT, kind: "file" as const, mode: 0o644, source: helper },
  ];
  await ensureImage(KUBE_HELPER_IMAGE, entries, [
    `ENV PATH=${IMAGE_PATH}`,
    "ENV HOME=/tmp",
    "ENV DENO_DIR=/tmp/deno",
    "ENV DENO_NO_UPDATE_CHECK=1",
    "ENV NO_COLOR=1",
  ]);
  return KUBE_HELPER_IMAGE;
}

/**
 * Builds `runnel/energy:local` (the deno image plus the energy example's
 * steps under `/app`) unless an image with the same contents exists.
 */
export async function ensureEnergyImage(): Promise<string> {
  const deno = await Deno.realPath(Deno.execPath());
  const root = new URL("../", import.meta.url).pathname;
  const entries: RootEntry[] = [
    ...baseEntries(),
    ...busyboxEntries(await findBusybox()),
    { path: DENO_IN_IMAGE, kind: "file", mode: 0o755, source: deno },
    ...(await sharedLibraries(deno)).map((path): RootEntry => ({
      path: path.image,
      kind: "file",
      mode: 0o755,
      source: path.host,
    })),
    ...ENERGY_FILES.map((file): RootEntry => ({
      path: `/app/${file}`,
      kind: "file",
      mode: 0o644,
      source: `${root}${file}`,
    })),
  ];
  await ensureImage(ENERGY_IMAGE, entries, [
    `ENV PATH=${IMAGE_PATH}`,
    "ENV HOME=/tmp",
    "ENV DENO_DIR=/tmp/deno",
    "ENV DENO_NO_UPDATE_CHECK=1",
    "ENV NO_COLOR=1",
    "WORKDIR /app",
  ]);
  return ENERGY_IMAGE;
}

/** Directories and account files every image has. */
function baseEntries(): RootEntry[] {
  return [
    { path: "/bin", kind: "dir", mode: 0o755 },
    { path: "/etc", kind: "dir", mode: 0o755 },
    { path: "/tmp", kind: "dir", mode: 0o1777 },
    { path: "/usr", kind: "dir", mode: 0o755 },
    { path: "/usr/bin", kind: "dir", mode: 0o755 },
    { path: "/usr/local", kind: "dir", mode: 0o755 },
    { path: "/usr/local/bin", kind: "dir", mode: 0o755 },
    {
      path: "/etc/passwd",
      kind: "file",
      mode: 0o644,
      text: "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    },
    { path: "/etc/group", kind: "file", mode: 0o644, text: "root:x:0:\nnogroup:x:65534:\n" },
  ];
}

/** Busybox itself and a symlink per applet. */
function busyboxEntries(busybox: string): RootEntry[] {
  return [
    { path: "/bin/busybox", kind: "file", mode: 0o755, source: busybox },
    ...BUSYBOX_APPLETS.map((applet): RootEntry => ({
      path: `/bin/${applet}`,
      kind: "symlink",
      mode: 0o777,
      target: "busybox",
    })),
  ];
}

/** The host's static busybox. */
async function findBusybox(): Promise<string> {
  for (const path of BUSYBOX_PATHS) {
    try {
      if ((await Deno.stat(path)).isFile) return path;
    } catch {
      // Try the next place.
    }
  }
  throw new ImageSourceMissingError(
    `Expected a statically linked busybox at ${BUSYBOX_PATHS.join(" or ")}: ` +
      "install it with `sudo apt-get install busybox-static`",
  );
}

/**
 * The shared libraries `ldd` lists for a binary, with the dynamic loader:
 * the path the binary looks for (kept in the image) and the host file it
 * resolves to (its contents).
 */
async function sharedLibraries(binary: string): Promise<Array<{ image: string; host: string }>> {
  const output = await run("ldd", [binary]);
  const libraries: Array<{ image: string; host: string }> = [];
  for (const line of output.split("\n")) {
    // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
    const match = /(?:=>\s*)?(\/\S+)\s+\(0x[0-9a-f]+\)/.exec(line);
    if (!match) continue;
    libraries.push({ image: match[1], host: await Deno.realPath(match[1]) });
  }
  return libraries;
}

/** Imports `entries` as `tag` unless the existing image's content label matches. */
async function ensureImage(tag: string, entries: RootEntry[], changes: string[]): Promise<void> {
  const complete = withParentDirectories(entries);
  const digest = await contentDigest(complete, changes);
  if (await imageLabel(tag) === digest) return;
  const child = new Deno.Command("docker", {
    args: [
      "import",
      ...changes.flatMap((change) => ["--change", change]),
      "--change",
      `LABEL ${CONTENT_LABEL}=${digest}`,
      "-",
      tag,
    ],
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const writer = child.stdin.getWriter();
  const written = (async () => {
    try {
      for await (const chunk of packRoot(complete)) await writer.write(chunk);
      await writer.close();
    } catch (error) {
      await writer.abort(error).catch(() => {});
      throw error;
    }
  })();
  const [output] = await Promise.all([child.output(), written]);
  if (!output.success) {
    throw new ImageImportError(tag, new TextDecoder().decode(output.stderr).trim());
  }
}

/** The `runnel.content` label of an existing image, undefined when there is no such image. */
async function imageLabel(tag: string): Promise<string | undefined> {
  const output = await new Deno.Command("docker", {
    args: ["image", "inspect", "--format", `{{index .Config.Labels "${CONTENT_LABEL}"}}`, tag],
    stdout: "piped",
    stderr: "null",
  }).output();
  if (!output.success) return undefined;
  return new TextDecoder().decode(output.stdout).trim() || undefined;
}

/**
 * A digest of the layout and of every source file's path, size and mtime
 * (hashing a 100 MB deno binary on every call would cost more than it saves).
 */
async function contentDigest(entries: RootEntry[], changes: string[]): Promise<string> {
  const hash = createHash("sha256");
  hash.update(`layout ${LAYOUT_VERSION}\n${changes.join("\n")}\n`);
  for (const entry of entries) {
    hash.update(`${entry.kind} ${entry.path} ${entry.mode.toString(8)} ${entry.target ?? ""}\n`);
    if (entry.text !== undefined) hash.update(entry.text);
    if (entry.source !== undefined) {
      const info = await Deno.stat(entry.source);
      hash.update(`${entry.source} ${info.size} ${info.mtime?.getTime() ?? 0}\n`);
    }
  }
  return hash.digest("hex").slice(0, 32);
}

/** The entries plus a directory entry for every parent they need, parents first. */
function withParentDirectories(entries: RootEntry[]): RootEntry[] {
  const byPath = new Map<string, RootEntry>();
  for (const entry of entries) {
    const parts = entry.path.split("/").filter(Boolean);
    for (let depth = 1; depth < parts.length; depth++) {
      const dir = `/${parts.slice(0, depth).join("/")}`;
      if (!byPath.has(dir)) byPath.set(dir, { path: dir, kind: "dir", mode: 0o755 });
    }
    byPath.set(entry.path, entry);
  }
  return [...byPath.values()].sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
}

/** Streams the entries as a tar archive owned by root. */
function packRoot(entries: RootEntry[]): AsyncIterable<Uint8Array> {
  const pack = tarStream.pack() as TarPack;
  const mtime = new Date(0);
  (async () => {
    for (const entry of entries) {
      const name = entry.path.slice(1);
      const header = { name, mode: entry.mode, mtime, uid: 0, gid: 0 };
      if (entry.kind === "dir") {
        pack.entry({ ...header, type: "directory" });
      } else if (entry.kind === "symlink") {
        pack.entry({ ...header, type: "symlink", linkname: entry.target });
      } else {
        const data = entry.source !== undefined
          ? await Deno.readFile(entry.source)
          : new TextEncoder().encode(entry.text ?? "");
        pack.entry(header, Buffer.from(data.buffer, data.byteOffset, data.byteLength));
      }
    }
    pack.finalize();
  })().catch((error) => pack.destroy(error));
  return pack;
}

async function run(command: string, args: string[]): Promise<string> {
  const output = await new Deno.Command(command, { args, stdout: "piped", stderr: "piped" })
    .output();
  if (!output.success) {
    throw new Error(
      `Expected \`${command} ${args.join(" ")}\` to succeed: ${
        new TextDecoder().decode(output.stderr).trim()
      }`,
    );
  }
  return new TextDecoder().decode(output.stdout);
}

if (import.meta.main) {
  for (
    const ensure of [ensureBusyboxImage, ensureDenoImage, ensureKubeHelperImage, ensureEnergyImage]
  ) {
    const started = performance.now();
    const tag = await ensure();
    console.log(`${tag} ready (${((performance.now() - started) / 1000).toFixed(1)} s)`);
  }
}
