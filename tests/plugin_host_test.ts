/**
 * The plugin system with real subprocesses: warm and idle hosts, the
 * sandbox refusing a malicious plugin, crashing and hanging hosts replaced,
 * third-party plugins from a path and from a URL.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  builtinPlugins,
  PluginHostError,
  PluginHostPool,
  PluginPermissionError,
  type PluginSource,
} from "../backends/mod.ts";
import { isSuccess } from "../backends/backend.ts";
import { processAlive } from "../backends/_testing.ts";
import { runToEnd, type ScratchAttempt, scratchSpec } from "../backends/testing.ts";
import { parseProcessHandle } from "../backends/_process.ts";
import { loadPipeline } from "../core/load.ts";
import { runPipeline } from "../agent/local/mod.ts";
import { poll, ROOT, runCli, sandbox } from "./_helpers.ts";

const EVIL: PluginSource = {
  name: "evil",
  module: new URL("./fixtures/plugins/evil/mod.ts", import.meta.url).href,
};
const LIAR: PluginSource = {
  name: "liar",
  module: new URL("./fixtures/plugins/liar/mod.ts", import.meta.url).href,
};
const HTTP: PluginSource = {
  name: "http",
  module: new URL("../examples/backends/http/mod.ts", import.meta.url).href,
};

function openPool(
  scratchRoot: string,
  options: Partial<ConstructorParameters<typeof PluginHostPool>[0]> = {},
) {
  return new PluginHostPool({
    plugins: [...builtinPlugins(), EVIL, LIAR, HTTP],
    context: { scratchRoot, agentId: "plugin-test" },
    ...options,
  });
}

Deno.test("plugin hosts: the first step starts a host, later ones reuse it, an idle one stops", async () => {
  const spec = await scratchSpec({ run: "echo warm" });
  const pool = openPool(spec.root, { idleMs: 300 });
  try {
    for (let i = 0; i < 3; i++) {
      const result = await runOn(pool, "shell", spec);
      assert.ok(isSuccess(result.status), JSON.stringify(result));
      assert.equal(result.stdout, "warm\n");
    }
    const metrics = pool.metrics();
    assert.equal(metrics.coldStarts, 1);
    assert.equal(metrics.warmHits, 2);
    assert.equal(metrics.hostsAlive, 1);
    await poll(() => pool.metrics().hostsAlive === 0 ? true : undefined, {
      what: "the idle host to stop",
      timeoutMs: 10_000,
    });
  } finally {
    await pool.close();
    await spec.remove();
  }
});

Deno.test("plugin hosts: the host gets exactly the manifest's grant and a cleared environment", async () => {
  Deno.env.set("RUNNEL_TEST_HOST_LEAK", "leaked");
  const spec = await scratchSpec({
    run: 'echo "${RUNNEL_TEST_HOST_LEAK:-none}"; cat /proc/$PPID/cmdline | tr "\\0" " "',
  });
  const pool = openPool(spec.root);
  try {
    const result = await runOn(pool, "shell", spec);
    assert.ok(isSuccess(result.status), JSON.stringify(result));
    const [leak, hostCommand] = result.stdout.split("\n");
    assert.equal(leak, "none");
    // The shell's parent is its plugin host: never -A, only the shell backend's grant.
    assert.match(hostCommand, /deno run --no-prompt/);
    assert.doesNotMatch(hostCommand, / -A | --allow-all/);
    assert.match(hostCommand, /--allow-env=HOME,LANG,PATH,TERM /);
    assert.match(hostCommand, /--allow-run=\/bin\/sh,\/usr\/bin\/setsid,/);
    assert.doesNotMatch(hostCommand, /--allow-net|--allow-write/);
  } finally {
    Deno.env.delete("RUNNEL_TEST_HOST_LEAK");
    await pool.close();
    await spec.remove();
  }
});

Deno.test("sandbox: a malicious plugin fails its steps with the permission named, nothing else is harmed", async () => {
  await using box = await sandbox();
  // A listener the plugin was not granted: it must never see a connection.
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  let connections = 0;
  const accepting = (async () => {
    for await (const conn of listener) {
      connections++;
      conn.close();
    }
  })();
  Deno.env.set("RUNNEL_TEST_SECRET", "s3cret");
  try {
    const file = await box.write(
      "pipeline.yaml",
      `name: sandbox
steps:
  shadow: { backend: evil, with: { act: read-shadow } }
  socket: { backend: evil, with: { act: open-socket, target: "127.0.0.1:${port}" } }
  env: { backend: evil, with: { act: read-env } }
  honest: { backend: evil, with: { act: ok } }
  after: { backend: shell, needs: [shadow], when: "\${{ always() }}", run: echo still running }
`,
    );
    const plan = await loadPipeline(file, { backends: ["evil"] });
    const summary = await runPipeline(plan, { stateDir: box.stateDir, plugins: [EVIL] });
    assert.equal(summary.status, "failed");
    const failure = (step: string) => {
      const result = summary.steps[step].attempts.at(-1)?.result;
      assert.ok(result && !result.ok, `${step}: ${JSON.stringify(result)}`);
      assert.equal(result.errorClass, "permission", JSON.stringify(result));
      // A permission error is not retried: the step had one attempt.
      assert.equal(summary.steps[step].attempts.length, 1);
      return result.message;
    };
    assert.match(failure("shadow"), /backend "evil" was denied read access to "\/etc\/shadow"/);
    assert.match(
      failure("socket"),
      new RegExp(`was denied net access to "127\\.0\\.0\\.1:${port}"`),
    );
    assert.match(failure("env"), /was denied env access to "RUNNEL_TEST_SECRET"/);
    assert.equal(summary.steps.honest.status, "succeeded");
    assert.equal(summary.steps.after.status, "succeeded");
    assert.equal(connections, 0);
  } finally {
    Deno.env.delete("RUNNEL_TEST_SECRET");
    listener.close();
    await accepting.catch(() => {});
  }
});

Deno.test("plugin hosts: a crashing host fails its step as infrastructure and is replaced", async () => {
  const spec = await scratchSpec({ with: { act: "crash" } });
  const pool = openPool(spec.root);
  try {
    await assert.rejects(
      pool.backend("evil").start(spec),
      (error: unknown) =>
        error instanceof PluginHostError && /exited with code 3/.test(error.message) &&
        error.errorClass === "infrastructure",
    );
    const later = await runOn(pool, "evil", spec, { with: { act: "crash-later" } });
    assert.equal(later.stdout, "about to crash\n");
    assert.equal(later.status.errorClass, "infrastructure");
    assert.match(later.status.message ?? "", /host exited with code 7; it will be replaced/);
    const ok = await runOn(pool, "evil", spec, { with: { act: "ok" } });
    assert.ok(isSuccess(ok.status), JSON.stringify(ok));
    assert.equal(pool.metrics().hostsLost, 2);
  } finally {
    await pool.close();
    await spec.remove();
  }
});

for (
  const [act, printed, said] of [
    ["print-and-crash", "a number", "stray output: 42"],
    ["forge-and-crash", "a forged message", 'malformed message: {"hello":null}'],
  ] as const
) {
  Deno.test(`plugin hosts: a host whose plugin printed ${printed} last on stdout is lost, not the runner`, async () => {
    const spec = await scratchSpec({ with: { act } });
    const diagnostics: string[] = [];
    const pool = openPool(spec.root, { onDiagnostic: (_name, text) => diagnostics.push(text) });
    try {
      await assert.rejects(
        pool.backend("evil").start(spec),
        (error: unknown) => error instanceof PluginHostError,
      );
      // The unfinished last line is read once the pipe ends, as any other output.
      await poll(() => diagnostics.includes(said) ? true : undefined, {
        what: "the plugin's output to be reported",
      });
    } finally {
      await pool.close();
      await spec.remove();
    }
  });
}

Deno.test("plugin hosts: a host killed mid-step fails the step and its processes are reaped", async () => {
  const spec = await scratchSpec({ run: "echo started; sleep 30" });
  const pool = openPool(spec.root);
  try {
    const execution = await pool.backend("shell").start(spec);
    const stepPid = parseProcessHandle(execution.handle)!.pid;
    assert.ok(await processAlive(stepPid));
    const hosts = await childPids(Deno.pid);
    const host = hosts.find((pid) => pid !== stepPid)!;
    Deno.kill(host, "SIGKILL");
    const status = await execution.wait();
    assert.equal(status.errorClass, "infrastructure");
    assert.match(
      status.message ?? "",
      /backend "shell" host was killed by SIGKILL; it will be replaced/,
    );
    // The step's process group was reaped through a fresh host.
    await poll(async () => (await processAlive(stepPid)) ? undefined : true, {
      what: "the lost step's sleep to be reaped",
    });
    await execution.cleanup();
    const again = await runOn(pool, "shell", spec, { run: "echo ok" });
    assert.equal(again.stdout, "ok\n");
    assert.equal(pool.metrics().hostsLost, 1);
  } finally {
    await pool.close();
    await spec.remove();
  }
});

Deno.test("plugin hosts: a sandboxed recover checks a handle's process before killing it", async () => {
  const spec = await scratchSpec({ run: "echo started; sleep 30" });
  const pool = openPool(spec.root);
  const execution = await pool.backend("shell").start(spec);
  try {
    const { pid, startMs } = parseProcessHandle(execution.handle)!;
    const recover = (handles: string[]) =>
      pool.backend("shell").recover({ agentId: "plugin-test", keep: [], handles });
    // Through a host granted only ps(1) and kill(1) besides the shell.
    assert.deepEqual(await recover([`${pid}@${startMs - 3_600_000}`, String(pid), "x"]), []);
    assert.equal(await processAlive(pid), true, "a stale handle is left alone");
    assert.deepEqual(await recover([execution.handle]), []);
    assert.equal((await execution.wait()).signal, "SIGKILL");
    assert.equal(await processAlive(pid), false);
  } finally {
    await execution.cleanup();
    await pool.close();
    await spec.remove();
  }
});

Deno.test("plugin hosts: a backend's declared capabilities cross the protocol, checked", async () => {
  const spec = await scratchSpec({});
  const pool = openPool(spec.root);
  try {
    assert.deepEqual(pool.backend("docker").capabilities, { reattach: true, usage: true });
    assert.deepEqual(pool.backend("shell").capabilities, { reattach: false, usage: false });
    // A third-party backend's come from its sandboxed manifest, once read.
    const evil = pool.backend("evil");
    assert.deepEqual(evil.capabilities, { reattach: false, usage: false });
    assert.equal((await evil.fingerprint()).available, true);
    assert.deepEqual(evil.capabilities, { reattach: false, usage: true });
    // A backend whose code claims what its manifest does not is refused.
    const liar = await pool.backend("liar").fingerprint();
    assert.equal(liar.available, false);
    assert.match(
      liar.detail,
      /backend "liar" declares capabilities \{"reattach":true,"usage":false\} but its manifest \{"reattach":false,"usage":false\}/,
    );
  } finally {
    await pool.close();
    await spec.remove();
  }
});

Deno.test("plugin hosts: a hung host is found by its heartbeat, killed and replaced", async () => {
  const spec = await scratchSpec({ with: { act: "hang" } });
  const pool = openPool(spec.root, { heartbeatMs: 100, heartbeatTimeoutMs: 600 });
  try {
    const started = Date.now();
    await assert.rejects(
      pool.backend("evil").start(spec),
      (error: unknown) =>
        error instanceof PluginHostError && /stopped answering heartbeats/.test(error.message),
    );
    assert.ok(Date.now() - started < 10_000, "the hang was noticed in time");
    const ok = await runOn(pool, "evil", spec, { with: { act: "ok" } });
    assert.ok(isSuccess(ok.status), JSON.stringify(ok));
  } finally {
    await pool.close();
    await spec.remove();
  }
});

Deno.test("plugin hosts: a third-party manifest runs in a host granted nothing", async () => {
  const spec = await scratchSpec({ with: { act: "manifest-read" } });
  const pool = openPool(spec.root);
  try {
    await assert.rejects(
      pool.backend("evil").start(spec),
      (error: unknown) =>
        error instanceof PluginPermissionError &&
        /read access to "\/etc\/hostname"/.test(error.message),
    );
    assert.deepEqual(await pool.validate("evil", { with: { act: "fly" } }), [
      '"with.act": Invalid option: expected one of "ok"|"read-shadow"|"open-socket"|"read-env"|"crash"|"hang"|"crash-later"|"print-and-crash"|"forge-and-crash"|"manifest-read"',
    ]);
  } finally {
    await pool.close();
    await spec.remove();
  }
});

Deno.test("third-party plugins: the example http backend, from a path and from a URL", async () => {
  await using box = await sandbox();
  const api = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen() {} },
    (request) => new Response(`hello ${new URL(request.url).pathname}\n`),
  );
  // Serves the repository, as a plugin registry would serve a plugin.
  const files = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (request) => {
    const path = decodeURIComponent(new URL(request.url).pathname);
    if (path.includes("..")) return new Response("no", { status: 400 });
    try {
      return new Response(await Deno.readFile(`${ROOT}${path}`), {
        headers: { "content-type": "application/typescript" },
      });
    } catch {
      return new Response("not found", { status: 404 });
    }
  });
  try {
    const file = await box.write(
      "pipeline.yaml",
      `name: http-demo
steps:
  fetch:
    backend: http
    with: { url: "http://127.0.0.1:${api.addr.port}/greeting", output: body.txt }
    outputs: [body.txt]
  show:
    backend: shell
    inputs: { body: fetch/body.txt }
    run: cat "$RUNNEL_INPUT_BODY"
`,
    );
    const byPath = await runCli(
      [
        "run",
        file,
        "--state-dir",
        box.stateDir,
        "--logs",
        "--plugin",
        `http=${ROOT}/examples/backends/http`,
      ],
      { cwd: box.dir },
    );
    assert.equal(byPath.code, 0, byPath.stderr + byPath.stdout);
    assert.match(byPath.stdout, /GET http:\/\/127\.0\.0\.1:\d+\/greeting → 200 OK/);
    assert.match(byPath.stdout, /show │ hello \/greeting/);

    const url = `http://127.0.0.1:${files.addr.port}/examples/backends/http/`;
    await box.write("agent.yaml", `plugins:\n  http: ${url}\n`);
    const byUrl = await runCli(
      ["run", file, "--state-dir", box.stateDir, "--logs", "--config", "agent.yaml"],
      { cwd: box.dir },
    );
    assert.equal(byUrl.code, 0, byUrl.stderr + byUrl.stdout);
    assert.match(byUrl.stdout, /show │ hello \/greeting/);

    const listed = await runCli(["backends", "--config", "agent.yaml"], { cwd: box.dir });
    assert.equal(listed.code, 0, listed.stderr);
    assert.match(listed.stdout, /^deno\s+available/m);
    assert.match(
      listed.stdout,
      new RegExp(`^http\\s+available\\s+fetch is built in\\s+\\(${url}mod\\.ts\\)`, "m"),
    );

    const invalid = await box.write(
      "bad.yaml",
      `name: bad\nsteps:\n  call:\n    backend: http\n    with: { url: "ftp://nowhere" }\n`,
    );
    const refused = await runCli(["validate", invalid, "--config", "agent.yaml"], { cwd: box.dir });
    assert.equal(refused.code, 2);
    assert.match(
      refused.stderr,
      /bad\.yaml:3:3: step "call" \(backend http\): "with\.url": Expected an http\(s\) URL/,
    );
    assert.doesNotMatch(refused.stderr, /\n\s+at /);
  } finally {
    await api.shutdown();
    await files.shutdown();
  }
});

/** Pids of the direct children of `pid` (plugin hosts, here). */
async function childPids(pid: number): Promise<number[]> {
  const { stdout } = await new Deno.Command("ps", { args: ["-o", "pid=", "--ppid", String(pid)] })
    .output();
  return new TextDecoder().decode(stdout).split("\n").map((line) => Number(line.trim())).filter(
    (n) => n > 0,
  );
}

/** Runs one attempt of `spec` (its config replaced, if given) on a pool's backend. */
async function runOn(
  pool: PluginHostPool,
  backend: string,
  spec: ScratchAttempt,
  config?: Record<string, unknown>,
): ReturnType<typeof runToEnd> {
  const attempt = config ? { ...spec, config } : spec;
  return await runToEnd(await pool.backend(backend).start(attempt));
}
