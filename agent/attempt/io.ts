/**
 * What every driver does around one attempt, whichever runs it (local mode
 * or a cluster agent): fetch its inputs from the artifact store, mask its
 * logs line by line, turn its exit into an `AttemptResult`, and put its
 * outputs into the store.
 *
 * @module
 */

import { MAX_VALUES_BYTES, parseValues, StepValuesError, VALUES_FILE } from "../../core/values.ts";
import { dirname } from "node:path";
import { ArtifactExistsError, type ArtifactStore } from "../../core/artifacts/store.ts";
import type { ArtifactRef, AttemptResult, ErrorClass } from "../../core/model.ts";
import { ERROR_CLASSES, SAFE_NAME_PATTERN } from "../../core/model.ts";
import type { Masker } from "../../core/secrets.ts";
import { fileSafe } from "../../core/_paths.ts";
import {
  classifyExit,
  type ExitStatus,
  type LogChunk,
  outputProblem,
} from "../../backends/backend.ts";
import type { ArtifactLocator, InputLocator } from "../../core/model.ts";

/** An input as a list of artifacts, and whether it is a fan-in (a directory of legs). */
export function inputArtifacts(
  locator: InputLocator,
): { fanIn: boolean; artifacts: ArtifactLocator[] } {
  if (Array.isArray(locator)) return { fanIn: true, artifacts: locator };
  if ("artifacts" in locator) return { fanIn: locator.fanIn, artifacts: locator.artifacts };
  return { fanIn: false, artifacts: [locator] };
}

/** An input's artifact is not in the store (or not with the expected digest). */
export class ArtifactMissingError extends Error {
  /** Stable error code. */
  readonly code = "artifact_missing";

  /** Builds the error from a full sentence. */
  constructor(message: string) {
    super(message);
    this.name = "ArtifactMissingError";
  }
}

/** A step ran but did not write a declared output as a regular file. */
export class StepOutputError extends Error {
  /** Stable error code. */
  readonly code = "output_missing";
  /** `application` for a missing output; `permission` for a link or a name that leaves. */
  readonly errorClass: ErrorClass;

  /** Builds the error from a full sentence. */
  constructor(message: string, errorClass: ErrorClass = "application") {
    super(message);
    this.name = "StepOutputError";
    this.errorClass = errorClass;
  }
}

/**
 * A name from a plan (an input, an artifact, a matrix leg) would make a
 * path outside its directory. Validation refuses such names; a plan that
 * reached an agent another way (the cluster stores plans as JSON) is not
 * trusted either.
 */
export class UnsafeNameError extends Error {
  /** Stable error code. */
  readonly code = "unsafe_name";
  /** Not retried: the same plan would ask again. */
  readonly errorClass = "permission";

  /** Builds the error from a full sentence. */
  constructor(message: string) {
    super(message);
    this.name = "UnsafeNameError";
  }
}

/**
 * `<dir>/<name>` for a name that stays in `dir`: one plain path segment
 * (no `/`, `\`, NUL, not empty, `.` or `..`); `what` names it in the error.
 */
export function childPath(dir: string, name: string, what: string): string {
  if (name === "" || name === "." || name === ".." || /[/\\\0]/.test(name)) {
    throw new UnsafeNameError(
      `Expected ${what} "${name}" to be a plain name; refusing a path that leaves ${dir}`,
    );
  }
  return `${dir}/${name}`;
}

/**
 * A fan-in leg's directory name before encoding; `.` and `..` (which no
 * validated plan makes: a leg is `key=value,…`) are refused by name.
 */
function legOf(artifact: { leg?: string; stepId: string }): string {
  const leg = artifact.leg ?? artifact.stepId;
  if (leg === "." || leg === "..") {
    throw new UnsafeNameError(`Expected fan-in leg name "${leg}" to be a plain name`);
  }
  return leg;
}

/** Checks a name against `SAFE_NAME_PATTERN` (what validation lets through). */
function safeName(name: string, what: string): string {
  if (!SAFE_NAME_PATTERN.test(name)) {
    throw new UnsafeNameError(
      `Expected ${what} "${name}" to match ${SAFE_NAME_PATTERN.source}; refusing to make a path of it`,
    );
  }
  return name;
}

/**
 * Copies every input's artifacts from the store into `inputsDir`, verifying
 * each digest: a plain input becomes `<inputsDir>/<input>/<file>`, a fan-in
 * `<inputsDir>/<input>/<leg>/<file>` (one directory per matrix leg). Returns
 * the path each input name maps to (the file, or the fan-in directory).
 */
export async function materializeInputs(
  store: ArtifactStore,
  inputs: Record<string, InputLocator>,
  inputsDir: string,
): Promise<Record<string, string>> {
  const paths: Record<string, string> = {};
  for (const [name, locator] of Object.entries(inputs)) {
    const { fanIn, artifacts } = inputArtifacts(locator);
    if (!fanIn && artifacts.length !== 1) {
      throw new ArtifactMissingError(
        `Expected one artifact for input "${name}", got ${artifacts.length}`,
      );
    }
    const dir = childPath(inputsDir, safeName(name, "input name"), "input name");
    await Deno.mkdir(dir, { recursive: true });
    for (const artifact of artifacts) {
      safeName(artifact.name, "artifact name");
      let record = await store.get(artifact.runId, artifact.stepId, artifact.name);
      if (!record || record.digest !== artifact.digest) {
        // The record may name another attempt's output (one that was given
        // up yet finished first): the accepted attempt's blob is what counts.
        if (!(await store.hasBlob(artifact.digest))) {
          throw new ArtifactMissingError(
            `Artifact "${artifact.name}" of step "${artifact.stepId}" (${artifact.digest}) ` +
              `is not in the artifact store`,
          );
        }
        record = {
          run: artifact.runId,
          step: artifact.stepId,
          name: artifact.name,
          digest: artifact.digest,
          size: artifact.size ?? record?.size ?? 0,
          contentType: record?.contentType ?? "application/octet-stream",
          created: record?.created ?? Date.now(),
          sourceStep: artifact.stepId,
        };
      }
      const legDir = fanIn ? childPath(dir, fileSafe(legOf(artifact)), "fan-in leg name") : dir;
      if (fanIn) await Deno.mkdir(legDir, { recursive: true });
      await store.materialize(record, childPath(legDir, artifact.name, "artifact name"));
    }
    paths[name] = fanIn ? dir : `${dir}/${artifacts[0].name}`;
  }
  return paths;
}

/** What {@link collectOutputs} needs to know of the attempt. */
export interface OutputsOf {
  runId: string;
  stepId: string;
  attemptId: string;
  outputsDir: string;
  outputs: string[];
}

/**
 * What a failed attempt wrote of its declared outputs, kept in the store
 * as `NAME.partial-ATTEMPT` (so never the name a later step reads): only
 * regular files, never through a link. Returns the names it kept.
 */
export async function keepPartialOutputs(
  store: ArtifactStore,
  attempt: OutputsOf,
): Promise<string[]> {
  const kept: string[] = [];
  if (attempt.outputs.length === 0) return kept;
  const number = attempt.attemptId.split("/").at(-1);
  // As for outputs: moved first (a rename follows nothing), then checked where no step reaches.
  const holding = await Deno.makeTempDir({ dir: dirname(attempt.outputsDir), prefix: ".partial-" });
  try {
    for (const name of attempt.outputs) {
      const file = childPath(holding, name, "output name");
      try {
        await Deno.rename(childPath(attempt.outputsDir, name, "output name"), file);
      } catch {
        continue; // not written
      }
      if (!(await Deno.lstat(file)).isFile) continue;
      const partial = `${name}.partial-${number}`;
      await store.put(file, {
        run: attempt.runId,
        step: attempt.stepId,
        name: partial,
        attemptId: attempt.attemptId,
      }).catch((error) => {
        if (!(error instanceof ArtifactExistsError)) throw error;
      });
      kept.push(partial);
    }
  } finally {
    await Deno.remove(holding, { recursive: true }).catch(() => {});
  }
  return kept;
}

/**
 * The values a step published in its outputs directory (`$RUNNEL_VALUES`),
 * or undefined when it wrote none. The file is taken only as a regular
 * file of at most {@link MAX_VALUES_BYTES}, never through a link.
 *
 * @throws {StepValuesError} for a file that is not one, too large, or not `NAME=value` lines.
 */
export async function readStepValues(
  outputsDir: string,
): Promise<Record<string, string> | undefined> {
  const path = `${outputsDir}/${VALUES_FILE}`;
  let info: Deno.FileInfo;
  try {
    // Synchronous: asked after every attempt, and mostly not there.
    info = Deno.lstatSync(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return undefined;
    throw error;
  }
  if (!info.isFile) throw new StepValuesError("Expected $RUNNEL_VALUES to be a regular file");
  if (info.size > MAX_VALUES_BYTES) {
    throw new StepValuesError(
      `Expected at most ${MAX_VALUES_BYTES} bytes of values in $RUNNEL_VALUES`,
    );
  }
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(await Deno.readFile(path));
  } catch (error) {
    if (error instanceof TypeError) throw new StepValuesError("Expected $RUNNEL_VALUES in UTF-8");
    throw error;
  }
  return parseValues(text);
}

/**
 * Puts every declared output of a finished attempt into the store; their
 * references by name. Each must be a regular file (see `outputProblem`):
 * a symbolic link is refused, never followed. To read exactly the file
 * that was checked, each output is first moved (renamed, which follows
 * nothing) into a directory beside `outputsDir` that no step can reach,
 * and checked again there: a process of the step still writing cannot swap
 * a link in between.
 */
export async function collectOutputs(
  store: ArtifactStore,
  attempt: OutputsOf,
): Promise<Record<string, ArtifactRef>> {
  const outputs: Record<string, ArtifactRef> = {};
  if (attempt.outputs.length === 0) return outputs;
  for (const name of attempt.outputs) {
    const problem = await outputProblem(attempt.outputsDir, name);
    if (problem) throw new StepOutputError(problem.message, problem.errorClass);
  }
  const holding = await Deno.makeTempDir({
    dir: dirname(attempt.outputsDir),
    prefix: ".collecting-",
  });
  try {
    for (const name of attempt.outputs) {
      const file = childPath(holding, name, "output name");
      await Deno.rename(childPath(attempt.outputsDir, name, "output name"), file);
      const info = await Deno.lstat(file);
      if (!info.isFile) {
        throw new StepOutputError(
          `declared output "${name}" changed into something else than a regular file ` +
            "while it was collected",
          "permission",
        );
      }
      try {
        const record = await store.put(file, {
          run: attempt.runId,
          step: attempt.stepId,
          name,
          attemptId: attempt.attemptId,
        });
        outputs[name] = { name, digest: record.digest, size: record.size };
      } catch (error) {
        if (!(error instanceof ArtifactExistsError)) throw error;
        // An earlier attempt of the step, given up (its worker was declared
        // offline) but finished after all, recorded this name first with other
        // content. Records are immutable; the blob of this attempt is stored
        // (blobs go in before records), and readers fetch by digest.
        outputs[name] = { name, digest: error.digest, size: info.size };
      }
    }
  } finally {
    await Deno.remove(holding, { recursive: true }).catch(() => {});
  }
  return outputs;
}

/**
 * The failure an exit status amounts to, or undefined for a success. The
 * class comes from the backends' one {@link classifyExit} (a third-party
 * backend may leave it to us); the message goes through `masker`, since a
 * backend may quote the step's output.
 */
export function failureOf(exit: ExitStatus, masker: Masker): AttemptResult | undefined {
  const classified = classifyExit(exit);
  if (classified.errorClass === undefined) return undefined;
  return {
    ok: false,
    errorClass: classified.errorClass,
    exitCode: classified.exitCode,
    // A backend's own sentence wins over the generic one.
    message: masker.mask(
      exit.message ?? classified.message ?? `step exited with code ${classified.exitCode}`,
    ),
    ...(classified.usage ? { usage: classified.usage } : {}),
  };
}

/** The error class of something thrown while preparing, starting or finishing an attempt. */
export function errorClassOf(error: unknown): ErrorClass {
  const declared = (error as { errorClass?: string })?.errorClass;
  if (ERROR_CLASSES.includes(declared as ErrorClass)) return declared as ErrorClass;
  const code = (error as { code?: string })?.code;
  if (code === "invalid_step_config") return "application";
  if (code === "artifact_corrupt" || code === "artifact_missing") return "artifact";
  if (code === "output_missing") return "application";
  return "infrastructure";
}

/** A masked piece of an attempt's output: whole lines, except at the very end. */
export interface MaskedText {
  stream: "stdout" | "stderr";
  text: string;
}

/**
 * An attempt's output, decoded and masked. Per stream, text passes on in
 * whole lines; a line (or lines) that may still turn out to hold a secret
 * split across chunks, a multi-line one too, is held back until it is
 * decided (see `Masker.stream`).
 */
export async function* maskedLogs(
  logs: AsyncIterable<LogChunk>,
  masker: Masker,
): AsyncGenerator<MaskedText> {
  const decoders = { stdout: new TextDecoder(), stderr: new TextDecoder() };
  const masking = {
    stdout: masker.stream({ wholeLines: true }),
    stderr: masker.stream({ wholeLines: true }),
  };
  for await (const chunk of logs) {
    const text = decoders[chunk.stream].decode(chunk.data, { stream: true });
    const decided = masking[chunk.stream].push(text);
    if (decided) yield { stream: chunk.stream, text: decided };
  }
  for (const stream of ["stdout", "stderr"] as const) {
    const rest = masking[stream].push(decoders[stream].decode()) + masking[stream].end();
    if (rest) yield { stream, text: rest };
  }
}
