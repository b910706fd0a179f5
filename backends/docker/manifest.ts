/**
 * Manifest of the `docker` backend: a step run in a container of the local
 * Docker daemon, its inputs mounted read-only and its outputs directory
 * read-write, with no network unless the step asks for one.
 *
 * The backend host talks to the daemon over its socket only: it is granted
 * that socket, the pipeline directory (build contexts) and the scratch root
 * (outputs checks, and making the outputs directory writable for a non-root
 * container user). Nothing per attempt, so steps share warm hosts.
 *
 * @module
 */

import { resolve } from "node:path";
import { z } from "npm:zod@4.6.7";
import type { AttemptSpec, BackendManifest, DenoPermissions, HostContext } from "../backend.ts";
import {
  describeDurationBounds,
  durationWithin,
  isDuration,
  parseDuration,
} from "../../core/duration.ts";
import { MAX_SERVICES, SERVICE_NAME_PATTERN, SERVICE_WAIT_BOUNDS } from "../../core/schema.ts";

/** The daemon's socket when `DOCKER_HOST` does not name another one. */
export const DEFAULT_DOCKER_SOCKET = "/var/run/docker.sock";

/** The environment variable naming the daemon, read by the Docker CLI and by this backend. */
export const DOCKER_HOST_VARIABLE = "DOCKER_HOST";

/** Where the backend reaches the Docker daemon. */
export type DockerEndpoint =
  | { kind: "socket"; socketPath: string }
  | { kind: "tcp"; host: string; port: number };

/** A `DOCKER_HOST` this backend cannot use. */
export class DockerHostError extends Error {
  /** Stable error code. */
  readonly code = "docker_host_unsupported";

  /** Builds the error from the offending value. */
  constructor(value: string) {
    super(
      `Expected ${DOCKER_HOST_VARIABLE} like "unix:///var/run/docker.sock" or "tcp://host:2375", got "${value}"`,
    );
    this.name = "DockerHostError";
  }
}

/**
 * Parses a `DOCKER_HOST` value (absent: the default socket). Plain TCP only:
 * TLS and SSH endpoints are not supported.
 */
export function parseDockerHost(value: string | undefined): DockerEndpoint {
  if (value === undefined || value === "") {
    return { kind: "socket", socketPath: DEFAULT_DOCKER_SOCKET };
  }
  if (value.startsWith("unix://")) {
    return { kind: "socket", socketPath: value.slice("unix://".length) || DEFAULT_DOCKER_SOCKET };
  }
  const tcp = /^tcp:\/\/([^:/]+):(\d+)\/?$/.exec(value);
  if (tcp) return { kind: "tcp", host: tcp[1], port: Number(tcp[2]) };
  throw new DockerHostError(value);
}

/**
 * The `DOCKER_HOST` of this process, read only when this process may read
 * it (a backend host is granted it only when the runner had it set), so that
 * a sandboxed host never trips over a missing env permission.
 */
export function dockerHostValue(): string | undefined {
  try {
    const state = Deno.permissions.querySync({ name: "env", variable: DOCKER_HOST_VARIABLE })
      .state;
    return state === "granted" ? Deno.env.get(DOCKER_HOST_VARIABLE) : undefined;
  } catch {
    return undefined;
  }
}

/** The endpoint of the daemon this process should talk to. */
export function dockerEndpoint(): DockerEndpoint {
  return parseDockerHost(dockerHostValue());
}

/** How an endpoint reads in messages: the socket path, or `host:port`. */
export function describeEndpoint(endpoint: DockerEndpoint): string {
  return endpoint.kind === "socket" ? endpoint.socketPath : `${endpoint.host}:${endpoint.port}`;
}

/** Environment variable names, as Docker's `ENV` accepts them. */
const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

/** A path inside the build context: relative, not escaping it, no glob characters. */
const contextPath = z.string().min(1).refine(
  (path) => !path.startsWith("/") && !path.split("/").includes("..") && !/[*?[\]\\$\s]/.test(path),
  {
    message: 'Expected a path relative to the build context, without "..", spaces, "$" ' +
      "or glob characters",
  },
);

/** An absolute path inside the container. */
const containerPath = z.string().refine((path) => path.startsWith("/") && !/[\r\n]/.test(path), {
  message: 'Expected an absolute path in the container, like "/app"',
});

/** The `build:` section: an image generated from a Dockerfile, cached by content digest. */
export const dockerBuildSchema = z.strictObject({
  /** Base image; it must already be on the host (no registry is used). */
  from: z.string().regex(/^\S+$/, { message: 'Expected a base image name for "build.from"' }),
  /** Build context directory, relative to the pipeline directory (default `.`). */
  context: z.string().min(1).optional(),
  /** Dependency file of the context, copied before the rest so that `install` caches. */
  dependencies: contextPath.optional(),
  /** Command run (with `/bin/sh -c`) once the dependency file is in place. */
  install: z.string().min(1).optional(),
  /** Files or directories of the context, copied to the same relative paths in the workdir. */
  copy: z.array(contextPath).optional(),
  /** Environment baked into the image. */
  env: z.record(
    z.string(),
    z.string().refine((value) => !/[\r\n]/.test(value), {
      message: "Expected a single-line value",
    }),
  ).refine((env) => Object.keys(env).every((name) => ENV_NAME.test(name)), {
    message: "Expected environment variable names ([A-Za-z_][A-Za-z0-9_]*) as keys",
  }).optional(),
  /** Working directory of the image (absolute). */
  workdir: containerPath.optional(),
  /** Entrypoint of the image, exec form. */
  entrypoint: z.array(z.string()).min(1).optional(),
});

/** A validated `build:` section. */
export type DockerBuild = z.infer<typeof dockerBuildSchema>;

/** `wait-for.timeout` when none is given. */
export const DEFAULT_SERVICE_WAIT_MS = 60_000;

/** One entry of `services:`: a container started beside the step for its lifetime. */
export const dockerServiceSchema = z.strictObject({
  /** Its name on the attempt's network (a DNS label). */
  name: z.string().regex(SERVICE_NAME_PATTERN, {
    message: 'Expected a service name that is a DNS label (lowercase letters, digits and "-", ' +
      'at most 63, not starting or ending with "-"), like "db"',
  }),
  /** Its image; it must be on the host. */
  image: z.string().regex(/^\S+$/, { message: 'Expected an image name for "image"' }),
  /** Script run with `/bin/sh -c` instead of the image's command. */
  run: z.string().min(1).optional(),
  /** Without `run`: its command (after the image's entrypoint); with `run`: `$1…`. */
  args: z.array(z.string()).optional(),
  /** Its environment (plain values: never a secret's value). */
  env: z.record(
    z.string(),
    z.union([z.string(), z.number(), z.boolean()]).refine(
      (value) => typeof value !== "string" || !value.includes("\0"),
      { message: "Expected a value without NUL characters" },
    ),
  ).refine((env) => Object.keys(env).every((name) => ENV_NAME.test(name)), {
    message: "Expected environment variable names ([A-Za-z_][A-Za-z0-9_]*) as keys",
  }).optional(),
  /** Secrets of the step (their env names) the service gets under the same names. */
  secrets: z.array(
    z.string().regex(ENV_NAME, {
      message: "Expected the env name of one of the step's secrets",
    }),
  ).optional(),
  /** User to run as, by name or uid. */
  user: z.string().min(1).optional(),
  /** Before the step starts, wait until the service accepts TCP connections on a port. */
  "wait-for": z.strictObject({
    port: z.number().int().min(1).max(65535),
    timeout: z.string().refine(
      (text) => isDuration(text) && durationWithin(parseDuration(text), SERVICE_WAIT_BOUNDS),
      { message: `Expected ${describeDurationBounds(SERVICE_WAIT_BOUNDS)}, like "30s"` },
    ).optional(),
  }).optional(),
});

/** A validated service entry. */
export type DockerService = z.infer<typeof dockerServiceSchema>;

/** The `services:` list: at most {@link MAX_SERVICES}, names unique. */
export const dockerServicesSchema = z.array(dockerServiceSchema).max(MAX_SERVICES, {
  message: `Expected at most ${MAX_SERVICES} services`,
}).superRefine((services, context) => {
  const seen = new Set<string>();
  services.forEach((service, index) => {
    if (seen.has(service.name)) {
      context.addIssue({
        code: "custom",
        path: [index, "name"],
        message: `Expected unique service names, "${service.name}" is given twice`,
      });
    }
    seen.add(service.name);
  });
});

/** Config of a `docker` step. */
export const dockerConfigSchema = z.strictObject({
  /** Image to run; must be on the host (no registry is reachable). */
  image: z.string().min(1, { message: 'Expected an image name for "image"' }).optional(),
  /** Script run with `/bin/sh -c` (the image's entrypoint is replaced). */
  run: z.string().min(1, { message: 'Expected a non-empty command for "run"' }).optional(),
  /** Without `run`: the command (exec form, after the image's entrypoint); with `run`: `$1…`. */
  args: z.array(z.string()).optional(),
  /** Working directory in the container (absolute). */
  workdir: containerPath.optional(),
  /** User to run as, by name or uid (`nobody`, `65534`, `65534:65534`). */
  user: z.string().min(1).optional(),
  /** Give the container a network (bridge); default false: no network at all. */
  network: z.boolean().optional(),
  /** Build the image from a generated Dockerfile instead of naming one. */
  build: dockerBuildSchema.optional(),
  /** Containers started beside the step on a network private to the attempt. */
  services: dockerServicesSchema.optional(),
  /** Free configuration; accepted and ignored. */
  with: z.record(z.string(), z.unknown()).optional(),
}).refine((config) => (config.image === undefined) !== (config.build === undefined), {
  message: 'Expected either "image" or "build" (exactly one of them)',
});

/** A validated `docker` step config. */
export type DockerConfig = z.infer<typeof dockerConfigSchema>;

/** What reaching the daemon takes: the socket (read, write, net) or its TCP address. */
function daemonPermissions(endpoint: DockerEndpoint): DenoPermissions {
  const env = dockerHostValue() === undefined ? [] : [DOCKER_HOST_VARIABLE];
  if (endpoint.kind === "tcp") {
    return { read: [], write: [], net: [`${endpoint.host}:${endpoint.port}`], env, run: [] };
  }
  return {
    read: [endpoint.socketPath],
    write: [endpoint.socketPath],
    net: [`unix:${endpoint.socketPath}`],
    env,
    run: [],
  };
}

/** The `docker` backend's manifest. */
export const dockerManifest: BackendManifest<DockerConfig> = {
  name: "docker",
  version: "0.1.0",
  // Containers outlive the runner and are found again by label; docker stats gives usage.
  capabilities: { reattach: true, usage: true },
  configSchema: dockerConfigSchema,
  hostPermissions(context: HostContext): DenoPermissions {
    // Recovery reads the outputs of attempts that finished while no agent
    // was watching, to check their declared outputs.
    const daemon = daemonPermissions(dockerEndpoint());
    return { ...daemon, read: [...daemon.read, context.scratchRoot] };
  },
  permissions(config: DockerConfig, spec: AttemptSpec): DenoPermissions {
    const daemon = daemonPermissions(dockerEndpoint());
    const { scratchRoot } = spec;
    const read = [...daemon.read, spec.baseDir, scratchRoot];
    // A build context outside the pipeline directory is a stable root too.
    const context = config.build?.context;
    if (context !== undefined) {
      const contextDir = resolve(spec.baseDir, context);
      if (!isWithin(contextDir, spec.baseDir)) read.push(contextDir);
    }
    return { ...daemon, read, write: [...daemon.write, scratchRoot] };
  },
};

function isWithin(path: string, dir: string): boolean {
  return path === dir || path.startsWith(dir.endsWith("/") ? dir : `${dir}/`);
}

/** The manifest, as plugin hosts load it (a module's default export). */
export default dockerManifest;
