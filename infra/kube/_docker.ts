/**
 * The few Docker Engine API calls the stand-in's kubelet makes, over the
 * engine's unix socket with Deno's own `fetch`.
 *
 * @module
 */

/** Host name of request URLs (the socket is what is dialled; Deno checks `--allow-net=docker:80`). */
const HOST = "docker";
/** Engine API version asked for (Docker 20.10 and later speak it). */
const API = "v1.41";

/** `POST /containers/create`, as far as the kubelet sets it. */
export interface CreateContainer {
  Image: string;
  Entrypoint?: string[] | null;
  Cmd?: string[] | null;
  Env?: string[];
  WorkingDir?: string;
  User?: string;
  Labels?: Record<string, string>;
  HostConfig: {
    NetworkMode?: string;
    Mounts?: Array<{ Type: "bind"; Source: string; Target: string; ReadOnly?: boolean }>;
    Memory?: number;
    MemorySwap?: number;
    NanoCpus?: number;
  };
}

/** `GET /containers/{id}/json`, the fields read here. */
export interface ContainerState {
  State: {
    Running: boolean;
    ExitCode: number;
    OOMKilled: boolean;
    StartedAt: string;
    FinishedAt: string;
    Error: string;
  };
}

/** An error answer of the engine. */
export class DockerError extends Error {
  readonly status: number;
  constructor(status: number, message: string) {
    super(message);
    this.name = "DockerError";
    this.status = status;
  }
}

/** A client of one Docker engine. */
export class DockerEngine {
  readonly #client: Deno.HttpClient;

  constructor(socket = "/var/run/docker.sock") {
    this.#client = Deno.createHttpClient({ proxy: { transport: "unix", path: socket } });
  }

  async #call(method: string, path: string, body?: unknown, signal?: AbortSignal) {
    const response = await fetch(`http://${HOST}/${API}${path}`, {
      method,
      client: this.#client,
      headers: body === undefined ? {} : { "content-type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
    if (!response.ok) {
      const text = await response.text();
      let message = text;
      try {
        message = JSON.parse(text).message ?? text;
      } catch { /* plain text */ }
      throw new DockerError(response.status, message.trim());
    }
    return response;
  }

  /** Whether an image with this reference is present locally. */
  async hasImage(reference: string): Promise<boolean> {
    try {
      await (await this.#call("GET", `/images/${encodeURIComponent(reference)}/json`)).body
        ?.cancel();
      return true;
    } catch (error) {
      if (error instanceof DockerError && error.status === 404) return false;
      throw error;
    }
  }

  /** Creates a container; returns its id. */
  async create(name: string, options: CreateContainer): Promise<string> {
    const response = await this.#call(
      "POST",
      `/containers/create?name=${encodeURIComponent(name)}`,
      options,
    );
    return (await response.json()).Id;
  }

  async start(id: string): Promise<void> {
    await (await this.#call("POST", `/containers/${id}/start`)).body?.cancel();
  }

  /** Waits for the container to stop (reads the whole answer). */
  async waitExit(id: string): Promise<number> {
    const response = await this.#call("POST", `/containers/${id}/wait`);
    return (await response.json()).StatusCode;
  }

  async inspect(id: string): Promise<ContainerState> {
    return await (await this.#call("GET", `/containers/${id}/json`)).json();
  }

  /** `docker stop -t`: SIGTERM, then SIGKILL after `seconds`. */
  async stop(id: string, seconds: number): Promise<void> {
    try {
      await (await this.#call("POST", `/containers/${id}/stop?t=${seconds}`)).body?.cancel();
    } catch (error) {
      if (!(error instanceof DockerError && (error.status === 304 || error.status === 404))) {
        throw error;
      }
    }
  }

  async remove(id: string): Promise<void> {
    try {
      await (await this.#call("DELETE", `/containers/${id}?force=true&v=true`)).body?.cancel();
    } catch (error) {
      if (!(error instanceof DockerError && error.status === 404)) throw error;
    }
  }

  /** Ids of the containers carrying `label` (`key=value`), running or not. */
  async containersLabelled(label: string): Promise<string[]> {
    const filters = encodeURIComponent(JSON.stringify({ label: [label] }));
    const response = await this.#call("GET", `/containers/json?all=true&filters=${filters}`);
    return ((await response.json()) as Array<{ Id: string }>).map((container) => container.Id);
  }

  /**
   * The container's output, both streams merged as the kubelet's log file
   * has them, demultiplexed from the engine's framing.
   */
  async logs(
    id: string,
    options: { follow: boolean; timestamps: boolean; since?: number; signal?: AbortSignal },
  ): Promise<ReadableStream<Uint8Array>> {
    const query = new URLSearchParams({
      stdout: "1",
      stderr: "1",
      follow: options.follow ? "1" : "0",
      timestamps: options.timestamps ? "1" : "0",
    });
    if (options.since !== undefined) query.set("since", options.since.toFixed(9));
    const response = await this.#call(
      "GET",
      `/containers/${id}/logs?${query}`,
      undefined,
      options.signal,
    );
    return response.body!.pipeThrough(demultiplex());
  }

  close(): void {
    this.#client.close();
  }
}

/** Strips the engine's 8-byte frame headers (stream type, length) from a non-TTY log stream. */
function demultiplex(): TransformStream<Uint8Array, Uint8Array> {
  let buffer = new Uint8Array(0);
  return new TransformStream({
    transform(chunk, controller) {
      const joined = new Uint8Array(buffer.length + chunk.length);
      joined.set(buffer);
      joined.set(chunk, buffer.length);
      let offset = 0;
      while (joined.length - offset >= 8) {
        const size = new DataView(joined.buffer, joined.byteOffset + offset + 4, 4).getUint32(0);
        if (joined.length - offset - 8 < size) break;
        controller.enqueue(joined.slice(offset + 8, offset + 8 + size));
        offset += 8 + size;
      }
      buffer = joined.slice(offset);
    },
  });
}
