/**
 * Plans a run of a registered pipeline version with parameter values: what
 * `POST /api/pipelines/:name/trigger` and a fired schedule both start.
 *
 * @module
 */

import type { PipelineLimits } from "../../core/limits.ts";
import type { Plan } from "../../core/model.ts";
import type { Store } from "../../consensus/store.ts";
import { type BundleStorage, getBundle, type PipelineBundle } from "../bundle.ts";
import type { PipelineParser } from "./parse_worker.ts";
import { PipelineRegistryError, type PipelineVersion, versionToRun } from "./pipelines.ts";

/** What planning a registered pipeline needs of its server. */
export interface RegisteredPlanner {
  store: Store;
  parser: PipelineParser;
  secretNames?: () => Promise<string[]>;
  limits?: Partial<PipelineLimits>;
  /** Where shipped directories are kept. */
  bundles?: BundleStorage;
}

/** A planned run of a registered pipeline version. */
export interface RegisteredPlan {
  plan: Plan;
  version: PipelineVersion;
  bundle?: PipelineBundle;
}

/**
 * The plan of `name` (its current version, or `options.version`) with
 * `params`, its shipped directory read back from the store.
 *
 * @throws {PipelineRegistryError} for an unknown pipeline, version or a lost directory.
 * @throws {PipelineError} when the values do not fit the pipeline.
 */
export async function planRegistered(
  planner: RegisteredPlanner,
  name: string,
  options: { version?: number; params?: Record<string, unknown> } = {},
): Promise<RegisteredPlan> {
  const version = await versionToRun(planner.store, name, options.version);
  const bundle = version.bundle
    ? await getBundle(planner.store, version.bundle, planner.bundles)
    : undefined;
  if (version.bundle && !bundle) {
    throw new PipelineRegistryError(
      "conflict",
      `The shipped directory of "${name}" version ${version.version} is gone; apply it again`,
    );
  }
  const plan = await planner.parser.parse({
    source: version.source,
    file: version.file,
    baseDir: version.baseDir,
    bundle,
    secretNames: await planner.secretNames?.(),
    limits: planner.limits,
    params: options.params ?? {},
  });
  return { plan, version, ...(bundle ? { bundle } : {}) };
}
