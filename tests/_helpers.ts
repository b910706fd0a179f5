/**
 * Shared helpers of the integration tests: temporary pipelines, the CLI as
 * a real subprocess, and waiting with a deadline instead of sleeping.
 *
 * @module
 */

/** Absolute path of the repository root. */
export const ROOT = new URL("..", import.meta.url).pathname.replace(/\/$/, "");
/** Absolute path of the CLI entry. */
export const MAIN = `${ROOT}/main.ts`;
/**
 * The flags of the `runnel` task: its lock file (`deno.json` turns the lock
 * off for `deno task`, see the README) and the permissions it grants.
 */
export const CLI_PERMISSIONS = [
  `--lock=${ROOT}/deno.lock`,
  "--allow-read",
  "--allow-write",
  "--allow-run",
  "--allow-env",
  "--allow-net",
  "--allow-sys=hostname,osRelease",
];

/** A temporary directory holding a pipeline and a `.runnel` state dir. */
export interface Sandbox {
  dir: string;
  stateDir: string;
  write(name: string, text: string): Promise<string>;
  [Symbol.asyncDispose](): Promise<void>;
}

/** Makes a temporary directory, removed when disposed. */
export async function sandbox(): Promise<Sandbox> {
  const dir = await Deno.realPath(await Deno.makeTempDir({ prefix: "runnel-test-" }));
  return {
    dir,
    stateDir: `${dir}/.runnel`,
    async write(name, text) {
      const path = `${dir}/${name}`;
      await Deno.mkdir(path.slice(0, path.lastIndexOf("/")), { recursive: true });
      await Deno.writeTextFile(path, text);
      return path;
    },
    async [Symbol.asyncDispose]() {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    },
  };
}

/** Output of a finished CLI process. */
export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `runnel ARGS` to completion in `cwd`. */
export async function runCli(
  args: string[],
  options: {
    cwd: string;
    env?: Record<string, string>;
    /** At most this many open files (`ulimit -n`), for runs on a starved machine. */
    openFiles?: number;
  },
): Promise<CliResult> {
  const argv = [Deno.execPath(), "run", ...CLI_PERMISSIONS, MAIN, ...args];
  const quoted = argv.map((word) => `'${word.replaceAll("'", `'\\''`)}'`).join(" ");
  const [command, ...rest] = options.openFiles === undefined
    ? argv
    : ["sh", "-c", `ulimit -n ${options.openFiles} && exec ${quoted}`];
  const output = await new Deno.Command(command, {
    args: rest,
    cwd: options.cwd,
    env: { NO_COLOR: "1", ...options.env },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decoder = new TextDecoder();
  return {
    code: output.code,
    stdout: decoder.decode(output.stdout),
    stderr: decoder.decode(output.stderr),
  };
}

/** Starts `runnel ARGS` and returns the running child with its stdout lines. */
export function spawnCli(
  args: string[],
  options: { cwd: string; env?: Record<string, string> },
): { child: Deno.ChildProcess; lines: AsyncIterableIterator<string>; seen: string[] } {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", ...CLI_PERMISSIONS, MAIN, ...args],
    cwd: options.cwd,
    env: { NO_COLOR: "1", ...options.env },
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const seen: string[] = [];
  return { child, lines: linesOf(child.stdout, seen), seen };
}

/** The lines of a stream as they come, each also kept in `seen`. */
export async function* linesOf(
  stream: ReadableStream<Uint8Array>,
  seen: string[] = [],
): AsyncGenerator<string> {
  let buffer = "";
  for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
    buffer += chunk;
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline);
      buffer = buffer.slice(newline + 1);
      seen.push(line);
      yield line;
    }
  }
}

/** Reads lines until one matches, or fails after the deadline. */
export async function waitForLine(
  lines: AsyncIterableIterator<string>,
  match: (line: string) => boolean,
  timeoutMs = 30_000,
): Promise<string> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no matching line in ${timeoutMs} ms`)), timeoutMs);
  });
  try {
    return await Promise.race([
      (async () => {
        // Not for-await: leaving such a loop would close the shared iterator.
        while (true) {
          const next = await lines.next();
          if (next.done) throw new Error("output ended before a matching line");
          if (match(next.value)) return next.value;
        }
      })(),
      deadline,
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Polls `check` until it returns a value, or fails after the deadline.
 * With `retryOnError`, a check that throws counts as "not yet" (a server
 * still starting).
 */
export async function poll<T>(
  check: () => Promise<T | undefined> | T | undefined,
  options: { timeoutMs?: number; what?: string; retryOnError?: boolean } = {},
): Promise<T> {
  const deadline = Date.now() + (options.timeoutMs ?? 20_000);
  let delay = 5;
  while (Date.now() < deadline) {
    const value = options.retryOnError
      ? await Promise.resolve().then(check).catch(() => undefined)
      : await check();
    if (value !== undefined) return value;
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 100);
  }
  throw new Error(`timed out waiting for ${options.what ?? "a condition"}`);
}

/**
 * Live processes whose command line mentions `text`, as `pid` and its
 * command line (zombies excluded). Asks ps(1): Deno guards other
 * processes' /proc entries behind --allow-all.
 */
export async function processesMentioning(
  text: string,
): Promise<Array<{ pid: number; args: string }>> {
  const output = await new Deno.Command("ps", {
    args: ["-eo", "pid=,stat=,args="],
    stdout: "piped",
    stderr: "null",
  }).output();
  const found: Array<{ pid: number; args: string }> = [];
  for (const line of new TextDecoder().decode(output.stdout).split("\n")) {
    const match = /^\s*(\d+)\s+(\S+)\s+(.*)$/.exec(line);
    if (!match || match[2].startsWith("Z") || !match[3].includes(text)) continue;
    found.push({ pid: Number(match[1]), args: match[3] });
  }
  return found;
}
