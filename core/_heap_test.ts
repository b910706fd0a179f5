import assert from "node:assert/strict";
import { MinHeap } from "./_heap.ts";
import { mulberry32, testSeed } from "./_random.ts";

const SEED = testSeed();

Deno.test(`MinHeap pops random pushes in sorted order, with repeats (RUNNEL_SEED=${SEED})`, () => {
  const random = mulberry32(SEED);
  for (let round = 0; round < 50; round++) {
    const heap = new MinHeap<number>((a, b) => a < b);
    const kept: number[] = [];
    const popped: number[] = [];
    for (let i = 0; i < 200; i++) {
      // Pops between pushes, so items sift down from every depth.
      if (heap.size > 0 && random() < 0.3) {
        const least = Math.min(...kept);
        assert.equal(heap.peek(), least, `seed ${SEED}`);
        popped.push(heap.pop()!);
        kept.splice(kept.indexOf(least), 1);
      }
      const item = Math.floor(random() * 50);
      heap.push(item);
      kept.push(item);
    }
    const drained: number[] = [];
    while (heap.size > 0) drained.push(heap.pop()!);
    assert.deepEqual(drained, [...kept].sort((a, b) => a - b), `seed ${SEED}`);
    popped.push(...drained);
    assert.equal(heap.pop(), undefined);
    assert.equal(popped.length, 200, `seed ${SEED}`);
  }
});

Deno.test("MinHeap keeps items of equal rank apart by their own order", () => {
  const heap = new MinHeap<{ at: number; name: string }>((a, b) =>
    a.at < b.at || (a.at === b.at && a.name < b.name)
  );
  for (const name of ["d", "b", "a", "c"]) heap.push({ at: 1, name });
  heap.push({ at: 0, name: "z" });
  const order: string[] = [];
  while (heap.size > 0) order.push(heap.pop()!.name);
  assert.deepEqual(order, ["z", "a", "b", "c", "d"]);
});
