/**
 * runnel as a library, used the way a new user would: a project of its own
 * outside this repository (its own `deno.json`, no import map entry for
 * runnel) imports `mod.ts` by file path and by an `http://127.0.0.1` URL
 * served from this checkout, defines a pipeline in code with
 * `definePipeline` — a `shell` step writing an output and a `deno` step
 * whose module imports `BusinessError` from `mod.ts` and reads that output —
 * runs it with `runPipeline`, and reports what it got.
 *
 * The consumer runs as a `deno run` subprocess in its own directory with
 * the permissions it asks for, not `-A`; the test ends it, the server and
 * anything the run left behind by process id.
 *
 * @module
 */

import assert from "node:assert/strict";
import { join, resolve, sep } from "node:path";
import { processesMentioning } from "./_helpers.ts";

/** Absolute path of the repository root (no trailing slash). */
const ROOT = resolve(new URL("..", import.meta.url).pathname);
/** A consumer that has not finished by then is stuck: two cold plugin hosts take seconds. */
const CONSUMER_TIMEOUT_MS = 120_000;

/** Content types Deno accepts for modules it imports over http. */
const CONTENT_TYPES: Record<string, string> = {
  ".ts": "application/typescript; charset=utf-8",
  ".js": "application/javascript; charset=utf-8",
  ".json": "application/json; charset=utf-8",
};

/**
 * Serves files of the repository read-only (GET and HEAD), never a hidden
 * file or one outside it, on a free loopback port.
 */
function serveRepository(): Deno.HttpServer<Deno.NetAddr> {
  return Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (request) => {
    if (request.method !== "GET" && request.method !== "HEAD") {
      return new Response("read-only", { status: 405 });
    }
    const parts = decodeURIComponent(new URL(request.url).pathname).split("/").filter(Boolean);
    if (parts.some((part) => part.startsWith("."))) return new Response(null, { status: 404 });
    const file = resolve(ROOT, ...parts);
    if (!file.startsWith(ROOT + sep)) return new Response(null, { status: 404 });
    try {
      const bytes = await Deno.readFile(file);
      const extension = file.slice(file.lastIndexOf("."));
      const type = CONTENT_TYPES[extension] ?? "application/octet-stream";
      return new Response(request.method === "HEAD" ? null : bytes, {
        headers: { "content-type": type },
      });
    } catch {
      return new Response(null, { status: 404 });
    }
  });
}

/** The consumer's deno step: reads the shell step's output, refuses anything but a greeting. */
function stepModule(runnelModule: string): string {
  return [
    `import { BusinessError, type StepContext } from ${JSON.stringify(runnelModule)};`,
    "",
    "export default async function shout(context: StepContext): Promise<void> {",
    "  const greeting = await Deno.readTextFile(context.inputs.greeting);",
    '  if (context.args[0] === "refuse" || !greeting.startsWith("hello")) {',
    "    throw new BusinessError(`not a greeting: ${JSON.stringify(greeting)}`);",
    "  }",
    '  await Deno.writeTextFile(context.outputs["shouted.txt"], greeting.toUpperCase());',
    "}",
    "",
  ].join("\n");
}

/**
 * The consumer's program: defines the pipeline (without its deno steps when
 * given `--shell-only`), runs it, prints what it got as JSON.
 */
function mainModule(runnelModule: string): string {
  return [
    "import {",
    "  definePipeline,",
    "  openLocalArtifactStore,",
    "  runPipeline,",
    "  statePaths,",
    `} from ${JSON.stringify(runnelModule)};`,
    "",
    "const [stateDir, mode] = Deno.args;",
    "const denoSteps = {",
    "  shout: {",
    '    module: "./steps/shout.ts",',
    '    inputs: { greeting: "greet/greeting.txt" },',
    '    outputs: ["shouted.txt"],',
    "  },",
    "  refuse: {",
    '    module: "./steps/shout.ts",',
    '    args: ["refuse"],',
    '    inputs: { greeting: "greet/greeting.txt" },',
    "    retry: 2,",
    '    "continue-on-error": true,',
    "  },",
    "};",
    "// Relative modules resolve against the working directory: this project.",
    "const plan = definePipeline({",
    '  name: "consumer",',
    "  steps: {",
    "    greet: {",
    '      backend: "shell",',
    `      run: 'printf "hello from shell" > "$RUNNEL_OUTPUT_GREETING_TXT"',`,
    '      outputs: ["greeting.txt"],',
    "    },",
    '    ...(mode === "--shell-only" ? {} : denoSteps),',
    "  },",
    "});",
    "const summary = await runPipeline(plan, { stateDir });",
    "const artifacts = openLocalArtifactStore(statePaths(stateDir).artifacts);",
    "async function output(step: string, name: string): Promise<string | undefined> {",
    "  const record = await artifacts.get(summary.runId, step, name);",
    "  if (!record) return undefined;",
    "  await artifacts.materialize(record, `${stateDir}/${name}`);",
    "  return await Deno.readTextFile(`${stateDir}/${name}`);",
    "}",
    "const steps = Object.fromEntries(",
    "  Object.values(summary.steps).map((step) => [step.id, {",
    "    status: step.status,",
    "    attempts: step.attempts.length,",
    "    result: step.attempts.at(-1)?.result,",
    "  }]),",
    ");",
    "console.log(JSON.stringify({",
    "  status: summary.status,",
    "  steps,",
    '  greeting: await output("greet", "greeting.txt"),',
    '  shouted: await output("shout", "shouted.txt"),',
    "}));",
    "",
  ].join("\n");
}

/** What the consumer printed. */
interface ConsumerReport {
  status: string;
  steps: Record<string, {
    status: string;
    attempts: number;
    result?: { ok: boolean; errorClass?: string; message?: string };
  }>;
  greeting?: string;
  shouted?: string;
}

/** Sends SIGKILL to a process (or, negative, a process group) that may be gone already. */
function killIfAlive(pid: number): void {
  try {
    Deno.kill(pid, "SIGKILL");
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
}

/**
 * Runs `deno run PERMISSIONS main.ts STATE_DIR [MODE]` in the consumer project and
 * returns its report. The consumer leads its own process group, ended by
 * its id however the run ends, and so is anything the run left behind.
 */
async function runConsumer(
  project: string,
  main: string,
  args: string[],
  permissions: string[],
): Promise<ConsumerReport> {
  const stateDir = args[0];
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "--quiet", ...permissions, main, ...args],
    cwd: project,
    env: { NO_COLOR: "1" },
    stdout: "piped",
    stderr: "piped",
    detached: true,
  }).spawn();
  const timer = setTimeout(() => killIfAlive(-child.pid), CONSUMER_TIMEOUT_MS);
  let output: Deno.CommandOutput;
  try {
    output = await child.output();
  } finally {
    clearTimeout(timer);
    killIfAlive(-child.pid);
    // Steps lead process groups of their own; none may outlive the run.
    const left = await processesMentioning(stateDir);
    for (const { pid } of left) killIfAlive(pid);
    assert.deepEqual(left, [], "processes of the run outlived it");
  }
  const stdout = new TextDecoder().decode(output.stdout);
  const stderr = new TextDecoder().decode(output.stderr);
  assert.equal(output.code, 0, `consumer failed (${output.code}):\n${stderr}\n${stdout}`);
  return JSON.parse(stdout.trim().split("\n").at(-1)!);
}

/** Checks what the consumer got from a run of the whole pipeline. */
function assertReport(report: ConsumerReport): void {
  assert.equal(report.status, "succeeded", JSON.stringify(report, null, 2));
  assert.equal(report.greeting, "hello from shell");
  assert.equal(report.shouted, "HELLO FROM SHELL");
  assert.equal(report.steps.greet.status, "succeeded");
  assert.equal(report.steps.shout.status, "succeeded");
  // BusinessError from mod.ts is recognised as a business error: failed, never retried.
  assert.equal(report.steps.refuse.status, "failed");
  assert.equal(report.steps.refuse.attempts, 1);
  assert.equal(report.steps.refuse.result?.errorClass, "business");
  assert.match(report.steps.refuse.result?.message ?? "", /not a greeting: "hello from shell"/);
}

Deno.test("a project of its own imports runnel by path and by URL and runs a pipeline defined in code", async (t) => {
  const project = await Deno.realPath(await Deno.makeTempDir({ prefix: "runnel-consumer-" }));
  const states = await Deno.realPath(await Deno.makeTempDir({ prefix: "runnel-consumer-state-" }));
  assert.ok(!project.startsWith(ROOT + sep) && !states.startsWith(ROOT + sep));
  const server = serveRepository();
  try {
    const byPath = join(ROOT, "mod.ts");
    const byUrl = `http://127.0.0.1:${server.addr.port}/mod.ts`;
    // Its own configuration: no import map entry for runnel or its packages.
    await Deno.writeTextFile(join(project, "deno.json"), JSON.stringify({ imports: {} }) + "\n");
    await Deno.mkdir(join(project, "steps"));
    // A step imports runnel from where its runner has it: a sandbox loads files of its
    // pipeline directory, runnel's own files, and modules from the runner's origin.
    await Deno.writeTextFile(join(project, "steps", "shout.ts"), stepModule(byPath));
    await Deno.writeTextFile(join(project, "main_path.ts"), mainModule(byPath));
    await Deno.writeTextFile(join(project, "main_url.ts"), mainModule(byUrl));

    const permissions = (stateDir: string) => [
      `--allow-read=${project},${stateDir}`,
      `--allow-write=${stateDir}`,
      `--allow-run=${Deno.execPath()}`,
      "--allow-env",
      // The run's owner lease names its host.
      "--allow-sys=hostname",
    ];

    await t.step("by file path", async () => {
      const stateDir = join(states, "by-path");
      assertReport(await runConsumer(project, "main_path.ts", [stateDir], permissions(stateDir)));
    });

    const fromServer = `--allow-import=127.0.0.1:${server.addr.port}`;
    await t.step("by http URL", async () => {
      const stateDir = join(states, "by-url");
      const report = await runConsumer(
        project,
        "main_url.ts",
        [stateDir, "--shell-only"],
        [...permissions(stateDir), fromServer],
      );
      assert.equal(report.status, "succeeded", JSON.stringify(report, null, 2));
      assert.deepEqual(Object.keys(report.steps), ["greet"]);
      assert.equal(report.greeting, "hello from shell");
    });

    await t.step({
      name: "by http URL, with a deno step that imports BusinessError from that URL",
      fn: async () => {
        const stateDir = join(states, "by-url-deno");
        await Deno.writeTextFile(join(project, "steps", "shout.ts"), stepModule(byUrl));
        assertReport(
          await runConsumer(project, "main_url.ts", [stateDir], [
            ...permissions(stateDir),
            fromServer,
          ]),
        );
      },
    });
  } finally {
    await server.shutdown();
    await Deno.remove(project, { recursive: true });
    await Deno.remove(states, { recursive: true });
  }
});
