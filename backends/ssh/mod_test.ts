import { usableKey } from "./_connection.ts";
import assert from "node:assert/strict";
import { createHmac, randomBytes } from "node:crypto";
import { checkKnownHosts, fingerprintOf, type HostKeyError, verifyHostKey } from "./_hostkey.ts";
import { sshManifest } from "./manifest.ts";
import { shellQuote, validateSshConfig } from "./mod.ts";

const blob = new Uint8Array(randomBytes(51));
const other = new Uint8Array(randomBytes(51));
const b64 = (bytes: Uint8Array) => btoa(String.fromCharCode(...bytes));

Deno.test("known_hosts: plain, [host]:port, patterns, hashed, changed and revoked keys", () => {
  const line = (hosts: string, key = blob) => `${hosts} ssh-ed25519 ${b64(key)}\n`;
  assert.equal(checkKnownHosts(line("build.internal"), "build.internal", 22, blob), "trusted");
  assert.equal(checkKnownHosts(line("build.internal"), "build.internal", 2222, blob), "unknown");
  assert.equal(
    checkKnownHosts(line("[build.internal]:2222"), "build.internal", 2222, blob),
    "trusted",
  );
  assert.equal(checkKnownHosts(line("*.internal,!db.internal"), "a.internal", 22, blob), "trusted");
  assert.equal(
    checkKnownHosts(line("*.internal,!db.internal"), "db.internal", 22, blob),
    "unknown",
  );
  const salt = randomBytes(20);
  const hash = createHmac("sha1", salt).update("[10.0.0.5]:2200").digest("base64");
  const hashed = line(`|1|${salt.toString("base64")}|${hash}`);
  assert.equal(checkKnownHosts(hashed, "10.0.0.5", 2200, blob), "trusted");
  assert.equal(checkKnownHosts(hashed, "10.0.0.6", 2200, blob), "unknown");
  assert.equal(checkKnownHosts(line("h", other), "h", 22, blob), "changed");
  assert.equal(checkKnownHosts(`@revoked ${line("h")}${line("h")}`, "h", 22, blob), "revoked");
  assert.equal(
    checkKnownHosts(`# comment\n\n@cert-authority ${line("h")}`, "h", 22, blob),
    "unknown",
  );
});

Deno.test("a refused host key names the offered fingerprint and how to trust it", () => {
  const offered = fingerprintOf(blob);
  assert.match(offered, /^SHA256:[A-Za-z0-9+/]{43}$/);
  verifyHostKey({ fingerprint: offered }, "h", 22, blob);
  assert.throws(
    () => verifyHostKey({ fingerprint: fingerprintOf(other) }, "h", 22, blob),
    (error: HostKeyError) => {
      assert.equal(error.errorClass, "permission");
      assert.ok(error.message.includes(offered));
      assert.match(error.message, /ssh-keyscan -p 22 h/);
      return true;
    },
  );
  assert.throws(
    () => verifyHostKey({ knownHosts: "", path: "/k" }, "h", 2222, blob),
    /Host \[h\]:2222 is unknown: \/k has no entry for it; offered SHA256:/,
  );
});

Deno.test("ssh config: required keys, exactly one trust source, located messages", () => {
  const base = { host: "h", user: "runner", identity: "k", "known-hosts": "kh", run: "true" };
  assert.deepEqual(validateSshConfig(base), []);
  assert.deepEqual(validateSshConfig({ with: base }), []);
  assert.deepEqual(validateSshConfig({ ...base, "known-hosts": undefined }), [
    '"known-hosts": Expected either "known-hosts" or "host-key" (exactly one of them): ' +
    "host keys are always verified",
  ]);
  assert.deepEqual(validateSshConfig({ ...base, "host-key": "SHA256:nope" }).length, 2);
  assert.match(validateSshConfig({ ...base, host: "-oProxyCommand=x" })[0], /^"host": /);
  assert.match(validateSshConfig({ ...base, "work-root": "a/../b" })[0], /^"work-root": /);
  assert.match(validateSshConfig({ ...base, port: 0 })[0], /^"port": /);
  assert.match(validateSshConfig({ ...base, identity: undefined })[0], /^"identity": /);
});

Deno.test("ssh permissions: the one address, the key and known_hosts files, the scratch root", () => {
  const spec = { baseDir: "/p", scratchRoot: "/s" } as Parameters<
    typeof sshManifest.permissions
  >[1];
  const config = {
    host: "h",
    port: 2200,
    user: "u",
    identity: "/k/id",
    "known-hosts": "kh",
    run: "x",
  };
  assert.deepEqual(sshManifest.permissions(config, spec), {
    read: ["/s", "/k/id", "/p/kh"],
    write: ["/s"],
    net: ["h:2200"],
    env: [],
    run: [],
  });
});

Deno.test("shellQuote survives quotes", () => {
  assert.equal(shellQuote("it's"), `'it'\\''s'`);
});

Deno.test("OpenSSH-format ECDSA keys sign whatever their scalar's high bit", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const { utils } = (await import("npm:ssh2@1.17.0")).default as unknown as {
      utils: {
        parseKey(text: string): { sign(data: Uint8Array): Uint8Array } & {
          verify(data: Uint8Array, signature: Uint8Array): boolean | Error;
        };
      };
    };
    // About half of the scalars have their high bit set: 16 keys miss it 1 time in 65,536.
    for (const [bits, count] of [[256, 16], [384, 8]]) {
      for (let i = 0; i < count; i++) {
        const path = `${dir}/key_${bits}_${i}`;
        const made = await new Deno.Command("ssh-keygen", {
          args: ["-q", "-t", "ecdsa", "-b", String(bits), "-N", "", "-f", path],
        }).output();
        assert.ok(made.success);
        const { privateKey } = usableKey(await Deno.readTextFile(path), undefined);
        const data = crypto.getRandomValues(new Uint8Array(32));
        const signature = utils.parseKey(privateKey).sign(data);
        const publicKey = utils.parseKey(await Deno.readTextFile(`${path}.pub`));
        assert.equal(publicKey.verify(data, signature), true, `${path} (P-${bits})`);
      }
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
