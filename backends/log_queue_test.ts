import assert from "node:assert/strict";
import { LogQueue } from "./log_queue.ts";

Deno.test("LogQueue: unread log past its memory budget waits on disk and comes back in order", async () => {
  const queue = new LogQueue({ memoryBytes: 64 * 1024 });
  const chunk = (i: number) => ({
    stream: i % 3 === 0 ? "stderr" as const : "stdout" as const,
    data: new Uint8Array(10_000).fill(i % 251),
  });
  const reader = queue[Symbol.asyncIterator]();
  let expected = 0;
  const readSome = async (count: number) => {
    for (let n = 0; n < count; n++) {
      const next = await reader.next();
      assert.equal(next.done, false);
      assert.equal(next.value.stream, chunk(expected).stream);
      assert.equal(next.value.data.length, 10_000);
      assert.equal(next.value.data[9_999], expected % 251);
      expected++;
    }
  };
  // 10 MB pushed with nobody reading: memory stays within the budget.
  for (let i = 0; i < 1_000; i++) {
    queue.push(chunk(i));
    assert.ok(queue.memoryBytes <= 64 * 1024, `${queue.memoryBytes} bytes in memory`);
  }
  await readSome(500);
  // Pushes while the spill is being read still come after it.
  for (let i = 1_000; i < 1_200; i++) queue.push(chunk(i));
  await readSome(700);
  // Drained: memory again, then close.
  queue.push(chunk(1_200));
  queue.close();
  await readSome(1);
  assert.equal((await reader.next()).done, true);
});

Deno.test("LogQueue: without a writable temporary directory it keeps chunks in memory", async () => {
  const queue = new LogQueue({ memoryBytes: 10, spillDir: "/nonexistent/dir" });
  for (let i = 0; i < 5; i++) queue.push({ stream: "stdout", data: new Uint8Array([i, i, i, i]) });
  queue.close();
  const seen = [];
  for await (const chunk of queue) seen.push(chunk.data[0]);
  assert.deepEqual(seen, [0, 1, 2, 3, 4]);
});

Deno.test("LogQueue: a queue that cannot spill says it is full, and room comes when the reader catches up", async () => {
  const queue = new LogQueue({ memoryBytes: 8, spillDir: "/nonexistent/dir" });
  queue.push({ stream: "stdout", data: new Uint8Array(4) });
  assert.equal(queue.full, false);
  queue.push({ stream: "stdout", data: new Uint8Array(4) });
  assert.equal(queue.full, true);
  let roomy = false;
  const room = queue.room().then(() => roomy = true);
  await Promise.resolve();
  assert.equal(roomy, false);
  const reader = queue[Symbol.asyncIterator]();
  await reader.next();
  await room;
  assert.equal(queue.full, false);
  // A reader that stops lets producers go on (nothing waits for it any more).
  queue.push({ stream: "stdout", data: new Uint8Array(8) });
  await reader.return!();
  assert.equal(queue.full, false);
});
