/**
 * Internal test helpers of runnel's own backend tests (the public ones are
 * in `testing.ts`).
 *
 * @module
 */

/** Polls `check` until it returns true or `timeoutMs` passes; throws on timeout. */
export async function waitUntil(
  check: () => boolean | Promise<boolean>,
  what: string,
  timeoutMs = 10_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`Timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** True while a process with this id exists and is not a zombie awaiting its reaper. */
export async function processAlive(pid: number): Promise<boolean> {
  // Deno reads /proc/<pid> only under --allow-all, so ask ps instead.
  const { stdout } = await new Deno.Command("ps", { args: ["-o", "stat=", "-p", String(pid)] })
    .output();
  const state = new TextDecoder().decode(stdout).trim();
  return state !== "" && !state.startsWith("Z");
}
