/**
 * Who an agent is, as the servers decide it. The join token admits an agent
 * to the cluster; it does not name it. At its first registration a server
 * issues the agent id a credential (32 random bytes; the store keeps only
 * its sha256 under `/agents/<id>/identity`) and every later Hello for that
 * id must present it. One live connection per id, across servers: a claim
 * key under the worker's lease (`/agents/<id>/connection`), taken over only
 * by a reconnect of the same agent process (its session) or once the
 * holder has gone silent.
 *
 * To revoke an agent, {@link revokeAgent} (or put `revokedAt` into its
 * identity record): its connection is cut and every Hello for the id is
 * refused until {@link forgetAgent} deletes the record, after which the id
 * may register afresh with the join token.
 *
 * @module
 */

import { timingSafeEqual } from "node:crypto";
import { randomHex, sha256Hex } from "../../core/_bytes.ts";
import type { Store, TxnOp } from "../../consensus/store.ts";
import { type AgentConnectionRecord, type AgentIdentityRecord, clusterKeys } from "./keys.ts";
import { lastHeartbeatOf } from "./presence.ts";

/**
 * A connection is live while its agent's heartbeats arrive: after this many
 * intervals of silence (one missed heartbeat, one short of being declared
 * offline) another process of the same identity may take it over, so a
 * restarted agent is back before its worker is declared offline.
 */
export const CONNECTION_SILENT_HEARTBEATS = 2;

/** Bytes of an issued credential: as a bearer secret, 256 bits. */
const CREDENTIAL_BYTES = 32;

/** Tries of a claim that races another server's writes. */
const CLAIM_TRIES = 3;

/** What a Hello says about who sent it. */
export interface AgentClaim {
  agentId: string;
  /** The credential the agent presents (empty at its first registration). */
  credential: string;
  /** A random id of the agent process. */
  session: string;
}

/** Options of {@link admitAgent}. */
export interface AdmitOptions {
  store: Store;
  serverId: string;
  /** The lease the connection claim (and the worker key) live under. */
  lease: string;
  heartbeatMs: number;
  /** Written in the same transaction as the claim (the worker key). */
  alsoWrite: (claim: AgentConnectionRecord) => TxnOp[];
  now?: () => number;
}

/** An admitted agent: its connection, and its credential when one was issued now. */
export interface Admitted {
  ok: true;
  connection: AgentConnectionRecord;
  /** Revision of the claim's write: heartbeats compare against it. */
  revision: number;
  /** The identity's credential hash as admitted: a change cuts the connection. */
  credentialHash: string;
  /** Set when this Hello registered the agent (or re-issued a lost Welcome's credential). */
  issued?: string;
}

/** A refused agent, with the `Reject` to send. */
export interface Refused {
  ok: false;
  code: "bad_hello" | "bad_identity" | "duplicate_agent";
  message: string;
  retryAfterMs?: number;
}

/**
 * Checks the identity a Hello claims and takes the id's live connection:
 * registers an unknown id (issuing a credential), checks a known one's
 * credential, and refuses a second live connection.
 */
export async function admitAgent(
  claim: AgentClaim,
  options: AdmitOptions,
): Promise<Admitted | Refused> {
  if (!/^[A-Za-z0-9_-]{16,128}$/.test(claim.session)) {
    return {
      ok: false,
      code: "bad_hello",
      message: "Expected a session id in Hello (16 to 128 letters or digits); " +
        "is this agent older than the server?",
    };
  }
  for (let tries = 0;; tries++) {
    const identity = await verifyIdentity(claim, options);
    if (!identity.ok) return identity;
    const taken = await claimConnection(claim, identity.revision, options);
    if (taken.ok) {
      return {
        ok: true,
        connection: taken.connection,
        revision: taken.revision,
        credentialHash: identity.credentialHash,
        ...(identity.issued ? { issued: identity.issued } : {}),
      };
    }
    // A race lost to another server's write: look again, a few times.
    if (taken.refused || tries + 1 >= CLAIM_TRIES) {
      return taken.refused ?? {
        ok: false,
        code: "duplicate_agent",
        message: `Agent ${claim.agentId} is connecting elsewhere at the same moment`,
        retryAfterMs: options.heartbeatMs,
      };
    }
  }
}

/** The identity record of an agent id, or a registration of a new one. */
async function verifyIdentity(
  claim: AgentClaim,
  options: AdmitOptions,
): Promise<
  | { ok: true; revision: number; credentialHash: string; issued?: string }
  | Refused
> {
  const { store } = options;
  const key = clusterKeys.agentIdentity(claim.agentId);
  const kv = await store.get(key);
  const sessionHash = hashOf(claim.session);
  const issue = async (expectRevision: number) => {
    const credential = randomHex(CREDENTIAL_BYTES);
    const record: AgentIdentityRecord = {
      agentId: claim.agentId,
      credentialHash: hashOf(credential),
      sessionHash,
      issuedBy: options.serverId,
      issuedAt: (options.now ?? Date.now)(),
    };
    const write = await store.txn({
      compare: [
        expectRevision === 0
          ? { key, target: "create", op: "==", value: 0 }
          : { key, target: "mod", op: "==", value: expectRevision },
      ],
      success: [{ type: "put", key, value: JSON.stringify(record) }],
    });
    return write.succeeded
      ? {
        ok: true as const,
        revision: write.revision,
        credentialHash: record.credentialHash,
        issued: credential,
      }
      : undefined;
  };
  if (!kv) {
    return await issue(0) ?? {
      ok: false,
      code: "duplicate_agent",
      message: `Agent ${claim.agentId} is registering from another process at the same moment`,
      retryAfterMs: options.heartbeatMs,
    };
  }
  const record = JSON.parse(kv.value) as AgentIdentityRecord;
  if (record.revokedAt !== undefined) {
    return {
      ok: false,
      code: "bad_identity",
      message: `Agent ${claim.agentId} was revoked by an operator; ` +
        `it may register again once ${key} is deleted`,
    };
  }
  if (claim.credential) {
    if (hashesEqual(hashOf(claim.credential), record.credentialHash)) {
      return { ok: true, revision: kv.modRevision, credentialHash: record.credentialHash };
    }
    return {
      ok: false,
      code: "bad_identity",
      message: `Agent ${claim.agentId} presented a credential that is not the one issued to it`,
    };
  }
  // The process it was issued to never got its Welcome (the stream broke):
  // only that process knows its session, so it may have a new one.
  if (hashesEqual(sessionHash, record.sessionHash)) {
    const issued = await issue(kv.modRevision);
    if (issued) return issued;
  }
  return {
    ok: false,
    code: "bad_identity",
    message: `Agent ${claim.agentId} is registered, and this Hello lacks the credential ` +
      "issued to it (kept in its state dir, credential.json). Another agent with the same id? " +
      `If the file was lost, an operator deletes ${key} to let the id register again`,
  };
}

/** Takes the id's live-connection claim, unless another live process holds it. */
async function claimConnection(
  claim: AgentClaim,
  identityRevision: number,
  options: AdmitOptions,
): Promise<
  | { ok: true; connection: AgentConnectionRecord; revision: number }
  | { ok: false; refused?: Refused }
> {
  const { store } = options;
  const now = (options.now ?? Date.now)();
  const key = clusterKeys.agentConnection(claim.agentId);
  const sessionHash = hashOf(claim.session);
  const held = await store.get(key);
  if (held) {
    const holder = JSON.parse(held.value) as AgentConnectionRecord;
    // Only a different process needs the holder's last heartbeat: read it then.
    const lastHeartbeat = holder.sessionHash === sessionHash ? holder.heartbeatAt : Math.max(
      holder.heartbeatAt,
      (await lastHeartbeatOf(store, holder.server, claim.agentId)) ?? 0,
    );
    const silentMs = now - lastHeartbeat;
    const liveForMs = CONNECTION_SILENT_HEARTBEATS * options.heartbeatMs - silentMs;
    if (holder.sessionHash !== sessionHash && liveForMs > 0) {
      return {
        ok: false,
        refused: {
          ok: false,
          code: "duplicate_agent",
          message: `Agent ${claim.agentId} is connected already, from another process ` +
            `(to server ${holder.server} since ${new Date(holder.connectedAt).toISOString()}); ` +
            "this one is refused while that connection lives",
          retryAfterMs: liveForMs,
        },
      };
    }
  }
  const connection: AgentConnectionRecord = {
    connectionId: crypto.randomUUID(),
    sessionHash,
    server: options.serverId,
    connectedAt: now,
    heartbeatAt: now,
  };
  const write = await store.txn({
    compare: [
      held
        ? { key, target: "mod", op: "==", value: held.modRevision }
        : { key, target: "create", op: "==", value: 0 },
      // A revocation (or a re-issue) since the identity was read wins.
      {
        key: clusterKeys.agentIdentity(claim.agentId),
        target: "mod",
        op: "==",
        value: identityRevision,
      },
    ],
    success: [
      { type: "put", key, value: JSON.stringify(connection), lease: options.lease },
      ...options.alsoWrite(connection),
    ],
  });
  return write.succeeded ? { ok: true, connection, revision: write.revision } : { ok: false };
}

/**
 * Revokes an agent's identity: its live connection is cut and every Hello
 * for the id is refused (`bad_identity`) until {@link forgetAgent}. False
 * when the id was never registered.
 */
export async function revokeAgent(
  store: Store,
  agentId: string,
  now = Date.now(),
): Promise<boolean> {
  const key = clusterKeys.agentIdentity(agentId);
  for (;;) {
    const kv = await store.get(key);
    if (!kv) return false;
    const record = JSON.parse(kv.value) as AgentIdentityRecord;
    const write = await store.txn({
      compare: [{ key, target: "mod", op: "==", value: kv.modRevision }],
      success: [{ type: "put", key, value: JSON.stringify({ ...record, revokedAt: now }) }],
    });
    if (write.succeeded) return true;
  }
}

/**
 * Forgets an agent's identity: its connection is cut, and the id may
 * register again with the join token alone (getting a new credential).
 */
export async function forgetAgent(store: Store, agentId: string): Promise<void> {
  await store.delete(clusterKeys.agentIdentity(agentId));
}

/** `sha256:<hex>` of a credential or session. */
export function hashOf(secret: string): string {
  return `sha256:${sha256Hex(secret)}`;
}

function hashesEqual(a: string, b: string): boolean {
  const left = new TextEncoder().encode(a);
  const right = new TextEncoder().encode(b);
  return left.length === right.length && timingSafeEqual(left, right);
}
