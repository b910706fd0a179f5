/**
 * What a container for one attempt looks like: its name, labels, mounts,
 * environment and limits, and how its exit reads as an {@link ExitStatus}.
 * Pure functions, so they are tested without a daemon.
 *
 * @module
 */

import type { ContainerCreateOptions, HostConfig, MountSettings } from "./_dockerode.ts";
import { type AttemptSpec, classifyExit, type ExitStatus, stepEnvironment } from "../backend.ts";
import { sha256Hex } from "../../core/_bytes.ts";
import { readableName } from "../../core/_paths.ts";
import type { DockerConfig } from "./manifest.ts";

/** Where inputs are mounted in the container, read-only, one entry per input name. */
export const CONTAINER_INPUTS_DIR = "/runnel/in";
/** Where the attempt's outputs directory is mounted in the container, read-write. */
export const CONTAINER_OUTPUTS_DIR = "/runnel/out";

/** Label keys set on every container this backend starts. */
export const LABELS = {
  managed: "runnel.managed",
  run: "runnel.run",
  step: "runnel.step",
  attempt: "runnel.attempt",
  attemptId: "runnel.attempt-id",
  agent: "runnel.agent",
  /** `service` or `probe` on what an attempt starts beside its step; absent on the step's own. */
  role: "runnel.role",
  /** A service container's name on the attempt's network. */
  service: "runnel.service",
} as const;

/** Exit code of a container whose main process was killed by SIGKILL (128 + 9). */
const SIGKILL_EXIT_CODE = 137;

/** Longest container name part taken from the attempt id; Docker allows far more, logs do not. */
const MAX_NAME_LENGTH = 100;

/**
 * The container name of an attempt: readable, deterministic, and distinct
 * for distinct attempt ids (a digest suffix separates ids that sanitise
 * alike). Starting the same attempt twice therefore meets a name conflict.
 */
export function containerName(attemptId: string): string {
  const readable = readableName(attemptId).slice(0, MAX_NAME_LENGTH);
  const digest = sha256Hex(attemptId).slice(0, 8);
  return `runnel-${readable}-${digest}`;
}

/** The labels recovery finds an attempt's container by. */
export function containerLabels(spec: AttemptSpec): Record<string, string> {
  return {
    [LABELS.managed]: "true",
    [LABELS.run]: spec.runId,
    [LABELS.step]: spec.stepId,
    [LABELS.attempt]: String(spec.attempt),
    [LABELS.attemptId]: spec.attemptId,
    [LABELS.agent]: spec.agentId,
  };
}

/** Where an input is mounted: its name under {@link CONTAINER_INPUTS_DIR}, kept inside it. */
export function inputMountPath(name: string): string {
  const safe = name === "." || name === ".." ? `_${name}` : name.replaceAll("/", "_");
  return `${CONTAINER_INPUTS_DIR}/${safe}`;
}

/**
 * The container's environment: the step's env and secrets, then the standard
 * `RUNNEL_*` variables pointing at the container-side paths.
 */
export function containerEnvironment(spec: AttemptSpec): Record<string, string> {
  const inputs = Object.fromEntries(
    Object.keys(spec.inputs).map((name) => [name, inputMountPath(name)]),
  );
  return {
    ...spec.env,
    ...stepEnvironment({
      ...spec,
      inputs,
      inputsDir: CONTAINER_INPUTS_DIR,
      outputsDir: CONTAINER_OUTPUTS_DIR,
    }),
  };
}

/**
 * The command of the container: `run` through `/bin/sh -c` (its `$1…` are
 * `args`), else `args` after the image's entrypoint, else the image's own.
 */
export function containerCommand(
  config: DockerConfig,
): Pick<ContainerCreateOptions, "Entrypoint" | "Cmd"> {
  if (config.run !== undefined) {
    return { Entrypoint: ["/bin/sh", "-c"], Cmd: [config.run, "sh", ...(config.args ?? [])] };
  }
  if (config.args !== undefined) return { Cmd: config.args };
  return {};
}

/** The full create request of an attempt's container. */
export function containerCreateOptions(
  spec: AttemptSpec,
  config: DockerConfig,
  image: string,
  /** The attempt's own network, when it starts services; else none or the default bridge. */
  network?: string,
): ContainerCreateOptions {
  const mounts: MountSettings[] = Object.entries(spec.inputs).map(([name, source]) => ({
    Type: "bind",
    Source: source,
    Target: inputMountPath(name),
    ReadOnly: true,
  }));
  mounts.push({ Type: "bind", Source: spec.outputsDir, Target: CONTAINER_OUTPUTS_DIR });
  const hostConfig: HostConfig = {
    Mounts: mounts,
    NetworkMode: network ?? (config.network ? "bridge" : "none"),
    // Never AutoRemove: removal would race with reading the exit and the
    // logs (dockerode#582); cleanup() removes the container.
    AutoRemove: false,
    // A tiny init as PID 1 forwards SIGTERM to the step (a shell as PID 1
    // ignores it) and reaps zombies, so a cancel's grace period means something.
    Init: true,
  };
  const memory = spec.resources?.memoryBytes;
  if (memory !== undefined) {
    hostConfig.Memory = memory;
    // No swap on top: past the limit the step is killed, not slowed to a crawl.
    hostConfig.MemorySwap = memory;
  }
  const cpu = spec.resources?.cpu;
  if (cpu !== undefined) hostConfig.NanoCpus = Math.round(cpu * 1e9);
  const options: ContainerCreateOptions = {
    name: containerName(spec.attemptId),
    Image: image,
    ...containerCommand(config),
    Env: Object.entries(containerEnvironment(spec)).map(([key, value]) => `${key}=${value}`),
    Labels: containerLabels(spec),
    // No TTY, so that stdout and stderr stay apart (dockerode#479).
    Tty: false,
    OpenStdin: false,
    AttachStdin: false,
    AttachStdout: true,
    AttachStderr: true,
    HostConfig: hostConfig,
  };
  if (config.workdir !== undefined) options.WorkingDir = config.workdir;
  if (config.user !== undefined) options.User = config.user;
  return options;
}

/** What is known of a container once it has exited. */
export interface ContainerExit {
  exitCode: number;
  /** The kernel's OOM killer ended it (`State.OOMKilled`). */
  oomKilled?: boolean;
  /** Its memory limit, if any. */
  memoryBytes?: number;
  /** The runner asked for it to stop. */
  cancelled?: boolean;
}

/**
 * Gives a container exit its error class: a cancel is `cancelled`, an OOM
 * kill (or a SIGKILL under a memory limit) an application error naming the
 * limit; everything else as {@link classifyExit} says for every backend.
 */
export function classifyContainerExit(exit: ContainerExit): ExitStatus {
  const status: ExitStatus = { exitCode: exit.exitCode };
  if (exit.cancelled) {
    return { ...status, errorClass: "cancelled", message: "step was cancelled" };
  }
  const killedByMemory = exit.oomKilled ||
    (exit.exitCode === SIGKILL_EXIT_CODE && exit.memoryBytes !== undefined);
  if (killedByMemory) {
    const limit = exit.memoryBytes === undefined ? "" : ` ${formatBytes(exit.memoryBytes)}`;
    return {
      ...status,
      signal: "SIGKILL",
      errorClass: "application",
      message: `killed: memory limit${limit} exceeded`,
    };
  }
  return classifyExit(status);
}

/** Bytes in binary units as limits are usually written: `64 MiB`, `1.5 GiB`, `512 B`. */
export function formatBytes(bytes: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  const text = Number.isInteger(value) ? String(value) : value.toFixed(1).replace(/\.0$/, "");
  return `${text} ${units[unit]}`;
}
