/**
 * The `docker` backend: runs each attempt in its own container of the local
 * Docker daemon, with its inputs mounted read-only under `/runnel/in`, its
 * outputs directory read-write at `/runnel/out`, no network unless the step
 * asks for one, and the step's memory and CPU limits.
 *
 * Containers are labelled with their run, step, attempt and agent, and named
 * after the attempt id, so that an agent restarting finds what it left
 * behind (`recover`) and a second start of one attempt is refused.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import createDockerBackend from "./mod.ts";
 *
 * const backend = createDockerBackend();
 * assert.deepEqual(backend.capabilities, { reattach: true, usage: true });
 * // Available when a daemon answers; otherwise the detail says how to start one.
 * const { available, detail } = await backend.fingerprint();
 * assert.match(detail, available ? /^Docker \S+ at / : /^Docker is not running/);
 * ```
 *
 * @module
 */

import { Readable } from "node:stream";
import type { Container, ContainerInspectInfo, DockerStream } from "./_dockerode.ts";
import {
  type AttemptSpec,
  configMessages,
  type Execution,
  type ExecutionBackend,
  type ExitStatus,
  type Fingerprint,
  InvalidStepConfigError,
  missingOutputStatus,
  type RecoveredAttempt,
  type RecoverOptions,
} from "../backend.ts";
import { ensureStepImage, ImageBuildError } from "./_build.ts";
import {
  daemonMessage,
  DockerClient,
  DockerUnavailableError,
  DuplicateAttemptError,
  ignoreGone,
  ImageMissingError,
  isConnectionError,
  statusCodeOf,
} from "./_client.ts";
import {
  CONTAINER_OUTPUTS_DIR,
  containerCreateOptions,
  containerName,
  LABELS,
} from "./_container.ts";
import { LogQueue } from "../log_queue.ts";
import { pushText, watchContainer } from "./_execution.ts";
import { settledExecution } from "../settled.ts";
import { reapExtras, removeAttemptExtras, startServices } from "./_services.ts";
import {
  describeEndpoint,
  type DockerConfig,
  dockerConfigSchema,
  dockerManifest,
} from "./manifest.ts";

export { DockerUnavailableError, DuplicateAttemptError, ImageMissingError } from "./_client.ts";
export { ImageBuildError } from "./_build.ts";

/** How long `fingerprint` waits for the daemon's answer before calling it unreachable. */
const FINGERPRINT_TIMEOUT_MS = 5_000;

/** Exit code of a container whose command the runtime could not execute (as `docker run`). */
const NOT_STARTED_EXIT_CODE = 127;

/** A container id or name as Docker allows them (`[a-zA-Z0-9][a-zA-Z0-9_.-]+`). */
const CONTAINER_REFERENCE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$/;

/** Exit code reported for a build that failed before any container existed. */
const BUILD_FAILED_EXIT_CODE = 1;

/** Creates the `docker` backend; each instance keeps its own daemon client. */
export function createDockerBackend(): ExecutionBackend {
  const client = new DockerClient();
  // Builds under way, by image tag, so that concurrent legs of a step build once.
  const builds = new Map<string, Promise<void>>();
  return {
    name: "docker",
    capabilities: dockerManifest.capabilities,
    fingerprint: () => fingerprintDocker(client),
    start: (spec) => startContainer(client, builds, spec),
    recover: (options) => recoverContainers(client, options),
  };
}

/** Checks a `docker` step config; returns human messages, empty when valid. */
export function validateDockerConfig(config: Record<string, unknown>): string[] {
  return configMessages(dockerConfigSchema, config);
}

async function fingerprintDocker(client: DockerClient): Promise<Fingerprint> {
  const where = describeEndpoint(client.endpoint);
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new DockerUnavailableError(client.endpoint)),
      FINGERPRINT_TIMEOUT_MS,
    );
  });
  try {
    const version = await Promise.race([client.call((docker) => docker.version()), timeout]);
    return {
      available: true,
      version: version.Version,
      detail: `Docker ${version.Version} at ${where} (${version.Os}/${version.Arch})`,
    };
  } catch (error) {
    if (error instanceof DockerUnavailableError) return { available: false, detail: error.message };
    return {
      available: false,
      detail: `Docker at ${where} cannot be used: ${daemonMessage(error)}`,
    };
  } finally {
    clearTimeout(timer);
  }
}

async function startContainer(
  client: DockerClient,
  builds: Map<string, Promise<void>>,
  spec: AttemptSpec,
): Promise<Execution> {
  const messages = validateDockerConfig(spec.config);
  if (messages.length > 0) throw new InvalidStepConfigError("docker", messages);
  const config = spec.config as DockerConfig;
  const name = containerName(spec.attemptId);
  // Build output and then the container's own output, in one stream.
  const queue = new LogQueue();
  let image = config.image ?? "";
  if (config.build) {
    try {
      const built = await client.call((docker) =>
        ensureStepImage({
          docker,
          stepId: spec.stepId,
          baseDir: spec.baseDir,
          build: config.build!,
          log: (text) => pushText(queue, "stderr", text),
          inFlight: builds,
        })
      );
      image = built.tag;
    } catch (error) {
      if (!(error instanceof ImageBuildError)) throw error;
      // A broken build is the step's own failure, reported like a failed run.
      pushText(queue, "stderr", `runnel: ${error.message}\n`);
      return settledExecution(name, queue, {
        exitCode: BUILD_FAILED_EXIT_CODE,
        errorClass: "application",
        message: error.message,
      });
    }
  }
  await prepareMounts(spec, config);
  let network: string | undefined;
  if (config.services && config.services.length > 0) {
    const started = await client.call((docker) => startServices({ docker, spec, config, queue }));
    if (started.failure) return settledExecution(name, queue, started.failure);
    network = started.network;
  }
  const removeExtras = () => removeAttemptExtras(client.docker, spec.agentId, spec.attemptId);
  let container: Container;
  try {
    container = await client.call((docker) =>
      docker.createContainer(containerCreateOptions(spec, config, image, network))
    );
  } catch (error) {
    if (network) await removeExtras().catch(() => {});
    const status = statusCodeOf(error);
    if (status === 404 && /no such image/i.test(daemonMessage(error))) {
      throw new ImageMissingError(image);
    }
    if (status === 409) throw new DuplicateAttemptError(spec.attemptId, name);
    throw error;
  }
  let output: DockerStream | undefined;
  try {
    // Attached before the start, so that no early output is missed.
    output = await container.attach({ stream: true, stdout: true, stderr: true });
    await container.start();
  } catch (error) {
    output?.destroy?.();
    const remove = async () => {
      await ignoreGone(container.remove({ force: true, v: true }));
      if (network) await removeExtras();
    };
    if (isConnectionError(error)) {
      await remove().catch(() => {});
      throw new DockerUnavailableError(client.endpoint, error);
    }
    // The runtime could not execute the command (not found, not executable):
    // the step's own failure, with the exit code `docker run` would give.
    const exitCode = await container.inspect().then(
      (info) => info.State?.ExitCode || NOT_STARTED_EXIT_CODE,
      () => NOT_STARTED_EXIT_CODE,
    );
    const message = `container could not start: ${daemonMessage(error)}`;
    pushText(queue, "stderr", `runnel: ${message}\n`);
    return settledExecution(container.id, queue, {
      exitCode,
      errorClass: "application",
      message,
    }, remove);
  }
  const execution = watchContainer({
    docker: client.docker,
    containerId: container.id,
    output,
    queue,
    memoryBytes: spec.resources?.memoryBytes,
    running: true,
    // With no declared outputs there is nothing to check.
    finish: spec.outputs.length === 0
      ? (status) => status
      : (status) => missingOutputStatus(spec, status),
  });
  return network ? withExtrasRemoved(execution, removeExtras) : execution;
}

/**
 * An execution whose services and network go when its step's container
 * ends (whatever the outcome, a cancel included), and again at cleanup
 * (after the step's container is removed, a network it held is free).
 */
function withExtrasRemoved(execution: Execution, removeExtras: () => Promise<void>): Execution {
  const ended = execution.wait().then(async (status) => {
    await removeExtras().catch(() => {});
    return status;
  });
  return {
    handle: execution.handle,
    logs: execution.logs,
    wait: () => ended,
    async status() {
      const state = await execution.status();
      return state.state === "exited" ? { state: "exited", exit: await ended } : state;
    },
    cancel: (graceMs) => execution.cancel(graceMs).then(() => ended).then(() => {}),
    async cleanup() {
      await execution.cleanup();
      await ended;
      await removeExtras();
    },
  };
}

/**
 * Lets a non-root container user write its outputs and read its inputs: the
 * outputs directory becomes world-writable (it belongs to this attempt
 * alone), inputs world-readable. Best effort: a failure surfaces as the
 * step's own error when it cannot write.
 */
async function prepareMounts(spec: AttemptSpec, config: DockerConfig): Promise<void> {
  if (config.user === undefined || /^(root|0)(:|$)/.test(config.user)) return;
  await Deno.chmod(spec.outputsDir, 0o777).catch(() => {});
  for (const path of Object.values(spec.inputs)) await makeReadable(path);
}

async function makeReadable(path: string): Promise<void> {
  try {
    // lstat: chmod follows links, and a link is never ours to open up.
    const info = await Deno.lstat(path);
    if (info.isSymlink) return;
    const mode = (info.mode ?? 0) & 0o7777;
    const wanted = info.isDirectory ? mode | 0o555 : mode | 0o444;
    if (wanted !== mode) await Deno.chmod(path, wanted);
    if (info.isDirectory) {
      for await (const entry of Deno.readDir(path)) await makeReadable(`${path}/${entry.name}`);
    }
  } catch {
    // Best effort, see prepareMounts.
  }
}

/** A container found by {@link recoverContainers}. */
interface Leftover {
  id: string;
  labels: Record<string, string>;
}

async function recoverContainers(
  client: DockerClient,
  options: RecoverOptions,
): Promise<RecoveredAttempt[]> {
  const listed = await client.call((docker) =>
    docker.listContainers({
      all: true,
      filters: { label: [`${LABELS.managed}=true`, `${LABELS.agent}=${options.agentId}`] },
    })
  );
  const leftovers: Leftover[] = listed.map((info) => ({ id: info.Id, labels: info.Labels ?? {} }));
  // A handle is a container id or name; anything else (a stale record's
  // garbage) would reach the daemon's URL paths, so it is left alone.
  const handles = (options.handles ?? []).filter((handle) => CONTAINER_REFERENCE.test(handle));
  for (const handle of handles) {
    if (leftovers.some((leftover) => leftover.id.startsWith(handle))) continue;
    const info = await client.docker.getContainer(handle).inspect().catch((error) => {
      if (statusCodeOf(error) === 404) return undefined;
      throw error;
    });
    if (info) leftovers.push({ id: info.Id, labels: info.Config?.Labels ?? {} });
  }
  const wanted = new Set(options.keep);
  const recovered: RecoveredAttempt[] = [];
  for (const leftover of leftovers) {
    // Services and probes are reaped below, with their attempt's network.
    if (leftover.labels[LABELS.role] !== undefined) continue;
    const attemptId = leftover.labels[LABELS.attemptId];
    if (attemptId !== undefined && wanted.has(attemptId)) {
      // One container per attempt id; a second one would be a stray copy.
      wanted.delete(attemptId);
      const execution = await reattach(client, leftover.id);
      if (execution) {
        // Its services stay while it runs, and go with it.
        recovered.push({
          attemptId,
          execution: withExtrasRemoved(
            execution,
            () => removeAttemptExtras(client.docker, options.agentId, attemptId),
          ),
        });
        continue;
      }
    }
    await ignoreGone(client.docker.getContainer(leftover.id).remove({ force: true, v: true }));
  }
  await reapExtras(client.docker, options.agentId, new Set(recovered.map((r) => r.attemptId)));
  return recovered;
}

/**
 * Watches a container an earlier process started: a running one from now on
 * (attached), an exited one through its recorded logs and exit code.
 * Undefined when it vanished meanwhile.
 */
async function reattach(client: DockerClient, id: string): Promise<Execution | undefined> {
  const container = client.docker.getContainer(id);
  let info: ContainerInspectInfo;
  try {
    info = await container.inspect();
  } catch (error) {
    if (statusCodeOf(error) === 404) return undefined;
    throw error;
  }
  let running = info.State.Running;
  let output: DockerStream | undefined;
  if (running) {
    // Attaching to a container that exited meanwhile is refused: read its logs then.
    output = await container.attach({ stream: true, stdout: true, stderr: true }).catch(() => {
      running = false;
      return undefined;
    });
  }
  if (!output) {
    const logs = await container.logs({ stdout: true, stderr: true, follow: false }).catch(() =>
      new Uint8Array()
    );
    output = Readable.from([logs]);
  }
  const recoveredSpec = recoveredOutputs(info);
  return watchContainer({
    docker: client.docker,
    containerId: info.Id,
    output,
    queue: new LogQueue(),
    memoryBytes: info.HostConfig?.Memory || undefined,
    running,
    finish: recoveredSpec
      ? (status) => missingOutputStatus(recoveredSpec, status)
      : (status: ExitStatus) => status,
  });
}

/**
 * What the declared outputs check of a recovered container needs: the
 * outputs directory from its mounts, the names from its `RUNNEL_OUTPUT_*`
 * variables.
 */
function recoveredOutputs(
  info: ContainerInspectInfo,
): Pick<AttemptSpec, "outputsDir" | "outputs"> | undefined {
  const outputsDir = info.Mounts?.find((mount) => mount.Destination === CONTAINER_OUTPUTS_DIR)
    ?.Source;
  const prefix = `${CONTAINER_OUTPUTS_DIR}/`;
  const outputs = (info.Config?.Env ?? [])
    .filter((entry) => entry.startsWith("RUNNEL_OUTPUT_"))
    .map((entry) => entry.slice(entry.indexOf("=") + 1))
    .filter((value) => value.startsWith(prefix))
    .map((value) => value.slice(prefix.length));
  if (!outputsDir || outputs.length === 0) return undefined;
  return { outputsDir, outputs };
}

/** The backend factory, as plugin hosts load it (a module's default export). */
export default createDockerBackend;
