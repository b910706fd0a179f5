/**
 * The multi-cloud simulation end to end, as root: the seed's topology in
 * network namespaces with the TUN delay line, 3 etcd members and runnel
 * servers, 4 agents and s3rver. One sim (its own prefix and published
 * address, so a user's `sim-up` can run beside it) serves every step:
 * measured latencies, the energy pipeline placed by cloud, the leading
 * control-plane node SIGKILLed mid-run, a worker SIGKILLed mid-step, Azure
 * partitioned for 20 s; then `sim-down` leaves nothing behind.
 *
 * @module
 */

import assert from "node:assert/strict";
import { RunClient } from "../agent/client/mod.ts";
import { collectBundle } from "../agent/bundle.ts";
import type { StepState } from "../core/model.ts";
import {
  adminToken,
  apiUrl,
  clusterState,
  etcdStatus,
  gatewayState,
  isRoot,
  loadSimConfig,
  measureLatency,
  moveEtcdLeader,
  raftState,
  renderMeasurements,
  type SimConfig,
  simDown,
  simKill,
  simPartition,
  simStart,
  simUp,
} from "../infra/sim/mod.ts";
import {
  inNamespace,
  ip,
  namespaceOf,
  namespacesOf,
  pidsIn,
  stateDirOf,
} from "../infra/sim/network.ts";
import { S3_CREDENTIALS, s3Endpoint } from "../infra/sim/nodes.ts";
import { poll, ROOT, runCli, sandbox } from "./_helpers.ts";

/**
 * The seeds' acceptance bound for re-election. The issue's target with these
 * timings is 5 s, which a split vote (two followers timing out together,
 * each randomised over 1.5–3 s) can exceed: the figure is printed against it.
 */
const REELECTION_BOUND_MS = 20_000;
const REELECTION_TARGET_MS = 5_000;
/** How long Azure stays cut off (the partition). */
const PARTITION_MS = 20_000;

/** Without root (a laptop) the sim cannot run; in CI it must. */
async function ignoreWithoutRoot(): Promise<boolean> {
  if (Deno.env.get("CI") === "true" || await isRoot()) return false;
  console.warn("sim tests skipped: they need root (network namespaces, veth, TUN)");
  return true;
}

/** A prefix and a published /30 of this run only. */
async function testConfig(): Promise<SimConfig> {
  const config = await loadSimConfig();
  const tag = crypto.getRandomValues(new Uint8Array(2));
  config.prefix = `rnt${[...tag].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
  // 169.254.214.0/24 in /30s: .4k+1 host, .4k+2 sim (k from 1 to 62).
  const base = 4 * (1 + (tag[0] % 62));
  config.api = { host: `169.254.214.${base + 1}`, sim: `169.254.214.${base + 2}`, port: 8080 };
  return config;
}

/**
 * The multicloud example's steps beside a copy of its pipeline in which
 * the named steps hold for a while (so a node can be killed under them).
 */
async function faultPipeline(dir: string, name: string, holds: Record<string, number>) {
  await Deno.mkdir(`${dir}/steps`, { recursive: true });
  for await (const entry of Deno.readDir(`${ROOT}/examples/multicloud/steps`)) {
    await Deno.copyFile(
      `${ROOT}/examples/multicloud/steps/${entry.name}`,
      `${dir}/steps/${entry.name}`,
    );
  }
  const env = (step: string, base: Record<string, string> = {}) =>
    JSON.stringify(holds[step] ? { ...base, HOLD_MS: String(holds[step]) } : base);
  const source = `name: ${name}
defaults: { backend: deno, timeout: 2m, retry: { max: 1, backoff: 1s } }
steps:
  generate:
    selector: { cloud: aws }
    module: ./steps/generate.ts
    env: ${env("generate", { READINGS: "2000", SEED: "42" })}
    outputs: [energy_data.csv]
  analyze:
    needs: [generate]
    selector: { cloud: gcp }
    module: ./steps/analyze.ts
    env: ${env("analyze")}
    inputs: { data: generate/energy_data.csv }
    outputs: [output1.json]
  report:
    needs: [analyze]
    selector: { cloud: azure }
    module: ./steps/report.ts
    env: ${env("report")}
    inputs: { summary: analyze/output1.json }
    outputs: [energy_report.csv]
`;
  await Deno.writeTextFile(`${dir}/pipeline.yaml`, source);
  return { source, files: (await collectBundle(dir)).files };
}

/**
 * The object store's keys, listed with the real aws CLI from inside a
 * worker's namespace (the host may not send to the sim's addresses).
 */
async function bucketKeys(config: SimConfig, from: string): Promise<string[]> {
  const listing = await inNamespace(namespaceOf(config.prefix, from), "env", [
    `AWS_ACCESS_KEY_ID=${S3_CREDENTIALS.accessKey}`,
    `AWS_SECRET_ACCESS_KEY=${S3_CREDENTIALS.secretKey}`,
    "AWS_DEFAULT_REGION=us-east-1",
    "aws",
    "--endpoint-url",
    s3Endpoint(config),
    "s3",
    "ls",
    `s3://${config.bucket}`,
    "--recursive",
  ]);
  return listing.split("\n").map((line) => line.split(/\s+/)[3]).filter(Boolean);
}

/** The last lines of every sim process's log, for a failure's report. */
async function printLogTails(config: SimConfig): Promise<void> {
  const logs = `${stateDirOf(config.prefix)}/logs`;
  try {
    for await (const entry of Deno.readDir(logs)) {
      const text = await Deno.readTextFile(`${logs}/${entry.name}`).catch(() => "");
      const tail = text.trimEnd().split("\n").slice(-15).join("\n");
      console.log(`--- ${entry.name} (last 15 lines)\n${tail}`);
    }
  } catch {
    // No logs: the sim never started.
  }
}

/** Every output of the run has its blob in the object store: no artifact lost. */
async function assertArtifactsStored(
  config: SimConfig,
  steps: Record<string, StepState>,
): Promise<void> {
  const keys = await bucketKeys(config, "worker-gcp-1");
  for (const step of Object.values(steps)) {
    for (const output of Object.values(step.outputs ?? {})) {
      const key = `blobs/sha256/${output.digest.replace(/^sha256:/, "")}`;
      assert.ok(keys.includes(key), `${step.id}/${output.name}: ${key} not in the store`);
    }
  }
}

const TERMINAL = ["succeeded", "failed", "cancelled"];

async function finished(client: RunClient, runId: string, timeoutMs = 60_000) {
  return await poll(async () => {
    const view = await client.run(runId);
    return TERMINAL.includes(view.run.status) ? view : undefined;
  }, { what: `run ${runId} finished`, timeoutMs, retryOnError: true });
}

function cloudOf(config: SimConfig, worker: string | undefined): string | undefined {
  return config.nodes.find((node) => node.name === worker)?.cloud;
}

/** Each step succeeded exactly once, on a worker of the cloud its selector names. */
function assertPlaced(config: SimConfig, steps: Record<string, StepState>) {
  const expected: Record<string, string> = { generate: "aws", analyze: "gcp", report: "azure" };
  for (const [id, cloud] of Object.entries(expected)) {
    const step = steps[id];
    assert.equal(step.status, "succeeded", `${id}: ${JSON.stringify(step)}`);
    const successes = step.attempts.filter((attempt) => attempt.result?.ok);
    assert.equal(successes.length, 1, `${id}: ${successes.length} recorded successes`);
    assert.equal(
      cloudOf(config, successes[0].worker),
      cloud,
      `${id} ran on ${successes[0].worker}`,
    );
    assert.ok(step.outputs && Object.keys(step.outputs).length === 1, `${id} lost its artifact`);
  }
}

Deno.test({
  name: "sim: seed topology with measured latency; pipeline survives leader, worker and cloud loss",
  ignore: await ignoreWithoutRoot(),
  sanitizeResources: false,
  sanitizeOps: false,
  async fn(t) {
    const config = await testConfig();
    const figures: string[] = [];
    let failed = false;
    const step = async (name: string, fn: () => Promise<void>) => {
      if (!(await t.step(name, fn))) failed = true;
    };
    try {
      const upStarted = Date.now();
      await simUp(config);
      figures.push(`sim-up ${Date.now() - upStarted} ms`);
      const token = await adminToken(config.prefix);
      const client = new RunClient([apiUrl(config)], { token });
      await using box = await sandbox();

      await step("intra-cloud < 1 ms and cross-cloud within ±10 %, measured", async () => {
        const measurements = await measureLatency(config);
        const table = renderMeasurements(measurements);
        console.log(table);
        for (const m of measurements) assert.ok(m.ok, `${m.link} out of bounds:\n${table}`);
        assert.equal(measurements.filter((m) => m.targetMs > 0).length, 3);
      });

      await step("the energy pipeline runs each step in its cloud (host CLI)", async () => {
        const before = await gatewayState(config);
        const env = { RUNNEL_API_TOKEN: token };
        const submitted = await runCli(
          [
            "submit",
            `${ROOT}/examples/multicloud/pipeline.yaml`,
            "--server",
            apiUrl(config),
            "--json",
          ],
          { cwd: box.dir, env },
        );
        assert.equal(submitted.code, 0, submitted.stderr);
        const { runId } = JSON.parse(submitted.stdout);
        const { run, steps } = await finished(client, runId);
        assert.equal(run.status, "succeeded");
        assertPlaced(config, steps);
        await assertArtifactsStored(config, steps);
        const shown = await runCli(["show", runId, "--server", apiUrl(config)], {
          cwd: box.dir,
          env,
        });
        assert.equal(shown.code, 0, shown.stderr);
        for (const worker of ["worker-gcp-1", "worker-azure-1"]) {
          assert.match(shown.stdout, new RegExp(worker));
        }
        assert.match(shown.stdout, /worker-aws-[12]/);
        // analyze (GCP) fetched energy_data.csv from the store in AWS: through the gateway.
        const after = await gatewayState(config);
        const crossed = after.directions["aws>gcp"].bytes -
          (before.directions["aws>gcp"]?.bytes ?? 0);
        assert.ok(
          crossed > steps.generate.outputs!["energy_data.csv"].size,
          `only ${crossed} bytes crossed`,
        );
      });

      await step(
        "cp-aws-1 SIGKILLed mid-run while it leads: re-elected, run finishes",
        async () => {
          await moveEtcdLeader(config, "cp-aws-1");
          assert.equal((await clusterState(config, "cp-aws-1")).scheduler, "cp-aws-1");
          const dir = `${box.dir}/leader`;
          const { source, files } = await faultPipeline(dir, "energy-leader-loss", {
            generate: 3_000,
          });
          const { runId } = await client.submit(source, "pipeline.yaml", dir, files);
          await poll(
            async () => (await client.run(runId)).steps.generate?.status === "running" || undefined,
            {
              what: "generate running",
              timeoutMs: 30_000,
            },
          );
          const oldLeader = (await raftState(config, "cp-gcp-1")).leader;
          await simKill(config, "cp-aws-1");
          const killedAt = Date.now();
          // cp-gcp-1's server reports its own etcd member's view of the leader.
          const newLeader = await poll(async () => {
            const raft = await raftState(config, "cp-gcp-1");
            return raft.leader && raft.leader !== "0" && raft.leader !== oldLeader
              ? raft
              : undefined;
          }, { what: "a new etcd leader", timeoutMs: 20_000, retryOnError: true });
          const reelectionMs = Date.now() - killedAt;
          // The scheduler's election: another server takes over once the dead one's lease ends.
          const scheduler = await poll(async () => {
            const state = await clusterState(config, "cp-gcp-1");
            return state.scheduler && state.scheduler !== "cp-aws-1" ? state.scheduler : undefined;
          }, { what: "a new scheduler", timeoutMs: 30_000, retryOnError: true });
          const schedulerMs = Date.now() - killedAt;
          const { run, steps } = await finished(client, runId);
          assert.equal(run.status, "succeeded", JSON.stringify(steps));
          assertPlaced(config, steps);
          await assertArtifactsStored(config, steps);
          const nextScheduledMs = steps.analyze.attempts[0].scheduledAt! - killedAt;
          const generateEndedMs = steps.generate.finishedAt! - killedAt;
          figures.push(
            `leader loss: new etcd leader (term ${newLeader.term}) seen ${reelectionMs} ms after the kill; ` +
              `${scheduler} scheduling after ${schedulerMs} ms; ` +
              `generate (held 3 s) recorded done ${generateEndedMs} ms and analyze scheduled ` +
              `${nextScheduledMs} ms after it`,
          );
          figures.push(
            `re-election ${reelectionMs} ms: ${
              reelectionMs <= REELECTION_TARGET_MS ? "within" : "OVER"
            } the ${REELECTION_TARGET_MS} ms target`,
          );
          assert.ok(reelectionMs <= REELECTION_BOUND_MS, `re-election took ${reelectionMs} ms`);
          await simStart(config, "cp-aws-1");
          await poll(async () => {
            const members = await etcdStatus(config, "cp-aws-1");
            return members.length === 3 && members.some((m) => m.leader) || undefined;
          }, { what: "cp-aws-1's member back", timeoutMs: 60_000, retryOnError: true });
        },
      );

      await step(
        "a worker SIGKILLed mid-step: the step runs on the other AWS worker in time",
        async () => {
          const dir = `${box.dir}/worker`;
          const { source, files } = await faultPipeline(dir, "energy-worker-loss", {
            generate: 8_000,
          });
          const { runId } = await client.submit(source, "pipeline.yaml", dir, files);
          const victim = await poll(async () => {
            const step = (await client.run(runId)).steps.generate;
            return step?.status === "running" ? step.attempts.at(-1)!.worker : undefined;
          }, { what: "generate running", timeoutMs: 30_000 });
          assert.ok(victim);
          await simKill(config, victim);
          const killedAt = Date.now();
          const offlineMs = await poll(async () => {
            const state = await clusterState(config);
            const entry = state.workers.find((worker) => worker.agentId === victim);
            return entry?.status === "online" ? undefined : Date.now() - killedAt;
          }, { what: `${victim} offline`, timeoutMs: 20_000, retryOnError: true });
          const { run, steps } = await finished(client, runId);
          assert.equal(run.status, "succeeded", JSON.stringify(steps));
          const attempts = steps.generate.attempts;
          const rerun = attempts.at(-1)!;
          assert.notEqual(rerun.worker, victim);
          assert.equal(cloudOf(config, rerun.worker), "aws");
          const rescheduleMs = rerun.scheduledAt! - killedAt;
          const bound = 3 * config.agentHeartbeatMs + 1_000;
          figures.push(
            `worker loss: ${victim} not online ${offlineMs} ms after SIGKILL; generate rescheduled on ${rerun.worker} ${rescheduleMs} ms after (bound ${bound} ms)`,
          );
          assert.ok(rescheduleMs <= bound, `rescheduled after ${rescheduleMs} ms`);
          // The seeds' check: offline within 3 missed heartbeats.
          assert.ok(offlineMs <= 3 * config.agentHeartbeatMs, `offline after ${offlineMs} ms`);
          assert.equal(attempts.filter((attempt) => attempt.result?.ok).length, 1);
          await simStart(config, victim);
        },
      );

      await step(
        "azure partitioned 20 s: aws and gcp keep running, azure's step waits",
        async () => {
          const dir = `${box.dir}/partition`;
          const { source, files } = await faultPipeline(dir, "energy-partition", {});
          await simPartition(config, "azure", true);
          const cutAt = Date.now();
          // The published port moves off cp-azure-1 once its /ready fails (no quorum).
          const { runId } = await poll(() => client.submit(source, "pipeline.yaml", dir, files), {
            what: "a submit during the partition",
            timeoutMs: 15_000,
            retryOnError: true,
          });
          const submittedMs = Date.now() - cutAt;
          // The quorum (aws + gcp) keeps a leader and runs the steps selected for them.
          const during = await poll(async () => {
            const view = await client.run(runId);
            return view.steps.analyze?.status === "succeeded" ? view : undefined;
          }, {
            what: "analyze done during the partition",
            // The cut is healed only after this: however long it takes, it ran cut off from azure.
            timeoutMs: 60_000,
            retryOnError: true,
          });
          assert.notEqual(during.steps.report.status, "succeeded");
          const raft = await raftState(config, "cp-gcp-1");
          assert.ok(raft.leader && raft.leader !== "0", JSON.stringify(raft));
          // The cut lasts its full 20 s, whatever else happens.
          await poll(async () => {
            assert.notEqual((await client.run(runId)).steps.report.status, "succeeded");
            return Date.now() - cutAt >= PARTITION_MS || undefined;
          }, { what: "the partition's end", timeoutMs: PARTITION_MS + 10_000 });
          await simPartition(config, "azure", false);
          const healedAt = Date.now();
          const cutMs = healedAt - cutAt;
          const { run, steps } = await finished(client, runId, 90_000);
          assert.equal(run.status, "succeeded", JSON.stringify(steps));
          assertPlaced(config, steps);
          figures.push(
            `partition: cut ${cutMs} ms; run accepted ${submittedMs} ms into it; analyze done ${
              during.steps.analyze.finishedAt! - cutAt
            } ms into the cut; ` +
              `report finished ${steps.report.finishedAt! - healedAt} ms after healing`,
          );
        },
      );
    } catch (error) {
      failed = true;
      throw error;
    } finally {
      console.log(figures.join("\n"));
      if (failed) await printLogTails(config);
      await simDown(config.prefix);
    }
    // Nothing of the simulation remains.
    assert.deepEqual(await namespacesOf(config.prefix), []);
    assert.doesNotMatch(await ip("link", "show"), new RegExp(`${config.prefix}-`));
    await assert.rejects(Deno.stat(stateDirOf(config.prefix)));
    assert.deepEqual(await pidsIn(`${config.prefix}-gw`), []);
  },
});
