/**
 * The connection to the Docker daemon and the errors a step's author can act
 * on: Docker not running, an image that is not on this host, an attempt
 * started twice.
 *
 * @module
 */

import { connectDocker, type Docker } from "./_dockerode.ts";
import { describeEndpoint, type DockerEndpoint, dockerEndpoint } from "./manifest.ts";

/** The daemon cannot be reached: not running, or its socket is not there. */
export class DockerUnavailableError extends Error {
  /** Stable error code. */
  readonly code = "docker_unavailable";

  /** Builds the error from the endpoint tried and, when known, the low-level cause. */
  constructor(endpoint: DockerEndpoint, cause?: unknown) {
    super(
      `Docker is not running (cannot reach ${describeEndpoint(endpoint)}): start it with ` +
        "`sudo dockerd &` or `sudo systemctl start docker`",
      { cause },
    );
    this.name = "DockerUnavailableError";
  }
}

/** A step's image is not on this host, and there is no registry to pull it from. */
export class ImageMissingError extends Error {
  /** Stable error code. */
  readonly code = "image_missing";
  /** The image the step named. */
  readonly image: string;

  /** Builds the error from the image name. */
  constructor(image: string) {
    super(
      `Expected image "${image}" on this Docker host, but it is not there and no registry is ` +
        "reachable to pull it from: build the runnel/* images offline with `deno task images`, " +
        "bring others in with `docker load` or `docker import`, or give the step a `build:` " +
        "section that starts from a local image",
    );
    this.name = "ImageMissingError";
    this.image = image;
  }
}

/** A container for this attempt id exists already: the same attempt was started twice. */
export class DuplicateAttemptError extends Error {
  /** Stable error code. */
  readonly code = "attempt_already_started";

  /** Builds the error from the attempt id and the container name it maps to. */
  constructor(attemptId: string, name: string) {
    super(
      `Expected attempt "${attemptId}" to be started once, but its container "${name}" ` +
        "already exists",
    );
    this.name = "DuplicateAttemptError";
  }
}

/** The daemon client of one backend instance, created on first use. */
export class DockerClient {
  #docker: Docker | undefined;
  #endpoint: DockerEndpoint | undefined;

  /** Where the daemon is. */
  get endpoint(): DockerEndpoint {
    return this.#endpoint ??= dockerEndpoint();
  }

  /** The dockerode client. */
  get docker(): Docker {
    if (this.#docker) return this.#docker;
    const endpoint = this.endpoint;
    this.#docker = connectDocker(
      endpoint.kind === "socket"
        ? { socketPath: endpoint.socketPath }
        : { host: endpoint.host, port: endpoint.port, protocol: "http" },
    );
    return this.#docker;
  }

  /**
   * Runs a daemon call, turning "cannot connect" into
   * {@link DockerUnavailableError}; other errors pass through.
   */
  async call<T>(request: (docker: Docker) => Promise<T>): Promise<T> {
    try {
      return await request(this.docker);
    } catch (error) {
      if (isConnectionError(error)) throw new DockerUnavailableError(this.endpoint, error);
      throw error;
    }
  }
}

/** Socket-level error codes meaning the daemon is not there (or went away). */
const CONNECTION_ERROR_CODES = new Set([
  "ECONNREFUSED",
  "ENOENT",
  "ECONNRESET",
  "EPIPE",
  "ETIMEDOUT",
  "EHOSTUNREACH",
  "ENOTCONN",
]);

/** True for an error of the connection rather than an answer of the daemon. */
export function isConnectionError(error: unknown): boolean {
  if (error instanceof DockerUnavailableError) return true;
  const code = (error as { code?: unknown })?.code;
  if (typeof code === "string" && CONNECTION_ERROR_CODES.has(code)) return true;
  const message = error instanceof Error ? error.message : "";
  return /socket hang up|ECONNREFUSED|connect ENOENT|No such file or directory \(os error 2\)/
    .test(message);
}

/** The HTTP status of a daemon answer carried by a dockerode error, if any. */
export function statusCodeOf(error: unknown): number | undefined {
  const code = (error as { statusCode?: unknown })?.statusCode;
  return typeof code === "number" ? code : undefined;
}

/** The daemon's own message of a dockerode error (its JSON `message`), else the error's. */
export function daemonMessage(error: unknown): string {
  const json = (error as { json?: unknown })?.json;
  if (
    json && typeof json === "object" && typeof (json as { message?: unknown }).message === "string"
  ) {
    return (json as { message: string }).message.trim();
  }
  return error instanceof Error ? error.message : String(error);
}

/** Runs a daemon call whose "no such container" (404) or "not modified" (304) answer is fine. */
export async function ignoreGone(request: Promise<unknown>): Promise<void> {
  try {
    await request;
  } catch (error) {
    const status = statusCodeOf(error);
    // 304: already stopped; 404: already gone; 409: removal already in progress.
    if (status === 304 || status === 404 || status === 409) return;
    throw error;
  }
}
