/**
 * A backend's manifest as the runner asks it: in process for a built-in
 * backend, through a sandboxed host granted nothing for a third-party one.
 *
 * @module
 */

import {
  type AttemptSpec,
  type BackendCapabilities,
  type BackendManifest,
  configMessages,
  type DenoPermissions,
  type HostContext,
} from "../backend.ts";
import type { PluginHost } from "./_host_process.ts";

/** What the runner asks of a manifest, wherever it is evaluated. */
export interface ManifestAccess {
  readonly capabilities: BackendCapabilities;
  validate(config: Record<string, unknown>): Promise<string[]>;
  permissions(config: Record<string, unknown>, spec: AttemptSpec): Promise<DenoPermissions>;
  hostPermissions(context: HostContext): Promise<DenoPermissions>;
  /** The step config as this host runs it (see {@link BackendManifest.resolveConfig}). */
  resolve(config: Record<string, unknown>, context: HostContext): Record<string, unknown>;
}

/** A built-in manifest, evaluated in the runner's process (it is the runner's own code). */
export class LocalManifest implements ManifestAccess {
  // deno-lint-ignore no-explicit-any
  constructor(readonly manifest: BackendManifest<any>) {}

  get capabilities(): BackendCapabilities {
    return this.manifest.capabilities;
  }

  validate(config: Record<string, unknown>): Promise<string[]> {
    return Promise.resolve(configMessages(this.manifest.configSchema, config));
  }

  permissions(config: Record<string, unknown>, spec: AttemptSpec): Promise<DenoPermissions> {
    return Promise.resolve(this.manifest.permissions(config, spec));
  }

  hostPermissions(context: HostContext): Promise<DenoPermissions> {
    return Promise.resolve(this.manifest.hostPermissions(context));
  }

  resolve(config: Record<string, unknown>, context: HostContext): Record<string, unknown> {
    return this.manifest.resolveConfig?.(config, context) ?? config;
  }
}

/** A third-party manifest, evaluated in a host granted nothing. */
export class RemoteManifest implements ManifestAccess {
  constructor(readonly host: PluginHost, readonly capabilities: BackendCapabilities) {}

  validate(config: Record<string, unknown>): Promise<string[]> {
    return this.host.request("validate", { config });
  }

  permissions(config: Record<string, unknown>, spec: AttemptSpec): Promise<DenoPermissions> {
    return this.host.request("permissions", { config, spec });
  }

  hostPermissions(context: HostContext): Promise<DenoPermissions> {
    return this.host.request("hostPermissions", { context });
  }

  /** Third-party configs run as written (their settings are theirs to read at start). */
  resolve(config: Record<string, unknown>): Record<string, unknown> {
    return config;
  }
}
