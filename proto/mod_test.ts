/**
 * The agent stream over real gRPC on loopback: plain and TLS.
 *
 * The TLS tests make a throw-away CA with `openssl`. Without it they are
 * skipped with the reason printed, except with `CI=true`, where they fail.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  type AgentConnection,
  type AgentMessage,
  clientCredentials,
  GrpcStatus,
  openAgentStream,
  serveAgentService,
  serverCredentials,
  type ServerMessage,
  TlsConfigError,
} from "./mod.ts";
import { makeTestCertificates, opensslMissing } from "./_testing.ts";

const IN_CI = Deno.env.get("CI") === "true";
const NO_OPENSSL = await opensslMissing();
if (NO_OPENSSL && !IN_CI) {
  console.log(`%cskipping the gRPC TLS tests: ${NO_OPENSSL}`, "color: yellow");
}

/** A server that welcomes every Hello and echoes each log chunk back as an ack. */
function echoServer(received: AgentMessage[]): (agent: AgentConnection) => Promise<void> {
  return async (agent) => {
    for await (const message of agent) {
      received.push(message);
      switch (message.body) {
        case "hello":
          await agent.send({
            welcome: { serverId: "s1", heartbeatIntervalMs: 5_000, servers: ["127.0.0.1:1"] },
          });
          break;
        case "log":
          await agent.send({ ack: { attemptId: message.log.text, accepted: true } });
          break;
      }
    }
    agent.end();
  };
}

Deno.test("a bidi stream on loopback: Hello, Welcome, many messages both ways, a clean end", async () => {
  const received: AgentMessage[] = [];
  const server = await serveAgentService({
    address: "127.0.0.1:0",
    onConnect: echoServer(received),
  });
  try {
    const stream = openAgentStream(`127.0.0.1:${server.port}`);
    assert.equal(
      await stream.send({
        hello: {
          agentId: "agent-1",
          token: "t0k3n",
          labels: { cloud: "gcp", region: "us-east1" },
          capabilities: [{ backend: "deno", available: true, version: "2.9.6", detail: "ok" }],
          slots: 2,
          runningAttemptIds: ["r/a/1"],
        },
      }),
      true,
    );
    const count = 500;
    const incoming: ServerMessage[] = [];
    const reader = (async () => {
      for await (const message of stream) {
        incoming.push(message);
        if (incoming.length === count + 1) stream.end();
      }
    })();
    for (let i = 0; i < count; i++) {
      await stream.send({ log: { attemptId: "r/a/1", stream: "stdout", text: `line ${i}` } });
    }
    await reader;
    const end = await stream.closed;
    assert.deepEqual(end, { ok: true, code: GrpcStatus.OK, reason: "OK" });
    assert.equal(stream.open, false);

    const [welcome, ...acks] = incoming;
    assert.equal(welcome.body, "welcome");
    assert.deepEqual(welcome.body === "welcome" && welcome.welcome, {
      serverId: "s1",
      heartbeatIntervalMs: 5_000, // int64 as a number
      servers: ["127.0.0.1:1"],
      credential: "", // left out: its default
    });
    assert.deepEqual(
      acks.map((m) => m.body === "ack" ? m.ack.attemptId : m.body),
      Array.from({ length: count }, (_, i) => `line ${i}`),
    );
    const hello = received[0];
    assert.equal(hello.body, "hello");
    // Every field present, defaults for those not sent.
    assert.deepEqual(hello.body === "hello" && hello.hello, {
      agentId: "agent-1",
      token: "t0k3n",
      labels: { cloud: "gcp", region: "us-east1" },
      capabilities: [{ backend: "deno", available: true, version: "2.9.6", detail: "ok" }],
      version: "",
      runningAttemptIds: ["r/a/1"],
      slots: 2,
      pendingResultAttemptIds: [],
      credential: "",
      session: "",
      secretNames: [],
    });
    assert.equal(received.length, count + 1);
  } finally {
    await server.close();
  }
});

Deno.test("a server that goes away breaks the agent's stream; an absent one is UNAVAILABLE", async () => {
  let connected!: (agent: AgentConnection) => void;
  const agentSide = new Promise<AgentConnection>((resolve) => connected = resolve);
  const server = await serveAgentService({ address: "127.0.0.1:0", onConnect: connected });
  const stream = openAgentStream(`127.0.0.1:${server.port}`);
  await stream.send({ heartbeat: { sentAtMs: Date.now() } });
  const agent = await agentSide;
  const first = await agent[Symbol.asyncIterator]().next();
  assert.equal(first.value?.body, "heartbeat");
  await server.close();
  const end = await stream.closed;
  assert.equal(end.ok, false);
  assert.equal((await agent.closed).ok, false);
  assert.equal(await stream.send({ heartbeat: {} }), false);

  const absent = openAgentStream(`127.0.0.1:${server.port}`);
  await absent.send({ hello: { agentId: "a" } });
  const messages: ServerMessage[] = [];
  for await (const message of absent) messages.push(message);
  assert.deepEqual(messages, []);
  assert.equal((await absent.closed).code, GrpcStatus.UNAVAILABLE);
});

Deno.test("the server breaks one stream with cancel; the agent sees it fail", async () => {
  const server = await serveAgentService({
    address: "127.0.0.1:0",
    async onConnect(agent) {
      for await (const message of agent) {
        if (message.body === "hello") agent.cancel("go away");
      }
    },
  });
  try {
    const stream = openAgentStream(`grpc://127.0.0.1:${server.port}`);
    await stream.send({ hello: { agentId: "a" } });
    for await (const _ of stream) { /* nothing comes */ }
    const end = await stream.closed;
    assert.equal(end.code, GrpcStatus.UNAVAILABLE);
    assert.equal(end.reason, "go away");
  } finally {
    await server.close();
  }
});

/** A test that needs openssl: skipped without it, except in CI where it fails. */
function tlsTest(name: string, fn: (dir: string) => Promise<void>): void {
  Deno.test({
    name,
    ignore: NO_OPENSSL !== undefined && !IN_CI,
    async fn() {
      if (NO_OPENSSL) throw new Error(`Expected openssl in CI: ${NO_OPENSSL}`);
      const dir = await Deno.makeTempDir({ prefix: "runnel_tls_" });
      try {
        await fn(dir);
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    },
  });
}

tlsTest("TLS: a stream to 127.0.0.1 and to localhost with a self-signed CA", async (dir) => {
  const certs = await makeTestCertificates(dir);
  const received: AgentMessage[] = [];
  const server = await serveAgentService({
    address: "127.0.0.1:0",
    credentials: serverCredentials({ cert: certs.serverCert, key: certs.serverKey }),
    onConnect: echoServer(received),
  });
  try {
    for (const host of ["127.0.0.1", "localhost"]) {
      const stream = openAgentStream(`${host}:${server.port}`, {
        credentials: clientCredentials({ ca: certs.ca }),
      });
      await stream.send({ hello: { agentId: `over TLS to ${host}` } });
      for await (const message of stream) {
        assert.equal(message.body, "welcome");
        stream.end();
      }
      const end = await stream.closed;
      assert.equal(end.ok, true, `to ${host}: ${end.reason}`);
    }
    assert.deepEqual(
      received.map((m) => m.body === "hello" && m.hello.agentId),
      ["over TLS to 127.0.0.1", "over TLS to localhost"],
    );

    // A CA that did not sign the server's certificate: no connection.
    const untrusting = openAgentStream(`127.0.0.1:${server.port}`, {
      credentials: clientCredentials({ ca: certs.otherCa }),
    });
    await untrusting.send({ hello: { agentId: "a" } });
    for await (const _ of untrusting) { /* nothing comes */ }
    assert.equal((await untrusting.closed).code, GrpcStatus.UNAVAILABLE);

    // A name the certificate does not carry.
    const misnamed = openAgentStream(`127.0.0.1:${server.port}`, {
      credentials: clientCredentials({ ca: certs.ca, serverName: "runnel.example" }),
    });
    await misnamed.send({ hello: { agentId: "a" } });
    for await (const _ of misnamed) { /* nothing comes */ }
    const end = await misnamed.closed;
    assert.equal(end.code, GrpcStatus.UNAVAILABLE);
    assert.match(end.reason, /runnel\.example/);
  } finally {
    await server.close();
  }
});

tlsTest("TLS: a server with a CA requires the agent's client certificate", async (dir) => {
  const certs = await makeTestCertificates(dir);
  const received: AgentMessage[] = [];
  const server = await serveAgentService({
    address: "127.0.0.1:0",
    credentials: serverCredentials({ ca: certs.ca, cert: certs.serverCert, key: certs.serverKey }),
    onConnect: echoServer(received),
  });
  try {
    const withCert = openAgentStream(`127.0.0.1:${server.port}`, {
      credentials: clientCredentials({
        ca: certs.ca,
        cert: certs.clientCert,
        key: certs.clientKey,
      }),
    });
    await withCert.send({ hello: { agentId: "with a certificate" } });
    for await (const message of withCert) {
      assert.equal(message.body, "welcome");
      withCert.end();
    }
    assert.equal((await withCert.closed).ok, true);

    const without = openAgentStream(`127.0.0.1:${server.port}`, {
      credentials: clientCredentials({ ca: certs.ca }),
    });
    await without.send({ hello: { agentId: "without one" } });
    for await (const _ of without) { /* nothing comes */ }
    assert.equal((await without.closed).ok, false);
    assert.deepEqual(
      received.map((m) => m.body === "hello" && m.hello.agentId),
      ["with a certificate"],
    );
  } finally {
    await server.close();
  }
});

Deno.test("TLS settings: plain errors for missing or mismatched PEM files", () => {
  assert.throws(
    () => clientCredentials({ ca: "/nonexistent/ca.pem" }),
    (error: unknown) =>
      error instanceof TlsConfigError &&
      /^Expected a readable PEM file for --tls-ca at \/nonexistent\/ca\.pem/.test(error.message),
  );
  assert.throws(
    () => clientCredentials({ cert: "/x/cert.pem" }),
    /Expected both a client certificate and its key/,
  );
  assert.throws(
    () => serverCredentials({ cert: import.meta.filename!, key: import.meta.filename! }),
    /Expected a PEM file for --tls-cert/,
  );
});
