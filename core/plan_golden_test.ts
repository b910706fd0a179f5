/**
 * Plans stay byte-identical across changes of the loader: the JSON of the
 * plan (or of the errors) of each pipeline here, hashed, against what the
 * loader gave before the planner's fast paths (commit 62e5fe2). Small files
 * take the located path, the large generated ones the fast path.
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { relative } from "node:path";
import { fileURLToPath } from "node:url";
import { PipelineError } from "./errors.ts";
import { parsePipeline } from "./load.ts";

const root = fileURLToPath(new URL("..", import.meta.url));

/** A DAG of `steps` steps, each needing up to three earlier ones (as the plan bench's). */
function generated(steps: number, options: { compact?: boolean; extras?: boolean } = {}): string {
  let state = 7;
  const next = () => (state = (state * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
  const lines = [
    "name: golden",
    "defaults: { timeout: 10m, retry: { max: 2, backoff: 2s, on: [application, 3] }, " +
    "env: { A: 1, B: x } }",
    "steps:",
  ];
  for (let i = 0; i < steps; i++) {
    const needs = new Set<string>();
    for (let k = 0, n = i > 0 ? 1 + Math.floor(next() * 3) : 0; k < n; k++) {
      needs.add(`s${Math.floor(next() * i)}`);
    }
    const fields = [`run: "echo ${i} \${{ matrix.x }}"`];
    if (!options.extras || i % 7 !== 3) fields[0] = `run: echo ${i}`;
    if (needs.size > 0) fields.push(`needs: [${[...needs].join(", ")}]`);
    if (options.extras) {
      if (i % 7 === 3) fields.push("matrix: { x: [a, 2, true] }");
      if (i % 5 === 1) fields.push(`outputs: [o${i}.txt]`);
      if (i % 5 === 2 && i > 10) {
        fields.push(
          `inputs: { in: s${i - 1 - ((i - 1) % 5 === 1 ? 0 : 1)}/o${
            i - 1 - ((i - 1) % 5 === 1 ? 0 : 1)
          }.txt }`,
        );
      }
      if (i % 11 === 4) fields.push("env: { C: '3', A: two }", "timeout: 5s");
      if (i % 13 === 6) fields.push("retry: 4", "continue-on-error: true", "cache: true");
      if (i % 17 === 8) fields.push('when: "${{ always() }}"', "selector: { zone: b }");
      if (i % 19 === 9) fields.push("args: [a, b]", "backend: shell", "description: d");
    }
    lines.push(
      options.compact ? ` s${i}: {${fields.join(", ")}}` : `  s${i}:\n    ${fields.join("\n    ")}`,
    );
  }
  return lines.join("\n") + "\n";
}

const INLINE: Record<string, string> = {
  "features.yaml": `name: features
description: every kind of step
labels: { team: a }
run-name: run \${{ params.env }}
params:
  env: { type: enum, values: [dev, prod], default: dev }
  n: { type: number, default: 2 }
concurrency: 3
concurrency-key: { key: "k-\${{ params.env }}", limit: 2 }
deadline: 1h
retention: 3d
selector: { cloud: gcp }
env: { TOP: 1 }
secrets: { DB: db-password }
on-failure: { webhook: "https://example.com/h", retries: 1 }
on-success: { webhook: "https://example.com/s" }
alerts: { email: { to: [a@example.com] } }
defaults:
  backend: shell
  timeout: 30s
  queue-timeout: 5m
  retry: { max: 1, factor: 3 }
  env: { D: "d" }
  resources: { cpu: 500m, memory: 1Gi }
  selector: { zone: a }
steps:
  gen:
    run: echo \${{ params.env }} \${{ params.n }}
    outputs: [a.txt, { name: b.txt, retention: forever }]
    secrets: [DB]
    retention: 1d
    keep-partial: true
  legs:
    needs: gen
    matrix: { os: [linux, mac], v: [1, 2], include: [{ os: bsd, v: 9 }], exclude: [{ os: mac, v: 2 }] }
    run: build \${{ matrix.os }} \${{ matrix.v }}
    env: { OS: "\${{ matrix.os }}" }
    inputs: { in: gen/a.txt }
    outputs: [out.bin]
    concurrency: 2
    approval: { message: ok?, timeout: 10m, role: admin }
    on-failure: { webhook: "https://example.com/f", format: slack }
  merge:
    inputs: { parts: legs/out.bin }
    run: merge
    resources: { cpu: 2 }
    when: \${{ success() }}
  cleanup:
    handler: exit
    run: echo done
  notify:
    handler: failure
    run: echo failed
    when: \${{ true }}
`,
  "fanout.yaml": `name: dyn
steps:
  list:
    run: echo '[1,2]' > "$RUNNEL_OUTPUT_ITEMS_JSON"
    outputs: [items.json, data.csv]
  each:
    foreach: list/items.json
    run: echo \${{ item }}
    outputs: [r.txt]
  each2:
    foreach: { input: list/items.json, key: id }
    run: echo \${{ item.id }}
  batch:
    inputs: { data: list/data.csv }
    batch: { input: data, lines: 10, header: true }
    run: wc -l
  gather:
    inputs: { rs: each/r.txt }
    run: cat
`,
  "seed.yaml": `name: seed
start_node: a
steps:
  a: { run: echo a, next_node: b }
  b: { run: echo b, next_node: c }
  c: { backend: shell, run: echo c }
`,
  "docker.yaml": `name: dock
steps:
  build:
    build: { from: alpine, copy: [src], install: apk add x, env: { B: '1' } }
    run: make
    services:
      - { name: db, image: postgres, env: { P: 1 }, wait-for: { port: 5432 } }
  ssh:
    host: example.com
    run: uptime
    port: 2222
    agent: true
  kube:
    image: alpine
    command: [sh, -c, echo]
    namespace: ns
    node-selector: { disk: ssd }
  perms:
    module: ./steps/analyze.ts
    permissions: { read: [data], net: [example.com] }
`,
  "bad.yaml": `name: bad
steps:
  a: { run: echo, needs: [nope], tiemout: 5s }
  b: { run: 1, retry: { max: -1 } }
  c: { needs: a }
`,
  "missing.yaml": "name: m\nsteps:\n  a: { module: ./missing.ts }\n",
  "cycle.yaml": "name: c\nsteps:\n  a: { run: x, needs: b }\n  b: { run: y, needs: a }\n",
  "generated-1500-block.yaml": generated(1_500),
  "generated-3000-compact.yaml": generated(3_000, { compact: true }),
  "generated-4000-extras.yaml": generated(4_000, { compact: true, extras: true }),
  "generated-4000-extras-block.yaml": generated(4_000, { extras: true }),
  "generated-3000-bad.yaml": generated(3_000, { compact: true }).replace(
    "s2999: {run: echo 2999",
    "s2999: {run: echo 2999, tiemout: 5s",
  ),
  "generated-3000-params.yaml": generated(3_000, { compact: true })
    .replace("name: golden\n", "name: golden\nparams: { p: { type: string, default: v } }\n")
    .replace("s5: {run: echo 5", 's5: {run: "echo ${{ params.p }}", env: { E: "${{ params.p }}" }'),
  "generated-3000-cycle.yaml": generated(3_000, { compact: true }).replace(
    "s0: {run: echo 0}",
    "s0: {run: echo 0, needs: [s2999]}",
  ),
};

/** The text a pipeline loads to: its plan, or its errors, with this checkout's paths taken out. */
function outcome(source: string, file: string, baseDir: string): string {
  let text: string;
  try {
    text = JSON.stringify(parsePipeline(source, { file, baseDir }));
  } catch (error) {
    if (!(error instanceof PipelineError)) throw error;
    text = JSON.stringify(error.diagnostics);
  }
  return text.replaceAll(baseDir, "<base>");
}

/** Every pipeline of the test: examples/ and the inline ones above. */
function pipelines(): Array<{ name: string; source: string; baseDir: string }> {
  const found: Array<{ name: string; source: string; baseDir: string }> = [];
  const walk = (dir: string) => {
    for (const entry of [...Deno.readDirSync(dir)].sort((a, b) => a.name < b.name ? -1 : 1)) {
      const path = `${dir}/${entry.name}`;
      if (entry.isDirectory) walk(path);
      else if (/^pipeline.*\.yaml$/.test(entry.name)) {
        found.push({
          name: relative(root, path),
          source: Deno.readTextFileSync(path),
          baseDir: dir,
        });
      }
    }
  };
  walk(`${root}examples`);
  for (const [name, source] of Object.entries(INLINE)) {
    found.push({ name, source, baseDir: `${root}examples/energy` });
  }
  return found;
}

/** sha256 of each pipeline's {@link outcome}, from commit 62e5fe2. */
const EXPECTED: Record<string, string> = {
  "examples/batch/pipeline.yaml":
    "987e42c3d7c224d0fc38bbdeeab175dd74d9f930542c9ae1842b197677dfbd95",
  "examples/energy/pipeline.docker.yaml":
    "1f0953011a81eb34614736a3b4d2a0e116827c01988fe4ccd94b10e6458c43a5",
  "examples/energy/pipeline.kubernetes.yaml":
    "54771589352f8e2b0ada749d41c1deedce60820c8be3cb5ebd9413f8e2587616",
  "examples/energy/pipeline.ssh.yaml":
    "c8874168fb31c5bb797936a34f2f76b314272705f8fcbc77bc372e83f662347e",
  "examples/energy/pipeline.yaml":
    "1f06dfd1cba19e12dd923643b9f54198c4d20382ef9b064f74dd90970c9e64f7",
  "examples/fanout/pipeline.yaml":
    "6c286e60c243c98a963cd0a97e35fb83439e2785618245357913c8108e4c9c77",
  "examples/multicloud/pipeline.yaml":
    "5fd34447e472c28e7039ba09c4d2ce67f783996219ccf8740d4960e57b7d5b40",
  "features.yaml": "a79c981ff0dda2b4b6d16b1f11da6e710f966d58376f1be083f85bdd8fbfac28",
  "fanout.yaml": "710635176e2b4a4231aeaea5f244479e41e8e8395ea1c1aa26ba75aa3851af42",
  "seed.yaml": "53ee02675ed8c48ebb7f3eca6dab5806c752c46b5802222f6109eb9617cea00b",
  "docker.yaml": "05c64dd53b28809b7b6dabe4661325d9e7fbb4702531485003c14254a63eb44f",
  "bad.yaml": "8138843f1c5a9d495a29ee128ec045c0feee82ab28a4f1a9e6f36fa6b7aca431",
  "missing.yaml": "e7b765364a4ffeeeb49d35415dc02ee451a58455966496bcebbbeb543bc5780b",
  "cycle.yaml": "264b6c2384e7420a1c93b6a175dae1ffac8fbfb19c25e5229cfbe8ada77819a4",
  "generated-1500-block.yaml": "da8e3381f382a5021edb3f7fd896b7db5472138355aa72d97fe1ad689d12bd5e",
  "generated-3000-compact.yaml": "2bcf80c76c7fbbd2d18e279b88d15257e9d245c41518e968ffcc91d7f3959869",
  "generated-4000-extras.yaml": "816a958e35acb594cc4541b515726317c018cbfdb5a6190512b7d2b53ff95e5c",
  "generated-4000-extras-block.yaml":
    "788e0476f3554315f743f947de098cab8fca8285e7b93a1db3bd486455e49455",
  "generated-3000-bad.yaml": "f5ccdae668197ae7c173232e35758ded27414395c50a92eceac4bda37da439a8",
  "generated-3000-params.yaml": "1e23ad01593c0b849bca8b8ca0677c4eded6bae1a86bd70d620b5b16df9481f8",
  "generated-3000-cycle.yaml": "8468ec8dce3c2b703b5dc8c815dc17aafb3dad085644e17ed981af328940b850",
};

Deno.test("plans and errors are byte-identical to the base loader's", () => {
  const actual: Record<string, string> = {};
  for (const { name, source, baseDir } of pipelines()) {
    actual[name] = createHash("sha256").update(outcome(source, name, baseDir)).digest("hex");
  }
  if (Deno.env.get("RUNNEL_GOLDEN_PRINT")) console.log(JSON.stringify(actual, null, 2));
  assert.deepEqual(actual, EXPECTED);
});
