import assert from "node:assert/strict";
import { sweepScratch } from "./mod.ts";

Deno.test("agent scratch: run directories untouched past the retention are swept, recent ones kept", async () => {
  const root = await Deno.makeTempDir({ prefix: "runnel_scratch_" });
  try {
    await Deno.mkdir(`${root}/old-run/step/1/out`, { recursive: true });
    await Deno.mkdir(`${root}/new-run/step/1/out`, { recursive: true });
    await Deno.writeTextFile(`${root}/stray-file`, "");
    const longAgo = new Date(Date.now() - 20 * 24 * 60 * 60 * 1000);
    await Deno.utime(`${root}/old-run`, longAgo, longAgo);
    const removed = await sweepScratch(root, 14 * 24 * 60 * 60 * 1000);
    assert.deepEqual(removed, ["old-run"]);
    const left = (await Array.fromAsync(Deno.readDir(root))).map((entry) => entry.name).sort();
    assert.deepEqual(left, ["new-run", "stray-file"]);
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});
