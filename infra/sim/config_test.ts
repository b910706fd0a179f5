import assert from "node:assert/strict";
import { loadSimConfig, parseSimConfig, SimConfigError } from "./config.ts";

const BASE = await Deno.readTextFile(new URL("../sim.yaml", import.meta.url));

Deno.test("sim.yaml: the seeds' topology, durations in ms", async () => {
  const config = await loadSimConfig();
  assert.equal(config.prefix, "rnsim");
  assert.deepEqual(
    config.nodes.map((node) => `${node.name}@${node.address}`),
    [
      "cp-aws-1@10.10.0.10",
      "cp-gcp-1@10.20.0.11",
      "cp-azure-1@10.30.0.13",
      "worker-aws-1@10.10.0.20",
      "worker-aws-2@10.10.0.21",
      "worker-gcp-1@10.20.0.20",
      "worker-azure-1@10.30.0.20",
      "minio@10.10.0.100",
    ],
  );
  assert.deepEqual(config.latency, {
    "aws-gcp": { rttMs: 50, jitterMs: 5 },
    "aws-azure": { rttMs: 75, jitterMs: 5 },
    "gcp-azure": { rttMs: 125, jitterMs: 5 },
  });
  assert.deepEqual(config.etcd, { heartbeatMs: 150, electionMs: 1500 });
});

Deno.test("sim.yaml: what would break the sim is refused before anything starts", () => {
  const cases: Array<[string, string, RegExp]> = [
    ["prefix: rnsim", "prefix: much-too-long", /prefix: Expected a prefix/],
    ["  gcp-azure: { rtt: 125ms, jitter: 5ms }\n", "", /latency\.gcp-azure: Expected a round trip/],
    ["aws-gcp: { rtt: 50ms, jitter: 5ms }", "aws-gcp: { rtt: 5ms, jitter: 50ms }", /jitter ≤ rtt/],
    [
      "etcd: { heartbeat: 150ms, election: 1500ms }",
      "etcd: { heartbeat: 150ms, election: 500ms }",
      /5× heartbeat/,
    ],
    [
      "worker-gcp-1: { cloud: gcp, address: 10.20.0.20",
      "worker-gcp-1: { cloud: gcp, address: 10.10.0.50",
      /Expected an address in 10\.20\.0\.0\/24/,
    ],
    [
      "worker-gcp-1: { cloud: gcp, address: 10.20.0.20",
      "worker-gcp-1: { cloud: gcp, address: 10.20.0.11",
      /is taken/,
    ],
    ["worker-gcp-1: { cloud: gcp,", "worker-gcp-1: { cloud: oracle,", /Unknown cloud "oracle"/],
    ["leader: cp-aws-1", "leader: worker-aws-1", /leader: Expected a control-plane node/],
    ["bucket: pipeline-data", "bucket: pipeline-data\nextra: 1", /Unrecognized key/],
  ];
  for (const [from, to, error] of cases) {
    assert.ok(BASE.includes(from), from);
    assert.throws(() => parseSimConfig(BASE.replace(from, to)), (thrown: unknown) => {
      assert.ok(thrown instanceof SimConfigError);
      assert.match(thrown.message, error);
      return true;
    });
  }
});
