/**
 * The multi-cloud simulation (needs root; its own prefix and published
 * address, so a user's sim may run beside it):
 *
 * 1. The delay line's accuracy: ping round trips per cloud pair, measured
 *    minus configured (target |mean error| ≤ 2 ms), and the spread the
 *    configured ±5 ms jitter gives. Anchor: the configured RTT.
 * 2. Its CPU cost (utime+stime of the delay-line process) at idle — etcd,
 *    agents and servers heartbeating across it — and while a 10 MB artifact
 *    goes AWS → object store → GCP. Anchor: the same pipeline inside AWS,
 *    which never crosses the gateway.
 * 3. Windmill's protocol (400 sequential no-op steps) with the scheduler in
 *    GCP and the workers in AWS: per-step overhead against the measured
 *    AWS↔GCP RTT (the floor is about one round trip to assign a step and
 *    one to record its result).
 *
 * Run: `deno task bench` (all) or `deno run -A bench/sim_bench.ts`.
 *
 * @module
 */

import { RunClient } from "../agent/client/mod.ts";
import {
  adminToken,
  apiUrl,
  gatewayState,
  isRoot,
  loadSimConfig,
  measureLatency,
  type SimConfig,
  simDown,
  simPaths,
  simUp,
} from "../infra/sim/mod.ts";
import { median, printTable } from "./_table.ts";

/** The issue's accuracy target for the delay line. */
const MAX_MEAN_ERROR_MS = 2;
/** Clock ticks per second of /proc/PID/stat (USER_HZ on Linux). */
const USER_HZ = 100;
const IDLE_WINDOW_MS = 10_000;
const ARTIFACT_BYTES = 10 * 1024 * 1024;

/** Figures of the sim bench. */
export interface SimBenchResult {
  meanErrorMs: Record<string, number>;
  idleCpuPercent: number;
  transferCpuPercent: number;
  windmillMsPerStep: number;
  awsGcpRttMs: number;
}

/**
 * The standard deviation a round trip should show for ±`jitterMs`: each
 * direction adds uniform(±jitter/2), variance jitter²/12, two directions.
 */
function jitterSd(jitterMs: number): number {
  return Math.sqrt(2 * jitterMs ** 2 / 12);
}

async function benchConfig(): Promise<SimConfig> {
  const config = await loadSimConfig();
  config.prefix = "rnbench";
  config.api = { host: "169.254.215.1", sim: "169.254.215.2", port: 8080 };
  // The scheduler in GCP, the workers of the Windmill run in AWS.
  config.leader = "cp-gcp-1";
  return config;
}

/** CPU seconds (user + system) a process has used so far. */
async function cpuSeconds(pid: number): Promise<number> {
  const output = await new Deno.Command("cat", { args: [`/proc/${pid}/stat`], stdout: "piped" })
    .output();
  const stat = new TextDecoder().decode(output.stdout);
  // Fields after the command name (which may hold spaces) start after ") ".
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) / USER_HZ;
}

/** Runs `work` and returns its wall time and the delay line's CPU share meanwhile. */
async function withCpu<T>(pid: number, work: () => Promise<T>) {
  const cpuBefore = await cpuSeconds(pid);
  const started = performance.now();
  const value = await work();
  const wallMs = performance.now() - started;
  const cpu = await cpuSeconds(pid) - cpuBefore;
  return { value, wallMs, cpuPercent: (100 * cpu * 1000) / wallMs };
}

function transferPipeline(producer: string, consumer: string): string {
  return `name: transfer-${producer}-${consumer}
steps:
  produce:
    backend: shell
    selector: { cloud: ${producer} }
    run: head -c ${ARTIFACT_BYTES} /dev/urandom > "$RUNNEL_OUTPUT_BLOB_BIN"
    outputs: [blob.bin]
  consume:
    backend: shell
    needs: [produce]
    selector: { cloud: ${consumer} }
    inputs: { blob: produce/blob.bin }
    run: test "$(wc -c < "$RUNNEL_INPUT_BLOB")" -eq ${ARTIFACT_BYTES}
`;
}

/** Runs the benchmark and prints its tables. */
export async function benchSim(sequentialSteps = 400): Promise<SimBenchResult | undefined> {
  if (!(await isRoot())) {
    console.log("\nsim bench skipped: it needs root (network namespaces, veth, TUN)");
    return undefined;
  }
  const config = await benchConfig();
  const dir = await Deno.realPath(await Deno.makeTempDir({ prefix: "runnel_sim_bench_" }));
  try {
    await simUp(config);
    const delayLinePid = Number(
      (await Deno.readTextFile(`${simPaths(config.prefix).pids}/gateway.delay-line`)).trim(),
    );
    const client = new RunClient([apiUrl(config)], { token: await adminToken(config.prefix) });
    const run = async (source: string, name: string) => {
      const { runId } = await client.submit(source, `${name}.yaml`, dir);
      for await (const _ of client.events(runId)) { /* until it ends */ }
      const view = await client.run(runId);
      if (view.run.status !== "succeeded") throw new Error(`bench run ${name} ${view.run.status}`);
      return view;
    };

    // 1. Accuracy.
    const measurements = await measureLatency(config, { count: 30 });
    const cross = measurements.filter((m) => m.targetMs > 0);
    const meanErrorMs: Record<string, number> = {};
    printTable("sim: delay line accuracy, 30 pings per pair (anchor: the configured RTT)", [
      ...cross.map((m) => {
        meanErrorMs[m.link] = m.ping.avg - m.targetMs;
        const jitter = config.latency[m.link].jitterMs;
        return {
          pair: m.link,
          configured_ms: `${m.targetMs} ±${jitter}`,
          measured_mean_ms: m.ping.avg.toFixed(2),
          mean_error_ms: meanErrorMs[m.link].toFixed(2),
          ratio: (m.ping.avg / m.targetMs).toFixed(3),
          min_max_ms: `${m.ping.min.toFixed(1)}–${m.ping.max.toFixed(1)}`,
          sd_ms: m.ping.sd.toFixed(2),
          jitter_sd_configured_ms: jitterSd(jitter).toFixed(2),
          tcp_connect_mean_ms: m.tcp.avg.toFixed(2),
        };
      }),
      ...measurements.filter((m) => m.targetMs === 0).map((m) => ({
        pair: `${m.link} (intra)`,
        configured_ms: "none",
        measured_mean_ms: m.ping.avg.toFixed(3),
        mean_error_ms: "-",
        ratio: "-",
        min_max_ms: `${m.ping.min.toFixed(3)}–${m.ping.max.toFixed(3)}`,
        sd_ms: m.ping.sd.toFixed(3),
        jitter_sd_configured_ms: "-",
        tcp_connect_mean_ms: m.tcp.avg.toFixed(2),
      })),
    ]);
    const worst = Math.max(...Object.values(meanErrorMs).map(Math.abs));
    console.log(
      `target |mean error| ≤ ${MAX_MEAN_ERROR_MS} ms: ${
        worst <= MAX_MEAN_ERROR_MS ? "met" : "NOT met"
      } (worst ${worst.toFixed(2)} ms)`,
    );
    const line = await gatewayState(config);
    const late = Object.values(line.directions);
    console.log(
      `delay line's own release error (all packets so far): mean ${
        (late.reduce((sum, d) => sum + d.meanLateMs * d.forwarded, 0) /
          Math.max(1, late.reduce((sum, d) => sum + d.forwarded, 0))).toFixed(3)
      } ms, max ${Math.max(...late.map((d) => d.maxLateMs)).toFixed(1)} ms`,
    );

    // 2. CPU: idle, then a 10 MB artifact inside AWS (anchor) and AWS → GCP.
    const idle = await withCpu(
      delayLinePid,
      () => new Promise((resolve) => setTimeout(resolve, IDLE_WINDOW_MS)),
    );
    await run(transferPipeline("aws", "aws"), "warm-up");
    const intra = await withCpu(delayLinePid, () => run(transferPipeline("aws", "aws"), "intra"));
    const before = (await gatewayState(config)).directions["aws>gcp"]?.bytes ?? 0;
    const crossed = await withCpu(delayLinePid, () => run(transferPipeline("aws", "gcp"), "cross"));
    const crossedBytes = (await gatewayState(config)).directions["aws>gcp"].bytes - before;
    printTable("sim: delay line CPU (one core = 100 %)", [
      {
        what: `idle ${IDLE_WINDOW_MS / 1000} s (etcd, servers, agents heartbeating)`,
        wall_ms: idle.wallMs.toFixed(0),
        delay_line_cpu: `${idle.cpuPercent.toFixed(1)} %`,
        bytes_through_gateway: "-",
        ratio: "-",
      },
      {
        what: "10 MB artifact aws → aws (anchor: no gateway)",
        wall_ms: intra.wallMs.toFixed(0),
        delay_line_cpu: `${intra.cpuPercent.toFixed(1)} %`,
        bytes_through_gateway: "-",
        ratio: "1.00",
      },
      {
        what: "10 MB artifact aws → store → gcp",
        wall_ms: crossed.wallMs.toFixed(0),
        delay_line_cpu: `${crossed.cpuPercent.toFixed(1)} %`,
        bytes_through_gateway: String(crossedBytes),
        ratio: (crossed.wallMs / intra.wallMs).toFixed(2),
      },
    ]);

    // 3. Windmill's protocol across AWS↔GCP.
    const rtt = measurements.find((m) => m.link === "aws-gcp")!;
    const awsGcpRttMs = median([rtt.ping.median, rtt.tcp.median]);
    const chain = `name: windmill\nsteps:\n${
      Array.from({ length: sequentialSteps }, (_, i) =>
        `  s${i}: { backend: shell, run: "true", selector: { cloud: aws }${
          i > 0 ? `, needs: [s${i - 1}]` : ""
        } }`).join("\n")
    }\n`;
    const started = performance.now();
    await run(chain, "windmill");
    const windmillMsPerStep = (performance.now() - started) / sequentialSteps;
    printTable(
      `sim: Windmill protocol, ${sequentialSteps} sequential no-op steps, scheduler in GCP, workers in AWS`,
      [
        {
          what: "measured AWS↔GCP RTT (anchor)",
          ms_per_step: awsGcpRttMs.toFixed(1),
          ratio_to_rtt: "1.00",
        },
        {
          what: "floor: assignment + result round trips",
          ms_per_step: (2 * awsGcpRttMs).toFixed(1),
          ratio_to_rtt: "2.00",
        },
        {
          what: "runnel through the sim, per step",
          ms_per_step: windmillMsPerStep.toFixed(1),
          ratio_to_rtt: (windmillMsPerStep / awsGcpRttMs).toFixed(2),
        },
      ],
    );
    return {
      meanErrorMs,
      idleCpuPercent: idle.cpuPercent,
      transferCpuPercent: crossed.cpuPercent,
      windmillMsPerStep,
      awsGcpRttMs,
    };
  } finally {
    await simDown(config.prefix);
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

if (import.meta.main) {
  await benchSim(Number(Deno.args[0] ?? "400"));
}
