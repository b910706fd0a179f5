/**
 * A cluster of real processes for the security tests: etcd members
 * (tests/_etcd.ts), `runnel server`s and agents (tests/fixtures/agent_main.ts),
 * each ended by its pid.
 *
 * @module
 */

import type { AgentOptions } from "../../agent/worker/mod.ts";
import { CLI_PERMISSIONS, MAIN, poll, ROOT } from "../_helpers.ts";

/** The join token of the test clusters. */
export const TOKEN = "security-test-join-token";
/** The API's admin token, as the servers' `--admin-token-file` holds it. */
export const ADMIN_TOKEN = "security-test-admin-token-0123456789";
/** `Authorization` for the API as the admin. */
export const AS_ADMIN = { headers: { authorization: `Bearer ${ADMIN_TOKEN}` } };

/** The admin token file every test server is started with (removed when the module unloads). */
const ADMIN_TOKEN_FILE = (() => {
  const path = Deno.makeTempFileSync({ prefix: "runnel-admin-token-" });
  Deno.writeTextFileSync(path, ADMIN_TOKEN, { mode: 0o600 });
  globalThis.addEventListener("unload", () => {
    try {
      Deno.removeSync(path);
    } catch {
      // Gone already.
    }
  });
  return path;
})();

/** A free TCP port on loopback (closed again: the server binds it). */
export function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

/** A child process whose stderr is kept, ended by its pid. */
class Child {
  readonly stderr: string[] = [];
  readonly child: Deno.ChildProcess;
  readonly #reading: Promise<void>;

  constructor(args: string[], env: Record<string, string> = {}) {
    this.child = new Deno.Command(Deno.execPath(), {
      args: ["run", ...CLI_PERMISSIONS, ...args],
      env: { NO_COLOR: "1", ...env },
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    const child = this.child;
    this.#reading = (async () => {
      for await (const text of child.stderr.pipeThrough(new TextDecoderStream())) {
        this.stderr.push(text);
      }
    })();
  }

  get pid(): number {
    return this.child.pid;
  }

  /** Its stderr so far, as JSON log lines (other lines are skipped). */
  logLines(): Array<Record<string, unknown>> {
    return this.stderr.join("").split("\n").flatMap((line) => {
      try {
        const parsed = JSON.parse(line);
        return typeof parsed === "object" && parsed !== null ? [parsed] : [];
      } catch {
        return [];
      }
    });
  }

  /** Waits for the process to exit by itself. */
  async exited(): Promise<Deno.CommandStatus> {
    const status = await this.child.status;
    await this.#reading;
    return status;
  }

  /** Sends SIGKILL and waits for the exit. */
  async kill(): Promise<void> {
    await this.stop("SIGKILL");
  }

  /** Sends `signal` (SIGTERM) unless it exited, and waits for the exit. */
  async stop(signal: Deno.Signal = "SIGTERM"): Promise<Deno.CommandStatus> {
    try {
      this.child.kill(signal);
    } catch {
      // Already gone.
    }
    const status = await this.child.status;
    await this.#reading;
    return status;
  }
}

/** A `runnel server` process. */
export class ServerProcess extends Child {
  readonly id: string;
  readonly http: string;
  readonly grpc: string;

  /** Starts `runnel server` over etcd (`endpoints`) with the given ports. */
  constructor(options: {
    id: string;
    etcd: string[];
    ports: { http: number; grpc: number };
    peers: string[];
    heartbeat: string;
  }) {
    super([
      MAIN,
      "server",
      "--etcd",
      options.etcd.join(","),
      "--id",
      options.id,
      "--listen",
      `127.0.0.1:${options.ports.http}`,
      "--grpc",
      `127.0.0.1:${options.ports.grpc}`,
      "--peers",
      options.peers.join(","),
      "--heartbeat",
      options.heartbeat,
      "--admin-token-file",
      ADMIN_TOKEN_FILE,
    ], { RUNNEL_TOKEN: TOKEN });
    this.id = options.id;
    this.http = `http://127.0.0.1:${options.ports.http}`;
    this.grpc = `127.0.0.1:${options.ports.grpc}`;
  }

  /** Waits until `/ready` answers 200. */
  async ready(timeoutMs = 30_000): Promise<void> {
    await poll(async () => {
      const response = await fetch(`${this.http}/ready`);
      await response.body?.cancel();
      return response.ok ? true : undefined;
    }, { what: `${this.id} ready`, timeoutMs, retryOnError: true });
  }

  /** `/cluster-state`. */
  async clusterState(): Promise<
    { scheduler?: string; workers: Array<{ agentId: string; server: string }> }
  > {
    return await (await fetch(`${this.http}/cluster-state`, AS_ADMIN)).json();
  }

  /** The value of a counter in `/metrics`, 0 when absent. */
  async metric(name: string, labels: string): Promise<number> {
    const text = await (await fetch(`${this.http}/metrics`, AS_ADMIN)).text();
    const line = text.split("\n").find((line) => line.startsWith(`${name}{${labels}}`));
    return line ? Number(line.split(" ").at(-1)) : 0;
  }
}

/** Options of an agent process: {@link AgentOptions} with a local artifact store's directory. */
export type AgentProcessOptions = Omit<AgentOptions, "artifacts" | "log"> & {
  artifactsDir: string;
};

/** A `runnel agent` process (tests/fixtures/agent_main.ts), configured by a JSON file. */
export class AgentProcess extends Child {
  /** Writes the config beside the state dir and starts the agent. */
  static async start(options: AgentProcessOptions): Promise<AgentProcess> {
    const file = `${options.stateDir}.config-${crypto.randomUUID().slice(0, 8)}.json`;
    await Deno.writeTextFile(file, JSON.stringify(options));
    return new AgentProcess(file);
  }

  private constructor(configFile: string) {
    super([`${ROOT}/tests/fixtures/agent_main.ts`, configFile]);
  }

  /** Its events (the JSON lines it logs) with `msg`. */
  events(msg: string): Array<Record<string, unknown>> {
    return this.logLines().filter((line) => line.msg === msg);
  }
}

/** Two `runnel server`s over a 3-member etcd and one shell agent, every one a process. */
export interface ProcessCluster extends AsyncDisposable {
  servers: ServerProcess[];
  /** The server that runs the scheduler, and the other one. */
  leader: ServerProcess;
  survivor: ServerProcess;
}

/**
 * Starts etcd (3 members), two servers and an agent with `allowShell` and
 * `slots`, and waits until one server schedules and the agent is online.
 */
export async function startProcessCluster(
  dir: string,
  options: { slots?: number } = {},
): Promise<ProcessCluster> {
  const { startEtcdCluster } = await import("../_etcd.ts");
  const etcd = await startEtcdCluster({ members: 3 });
  const ports = [0, 1].map(() => ({ http: freePort(), grpc: freePort() }));
  const peers = ports.map((port) => `127.0.0.1:${port.grpc}`);
  const servers = [0, 1].map((index) =>
    new ServerProcess({
      id: `server-${index}`,
      etcd: etcd.endpoints,
      ports: ports[index],
      peers,
      heartbeat: "300ms",
    })
  );
  let agent: AgentProcess | undefined;
  const close = async () => {
    await agent?.stop();
    await Promise.all(servers.map((server) => server.stop()));
    await etcd.stop();
  };
  try {
    await Promise.all(servers.map((server) => server.ready()));
    agent = await AgentProcess.start({
      servers: peers,
      token: TOKEN,
      agentId: "agent-1",
      ...(options.slots ? { slots: options.slots } : {}),
      allowShell: true,
      stateDir: `${dir}/agent-1`,
      artifactsDir: `${dir}/artifacts`,
      reconnect: { initialMs: 50, maxMs: 500 },
    });
    const leaderId = await poll(async () => {
      const state = await servers[0].clusterState();
      return state.scheduler && state.workers.length === 1 ? state.scheduler : undefined;
    }, { what: "a scheduler and a worker", timeoutMs: 60_000, retryOnError: true });
    return {
      servers,
      leader: servers.find((server) => server.id === leaderId)!,
      survivor: servers.find((server) => server.id !== leaderId)!,
      [Symbol.asyncDispose]: close,
    };
  } catch (error) {
    await close();
    throw error;
  }
}
