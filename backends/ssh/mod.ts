/**
 * The `ssh` backend: runs each attempt on a remote host over SSH, in a
 * per-attempt remote work directory (`<work-root>/<run>/<step>/<attempt>/`)
 * where its inputs are uploaded over SFTP and from where its outputs are
 * downloaded, their SHA-256 checked against the remote file's.
 *
 * Nothing secret reaches a remote command line: the environment is written
 * over SFTP into a 0600 file the wrapper sources. The wrapper runs in its
 * own session (`setsid -w`), records its pgid (its own `$$`) and, at the
 * end, the exit code, then ends what the step left in its process group,
 * so a backgrounded child holding stdout does not keep the step open.
 * A watchdog in the wrapper ends the group once the SSH session that
 * started it is gone (a runner killed, a dead connection), since without a
 * PTY nothing else would.
 * Cancel sends `kill -TERM -PGID`, then `kill -KILL -PGID`, over a second
 * channel (signals over a channel are unreliable: ssh2's `signal()` is a
 * no-op once stdin has ended).
 *
 * @module
 */

import { createHash } from "node:crypto";
import { basename } from "node:path";
import {
  type AttemptSpec,
  classifyExit,
  configMessages,
  DEFAULT_CANCEL_GRACE_MS,
  type Execution,
  type ExecutionBackend,
  type ExitStatus,
  type Fingerprint,
  type HostContext,
  InvalidStepConfigError,
  type LogChunk,
  missingOutputStatus,
  type RecoveredAttempt,
  type RecoverOptions,
  stepEnvironment,
} from "../backend.ts";
import { LogQueue } from "../log_queue.ts";
import { failedExecution } from "../settled.ts";
import {
  AuthError,
  type Channel,
  type Connection,
  ConnectionError,
  ConnectionPool,
  type Sftp,
} from "./_connection.ts";
import { HostKeyError, type HostTrust } from "./_hostkey.ts";
import {
  agentSocket,
  configuredHosts,
  connectionProblems,
  DEFAULT_WORK_ROOT,
  localFile,
  normalizeSshConfig,
  type SshConfig,
  sshConfigSchema,
} from "./manifest.ts";

export { AuthError, ConnectionError } from "./_connection.ts";
export { HostKeyError } from "./_hostkey.ts";

/** How long output may keep arriving after the wrapper exited before the channel is closed. */
const DRAIN_DEADLINE_MS = 2_000;
/** Exit code reported when the end could not be learnt. */
const UNKNOWN_EXIT_CODE = -1;
/** Environment variable names a POSIX shell accepts. */
const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

/** Creates the `ssh` backend; each instance keeps its own connections. */
export function createSshBackend(): ExecutionBackend {
  const pool = new ConnectionPool();
  return {
    name: "ssh",
    capabilities: { reattach: false, usage: false, recoverPerAttempt: true },
    fingerprint: (context) => fingerprintSsh(context),
    start: (spec) => startRemote(pool, spec),
    recover: (options) => recoverRemote(options),
  };
}

/** Checks an `ssh` step config; returns human messages, empty when valid. */
export function validateSshConfig(config: Record<string, unknown>): string[] {
  return configMessages(sshConfigSchema, config);
}

/** How long `runnel backends` waits for each configured host. */
const PROBE_TIMEOUT_MS = 5_000;

async function fingerprintSsh(context?: HostContext): Promise<Fingerprint> {
  // Probes use connections of their own, closed after: never a step's.
  await using pool = disposablePool();
  try {
    await import("npm:ssh2@1.17.0");
  } catch (error) {
    return { available: false, detail: `ssh2 does not load: ${(error as Error).message}` };
  }
  const hosts = Object.entries(configuredHosts(context));
  const probes = await Promise.all(hosts.map(async ([alias, entry]) => {
    const config = normalizeSshConfig({ ...entry, run: "true" }) as SshConfig;
    let timer: ReturnType<typeof setTimeout> | undefined;
    try {
      const connection = await Promise.race([
        connect(pool, config, { baseDir: "/", env: {} }),
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new Error("no answer within 5 s")), PROBE_TIMEOUT_MS);
        }),
      ]);
      await connection.run("true");
      return `${alias} (${connection.where}) answers`;
    } catch (error) {
      return `${alias} (${config.user}@${config.host}:${config.port}) does not answer: ${
        (error as Error).message
      }`;
    } finally {
      clearTimeout(timer);
    }
  }));
  const detail = "ssh2 1.17.0 (pure-JS crypto)" +
    (probes.length > 0 ? `; hosts: ${probes.join("; ")}` : "; no hosts in the agent config");
  return { available: true, version: "1.17.0", detail };
}

/** A connection pool closed when disposed of. */
function disposablePool(): ConnectionPool & AsyncDisposable {
  const pool = new ConnectionPool() as ConnectionPool & AsyncDisposable;
  pool[Symbol.asyncDispose] = () => pool.close();
  return pool;
}

/** The step's secrets the connection uses: never part of the remote environment. */
function credentialNames(config: SshConfig): string[] {
  return [config["passphrase-secret"], config["password-secret"]].filter((name): name is string =>
    name !== undefined
  );
}

/**
 * A live connection for a resolved config; its secrets (passphrase,
 * password) come from `env`, the step's environment. Missing files and
 * unreadable keys reject with a permission-class error.
 */
async function connect(
  pool: ConnectionPool,
  config: SshConfig,
  step: { baseDir: string; env: Record<string, string> },
): Promise<Connection> {
  const problems = connectionProblems(config as unknown as Record<string, unknown>);
  if (problems.length > 0) {
    throw new AuthError(
      `host "${config.host}" is not one of this host's ssh.hosts and the step does not say ` +
        `how to reach it: ${problems.map((problem) => problem.text).join("; ")}`,
    );
  }
  const home = homeValue();
  const secret = (name: string | undefined, what: string): string | undefined => {
    if (name === undefined) return undefined;
    const value = step.env[name];
    if (value === undefined) {
      throw new AuthError(`the ${what} secret "${name}" is not one of the step's secrets`);
    }
    return value;
  };
  let privateKey: string | undefined;
  let trust: HostTrust;
  try {
    if (config.identity) {
      privateKey = await Deno.readTextFile(localFile(config.identity, step.baseDir, home));
    }
    trust = trustOf(config, step.baseDir, home);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound || error instanceof Deno.errors.NotCapable) {
      throw new AuthError(`cannot read a key or known_hosts file: ${error.message}`);
    }
    throw error;
  }
  let agent: string | undefined;
  if (config.agent) {
    agent = agentSocket();
    if (!agent) throw new AuthError("agent: true, but SSH_AUTH_SOCK names no ssh-agent here");
  }
  return await pool.get({
    host: config.host,
    port: config.port,
    user: config.user,
    privateKey,
    passphrase: secret(config["passphrase-secret"], "passphrase"),
    password: secret(config["password-secret"], "password"),
    agent,
    trust,
  });
}

/** The remote work directory of an attempt. */
function remoteDirOf(
  config: SshConfig,
  spec: Pick<AttemptSpec, "runId" | "stepId" | "attempt">,
): string {
  return [
    config["work-root"],
    segment(spec.runId),
    segment(spec.stepId),
    segment(String(spec.attempt)),
  ].join("/");
}

/**
 * Ends what an attempt left in `remoteDir` (its process group, TERM then
 * KILL) and removes the directory, if it is this agent's. One exec.
 */
function reapCommand(remoteDir: string, agentId: string, graceSeconds: number): string {
  const dir = shellQuote(remoteDir);
  return [
    `cd ${dir} 2>/dev/null || exit 0`,
    `[ "$(cat agent 2>/dev/null)" = ${shellQuote(agentId)} ] || exit 0`,
    'pg=$(cat pgid 2>/dev/null); case "$pg" in ""|*[!0-9]*) pg=0;; esac',
    // Never a group of 1 or below; only a group that still has members.
    'if [ "$pg" -gt 1 ] && pgrep -g "$pg" >/dev/null 2>&1; then',
    '  kill -TERM -"$pg" 2>/dev/null',
    `  i=0; while [ $i -lt ${graceSeconds * 10} ] && pgrep -g "$pg" >/dev/null 2>&1; do`,
    "    sleep 0.1; i=$((i+1)); done",
    '  kill -KILL -"$pg" 2>/dev/null',
    "fi",
    "echo reaped",
    `cd / && ${removeCommand(remoteDir)}`,
  ].join("\n");
}

/** A run of the sweep: this agent's attempt directories below a work root. */
function sweepCommand(workRoot: string, agentId: string): string {
  return [
    `cd ${shellQuote(workRoot)} 2>/dev/null || exit 0`,
    "for marker in */*/*/agent; do",
    '  [ -f "$marker" ] || continue',
    `  [ "$(cat "$marker")" = ${shellQuote(agentId)} ] && echo "\${marker%/agent}"`,
    "done",
    "true",
  ].join("\n");
}

/**
 * After a restart: every recorded attempt is reaped on its host (its group
 * ended, its directory removed), and so is anything else this agent left
 * below the work roots of the agent config's hosts. Nothing is re-attached:
 * the wrapper's watchdog has already ended a step whose session died.
 */
async function recoverRemote(options: RecoverOptions): Promise<RecoveredAttempt[]> {
  await using pool = disposablePool();
  const errors: string[] = [];
  for (const attempt of options.attempts ?? []) {
    const config = normalizeSshConfig(attempt.spec.config) as SshConfig;
    const remoteDir = remoteDirOf(config, attempt.spec);
    if (!attempt.handle.endsWith(`:${remoteDir}`)) continue;
    try {
      const connection = await connect(pool, config, attempt.spec);
      await connection.run(reapCommand(remoteDir, options.agentId, 2));
    } catch (error) {
      errors.push(`${attempt.handle}: ${(error as Error).message}`);
    }
  }
  // The agent config's hosts are swept only by a runner's startup recovery
  // (it passes the settings): a lost plugin host's reaping names its handles.
  if (options.settings) {
    for (
      const entry of Object.values(
        configuredHosts({ scratchRoot: "/", agentId: "", settings: options.settings }),
      )
    ) {
      const config = normalizeSshConfig({ ...entry, run: "true" }) as SshConfig;
      try {
        const connection = await connect(pool, config, { baseDir: "/", env: {} });
        const root = config["work-root"] ?? DEFAULT_WORK_ROOT;
        const dirs = (await connection.run(sweepCommand(root, options.agentId))).split("\n")
          .filter((line) => /^[^/]+\/[^/]+\/[^/]+$/.test(line));
        for (const dir of dirs) {
          await connection.run(reapCommand(`${root}/${dir}`, options.agentId, 2));
        }
      } catch (error) {
        errors.push(`${config.user}@${config.host}:${config.port}: ${(error as Error).message}`);
      }
    }
  }
  if (errors.length > 0) throw new ConnectionError(`cannot reap on ${errors.join("; ")}`);
  return [];
}

/** Quotes a string for a POSIX shell. */
export function shellQuote(value: string): string {
  return `'${value.replaceAll("'", `'\\''`)}'`;
}

/** A path segment safe on any remote shell: everything else becomes `_`. */
function segment(value: string): string {
  const safe = value.replace(/[^A-Za-z0-9_.-]/g, "_");
  return safe === "" || /^\.+$/.test(safe) ? "_" : safe;
}

/** The wrapper run in the remote work directory (its cwd). */
export const WRAPPER = [
  // A handler, not an ignore: the step must still get the TERM a cancel sends
  // (an ignored signal would be inherited), while this shell lives to record
  // the exit and so `setsid -w` has nothing to complain about.
  "trap 'true' TERM",
  "echo $$ > pgid.tmp && mv pgid.tmp pgid",
  // The watchdog: without a PTY, a lost connection (a runner killed, a dead
  // network) leaves the step running; once the SSH session process that
  // started this attempt is gone, the whole group is ended.
  // (/proc when there is one: no fork; ps elsewhere.)
  "session=$PPID",
  'if [ -r "/proc/$session/stat" ]; then',
  '  read -r _ comm _ parent _ < "/proc/$session/stat"',
  '  [ "$comm" = "(setsid)" ] && session=$parent',
  'elif [ "$(ps -o comm= -p "$session" 2>/dev/null)" = setsid ]; then',
  '  session=$(ps -o ppid= -p "$session" 2>/dev/null | tr -d " ")',
  "fi",
  'if [ -n "$session" ] && [ "$session" -gt 1 ]; then',
  '  (while kill -0 "$session" 2>/dev/null; do sleep 1; done',
  "   kill -TERM -$$; sleep 5; kill -KILL -$$) </dev/null >/dev/null 2>&1 &",
  "fi",
  "set -a",
  ". ./env",
  "set +a",
  "/bin/sh ./run.sh </dev/null",
  "code=$?",
  // The declared outputs' digests, computed where they were written (no
  // second channel to ask for them): checked against what arrives.
  // Read once the wrapper has exited: no need for a rename.
  'if [ "$code" = 0 ] && [ -s outputs ]; then',
  "  while IFS= read -r name; do",
  '    [ -f "out/$name" ] && [ ! -L "out/$name" ] || continue',
  '    if command -v sha256sum >/dev/null 2>&1; then sha256sum -- "out/$name"',
  '    else shasum -a 256 -- "out/$name"; fi',
  "  done < outputs > digests 2>/dev/null",
  "fi",
  "echo $code > exit",
  // End what the step left in its group (backgrounded children), not this shell.
  "trap '' TERM",
  "kill -TERM -$$ 2>/dev/null",
  "exit $code",
  "",
].join("\n");

function trustOf(config: SshConfig, baseDir: string, home: string | undefined): HostTrust {
  if (config["host-key"]) return { fingerprint: config["host-key"] };
  const path = localFile(config["known-hosts"]!, baseDir, home);
  return {
    knownHosts: Deno.readTextFileSync(path),
    path,
    firstUse: config["trust-on-first-use"] === true,
  };
}

function homeValue(): string | undefined {
  try {
    return Deno.permissions.querySync({ name: "env", variable: "HOME" }).state === "granted"
      ? Deno.env.get("HOME")
      : undefined;
  } catch {
    return undefined;
  }
}

function sftpCall<T>(
  body: (cb: (error: Error | undefined, value?: T) => void) => void,
): Promise<T> {
  return new Promise((resolve, reject) =>
    body((error, value) => error ? reject(error) : resolve(value as T))
  );
}

async function upload(sftp: Sftp, local: string, remote: string): Promise<void> {
  const info = await Deno.lstat(local);
  if (info.isSymlink) return;
  if (info.isDirectory) {
    await sftpCall<void>((cb) => sftp.mkdir(remote, { mode: 0o700 }, cb));
    for await (const entry of Deno.readDir(local)) {
      await upload(sftp, `${local}/${entry.name}`, `${remote}/${entry.name}`);
    }
    return;
  }
  await sftpCall<void>((cb) => sftp.fastPut(local, remote, TRANSFER, cb));
}

/**
 * SFTP transfers: OpenSSH's sftp-server reads and writes at most 255 KiB
 * a request; 32 of them in flight keep a link busy (measured here: 100 MiB
 * up and down in 1.26 s, against 1.49 s with ssh2's 32 KiB × 64).
 */
const TRANSFER = { chunkSize: 255 * 1024, concurrency: 32 };

/** Reads of a file being hashed (1 MiB: 2.5× faster than a stream's 64 KiB chunks). */
const HASH_READ_BYTES = 1 << 20;

async function sha256File(path: string): Promise<string> {
  const hash = createHash("sha256");
  using file = await Deno.open(path);
  const buffer = new Uint8Array(HASH_READ_BYTES);
  for (;;) {
    const read = await file.read(buffer);
    if (read === null) break;
    hash.update(buffer.subarray(0, read));
  }
  return hash.digest("hex");
}

function statusOfError(error: unknown): ExitStatus {
  const message = error instanceof Error ? error.message : String(error);
  if (error instanceof HostKeyError || error instanceof AuthError) {
    return { exitCode: UNKNOWN_EXIT_CODE, errorClass: "permission", message };
  }
  return { exitCode: UNKNOWN_EXIT_CODE, errorClass: "infrastructure", message };
}

async function startRemote(pool: ConnectionPool, spec: AttemptSpec): Promise<Execution> {
  const messages = validateSshConfig(spec.config);
  if (messages.length > 0) throw new InvalidStepConfigError("ssh", messages);
  const config = normalizeSshConfig(spec.config) as SshConfig;
  const remoteDir = remoteDirOf(config, spec);
  const handle = `${config.user}@${config.host}:${config.port}:${remoteDir}`;
  let connection: Connection;
  try {
    connection = await connect(pool, config, spec);
  } catch (error) {
    return failedExecution(handle, statusOfError(error));
  }
  const where = connection.where;
  let sftp: Sftp;
  try {
    sftp = await connection.sftp();
    // Everything but the step itself goes over SFTP, its requests pipelined:
    // an exec channel costs a remote fork and several round trips (≈ 140 ms
    // on loopback against OpenSSH, whose non-interactive sessions leave
    // Nagle on), an SFTP request one round trip.
    await makeDirs(sftp, remoteDir);
    const pwd = await sftpCall<string>((cb) => sftp.realpath(remoteDir, cb));
    const write = (name: string, text: string) =>
      sftpCall<void>((cb) => sftp.writeFile(`${remoteDir}/${name}`, text, { mode: 0o600 }, cb));
    const remoteInputs: Record<string, string> = {};
    const uploads = Object.entries(spec.inputs).map(([name, path]) => {
      const target = `${remoteDir}/in/${segment(name)}`;
      remoteInputs[name] = target;
      return upload(sftp, path, target);
    });
    const absolute = (path: string) => `${pwd}/${path.slice(remoteDir.length + 1)}`;
    const env = {
      ...stepEnvironment({
        ...spec,
        inputsDir: absolute(`${remoteDir}/in`),
        outputsDir: absolute(`${remoteDir}/out`),
        inputs: Object.fromEntries(
          Object.entries(remoteInputs).map(([name, path]) => [name, absolute(path)]),
        ),
      }),
      ...spec.env,
    };
    // The connection's own secrets stay on this side.
    for (const name of credentialNames(config)) delete env[name];
    const envText = Object.entries(env)
      .filter(([name]) => ENV_NAME.test(name))
      .map(([name, value]) => `${name}=${shellQuote(value)}\n`).join("");
    await Promise.all([
      ...uploads,
      write("agent", `${spec.agentId}\n`),
      write("env", envText),
      write("run.sh", config.run),
      write("outputs", spec.outputs.map((name) => `${basename(name)}\n`).join("")),
      write("wrapper.sh", WRAPPER),
    ]);
  } catch (error) {
    if (sftp! && !connection.closed) await removeAttemptDir(sftp, remoteDir).catch(() => {});
    return failedExecution(
      handle,
      error instanceof ConnectionError || connection.closed ? statusOfError(error) : {
        exitCode: UNKNOWN_EXIT_CODE,
        errorClass: "infrastructure",
        message: `cannot prepare ${remoteDir} on ${where}: ${(error as Error).message}`,
      },
    );
  }
  let channel: Channel;
  try {
    channel = await connection.exec(
      `cd ${shellQuote(remoteDir)} && exec setsid -w /bin/sh ./wrapper.sh`,
    );
  } catch (error) {
    // Refused (the server's MaxSessions, say): the prepared directory holds
    // the step's environment, secrets included, and nothing else would remove it.
    if (!connection.closed) await removeAttemptDir(sftp, remoteDir).catch(() => {});
    return failedExecution(handle, statusOfError(error));
  }
  return watchRemote({ connection, sftp, channel, remoteDir, handle, spec, config });
}

interface WatchOptions {
  connection: Connection;
  sftp: Sftp;
  channel: Channel;
  remoteDir: string;
  handle: string;
  spec: AttemptSpec;
  config: SshConfig;
}

function watchRemote(options: WatchOptions): Execution {
  const { connection, sftp, channel, remoteDir, spec, config } = options;
  const queue = new LogQueue();
  const push = (stream: LogChunk["stream"], source: { pause(): void; resume(): void }) =>
  (
    data: Uint8Array,
  ) => {
    if (data.byteLength > 0) queue.push({ stream, data: new Uint8Array(data) });
    // Backpressure: a step printing faster than its log is read waits on SSH's window.
    if (queue.full) {
      source.pause();
      queue.room().then(() => source.resume());
    }
  };
  channel.on("data", push("stdout", channel));
  channel.stderr.on("data", push("stderr", channel.stderr));
  let cancelled = false;
  let exited = false;
  let final: ExitStatus | undefined;

  const ended = new Promise<{ code: number | null; signal?: string; lost: boolean }>((resolve) => {
    let exit: { code: number | null; signal?: string } | undefined;
    // Ended once the exit status and both streams' EOF are in: the channel's
    // close comes a round trip (or a Nagle delay) later.
    let open = 2;
    const eof = () => {
      if (--open === 0 && exit) resolve({ ...exit, lost: false });
    };
    channel.on("end", eof);
    channel.stderr.on("end", eof);
    channel.on("exit", (code, signal) => {
      exit = { code, signal };
      if (open === 0) resolve({ ...exit, lost: false });
      // A child the step left may hold the channel open: give it a moment, then close it.
      setTimeout(() => {
        try {
          channel.close();
        } catch { /* closed */ }
      }, DRAIN_DEADLINE_MS);
    });
    channel.on(
      "close",
      () => resolve(exit ? { ...exit, lost: false } : { code: null, lost: true }),
    );
    connection.onClose(() => resolve(exit ? { ...exit, lost: false } : { code: null, lost: true }));
  });

  const readPgid = async (): Promise<number | undefined> => {
    try {
      const data = await sftpCall<Uint8Array>((cb) => sftp.readFile(`${remoteDir}/pgid`, cb));
      const pgid = Number(new TextDecoder().decode(data).trim());
      return Number.isInteger(pgid) && pgid > 1 ? pgid : undefined;
    } catch {
      return undefined;
    }
  };

  const kill = async (signal: "TERM" | "KILL") => {
    const pgid = await readPgid();
    // Never a group of 1 or below: `kill -TERM -1` means every process of the user.
    if (pgid === undefined) return;
    await connection.run(`kill -${signal} -${pgid} 2>/dev/null; true`).catch(() => {});
  };

  const finish = async (): Promise<ExitStatus> => {
    const end = await ended;
    exited = true;
    queue.close();
    if (end.lost) {
      if (cancelled) {
        return {
          exitCode: UNKNOWN_EXIT_CODE,
          errorClass: "cancelled",
          message: "step was cancelled",
        };
      }
      return {
        exitCode: UNKNOWN_EXIT_CODE,
        errorClass: "infrastructure",
        message: `lost the connection to ${connection.where}: ${connection.closeReason}`,
      };
    }
    let exitCode = end.code ?? UNKNOWN_EXIT_CODE;
    const recorded = await sftpCall<Uint8Array>((cb) => sftp.readFile(`${remoteDir}/exit`, cb))
      .then((data) => Number(new TextDecoder().decode(data).trim()), () => undefined);
    if (recorded !== undefined && Number.isInteger(recorded)) exitCode = recorded;
    if (cancelled) {
      return { exitCode, errorClass: "cancelled", message: "step was cancelled" };
    }
    let status = classifyExit(end.signal ? { exitCode, signal: `SIG${end.signal}` } : { exitCode });
    if (exitCode === 0) {
      try {
        await downloadOutputs(connection.where, sftp, remoteDir, spec);
      } catch (error) {
        return statusOfError(error);
      }
      status = await missingOutputStatus(spec, status);
    }
    return status;
  };
  const waitPromise = finish().then((status) => final = status);

  let cleaning: Promise<void> | undefined;
  return {
    handle: options.handle,
    logs: queue,
    wait: () => waitPromise,
    status: () => Promise.resolve(final ? { state: "exited", exit: final } : { state: "running" }),
    async cancel(graceMs = DEFAULT_CANCEL_GRACE_MS) {
      if (exited) return;
      cancelled = true;
      await kill("TERM");
      const timer = setTimeout(() => kill("KILL"), graceMs);
      await ended;
      clearTimeout(timer);
      await waitPromise;
    },
    cleanup() {
      cleaning ??= (async () => {
        if (!exited) {
          cancelled = true;
          await kill("KILL");
        }
        const status = await waitPromise;
        if (connection.closed) return;
        if (config["keep-on-failure"] && status.errorClass !== undefined) return;
        await removeAttemptDir(sftp, remoteDir).catch(() => {});
      })();
      return cleaning;
    },
  };
}

/**
 * Makes an attempt's directory, its missing parents, `in/` and `out/` over
 * SFTP. The requests are sent at once; the server answers them in order,
 * so each parent exists before its child is asked for.
 */
async function makeDirs(sftp: Sftp, remoteDir: string): Promise<void> {
  const parts = remoteDir.split("/");
  const paths: string[] = [];
  for (let i = 1; i <= parts.length; i++) {
    const path = parts.slice(0, i).join("/");
    if (path !== "") paths.push(path);
  }
  paths.push(`${remoteDir}/in`, `${remoteDir}/out`);
  const made = await Promise.allSettled(
    paths.map((path) => sftpCall<void>((cb) => sftp.mkdir(path, { mode: 0o700 }, cb))),
  );
  // An existing parent fails its mkdir, which is fine; the leaves must exist.
  for (const leaf of [`${remoteDir}/in`, `${remoteDir}/out`]) {
    const result = made[paths.indexOf(leaf)];
    if (result.status === "fulfilled") continue;
    const exists = await sftpCall<{ isFile(): boolean }>((cb) => sftp.lstat(leaf, cb))
      .then(() => true, () => false);
    if (!exists) throw result.reason;
  }
}

/** Removes a remote tree over SFTP (links are removed, never followed). */
async function removeTree(sftp: Sftp, path: string): Promise<void> {
  const entries = await sftpCall<Array<{ filename: string; attrs: { isDirectory(): boolean } }>>(
    (cb) => sftp.readdir(path, cb),
  );
  await Promise.all(entries.map(({ filename, attrs }) => {
    const child = `${path}/${filename}`;
    return attrs.isDirectory()
      ? removeTree(sftp, child)
      : sftpCall<void>((cb) => sftp.unlink(child, cb));
  }));
  await sftpCall<void>((cb) => sftp.rmdir(path, cb));
}

/** Removes an attempt's remote dir, then its step and run dirs when they are left empty. */
async function removeAttemptDir(sftp: Sftp, remoteDir: string): Promise<void> {
  await removeTree(sftp, remoteDir).catch(() => {});
  const step = remoteDir.slice(0, remoteDir.lastIndexOf("/"));
  const run = step.slice(0, step.lastIndexOf("/"));
  // Not empty: another attempt's; the server refuses, which is fine.
  await sftpCall<void>((cb) => sftp.rmdir(step, cb)).catch(() => {});
  await sftpCall<void>((cb) => sftp.rmdir(run, cb)).catch(() => {});
}

/** Removes an attempt's remote dir, then its step and run dirs when they are left empty. */
function removeCommand(remoteDir: string): string {
  const step = remoteDir.slice(0, remoteDir.lastIndexOf("/"));
  const run = step.slice(0, step.lastIndexOf("/"));
  return `rm -rf -- ${shellQuote(remoteDir)}; rmdir -- ${shellQuote(step)} ${
    shellQuote(run)
  } 2>/dev/null; true`;
}

/**
 * Downloads each declared output that exists, its SHA-256 checked against
 * the digest the wrapper computed remotely.
 */
async function downloadOutputs(
  where: string,
  sftp: Sftp,
  remoteDir: string,
  spec: AttemptSpec,
): Promise<void> {
  const digests = new Map<string, string>();
  const listed = await sftpCall<Uint8Array>((cb) => sftp.readFile(`${remoteDir}/digests`, cb))
    .then((data) => new TextDecoder().decode(data), () => "");
  for (const line of listed.split("\n")) {
    const match = /^([0-9a-f]{64}) [ *]out\/(.+)$/.exec(line);
    if (match) digests.set(match[2], match[1]);
  }
  // The values file comes too when the step wrote one (not an output: no digest).
  const values = `${remoteDir}/out/.runnel-values`;
  const valuesStats = await sftpCall<{ isFile(): boolean; size: number }>((cb) =>
    sftp.lstat(values, cb)
  ).catch(() => undefined);
  if (valuesStats?.isFile() && valuesStats.size <= 64 * 1024) {
    await sftpCall<void>((cb) =>
      sftp.fastGet(values, `${spec.outputsDir}/.runnel-values`, TRANSFER, cb)
    );
  }
  await Promise.all(spec.outputs.map(async (name) => {
    const file = basename(name);
    const remote = `${remoteDir}/out/${file}`;
    const stats = await sftpCall<{ isFile(): boolean }>((cb) => sftp.lstat(remote, cb)).catch(() =>
      undefined
    );
    // Missing, a directory or a link: left for the outputs check to name.
    if (!stats?.isFile()) return;
    const remoteDigest = digests.get(file);
    if (remoteDigest === undefined) {
      throw new ConnectionError(`no remote digest of output "${name}" on ${where}`);
    }
    const local = `${spec.outputsDir}/${file}`;
    await sftpCall<void>((cb) => sftp.fastGet(remote, local, TRANSFER, cb));
    const localDigest = await sha256File(local);
    if (remoteDigest !== localDigest) {
      await Deno.remove(local).catch(() => {});
      throw new ConnectionError(
        `output "${name}" arrived corrupted from ${where}: sha256 ${localDigest}, ` +
          `remote ${remoteDigest}`,
      );
    }
  }));
}

/** The backend factory, as plugin hosts load it (a module's default export). */
export default createSshBackend;
