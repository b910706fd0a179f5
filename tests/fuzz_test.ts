/**
 * Seeded fuzzing of the pipeline loader: mutated files must give a plan or a
 * PipelineError with located diagnostics, never another exception or a hang.
 * Reproduce a failure with `RUNNEL_SEED=<seed>`.
 */
import assert from "node:assert/strict";
import { loadPipeline, parsePipeline } from "../core/load.ts";
import { formatDiagnostic, PipelineError } from "../core/errors.ts";
import { mulberry32, testSeed } from "../core/_random.ts";

const SEED = testSeed();
const CASES = 3000;
/** Per-case bound: a file of a few hundred bytes parses in well under a millisecond. */
const CASE_TIME_LIMIT_MS = 500;

const BASE = `name: energy-report
description: fuzz base
defaults: { backend: docker, timeout: 10m, retry: { max: 2, backoff: 2s } }
env: { MODE: prod, LEVEL: 3 }
secrets: { TOKEN: { env: TOK } }
concurrency: 4
on-failure: { webhook: "https://hooks.example/fail", retries: 2 }
steps:
  generate:
    image: runnel/python:local
    run: python gen.py --size \${{ matrix.size }}
    outputs: [energy.csv]
    matrix: { size: [1, 2], include: [{ size: 3 }] }
    resources: { cpu: 500m, memory: 64Mi }
  analyze:
    needs: [generate]
    backend: shell
    run: analyze
    inputs: { data: generate/energy.csv }
    outputs: [summary.json]
    secrets: [TOKEN]
    when: "\${{ success() && env.MODE == 'prod' }}"
    retry: { max: 3, on: [application, 137] }
  report:
    needs: analyze
    backend: ssh
    host: reports.internal
    run: ./make-report.sh
    inputs: { summary: analyze/summary.json }
    continue-on-error: true
`;

const WORDS = [
  "needs",
  "neds",
  "run",
  "steps",
  "matrix",
  "- x",
  "&a",
  "*a",
  "[",
  "{",
  "}",
  "]",
  ":",
  "'",
  '"',
  "${{",
  "|",
  ">",
  "? ",
  "!!binary",
  "10m",
  "ten",
  "-1",
  "null",
  "~",
  "\t",
  "include",
  "exclude",
];

function mutate(text: string, rnd: () => number): string {
  const lines = text.split("\n");
  const pick = (n: number) => Math.floor(rnd() * n);
  const line = pick(lines.length);
  switch (pick(9)) {
    case 0: // delete a line (a key)
      lines.splice(line, 1);
      break;
    case 1: // duplicate a line
      lines.splice(line, 0, lines[line]);
      break;
    case 2: // rename a key
      lines[line] = lines[line].replace(/[A-Za-z_-]+:/, `${WORDS[pick(WORDS.length)]}x:`);
      break;
    case 3: // change a value's type
      lines[line] = lines[line].replace(
        /: .*$/,
        `: ${["[]", "{}", "42", "true", "null", "'s'", "[1, {a: b}]"][pick(7)]}`,
      );
      break;
    case 4: { // random bytes
      const at = pick(text.length);
      const junk = Array.from({ length: 1 + pick(8) }, () => String.fromCharCode(pick(0x3000)))
        .join("");
      return text.slice(0, at) + junk + text.slice(at);
    }
    case 5: // truncate
      return text.slice(0, pick(text.length));
    case 6: // swap indentation
      lines[line] = rnd() < 0.5 ? `  ${lines[line]}` : lines[line].replace(/^ {1,2}/, "");
      break;
    case 7: { // insert a token
      const at = pick(text.length);
      return text.slice(0, at) + WORDS[pick(WORDS.length)] + text.slice(at);
    }
    case 8: // swap two lines
    {
      const other = pick(lines.length);
      [lines[line], lines[other]] = [lines[other], lines[line]];
    }
  }
  return lines.join("\n");
}

function check(source: string, label: string): void {
  const started = performance.now();
  try {
    const plan = parsePipeline(source, { file: "fuzz.yaml", baseDir: "/nonexistent" });
    assert.ok(plan.order.length > 0, label);
  } catch (error) {
    if (!(error instanceof PipelineError)) {
      throw new Error(`${label}: unexpected ${String(error)}\n--- source ---\n${source}`, {
        cause: error,
      });
    }
    assert.ok(error.diagnostics.length > 0, label);
    for (const d of error.diagnostics) {
      assert.ok(d.line >= 1 && d.col >= 1, `${label}: bad position ${JSON.stringify(d)}`);
      assert.match(formatDiagnostic(d), /^fuzz\.yaml:\d+:\d+: \S/, label);
    }
  }
  const took = performance.now() - started;
  assert.ok(took < CASE_TIME_LIMIT_MS, `${label}: took ${took.toFixed(0)} ms`);
}

Deno.test(`fuzzed pipelines give a plan or located diagnostics (RUNNEL_SEED=${SEED})`, () => {
  const rnd = mulberry32(SEED);
  check(BASE, "base");
  for (let i = 0; i < CASES; i++) {
    let text = BASE;
    const rounds = 1 + Math.floor(rnd() * 4);
    for (let r = 0; r < rounds; r++) text = mutate(text, rnd);
    try {
      check(text, `case ${i}`);
    } catch (error) {
      console.error(`fuzz failure with RUNNEL_SEED=${SEED} at case ${i}`);
      throw error;
    }
  }
});

Deno.test("explicit hostile inputs", () => {
  const codes = (source: string) => {
    try {
      parsePipeline(source, { file: "fuzz.yaml" });
      return [];
    } catch (error) {
      assert.ok(error instanceof PipelineError);
      return error.diagnostics.map((d) => [d.code, d.line, d.col]);
    }
  };
  assert.deepEqual(codes(""), [["empty", 1, 1]]);
  assert.deepEqual(codes("a: 1\n".repeat(2_000_001)), [["too_large", 1, 1]]);
  const garbage = Array.from({ length: 4096 }, (_, i) => String.fromCharCode((i * 7919) % 256))
    .join("");
  assert.equal(codes(garbage)[0][0], "binary");
  const bomb = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"];
  for (let i = 1; i <= 9; i++) {
    bomb.push(`l${i}: &l${i} [${Array(9).fill(i === 1 ? "*a" : `*l${i - 1}`).join(",")}]`);
  }
  const started = performance.now();
  assert.deepEqual(codes(bomb.join("\n")), [["yaml_aliases", 1, 1]]);
  assert.ok(performance.now() - started < 2000);
});

Deno.test("unreadable files are located errors", async () => {
  const dir = await Deno.makeTempDir({ prefix: "runnel_fuzz_" });
  const locked = `${dir}/locked.yaml`;
  await Deno.writeTextFile(locked, BASE);
  await Deno.chmod(locked, 0o000);
  // root reads a mode-000 file anyway; then only the directory case applies.
  const lockedReadable = await Deno.readFile(locked).then(() => true, () => false);
  for (const path of lockedReadable ? [dir] : [locked, dir]) {
    await assert.rejects(() => loadPipeline(path), (error: unknown) => {
      assert.ok(error instanceof PipelineError);
      assert.equal(error.diagnostics[0].code, "unreadable");
      assert.match(formatDiagnostic(error.diagnostics[0]), /:1:1: /);
      return true;
    });
  }
  const huge = `${dir}/huge.yaml`;
  await Deno.writeTextFile(huge, "a: 1\n".repeat(2_100_000));
  await assert.rejects(() => loadPipeline(huge), /at most 5 MiB/);
  await Deno.remove(dir, { recursive: true });
});
