import assert from "node:assert/strict";
import {
  agentPolicy,
  type AttemptPolicy,
  backendRefusal,
  checkAttempt,
  localPolicy,
  PolicyError,
} from "./policy.ts";

/** A host layout: a pipeline directory, the runner's state directory and scratch root. */
async function host(): Promise<{ root: string } & AsyncDisposable> {
  const root = await Deno.realPath(await Deno.makeTempDir({ prefix: "runnel_policy_test_" }));
  for (const dir of ["pipeline/data", "state/work", "shared"]) {
    await Deno.mkdir(`${root}/${dir}`, { recursive: true });
  }
  return { root, [Symbol.asyncDispose]: () => Deno.remove(root, { recursive: true }) };
}

/** The problems the policy finds with a step, or [] when it may run. */
async function problems(
  policy: AttemptPolicy,
  root: string,
  backend: string,
  config: Record<string, unknown>,
  layout: { baseDir?: string; stateDir?: string } = {},
): Promise<string[]> {
  try {
    await checkAttempt(policy, {
      backend,
      config,
      baseDir: layout.baseDir ?? `${root}/pipeline`,
      stateDir: layout.stateDir ?? `${root}/state`,
      scratchRoot: `${layout.stateDir ?? `${root}/state`}/work`,
    });
    return [];
  } catch (error) {
    assert.ok(error instanceof PolicyError, String(error));
    assert.equal(error.errorClass, "permission");
    assert.equal(error.message, `${policy.name}: ${error.problems.join("; ")}`);
    return error.problems;
  }
}

Deno.test("agent policy: a deno step gets its pipeline directory, no host path, host or env var", async () => {
  await using box = await host();
  // The test's pipeline directory stands for one the agent was sent.
  const policy = agentPolicy({ pipelineDirs: [`${box.root}/pipeline`] });
  assert.deepEqual(
    await problems(policy, box.root, "deno", {
      module: "./steps/x.ts",
      permissions: { read: ["data", "./data/../data"], write: ["out"] },
    }),
    [],
  );
  assert.deepEqual(
    await problems(policy, box.root, "deno", {
      module: "../evil.ts",
      permissions: {
        read: ["/etc", "../shared"],
        write: ["/tmp/x"],
        net: ["api.example.com:443"],
        env: ["AWS_SECRET_ACCESS_KEY"],
      },
    }),
    [
      'deno module "../evil.ts" is outside the pipeline directory; a step module must be a file of its pipeline directory',
      'deno read "/etc" is outside the pipeline directory; allow it with policy.deno.read in agent.yaml',
      'deno read "../shared" is outside the pipeline directory; allow it with policy.deno.read in agent.yaml',
      'deno write "/tmp/x" is outside the pipeline directory; allow it with policy.deno.write in agent.yaml',
      'deno net "api.example.com:443" is not an allowed host; allow it with policy.deno.net in agent.yaml',
      'deno env "AWS_SECRET_ACCESS_KEY" is not an env var this host passes on; allow it with policy.deno.env in agent.yaml',
    ],
  );
});

Deno.test("agent policy: what the operator allows, and nothing that covers the runner's own files", async () => {
  await using box = await host();
  const policy = agentPolicy({
    pipelineDirs: [`${box.root}/pipeline`],
    deno: { read: [`${box.root}/shared`, "/"], net: ["api.example.com"], env: ["AWS_REGION"] },
  }, { configFile: "/etc/runnel/agent.yaml" });
  assert.deepEqual(
    await problems(policy, box.root, "deno", {
      module: "x.ts",
      permissions: {
        read: [`${box.root}/shared/in`, "../shared"],
        net: ["api.example.com", "api.example.com:8443"],
        env: ["AWS_REGION"],
      },
    }),
    [],
  );
  // "/" is allowed, yet not the state directory in it, nor the scratch root.
  assert.deepEqual(
    await problems(policy, box.root, "deno", {
      module: "x.ts",
      permissions: { read: ["/", `${box.root}/state/work/r1`], net: ["evil.example"] },
    }),
    [
      `deno read "/" reaches into the runner's state directory; grant a path that does not cover it`,
      `deno read "${box.root}/state/work/r1" reaches into the runner's state directory; grant a path that does not cover it`,
      'deno net "evil.example" is not an allowed host; allow it with policy.deno.net in /etc/runnel/agent.yaml',
    ],
  );
  // A state directory inside the pipeline directory (local mode's .runnel).
  assert.deepEqual(
    await problems(
      localPolicy(),
      box.root,
      "deno",
      { module: "x.ts", permissions: { read: [".", "data"], write: [".runnel/artifacts"] } },
      { stateDir: `${box.root}/pipeline/.runnel` },
    ),
    [
      `deno read "." reaches into the runner's state directory; grant a path that does not cover it`,
      `deno write ".runnel/artifacts" reaches into the runner's state directory; grant a path that does not cover it`,
    ],
  );
});

Deno.test("policy: a link out of the pipeline directory is judged where it leads", async () => {
  await using box = await host();
  await Deno.symlink("/etc", `${box.root}/pipeline/etc`);
  await Deno.symlink(`${box.root}/state`, `${box.root}/pipeline/state`);
  assert.deepEqual(
    await problems(agentPolicy({ pipelineDirs: [box.root] }), box.root, "deno", {
      module: "etc/passwd",
      permissions: { read: ["etc", "etc/not-there", "state"] },
    }),
    [
      'deno module "etc/passwd" is outside the pipeline directory; a step module must be a file of its pipeline directory',
      'deno read "etc" is outside the pipeline directory; allow it with policy.deno.read in agent.yaml',
      'deno read "etc/not-there" is outside the pipeline directory; allow it with policy.deno.read in agent.yaml',
      `deno read "state" reaches into the runner's state directory; grant a path that does not cover it`,
    ],
  );
});

Deno.test("agent policy: docker is off unless listed; no network, no root, builds from the pipeline", async () => {
  await using box = await host();
  assert.deepEqual(
    await problems(agentPolicy(), box.root, "docker", { image: "x", user: "65534" }),
    [
      "docker steps are off here; allow them with policy.backends in agent.yaml",
    ],
  );
  const policy = agentPolicy({
    backends: ["deno", "docker"],
    pipelineDirs: [`${box.root}/pipeline`],
  });
  assert.deepEqual(
    await problems(policy, box.root, "docker", {
      image: "x",
      user: "65534",
      build: { from: "x", context: "data", copy: ["a.ts"] },
    }),
    [],
  );
  assert.deepEqual(
    await problems(policy, box.root, "docker", {
      network: true,
      build: { from: "x", context: "../.." },
    }),
    [
      "docker network is off here; allow it with policy.docker.network in agent.yaml",
      'docker step would run as root (no "user"); set a user such as "65534", or allow it with policy.docker.root in agent.yaml',
      'docker build context "../.." is outside the pipeline directory; allow it with policy.docker.build-contexts in agent.yaml',
    ],
  );
  assert.equal(
    (await problems(policy, box.root, "docker", { image: "x", user: "0:0" }))[0],
    'docker step would run as root (user "0:0"); set a user such as "65534", or allow it with policy.docker.root in agent.yaml',
  );
});

Deno.test("agent policy: a docker step's services run as root only where the step may", async () => {
  await using box = await host();
  const services = [
    { name: "db", image: "postgres" },
    { name: "cache", image: "x", user: "root" },
    { name: "web", image: "x", user: "65534" },
  ];
  const config = { image: "x", user: "65534", services };
  const policy = agentPolicy({ backends: ["docker"] });
  assert.deepEqual(await problems(policy, box.root, "docker", config), [
    'docker service "db" would run as root (no "user"); set its user such as "65534", or allow it with policy.docker.root in agent.yaml',
    'docker service "cache" would run as root (user "root"); set its user such as "65534", or allow it with policy.docker.root in agent.yaml',
  ]);
  const root = agentPolicy({ backends: ["docker"], docker: { root: true } });
  assert.deepEqual(await problems(root, box.root, "docker", config), []);
  assert.deepEqual(await problems(localPolicy(), box.root, "docker", config), []);
});

Deno.test("local policy: the user is the operator, but host paths must be named", async () => {
  await using box = await host();
  const policy = localPolicy();
  assert.deepEqual(
    await problems(policy, box.root, "docker", {
      image: "x",
      network: true,
      build: { from: "x", context: "..", copy: ["shared"] },
    }),
    [],
  );
  // The build context may be anywhere; what it copies is never the runner's own.
  assert.deepEqual(
    await problems(policy, box.root, "docker", {
      image: "x",
      build: { from: "x", context: "..", copy: ["state/work"] },
    }),
    [`docker build copies "state/work", which reaches into the runner's state directory`],
  );
  assert.deepEqual(
    await problems(policy, box.root, "deno", {
      module: "x.ts",
      permissions: { net: ["anywhere.example"], env: ["HOME"], read: ["/etc"] },
    }),
    [
      'deno read "/etc" is outside the pipeline directory; allow it with policy.deno.read in a --config file',
    ],
  );
  assert.deepEqual(
    await problems(localPolicy({ deno: { read: ["/etc"] } }), box.root, "deno", {
      module: "x.ts",
      permissions: { read: ["/etc"] },
    }),
    [],
  );
  for (const backend of ["shell", "docker", "deno", "http"]) {
    assert.equal(backendRefusal(policy, backend), undefined, backend);
  }
});

Deno.test("agent policy: backends are the defaults, the plugins the config names, or the list it gives", () => {
  const policy = agentPolicy({}, { plugins: ["http"] });
  assert.deepEqual(policy.backends, ["deno", "shell", "http"]);
  assert.equal(
    backendRefusal(policy, "docker"),
    "agent policy: docker steps are off here; allow them with policy.backends in agent.yaml",
  );
  assert.deepEqual(agentPolicy({ backends: ["docker"] }, { plugins: ["http"] }).backends, [
    "docker",
  ]);
});

Deno.test("agent policy: a pipeline copy inside the agent's state directory is the pipeline's", async () => {
  await using box = await host();
  const bundle = `${box.root}/state/bundles/abc`;
  await Deno.mkdir(`${bundle}/steps`, { recursive: true });
  await Deno.mkdir(`${box.root}/state/bundles/other`);
  const layout = { baseDir: bundle };
  assert.deepEqual(
    await problems(agentPolicy(), box.root, "deno", {
      module: "steps/hello.ts",
      permissions: { read: ["."] },
    }, layout),
    [],
  );
  // Every run of the pipeline shares the copy: one run may not change what the next reads.
  assert.deepEqual(
    await problems(agentPolicy(), box.root, "deno", {
      module: "steps/hello.ts",
      permissions: { write: ["steps"] },
    }, layout),
    [
      `deno write "steps" is inside the pipeline copy that every run of this pipeline shares ` +
      "on this agent; write the step's outputs instead",
    ],
  );
  assert.deepEqual(
    await problems(agentPolicy(), box.root, "deno", {
      module: "steps/hello.ts",
      permissions: { read: ["../other", ".."] },
    }, layout),
    [
      `deno read "../other" reaches into the runner's state directory; grant a path that does not cover it`,
      `deno read ".." reaches into the runner's state directory; grant a path that does not cover it`,
    ],
  );
});

Deno.test("agent policy: a pipeline directory a plan names is believed only where the agent keeps them", async () => {
  await using box = await host();
  const bundle = `${box.root}/state/bundles/abc`;
  await Deno.mkdir(bundle, { recursive: true });
  await Deno.symlink("/", `${box.root}/state/bundles/root`);
  const policy = agentPolicy({ backends: ["deno", "shell", "docker"] });
  const deno = { module: "etc/passwd", permissions: { read: ["etc"] } };
  for (const baseDir of ["/", `${box.root}/pipeline`, `${box.root}/state/bundles/root`]) {
    assert.deepEqual(await problems(policy, box.root, "deno", deno, { baseDir }), [
      `the pipeline directory "${baseDir}" is not one this host was sent; allow it with policy.pipeline-dirs in agent.yaml`,
    ]);
  }
  assert.deepEqual(
    await problems(policy, box.root, "deno", { module: "x.ts" }, { baseDir: bundle }),
    [],
  );
  assert.deepEqual(
    await problems(
      agentPolicy({ pipelineDirs: [`${box.root}/pipeline`] }),
      box.root,
      "deno",
      { module: "x.ts" },
    ),
    [],
  );
  // Shell steps are trusted; a docker step without a build uses no pipeline directory.
  assert.deepEqual(
    await problems(policy, box.root, "shell", { run: "true" }, { baseDir: "/" }),
    [],
  );
  assert.deepEqual(
    await problems(policy, box.root, "docker", { image: "x", user: "1" }, { baseDir: "/" }),
    [],
  );
  // Local mode: the user names the pipeline directory.
  assert.deepEqual(
    await problems(localPolicy(), box.root, "deno", { module: "x.ts" }, { baseDir: "/srv/p" }),
    [],
  );
});
