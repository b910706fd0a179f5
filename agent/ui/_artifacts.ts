/**
 * An artifact's bytes for a download, from either mode's artifact store.
 *
 * @module
 */

import type { ArtifactStore } from "../../core/artifacts/store.ts";
import { type ArtifactDownload, UiNotFoundError } from "./model.ts";

/**
 * Reads an artifact for a download: the store copies it to a temporary
 * file verifying its digest on the way (the one read the interface has), so
 * a blob that does not match its record is refused before a byte is
 * served; the file is removed once the download ends.
 */
export async function readArtifact(
  store: ArtifactStore,
  where: { run: string; step: string; name: string },
): Promise<ArtifactDownload> {
  const record = await store.get(where.run, where.step, where.name);
  if (!record) {
    throw new UiNotFoundError(
      `Run ${where.run} has no artifact "${where.name}" of step "${where.step}"`,
    );
  }
  const dir = await Deno.makeTempDir({ prefix: "runnel-download-" });
  const path = `${dir}/blob`;
  const removeDir = () => Deno.remove(dir, { recursive: true }).catch(() => {});
  try {
    await store.materialize(record, path);
  } catch (error) {
    await removeDir();
    throw error;
  }
  const file = await Deno.open(path, { read: true });
  const reader = file.readable.getReader();
  // Removed when the download ends, whether read to the end or cancelled.
  const body = new ReadableStream<Uint8Array>({
    async pull(controller) {
      const { done, value } = await reader.read();
      if (done) {
        controller.close();
        await removeDir();
      } else {
        controller.enqueue(value);
      }
    },
    async cancel(reason) {
      await reader.cancel(reason).catch(() => {});
      await removeDir();
    },
  });
  return { name: record.name, digest: record.digest, size: record.size, body };
}
