import assert from "node:assert/strict";
import { EventEmitter } from "node:events";
import type { AgentMessage, ServerMessageInit } from "./messages.ts";
import { GrpcMessageStream, type StreamEnd } from "./stream.ts";

/** A server-side grpc-js call whose every write meets back-pressure. */
class CongestedCall extends EventEmitter {
  written = 0;

  write(): boolean {
    this.written++;
    return false;
  }

  end(): void {}
}

Deno.test("a send that waited out back-pressure leaves nothing on the stream's close", async () => {
  const call = new CongestedCall();
  const stream = new GrpcMessageStream<AgentMessage, ServerMessageInit>(call, "server", "peer");
  // `closed` lives as long as the stream: count what subscribes to it.
  const closed = stream.closed;
  let subscriptions = 0;
  Object.defineProperty(stream, "closed", {
    value: {
      then: (...args: Parameters<Promise<StreamEnd>["then"]>) => {
        subscriptions++;
        return closed.then(...args);
      },
    },
  });
  const ack = { ack: { attemptId: "r/a/1", accepted: true, message: "recorded" } };
  for (let i = 0; i < 100; i++) {
    const sent = stream.send(ack);
    call.emit("drain");
    assert.equal(await sent, true);
  }
  assert.equal(call.written, 100);
  assert.equal(call.listenerCount("drain"), 0);
  assert.equal(subscriptions, 0);
  // One still waiting when the stream ends hears of it.
  const last = stream.send(ack);
  call.emit("finish");
  assert.equal(await last, false);
  assert.equal(call.listenerCount("drain"), 0);
  assert.equal(await stream.send(ack), false);
  assert.deepEqual(await closed, { ok: true, code: 0, reason: "OK" });
});
