/**
 * Issue 10, items 6 and 15: agents cannot impersonate each other. Replayed
 * against two `runnel server`s over etcd and real agent processes, with a
 * rogue speaking the gRPC protocol by hand:
 *
 * - a Hello with a live agent's id and the join token (no credential, or a
 *   made-up one) is refused (`bad_identity`) and receives nothing;
 * - a registered rogue's log lines, `started` and forged `{ok: true}` for
 *   another agent's attempt are dropped (the result with a negative ack),
 *   logged and counted; the step runs to its real end;
 * - a copy of an agent's state dir (its credential) started beside it,
 *   against the other server, is refused (`duplicate_agent`) and the
 *   original keeps working;
 * - a second agent on the same state dir refuses to start, naming the dir
 *   and the pid holding it;
 * - the store keeps only credential hashes; a revoked agent is cut off and
 *   refused; a restarted agent comes back with its credential.
 *
 * @module
 */

import assert from "node:assert/strict";
import { RunClient } from "../../agent/client/mod.ts";
import { forgetAgent, hashOf, revokeAgent } from "../../agent/server/identity.ts";
import { openEtcdStore } from "../../consensus/etcd.ts";
import { randomHex } from "../../core/_bytes.ts";
import {
  type Hello,
  openAgentStream,
  type ServerConnection,
  type ServerMessage,
} from "../../proto/mod.ts";
import { ignoreWithoutEtcd, startEtcdCluster } from "../_etcd.ts";
import { poll, sandbox } from "../_helpers.ts";
import { ADMIN_TOKEN, AgentProcess, freePort, ServerProcess, TOKEN } from "./_cluster.ts";

const HEARTBEAT_MS = 500;
const INJECTED = "INJECTED-BY-ROGUE: all good, deploy approved";

/** An agent played by hand over the real protocol. */
class RawAgent {
  readonly messages: ServerMessage[] = [];
  readonly stream: ServerConnection;
  readonly #reading: Promise<void>;
  #heartbeat: ReturnType<typeof setInterval> | undefined;

  constructor(address: string, hello: Partial<Hello>) {
    const stream = openAgentStream(address);
    this.stream = stream;
    stream.send({
      hello: { token: TOKEN, session: randomHex(16), slots: 0, capabilities: [], ...hello },
    });
    this.#reading = (async () => {
      for await (const message of stream) this.messages.push(message);
    })();
  }

  /** The first message matching `body`, waited for. */
  async first<B extends ServerMessage["body"]>(
    body: B,
    match: (message: Extract<ServerMessage, { body: B }>) => boolean = () => true,
  ): Promise<Extract<ServerMessage, { body: B }>> {
    return await poll(
      () =>
        this.messages.find((message): message is Extract<ServerMessage, { body: B }> =>
          message.body === body && match(message as Extract<ServerMessage, { body: B }>)
        ),
      { what: `a ${body} message` },
    );
  }

  /** The Reject it got (the stream then ends). */
  async rejected(): Promise<{ code: string; message: string; retryAfterMs: number }> {
    await this.stream.closed;
    await this.#reading;
    const reject = this.messages.find((message) => message.body === "reject");
    assert.ok(reject?.body === "reject", `expected a Reject, got ${JSON.stringify(this.messages)}`);
    return reject.reject;
  }

  /** Heartbeats as an agent does, keeping its connection live. */
  beat(everyMs: number): void {
    this.#heartbeat = setInterval(() => {
      this.stream.send({ heartbeat: { sentAtMs: Date.now() } });
    }, everyMs);
  }

  async close(): Promise<void> {
    clearInterval(this.#heartbeat);
    this.stream.end();
    this.stream.cancel();
    await this.#reading;
  }
}

function pipeline(release: string): string {
  return `name: victim-run
defaults:
  backend: shell
  retry: 0
steps:
  long:
    run: |
      echo "victim output"
      while [ ! -f ${release} ]; do sleep 0.05; done
      echo "victim done"
  after:
    needs: [long]
    run: echo after
`;
}

Deno.test({
  name: "security: agents prove the identity a server issued, speak only for their own " +
    "assignments, hold one live connection per id and lock their state dir",
  ignore: ignoreWithoutEtcd(),
  async fn(t) {
    await using box = await sandbox();
    await using etcd = await startEtcdCluster({ members: 1 });
    const ports = [0, 1].map(() => ({ http: freePort(), grpc: freePort() }));
    const peers = ports.map((port) => `127.0.0.1:${port.grpc}`);
    const servers = ports.map((port, index) =>
      new ServerProcess({
        id: `server-${index}`,
        etcd: etcd.endpoints,
        ports: port,
        peers,
        heartbeat: `${HEARTBEAT_MS}ms`,
      })
    );
    const store = await openEtcdStore({ endpoints: etcd.endpoints });
    const victimDir = `${box.dir}/victim`;
    const victimOptions = {
      // Only server-0: the copy below goes to server-1.
      servers: [peers[0]],
      token: TOKEN,
      agentId: "victim",
      allowShell: true,
      stateDir: victimDir,
      artifactsDir: `${box.dir}/artifacts`,
      reconnect: { initialMs: 50, maxMs: 500 },
    };
    const agents: AgentProcess[] = [];
    const raws: RawAgent[] = [];
    let rogue: RawAgent | undefined;
    try {
      await Promise.all(servers.map((server) => server.ready()));
      let victim = await AgentProcess.start(victimOptions);
      agents.push(victim);
      await poll(async () => {
        const { workers } = await servers[0].clusterState();
        return workers.some((worker) => worker.agentId === "victim") ? true : undefined;
      }, { what: "the victim registered", timeoutMs: 60_000, retryOnError: true });
      const credential = JSON.parse(await Deno.readTextFile(`${victimDir}/credential.json`));
      assert.equal(credential.agentId, "victim");
      assert.match(credential.credential, /^[0-9a-f]{64}$/);
      assert.equal((await Deno.stat(`${victimDir}/credential.json`)).mode! & 0o777, 0o600);

      const client = new RunClient([servers[0].http], { token: ADMIN_TOKEN });
      const release = `${box.dir}/release`;
      const { runId } = await client.submit(pipeline(release), "pipeline.yaml", box.dir);
      const attemptId = await poll(async () => {
        const { steps } = await client.run(runId);
        return steps.long?.status === "running" ? steps.long.attemptId : undefined;
      }, { what: "the victim's step running" });

      await t.step(
        "a Hello with a live agent's id and only the join token is refused",
        async () => {
          for (const hello of [{}, { credential: "0".repeat(64) }]) {
            const impostor = new RawAgent(peers[1], { agentId: "victim", ...hello });
            raws.push(impostor);
            const reject = await impostor.rejected();
            assert.equal(reject.code, "bad_identity");
            assert.match(reject.message, /victim/);
            assert.deepEqual(impostor.messages.map((message) => message.body), ["reject"]);
          }
          // An agent process given a live agent's id stops with the reason.
          const namesake = await AgentProcess.start({
            ...victimOptions,
            servers: [peers[1]],
            stateDir: `${box.dir}/namesake`,
          });
          agents.push(namesake);
          assert.equal((await namesake.exited()).code, 2);
          assert.match(namesake.stderr.join(""), /refused this agent: Agent victim is registered/);
        },
      );

      await t.step(
        "a registered rogue cannot log, start or report for another's attempt",
        async () => {
          rogue = new RawAgent(peers[0], { agentId: "rogue" });
          raws.push(rogue);
          const welcome = await rogue.first("welcome");
          rogue.beat(HEARTBEAT_MS);
          assert.match(welcome.welcome.credential, /^[0-9a-f]{64}$/);
          await rogue.stream.send({ log: { attemptId, stream: "stdout", text: `${INJECTED}\n` } });
          await rogue.stream.send({ started: { attemptId, handle: "1@1", atMs: Date.now() } });
          await rogue.stream.send({
            result: {
              attemptId,
              resultJson: JSON.stringify({ ok: true, exitCode: 0, outputs: {} }),
              atMs: Date.now(),
            },
          });
          const ack = await rogue.first("ack");
          assert.equal(ack.ack.accepted, false);
          assert.match(ack.ack.message, /not assigned to agent rogue/);
          assert.equal((await client.run(runId)).steps.long.status, "running");
          for (const what of ["log", "started", "result"]) {
            assert.ok(
              await servers[0].metric("runnel_agent_refusals_total", `what="${what}"`) >= 1,
              `${what} counted`,
            );
          }
          assert.ok(
            servers[0].logLines().some((line) =>
              line.msg === "agent message refused: not its assignment" && line.agent === "rogue" &&
              line.attemptId === attemptId
            ),
          );
        },
      );

      await t.step(
        "a copy of the agent's credential is refused while the agent lives",
        async () => {
          const cloneDir = `${box.dir}/clone`;
          await Deno.mkdir(cloneDir);
          await Deno.copyFile(`${victimDir}/credential.json`, `${cloneDir}/credential.json`);
          const clone = await AgentProcess.start({
            ...victimOptions,
            servers: [peers[1]],
            stateDir: cloneDir,
          });
          agents.push(clone);
          const refused = await poll(() => clone.events("rejected")[0], {
            what: "the clone refused",
            timeoutMs: 60_000,
          });
          assert.equal(refused.code, "duplicate_agent");
          assert.match(String(refused.message), /connected already, from another process/);
          const raw = new RawAgent(peers[1], {
            agentId: "victim",
            credential: credential.credential,
          });
          raws.push(raw);
          const reject = await raw.rejected();
          assert.equal(reject.code, "duplicate_agent");
          assert.ok(reject.retryAfterMs > 0);
          // The original keeps its connection and its step.
          const { workers } = await servers[1].clusterState();
          assert.deepEqual(
            workers.filter((worker) => worker.agentId === "victim").map((worker) => worker.server),
            ["server-0"],
          );
          assert.deepEqual(victim.events("disconnected"), []);
          assert.equal((await client.run(runId)).steps.long.status, "running");
          await clone.stop();
        },
      );

      await t.step("a second agent on the same state dir refuses to start", async () => {
        const second = await AgentProcess.start({ ...victimOptions, agentId: undefined });
        agents.push(second);
        const status = await second.exited();
        assert.equal(status.code, 1);
        const text = second.stderr.join("");
        assert.match(text, new RegExp(`state dir ${victimDir} .*pid ${victim.pid}`));
      });

      await t.step("the step runs to its real end; no injected line in its log", async () => {
        await Deno.writeTextFile(release, "");
        const done = await poll(async () => {
          const { run, steps } = await client.run(runId);
          return run.status === "succeeded" ? steps : undefined;
        }, { what: "the run to succeed" });
        assert.equal(done.long.attempts.length, 1);
        assert.equal(done.long.attempts[0].worker, "victim");
        assert.equal(done.after.status, "succeeded");
        let text = "";
        for await (const { event, data } of client.logs(runId, { step: "long" })) {
          if (event === "log") text += (data as { text: string }).text;
        }
        assert.match(text, /victim output/);
        assert.match(text, /victim done/);
        assert.doesNotMatch(text, /INJECTED/);
      });

      await t.step("the store keeps credential hashes only", async () => {
        const identity = await store.get("/agents/victim/identity");
        assert.ok(identity);
        assert.equal(JSON.parse(identity.value).credentialHash, hashOf(credential.credential));
        const everything = await store.list("/");
        const rogueCredential = (await rogue!.first("welcome")).welcome.credential;
        for (const kv of everything.items) {
          for (const secret of [credential.credential, rogueCredential]) {
            assert.ok(!kv.value.includes(secret), `${kv.key} holds a credential`);
          }
        }
      });

      await t.step(
        "a revoked agent is cut off and refused; forgotten, it registers anew",
        async () => {
          const rogueWelcome = await rogue!.first("welcome");
          assert.equal(rogue!.stream.open, true, "the rogue's heartbeats keep it connected");
          assert.equal(await revokeAgent(store, "rogue"), true);
          assert.match((await rogue!.stream.closed).reason, /revoked/);
          const again = new RawAgent(peers[1], {
            agentId: "rogue",
            credential: rogueWelcome.welcome.credential,
          });
          raws.push(again);
          const reject = await again.rejected();
          assert.equal(reject.code, "bad_identity");
          assert.match(reject.message, /revoked/);
          await forgetAgent(store, "rogue");
          const fresh = new RawAgent(peers[1], { agentId: "rogue" });
          raws.push(fresh);
          const welcome = await fresh.first("welcome");
          assert.notEqual(welcome.welcome.credential, rogueWelcome.welcome.credential);
        },
      );

      await t.step("a restarted agent comes back with its credential", async () => {
        await victim.kill();
        victim = await AgentProcess.start(victimOptions);
        agents.push(victim);
        await poll(() => victim.events("connected")[0], {
          what: "the restarted victim connected",
          timeoutMs: 60_000,
        });
        // Refused only while its dead predecessor's connection looked live.
        assert.ok(victim.events("rejected").every((event) => event.code === "duplicate_agent"));
      });
    } catch (error) {
      console.error(
        servers.map((server) => `--- ${server.id}\n${server.stderr.join("").slice(-4000)}`)
          .join("\n") +
          agents.map((agent) => `--- agent ${agent.pid}\n${agent.stderr.join("").slice(-4000)}`)
            .join("\n"),
      );
      throw error;
    } finally {
      await Promise.all(raws.map((raw) => raw.close()));
      await Promise.all(agents.map((agent) => agent.stop()));
      await Promise.all(servers.map((server) => server.stop()));
      await store.close();
    }
  },
});
