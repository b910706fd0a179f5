/**
 * Local mode's step cache: a step with `cache: true` whose spec digest and
 * input digests match an earlier success is not run again; that success's
 * outputs are recorded for it instead.
 *
 * @module
 */

import type { ArtifactRef, FanInLocator, PlannedStep } from "../../core/model.ts";
import type { LocalState } from "./state.ts";
import { localKeys } from "./state.ts";
import { sha256Hex } from "../../core/_bytes.ts";
import { collectOutputs } from "../attempt/io.ts";

/** What the cache remembers of a success: where its outputs are recorded. */
interface CacheEntry {
  runId: string;
  stepId: string;
  outputs: Record<string, ArtifactRef>;
}

/** The cache key: the step's spec digest and the digests of everything it reads. */
export function cacheKeyOf(
  step: PlannedStep,
  inputs: Record<string, FanInLocator>,
  values: Record<string, string> = {},
): string {
  return sha256Hex(JSON.stringify([
    step.specDigest,
    Object.keys(inputs).sort().map((name) => [
      name,
      inputs[name].artifacts.map((artifact) => artifact.digest),
    ]),
    // The upstream values it reads (absent from the key of a step that reads none).
    ...(Object.keys(values).length > 0
      ? [Object.keys(values).sort().map((key) => [key, values[key]])]
      : []),
  ]));
}

/**
 * The outputs of a cached success, recorded again for this attempt (their
 * content verified on the way), or undefined for a miss. A cache entry
 * whose artifacts were garbage-collected or fail their integrity check is
 * a miss, never an error.
 */
export async function restoreFromCache(
  state: LocalState,
  cacheKey: string,
  attempt: { runId: string; stepId: string; attemptId: string; outputs: string[]; dir: string },
): Promise<Record<string, ArtifactRef> | undefined> {
  const kv = await state.store.get(localKeys.cache(cacheKey));
  if (!kv) return undefined;
  const entry = JSON.parse(kv.value) as CacheEntry;
  try {
    await Deno.mkdir(attempt.dir, { recursive: true });
    for (const name of Object.keys(entry.outputs)) {
      const record = await state.artifacts.get(entry.runId, entry.stepId, name);
      if (!record) return undefined;
      await state.artifacts.materialize(record, `${attempt.dir}/${name}`);
    }
    return await collectOutputs(state.artifacts, { ...attempt, outputsDir: attempt.dir });
  } catch {
    return undefined;
  } finally {
    await Deno.remove(attempt.dir, { recursive: true }).catch(() => {});
  }
}

/** Remembers a success under its cache key. */
export async function saveToCache(
  state: LocalState,
  cacheKey: string,
  entry: CacheEntry,
): Promise<void> {
  await state.store.put(localKeys.cache(cacheKey), JSON.stringify(entry));
}
