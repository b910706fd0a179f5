/**
 * A throwaway OpenSSH server for the SSH backend's tests: its own config,
 * host key, user key and `authorized_keys` in a temporary directory, on a
 * free loopback port, ended by its pid. Nothing system-wide is read or
 * written (no `/etc/ssh`, no `~/.ssh`); the test user is the current one.
 *
 * @module
 */

/** A running test server and the files a step needs to reach it. */
export interface TestSshd extends AsyncDisposable {
  host: string;
  port: number;
  user: string;
  /** The temporary directory holding everything below. */
  dir: string;
  /** Private key accepted by the server (ed25519, no passphrase). */
  identity: string;
  /** A known_hosts file naming the server's host key as `[127.0.0.1]:PORT`. */
  knownHosts: string;
  /** The host key's `SHA256:…` fingerprint, as `ssh-keygen -l` prints it. */
  fingerprint: string;
  /** Stops the server (SIGTERM, then SIGKILL); `start()` runs it again on the same port. */
  stop(): Promise<void>;
  /** Starts the server again after `stop()`. */
  start(): Promise<void>;
  /** Pids of the server and of every process below it (sessions, the steps they run). */
  pids(): Promise<number[]>;
  /** Runs a shell command on the test host (the same machine), returns its stdout. */
  sh(command: string): Promise<string>;
}

async function run(command: string, args: string[]): Promise<string> {
  const output = await new Deno.Command(command, { args, stdout: "piped", stderr: "piped" })
    .output();
  if (!output.success) {
    throw new Error(`${command} ${args.join(" ")}: ${new TextDecoder().decode(output.stderr)}`);
  }
  return new TextDecoder().decode(output.stdout);
}

/** Compiled into Debian's sshd; it must exist when sshd starts as root. */
const PRIVSEP_DIR = "/run/sshd";

function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

async function keygen(path: string): Promise<void> {
  await run("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", "runnel-test", "-f", path]);
}

/** Starts an sshd for one test file; dispose of it (or `await using`) to stop it. */
export async function startSshd(): Promise<TestSshd> {
  // sshd run as root insists on its privilege separation directory, which
  // the distribution's service manager normally creates (an empty dir).
  if ((await run("id", ["-u"])).trim() === "0") {
    await Deno.mkdir(PRIVSEP_DIR, { recursive: true, mode: 0o755 });
  }
  const dir = await Deno.realPath(await Deno.makeTempDir({ prefix: "runnel_sshd_" }));
  const port = freePort();
  const user = (await run("id", ["-un"])).trim();
  await keygen(`${dir}/host_ed25519`);
  await keygen(`${dir}/user_ed25519`);
  await Deno.copyFile(`${dir}/user_ed25519.pub`, `${dir}/authorized_keys`);
  const hostPub = (await Deno.readTextFile(`${dir}/host_ed25519.pub`)).trim().split(/\s+/);
  await Deno.writeTextFile(
    `${dir}/known_hosts`,
    `[127.0.0.1]:${port} ${hostPub[0]} ${hostPub[1]}\n`,
  );
  const fingerprint =
    (await run("ssh-keygen", ["-l", "-E", "sha256", "-f", `${dir}/host_ed25519.pub`]))
      .split(/\s+/)[1];
  await Deno.writeTextFile(
    `${dir}/sshd_config`,
    [
      `Port ${port}`,
      "ListenAddress 127.0.0.1",
      `HostKey ${dir}/host_ed25519`,
      `AuthorizedKeysFile ${dir}/authorized_keys`,
      `PidFile ${dir}/sshd.pid`,
      "UsePAM no",
      "StrictModes no",
      "PasswordAuthentication no",
      "KbdInteractiveAuthentication no",
      "PubkeyAuthentication yes",
      "PermitRootLogin prohibit-password",
      "MaxSessions 200",
      "MaxStartups 200",
      "ClientAliveInterval 0",
      "Subsystem sftp internal-sftp",
      "LogLevel ERROR",
      "",
    ].join("\n"),
  );
  let child: Deno.ChildProcess | undefined;
  const start = async () => {
    child = new Deno.Command("/usr/sbin/sshd", {
      args: ["-D", "-e", "-f", `${dir}/sshd_config`],
      stdin: "null",
      stdout: "null",
      stderr: "null",
    }).spawn();
    const deadline = Date.now() + 10_000;
    while (Date.now() < deadline) {
      try {
        (await Deno.connect({ hostname: "127.0.0.1", port })).close();
        return;
      } catch {
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    }
    throw new Error(`sshd did not listen on 127.0.0.1:${port}`);
  };
  const stop = async () => {
    const current = child;
    child = undefined;
    if (!current) return;
    try {
      current.kill("SIGTERM");
    } catch { /* gone */ }
    const timer = setTimeout(() => {
      try {
        current.kill("SIGKILL");
      } catch { /* gone */ }
    }, 3_000);
    await current.status;
    clearTimeout(timer);
  };
  await start();
  return {
    host: "127.0.0.1",
    port,
    user,
    dir,
    identity: `${dir}/user_ed25519`,
    knownHosts: `${dir}/known_hosts`,
    fingerprint,
    stop,
    start,
    async pids() {
      if (!child) return [];
      const all = [child.pid];
      for (let i = 0; i < all.length; i++) {
        const out = await run("ps", ["-o", "pid=", "--ppid", String(all[i])]).catch(() => "");
        all.push(...out.split(/\s+/).filter(Boolean).map(Number));
      }
      return all;
    },
    sh: (command) => run("sh", ["-c", command]),
    async [Symbol.asyncDispose]() {
      await stop();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    },
  };
}

/** The step config of an `ssh` step against `sshd`, its work root in the server's directory. */
export function sshConfigOf(
  sshd: TestSshd,
  extra: Record<string, unknown> = {},
): Record<string, unknown> {
  return {
    host: sshd.host,
    port: sshd.port,
    user: sshd.user,
    identity: sshd.identity,
    "known-hosts": sshd.knownHosts,
    "work-root": `${sshd.dir}/remote`,
    ...extra,
  };
}
