/**
 * A stand-in agent for the re-attach test: starts one attempt on the
 * `kubernetes` backend (in this process), prints `{"handle":…}` once the
 * step's first line of output arrived, then idles until it is killed.
 *
 * Usage: `deno run … tests/kube/agent.ts SPEC_JSON`
 *
 * @module
 */

import createKubernetesBackend from "../../backends/kubernetes/mod.ts";
import type { AttemptSpec } from "../../backends/backend.ts";

const spec = JSON.parse(Deno.args[0]) as AttemptSpec;
const execution = await createKubernetesBackend().start(spec);
for await (const _chunk of execution.logs) {
  console.log(JSON.stringify({ handle: execution.handle }));
  break;
}
// Killed with SIGKILL by the test: nothing is cleaned up.
setInterval(() => {}, 60_000);
