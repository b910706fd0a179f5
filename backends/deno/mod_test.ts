import assert from "node:assert/strict";
import { BUSINESS_EXIT_CODE } from "../../core/model.ts";
import { type AttemptSpec, isSuccess } from "../backend.ts";
import { parseProcessHandle } from "../_process.ts";
import { raceTimeout } from "../../core/_async.ts";
import { checkBackendConformance, type RunResult, runToEnd, scratchSpec } from "../testing.ts";
import { HARNESS_NONCE_ENV, parseReport, permissionMessage } from "./_report.ts";
import {
  createDenoBackend,
  denoArgs,
  type DenoBackend,
  importFlags,
  sandboxPermissions,
  validateDenoConfig,
  WARM_DIR,
} from "./mod.ts";

const backend = createDenoBackend();
const CONTEXT_URL = new URL("./context.ts", import.meta.url).href;

Deno.test("deno: the step gets its context and writes its output", async () => {
  const spec = await scratchSpec(
    { module: "steps/ok.ts", args: ["--fast"] },
    {
      files: {
        "steps/ok.ts": `
          export default async (ctx) => {
            const data = await Deno.readTextFile(ctx.inputs.data);
            ctx.log("read", data.length);
            await Deno.writeTextFile(ctx.outputs["summary.json"], JSON.stringify({
              data, args: ctx.args, matrix: ctx.matrix, ids: [ctx.runId, ctx.stepId, ctx.attempt],
              greeting: ctx.env.GREETING, outputsVar: ctx.env.RUNNEL_OUTPUT_SUMMARY_JSON,
              denoArgs: Deno.args,
            }));
          };`,
      },
      inputs: { data: "a,b\n1,2\n" },
      spec: { outputs: ["summary.json"], env: { GREETING: "hi" }, matrix: { region: "eu" } },
    },
  );
  try {
    const result = await runToEnd(await backend.start(spec));
    assert.ok(isSuccess(result.status), JSON.stringify(result));
    assert.equal(result.stdout, "read 8\n");
    const summary = JSON.parse(await Deno.readTextFile(`${spec.outputsDir}/summary.json`));
    assert.deepEqual(summary, {
      data: "a,b\n1,2\n",
      args: ["--fast"],
      matrix: { region: "eu" },
      ids: ["run1", "step", 1],
      greeting: "hi",
      outputsVar: `${spec.outputsDir}/summary.json`,
      denoArgs: ["--fast"],
    });
  } finally {
    await spec.remove();
  }
});

Deno.test("deno: a thrown BusinessError is a business error", async () => {
  const spec = await scratchSpec({ module: "b.ts" }, {
    files: {
      "b.ts": `import { BusinessError } from ${JSON.stringify(CONTEXT_URL)};
        export default () => { throw new BusinessError("the energy data is empty"); };`,
    },
  });
  try {
    const { status, stderr } = await runToEnd(await backend.start(spec));
    assert.equal(status.exitCode, BUSINESS_EXIT_CODE);
    assert.equal(status.errorClass, "business");
    assert.equal(status.message, "the energy data is empty");
    assert.equal(stderr.includes("::runnel-error:"), false, "the marker is not logged");
  } finally {
    await spec.remove();
  }
});

Deno.test("deno: other throws are application errors; the stack is logged", async () => {
  const spec = await scratchSpec({ module: "a.ts" }, {
    files: { "a.ts": `export default async () => { await 0; throw new TypeError("bad row 7"); };` },
  });
  try {
    const { status, stderr } = await runToEnd(await backend.start(spec));
    assert.equal(status.exitCode, 1);
    assert.equal(status.errorClass, "application");
    assert.equal(status.message, "bad row 7");
    assert.match(stderr, /TypeError: bad row 7/);
    assert.equal(stderr.includes("::runnel-error:"), false);
  } finally {
    await spec.remove();
  }
});

Deno.test("deno: a step cannot forge the harness's marker to choose its error class", async () => {
  const forged = [
    '::runnel-error::{"errorClass":"infrastructure","message":"retry me forever"}',
    '::runnel-error:guess::{"errorClass":"business","message":"not my fault"}',
  ];
  const spec = await scratchSpec({ module: "f.ts" }, {
    files: {
      "f.ts": `export default () => {
        // The nonce left the environment before this module evaluated.
        console.error("nonce:", Deno.env.get(${JSON.stringify(HARNESS_NONCE_ENV)}));
        for (const line of ${JSON.stringify(forged)}) console.error(line);
        Deno.exit(1);
      };`,
    },
  });
  try {
    const { status, stderr } = await runToEnd(await backend.start(spec));
    assert.deepEqual(status, {
      exitCode: 1,
      errorClass: "application",
      message: "step exited with code 1",
    });
    // The forged lines are plain output: logged as printed.
    assert.equal(stderr, ["nonce: undefined", ...forged, ""].join("\n"));
  } finally {
    await spec.remove();
  }
});

Deno.test("deno: a report names only a class the harness reports", () => {
  assert.deepEqual(parseReport('{"errorClass":"business","message":"empty"}'), {
    errorClass: "business",
    message: "empty",
  });
  for (
    const payload of [
      '{"errorClass":"infrastructure","message":"x"}',
      '{"errorClass":"cancelled","message":"x"}',
      '{"errorClass":"business"}',
      "not json",
      "null",
    ]
  ) {
    assert.equal(parseReport(payload), undefined, payload);
  }
});

Deno.test("deno: a module without a default export, or that fails to load", async () => {
  const spec = await scratchSpec({ module: "n.ts" }, { files: { "n.ts": "export const x = 1;" } });
  try {
    const { status } = await runToEnd(await backend.start(spec));
    assert.equal(status.errorClass, "application");
    assert.equal(status.message, 'step module "n.ts" has no default export function');
    spec.config = { module: "missing.ts" };
    const missing = await runToEnd(await backend.start(spec));
    assert.equal(missing.status.errorClass, "application");
    assert.match(missing.stderr, /missing\.ts/);
    assert.match(missing.status.message!, /^Module not found ".*missing\.ts"/);
  } finally {
    await spec.remove();
  }
});

Deno.test("deno: a missing declared output fails the attempt", async () => {
  const spec = await scratchSpec({ module: "m.ts" }, {
    files: { "m.ts": "export default () => {};" },
    spec: { outputs: ["summary.json"] },
  });
  try {
    const { status } = await runToEnd(await backend.start(spec));
    assert.equal(status.exitCode, 0);
    assert.equal(status.errorClass, "application");
    assert.equal(status.message, 'step did not write declared output "summary.json"');
  } finally {
    await spec.remove();
  }
});

Deno.test("deno: a permission error at module evaluation is still classified", async () => {
  const spec = await scratchSpec({ module: "t.ts" }, {
    files: { "t.ts": `Deno.env.get("HOME"); export default () => {};` },
  });
  try {
    const { status } = await runToEnd(await backend.start(spec));
    assert.equal(status.errorClass, "permission");
    assert.equal(
      status.message,
      'step needs env access to "HOME", which it was not granted (declare it under permissions.env)',
    );
  } finally {
    await spec.remove();
  }
});

Deno.test("deno: declared env vars pass through; others stay out", async () => {
  Deno.env.set("RUNNEL_TEST_DECLARED", "yes");
  Deno.env.set("RUNNEL_TEST_UNDECLARED", "no");
  const spec = await scratchSpec(
    { module: "e.ts", permissions: { env: ["RUNNEL_TEST_DECLARED"] } },
    {
      files: {
        "e.ts": `export default (ctx) => ctx.log(JSON.stringify(Object.keys(ctx.env).sort()),
          ctx.env.RUNNEL_TEST_DECLARED);`,
      },
    },
  );
  try {
    const { status, stdout } = await runToEnd(await backend.start(spec));
    assert.ok(isSuccess(status), JSON.stringify(status));
    const [names, value] = stdout.trim().split(" ");
    assert.equal(value, "yes");
    assert.ok(!JSON.parse(names).includes("RUNNEL_TEST_UNDECLARED"));
    assert.ok(JSON.parse(names).includes("RUNNEL_STEP"));
  } finally {
    Deno.env.delete("RUNNEL_TEST_DECLARED");
    Deno.env.delete("RUNNEL_TEST_UNDECLARED");
    await spec.remove();
  }
});

Deno.test("deno: logs stream live", async () => {
  const spec = await scratchSpec({ module: "l.ts" }, { files: {} });
  const go = `${spec.root}/go`;
  await Deno.writeTextFile(
    `${spec.baseDir}/l.ts`,
    `export default async (ctx) => {
      ctx.log("first");
      while (true) { try { await Deno.stat(${JSON.stringify(go)}); break; }
        catch { await new Promise((r) => setTimeout(r, 20)); } }
      ctx.log("second");
    };`,
  );
  spec.config = { module: "l.ts", permissions: { read: [go] } };
  try {
    const execution = await backend.start(spec);
    const iterator = execution.logs[Symbol.asyncIterator]();
    assert.equal(new TextDecoder().decode((await iterator.next()).value!.data), "first\n");
    await Deno.writeTextFile(go, "");
    assert.equal(new TextDecoder().decode((await iterator.next()).value!.data), "second\n");
    assert.equal((await iterator.next()).done, true);
    assert.ok(isSuccess(await execution.wait()));
  } finally {
    await spec.remove();
  }
});

Deno.test("deno: the sandbox flags grant only what the step declares", async () => {
  const spec = await scratchSpec(
    {
      module: "x.ts",
      permissions: { net: ["api.example.com:443"], read: ["data"], write: ["/tmp/extra"] },
    },
    { inputs: { data: "x" }, spec: { env: { TOKEN: "t0k3n" }, outputs: ["o"] } },
  );
  try {
    const granted = sandboxPermissions(spec);
    assert.deepEqual(granted.read, [spec.inputs.data, `${spec.baseDir}/data`]);
    assert.deepEqual(granted.write, [spec.outputsDir, "/tmp/extra"]);
    assert.deepEqual(granted.net, ["api.example.com:443"]);
    assert.ok(granted.env.includes("TOKEN") && granted.env.includes("RUNNEL_OUTPUT_O"));
    assert.deepEqual(granted.run, []);
    const args = denoArgs(spec, "/w/entry.ts");
    assert.equal(args[0], "run");
    assert.ok(args.includes("--no-prompt"));
    for (const forbidden of ["-A", "--allow-all", "--allow-run", "--allow-ffi", "--allow-sys"]) {
      assert.ok(!args.some((arg) => arg.startsWith(forbidden)), forbidden);
    }
    assert.ok(!args.join(" ").includes("t0k3n"), "secret values never reach the command line");
  } finally {
    await spec.remove();
  }
});

Deno.test("deno: permission messages say what to declare", () => {
  assert.equal(
    permissionMessage(
      'Requires net access to "evil.example:443", run again with the --allow-net flag',
    ),
    'step needs net access to "evil.example:443", which it was not granted (declare it under permissions.net)',
  );
  assert.equal(
    permissionMessage('Requires run access to "ls", run again with the --allow-run flag'),
    'step needs run access to "ls", which a deno step cannot be granted',
  );
  assert.equal(
    permissionMessage("Requires env access, run again with the --allow-env flag"),
    "step needs env access, which it was not granted (declare it under permissions.env)",
  );
});

Deno.test("deno: validate, capabilities and fingerprint", async () => {
  assert.deepEqual(backend.capabilities, { reattach: false, usage: false });
  assert.deepEqual(validateDenoConfig({ module: "a.ts" }), []);
  assert.match(validateDenoConfig({}).join(), /module/);
  assert.match(validateDenoConfig({ module: "a.ts", permissions: { run: ["x"] } }).join(), /run/);
  assert.match(validateDenoConfig({ module: "a.ts", permissions: { env: ["A-B"] } }).join(), /env/);
  const fingerprint = await backend.fingerprint();
  assert.equal(fingerprint.available, true);
  assert.equal(fingerprint.version, Deno.version.deno);
});

Deno.test("deno: keeps the backend contract", async () => {
  const report = await checkBackendConformance({
    backend: createDenoBackend,
    files: {
      "echo.ts": `export default (ctx) => ctx.log("hello");`,
      // A pending promise alone would end the process; a timer keeps it up.
      "long.ts": "export default () => new Promise(() => setInterval(() => {}, 1_000));",
    },
    echo: { config: { module: "echo.ts" }, stdout: "hello\n" },
    long: { config: { module: "long.ts" } },
  });
  assert.deepEqual(report.skipped, ["re-attaches after a restart"]);
});

Deno.test("deno: a step module loads only files of its pipeline directory, never their content in a message", async () => {
  const secret = "root:$6$hunter2-SECRET:19000:0:99999:7:::";
  const spec = await scratchSpec({ module: "steps/step.ts" }, {
    files: {
      "steps/lib.ts": "export const ok = 1;",
      "data.json": '{"fine": true}',
      ".runnel/state.db": secret,
    },
  });
  await Deno.writeTextFile(`${spec.root}/secret.txt`, secret);
  await Deno.writeTextFile(`${spec.root}/secret.json`, JSON.stringify({ secret }));
  await Deno.symlink(`${spec.root}/secret.txt`, `${spec.baseDir}/link.txt`);
  const attempt = async (source: string) => {
    await Deno.writeTextFile(`${spec.baseDir}/steps/step.ts`, source);
    const result = await runToEnd(await backend.start(spec));
    assert.ok(!JSON.stringify(result).includes("hunter2"), JSON.stringify(result));
    return result;
  };
  try {
    // What the pipeline holds loads, runnel's own step API too.
    const fine = await attempt(`import { ok } from "./lib.ts";
      import data from "../data.json" with { type: "json" };
      import { BusinessError } from ${JSON.stringify(CONTEXT_URL)};
      export default (ctx) => ctx.log(ok, data.fine, typeof BusinessError);`);
    assert.ok(isSuccess(fine.status), JSON.stringify(fine));
    assert.equal(fine.stdout, "1 true function\n");
    const refused: Array<[string, string]> = [
      [
        `import t from ${JSON.stringify(`${spec.root}/secret.txt`)} with { type: "text" };`,
        `"steps/step.ts" imports "${spec.root}/secret.txt", which is outside the pipeline directory`,
      ],
      [
        `import j from "../../secret.json" with { type: "json" };`,
        `"steps/step.ts" imports "${spec.root}/secret.json", which is outside the pipeline directory`,
      ],
      [
        `import db from "../.runnel/state.db" with { type: "text" };`,
        `"steps/step.ts" imports ".runnel/state.db", which is a hidden entry of the pipeline directory`,
      ],
      [
        `import t from "../link.txt" with { type: "text" };`,
        `"steps/step.ts" imports "link.txt", which is outside the pipeline directory (through a link)`,
      ],
      // Its first line would be quoted by the syntax error of the import.
      [`import "/etc/passwd";`, `"steps/step.ts" imports "/etc/passwd", which is outside`],
      [`import "./lib.ts"; import "file:///etc/hostname";`, `imports "/etc/hostname"`],
    ];
    for (const [line, expected] of refused) {
      const { status, stdout, stderr } = await attempt(`${line}\nexport default () => {};`);
      assert.equal(status.errorClass, "permission", line);
      assert.equal(status.exitCode, 77);
      assert.ok(status.message!.includes(expected), `${status.message}\n${expected}`);
      assert.match(
        status.message!,
        /a deno step may load only the files of its pipeline directory/,
      );
      assert.equal(stdout, "");
      assert.equal(stderr, `runnel: ${status.message}\n`);
      assert.ok(!stderr.includes("root:x:0:0"), "no line of /etc/passwd");
    }
    // A module fixed after a refusal runs (the cached check follows the files).
    const again = await attempt(`import { ok } from "./lib.ts"; export default (c) => c.log(ok);`);
    assert.ok(isSuccess(again.status), JSON.stringify(again));
  } finally {
    await spec.remove();
  }
});

Deno.test("deno: a step module outside the pipeline directory, or runtime env vars, are refused", async () => {
  const spec = await scratchSpec({ module: "../evil.ts" }, { files: {} });
  await Deno.writeTextFile(`${spec.root}/evil.ts`, "export default () => {};");
  try {
    const outside = await runToEnd(await backend.start(spec));
    assert.equal(outside.status.errorClass, "permission");
    assert.match(
      outside.status.message!,
      new RegExp(`^step module "${spec.root}/evil.ts" is outside the pipeline directory`),
    );
    await Deno.writeTextFile(`${spec.baseDir}/ok.ts`, "export default () => {};");
    spec.config = { module: "ok.ts" };
    spec.env = { LD_PRELOAD: `${spec.root}/evil.so`, deno_dir: "/tmp/x", GREETING: "hi" };
    const env = await runToEnd(await backend.start(spec));
    assert.equal(env.status.errorClass, "permission");
    assert.equal(
      env.status.message,
      'a deno step cannot set "LD_PRELOAD", "deno_dir": it configures the Deno runtime or the process, not the step',
    );
  } finally {
    await spec.remove();
  }
});

Deno.test("deno: remote modules load only from granted hosts; a step granted none fetches nothing", () => {
  assert.deepEqual(importFlags([]), ["--no-remote", "--cached-only"]);
  assert.deepEqual(importFlags(["api.example.com:443"]), ["--allow-import=api.example.com:443"]);
});

// Warm starts: steps of one key, each in its own attempt directories under
// one scratch root and pipeline directory, run cold and then warm.

/** A pipeline directory and scratch root whose attempts share their sandbox key. */
async function warmFixture(files: Record<string, string>, config: Record<string, unknown>) {
  const base = await scratchSpec(config, { files });
  let attempts = 0;
  return {
    base,
    /** A fresh attempt of the step: its own in/ and out/, `inputs` written into in/. */
    async attempt(
      options: { inputs?: Record<string, string>; env?: Record<string, string> } = {},
    ): Promise<AttemptSpec> {
      const dir = `${base.root}/attempt-${++attempts}`;
      await Deno.mkdir(`${dir}/in`, { recursive: true });
      await Deno.mkdir(`${dir}/out`);
      const inputs: Record<string, string> = {};
      for (const [name, text] of Object.entries(options.inputs ?? {})) {
        inputs[name] = `${dir}/in/${name}`;
        await Deno.writeTextFile(inputs[name], text);
      }
      return {
        ...base,
        attemptId: `run1/step/${attempts}`,
        workDir: dir,
        inputsDir: `${dir}/in`,
        outputsDir: `${dir}/out`,
        inputs,
        env: options.env ?? {},
      };
    },
  };
}

/** Starts `spec` on a warm backend whose pool holds a parked process of its key; checks it was used. */
async function startWarm(warm: DenoBackend, spec: AttemptSpec) {
  await warm.warmPool!.settled();
  const parked = warm.warmPool!.pids();
  const execution = await warm.start(spec);
  const pid = parseProcessHandle(execution.handle)!.pid;
  assert.ok(parked.includes(pid), `ran in a pre-started process (${pid} of ${parked})`);
  return { execution, pid };
}

/**
 * Runs `count` steps of one key on `warm`, so that its pool holds processes
 * of the key (one after two steps, two after three), and waits for them.
 */
async function repeatKey(
  warm: DenoBackend,
  count: number,
  attempt: () => Promise<AttemptSpec>,
): Promise<void> {
  for (let i = 0; i < count; i++) {
    const { status } = await runToEnd(await warm.start(await attempt()));
    assert.ok(isSuccess(status), JSON.stringify(status));
  }
  await warm.warmPool!.settled();
}

/**
 * A step's result with its attempt directory (or the warm slot standing for
 * it) named `<attempt>`, and without the harness's own stack frames (a warm
 * harness calls the step from `parkStep`).
 */
function normalized(result: RunResult, spec: AttemptSpec): RunResult {
  const text = (value: string) =>
    value.replaceAll(spec.workDir, "<attempt>")
      .replace(new RegExp(`${spec.scratchRoot}/${WARM_DIR}/slot-\\w+`, "g"), "<attempt>")
      .replace(/^ +at .*(_harness\.ts|runnel_step_entry\.ts).*\n/gm, "");
  return {
    status: JSON.parse(text(JSON.stringify(result.status))),
    stdout: text(result.stdout),
    stderr: text(result.stderr),
  };
}

/** True while `pid` is a live process (not gone, not a zombie), by ps(1): /proc needs --allow-all. */
async function isRunning(pid: number): Promise<boolean> {
  const { stdout } = await new Deno.Command("ps", {
    args: ["-o", "stat=", "-p", String(pid)],
    stdout: "piped",
    stderr: "null",
  }).output();
  const state = new TextDecoder().decode(stdout).trim();
  return state !== "" && !state.startsWith("Z");
}

/** A file of /proc, read by cat(1) (Deno reads /proc only under --allow-all). */
async function procFile(pid: number, name: string): Promise<string> {
  const { stdout } = await new Deno.Command("cat", {
    args: [`/proc/${pid}/${name}`],
    stdout: "piped",
    stderr: "null",
  }).output();
  return new TextDecoder().decode(stdout);
}

Deno.test("deno warm: a pre-started step gets the cold step's context, outputs, logs and exit", async () => {
  const fixture = await warmFixture({
    "s.ts": `
      const atLoad = Deno.env.get("GREETING");
      export default async (ctx) => {
        const data = await Deno.readTextFile(ctx.inputs.data);
        ctx.log("read", data, "at load", atLoad, "args", Deno.args.join(","));
        console.error("to stderr");
        await Deno.writeTextFile(ctx.outputs["summary.json"], JSON.stringify({
          data, env: ctx.env, matrix: ctx.matrix, ids: [ctx.runId, ctx.stepId],
          outputs: ctx.outputs, inputs: ctx.inputs, cwd: Deno.cwd(),
          relative: await Deno.readTextFile("in/data"),
        }));
        return { rows: 2 };
      };`,
  }, { module: "s.ts", args: ["--fast"] });
  const cold = createDenoBackend();
  const warm = createDenoBackend({ warm: true });
  try {
    const results = [];
    // Cold; then the key's first steps on the warm backend (cold, then pre-starting); then warm.
    for (const backend of [cold, warm, warm, warm]) {
      const spec = {
        ...await fixture.attempt({ inputs: { data: "a,b\n" }, env: { GREETING: "hi" } }),
        outputs: ["summary.json"],
        matrix: { region: "eu" },
      };
      const execution = results.length === 3
        ? (await startWarm(warm, spec)).execution
        : await backend.start(spec);
      const result = normalized(await runToEnd(execution), spec);
      const summary = (await Deno.readTextFile(`${spec.outputsDir}/summary.json`))
        .replaceAll(spec.workDir, "<attempt>")
        .replace(new RegExp(`${spec.scratchRoot}/${WARM_DIR}/slot-\\w+`, "g"), "<attempt>");
      const values = await Deno.readTextFile(`${spec.outputsDir}/.runnel-values`);
      // The inputs are back where the attempt put them.
      assert.equal(await Deno.readTextFile(spec.inputs.data), "a,b\n");
      results.push({ result, summary: JSON.parse(summary), values });
    }
    assert.ok(isSuccess(results[0].result.status), JSON.stringify(results[0]));
    assert.equal(results[0].result.stdout, "read a,b\n at load hi args --fast\n");
    assert.equal(results[0].result.stderr, "to stderr\n");
    assert.equal(results[0].values, "rows=2\n");
    assert.equal(results[0].summary.relative, "a,b\n");
    assert.deepEqual(results[3], results[0]);
    assert.deepEqual(results[1], results[0]);
    // Nothing of the slot is left; a replacement is parked in a new one.
    await warm.warmPool!.settled();
    const slots = await Array.fromAsync(Deno.readDir(`${fixture.base.root}/${WARM_DIR}`));
    assert.equal(slots.length, warm.warmPool!.pids().length);
  } finally {
    await warm.close();
    await fixture.base.remove();
  }
});

Deno.test("deno warm: failures and denials are those of a cold start", async () => {
  const fixture = await warmFixture({
    "f.ts": `
      import { BusinessError } from ${JSON.stringify(CONTEXT_URL)};
      export default async (ctx) => {
        const what = ctx.env.WHAT;
        if (what === "business") throw new BusinessError("the energy data is empty");
        if (what === "throw") throw new TypeError("bad row 7");
        if (what === "read") await Deno.readTextFile(${JSON.stringify("/etc/hostname")});
        if (what === "own") await Deno.readTextFile(new URL(import.meta.url).pathname);
        if (what === "context") await Deno.readTextFile(new URL(${
      JSON.stringify(CONTEXT_URL)
    }).pathname);
        if (what === "net") await Deno.connect({ hostname: "127.0.0.1", port: 9 });
        if (what === "stdin") ctx.log("stdin", JSON.stringify(await new Response(Deno.stdin.readable).text()));
        if (what === "exit") Deno.exit(3);
      };`,
  }, { module: "f.ts" });
  const cold = createDenoBackend();
  const warm = createDenoBackend({ warm: true });
  try {
    // The key's first steps run cold; the second pre-starts the next.
    await repeatKey(warm, 2, () => fixture.attempt({ env: { WHAT: "none" } }));
    for (const what of ["business", "throw", "read", "own", "context", "net", "stdin", "exit"]) {
      const coldSpec = await fixture.attempt({ env: { WHAT: what } });
      const expected = normalized(await runToEnd(await cold.start(coldSpec)), coldSpec);
      const warmSpec = await fixture.attempt({ env: { WHAT: what } });
      const { execution } = await startWarm(warm, warmSpec);
      const actual = normalized(await runToEnd(execution), warmSpec);
      assert.deepEqual(actual, expected, what);
      if (["read", "own", "context", "net"].includes(what)) {
        assert.equal(actual.status.errorClass, "permission", what);
      }
    }
  } finally {
    await warm.close();
    await fixture.base.remove();
  }
});

Deno.test("deno warm: a process runs one step; the next gets a fresh one", async () => {
  const fixture = await warmFixture({
    "g.ts": `
      globalThis.steps = (globalThis.steps ?? 0) + 1;
      export default (ctx) => { ctx.log("steps", globalThis.steps, "seen", globalThis.seen); globalThis.seen = ctx.env.SECRET; };`,
  }, { module: "g.ts" });
  const warm = createDenoBackend({ warm: true });
  try {
    await repeatKey(warm, 2, () => fixture.attempt({ env: { SECRET: "s0" } }));
    const pids = new Set<number>();
    for (let i = 1; i <= 3; i++) {
      const { execution, pid } = await startWarm(
        warm,
        await fixture.attempt({ env: { SECRET: `s${i}` } }),
      );
      const { status, stdout } = await runToEnd(execution);
      assert.ok(isSuccess(status), JSON.stringify(status));
      assert.equal(stdout, "steps 1 seen undefined\n");
      assert.equal(await isRunning(pid), false, "the process ended with its step");
      pids.add(pid);
    }
    assert.equal(pids.size, 3);
  } finally {
    await warm.close();
    await fixture.base.remove();
  }
});

Deno.test("deno warm: a parked process holds no step value, and no grant to load its step", async () => {
  const fixture = await warmFixture({ "p.ts": "export default () => {};" }, { module: "p.ts" });
  const warm = createDenoBackend({ warm: true });
  try {
    const secret = "hunter2-" + crypto.randomUUID();
    await repeatKey(warm, 2, () => fixture.attempt({ env: { TOKEN: secret } }));
    const [pid] = warm.warmPool!.pids();
    const environ = await procFile(pid, "environ");
    const cmdline = await procFile(pid, "cmdline");
    assert.ok(environ.includes("PATH="), "the environment was read");
    assert.equal(environ.includes(secret) || cmdline.includes(secret), false);
    assert.ok(cmdline.includes(`--allow-env=`) && cmdline.includes("TOKEN"), "granted by name");
  } finally {
    await warm.close();
    await fixture.base.remove();
  }
});

Deno.test("deno warm: cancel and a timeout's cancel kill the pre-started process", async () => {
  const fixture = await warmFixture({
    "w.ts": `export default async (ctx) => {
      if (ctx.env.MODE === "quick") return;
      ctx.log("waiting");
      if (ctx.env.MODE === "ignores-sigterm") Deno.addSignalListener("SIGTERM", () => {});
      await new Promise(() => setInterval(() => {}, 1000));
    };`,
  }, { module: "w.ts" });
  const warm = createDenoBackend({ warm: true });
  try {
    await repeatKey(warm, 2, () => fixture.attempt({ env: { MODE: "quick" } }));
    for (const mode of ["wait", "ignores-sigterm"]) {
      const { execution, pid } = await startWarm(
        warm,
        await fixture.attempt({ env: { MODE: mode } }),
      );
      const reader = execution.logs[Symbol.asyncIterator]();
      const first = await reader.next();
      assert.equal(new TextDecoder().decode(first.value!.data), "waiting\n");
      // A step that ignores SIGTERM outlives it: the grace ends in SIGKILL, as a timeout's does.
      await execution.cancel(mode === "ignores-sigterm" ? 200 : undefined);
      const status = await execution.wait();
      assert.equal(status.errorClass, "cancelled", mode);
      assert.equal(await isRunning(pid), false, mode);
      await execution.cleanup();
    }
  } finally {
    await warm.close();
    await fixture.base.remove();
  }
});

Deno.test("deno warm: close kills every pre-started process; the pool is bounded", async () => {
  const fixture = await warmFixture({
    "a.ts": "export default () => {};",
    "b.ts": "export default () => {};",
    "c.ts": "export default () => {};",
  }, { module: "a.ts" });
  const warm = createDenoBackend({ warm: { perKey: 2, total: 3 } });
  try {
    for (const module of ["a.ts", "b.ts", "c.ts"]) {
      await repeatKey(warm, 3, async () => ({ ...await fixture.attempt(), config: { module } }));
    }
    const pids = warm.warmPool!.pids();
    assert.equal(pids.length, 3, "two for a.ts, one for b.ts, none left for c.ts");
    for (const pid of pids) assert.ok(await isRunning(pid), `${pid} runs`);
    await warm.close();
    for (const pid of pids) assert.equal(await isRunning(pid), false, `${pid} is gone`);
    assert.deepEqual(warm.warmPool!.pids(), []);
    // A closed pool starts nothing more: a step runs cold.
    const after = await runToEnd(await warm.start(await fixture.attempt()));
    assert.ok(isSuccess(after.status));
    await warm.warmPool!.settled();
    assert.deepEqual(warm.warmPool!.pids(), []);
  } finally {
    await warm.close();
    await fixture.base.remove();
  }
});

Deno.test("deno warm: a parked process exits when its host is gone (stdin ends)", async () => {
  const fixture = await warmFixture({ "p.ts": "export default () => {};" }, { module: "p.ts" });
  const warm = createDenoBackend({ warm: { perKey: 1 } });
  try {
    await repeatKey(warm, 2, () => fixture.attempt());
    const [pid] = warm.warmPool!.pids();
    const process = warm.warmPool!.take<unknown>(warm.warmPool!.keys()[0])!;
    // As the host's end of the pipe closes when the host dies.
    await process.closeStdin();
    const status = await process.execution.wait();
    assert.equal(status.exitCode, 0);
    assert.equal(await isRunning(pid), false);
    await process.stop();
  } finally {
    await warm.close();
    await fixture.base.remove();
  }
});

Deno.test("deno warm: a runner that exits without closing leaves no pre-started process", async () => {
  const fixture = await warmFixture({ "p.ts": "export default () => {};" }, { module: "p.ts" });
  try {
    const script = `${fixture.base.root}/runner.ts`;
    await Deno.writeTextFile(
      script,
      `import { createDenoBackend } from ${
        JSON.stringify(new URL("./mod.ts", import.meta.url).href)
      };
      const spec = JSON.parse(Deno.args[0]);
      const warm = createDenoBackend({ warm: true });
      for (let i = 0; i < 3; i++) {
        const execution = await warm.start(spec);
        for await (const _ of execution.logs) { /* drain */ }
        await execution.wait();
      }
      await warm.warmPool.settled();
      console.log(JSON.stringify(warm.warmPool.pids()));
      Deno.exit(0);`,
    );
    const output = await new Deno.Command(Deno.execPath(), {
      args: ["run", "--allow-all", script, JSON.stringify(await fixture.attempt())],
      stdout: "piped",
    }).output();
    assert.ok(output.success);
    const pids: number[] = JSON.parse(new TextDecoder().decode(output.stdout));
    assert.equal(pids.length, 2);
    for (const pid of pids) assert.equal(await isRunning(pid), false, `${pid} is gone`);
  } finally {
    await fixture.base.remove();
  }
});

Deno.test("deno warm: killNow kills held processes at once, their stdin still open", async () => {
  const fixture = await warmFixture({ "p.ts": "export default () => {};" }, { module: "p.ts" });
  const warm = createDenoBackend({ warm: true });
  try {
    await repeatKey(warm, 3, () => fixture.attempt());
    const pids = warm.warmPool!.pids();
    assert.equal(pids.length, 2);
    // What the pool's unload listener does when the host exits.
    warm.warmPool!.killNow();
    assert.equal(await raceTimeout(warm.warmPool!.ended(), 10_000), false, "killed");
    for (const pid of pids) assert.equal(await isRunning(pid), false, `${pid} is gone`);
  } finally {
    await warm.close();
    await fixture.base.remove();
  }
});

Deno.test("deno warm: a key gets processes only once it repeats", async () => {
  const fixture = await warmFixture({ "p.ts": "export default () => {};" }, { module: "p.ts" });
  const warm = createDenoBackend({ warm: true });
  try {
    const counts = [];
    for (let step = 1; step <= 3; step++) {
      await repeatKey(warm, 1, () => fixture.attempt());
      counts.push(warm.warmPool!.pids().length);
    }
    assert.deepEqual(counts, [0, 1, 2]);
  } finally {
    await warm.close();
    await fixture.base.remove();
  }
});
