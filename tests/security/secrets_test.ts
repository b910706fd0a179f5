/**
 * Issue 10, items 2, 7 and 8, replayed with real processes: a submitted
 * pipeline may not read the server's env vars or files; secret values are
 * never written to the state store (etcd, every revision of its history,
 * its data files; the embedded store's tables and files), an agent's or a
 * local runner's disk, a bundle or a log; and a multi-line secret printed
 * line by line, or in base64, is masked. A Docker step re-attached after its
 * runner (agent or local) was SIGKILLed still has its output masked.
 *
 * Every check greps for each secret value, each line of the multi-line one,
 * and their base64 at every byte alignment.
 *
 * @module
 */

import assert from "node:assert/strict";
import { DatabaseSync } from "node:sqlite";
import { secretVariants } from "../../core/secrets.ts";
import createDockerBackend from "../../backends/docker/mod.ts";
import { ensureBusyboxImage } from "../../infra/images.ts";
import { ignoreWithoutEtcd, startEtcdCluster } from "../_etcd.ts";
import {
  CLI_PERMISSIONS,
  MAIN,
  poll,
  runCli as runCliAs,
  sandbox,
  spawnCli,
  waitForLine,
} from "../_helpers.ts";
import { ADMIN_TOKEN, AS_ADMIN, freePort } from "./_cluster.ts";

const TOKEN = "security-join-token-4f2c";
const HEARTBEAT = "500ms";
const IN_CI = Deno.env.get("CI") === "true";
const docker = await createDockerBackend().fingerprint();

/** A value in the server's environment (declared as `db-password`). */
const DB_PASSWORD = "hunter2-SECRET-db-7Qx";
/** A multi-line value in a file of the server (declared as `deploy-key`). */
const DEPLOY_KEY = "-----BEGIN TEST KEY-----\nline-one-QWERTY-123456\nline-two-ZXCVB-789012\n" +
  "-----END TEST KEY-----";
/** A value in a file of the agent (declared in its config as `agent-token`). */
const AGENT_TOKEN = "agent-side-SECRET-9Zk";

/** What must appear nowhere: each value, each line of it, its base64 at every alignment. */
const FORBIDDEN = [
  ...new Set([DB_PASSWORD, DEPLOY_KEY, AGENT_TOKEN, TOKEN, ADMIN_TOKEN].flatMap(secretVariants)),
].filter((variant) => variant.length >= 8);

/** The CLI, calling the API as the admin. */
function runCli(args: string[], options: { cwd: string; env?: Record<string, string> }) {
  return runCliAs(args, { ...options, env: { RUNNEL_API_TOKEN: ADMIN_TOKEN, ...options.env } });
}

/** The forbidden strings `text` holds. */
function leaksIn(text: string): string[] {
  return FORBIDDEN.filter((variant) => text.includes(variant));
}

function assertNoLeak(what: string, text: string): void {
  const found = leaksIn(text);
  assert.deepEqual(found, [], `${what} holds a secret: ${JSON.stringify(found)}`);
}

/** Every regular file under `dir`, as `path: leaked strings` for those that hold one. */
async function leakingFiles(dir: string): Promise<string[]> {
  const found: string[] = [];
  const latin1 = new TextDecoder("latin1");
  const walk = async (path: string) => {
    for await (const entry of Deno.readDir(path)) {
      const full = `${path}/${entry.name}`;
      if (entry.isDirectory) await walk(full);
      else if (entry.isFile) {
        // Bytes as latin1: a value (ASCII) is found in text and binary files alike.
        const leaks = leaksIn(latin1.decode(await Deno.readFile(full)));
        if (leaks.length > 0) found.push(`${full}: ${JSON.stringify(leaks)}`);
      }
    }
  };
  await walk(dir);
  return found;
}

/** Every row of every table of an SQLite database, as JSON. */
function sqliteDump(path: string): { text: string; tables: string[] } {
  const db = new DatabaseSync(path, { readOnly: true });
  try {
    const tables = (db.prepare("SELECT name FROM sqlite_master WHERE type = 'table'").all() as {
      name: string;
    }[]).map((row) => row.name);
    const text = tables.map((table) => JSON.stringify(db.prepare(`SELECT * FROM "${table}"`).all()))
      .join("\n");
    return { text, tables };
  } finally {
    db.close();
  }
}

/** The operator's side: a secrets file for servers, a key file, an agent config, the admin token. */
async function operatorFiles(dir: string) {
  await Deno.writeTextFile(`${dir}/admin.token`, ADMIN_TOKEN, { mode: 0o600 });
  await Deno.writeTextFile(`${dir}/deploy.key`, `${DEPLOY_KEY}\n`, { mode: 0o600 });
  await Deno.writeTextFile(`${dir}/agent.token`, AGENT_TOKEN, { mode: 0o600 });
  await Deno.writeTextFile(
    `${dir}/secrets.yaml`,
    "db-password: { env: RUNNEL_TEST_DB_PASSWORD }\ndeploy-key: { file: deploy.key }\n",
  );
  await Deno.writeTextFile(
    `${dir}/agent.yaml`,
    "secrets:\n  agent-token: { file: agent.token }\npolicy:\n  backends: [shell, docker]\n",
  );
  return {
    secrets: `${dir}/secrets.yaml`,
    adminToken: `${dir}/admin.token`,
    agentConfig: `${dir}/agent.yaml`,
    env: { RUNNEL_TOKEN: TOKEN, RUNNEL_TEST_DB_PASSWORD: DB_PASSWORD },
  };
}

/** A step printing every secret: whole, a multi-line one line by line in two chunks, base64. */
const LEAKY_PIPELINE = `name: secret-leak
secrets:
  DB_PASSWORD: db-password
  DEPLOY_KEY: deploy-key
  AGENT_TOKEN: agent-token
steps:
  leak:
    backend: shell
    secrets: [DB_PASSWORD, DEPLOY_KEY, AGENT_TOKEN]
    run: |
      echo "db $DB_PASSWORD"
      printf '%s' "$DB_PASSWORD" | base64
      echo "agent $AGENT_TOKEN" >&2
      printf '%s\\n' "$DEPLOY_KEY" | head -n 2
      sleep 0.3
      printf '%s\\n' "$DEPLOY_KEY" | tail -n +3
      printf 'key %s\\n' "$(printf '%s' "$DEPLOY_KEY" | base64 -w0)"
      echo done > "$RUNNEL_OUTPUT_DONE_TXT"
    outputs: [done.txt]
`;

/** A pipeline that names the server's own env var and files, and a secret nobody declared. */
const ATTACK_PIPELINE = `name: attack
secrets:
  TOK: { env: RUNNEL_TOKEN }
  SHADOW: { file: /etc/shadow }
  DB: db-pasword
steps:
  steal:
    backend: shell
    secrets: [TOK, SHADOW, DB]
    run: echo "$TOK" | base64; echo "$SHADOW" | base64
`;

/** A `runnel` process (server or agent) whose stderr is kept. */
class Runnel {
  readonly #child: Deno.ChildProcess;
  readonly #reading: Promise<void>;
  stderr = "";

  constructor(args: string[], env: Record<string, string>) {
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", ...CLI_PERMISSIONS, MAIN, ...args],
      env: { NO_COLOR: "1", ...env },
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    this.#child = child;
    this.#reading = (async () => {
      for await (const text of child.stderr.pipeThrough(new TextDecoderStream())) {
        this.stderr += text;
      }
    })();
  }

  /** Sends `signal` to this process (by its pid) and waits for it to exit. */
  async stop(signal: Deno.Signal = "SIGTERM"): Promise<void> {
    try {
      this.#child.kill(signal);
    } catch {
      // Already gone.
    }
    await this.#child.status;
    await this.#reading;
  }
}

async function ready(http: string): Promise<void> {
  await poll(async () => {
    const response = await fetch(`${http}/ready`);
    await response.body?.cancel();
    return response.ok || undefined;
  }, { what: `${http} ready`, timeoutMs: 30_000, retryOnError: true });
}

/** Waits until `count` workers are online; returns them. */
async function workers(http: string, count: number): Promise<Array<{ secrets?: string[] }>> {
  return await poll(async () => {
    const state = await (await fetch(`${http}/cluster-state`, AS_ADMIN)).json();
    return state.workers.length === count ? state.workers : undefined;
  }, { what: `${count} worker(s) online`, timeoutMs: 30_000 });
}

async function etcdctl(endpoints: string[], ...args: string[]): Promise<string> {
  const output = await new Deno.Command("etcdctl", {
    args: [`--endpoints=${endpoints.join(",")}`, ...args],
    env: { ETCDCTL_API: "3" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(output.code, 0, new TextDecoder().decode(output.stderr));
  return new TextDecoder().decode(output.stdout);
}

Deno.test({
  name: "security: a cluster over etcd keeps no secret value in any revision, file or log",
  ignore: ignoreWithoutEtcd(),
  async fn() {
    await using box = await sandbox();
    await using ops = await sandbox();
    const operator = await operatorFiles(ops.dir);
    const pipeline = await box.write("pipeline/pipeline.yaml", LEAKY_PIPELINE);
    const attack = await box.write("pipeline/attack.yaml", ATTACK_PIPELINE);
    const etcd = await startEtcdCluster({ members: 3 });
    const ports = [0, 1].map(() => [freePort(), freePort()]);
    const grpc = ports.map(([, port]) => `127.0.0.1:${port}`);
    const servers = ports.map(([http, port], i) =>
      new Runnel([
        "server",
        ...["--etcd", etcd.endpoints.join(","), "--id", `server-${i + 1}`],
        ...["--listen", `127.0.0.1:${http}`, "--grpc", `127.0.0.1:${port}`],
        ...["--peers", grpc.join(","), "--heartbeat", HEARTBEAT, "--secrets", operator.secrets],
        ...["--admin-token-file", operator.adminToken],
      ], operator.env)
    );
    const http = ports.map(([port]) => `http://127.0.0.1:${port}`);
    let agent: Runnel | undefined;
    try {
      await Promise.all(http.map(ready));
      agent = new Runnel([
        "agent",
        ...["--server", grpc.join(","), "--config", operator.agentConfig, "--allow-shell"],
        ...["--state-dir", `${box.dir}/agent`, "--artifacts", `${box.dir}/artifacts`],
      ], { RUNNEL_TOKEN: TOKEN });
      const [worker] = await workers(http[0], 1);
      // The names a step there can be given: the agent's own and its server's.
      assert.deepEqual(worker.secrets, ["agent-token", "db-password", "deploy-key"]);

      // Item 2: the server's env and files cannot be named; a typo is located.
      const refused = await runCli(["submit", attack, "--server", http[1]], { cwd: box.dir });
      assert.equal(refused.code, 2, refused.stdout + refused.stderr);
      assert.match(
        refused.stderr,
        /attack\.yaml:3:\d+: secret "TOK" reads env var "RUNNEL_TOKEN" of the server or agent: a cluster resolves only secrets its operator declared — have the operator declare it/,
      );
      assert.match(
        refused.stderr,
        /attack\.yaml:4:\d+: secret "SHADOW" reads file "\/etc\/shadow"/,
      );
      assert.match(
        refused.stderr,
        /attack\.yaml:5:\d+: secret "DB" names "db-pasword", which the operator did not declare — did you mean "db-password"\?/,
      );
      assertNoLeak("the refusal", refused.stdout + refused.stderr);

      const submitted = await runCli(
        ["submit", pipeline, "--server", http.join(","), "--follow", "--json"],
        { cwd: box.dir },
      );
      assert.equal(submitted.code, 0, submitted.stdout + submitted.stderr);
      assertNoLeak("submit --follow --json", submitted.stdout + submitted.stderr);
      const runId = JSON.parse(submitted.stdout.split("\n")[0]).runId as string;
      const logs = await runCli(["logs", runId, "--server", http[0]], { cwd: box.dir });
      assert.equal(logs.code, 0, logs.stderr);
      assertNoLeak("runnel logs", logs.stdout);
      for (const line of ["db ***", "agent ***", "key ***"]) {
        assert.ok(logs.stdout.includes(`leak │ ${line}`), `"${line}" in ${logs.stdout}`);
      }

      await agent.stop();
      await Promise.all(servers.map((server) => server.stop()));
      // Item 7: every key at every revision of etcd's history.
      const current = JSON.parse(
        await etcdctl(etcd.endpoints, "get", "", "--prefix", "-w", "json", "--keys-only"),
      ).header.revision as number;
      let history = "";
      for (let revision = 1; revision <= current; revision++) {
        history += await etcdctl(etcd.endpoints, "get", "", "--prefix", `--rev=${revision}`);
      }
      assert.match(
        history,
        /\/assign\/[^\n]+\n[^\n]*"secrets":\{"DB_PASSWORD":\{"secret":"db-password"\}/,
      );
      assert.match(history, /\/logs\/[^\n]+\n[\s\S]*db \*\*\*/);
      assertNoLeak(`etcd, revisions 1 to ${current}`, history);
      // And every byte etcd wrote (its WAL keeps every write), and its logs.
      for (let member = 0; member < 3; member++) await etcd.kill(member);
      assert.deepEqual(await leakingFiles(etcd.dir), []);
      assert.deepEqual(await leakingFiles(box.dir), []);
      for (const process of [...servers, agent]) assertNoLeak("a process's log", process.stderr);
    } finally {
      // A failed test may leave a step running, which a drain would wait for.
      await agent?.stop("SIGKILL");
      await Promise.all(servers.map((server) => server.stop()));
      await etcd.stop();
    }
  },
});

Deno.test({
  name:
    "security: an embedded-store cluster keeps no secret value; an agent SIGKILLed mid-step masks its re-attached container",
  ignore: !docker.available && !IN_CI,
  async fn() {
    if (!docker.available) throw new Error(`Expected Docker in CI: ${docker.detail}`);
    const image = await ensureBusyboxImage();
    await using box = await sandbox();
    await using ops = await sandbox();
    const operator = await operatorFiles(ops.dir);
    const pipeline = await box.write(
      "pipeline/pipeline.yaml",
      `name: reattach
secrets: { DB_PASSWORD: db-password, AGENT_TOKEN: agent-token }
steps:
  contained:
    image: ${image}
    user: "65534"
    secrets: [DB_PASSWORD, AGENT_TOKEN]
    run: |
      echo "before $DB_PASSWORD"
      while [ ! -e /runnel/out/go ]; do echo "tick $DB_PASSWORD $AGENT_TOKEN"; sleep 0.2; done
      echo "after $DB_PASSWORD $AGENT_TOKEN"
      echo done > "$RUNNEL_OUTPUT_DONE_TXT"
    outputs: [done.txt]
`,
    );
    const [httpPort, grpcPort] = [freePort(), freePort()];
    const http = `http://127.0.0.1:${httpPort}`;
    const server = new Runnel([
      "server",
      ...["--store", `${box.dir}/server/server.db`, "--secrets", operator.secrets],
      ...["--admin-token-file", operator.adminToken],
      // The default heartbeat (5 s): the agent restarts well within its lease.
      ...["--listen", `127.0.0.1:${httpPort}`, "--grpc", `127.0.0.1:${grpcPort}`],
    ], operator.env);
    const agentArgs = [
      "agent",
      ...["--server", `127.0.0.1:${grpcPort}`, "--config", operator.agentConfig],
      ...["--state-dir", `${box.dir}/agent`, "--artifacts", `${box.dir}/artifacts`],
    ];
    let agent: Runnel | undefined;
    let agentId: string | undefined;
    const logsOf = async (runId: string) =>
      (await runCli(["logs", runId, "--server", http], { cwd: box.dir })).stdout;
    try {
      await ready(http);
      agent = new Runnel(agentArgs, { RUNNEL_TOKEN: TOKEN });
      await workers(http, 1);
      const submitted = await runCli(["submit", pipeline, "--server", http, "--json"], {
        cwd: box.dir,
      });
      assert.equal(submitted.code, 0, submitted.stderr);
      const runId = JSON.parse(submitted.stdout).runId as string;
      await poll(async () => (await logsOf(runId)).includes("before ***") || undefined, {
        what: "the container's first line",
        timeoutMs: 60_000,
      });
      agentId = JSON.parse(await Deno.readTextFile(`${box.dir}/agent/agent.json`)).agentId;
      const [record] = await Array.fromAsync(Deno.readDir(`${box.dir}/agent/attempts`));
      const recorded = await Deno.readTextFile(`${box.dir}/agent/attempts/${record.name}`);
      assert.deepEqual(JSON.parse(recorded).secrets, ["DB_PASSWORD", "AGENT_TOKEN"]);
      assertNoLeak("the attempt record", recorded);

      await agent.stop("SIGKILL");
      const before = (await logsOf(runId)).length;
      agent = new Runnel(agentArgs, { RUNNEL_TOKEN: TOKEN });
      // The re-attached container's output goes on, masked with values sent again.
      await poll(async () => {
        const text = await logsOf(runId);
        return text.length > before && text.slice(before).includes("tick *** ***") || undefined;
      }, { what: "masked output after the restart", timeoutMs: 60_000 });
      const outputs = await poll(async () => {
        for await (const dir of Deno.readDir(`${box.dir}/agent/work`)) {
          const out = `${box.dir}/agent/work/${dir.name}/contained/1/out`;
          if (await Deno.stat(out).then(() => true, () => false)) return out;
        }
        return undefined;
      }, { what: "the attempt's outputs directory" });
      await Deno.writeTextFile(`${outputs}/go`, "");
      const { steps } = await poll(async () => {
        const body = await (await fetch(`${http}/api/runs/${runId}`, AS_ADMIN)).json();
        return body.run.status === "succeeded" ? body : undefined;
      }, { what: "the run to succeed", timeoutMs: 60_000 });
      assert.equal(steps.contained.attempts.length, 1, "re-attached, not run again");
      const text = await logsOf(runId);
      assert.match(text, /contained │ after \*\*\* \*\*\*/);
      assertNoLeak("the step's logs", text);

      await agent.stop();
      await server.stop();
      const { text: tables, tables: names } = sqliteDump(`${box.dir}/server/server.db`);
      assert.ok(names.includes("history"), `tables: ${names}`);
      assert.match(tables, /"secrets\\":\{\\"DB_PASSWORD\\":\{\\"secret\\":\\"db-password\\"/);
      assertNoLeak("the embedded store's tables", tables);
      assert.deepEqual(await leakingFiles(box.dir), []);
      for (const process of [server, agent]) assertNoLeak("a process's log", process.stderr);
    } finally {
      // A failed test may leave a step running, which a drain would wait for.
      await agent?.stop("SIGKILL");
      await server.stop();
      if (agentId) await removeContainers(`runnel.agent=${agentId}`);
    }
  },
});

Deno.test({
  name:
    "security: local mode keeps no secret value on disk; a resumed run masks its re-attached container",
  ignore: !docker.available && !IN_CI,
  async fn() {
    if (!docker.available) throw new Error(`Expected Docker in CI: ${docker.detail}`);
    const image = await ensureBusyboxImage();
    await using box = await sandbox();
    await using ops = await sandbox();
    const operator = await operatorFiles(ops.dir);
    const env = { RUNNEL_TEST_DB_PASSWORD: DB_PASSWORD };
    // The user is the operator: names from --secrets, and an env var and a file of their own.
    const file = await box.write(
      "pipeline.yaml",
      `name: local-secrets
secrets:
  DB_PASSWORD: db-password
  DEPLOY_KEY: deploy-key
  AGENT_TOKEN: { file: ${ops.dir}/agent.token }
  FROM_ENV: { env: RUNNEL_TEST_DB_PASSWORD }
steps:
  leak:
    backend: shell
    secrets: [DB_PASSWORD, DEPLOY_KEY, AGENT_TOKEN, FROM_ENV]
    run: |
      echo "db $DB_PASSWORD $FROM_ENV agent $AGENT_TOKEN"
      printf '%s\\n' "$DEPLOY_KEY" | head -n 2
      sleep 0.3
      printf '%s\\n' "$DEPLOY_KEY" | tail -n +3
      printf '%s' "$DB_PASSWORD" | base64
  contained:
    image: ${image}
    needs: [leak]
    secrets: [DB_PASSWORD]
    run: |
      while [ ! -e /runnel/out/go ]; do echo "tick $DB_PASSWORD"; sleep 0.2; done
      echo "after $DB_PASSWORD"
`,
    );
    const secretsFlag = ["--secrets", operator.secrets, "--state-dir", box.stateDir];
    const undeclared = await runCli(["validate", file, "--state-dir", box.stateDir], {
      cwd: box.dir,
    });
    assert.equal(undeclared.code, 2);
    assert.match(
      undeclared.stderr,
      /pipeline\.yaml:3:\d+: secret "DB_PASSWORD" names "db-password", which the operator did not declare/,
    );

    const { child, lines, seen } = spawnCli(["run", file, ...secretsFlag, "--json"], {
      cwd: box.dir,
      env,
    });
    let runId: string | undefined;
    try {
      runId = JSON.parse(await waitForLine(lines, (line) => line.includes('"type":"run"'))).runId;
      await waitForLine(lines, (line) => line.includes('"contained"') && line.includes("tick"));
      const records = await Array.fromAsync(Deno.readDir(`${box.stateDir}/attempts`));
      const record = records.find((entry) => entry.name.includes("contained"))!;
      const recorded = await Deno.readTextFile(`${box.stateDir}/attempts/${record.name}`);
      assert.deepEqual(JSON.parse(recorded).secrets, ["DB_PASSWORD"]);
      assertNoLeak("the attempt record", recorded);
    } finally {
      child.kill("SIGKILL");
      await child.status;
      await child.stdout.cancel().catch(() => {});
      await child.stderr.cancel();
    }
    assertNoLeak("run --json", seen.join("\n"));
    assert.ok(seen.some((line) => line.includes("db *** *** agent ***")), seen.join("\n"));

    // Resumed: re-attached, its secrets resolved again (never read from disk), output masked.
    const resumed = spawnCli(["resume", runId!, ...secretsFlag, "--logs"], { cwd: box.dir, env });
    try {
      await waitForLine(resumed.lines, (line) => line.includes("contained │ tick ***"), 60_000);
      const [container] = await poll(async () => {
        const found = await listContainers(`runnel.run=${runId}`);
        return found.length === 1 ? found : undefined;
      }, { what: "the step's container" });
      await Deno.writeTextFile(`${await outputsMount(container)}/go`, "");
      for await (const _ of resumed.lines) {
        // Read to the end: `seen` keeps every line.
      }
      assert.equal((await resumed.child.status).code, 0, resumed.seen.join("\n"));
    } finally {
      try {
        resumed.child.kill("SIGKILL");
      } catch {
        // Already gone.
      }
      await resumed.child.status;
      await resumed.child.stderr.cancel().catch(() => {});
    }
    assert.ok(
      resumed.seen.some((line) => line.includes("contained │ after ***")),
      resumed.seen.join("\n"),
    );
    assertNoLeak("resume --logs", resumed.seen.join("\n"));
    const logs = await runCli(["logs", runId!, "--state-dir", box.stateDir], { cwd: box.dir });
    assertNoLeak("runnel logs", logs.stdout);
    assertNoLeak("the local store's tables", sqliteDump(`${box.stateDir}/state.db`).text);
    assert.deepEqual(await leakingFiles(box.dir), []);
    await removeContainers(`runnel.run=${runId}`);
  },
});

async function listContainers(label: string): Promise<string[]> {
  const listed = await new Deno.Command("docker", {
    args: ["ps", "-aq", "--filter", `label=${label}`],
    stdout: "piped",
    stderr: "null",
  }).output();
  return new TextDecoder().decode(listed.stdout).split("\n").filter(Boolean);
}

async function outputsMount(container: string): Promise<string> {
  const output = await new Deno.Command("docker", {
    args: [
      "inspect",
      "-f",
      '{{range .Mounts}}{{if eq .Destination "/runnel/out"}}{{.Source}}{{end}}{{end}}',
      container,
    ],
    stdout: "piped",
    stderr: "null",
  }).output();
  return new TextDecoder().decode(output.stdout).trim();
}

/** Removes the containers a failed test left. */
async function removeContainers(label: string): Promise<void> {
  const ids = await listContainers(label);
  if (ids.length > 0) {
    await new Deno.Command("docker", { args: ["rm", "-f", ...ids], stdout: "null", stderr: "null" })
      .output();
  }
}
