/**
 * What both artifact engines do with bytes and records: copy while hashing,
 * write a buffer whole, order records.
 *
 * @module
 */

import { createHash } from "node:crypto";
import type { ArtifactRecord } from "./store.ts";

/** Read and write in 1 MiB chunks: large enough to run at disk speed. */
export const CHUNK_BYTES = 1 << 20;

/** Writes all of `bytes` (a file write may take only part of it). */
export async function writeAll(target: Deno.FsFile, bytes: Uint8Array): Promise<void> {
  let written = 0;
  while (written < bytes.length) written += await target.write(bytes.subarray(written));
}

/** Copies `source` into `target` (when given), hashing on the way; returns digest and size. */
export async function copyHashing(
  source: Deno.FsFile,
  target: Deno.FsFile | undefined,
): Promise<{ digest: string; size: number }> {
  const hash = createHash("sha256");
  const buffer = new Uint8Array(CHUNK_BYTES);
  let size = 0;
  for (;;) {
    const read = await source.read(buffer);
    if (read === null) break;
    const chunk = buffer.subarray(0, read);
    hash.update(chunk);
    size += read;
    if (target) await writeAll(target, chunk);
  }
  return { digest: `sha256:${hash.digest("hex")}`, size };
}

/** Record order of `list`: by run, then step, then name. */
export function compareRecords(a: ArtifactRecord, b: ArtifactRecord): number {
  const [x, y] = [[a.run, a.step, a.name], [b.run, b.step, b.name]];
  for (let i = 0; i < 3; i++) if (x[i] !== y[i]) return x[i] < y[i] ? -1 : 1;
  return 0;
}
