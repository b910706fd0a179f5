/**
 * An agent's state directory and its identity: the id is made once and
 * kept, so a restarted agent finds what it left (Docker labels its
 * containers with it); the credential a server issued to the id proves it
 * in every later Hello.
 *
 * @module
 */

import { randomHex } from "../../core/_bytes.ts";
import { writeJsonAtomic } from "../attempt/mod.ts";
import { DEFAULT_AGENT_STATE_DIR } from "./options.ts";

/** Paths under an agent's state directory. */
export interface AgentPaths {
  root: string;
  /** `{agentId}`. */
  identity: string;
  /** `{agentId, credential}`, mode 0600: the credential a server issued to the id. */
  credential: string;
  /** One JSON file per attempt in flight (its assignment and handle). */
  attempts: string;
  /** One JSON file per result not yet acknowledged. */
  outbox: string;
  /** Plugin host entry files. */
  hosts: string;
  /** The scratch root: `<run>/<step>/<attempt>/{in,out}`. */
  work: string;
}

/** The layout of an agent's state directory. */
export function agentPaths(stateDir: string = DEFAULT_AGENT_STATE_DIR): AgentPaths {
  return {
    root: stateDir,
    identity: `${stateDir}/agent.json`,
    credential: `${stateDir}/credential.json`,
    attempts: `${stateDir}/attempts`,
    outbox: `${stateDir}/outbox`,
    hosts: `${stateDir}/hosts`,
    work: `${stateDir}/work`,
  };
}

/**
 * The agent's id: the one saved in `<stateDir>/agent.json`, or a new
 * `<hostname>-<6 hex>` saved there. A stable id lets a restarted agent find
 * what it left (Docker labels its containers with it).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { loadAgentId } from "./identity.ts";
 * const dir = await Deno.makeTempDir();
 * const id = await loadAgentId(dir);
 * assert.match(id, /-[0-9a-f]{6}$/);
 * assert.equal(await loadAgentId(dir), id, "kept once made");
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function loadAgentId(stateDir: string = DEFAULT_AGENT_STATE_DIR): Promise<string> {
  const paths = agentPaths(stateDir);
  try {
    const saved = JSON.parse(await Deno.readTextFile(paths.identity)) as { agentId?: unknown };
    if (typeof saved.agentId === "string" && saved.agentId) return saved.agentId;
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound) && !(error instanceof SyntaxError)) throw error;
  }
  let host = "agent";
  try {
    host = Deno.hostname().toLowerCase().replace(/[^a-z0-9-]+/g, "-").replace(/^-+|-+$/g, "") ||
      host;
  } catch {
    // Without --allow-sys=hostname the id is still unique, just less telling.
  }
  const agentId = `${host}-${randomHex(3)}`;
  await Deno.mkdir(paths.root, { recursive: true });
  await writeJsonAtomic(paths.identity, { agentId });
  return agentId;
}

/**
 * The credential a server issued to `agentId`, from `<stateDir>/credential.json`;
 * "" when there is none (or it was issued to another id): the agent then
 * registers with the join token alone.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { loadCredential, saveCredential } from "./identity.ts";
 * const dir = await Deno.makeTempDir();
 * assert.equal(await loadCredential(dir, "a1"), "");
 * await saveCredential(dir, { agentId: "a1", credential: "c0ffee" });
 * assert.equal(await loadCredential(dir, "a1"), "c0ffee");
 * assert.equal(await loadCredential(dir, "a2"), "", "another id's credential is not sent");
 * assert.equal((await Deno.stat(`${dir}/credential.json`)).mode! & 0o777, 0o600);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function loadCredential(stateDir: string, agentId: string): Promise<string> {
  try {
    const saved = JSON.parse(await Deno.readTextFile(agentPaths(stateDir).credential)) as {
      agentId?: unknown;
      credential?: unknown;
    };
    return saved.agentId === agentId && typeof saved.credential === "string"
      ? saved.credential
      : "";
  } catch (error) {
    if (error instanceof Deno.errors.NotFound || error instanceof SyntaxError) return "";
    throw error;
  }
}

/** Keeps the credential a server issued, readable by the agent's user only. */
export async function saveCredential(
  stateDir: string,
  saved: { agentId: string; credential: string },
): Promise<void> {
  await writeJsonAtomic(agentPaths(stateDir).credential, saved, { mode: 0o600 });
}
