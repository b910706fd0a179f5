import assert from "node:assert/strict";
import { openLocalArtifactStore } from "../../core/artifacts/local.ts";
import { collectOutputs, materializeInputs } from "./io.ts";

Deno.test("a given-up attempt that recorded an output first does not block or shadow the accepted one", async () => {
  const dir = await Deno.makeTempDir({ prefix: "runnel_attempt_" });
  try {
    const store = openLocalArtifactStore(`${dir}/artifacts`);
    const write = async (attempt: number, text: string) => {
      const outputsDir = `${dir}/out-${attempt}`;
      await Deno.mkdir(outputsDir);
      await Deno.writeTextFile(`${outputsDir}/result.txt`, text);
      return await collectOutputs(store, {
        runId: "r1",
        stepId: "make",
        attemptId: `r1/make/${attempt}`,
        outputsDir,
        outputs: ["result.txt"],
      });
    };
    // Attempt 1 was declared lost, but its worker finished and recorded first.
    const lost = await write(1, "from the lost attempt\n");
    const accepted = await write(2, "from the accepted attempt\n");
    assert.notEqual(accepted["result.txt"].digest, lost["result.txt"].digest);
    const ref = accepted["result.txt"];
    const paths = await materializeInputs(store, {
      input: {
        runId: "r1",
        stepId: "make",
        name: "result.txt",
        digest: ref.digest,
        size: ref.size,
      },
    }, `${dir}/in`);
    assert.equal(await Deno.readTextFile(paths.input), "from the accepted attempt\n");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
