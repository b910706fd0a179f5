/**
 * Docker steps through the whole runner: the CLI, the plugin host, the
 * store. The runner is SIGKILLed mid-step and `runnel resume` re-attaches to
 * the container it left running.
 *
 * @module
 */

import assert from "node:assert/strict";
import { connectDocker } from "../backends/docker/_dockerode.ts";
import createDockerBackend from "../backends/docker/mod.ts";
import { ensureBusyboxImage, ensureDenoImage } from "../infra/images.ts";
import { poll, ROOT, runCli, sandbox, spawnCli, waitForLine } from "./_helpers.ts";

const IN_CI = Deno.env.get("CI") === "true";
const fingerprint = await createDockerBackend().fingerprint();
const BUSYBOX = fingerprint.available ? await ensureBusyboxImage() : "runnel/busybox:local";
const docker = connectDocker({ socketPath: "/var/run/docker.sock" });

function dockerTest(name: string, fn: () => Promise<void>): void {
  Deno.test({
    name: `docker run: ${name}`,
    ignore: !fingerprint.available && !IN_CI,
    async fn() {
      if (!fingerprint.available) throw new Error(`Expected Docker in CI: ${fingerprint.detail}`);
      await fn();
    },
  });
}

async function containersOf(runId: string, running = false) {
  return await docker.listContainers({
    all: !running,
    filters: { label: [`runnel.run=${runId}`] },
  });
}

dockerTest("a step runs in its plugin host; show prints its memory and cpu", async () => {
  await using box = await sandbox();
  const file = await box.write(
    "pipeline.yaml",
    `name: docker-usage
steps:
  work:
    backend: docker
    image: ${BUSYBOX}
    resources: { memory: 128Mi }
    run: |
      head -c 50000000 /dev/zero | tail -c 1 > /dev/null
      i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done
      # docker stats samples about once a second: a step that ends sooner may have none.
      sleep 2
      echo "done $i" | tee "$RUNNEL_OUTPUT_RESULT_TXT"
    outputs: [result.txt]
`,
  );
  const run = await runCli(["run", file, "--state-dir", box.stateDir, "--logs"], { cwd: box.dir });
  assert.equal(run.code, 0, run.stderr + run.stdout);
  assert.match(run.stdout, /work │ done 200000/);
  const runId = /run (\S+) · docker-usage/.exec(run.stdout)![1];
  const show = await runCli(["show", runId, "--state-dir", box.stateDir], { cwd: box.dir });
  assert.equal(show.code, 0, show.stderr);
  assert.match(show.stdout, /mem \d+(\.\d+)? [KMG]i?B/);
  assert.match(show.stdout, /cpu \d/);
  assert.deepEqual(await containersOf(runId), [], "cleanup removed the container");
});

dockerTest(
  "SIGKILL of the runner mid-step: resume re-attaches to the running container",
  async () => {
    await using box = await sandbox();
    const file = await box.write(
      "pipeline.yaml",
      `name: docker-recover
steps:
  slow:
    backend: docker
    image: ${BUSYBOX}
    run: |
      echo started
      while [ ! -e /runnel/out/go ]; do sleep 0.05; done
      echo finished > "$RUNNEL_OUTPUT_OUT_TXT"
    outputs: [out.txt]
  after:
    backend: shell
    inputs: { out: slow/out.txt }
    run: cat "$RUNNEL_INPUT_OUT"
`,
    );
    // The container waits for a file that only the test creates, so it is
    // surely running when the runner dies, and finishes only when told.
    const { child, lines } = spawnCli(["run", file, "--state-dir", box.stateDir, "--json"], {
      cwd: box.dir,
    });
    const first = JSON.parse(await waitForLine(lines, (line) => line.includes('"type":"run"')));
    const runId: string = first.runId;
    await waitForLine(lines, (line) => line.includes('"slow"') && line.includes('"started'));
    const [container] = await poll(async () => {
      const found = await containersOf(runId, true);
      return found.length === 1 ? found : undefined;
    }, { what: "the step's container" });
    child.kill("SIGKILL");
    await child.status;
    await child.stdout.cancel().catch(() => {});
    await child.stderr.cancel();
    const inspect = await docker.getContainer(container.Id).inspect();
    assert.equal(inspect.State.Running, true, "the container outlives the runner");

    // Let the step finish, from the host side of its outputs mount.
    const outputs =
      (inspect.Mounts ?? []).find((mount) => mount.Destination === "/runnel/out")!.Source;
    await Deno.writeTextFile(`${outputs}/go`, "");

    const resumed = await runCli(["resume", runId, "--state-dir", box.stateDir, "--logs"], {
      cwd: box.dir,
    });
    assert.equal(resumed.code, 0, resumed.stderr + resumed.stdout);
    assert.match(resumed.stdout, /after │ finished/);
    const show = await runCli(["show", runId, "--state-dir", box.stateDir, "--json"], {
      cwd: box.dir,
    });
    const record = JSON.parse(show.stdout);
    const slow = record.steps.slow;
    assert.equal(slow.status, "succeeded");
    assert.equal(slow.attempts.length, 1, "re-attached, not started again");
    assert.deepEqual(await containersOf(runId), [], "the re-attached container was removed");
  },
);

dockerTest(
  "a secret printed by a container is masked; a step past its timeout is stopped",
  async () => {
    await using box = await sandbox();
    const file = await box.write(
      "pipeline.yaml",
      `name: docker-secrets
secrets:
  TOKEN: { env: RUNNEL_TEST_DOCKER_TOKEN }
steps:
  leak:
    backend: docker
    image: ${BUSYBOX}
    secrets: [TOKEN]
    run: echo "token is $TOKEN"; echo "again $TOKEN" >&2
  slow:
    backend: docker
    image: ${BUSYBOX}
    timeout: 500ms
    retry: 0
    run: sleep 30
`,
    );
    const started = Date.now();
    const run = await runCli(["run", file, "--state-dir", box.stateDir, "--logs"], {
      cwd: box.dir,
      env: { RUNNEL_TEST_DOCKER_TOKEN: "hunter2-docker" },
    });
    assert.equal(run.code, 1, run.stderr + run.stdout);
    assert.ok(Date.now() - started < 20_000, "the timeout stopped sleep 30");
    assert.match(run.stdout, /leak │ token is \*\*\*/);
    assert.match(run.stdout, /leak │ again \*\*\*/);
    assert.doesNotMatch(run.stdout + run.stderr, /hunter2/);
    assert.match(run.stdout, /slow failed .*timeout/);
    const runId = /run (\S+) · docker-secrets/.exec(run.stdout)![1];
    const logs = await runCli(["logs", runId, "--state-dir", box.stateDir], { cwd: box.dir });
    assert.doesNotMatch(logs.stdout, /hunter2/);
    assert.deepEqual(await containersOf(runId), [], "the stopped container was removed");
  },
);

dockerTest("the energy example runs in containers through the CLI", async () => {
  await ensureDenoImage();
  await using box = await sandbox();
  const run = await runCli(
    ["run", `${ROOT}/examples/energy/pipeline.docker.yaml`, "--state-dir", box.stateDir],
    { cwd: box.dir },
  );
  assert.equal(run.code, 0, run.stderr + run.stdout);
  assert.match(run.stdout, /succeeded in .* \(3 succeeded\)/);
});
