/**
 * Who may call the HTTP API: bearer tokens with a role (`read` < `submit`
 * < `admin`), kept in the store as a sha256 of their secret, never the
 * secret itself. The first admin token comes from a one-time bootstrap (as
 * `nomad acl bootstrap`) or from a file the operator gives the server.
 *
 * A token reads `rnl_<id>_<secret>`: the id (16 hex digits) finds its
 * record, the secret (32 random bytes, base64url) is checked against the
 * record's hash in constant time. The `rnl_` prefix lets secret scanners
 * recognise a leaked token.
 *
 * | key | what |
 * | --- | --- |
 * | `/acl/tokens/<id>` | `TokenRecord`: id, name, role, `sha256:<hex>` of the secret, created at/by |
 * | `/acl/bootstrap` | written once (create-only), by the bootstrap or by a server given an admin token file |
 *
 * @module
 */

import { createHash, randomBytes, timingSafeEqual } from "node:crypto";
import type { Store } from "../../consensus/store.ts";

/** What a token may do; each role may do everything the ones before it may. */
export const ROLES = ["read", "submit", "admin"] as const;

/** A token's role: `read` (runs, logs, cluster state), `submit` (also submit, cancel, resume), `admin` (also tokens). */
export type Role = typeof ROLES[number];

/** A token as the store keeps it: its secret only as a hash. */
export interface TokenRecord {
  /** Public id (16 hex digits), the middle part of the token. */
  id: string;
  /** A name for people and the audit log, such as `ci`. */
  name: string;
  role: Role;
  /** `sha256:<hex>` of the secret part. */
  hash: string;
  /** Epoch ms. */
  createdAt: number;
  /** Id of the token that created it, or `bootstrap`. */
  createdBy: string;
}

/** A token as listed: everything but its hash. */
export type TokenInfo = Omit<TokenRecord, "hash">;

/** Who made a call: the token it presented (never its secret). */
export interface Caller {
  tokenId: string;
  tokenName: string;
  role: Role;
}

/** The ACL keys in the store. */
export const aclKeys = {
  token: (id: string) => `/acl/tokens/${id}`,
  tokenPrefix: "/acl/tokens/",
  bootstrap: "/acl/bootstrap",
};

/** Id of the caller that presents the server's admin token file. */
export const ADMIN_FILE_TOKEN_ID = "admin-token-file";

/** Shortest admin token file content accepted: the entropy of a UUID and then some. */
export const MIN_ADMIN_TOKEN_CHARS = 24;

/** Bytes of a token's secret: 256 bits, beyond guessing. */
const SECRET_BYTES = 32;

const TOKEN_PATTERN = /^rnl_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$/;

/** A token name: what a person can read in the audit log and type in a command. */
const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/** A token request the server cannot honour; `code` says why. */
export class TokenRequestError extends Error {
  /** `bad_request`, `token_not_found` or `bootstrap_done`. */
  readonly code: "bad_request" | "token_not_found" | "bootstrap_done";

  /** Builds the error from its code and a full sentence. */
  constructor(code: TokenRequestError["code"], message: string) {
    super(message);
    this.name = "TokenRequestError";
    this.code = code;
  }
}

/** An admin token file that cannot serve as one. */
export class AdminTokenError extends Error {
  /** Stable error code. */
  readonly code = "bad_admin_token";

  /** Builds the error from a full sentence. */
  constructor(message: string) {
    super(message);
    this.name = "AdminTokenError";
  }
}

/** Whether `role` may do what `needed` allows. */
export function roleAllows(role: Role, needed: Role): boolean {
  return ROLES.indexOf(role) >= ROLES.indexOf(needed);
}

/** Whether a value names a role. */
export function isRole(value: unknown): value is Role {
  return typeof value === "string" && (ROLES as readonly string[]).includes(value);
}

/** Options of {@link createAuthenticator}. */
export interface AuthenticatorOptions {
  /** A token accepted as admin besides the stored ones (`--admin-token-file`'s content). */
  adminToken?: string;
}

/** Checks presented tokens against the store. */
export interface Authenticator {
  /** The caller a token belongs to, or undefined for an unknown or malformed one. */
  authenticate(token: string): Promise<Caller | undefined>;
}

/**
 * An authenticator over the store's tokens (and an operator's admin token).
 * Each call reads the token's record, so a revocation holds at once on
 * every server.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { openMemoryStore } from "../../consensus/embedded.ts";
 * import { createAuthenticator, createToken } from "./auth.ts";
 *
 * const store = openMemoryStore();
 * const { token } = await createToken(store, { name: "ci", role: "submit", createdBy: "test" });
 * const auth = createAuthenticator(store);
 * assert.equal((await auth.authenticate(token))?.role, "submit");
 * assert.equal(await auth.authenticate(token.slice(0, -1) + "x"), undefined);
 * await store.close();
 * ```
 */
export function createAuthenticator(
  store: Store,
  options: AuthenticatorOptions = {},
): Authenticator {
  const adminHash = options.adminToken === undefined
    ? undefined
    : sha256(checkAdminToken(options.adminToken));
  return {
    async authenticate(token) {
      if (adminHash !== undefined && sameHash(sha256(token), adminHash)) {
        return { tokenId: ADMIN_FILE_TOKEN_ID, tokenName: ADMIN_FILE_TOKEN_ID, role: "admin" };
      }
      const parts = TOKEN_PATTERN.exec(token);
      if (!parts) return undefined;
      const stored = await store.get(aclKeys.token(parts[1]));
      if (!stored) return undefined;
      const record = JSON.parse(stored.value) as TokenRecord;
      if (!sameHash(sha256(parts[2]), record.hash) || !isRole(record.role)) return undefined;
      return { tokenId: record.id, tokenName: record.name, role: record.role };
    },
  };
}

/**
 * The content of an admin token file, trimmed, if it is long enough to be
 * a secret.
 *
 * @throws {AdminTokenError} for a token shorter than {@link MIN_ADMIN_TOKEN_CHARS}.
 */
export function checkAdminToken(content: string): string {
  const token = content.trim();
  if (token.length < MIN_ADMIN_TOKEN_CHARS || /\s/.test(token)) {
    throw new AdminTokenError(
      `Expected an admin token of at least ${MIN_ADMIN_TOKEN_CHARS} characters without ` +
        `spaces (e.g. "openssl rand -hex 32"), got ${token.length} characters`,
    );
  }
  return token;
}

/** Options of {@link createToken}. */
export interface CreateTokenOptions {
  name: string;
  role: Role;
  /** Id of the creating token (or `bootstrap`). */
  createdBy: string;
  now?: number;
}

/** A token just made: its secret form (shown once) and what the store keeps. */
export interface CreatedToken {
  /** `rnl_<id>_<secret>`: the only time the secret exists outside its holder. */
  token: string;
  info: TokenInfo;
}

/**
 * Makes a token and stores its record (the secret only as its hash).
 *
 * @throws {TokenRequestError} for a bad name or role.
 */
export async function createToken(
  store: Store,
  options: CreateTokenOptions,
): Promise<CreatedToken> {
  const { token, record } = newToken(options);
  const result = await store.txn({
    compare: [{ key: aclKeys.token(record.id), target: "create", op: "==", value: 0 }],
    success: [{ type: "put", key: aclKeys.token(record.id), value: JSON.stringify(record) }],
  });
  // 64 random bits: a clash means something is wrong with the random source.
  if (!result.succeeded) throw new Error(`Token id ${record.id} exists already`);
  return { token, info: infoOf(record) };
}

/**
 * The one-time bootstrap: makes the first admin token, unless a bootstrap
 * (or a server with an admin token file) came first. Race-safe: one
 * transaction creates the bootstrap key and the token, so of any number of
 * concurrent calls on any servers exactly one succeeds.
 *
 * @throws {TokenRequestError} `bootstrap_done` once the ACL is bootstrapped.
 */
export async function bootstrapAcl(
  store: Store,
  options: { now?: number } = {},
): Promise<CreatedToken> {
  const now = options.now ?? Date.now();
  const { token, record } = newToken({
    name: "bootstrap",
    role: "admin",
    createdBy: "bootstrap",
    now,
  });
  const result = await store.txn({
    compare: [{ key: aclKeys.bootstrap, target: "create", op: "==", value: 0 }],
    success: [
      {
        type: "put",
        key: aclKeys.bootstrap,
        value: JSON.stringify({ method: "bootstrap", tokenId: record.id, at: now }),
      },
      { type: "put", key: aclKeys.token(record.id), value: JSON.stringify(record) },
    ],
  });
  if (!result.succeeded) throw bootstrapDone(await store.get(aclKeys.bootstrap));
  return { token, info: infoOf(record) };
}

/**
 * Closes the bootstrap for good, for a server whose admin token comes from
 * a file: with an admin at hand, an open bootstrap would only be a race an
 * attacker could win. Does nothing if the bootstrap is already done.
 */
export async function closeBootstrap(
  store: Store,
  options: { serverId: string; now?: number },
): Promise<void> {
  await store.txn({
    compare: [{ key: aclKeys.bootstrap, target: "create", op: "==", value: 0 }],
    success: [{
      type: "put",
      key: aclKeys.bootstrap,
      value: JSON.stringify({
        method: ADMIN_FILE_TOKEN_ID,
        server: options.serverId,
        at: options.now ?? Date.now(),
      }),
    }],
  });
}

/**
 * Revokes a token: its record goes, and every server refuses it from then on.
 *
 * @throws {TokenRequestError} `token_not_found` for an id with no token.
 */
export async function revokeToken(store: Store, id: string): Promise<TokenInfo> {
  const key = aclKeys.token(id);
  const stored = /^[0-9a-f]{16}$/.test(id) ? await store.get(key) : undefined;
  if (!stored) throw new TokenRequestError("token_not_found", `No API token with id "${id}"`);
  await store.txn({
    compare: [{ key, target: "mod", op: "==", value: stored.modRevision }],
    success: [{ type: "delete", key }],
  });
  return infoOf(JSON.parse(stored.value) as TokenRecord);
}

/** Every stored token, oldest first, without hashes. */
export async function listTokens(store: Store): Promise<TokenInfo[]> {
  const { items } = await store.list(aclKeys.tokenPrefix);
  return items.map((kv) => infoOf(JSON.parse(kv.value) as TokenRecord))
    .sort((a, b) => a.createdAt - b.createdAt);
}

function newToken(options: CreateTokenOptions): { token: string; record: TokenRecord } {
  if (!NAME_PATTERN.test(options.name)) {
    throw new TokenRequestError(
      "bad_request",
      `Expected a token name of letters, digits, ".", "_" or "-" (at most 64), got ${
        JSON.stringify(options.name)
      }`,
    );
  }
  if (!isRole(options.role)) {
    throw new TokenRequestError(
      "bad_request",
      `Expected a role of ${ROLES.join(", ")}, got ${JSON.stringify(options.role)}`,
    );
  }
  const id = randomBytes(8).toString("hex");
  const secret = randomBytes(SECRET_BYTES).toString("base64url");
  return {
    token: `rnl_${id}_${secret}`,
    record: {
      id,
      name: options.name,
      role: options.role,
      hash: sha256(secret),
      createdAt: options.now ?? Date.now(),
      createdBy: options.createdBy,
    },
  };
}

function bootstrapDone(marker: { value: string } | undefined): TokenRequestError {
  let how = "";
  try {
    const done = JSON.parse(marker?.value ?? "{}") as { method?: string; at?: number };
    if (done.method === ADMIN_FILE_TOKEN_ID) how = " (a server was given --admin-token-file)";
    else if (done.at) how = ` (at ${new Date(done.at).toISOString()})`;
  } catch {
    // An unreadable marker still means done.
  }
  return new TokenRequestError(
    "bootstrap_done",
    `The ACL bootstrap was done already${how}; ask an admin for a token ` +
      '("runnel token create"), or start a server with --admin-token-file to recover',
  );
}

function infoOf(record: TokenRecord): TokenInfo {
  const { hash: _hash, ...info } = record;
  return info;
}

function sha256(text: string): string {
  return `sha256:${createHash("sha256").update(text).digest("hex")}`;
}

/** Equal-length hex digests compared without an early exit. */
function sameHash(a: string, b: string): boolean {
  const left = new TextEncoder().encode(a);
  const right = new TextEncoder().encode(b);
  return left.length === right.length && timingSafeEqual(left, right);
}
