/**
 * Step values: published as `NAME=value` lines in `$RUNNEL_VALUES` (or a
 * deno step's returned object), shown by `runnel show`, read downstream in
 * env, a `run` script (as data) and `when` conditions; bounded, located,
 * kept by a resume, and carried through a cluster.
 */

import assert from "node:assert/strict";
import { runCli, sandbox } from "./_helpers.ts";
import { startTestCluster } from "./_server.ts";

const HOSTILE = `$(touch pwned); echo \`touch pwned2\``;

function pipeline(dir: string): string {
  return `name: values
steps:
  build:
    backend: shell
    run: |
      echo "version=1.2.3" >> "$RUNNEL_VALUES"
      echo "coverage=85" >> "$RUNNEL_VALUES"
      printf 'note=%s\\n' '${HOSTILE}' >> "$RUNNEL_VALUES"
  answer:
    backend: deno
    module: ./answer.ts
  use:
    backend: shell
    needs: [build, answer]
    env: { VERSION: "v\${{ steps.build.values.version }}" }
    run: |
      test -f ${dir}/gate || exit 3
      echo "env=$VERSION run=\${{ steps.build.values.version }} note=\${{ steps.build.values.note }} answer=\${{ steps.answer.values.answer }}"
  covered:
    backend: shell
    needs: [build]
    when: steps.build.values.coverage >= 80
    run: echo covered
  excellent:
    backend: shell
    needs: [build]
    when: steps.build.values.coverage >= 90
    run: echo excellent
`;
}

Deno.test("values: published, shown, read downstream as data and in when; a resume keeps them", async () => {
  await using box = await sandbox();
  await box.write("answer.ts", "export default () => ({ answer: 42, ok: true });\n");
  const file = await box.write("p.yaml", pipeline(box.dir));
  const run = (args: string[]) => runCli([...args, "--state-dir", box.stateDir], { cwd: box.dir });
  const failed = await run(["run", file, "--logs"]);
  assert.equal(failed.code, 1, failed.stderr + failed.stdout);
  const runId = /^run (\S+)/m.exec(failed.stdout)![1];
  const shown = JSON.parse((await run(["show", runId, "--json"])).stdout);
  assert.deepEqual(shown.steps.build.values, { version: "1.2.3", coverage: "85", note: HOSTILE });
  assert.deepEqual(shown.steps.answer.values, { answer: "42", ok: "true" });
  assert.equal(shown.steps.covered.status, "succeeded");
  assert.equal(shown.steps.excellent.status, "skipped");
  assert.match((await run(["show", runId])).stdout, /^build\s+version=1\.2\.3 coverage=85 note=/m);

  await Deno.writeTextFile(`${box.dir}/gate`, "");
  const resumed = await run(["resume", runId, "--logs"]);
  assert.equal(resumed.code, 0, resumed.stderr + resumed.stdout);
  const line = resumed.stdout.split("\n").find((l) => l.includes("use │"))!;
  assert.equal(line.split("│ ")[1], `env=v1.2.3 run=1.2.3 note=${HOSTILE} answer=42`);
  for (const name of ["pwned", "pwned2"]) {
    await assert.rejects(Deno.stat(`${box.dir}/${name}`), Deno.errors.NotFound);
  }
});

Deno.test("values: bounded and checked; a reference to a step not upstream is a located error", async () => {
  await using box = await sandbox();
  const run = (args: string[]) => runCli([...args, "--state-dir", box.stateDir], { cwd: box.dir });
  const big = await box.write(
    "big.yaml",
    `name: big
steps:
  a:
    run: head -c 70000 /dev/zero | tr '\\\\0' a | sed 's/^/x=/' > "$RUNNEL_VALUES"
`,
  );
  const tooBig = await run(["run", big, "--json"]);
  assert.equal(tooBig.code, 1);
  const bad = await box.write(
    "bad.yaml",
    `name: bad
steps:
  a: { run: 'echo "not a pair" > "$RUNNEL_VALUES"' }
`,
  );
  const malformed = await run(["run", bad]);
  assert.equal(malformed.code, 1);
  const runId = /^run (\S+)/m.exec(malformed.stdout)![1];
  const shown = JSON.parse((await run(["show", runId, "--json"])).stdout);
  assert.match(shown.steps.a.attempts[0].result.message, /Expected NAME=value on line 1/);
  const unrelated = await box.write(
    "ref.yaml",
    `name: ref
steps:
  a: { run: 'echo v=1 > "$RUNNEL_VALUES"' }
  b:
    run: echo "\${{ steps.a.values.v }}"
  c:
    needs: [a]
    env: { X: "\${{ steps.nope.values.v }}" }
    run: "true"
`,
  );
  const located = await run(["validate", unrelated]);
  assert.equal(located.code, 2);
  assert.match(
    located.stderr,
    /ref\.yaml:5:10: step "b" reads a value of step "a", which it does not depend on/,
  );
  assert.match(
    located.stderr,
    /ref\.yaml:8:15: step "c" reads a value of step "nope", which does not exist/,
  );
});

Deno.test("values: through a cluster agent, and a value not published fails the reader", async () => {
  await using box = await sandbox();
  await using cluster = await startTestCluster(box.dir, "values");
  const client = cluster.client;
  {
    const { runId } = await client.submit(
      `name: cluster-values
steps:
  a: { backend: shell, run: 'echo "tag=blue" > "$RUNNEL_VALUES"' }
  b:
    backend: shell
    needs: [a]
    run: echo "\${{ steps.a.values.tag }}" > "$RUNNEL_OUTPUT_OUT_TXT"
    outputs: [out.txt]
  c:
    backend: shell
    needs: [a]
    retry: { max: 0 }
    run: echo "\${{ steps.a.values.missing }}"
`,
      "p.yaml",
      box.dir,
    );
    for await (const _ of client.events(runId)) { /* until the run ends */ }
    const { steps } = await client.run(runId);
    assert.deepEqual(steps.a.values, { tag: "blue" });
    assert.equal(steps.b.status, "succeeded");
    assert.equal(steps.b.outputs?.["out.txt"]?.size, "blue\n".length);
    assert.equal(steps.c.status, "failed");
    assert.match(JSON.stringify(steps.c), /did not publish it/);
  }
});
