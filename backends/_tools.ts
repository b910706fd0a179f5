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

/** The first of `paths` that is an executable file this process may read and run. */
export function usableTool(paths: readonly string[]): string | undefined {
  return paths.find((path) => isExecutable(path) && mayRun(path));
}

/** Whether `path` is an executable file this process may read. */
export function isExecutable(path: string): boolean {
  try {
    if (Deno.permissions.querySync({ name: "read", path }).state !== "granted") return false;
    const info = Deno.statSync(path);
    return info.isFile && ((info.mode ?? 0) & 0o111) !== 0;
  } catch {
    return false;
  }
}

/** Whether this process may run `path`. */
export function mayRun(path: string): boolean {
  try {
    return Deno.permissions.querySync({ name: "run", command: path }).state === "granted";
  } catch {
    return false;
  }
}
