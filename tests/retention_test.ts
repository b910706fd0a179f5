/**
 * Retention per pipeline and per step: `gc` keeps what a pipeline (or a
 * step) says to keep, however old, and drops the rest after its own
 * retention or gc's default.
 */

import assert from "node:assert/strict";
import {
  collectGarbage,
  loadPipeline,
  openLocalState,
  runPipeline,
  storageByPipeline,
} from "../mod.ts";
import { runCli, sandbox } from "./_helpers.ts";

/** The names of a run's artifacts in the store, sorted. */
async function artifactNames(stateDir: string, runId: string): Promise<string[]> {
  const state = await openLocalState(stateDir, { readOnly: true });
  try {
    return (await state.artifacts.list({ run: runId })).map((a) => a.name).sort();
  } finally {
    await state.close();
  }
}

Deno.test("retention: a step's forever outlives gc, the pipeline's own period applies to the rest", async () => {
  await using box = await sandbox();
  const file = await box.write(
    "p.yaml",
    `name: kept
retention: 30d
steps:
  model:
    retention: forever
    run: echo weights > "$RUNNEL_OUTPUT_MODEL_PT"
    outputs: [model.pt]
  scratch:
    run: echo tmp > "$RUNNEL_OUTPUT_TMP_TXT"
    outputs: [tmp.txt]
`,
  );
  const summary = await runPipeline(await loadPipeline(file), { stateDir: box.stateDir });
  assert.equal(summary.status, "succeeded");
  const day = 24 * 3600 * 1000;
  const names = () => artifactNames(box.stateDir, summary.runId);
  // Past gc's 14-day default but within the pipeline's 30 days: both stay.
  await collectGarbage({ stateDir: box.stateDir, now: Date.now() + 20 * day });
  assert.deepEqual(await names(), ["model.pt", "tmp.txt"]);
  // A dry run past 30 days says what would go, and removes nothing.
  const dry = await collectGarbage({
    stateDir: box.stateDir,
    now: Date.now() + 40 * day,
    dryRun: true,
  });
  assert.equal(dry.recordsRemoved, 1);
  assert.deepEqual(await names(), ["model.pt", "tmp.txt"]);
  await collectGarbage({ stateDir: box.stateDir, now: Date.now() + 40 * day });
  assert.deepEqual(await names(), ["model.pt"]);
  await collectGarbage({ stateDir: box.stateDir, now: Date.now() + 4000 * day });
  assert.deepEqual(await names(), ["model.pt"], "forever is forever");
});

Deno.test("retention: an output's own retention wins over its step's and the pipeline's", async () => {
  await using box = await sandbox();
  const file = await box.write(
    "p.yaml",
    `name: per-output
retention: 30d
steps:
  train:
    retention: 2d
    run: |
      echo weights > "$RUNNEL_OUTPUT_MODEL_PT"
      echo log > "$RUNNEL_OUTPUT_TRAIN_LOG"
      echo curve > "$RUNNEL_OUTPUT_CURVE_CSV"
    outputs:
      - { name: model.pt, retention: forever }
      - train.log
      - { name: curve.csv, retention: 60d }
`,
  );
  const summary = await runPipeline(await loadPipeline(file), { stateDir: box.stateDir });
  assert.equal(summary.status, "succeeded");
  const day = 24 * 3600 * 1000;
  const names = () => artifactNames(box.stateDir, summary.runId);
  await collectGarbage({ stateDir: box.stateDir, now: Date.now() + 5 * day });
  assert.deepEqual(await names(), ["curve.csv", "model.pt"], "the step's 2d took train.log");
  await collectGarbage({ stateDir: box.stateDir, now: Date.now() + 90 * day });
  assert.deepEqual(await names(), ["model.pt"]);
});

Deno.test("storage: bytes and objects by pipeline, as a table, JSON and Prometheus gauges", async () => {
  await using box = await sandbox();
  for (const [name, bytes] of [["alpha", 1000], ["beta", 300]] as const) {
    const file = await box.write(
      `${name}.yaml`,
      `name: ${name}
steps:
  make:
    run: |
      head -c ${bytes} /dev/zero > "$RUNNEL_OUTPUT_A_BIN"
      head -c ${bytes} /dev/zero | tr '\\\\0' x > "$RUNNEL_OUTPUT_B_BIN"
    outputs: [a.bin, b.bin]
`,
    );
    const summary = await runPipeline(await loadPipeline(file), { stateDir: box.stateDir });
    assert.equal(summary.status, "succeeded");
  }
  assert.deepEqual(await storageByPipeline({ stateDir: box.stateDir }), [
    { pipeline: "alpha", objects: 2, bytes: 2000 },
    { pipeline: "beta", objects: 2, bytes: 600 },
  ]);
  const cli = await runCli(["storage", "--prometheus", "--state-dir", box.stateDir], {
    cwd: box.dir,
  });
  assert.equal(cli.code, 0, cli.stderr);
  assert.match(cli.stdout, /^# TYPE runnel_artifact_bytes gauge$/m);
  assert.match(cli.stdout, /^runnel_artifact_bytes\{pipeline="alpha"\} 2000$/m);
  assert.match(cli.stdout, /^runnel_artifact_objects\{pipeline="beta"\} 2$/m);
});
