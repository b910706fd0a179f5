/**
 * Server-sent events, one implementation for the API and the web UI.
 *
 * @module
 */

/**
 * A server-sent-events answer: `produce` sends until it returns (an `end`
 * event follows) or the client goes away (`stop` aborts). A comment line
 * every few seconds keeps idle proxies from cutting a quiet stream.
 */
export function sseResponse(
  clientGone: AbortSignal,
  produce: (send: (event: string, data: unknown) => void, stop: AbortSignal) => Promise<void>,
  headers: Record<string, string> = {},
): Response {
  const encoder = new TextEncoder();
  const stop = new AbortController();
  clientGone.addEventListener("abort", () => stop.abort(), { once: true });
  // Gone while the request was being answered: no "abort" event comes any more.
  if (clientGone.aborted) stop.abort();
  const body = new ReadableStream<Uint8Array>({
    async start(controller) {
      const write = (text: string) => {
        if (stop.signal.aborted) return;
        try {
          controller.enqueue(encoder.encode(text));
        } catch {
          stop.abort();
        }
      };
      const send = (event: string, data: unknown) =>
        write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
      const keepAlive = setInterval(() => write(": keep-alive\n\n"), 15_000);
      try {
        await produce(send, stop.signal);
        // Not when cut short (the server closing): the page then reconnects instead of stopping.
        if (!stop.signal.aborted) send("end", {});
      } catch (error) {
        send("error", { message: error instanceof Error ? error.message : String(error) });
      } finally {
        clearInterval(keepAlive);
        stop.abort();
        try {
          controller.close();
        } catch {
          // The client went away first.
        }
      }
    },
    cancel() {
      stop.abort();
    },
  });
  return new Response(body, {
    headers: {
      ...headers,
      "content-type": "text/event-stream",
      "cache-control": "no-cache",
      "x-accel-buffering": "no",
    },
  });
}
