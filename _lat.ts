import { openLocalArtifactStore } from "./core/artifacts/local.ts";
import { RunClient } from "./agent/client.ts";
import { startServer } from "./agent/server.ts";
import { openEtcdCluster } from "./agent/etcd_wiring.ts";
import { startAgent } from "./agent/worker.ts";
import { startEtcdCluster } from "./tests/_etcd.ts";
const dir = await Deno.makeTempDir();
const etcd = await startEtcdCluster({ members: 3 });
const opened = await openEtcdCluster({ endpoints: etcd.endpoints });
const server = await startServer({ serverId: "s", ...opened, http: { hostname: "127.0.0.1", port: 0 }, grpc: { address: "127.0.0.1:0" }, token: "t", heartbeatMs: 1000, log: () => {} });
const agent = await startAgent({ servers: [`127.0.0.1:${server.grpcPort}`], token: "t", agentId: "a", slots: 4, allowShell: true, stateDir: `${dir}/a`, artifacts: openLocalArtifactStore(`${dir}/art`), log: () => {} });
const marks: Record<string, Record<string, number>> = {};
agent.on((e) => { const id = (e as { attemptId?: string }).attemptId; if (!id) return; (marks[id] ??= {})[e.type] = Date.now(); });
const client = new RunClient([`http://127.0.0.1:${server.httpPort}`]);
const n = 60;
const src = `name: seq\nsteps:\n${Array.from({ length: n }, (_, i) => `  s${i}: { backend: shell, run: "true"${i ? `, needs: [s${i - 1}]` : ""} }`).join("\n")}\n`;
const t0 = performance.now();
const { runId } = await client.submit(src, "x.yaml", dir);
for await (const _ of client.events(runId)) { /* */ }
const total = performance.now() - t0;
const { steps } = await client.run(runId);
const rows: number[][] = [];
for (let i = 1; i < n; i++) {
  const a = steps[`s${i}`].attempts[0]; const prev = steps[`s${i - 1}`].attempts[0];
  const m = marks[a.attemptId] ?? {};
  rows.push([a.startedAt! - prev.endedAt!, m.assignment - a.startedAt!, m.started - m.assignment, m.finished - m.started, m.acked - m.finished, a.endedAt! - m.acked]);
}
const med = (k: number) => rows.map((r) => r[k]).sort((x, y) => x - y)[Math.floor(rows.length / 2)];
console.log(`total ${(total / n).toFixed(1)} ms/step`);
console.log("prev end→assigned", med(0), "| assigned→agent got", med(1), "| got→started", med(2), "| started→finished", med(3), "| finished→acked", med(4), "| acked→applied", med(5));
await agent.stop(); await server.close(); await opened.close(); await etcd.stop();
