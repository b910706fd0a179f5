/**
 * The published API: a TCP forwarder in the gateway namespace, listening on
 * the link-local address shared with the host. Each listening port forwards
 * to a list of control-plane APIs: the shared port to a server whose
 * `/ready` answers (one that can reach an etcd quorum), or failing that the
 * first that accepts a connection; a node's own port to that node. The host thus drives the sim with the normal CLI, and never
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
/** How often each target's `/ready` is asked, and how long it may take to answer. */
const READY_PROBE_MS = 500;
const READY_TIMEOUT_MS = 1_500;

/** Targets whose `/ready` answered 200 on the last probe. */
function probeReadiness(targets: string[]): Set<string> {
  const ready = new Set<string>(targets);
  const probe = async (target: string) => {
    while (true) {
      try {
        const response = await fetch(`http://${target}/ready`, {
          signal: AbortSignal.timeout(READY_TIMEOUT_MS),
        });
        await response.body?.cancel();
        if (response.ok) ready.add(target);
        else ready.delete(target);
      } catch {
        ready.delete(target);
      }
      await new Promise((resolve) => setTimeout(resolve, READY_PROBE_MS));
    }
  };
  for (const target of targets) probe(target);
  return ready;
}

async function connectFirst(
  targets: string[],
  start: number,
  ready: Set<string>,
): Promise<[Deno.TcpConn, number]> {
  let lastError: unknown;
  // Ready targets first (from the preferred one on), then the rest.
  const order = targets.map((_, i) => (start + i) % targets.length);
  order.sort((a, b) => Number(ready.has(targets[b])) - Number(ready.has(targets[a])));
  for (const index of order) {
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
  const ready = targets.length > 1 ? probeReadiness(targets) : new Set(targets);
  // Stay on a target that answered, so one client's calls meet one server.
  let preferred = 0;
  for await (const client of listener) {
    (async () => {
      let upstream: Deno.TcpConn;
      try {
        [upstream, preferred] = await connectFirst(targets, preferred, ready);
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
