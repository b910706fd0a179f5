/**
 * The `ssh` backend against the OpenSSH client, both talking to a throwaway
 * sshd on a loopback port (tests/_sshd.ts):
 * - a trivial step (`true`) on a warm connection vs `ssh -o BatchMode=yes
 *   host true` (a fresh handshake each time; target ratio ≤ 0.5) and vs
 *   `ssh` through a ControlMaster (target ≤ 1.5);
 * - a 100 MiB artifact up and down over SFTP (digest checked) vs `scp` of
 *   the same file both ways (target throughput ratio ≥ 0.8).
 *
 * Run: `deno run --lock=deno.lock -A bench/ssh_bench.ts`
 *
 * @module
 */

import type { AttemptSpec } from "../backends/backend.ts";
import { isSuccess } from "../backends/backend.ts";
import createSshBackend from "../backends/ssh/mod.ts";
import { runToEnd, scratchSpec } from "../backends/testing.ts";
import { startSshd, type TestSshd } from "../tests/_sshd.ts";
import { median, printTable } from "./_table.ts";

/** Timed runs of each trivial variant. */
const RUNS = 15;
/** Timed runs of each artifact variant (interleaved). */
const ARTIFACT_RUNS = 3;
/** Size of the artifact moved up and down. */
const ARTIFACT_BYTES = 100 * 1024 * 1024;

/** The figures the bench prints. */
export interface SshBenchResult {
  stepMs: number;
  sshMs: number;
  controlMasterMs: number;
  artifactMs: number;
  scpMs: number;
}

async function timed(task: () => Promise<unknown>): Promise<number> {
  const began = performance.now();
  await task();
  return performance.now() - began;
}

async function command(name: string, args: string[]): Promise<void> {
  const output = await new Deno.Command(name, { args, stdout: "null", stderr: "piped" }).output();
  if (!output.success) {
    throw new Error(`${name} failed: ${new TextDecoder().decode(output.stderr)}`);
  }
}

function sshOptions(sshd: TestSshd): string[] {
  return [
    "-o",
    "BatchMode=yes",
    "-o",
    `UserKnownHostsFile=${sshd.knownHosts}`,
    "-o",
    "StrictHostKeyChecking=yes",
    "-i",
    sshd.identity,
  ];
}

async function medianOf(task: () => Promise<unknown>): Promise<number> {
  await task(); // warm-up
  const samples: number[] = [];
  for (let i = 0; i < RUNS; i++) samples.push(await timed(task));
  return median(samples);
}

/** Runs the bench, prints its tables, and returns the figures. */
export async function benchSsh(): Promise<SshBenchResult> {
  await using sshd = await startSshd();
  const backend = createSshBackend();
  const config = {
    host: sshd.host,
    port: sshd.port,
    user: sshd.user,
    identity: sshd.identity,
    "known-hosts": sshd.knownHosts,
    "work-root": `${sshd.dir}/remote`,
  };
  let runs = 0;
  const step = async (run: string, spec: Partial<AttemptSpec> = {}, inputs = {}) => {
    await using attempt = await scratchSpec({ ...config, run }, {
      spec: { runId: `bench${++runs}`, ...spec },
      inputs,
    });
    const result = await runToEnd(await backend.start({ ...attempt, inputs: spec.inputs ?? {} }));
    if (!isSuccess(result.status)) throw new Error(JSON.stringify(result.status));
  };
  const target = `${sshd.user}@${sshd.host}`;
  const stepMs = await medianOf(() => step("true"));
  const sshMs = await medianOf(() =>
    command("ssh", [...sshOptions(sshd), "-p", String(sshd.port), target, "true"])
  );
  const control = [
    "-o",
    "ControlMaster=auto",
    "-o",
    `ControlPath=${sshd.dir}/cm-%C`,
    "-o",
    "ControlPersist=60",
  ];
  const controlMasterMs = await medianOf(() =>
    command("ssh", [...sshOptions(sshd), ...control, "-p", String(sshd.port), target, "true"])
  );
  await command("ssh", [...sshOptions(sshd), ...control, "-O", "exit", "-p", "0", target])
    .catch(() => {});

  const big = `${sshd.dir}/big.bin`;
  {
    using file = await Deno.open(big, { write: true, create: true });
    const block = crypto.getRandomValues(new Uint8Array(64 * 1024));
    for (let written = 0; written < ARTIFACT_BYTES; written += block.byteLength) {
      await file.write(block);
    }
  }
  // The step moves its input to its output, so both sides move the same
  // bytes: runnel's figure also holds both digests (remote and local).
  const artifactRuns: number[] = [];
  const scpRuns: number[] = [];
  for (let i = 0; i < ARTIFACT_RUNS; i++) {
    artifactRuns.push(
      await timed(() =>
        step('mv "$RUNNEL_INPUT_BIG" "$RUNNEL_OUTPUT_BIG_BIN"', {
          inputs: { big },
          outputs: ["big.bin"],
        })
      ),
    );
    scpRuns.push(
      await timed(async () => {
        const scp = [...sshOptions(sshd), "-P", String(sshd.port)];
        await command("scp", [...scp, big, `${target}:${sshd.dir}/scp-up.bin`]);
        await command("scp", [
          ...scp,
          `${target}:${sshd.dir}/scp-up.bin`,
          `${sshd.dir}/scp-down.bin`,
        ]);
      }),
    );
  }
  const artifactMs = median(artifactRuns);
  const scpMs = median(scpRuns);

  const ms = (value: number) => value.toFixed(1);
  printTable("ssh backend: a trivial step (`true`), median ms", [
    { variant: "runnel ssh step, warm connection", ms: ms(stepMs), ratio: "1.00" },
    {
      variant: "ssh -o BatchMode=yes host true",
      ms: ms(sshMs),
      ratio: `${(stepMs / sshMs).toFixed(2)} (target ≤ 0.5)`,
    },
    {
      variant: "ssh via ControlMaster",
      ms: ms(controlMasterMs),
      ratio: `${(stepMs / controlMasterMs).toFixed(2)} (target ≤ 1.5)`,
    },
  ]);
  const mib = (2 * ARTIFACT_BYTES) / (1024 * 1024);
  printTable("ssh backend: 100 MiB up and down", [
    {
      variant: "runnel SFTP + sha256 (median of 3)",
      ms: ms(artifactMs),
      "MiB/s": (mib / (artifactMs / 1000)).toFixed(1),
    },
    { variant: "scp up + scp down", ms: ms(scpMs), "MiB/s": (mib / (scpMs / 1000)).toFixed(1) },
    {
      variant: "throughput ratio",
      ms: "",
      "MiB/s": `${(scpMs / artifactMs).toFixed(2)} (target ≥ 0.8)`,
    },
  ]);
  return { stepMs, sshMs, controlMasterMs, artifactMs, scpMs };
}

if (import.meta.main) await benchSsh();
