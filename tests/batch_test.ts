/**
 * Dynamic fan-out end to end: `batch:` splits an artifact at run time and
 * `foreach:` fans out over a JSON list, locally and through a cluster
 * agent; legs are cached per batch, a resume reruns only failed legs,
 * fan-in keeps batch order, caps and located errors hold.
 */

import assert from "node:assert/strict";
import { ROOT, runCli, sandbox } from "./_helpers.ts";
import { startTestCluster } from "./_server.ts";
import type { StepState } from "../core/model.ts";

type Shown = { status: string; steps: Record<string, StepState> };

function legsOf(steps: Record<string, StepState>, name: string): string[] {
  return Object.keys(steps).filter((id) => id.startsWith(`${name}[`)).sort();
}

Deno.test("batch: the seed's example splits, analyses in parallel legs, merges in order and fans out again", async () => {
  await using box = await sandbox();
  const run = (args: string[]) => runCli([...args, "--state-dir", box.stateDir], { cwd: box.dir });
  const result = await run([
    "run",
    `${ROOT}/examples/batch/pipeline.yaml`,
    "--param",
    "readings=120000",
  ]);
  assert.equal(result.code, 0, result.stderr + result.stdout);
  const runId = /^run (\S+)/m.exec(result.stdout)![1];
  const shown: Shown = JSON.parse((await run(["show", runId, "--json"])).stdout);
  assert.equal(shown.status, "succeeded");
  // 120,000 rows in batches of 50,000: three legs, named in batch order.
  assert.deepEqual(legsOf(shown.steps, "analyze"), [
    "analyze[batch=0000]",
    "analyze[batch=0001]",
    "analyze[batch=0002]",
  ]);
  assert.equal(shown.steps.analyze.fanOut?.legs.length, 3);
  assert.equal(
    legsOf(shown.steps, "publish").join(" "),
    ["ap-south", "eu-central", "eu-west", "sa-east", "us-east", "us-west"]
      .map((region) => `publish[item=${region}]`).join(" "),
  );
  const logs = await run(["logs", runId, "merge"]);
  assert.match(logs.stdout, /merged 3 batches, 120000 readings, 6 regions/);
});

function cached(name: string, dir: string): string {
  return `name: ${name}
steps:
  read:
    run: cp ${dir}/data.csv "$RUNNEL_OUTPUT_DATA_CSV"
    outputs: [data.csv]
  count:
    inputs: { data: read/data.csv }
    batch: { input: data, lines: 10, header: true }
    cache: true
    run: |
      test "$RUNNEL_BATCH_INDEX" != 1 || test -f ${dir}/gate || exit 3
      tail -n +2 "$RUNNEL_INPUT_DATA" | paste -sd+ | bc > "$RUNNEL_OUTPUT_SUM_TXT"
    outputs: [sum.txt]
  total:
    inputs: { sums: count/sum.txt }
    run: |
      ls "$RUNNEL_INPUT_SUMS" | tr '\\n' ' '
      cat "$RUNNEL_INPUT_SUMS"/*/sum.txt | paste -sd+ | bc
`;
}

Deno.test("batch: a resume reruns only the failed leg; one changed batch reruns one leg", async () => {
  await using box = await sandbox();
  const run = (args: string[]) => runCli([...args, "--state-dir", box.stateDir], { cwd: box.dir });
  const rows = Array.from({ length: 30 }, (_, i) => `${i + 1}`);
  await box.write("data.csv", `n\n${rows.join("\n")}\n`);
  const file = await box.write("p.yaml", cached("cached", box.dir));
  const failed = await run(["run", file]);
  assert.equal(failed.code, 1, failed.stderr + failed.stdout);
  const runId = /^run (\S+)/m.exec(failed.stdout)![1];
  let shown: Shown = JSON.parse((await run(["show", runId, "--json"])).stdout);
  assert.equal(shown.steps["count[batch=0001]"].status, "failed");
  assert.equal(shown.steps.total.status, "skipped");

  await Deno.writeTextFile(`${box.dir}/gate`, "");
  const resumed = await run(["resume", runId, "--logs"]);
  assert.equal(resumed.code, 0, resumed.stderr + resumed.stdout);
  shown = JSON.parse((await run(["show", runId, "--json"])).stdout);
  const attempts = (id: string) => shown.steps[id].attempts.length;
  assert.equal(attempts("count"), 1, "the split ran once");
  assert.equal(attempts("count[batch=0000]"), 1);
  assert.equal(attempts("count[batch=0001]"), 2, "only the failed leg ran again");
  assert.equal(attempts("count[batch=0002]"), 1);
  // Fan-in in batch order: one directory per leg (its name file-safe: "=" is "~3D").
  assert.match(resumed.stdout, /total │ batch~3D0000 batch~3D0001 batch~3D0002 465\n/);

  // One row of the middle batch changes: only its leg runs, the others come from the cache.
  rows[14] = "1015";
  await box.write("data.csv", `n\n${rows.join("\n")}\n`);
  const again = await run(["run", file, "--logs"]);
  assert.equal(again.code, 0, again.stderr + again.stdout);
  const second: Shown = JSON.parse(
    (await run(["show", /^run (\S+)/m.exec(again.stdout)![1], "--json"])).stdout,
  );
  assert.deepEqual(
    legsOf(second.steps, "count").map((id) => [id, second.steps[id].cached === true]),
    [["count[batch=0000]", true], ["count[batch=0001]", false], ["count[batch=0002]", true]],
  );
  assert.match(again.stdout, /total │ .*batch~3D0002 1465\n/);
});

Deno.test("batch: a split past the cap fails the step and says why; errors are located", async () => {
  await using box = await sandbox();
  const run = (args: string[]) => runCli([...args, "--state-dir", box.stateDir], { cwd: box.dir });
  const many = await box.write(
    "many.yaml",
    `name: many
steps:
  make:
    run: seq 1 5000 > "$RUNNEL_OUTPUT_N_TXT"
    outputs: [n.txt]
  each:
    inputs: { n: make/n.txt }
    batch: { input: n, lines: 1 }
    run: "true"
`,
  );
  const capped = await run(["run", many]);
  assert.equal(capped.code, 1, capped.stderr + capped.stdout);
  const runId = /^run (\S+)/m.exec(capped.stdout)![1];
  const shown: Shown = JSON.parse((await run(["show", runId, "--json"])).stdout);
  assert.equal(shown.steps.each.status, "failed");
  assert.match(shown.steps.each.reason ?? "", /at most 4096 batches/);
  assert.deepEqual(legsOf(shown.steps, "each"), []);

  const bad = await box.write(
    "bad.yaml",
    `name: bad
steps:
  a: { run: "true", outputs: [x.csv, list.json] }
  m:
    matrix: { r: [1, 2] }
    run: "true"
    outputs: [y.txt]
  b:
    inputs: { data: a/x.csv }
    batch: { input: dta, lines: 10 }
    run: "true"
  c:
    inputs: { ys: m/y.txt }
    batch: { input: ys, lines: 10 }
    run: "true"
  d:
    run: echo \${{ item.name }}
  e:
    foreach: a/nope.json
    run: "true"
  f:
    foreach: a/list.json
    matrix: { r: [1] }
    run: "true"
`,
  );
  const located = await run(["validate", bad]);
  assert.equal(located.code, 2);
  for (
    const expected of [
      /bad\.yaml:10:21: batch of step "b" splits input "dta", which the step does not have — did you mean "data"\?/,
      /bad\.yaml:14:21: batch of step "c" splits input "ys", a directory with one entry per leg of step "m": only files: true splits a directory/,
      /bad\.yaml:16:3: step "d" reads \$\{\{ item \}\}, which only a step with foreach: has/,
      /bad\.yaml:19:14: foreach of step "e" names output "nope.json" that step "a" does not declare/,
      /bad\.yaml:22:5: step "f" has both matrix and foreach: a step fans out one way/,
    ]
  ) assert.match(located.stderr, expected);
});

Deno.test("batch and foreach: through a cluster agent, legs and fan-in as in local mode", async () => {
  await using box = await sandbox();
  await using cluster = await startTestCluster(box.dir, "batch", { slots: 4 });
  const client = cluster.client;
  const { runId } = await client.submit(
    `name: cluster-batch
steps:
  make:
    backend: shell
    run: |
      seq 1 25 > "$RUNNEL_OUTPUT_N_TXT"
      echo '[{"zone":"a","w":1},{"zone":"b","w":2}]' > "$RUNNEL_OUTPUT_ZONES_JSON"
    outputs: [n.txt, zones.json]
  sum:
    backend: shell
    inputs: { n: make/n.txt }
    batch: { input: n, count: 3 }
    run: paste -sd+ "$RUNNEL_INPUT_N" | bc > "$RUNNEL_OUTPUT_S_TXT"
    outputs: [s.txt]
  zone:
    backend: shell
    foreach: { input: make/zones.json, key: zone }
    run: echo "\${{ item.zone }}:\${{ item.w }}" > "$RUNNEL_OUTPUT_Z_TXT"
    outputs: [z.txt]
  total:
    backend: shell
    inputs: { sums: sum/s.txt, zones: zone/z.txt }
    run: |
      cat "$RUNNEL_INPUT_SUMS"/*/s.txt | paste -sd+ | bc > "$RUNNEL_OUTPUT_T_TXT"
      cat "$RUNNEL_INPUT_ZONES"/*/z.txt >> "$RUNNEL_OUTPUT_T_TXT"
    outputs: [t.txt]
`,
    "p.yaml",
    box.dir,
  );
  for await (const _ of client.events(runId)) { /* until the run ends */ }
  const { run, steps } = await client.run(runId);
  assert.equal(run.status, "succeeded", JSON.stringify(steps, null, 1).slice(0, 2000));
  assert.ok(legsOf(steps, "sum").length >= 2 && legsOf(steps, "sum").length <= 3);
  assert.deepEqual(legsOf(steps, "zone"), ["zone[item=a]", "zone[item=b]"]);
  assert.equal(steps.total.outputs?.["t.txt"]?.size, "325\na:1\nb:2\n".length);
});

Deno.test("foreach: an item is data in a run script, never code", async () => {
  await using box = await sandbox();
  const run = (args: string[]) => runCli([...args, "--state-dir", box.stateDir], { cwd: box.dir });
  await box.write("list.json", JSON.stringify(["$(touch pwned)", { f: "`touch pwned2`; x" }]));
  const file = await box.write(
    "p.yaml",
    `name: hostile
steps:
  list:
    run: cp ${box.dir}/list.json "$RUNNEL_OUTPUT_L_JSON"
    outputs: [l.json]
  each:
    foreach: list/l.json
    run: echo "\${{ item }}|$RUNNEL_ITEM_INDEX|$RUNNEL_ITEM_KEY"
`,
  );
  const result = await run(["run", file, "--logs"]);
  assert.equal(result.code, 0, result.stderr + result.stdout);
  assert.match(result.stdout, /each\[item=0000\] │ \$\(touch pwned\)\|0\|0000\n/);
  assert.match(result.stdout, /each\[item=0001\] │ \{"f":"`touch pwned2`; x"\}\|1\|0001\n/);
  for (const name of ["pwned", "pwned2"]) {
    await assert.rejects(Deno.stat(`${box.dir}/${name}`), Deno.errors.NotFound);
  }
});
