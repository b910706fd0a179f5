import assert from "node:assert/strict";
import { openMemoryStore } from "../../consensus/embedded.ts";
import type { Store } from "../../consensus/store.ts";
import {
  admitAgent,
  type AdmitOptions,
  type AgentClaim,
  forgetAgent,
  hashOf,
  revokeAgent,
} from "./identity.ts";
import { clusterKeys } from "./keys.ts";

const HEARTBEAT_MS = 1_000;

/** A store held in memory, closed when disposed. */
function memoryStore(): Store & AsyncDisposable {
  const store = openMemoryStore();
  return Object.assign(store, { [Symbol.asyncDispose]: () => store.close() });
}

/** Admission options over `store` at a fixed clock, with a fresh lease. */
async function options(store: Store, now: number, serverId = "s1"): Promise<AdmitOptions> {
  const lease = await store.grantLease(3 * HEARTBEAT_MS);
  return {
    store,
    serverId,
    lease: lease.id,
    heartbeatMs: HEARTBEAT_MS,
    alsoWrite: () => [],
    now: () => now,
  };
}

const session = (n: number) => `session-${String(n).padStart(16, "0")}`;

Deno.test("identity: the first Hello registers the id; later ones need its credential", async () => {
  await using store = memoryStore();
  const first = await admitAgent(
    { agentId: "a1", credential: "", session: session(1) },
    await options(store, 0),
  );
  assert.ok(first.ok && first.issued);
  const credential = first.issued;
  const record = JSON.parse((await store.get(clusterKeys.agentIdentity("a1")))!.value);
  assert.equal(record.credentialHash, hashOf(credential), "only the hash is kept");
  assert.ok(!JSON.stringify(record).includes(credential));

  // Another process: the join token alone, or a wrong credential, is not enough.
  for (const claim of [{ credential: "" }, { credential: "f".repeat(64) }]) {
    const refused = await admitAgent(
      { agentId: "a1", session: session(2), ...claim },
      await options(store, 10 * HEARTBEAT_MS),
    );
    assert.ok(!refused.ok);
    assert.equal(refused.code, "bad_identity");
  }
  // The process it was issued to, whose Welcome was lost, gets a new one.
  const again = await admitAgent(
    { agentId: "a1", credential: "", session: session(1) },
    await options(store, 10 * HEARTBEAT_MS),
  );
  assert.ok(again.ok && again.issued && again.issued !== credential);
  const proved = await admitAgent(
    { agentId: "a1", credential: again.issued, session: session(3) },
    await options(store, 20 * HEARTBEAT_MS),
  );
  assert.ok(proved.ok && proved.issued === undefined);
  const noSession = await admitAgent(
    { agentId: "a1", credential: "", session: "short" },
    await options(store, 0),
  );
  assert.ok(!noSession.ok && noSession.code === "bad_hello");
});

Deno.test("identity: one live connection per id; its own reconnect or a silent holder is taken over", async () => {
  await using store = memoryStore();
  const registered = await admitAgent(
    { agentId: "a1", credential: "", session: session(1) },
    await options(store, 0, "s1"),
  );
  assert.ok(registered.ok && registered.issued);
  const claim = (n: number): AgentClaim => ({
    agentId: "a1",
    credential: registered.issued!,
    session: session(n),
  });
  // Another process with the credential, while the holder heartbeats: refused.
  const duplicate = await admitAgent(claim(2), await options(store, HEARTBEAT_MS, "s2"));
  assert.ok(!duplicate.ok);
  assert.equal(duplicate.code, "duplicate_agent");
  assert.equal(duplicate.retryAfterMs, HEARTBEAT_MS);
  // The holder's own reconnect, on another server: taken over at once.
  const reconnect = await admitAgent(claim(1), await options(store, HEARTBEAT_MS, "s2"));
  assert.ok(reconnect.ok);
  assert.equal(reconnect.connection.server, "s2");
  // Two heartbeats of silence: the holder is gone (a restarted agent).
  const restarted = await admitAgent(claim(3), await options(store, 3 * HEARTBEAT_MS, "s1"));
  assert.ok(restarted.ok);
  const held = JSON.parse((await store.get(clusterKeys.agentConnection("a1")))!.value);
  assert.equal(held.connectionId, restarted.connection.connectionId);
});

Deno.test("identity: a revoked id is refused until it is forgotten", async () => {
  await using store = memoryStore();
  const registered = await admitAgent(
    { agentId: "a1", credential: "", session: session(1) },
    await options(store, 0),
  );
  assert.ok(registered.ok);
  assert.equal(await revokeAgent(store, "a1"), true);
  assert.equal(await revokeAgent(store, "nobody"), false);
  const refused = await admitAgent(
    { agentId: "a1", credential: registered.issued!, session: session(1) },
    await options(store, 0),
  );
  assert.ok(!refused.ok);
  assert.match(refused.message, /revoked/);
  await forgetAgent(store, "a1");
  const fresh = await admitAgent(
    { agentId: "a1", credential: "", session: session(2) },
    await options(store, 10 * HEARTBEAT_MS),
  );
  assert.ok(fresh.ok && fresh.issued);
});
