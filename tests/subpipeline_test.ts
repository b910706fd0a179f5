/**
 * Sub-pipelines (`pipeline:` steps): a child run with parameters whose
 * chosen outputs become the step's, linked both ways, cancelled with its
 * parent, locally and in a cluster; a cycle between files is a located
 * error.
 */

import assert from "node:assert/strict";
import { collectBundle } from "../agent/bundle.ts";
import { poll, runCli, sandbox, spawnCli, waitForLine } from "./_helpers.ts";
import { startTestCluster } from "./_server.ts";
import type { StepState } from "../core/model.ts";

const PARENT = `name: parent
steps:
  prep: { run: echo prepared }
  train:
    needs: [prep]
    pipeline: { file: ./child.yaml, params: { epochs: 3 }, outputs: { model.pt: fit/model.pt } }
  use:
    inputs: { model: train/model.pt }
    run: cat "$RUNNEL_INPUT_MODEL"
`;

const CHILD = `name: child
params:
  epochs: { type: number, default: 1 }
  gate: { type: string, default: "" }
steps:
  fit:
    run: |
      test -z "\${{ params.gate }}" || while ! test -f "\${{ params.gate }}"; do sleep 0.05; done
      echo "trained \${{ params.epochs }} epochs" > "$RUNNEL_OUTPUT_MODEL_PT"
    outputs: [model.pt]
`;

type Shown = {
  status: string;
  parent?: { runId: string; stepId: string };
  steps: Record<string, StepState>;
};

Deno.test("sub-pipeline: a child run's output becomes the step's; both runs name each other", async () => {
  await using box = await sandbox();
  const run = (args: string[]) => runCli([...args, "--state-dir", box.stateDir], { cwd: box.dir });
  await box.write("child.yaml", CHILD);
  const result = await run(["run", await box.write("parent.yaml", PARENT), "--logs"]);
  assert.equal(result.code, 0, result.stderr + result.stdout);
  assert.match(result.stdout, /use │ trained 3 epochs\n/);
  const runId = /^run (\S+)/m.exec(result.stdout)![1];
  const childId = /child run (\S+) of \.\/child\.yaml started/.exec(result.stdout)![1];
  const parent: Shown = JSON.parse((await run(["show", runId, "--json"])).stdout);
  assert.equal(parent.steps.train.reason, `child run ${childId}`);
  assert.equal(parent.steps.train.attempts[0].result?.childRun, childId);
  const child: Shown = JSON.parse((await run(["show", childId, "--json"])).stdout);
  assert.equal(child.status, "succeeded");
  assert.deepEqual(
    { runId: child.parent?.runId, stepId: child.parent?.stepId },
    { runId, stepId: "train" },
  );
  assert.match(
    (await run(["show", childId])).stdout,
    new RegExp(`child of ${runId} \\(step train\\)`),
  );
});

Deno.test("sub-pipeline: cancelling the parent cancels the child", async () => {
  await using box = await sandbox();
  await box.write("child.yaml", CHILD);
  const gate = `${box.dir}/never`;
  const file = await box.write(
    "parent.yaml",
    PARENT.replace("params: { epochs: 3 }", `params: { epochs: 3, gate: "${gate}" }`),
  );
  const running = spawnCli(["run", file, "--logs", "--state-dir", box.stateDir], {
    cwd: box.dir,
  });
  const first = await waitForLine(running.lines, (line) => /^run \S+ · parent/.test(line));
  const runId = /^run (\S+)/.exec(first)![1];
  const started = await waitForLine(
    running.lines,
    (line) => /child run \S+ of \.\/child\.yaml started/.test(line),
  );
  const childId = /child run (\S+) of/.exec(started)![1];
  const cancel = await runCli(["cancel", runId, "--state-dir", box.stateDir], { cwd: box.dir });
  assert.equal(cancel.code, 0, cancel.stderr);
  (async () => {
    for await (const _ of running.lines) { /* drained */ }
  })();
  const status = await running.child.status;
  assert.notEqual(status.code, 0);
  const show = async (id: string): Promise<Shown> =>
    JSON.parse(
      (await runCli(["show", id, "--json", "--state-dir", box.stateDir], { cwd: box.dir })).stdout,
    );
  assert.equal((await show(runId)).status, "cancelled");
  assert.equal((await show(childId)).status, "cancelled");
});

Deno.test("sub-pipeline: a cycle between pipeline files is a located error", async () => {
  await using box = await sandbox();
  await box.write("b.yaml", "name: b\nsteps:\n  again: { pipeline: ./a.yaml }\n");
  const a = await box.write(
    "a.yaml",
    "name: a\nsteps:\n  sub:\n    pipeline: { file: ./b.yaml }\n  c: { pipeline: ./missing.yaml }\n",
  );
  const result = await runCli(["validate", a], { cwd: box.dir });
  assert.equal(result.code, 2);
  assert.match(
    result.stderr,
    /a\.yaml:4:23: step "sub" runs pipeline "\.\/b\.yaml", which leads back: a\.yaml → b\.yaml → a\.yaml/,
  );
  assert.match(
    result.stderr,
    /a\.yaml:5:18: pipeline "\.\/missing\.yaml" of step "c" does not exist/,
  );
});

Deno.test("sub-pipeline: in a cluster the scheduler runs the child from the shipped directory", async () => {
  await using box = await sandbox();
  await using cluster = await startTestCluster(box.dir, "subpipeline", { slots: 4 });
  const client = cluster.client;
  const project = `${box.dir}/project`;
  await Deno.mkdir(project);
  await Deno.writeTextFile(
    `${project}/child.yaml`,
    CHILD.replaceAll("    run:", "    backend: shell\n    run:"),
  );
  const parent = PARENT.replace("prep: { run:", "prep: { backend: shell, run:")
    .replace("    run: cat", "    backend: shell\n    run: cat");
  await Deno.writeTextFile(`${project}/parent.yaml`, parent);
  const bundle = await collectBundle(project);
  const { runId } = await client.submit(parent, "parent.yaml", project, bundle.files);
  for await (const _ of client.events(runId)) { /* until the run ends */ }
  const { run, steps } = await client.run(runId);
  assert.equal(run.status, "succeeded", JSON.stringify(steps.train));
  const childId = steps.train.attempts[0].result?.childRun;
  assert.ok(childId);
  const child = await client.run(childId);
  assert.equal(child.run.status, "succeeded");
  assert.equal((child.run as { parent?: { runId: string } }).parent?.runId, runId);
  assert.equal(steps.use.status, "succeeded");
  assert.equal(steps.train.outputs?.["model.pt"]?.size, "trained 3 epochs\n".length);

  // A registered pipeline by name and version.
  const childSource = await Deno.readTextFile(`${project}/child.yaml`);
  const applied = await client.apply(childSource, "child.yaml", project);
  const byName = parent.replace(
    "pipeline: { file: ./child.yaml,",
    `pipeline: { name: child, version: ${applied.version},`,
  );
  const third = await client.submit(byName, "parent.yaml", project);
  for await (const _ of client.events(third.runId)) { /* until the run ends */ }
  const registered = await client.run(third.runId);
  assert.equal(registered.run.status, "succeeded", JSON.stringify(registered.steps.train));
  const registeredChild = await client.run(registered.steps.train.attempts[0].result!.childRun!);
  assert.equal(registeredChild.run.registered?.name, "child");

  // Cancelled with its parent.
  const gated = parent.replace(
    "params: { epochs: 3 }",
    `params: { epochs: 3, gate: "${box.dir}/never" }`,
  );
  const second = await client.submit(gated, "parent.yaml", project, bundle.files);
  const childOf = await poll(async () => {
    const { steps } = await client.run(second.runId);
    return steps.train?.status === "running"
      ? (await client.runs()).find((r) =>
        (r as { parent?: { runId: string } }).parent?.runId === second.runId
      )?.runId
      : undefined;
  }, { timeoutMs: 20_000 });
  await client.cancel(second.runId);
  for await (const _ of client.events(second.runId)) { /* until the run ends */ }
  await poll(async () => (await client.run(childOf)).run.status === "cancelled" || undefined, {
    timeoutMs: 20_000,
  });
});
