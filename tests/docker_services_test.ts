/**
 * Services of docker steps against the real daemon: reached by name on the
 * attempt's own network, waited for, and removed with their network after a
 * success, a failure, a cancel, and by `recover` (or `runnel resume`) after
 * the runner was SIGKILLed.
 *
 * Services are busybox `httpd`s of the offline busybox image. Every test
 * labels what it starts with its own agent id and removes it at the end.
 *
 * @module
 */

import assert from "node:assert/strict";
import { connectDocker } from "../backends/docker/_dockerode.ts";
import { dockerEndpoint } from "../backends/docker/manifest.ts";
import { runToEnd, type ScratchOptions, scratchSpec } from "../backends/testing.ts";
import { isSuccess } from "../backends/backend.ts";
import createDockerBackend, {
  DuplicateAttemptError,
  validateDockerConfig,
} from "../backends/docker/mod.ts";
import { PROBE_IMAGE, startServices } from "../backends/docker/_services.ts";
import type { DockerConfig } from "../backends/docker/manifest.ts";
import type { ContainerCreateOptions, Docker } from "../backends/docker/_dockerode.ts";
import { LogQueue } from "../backends/log_queue.ts";
import { ensureBusyboxImage } from "../infra/images.ts";
import { poll, runCli, sandbox, spawnCli, waitForLine } from "./_helpers.ts";

const IN_CI = Deno.env.get("CI") === "true";

const backend = createDockerBackend();
const fingerprint = await backend.fingerprint();
const BUSYBOX = fingerprint.available ? await ensureBusyboxImage() : "runnel/busybox:local";
if (!fingerprint.available && !IN_CI) {
  console.log(`%cskipping the Docker services tests: ${fingerprint.detail}`, "color: yellow");
}
const endpoint = dockerEndpoint();
const docker = connectDocker(
  endpoint.kind === "socket"
    ? { socketPath: endpoint.socketPath }
    : { host: endpoint.host, port: endpoint.port, protocol: "http" },
);

function dockerTest(name: string, fn: () => Promise<void>): void {
  Deno.test({
    name: `docker services: ${name}`,
    ignore: !fingerprint.available && !IN_CI,
    async fn() {
      if (!fingerprint.available) throw new Error(`Expected Docker in CI: ${fingerprint.detail}`);
      await fn();
    },
  });
}

/** A busybox web server answering `text` on port 8080, as user nobody. */
function httpService(name: string, text: string, extra: Record<string, unknown> = {}) {
  return {
    name,
    image: BUSYBOX,
    user: "65534",
    run: `mkdir -p /tmp/www && echo "${text}" > /tmp/www/index.html && ` +
      "exec busybox httpd -f -p 8080 -h /tmp/www",
    "wait-for": { port: 8080, timeout: "20s" },
    ...extra,
  };
}

function newAgent(): string {
  return `svc-${crypto.randomUUID().slice(0, 8)}`;
}

function attempt(agentId: string, config: Record<string, unknown>, options: ScratchOptions = {}) {
  const attemptId = `${agentId}/step/${crypto.randomUUID().slice(0, 6)}`;
  return scratchSpec({ image: BUSYBOX, ...config }, {
    ...options,
    spec: { agentId, attemptId, runId: agentId, ...options.spec },
  });
}

/** The containers and networks an agent id left, by name. */
async function leftovers(agentId: string): Promise<{ containers: string[]; networks: string[] }> {
  const label = [`runnel.agent=${agentId}`];
  const containers = await docker.listContainers({ all: true, filters: { label } });
  const networks = await docker.listNetworks({ filters: { label } });
  return {
    containers: containers.map((info) => info.Labels?.["runnel.role"] ?? "step"),
    networks: networks.map((network) => network.Name),
  };
}

/** Removes whatever an agent id left, whatever the test's outcome. */
async function reap(agentId: string): Promise<void> {
  const label = [`runnel.agent=${agentId}`];
  for (const info of await docker.listContainers({ all: true, filters: { label } })) {
    await docker.getContainer(info.Id).remove({ force: true, v: true }).catch(() => {});
  }
  for (const network of await docker.listNetworks({ filters: { label } })) {
    await docker.getNetwork(network.Id).remove().catch(() => {});
  }
}

const NOTHING = { containers: [], networks: [] };

dockerTest("config: names are DNS labels, unique; wait-for is a port and a duration", () => {
  assert.deepEqual(
    validateDockerConfig({
      image: "a",
      services: [httpService("db", "x"), { name: "c-1", image: "b" }],
    }),
    [],
  );
  const messages = validateDockerConfig({
    image: "a",
    services: [
      { name: "Db_1", image: "b" },
      { name: "db", image: "b", "wait-for": { port: 0, timeout: "forever" } },
      { name: "db", image: "b", env: { "1X": "v" }, colour: "red" },
    ],
  });
  assert.ok(messages.some((m) => m.startsWith('"services.0.name": Expected a service name')));
  assert.ok(messages.some((m) => m.startsWith('"services.1.wait-for.port"')), messages.join());
  assert.ok(messages.some((m) => m.startsWith('"services.1.wait-for.timeout": Expected a dur')));
  assert.ok(messages.some((m) => m.includes('"services.2.name": Expected unique service names')));
  assert.ok(messages.some((m) => m.includes("colour")), messages.join());
  return Promise.resolve();
});

dockerTest("a step reaches its services by name; both go, with the network, after it", async () => {
  const agentId = newAgent();
  // Something the host serves on all its addresses, which the step must not reach.
  using listener = Deno.listen({ hostname: "0.0.0.0", port: 0 });
  await using spec = await attempt(agentId, {
    run: "wget -q -O - http://db:8080/ && wget -q -O - http://cache:8080/ || exit 9\n" +
      // The bridge's first address, where a host would answer.
      'ip=$(hostname -i); if timeout 1 nc -w 1 "${ip%.*}.1" "$HOST_PORT" -e /bin/true; then ' +
      'echo HOST REACHED; fi 2>/dev/null; exit "$CODE"',
    services: [
      httpService("db", "hello from db", { secrets: ["DB_PASSWORD"] }),
      httpService("cache", "hello from cache"),
    ],
  }, {
    spec: { env: { DB_PASSWORD: "s3cret", CODE: "0", HOST_PORT: String(listener.addr.port) } },
  });
  try {
    const execution = await backend.start(spec);
    const during = await leftovers(agentId);
    assert.deepEqual(during.containers.sort(), ["service", "service", "step"]);
    assert.equal(during.networks.length, 1);
    const network = await docker.getNetwork(during.networks[0]).inspect();
    assert.equal(network.Internal, true, "no route out without network: true");
    const db = await docker.listContainers({
      filters: { label: [`runnel.agent=${agentId}`, "runnel.service=db"] },
    });
    const info = await docker.getContainer(db[0].Id).inspect() as unknown as {
      Config: { Env: string[] };
    };
    assert.ok(info.Config.Env.includes("DB_PASSWORD=s3cret"), "the secret it names, by name");
    const result = await runToEnd(execution);
    assert.ok(isSuccess(result.status), JSON.stringify(result));
    assert.equal(result.stdout, "hello from db\nhello from cache\n");
    assert.deepEqual(await leftovers(agentId), NOTHING);

    // A failing step: the same.
    const failing = await attempt(agentId, {
      run: "wget -q -O - http://db:8080/; exit 3",
      services: [httpService("db", "again")],
    });
    try {
      const failed = await runToEnd(await backend.start(failing));
      assert.equal(failed.status.exitCode, 3);
      assert.equal(failed.stdout, "again\n");
      assert.deepEqual(await leftovers(agentId), NOTHING);
    } finally {
      await failing.remove();
    }
  } finally {
    await reap(agentId);
  }
});

dockerTest("a service that never opens its port, or exits, fails the step by name", async () => {
  const agentId = newAgent();
  try {
    await using silent = await attempt(agentId, {
      run: "echo never runs",
      services: [{
        name: "db",
        image: BUSYBOX,
        run: "echo starting up >&2; echo still starting >&2; exec sleep 60",
        "wait-for": { port: 5432, timeout: "2s" },
      }],
    });
    const started = Date.now();
    const timedOut = await runToEnd(await backend.start(silent));
    assert.ok(Date.now() - started < 15_000);
    assert.equal(timedOut.status.errorClass, "application");
    assert.equal(
      timedOut.status.message,
      `service "db" (${BUSYBOX}) did not open port 5432 within 2s`,
    );
    assert.match(timedOut.stderr, /last output of service "db":\nstarting up\nstill starting\n/);
    assert.doesNotMatch(timedOut.stdout, /never runs/);
    assert.deepEqual(await leftovers(agentId), NOTHING);

    await using crashing = await attempt(agentId, {
      run: "echo never runs",
      services: [{
        name: "db",
        image: BUSYBOX,
        run: "echo 'FATAL: bad config' >&2; exit 4",
        "wait-for": { port: 5432, timeout: "20s" },
      }],
    });
    const crashed = await runToEnd(await backend.start(crashing));
    assert.equal(
      crashed.status.message,
      `service "db" (${BUSYBOX}) exited with code 4 before opening port 5432`,
    );
    assert.match(crashed.stderr, /FATAL: bad config/);
    assert.deepEqual(await leftovers(agentId), NOTHING);
  } finally {
    await reap(agentId);
  }
});

dockerTest("a second start is refused; cancel removes the services and network", async () => {
  const agentId = newAgent();
  try {
    await using spec = await attempt(agentId, {
      run: "echo up; exec sleep 60",
      services: [httpService("db", "x")],
    });
    const execution = await backend.start(spec);
    await assert.rejects(backend.start(spec), DuplicateAttemptError, "a second start is refused");
    assert.equal((await leftovers(agentId)).containers.length, 2, "and leaves the first alone");
    await execution.cancel(500);
    const status = await execution.wait();
    assert.equal(status.errorClass, "cancelled");
    await execution.cleanup();
    assert.deepEqual(await leftovers(agentId), NOTHING);
  } finally {
    await reap(agentId);
  }
});

dockerTest(
  "recover after a crash: keeps a re-attached step's services, reaps the rest",
  async () => {
    const agentId = newAgent();
    try {
      await using kept = await attempt(agentId, {
        run: "while [ ! -e /runnel/out/go ]; do sleep 0.05; done; wget -q -O - http://db:8080/",
        services: [httpService("db", "still here")],
      });
      await using lost = await attempt(agentId, {
        run: "exec sleep 60",
        services: [httpService("db", "x")],
      });
      // Started by a runner that then dies: its executions are never watched again.
      await createDockerBackend().start(kept);
      await createDockerBackend().start(lost);
      assert.equal((await leftovers(agentId)).networks.length, 2);

      const recovered = await createDockerBackend().recover({ agentId, keep: [kept.attemptId] });
      assert.deepEqual(recovered.map((r) => r.attemptId), [kept.attemptId]);
      const left = await leftovers(agentId);
      assert.deepEqual(left.containers.sort(), ["service", "step"], "the lost attempt's are gone");
      assert.equal(left.networks.length, 1);

      await Deno.writeTextFile(`${kept.outputsDir}/go`, "");
      const result = await runToEnd(recovered[0].execution);
      assert.ok(isSuccess(result.status), JSON.stringify(result));
      assert.equal(result.stdout, "still here\n", "the service outlived the runner");
      assert.deepEqual(await leftovers(agentId), NOTHING);
    } finally {
      await reap(agentId);
    }
  },
);

dockerTest(
  "SIGKILL of the runner: resume finishes the step, then removes its service",
  async () => {
    await using box = await sandbox();
    const file = await box.write(
      "pipeline.yaml",
      `name: docker-services
steps:
  query:
    backend: docker
    image: ${BUSYBOX}
    services:
      - name: web
        image: ${BUSYBOX}
        run: mkdir -p /tmp/www && echo served > /tmp/www/index.html && exec busybox httpd -f -p 8080 -h /tmp/www
        wait-for: { port: 8080, timeout: 20s }
    run: |
      echo started
      while [ ! -e /runnel/out/go ]; do sleep 0.05; done
      wget -q -O - http://web:8080/ > "$RUNNEL_OUTPUT_OUT_TXT"
    outputs: [out.txt]
`,
    );
    const { child, lines } = spawnCli(["run", file, "--state-dir", box.stateDir, "--json"], {
      cwd: box.dir,
    });
    const first = JSON.parse(await waitForLine(lines, (line) => line.includes('"type":"run"')));
    const runId: string = first.runId;
    const byRun = { label: [`runnel.run=${runId}`] };
    try {
      await waitForLine(lines, (line) => line.includes('"query"') && line.includes('"started'));
      child.kill("SIGKILL");
      await child.status;
      await child.stdout.cancel().catch(() => {});
      await child.stderr.cancel();
      const step = await poll(async () => {
        const found = await docker.listContainers({ filters: byRun });
        return found.find((info) => !info.Labels?.["runnel.role"]);
      }, { what: "the step's container" });
      const inspect = await docker.getContainer(step.Id).inspect();
      const outputs = (inspect.Mounts ?? []).find((mount) =>
        mount.Destination === "/runnel/out"
      )!.Source;
      await Deno.writeTextFile(`${outputs}/go`, "");

      const resumed = await runCli(["resume", runId, "--state-dir", box.stateDir], {
        cwd: box.dir,
      });
      assert.equal(resumed.code, 0, resumed.stderr + resumed.stdout);
      const show = await runCli(["show", runId, "--state-dir", box.stateDir, "--json"], {
        cwd: box.dir,
      });
      assert.equal(JSON.parse(show.stdout).steps.query.status, "succeeded");
      assert.deepEqual(await docker.listContainers({ all: true, filters: byRun }), []);
      assert.deepEqual(await docker.listNetworks({ filters: byRun }), []);
    } finally {
      for (const info of await docker.listContainers({ all: true, filters: byRun })) {
        await docker.getContainer(info.Id).remove({ force: true }).catch(() => {});
      }
      for (const network of await docker.listNetworks({ filters: byRun })) {
        await docker.getNetwork(network.Id).remove().catch(() => {});
      }
    }
  },
);

dockerTest("a service given a secret by name: its output is masked in the step's log", async () => {
  await using box = await sandbox();
  const file = await box.write(
    "pipeline.yaml",
    `name: docker-service-secret
secrets:
  DB_PASSWORD: { env: RUNNEL_TEST_SERVICE_SECRET }
steps:
  migrate:
    backend: docker
    image: ${BUSYBOX}
    secrets: [DB_PASSWORD]
    retry: 0
    services:
      - name: db
        image: ${BUSYBOX}
        secrets: [DB_PASSWORD]
        run: echo "refusing password $DB_PASSWORD" >&2; exit 2
        wait-for: { port: 5432 }
    run: echo never runs
`,
  );
  const run = await runCli(["run", file, "--state-dir", box.stateDir, "--logs"], {
    cwd: box.dir,
    env: { RUNNEL_TEST_SERVICE_SECRET: "hunter2-service" },
  });
  assert.equal(run.code, 1, run.stderr + run.stdout);
  assert.match(run.stdout, /migrate │ refusing password \*\*\*/);
  assert.match(run.stdout, /service "db" \(.*\) exited with code 2 before opening port 5432/);
  assert.doesNotMatch(run.stdout + run.stderr, /hunter2|never runs/);
  const runId = /run (\S+) · docker-service-secret/.exec(run.stdout)![1];
  const logs = await runCli(["logs", runId, "--state-dir", box.stateDir], { cwd: box.dir });
  assert.doesNotMatch(logs.stdout, /hunter2/);
  const byRun = { label: [`runnel.run=${runId}`] };
  assert.deepEqual(await docker.listContainers({ all: true, filters: byRun }), []);
  assert.deepEqual(await docker.listNetworks({ filters: byRun }), []);
});

dockerTest(
  "a wait-for that cannot be probed throws with the services and network gone",
  async () => {
    const agentId = newAgent();
    // The daemon's answer when the probe image was never built (`deno task images`).
    const noProbeImage = Object.assign(new Error("(HTTP code 404) no such image"), {
      statusCode: 404,
      json: { message: `No such image: ${PROBE_IMAGE}` },
    });
    const withoutProbeImage = new Proxy(docker, {
      get(target, key, receiver) {
        if (key !== "createContainer") return Reflect.get(target, key, receiver);
        return (options: ContainerCreateOptions) =>
          options.Labels?.["runnel.role"] === "probe"
            ? Promise.reject(noProbeImage)
            : target.createContainer(options);
      },
    }) as Docker;
    try {
      await using spec = await attempt(agentId, {
        run: "echo never runs",
        services: [httpService("db", "x")],
      });
      await assert.rejects(
        startServices({
          docker: withoutProbeImage,
          spec,
          config: spec.config as DockerConfig,
          queue: new LogQueue(),
        }),
        (error: Error) => error.message.includes(PROBE_IMAGE),
      );
      assert.deepEqual(await leftovers(agentId), NOTHING);
    } finally {
      await reap(agentId);
    }
  },
);
