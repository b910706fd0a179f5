/**
 * The `kubernetes` backend against the API stand-in (`infra/kube/`), whose
 * pods are real containers of the local Docker engine, with artifacts
 * through a real S3-compatible server (s3rver).
 *
 * Needs Docker and openssl: with `CI=true` a missing engine fails every
 * test; otherwise they are skipped with the reason printed. One stand-in
 * and one s3rver serve the whole file; each test uses an agent id of its
 * own, and the last test stops both (every container they started gone).
 *
 * @module
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { loadPipeline, openLocalState, runPipeline } from "../mod.ts";
import { builtinPlugins, PluginHostPool } from "../backends/mod.ts";
import type { AttemptSpec, Execution } from "../backends/backend.ts";
import {
  checkBackendConformance,
  runToEnd,
  type ScratchOptions,
  scratchSpec,
} from "../backends/testing.ts";
import createKubernetesBackend from "../backends/kubernetes/mod.ts";
import { ensureBusyboxImage, ensureEnergyImage, ensureKubeHelperImage } from "../infra/images.ts";
import { kubeconfigText, type KubeStandIn, startKubeStandIn } from "../infra/kube/mod.ts";
import { poll, ROOT, runCli, sandbox, spawnCli, waitForLine } from "./_helpers.ts";
import { type S3Server, startS3Server } from "./_s3.ts";

const IN_CI = Deno.env.get("CI") === "true";
const MiB = 1024 * 1024;

async function dockerAvailable(): Promise<string | undefined> {
  try {
    const output = await new Deno.Command("docker", {
      args: ["version"],
      stdout: "null",
      stderr: "piped",
    })
      .output();
    return output.success ? undefined : new TextDecoder().decode(output.stderr).trim();
  } catch (error) {
    return (error as Error).message;
  }
}

const missing = await dockerAvailable();
if (missing && !IN_CI) {
  console.log(
    `%cskipping the Kubernetes backend tests: Docker is not running (${missing})`,
    "color: yellow",
  );
}

const savedEnv = new Map<string, string | undefined>();
let fixture: Promise<{ kube: KubeStandIn; s3: S3Server; busybox: string }> | undefined;

/** The shared stand-in and s3rver, started by the first test that needs them. */
function cluster() {
  return fixture ??= (async () => {
    const [busybox] = await Promise.all([
      ensureBusyboxImage(),
      ensureKubeHelperImage(),
      ensureEnergyImage(),
    ]);
    const [kube, s3] = await Promise.all([
      startKubeStandIn({ nodeLabels: { pool: "general" } }),
      startS3Server({ bucket: "runnel-kube" }),
    ]);
    // The runner's environment names the cluster and the store (restored by the last test).
    const values: Record<string, string> = {
      KUBECONFIG: kube.kubeconfig,
      RUNNEL_KUBE_S3_ENDPOINT: s3.endpoint,
      RUNNEL_KUBE_S3_BUCKET: s3.bucket,
      AWS_ACCESS_KEY_ID: s3.accessKey,
      AWS_SECRET_ACCESS_KEY: s3.secretKey,
    };
    for (const [name, value] of Object.entries(values)) {
      savedEnv.set(name, Deno.env.get(name));
      Deno.env.set(name, value);
    }
    return { kube, s3, busybox };
  })();
}

/** A test that needs the stand-in: skipped without Docker, except in CI where it fails. */
function kubeTest(
  name: string,
  fn: (context: { kube: KubeStandIn; s3: S3Server; busybox: string }) => Promise<void>,
): void {
  Deno.test({
    name: `kubernetes: ${name}`,
    ignore: missing !== undefined && !IN_CI,
    // The shared stand-in's watches and servers outlive each test.
    sanitizeOps: false,
    sanitizeResources: false,
    async fn() {
      if (missing) throw new Error(`Expected Docker in CI: ${missing}`);
      await fn(await cluster());
    },
  });
}

let agents = 0;
/** A scratch attempt with an agent id of its own. */
function attempt(config: Record<string, unknown>, options: ScratchOptions = {}) {
  const agentId = `kube-test-${++agents}-${crypto.randomUUID().slice(0, 6)}`;
  return scratchSpec(config, {
    ...options,
    spec: { agentId, attemptId: `${agentId}/step/1`, ...options.spec },
  });
}

function jobNameOf(execution: Execution): string {
  return execution.handle.split("/")[1];
}

/** Reads logs until `text` appears; the rest keeps flowing into the returned promise. */
function readUntil(
  execution: Execution,
  text: string,
): { seen: Promise<void>; all: Promise<string> } {
  const seen = Promise.withResolvers<void>();
  const all = (async () => {
    const decoder = new TextDecoder();
    let output = "";
    for await (const chunk of execution.logs) {
      output += decoder.decode(chunk.data, { stream: true });
      if (output.includes(text)) seen.resolve();
    }
    seen.reject(new Error(`Expected "${text}" in the logs, got ${JSON.stringify(output)}`));
    return output;
  })();
  return { seen: seen.promise, all };
}

kubeTest("conformance through a sandboxed plugin host", async ({ busybox }) => {
  const scratchRoot = await Deno.makeTempDir();
  const pool = new PluginHostPool({
    plugins: builtinPlugins(),
    context: { scratchRoot, agentId: "kube-conformance" },
  });
  try {
    const report = await checkBackendConformance({
      backend: () => pool.backend("kubernetes"),
      echo: { config: { image: busybox, run: "echo hello" }, stdout: "hello\n" },
      long: { config: { image: busybox, run: "sleep 60" } },
      cancelGraceMs: 1_000,
    });
    assert.deepEqual(report.skipped, []);
    assert.equal(report.passed.length, 6, report.passed.join(", "));
  } finally {
    await pool.close();
    await Deno.remove(scratchRoot, { recursive: true });
  }
});

kubeTest(
  "the energy example's analyze step runs as a Job, its artifacts through S3",
  async ({ kube }) => {
    await using box = await sandbox();
    const local = await runPipeline(await loadPipeline(`${ROOT}/examples/energy/pipeline.yaml`), {
      stateDir: `${box.dir}/local`,
    });
    assert.equal(local.status, "succeeded", JSON.stringify(local.steps, null, 2));
    kube.clearRequests();
    const plan = await loadPipeline(`${ROOT}/examples/energy/pipeline.kubernetes.yaml`);
    const summary = await runPipeline(plan, { stateDir: `${box.dir}/kube` });
    assert.equal(summary.status, "succeeded", JSON.stringify(summary.steps, null, 2));
    assert.ok(
      kube.requests.some((request) => request.method === "POST" && request.path.endsWith("/jobs")),
      "analyze was created as a Job",
    );
    // The same input gives the same analysis, byte for byte, whichever backend ran it.
    const digests: string[] = [];
    for (const [dir, runId] of [["local", local.runId], ["kube", summary.runId]]) {
      const state = await openLocalState(`${box.dir}/${dir}`);
      try {
        const record = await state.artifacts.get(runId, "analyze", "output1.json");
        assert.ok(record, `output1.json recorded (${dir})`);
        const out = `${box.dir}/${dir}-output1.json`;
        await state.artifacts.materialize(record, out);
        const bytes = await Deno.readFile(out);
        assert.equal(`sha256:${createHash("sha256").update(bytes).digest("hex")}`, record.digest);
        digests.push(record.digest);
        const report = await state.artifacts.get(runId, "report", "energy_report.csv");
        assert.ok(report, `the report step read the Job's output (${dir})`);
      } finally {
        await state.close();
      }
    }
    assert.equal(digests[0], digests[1]);
  },
);

kubeTest("a failing exit code fails the step with that code", async ({ busybox }) => {
  await using spec = await attempt({ image: busybox, run: "echo before; exit 7" });
  const { status, stdout } = await runToEnd(await createKubernetesBackend().start(spec));
  assert.deepEqual(status, {
    exitCode: 7,
    errorClass: "application",
    message: "step exited with code 7",
  });
  assert.equal(stdout, "before\n");
});

kubeTest("an OOM kill names the memory limit", async ({ busybox }) => {
  await using spec = await attempt(
    { image: busybox, run: "dd if=/dev/zero of=/dev/null bs=96M count=1" },
    { spec: { resources: { memoryBytes: 16 * MiB } } },
  );
  const { status } = await runToEnd(await createKubernetesBackend().start(spec));
  assert.equal(status.errorClass, "application", JSON.stringify(status));
  assert.equal(status.message, "killed: memory limit 16 MiB exceeded");
});

kubeTest("a missing image fails the step with the kubelet's words, not a hang", async () => {
  await using spec = await attempt({ image: "registry.invalid/nothing:1.0", run: "true" });
  const { status } = await runToEnd(await createKubernetesBackend().start(spec));
  assert.equal(status.errorClass, "infrastructure", JSON.stringify(status));
  assert.match(status.message!, /ErrImagePull|ImagePullBackOff/);
  assert.match(status.message!, /registry\.invalid\/nothing:1\.0/);
});

kubeTest(
  "a node selector nothing matches fails as unschedulable after its timeout",
  async ({ busybox }) => {
    await using spec = await attempt({
      image: busybox,
      run: "true",
      "node-selector": { pool: "gpu" },
      "unschedulable-timeout": "1s",
    });
    const { status } = await runToEnd(await createKubernetesBackend().start(spec));
    assert.equal(status.errorClass, "infrastructure", JSON.stringify(status));
    assert.match(status.message!, /Unschedulable: 0\/1 nodes are available/);
  },
);

kubeTest(
  "a deadline (activeDeadlineSeconds from timeout) is a timeout",
  async ({ kube, busybox }) => {
    await using spec = await attempt(
      { image: busybox, run: "echo started; sleep 30" },
      { spec: { timeoutMs: 1_000 } },
    );
    const backend = createKubernetesBackend();
    const execution = await backend.start(spec);
    const job = kube.get("jobs", "default", jobNameOf(execution));
    assert.equal(job?.spec.activeDeadlineSeconds, 1);
    const { status, stdout } = await runToEnd(execution);
    assert.equal(status.errorClass, "timeout", JSON.stringify(status));
    assert.match(status.message!, /DeadlineExceeded|deadline/);
    assert.equal(stdout, "started\n");
  },
);

kubeTest(
  "cancel mid-run deletes the Job, its pods and its Secret, and returns at once",
  async ({ kube, busybox }) => {
    await using spec = await attempt(
      { image: busybox, run: "echo running; sleep 60" },
      { spec: { env: { TOKEN: "hunter2" } } },
    );
    const execution = await createKubernetesBackend().start(spec);
    const name = jobNameOf(execution);
    const logs = readUntil(execution, "running");
    // A log follow and the watches are open now.
    await logs.seen;
    assert.ok(kube.get("secrets", "default", name), "the Secret exists while the step runs");
    const started = performance.now();
    await execution.cancel(0);
    const status = await execution.wait();
    const elapsed = performance.now() - started;
    assert.ok(elapsed < 1_000, `cancel returned in ${elapsed.toFixed(0)} ms`);
    assert.equal(status.errorClass, "cancelled");
    await logs.all;
    assert.equal(kube.get("jobs", "default", name), undefined, "the Job is gone");
    assert.equal(kube.get("secrets", "default", name), undefined, "the Secret is gone");
    await poll(
      () => kube.list("pods", `batch.kubernetes.io/job-name=${name}`).length === 0 || undefined,
      {
        what: "the Job's pods to be gone",
      },
    );
    const containers = await kube.containers();
    await execution.cleanup();
    assert.ok(containers.length >= 0);
  },
);

kubeTest(
  "cancel while only the watches are open (a pod waiting to be scheduled) returns at once",
  async ({ kube, busybox }) => {
    await using spec = await attempt({
      image: busybox,
      run: "true",
      "node-selector": { pool: "gpu" },
    });
    const execution = await createKubernetesBackend().start(spec);
    const name = jobNameOf(execution);
    await poll(() => {
      const [pod] = kube.list("pods", `batch.kubernetes.io/job-name=${name}`);
      return pod?.status?.conditions?.some((c: { reason?: string }) =>
        c.reason === "Unschedulable"
      ) ||
        undefined;
    }, { what: "the pod to be unschedulable" });
    const started = performance.now();
    await execution.cancel(0);
    const status = await execution.wait();
    const elapsed = performance.now() - started;
    assert.ok(elapsed < 1_000, `cancel returned in ${elapsed.toFixed(0)} ms`);
    assert.equal(status.errorClass, "cancelled");
    assert.ok(
      !kube.requests.some((r) => r.follow && r.path.includes(name)),
      "no log follow was ever opened",
    );
    await execution.cleanup();
    assert.equal(kube.get("jobs", "default", name), undefined);
  },
);

kubeTest(
  "secrets reach the step from the Secret, never as values in the Job or pod spec",
  async ({ kube, busybox }) => {
    const secret = "s3cr3t-value-9f1c";
    await using spec = await attempt(
      { image: busybox, run: 'echo "$API_KEY" | sha256sum' },
      { spec: { env: { API_KEY: secret } } },
    );
    const execution = await createKubernetesBackend().start(spec);
    const name = jobNameOf(execution);
    const digest = createHash("sha256").update(`${secret}\n`).digest("hex");
    const logs = readUntil(execution, digest);
    const status = await execution.wait();
    assert.deepEqual(status, { exitCode: 0 });
    await logs.seen;
    const job = kube.get("jobs", "default", name)!;
    const pods = kube.list("pods", `batch.kubernetes.io/job-name=${name}`);
    assert.equal(pods.length, 1);
    for (const object of [job, ...pods]) {
      assert.ok(!JSON.stringify(object).includes(secret), `${object.kind} holds no secret value`);
    }
    const env = job.spec.template.spec.containers[0].env as Array<Record<string, unknown>>;
    assert.deepEqual(env.find((variable) => variable.name === "API_KEY"), {
      name: "API_KEY",
      valueFrom: { secretKeyRef: { name, key: "API_KEY" } },
    });
    const stored = kube.get("secrets", "default", name)!;
    assert.equal(stored.metadata.ownerReferences?.[0].uid, job.metadata.uid, "owned by the Job");
    await execution.cleanup();
    await poll(() => kube.get("secrets", "default", name) === undefined || undefined, {
      what: "the Secret to go with its Job",
    });
  },
);

kubeTest(
  "an evicted pod fails the step as infrastructure; the Job does not count it",
  async ({ kube, busybox }) => {
    await using spec = await attempt({ image: busybox, run: "echo up; sleep 60" });
    const execution = await createKubernetesBackend().start(spec);
    const name = jobNameOf(execution);
    const logs = readUntil(execution, "up");
    await logs.seen;
    const [pod] = kube.list("pods", `batch.kubernetes.io/job-name=${name}`);
    kube.faults.evict("default", pod.metadata.name!);
    const status = await execution.wait();
    assert.equal(status.errorClass, "infrastructure", JSON.stringify(status));
    assert.match(status.message!, /disrupted \(EvictionByEvictionAPI\)/);
    assert.equal(
      kube.get("jobs", "default", name)?.status?.failed ?? 0,
      0,
      "not the step's failure",
    );
    await execution.cleanup();
    await logs.all;
  },
);

kubeTest(
  "transient API errors (reset, 5xx, leader changed, 429 Retry-After) are retried",
  async ({ kube, busybox }) => {
    await using spec = await attempt({ image: busybox, run: "echo through" }, {
      spec: { env: { MODE: "x" } },
    });
    // The create is carried out, then the connection breaks: the retry meets
    // 409 AlreadyExists and takes the Job it made (same attempt id).
    kube.faults.failNext({
      reset: true,
      status: 0,
      message: "connection reset",
      match: ({ method, path }) => method === "POST" && path.endsWith("/jobs"),
    });
    kube.faults.failNext({
      status: 500,
      message: "etcdserver: leader changed",
      count: 2,
      match: ({ method, path }) => method === "POST" && path.endsWith("/jobs"),
    });
    kube.faults.failNext({
      status: 429,
      message: "Too many requests, please try again later.",
      retryAfterSeconds: 1,
      match: ({ method, path }) => method === "POST" && path.endsWith("/secrets"),
    });
    kube.faults.failNext({
      status: 504,
      message: "etcdserver: request timed out",
      match: ({ path, watch }) => path.endsWith("/pods") && !watch,
    });
    kube.faults.failNext({
      status: 503,
      message: "the server is currently unable to handle the request",
      match: ({ path }) => path.endsWith("/log"),
    });
    const execution = await createKubernetesBackend().start(spec);
    const jobs = kube.list("jobs", `runnel.dev/agent=${spec.agentId}`);
    assert.deepEqual(jobs.map((job) => job.metadata.name), [jobNameOf(execution)], "one Job");
    const { status, stdout } = await runToEnd(execution);
    assert.deepEqual(status, { exitCode: 0 });
    assert.equal(stdout, "through\n");
  },
);

kubeTest(
  "a watch answered 410 Expired re-lists and the step still completes",
  async ({ kube, busybox }) => {
    await using spec = await attempt({ image: busybox, run: "echo one; sleep 1; echo two" });
    const execution = await createKubernetesBackend().start(spec);
    const logs = readUntil(execution, "one");
    await logs.seen;
    const lists = () =>
      kube.requests.filter((r) => r.path.endsWith("/jobs") && r.method === "GET" && !r.watch)
        .length;
    const before = lists();
    kube.faults.expire();
    assert.ok(kube.faults.dropWatches() >= 2, "the job and pod watches were open");
    const status = await execution.wait();
    assert.deepEqual(status, { exitCode: 0 });
    assert.equal(await logs.all, "one\ntwo\n");
    assert.ok(lists() > before, "the jobs were listed again after the 410");
    await execution.cleanup();
  },
);

kubeTest(
  "a dropped log follow resumes from the last timestamp without a duplicated line",
  async ({ kube, busybox }) => {
    await using spec = await attempt({
      image: busybox,
      run:
        "i=1; while [ $i -le 40 ]; do echo line $i; i=$((i+1)); [ $i = 11 ] && sleep 1; done; sleep 0.5",
    });
    const execution = await createKubernetesBackend().start(spec);
    const logs = readUntil(execution, "line 10\n");
    await logs.seen;
    // Lines 1–10 were written within the same second as what follows the drop.
    assert.ok(kube.faults.dropLogFollows() >= 1, "a follow was open");
    const status = await execution.wait();
    assert.deepEqual(status, { exitCode: 0 });
    const lines = (await logs.all).trim().split("\n");
    assert.deepEqual(lines, Array.from({ length: 40 }, (_, i) => `line ${i + 1}`));
    const follows = kube.requests.filter((r) => r.follow && r.path.includes(jobNameOf(execution)));
    assert.ok(follows.length >= 2, "the follow was resumed");
    await execution.cleanup();
  },
);

kubeTest(
  "an agent SIGKILLed mid-step re-attaches after restart and collects the outputs",
  async ({ kube, busybox }) => {
    await using spec = await attempt({
      image: busybox,
      run: 'echo started; sleep 2; echo finished; echo 42 > "$RUNNEL_OUTPUT_ANSWER_TXT"',
    }, { spec: { outputs: ["answer.txt"] } });
    const specJson = JSON.stringify({ ...spec, remove: undefined });
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "--allow-read",
        "--allow-write",
        "--allow-net",
        "--allow-env",
        `--lock=${ROOT}/deno.lock`,
        `${ROOT}/tests/kube/agent.ts`,
        specJson,
      ],
      stdout: "piped",
      stderr: "piped",
      env: { NO_COLOR: "1" },
    }).spawn();
    const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
    let line = "";
    while (!line.includes("\n")) {
      const { value, done } = await reader.read();
      if (done) break;
      line += value;
    }
    const { handle } = JSON.parse(line.trim());
    child.kill("SIGKILL");
    await child.status;
    await reader.cancel().catch(() => {});
    await child.stderr.cancel().catch(() => {});
    const name = handle.split("/")[1];
    assert.ok(kube.get("jobs", "default", name), "the Job outlives its agent");
    const restarted = createKubernetesBackend();
    const found = await restarted.recover({ agentId: spec.agentId, keep: [spec.attemptId] });
    assert.deepEqual(found.map((entry) => entry.attemptId), [spec.attemptId]);
    const { status, stdout } = await runToEnd(found[0].execution);
    assert.deepEqual(status, { exitCode: 0 });
    assert.match(stdout, /finished\n$/);
    assert.equal(await Deno.readTextFile(`${spec.outputsDir}/answer.txt`), "42\n");
    assert.equal(kube.get("jobs", "default", name), undefined, "cleaned up");
  },
);

kubeTest("recover reaps the Jobs of this agent that are not kept", async ({ kube, busybox }) => {
  await using spec = await attempt({ image: busybox, run: "sleep 60" });
  const execution = await createKubernetesBackend().start(spec);
  const name = jobNameOf(execution);
  const found = await createKubernetesBackend().recover({ agentId: spec.agentId, keep: [] });
  assert.deepEqual(found, []);
  assert.equal(kube.get("jobs", "default", name), undefined, "the orphan Job was deleted");
  const status = await execution.wait();
  assert.equal(status.errorClass, "infrastructure", JSON.stringify(status));
  await execution.cleanup();
});

kubeTest(
  "a kubeconfig with a client certificate (no token) authenticates; none is refused",
  async ({ kube, busybox }) => {
    await using box = await sandbox();
    const certificate = await box.write(
      "cert.kubeconfig",
      kubeconfigText({ server: kube.server, caPem: kube.caPem, client: kube.client }),
    );
    const anonymous = await box.write(
      "anonymous.kubeconfig",
      kubeconfigText({ server: kube.server, caPem: kube.caPem }),
    );
    const previous = Deno.env.get("KUBECONFIG");
    try {
      Deno.env.set("KUBECONFIG", certificate);
      await using spec = await attempt({ image: busybox, run: "echo over mTLS" });
      const { status, stdout } = await runToEnd(await createKubernetesBackend().start(spec));
      assert.deepEqual(status, { exitCode: 0 });
      assert.equal(stdout, "over mTLS\n");
      Deno.env.set("KUBECONFIG", anonymous);
      await using refused = await attempt({ image: busybox, run: "true" });
      const denied = await runToEnd(await createKubernetesBackend().start(refused));
      assert.equal(denied.status.errorClass, "permission", JSON.stringify(denied.status));
      assert.match(denied.status.message!, /Unauthorized/);
    } finally {
      Deno.env.set("KUBECONFIG", previous!);
    }
  },
);

kubeTest(
  "runnel run --kubeconfig: a pipeline with a kubernetes step, its secret masked",
  async ({ kube, busybox }) => {
    await using box = await sandbox();
    const pipeline = await box.write(
      "pipeline.yaml",
      [
        "name: kube-cli",
        "secrets:",
        "  TOKEN: { env: KUBE_TEST_TOKEN }",
        "steps:",
        "  greet:",
        "    backend: kubernetes",
        `    image: ${busybox}`,
        '    run: echo "hello from a pod, token $TOKEN"',
        "    secrets: [TOKEN]",
        "",
      ].join("\n"),
    );
    const result = await runCli(
      ["run", pipeline, "--kubeconfig", kube.kubeconfig, "--logs"],
      {
        cwd: box.dir,
        // The flag, not the environment, names the cluster.
        env: { KUBECONFIG: "/nonexistent/kubeconfig", KUBE_TEST_TOKEN: "tok-5e1f9a" },
      },
    );
    assert.equal(result.code, 0, result.stdout + result.stderr);
    assert.match(result.stdout + result.stderr, /hello from a pod, token \*\*\*/);
    assert.ok(!(result.stdout + result.stderr).includes("tok-5e1f9a"), "the secret is masked");
  },
);

kubeTest(
  "runnel run SIGKILLed mid-step: resume re-attaches to the running Job, not a second one",
  async ({ kube, busybox }) => {
    await using box = await sandbox();
    const file = await box.write(
      "pipeline.yaml",
      [
        "name: kube-recover",
        "steps:",
        "  slow:",
        "    backend: kubernetes",
        `    image: ${busybox}`,
        "    run: |",
        "      echo started",
        "      sleep 2",
        '      echo finished > "$RUNNEL_OUTPUT_OUT_TXT"',
        "    outputs: [out.txt]",
        "  after:",
        "    backend: shell",
        "    inputs: { out: slow/out.txt }",
        '    run: cat "$RUNNEL_INPUT_OUT"',
        "",
      ].join("\n"),
    );
    const flags = ["--state-dir", box.stateDir, "--kubeconfig", kube.kubeconfig];
    const { child, lines } = spawnCli(["run", file, ...flags, "--json"], { cwd: box.dir });
    const first = JSON.parse(await waitForLine(lines, (line) => line.includes('"type":"run"')));
    const runId: string = first.runId;
    await waitForLine(lines, (line) => line.includes('"slow"') && line.includes('"started'));
    const jobsOfRun = () => kube.list("jobs", `runnel.dev/run=${runId}`);
    await poll(() => jobsOfRun().length === 1 || undefined, { what: "the step's Job" });
    child.kill("SIGKILL");
    await child.status;
    await child.stdout.cancel().catch(() => {});
    await child.stderr.cancel().catch(() => {});
    assert.equal(jobsOfRun().length, 1, "the Job outlives the runner");

    const resumed = await runCli(["resume", runId, ...flags, "--logs"], { cwd: box.dir });
    assert.equal(resumed.code, 0, resumed.stderr + resumed.stdout);
    assert.match(resumed.stdout, /after │ finished/);
    const show = await runCli(["show", runId, "--state-dir", box.stateDir, "--json"], {
      cwd: box.dir,
    });
    const slow = JSON.parse(show.stdout).steps.slow;
    assert.equal(slow.status, "succeeded");
    assert.equal(slow.attempts.length, 1, "re-attached, not started again");
    assert.deepEqual(jobsOfRun(), [], "the re-attached Job was removed");
  },
);

Deno.test({
  name: "kubernetes: stop the stand-in and s3rver (every container gone)",
  ignore: missing !== undefined && !IN_CI,
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    if (!fixture) return;
    const { kube, s3 } = await fixture;
    const containers = await kube.containers();
    await kube.stop();
    await s3.stop();
    for (const [name, value] of savedEnv) {
      if (value === undefined) Deno.env.delete(name);
      else Deno.env.set(name, value);
    }
    const left = await new Deno.Command("docker", {
      args: ["ps", "-aq", ...containers.flatMap((id) => ["--filter", `id=${id}`])],
      stdout: "piped",
    }).output();
    assert.equal(containers.length === 0 ? "" : new TextDecoder().decode(left.stdout).trim(), "");
  },
});

// Keep AttemptSpec imported for readers of the helper's signature.
export type { AttemptSpec };
