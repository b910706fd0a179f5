/**
 * The TCP probe of `sim-check`, run inside a node's namespace:
 * `probe.ts listen HOST:PORT` accepts (and closes) connections until its
 * stdin ends, printing `ready` once listening; `probe.ts connect HOST:PORT
 * COUNT` times COUNT TCP handshakes and prints their durations (ms) as a
 * JSON array.
 *
 * @module
 */

/** Pause between handshakes, so they do not queue behind each other. */
const PAUSE_MS = 20;

async function listen(hostname: string, port: number): Promise<void> {
  const listener = Deno.listen({ hostname, port });
  console.log("ready");
  (async () => {
    for await (const connection of listener) connection.close();
  })().catch(() => {});
  for await (const _ of Deno.stdin.readable) {
    // Nothing is sent: the end of stdin is the signal to stop.
  }
  listener.close();
}

async function connect(hostname: string, port: number, count: number): Promise<void> {
  const samples: number[] = [];
  // One handshake first, not counted: it pays for loading the connect path.
  (await Deno.connect({ hostname, port })).close();
  for (let i = 0; i < count; i++) {
    const start = performance.now();
    const connection = await Deno.connect({ hostname, port });
    samples.push(performance.now() - start);
    connection.close();
    await new Promise((resolve) => setTimeout(resolve, PAUSE_MS));
  }
  console.log(JSON.stringify(samples));
}

if (import.meta.main) {
  const [mode, target, count] = Deno.args;
  const [hostname, port] = target.split(":");
  if (mode === "listen") await listen(hostname, Number(port));
  else await connect(hostname, Number(port), Number(count));
}
