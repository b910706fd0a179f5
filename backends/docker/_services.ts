/**
 * Services of a docker step (GitLab's `services:`, Argo sidecars): containers
 * started beside the step, on a user-defined bridge network private to the
 * attempt, where each is reachable by its name (a DNS alias). The network is
 * internal (no route out, not even to the host) unless the step has
 * `network: true`.
 *
 * Everything here is labelled like the step's container (agent, run, step,
 * attempt id) plus a role, so that the attempt's end, a cancel, or an agent
 * restarting (`recover`) finds and removes it, network included.
 *
 * `wait-for` is checked from the network itself, as the step will connect:
 * a short-lived probe container (the offline busybox image) tries the port
 * at the service's address until it opens, the service exits, or the
 * deadline passes. (By address: a container busy resolving a name takes
 * seconds to kill.)
 *
 * @module
 */

import type {
  Container,
  ContainerCreateOptions,
  Docker,
  NetworkCreateOptions,
} from "./_dockerode.ts";
import type { AttemptSpec, ExitStatus } from "../backend.ts";
import type { LogQueue } from "../log_queue.ts";
import { containerCommand, containerLabels, containerName, LABELS } from "./_container.ts";
import {
  daemonMessage,
  DuplicateAttemptError,
  ignoreGone,
  ImageMissingError,
  statusCodeOf,
} from "./_client.ts";
import { pushText } from "./_execution.ts";
import { DEFAULT_SERVICE_WAIT_MS, type DockerConfig, type DockerService } from "./manifest.ts";
import { formatDuration, parseDuration } from "../../core/duration.ts";
import { raceTimeout } from "../../core/_async.ts";

/** The image of the `wait-for` probe: runnel's offline busybox (`deno task images`). */
export const PROBE_IMAGE = "runnel/busybox:local";

/** Log lines of a failed service shown in the step's log. */
const FAILED_SERVICE_LOG_LINES = 20;
/** At most this much of them (characters, the end kept). */
const FAILED_SERVICE_LOG_CHARS = 8_192;

/** Exit code reported when a service kept the step from starting. */
const SERVICE_FAILED_EXIT_CODE = 1;

/**
 * The probe: connect to `$1:$2` until it accepts. Busybox `nc -e /bin/true`
 * exits 0 as soon as it is connected (however long the server would keep
 * the connection, waiting for a client's first word), 1 when refused.
 */
const PROBE_SCRIPT = 'until timeout 5 nc -w 2 "$1" "$2" -e /bin/true </dev/null >/dev/null 2>&1; ' +
  "do sleep 0.2; done";

/** The network of an attempt that has services (named like its container). */
export function attemptNetworkName(attemptId: string): string {
  return containerName(attemptId);
}

/**
 * The create request of an attempt's network. Without `network: true` it is
 * internal (no route out) and its bridge gets no address on the host
 * (`inhibit_ipv4`): otherwise the step and its services would reach
 * whatever the host serves on all its addresses (an agent's API, etcd)
 * through the bridge's gateway address.
 */
export function networkCreateOptions(
  spec: AttemptSpec,
  config: DockerConfig,
): NetworkCreateOptions {
  const isolated = config.network !== true;
  return {
    Name: attemptNetworkName(spec.attemptId),
    Driver: "bridge",
    Internal: isolated,
    CheckDuplicate: true,
    ...(isolated ? { Options: { "com.docker.network.bridge.inhibit_ipv4": "true" } } : {}),
    Labels: roleLabels(spec, "network"),
  };
}

/** The container name of one service of an attempt. */
export function serviceContainerName(attemptId: string, service: string): string {
  return `${containerName(attemptId)}-svc-${service}`;
}

/** The labels of what an attempt starts besides its step's container. */
export function roleLabels(
  spec: AttemptSpec,
  role: "service" | "probe" | "network",
  service?: string,
): Record<string, string> {
  return {
    ...containerLabels(spec),
    [LABELS.role]: role,
    ...(service === undefined ? {} : { [LABELS.service]: service }),
  };
}

/**
 * The environment of a service: its own `env`, then the step's secrets it
 * names, by name. Undefined values are secrets the step does not have.
 */
export function serviceEnvironment(
  spec: AttemptSpec,
  service: DockerService,
): { env: Record<string, string>; missing: string[] } {
  const env: Record<string, string> = {};
  for (const [key, value] of Object.entries(service.env ?? {})) env[key] = String(value);
  const missing: string[] = [];
  for (const name of service.secrets ?? []) {
    const value = spec.env[name];
    if (value === undefined) missing.push(name);
    else env[name] = value;
  }
  return { env, missing };
}

/** The create request of one service's container. */
export function serviceCreateOptions(
  spec: AttemptSpec,
  service: DockerService,
  env: Record<string, string>,
  network: string,
): ContainerCreateOptions {
  const options: ContainerCreateOptions = {
    name: serviceContainerName(spec.attemptId, service.name),
    Image: service.image,
    ...containerCommand({ run: service.run, args: service.args } as DockerConfig),
    Env: Object.entries(env).map(([key, value]) => `${key}=${value}`),
    Labels: roleLabels(spec, "service", service.name),
    Tty: false,
    OpenStdin: false,
    HostConfig: { NetworkMode: network, AutoRemove: false, Init: true },
    NetworkingConfig: { EndpointsConfig: { [network]: { Aliases: [service.name] } } },
  };
  if (service.user !== undefined) options.User = service.user;
  return options;
}

/** What {@link startServices} needs. */
export interface StartServicesOptions {
  docker: Docker;
  spec: AttemptSpec;
  config: DockerConfig;
  /** The step's log: a failed service's last lines go there (masked like the step's). */
  queue: LogQueue;
}

/**
 * Creates the attempt's network and starts its services, then waits for
 * each `wait-for` port. Resolves with the network, or with the failure that
 * keeps the step from starting (everything already removed then). Throws
 * (after removing what it made) only when the daemon refuses outright: a
 * missing image, a lost connection.
 */
export async function startServices(
  options: StartServicesOptions,
): Promise<{ network: string; failure?: ExitStatus }> {
  const { docker, spec, config, queue } = options;
  const services = config.services ?? [];
  const network = attemptNetworkName(spec.attemptId);
  const fail = async (message: string): Promise<{ network: string; failure: ExitStatus }> => {
    pushText(queue, "stderr", `runnel: ${message}\n`);
    await removeAttemptExtras(docker, spec.agentId, spec.attemptId);
    return {
      network,
      failure: { exitCode: SERVICE_FAILED_EXIT_CODE, errorClass: "application", message },
    };
  };
  const environments = services.map((service) => serviceEnvironment(spec, service));
  for (const [index, { missing }] of environments.entries()) {
    if (missing.length > 0) {
      return await fail(
        `service "${services[index].name}" names secret(s) ${
          missing.map((name) => `"${name}"`).join(", ")
        } that the step does not have`,
      );
    }
  }
  const addresses = new Map<string, string>();
  try {
    await docker.createNetwork(networkCreateOptions(spec, config));
  } catch (error) {
    // The attempt started already: what exists is that start's, left alone.
    if (statusCodeOf(error) === 409) throw new DuplicateAttemptError(spec.attemptId, network);
    throw error;
  }
  try {
    for (const [index, service] of services.entries()) {
      let container;
      try {
        container = await docker.createContainer(
          serviceCreateOptions(spec, service, environments[index].env, network),
        );
      } catch (error) {
        if (statusCodeOf(error) === 404 && /no such image/i.test(daemonMessage(error))) {
          throw new ImageMissingError(service.image);
        }
        throw error;
      }
      try {
        await container.start();
      } catch (error) {
        return await fail(`service "${service.name}" could not start: ${daemonMessage(error)}`);
      }
      const info = await container.inspect();
      addresses.set(service.name, info.NetworkSettings?.Networks?.[network]?.IPAddress || "");
    }
    // Inside the try: a wait that throws (its probe image not built) leaves
    // running services and a network that no one else would remove.
    const waits = await Promise.all(
      services.map((service) =>
        waitForService(docker, spec, service, network, addresses.get(service.name)!, queue)
      ),
    );
    const problem = waits.find((message) => message !== undefined);
    if (problem !== undefined) return await fail(problem);
  } catch (error) {
    await removeAttemptExtras(docker, spec.agentId, spec.attemptId).catch(() => {});
    throw error;
  }
  return { network };
}

/**
 * Waits until a service's `wait-for` port accepts connections on the
 * attempt's network. Resolves with why it did not, or undefined.
 */
async function waitForService(
  docker: Docker,
  spec: AttemptSpec,
  service: DockerService,
  network: string,
  /** Its address on the network (a probe by name cannot be killed while it resolves). */
  address: string,
  queue: LogQueue,
): Promise<string | undefined> {
  const waitFor = service["wait-for"];
  if (!waitFor) return undefined;
  const timeoutMs = waitFor.timeout === undefined
    ? DEFAULT_SERVICE_WAIT_MS
    : parseDuration(waitFor.timeout);
  const serviceContainer = docker.getContainer(serviceContainerName(spec.attemptId, service.name));
  // No address: the service has exited already (its end is the answer).
  const probe = address ? await createProbe(docker, spec, service, network, address) : undefined;
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    await probe?.start();
    const outcome = await Promise.race([
      ...(probe
        ? [
          probe.wait({ condition: "not-running" }).then((result) => ({
            probeExit: Number(result.StatusCode),
          })),
        ]
        : []),
      serviceContainer.wait({ condition: "not-running" }).then(
        (result) => ({ exited: Number(result.StatusCode) }),
      ),
      new Promise<"timeout">((resolve) => {
        timer = setTimeout(() => resolve("timeout"), timeoutMs);
      }),
    ]);
    if (outcome !== "timeout" && "probeExit" in outcome && outcome.probeExit === 0) {
      return undefined;
    }
    const why = outcome === "timeout"
      ? `did not open port ${waitFor.port} within ${formatDuration(timeoutMs)}`
      : "exited" in outcome
      ? `exited with code ${outcome.exited} before opening port ${waitFor.port}`
      : `could not be probed on port ${waitFor.port} (probe exit code ${outcome.probeExit})`;
    await pushServiceLogs(docker, spec, service.name, queue);
    return `service "${service.name}" (${service.image}) ${why}`;
  } finally {
    clearTimeout(timer);
    if (probe) await ignoreGone(probe.remove({ force: true })).catch(() => {});
  }
}

/** The container that tries a service's port from the attempt's network. */
async function createProbe(
  docker: Docker,
  spec: AttemptSpec,
  service: DockerService,
  network: string,
  address: string,
): Promise<Container> {
  try {
    return await docker.createContainer({
      name: `${serviceContainerName(spec.attemptId, service.name)}-probe`,
      Image: PROBE_IMAGE,
      Entrypoint: ["/bin/sh", "-c"],
      Cmd: [PROBE_SCRIPT, "probe", address, String(service["wait-for"]!.port)],
      Labels: roleLabels(spec, "probe", service.name),
      User: "65534",
      HostConfig: { NetworkMode: network, AutoRemove: false, Init: true },
    });
  } catch (error) {
    if (statusCodeOf(error) === 404 && /no such image/i.test(daemonMessage(error))) {
      throw new ImageMissingError(PROBE_IMAGE);
    }
    throw error;
  }
}

/** Copies a service's last log lines into the step's log, under a heading. */
async function pushServiceLogs(
  docker: Docker,
  spec: AttemptSpec,
  service: string,
  queue: LogQueue,
): Promise<void> {
  const container = docker.getContainer(serviceContainerName(spec.attemptId, service));
  const raw = await container.logs({
    stdout: true,
    stderr: true,
    follow: false,
    tail: FAILED_SERVICE_LOG_LINES,
  }).catch(() => undefined);
  let text = raw ? demuxText(new Uint8Array(raw)) : "";
  // Lines are the service's own: a few of them may still be huge.
  if (text.length > FAILED_SERVICE_LOG_CHARS) {
    text = `…${text.slice(-FAILED_SERVICE_LOG_CHARS)}`;
  }
  pushText(
    queue,
    "stderr",
    text.trim()
      ? `runnel: last output of service "${service}":\n${text.endsWith("\n") ? text : `${text}\n`}`
      : `runnel: service "${service}" wrote no output\n`,
  );
}

/**
 * The payloads of a multiplexed (non-TTY) log answer, as text: each frame
 * has an 8-byte header whose last 4 bytes are the payload's length.
 */
export function demuxText(bytes: Uint8Array): string {
  const parts: Uint8Array[] = [];
  let offset = 0;
  while (offset + 8 <= bytes.byteLength) {
    const view = new DataView(bytes.buffer, bytes.byteOffset + offset, 8);
    const length = view.getUint32(4);
    parts.push(bytes.subarray(offset + 8, Math.min(offset + 8 + length, bytes.byteLength)));
    offset += 8 + length;
  }
  const joined = new Uint8Array(parts.reduce((total, part) => total + part.byteLength, 0));
  let at = 0;
  for (const part of parts) {
    joined.set(part, at);
    at += part.byteLength;
  }
  return new TextDecoder().decode(joined);
}

/**
 * Removes everything an attempt started beside its step's container (its
 * services, probes) and then its network, found by label, so that it works
 * as well after a crash. Idempotent.
 */
export async function removeAttemptExtras(
  docker: Docker,
  agentId: string,
  attemptId: string,
): Promise<void> {
  const labels = [`${LABELS.agent}=${agentId}`, `${LABELS.attemptId}=${attemptId}`];
  const containers = await docker.listContainers({
    all: true,
    filters: { label: [...labels, LABELS.role] },
  });
  await Promise.all(containers.map((info) => removeContainer(docker, info.Id)));
  const networks = await docker.listNetworks({ filters: { label: labels } });
  for (const network of networks) await removeNetwork(docker, network.Id);
}

/**
 * Removes a network, first disconnecting what is still attached (a
 * container whose removal is still under way holds its endpoint a while).
 */
async function removeNetwork(docker: Docker, id: string): Promise<void> {
  const network = docker.getNetwork(id);
  const info = await network.inspect().catch((error) => {
    if (statusCodeOf(error) === 404) return undefined;
    throw error;
  });
  if (!info) return;
  for (const container of Object.keys(info.Containers ?? {})) {
    // One being removed refuses; its endpoint goes with it.
    await network.disconnect({ Container: container, Force: true }).catch(() => {});
  }
  const deadline = Date.now() + REMOVAL_DEADLINE_MS;
  while (true) {
    try {
      return await ignoreGone(network.remove());
    } catch (error) {
      // 403 "has active endpoints": a container's removal is still under way.
      if (statusCodeOf(error) !== 403 || Date.now() > deadline) throw error;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }
}

/** How long a removal already under way (by another caller) is waited for. */
const REMOVAL_DEADLINE_MS = 10_000;

/** Removes a container (force), waiting for a removal already under way to finish. */
async function removeContainer(docker: Docker, id: string): Promise<void> {
  const container = docker.getContainer(id);
  try {
    await container.remove({ force: true, v: true });
  } catch (error) {
    const status = statusCodeOf(error);
    if (status === 404) return;
    if (status !== 409) throw error;
    await raceTimeout(container.wait({ condition: "removed" }), REMOVAL_DEADLINE_MS);
  }
}

/**
 * After an agent restart: removes the services, probes and networks of its
 * attempts except those of `keep` (attempts re-attached, whose step still
 * needs them).
 */
export async function reapExtras(
  docker: Docker,
  agentId: string,
  keep: ReadonlySet<string>,
): Promise<void> {
  const agent = `${LABELS.agent}=${agentId}`;
  const containers = await docker.listContainers({
    all: true,
    filters: { label: [`${LABELS.managed}=true`, agent, LABELS.role] },
  });
  await Promise.all(
    containers
      .filter((info) => !keep.has(info.Labels?.[LABELS.attemptId] ?? ""))
      .map((info) => removeContainer(docker, info.Id)),
  );
  const networks = await docker.listNetworks({
    filters: { label: [`${LABELS.managed}=true`, agent] },
  });
  for (const network of networks) {
    if (keep.has(network.Labels?.[LABELS.attemptId] ?? "")) continue;
    await removeNetwork(docker, network.Id);
  }
}
