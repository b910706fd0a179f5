import assert from "node:assert/strict";
import { BUSINESS_EXIT_CODE } from "../../core/model.ts";
import { isSuccess } from "../backend.ts";
import { checkBackendConformance, runToEnd, scratchSpec } from "../testing.ts";
import { HARNESS_NONCE_ENV, parseReport, permissionMessage } from "./_report.ts";
import {
  createDenoBackend,
  denoArgs,
  importFlags,
  sandboxPermissions,
  validateDenoConfig,
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
