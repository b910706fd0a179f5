/**
 * Issue 10, items 1a and 10, replayed: each attack on the HTTP API that
 * worked before must now fail with a clear error, and nothing may leak (no
 * run data to the anonymous, no token secret in logs or the store, no stack
 * traces). Servers run in process (`startServer`) where that suffices, and
 * as real `runnel server` processes for the CLI, TLS, the admin token file
 * and the memory a large body may cost.
 *
 * @module
 */

import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import type { Store } from "../../consensus/store.ts";
import { openLocalArtifactStore } from "../../core/artifacts/local.ts";
import { parsePipeline } from "../../core/load.ts";
import { RunClient } from "../../agent/client/mod.ts";
import type { ServerOptions } from "../../agent/server/mod.ts";
import { submitRun } from "../../agent/server/runs.ts";
import { startTestServer } from "../_server.ts";
import { clusterKeys } from "../../agent/server/keys.ts";
import { bootstrapAcl } from "../../agent/server/auth.ts";
import { startAgent } from "../../agent/worker/mod.ts";
import { makeTestCertificates, opensslMissing } from "../../proto/_testing.ts";
import { ignoreWithoutEtcd, startEtcdCluster } from "../_etcd.ts";
import { CLI_PERMISSIONS, MAIN, poll, runCli, sandbox } from "../_helpers.ts";

const JOIN_TOKEN = "security-join-token";
/** What `--admin-token-file` holds in these tests. */
const ADMIN_TOKEN = "security-admin-token-0123456789abcdef";
const STACK_TRACE = /\n\s+at /;

/** A pipeline that would run a command on any agent started with --allow-shell. */
const SHELL_PIPELINE = `name: attack
steps:
  own: { backend: shell, run: "id > /tmp/owned" }
`;

interface ApiServer extends AsyncDisposable {
  http: string;
  port: number;
  grpcPort: number;
  store: Store;
  logs: Array<Record<string, unknown>>;
  call(
    method: string,
    path: string,
    options?: { token?: string; body?: BodyInit; headers?: Record<string, string> },
  ): Promise<{ status: number; headers: Headers; text: string; json: Record<string, unknown> }>;
}

async function apiServer(dir: string, options: Partial<ServerOptions> = {}): Promise<ApiServer> {
  const logs: Array<Record<string, unknown>> = [];
  const started = await startTestServer(`${dir}/state.db`, {
    serverId: "sec-1",
    token: JOIN_TOKEN,
    adminToken: ADMIN_TOKEN,
    heartbeatMs: 300,
    log: (fields) => logs.push(fields),
    ...options,
  });
  const { server, store, http } = started;
  return {
    http,
    port: server.httpPort,
    grpcPort: server.grpcPort,
    store,
    logs,
    async call(method, path, { token, body, headers = {} } = {}) {
      const response = await fetch(`${http}${path}`, {
        method,
        body,
        headers: { ...headers, ...(token ? { authorization: `Bearer ${token}` } : {}) },
      });
      const isStream = response.headers.get("content-type") === "text/event-stream";
      const text = isStream ? "" : await response.text();
      if (isStream) await response.body?.cancel();
      let json: Record<string, unknown> = {};
      try {
        json = JSON.parse(text);
      } catch {
        // Not JSON (Prometheus text, a page, a stream).
      }
      return { status: response.status, headers: response.headers, text, json };
    },
    [Symbol.asyncDispose]: () => started[Symbol.asyncDispose](),
  };
}

/** Every value in the store, for grepping. */
async function dumpStore(store: Store): Promise<string> {
  const { items } = await store.list("/");
  return items.map((kv) => `${kv.key}=${kv.value}`).join("\n");
}

async function tokenOf(api: ApiServer, name: string, role: string): Promise<string> {
  const made = await api.call("POST", "/api/tokens", {
    token: ADMIN_TOKEN,
    body: JSON.stringify({ name, role }),
  });
  assert.equal(made.status, 201, made.text);
  return made.json.token as string;
}

/**
 * The secret part of a `rnl_<id>_<secret>` token. Not `split("_")`: a
 * base64url secret may itself hold `_` (a fragment, even an empty one,
 * would be found anywhere).
 */
function secretOf(token: string): string {
  return token.slice("rnl_".length + 16 + 1);
}

Deno.test("API: an anonymous caller gets 401 on every route but /health and /ready, and runs nothing", async () => {
  await using box = await sandbox();
  await using api = await apiServer(box.dir);
  const { runId } = await new RunClient([api.http], { token: ADMIN_TOKEN })
    .submit(
      "name: secret-pipeline\nsteps:\n  a: { backend: shell, run: echo hi }\n",
      "p.yaml",
      "/",
    );
  const routes: Array<[string, string, string]> = [
    ["GET", "/raft-state", "read"],
    ["GET", "/cluster-state", "read"],
    ["GET", "/metrics", "read"],
    ["GET", `/ui/api/runs/${runId}`, "read"],
    ["GET", "/ui/api/runs", "read"],
    ["GET", `/api/runs/${runId}/artifacts/a/out.txt`, "read"],
    ["GET", "/api/runs", "read"],
    ["GET", `/api/runs/${runId}`, "read"],
    ["GET", `/api/runs/${runId}/events`, "read"],
    ["GET", `/api/runs/${runId}/logs?follow=1`, "read"],
    ["GET", `/api/runs/${runId}/mermaid`, "read"],
    ["POST", "/api/runs", "submit"],
    ["POST", `/api/runs/${runId}/cancel`, "submit"],
    ["POST", `/api/runs/${runId}/resume`, "submit"],
    ["GET", "/api/tokens", "admin"],
    ["POST", "/api/tokens", "admin"],
    ["DELETE", "/api/tokens/0123456789abcdef", "admin"],
  ];
  const forged = [
    undefined,
    "rnl_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ADMIN_TOKEN.slice(0, -1),
    `${ADMIN_TOKEN}x`,
  ];
  for (const [method, path, needed] of routes) {
    for (const token of forged) {
      const body = method === "POST" ? JSON.stringify({ source: SHELL_PIPELINE }) : undefined;
      const answer = await api.call(method, path, { token, body });
      const what = `${method} ${path} with ${token ? "a forged token" : "no token"}`;
      assert.equal(answer.status, 401, `${what}: ${answer.text}`);
      assert.equal(answer.json.error, "unauthorized", what);
      assert.equal(answer.json.needed, needed, what);
      assert.match(answer.json.message as string, new RegExp(`the ${needed} role`), what);
      assert.match(answer.headers.get("www-authenticate") ?? "", /^Bearer realm="runnel"/);
      assert.doesNotMatch(answer.text, /secret-pipeline|echo hi/);
      assert.doesNotMatch(answer.text, STACK_TRACE);
    }
  }
  assert.equal((await api.call("GET", "/health")).status, 200);
  assert.equal((await api.call("GET", "/ready")).status, 200);
  const { items } = await api.store.list("/run/");
  assert.equal(items.length, 1, "only the admin's run was recorded");
});

Deno.test("API: each role does what it may; a weaker one gets 403 naming the role it needs", async () => {
  await using box = await sandbox();
  await using api = await apiServer(box.dir, { metricsPublic: true });
  const read = await tokenOf(api, "dashboard", "read");
  const submit = await tokenOf(api, "ci", "submit");
  const submitted = await api.call("POST", "/api/runs", {
    token: submit,
    body: JSON.stringify({ source: SHELL_PIPELINE }),
  });
  assert.equal(submitted.status, 201, submitted.text);
  const runId = submitted.json.runId as string;
  for (const path of ["/api/runs", `/api/runs/${runId}`, "/cluster-state", "/raft-state"]) {
    assert.equal((await api.call("GET", path, { token: read })).status, 200, path);
  }
  assert.equal((await api.call("GET", `/api/runs/${runId}/events`, { token: read })).status, 200);
  assert.equal((await api.call("GET", "/metrics")).status, 200, "--metrics-public");
  for (
    const [method, path, token, needed, role] of [
      ["POST", "/api/runs", read, "submit", "read"],
      ["POST", `/api/runs/${runId}/cancel`, read, "submit", "read"],
      ["POST", `/api/runs/${runId}/resume`, read, "submit", "read"],
      ["POST", "/api/tokens", submit, "admin", "submit"],
      ["GET", "/api/tokens", submit, "admin", "submit"],
      ["DELETE", "/api/tokens/0123456789abcdef", read, "admin", "read"],
    ]
  ) {
    const answer = await api.call(method, path, {
      token,
      body: method === "POST" ? JSON.stringify({ source: SHELL_PIPELINE, name: "x" }) : undefined,
    });
    assert.equal(answer.status, 403, `${method} ${path}: ${answer.text}`);
    assert.deepEqual([answer.json.error, answer.json.needed, answer.json.role], [
      "forbidden",
      needed,
      role,
    ]);
    assert.match(
      answer.json.message as string,
      new RegExp(`needs a token with the ${needed} role`),
    );
  }
  assert.equal((await api.store.list("/run/")).items.length, 1);
  // A browser's Basic credentials read, and never change anything.
  const basic = (token: string) => `Basic ${Buffer.from(`me:${token}`).toString("base64")}`;
  const page = await api.call("GET", `/ui/api/runs/${runId}`, {
    headers: { authorization: basic(read) },
  });
  assert.equal(page.status, 200);
  const viaBasic = await api.call("POST", "/api/runs", {
    headers: { authorization: basic(ADMIN_TOKEN) },
    body: JSON.stringify({ source: SHELL_PIPELINE }),
  });
  assert.equal(viaBasic.status, 401);
  assert.match(viaBasic.json.message as string, /Basic credentials are accepted for reading only/);
  // Revoked: refused at once.
  const listed = await api.call("GET", "/api/tokens", { token: ADMIN_TOKEN });
  const ci = (listed.json as unknown as Array<Record<string, unknown>>)
    .find((token) => token.name === "ci")!;
  assert.equal(ci.hash, undefined, "listing shows no hash");
  const revoked = await api.call("DELETE", `/api/tokens/${ci.id}`, { token: ADMIN_TOKEN });
  assert.equal(revoked.status, 200);
  assert.equal((await api.call("GET", "/api/runs", { token: submit })).status, 401);
});

Deno.test("API: submit, cancel, resume and token changes are audited with the token's name, never a secret", async () => {
  await using box = await sandbox();
  await using api = await apiServer(box.dir);
  const ci = await tokenOf(api, "ci", "submit");
  const viewer = await tokenOf(api, "viewer", "read");
  const submitted = await api.call("POST", "/api/runs", {
    token: ci,
    body: JSON.stringify({ source: SHELL_PIPELINE, file: "attack.yaml" }),
  });
  const runId = submitted.json.runId as string;
  await api.call("POST", `/api/runs/${runId}/cancel`, { token: ci });
  await api.call("POST", `/api/runs/${runId}/resume`, { token: ci });
  await api.call("POST", "/api/runs", { body: JSON.stringify({ source: SHELL_PIPELINE }) });
  await api.call("POST", "/api/runs", {
    token: viewer,
    body: JSON.stringify({ source: SHELL_PIPELINE }),
  });
  const ciId = ci.split("_")[1];
  await api.call("DELETE", `/api/tokens/${ciId}`, { token: ADMIN_TOKEN });
  const bootstrap = await api.call("POST", "/api/acl/bootstrap");
  assert.equal(bootstrap.status, 409, "an admin token file closes the bootstrap");
  assert.match(bootstrap.json.message as string, /--admin-token-file/);

  const audit = api.logs.filter((line) => line.component === "audit");
  const summary = audit.map((line) => [
    line.action,
    line.outcome,
    (line.token as { name: string } | null)?.name ?? null,
  ]);
  assert.deepEqual(summary, [
    ["token.create", "allowed", "admin-token-file"],
    ["token.create", "allowed", "admin-token-file"],
    ["run.submit", "allowed", "ci"],
    ["run.cancel", "allowed", "ci"],
    ["run.resume", "allowed", "ci"],
    ["run.submit", "denied", null],
    ["run.submit", "denied", "viewer"],
    ["token.revoke", "allowed", "admin-token-file"],
    ["token.bootstrap", "failed", null],
  ]);
  for (const line of audit) assert.match(String(line.remote), /^127\.0\.0\.1:\d+$/);
  const [, , submit, cancel, resume] = audit;
  assert.equal(submit.runId, runId);
  assert.equal(submit.file, "attack.yaml");
  assert.deepEqual(submit.token, { id: ciId, name: "ci" });
  assert.equal(cancel.runId, runId);
  assert.equal(resume.runId, runId);
  assert.deepEqual(audit[0].created, { id: ciId, name: "ci", role: "submit" });
  assert.equal((audit[7].revoked as { id: string }).id, ciId);
  // No secret anywhere: not in a log line, not in the store.
  const secrets = [ADMIN_TOKEN, ci, secretOf(ci), viewer, secretOf(viewer)];
  const everything = JSON.stringify(api.logs) + (await dumpStore(api.store));
  for (const secret of secrets) assert.ok(!everything.includes(secret), "a secret leaked");
});

Deno.test("bootstrap: once only, and of concurrent calls exactly one wins", async () => {
  await using box = await sandbox();
  await using api = await apiServer(box.dir, { adminToken: undefined });
  const answers = await Promise.all(
    Array.from({ length: 6 }, () => api.call("POST", "/api/acl/bootstrap")),
  );
  const won = answers.filter((answer) => answer.status === 201);
  assert.equal(won.length, 1, answers.map((answer) => answer.text).join("\n"));
  for (const lost of answers.filter((answer) => answer.status !== 201)) {
    assert.equal(lost.status, 409);
    assert.match(lost.json.message as string, /bootstrap was done already/);
  }
  const admin = won[0].json.token as string;
  assert.equal((await api.call("GET", "/api/tokens", { token: admin })).status, 200);
  const audit = api.logs.filter((line) => line.action === "token.bootstrap");
  assert.equal(audit.filter((line) => line.outcome === "allowed").length, 1);
  assert.ok(!JSON.stringify(api.logs).includes(secretOf(admin)));
});

Deno.test("bootstrap: a server given an admin token file closes it for the servers without one", async () => {
  await using box = await sandbox();
  await using withFile = await apiServer(box.dir);
  await poll(async () => (await withFile.store.get("/acl/bootstrap")) ? true : undefined, {
    what: "the bootstrap closed in the store",
  });
  // Another server on the same store, without the file.
  await using other = await apiServer(box.dir, { serverId: "sec-2", adminToken: undefined });
  const refused = await other.call("POST", "/api/acl/bootstrap");
  assert.equal(refused.status, 409);
  assert.match(refused.json.message as string, /a server was given --admin-token-file/);
  assert.equal((await other.store.list("/acl/tokens/")).items.length, 0);
});

Deno.test({
  name: "bootstrap: race-safe on etcd, across clients of different servers",
  ignore: ignoreWithoutEtcd(),
  async fn() {
    await using etcd = await startEtcdCluster({ members: 1 });
    const { openEtcdStore } = await import("../../consensus/etcd.ts");
    const stores = await Promise.all(
      [0, 1].map(() => openEtcdStore({ endpoints: etcd.endpoints })),
    );
    try {
      const outcomes = await Promise.allSettled(
        Array.from({ length: 10 }, (_, i) => bootstrapAcl(stores[i % 2])),
      );
      assert.equal(outcomes.filter((outcome) => outcome.status === "fulfilled").length, 1);
    } finally {
      await Promise.all(stores.map((store) => store.close()));
    }
  },
});

/** A listener counting the webhook deliveries it receives. */
function hookListener() {
  let hits = 0;
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, async (r) => {
    hits++;
    await r.body?.cancel();
    return new Response("ok");
  });
  return {
    port: server.addr.port,
    hits: () => hits,
    [Symbol.asyncDispose]: () => server.shutdown(),
  };
}

Deno.test("webhooks: a host off --webhook-allow is refused at submit, located, and again at delivery", async () => {
  await using box = await sandbox();
  await using allowed = hookListener();
  await using internal = hookListener();
  await using api = await apiServer(box.dir, {
    webhookAllow: [`127.0.0.1:${allowed.port}`],
  });
  const agent = await startAgent({
    servers: [`127.0.0.1:${api.grpcPort}`],
    token: JOIN_TOKEN,
    agentId: "hooked",
    allowShell: true,
    stateDir: `${box.dir}/agent`,
    artifacts: openLocalArtifactStore(`${box.dir}/artifacts`),
    log: () => {},
  });
  try {
    const pipeline = (port: number) =>
      `name: hooked
steps:
  fail:
    backend: shell
    run: exit 3
    retry: 0
    on-failure:
      webhook: "http://127.0.0.1:${port}/latest/meta-data?token=path-secret"
`;
    const client = new RunClient([api.http], { token: ADMIN_TOKEN });
    // Refused at submit, at the webhook key, naming the allow-list but not the URL's path.
    await assert.rejects(
      client.submit(pipeline(internal.port), "hooked.yaml", "/"),
      (error: Error & { diagnostics?: Array<Record<string, unknown>> }) => {
        const [problem] = error.diagnostics!;
        assert.deepEqual([problem.line, problem.col, problem.code], [8, 7, "webhook_not_allowed"]);
        assert.equal(problem.path, "steps.fail.on-failure.webhook");
        assert.match(
          problem.message as string,
          new RegExp(
            `allows \\(--webhook-allow: 127\\.0\\.0\\.1:${allowed.port}\\), got ` +
              `127\\.0\\.0\\.1:${internal.port}$`,
          ),
        );
        assert.doesNotMatch(JSON.stringify(problem), /path-secret/);
        return true;
      },
    );
    assert.equal((await api.store.list("/run/")).items.length, 0);
    // An allowed host is called.
    const { runId } = await client.submit(pipeline(allowed.port), "hooked.yaml", "/");
    await poll(() => allowed.hits() > 0 ? true : undefined, { what: "the allowed webhook" });
    // A run stored without the API's check (written before the list
    // changed, say) is stopped at delivery.
    const plan = parsePipeline(pipeline(internal.port), { file: "hooked.yaml", baseDir: "/" });
    const stored = await submitRun(api.store, plan);
    const refusal = await poll(
      () =>
        api.logs.find((line) =>
          line.msg === "on-failure webhook not delivered" && line.runId === stored.runId
        ),
      { what: "the refusal at delivery" },
    );
    assert.match(String(refusal.detail), /refused: not a host this server allows/);
    assert.doesNotMatch(JSON.stringify(api.logs), /path-secret/);
    assert.equal(internal.hits(), 0);
    assert.notEqual(runId, stored.runId);
  } finally {
    await agent.stop();
  }
});

const MALFORMED: Array<[string, string, BodyInit, number, RegExp]> = [
  ["null", "/api/runs", "null", 400, /Expected a JSON object/],
  ["an array", "/api/runs", "[]", 400, /Expected a JSON object/],
  ["a string", "/api/runs", '"name: x"', 400, /Expected a JSON object/],
  ["broken JSON", "/api/runs", "{", 400, /Expected a JSON body/],
  ["invalid UTF-8", "/api/runs", new Uint8Array([0x7b, 0xff, 0xfe, 0x7d]), 400, /JSON body/],
  ["no source", "/api/runs", "{}", 400, /"source"/],
  ["a numeric source", "/api/runs", '{"source": 5}', 400, /"source"/],
  ["a numeric file", "/api/runs", '{"source": "", "file": 5}', 400, /"file" to be a string/],
  ["files as a list", "/api/runs", '{"source": "", "files": []}', 400, /"files" to map/],
  [
    "files not base64",
    "/api/runs",
    '{"source": "", "files": {"steps/a.ts": "!!not base64!!"}}',
    400,
    /"steps\/a\.ts" to be base64/,
  ],
  [
    "a file that is a number",
    "/api/runs",
    '{"source": "", "files": {"a.ts": 5}}',
    400,
    /"a\.ts" to be base64/,
  ],
  [
    "a file outside",
    "/api/runs",
    '{"source": "", "files": {"../escape.ts": ""}}',
    400,
    /relative paths/,
  ],
  [
    "too many files",
    "/api/runs",
    JSON.stringify({
      source: "",
      files: Object.fromEntries(Array.from({ length: 2001 }, (_, i) => [`f${i}`, ""])),
    }),
    413,
    /at most 2000 files/,
  ],
  ["a null token request", "/api/tokens", "null", 400, /Expected a JSON object/],
  ["an unknown role", "/api/tokens", '{"name": "x", "role": "root"}', 400, /"role"/],
  ["a bad token name", "/api/tokens", '{"name": "a b", "role": "read"}', 400, /token name/],
];

Deno.test("API: a malformed body is a 400 (or 413) saying what was expected, never a 500", async () => {
  await using box = await sandbox();
  await using api = await apiServer(box.dir);
  for (const [what, path, body, status, message] of MALFORMED) {
    const answer = await api.call("POST", path, { token: ADMIN_TOKEN, body });
    assert.equal(answer.status, status, `${what}: ${answer.text}`);
    assert.match(answer.json.message as string, message, what);
    assert.doesNotMatch(answer.text, STACK_TRACE, what);
  }
  assert.equal((await api.store.list("/run/")).items.length, 0);
});

/** Writes all of `bytes` (a write may take only part). */
async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (let at = 0; at < bytes.length;) at += await conn.write(bytes.subarray(at));
}

/**
 * POSTs a body of spaces (valid JSON whitespace) over a raw connection,
 * chunked or with a declared length, until the server answers or `cap`
 * bytes are sent; returns the answer and what was sent before it.
 */
async function postHuge(
  port: number,
  options: { chunked: boolean; declared?: number; cap: number },
): Promise<{ head: string; body: string; sent: number }> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  const encoder = new TextEncoder();
  const length = options.chunked
    ? "Transfer-Encoding: chunked"
    : `Content-Length: ${options.declared}`;
  await writeAll(
    conn,
    encoder.encode(
      `POST /api/runs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${ADMIN_TOKEN}\r\n` +
        `Content-Type: application/json\r\n${length}\r\n\r\n`,
    ),
  );
  let answer = "";
  let answered = false;
  const reading = (async () => {
    const buffer = new Uint8Array(64 * 1024);
    const decoder = new TextDecoder();
    while (true) {
      const n = await conn.read(buffer).catch(() => null);
      if (n === null) break;
      answer += decoder.decode(buffer.subarray(0, n));
      const end = answer.indexOf("\r\n\r\n");
      const declared = /content-length: (\d+)/i.exec(answer);
      if (end >= 0 && declared && answer.length >= end + 4 + Number(declared[1])) break;
    }
    answered = true;
    // A writer blocked on a server that no longer reads is released.
    try {
      conn.close();
    } catch {
      // Closed already.
    }
  })();
  const chunk = new Uint8Array(1024 * 1024).fill(0x20);
  const frame = options.chunked
    ? new Uint8Array([...encoder.encode("100000\r\n"), ...chunk, ...encoder.encode("\r\n")])
    : chunk;
  let sent = 0;
  try {
    while (!answered && sent < options.cap) {
      await writeAll(conn, frame);
      sent += chunk.length;
    }
    // Only a server that read it all gets here before answering.
    if (!answered && options.chunked) await writeAll(conn, encoder.encode("0\r\n\r\n"));
  } catch {
    // The server answered and closed: the write was cut short.
  }
  await reading;
  const end = answer.indexOf("\r\n\r\n");
  return { head: answer.slice(0, end), body: answer.slice(end + 4), sent };
}

/** Resident memory of a process, in MiB (from ps(1)). */
async function rssMiB(pid: number): Promise<number> {
  const output = await new Deno.Command("ps", { args: ["-o", "rss=", "-p", String(pid)] })
    .output();
  return Number(new TextDecoder().decode(output.stdout).trim()) / 1024;
}

/** A `runnel server` process on free ports; its stderr is kept for leak checks. */
async function serverProcess(
  dir: string,
  extra: string[],
  env: Record<string, string> = {},
): Promise<{ child: Deno.ChildProcess; api: string; stderr: () => string; stop(): Promise<void> }> {
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      ...CLI_PERMISSIONS,
      MAIN,
      "server",
      "--store",
      `${dir}/server.db`,
      "--listen",
      "127.0.0.1:0",
      "--grpc",
      "127.0.0.1:0",
      ...extra,
    ],
    cwd: dir,
    env: { RUNNEL_TOKEN: JOIN_TOKEN, NO_COLOR: "1", ...env },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let text = "";
  const collecting = (async () => {
    for await (const chunk of child.stderr.pipeThrough(new TextDecoderStream())) text += chunk;
  })();
  const stdout = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  try {
    const api = await poll(
      () => /API (https?:\/\/127\.0\.0\.1:\d+)/.exec(text)?.[1],
      { what: `runnel server to listen (stderr so far: ${text})`, timeoutMs: 30_000 },
    );
    return {
      child,
      api,
      stderr: () => text,
      async stop() {
        child.kill("SIGTERM");
        await child.status;
        await collecting;
        await stdout.cancel();
      },
    };
  } catch (error) {
    child.kill("SIGKILL");
    await child.status;
    await collecting;
    await stdout.cancel();
    throw error;
  }
}

Deno.test("API: a huge body is refused as it streams in, chunked or declared; the server stays small", async () => {
  await using box = await sandbox();
  const adminFile = `${box.dir}/admin.token`;
  await Deno.writeTextFile(adminFile, ADMIN_TOKEN, { mode: 0o600 });
  const server = await serverProcess(box.dir, ["--admin-token-file", adminFile]);
  try {
    const port = Number(new URL(server.api).port);
    const before = await rssMiB(server.child.pid);
    const declared = await postHuge(port, { chunked: false, declared: 400 << 20, cap: 400 << 20 });
    assert.match(declared.head, /^HTTP\/1\.1 413/);
    assert.match(JSON.parse(declared.body).message, /at most 16 MiB/);
    assert.ok(declared.sent <= 48 << 20, `sent ${declared.sent >> 20} MiB before the 413`);
    const chunked = await postHuge(port, { chunked: true, cap: 400 << 20 });
    assert.match(chunked.head, /^HTTP\/1\.1 413/);
    assert.match(JSON.parse(chunked.body).message, /Expected a request body of at most 16 MiB/);
    assert.ok(chunked.sent <= 48 << 20, `sent ${chunked.sent >> 20} MiB before the 413`);
    const after = await rssMiB(server.child.pid);
    assert.ok(after - before < 96, `the server grew from ${before} to ${after} MiB`);
    const health = await fetch(`${server.api}/health`);
    assert.equal(health.status, 200);
    await health.body?.cancel();
    // The bootstrap is closed by the admin token file, for the CLI too.
    const bootstrap = await runCli(["token", "bootstrap", "--server", server.api], {
      cwd: box.dir,
    });
    assert.equal(bootstrap.code, 1);
    assert.match(
      bootstrap.stderr,
      /^error: This server takes its admin token from --admin-token-file/m,
    );
  } finally {
    await server.stop();
  }
  assert.ok(!server.stderr().includes(ADMIN_TOKEN), "the admin token was logged");
});

Deno.test({
  name:
    "API over TLS: the CLI trusts --tls-ca or its config file; tokens are made, listed, revoked",
  ignore: await opensslMissing() !== undefined,
  async fn() {
    await using box = await sandbox();
    const certs = await makeTestCertificates(box.dir);
    const adminFile = `${box.dir}/admin.token`;
    await Deno.writeTextFile(adminFile, ADMIN_TOKEN, { mode: 0o600 });
    const server = await serverProcess(box.dir, [
      "--admin-token-file",
      adminFile,
      "--http-tls-cert",
      certs.serverCert,
      "--http-tls-key",
      certs.serverKey,
    ]);
    const issued: string[] = [];
    try {
      assert.match(server.api, /^https:/);
      const cli = (args: string[], env: Record<string, string> = {}) =>
        runCli([...args, "--server", server.api], { cwd: box.dir, env });
      const empty = `${box.dir}/empty.yaml`;
      await Deno.writeTextFile(empty, "", { mode: 0o600 });
      const asAdmin = { RUNNEL_API_TOKEN: ADMIN_TOKEN, RUNNEL_CONFIG: empty };
      // Without the CA, the server's certificate is not trusted.
      const untrusted = await cli(["runs"], asAdmin);
      assert.equal(untrusted.code, 1);
      assert.match(untrusted.stderr, /invalid peer certificate: UnknownIssuer/);
      assert.match(untrusted.stderr, /trust the server's CA with --tls-ca FILE/);
      assert.doesNotMatch(untrusted.stderr, STACK_TRACE);
      // Plain HTTP to the TLS port gets nothing.
      await assert.rejects(fetch(server.api.replace("https:", "http:") + "/api/runs"));
      const created = await cli(
        ["token", "create", "--role", "read", "--name", "viewer", "--tls-ca", certs.ca],
        asAdmin,
      );
      assert.equal(created.code, 0, created.stderr);
      const viewer = /^token\s+(rnl_\S+)$/m.exec(created.stdout)![1];
      const viewerId = /^id\s+(\S+)$/m.exec(created.stdout)![1];
      issued.push(viewer);
      // The viewer's token in a config file other users can read: used, with a warning.
      const config = `${box.dir}/cli.yaml`;
      await Deno.writeTextFile(config, `token: ${viewer}\ntls-ca: ${certs.ca}\n`, { mode: 0o644 });
      await Deno.chmod(config, 0o644);
      const fromConfig = await cli(["runs"], { RUNNEL_CONFIG: config });
      assert.equal(fromConfig.code, 0, fromConfig.stderr);
      assert.match(fromConfig.stdout, /no runs on this cluster yet/);
      assert.match(fromConfig.stderr, /cli\.yaml can be read by other users \(mode 644\)/);
      await Deno.chmod(config, 0o600);
      const quiet = await cli(["runs"], { RUNNEL_CONFIG: config });
      assert.equal(quiet.code, 0);
      assert.doesNotMatch(quiet.stderr, /warning/);
      // A read token cannot list tokens; --token wins over the file.
      const forbidden = await cli(["token", "list"], { RUNNEL_CONFIG: config });
      assert.equal(forbidden.code, 1);
      assert.match(forbidden.stderr, /needs a token with the admin role; token "viewer"/);
      const listed = await cli(["token", "list", "--token", ADMIN_TOKEN], {
        RUNNEL_CONFIG: config,
      });
      assert.equal(listed.code, 0, listed.stderr);
      assert.match(listed.stdout, new RegExp(`^${viewerId}\\s+viewer\\s+read\\s`, "m"));
      assert.ok(!listed.stdout.includes(secretOf(viewer)), "list shows no secret");
      const revoked = await cli(["token", "revoke", viewerId, "--tls-ca", certs.ca], asAdmin);
      assert.equal(revoked.code, 0, revoked.stderr);
      const refused = await cli(["runs"], { RUNNEL_CONFIG: config });
      assert.equal(refused.code, 1);
      assert.match(refused.stderr, /API token presented is not valid/);
    } finally {
      await server.stop();
    }
    for (const secret of [ADMIN_TOKEN, ...issued]) {
      assert.ok(!server.stderr().includes(secret), "a token reached the server's log");
    }
  },
});

Deno.test("API: a plan too large for one store value is a 413 naming the limit, not a 500", async () => {
  await using box = await sandbox();
  await using api = await apiServer(box.dir);
  // 4,000 legs, each with a long command: within the pipeline limits, past what etcd stores at once.
  const command = "x".repeat(400);
  const source = `name: wide
steps:
  wide:
    backend: shell
    matrix: { i: [${Array.from({ length: 4_000 }, (_, i) => i).join(", ")}] }
    run: "echo ${command} \${{ matrix.i }}"
`;
  const refused = await api.call("POST", "/api/runs", {
    token: ADMIN_TOKEN,
    body: JSON.stringify({ source, file: "wide.yaml" }),
  });
  assert.equal(refused.status, 413, refused.text);
  assert.equal(refused.json.error, "plan_too_large");
  assert.match(String(refused.json.message), /at most 1048576 bytes.*4000 step instances/);
  assert.doesNotMatch(await dumpStore(api.store), /\/plan\//, "nothing was stored");
});

Deno.test("API: a stream opened with a token ends when the token is revoked", async () => {
  await using box = await sandbox();
  await using api = await apiServer(box.dir);
  const viewer = await tokenOf(api, "viewer", "read");
  const { runId } = await new RunClient([api.http], { token: ADMIN_TOKEN })
    .submit("name: waits\nsteps:\n  a: { backend: shell, run: 'true' }\n", "p.yaml", "/");
  // No agent: the run stays pending, so a followed stream would go on for ever.
  const response = await fetch(`${api.http}/api/runs/${runId}/logs?follow=1`, {
    headers: { authorization: `Bearer ${viewer}` },
  });
  assert.equal(response.status, 200);
  const reader = response.body!.pipeThrough(new TextDecoderStream()).getReader();
  const viewerId = viewer.split("_")[1];
  const revoked = await api.call("DELETE", `/api/tokens/${viewerId}`, { token: ADMIN_TOKEN });
  assert.equal(revoked.status, 200, revoked.text);
  let text = "";
  const deadline = AbortSignal.timeout(10_000);
  while (!deadline.aborted) {
    const { done, value } = await reader.read();
    if (done) break;
    text += value;
  }
  assert.ok(!deadline.aborted, "the stream ended after the revocation");
  assert.doesNotMatch(text, /event: log/, "nothing more was sent");
});

Deno.test("API: an admin revokes or forgets an agent's identity; a weaker token may not; both are audited", async () => {
  await using box = await sandbox();
  await using api = await apiServer(box.dir);
  const identity = clusterKeys.agentIdentity("worker-1");
  await api.store.put(identity, JSON.stringify({ agentId: "worker-1", credential: "sha256:00" }));
  const viewer = await tokenOf(api, "viewer", "read");
  const weak = await api.call("POST", "/api/agents/worker-1/revoke", { token: viewer });
  assert.equal(weak.status, 403, weak.text);
  assert.equal(JSON.parse((await api.store.get(identity))!.value).revokedAt, undefined);

  using client = new RunClient([api.http], { token: ADMIN_TOKEN });
  await client.revokeAgent("worker-1");
  assert.equal(typeof JSON.parse((await api.store.get(identity))!.value).revokedAt, "number");
  await assert.rejects(client.revokeAgent("nobody"), /No agent "nobody"/);
  await client.forgetAgent("worker-1");
  assert.equal(await api.store.get(identity), undefined);
  const audited = api.logs.filter((line) => line.component === "audit")
    .map((line) => [line.action, line.agent, line.outcome]);
  assert.deepEqual(audited.filter(([action]) => String(action).startsWith("agent.")), [
    ["agent.revoke", undefined, "denied"],
    ["agent.revoke", "worker-1", "allowed"],
    ["agent.revoke", "nobody", "failed"],
    ["agent.forget", "worker-1", "allowed"],
  ]);
});
