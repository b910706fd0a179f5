/**
 * Issue 10, items 1b, 3, 4 and 5, replayed with real processes: the
 * `runnel` CLI in local mode, a `runnel agent` fed assignments that never
 * went through validation (as a tampered store would hand them over), and
 * Docker. Each attack must fail with a clear error naming the rule, and the
 * host secret it reaches for must appear nowhere: not in the artifact
 * store, the state db, the logs, the agent's files or what it sent.
 *
 * @module
 */

import assert from "node:assert/strict";
import createDockerBackend from "../../backends/docker/mod.ts";
import { ensureBusyboxImage } from "../../infra/images.ts";
import { openLocalArtifactStore } from "../../core/artifacts/local.ts";
import {
  type AgentConnection,
  type AgentMessage,
  type AgentServiceServer,
  type AssignmentSpec,
  serveAgentService,
} from "../../proto/mod.ts";
import type { AttemptResult } from "../../core/model.ts";
import { CLI_PERMISSIONS, MAIN, poll, runCli, sandbox } from "../_helpers.ts";
import { assignmentSpec } from "../../proto/_testing.ts";

const IN_CI = Deno.env.get("CI") === "true";
const dockerFingerprint = await createDockerBackend().fingerprint();
const BUSYBOX = dockerFingerprint.available ? await ensureBusyboxImage() : "runnel/busybox:local";

/** What every attack reaches for; unique per test run, so a find is never stale. */
const SECRET = `hunter2-SECRET-${crypto.randomUUID()}`;
/** The first line of /etc/passwd, which a failed import used to quote. */
const PASSWD_LINE = "root:x:0:0";

/** A sandbox with a pipeline directory and, beside it, host files no step may reach. */
async function hostBox() {
  const box = await sandbox();
  const pipeline = `${box.dir}/pipeline`;
  const host = `${box.dir}/host`;
  await Deno.mkdir(pipeline);
  await Deno.mkdir(`${host}/shared`, { recursive: true });
  await Deno.writeTextFile(`${host}/shadow`, `root:$6$${SECRET}:19000:0:99999:7:::\n`);
  await Deno.writeTextFile(`${host}/secret.json`, JSON.stringify({ secret: SECRET }));
  await Deno.writeTextFile(`${host}/shared/data.txt`, "shared by the operator\n");
  return { box, pipeline, host, stateDir: `${pipeline}/.runnel` };
}

/** Files under `dir` (recursively) whose bytes hold any of `needles`. */
async function filesHolding(dir: string, needles: string[]): Promise<string[]> {
  const found: string[] = [];
  const walk = async (path: string) => {
    let info: Deno.FileInfo;
    try {
      info = await Deno.lstat(path);
    } catch {
      return;
    }
    if (info.isDirectory) {
      for await (const entry of Deno.readDir(path)) await walk(`${path}/${entry.name}`);
    } else if (info.isFile) {
      // latin1 keeps every byte: a needle in a binary file (the state db) is still found.
      const text = new TextDecoder("latin1").decode(await Deno.readFile(path));
      if (needles.some((needle) => text.includes(needle))) found.push(path);
    }
  };
  await walk(dir);
  return found;
}

/** The last attempt's result of each step of the only run in `stateDir`. */
async function stepResults(cwd: string, stateDir: string) {
  const runs = await runCli(["runs", "--json", "--state-dir", stateDir], { cwd });
  const [run] = JSON.parse(runs.stdout) as Array<{ runId: string }>;
  const shown = await runCli(["show", run.runId, "--json", "--state-dir", stateDir], { cwd });
  const { steps } = JSON.parse(shown.stdout) as {
    steps: Record<string, { status: string; attempts: Array<{ result?: AttemptResult }> }>;
  };
  return Object.fromEntries(
    Object.entries(steps).map(([id, step]) => [id, {
      status: step.status,
      result: step.attempts.at(-1)?.result,
    }]),
  );
}

/** A failed result's class and message. */
function failure(result: AttemptResult | undefined): { errorClass: string; message: string } {
  assert.ok(result && !result.ok, JSON.stringify(result));
  return { errorClass: result.errorClass, message: result.message };
}

Deno.test("local: an input name with .. is a located error, and nothing is planted (item 3)", async () => {
  const { box, pipeline } = await hostBox();
  await using _ = box;
  const escape = `../../../../../../../..${box.dir}/planted/.ssh`;
  await Deno.writeTextFile(
    `${pipeline}/pipeline.yaml`,
    [
      "name: plant",
      "steps:",
      "  gen:",
      '    run: echo ssh-ed25519 AAAA attacker > "$RUNNEL_OUTPUT_AUTHORIZED_KEYS"',
      "    outputs: [authorized_keys]",
      "  use:",
      "    run: 'true'",
      `    inputs: { "${escape}": gen/authorized_keys }`,
      "",
    ].join("\n"),
  );
  for (const command of ["validate", "run"]) {
    const { code, stderr } = await runCli([command, "pipeline.yaml"], { cwd: pipeline });
    assert.equal(code, 2, stderr);
    assert.ok(
      stderr.includes(
        `pipeline.yaml:8:15: invalid key "${escape}" in "inputs" of step "use": expected an input ` +
          "name of letters, digits, _ . - not starting with . or - ([A-Za-z0-9_][A-Za-z0-9_.-]*)",
      ),
      stderr,
    );
    assert.doesNotMatch(stderr, /\n\s+at /, "no stack trace");
  }
  assert.equal(await Deno.lstat(`${box.dir}/planted`).then(() => true, () => false), false);
});

Deno.test("local: deno paths leaving the pipeline are located errors unless --config allows them (item 1b)", async () => {
  const { box, pipeline, host } = await hostBox();
  await using _ = box;
  await Deno.writeTextFile(`${host}/evil.ts`, "export default () => {};");
  await Deno.writeTextFile(
    `${pipeline}/steps.ts`,
    `export default async (ctx) => ctx.log(await Deno.readTextFile(${
      JSON.stringify(`${host}/shared/data.txt`)
    }));`,
  );
  await Deno.writeTextFile(
    `${pipeline}/escape.yaml`,
    [
      "name: escape",
      "steps:",
      "  reader:",
      "    module: ./steps.ts",
      `    permissions: { read: [/etc, ${host}/shared], write: [../host] }`,
      "  evil:",
      "    module: ../host/evil.ts",
      "",
    ].join("\n"),
  );
  const { code, stderr } = await runCli(["validate", "escape.yaml"], { cwd: pipeline });
  assert.equal(code, 2, stderr);
  const lines = stderr.trim().split("\n");
  assert.deepEqual(lines.slice(0, -1), [
    'escape.yaml:5:27: deno read path "/etc" of step "reader" is outside the pipeline directory — an operator allows a host path with policy.deno.read in the agent config',
    `escape.yaml:5:33: deno read path "${host}/shared" of step "reader" is outside the pipeline directory — an operator allows a host path with policy.deno.read in the agent config`,
    `escape.yaml:5:${
      `    permissions: { read: [/etc, ${host}/shared], write: [../host] }`.indexOf("../host") + 1
    }: deno write path "../host" of step "reader" is outside the pipeline directory — an operator allows a host path with policy.deno.write in the agent config`,
    'escape.yaml:7:13: module "../host/evil.ts" of step "evil" is outside the pipeline directory',
  ]);

  // Named by the operator (here the user, with --config), a host path is granted.
  await Deno.writeTextFile(
    `${pipeline}/allowed.yaml`,
    `name: allowed\nsteps:\n  reader:\n    module: ./steps.ts\n    permissions: { read: [${host}/shared] }\n`,
  );
  await Deno.writeTextFile(
    `${box.dir}/runnel.yaml`,
    `policy:\n  deno: { read: [./host/shared] }\n`,
  );
  const refused = await runCli(["run", "allowed.yaml"], { cwd: pipeline });
  assert.equal(refused.code, 2, refused.stderr);
  assert.match(refused.stderr, /allowed\.yaml:5:27: deno read path .* is outside the pipeline/);
  const allowed = await runCli(
    ["run", "allowed.yaml", "--config", `${box.dir}/runnel.yaml`, "--logs"],
    { cwd: pipeline },
  );
  assert.equal(allowed.code, 0, allowed.stderr + allowed.stdout);
  assert.match(allowed.stdout, /shared by the operator/);
});

Deno.test("local: outputs made links to host files and imports of them are refused, nothing leaks (items 4, 5)", async () => {
  const { box, pipeline, host, stateDir } = await hostBox();
  await using _ = box;
  await Deno.mkdir(`${pipeline}/steps`);
  const steps: Record<string, string> = {
    text: `import t from ${JSON.stringify(`${host}/shadow`)} with { type: "text" };`,
    db: `import db from "../.runnel/state.db" with { type: "text" };`,
    json: `import j from "../../host/secret.json" with { type: "json" };`,
    passwd: `import "/etc/passwd";`,
  };
  for (const [name, line] of Object.entries(steps)) {
    await Deno.writeTextFile(
      `${pipeline}/steps/${name}.ts`,
      `${line}\nexport default (ctx) => ctx.log(String(globalThis.t ?? ""));\n`,
    );
  }
  await Deno.writeTextFile(
    `${pipeline}/pipeline.yaml`,
    [
      "name: leaks",
      "steps:",
      "  link-secret:",
      "    backend: shell",
      `    run: ln -s ${host}/shadow "$RUNNEL_OUTPUT_OUT_TXT"`,
      "    outputs: [out.txt]",
      "  link-db:",
      "    backend: shell",
      `    run: ln -s ${stateDir}/state.db "$RUNNEL_OUTPUT_STATE_DB"`,
      "    outputs: [state.db]",
      "  print:",
      "    backend: shell",
      "    needs: [link-secret]",
      "    inputs: { leaked: link-secret/out.txt }",
      '    run: cat "$RUNNEL_INPUT_LEAKED"',
      ...Object.keys(steps).flatMap((name) => [
        `  import-${name}:`,
        `    module: ./steps/${name}.ts`,
      ]),
      "",
    ].join("\n"),
  );
  const { code, stdout, stderr } = await runCli(["run", "pipeline.yaml", "--logs"], {
    cwd: pipeline,
  });
  assert.equal(code, 1, stderr);
  const results = await stepResults(pipeline, stateDir);
  assert.deepEqual(failure(results["link-secret"].result), {
    errorClass: "permission",
    message:
      'declared output "out.txt" is a symbolic link; an output must be a regular file, and links are not followed',
  });
  assert.equal(failure(results["link-db"].result).errorClass, "permission");
  assert.notEqual(results.print.status, "succeeded");
  const refusals: Record<string, string> = {
    text: `"steps/text.ts" imports "${host}/shadow", which is outside the pipeline directory`,
    db: `"steps/db.ts" imports ".runnel/state.db", which belongs to the runner's state directory`,
    json: `"steps/json.ts" imports "${host}/secret.json", which is outside the pipeline directory`,
    passwd: `"steps/passwd.ts" imports "/etc/passwd", which is outside the pipeline directory`,
  };
  for (const [name, expected] of Object.entries(refusals)) {
    const { errorClass, message } = failure(results[`import-${name}`].result);
    assert.equal(errorClass, "permission", name);
    assert.ok(message.startsWith(expected), `${message}\n${expected}`);
  }
  assert.deepEqual(await filesHolding(stateDir, [SECRET, PASSWD_LINE]), []);
  for (const output of [stdout, stderr]) {
    assert.ok(!(output.includes(SECRET) || output.includes(PASSWD_LINE)), output);
  }
});

/** The server end of the agent stream, played by the test: it hands out raw assignments. */
class FakeServer {
  readonly messages: AgentMessage[] = [];
  #server!: AgentServiceServer;
  #agent: AgentConnection | undefined;

  static async start(token: string): Promise<FakeServer> {
    const fake = new FakeServer();
    fake.#server = await serveAgentService({
      address: "127.0.0.1:0",
      onConnect: async (connection) => {
        for await (const message of connection) {
          fake.messages.push(message);
          if (message.body === "hello") {
            if (message.hello.token !== token) return connection.end();
            fake.#agent = connection;
            await connection.send({ welcome: { serverId: "fake", heartbeatIntervalMs: 5_000 } });
          } else if (message.body === "result") {
            await connection.send({ ack: { attemptId: message.result.attemptId, accepted: true } });
          }
        }
        connection.end();
      },
    });
    return fake;
  }

  get address(): string {
    return `127.0.0.1:${this.#server.port}`;
  }

  get connected(): boolean {
    return this.#agent !== undefined;
  }

  async assign(spec: AssignmentSpec, backend: string): Promise<AttemptResult> {
    assert.ok(this.#agent, "no agent connected");
    await this.#agent.send({
      assign: { attemptId: spec.attemptId, backend, specJson: JSON.stringify(spec) },
    });
    return await poll(() => {
      for (const message of this.messages) {
        if (message.body === "result" && message.result.attemptId === spec.attemptId) {
          return JSON.parse(message.result.resultJson) as AttemptResult;
        }
      }
      return undefined;
    }, { what: `the result of ${spec.attemptId}`, timeoutMs: 60_000 });
  }

  close(): Promise<void> {
    return this.#server.close();
  }
}

/** `runnel agent` as a process; stopped by its pid. */
function startAgentProcess(args: string[], cwd: string, env: Record<string, string>) {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", ...CLI_PERMISSIONS, MAIN, "agent", ...args],
    cwd,
    env: { NO_COLOR: "1", ...env },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const output = child.output();
  return {
    async stop(): Promise<string> {
      try {
        Deno.kill(child.pid, "SIGTERM");
      } catch {
        // Already gone.
      }
      const { stdout, stderr } = await output;
      const decoder = new TextDecoder();
      return decoder.decode(stdout) + decoder.decode(stderr);
    },
  };
}

Deno.test({
  name:
    "agent: assignments that skipped validation are refused by the agent's policy, nothing leaks (items 1b, 3, 4, 5)",
  // Without Docker the docker attacks are skipped; in CI Docker must be there.
  async fn() {
    if (IN_CI && !dockerFingerprint.available) {
      throw new Error(`Expected Docker in CI: ${dockerFingerprint.detail}`);
    }
    const { box, pipeline, host } = await hostBox();
    await using _ = box;
    const token = "policy-test-token";
    const server = await FakeServer.start(token);
    const agentDir = `${box.dir}/agent`;
    const artifactsDir = `${box.dir}/artifacts`;
    const config = `${box.dir}/agent.yaml`;
    // The fake server sends no bundle: it names a directory of this machine, which the
    // policy lists as a shared-filesystem operator would.
    await Deno.writeTextFile(
      config,
      `policy:\n  backends: [deno, shell, docker]\n  pipeline-dirs: [${pipeline}]\n`,
    );
    await Deno.writeTextFile(`${pipeline}/ok.ts`, "export default () => {};\n");
    await Deno.writeTextFile(
      `${pipeline}/import.ts`,
      `import t from ${JSON.stringify(`${host}/shadow`)} with { type: "text" };\n` +
        "export default (ctx) => ctx.log(t);\n",
    );
    const agent = startAgentProcess(
      [
        "--server",
        server.address,
        "--token",
        token,
        "--config",
        config,
        "--state-dir",
        agentDir,
        "--artifacts",
        artifactsDir,
        "--allow-shell",
      ],
      box.dir,
      { RUNNEL_AGENT_SECRET: SECRET },
    );
    let agentOutput = "";
    try {
      await poll(() => server.connected || undefined, { what: "the agent", timeoutMs: 60_000 });
      const refusal = async (
        assignment: AssignmentSpec,
        backend: string,
      ): Promise<string> => {
        const { errorClass, message } = failure(await server.assign(assignment, backend));
        assert.equal(errorClass, "permission", message);
        return message;
      };

      // Item 3: an input name that leaves the inputs directory.
      const store = openLocalArtifactStore(artifactsDir);
      await Deno.writeTextFile(`${box.dir}/keys`, "ssh-ed25519 AAAA attacker\n");
      const record = await store.put(`${box.dir}/keys`, {
        run: "attack0",
        step: "gen",
        name: "authorized_keys",
      });
      const planted = `../../../../../../../../../..${box.dir}/planted`;
      assert.match(
        await refusal(
          assignmentSpec("use", { run: "true" }, {
            baseDir: pipeline,
            inputs: {
              [planted]: {
                runId: "attack0",
                stepId: "gen",
                name: "authorized_keys",
                digest: record.digest,
              },
            },
          }),
          "shell",
        ),
        /^Expected input name ".*planted" to match/,
      );
      assert.equal(await Deno.lstat(`${box.dir}/planted`).then(() => true, () => false), false);

      // Item 1b: a pipeline directory the agent was not sent, host paths, hosts and env vars
      // it does not allow.
      assert.equal(
        await refusal(
          assignmentSpec("root", { module: "etc/passwd", permissions: { read: ["etc"] } }, {
            baseDir: "/",
          }),
          "deno",
        ),
        `agent policy: the pipeline directory "/" is not one this host was sent; allow it with policy.pipeline-dirs in ${config}`,
      );
      assert.equal(
        await refusal(
          assignmentSpec("read", {
            module: "ok.ts",
            permissions: {
              read: ["/etc"],
              write: ["../host"],
              net: ["evil.example:443"],
              env: ["RUNNEL_AGENT_SECRET"],
            },
          }, { baseDir: pipeline }),
          "deno",
        ),
        [
          `agent policy: deno read "/etc" is outside the pipeline directory; allow it with policy.deno.read in ${config}`,
          `deno write "../host" is outside the pipeline directory; allow it with policy.deno.write in ${config}`,
          `deno net "evil.example:443" is not an allowed host; allow it with policy.deno.net in ${config}`,
          `deno env "RUNNEL_AGENT_SECRET" is not an env var this host passes on; allow it with policy.deno.env in ${config}`,
        ].join("; "),
      );
      assert.match(
        await refusal(
          assignmentSpec("evil", { module: "../host/shadow" }, { baseDir: pipeline }),
          "deno",
        ),
        /^agent policy: deno module "\.\.\/host\/shadow" is outside the pipeline directory/,
      );
      assert.equal(
        await refusal(
          assignmentSpec("root", { image: BUSYBOX, run: "id" }, { baseDir: pipeline }),
          "docker",
        ),
        `agent policy: docker step would run as root (no "user"); set a user such as "65534", or allow it with policy.docker.root in ${config}`,
      );
      assert.match(
        await refusal(
          assignmentSpec("net", { image: BUSYBOX, run: "true", user: "65534", network: true }, {
            baseDir: pipeline,
          }),
          "docker",
        ),
        /^agent policy: docker network is off here; allow it with policy\.docker\.network in /,
      );

      // Item 5: a static import of a host file.
      assert.match(
        await refusal(
          assignmentSpec("import", { module: "import.ts" }, { baseDir: pipeline }),
          "deno",
        ),
        new RegExp(`^"import\\.ts" imports "${host}/shadow", which is outside the pipeline`),
      );

      // Item 4: outputs made links to a host file, by a shell step and a container.
      assert.match(
        await refusal(
          assignmentSpec("link", { run: `ln -s ${host}/shadow "$RUNNEL_OUTPUT_OUT_TXT"` }, {
            baseDir: pipeline,
            outputs: ["out.txt"],
          }),
          "shell",
        ),
        /^declared output "out\.txt" is a symbolic link/,
      );
      if (dockerFingerprint.available) {
        assert.match(
          await refusal(
            assignmentSpec("contained", {
              image: BUSYBOX,
              user: "65534",
              run: `ln -s ${host}/shadow /runnel/out/out.txt`,
            }, { baseDir: pipeline, outputs: ["out.txt"] }),
            "docker",
          ),
          /^declared output "out\.txt" is a symbolic link/,
        );
      }
    } finally {
      agentOutput = await agent.stop();
      await server.close();
    }
    const sent = JSON.stringify(server.messages);
    assert.ok(!sent.includes(SECRET), "the agent sent the secret");
    assert.ok(!agentOutput.includes(SECRET), "the agent logged the secret");
    assert.deepEqual(await filesHolding(agentDir, [SECRET]), []);
    assert.deepEqual(await filesHolding(artifactsDir, [SECRET]), []);
  },
});

Deno.test({
  name:
    "local docker: a container's output linked to a host file or the state db is refused (item 4)",
  ignore: !dockerFingerprint.available && !IN_CI,
  async fn() {
    if (!dockerFingerprint.available) {
      throw new Error(`Expected Docker in CI: ${dockerFingerprint.detail}`);
    }
    const { box, pipeline, host, stateDir } = await hostBox();
    await using _ = box;
    await Deno.writeTextFile(
      `${pipeline}/pipeline.yaml`,
      [
        "name: contained",
        "defaults: { backend: docker }",
        "steps:",
        ...[["as-nobody", '"65534"'], ["as-root", '"0"']].flatMap(([name, user]) => [
          `  ${name}:`,
          `    image: ${BUSYBOX}`,
          `    user: ${user}`,
          "    network: false",
          `    run: ln -s ${host}/shadow /runnel/out/out.txt && ln -s ${stateDir}/state.db /runnel/out/db`,
          "    outputs: [out.txt, db]",
        ]),
        "",
      ].join("\n"),
    );
    const { code, stderr } = await runCli(["run", "pipeline.yaml"], { cwd: pipeline });
    assert.equal(code, 1, stderr);
    const results = await stepResults(pipeline, stateDir);
    for (const name of ["as-nobody", "as-root"]) {
      const { errorClass, message } = failure(results[name].result);
      assert.equal(errorClass, "permission", message);
      assert.match(message, /^declared output "out\.txt" is a symbolic link/);
    }
    assert.deepEqual(await filesHolding(stateDir, [SECRET]), []);
  },
});
