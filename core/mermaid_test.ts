import assert from "node:assert/strict";
import { parsePipeline } from "./load.ts";
import { renderMermaid } from "./mermaid.ts";

Deno.test("mermaid flowchart with status classes", () => {
  const plan = parsePipeline(
    "name: m\nsteps:\n  a: { run: 'true', matrix: { os: [linux, mac] } }\n  b: { run: 'true', needs: a }\n",
    { file: "m.yaml", baseDir: "/" },
  );
  const text = renderMermaid(plan, { "a[os=linux]": "succeeded", "a[os=mac]": "failed" });
  assert.match(text, /^flowchart TD\n/);
  assert.match(text, /s0\["a\[os=linux\]<br\/><small>shell<\/small>"\]/);
  assert.match(text, /s0 --> s2/);
  assert.match(text, /s1 --> s2/);
  assert.match(text, /class s1 failed/);
  assert.match(text, /class s2 pending/);
  assert.match(text, /classDef succeeded fill:/);
  assert.doesNotMatch(renderMermaid(plan), /class /);
});
