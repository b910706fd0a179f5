/**
 * The scale harness (`bench/scale/`), scaled down so CI checks it works:
 * 50 simulated agents over 3 servers and a 3-member etcd complete 500
 * queued steps in group commits, heartbeats stay a sliver of etcd's
 * writes, and a SIGKILL of the scheduling server loses nothing.
 *
 * @module
 */

import assert from "node:assert/strict";
import { runScale } from "../bench/scale/harness.ts";
import { printScale } from "../bench/scale_bench.ts";
import { ignoreWithoutEtcd } from "./_etcd.ts";

Deno.test({
  name: "scale harness: 50 simulated agents, 500 steps, then a scheduler SIGKILL; nothing lost",
  ignore: ignoreWithoutEtcd(),
  async fn() {
    const result = await runScale({
      agents: 50,
      runs: 5,
      stepsPerRun: 100,
      slots: 4,
      delayMs: 0,
      heartbeatMs: 1_000,
      failover: true,
      failoverSteps: 200,
      failoverDelayMs: 50,
    });
    printScale(result);
    assert.equal(result.succeededRuns, 5);
    assert.ok(result.assignmentsPerSecond > 0 && result.resultsPerSecond > 0);
    assert.ok(result.writesPerStep > 0, "etcd's metrics were read");
    // Heartbeats are lease renewals plus one presence write per server per half interval.
    assert.ok(
      result.heartbeatShare <= 0.1,
      `heartbeats were ${(result.heartbeatShare * 100).toFixed(1)} % of etcd's writes`,
    );
    // Results and placements are group-committed: far fewer commits than steps.
    assert.ok(result.proposalsPerStep < 1, `${result.proposalsPerStep} etcd commits per step`);
    const failover = result.failover!;
    assert.equal(failover.succeeded, failover.steps, "every step of the failover phase succeeded");
    assert.ok(
      failover.toNextPlacementMs <= 5_000,
      `the next placement came ${failover.toNextPlacementMs} ms after the SIGKILL`,
    );
  },
});
