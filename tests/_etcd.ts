/**
 * A real etcd cluster for tests: members are `etcd` subprocesses on
 * loopback, each with its own data directory in one temporary directory and
 * free ports for client, peer and metrics traffic. Readiness is judged by
 * the members' `/health` and `/metrics` (served over plain HTTP on the
 * metrics port, also when clients use TLS), polled with a deadline.
 *
 * @module
 */

import { poll } from "./_helpers.ts";

/** Options of {@link startEtcdCluster}. */
export interface EtcdClusterOptions {
  /** Number of members. Default 3. */
  members?: number;
  /** `--heartbeat-interval`; default 50 ms (loopback RTTs are far below it). */
  heartbeatMs?: number;
  /** `--election-timeout`; default 500 ms (10 heartbeats, etcd's tuning guide). */
  electionMs?: number;
  /** Serve clients over TLS with a fresh CA and client certificates. */
  tls?: boolean;
  /** Deadline for the cluster (or a restarted member) to become healthy. Default 20 s. */
  startTimeoutMs?: number;
  /** More flags for every member (e.g. `--quota-backend-bytes=…`). */
  extraArgs?: string[];
}

/** Certificates of a TLS cluster, for the client. */
export interface EtcdClusterTls {
  caFile: string;
  certFile: string;
  keyFile: string;
  /** The DNS name in the members' certificates (endpoints are IP addresses). */
  serverName: string;
}

/** The DNS name the test certificates are issued for, beside 127.0.0.1. */
const SERVER_NAME = "localhost";

/** A running test cluster. */
export interface EtcdCluster extends AsyncDisposable {
  /** Client URLs, one per member, by member index. */
  readonly endpoints: string[];
  /** Plain-HTTP metrics URLs (`/metrics`, `/health`), one per member, by member index. */
  readonly metrics: string[];
  /** The temporary directory holding data directories and logs. */
  readonly dir: string;
  /** Client certificates when started with `tls`. */
  readonly tls?: EtcdClusterTls;
  /** Sends a signal (default SIGKILL) to a member and waits for it to exit. */
  kill(member: number, signal?: Deno.Signal): Promise<void>;
  /** Starts a killed member again on its data directory and waits until it is healthy. */
  restart(member: number): Promise<void>;
  /** Whether a member's process is running. */
  running(member: number): boolean;
  /** The index of the member that leads, once all running members agree there is one. */
  leader(timeoutMs?: number): Promise<number>;
  /** A member's log so far (for failure messages). */
  log(member: number): Promise<string>;
  /** Kills every member and removes the directory. */
  stop(): Promise<void>;
}

const DEFAULT_HEARTBEAT_MS = 50;
const DEFAULT_ELECTION_MS = 500;
const DEFAULT_START_TIMEOUT_MS = 20_000;

/**
 * Every member process and directory of this module, cleaned up if the test
 * process exits without stopping its clusters (a filtered run, a failure).
 */
const liveProcesses = new Set<Deno.ChildProcess>();
const liveDirs = new Set<string>();
globalThis.addEventListener("unload", () => {
  for (const process of liveProcesses) {
    try {
      process.kill("SIGKILL");
    } catch {
      // Already gone.
    }
  }
  for (const dir of liveDirs) {
    try {
      Deno.removeSync(dir, { recursive: true });
    } catch {
      // A member still writing (it dies with the signal above) or already removed.
    }
  }
});

/** Whether the `etcd` binary can be run here. */
export function etcdInstalled(): boolean {
  try {
    return new Deno.Command("etcd", { args: ["--version"], stdout: "null", stderr: "null" })
      .outputSync().success;
  } catch {
    return false;
  }
}

/**
 * `ignore` for `Deno.test` of a test needing etcd: never under CI (a missing
 * binary must fail there), otherwise when etcd is missing, saying so once.
 */
export function ignoreWithoutEtcd(): boolean {
  if (Deno.env.get("CI") === "true" || etcdInstalled()) return false;
  if (!warned) {
    console.warn("etcd tests skipped: no etcd binary (apt-get install etcd-server)");
    warned = true;
  }
  return true;
}
let warned = false;

/** Reserves `count` distinct free loopback ports. */
function freePorts(count: number): number[] {
  const listeners = Array.from(
    { length: count },
    () => Deno.listen({ hostname: "127.0.0.1", port: 0 }),
  );
  const ports = listeners.map((listener) => (listener.addr as Deno.NetAddr).port);
  for (const listener of listeners) listener.close();
  return ports;
}

async function fetchText(url: string): Promise<string> {
  const response = await fetch(url, { signal: AbortSignal.timeout(2_000) });
  return await response.text();
}

/** Makes a CA, a server certificate for 127.0.0.1 and a client certificate with openssl. */
async function makeCertificates(
  dir: string,
): Promise<EtcdClusterTls & { serverCert: string; serverKey: string }> {
  const openssl = async (...args: string[]) => {
    const output = await new Deno.Command("openssl", {
      args,
      cwd: dir,
      stdout: "null",
      stderr: "piped",
    })
      .output();
    if (!output.success) {
      throw new Error(`openssl ${args[0]} failed: ${new TextDecoder().decode(output.stderr)}`);
    }
  };
  const key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
  await openssl(
    "req",
    "-x509",
    ...key,
    "-keyout",
    "ca.key",
    "-out",
    "ca.crt",
    "-days",
    "1",
    "-subj",
    "/CN=runnel-test-ca",
  );
  for (const [name, usage] of [["server", "serverAuth,clientAuth"], ["client", "clientAuth"]]) {
    await Deno.writeTextFile(
      `${dir}/${name}.ext`,
      `subjectAltName=IP:127.0.0.1,DNS:${SERVER_NAME}\nextendedKeyUsage=${usage}\n`,
    );
    await openssl(
      "req",
      ...key,
      "-keyout",
      `${name}.key`,
      "-out",
      `${name}.csr`,
      "-subj",
      `/CN=runnel-${name}`,
    );
    await openssl(
      "x509",
      "-req",
      "-in",
      `${name}.csr`,
      "-CA",
      "ca.crt",
      "-CAkey",
      "ca.key",
      "-CAcreateserial",
      "-out",
      `${name}.crt`,
      "-days",
      "1",
      "-extfile",
      `${name}.ext`,
    );
  }
  return {
    caFile: `${dir}/ca.crt`,
    certFile: `${dir}/client.crt`,
    keyFile: `${dir}/client.key`,
    serverName: SERVER_NAME,
    serverCert: `${dir}/server.crt`,
    serverKey: `${dir}/server.key`,
  };
}

/**
 * Starts an etcd cluster and waits until every member is healthy.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { startEtcdCluster } from "./_etcd.ts";
 * await using cluster = await startEtcdCluster({ members: 1 });
 * assert.equal(cluster.endpoints.length, 1);
 * assert.equal(await cluster.leader(), 0);
 * ```
 */
export async function startEtcdCluster(options: EtcdClusterOptions = {}): Promise<EtcdCluster> {
  const count = options.members ?? 3;
  const heartbeatMs = options.heartbeatMs ?? DEFAULT_HEARTBEAT_MS;
  const electionMs = options.electionMs ?? DEFAULT_ELECTION_MS;
  const startTimeoutMs = options.startTimeoutMs ?? DEFAULT_START_TIMEOUT_MS;
  const dir = await Deno.makeTempDir({ prefix: "runnel-etcd-" });
  liveDirs.add(dir);
  const certificates = options.tls ? await makeCertificates(dir) : undefined;
  const ports = freePorts(3 * count);
  const scheme = certificates ? "https" : "http";
  const members = Array.from({ length: count }, (_, i) => ({
    name: `m${i}`,
    client: `${scheme}://127.0.0.1:${ports[3 * i]}`,
    peer: `http://127.0.0.1:${ports[3 * i + 1]}`,
    metrics: `http://127.0.0.1:${ports[3 * i + 2]}`,
  }));
  const initialCluster = members.map((member) => `${member.name}=${member.peer}`).join(",");
  const token = `runnel-test-${crypto.randomUUID()}`;
  const processes: (Deno.ChildProcess | undefined)[] = members.map(() => undefined);
  const logWrites: Promise<void>[] = [];

  async function spawn(index: number): Promise<void> {
    const member = members[index];
    const args = [
      `--name=${member.name}`,
      `--data-dir=${dir}/${member.name}`,
      `--listen-client-urls=${member.client}`,
      `--advertise-client-urls=${member.client}`,
      `--listen-peer-urls=${member.peer}`,
      `--initial-advertise-peer-urls=${member.peer}`,
      `--listen-metrics-urls=${member.metrics}`,
      `--initial-cluster=${initialCluster}`,
      `--initial-cluster-token=${token}`,
      "--initial-cluster-state=new",
      `--heartbeat-interval=${heartbeatMs}`,
      `--election-timeout=${electionMs}`,
      "--logger=zap",
      ...(options.extraArgs ?? []),
    ];
    if (certificates) {
      args.push(
        `--cert-file=${certificates.serverCert}`,
        `--key-file=${certificates.serverKey}`,
        `--trusted-ca-file=${certificates.caFile}`,
        "--client-cert-auth",
      );
    }
    const log = await Deno.open(`${dir}/${member.name}.log`, {
      write: true,
      create: true,
      append: true,
    });
    const process = new Deno.Command("etcd", {
      args,
      stdin: "null",
      stdout: "null",
      stderr: "piped",
      // etcd reads ETCD_* variables as flags: none from the test's environment.
      clearEnv: true,
      env: { PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin" },
    }).spawn();
    liveProcesses.add(process);
    processes[index] = process;
    logWrites.push(process.stderr.pipeTo(log.writable).catch(() => {}));
    process.status.then(() => liveProcesses.delete(process));
  }

  async function healthy(index: number): Promise<boolean> {
    const text = await fetchText(`${members[index].metrics}/health`);
    return JSON.parse(text).health === "true";
  }

  async function waitHealthy(indexes: number[]): Promise<void> {
    await poll(async () => {
      for (const index of indexes) {
        if (processes[index] === undefined) throw new Error(`member ${index} is not running`);
        if (!(await healthy(index))) return undefined;
      }
      return true;
    }, {
      what: `etcd members ${indexes.join(", ")} healthy`,
      timeoutMs: startTimeoutMs,
      retryOnError: true,
    });
  }

  async function metric(index: number, name: string): Promise<number | undefined> {
    const text = await fetchText(`${members[index].metrics}/metrics`);
    const line = text.split("\n").find((candidate) => candidate.startsWith(`${name} `));
    return line === undefined ? undefined : Number(line.slice(name.length + 1));
  }

  async function kill(index: number, signal: Deno.Signal = "SIGKILL"): Promise<void> {
    const process = processes[index];
    if (process === undefined) return;
    processes[index] = undefined;
    try {
      process.kill(signal);
    } catch {
      // It had already exited.
    }
    await process.status;
  }

  async function stop(): Promise<void> {
    await Promise.all(members.map((_, index) => kill(index)));
    await Promise.all(logWrites);
    await Deno.remove(dir, { recursive: true }).catch(() => {});
    liveDirs.delete(dir);
  }

  try {
    for (let index = 0; index < count; index++) await spawn(index);
    await waitHealthy(members.map((_, index) => index));
  } catch (error) {
    const logs = await Promise.all(
      members.map((member) => Deno.readTextFile(`${dir}/${member.name}.log`).catch(() => "")),
    );
    await stop();
    throw new Error(`${(error as Error).message}\n--- etcd logs ---\n${logs.join("\n")}`, {
      cause: error,
    });
  }

  return {
    endpoints: members.map((member) => member.client),
    metrics: members.map((member) => member.metrics),
    dir,
    tls: certificates
      ? {
        caFile: certificates.caFile,
        certFile: certificates.certFile,
        keyFile: certificates.keyFile,
        serverName: certificates.serverName,
      }
      : undefined,
    kill,
    async restart(index) {
      if (processes[index] !== undefined) throw new Error(`member ${index} is still running`);
      await spawn(index);
      await waitHealthy([index]);
    },
    running: (index) => processes[index] !== undefined,
    leader(timeoutMs = startTimeoutMs) {
      return poll(async () => {
        const running = members.map((_, index) => index).filter((index) => processes[index]);
        const leaders = [];
        for (const index of running) {
          if ((await metric(index, "etcd_server_has_leader")) !== 1) return undefined;
          if ((await metric(index, "etcd_server_is_leader")) === 1) leaders.push(index);
        }
        return leaders.length === 1 ? leaders[0] : undefined;
      }, { what: "an etcd leader all running members agree on", timeoutMs, retryOnError: true });
    },
    log: (index) => Deno.readTextFile(`${dir}/${members[index].name}.log`),
    stop,
    [Symbol.asyncDispose]: stop,
  };
}
