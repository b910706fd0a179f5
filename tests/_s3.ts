/**
 * A real S3-compatible server for tests: `npm:s3rver` in a child Deno
 * process on a free loopback port, keeping its objects in a temporary
 * directory, plus the `aws` CLI to look at them from outside runnel.
 *
 * Run as a script (`deno run tests/_s3.ts DIR BUCKET`), this file is that
 * child: it prints `{"port":N}` once listening and stops when its stdin
 * closes, so a test run that dies leaves no server behind.
 *
 * @module
 */

import { poll, ROOT } from "./_helpers.ts";

/** The credentials s3rver accepts by default. */
const S3RVER_CREDENTIAL = "S3RVER";
/** Starting a Deno child and loading s3rver takes ~0.3 s here; the bound allows a cold npm cache in CI. */
const START_TIMEOUT_MS = 60_000;
/** How long a server may take to exit after its stdin closes before it is killed. */
const STOP_TIMEOUT_MS = 5_000;

/** A running s3rver with one bucket. */
export interface S3Server extends AsyncDisposable {
  /** `http://127.0.0.1:PORT`. */
  endpoint: string;
  port: number;
  /** The bucket created at start. */
  bucket: string;
  region: string;
  accessKey: string;
  secretKey: string;
  /** Stops the server and removes its directory; safe to call twice. */
  stop(): Promise<void>;
}

/** Options of {@link startS3Server}. */
export interface StartS3ServerOptions {
  /** Default `runnel-test`. */
  bucket?: string;
}

/** Starts s3rver in a child process and waits until it answers HTTP. */
export async function startS3Server(options: StartS3ServerOptions = {}): Promise<S3Server> {
  const bucket = options.bucket ?? "runnel-test";
  const directory = await Deno.makeTempDir({ prefix: "runnel-s3rver-" });
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--quiet",
      "--no-prompt",
      // s3rver's logger enumerates the environment; fs-extra asks for the umask.
      "--allow-env",
      "--allow-sys",
      "--allow-net=127.0.0.1",
      `--allow-read=${directory}`,
      `--allow-write=${directory}`,
      `${ROOT}/tests/_s3.ts`,
      directory,
      bucket,
    ],
    cwd: ROOT,
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stderr = new Response(child.stderr).text();
  let stopped: Promise<void> | undefined;
  const stop = () =>
    stopped ??= (async () => {
      await child.stdin.close().catch(() => {});
      const timer = setTimeout(() => child.kill("SIGKILL"), STOP_TIMEOUT_MS);
      try {
        await child.status;
        await stderr;
      } finally {
        clearTimeout(timer);
        await Deno.remove(directory, { recursive: true }).catch(() => {});
      }
    })();
  try {
    const port = await readPort(child.stdout, stderr);
    const endpoint = `http://127.0.0.1:${port}`;
    // Listening is reported after bind; poll once anyway so "ready" means "answers HTTP".
    await poll(async () => {
      try {
        const response = await fetch(`${endpoint}/`);
        await response.body?.cancel();
        return true;
      } catch {
        return undefined;
      }
    }, { timeoutMs: START_TIMEOUT_MS, what: `s3rver to answer at ${endpoint}` });
    return {
      endpoint,
      port,
      bucket,
      region: "us-east-1",
      accessKey: S3RVER_CREDENTIAL,
      secretKey: S3RVER_CREDENTIAL,
      stop,
      [Symbol.asyncDispose]: stop,
    };
  } catch (error) {
    await stop();
    throw error;
  }
}

/** Reads the child's `{"port":N}` line, or fails with its stderr once it exits or the time is up. */
async function readPort(
  stdout: ReadableStream<Uint8Array>,
  stderr: Promise<string>,
): Promise<number> {
  const reader = stdout.pipeThrough(new TextDecoderStream()).getReader();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`Expected s3rver to listen within ${START_TIMEOUT_MS} ms`)),
      START_TIMEOUT_MS,
    );
  });
  try {
    let buffered = "";
    while (!buffered.includes("\n")) {
      const { value, done } = await Promise.race([reader.read(), deadline]);
      if (done) {
        throw new Error(`Expected s3rver to start, but it exited: ${(await stderr).trim()}`);
      }
      buffered += value;
    }
    return (JSON.parse(buffered.slice(0, buffered.indexOf("\n"))) as { port: number }).port;
  } finally {
    clearTimeout(timer);
    await reader.cancel().catch(() => {});
  }
}

/** Output of a finished `aws` command. */
export interface AwsResult {
  code: number;
  stdout: Uint8Array;
  stderr: string;
}

/** The `aws` executable on PATH, or undefined when it is not installed. */
export function findAwsCli(): string | undefined {
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) {
    if (!dir) continue;
    try {
      const info = Deno.statSync(`${dir}/aws`);
      if (info.isFile && (info.mode ?? 0) & 0o111) return `${dir}/aws`;
    } catch {
      // Not in this directory.
    }
  }
  return undefined;
}

/**
 * Runs `aws --endpoint-url <server> ARGS` with the server's credentials in
 * the environment (and no profile or config file of this machine's user).
 */
export async function runAws(
  aws: string,
  server: S3Server,
  args: string[],
  options: { stdin?: Uint8Array } = {},
): Promise<AwsResult> {
  const child = new Deno.Command(aws, {
    args: ["--endpoint-url", server.endpoint, ...args],
    env: {
      AWS_ACCESS_KEY_ID: server.accessKey,
      AWS_SECRET_ACCESS_KEY: server.secretKey,
      AWS_DEFAULT_REGION: server.region,
      AWS_CONFIG_FILE: "/dev/null",
      AWS_SHARED_CREDENTIALS_FILE: "/dev/null",
      AWS_EC2_METADATA_DISABLED: "true",
      AWS_PAGER: "",
    },
    stdin: options.stdin ? "piped" : "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  if (options.stdin) {
    const writer = child.stdin.getWriter();
    await writer.write(options.stdin);
    await writer.close();
  }
  const output = await child.output();
  return {
    code: output.code,
    stdout: output.stdout,
    stderr: new TextDecoder().decode(output.stderr),
  };
}

/**
 * s3rver 3.7.1 deletes the keys of one multi-object delete concurrently and
 * then removes the folders they leave empty; two keys of one folder race
 * there and the request fails with 500 (ENOENT). S3 has no folders, so the
 * store it stands in for never fails that way: the clean-up is made to
 * tolerate a folder already gone.
 */
async function tolerateConcurrentDeletes(): Promise<void> {
  const { default: FilesystemStore } = await import("npm:s3rver@3.7.1/lib/stores/filesystem.js");
  const deleteObject = FilesystemStore.prototype.deleteObject;
  FilesystemStore.prototype.deleteObject = async function (...args: unknown[]) {
    try {
      return await deleteObject.apply(this, args);
    } catch (error) {
      // The object's own files are unlinked first (ENOENT ignored there); only the clean-up raced.
      if ((error as { code?: string }).code !== "ENOENT") throw error;
    }
  };
}

if (import.meta.main) {
  const [directory, bucket] = Deno.args;
  const { default: S3rver } = await import("npm:s3rver@3.7.1");
  await tolerateConcurrentDeletes();
  const server = new S3rver({
    address: "127.0.0.1",
    port: 0,
    directory,
    silent: true,
    configureBuckets: [{ name: bucket, configs: [] }],
  });
  const { port } = await server.run();
  console.log(JSON.stringify({ port }));
  // Nothing is sent on stdin: its end is the signal to stop.
  for await (const _ of Deno.stdin.readable) {
    // Drain.
  }
  await server.close();
}
