/**
 * `deno task kube-dev`: the Kubernetes API stand-in on a loopback port, for
 * trying the `kubernetes` backend without a cluster (as `nomad agent -dev`
 * does for Nomad). Prints the path of a kubeconfig that points at it; stops
 * on Ctrl-C, removing every pod it ran.
 *
 * Flags: `--port N` (default a free port), `--kubeconfig PATH` (also write
 * the kubeconfig there), `--node-label k=v` (repeatable).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { startKubeStandIn } from "./mod.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    port: { type: "string" },
    kubeconfig: { type: "string" },
    "node-label": { type: "string", multiple: true },
    help: { type: "boolean" },
  },
});
if (values.help) {
  console.log("usage: deno task kube-dev [--port N] [--kubeconfig PATH] [--node-label k=v]...");
  Deno.exit(0);
}
const port = values.port === undefined ? 0 : Number(values.port);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`Expected --port to be a port number, got "${values.port}"`);
  Deno.exit(2);
}
const nodeLabels: Record<string, string> = {};
for (const label of values["node-label"] ?? []) {
  const at = label.indexOf("=");
  if (at <= 0) {
    console.error(`Expected --node-label like "pool=gpu", got "${label}"`);
    Deno.exit(2);
  }
  nodeLabels[label.slice(0, at)] = label.slice(at + 1);
}
const standIn = await startKubeStandIn({ port, nodeLabels });
let kubeconfig = standIn.kubeconfig;
if (values.kubeconfig) {
  await Deno.writeTextFile(values.kubeconfig, await Deno.readTextFile(standIn.kubeconfig), {
    mode: 0o600,
  });
  kubeconfig = values.kubeconfig;
}
console.log(`Kubernetes API stand-in listening on ${standIn.server} (pods run on local Docker)`);
console.log(`kubeconfig: ${kubeconfig}`);
console.log(`try: KUBECONFIG=${kubeconfig} kubectl get jobs,pods`);
const stop = async () => {
  await standIn.stop();
  Deno.exit(0);
};
Deno.addSignalListener("SIGINT", stop);
Deno.addSignalListener("SIGTERM", stop);
