import assert from "node:assert/strict";
import type { AgentMessageInit, ServerConnection } from "../../proto/mod.ts";
import { DROPPED_LOG_MARKER, SendQueue } from "./send_queue.ts";
import { MAX_LOG_BACKLOG_CHARS } from "./options.ts";

/** A stream that records what is sent; `up: false` refuses every send. */
function fakeStream(up = true): ServerConnection & { sent: AgentMessageInit[] } {
  const sent: AgentMessageInit[] = [];
  return {
    sent,
    send: (message: AgentMessageInit) => Promise.resolve(up && !!sent.push(message)),
  } as
    & ServerConnection
    & { sent: AgentMessageInit[] };
}

/** Lets the pump finish: its sends resolve at once, so every step of it is a microtask, all run before the next macrotask. */
const settle = () => new Promise((resolve) => setTimeout(resolve, 0));

Deno.test("send queue: in order once attached; unacknowledged results first; results go again after a break", async () => {
  const queue = new SendQueue((error) => {
    throw error;
  });
  queue.push({ log: { attemptId: "a/1", stream: "stdout", text: "hi\n" } });
  const result = { attemptId: "a/1", resultJson: "{}", atMs: 1 };
  queue.push({ result });
  const first = fakeStream();
  queue.attach(first, [result, { attemptId: "b/1", resultJson: "{}", atMs: 0 }]);
  await settle();
  assert.deepEqual(first.sent.map((m) => Object.keys(m)[0]), ["log", "result", "result"]);
  assert.equal(("result" in first.sent[2]) && first.sent[2].result.attemptId, "b/1");

  queue.detach();
  queue.push({ result: { attemptId: "c/1", resultJson: "{}", atMs: 2 } });
  queue.detach(); // broken again before any Welcome: the queued result is dropped…
  const second = fakeStream();
  queue.attach(second, [{ attemptId: "c/1", resultJson: "{}", atMs: 2 }]); // …and resent from the outbox
  await settle();
  assert.deepEqual(second.sent.map((m) => "result" in m && m.result.attemptId), ["c/1"]);
});

Deno.test("send queue: output past the backlog while disconnected is dropped with one marker line", async () => {
  const queue = new SendQueue((error) => {
    throw error;
  });
  const chunk = "x".repeat(MAX_LOG_BACKLOG_CHARS / 2);
  for (let i = 0; i < 4; i++) {
    queue.push({ log: { attemptId: "a/1", stream: "stdout", text: chunk } });
  }
  const stream = fakeStream();
  queue.attach(stream, []);
  await settle();
  const texts = stream.sent.map((m) => "log" in m ? m.log.text : "");
  assert.equal(texts.length, 3, "two chunks kept, then the marker");
  assert.equal(texts[2], DROPPED_LOG_MARKER);
});
