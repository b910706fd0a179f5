import assert from "node:assert/strict";
import { mulberry32, testSeed } from "../../core/_random.ts";
import { DelayPlan, pairKey, parseSubnet } from "./delay_line.ts";

const CLOUDS = { aws: "10.10.0.0/24", gcp: "10.20.0.0/24", azure: "10.30.0.0/24" };
const DELAYS = {
  "aws-gcp": { rttMs: 50, jitterMs: 5 },
  "aws-azure": { rttMs: 75, jitterMs: 5 },
  "gcp-azure": { rttMs: 125, jitterMs: 5 },
};

/** An IPv4 header from one address to another. */
function packet(from: string, to: string, size = 60): Uint8Array {
  const bytes = new Uint8Array(size);
  bytes[0] = 0x45;
  bytes.set(from.split(".").map(Number), 12);
  bytes.set(to.split(".").map(Number), 16);
  return bytes;
}

Deno.test("delay plan: each direction is delayed half its pair's RTT, within half the jitter", () => {
  const seed = testSeed();
  const plan = new DelayPlan({ clouds: CLOUDS, delays: DELAYS }, mulberry32(seed));
  const cases: Array<[string, string, string, number]> = [
    ["10.10.0.10", "10.20.0.11", "aws>gcp", 25],
    ["10.20.0.11", "10.10.0.10", "gcp>aws", 25],
    ["10.10.0.20", "10.30.0.13", "aws>azure", 37.5],
    ["10.30.0.20", "10.20.0.20", "azure>gcp", 62.5],
  ];
  for (const [from, to, direction, half] of cases) {
    // Spaced out, so the FIFO rule never lifts a due time.
    for (let i = 0; i < 200; i++) {
      const now = i * 1_000;
      const admission = plan.admit(packet(from, to), now);
      assert.equal(admission.kind, "delayed", `seed ${seed}`);
      if (admission.kind !== "delayed") continue;
      assert.equal(admission.direction, direction);
      assert.ok(
        Math.abs(admission.due - now - half) <= 2.5,
        `seed ${seed}: ${admission.due - now}`,
      );
    }
  }
});

Deno.test("delay plan: jitter never reorders a direction", () => {
  const seed = testSeed();
  const plan = new DelayPlan({ clouds: CLOUDS, delays: DELAYS }, mulberry32(seed));
  let last = -Infinity;
  for (let i = 0; i < 5_000; i++) {
    // A burst: 10 packets per ms, far closer than the ±2.5 ms jitter.
    const admission = plan.admit(packet("10.10.0.20", "10.20.0.20"), i / 10);
    assert.equal(admission.kind, "delayed");
    if (admission.kind !== "delayed") continue;
    assert.ok(admission.due >= last, `seed ${seed}: packet ${i} due before the one ahead`);
    last = admission.due;
  }
});

Deno.test("delay plan: same-cloud, unknown and non-IPv4 packets are not its business", () => {
  const plan = new DelayPlan({ clouds: CLOUDS, delays: DELAYS });
  assert.deepEqual(plan.admit(packet("10.10.0.20", "10.10.0.21"), 0), { kind: "unrouted" });
  assert.deepEqual(plan.admit(packet("10.10.0.20", "192.168.1.1"), 0), { kind: "unrouted" });
  const ipv6 = packet("10.10.0.20", "10.20.0.20");
  ipv6[0] = 0x60;
  assert.deepEqual(plan.admit(ipv6, 0), { kind: "unrouted" });
  assert.deepEqual(plan.admit(new Uint8Array(10), 0), { kind: "unrouted" });
  assert.equal(plan.state().unrouted, 4);
});

Deno.test("delay plan: a partition drops a cloud's packets both ways, and only its", () => {
  const plan = new DelayPlan({ clouds: CLOUDS, delays: DELAYS });
  plan.control({ op: "partition", cloud: "azure", cut: true });
  assert.equal(plan.admit(packet("10.30.0.20", "10.10.0.10"), 0).kind, "dropped");
  assert.equal(plan.admit(packet("10.20.0.11", "10.30.0.13"), 0).kind, "dropped");
  assert.equal(plan.admit(packet("10.10.0.10", "10.20.0.11"), 0).kind, "delayed");
  assert.deepEqual(plan.state().partitioned, ["azure"]);
  assert.equal(plan.state().directions["azure>aws"].dropped, 1);
  plan.control({ op: "partition", cloud: "azure", cut: false });
  assert.equal(plan.admit(packet("10.30.0.20", "10.10.0.10"), 0).kind, "delayed");
});

Deno.test("delay plan: control requests are checked", () => {
  const plan = new DelayPlan({ clouds: CLOUDS, delays: DELAYS });
  assert.throws(
    () => plan.control({ op: "partition", cloud: "oracle", cut: true }),
    /Unknown cloud/,
  );
  assert.throws(
    () => plan.control({ op: "delay", pair: "aws-oracle", rttMs: 1, jitterMs: 0 }),
    /Unknown cloud pair/,
  );
  assert.throws(
    () => plan.control({ op: "delay", pair: "aws-gcp", rttMs: 10, jitterMs: 20 }),
    /jitterMs ≤ rttMs/,
  );
  assert.throws(() => plan.control({ op: "reboot" } as never), /Unknown op/);
  const state = plan.control({ op: "delay", pair: "aws-gcp", rttMs: 80, jitterMs: 0 });
  assert.deepEqual(state.delays["aws-gcp"], { rttMs: 80, jitterMs: 0 });
  const admission = plan.admit(packet("10.10.0.10", "10.20.0.11"), 100);
  assert.deepEqual(admission, { kind: "delayed", direction: "aws>gcp", due: 140 });
});

Deno.test("delay plan: counters of released packets", () => {
  const plan = new DelayPlan({ clouds: CLOUDS, delays: DELAYS });
  plan.released("aws>gcp", 0.5, 100);
  plan.released("aws>gcp", -0.25, 50);
  assert.deepEqual(plan.state().directions["aws>gcp"], {
    forwarded: 2,
    dropped: 0,
    meanLateMs: 0.125,
    maxLateMs: 0.5,
    bytes: 150,
  });
  plan.control({ op: "reset-stats" });
  assert.equal(plan.state().directions["aws>gcp"].forwarded, 0);
});

Deno.test("subnets and pair keys", () => {
  assert.deepEqual(parseSubnet("aws", "10.10.0.0/24"), {
    cloud: "aws",
    base: 0x0a0a0000,
    mask: 0xffffff00,
  });
  assert.throws(() => parseSubnet("aws", "10.10.0/24"), /Expected an IPv4 subnet/);
  assert.equal(pairKey(["aws", "gcp", "azure"], "azure", "aws"), "aws-azure");
});
