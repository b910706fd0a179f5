import assert from "node:assert/strict";
import { layoutDag, NODE_HEIGHT, NODE_WIDTH } from "./layout.ts";
import type { StepView } from "./model.ts";

function step(id: string, needs: string[] = [], name = id): StepView {
  return { id, name, backend: "shell", needs };
}

Deno.test("layout: a diamond takes three layers, its middle two boxes one above the other", () => {
  const layout = layoutDag([
    step("a"),
    step("b", ["a"]),
    step("c", ["a"]),
    step("d", ["b", "c"]),
  ]);
  const at = Object.fromEntries(layout.nodes.map((node) => [node.id, node]));
  assert.deepEqual([at.a.layer, at.b.layer, at.c.layer, at.d.layer], [0, 1, 1, 2]);
  assert.equal(at.b.x, at.c.x);
  assert.ok(Math.abs(at.b.y - at.c.y) >= NODE_HEIGHT, "b and c do not overlap");
  // The join sits level with what it joins, as the source does.
  assert.equal(at.a.y, at.d.y);
  assert.equal(layout.edges.length, 4);
  assert.ok(layout.width >= 3 * NODE_WIDTH);
});

Deno.test("layout: matrix legs are one box with their count, and a long edge skips layers", () => {
  const layout = layoutDag([
    step("gen"),
    step("fan[n=1]", ["gen"], "fan"),
    step("fan[n=2]", ["gen"], "fan"),
    step("join", ["fan[n=1]", "fan[n=2]", "gen"]),
  ]);
  assert.deepEqual(layout.nodes.map((node) => [node.id, node.count, node.layer]), [
    ["gen", 1, 0],
    ["fan", 2, 1],
    ["join", 1, 2],
  ]);
  assert.deepEqual(layout.edges.map((edge) => `${edge.from}>${edge.to}`).sort(), [
    "fan>join",
    "gen>fan",
    "gen>join",
  ]);
});

Deno.test("layout: boxes never overlap and the result is the same every time", () => {
  let seed = 7;
  const random = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
  const steps: StepView[] = [];
  for (let i = 0; i < 300; i++) {
    const needs = i === 0
      ? []
      : Array.from({ length: 1 + Math.floor(random() * 3) }, () => `s${Math.floor(random() * i)}`);
    steps.push(step(`s${i}`, [...new Set(needs)]));
  }
  const layout = layoutDag(steps);
  assert.deepEqual(layoutDag(steps), layout);
  const seen = new Set<string>();
  for (const node of layout.nodes) {
    const key = `${node.x},${node.y}`;
    assert.ok(!seen.has(key), `two boxes at ${key}`);
    seen.add(key);
    assert.ok(node.x + NODE_WIDTH <= layout.width && node.y + NODE_HEIGHT <= layout.height);
  }
  const layerOf = new Map(layout.nodes.map((node) => [node.id, node.layer]));
  for (const edge of layout.edges) assert.ok(layerOf.get(edge.from)! < layerOf.get(edge.to)!);
});
