/**
 * The Kubernetes API stand-in (`infra/kube/`) checked with the real
 * `kubectl` (a fresh `HOME`, so its discovery cache is clean): `apply`,
 * `get`, `logs`, `wait --for=condition=complete` and `delete
 * --cascade=background` all work, with pods run as real containers; and
 * the API shapes the backend relies on: `Status` errors, selectors,
 * watches from a resource version, `410 Expired`, Job conditions in the
 * 1.31+ order and Background propagation.
 *
 * Needs Docker, openssl and kubectl: with `CI=true` a missing one fails;
 * otherwise the tests are skipped with the reason printed.
 *
 * @module
 */

import assert from "node:assert/strict";
import { ensureBusyboxImage } from "../infra/images.ts";
import { type KubeStandIn, type KubeStandInOptions, startKubeStandIn } from "../infra/kube/mod.ts";
import { poll, ROOT } from "./_helpers.ts";

const IN_CI = Deno.env.get("CI") === "true";

async function missingTools(): Promise<string | undefined> {
  for (
    const [tool, args] of [["docker", ["version"]], ["kubectl", ["version", "--client"]]] as const
  ) {
    try {
      const output = await new Deno.Command(tool, {
        args: [...args],
        stdout: "null",
        stderr: "null",
      })
        .output();
      if (!output.success) return `${tool} ${args.join(" ")} failed`;
    } catch {
      return `no ${tool} on PATH`;
    }
  }
  return undefined;
}

const missing = await missingTools();
if (missing && !IN_CI) {
  console.log(`%cskipping the Kubernetes stand-in tests: ${missing}`, "color: yellow");
}

function standInTest(name: string, fn: (kube: KubeStandIn) => Promise<void>): void {
  standInTestWith(name, {}, fn);
}

function standInTestWith(
  name: string,
  options: KubeStandInOptions,
  fn: (kube: KubeStandIn) => Promise<void>,
): void {
  Deno.test({
    name: `kube stand-in: ${name}`,
    ignore: missing !== undefined && !IN_CI,
    async fn() {
      if (missing) throw new Error(`Expected docker and kubectl in CI: ${missing}`);
      await ensureBusyboxImage();
      await using kube = await startKubeStandIn(options);
      await fn(kube);
    },
  });
}

/** Runs the real kubectl against the stand-in, with a home of its own. */
async function kubectl(kube: KubeStandIn, home: string, ...args: string[]) {
  const output = await new Deno.Command("kubectl", {
    args,
    env: { HOME: home, KUBECONFIG: kube.kubeconfig, PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin" },
    clearEnv: true,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decoder = new TextDecoder();
  const stdout = decoder.decode(output.stdout);
  const stderr = decoder.decode(output.stderr);
  assert.ok(output.success, `kubectl ${args.join(" ")} failed: ${stderr}${stdout}`);
  return stdout;
}

const JOB_YAML = `apiVersion: batch/v1
kind: Job
metadata:
  name: hello
  labels: { app: greeter }
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: main
          image: runnel/busybox:local
          command: ["sh", "-c", "echo hello from a pod; echo second line"]
`;

standInTest("the real kubectl applies, gets, waits for, reads and deletes a Job", async (kube) => {
  const home = await Deno.makeTempDir({ prefix: "runnel-kubectl-home-" });
  try {
    const file = `${home}/job.yaml`;
    await Deno.writeTextFile(file, JOB_YAML);
    assert.match(
      await kubectl(kube, home, "version"),
      /Server Version: .*v1\.32\.0-runnel-standin/,
    );
    assert.match(await kubectl(kube, home, "apply", "-f", file), /job\.batch\/hello created/);
    assert.match(await kubectl(kube, home, "get", "jobs,pods"), /job\.batch\/hello/);
    assert.match(
      await kubectl(kube, home, "wait", "--for=condition=complete", "job/hello", "--timeout=60s"),
      /job\.batch\/hello condition met/,
    );
    assert.equal(
      await kubectl(kube, home, "logs", "job/hello"),
      "hello from a pod\nsecond line\n",
    );
    assert.equal(
      await kubectl(
        kube,
        home,
        "get",
        "job",
        "hello",
        "-o",
        "jsonpath={.status.conditions[*].type}",
      ),
      "SuccessCriteriaMet Complete",
    );
    assert.match(
      await kubectl(kube, home, "get", "pods", "-l", "job-name=hello", "-o", "name"),
      /^pod\/hello-/,
    );
    assert.match(
      await kubectl(kube, home, "delete", "job", "hello", "--cascade=background"),
      /job\.batch "hello" deleted/,
    );
    await poll(() => kube.list("pods").length === 0 || undefined, {
      what: "the pods to be collected",
    });
    await poll(async () => (await kube.containers()).length === 0 || undefined, {
      what: "the containers to be removed",
    });
  } finally {
    await Deno.remove(home, { recursive: true });
  }
});

/** A raw API call with the stand-in's token and CA. */
async function api(kube: KubeStandIn, path: string, init: RequestInit = {}) {
  const client = Deno.createHttpClient({ caCerts: [kube.caPem!] });
  try {
    const response = await fetch(`${kube.server}${path}`, {
      ...init,
      client,
      headers: { authorization: `Bearer ${kube.token}`, "content-type": "application/json" },
    });
    return { status: response.status, body: await response.json() };
  } finally {
    client.close();
  }
}

standInTest(
  "API shapes: Status errors, selectors, watch from a version and 410 Expired",
  async (kube) => {
    const missingJob = await api(kube, "/apis/batch/v1/namespaces/default/jobs/nope");
    assert.equal(missingJob.status, 404);
    assert.deepEqual(
      {
        kind: missingJob.body.kind,
        reason: missingJob.body.reason,
        message: missingJob.body.message,
      },
      { kind: "Status", reason: "NotFound", message: 'jobs.batch "nope" not found' },
    );
    const unauthorized = await fetch(`${kube.server}/api/v1/namespaces/default/pods`, {
      client: Deno.createHttpClient({ caCerts: [kube.caPem!] }),
    });
    assert.equal(unauthorized.status, 401);
    await unauthorized.body?.cancel();
    const invalid = await api(kube, "/apis/batch/v1/namespaces/default/jobs", {
      method: "POST",
      body: JSON.stringify({
        metadata: { name: "bad" },
        spec: { template: { spec: { containers: [{ name: "c", image: "x" }] } } },
      }),
    });
    assert.equal(invalid.status, 422);
    assert.match(invalid.body.message, /restartPolicy/);
    for (const [name, tier] of [["a", "web"], ["b", "db"]]) {
      const created = await api(kube, "/api/v1/namespaces/default/secrets", {
        method: "POST",
        body: JSON.stringify({ metadata: { name, labels: { tier } }, stringData: { k: "v" } }),
      });
      assert.equal(created.status, 201);
      assert.equal(created.body.data.k, btoa("v"), "stringData is stored as data");
    }
    const selected = await api(
      kube,
      "/api/v1/namespaces/default/secrets?labelSelector=tier%20in%20(web)",
    );
    assert.deepEqual(
      selected.body.items.map((item: { metadata: { name: string } }) => item.metadata.name),
      ["a"],
    );
    const byField = await api(
      kube,
      "/api/v1/namespaces/default/secrets?fieldSelector=metadata.name%3Db",
    );
    assert.deepEqual(
      byField.body.items.map((item: { metadata: { name: string } }) => item.metadata.name),
      ["b"],
    );
    // A watch from an old version replays what happened since.
    const version = selected.body.metadata.resourceVersion;
    await api(kube, "/api/v1/namespaces/default/secrets/a", { method: "DELETE" });
    const client = Deno.createHttpClient({ caCerts: [kube.caPem!] });
    try {
      const watch = await fetch(
        `${kube.server}/api/v1/namespaces/default/secrets?watch=true&resourceVersion=${version}&timeoutSeconds=1`,
        { client, headers: { authorization: `Bearer ${kube.token}` } },
      );
      const events = (await watch.text()).trim().split("\n").map((line) => JSON.parse(line));
      assert.deepEqual(events.map((event) => [event.type, event.object.metadata.name]), [[
        "DELETED",
        "a",
      ]]);
      kube.faults.compact();
      const expired = await fetch(
        `${kube.server}/api/v1/namespaces/default/secrets?watch=true&resourceVersion=${version}`,
        { client, headers: { authorization: `Bearer ${kube.token}` } },
      );
      const [error] = (await expired.text()).trim().split("\n").map((line) => JSON.parse(line));
      assert.equal(error.type, "ERROR");
      assert.equal(error.object.code, 410);
      assert.equal(error.object.reason, "Expired");
    } finally {
      client.close();
    }
  },
);

standInTest(
  "a failing pod fails its Job (FailureTarget before Failed); Background delete collects",
  async (kube) => {
    const created = await api(kube, "/apis/batch/v1/namespaces/default/jobs", {
      method: "POST",
      body: JSON.stringify({
        metadata: { name: "fails" },
        spec: {
          backoffLimit: 0,
          template: {
            spec: {
              restartPolicy: "Never",
              containers: [{
                name: "c",
                image: "runnel/busybox:local",
                command: ["sh", "-c", "exit 3"],
              }],
            },
          },
        },
      }),
    });
    assert.equal(created.status, 201);
    const job = await poll(() => {
      const current = kube.get("jobs", "default", "fails");
      return current?.status?.conditions?.some((c: { type: string }) => c.type === "Failed")
        ? current
        : undefined;
    }, { what: "the Job to fail" });
    assert.deepEqual(
      job.status.conditions.map((c: { type: string; reason: string }) => [c.type, c.reason]),
      [["FailureTarget", "BackoffLimitExceeded"], ["Failed", "BackoffLimitExceeded"]],
    );
    const [pod] = kube.list("pods", "job-name=fails");
    assert.equal(pod.status.containerStatuses[0].state.terminated.exitCode, 3);
    const deleted = await api(kube, "/apis/batch/v1/namespaces/default/jobs/fails", {
      method: "DELETE",
      body: JSON.stringify({ propagationPolicy: "Background" }),
    });
    assert.equal(deleted.status, 200);
    await poll(() => kube.list("pods", "job-name=fails").length === 0 || undefined, {
      what: "the pod to be collected",
    });
  },
);

standInTest("ttlSecondsAfterFinished removes a finished Job and its pods", async (kube) => {
  const created = await api(kube, "/apis/batch/v1/namespaces/default/jobs", {
    method: "POST",
    body: JSON.stringify({
      metadata: { name: "short-lived" },
      spec: {
        backoffLimit: 0,
        ttlSecondsAfterFinished: 0,
        template: {
          spec: {
            restartPolicy: "Never",
            containers: [{ name: "c", image: "runnel/busybox:local", command: ["true"] }],
          },
        },
      },
    }),
  });
  assert.equal(created.status, 201);
  await poll(() => kube.get("jobs", "default", "short-lived") === undefined || undefined, {
    what: "the finished Job to be removed",
  });
  await poll(() => kube.list("pods", "job-name=short-lived").length === 0 || undefined, {
    what: "its pod to be collected",
  });
});

standInTestWith(
  "a watch answers at once (headers flushed), sends bookmarks, and ends at timeoutSeconds",
  { bookmarkIntervalMs: 100 },
  async (kube) => {
    const client = Deno.createHttpClient({ caCerts: [kube.caPem!] });
    try {
      const started = performance.now();
      const response = await fetch(
        `${kube.server}/apis/batch/v1/namespaces/default/jobs?watch=true&allowWatchBookmarks=true&timeoutSeconds=1`,
        { client, headers: { authorization: `Bearer ${kube.token}` } },
      );
      assert.equal(response.status, 200);
      assert.ok(performance.now() - started < 500, "headers came before any event");
      const lines = (await response.text()).trim().split("\n").map((line) => JSON.parse(line));
      const elapsed = performance.now() - started;
      assert.ok(
        elapsed >= 900 && elapsed < 5_000,
        `ended after its timeoutSeconds (${elapsed} ms)`,
      );
      assert.ok(lines.length >= 2, `bookmarks came: ${lines.length}`);
      for (const event of lines) {
        assert.equal(event.type, "BOOKMARK");
        assert.equal(event.object.kind, "Job");
        assert.match(event.object.metadata.resourceVersion, /^\d+$/);
      }
    } finally {
      client.close();
    }
  },
);

Deno.test({
  name: "kube stand-in: `deno task kube-dev` serves kubectl and stops cleanly on SIGTERM",
  ignore: missing !== undefined && !IN_CI,
  async fn() {
    if (missing) throw new Error(`Expected docker and kubectl in CI: ${missing}`);
    const home = await Deno.makeTempDir({ prefix: "runnel-kube-dev-" });
    // The task's own command line, so that its permissions are what is tested.
    const task: string = JSON.parse(await Deno.readTextFile(`${ROOT}/deno.json`)).tasks["kube-dev"];
    const [, ...args] = task.split(" ");
    const child = new Deno.Command(Deno.execPath(), {
      args: [...args, "--kubeconfig", `${home}/kubeconfig`],
      cwd: ROOT,
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const stderr = new Response(child.stderr).text();
    try {
      const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
      let output = "";
      while (!output.includes("kubeconfig: ")) {
        const { value, done } = await reader.read();
        if (done) throw new Error(`kube-dev ended early: ${output}${await stderr}`);
        output += value;
      }
      reader.releaseLock();
      assert.match(output, new RegExp(`kubeconfig: ${home}/kubeconfig`));
      const version = await new Deno.Command("kubectl", {
        args: ["get", "jobs,pods"],
        env: { HOME: home, KUBECONFIG: `${home}/kubeconfig`, PATH: Deno.env.get("PATH") ?? "" },
        clearEnv: true,
        stdout: "piped",
        stderr: "piped",
      }).output();
      assert.ok(version.success, new TextDecoder().decode(version.stderr));
      child.kill("SIGTERM");
      assert.equal((await child.status).code, 0, await stderr);
      await child.stdout.cancel().catch(() => {});
    } finally {
      try {
        child.kill("SIGKILL");
      } catch { /* ended */ }
      await child.status;
      await stderr;
      await Deno.remove(home, { recursive: true });
    }
  },
});
