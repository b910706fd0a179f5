/**
 * `runnel show RUN` and `runnel show RUN --server URL` print the same view
 * of the same pipeline: the run's header, steps in the order they ran (not
 * alphabetical), their attempts, durations and workers, and the artifacts.
 *
 * @module
 */

import assert from "node:assert/strict";
import { openLocalArtifactStore } from "../core/artifacts/local.ts";
import { startTestServer } from "./_server.ts";
import { startAgent } from "../agent/worker/mod.ts";
import { runCli, sandbox } from "./_helpers.ts";

const TOKEN = "show-test-token";
/** The API's admin token, as `--admin-token-file` would hold it. */
const ADMIN_TOKEN = "show-test-admin-token-0123456789";

/** Its DAG order (zeta → alpha → mid) is not its alphabetical order. */
const PIPELINE = `name: show-shape
steps:
  zeta:
    backend: shell
    run: sleep 0.05; echo zeta > "$RUNNEL_OUTPUT_Z_TXT"
    outputs: [z.txt]
  alpha:
    backend: shell
    inputs: { z: zeta/z.txt }
    run: sleep 0.05; cat "$RUNNEL_INPUT_Z" > "$RUNNEL_OUTPUT_A_TXT"; echo alpha >> "$RUNNEL_OUTPUT_A_TXT"
    outputs: [a.txt]
  mid:
    backend: shell
    needs: [alpha]
    run: sleep 0.05; echo mid
`;

const DURATION = /^\d+ms$|^\d+\.\ds$|^\d+m\d+s$/;

/** What `runnel show` printed, by part: header labels, steps and artifacts. */
function shape(text: string) {
  const [header, steps, artifacts = ""] = text.trim().split("\n\n");
  const rows = (table: string) => table.split("\n").map((line) => line.split(/\s{2,}/));
  const [stepHeader, ...stepRows] = rows(steps);
  return {
    labels: header.split("\n").map((line) => line.split(/\s+/)[0]),
    stepHeader,
    steps: stepRows.map(([id, status, attempts, duration, worker]) => {
      assert.match(duration, DURATION, `duration of ${id}`);
      assert.ok(worker, `worker of ${id}`);
      return [id, status, attempts];
    }),
    artifacts: artifacts ? rows(artifacts) : [],
  };
}

Deno.test("runnel show: a local run and a cluster run print the same shape", async () => {
  await using box = await sandbox();
  const file = await box.write("show.yaml", PIPELINE);

  const local = await runCli(["run", file, "--state-dir", box.stateDir], { cwd: box.dir });
  assert.equal(local.code, 0, local.stderr + local.stdout);
  const localRunId = /^run (\S+) · show-shape/m.exec(local.stdout)![1];
  const localShow = await runCli(["show", localRunId, "--state-dir", box.stateDir], {
    cwd: box.dir,
  });
  assert.equal(localShow.code, 0, localShow.stderr);

  const { server, store } = await startTestServer(`${box.dir}/server.db`, {
    serverId: "show-server",
    token: TOKEN,
    adminToken: ADMIN_TOKEN,
  });
  const agent = await startAgent({
    servers: [`127.0.0.1:${server.grpcPort}`],
    token: TOKEN,
    agentId: "show-agent",
    allowShell: true,
    stateDir: `${box.dir}/agent`,
    artifacts: openLocalArtifactStore(`${box.dir}/cluster-artifacts`),
    log: () => {},
  });
  try {
    const http = `http://127.0.0.1:${server.httpPort}`;
    const env = { RUNNEL_API_TOKEN: ADMIN_TOKEN };
    const submitted = await runCli(["submit", file, "--server", http, "--follow"], {
      cwd: box.dir,
      env,
    });
    assert.equal(submitted.code, 0, submitted.stderr + submitted.stdout);
    const clusterRunId = /^run (\S+)$/m.exec(submitted.stdout)![1];
    const clusterShow = await runCli(["show", clusterRunId, "--server", http], {
      cwd: box.dir,
      env,
    });
    assert.equal(clusterShow.code, 0, clusterShow.stderr);

    const localShape = shape(localShow.stdout);
    const clusterShape = shape(clusterShow.stdout);
    assert.deepEqual(localShape.labels, [
      "run",
      "pipeline",
      "status",
      "created",
      "duration",
      "trace",
    ]);
    assert.deepEqual(localShape.steps, [
      ["zeta", "succeeded", "1"],
      ["alpha", "succeeded", "1"],
      ["mid", "succeeded", "1"],
    ]);
    assert.deepEqual(
      localShape.artifacts.map(([name]) => name),
      ["ARTIFACT", "zeta/z.txt", "alpha/a.txt"],
    );
    assert.deepEqual(clusterShape, localShape, `${localShow.stdout}\n---\n${clusterShow.stdout}`);
    assert.match(clusterShow.stdout, /show-agent/);
  } finally {
    await agent.stop();
    await server.close();
    await store.close();
  }
});
