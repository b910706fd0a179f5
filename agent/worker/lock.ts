/**
 * One agent per state directory. Two agents sharing one would share an id,
 * a credential, an outbox and attempt records, each reaping what the other
 * runs; so the second one refuses to start, naming the directory and the
 * pid that holds it.
 *
 * The lock is an exclusive `flock` on `<stateDir>/agent.lock`, taken without
 * waiting: the kernel grants it to one open file at a time and drops it when
 * its holder dies however it dies, so a lock left by a killed agent is never
 * stale and no pid is ever judged alive or dead (a reused pid cannot fool
 * it, and two agents taking over at once cannot both win). The file holds
 * the holder's pid, for the message. It is never removed: a lock on a
 * removed file would not exclude one taken on its successor.
 *
 * @module
 */

/** The state directory is held by another agent. */
export class StateDirLockedError extends Error {
  /** Stable error code. */
  readonly code = "state_dir_locked";
  /** The state directory. */
  readonly stateDir: string;
  /** The holder's pid, when its lock file says. */
  readonly pid: number | undefined;

  /** Builds the error from the directory and the holder's pid. */
  constructor(stateDir: string, pid: number | undefined) {
    super(
      `Expected the agent state dir ${stateDir} to be free, but ` +
        (pid === undefined ? "another process" : `the agent with pid ${pid}`) +
        ` holds it (${lockPath(stateDir)}): give each agent its own --state-dir`,
    );
    this.name = "StateDirLockedError";
    this.stateDir = stateDir;
    this.pid = pid;
  }
}

/** A held state directory lock. */
export interface StateDirLock {
  /** Releases the lock (idempotent). */
  release(): void;
}

/**
 * Locks an agent's state directory (made if missing); throws
 * {@link StateDirLockedError} if another agent, in this process or
 * another, holds it.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { lockStateDir, StateDirLockedError } from "./lock.ts";
 * const dir = await Deno.makeTempDir();
 * const lock = await lockStateDir(dir);
 * await assert.rejects(lockStateDir(dir), StateDirLockedError);
 * lock.release();
 * (await lockStateDir(dir)).release();
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function lockStateDir(stateDir: string): Promise<StateDirLock> {
  await Deno.mkdir(stateDir, { recursive: true });
  const path = lockPath(stateDir);
  const file = await Deno.open(path, { read: true, write: true, create: true, mode: 0o600 });
  let locked = false;
  try {
    locked = await file.tryLock(true);
  } finally {
    if (!locked) file.close();
  }
  if (!locked) throw new StateDirLockedError(stateDir, await holderPid(path));
  try {
    await file.truncate(0);
    const bytes = new TextEncoder().encode(`${Deno.pid}\n`);
    for (let at = 0; at < bytes.length;) at += await file.write(bytes.subarray(at));
  } catch (error) {
    file.close();
    throw error;
  }
  let released = false;
  return {
    release() {
      if (released) return;
      released = true;
      // Closing the file drops the lock.
      file.close();
    },
  };
}

function lockPath(stateDir: string): string {
  return `${stateDir}/agent.lock`;
}

/** The pid written in a lock file; undefined while its holder is still writing it. */
async function holderPid(path: string): Promise<number | undefined> {
  try {
    const pid = Number((await Deno.readTextFile(path)).trim());
    return Number.isInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}
