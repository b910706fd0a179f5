/**
 * What a `deno` step's module may load. Deno loads a program's static
 * module graph without asking for read permission, so a step granted
 * nothing could still `import t from "/etc/shadow" with { type: "text" }`,
 * import the runner's state db, or leak a file's first line through the
 * syntax error of a failed import. Before the step runs, its entry file's
 * graph is therefore built with `deno info --json` (the same file, working
 * directory and resolution as the run) and every local module checked:
 *
 * - runnel's own code loads: the harness's graph (`context.ts`…) and the
 *   library's (`mod.ts`, which re-exports `BusinessError`);
 * - any other local file must lie in the pipeline directory, outside its
 *   hidden entries (`.runnel`, `.git`: what a pipeline bundle never
 *   carries), outside the scratch root and the runner's state directory,
 *   and stay there once links are resolved;
 * - remote modules are left to the run's own `--allow-import` (the hosts
 *   the step is granted) and npm packages to `--no-npm`.
 *
 * A refusal names the importing module and the refused path, never the
 * content `deno info` may quote. Checks are cached per module and
 * re-validated by the size, mtime and inode of every local file of the
 * graph, so a warm host pays a few `lstat`s per attempt.
 *
 * @module
 */

import { fileURLToPath } from "node:url";
import { dirname, relative } from "node:path";

/** What {@link checkModuleGraph} needs to know of the attempt. */
export interface ModuleGraphOptions {
  /** The generated entry file (absolute), importing the harness and the step module. */
  entryPath: string;
  /** The harness's URL: what it imports is runnel's own code. */
  harnessUrl: string;
  /**
   * runnel's library entry (`mod.ts`): a step may import the step API
   * (`BusinessError`) from it, so its graph is runnel's own code too.
   */
  libraryUrl: string;
  /** The pipeline directory (absolute). */
  baseDir: string;
  /** The agent's scratch root (absolute). */
  scratchRoot: string;
  /** Where `deno info` runs: the run's working directory. */
  cwd: string;
  /** `deno info` flags that make it resolve as the run does (`--no-remote`, `--no-npm`…). */
  flags: string[];
  /** The environment of `deno info` (PATH, HOME, DENO_DIR). */
  env: Record<string, string>;
}

/** Why a step's module graph is refused. */
export interface GraphRefusal {
  /** `permission` for a module outside the allowed roots; `infrastructure` when it could not be checked. */
  errorClass: "permission" | "infrastructure";
  message: string;
}

/** How long `deno info` may take before the check gives up (a module graph from a FIFO, say). */
const DENO_INFO_TIMEOUT_MS = 30_000;

/** Checked graphs kept per host; the oldest goes first. */
const MAX_CACHED_GRAPHS = 256;

/** A local file of a checked graph, as it was when checked. */
interface FileStamp {
  path: string;
  size: number;
  mtimeMs: number;
  ino: number | null;
}

/** A checked graph: the files it read and what the check found. */
interface CheckedGraph {
  files: FileStamp[];
  refusal: GraphRefusal | undefined;
  /** See {@link ModuleGraph.loads}. */
  loads: string[] | undefined;
}

/** What {@link inspectModuleGraph} found. */
export interface ModuleGraph {
  /** Why the step may not run; undefined when it may. */
  refusal: GraphRefusal | undefined;
  /**
   * The local files (absolute paths) a dynamic `import()` of the step module
   * loads: the module and its whole graph, runnel's own modules included.
   * Undefined when the graph also holds modules other than local files,
   * `node:` and `npm:` ones (remote or `jsr:` modules): a warm start is only
   * used for graphs whose loading it can reproduce exactly.
   */
  loads: string[] | undefined;
}

const checked = new Map<string, CheckedGraph>();

/** The graph `deno info --json` prints, the fields read here. */
interface DenoInfo {
  modules?: Array<{
    specifier: string;
    error?: string;
    dependencies?: Array<{ code?: { specifier?: string }; type?: { specifier?: string } }>;
  }>;
  redirects?: Record<string, string>;
}

/**
 * Checks what the entry file of a `deno` step would load; undefined when
 * it may run.
 */
export async function checkModuleGraph(
  stepModule: string,
  options: ModuleGraphOptions,
): Promise<GraphRefusal | undefined> {
  return (await inspectModuleGraph(stepModule, options)).refusal;
}

/**
 * Checks what the entry file of a `deno` step would load, as
 * {@link checkModuleGraph} does, and lists the local files of the step
 * module's graph (what a pre-started process must be able to load).
 */
export async function inspectModuleGraph(
  stepModule: string,
  options: ModuleGraphOptions,
): Promise<ModuleGraph> {
  const key = JSON.stringify([
    stepModule,
    options.baseDir,
    options.scratchRoot,
    options.harnessUrl,
    options.libraryUrl,
    options.flags,
  ]);
  const cached = checked.get(key);
  if (cached && await unchanged(cached.files)) {
    return { refusal: cached.refusal, loads: cached.loads };
  }
  const info = await denoInfo(options);
  if ("errorClass" in info) return { refusal: info, loads: undefined };
  const result = await judge(info, stepModule, options);
  checked.delete(key);
  checked.set(key, result);
  if (checked.size > MAX_CACHED_GRAPHS) checked.delete(checked.keys().next().value!);
  return { refusal: result.refusal, loads: result.loads };
}

/** The graph of runnel's library entry, once per process (remote: nothing to check). */
let libraryModules: Promise<Set<string>> | undefined;

function libraryGraph(options: ModuleGraphOptions): Promise<Set<string>> {
  libraryModules ??= (async () => {
    if (!options.libraryUrl.startsWith("file:")) return new Set<string>();
    const info = await denoInfo(options, fileURLToPath(options.libraryUrl));
    if ("errorClass" in info) return new Set<string>();
    return new Set((info.modules ?? []).map((module) => module.specifier));
  })();
  return libraryModules;
}

/** Runs `deno info --json` on the entry file (or `root`). */
async function denoInfo(
  options: ModuleGraphOptions,
  root = options.entryPath,
): Promise<DenoInfo | GraphRefusal> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["info", "--json", "--no-lock", ...options.flags, root],
    cwd: options.cwd,
    env: { ...options.env, NO_COLOR: "1" },
    clearEnv: true,
    stdin: "null",
    stdout: "piped",
    // Its messages may quote the files it read: never shown.
    stderr: "null",
  }).spawn();
  const timer = setTimeout(() => {
    try {
      child.kill("SIGKILL");
    } catch {
      // Already gone.
    }
  }, DENO_INFO_TIMEOUT_MS);
  try {
    const { code, stdout } = await child.output();
    if (code !== 0) {
      return {
        errorClass: "infrastructure",
        message:
          `could not check the imports of the step module: deno info exited with code ${code}`,
      };
    }
    return JSON.parse(new TextDecoder().decode(stdout)) as DenoInfo;
  } catch (error) {
    return {
      errorClass: "infrastructure",
      message: `could not check the imports of the step module: ${
        error instanceof SyntaxError ? "deno info printed no graph" : String(error)
      }`,
    };
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Decides on a graph: walking it from the entry file, the first local
 * module outside the allowed places is refused (so the message names the
 * import closest to the step).
 */
async function judge(
  info: DenoInfo,
  stepModule: string,
  options: ModuleGraphOptions,
): Promise<CheckedGraph> {
  const redirects = info.redirects ?? {};
  const follow = (specifier: string) => redirects[specifier] ?? specifier;
  const edges = new Map<string, string[]>();
  for (const module of info.modules ?? []) {
    edges.set(
      module.specifier,
      (module.dependencies ?? []).flatMap((dependency) =>
        [dependency.code?.specifier, dependency.type?.specifier]
          .filter((target): target is string => typeof target === "string")
          .map(follow)
      ),
    );
  }
  // runnel's own modules: the harness and what it imports, and the library's graph.
  const own = new Set<string>([follow(options.harnessUrl), ...await libraryGraph(options)]);
  const ownStack = [...own];
  while (ownStack.length > 0) {
    for (const target of edges.get(ownStack.pop()!) ?? []) {
      if (!own.has(target)) {
        own.add(target);
        ownStack.push(target);
      }
    }
  }
  const entryUrl = new URL(`file://${options.entryPath}`).href;
  const roots = await allowedRoots(options);
  const files: FileStamp[] = [];
  const importer = new Map<string, string>([[entryUrl, entryUrl]]);
  const queue = [entryUrl];
  for (let i = 0; i < queue.length; i++) {
    const specifier = queue[i];
    if (specifier !== entryUrl) {
      // Remote modules are bounded by the run's --allow-import; npm:, node:, data: load no file.
      if (own.has(specifier) || !specifier.startsWith("file:")) continue;
      const path = fileURLToPath(specifier);
      const verdict = await localVerdict(path, roots);
      if (verdict === "missing") {
        // The run reports "Module not found" itself; a file that appears later is checked then.
        files.push({ path, size: -1, mtimeMs: 0, ino: null });
        continue;
      }
      if (verdict !== "allowed") {
        const from = importer.get(specifier)!;
        const what = from === entryUrl
          ? `step module "${describe(path, roots)}"`
          : `"${describe(fileURLToPath(from), roots)}" imports "${describe(path, roots)}", which`;
        const message = `${what} ${verdict}; a deno step may load only the files of its ` +
          "pipeline directory (and modules from hosts it is granted)";
        return { files, refusal: { errorClass: "permission", message }, loads: undefined };
      }
      files.push(await stampOf(path));
    }
    for (const target of edges.get(specifier) ?? []) {
      if (!importer.has(target)) {
        importer.set(target, specifier);
        queue.push(target);
      }
    }
  }
  const failed = new Set((info.modules ?? []).filter((m) => m.error).map((m) => m.specifier));
  const loads = graphLoads(edges, failed, follow(fileUrl(stepModule)));
  return { files, refusal: undefined, loads };
}

/** Specifier schemes a dynamic `import()` loads as the static graph does, from local files or the cache. */
const WARM_LOADABLE = /^(file|node|npm):/;

/**
 * The local files of the graph under `root`; undefined when it holds a
 * module of another kind, or a local one that is missing.
 */
function graphLoads(
  edges: Map<string, string[]>,
  failed: Set<string>,
  root: string,
): string[] | undefined {
  const seen = new Set<string>([root]);
  const stack = [root];
  const loads: string[] = [];
  while (stack.length > 0) {
    const specifier = stack.pop()!;
    if (!WARM_LOADABLE.test(specifier)) return undefined;
    if (!specifier.startsWith("file:")) continue;
    // A module deno info could not load (missing, say): the run reports it, cold.
    if (!edges.has(specifier) || failed.has(specifier)) return undefined;
    loads.push(fileURLToPath(specifier));
    for (const target of edges.get(specifier)!) {
      if (!seen.has(target)) {
        seen.add(target);
        stack.push(target);
      }
    }
  }
  return loads.sort();
}

function fileUrl(path: string): string {
  return new URL(`file://${path}`).href;
}

/** The directories a step's local modules are checked against, lexically and resolved. */
interface Roots {
  baseDir: string;
  realBaseDir: string;
  excluded: string[];
}

async function allowedRoots(options: ModuleGraphOptions): Promise<Roots> {
  const real = (path: string) => Deno.realPath(path).catch(() => path);
  const realBaseDir = await real(options.baseDir);
  // The scratch root, and the runner's state directory (its parent), when
  // they lie in the pipeline directory: `.runnel` is hidden anyway,
  // `--state-dir state` is not.
  const excluded: string[] = [];
  for (const dir of [options.scratchRoot, dirname(options.scratchRoot)]) {
    for (const [path, base] of [[dir, options.baseDir], [await real(dir), realBaseDir]]) {
      if (path !== base && isInside(path, base)) excluded.push(path);
    }
  }
  return { baseDir: options.baseDir, realBaseDir, excluded };
}

/**
 * `allowed`, `missing`, or why a local module may not be loaded. A path
 * outside the allowed places is refused without being touched; one inside
 * must stay inside once its links are resolved.
 */
async function localVerdict(path: string, roots: Roots): Promise<string> {
  const reason = placeOf(path, roots, roots.baseDir);
  if (reason && (roots.realBaseDir === roots.baseDir || placeOf(path, roots, roots.realBaseDir))) {
    return reason;
  }
  let real: string;
  try {
    real = await Deno.realPath(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return "missing";
    return "cannot be checked";
  }
  const realReason = placeOf(real, roots, roots.realBaseDir);
  return realReason ? `${realReason} (through a link)` : "allowed";
}

/** Why `path` is not an allowed place under `baseDir`, or undefined when it is. */
function placeOf(path: string, roots: Roots, baseDir: string): string | undefined {
  if (!isInside(path, baseDir)) return "is outside the pipeline directory";
  if (roots.excluded.some((dir) => isInside(path, dir))) {
    return "belongs to the runner's state directory";
  }
  if (relative(baseDir, path).split("/").some((part) => part.startsWith("."))) {
    return "is a hidden entry of the pipeline directory";
  }
  return undefined;
}

function describe(path: string, roots: Roots): string {
  for (const base of [roots.baseDir, roots.realBaseDir]) {
    if (isInside(path, base) && path !== base) return relative(base, path);
  }
  return path;
}

/** A file's size, mtime and inode; size -1 for a file that is not there. */
async function stampOf(path: string): Promise<FileStamp> {
  try {
    const info = await Deno.lstat(path);
    return { path, size: info.size, mtimeMs: info.mtime?.getTime() ?? 0, ino: info.ino };
  } catch {
    return { path, size: -1, mtimeMs: 0, ino: null };
  }
}

/** True while every file of a checked graph is as it was. */
async function unchanged(files: FileStamp[]): Promise<boolean> {
  for (const file of files) {
    const now = await stampOf(file.path);
    if (now.size !== file.size || now.mtimeMs !== file.mtimeMs || now.ino !== file.ino) {
      return false;
    }
  }
  return true;
}

function isInside(path: string, dir: string): boolean {
  return path === dir || path.startsWith(dir.endsWith("/") ? dir : `${dir}/`);
}
