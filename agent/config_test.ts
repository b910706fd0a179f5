import assert from "node:assert/strict";
import { AgentConfigError, loadAgentConfig } from "./config.ts";

const ROOT = new URL("..", import.meta.url).pathname.replace(/\/$/, "");

Deno.test("agent config: plugins resolve beside the file, tuning becomes milliseconds", async () => {
  const dir = await Deno.makeTempDir({ prefix: "runnel_config_" });
  try {
    await Deno.symlink(`${ROOT}/examples/backends/http`, `${dir}/http`);
    await Deno.writeTextFile(
      `${dir}/agent.yaml`,
      "plugins:\n  http: ./http\nplugin-hosts:\n  idle: 30s\n  heartbeat: 500ms\n  heartbeat-timeout: 5s\n",
    );
    const config = await loadAgentConfig({ file: `${dir}/agent.yaml` });
    assert.deepEqual(config.plugins.map((p) => [p.name, p.module]), [
      ["http", `file://${dir}/http/mod.ts`],
    ]);
    assert.deepEqual(config.hosts, { idleMs: 30_000, heartbeatMs: 500, heartbeatTimeoutMs: 5_000 });
    const flagged = await loadAgentConfig({
      file: `${dir}/agent.yaml`,
      pluginFlags: ["http=https://plugins.example/http/"],
    });
    assert.equal(flagged.plugins[0].module, "https://plugins.example/http/mod.ts");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("agent config: bad files and flags get plain messages", async () => {
  const dir = await Deno.makeTempDir({ prefix: "runnel_config_" });
  try {
    const cases: Array<[string, RegExp]> = [
      ["plugin-hosts: { idle: soon }\n", /"plugin-hosts\.idle": Expected a duration like "30s"/],
      [
        "plugins: { http: ./nowhere }\n",
        /Expected backend plugin "http" at .*nowhere, found nothing/,
      ],
      ["plugins: { docker: ./x }\n", /expected a plugin name other than "docker"/],
      ["plugin: {}\n", /Unrecognized key: "plugin"/],
      ["plugins: [\n", /Expected a readable YAML agent config/],
    ];
    for (const [text, expected] of cases) {
      await Deno.writeTextFile(`${dir}/agent.yaml`, text);
      await assert.rejects(
        loadAgentConfig({ file: `${dir}/agent.yaml` }),
        (error: unknown) => error instanceof AgentConfigError && expected.test(error.message),
        text,
      );
    }
    await assert.rejects(
      loadAgentConfig({ pluginFlags: ["http"] }),
      /Expected --plugin NAME=PATH-OR-URL, got "http"/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("agent config: secrets are declared by name; a --secrets file adds and overrides", async () => {
  const dir = await Deno.realPath(await Deno.makeTempDir({ prefix: "runnel_config_" }));
  try {
    await Deno.writeTextFile(
      `${dir}/agent.yaml`,
      "secrets:\n  db-password: { env: DB_PASSWORD }\n  deploy-key: { file: keys/deploy }\n",
    );
    await Deno.writeTextFile(
      `${dir}/more.yaml`,
      "deploy-key: { file: /etc/key }\napi: { env: A }\n",
    );
    const config = await loadAgentConfig({ file: `${dir}/agent.yaml` });
    assert.deepEqual(config.secrets, {
      "db-password": { env: "DB_PASSWORD" },
      "deploy-key": { file: `${dir}/keys/deploy` },
    });
    const both = await loadAgentConfig({
      file: `${dir}/agent.yaml`,
      secretsFile: `${dir}/more.yaml`,
    });
    assert.deepEqual(both.secrets, {
      "db-password": { env: "DB_PASSWORD" },
      "deploy-key": { file: "/etc/key" },
      api: { env: "A" },
    });
    await Deno.writeTextFile(`${dir}/bad.yaml`, "db-password: hunter2\n");
    await assert.rejects(
      loadAgentConfig({ secretsFile: `${dir}/bad.yaml` }),
      (error: unknown) =>
        error instanceof AgentConfigError &&
        error.message.startsWith(`${dir}/bad.yaml: expected`) &&
        !error.message.includes("hunter2"),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("agent config: the policy section becomes overrides, host paths made absolute", async () => {
  const dir = await Deno.makeTempDir({ prefix: "runnel_config_" });
  try {
    await Deno.writeTextFile(
      `${dir}/agent.yaml`,
      [
        "policy:",
        "  backends: [deno, docker]",
        "  pipeline-dirs: [/srv/pipelines]",
        "  deno: { read: [/srv/shared, ./data], net: [api.example.com:443, '*'], env: [AWS_REGION] }",
        "  docker: { network: true, build-contexts: [../contexts] }",
        "",
      ].join("\n"),
    );
    const config = await loadAgentConfig({ file: `${dir}/agent.yaml` });
    assert.equal(config.file, `${dir}/agent.yaml`);
    assert.deepEqual(config.policy, {
      backends: ["deno", "docker"],
      pipelineDirs: ["/srv/pipelines"],
      deno: {
        read: ["/srv/shared", `${dir}/data`],
        net: ["api.example.com:443", "*"],
        env: ["AWS_REGION"],
      },
      docker: { network: true, buildContexts: [`${dir.slice(0, dir.lastIndexOf("/"))}/contexts`] },
    });
    assert.deepEqual((await loadAgentConfig()).policy, {});
    const cases: Array<[string, RegExp]> = [
      ["policy: { deno: { env: [A-B] } }\n", /"policy\.deno\.env\.0": Expected an env var name/],
      ["policy: { docker: { privileged: true } }\n", /Unrecognized key: "privileged"/],
      ["policy: { backends: [Docker] }\n", /"policy\.backends\.0": Expected a backend name/],
      ["policy: { deno: { net: [a/b] } }\n", /Expected a host, host:port or "\*"/],
    ];
    for (const [text, expected] of cases) {
      await Deno.writeTextFile(`${dir}/agent.yaml`, text);
      await assert.rejects(
        loadAgentConfig({ file: `${dir}/agent.yaml` }),
        (error: unknown) => error instanceof AgentConfigError && expected.test(error.message),
        text,
      );
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
