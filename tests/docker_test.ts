/**
 * The `docker` backend against the real daemon, used directly (in process).
 *
 * Needs Docker: with `CI=true` a missing daemon fails every test; otherwise
 * the tests are skipped with the reason printed. Images are built offline
 * from this host's binaries (`infra/images.ts`). Every test labels its
 * containers with its own agent id and removes them at the end.
 *
 * @module
 */

import assert from "node:assert/strict";
import { connectDocker } from "../backends/docker/_dockerode.ts";
import { describeEndpoint, dockerEndpoint } from "../backends/docker/manifest.ts";
import { BUSINESS_EXIT_CODE } from "../core/model.ts";
import { loadPipeline } from "../core/load.ts";
import { type AttemptSpec, type Execution, isSuccess } from "../backends/backend.ts";
import {
  checkBackendConformance,
  runToEnd,
  type ScratchOptions,
  scratchSpec,
} from "../backends/testing.ts";
import createDockerBackend, {
  DuplicateAttemptError,
  ImageMissingError,
  validateDockerConfig,
} from "../backends/docker/mod.ts";
import { ensureBusyboxImage, ensureDenoImage } from "../infra/images.ts";
import { ROOT } from "./_helpers.ts";

const MiB = 1024 * 1024;
const IN_CI = Deno.env.get("CI") === "true";

const backend = createDockerBackend();
const fingerprint = await backend.fingerprint();
const BUSYBOX = fingerprint.available ? await ensureBusyboxImage() : "runnel/busybox:local";
if (!fingerprint.available && !IN_CI) {
  console.log(`%cskipping the Docker tests: ${fingerprint.detail}`, "color: yellow");
}
const endpoint = dockerEndpoint();
/** A client of its own, for what the tests check behind the backend's back. */
const docker = connectDocker(
  endpoint.kind === "socket"
    ? { socketPath: endpoint.socketPath }
    : { host: endpoint.host, port: endpoint.port, protocol: "http" },
);

/** A test that needs Docker: skipped without it, except in CI where it fails. */
function dockerTest(name: string, fn: (t: Deno.TestContext) => Promise<void>): void {
  Deno.test({
    name: `docker: ${name}`,
    ignore: !fingerprint.available && !IN_CI,
    async fn(t) {
      if (!fingerprint.available) throw new Error(`Expected Docker in CI: ${fingerprint.detail}`);
      await fn(t);
    },
  });
}

/** A fresh agent id, so that tests never see each other's containers. */
function newAgent(): string {
  return `test-${crypto.randomUUID().slice(0, 8)}`;
}

/** A scratch attempt of agent `agentId` with a unique attempt id. */
function attempt(
  agentId: string,
  config: Record<string, unknown>,
  options: ScratchOptions = {},
): ReturnType<typeof scratchSpec> {
  const attemptId = `${agentId}/${options.spec?.stepId ?? "step"}/${
    crypto.randomUUID().slice(0, 6)
  }`;
  return scratchSpec(config, { ...options, spec: { agentId, attemptId, ...options.spec } });
}

/** Removes every container an agent id left. */
async function reap(agentId: string): Promise<void> {
  const leftovers = await docker.listContainers({
    all: true,
    filters: { label: [`runnel.agent=${agentId}`] },
  });
  await Promise.all(
    leftovers.map((info) => docker.getContainer(info.Id).remove({ force: true, v: true })),
  );
}

/** Runs a busybox step of a fresh agent to its end; returns its status and output. */
async function runStep(config: Record<string, unknown>, options: ScratchOptions = {}) {
  const agentId = newAgent();
  const spec = await attempt(agentId, { image: BUSYBOX, ...config }, options);
  try {
    const result = await runToEnd(await backend.start(spec));
    return { ...result, outputs: await readOutputs(spec) };
  } finally {
    await reap(agentId);
    await spec.remove();
  }
}

async function readOutputs(spec: AttemptSpec): Promise<Record<string, string>> {
  const outputs: Record<string, string> = {};
  for await (const entry of Deno.readDir(spec.outputsDir)) {
    outputs[entry.name] = await Deno.readTextFile(`${spec.outputsDir}/${entry.name}`);
  }
  return outputs;
}

async function containerExists(id: string): Promise<boolean> {
  try {
    await docker.getContainer(id).inspect();
    return true;
  } catch (error) {
    if ((error as { statusCode?: number }).statusCode === 404) return false;
    throw error;
  }
}

dockerTest("fingerprint names the daemon, its socket and platform", () => {
  assert.equal(fingerprint.available, true);
  const where = describeEndpoint(endpoint);
  assert.ok(
    fingerprint.detail.startsWith(`Docker ${fingerprint.version} at ${where} (linux/`),
    fingerprint.detail,
  );
  assert.ok(fingerprint.version);
  return Promise.resolve();
});

dockerTest("stdout and stderr arrive apart, labels are set", async () => {
  const agentId = newAgent();
  const spec = await attempt(agentId, {
    image: BUSYBOX,
    run: "echo out; echo err >&2; echo out2",
  }, { spec: { stepId: "echo", attempt: 3 } });
  try {
    const execution = await backend.start(spec);
    const info = await docker.getContainer(execution.handle).inspect();
    const labels = Object.entries(info.Config.Labels ?? {}).filter(([key]) =>
      key !== "runnel.content" // the image's own label, inherited
    );
    assert.deepEqual(Object.fromEntries(labels), {
      "runnel.managed": "true",
      "runnel.run": "run1",
      "runnel.step": "echo",
      "runnel.attempt": "3",
      "runnel.attempt-id": spec.attemptId,
      "runnel.agent": agentId,
    });
    assert.equal(info.HostConfig.AutoRemove, false);
    const { status, stdout, stderr } = await runToEnd(execution);
    assert.ok(isSuccess(status), JSON.stringify(status));
    assert.equal(stdout, "out\nout2\n");
    assert.equal(stderr, "err\n");
    assert.equal(await containerExists(execution.handle), false, "cleanup removes the container");
    await execution.cleanup(); // idempotent
  } finally {
    await reap(agentId);
    await spec.remove();
  }
});

dockerTest("env and secrets reach the step, RUNNEL_* name container paths", async () => {
  const { status, stdout } = await runStep(
    {
      run: 'echo "$GREETING $TOKEN $RUNNEL_STEP $RUNNEL_INPUTS $RUNNEL_INPUT_DATA ' +
        '$RUNNEL_OUTPUTS $RUNNEL_OUTPUT_OUT_TXT $1"; touch "$RUNNEL_OUTPUT_OUT_TXT"',
      args: ["first-arg"],
    },
    {
      inputs: { data: "x" },
      spec: { stepId: "env", outputs: ["out.txt"], env: { GREETING: "hello", TOKEN: "s3cr3t" } },
    },
  );
  assert.ok(isSuccess(status), JSON.stringify(status));
  assert.equal(
    stdout,
    "hello s3cr3t env /runnel/in /runnel/in/data /runnel/out /runnel/out/out.txt first-arg\n",
  );
});

dockerTest("inputs are read-only, outputs are collected", async () => {
  const { status, stdout, outputs } = await runStep(
    {
      run: 'wc -l < "$RUNNEL_INPUT_DATA" > "$RUNNEL_OUTPUT_COUNT_TXT"; ' +
        'if echo x >> "$RUNNEL_INPUT_DATA"; then echo writable; else echo read-only; fi',
    },
    { inputs: { data: "1\n2\n3\n" }, spec: { outputs: ["count.txt"] } },
  );
  assert.ok(isSuccess(status), JSON.stringify(status));
  assert.equal(stdout, "read-only\n");
  assert.deepEqual(outputs, { "count.txt": "3\n" });
});

dockerTest("a missing declared output is an application error", async () => {
  const { status } = await runStep({ run: "true" }, { spec: { outputs: ["summary.json"] } });
  assert.equal(status.exitCode, 0);
  assert.equal(status.errorClass, "application");
  assert.equal(status.message, 'step did not write declared output "summary.json"');
});

dockerTest("exit 65 is a business error, exit 3 an application error", async () => {
  const business = await runStep({ run: `exit ${BUSINESS_EXIT_CODE}` });
  assert.equal(business.status.exitCode, BUSINESS_EXIT_CODE);
  assert.equal(business.status.errorClass, "business");
  const application = await runStep({ run: "exit 3" });
  assert.equal(application.status.exitCode, 3);
  assert.equal(application.status.errorClass, "application");
  assert.equal(application.status.message, "step exited with code 3");
});

dockerTest("no network by default, a bridge with network: true", async () => {
  const isolated = await runStep({ run: "ls /sys/class/net" });
  assert.equal(isolated.stdout, "lo\n");
  const connected = await runStep({ run: "ls /sys/class/net", network: true });
  assert.match(connected.stdout, /^eth0$/m);
});

dockerTest("a non-root user still writes its outputs", async () => {
  const { status, stdout, outputs } = await runStep(
    { run: 'id -u; cat "$RUNNEL_INPUT_DATA" > "$RUNNEL_OUTPUT_OUT_TXT"', user: "65534" },
    { inputs: { data: "from the input\n" }, spec: { outputs: ["out.txt"] } },
  );
  assert.ok(isSuccess(status), JSON.stringify(status));
  assert.equal(stdout, "65534\n");
  assert.deepEqual(outputs, { "out.txt": "from the input\n" });
});

dockerTest("going past the memory limit is an application error naming the limit", async () => {
  const { status } = await runStep(
    // dd's block buffer alone is 200 MiB: the OOM killer ends it at once.
    { run: "dd if=/dev/zero of=/dev/null bs=200M count=1" },
    { spec: { resources: { memoryBytes: 64 * MiB } } },
  );
  assert.equal(status.errorClass, "application");
  assert.equal(status.message, "killed: memory limit 64 MiB exceeded");
  assert.equal(status.exitCode, 137);
});

dockerTest("cancel stops the container within its grace; cleanup removes it", async () => {
  const agentId = newAgent();
  const spec = await attempt(agentId, { image: BUSYBOX, run: "echo started; sleep 30" });
  try {
    const execution = await backend.start(spec);
    const iterator = execution.logs[Symbol.asyncIterator]();
    const first = await iterator.next();
    assert.equal(new TextDecoder().decode(first.value!.data), "started\n");
    assert.deepEqual(await execution.status(), { state: "running" });
    const started = performance.now();
    await execution.cancel(1_000);
    const status = await execution.wait();
    const elapsed = performance.now() - started;
    assert.equal(status.errorClass, "cancelled");
    assert.ok(elapsed < 3_000, `cancel took ${elapsed.toFixed(0)} ms`);
    assert.equal((await execution.status()).state, "exited");
    assert.equal(await containerExists(execution.handle), true, "kept until cleanup");
    await execution.cleanup();
    assert.equal(await containerExists(execution.handle), false);
  } finally {
    await reap(agentId);
    await spec.remove();
  }
});

dockerTest("usage is sampled while the step runs", async () => {
  const { status } = await runStep({
    // Long enough for the daemon's once-a-second stats sample.
    run: "head -c 16000000 /dev/zero | tail -c 1 > /dev/null; sleep 1.2",
  });
  assert.ok(isSuccess(status), JSON.stringify(status));
  assert.ok((status.usage?.memoryPeakBytes ?? 0) > 0, JSON.stringify(status.usage));
  assert.ok(status.usage?.cpuMs !== undefined, JSON.stringify(status.usage));
});

dockerTest("a command the image lacks fails the attempt like docker run (127)", async () => {
  const { status, stderr } = await runStep({ args: ["no-such-command"] });
  assert.equal(status.exitCode, 127);
  assert.equal(status.errorClass, "application");
  assert.match(stderr, /no-such-command/, "the init process says what it could not run");
});

dockerTest("a missing image is refused with how to build it offline", async () => {
  const agentId = newAgent();
  const spec = await attempt(agentId, { image: "runnel/not-built:nope", run: "true" });
  try {
    await assert.rejects(backend.start(spec), (error: Error) => {
      assert.ok(error instanceof ImageMissingError);
      assert.equal(error.code, "image_missing");
      assert.match(error.message, /^Expected image "runnel\/not-built:nope" on this Docker host/);
      assert.match(error.message, /no registry is reachable/);
      assert.match(error.message, /deno task images/);
      assert.match(error.message, /docker import/);
      assert.match(error.message, /build:/);
      return true;
    });
  } finally {
    await reap(agentId);
    await spec.remove();
  }
});

dockerTest("a second start of one attempt is refused", async () => {
  const agentId = newAgent();
  const spec = await attempt(agentId, { image: BUSYBOX, run: "true" });
  try {
    const execution = await backend.start(spec);
    await assert.rejects(backend.start(spec), DuplicateAttemptError);
    await runToEnd(execution);
  } finally {
    await reap(agentId);
    await spec.remove();
  }
});

dockerTest("an image built from the generated Dockerfile is reused while unchanged", async () => {
  const agentId = newAgent();
  const stepId = `build-${agentId}`;
  const config = {
    build: {
      from: BUSYBOX,
      workdir: "/app",
      dependencies: "deps.txt",
      install: "cat deps.txt > /installed.txt",
      copy: ["app"],
      env: { GREETING: "hello from the image" },
    },
    run: "sh app/hello.sh; cat /installed.txt",
  };
  const files = { "deps.txt": "dependencies installed\n", "app/hello.sh": 'echo "$GREETING"\n' };
  const first = await attempt(agentId, config, { files, spec: { stepId } });
  const second = await attempt(agentId, config, { files, spec: { stepId } });
  let tag: string | undefined;
  try {
    const built = await runToEnd(await backend.start(first));
    assert.ok(isSuccess(built.status), JSON.stringify(built));
    assert.equal(built.stdout, "hello from the image\ndependencies installed\n");
    tag = /runnel: building image (\S+)/.exec(built.stderr)?.[1];
    assert.match(tag ?? "", /^runnel-build\/build-test-[0-9a-f]{8}:[0-9a-f]{16}$/, built.stderr);
    assert.match(built.stderr, /Step 1\/\d+ : FROM runnel\/busybox:local/);

    const cached = await runToEnd(await backend.start(second));
    assert.ok(isSuccess(cached.status), JSON.stringify(cached));
    assert.equal(cached.stdout, built.stdout);
    assert.equal(cached.stderr, `runnel: using cached image ${tag} (no rebuild)\n`);
  } finally {
    await reap(agentId);
    await first.remove();
    await second.remove();
    if (tag) await docker.getImage(tag).remove({ force: true }).catch(() => {});
  }
});

dockerTest(
  "a failing build is an application error naming the failed Dockerfile step",
  async () => {
    const { status, stderr } = await runStep({
      image: undefined,
      build: { from: BUSYBOX, install: "echo installing; exit 3" },
      run: "true",
    });
    assert.equal(status.errorClass, "application");
    assert.match(
      status.message ?? "",
      /^image build of runnel-build\/step:[0-9a-f]{16} failed at "Step 2\/2 : RUN \["\/bin\/sh", "-c", "echo installing; exit 3"\]": .*returned a non-zero code: 3$/,
    );
    assert.match(stderr, /installing/);
  },
);

dockerTest("keeps the backend contract, re-attaching after a restart", async () => {
  const report = await checkBackendConformance({
    backend: createDockerBackend,
    echo: { config: { image: BUSYBOX, run: "echo hello" }, stdout: "hello\n" },
    long: { config: { image: BUSYBOX, run: "sleep 60" } },
  });
  assert.deepEqual(report.skipped, [], "docker declares reattach: every check applies");
});

/** Starts a step without ever cleaning it up: what a dead agent leaves behind. */
async function abandon(agentId: string, run: string): Promise<{
  spec: AttemptSpec & { remove(): Promise<void> };
  execution: Execution;
}> {
  const spec = await attempt(agentId, { image: BUSYBOX, run });
  return { spec, execution: await createDockerBackend().start(spec) };
}

dockerTest("recover re-attaches kept attempts and reaps the rest", async () => {
  const agentId = newAgent();
  const otherAgent = newAgent();
  const running = await abandon(
    agentId,
    "echo before; while [ ! -f /runnel/out/go ]; do sleep 0.05; done; echo after; exit 3",
  );
  const exited = await abandon(agentId, "echo early; exit 7");
  const stray = await abandon(agentId, "sleep 30");
  const lost = await abandon(otherAgent, "sleep 30");
  try {
    assert.equal((await exited.execution.wait()).exitCode, 7);
    // Proof that `running` runs before the restart.
    const first = await running.execution.logs[Symbol.asyncIterator]().next();
    assert.equal(new TextDecoder().decode(first.value!.data), "before\n");

    const restarted = createDockerBackend();
    const recovered = await restarted.recover({
      agentId,
      keep: [running.spec.attemptId, exited.spec.attemptId, "never/started/1"],
      // Garbage from a damaged record must not reach the daemon's URL paths.
      handles: [lost.execution.handle, "", "../../containers/x", "a/b?c"],
    });
    assert.deepEqual(
      recovered.map((r) => r.attemptId).sort(),
      [running.spec.attemptId, exited.spec.attemptId].sort(),
    );
    assert.equal(await containerExists(stray.execution.handle), false, "stray reaped");
    assert.equal(await containerExists(lost.execution.handle), false, "lost handle reaped");

    const byId = new Map(recovered.map((r) => [r.attemptId, r.execution]));
    const reported = await runToEnd(byId.get(exited.spec.attemptId)!);
    assert.equal(reported.status.exitCode, 7);
    assert.equal(reported.status.errorClass, "application");
    assert.equal(reported.stdout, "early\n", "an exited attempt's logs are its recorded output");

    const reattached = byId.get(running.spec.attemptId)!;
    assert.equal(reattached.handle, running.execution.handle);
    assert.deepEqual(await reattached.status(), { state: "running" });
    const outputs = running.spec.outputsDir;
    const finished = runToEnd(reattached);
    await Deno.writeTextFile(`${outputs}/go`, "");
    const { status, stdout } = await finished;
    assert.equal(status.exitCode, 3);
    assert.equal(stdout, "after\n", "logs from the re-attach on");
    assert.equal(await containerExists(running.execution.handle), false);
  } finally {
    await reap(agentId);
    await reap(otherAgent);
    // The abandoned executions see their containers end; let them settle.
    for (const { spec, execution } of [running, exited, stray, lost]) {
      await execution.wait();
      await spec.remove();
    }
  }
});

dockerTest("the energy pipeline runs in containers built from its build: section", async (t) => {
  const plan = await loadPipeline(`${ROOT}/examples/energy/pipeline.docker.yaml`);
  assert.deepEqual(plan.order, ["generate", "analyze", "report"]);
  for (const id of plan.order) {
    assert.equal(plan.steps[id].backend, "docker");
    assert.deepEqual(validateDockerConfig(plan.steps[id].config), [], id);
  }
  await ensureDenoImage();
  const agentId = newAgent();
  const root = await Deno.realPath(await Deno.makeTempDir({ prefix: "runnel_docker_energy_" }));
  const produced: Record<string, string> = {};
  try {
    for (const id of plan.order) {
      await t.step(id, async () => {
        const step = plan.steps[id];
        const workDir = `${root}/${id}`;
        const outputsDir = `${workDir}/out`;
        await Deno.mkdir(outputsDir, { recursive: true });
        const inputs = Object.fromEntries(
          Object.entries(step.inputs).map(([name, ref]) => [name, produced[ref.output]]),
        );
        const execution = await backend.start({
          agentId,
          scratchRoot: root,
          runId: "energy",
          stepId: id,
          attemptId: `${agentId}/${id}/1`,
          attempt: 1,
          config: step.config,
          baseDir: plan.baseDir,
          workDir,
          inputs,
          inputsDir: `${workDir}/in`,
          outputsDir,
          outputs: step.outputs,
          env: step.env,
          matrix: step.matrix ?? {},
          resources: step.resources,
        });
        const { status, stdout, stderr } = await runToEnd(execution);
        assert.ok(isSuccess(status), `${JSON.stringify(status)}\n${stderr}`);
        assert.match(stderr, /runnel: (building|using cached) image runnel-build\//);
        for (const name of step.outputs) produced[name] = `${outputsDir}/${name}`;
        if (id === "analyze") assert.match(stdout, /analysed 2000 readings across 4 regions/);
      });
    }
    const report = await Deno.readTextFile(produced["energy_report.csv"]);
    const lines = report.trim().split("\n");
    assert.equal(
      lines[0],
      "region,readings,consumption_kwh,production_kwh,net_kwh,peak_kwh,self_sufficiency",
    );
    assert.equal(lines.length, 5);
  } finally {
    await reap(agentId);
    await Deno.remove(root, { recursive: true });
  }
});
