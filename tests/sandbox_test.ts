/**
 * The `deno` backend's sandbox against real subprocesses: a step reaches
 * exactly what it was granted, and reaching past it is a `permission`
 * failure that names what was lacking.
 */

import assert from "node:assert/strict";
import { type ExitStatus, isSuccess } from "../backends/backend.ts";
import { createDenoBackend } from "../backends/deno/mod.ts";
import { runToEnd, type ScratchOptions, scratchSpec } from "../backends/testing.ts";

const backend = createDenoBackend();

async function runStep(
  source: string,
  config: Record<string, unknown> = {},
  options: ScratchOptions = {},
): Promise<{ status: ExitStatus; stdout: string; stderr: string; root: string }> {
  const spec = await scratchSpec({ module: "step.ts", ...config }, {
    ...options,
    files: { "step.ts": source, ...options.files },
  });
  try {
    return { ...(await runToEnd(await backend.start(spec))), root: spec.root };
  } finally {
    await spec.remove();
  }
}

Deno.test("sandbox: reading a file outside the grant names the path", async () => {
  const { status } = await runStep(`export default () => Deno.readTextFile("/etc/shadow");`);
  assert.equal(status.errorClass, "permission");
  assert.equal(
    status.message,
    'step needs read access to "/etc/shadow", which it was not granted (declare it under permissions.read)',
  );
});

Deno.test("sandbox: the step module's own directory is not readable either", async () => {
  const { status } = await runStep(
    `export default () => Deno.readTextFile(new URL("./secret.txt", import.meta.url));`,
    {},
    { files: { "secret.txt": "nope" } },
  );
  assert.equal(status.errorClass, "permission");
  assert.match(status.message!, /read access to ".*\/pipeline\/secret\.txt"/);
});

Deno.test("sandbox: fetching an undeclared host names the host", async () => {
  const { status } = await runStep(
    `export default () => fetch("https://undeclared.example.invalid/data");`,
    { permissions: { net: ["declared.example.invalid"] } },
  );
  assert.equal(status.errorClass, "permission");
  assert.equal(
    status.message,
    'step needs net access to "undeclared.example.invalid:443", which it was not granted (declare it under permissions.net)',
  );
});

Deno.test("sandbox: reading an undeclared env var names the var", async () => {
  Deno.env.set("RUNNEL_SANDBOX_SECRET", "hidden");
  try {
    const { status } = await runStep(
      `export default () => Deno.env.get("RUNNEL_SANDBOX_SECRET");`,
    );
    assert.equal(status.errorClass, "permission");
    assert.equal(
      status.message,
      'step needs env access to "RUNNEL_SANDBOX_SECRET", which it was not granted (declare it under permissions.env)',
    );
  } finally {
    Deno.env.delete("RUNNEL_SANDBOX_SECRET");
  }
});

Deno.test("sandbox: a step within its grant succeeds and writes its output", async () => {
  const spec = await scratchSpec({ module: "step.ts" }, {
    files: {
      "step.ts": `export default async (ctx) => {
        const rows = (await Deno.readTextFile(ctx.inputs.data)).trim().split("\\n").length;
        await Deno.writeTextFile(ctx.outputs["summary.json"],
          JSON.stringify({ rows, token: ctx.env.TOKEN }));
      };`,
    },
    inputs: { data: "a\nb\nc\n" },
    spec: { outputs: ["summary.json"], env: { TOKEN: "from-secret" } },
  });
  try {
    const { status } = await runToEnd(await backend.start(spec));
    assert.ok(isSuccess(status), JSON.stringify(status));
    assert.deepEqual(JSON.parse(await Deno.readTextFile(`${spec.outputsDir}/summary.json`)), {
      rows: 3,
      token: "from-secret",
    });
  } finally {
    await spec.remove();
  }
});

Deno.test("sandbox: writing outside the outputs directory fails", async () => {
  const { status, root } = await runStep(
    `export default (ctx) => Deno.writeTextFile(ctx.outputs.out + "/../../escaped.txt", "x");`,
    {},
    { spec: { outputs: ["out"] } },
  );
  assert.equal(status.errorClass, "permission");
  assert.match(
    status.message!,
    /^step needs write access to ".*escaped\.txt", which it was not granted/,
  );
  assert.equal(await Deno.stat(`${root}/escaped.txt`).then(() => true, () => false), false);
});

Deno.test("sandbox: spawning a process is never allowed", async () => {
  const { status } = await runStep(
    `export default () => new Deno.Command("id").output();`,
  );
  assert.equal(status.errorClass, "permission");
  assert.match(status.message!, /run access to "id", which a deno step cannot be granted/);
});

Deno.test("sandbox: cancelling a long-running step returns promptly", async () => {
  const spec = await scratchSpec({ module: "step.ts" }, {
    files: {
      "step.ts":
        `export default (ctx) => { ctx.log("started"); return new Promise(() => setInterval(() => {}, 1000)); };`,
    },
  });
  try {
    const execution = await backend.start(spec);
    const iterator = execution.logs[Symbol.asyncIterator]();
    assert.equal(new TextDecoder().decode((await iterator.next()).value!.data), "started\n");
    const started = performance.now();
    await execution.cancel();
    const status = await execution.wait();
    const elapsedMs = performance.now() - started;
    assert.ok(elapsedMs < 1_000, `cancel took ${elapsedMs.toFixed(0)} ms`);
    assert.equal(status.errorClass, "cancelled");
    assert.equal(status.signal, "SIGTERM");
    await execution.cleanup();
  } finally {
    await spec.remove();
  }
});
