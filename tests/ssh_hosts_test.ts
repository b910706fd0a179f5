/**
 * The `ssh` backend as an operator configures it, against a real OpenSSH
 * server started for this file (tests/_sshd.ts): host aliases of a runner
 * config (local mode, `runnel backends`, a cluster agent chosen by its
 * selector), the ssh-agent, a key passphrase from a secret, trust on first
 * use, and what a dead runner left on the remote host (`recover`,
 * `runnel resume`).
 */

import assert from "node:assert/strict";
import { sshConfigOf, startSshd, type TestSshd } from "./_sshd.ts";
import createSshBackend from "../backends/ssh/mod.ts";
import { runToEnd, scratchSpec } from "../backends/testing.ts";
import { builtinPlugins, PluginHostPool } from "../backends/mod.ts";
import { agentPolicy } from "../agent/attempt/policy.ts";
import { RunClient } from "../agent/client/mod.ts";
import { startAgent } from "../agent/worker/mod.ts";
import { openLocalArtifactStore } from "../core/artifacts/local.ts";
import { startTestServer } from "./_server.ts";
import { poll, ROOT, runCli, sandbox, spawnCli, waitForLine } from "./_helpers.ts";

let runs = 0;

const configOf = sshConfigOf;

function attempt(config: Record<string, unknown>, options: Parameters<typeof scratchSpec>[1] = {}) {
  return scratchSpec(config, { ...options, spec: { runId: `hosts${++runs}`, ...options.spec } });
}

/** Processes of the test host whose command line matches `pattern` (pgrep -f). */
async function remote(sshd: TestSshd, pattern: string): Promise<string> {
  return (await sshd.sh(`pgrep -af -- '${pattern}' | grep -v pgrep || true`)).trim();
}

/** The keys of a step naming the test server itself (not an alias), at step indentation. */
function inlineHost(sshd: TestSshd): string {
  return Object.entries(sshConfigOf(sshd)).map(([key, value]) => `    ${key}: ${value}\n`).join("");
}

/** A runner config naming the test server as the alias "reports". */
function agentYaml(sshd: TestSshd, extra = ""): string {
  return `ssh:
  hosts:
    reports:
      host: ${sshd.host}
      port: ${sshd.port}
      user: ${sshd.user}
      identity: ${sshd.identity}
      known-hosts: ${sshd.knownHosts}
      work-root: ${sshd.dir}/remote
${extra}`;
}

Deno.test("ssh hosts", { sanitizeOps: false, sanitizeResources: false }, async (t) => {
  await using sshd = await startSshd();

  await t.step(
    "the energy example's report step runs on the alias and writes the same CSV as the deno one",
    async () => {
      await using box = await sandbox();
      const config = await box.write("agent.yaml", agentYaml(sshd));
      const example = `${ROOT}/examples/energy`;
      const digest = async (pipeline: string, stateDir: string) => {
        const run = await runCli(["run", pipeline, "--config", config, "--state-dir", stateDir], {
          cwd: box.dir,
        });
        assert.equal(run.code, 0, run.stderr + run.stdout);
        const runId = /^run (\S+)/m.exec(run.stdout)![1];
        const shown = await runCli(["show", runId, "--state-dir", stateDir, "--json"], {
          cwd: box.dir,
        });
        const record = JSON.parse(shown.stdout);
        return record.steps.report.outputs["energy_report.csv"].digest as string;
      };
      const [overSsh, inDeno] = [
        await digest(`${example}/pipeline.ssh.yaml`, box.stateDir),
        await digest(`${example}/pipeline.yaml`, `${box.dir}/local`),
      ];
      assert.match(overSsh, /^sha256:[0-9a-f]{64}$/);
      assert.equal(overSsh, inDeno);
      // The remote work dirs are gone.
      assert.deepEqual([...Deno.readDirSync(`${sshd.dir}/remote`)], []);
    },
  );

  await t.step("runnel backends says which configured hosts answer", async () => {
    await using box = await sandbox();
    const config = await box.write(
      "agent.yaml",
      agentYaml(
        sshd,
        `    nowhere:
      host: 127.0.0.1
      port: 1
      user: ${sshd.user}
      identity: ${sshd.identity}
      known-hosts: ${sshd.knownHosts}
`,
      ),
    );
    const result = await runCli(["backends", "--config", config], { cwd: box.dir });
    assert.equal(result.code, 0, result.stderr);
    const line = result.stdout.split("\n").find((l) => l.startsWith("ssh"))!;
    assert.match(
      line,
      new RegExp(`reports \\(${sshd.user}@127\\.0\\.0\\.1:${sshd.port}\\) answers`),
    );
    assert.match(line, /nowhere \(.*:1\) does not answer/);
  });

  await t.step("an alias the config does not name fails with what is missing", async () => {
    await using spec = await attempt({ host: "reports", run: "true" });
    const result = await runToEnd(await createSshBackend().start(spec));
    assert.equal(result.status.errorClass, "permission");
    assert.match(result.status.message!, /host "reports" is not one of this host's ssh.hosts/);
  });

  await t.step("an agent runs steps on its aliases only, and the selector picks it", async () => {
    await using box = await sandbox();
    await using server = await startTestServer(`${box.dir}/state.db`, {
      token: "ssh-join-token-0123456789",
      adminToken: "ssh-admin-token-0123456789",
      heartbeatMs: 300,
    });
    const settings = { ssh: { hosts: { reports: configOf(sshd) } } };
    const common = {
      servers: [`127.0.0.1:${server.server.grpcPort}`],
      token: "ssh-join-token-0123456789",
      slots: 2,
      artifacts: openLocalArtifactStore(`${box.dir}/artifacts`),
      log: () => {},
    };
    const gateway = await startAgent({
      ...common,
      agentId: "ssh-gateway",
      labels: { ssh: "reports" },
      stateDir: `${box.dir}/gateway`,
      settings,
      policy: agentPolicy({ backends: ["ssh"], ssh: { hosts: ["reports"] } }),
    });
    const plain = await startAgent({
      ...common,
      agentId: "plain",
      labels: { site: "dc1" },
      stateDir: `${box.dir}/plain`,
      policy: agentPolicy({ backends: ["ssh"] }),
    });
    try {
      const client = new RunClient([server.http], { token: "ssh-admin-token-0123456789" });
      const state = await poll(async () => {
        const body = await (await fetch(`${server.http}/cluster-state`, {
          headers: { authorization: "Bearer ssh-admin-token-0123456789" },
        })).json();
        return body.workers.length === 2 ? body : undefined;
      }, { what: "two agents online" });
      const probe = state.workers.find((w: { agentId: string }) => w.agentId === "ssh-gateway")
        .capabilities.find((c: { backend: string }) => c.backend === "ssh");
      assert.match(probe.detail, /reports \(.*\) answers/);
      const pipeline = `name: ssh-cluster
steps:
  report:
    backend: ssh
    host: reports
    selector: { ssh: reports }
    run: echo "made on $(uname -n)" > "$RUNNEL_OUTPUT_R_TXT"
    outputs: [r.txt]
  inline:
    backend: ssh
    needs: [report]
    selector: { ssh: reports }
    host: ${sshd.host}
    port: ${sshd.port}
    user: ${sshd.user}
    identity: /etc/shadow
    known-hosts: ${sshd.knownHosts}
    run: "true"
    retry: { max: 0 }
`;
      const { runId } = await client.submit(pipeline, "ssh.yaml", box.dir);
      for await (const _ of client.events(runId)) { /* until the run ends */ }
      const { steps } = await client.run(runId);
      assert.equal(steps.report.status, "succeeded", JSON.stringify(steps.report));
      assert.equal(steps.report.attempts[0].worker, "ssh-gateway");
      // A pipeline must not point the agent at a host (or a key file) of its choosing.
      assert.equal(steps.inline.status, "failed");
      assert.match(
        JSON.stringify(steps.inline.attempts[0]),
        /not one of this host's ssh.hosts.*policy.ssh.inline-hosts/,
      );
    } finally {
      await gateway.stop();
      await plain.stop();
    }
  });

  await t.step("ssh-agent auth: the key never leaves the agent", async () => {
    const socket = `${sshd.dir}/agent.sock`;
    const agent = new Deno.Command("ssh-agent", {
      args: ["-D", "-a", socket],
      stdout: "null",
      stderr: "null",
    }).spawn();
    try {
      await poll(() => Deno.lstat(socket).then(() => true, () => undefined), {
        what: "ssh-agent socket",
      });
      await sshd.sh(`SSH_AUTH_SOCK=${socket} ssh-add -q ${sshd.identity}`);
      Deno.env.set("SSH_AUTH_SOCK", socket);
      await using spec = await attempt(
        configOf(sshd, { identity: undefined, agent: true, run: "echo via agent" }),
      );
      const result = await runToEnd(await createSshBackend().start(spec));
      assert.equal(result.stdout, "via agent\n", JSON.stringify(result.status));
      // In a sandboxed host: granted the socket and SSH_AUTH_SOCK, nothing else.
      const scratchRoot = await Deno.realPath(await Deno.makeTempDir());
      const pool = new PluginHostPool({
        plugins: builtinPlugins(),
        context: { scratchRoot, agentId: "ssh-agent-test" },
      });
      try {
        await using sandboxed = await scratchSpec(
          configOf(sshd, { identity: undefined, agent: true, run: "echo sandboxed" }),
          { spec: { runId: `hosts${++runs}`, scratchRoot } },
        );
        const inHost = await runToEnd(await pool.backend("ssh").start(sandboxed));
        assert.equal(inHost.stdout, "sandboxed\n", JSON.stringify(inHost.status));
      } finally {
        await pool.close();
        await Deno.remove(scratchRoot, { recursive: true });
      }
    } finally {
      Deno.env.delete("SSH_AUTH_SOCK");
      agent.kill("SIGTERM");
      await agent.status;
    }
  });

  await t.step("a key's passphrase comes from a step secret and is not sent remotely", async () => {
    const key = `${sshd.dir}/locked_ed25519`;
    const passphrase = "pass-" + crypto.randomUUID();
    await sshd.sh(`ssh-keygen -q -t ed25519 -N '${passphrase}' -f ${key}`);
    await sshd.sh(`cat ${key}.pub >> ${sshd.dir}/authorized_keys`);
    const config = configOf(sshd, {
      identity: key,
      "passphrase-secret": "KEY_PASS",
      run: 'echo "seen: ${KEY_PASS:-nothing}"',
    });
    await using spec = await attempt(config, { spec: { env: { KEY_PASS: passphrase } } });
    const result = await runToEnd(await createSshBackend().start(spec));
    assert.equal(result.stdout, "seen: nothing\n", JSON.stringify(result.status));
    await using wrong = await attempt(config, { spec: { env: { KEY_PASS: "wrong" } } });
    const refused = await runToEnd(await createSshBackend().start(wrong));
    assert.equal(refused.status.errorClass, "permission");
    assert.match(refused.status.message!, /cannot use the key/);
  });

  await t.step("RSA and ECDSA keys work as ed25519 ones do", async () => {
    for (const type of ["rsa", "ecdsa"]) {
      const key = `${sshd.dir}/user_${type}`;
      await sshd.sh(`ssh-keygen -q -t ${type} -N '' -f ${key}`);
      await sshd.sh(`cat ${key}.pub >> ${sshd.dir}/authorized_keys`);
      await using spec = await attempt(configOf(sshd, { identity: key, run: `echo ${type}` }));
      const result = await runToEnd(await createSshBackend().start(spec));
      assert.equal(result.stdout, `${type}\n`, JSON.stringify(result.status));
    }
  });

  await t.step(
    "sshd killed mid-step: the attempt fails as infrastructure, and the retry succeeds once sshd is back",
    async () => {
      await using box = await sandbox();
      const file = await box.write(
        "p.yaml",
        `name: ssh-retry
steps:
  flaky:
    backend: ssh
${inlineHost(sshd)}    retry: { max: 5, backoff: 500ms }
    run: |
      if [ "$RUNNEL_ATTEMPT" = 1 ]; then sleep 69; fi
      echo "attempt $RUNNEL_ATTEMPT done"
`,
      );
      const { child, lines } = spawnCli(["run", file, "--state-dir", box.stateDir, "--logs"], {
        cwd: box.dir,
      });
      let runId: string;
      try {
        runId = (await waitForLine(lines, (l) => l.startsWith("run "))).split(" ")[1];
        await poll(async () => (await remote(sshd, "^sleep 69$")) !== "" || undefined, {
          what: "attempt 1 running remotely",
        });
        // The server and every session it runs, at once: the connection drops.
        const pids = await sshd.pids();
        await sshd.stop();
        await sshd.sh(`kill -KILL ${pids.join(" ")} 2>/dev/null || true`);
        await sshd.start();
        const status = await child.status;
        const out = [...(await Array.fromAsync(lines))];
        assert.equal(status.code, 0, out.join("\n"));
      } finally {
        try {
          child.kill("SIGKILL");
        } catch { /* ended */ }
        await child.stderr.cancel().catch(() => {});
      }
      const shown = JSON.parse(
        (await runCli(["show", runId, "--state-dir", box.stateDir, "--json"], { cwd: box.dir }))
          .stdout,
      );
      const attempts = shown.steps.flaky.attempts;
      assert.equal(shown.status, "succeeded");
      assert.equal(attempts[0].result.errorClass, "infrastructure", JSON.stringify(attempts[0]));
      assert.equal(attempts.at(-1).result.ok, true);
      await poll(async () => (await remote(sshd, "^sleep 69$")) === "" || undefined, {
        what: "the dead session's step ended by its watchdog",
      });
    },
  );

  await t.step("a password is only ever a secret: inline it is a located error", async () => {
    await using box = await sandbox();
    const file = await box.write(
      "p.yaml",
      `name: pw
steps:
  s:
    backend: ssh
    host: example.org
    user: me
    host-key: "SHA256:${"A".repeat(43)}"
    password: hunter2
    run: "true"
  t:
    backend: ssh
    host: example.org
    user: me
    host-key: "SHA256:${"A".repeat(43)}"
    password-secret: PW
    run: "true"
`,
    );
    const result = await runCli(["validate", file], { cwd: box.dir });
    assert.equal(result.code, 2, result.stdout);
    assert.match(result.stderr, /p\.yaml:8:5: unknown key "password"/);
    assert.match(result.stderr, /p\.yaml:15:\d+: .*secret "PW", which is not one of its secrets/);
  });

  await t.step("trust on first use records the key, then refuses a changed one", async () => {
    const knownHosts = `${sshd.dir}/tofu_known_hosts`;
    await Deno.writeTextFile(knownHosts, "");
    const config = configOf(sshd, {
      "known-hosts": knownHosts,
      "trust-on-first-use": true,
      run: "echo first",
    });
    await using first = await attempt(config);
    const trusted = await runToEnd(await createSshBackend().start(first));
    assert.equal(trusted.stdout, "first\n", JSON.stringify(trusted.status));
    const recorded = await Deno.readTextFile(knownHosts);
    assert.match(recorded, new RegExp(`^\\[127\\.0\\.0\\.1\\]:${sshd.port} ssh-ed25519 `));
    const fresh = await sshd.sh(
      `ssh-keygen -lf ${knownHosts} -E sha256 | cut -d' ' -f2`,
    );
    assert.equal(fresh.trim(), sshd.fingerprint);
    // The host's key changes: first use is over.
    const other = (await sshd.sh(
      `ssh-keygen -q -t ed25519 -N '' -f ${sshd.dir}/other && cat ${sshd.dir}/other.pub`,
    ))
      .split(" ");
    await Deno.writeTextFile(knownHosts, `[127.0.0.1]:${sshd.port} ${other[0]} ${other[1]}\n`);
    await using second = await attempt(config);
    const refused = await runToEnd(await createSshBackend().start(second));
    assert.equal(refused.status.errorClass, "permission");
    assert.match(refused.status.message!, /CHANGED/);
  });

  await t.step("recover reaps what an agent left on its configured hosts", async () => {
    // A leftover as a killed agent leaves it: a work dir with its marker and
    // a live process group whose leader ignores TERM.
    const dir = `${sshd.dir}/remote/run-old/step/1`;
    await sshd.sh(`mkdir -p ${dir} && echo agent-7 > ${dir}/agent`);
    await sshd.sh(
      `cd ${dir} && setsid sh -c 'echo $$ > pgid; trap "" TERM; exec sleep 88' </dev/null >/dev/null 2>&1 &`,
    );
    await poll(async () => (await remote(sshd, "^sleep 88$")) !== "" || undefined, {
      what: "the leftover",
    });
    // Another agent's leftover is not this one's to reap.
    const others = `${sshd.dir}/remote/run-other/step/1`;
    await sshd.sh(`mkdir -p ${others} && echo agent-8 > ${others}/agent`);
    const found = await createSshBackend().recover({
      agentId: "agent-7",
      keep: [],
      settings: { ssh: { hosts: { reports: configOf(sshd) } } },
    });
    assert.deepEqual(found, []);
    assert.equal(await remote(sshd, "^sleep 88$"), "");
    await assert.rejects(Deno.stat(`${sshd.dir}/remote/run-old`), Deno.errors.NotFound);
    assert.ok((await Deno.stat(others)).isDirectory);
    await Deno.remove(`${sshd.dir}/remote/run-other`, { recursive: true });
  });

  await t.step(
    "runnel run SIGKILLed mid-step: resume reaps the remote attempt and finishes the step once",
    async () => {
      await using box = await sandbox();
      const log = `${sshd.dir}/attempts.log`;
      const file = await box.write(
        "p.yaml",
        `name: ssh-resume
steps:
  slow:
    backend: ssh
${inlineHost(sshd)}    outputs: [done.txt]
    run: |
      echo "$RUNNEL_ATTEMPT" >> ${log}
      if [ "$RUNNEL_ATTEMPT" = 1 ]; then trap '' TERM; sleep 66 & sleep 67; fi
      echo done > "$RUNNEL_OUTPUT_DONE_TXT"
`,
      );
      const { child, lines } = spawnCli(["run", file, "--state-dir", box.stateDir], {
        cwd: box.dir,
      });
      let runId: string;
      try {
        runId = (await waitForLine(lines, (l) => l.startsWith("run "))).split(" ")[1];
        await poll(async () => (await remote(sshd, "^sleep 67$")) !== "" || undefined, {
          what: "attempt 1 running remotely",
        });
      } finally {
        child.kill("SIGKILL");
        await child.status;
        await child.stderr.cancel();
      }
      const resumed = await runCli(["resume", runId, "--state-dir", box.stateDir], {
        cwd: box.dir,
      });
      assert.equal(resumed.code, 0, resumed.stderr + resumed.stdout);
      assert.equal(await remote(sshd, "^sleep 6[67]$"), "");
      const attempts = (await Deno.readTextFile(log)).trim().split("\n");
      assert.equal(attempts.length, 2, attempts.join(","));
      assert.equal(attempts[0], "1");
      const shown = await runCli(["show", runId, "--state-dir", box.stateDir, "--json"], {
        cwd: box.dir,
      });
      assert.equal(JSON.parse(shown.stdout).status, "succeeded", shown.stdout);
      await assert.rejects(Deno.stat(`${sshd.dir}/remote/${runId}`), Deno.errors.NotFound);
    },
  );
});
