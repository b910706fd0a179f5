import assert from "node:assert/strict";
import { BUSINESS_EXIT_CODE } from "../../core/model.ts";
import type { AttemptSpec } from "../backend.ts";
import { collectContext, ImageBuildError } from "./_build.ts";
import {
  classifyContainerExit,
  containerCreateOptions,
  containerEnvironment,
  containerName,
  formatBytes,
} from "./_container.ts";
import { contextEntries, generateDockerfile, imageTag, repositoryName } from "./_dockerfile.ts";
import { UsageSampler } from "./_execution.ts";
import {
  attemptNetworkName,
  demuxText,
  serviceCreateOptions,
  serviceEnvironment,
} from "./_services.ts";
import { dockerManifest, parseDockerHost } from "./manifest.ts";
import createDockerBackend, { validateDockerConfig } from "./mod.ts";

const MiB = 1024 * 1024;

function spec(overrides: Partial<AttemptSpec> = {}): AttemptSpec {
  return {
    agentId: "local",
    scratchRoot: "/scratch",
    runId: "r1",
    stepId: "analyze",
    attemptId: "r1/analyze/2",
    attempt: 2,
    config: { image: "runnel/busybox:local" },
    baseDir: "/pipelines/energy",
    workDir: "/scratch/r1/analyze-2",
    inputs: { data: "/scratch/r1/analyze-2/in/data", "all parts": "/scratch/r1/analyze-2/in/p" },
    inputsDir: "/scratch/r1/analyze-2/in",
    outputsDir: "/scratch/r1/analyze-2/out",
    outputs: ["summary.json"],
    env: { GREETING: "hello", RUNNEL_STEP: "spoofed" },
    matrix: {},
    ...overrides,
  };
}

Deno.test("docker config: valid configs pass, each problem gets a message", () => {
  assert.deepEqual(validateDockerConfig({ image: "alpine", run: "echo hi" }), []);
  assert.deepEqual(
    validateDockerConfig({
      image: "alpine",
      args: ["echo", "hi"],
      workdir: "/work",
      user: "65534",
      network: true,
      with: { anything: 1 },
    }),
    [],
  );
  assert.deepEqual(
    validateDockerConfig({ build: { from: "runnel/deno:local", copy: ["steps", "./a/b.ts"] } }),
    [],
  );
  assert.deepEqual(validateDockerConfig({ run: "echo hi" }), [
    'Expected either "image" or "build" (exactly one of them)',
  ]);
  assert.deepEqual(validateDockerConfig({ image: "a", build: { from: "b" } }), [
    'Expected either "image" or "build" (exactly one of them)',
  ]);
  const messages = validateDockerConfig({
    image: "alpine",
    workdir: "relative",
    network: "yes",
    colour: "blue",
  });
  assert.equal(messages.length, 3, messages.join("\n"));
  assert.ok(messages.some((m) => m.startsWith('"workdir": Expected an absolute path')));
  assert.ok(messages.some((m) => m.startsWith('"network": ')));
  assert.ok(messages.some((m) => m.includes("colour")));
  const build = validateDockerConfig({
    build: { from: "b", copy: ["../secrets"], dependencies: "/etc/passwd", env: { "1X": "v" } },
  });
  assert.ok(
    build.some((m) => m.startsWith('"build.copy.0": Expected a path relative')),
    build.join(),
  );
  assert.ok(build.some((m) => m.startsWith('"build.dependencies": Expected a path relative')));
  assert.ok(build.includes(
    '"build.env": Expected environment variable names ([A-Za-z_][A-Za-z0-9_]*) as keys',
  ));
});

Deno.test("docker manifest: grants the socket and stable roots, DOCKER_HOST only when set", () => {
  const previous = Deno.env.get("DOCKER_HOST");
  Deno.env.delete("DOCKER_HOST");
  try {
    const permissions = dockerManifest.permissions(
      { image: "alpine", build: { from: "x", context: "../shared" } },
      spec(),
    );
    assert.deepEqual(permissions, {
      read: ["/var/run/docker.sock", "/pipelines/energy", "/scratch", "/pipelines/shared"],
      write: ["/var/run/docker.sock", "/scratch"],
      net: ["unix:/var/run/docker.sock"],
      env: [],
      run: [],
    });
    assert.deepEqual(
      dockerManifest.permissions({ image: "alpine" }, spec({ scratchRoot: "/scratch/r1" })).read,
      ["/var/run/docker.sock", "/pipelines/energy", "/scratch/r1"],
      "granted by the scratch root, not per attempt",
    );
    Deno.env.set("DOCKER_HOST", "unix:///run/user/1000/docker.sock");
    const host = dockerManifest.hostPermissions({ scratchRoot: "/scratch", agentId: "a1" });
    assert.deepEqual(host, {
      read: ["/run/user/1000/docker.sock", "/scratch"],
      write: ["/run/user/1000/docker.sock"],
      net: ["unix:/run/user/1000/docker.sock"],
      env: ["DOCKER_HOST"],
      run: [],
    });
  } finally {
    if (previous === undefined) Deno.env.delete("DOCKER_HOST");
    else Deno.env.set("DOCKER_HOST", previous);
  }
});

Deno.test("docker manifest: DOCKER_HOST forms", () => {
  assert.deepEqual(parseDockerHost(undefined), {
    kind: "socket",
    socketPath: "/var/run/docker.sock",
  });
  assert.deepEqual(parseDockerHost("unix:///tmp/d.sock"), {
    kind: "socket",
    socketPath: "/tmp/d.sock",
  });
  assert.deepEqual(parseDockerHost("tcp://10.0.0.2:2375"), {
    kind: "tcp",
    host: "10.0.0.2",
    port: 2375,
  });
  assert.throws(() => parseDockerHost("ssh://me@host"), { code: "docker_host_unsupported" });
});

Deno.test("docker: an unreachable daemon makes the backend unavailable, with how to start it", async () => {
  const previous = Deno.env.get("DOCKER_HOST");
  Deno.env.set("DOCKER_HOST", "unix:///nonexistent/docker.sock");
  try {
    const fingerprint = await createDockerBackend().fingerprint();
    assert.deepEqual(fingerprint, {
      available: false,
      detail: "Docker is not running (cannot reach /nonexistent/docker.sock): start it with " +
        "`sudo dockerd &` or `sudo systemctl start docker`",
    });
  } finally {
    if (previous === undefined) Deno.env.delete("DOCKER_HOST");
    else Deno.env.set("DOCKER_HOST", previous);
  }
});

Deno.test("docker: the container sees container paths in RUNNEL_* and the step's env", () => {
  const env = containerEnvironment(spec({ matrix: { region: "eu" } }));
  assert.equal(env.GREETING, "hello");
  assert.equal(env.RUNNEL_STEP, "analyze", "the standard variables win over the step's env");
  assert.equal(env.RUNNEL_INPUTS, "/runnel/in");
  assert.equal(env.RUNNEL_INPUT_DATA, "/runnel/in/data");
  assert.equal(env.RUNNEL_INPUT_ALL_PARTS, "/runnel/in/all parts");
  assert.equal(env.RUNNEL_OUTPUTS, "/runnel/out");
  assert.equal(env.RUNNEL_OUTPUT_SUMMARY_JSON, "/runnel/out/summary.json");
  assert.equal(env.RUNNEL_MATRIX_REGION, "eu");
  assert.equal(env.RUNNEL_ATTEMPT, "2");
});

Deno.test("docker: the create request mounts, limits, labels and isolates", () => {
  const options = containerCreateOptions(
    spec({ resources: { cpu: 0.5, memoryBytes: 64 * MiB }, agentId: "agent-7" }),
    { image: "runnel/busybox:local", run: 'echo "$1"', args: ["a"], user: "65534", workdir: "/w" },
    "runnel/busybox:local",
  );
  assert.equal(options.name, containerName("r1/analyze/2"));
  assert.deepEqual(options.Entrypoint, ["/bin/sh", "-c"]);
  assert.deepEqual(options.Cmd, ['echo "$1"', "sh", "a"]);
  assert.equal(options.User, "65534");
  assert.equal(options.WorkingDir, "/w");
  assert.equal(options.Tty, false);
  assert.deepEqual(options.Labels, {
    "runnel.managed": "true",
    "runnel.run": "r1",
    "runnel.step": "analyze",
    "runnel.attempt": "2",
    "runnel.attempt-id": "r1/analyze/2",
    "runnel.agent": "agent-7",
  });
  const host = options.HostConfig!;
  assert.equal(host.NetworkMode, "none");
  assert.equal(host.AutoRemove, false);
  assert.equal(host.Memory, 64 * MiB);
  assert.equal(host.MemorySwap, 64 * MiB);
  assert.equal(host.NanoCpus, 500_000_000);
  assert.deepEqual(host.Mounts, [
    {
      Type: "bind",
      Source: "/scratch/r1/analyze-2/in/data",
      Target: "/runnel/in/data",
      ReadOnly: true,
    },
    {
      Type: "bind",
      Source: "/scratch/r1/analyze-2/in/p",
      Target: "/runnel/in/all parts",
      ReadOnly: true,
    },
    { Type: "bind", Source: "/scratch/r1/analyze-2/out", Target: "/runnel/out" },
  ]);

  const exec = containerCreateOptions(
    spec(),
    { image: "x", args: ["ls", "-l"], network: true },
    "x",
  );
  assert.equal(exec.Entrypoint, undefined, "args keep the image's entrypoint");
  assert.deepEqual(exec.Cmd, ["ls", "-l"]);
  assert.equal(exec.HostConfig!.NetworkMode, "bridge");
  assert.equal(exec.HostConfig!.Memory, undefined);
  assert.equal(exec.Labels!["runnel.agent"], "local");
  const plain = containerCreateOptions(spec(), { image: "x" }, "x");
  assert.equal(plain.Cmd, undefined, "no run and no args: the image's own command");
});

Deno.test("docker: container names are deterministic, valid and distinct", () => {
  const name = containerName("run-1/convert[region=eu]/1");
  assert.equal(name, containerName("run-1/convert[region=eu]/1"));
  assert.match(name, /^runnel-run-1_convert_region_eu_1-[0-9a-f]{8}$/);
  assert.notEqual(containerName("a/b"), containerName("a_b"));
  assert.match(containerName("x".repeat(500)), /^[a-zA-Z0-9][a-zA-Z0-9_.-]{1,140}$/);
});

Deno.test("docker: exits map to error classes like the shell backend's", () => {
  assert.deepEqual(classifyContainerExit({ exitCode: 0 }), { exitCode: 0 });
  assert.deepEqual(classifyContainerExit({ exitCode: BUSINESS_EXIT_CODE }), {
    exitCode: BUSINESS_EXIT_CODE,
    errorClass: "business",
    message: `step reported a business error (exit code ${BUSINESS_EXIT_CODE})`,
  });
  assert.deepEqual(classifyContainerExit({ exitCode: 3 }), {
    exitCode: 3,
    errorClass: "application",
    message: "step exited with code 3",
  });
  assert.deepEqual(
    classifyContainerExit({ exitCode: 137, oomKilled: true, memoryBytes: 64 * MiB }),
    {
      exitCode: 137,
      signal: "SIGKILL",
      errorClass: "application",
      message: "killed: memory limit 64 MiB exceeded",
    },
  );
  assert.equal(
    classifyContainerExit({ exitCode: 137, memoryBytes: 1.5 * 1024 * MiB }).message,
    "killed: memory limit 1.5 GiB exceeded",
    "SIGKILL under a memory limit is taken for the OOM killer",
  );
  assert.equal(classifyContainerExit({ exitCode: 137 }).message, "step exited with code 137");
  assert.deepEqual(classifyContainerExit({ exitCode: 137, cancelled: true, memoryBytes: MiB }), {
    exitCode: 137,
    errorClass: "cancelled",
    message: "step was cancelled",
  });
  assert.equal(formatBytes(512), "512 B");
  assert.equal(formatBytes(64 * MiB), "64 MiB");
  assert.equal(formatBytes(100 * 1000 * 1000), "95.4 MiB");
});

Deno.test("dockerfile: layers in caching order, values escaped", () => {
  const dockerfile = generateDockerfile({
    from: "runnel/deno:local",
    workdir: "/app",
    env: { Z_LAST: "z", PRICE: 'cost "$5" \\ each' },
    dependencies: "./deno.json",
    install: "deno install\necho 'done'",
    copy: ["steps/", "deno.json", "lib/util.ts"],
    entrypoint: ["deno", "run", "--allow-read", "steps/main.ts"],
  });
  assert.equal(
    dockerfile,
    [
      "FROM runnel/deno:local",
      "WORKDIR /app",
      'ENV PRICE="cost \\"\\$5\\" \\\\ each"',
      'ENV Z_LAST="z"',
      'COPY ["deno.json", "./deno.json"]',
      'RUN ["/bin/sh", "-c", "deno install\\necho \'done\'"]',
      'COPY ["steps", "./steps"]',
      'COPY ["lib/util.ts", "./lib/util.ts"]',
      'ENTRYPOINT ["deno", "run", "--allow-read", "steps/main.ts"]',
      "",
    ].join("\n"),
  );
  assert.equal(generateDockerfile({ from: "busybox" }), "FROM busybox\n");
  assert.deepEqual(
    contextEntries({ from: "x", dependencies: "deno.json", copy: ["./deno.json", "src/", "src"] }),
    ["deno.json", "src"],
  );
});

Deno.test("dockerfile: the tag digests the Dockerfile and every file's path, mode and bytes", () => {
  const bytes = (text: string) => new TextEncoder().encode(text);
  const files = [
    { path: "steps/a.ts", mode: 0o644, data: bytes("a") },
    { path: "steps/b.ts", mode: 0o644, data: bytes("b") },
  ];
  const tag = imageTag("convert[region=eu]", "FROM x\n", files);
  assert.match(tag, /^runnel-build\/convert:[0-9a-f]{16}$/);
  assert.equal(imageTag("convert", "FROM x\n", [...files].reverse()), tag, "order does not matter");
  const digest = (t: string) => t.split(":")[1];
  const variants = [
    imageTag("convert", "FROM y\n", files),
    imageTag("convert", "FROM x\n", [files[0], { ...files[1], data: bytes("B") }]),
    imageTag("convert", "FROM x\n", [files[0], { ...files[1], path: "steps/c.ts" }]),
    imageTag("convert", "FROM x\n", [files[0], { ...files[1], mode: 0o755 }]),
    imageTag("convert", "FROM x\n", [files[0]]),
  ];
  for (const variant of variants) assert.notEqual(digest(variant), digest(tag));
  assert.equal(
    imageTag("s", "FROM x\n", [{ path: "f", mode: 0o644, data: bytes("1") }]),
    imageTag("s", "FROM x\n", [{ path: "f", mode: 0o600, data: bytes("1") }]),
    "only the executable bit of the mode counts",
  );
  // Pinned: a change of the digest scheme would orphan every cached image.
  assert.equal(
    imageTag("s", "FROM x\n", [{ path: "f", mode: 0o644, data: bytes("1") }]),
    "runnel-build/s:2949887241bbde85",
  );
  assert.equal(repositoryName("My_Step.v2"), "my-step-v2");
  assert.equal(repositoryName("[x]"), "step");
});

Deno.test("build context: only the entries used, links kept, escapes refused", async () => {
  const dir = await Deno.realPath(await Deno.makeTempDir({ prefix: "runnel_docker_ctx_" }));
  try {
    await Deno.mkdir(`${dir}/ctx/src/sub`, { recursive: true });
    await Deno.writeTextFile(`${dir}/ctx/src/a.ts`, "a");
    await Deno.writeTextFile(`${dir}/ctx/src/sub/b.ts`, "b");
    await Deno.writeTextFile(`${dir}/ctx/unused.txt`, "not packed");
    await Deno.symlink("a.ts", `${dir}/ctx/src/link.ts`);
    await Deno.writeTextFile(`${dir}/secret.txt`, "outside");
    await Deno.symlink("../secret.txt", `${dir}/ctx/escape.txt`);
    const files = await collectContext(`${dir}/ctx`, ["src"]);
    assert.deepEqual(
      files.map((file) => [file.path, file.linkTarget ?? new TextDecoder().decode(file.data)]),
      [["src/a.ts", "a"], ["src/link.ts", "a.ts"], ["src/sub/b.ts", "b"]],
    );
    await assert.rejects(
      collectContext(`${dir}/ctx`, ["escape.txt"]),
      (error: Error) =>
        error instanceof ImageBuildError && /stay inside the build context/.test(error.message),
    );
    await assert.rejects(
      collectContext(`${dir}/ctx`, ["missing.ts"]),
      (error: Error) =>
        error instanceof ImageBuildError &&
        /Expected "missing.ts" in the build context/.test(error.message),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("docker stats: peak memory and CPU time from a split JSON stream", () => {
  const sampler = new UsageSampler();
  assert.equal(sampler.usage(), undefined);
  const first = JSON.stringify({
    memory_stats: { usage: 3 * MiB, max_usage: 5 * MiB },
    cpu_stats: { cpu_usage: { total_usage: 40_000_000 } },
  });
  const second = JSON.stringify({
    memory_stats: { usage: 4 * MiB },
    cpu_stats: { cpu_usage: { total_usage: 90_400_000 } },
  });
  const exited = JSON.stringify({ memory_stats: {}, cpu_stats: { cpu_usage: { total_usage: 0 } } });
  const text = `${first}\n${second}\ngarbage\n${exited}\n`;
  // Chunks split anywhere, even inside a sample.
  for (let at = 0; at < text.length; at += 17) sampler.feed(text.slice(at, at + 17));
  assert.deepEqual(sampler.usage(), { memoryPeakBytes: 5 * MiB, cpuMs: 90 });
});

Deno.test("docker services: the create requests of a service and of its step", () => {
  const config = {
    image: "runnel/busybox:local",
    services: [{
      name: "db",
      image: "pg:local",
      run: "exec pg",
      env: { PORT: 5432 },
      secrets: ["DB_PASSWORD"],
      user: "999",
    }],
  };
  const attempt = spec({ config, env: { DB_PASSWORD: "pw", OTHER: "no" } });
  const service = config.services[0];
  const { env, missing } = serviceEnvironment(attempt, service);
  assert.deepEqual(env, { PORT: "5432", DB_PASSWORD: "pw" }, "only the secrets it names");
  assert.deepEqual(missing, []);
  assert.deepEqual(serviceEnvironment(attempt, { ...service, secrets: ["NOPE"] }).missing, [
    "NOPE",
  ]);
  const network = attemptNetworkName(attempt.attemptId);
  const options = serviceCreateOptions(attempt, service, env, network);
  assert.equal(options.name, `${containerName(attempt.attemptId)}-svc-db`);
  assert.deepEqual(options.Entrypoint, ["/bin/sh", "-c"]);
  assert.deepEqual(options.Cmd, ["exec pg", "sh"]);
  assert.equal(options.User, "999");
  assert.equal(options.HostConfig?.NetworkMode, network);
  assert.deepEqual(options.NetworkingConfig, {
    EndpointsConfig: { [network]: { Aliases: ["db"] } },
  });
  assert.equal(options.Labels?.["runnel.role"], "service");
  assert.equal(options.Labels?.["runnel.service"], "db");
  assert.equal(options.Labels?.["runnel.attempt-id"], attempt.attemptId);
  assert.equal(options.Labels?.["runnel.agent"], "local");
  const step = containerCreateOptions(attempt, config, config.image, network);
  assert.equal(step.HostConfig?.NetworkMode, network, "the step joins the attempt's network");
  assert.equal(
    containerCreateOptions(attempt, config, config.image).HostConfig?.NetworkMode,
    "none",
  );
});

Deno.test("docker services: a multiplexed log answer reads as text", () => {
  const frame = (stream: number, text: string) => {
    const payload = new TextEncoder().encode(text);
    const header = new Uint8Array(8);
    header[0] = stream;
    new DataView(header.buffer).setUint32(4, payload.byteLength);
    return [...header, ...payload];
  };
  const bytes = new Uint8Array([...frame(1, "out\n"), ...frame(2, "err\n")]);
  assert.equal(demuxText(bytes), "out\nerr\n");
  assert.equal(demuxText(bytes.subarray(0, 10)), "ou", "a cut frame gives what it has");
  assert.equal(demuxText(new Uint8Array()), "");
});
