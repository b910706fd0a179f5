/**
 * Reading a pipeline file as text: a file (not a directory), within the
 * size limit, UTF-8 without NUL bytes. Every refusal is a located
 * `PipelineError`, like the problems found inside the file.
 *
 * @module
 */

import { PipelineError } from "./errors.ts";
import { MAX_PIPELINE_BYTES } from "./_yaml.ts";

/** The text of a pipeline file; throws `PipelineError` for an unreadable, large or binary one. */
export async function readPipelineText(path: string): Promise<string> {
  const problem = (code: string, message: string): never => {
    throw new PipelineError([{ code, message, file: path, line: 1, col: 1 }]);
  };
  let bytes: Uint8Array;
  try {
    const info = await Deno.stat(path);
    if (info.isDirectory) problem("unreadable", "expected a pipeline file, got a directory");
    // Checked before reading: the limit bounds the work, not only the parse.
    if (info.size > MAX_PIPELINE_BYTES) {
      problem("too_large", `expected a pipeline file of at most 5 MiB, got ${info.size} bytes`);
    }
    bytes = await Deno.readFile(path);
  } catch (error) {
    if (error instanceof PipelineError) throw error;
    const reason = error instanceof Deno.errors.NotFound
      ? "it does not exist"
      : (error as Error).message;
    return problem("unreadable", `cannot read the pipeline file: ${reason}`);
  }
  // The file may have grown between the stat and the read.
  if (bytes.length > MAX_PIPELINE_BYTES) {
    problem("too_large", `expected a pipeline file of at most 5 MiB, got ${bytes.length} bytes`);
  }
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    const nul = bytes.indexOf(0);
    return problem(
      nul >= 0 ? "binary" : "invalid_utf8",
      nul >= 0
        ? "expected a text file, found a NUL byte (is this a binary file?)"
        : "expected UTF-8 text, found an invalid byte sequence",
    );
  }
}
