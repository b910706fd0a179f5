import assert from "node:assert/strict";
import { openMemoryStore } from "../../consensus/embedded.ts";
import {
  aclKeys,
  AdminTokenError,
  bootstrapAcl,
  closeBootstrap,
  createAuthenticator,
  createToken,
  listTokens,
  revokeToken,
  roleAllows,
  TokenRequestError,
} from "./auth.ts";

/** A memory store closed when the test's scope ends. */
function memoryStore() {
  const store = openMemoryStore();
  return Object.assign(store, { [Symbol.asyncDispose]: () => store.close() });
}

Deno.test("roles: each allows what the ones below it allow", () => {
  assert.ok(roleAllows("admin", "read") && roleAllows("admin", "submit"));
  assert.ok(roleAllows("submit", "read") && roleAllows("submit", "submit"));
  assert.ok(!roleAllows("submit", "admin"));
  assert.ok(!roleAllows("read", "submit"));
});

Deno.test("tokens: the store keeps a hash; a changed, revoked or foreign token is refused", async () => {
  await using store = memoryStore();
  const auth = createAuthenticator(store);
  const { token, info } = await createToken(store, {
    name: "ci",
    role: "submit",
    createdBy: "test",
  });
  assert.match(token, /^rnl_[0-9a-f]{16}_[A-Za-z0-9_-]{43}$/);
  const stored = (await store.get(aclKeys.token(info.id)))!.value;
  assert.ok(!stored.includes(token.slice(21)), "the secret is not stored");
  assert.match(JSON.parse(stored).hash, /^sha256:[0-9a-f]{64}$/);
  assert.deepEqual(await auth.authenticate(token), {
    tokenId: info.id,
    tokenName: "ci",
    role: "submit",
  });
  const flipped = token.slice(0, -1) + (token.endsWith("A") ? "B" : "A");
  assert.equal(await auth.authenticate(flipped), undefined);
  assert.equal(await auth.authenticate("rnl_0000000000000000_" + token.slice(21)), undefined);
  assert.equal(await auth.authenticate(""), undefined);
  assert.equal(await auth.authenticate("not a token"), undefined);
  assert.deepEqual((await listTokens(store)).map((t) => Object.keys(t).sort()), [
    ["createdAt", "createdBy", "id", "name", "role"],
  ]);
  await revokeToken(store, info.id);
  assert.equal(await auth.authenticate(token), undefined);
  await assert.rejects(revokeToken(store, info.id), TokenRequestError);
  await assert.rejects(revokeToken(store, "../../run/x"), /No API token with id/);
});

Deno.test("tokens: names and roles are checked", async () => {
  await using store = memoryStore();
  for (const name of ["", "a b", "x".repeat(65), "../x", "-lead"]) {
    await assert.rejects(
      createToken(store, { name, role: "read", createdBy: "t" }),
      /Expected a token name/,
    );
  }
  await assert.rejects(
    // deno-lint-ignore no-explicit-any
    createToken(store, { name: "x", role: "root" as any, createdBy: "t" }),
    /Expected a role of read, submit, admin, got "root"/,
  );
});

Deno.test("bootstrap: of many concurrent calls exactly one gets an admin token", async () => {
  await using store = memoryStore();
  const outcomes = await Promise.allSettled(
    Array.from({ length: 8 }, () => bootstrapAcl(store)),
  );
  const won = outcomes.filter((o) => o.status === "fulfilled");
  assert.equal(won.length, 1);
  for (const lost of outcomes.filter((o) => o.status === "rejected")) {
    assert.equal((lost.reason as TokenRequestError).code, "bootstrap_done");
  }
  const { token } = (won[0] as PromiseFulfilledResult<{ token: string }>).value;
  assert.equal((await createAuthenticator(store).authenticate(token))?.role, "admin");
  await assert.rejects(bootstrapAcl(store), /bootstrap was done already/);
});

Deno.test("admin token file: accepted as admin, closes the bootstrap, must be long", async () => {
  await using store = memoryStore();
  const admin = "0123456789abcdef0123456789abcdef";
  const auth = createAuthenticator(store, { adminToken: `${admin}\n` });
  assert.equal((await auth.authenticate(admin))?.role, "admin");
  assert.equal(await auth.authenticate(admin.slice(1)), undefined);
  await closeBootstrap(store, { serverId: "s1" });
  await assert.rejects(bootstrapAcl(store), /--admin-token-file/);
  assert.throws(() => createAuthenticator(store, { adminToken: "short" }), AdminTokenError);
});
