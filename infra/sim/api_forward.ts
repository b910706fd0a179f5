/**
 * The published API: a TCP forwarder in the gateway namespace, listening on
 * the link-local address shared with the host. Each listening port forwards
 * to a list of control-plane APIs, the first that accepts a connection (so
 * the shared port reaches any live server, and a node's own port reaches
 * that node). The host thus drives the sim with the normal CLI, and never
 * sends a packet to the sim's 10.x subnets itself.
 *
 * `deno run --allow-net=... api_forward.ts CONFIG_JSON` with a
 * {@link ForwardConfig}.
 *
 * @module
 */

/** Listen address → targets tried in order. */
export interface ForwardConfig {
  hostname: string;
  routes: Array<{ port: number; targets: string[] }>;
}

/** How long one target may take to accept before the next is tried. */
const CONNECT_TIMEOUT_MS = 2_000;

async function connectFirst(targets: string[], start: number): Promise<[Deno.TcpConn, number]> {
  let lastError: unknown;
  for (let i = 0; i < targets.length; i++) {
    const index = (start + i) % targets.length;
    const [hostname, port] = targets[index].split(":");
    try {
      const connection = await Promise.race([
        Deno.connect({ hostname, port: Number(port) }),
        new Promise<never>((_, reject) =>
          setTimeout(() => reject(new Error("connect timed out")), CONNECT_TIMEOUT_MS)
        ),
      ]);
      return [connection, index];
    } catch (error) {
      lastError = error;
    }
  }
  throw lastError;
}

async function serveRoute(hostname: string, port: number, targets: string[]): Promise<void> {
  const listener = Deno.listen({ hostname, port });
  // Stay on a target that answered, so one client's calls meet one server.
  let preferred = 0;
  for await (const client of listener) {
    (async () => {
      let upstream: Deno.TcpConn;
      try {
        [upstream, preferred] = await connectFirst(targets, preferred);
      } catch {
        client.close();
        return;
      }
      await Promise.allSettled([
        client.readable.pipeTo(upstream.writable),
        upstream.readable.pipeTo(client.writable),
      ]);
    })().catch(() => {});
  }
}

if (import.meta.main) {
  const config = JSON.parse(Deno.args[0]) as ForwardConfig;
  await Promise.all(
    config.routes.map((route) => serveRoute(config.hostname, route.port, route.targets)),
  );
}
