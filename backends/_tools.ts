/**
 * The system tools the process backends start their steps through. Kept
 * apart from `_process.ts` so that manifests (evaluated in the runner) can
 * name them without loading backend code.
 *
 * @module
 */

/** Where `setsid(1)` may live: Debian's `/usr/bin`, older layouts' `/bin`. */
export const SETSID_PATHS = ["/usr/bin/setsid", "/bin/setsid"];

/** Where `kill(1)` may live; a sandboxed host signals process groups through it. */
export const KILL_PATHS = ["/usr/bin/kill", "/bin/kill"];

/** Where `ps(1)` may live; `recover` asks it when a handle's process started. */
export const PS_PATHS = ["/usr/bin/ps", "/bin/ps"];

/**
 * What a sandboxed host running local processes must be able to read and
 * run besides the command itself: `setsid(1)`, `kill(1)` and `ps(1)`.
 */
export const PROCESS_TOOL_PATHS = [...SETSID_PATHS, ...KILL_PATHS, ...PS_PATHS];
