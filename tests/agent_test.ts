/**
 * The worker agent against fake servers speaking the real gRPC protocol
 * (`serveAgentService`), with a local artifact store and real backends in
 * plugin hosts.
 *
 * The restart test with re-attachment needs Docker: with `CI=true` a
 * missing daemon fails it; otherwise it is skipped with the reason printed.
 *
 * @module
 */

import { processAlive } from "../backends/_testing.ts";
import { assignmentSpec } from "../proto/_testing.ts";
import assert from "node:assert/strict";
import {
  type AgentOptions,
  AgentRejectedError,
  type RunningAgent,
  startAgent,
} from "../agent/worker/mod.ts";
import { openLocalArtifactStore } from "../core/artifacts/local.ts";
import type { ArtifactStore } from "../core/artifacts/store.ts";
import type { AttemptResult } from "../core/model.ts";
import type { AttemptSpec } from "../backends/backend.ts";
import createDockerBackend from "../backends/docker/mod.ts";
import { ensureBusyboxImage } from "../infra/images.ts";
import { agentPolicy } from "../agent/attempt/policy.ts";
import {
  type AgentConnection,
  type AgentMessage,
  type AgentServiceServer,
  type AssignmentSpec,
  type Hello,
  serveAgentService,
  type ServerMessageInit,
} from "../proto/mod.ts";
import type * as wire from "../proto/mod.ts";
import { CLI_PERMISSIONS, poll, ROOT, sandbox } from "./_helpers.ts";
import { bundleDigest } from "../agent/bundle.ts";

const TOKEN = "s3cret-join-token";
const IN_CI = Deno.env.get("CI") === "true";
const docker = await createDockerBackend().fingerprint();
if (!docker.available && !IN_CI) {
  console.log(`%cskipping the agent's Docker restart test: ${docker.detail}`, "color: yellow");
}

/** Options of {@link FakeServer.start}. */
interface FakeServerOptions {
  /** Acknowledge every result at once (default true). */
  autoAck?: boolean;
  /** Heartbeat period the Welcome asks for. */
  heartbeatMs?: number;
  serverId?: string;
}

/** The server side of the protocol, played by the test: it records what agents send. */
class FakeServer {
  readonly messages: AgentMessage[] = [];
  autoAck: boolean;
  readonly #options: FakeServerOptions;
  #server!: AgentServiceServer;
  #current: AgentConnection | undefined;

  private constructor(options: FakeServerOptions) {
    this.#options = options;
    this.autoAck = options.autoAck ?? true;
  }

  static async start(options: FakeServerOptions = {}): Promise<FakeServer> {
    const fake = new FakeServer(options);
    fake.#server = await serveAgentService({
      address: "127.0.0.1:0",
      onConnect: (connection) => fake.#serve(connection),
    });
    return fake;
  }

  get address(): string {
    return `127.0.0.1:${this.#server.port}`;
  }

  get hellos(): Hello[] {
    return this.messages.flatMap((m) => m.body === "hello" ? [m.hello] : []);
  }

  get heartbeats(): wire.Heartbeat[] {
    return this.messages.flatMap((m) => m.body === "heartbeat" ? [m.heartbeat] : []);
  }

  /** Digests of the bundles agents asked for. */
  bundleRequests(): string[] {
    return this.messages.flatMap((m) => m.body === "bundleRequest" ? [m.bundleRequest.digest] : []);
  }

  get started(): wire.AttemptStarted[] {
    return this.messages.flatMap((m) => m.body === "started" ? [m.started] : []);
  }

  results(attemptId?: string): Array<{ attemptId: string; result: AttemptResult }> {
    return this.messages.flatMap((m) =>
      m.body === "result" && (attemptId === undefined || m.result.attemptId === attemptId)
        ? [{ attemptId: m.result.attemptId, result: JSON.parse(m.result.resultJson) }]
        : []
    );
  }

  /** The text an attempt logged on one stream, as received. */
  logText(attemptId: string, stream = "stdout"): string {
    return this.messages.map((m) =>
      m.body === "log" && m.log.attemptId === attemptId && m.log.stream === stream ? m.log.text : ""
    ).join("");
  }

  /** Sends to the agent connected last. */
  async send(message: ServerMessageInit): Promise<void> {
    assert.ok(this.#current, "no agent connected");
    assert.equal(await this.#current.send(message), true);
  }

  /** Sends an assignment, with the values of its secrets as a server resolves them. */
  async assign(
    spec: AssignmentSpec,
    backend: string,
    secrets: Record<string, string> = {},
  ): Promise<void> {
    await this.send({
      assign: { attemptId: spec.attemptId, backend, specJson: JSON.stringify(spec), secrets },
    });
  }

  /** Breaks the stream of the agent connected last, as a network drop would. */
  drop(): void {
    this.#current?.cancel("connection dropped by the test");
  }

  close(): Promise<void> {
    return this.#server.close();
  }

  async #serve(connection: AgentConnection): Promise<void> {
    for await (const message of connection) {
      this.messages.push(message);
      switch (message.body) {
        case "hello":
          if (message.hello.token !== TOKEN) {
            await connection.send({ reject: { code: "bad_token", message: "wrong join token" } });
            connection.end();
            return;
          }
          this.#current = connection;
          await connection.send({
            welcome: {
              serverId: this.#options.serverId ?? "fake",
              heartbeatIntervalMs: this.#options.heartbeatMs ?? 5_000,
            },
          });
          break;
        case "result":
          if (this.autoAck) {
            await connection.send({ ack: { attemptId: message.result.attemptId, accepted: true } });
          }
          break;
      }
    }
    connection.end();
  }
}

/** A sandbox with an artifact store and a running agent, stopped and removed when disposed. */
interface AgentFixture {
  dir: string;
  stateDir: string;
  artifacts: ArtifactStore;
  agent: RunningAgent;
  log: Array<Record<string, unknown>>;
  [Symbol.asyncDispose](): Promise<void>;
}

async function withAgent(
  servers: FakeServer[],
  options: Partial<AgentOptions> = {},
): Promise<AgentFixture> {
  const box = await sandbox();
  const stateDir = `${box.dir}/agent`;
  const artifacts = openLocalArtifactStore(`${box.dir}/artifacts`);
  const log: Array<Record<string, unknown>> = [];
  const agent = await startAgent({
    servers: servers.map((server) => server.address),
    token: TOKEN,
    stateDir,
    artifacts,
    allowShell: true,
    reconnect: { initialMs: 20, maxMs: 200 },
    cancelGraceMs: 1_000,
    log: (fields) => log.push(fields),
    ...options,
  }).catch(async (error) => {
    await box[Symbol.asyncDispose]();
    throw error;
  });
  return {
    dir: box.dir,
    stateDir,
    artifacts,
    agent,
    log,
    async [Symbol.asyncDispose]() {
      await agent.stop();
      await box[Symbol.asyncDispose]();
    },
  };
}

/** Puts a file into the store as an output of a step; its locator. */
async function storeArtifact(
  artifacts: ArtifactStore,
  dir: string,
  where: { runId: string; stepId: string; name: string; leg?: string },
  text: string,
): Promise<wire.ArtifactLocator> {
  const file = `${dir}/upload-${crypto.randomUUID()}`;
  await Deno.writeTextFile(file, text);
  const record = await artifacts.put(file, {
    run: where.runId,
    step: where.stepId,
    name: where.name,
  });
  return { ...where, digest: record.digest, size: record.size };
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch {
    return false;
  }
}

async function listDir(path: string): Promise<string[]> {
  const names: string[] = [];
  for await (const entry of Deno.readDir(path)) names.push(entry.name);
  return names.sort();
}

Deno.test("agent: a wrong join token is refused with a plain message, and not retried", async () => {
  const server = await FakeServer.start();
  const log: Array<Record<string, unknown>> = [];
  try {
    await assert.rejects(
      withAgent([server], { token: "not-the-token", log: (fields) => log.push(fields) }),
      (error: unknown) => {
        assert.ok(error instanceof AgentRejectedError);
        assert.equal(
          error.message,
          `Server ${server.address} refused this agent: wrong join token`,
        );
        assert.equal(error.reason, "bad_token");
        return true;
      },
    );
    assert.equal(server.hellos.length, 1);
    const rejected = log.find((entry) => entry.msg === "rejected");
    assert.equal(rejected?.level, "error");
    assert.equal(rejected?.message, "wrong join token");
    assert.equal(rejected?.server, server.address);
    assert.ok(log.some((entry) => entry.msg === "stopped"));
  } finally {
    await server.close();
  }
});

Deno.test("agent: Hello carries its id, labels, slots and fingerprints; shell is off unless allowed", async () => {
  const server = await FakeServer.start({ heartbeatMs: 50 });
  try {
    await using fixture = await withAgent([server], {
      allowShell: false,
      labels: { cloud: "gcp", region: "us-east1" },
      slots: 3,
    });
    const { agent } = fixture;
    assert.equal(agent.connected, true);
    assert.equal(agent.server, server.address);
    const [hello] = server.hellos;
    assert.equal(hello.agentId, agent.agentId);
    assert.equal(hello.token, TOKEN);
    assert.deepEqual(hello.labels, { cloud: "gcp", region: "us-east1" });
    assert.equal(hello.slots, 3);
    assert.deepEqual(hello.runningAttemptIds, []);
    assert.deepEqual(hello.pendingResultAttemptIds, []);
    // The id is made once and kept.
    const saved = JSON.parse(await Deno.readTextFile(`${fixture.stateDir}/agent.json`));
    assert.equal(saved.agentId, agent.agentId);
    assert.match(agent.agentId, /^[a-z0-9-]+-[0-9a-f]{6}$/);

    const capabilities = Object.fromEntries(hello.capabilities.map((c) => [c.backend, c]));
    assert.deepEqual(Object.keys(capabilities).sort(), [
      "deno",
      "docker",
      "kubernetes",
      "shell",
      "split",
      "ssh",
    ]);
    assert.equal(capabilities.split.available, true, "every agent splits (batch:, foreach:)");
    assert.equal(capabilities.deno.available, true);
    assert.equal(capabilities.deno.version, Deno.version.deno);
    assert.equal(capabilities.shell.available, false);
    assert.match(capabilities.shell.detail, /--allow-shell/);
    // Docker is off on an agent unless its policy lists it.
    assert.equal(capabilities.docker.available, false);
    assert.match(capabilities.docker.detail, /allow them with policy\.backends/);
    // So is kubernetes.
    assert.equal(capabilities.kubernetes.available, false);
    assert.match(capabilities.kubernetes.detail, /allow them with policy\.backends/);

    // A shell step is refused, as a permission failure, and never started.
    const spec = assignmentSpec("script", { run: "echo hi" });
    await server.assign(spec, "shell");
    const result = await resultOf(server, spec.attemptId);
    assert.equal(result.ok, false);
    assert.equal(!result.ok && result.errorClass, "permission");
    assert.match(!result.ok ? result.message : "", /--allow-shell/);
    assert.deepEqual(server.started, []);
    await poll(() => agent.pendingResults.length === 0 || undefined, { what: "the ack" });

    // Heartbeats at the Welcome's period.
    await poll(() => server.heartbeats.length >= 2 || undefined, { what: "heartbeats" });
    assert.equal(server.heartbeats[0].draining, false);
    await agent.stop({ drain: true });
    assert.equal(server.heartbeats.at(-1)?.draining, true);
  } finally {
    await server.close();
  }
});

Deno.test("agent: an assignment runs: inputs fetched, outputs stored, logs masked, result once", async () => {
  const server = await FakeServer.start();
  try {
    await using fixture = await withAgent([server]);
    const { agent, artifacts, dir } = fixture;
    const secret = "hunter2-very-secret";
    const data = await storeArtifact(
      artifacts,
      dir,
      { runId: "up", stepId: "generate", name: "data.txt" },
      "hello agent\n",
    );
    const legs = await Promise.all(["eu", "us"].map((region) =>
      storeArtifact(
        artifacts,
        dir,
        {
          runId: "up",
          stepId: `convert[region=${region}]`,
          name: "part.txt",
          leg: `region=${region}`,
        },
        `part ${region}\n`,
      )
    ));
    const spec = assignmentSpec("upper", {
      // The secret is printed split across two writes, then whole.
      run: [
        `tr a-z A-Z < "$RUNNEL_INPUT_DATA" > "$RUNNEL_OUTPUT_OUT_TXT"`,
        `cat "$RUNNEL_INPUT_PARTS"/*/part.txt > "$RUNNEL_OUTPUT_PARTS_TXT"`,
        `printf 'token: hunter2-ve'; sleep 0.2; printf 'ry-secret\\n'`,
        `echo "again $TOKEN"`,
        `echo "to stderr" >&2`,
      ].join("\n"),
    }, {
      inputs: { data, parts: { fanIn: true, artifacts: legs } },
      outputs: ["out.txt", "parts.txt"],
      secrets: { TOKEN: { secret: "token" } },
      baseDir: dir,
    });
    await server.assign(spec, "shell", { TOKEN: secret });
    const result = await resultOf(server, spec.attemptId);
    assert.equal(result.ok, true, JSON.stringify(result));
    assert.ok(result.ok);

    // Outputs are in the store under the run, step and attempt.
    const record = await artifacts.get(spec.runId, "upper", "out.txt");
    assert.ok(record);
    assert.equal(record.attemptId, spec.attemptId);
    assert.deepEqual(result.outputs["out.txt"], {
      name: "out.txt",
      digest: record.digest,
      size: record.size,
    });
    const copy = `${dir}/copy.txt`;
    await artifacts.materialize(record, copy);
    assert.equal(await Deno.readTextFile(copy), "HELLO AGENT\n");
    const parts = await artifacts.get(spec.runId, "upper", "parts.txt");
    await artifacts.materialize(parts!, copy);
    assert.equal(await Deno.readTextFile(copy), "part eu\npart us\n");

    // Started with its handle, logs masked (also across chunks), stderr apart.
    assert.equal(server.started.length, 1);
    assert.match(server.started[0].handle, /^\d+@\d+$/);
    const stdout = server.logText(spec.attemptId);
    assert.equal(stdout, "token: ***\nagain ***\n");
    assert.equal(server.logText(spec.attemptId, "stderr"), "to stderr\n");
    assert.ok(!JSON.stringify(server.messages).includes(secret));

    // Acknowledged: the outbox is empty, the scratch space and record gone.
    await poll(() => agent.pendingResults.length === 0 || undefined, { what: "the ack" });
    assert.deepEqual(await listDir(`${fixture.stateDir}/outbox`), []);
    assert.deepEqual(await listDir(`${fixture.stateDir}/attempts`), []);
    assert.equal(await exists(`${fixture.stateDir}/work/${spec.runId}/upper/1`), false);
    assert.equal(server.results(spec.attemptId).length, 1);
    assert.deepEqual(agent.running, []);
    const finished = fixture.log.find((entry) => entry.msg === "attempt finished");
    assert.equal(finished?.attemptId, spec.attemptId);
    assert.ok(fixture.log.some((entry) => entry.msg === "result acked"));
  } finally {
    await server.close();
  }
});

Deno.test("agent: its own secrets come from its config, the rest from the server; neither fails as permission", async () => {
  const server = await FakeServer.start();
  const keyDir = await Deno.makeTempDir({ prefix: "runnel_agent_key_" });
  try {
    await Deno.writeTextFile(`${keyDir}/deploy`, "agent-side-KEY-value\n");
    await using fixture = await withAgent([server], {
      secrets: { "deploy-key": { file: `${keyDir}/deploy` } },
    });
    assert.deepEqual(server.hellos[0].secretNames, ["deploy-key"]);
    const spec = assignmentSpec("use", {
      run: 'echo "key $KEY"; echo "db $DB"',
    }, {
      baseDir: fixture.dir,
      secrets: { KEY: { secret: "deploy-key" }, DB: { secret: "db-password" } },
    });
    // The server sends what it resolves; a value it sends for the agent's own name loses.
    await server.assign(spec, "shell", { DB: "server-side-DB-value", KEY: "not-this" });
    const result = await resultOf(server, spec.attemptId);
    assert.equal(result.ok, true, JSON.stringify(result));
    assert.equal(server.logText(spec.attemptId), "key ***\ndb ***\n");
    const attempts = await listDir(`${fixture.stateDir}/attempts`);
    assert.deepEqual(attempts, []);

    const orphan = assignmentSpec("orphan", { run: "true" }, {
      baseDir: fixture.dir,
      secrets: { TOKEN: { secret: "nobody-has-it" } },
    });
    await server.assign(orphan, "shell");
    const refused = await resultOf(server, orphan.attemptId);
    assert.equal(!refused.ok && refused.errorClass, "permission");
    assert.match(
      !refused.ok ? refused.message : "",
      /Secret "TOKEN" names "nobody-has-it", which neither agent \S+'s config nor its server/,
    );
    const raw = assignmentSpec("raw", { run: "true" }, {
      baseDir: fixture.dir,
      secrets: { TOKEN: { env: "RUNNEL_TOKEN" } },
    });
    await server.assign(raw, "shell");
    const rawResult = await resultOf(server, raw.attemptId);
    assert.equal(!rawResult.ok && rawResult.errorClass, "permission");
    assert.match(!rawResult.ok ? rawResult.message : "", /a cluster resolves only secrets/);
  } finally {
    await server.close();
    await Deno.remove(keyDir, { recursive: true });
  }
});

Deno.test("agent: a deno step in its sandbox; a missing input artifact fails as artifact", async () => {
  const server = await FakeServer.start();
  try {
    // The fake server names a directory of this machine as the pipeline's (no bundle),
    // as a server sharing the agent's filesystem would; the agent's policy must list it.
    await using fixture = await withAgent([server], {
      policy: agentPolicy({ pipelineDirs: ["/"] }),
    });
    const { artifacts, dir } = fixture;
    await Deno.writeTextFile(
      `${dir}/count.ts`,
      `export default async (ctx) => {
        const text = await Deno.readTextFile(ctx.inputs.words);
        ctx.log("counting", ctx.env.NAME);
        await Deno.writeTextFile(ctx.outputs["count.json"], JSON.stringify({ words: text.split(/\\s+/).filter(Boolean).length }));
      };\n`,
    );
    const words = await storeArtifact(
      artifacts,
      dir,
      { runId: "up", stepId: "gen", name: "words.txt" },
      "one two three\n",
    );
    const spec = assignmentSpec("count", { module: "count.ts" }, {
      baseDir: dir,
      inputs: { words },
      outputs: ["count.json"],
      secrets: { NAME: { secret: "name" } },
    });
    await server.assign(spec, "deno", { NAME: "Ada Lovelace" });
    const missing = assignmentSpec("count", { module: "count.ts" }, {
      baseDir: dir,
      inputs: { words: { ...words, digest: `sha256:${"0".repeat(64)}` } },
      outputs: ["count.json"],
    });
    await server.assign(missing, "deno");

    const result = await resultOf(server, spec.attemptId, 60_000);
    assert.equal(result.ok, true, JSON.stringify(result));
    const record = await artifacts.get(spec.runId, "count", "count.json");
    await artifacts.materialize(record!, `${dir}/count.json`);
    assert.deepEqual(JSON.parse(await Deno.readTextFile(`${dir}/count.json`)), { words: 3 });
    assert.equal(server.logText(spec.attemptId), "counting ***\n");

    const failed = await resultOf(server, missing.attemptId);
    assert.equal(!failed.ok && failed.errorClass, "artifact");
    assert.match(!failed.ok ? failed.message : "", /is not in the artifact store/);
  } finally {
    await server.close();
  }
});

Deno.test("agent: a cancel stops the step and reports it cancelled; a full agent refuses more", async () => {
  const server = await FakeServer.start();
  try {
    await using fixture = await withAgent([server], { slots: 1 });
    const spec = assignmentSpec("wait", { run: "echo waiting; sleep 30" }, {
      baseDir: fixture.dir,
    });
    await server.assign(spec, "shell");
    await poll(() => server.logText(spec.attemptId).includes("waiting") || undefined, {
      what: "the step's first line",
    });
    assert.deepEqual(fixture.agent.running, [spec.attemptId]);

    const extra = assignmentSpec("extra", { run: "true" }, { baseDir: fixture.dir });
    await server.assign(extra, "shell");
    const refused = await resultOf(server, extra.attemptId);
    assert.equal(!refused.ok && refused.errorClass, "infrastructure");
    assert.match(!refused.ok ? refused.message : "", /has no free slot \(1 of 1 busy\)/);
    // The scheduler's miscount, not the step's failure: it runs again without using retries.
    assert.equal(!refused.ok && refused.lost, true);

    const before = Date.now();
    await server.send({ cancel: { attemptId: spec.attemptId, reason: "cancelled by user" } });
    const result = await resultOf(server, spec.attemptId);
    assert.ok(Date.now() - before < 10_000);
    assert.equal(!result.ok && result.errorClass, "cancelled");
    assert.equal(!result.ok && result.message, "cancelled: cancelled by user");
    assert.equal(server.results(spec.attemptId).length, 1);
  } finally {
    await server.close();
  }
});

Deno.test("agent: a run's bundle that did not come is asked for; a refusal gives the attempt back as lost", async () => {
  const server = await FakeServer.start();
  try {
    await using _agent = await withAgent([server]);
    const files = { "data.txt": btoa("from the bundle\n") };
    const bundle = { digest: bundleDigest(files), files };
    // Its first assignment (with the bundle) went to a server that died.
    const spec = assignmentSpec("reads", { run: "cat data.txt" }, { bundleDigest: bundle.digest });
    await server.assign(spec, "shell");
    await poll(() => server.bundleRequests().includes(bundle.digest) || undefined, {
      what: "the bundle asked for",
    });
    await server.send({ bundle: { digest: bundle.digest, bundleJson: JSON.stringify(bundle) } });
    const result = await resultOf(server, spec.attemptId);
    assert.equal(result.ok, true, JSON.stringify(result));
    assert.equal(server.logText(spec.attemptId), "from the bundle\n");

    const unknown = `sha256:${"0".repeat(64)}`;
    const orphan = assignmentSpec("orphan", { run: "true" }, { bundleDigest: unknown });
    await server.assign(orphan, "shell");
    await poll(() => server.bundleRequests().includes(unknown) || undefined, {
      what: "the other bundle asked for",
    });
    await server.send({ bundle: { digest: unknown, message: "no assignment uses it" } });
    const lost = await resultOf(server, orphan.attemptId);
    assert.equal(!lost.ok && lost.errorClass, "infrastructure");
    assert.equal(!lost.ok && lost.lost, true);
    assert.match(!lost.ok ? lost.message : "", /no assignment uses it/);
  } finally {
    await server.close();
  }
});

Deno.test("agent: its server dies mid-step: it fails over, the result arrives there once", async () => {
  const first = await FakeServer.start({ serverId: "first" });
  const second = await FakeServer.start({ serverId: "second" });
  try {
    await using fixture = await withAgent([first, second]);
    const { agent, dir } = fixture;
    const go = `${dir}/go`;
    const spec = assignmentSpec("slow", {
      run:
        `echo before\nwhile [ ! -f "${go}" ]; do sleep 0.05; done\necho after\necho done > "$RUNNEL_OUTPUT_DONE_TXT"`,
    }, { baseDir: dir, outputs: ["done.txt"] });
    await first.assign(spec, "shell");
    await poll(() => first.logText(spec.attemptId).includes("before") || undefined, {
      what: "the first line on the first server",
    });

    await first.close();
    await poll(() => second.hellos.length === 1 || undefined, { what: "a Hello on the second" });
    assert.deepEqual(second.hellos[0].runningAttemptIds, [spec.attemptId]);
    assert.equal(second.hellos[0].agentId, agent.agentId);
    await poll(() => agent.server === second.address || undefined, { what: "the failover" });

    await Deno.writeTextFile(go, "");
    const result = await resultOf(second, spec.attemptId);
    assert.equal(result.ok, true, JSON.stringify(result));
    await poll(() => agent.pendingResults.length === 0 || undefined, { what: "the ack" });
    assert.equal(second.results(spec.attemptId).length, 1);
    assert.equal(first.results().length, 0);
    // The line sent before the break is not sent again; the rest follows.
    assert.equal(second.logText(spec.attemptId), "after\n");
    assert.equal(first.logText(spec.attemptId), "before\n");
    const kinds = fixture.log.map((entry) => entry.msg);
    assert.ok(kinds.includes("disconnected"));
    assert.ok(kinds.includes("reconnecting"));
  } finally {
    await first.close();
    await second.close();
  }
});

/** The first result an attempt reported to `server`, waited for. */
async function resultOf(
  server: FakeServer,
  attemptId: string,
  timeoutMs = 20_000,
): Promise<AttemptResult> {
  const [first] = await poll(() => {
    const results = server.results(attemptId);
    return results.length > 0 ? results : undefined;
  }, { what: `the result of ${attemptId}`, timeoutMs });
  return first.result;
}

Deno.test("agent: a dropped connection: it reconnects to the same server; a refused result is let go", async () => {
  const server = await FakeServer.start({ autoAck: false });
  try {
    await using fixture = await withAgent([server]);
    const go = `${fixture.dir}/go`;
    const spec = assignmentSpec("slow", {
      run: `echo before\nwhile [ ! -f "${go}" ]; do sleep 0.05; done\necho after`,
    }, { baseDir: fixture.dir });
    await server.assign(spec, "shell");
    await poll(() => server.logText(spec.attemptId).includes("before") || undefined);
    server.drop();
    await poll(() => server.hellos.length === 2 || undefined, { what: "the second Hello" });
    assert.deepEqual(server.hellos[1].runningAttemptIds, [spec.attemptId]);
    await poll(() => fixture.agent.connected || undefined, { what: "the reconnection" });
    await Deno.writeTextFile(go, "");
    const result = await resultOf(server, spec.attemptId);
    assert.equal(result.ok, true);
    assert.equal(server.logText(spec.attemptId), "before\nafter\n");

    // A stale attempt's result is refused by the server: the agent forgets it.
    await server.send({
      ack: { attemptId: spec.attemptId, accepted: false, message: "stale attempt" },
    });
    await poll(() => fixture.agent.pendingResults.length === 0 || undefined, { what: "the ack" });
    const acked = fixture.log.find((entry) => entry.msg === "result acked");
    assert.equal(acked?.accepted, false);
    assert.equal(acked?.message, "stale attempt");
    assert.equal(server.results(spec.attemptId).length, 1);
  } finally {
    await server.close();
  }
});

Deno.test("agent: an unreachable first server is skipped at startup", async () => {
  const server = await FakeServer.start();
  try {
    // Port 1 on loopback refuses connections at once.
    await using fixture = await withAgent([{ address: "127.0.0.1:1" } as FakeServer, server]);
    assert.equal(fixture.agent.server, server.address);
    const failed = fixture.log.find((entry) => entry.msg === "connection failed");
    assert.equal(failed?.server, "127.0.0.1:1");
    const reconnecting = fixture.log.find((entry) => entry.msg === "reconnecting");
    assert.equal(reconnecting?.server, server.address);
    assert.equal(typeof reconnecting?.afterMs, "number");
  } finally {
    await server.close();
  }
});

Deno.test("agent: a drained stop lets running steps finish; a plain stop fails them as infrastructure", async () => {
  const server = await FakeServer.start();
  try {
    await using fixture = await withAgent([server]);
    const { agent, dir } = fixture;
    const go = `${dir}/go`;
    const spec = assignmentSpec("draining", {
      run: `while [ ! -f "${go}" ]; do sleep 0.05; done; echo finished`,
    }, { baseDir: dir });
    await server.assign(spec, "shell");
    await poll(() => server.started.length === 1 || undefined, { what: "the start" });
    let stopped = false;
    const stopping = agent.stop({ drain: true }).then(() => stopped = true);
    await poll(() => server.heartbeats.some((beat) => beat.draining) || undefined, {
      what: "a draining heartbeat",
    });
    // New work is refused while draining; the running step goes on.
    const late = assignmentSpec("late", { run: "true" }, { baseDir: dir });
    await server.assign(late, "shell");
    const refused = await resultOf(server, late.attemptId);
    assert.equal(!refused.ok && refused.errorClass, "infrastructure");
    assert.match(!refused.ok ? refused.message : "", /is stopping/);
    assert.equal(stopped, false);
    await Deno.writeTextFile(go, "");
    await stopping;
    assert.equal((await resultOf(server, spec.attemptId)).ok, true);
    assert.deepEqual(agent.pendingResults, []);
  } finally {
    await server.close();
  }

  const second = await FakeServer.start();
  try {
    await using fixture = await withAgent([second]);
    const spec = assignmentSpec("endless", { run: "sleep 30" }, { baseDir: fixture.dir });
    await second.assign(spec, "shell");
    await poll(() => second.started.length === 1 || undefined, { what: "the start" });
    await fixture.agent.stop();
    const result = await resultOf(second, spec.attemptId);
    assert.equal(!result.ok && result.errorClass, "infrastructure");
    assert.equal(!result.ok && result.message, "the agent stopped before the attempt ended");
    assert.deepEqual(fixture.agent.pendingResults, []);
  } finally {
    await second.close();
  }
});

/** An agent as a real process (tests/fixtures/agent_main.ts). */
class AgentProcess {
  readonly stderr: string[] = [];
  readonly #child: Deno.ChildProcess;
  readonly #reading: Promise<void>;

  constructor(configFile: string) {
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", ...CLI_PERMISSIONS, `${ROOT}/tests/fixtures/agent_main.ts`, configFile],
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    this.#child = child;
    this.#reading = (async () => {
      for await (const text of child.stderr.pipeThrough(new TextDecoderStream())) {
        this.stderr.push(text);
      }
    })();
  }

  async kill(): Promise<void> {
    this.#child.kill("SIGKILL");
    await this.#child.status;
    await this.#reading;
  }

  async stop(): Promise<Deno.CommandStatus> {
    try {
      this.#child.kill("SIGTERM");
    } catch {
      // Already gone.
    }
    const status = await this.#child.status;
    await this.#reading;
    return status;
  }
}

async function agentConfig(
  dir: string,
  servers: FakeServer[],
  extra: Partial<AgentOptions> = {},
): Promise<string> {
  const file = `${dir}/agent-config.json`;
  await Deno.writeTextFile(
    file,
    JSON.stringify({
      servers: servers.map((server) => server.address),
      token: TOKEN,
      stateDir: `${dir}/agent`,
      artifactsDir: `${dir}/artifacts`,
      allowShell: true,
      reconnect: { initialMs: 20, maxMs: 200 },
      ...extra,
    }),
  );
  return file;
}

Deno.test("agent process: SIGKILLed before its result was acked, it resends it after a restart", async () => {
  const server = await FakeServer.start({ autoAck: false });
  await using box = await sandbox();
  const config = await agentConfig(box.dir, [server]);
  let agent = new AgentProcess(config);
  try {
    await poll(() => server.hellos.length === 1 || undefined, {
      what: "the agent's Hello",
      timeoutMs: 60_000,
    });
    const spec = assignmentSpec("quick", { run: `echo made > "$RUNNEL_OUTPUT_MADE_TXT"` }, {
      baseDir: box.dir,
      outputs: ["made.txt"],
    });
    await server.assign(spec, "shell");
    const [sent] = await poll(() => {
      const results = server.results(spec.attemptId);
      return results.length > 0 ? results : undefined;
    }, { what: "the first result" });
    assert.equal(sent.result.ok, true);
    const outbox = `${box.dir}/agent/outbox`;
    assert.equal((await listDir(outbox)).length, 1);

    await agent.kill();
    agent = new AgentProcess(config);
    await poll(() => server.hellos.length === 2 || undefined, {
      what: "the restarted agent's Hello",
      timeoutMs: 60_000,
    });
    assert.equal(server.hellos[1].agentId, server.hellos[0].agentId);
    assert.deepEqual(server.hellos[1].pendingResultAttemptIds, [spec.attemptId]);
    assert.deepEqual(server.hellos[1].runningAttemptIds, []);
    const [, resent] = await poll(() => {
      const results = server.results(spec.attemptId);
      return results.length > 1 ? results : undefined;
    }, { what: "the resent result" });
    assert.deepEqual(resent, sent);

    await server.send({ ack: { attemptId: spec.attemptId, accepted: true } });
    await poll(async () => (await listDir(outbox)).length === 0 || undefined, {
      what: "the outbox to empty",
    });
    const status = await agent.stop();
    assert.equal(status.code, 0, agent.stderr.join(""));
    assert.equal(server.results(spec.attemptId).length, 2);
  } catch (error) {
    console.error(agent.stderr.join(""));
    throw error;
  } finally {
    await agent.stop();
    await server.close();
  }
});

Deno.test("agent process: SIGKILLed mid shell step, the restart reaps the orphan and lists nothing", async () => {
  const server = await FakeServer.start();
  await using box = await sandbox();
  const config = await agentConfig(box.dir, [server]);
  let agent = new AgentProcess(config);
  try {
    await poll(() => server.hellos.length === 1 || undefined, {
      what: "the agent's Hello",
      timeoutMs: 60_000,
    });
    const spec = assignmentSpec("orphan", { run: "echo started; sleep 60" }, { baseDir: box.dir });
    await server.assign(spec, "shell");
    await poll(() => server.logText(spec.attemptId).includes("started") || undefined, {
      what: "the step's first line",
    });
    // A process backend's handle: `<pid>@<startMs>`.
    const pid = Number(server.started[0].handle.split("@")[0]);
    assert.equal(await processAlive(pid), true);

    await agent.kill();
    // A process backend's step outlives its agent: nothing else stops it.
    assert.equal(await processAlive(pid), true);
    agent = new AgentProcess(config);
    await poll(() => server.hellos.length === 2 || undefined, {
      what: "the restarted agent's Hello",
      timeoutMs: 60_000,
    });
    // Not re-attached, so not listed: the server declares the attempt lost.
    assert.deepEqual(server.hellos[1].runningAttemptIds, []);
    assert.deepEqual(server.hellos[1].pendingResultAttemptIds, []);
    await poll(async () => !(await processAlive(pid)) || undefined, { what: "the orphan reaped" });
    assert.deepEqual(await listDir(`${box.dir}/agent/attempts`), []);
    assert.equal(server.results(spec.attemptId).length, 0);
  } catch (error) {
    console.error(agent.stderr.join(""));
    throw error;
  } finally {
    await agent.stop();
    await server.close();
  }
});

Deno.test({
  name: "agent process: SIGKILLed mid-step, it re-attaches to its Docker step after a restart",
  ignore: !docker.available && !IN_CI,
  async fn() {
    if (!docker.available) throw new Error(`Expected Docker in CI: ${docker.detail}`);
    const image = await ensureBusyboxImage();
    const server = await FakeServer.start();
    await using box = await sandbox();
    const config = await agentConfig(box.dir, [server], {
      policy: agentPolicy({ backends: ["deno", "shell", "docker"], docker: { root: true } }),
    });
    let agent = new AgentProcess(config);
    let agentId: string | undefined;
    try {
      await poll(() => server.hellos.length === 1 || undefined, {
        what: "the agent's Hello",
        timeoutMs: 60_000,
      });
      agentId = server.hellos[0].agentId;
      // The step waits for a file the test drops into its outputs directory
      // (bind-mounted from the agent's scratch space).
      // It prints a secret before and after the agent's restart.
      const secret = "hunter2-CONTAINED";
      const spec = assignmentSpec("contained", {
        image,
        run: `echo "before $TOKEN"; while [ ! -f /runnel/out/go ]; do sleep 0.1; done; ` +
          `echo "after $TOKEN"; echo done > "$RUNNEL_OUTPUT_RESULT_TXT"`,
      }, { baseDir: box.dir, outputs: ["result.txt"], secrets: { TOKEN: { secret: "token" } } });
      await server.assign(spec, "docker", { TOKEN: secret });
      await poll(() => server.logText(spec.attemptId).includes("before") || undefined, {
        what: "the container's first line",
        timeoutMs: 60_000,
      });
      assert.equal(server.started.length, 1);
      const attempts = `${box.dir}/agent/attempts`;
      const [recordFile] = await listDir(attempts);
      const record = JSON.parse(await Deno.readTextFile(`${attempts}/${recordFile}`)) as {
        spec: AttemptSpec;
        handle: string;
      };
      assert.equal(record.handle, server.started[0].handle);
      assert.ok(!JSON.stringify(record).includes(secret), "no secret value in the record");

      await agent.kill();
      agent = new AgentProcess(config);
      await poll(() => server.hellos.length === 2 || undefined, {
        what: "the restarted agent's Hello",
        timeoutMs: 60_000,
      });
      assert.deepEqual(server.hellos[1].runningAttemptIds, [spec.attemptId]);
      assert.deepEqual(server.hellos[1].pendingResultAttemptIds, []);
      // As a server does for an attempt Hello lists as running: it carries the values again.
      await server.assign(spec, "docker", { TOKEN: secret });

      await Deno.writeTextFile(`${record.spec.outputsDir}/go`, "");
      const result = await resultOf(server, spec.attemptId, 60_000);
      assert.equal(result.ok, true, JSON.stringify(result));
      assert.equal(server.results(spec.attemptId).length, 1);
      assert.equal(server.logText(spec.attemptId), "before ***\nafter ***\n");
      await poll(async () => (await listDir(`${box.dir}/agent/outbox`)).length === 0 || undefined, {
        what: "the ack",
      });
      const artifacts = openLocalArtifactStore(`${box.dir}/artifacts`);
      const output = await artifacts.get(spec.runId, "contained", "result.txt");
      assert.equal(output?.digest, result.ok ? result.outputs["result.txt"].digest : "");
      assert.equal((await agent.stop()).code, 0, agent.stderr.join(""));
    } catch (error) {
      console.error(agent.stderr.join(""));
      throw error;
    } finally {
      await agent.stop();
      await server.close();
      if (agentId) await reapContainers(agentId);
    }
  },
});

/** Removes the containers an agent left (after a failed test). */
async function reapContainers(agentId: string): Promise<void> {
  const listed = await new Deno.Command("docker", {
    args: ["ps", "-aq", "--filter", `label=runnel.agent=${agentId}`],
    stdout: "piped",
    stderr: "null",
  }).output();
  const ids = new TextDecoder().decode(listed.stdout).split("\n").filter(Boolean);
  if (ids.length > 0) {
    await new Deno.Command("docker", { args: ["rm", "-f", ...ids], stdout: "null", stderr: "null" })
      .output();
  }
}
