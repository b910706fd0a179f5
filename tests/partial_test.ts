/**
 * `keep-partial: true`: what a failed attempt wrote of its outputs is kept
 * as `NAME.partial-ATTEMPT` (never under a name a later step reads), and
 * only regular files; locally and through a cluster agent.
 */

import assert from "node:assert/strict";
import { openLocalArtifactStore } from "../core/artifacts/local.ts";
import { runCli, sandbox } from "./_helpers.ts";
import { startTestCluster } from "./_server.ts";

const PIPELINE = `name: partial
steps:
  train:
    backend: shell
    keep-partial: true
    retry: { max: 0 }
    outputs: [model.pt, log.txt, link.txt]
    run: |
      echo half > "$RUNNEL_OUTPUT_MODEL_PT"
      ln -s /etc/passwd "$RUNNEL_OUTPUT_LINK_TXT"
      exit 5
`;

Deno.test("keep-partial (local): a failed attempt's outputs kept as partial, links refused", async () => {
  await using box = await sandbox();
  const file = await box.write("p.yaml", PIPELINE);
  const ran = await runCli(["run", file, "--state-dir", box.stateDir, "--logs"], { cwd: box.dir });
  assert.equal(ran.code, 1);
  assert.match(ran.stdout, /kept partial output model\.pt\.partial-1/);
  const runId = /^run (\S+)/m.exec(ran.stdout)![1];
  const shown = JSON.parse(
    (await runCli(["show", runId, "--state-dir", box.stateDir, "--json"], { cwd: box.dir })).stdout,
  );
  assert.deepEqual(shown.artifacts.map((a: { name: string }) => a.name), ["model.pt.partial-1"]);
  assert.equal(shown.steps.train.outputs, undefined);
});

Deno.test("keep-partial (cluster): kept by the agent too", async () => {
  await using box = await sandbox();
  await using cluster = await startTestCluster(box.dir, "partial");
  const { runId } = await cluster.client.submit(PIPELINE, "p.yaml", box.dir);
  for await (const _ of cluster.client.events(runId)) { /* until the run ends */ }
  const store = openLocalArtifactStore(`${box.dir}/artifacts`);
  const names = (await store.list({ run: runId })).map((record) => record.name);
  assert.deepEqual(names, ["model.pt.partial-1"]);
});
