/**
 * Host key verification: an OpenSSH `known_hosts` file (plain, hashed
 * `|1|salt|hash` and `[host]:port` entries, `*`/`?` patterns, `!` negation,
 * `@revoked`) or a pinned `SHA256:` fingerprint. Never "accept any".
 *
 * @module
 */

import { Buffer } from "node:buffer";
import { createHash, createHmac } from "node:crypto";

/** An offered host key that is not trusted; an error of class `permission`. */
export class HostKeyError extends Error {
  /** Stable error code. */
  readonly code = "ssh_host_key";
  /** Error class of the attempt it fails. */
  readonly errorClass = "permission";

  /** Builds the error from a full sentence. */
  constructor(message: string) {
    super(message);
    this.name = "HostKeyError";
  }
}

/** OpenSSH's fingerprint of a host key blob: `SHA256:` + unpadded base64 of its SHA-256. */
export function fingerprintOf(blob: Uint8Array): string {
  return `SHA256:${createHash("sha256").update(blob).digest("base64").replace(/=+$/, "")}`;
}

/** How known_hosts names a host: `host` on port 22, `[host]:port` otherwise. */
export function knownHostsName(host: string, port: number): string {
  return port === 22 ? host : `[${host}]:${port}`;
}

function globMatch(pattern: string, name: string): boolean {
  const regex = pattern.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, ".*").replace(
    /\?/g,
    ".",
  );
  return new RegExp(`^${regex}$`, "i").test(name);
}

function hostFieldMatches(field: string, name: string): boolean {
  if (field.startsWith("|1|")) {
    const [, , salt, hash] = field.split("|");
    if (!salt || !hash) return false;
    const digest = createHmac("sha1", Buffer.from(salt, "base64")).update(name).digest("base64");
    return digest === hash;
  }
  let matched = false;
  for (const pattern of field.split(",")) {
    if (pattern.startsWith("!")) {
      if (globMatch(pattern.slice(1), name)) return false;
    } else if (globMatch(pattern, name)) matched = true;
  }
  return matched;
}

/** What a known_hosts file says about an offered key. */
export type KnownHostsVerdict = "trusted" | "unknown" | "changed" | "revoked";

/** Checks `blob` (the raw key offered by `host:port`) against the text of a known_hosts file. */
export function checkKnownHosts(
  text: string,
  host: string,
  port: number,
  blob: Uint8Array,
): KnownHostsVerdict {
  const name = knownHostsName(host, port);
  const offered = Buffer.from(blob).toString("base64");
  let known = false;
  let trusted = false;
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) continue;
    const fields = line.split(/\s+/);
    let marker = "";
    if (fields[0].startsWith("@")) marker = fields.shift()!;
    if (fields.length < 3 || !hostFieldMatches(fields[0], name)) continue;
    if (marker === "@cert-authority") continue;
    if (marker === "@revoked") {
      if (fields[2] === offered) return "revoked";
      continue;
    }
    known = true;
    if (fields[2] === offered) trusted = true;
  }
  return trusted ? "trusted" : known ? "changed" : "unknown";
}

/**
 * How a step trusts its host: a known_hosts file (whose unknown hosts are
 * trusted and recorded on first use only when `firstUse` is set), or a
 * pinned fingerprint.
 */
export type HostTrust =
  | { knownHosts: string; path: string; firstUse?: boolean }
  | { fingerprint: string };

/** The key type a host key blob names (its first SSH string, `ssh-ed25519`, say). */
export function keyTypeOf(blob: Uint8Array): string {
  const length = new DataView(blob.buffer, blob.byteOffset, blob.byteLength).getUint32(0);
  const type = new TextDecoder().decode(blob.subarray(4, 4 + length));
  if (!/^[a-z0-9@.-]+$/.test(type)) throw new HostKeyError("The offered host key is malformed");
  return type;
}

/** Appends `blob` for `host:port` to a known_hosts file (trust on first use). */
export function recordHostKey(path: string, host: string, port: number, blob: Uint8Array): void {
  const line = `${knownHostsName(host, port)} ${keyTypeOf(blob)} ${
    Buffer.from(blob).toString("base64")
  }\n`;
  Deno.writeTextFileSync(path, line, { append: true, create: true, mode: 0o600 });
}

/**
 * Throws a {@link HostKeyError} unless `blob` is trusted; the message
 * names the offered fingerprint and how to trust it.
 */
export function verifyHostKey(
  trust: HostTrust,
  host: string,
  port: number,
  blob: Uint8Array,
): void {
  const offered = fingerprintOf(blob);
  const where = knownHostsName(host, port);
  const howTo = `To trust it, check it with the host's owner, then add it with ` +
    `"ssh-keyscan -p ${port} ${host} >> KNOWN_HOSTS" or pin it with "host-key: ${offered}"`;
  if ("fingerprint" in trust) {
    if (offered === trust.fingerprint) return;
    throw new HostKeyError(
      `Host key of ${where} does not match the pinned "host-key": expected ${trust.fingerprint}, ` +
        `offered ${offered}. ${howTo}`,
    );
  }
  const verdict = checkKnownHosts(trust.knownHosts, host, port, blob);
  if (verdict === "trusted") return;
  if (verdict === "unknown" && trust.firstUse) {
    // Explicitly configured only; a changed or revoked key is still refused.
    recordHostKey(trust.path, host, port, blob);
    return;
  }
  if (verdict === "revoked") {
    throw new HostKeyError(`Host key ${offered} of ${where} is marked @revoked in ${trust.path}`);
  }
  if (verdict === "changed") {
    throw new HostKeyError(
      `Host key of ${where} has CHANGED: ${trust.path} names another key, offered ${offered} ` +
        `(a man-in-the-middle, or a reinstalled host). ${howTo}`,
    );
  }
  throw new HostKeyError(
    `Host ${where} is unknown: ${trust.path} has no entry for it; offered ${offered}. ${howTo}`,
  );
}
