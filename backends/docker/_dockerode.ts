/**
 * The part of dockerode (and tar-stream) this backend uses, typed here.
 *
 * Neither package ships types, and `@types/dockerode` is not used on
 * purpose: through `@types/ssh2` it brings `@types/node@18`, which then
 * replaces Deno's own Node types for the whole program (`node:sqlite`
 * disappears, for one). The interfaces below describe the Docker Engine API
 * answers as far as this backend reads them.
 *
 * @module
 */

import Dockerode from "npm:dockerode@5.0.1";
import tarStream from "npm:tar-stream@2.2.0";

/** A bind mount of the create request. */
export interface MountSettings {
  Type: "bind";
  Source: string;
  Target: string;
  ReadOnly?: boolean;
}

/** `HostConfig` of the create request, as far as it is set here. */
export interface HostConfig {
  Mounts?: MountSettings[];
  NetworkMode?: string;
  AutoRemove?: boolean;
  Init?: boolean;
  Memory?: number;
  MemorySwap?: number;
  NanoCpus?: number;
}

/** The create request (`POST /containers/create`), as far as it is set here. */
export interface ContainerCreateOptions {
  name?: string;
  Image: string;
  Entrypoint?: string[];
  Cmd?: string[];
  Env?: string[];
  Labels?: Record<string, string>;
  WorkingDir?: string;
  User?: string;
  Tty?: boolean;
  OpenStdin?: boolean;
  AttachStdin?: boolean;
  AttachStdout?: boolean;
  AttachStderr?: boolean;
  HostConfig?: HostConfig;
  /** The networks joined at creation, with the DNS aliases on each. */
  NetworkingConfig?: { EndpointsConfig: Record<string, { Aliases?: string[] }> };
}

/** The network create request (`POST /networks/create`), as far as it is set here. */
export interface NetworkCreateOptions {
  Name: string;
  Driver: "bridge";
  /** No route out of the network: its containers reach each other only. */
  Internal: boolean;
  /** Refuse a second network of the same name (older daemons allow it otherwise). */
  CheckDuplicate: boolean;
  /** Driver options (`com.docker.network.bridge.inhibit_ipv4`). */
  Options?: Record<string, string>;
  Labels: Record<string, string>;
}

/** One entry of `GET /networks`. */
export interface NetworkSummary {
  Id: string;
  Name: string;
  Labels: Record<string, string> | null;
}

/** A network handle. */
export interface Network {
  readonly id: string;
  inspect(): Promise<{
    Name: string;
    Internal: boolean;
    Options?: Record<string, string> | null;
    Labels: Record<string, string> | null;
    Containers?: Record<string, unknown> | null;
  }>;
  disconnect(options: { Container: string; Force: boolean }): Promise<unknown>;
  remove(): Promise<unknown>;
}

/** `GET /containers/{id}/json`, the fields read here. */
export interface ContainerInspectInfo {
  Id: string;
  State: { Running: boolean; ExitCode: number; OOMKilled: boolean; Status: string };
  Config: { Labels: Record<string, string> | null; Env: string[] | null };
  HostConfig: { Memory?: number; AutoRemove?: boolean; NetworkMode?: string };
  Mounts: Array<{ Source: string; Destination: string; RW: boolean }> | null;
  NetworkSettings?: { Networks?: Record<string, { IPAddress?: string }> | null };
}

/** One entry of `GET /containers/json`. */
export interface ContainerSummary {
  Id: string;
  Labels: Record<string, string> | null;
  State: string;
}

/** A stream dockerode hands back (a Node readable); `destroy` ends it early. */
export type DockerStream = NodeJS.ReadableStream & { destroy?: (error?: Error) => void };

/** A container handle (no request is made until a method is called). */
export interface Container {
  readonly id: string;
  attach(options: { stream: true; stdout: boolean; stderr: boolean }): Promise<DockerStream>;
  start(): Promise<unknown>;
  wait(options?: { condition?: "not-running" | "next-exit" | "removed" }): Promise<
    { StatusCode: number }
  >;
  inspect(): Promise<ContainerInspectInfo>;
  stop(options?: { t?: number }): Promise<unknown>;
  kill(options?: { signal?: string }): Promise<unknown>;
  remove(options?: { force?: boolean; v?: boolean }): Promise<unknown>;
  stats(options: { stream: true }): Promise<DockerStream>;
  logs(
    options: { stdout: boolean; stderr: boolean; follow: false; tail?: number },
  ): Promise<Uint8Array>;
}

/** An image handle. */
export interface Image {
  inspect(): Promise<unknown>;
  remove(options?: { force?: boolean }): Promise<unknown>;
}

/** Options of `POST /build` this backend passes. */
export interface ImageBuildOptions {
  t: string;
  dockerfile: string;
  /** `"1"`: the classic builder. */
  version: "1" | "2";
  rm?: boolean;
  forcerm?: boolean;
}

/** The daemon client. */
export interface Docker {
  version(): Promise<{ Version: string; Os: string; Arch: string; ApiVersion: string }>;
  getContainer(id: string): Container;
  getImage(name: string): Image;
  createContainer(options: ContainerCreateOptions): Promise<Container>;
  listContainers(
    options: { all?: boolean; filters?: Record<string, string[]> },
  ): Promise<ContainerSummary[]>;
  createNetwork(options: NetworkCreateOptions): Promise<Network>;
  getNetwork(id: string): Network;
  listNetworks(options: { filters: Record<string, string[]> }): Promise<NetworkSummary[]>;
  buildImage(context: NodeJS.ReadableStream, options: ImageBuildOptions): Promise<DockerStream>;
  modem: {
    /** Splits a multiplexed (non-TTY) stream into its stdout and stderr payloads. */
    demuxStream(
      stream: NodeJS.ReadableStream,
      stdout: NodeJS.WritableStream,
      stderr: NodeJS.WritableStream,
    ): void;
  };
}

/** Where the daemon listens. */
export type DockerConnection =
  | { socketPath: string }
  | { host: string; port: number; protocol: "http" };

/** A client of the daemon at `connection`. */
export function connectDocker(connection: DockerConnection): Docker {
  return new Dockerode(connection) as Docker;
}

/** One entry of a tar archive. */
export interface TarHeader {
  name: string;
  mode?: number;
  mtime?: Date;
  uid?: number;
  gid?: number;
  type?: "file" | "directory" | "symlink";
  linkname?: string;
}

/** A tar archive being written: entries in, archive bytes out (a Node readable). */
export interface TarPack extends NodeJS.ReadableStream {
  entry(header: TarHeader, data?: string | Uint8Array): void;
  finalize(): void;
  destroy(error?: Error): void;
}

/** Starts a tar archive. */
export function tarPack(): TarPack {
  return tarStream.pack() as TarPack;
}
