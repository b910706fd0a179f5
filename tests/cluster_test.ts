/**
 * Cluster mode end to end on loopback: a server (embedded store, standalone
 * election) with its HTTP API and gRPC gateway, real agents (in process and
 * as a subprocess that is SIGKILLed), a shared artifact store, the CLI's
 * client. The etcd-backed, multi-server faults live in the etcd tests.
 *
 * @module
 */

import assert from "node:assert/strict";
import { openEmbeddedStore } from "../consensus/embedded.ts";
import { startTestServer } from "./_server.ts";
import { openLocalArtifactStore } from "../core/artifacts/local.ts";
import { RunClient } from "../agent/client/mod.ts";
import { type RunningServer, standaloneElection, startServer } from "../agent/server/mod.ts";
import { AgentRejectedError, type RunningAgent, startAgent } from "../agent/worker/mod.ts";
import type { StepState } from "../core/model.ts";
import { CLI_PERMISSIONS, poll, ROOT, runCli, sandbox } from "./_helpers.ts";
import { findAwsCli, runAws, startS3Server } from "./_s3.ts";
import { collectBundle } from "../agent/bundle.ts";
import { openS3ArtifactStore } from "../core/artifacts/s3.ts";

const TOKEN = "cluster-test-token";
/** The API's admin token, as `--admin-token-file` would hold it. */
const ADMIN_TOKEN = "cluster-test-admin-token-0123456789";
/** Headers of a raw API call as the admin. */
const AS_ADMIN = { headers: { authorization: `Bearer ${ADMIN_TOKEN}` } };
const HEARTBEAT_MS = 300;

interface Cluster {
  server: RunningServer;
  client: RunClient;
  grpc: string;
  http: string;
  artifactsDir: string;
  dir: string;
  logs: Array<Record<string, unknown>>;
  agent(name: string, labels: Record<string, string>): Promise<RunningAgent>;
  close(): Promise<void>;
}

async function startCluster(dir: string, logRetentionMs?: number): Promise<Cluster> {
  const logs: Array<Record<string, unknown>> = [];
  const { server, store } = await startTestServer(`${dir}/state.db`, {
    serverId: "server-1",
    token: TOKEN,
    adminToken: ADMIN_TOKEN,
    heartbeatMs: HEARTBEAT_MS,
    secrets: { "cluster-secret": { env: "CLUSTER_SECRET" } },
    env: (name) => name === "CLUSTER_SECRET" ? "s3cr3t-value" : undefined,
    log: (fields) => logs.push(fields),
    logRetentionMs,
  });
  const artifactsDir = `${dir}/artifacts`;
  const agents: RunningAgent[] = [];
  const http = `http://127.0.0.1:${server.httpPort}`;
  const grpc = `127.0.0.1:${server.grpcPort}`;
  return {
    server,
    client: new RunClient([http], { token: ADMIN_TOKEN }),
    grpc,
    http,
    artifactsDir,
    dir,
    logs,
    async agent(name, labels) {
      const agent = await startAgent({
        servers: [grpc],
        token: TOKEN,
        agentId: name,
        labels,
        slots: 2,
        allowShell: true,
        stateDir: `${dir}/${name}`,
        artifacts: openLocalArtifactStore(artifactsDir),
        log: () => {},
      });
      agents.push(agent);
      return agent;
    },
    async close() {
      await Promise.allSettled(agents.map((agent) => agent.stop()));
      await server.close();
      await store.close();
    },
  };
}

async function finished(client: RunClient, runId: string) {
  for await (const _ of client.events(runId)) { /* until the run ends */ }
  return await client.run(runId);
}

const PIPELINE = `name: cluster-demo
secrets:
  TOKEN: cluster-secret
steps:
  make:
    backend: shell
    selector: { cloud: aws }
    run: echo "made on aws" > "$RUNNEL_OUTPUT_DATA_TXT"
    outputs: [data.txt]
  use:
    backend: shell
    selector: { cloud: gcp }
    secrets: [TOKEN]
    inputs: { data: make/data.txt }
    run: |
      echo "secret is $TOKEN"
      cat "$RUNNEL_INPUT_DATA"
`;

Deno.test("cluster: agents register, steps run where their selector says, logs stream masked, metrics check", async () => {
  await using box = await sandbox();
  const cluster = await startCluster(box.dir);
  try {
    await cluster.agent("worker-aws-1", { cloud: "aws", region: "us-east-1" });
    await cluster.agent("worker-gcp-1", { cloud: "gcp", region: "us-east1" });
    const state = await poll(async () => {
      const body = await (await fetch(`${cluster.http}/cluster-state`, AS_ADMIN)).json();
      return body.workers.length === 2 ? body : undefined;
    }, { what: "two workers online" });
    assert.equal(state.scheduler, "server-1");
    const aws = state.workers.find((w: { agentId: string }) => w.agentId === "worker-aws-1");
    assert.deepEqual(aws.labels, { cloud: "aws", region: "us-east-1" });
    assert.equal(aws.status, "online");
    assert.ok(
      aws.capabilities.some((c: { backend: string; available: boolean }) =>
        c.backend === "shell" && c.available
      ),
    );

    const { runId } = await cluster.client.submit(PIPELINE, "cluster.yaml", box.dir);
    const { run, steps } = await finished(cluster.client, runId);
    assert.equal(run.status, "succeeded", JSON.stringify(steps, null, 2));
    assert.equal(steps.make.attempts[0].worker, "worker-aws-1");
    assert.equal(steps.use.attempts[0].worker, "worker-gcp-1");
    // Exactly one recorded result per step.
    for (const step of Object.values(steps) as StepState[]) assert.equal(step.attempts.length, 1);

    let text = "";
    for await (const { event, data } of cluster.client.logs(runId, { step: "use" })) {
      if (event === "log") text += (data as { text: string }).text;
    }
    assert.match(text, /secret is \*\*\*/);
    assert.match(text, /made on aws/);
    assert.doesNotMatch(text, /s3cr3t/);

    const dag = await (await fetch(`${cluster.http}/api/runs/${runId}/mermaid`, AS_ADMIN)).text();
    assert.match(dag, /^flowchart TD/);
    assert.match(dag, /class s0 succeeded/);
    // The old run page sends browsers to the web UI's (tests/ui_test.ts drives it).
    const moved = await fetch(`${cluster.http}/runs/${runId}`, { redirect: "manual" });
    await moved.body?.cancel();
    assert.equal(moved.headers.get("location"), `/ui/runs/${runId}`);
    const page = await (await fetch(`${cluster.http}/ui/runs/${runId}`)).text();
    assert.match(page, /<title>Run /);
    // Served whole by the server: nothing from another origin, and the browser is told so.
    assert.ok(!/https?:\/\//.test(page), "the page names another origin");
    const served = await fetch(`${cluster.http}/ui/runs/${runId}`);
    await served.body?.cancel();
    assert.match(served.headers.get("content-security-policy") ?? "", /default-src 'none'/);

    const raft = await (await fetch(`${cluster.http}/raft-state`, AS_ADMIN)).json();
    assert.deepEqual(Object.keys(raft).sort(), [
      "commit_index",
      "leader",
      "node_id",
      "state",
      "term",
    ]);
    const metrics = await (await fetch(`${cluster.http}/metrics`, AS_ADMIN)).text();
    assert.match(metrics, /^runnel_steps_total\{backend="shell",outcome="succeeded"\} 2$/m);
    assert.match(metrics, /^runnel_workers_online 2$/m);
    assert.match(metrics, /^raft_term 1$/m);
    const promtool = new Deno.Command("promtool", {
      args: ["check", "metrics"],
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    });
    let checked: Deno.CommandOutput | undefined;
    try {
      const child = promtool.spawn();
      const writer = child.stdin.getWriter();
      await writer.write(new TextEncoder().encode(metrics));
      await writer.close();
      checked = await child.output();
    } catch (error) {
      if (Deno.env.get("CI") === "true") throw error;
      console.log(`%cpromtool not found; skipping the metrics lint: ${error}`, "color: yellow");
    }
    if (checked) {
      // promtool parses the whole exposition, then lints it. Its one lint is
      // about the seed's own metric name, which the seed fixes: anything
      // else is a problem.
      const said = new TextDecoder().decode(checked.stdout) +
        new TextDecoder().decode(checked.stderr);
      const problems = said.split("\n").filter((line) =>
        line.trim() &&
        line.trim() !==
          "raft_replication_latency_ms metric names should not contain abbreviated units"
      );
      assert.deepEqual(problems, [], said);
    }
  } finally {
    await cluster.close();
  }
});

Deno.test("cluster: a wrong join token is refused with a clear message and logged by the server", async () => {
  await using box = await sandbox();
  const cluster = await startCluster(box.dir);
  try {
    await assert.rejects(
      startAgent({
        servers: [cluster.grpc],
        token: "not-the-token",
        agentId: "intruder",
        stateDir: `${box.dir}/intruder`,
        artifacts: openLocalArtifactStore(cluster.artifactsDir),
        log: () => {},
      }),
      (error: unknown) =>
        error instanceof AgentRejectedError &&
        /refused this agent: wrong join token/.test(error.message),
    );
    assert.ok(
      cluster.logs.some((line) =>
        line.msg === "agent refused" && line.agent === "intruder" &&
        line.reason === "wrong join token"
      ),
    );
    const state = await (await fetch(`${cluster.http}/cluster-state`, AS_ADMIN)).json();
    assert.deepEqual(state.workers, []);
  } finally {
    await cluster.close();
  }
});

Deno.test("cluster: an agent SIGKILLed mid-step goes offline after 3 heartbeats; its step runs again elsewhere", async () => {
  await using box = await sandbox();
  const cluster = await startCluster(box.dir);
  let victim: Deno.ChildProcess | undefined;
  try {
    // The victim, a real process: it takes the step first (it is alone).
    const config = `${box.dir}/victim.json`;
    await Deno.writeTextFile(
      config,
      JSON.stringify({
        servers: [cluster.grpc],
        token: TOKEN,
        agentId: "victim",
        labels: { cloud: "aws" },
        allowShell: true,
        stateDir: `${box.dir}/victim`,
        artifactsDir: cluster.artifactsDir,
      }),
    );
    victim = new Deno.Command(Deno.execPath(), {
      args: ["run", ...CLI_PERMISSIONS, `${ROOT}/tests/fixtures/agent_main.ts`, config],
      stdout: "null",
      stderr: "null",
    }).spawn();
    await poll(async () => {
      const body = await (await fetch(`${cluster.http}/cluster-state`, AS_ADMIN)).json();
      return body.workers.length === 1 ? true : undefined;
    }, { what: "the victim online" });
    const { runId } = await cluster.client.submit(
      `name: lose-a-worker
steps:
  slow:
    backend: shell
    selector: { cloud: aws }
    run: |
      echo "start on $(hostname)"
      sleep 2
      echo done > "$RUNNEL_OUTPUT_OUT_TXT"
    outputs: [out.txt]
`,
      "lose.yaml",
      box.dir,
    );
    await poll(async () => {
      const { steps } = await cluster.client.run(runId);
      return steps.slow?.status === "running" ? true : undefined;
    }, { what: "the step running on the victim" });
    victim.kill("SIGKILL");
    await victim.status;
    const killedAt = Date.now();
    await cluster.agent("survivor", { cloud: "aws" });
    const { run, steps } = await finished(cluster.client, runId);
    assert.equal(run.status, "succeeded");
    assert.equal(steps.slow.attempts.length, 2);
    assert.equal(steps.slow.attempts[0].worker, "victim");
    assert.equal(steps.slow.attempts[0].result?.ok, false);
    assert.match(
      steps.slow.attempts[0].result && !steps.slow.attempts[0].result.ok
        ? steps.slow.attempts[0].result.message
        : "",
      /victim missed 3 heartbeats/,
    );
    assert.equal(steps.slow.attempts[1].worker, "survivor");
    const rescheduledAfter = (steps.slow.attempts[1].startedAt ?? 0) - killedAt;
    assert.ok(
      rescheduledAfter <= 3 * HEARTBEAT_MS + 1_000,
      `rescheduled ${rescheduledAfter} ms after the kill`,
    );
  } finally {
    try {
      victim?.kill("SIGKILL");
    } catch {
      // Already dead.
    }
    await cluster.close();
  }
});

Deno.test("cluster: the server restarts under its agents; they reconnect and the run finishes once", async () => {
  await using box = await sandbox();
  const store = openEmbeddedStore(`${box.dir}/state.db`);
  const options = (httpPort: number, grpcPort: number) => ({
    serverId: "server-1",
    store,
    election: standaloneElection(),
    http: { hostname: "127.0.0.1", port: httpPort },
    grpc: { address: `127.0.0.1:${grpcPort}` },
    token: TOKEN,
    adminToken: ADMIN_TOKEN,
    heartbeatMs: 1_000,
    log: () => {},
  });
  let server = await startServer(options(0, 0));
  const ports = [server.httpPort, server.grpcPort] as const;
  const agent = await startAgent({
    servers: [`127.0.0.1:${ports[1]}`],
    token: TOKEN,
    agentId: "steady",
    allowShell: true,
    stateDir: `${box.dir}/steady`,
    artifacts: openLocalArtifactStore(`${box.dir}/artifacts`),
    reconnect: { initialMs: 100, maxMs: 500 },
    log: () => {},
  });
  try {
    const client = new RunClient([`http://127.0.0.1:${ports[0]}`], { token: ADMIN_TOKEN });
    const { runId } = await client.submit(
      `name: restart
steps:
  first: { backend: shell, run: "sleep 1; echo one > $RUNNEL_OUTPUT_A", outputs: [a] }
  second: { backend: shell, inputs: { a: first/a }, run: cat "$RUNNEL_INPUT_A" }
`,
      "restart.yaml",
      box.dir,
    );
    await poll(async () => {
      const { steps } = await client.run(runId);
      return steps.first?.status === "running" ? true : undefined;
    }, { what: "first running" });
    await server.close();
    server = await startServer(options(ports[0], ports[1]));
    const { run, steps } = await finished(client, runId);
    assert.equal(run.status, "succeeded");
    assert.equal(steps.first.attempts.length, 1, "the step ran once across the restart");
    assert.equal(steps.second.attempts.length, 1);
    assert.ok(agent.events.some((event) => event.type === "disconnected"));
  } finally {
    await agent.stop();
    await server.close();
    await store.close();
  }
});

Deno.test("cluster: artifacts flow between agents through S3 (s3rver), and the aws CLI reads them", async () => {
  await using box = await sandbox();
  await using s3 = await startS3Server();
  const cluster = await startCluster(box.dir);
  const s3Store = () =>
    openS3ArtifactStore({
      endpoint: s3.endpoint,
      bucket: s3.bucket,
      region: s3.region,
      accessKey: s3.accessKey,
      secretKey: s3.secretKey,
    });
  const agents: RunningAgent[] = [];
  try {
    for (const [name, cloud] of [["s3-aws", "aws"], ["s3-gcp", "gcp"]]) {
      agents.push(
        await startAgent({
          servers: [cluster.grpc],
          token: TOKEN,
          agentId: name,
          labels: { cloud },
          allowShell: true,
          stateDir: `${box.dir}/${name}`,
          artifacts: await s3Store(),
          log: () => {},
        }),
      );
    }
    const { runId } = await cluster.client.submit(
      PIPELINE,
      "cluster.yaml",
      box.dir,
    );
    const { run, steps } = await finished(cluster.client, runId);
    assert.equal(run.status, "succeeded", JSON.stringify(steps, null, 2));
    const digest = steps.make.outputs?.["data.txt"]?.digest;
    assert.ok(digest);
    const aws = findAwsCli();
    if (!aws) {
      if (Deno.env.get("CI") === "true") throw new Error("Expected the aws CLI in CI");
      console.log("%caws CLI not found; skipping the cross-check", "color: yellow");
      return;
    }
    const listed = await runAws(aws, s3, ["s3", "ls", `s3://${s3.bucket}/`, "--recursive"]);
    assert.match(
      new TextDecoder().decode(listed.stdout),
      new RegExp(`blobs/sha256/${digest.slice("sha256:".length)}`),
    );
    const blob = await runAws(aws, s3, [
      "s3",
      "cp",
      `s3://${s3.bucket}/blobs/sha256/${digest.slice("sha256:".length)}`,
      "-",
    ]);
    assert.equal(new TextDecoder().decode(blob.stdout), "made on aws\n");
  } finally {
    await Promise.allSettled(agents.map((agent) => agent.stop()));
    await cluster.close();
  }
});

Deno.test("cluster CLI: submit --follow, runs, show, logs and cancel talk to a server; bad input exits 2", async () => {
  await using box = await sandbox();
  const cluster = await startCluster(box.dir);
  try {
    await cluster.agent("cli-aws", { cloud: "aws" });
    await cluster.agent("cli-gcp", { cloud: "gcp" });
    const file = await box.write("cluster.yaml", PIPELINE);
    // The admin makes a submit token; the rest of the session uses that.
    const created = await runCli(
      ["token", "create", "--role", "submit", "--name", "cli-test", "--server", cluster.http],
      { cwd: box.dir, env: { RUNNEL_API_TOKEN: ADMIN_TOKEN } },
    );
    assert.equal(created.code, 0, created.stderr);
    const submitToken = /^token\s+(rnl_\S+)$/m.exec(created.stdout)![1];
    const env = { CLUSTER_SECRET: "unused-here", RUNNEL_API_TOKEN: submitToken };
    const submitted = await runCli(["submit", file, "--server", cluster.http, "--follow"], {
      cwd: box.dir,
      env,
    });
    assert.equal(submitted.code, 0, submitted.stderr + submitted.stdout);
    assert.match(submitted.stdout, /succeeded make on cli-aws/);
    assert.match(submitted.stdout, /succeeded use on cli-gcp/);
    const runId = /^run (\S+)$/m.exec(submitted.stdout)![1];
    const runs = await runCli(["runs", "--server", cluster.http], { cwd: box.dir, env });
    assert.match(runs.stdout, new RegExp(`${runId}\\s+cluster-demo\\s+succeeded`));
    const show = await runCli(["show", runId, "--server", cluster.http], { cwd: box.dir, env });
    assert.match(show.stdout, /use\s+succeeded\s+1\s+\S+\s+cli-gcp/);
    const logs = await runCli(["logs", runId, "use", "--server", cluster.http], {
      cwd: box.dir,
      env,
    });
    assert.match(logs.stdout, /use │ secret is \*\*\*/);
    const cancel = await runCli(["cancel", runId, "--server", cluster.http], { cwd: box.dir, env });
    assert.match(cancel.stdout, /finished/);
    // In a directory of its own: the sandbox also holds the agents' state, which is no pipeline's.
    await Deno.mkdir(`${box.dir}/bad`);
    const broken = await box.write("bad/broken.yaml", "name: broken\nsteps:\n  a: { neds: [b] }\n");
    const refused = await runCli(["submit", broken, "--server", cluster.http], {
      cwd: box.dir,
      env,
    });
    assert.equal(refused.code, 2, refused.stderr);
    assert.match(refused.stderr, /broken\.yaml:3:\d+: unknown key "neds"/);
    const away = await runCli(["runs", "--server", "http://127.0.0.1:9"], { cwd: box.dir });
    assert.equal(away.code, 1);
    assert.match(away.stderr, /No server answered/);
    assert.doesNotMatch(away.stderr + refused.stderr, /\n\s+at /);
  } finally {
    await cluster.close();
  }
});

Deno.test("cluster: step logs leave the store when their retention ends", async () => {
  await using box = await sandbox();
  const cluster = await startCluster(box.dir, 1_500);
  try {
    await cluster.agent("logger", { cloud: "aws" });
    const { runId } = await cluster.client.submit(
      "name: chatty\nsteps:\n  talk: { backend: shell, run: echo hello }\n",
      "chatty.yaml",
      box.dir,
    );
    await finished(cluster.client, runId);
    let text = "";
    for await (const { event, data } of cluster.client.logs(runId)) {
      if (event === "log") text += (data as { text: string }).text;
    }
    assert.equal(text, "hello\n");
    await poll(async () => {
      let any = false;
      for await (const { event } of cluster.client.logs(runId)) any ||= event === "log";
      return any ? undefined : true;
    }, { what: "the logs to expire", timeoutMs: 15_000 });
  } finally {
    await cluster.close();
  }
});

Deno.test("cluster: the pipeline directory ships with the run; agents run deno steps from their copy", async () => {
  await using box = await sandbox();
  const cluster = await startCluster(box.dir);
  try {
    await cluster.agent("bundled", { cloud: "aws" });
    const project = `${box.dir}/project`;
    await box.write(
      "project/steps/lib.ts",
      "export function greeting(name: string): string { return `hello ${name}`; }\n",
    );
    await box.write(
      "project/steps/hello.ts",
      `import { greeting } from "./lib.ts";
export default (ctx: { outputs: Record<string, string> }) => {
  Deno.writeTextFileSync(ctx.outputs["greeting.txt"], greeting("cluster") + "\\n");
};
`,
    );
    const source = `name: shipped
steps:
  hello: { backend: deno, module: steps/hello.ts, outputs: [greeting.txt] }
  show: { backend: shell, inputs: { g: hello/greeting.txt }, run: cat "$RUNNEL_INPUT_G" }
`;
    await box.write("project/pipeline.yaml", source);
    const bundle = await collectBundle(project);
    assert.deepEqual(Object.keys(bundle.files).sort(), [
      "pipeline.yaml",
      "steps/hello.ts",
      "steps/lib.ts",
    ]);
    // The submitter's directory does not exist where the agent runs.
    const { runId } = await cluster.client.submit(
      source,
      "pipeline.yaml",
      "/nonexistent/project",
      bundle.files,
    );
    const { run, steps } = await finished(cluster.client, runId);
    assert.equal(run.status, "succeeded", JSON.stringify(steps, null, 2));
    let text = "";
    for await (const { event, data } of cluster.client.logs(runId, { step: "show" })) {
      if (event === "log") text += (data as { text: string }).text;
    }
    assert.equal(text, "hello cluster\n");
    const unpacked = await Array.fromAsync(Deno.readDir(`${box.dir}/bundled/bundles`));
    assert.equal(unpacked.length, 1, "one copy per digest");
    // A bundle whose paths leave its directory is refused with a plain message.
    const tampered = { ...bundle.files, "../escape.ts": "" };
    await assert.rejects(
      cluster.client.submit(source, "pipeline.yaml", "/x", tampered),
      /Expected relative paths inside the bundle, got "\.\.\/escape\.ts"/,
    );
  } finally {
    await cluster.close();
  }
});
