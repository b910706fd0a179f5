/**
 * The `ssh` backend against a real OpenSSH server started for this file
 * (tests/_sshd.ts): host keys, auth, inputs and outputs, secrets, cancel.
 */

import assert from "node:assert/strict";
import { sshConfigOf, startSshd, type TestSshd } from "./_sshd.ts";
import createSshBackend from "../backends/ssh/mod.ts";
import { checkBackendConformance, runToEnd, scratchSpec } from "../backends/testing.ts";
import { builtinPlugins, PluginHostPool } from "../backends/mod.ts";
import { runCli, sandbox } from "./_helpers.ts";

let runs = 0;

/** A scratch attempt of its own run, so that no two share a remote work dir. */
function attempt(config: Record<string, unknown>, options: Parameters<typeof scratchSpec>[1] = {}) {
  return scratchSpec(config, { ...options, spec: { runId: `run${++runs}`, ...options.spec } });
}

const configOf = sshConfigOf;

async function waitFor(check: () => Promise<boolean>, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`Expected the condition within ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

async function remoteLeftovers(sshd: TestSshd, marker: string): Promise<string> {
  return (await sshd.sh(`pgrep -af -- '${marker}' | grep -v pgrep || true`)).trim();
}

Deno.test("ssh backend", { sanitizeOps: false, sanitizeResources: false }, async (t) => {
  await using sshd = await startSshd();
  const backend = createSshBackend();

  await t.step("passes the backend conformance checks", async () => {
    const report = await checkBackendConformance({
      backend: createSshBackend,
      echo: { config: configOf(sshd, { run: "echo hello" }), stdout: "hello\n" },
      long: { config: configOf(sshd, { run: "sleep 61" }) },
    });
    assert.deepEqual(report.skipped, ["re-attaches after a restart"]);
    assert.equal(report.passed.length, 5);
    assert.equal(await remoteLeftovers(sshd, "sleep 61"), "");
  });

  await t.step("passes them in a sandboxed plugin host granted only its manifest", async () => {
    const scratchRoot = await Deno.realPath(await Deno.makeTempDir());
    const pool = new PluginHostPool({
      plugins: builtinPlugins(),
      context: { scratchRoot, agentId: "ssh-conformance" },
    });
    try {
      const report = await checkBackendConformance({
        backend: () => pool.backend("ssh"),
        echo: { config: configOf(sshd, { run: "echo hello" }), stdout: "hello\n" },
        long: { config: configOf(sshd, { run: "sleep 62" }) },
      });
      assert.equal(report.passed.length, 5);
      assert.equal(await remoteLeftovers(sshd, "sleep 62"), "");
    } finally {
      await pool.close();
      await Deno.remove(scratchRoot, { recursive: true });
    }
  });

  await t.step("inputs up, outputs down, RUNNEL_* set remotely, remote dir removed", async () => {
    await using spec = await attempt(
      configOf(sshd, {
        run: 'tr a-z A-Z < "$RUNNEL_INPUT_WORDS" > "$RUNNEL_OUTPUT_UPPER_TXT"; pwd; echo oops >&2',
      }),
      { inputs: { words: "hello ssh\n" }, spec: { outputs: ["upper.txt"] } },
    );
    const result = await runToEnd(await backend.start(spec));
    assert.deepEqual(result.status, { exitCode: 0 });
    assert.equal(await Deno.readTextFile(`${spec.outputsDir}/upper.txt`), "HELLO SSH\n");
    assert.equal(result.stderr, "oops\n");
    const remoteDir = `${sshd.dir}/remote/${spec.runId}/step/1`;
    assert.equal(result.stdout.trim(), remoteDir);
    await assert.rejects(Deno.stat(`${sshd.dir}/remote/${spec.runId}`), Deno.errors.NotFound);
  });

  await t.step(
    "keep-on-failure keeps a failed attempt's remote dir, and only a failed one's",
    async () => {
      await using failed = await attempt(
        configOf(sshd, { run: "echo kept > out/x; exit 4", "keep-on-failure": true }),
      );
      const result = await runToEnd(await backend.start(failed));
      assert.equal(result.status.exitCode, 4);
      const kept = `${sshd.dir}/remote/${failed.runId}/step/1`;
      assert.equal(await Deno.readTextFile(`${kept}/out/x`), "kept\n");
      await Deno.remove(`${sshd.dir}/remote/${failed.runId}`, { recursive: true });
      await using ok = await attempt(configOf(sshd, { run: "true", "keep-on-failure": true }));
      assert.deepEqual((await runToEnd(await backend.start(ok))).status, { exitCode: 0 });
      await assert.rejects(Deno.stat(`${sshd.dir}/remote/${ok.runId}`), Deno.errors.NotFound);
    },
  );

  await t.step("a missing output fails the step; exit codes classify", async () => {
    await using spec = await attempt(configOf(sshd, { run: "true" }), {
      spec: { outputs: ["never.txt"] },
    });
    const result = await runToEnd(await backend.start(spec));
    assert.equal(result.status.errorClass, "application");
    await using business = await attempt(configOf(sshd, { run: "exit 3" }));
    assert.equal((await runToEnd(await backend.start(business))).status.exitCode, 3);
  });

  await t.step("secrets never appear on a remote command line", async () => {
    const secret = "s3cr3t-value-" + crypto.randomUUID();
    await using spec = await attempt(
      configOf(sshd, { run: 'test "$TOKEN" = "$EXPECTED" && sleep 3 && echo same' }),
      { spec: { env: { TOKEN: secret, EXPECTED: secret } } },
    );
    const execution = await backend.start(spec);
    // Looked at while the step runs (past its check of the secret).
    await waitFor(async () => await remoteLeftovers(sshd, "^sleep 3$") !== "", 10_000);
    const ps = await sshd.sh("ps -eo args");
    assert.ok(!ps.includes(secret), "secret visible in ps");
    const result = await runToEnd(execution);
    assert.equal(result.stdout, "same\n");
  });

  await t.step("a backgrounded child holding stdout does not keep the step open", async () => {
    const marker = `sleep 77`;
    await using spec = await attempt(configOf(sshd, { run: `${marker} & echo started` }));
    const began = Date.now();
    const result = await runToEnd(await backend.start(spec));
    assert.deepEqual(result.status, { exitCode: 0 });
    assert.equal(result.stdout, "started\n");
    assert.ok(Date.now() - began < 10_000, `took ${Date.now() - began} ms`);
    assert.equal(await remoteLeftovers(sshd, marker), "");
  });

  await t.step(
    "cancel kills the whole remote process group, TERM-ignoring children included",
    async () => {
      await using spec = await attempt(
        configOf(sshd, { run: "sleep 78 & trap '' TERM; sleep 79; wait" }),
      );
      const execution = await backend.start(spec);
      // `sleep 79` starts once the TERM trap is set.
      await waitFor(async () => await remoteLeftovers(sshd, "sleep 79") !== "", 10_000);
      await execution.cancel(500);
      const result = await runToEnd(execution);
      assert.equal(result.status.errorClass, "cancelled");
      assert.equal(await remoteLeftovers(sshd, "sleep 7[89]"), "");
    },
  );

  await t.step("unknown host and changed host key are refused with the fingerprint", async () => {
    await Deno.writeTextFile(`${sshd.dir}/empty_known_hosts`, "");
    await using unknown = await attempt(
      configOf(sshd, { run: "true", "known-hosts": `${sshd.dir}/empty_known_hosts` }),
    );
    const first = await runToEnd(await backend.start(unknown));
    assert.equal(first.status.errorClass, "permission");
    assert.match(first.status.message ?? "", new RegExp(RegExp.escape(sshd.fingerprint)));
    assert.match(first.status.message!, /is unknown.*ssh-keyscan/);
    await using pinned = await attempt(
      configOf(sshd, {
        run: "true",
        "known-hosts": undefined,
        "host-key": "SHA256:" + "A".repeat(43),
      }),
    );
    const second = await runToEnd(await backend.start(pinned));
    assert.equal(second.status.errorClass, "permission");
    assert.match(second.status.message ?? "", new RegExp(RegExp.escape(sshd.fingerprint)));
    await using good = await attempt(
      configOf(sshd, { run: "true", "known-hosts": undefined, "host-key": sshd.fingerprint }),
    );
    assert.deepEqual((await runToEnd(await createSshBackend().start(good))).status, {
      exitCode: 0,
    });
  });

  await t.step("a key the server does not accept is a clear auth error", async () => {
    await sshd.sh(`ssh-keygen -q -t ed25519 -N '' -f ${sshd.dir}/stranger`);
    await using spec = await attempt(
      configOf(sshd, { run: "true", identity: `${sshd.dir}/stranger` }),
    );
    const result = await runToEnd(await createSshBackend().start(spec));
    assert.equal(result.status.errorClass, "permission");
    assert.match(result.status.message!, /refused the login \(tried publickey \(key file\)\)/);
  });

  await t.step("50 concurrent steps share one connection", async () => {
    const specs = await Promise.all(
      Array.from({ length: 50 }, (_, i) =>
        scratchSpec(configOf(sshd, { run: `echo ${i}` }), {
          spec: { runId: `many${i}` },
        })),
    );
    try {
      const results = await Promise.all(
        specs.map(async (spec) => runToEnd(await backend.start(spec))),
      );
      results.forEach((result, i) => assert.equal(result.stdout, `${i}\n`));
    } finally {
      for (const spec of specs) await spec.remove();
    }
  });

  await t.step(
    "a dead connection fails the attempt as infrastructure; the next one reconnects",
    async () => {
      await using spec = await attempt(configOf(sshd, { run: "sleep 63" }));
      const execution = await backend.start(spec);
      await waitFor(async () => await remoteLeftovers(sshd, "^sleep 63$") !== "", 10_000);
      // Freeze every process of the server: no FIN, no RST, only silence, as
      // when a network path dies; keepalives must notice.
      const frozen = await sshd.pids();
      await sshd.sh(`kill -STOP ${frozen.join(" ")}`);
      const began = Date.now();
      try {
        const result = await runToEnd(execution);
        assert.equal(result.status.errorClass, "infrastructure", JSON.stringify(result.status));
        assert.match(result.status.message!, /lost the connection/);
        assert.ok(Date.now() - began < 12_000, `noticed after ${Date.now() - began} ms`);
      } finally {
        await sshd.sh(`kill -CONT ${frozen.join(" ")}`);
      }
      // Without a PTY nothing would end the step; the wrapper's watchdog does,
      // once the thawed server notices the connection is gone.
      await waitFor(async () => await remoteLeftovers(sshd, "^sleep 63$") === "", 20_000);
      await using again = await attempt(configOf(sshd, { run: "echo back" }));
      assert.equal((await runToEnd(await backend.start(again))).stdout, "back\n");
    },
  );

  await t.step(
    "runnel run: a pipeline over ssh, artifacts between steps, secrets masked",
    async () => {
      await using box = await sandbox();
      const file = await box.write(
        "pipeline.yaml",
        `name: ssh-demo
secrets:
  TOKEN: { env: RUNNEL_TEST_TOKEN }
steps:
  analyze:
    host: ${sshd.host}
    port: ${sshd.port}
    user: ${sshd.user}
    with:
      identity: ${sshd.identity}
      known-hosts: ${sshd.knownHosts}
      work-root: ${sshd.dir}/remote
    run: |
      echo '{"kwh": 42}' > "$RUNNEL_OUTPUT_OUTPUT1_JSON"
    outputs: [output1.json]
  report:
    host: ${sshd.host}
    port: ${sshd.port}
    user: ${sshd.user}
    with:
      identity: ${sshd.identity}
      host-key: "${sshd.fingerprint}"
      work-root: ${sshd.dir}/remote
    secrets: [TOKEN]
    inputs: { summary: analyze/output1.json }
    run: |
      echo "token is $TOKEN"
      csv="$RUNNEL_OUTPUT_ENERGY_REPORT_CSV"
      echo region,kwh > "$csv"
      grep -o '[0-9][0-9]*' "$RUNNEL_INPUT_SUMMARY" | sed 's/^/all,/' >> "$csv"
      cat "$csv"
    outputs: [energy_report.csv]
`,
      );
      const secret = "s3cr3t-" + crypto.randomUUID();
      const result = await runCli(["run", file, "--state-dir", box.stateDir, "--logs"], {
        cwd: box.dir,
        env: { RUNNEL_TEST_TOKEN: secret },
      });
      assert.equal(result.code, 0, result.stderr + result.stdout);
      assert.match(result.stdout, /report │ token is \*\*\*/);
      assert.match(result.stdout, /report │ all,42/);
      assert.ok(!result.stdout.includes(secret) && !result.stderr.includes(secret));
    },
  );

  await t.step("a runner SIGKILLed mid-step leaves no remote process behind", async () => {
    await using spec = await attempt(configOf(sshd, { run: "sleep 65 & sleep 64" }));
    const script = `${sshd.dir}/runner.ts`;
    await Deno.writeTextFile(
      script,
      `import createSshBackend from "${new URL("../backends/ssh/mod.ts", import.meta.url).href}";
const spec = JSON.parse(Deno.args[0]);
const execution = await createSshBackend().start(spec);
console.log("started " + execution.handle);
await execution.wait();
`,
    );
    const runner = new Deno.Command(Deno.execPath(), {
      args: ["run", "--lock=deno.lock", "-A", script, JSON.stringify(spec)],
      cwd: new URL("..", import.meta.url).pathname,
      stdout: "piped",
      stderr: "null",
    }).spawn();
    const reader = runner.stdout.pipeThrough(new TextDecoderStream()).getReader();
    let seen = "";
    while (!seen.includes("started")) {
      const { value, done } = await reader.read();
      if (done) break;
      seen += value;
    }
    assert.match(seen, /started/);
    await waitFor(async () => await remoteLeftovers(sshd, "^sleep 64$") !== "", 10_000);
    runner.kill("SIGKILL");
    await runner.status;
    await reader.cancel().catch(() => {});
    await waitFor(async () => await remoteLeftovers(sshd, "^sleep 6[45]$") === "", 20_000);
  });
});

Deno.test(
  "ssh backend: a server refusing the step's channel leaves no remote dir",
  { sanitizeOps: false, sanitizeResources: false },
  async () => {
    await using sshd = await startSshd();
    // Its only session goes to SFTP: the directory is prepared, then the exec refused.
    const configPath = `${sshd.dir}/sshd_config`;
    const sshdConfig = await Deno.readTextFile(configPath);
    await Deno.writeTextFile(configPath, sshdConfig.replace("MaxSessions 200", "MaxSessions 1"));
    await sshd.stop();
    await sshd.start();
    await using spec = await attempt(configOf(sshd, { run: "echo never runs" }), {
      spec: { env: { TOKEN: "s3cret" } },
    });
    const execution = await createSshBackend().start(spec);
    const result = await runToEnd(execution);
    assert.equal(result.status.errorClass, "infrastructure");
    assert.match(result.status.message ?? "", /cannot open a channel/);
    await assert.rejects(Deno.stat(`${sshd.dir}/remote/${spec.runId}`), Deno.errors.NotFound);
  },
);
