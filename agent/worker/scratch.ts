/**
 * The sweep of an agent's scratch space.
 *
 * @module
 */

/**
 * Removes the scratch directories of runs (`<scratch>/<run>`) not modified
 * within `retentionMs`: what failed attempts left for inspection. Returns
 * the names removed.
 */
export async function sweepScratch(scratchRoot: string, retentionMs: number): Promise<string[]> {
  const removed: string[] = [];
  const cutoff = Date.now() - retentionMs;
  for await (const entry of Deno.readDir(scratchRoot)) {
    if (!entry.isDirectory) continue;
    const path = `${scratchRoot}/${entry.name}`;
    try {
      const info = await Deno.stat(path);
      if ((info.mtime?.getTime() ?? Date.now()) >= cutoff) continue;
      await Deno.remove(path, { recursive: true });
      removed.push(entry.name);
    } catch {
      // Gone already, or not ours to remove: the next start tries again.
    }
  }
  return removed;
}
