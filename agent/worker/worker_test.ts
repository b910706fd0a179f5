import assert from "node:assert/strict";
import {
  type AgentOptions,
  agentPaths,
  loadAgentId,
  Outbox,
  startAgent,
  StateDirLockedError,
} from "./mod.ts";
import { fileSafe } from "../../core/_paths.ts";
import { openLocalArtifactStore } from "../../core/artifacts/local.ts";

/** A temporary directory, removed when disposed. */
async function tempDir(): Promise<{ path: string } & AsyncDisposable> {
  const path = await Deno.makeTempDir({ prefix: "runnel_worker_test_" });
  return { path, [Symbol.asyncDispose]: () => Deno.remove(path, { recursive: true }) };
}

Deno.test("loadAgentId makes an id once and keeps it in agent.json", async () => {
  await using temp = await tempDir();
  const dir = temp.path;
  const stateDir = `${dir}/state`;
  const first = await loadAgentId(stateDir);
  assert.match(first, /^[a-z0-9-]+-[0-9a-f]{6}$/);
  assert.equal(await loadAgentId(stateDir), first);
  assert.deepEqual(JSON.parse(await Deno.readTextFile(agentPaths(stateDir).identity)), {
    agentId: first,
  });
  // A damaged file gets a new id rather than stopping the agent.
  await Deno.writeTextFile(agentPaths(stateDir).identity, "{");
  assert.notEqual(await loadAgentId(stateDir), first);
});

Deno.test("the outbox keeps results across processes until removed", async () => {
  await using temp = await tempDir();
  const dir = temp.path;
  const outbox = new Outbox(`${dir}/outbox`);
  assert.deepEqual(await outbox.load(), []);
  await outbox.add({ attemptId: "r/b/1", resultJson: '{"ok":true}', atMs: 2 });
  await outbox.add({ attemptId: "r/a[x=1]/1", resultJson: '{"ok":false}', atMs: 1 });
  await Deno.writeTextFile(`${dir}/outbox/stray.json`, "not json");

  const reopened = new Outbox(`${dir}/outbox`);
  const entries = await reopened.load();
  assert.deepEqual(entries.map((entry) => entry.attemptId), ["r/a[x=1]/1", "r/b/1"]);
  assert.equal(reopened.has("r/b/1"), true);
  assert.equal(await reopened.remove("r/b/1"), true);
  assert.equal(await reopened.remove("r/b/1"), false);
  assert.deepEqual(
    (await new Outbox(`${dir}/outbox`).load()).map((entry) => entry.attemptId),
    ["r/a[x=1]/1"],
  );
  // Attempt ids hold "/": one flat file each.
  assert.ok(
    [...Deno.readDirSync(`${dir}/outbox`)].some((f) => f.name === `${fileSafe("r/a[x=1]/1")}.json`),
  );
});

Deno.test("a second agent on one state dir refuses to start, naming the dir and the pid", async () => {
  await using temp = await tempDir();
  const options: AgentOptions = {
    servers: ["127.0.0.1:1"], // nobody listens there
    token: "join-token",
    stateDir: `${temp.path}/agent`,
    artifacts: openLocalArtifactStore(`${temp.path}/artifacts`),
    log: () => {},
  };
  const first = await startAgent(options);
  await assert.rejects(startAgent(options), (error: unknown) => {
    assert.ok(error instanceof StateDirLockedError);
    assert.equal(error.pid, Deno.pid);
    assert.match(error.message, new RegExp(`state dir ${options.stateDir} .* pid ${Deno.pid}`));
    return true;
  });
  await first.stop();
  // Released with the agent: the next one starts.
  await (await startAgent(options)).stop();
});
