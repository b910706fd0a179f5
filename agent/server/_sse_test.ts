import assert from "node:assert/strict";
import { sseResponse } from "./_sse.ts";

Deno.test("sse: a client gone before the answer was made stops the producer at once", async () => {
  const gone = new AbortController();
  gone.abort();
  let stopped: boolean | undefined;
  const response = sseResponse(gone.signal, async (_send, stop) => {
    // Waits for the client to go, as a watch of the store does.
    await new Promise<void>((resolve) => {
      if (stop.aborted) return resolve();
      stop.addEventListener("abort", () => resolve(), { once: true });
    });
    stopped = stop.aborted;
  });
  // The body ends once the producer has returned; it sends no `end` after a stop.
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<string>((resolve) => timer = setTimeout(resolve, 10_000, "still open"));
  try {
    assert.equal(await Promise.race([response.text(), late]), "");
  } finally {
    clearTimeout(timer);
  }
  assert.equal(stopped, true);
});

Deno.test("sse: events, then an end once the producer returns", async () => {
  const response = sseResponse(new AbortController().signal, (send) => {
    send("step", { id: "a" });
    return Promise.resolve();
  });
  assert.equal(response.headers.get("content-type"), "text/event-stream");
  assert.equal(
    await response.text(),
    'event: step\ndata: {"id":"a"}\n\nevent: end\ndata: {}\n\n',
  );
});
