/**
 * Unit tests of the `kubernetes` backend's pure parts: kubeconfig loading,
 * the manifest's permissions, the Job it writes, label values and log
 * timestamps. The backend against a cluster is tested in
 * `tests/kubernetes_test.ts`.
 */

import assert from "node:assert/strict";
import { KubeconfigError, loadKubeTarget } from "./_kubeconfig.ts";
import { agentSelector, jobManifest, jobName, labelValue } from "./_job.ts";
import { timestampKey } from "./_logs.ts";
import { kubernetesManifest } from "./manifest.ts";
import { validateKubernetesConfig } from "./mod.ts";
import type { AttemptSpec } from "../backend.ts";

async function withDir(body: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "runnel-kubeconfig-" });
  try {
    await body(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

function envOf(values: Record<string, string>) {
  return (name: string) => values[name];
}

const KUBECONFIG = (user: string) =>
  `apiVersion: v1
kind: Config
current-context: work
contexts:
  - name: work
    context: { cluster: prod, user: ci, namespace: ml }
clusters:
  - name: prod
    cluster:
      server: https://k8s.example:6443
      certificate-authority: certs/ca.pem
users:
  - name: ci
    user:
${user}
`;

Deno.test("kubeconfig: the current context's server, namespace, token and CA file (relative)", async () => {
  await withDir(async (dir) => {
    await Deno.mkdir(`${dir}/certs`);
    await Deno.writeTextFile(`${dir}/certs/ca.pem`, "CA PEM");
    await Deno.writeTextFile(`${dir}/config`, KUBECONFIG("      token: abc123"));
    const target = loadKubeTarget(envOf({ KUBECONFIG: `${dir}/config:/other/config` }));
    assert.equal(target.server, "https://k8s.example:6443");
    assert.equal(target.address, "k8s.example:6443");
    assert.equal(target.namespace, "ml");
    assert.equal(target.token, "abc123");
    assert.equal(target.caPem, "CA PEM");
    assert.deepEqual(target.files, [`${dir}/config`, `${dir}/certs/ca.pem`]);
  });
});

Deno.test("kubeconfig: client certificates inline (-data) and a token file", async () => {
  await withDir(async (dir) => {
    await Deno.mkdir(`${dir}/certs`);
    await Deno.writeTextFile(`${dir}/certs/ca.pem`, "CA");
    await Deno.writeTextFile(`${dir}/token`, "from-file\n");
    await Deno.writeTextFile(
      `${dir}/config`,
      KUBECONFIG(
        [
          `      client-certificate-data: ${btoa("CERT PEM")}`,
          `      client-key-data: ${btoa("KEY PEM")}`,
          `      tokenFile: ${dir}/token`,
        ].join("\n"),
      ),
    );
    const target = loadKubeTarget(envOf({ KUBECONFIG: `${dir}/config` }));
    assert.equal(target.certPem, "CERT PEM");
    assert.equal(target.keyPem, "KEY PEM");
    assert.equal(target.token, "from-file");
    assert.ok(target.files.includes(`${dir}/token`));
  });
});

Deno.test("kubeconfig: exec plugins and skipped TLS verification are refused, clearly", async () => {
  await withDir(async (dir) => {
    await Deno.mkdir(`${dir}/certs`);
    await Deno.writeTextFile(`${dir}/certs/ca.pem`, "CA");
    await Deno.writeTextFile(
      `${dir}/config`,
      KUBECONFIG("      exec: { command: aws, args: [eks, get-token] }"),
    );
    assert.throws(
      () => loadKubeTarget(envOf({ KUBECONFIG: `${dir}/config` })),
      (error: Error) =>
        error instanceof KubeconfigError && /exec and auth-provider plugins/.test(error.message),
    );
    await Deno.writeTextFile(`${dir}/bad`, "current-context: nope\ncontexts: []\n");
    assert.throws(
      () => loadKubeTarget(envOf({ KUBECONFIG: `${dir}/bad` })),
      /Expected .*bad to have a current-context naming one of its contexts, got "nope"/,
    );
  });
  assert.throws(() => loadKubeTarget(envOf({})), /Expected a kubeconfig .* or an in-cluster/);
});

Deno.test("kubeconfig: in a pod, the service account's token, CA and namespace", async () => {
  await withDir(async (dir) => {
    await Deno.writeTextFile(`${dir}/token`, "sa-token\n");
    await Deno.writeTextFile(`${dir}/ca.crt`, "CLUSTER CA");
    await Deno.writeTextFile(`${dir}/namespace`, "pipelines\n");
    const target = loadKubeTarget(
      envOf({ KUBERNETES_SERVICE_HOST: "10.96.0.1", KUBERNETES_SERVICE_PORT: "443" }),
      { serviceAccountDir: dir },
    );
    assert.equal(target.server, "https://10.96.0.1:443");
    assert.equal(target.address, "10.96.0.1:443");
    assert.equal(target.token, "sa-token");
    assert.equal(target.caPem, "CLUSTER CA");
    assert.equal(target.namespace, "pipelines");
    assert.deepEqual(target.files, [dir]);
  });
});

const SPEC: AttemptSpec = {
  agentId: "agent/7",
  scratchRoot: "/scratch",
  runId: "20260101-000000-abcdef",
  stepId: "Train[region=eu]",
  attemptId: "20260101-000000-abcdef/Train[region=eu]/2",
  attempt: 2,
  config: {},
  baseDir: "/p",
  workDir: "/scratch/w",
  inputs: { data: "/scratch/w/in/data/data.csv" },
  inputsDir: "/scratch/w/in",
  outputsDir: "/scratch/w/out",
  outputs: ["model.pt"],
  env: { API_KEY: "secret-value", MODE: "fast" },
  matrix: { region: "eu" },
  timeoutMs: 90_500,
  resources: { cpu: 2, memoryBytes: 4 * 1024 ** 3 },
};

Deno.test("the Job: backoffLimit 0, deadline, TTL, podFailurePolicy, resources, env by reference only", () => {
  const name = jobName(SPEC);
  assert.match(name, /^runnel-train-region-eu-[0-9a-f]{10}$/);
  assert.equal(jobName(SPEC), name, "the same attempt, the same name");
  // deno-lint-ignore no-explicit-any
  const job: any = jobManifest({
    spec: SPEC,
    config: { image: "train:1.4", run: "python train.py", "node-selector": { pool: "gpu" } },
    name,
    namespace: "ml",
    artifacts: { inputs: true, outputs: true, podStoreAddress: "s3.example:443" },
    helperImage: "runnel/kube-helper:local",
  });
  assert.equal(job.spec.backoffLimit, 0);
  assert.equal(job.spec.activeDeadlineSeconds, 91);
  assert.equal(typeof job.spec.ttlSecondsAfterFinished, "number");
  assert.deepEqual(job.spec.podFailurePolicy.rules[0], {
    action: "Ignore",
    onPodConditions: [{ type: "DisruptionTarget", status: "True" }],
  });
  assert.equal(job.metadata.labels["app.kubernetes.io/managed-by"], "runnel");
  assert.equal(job.metadata.annotations["runnel.dev/attempt-id"], SPEC.attemptId);
  const pod = job.spec.template.spec;
  assert.equal(pod.restartPolicy, "Never");
  assert.equal(pod.automountServiceAccountToken, false);
  assert.deepEqual(pod.nodeSelector, { pool: "gpu" });
  assert.deepEqual(pod.initContainers.map((c: { name: string }) => c.name), ["runnel-inputs"]);
  const [step, uploader] = pod.containers;
  assert.equal(uploader.name, "runnel-outputs");
  assert.deepEqual(step.resources, {
    requests: { cpu: "2000m", memory: String(4 * 1024 ** 3) },
    limits: { cpu: "2000m", memory: String(4 * 1024 ** 3) },
  });
  assert.ok(!JSON.stringify(job).includes("secret-value"), "no env value in the Job");
  assert.deepEqual(step.env.find((v: { name: string }) => v.name === "API_KEY"), {
    name: "API_KEY",
    valueFrom: { secretKeyRef: { name, key: "API_KEY" } },
  });
  assert.deepEqual(step.env.find((v: { name: string }) => v.name === "RUNNEL_INPUT_DATA"), {
    name: "RUNNEL_INPUT_DATA",
    value: "/runnel/in/data",
  });
  assert.deepEqual(
    uploader.command.find((arg: string) => arg.startsWith("--allow-net")),
    [
      "--allow-net=s3.example:443",
    ][0],
  );
});

Deno.test("label values are made valid and stay distinct; selectors name the agent", () => {
  assert.equal(labelValue("worker-1"), "worker-1");
  const long = labelValue("x".repeat(100));
  assert.ok(long.length <= 63 && /^[A-Za-z0-9][-A-Za-z0-9_.]*[A-Za-z0-9]$/.test(long), long);
  assert.notEqual(labelValue("a/b"), labelValue("a:b"));
  assert.match(labelValue("a/b"), /^a-b-[0-9a-f]{8}$/);
  assert.equal(
    agentSelector("local"),
    "app.kubernetes.io/managed-by=runnel,runnel.dev/agent=local",
  );
});

Deno.test("log timestamps sort by time whatever the length of their fraction", () => {
  const keys = [
    "2026-12-03T10:00:00Z",
    "2026-12-03T10:00:00.5Z",
    "2026-12-03T10:00:00.45Z",
    "2026-12-03T10:00:01.000000001Z",
  ].map((ts) => timestampKey(ts)!);
  assert.deepEqual([...keys].sort(), [keys[0], keys[2], keys[1], keys[3]]);
  assert.equal(timestampKey("not a time"), undefined);
});

Deno.test("step configs: image and one of run/command; keys checked", () => {
  assert.deepEqual(validateKubernetesConfig({ image: "busybox", run: "true" }), []);
  assert.match(validateKubernetesConfig({ image: "busybox" }).join(), /Expected "run"/);
  assert.match(
    validateKubernetesConfig({ image: "busybox", run: "true", command: ["x"] }).join(),
    /not both/,
  );
  assert.match(
    validateKubernetesConfig({ image: "busybox", run: "true", namespace: "Bad_NS" }).join(),
    /namespace/,
  );
  assert.match(
    validateKubernetesConfig({ image: "busybox", run: "true", kubeconfig: "/etc/shadow" }).join(),
    /kubeconfig/,
    "no step key names a kubeconfig",
  );
});

Deno.test("manifest: net to the API server only, read of the kubeconfig and its files", async () => {
  await withDir(async (dir) => {
    await Deno.mkdir(`${dir}/certs`);
    await Deno.writeTextFile(`${dir}/certs/ca.pem`, "CA");
    await Deno.writeTextFile(`${dir}/config`, KUBECONFIG("      token: t"));
    const previous = Deno.env.get("KUBECONFIG");
    Deno.env.set("KUBECONFIG", `${dir}/config`);
    try {
      const permissions = kubernetesManifest.permissions(
        { image: "busybox", run: "true" },
        { ...SPEC, inputs: {}, outputs: [] },
      );
      assert.deepEqual(permissions.net, ["k8s.example:6443"]);
      assert.deepEqual(permissions.read, [`${dir}/config`, `${dir}/certs/ca.pem`]);
      assert.deepEqual(permissions.write, []);
      assert.deepEqual(permissions.run, []);
      assert.ok(permissions.env.includes("KUBECONFIG"));
    } finally {
      if (previous === undefined) Deno.env.delete("KUBECONFIG");
      else Deno.env.set("KUBECONFIG", previous);
    }
  });
});
