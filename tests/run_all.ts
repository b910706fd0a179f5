/**
 * Runs every test of the repository and ends with one plain summary line,
 * `N passed, N failed, N skipped`, for people and for CI. Extra arguments
 * are passed to `deno test` (e.g. a path filter).
 *
 * The tests get the permission set `deno.json` declares under
 * `test.permissions`, the one a plain `deno test -P` grants, spelled as
 * `--allow-*` flags: `-P` would make Deno open every run with a warning that
 * permissions in the config file are experimental. npm packages resolve
 * through `deno.lock`, as in every task.
 *
 * @module
 */

const ROOT = new URL("../", import.meta.url);
const JUNIT_PATH = ".runnel/test-results.xml";
const LOCK_PATH = new URL("deno.lock", ROOT).pathname;

/** A permission of a `deno.json` permission set: all, none, or a list of names. */
export type PermissionValue = boolean | string[];

/**
 * The `--allow-*` flags that grant a `deno.json` permission set, such as
 * `{ "read": true, "sys": ["hostname"] }` → `--allow-read --allow-sys=hostname`.
 */
export function permissionFlags(set: Record<string, PermissionValue>): string[] {
  const flags: string[] = [];
  for (const [name, value] of Object.entries(set)) {
    if (value === true) flags.push(`--allow-${name}`);
    else if (Array.isArray(value) && value.length > 0) {
      flags.push(`--allow-${name}=${value.join(",")}`);
    } else if (value !== false && !Array.isArray(value)) {
      throw new Error(
        `Expected true, false or a list for "${name}" in deno.json test.permissions, got ${
          JSON.stringify(value)
        }`,
      );
    }
  }
  return flags;
}

/** Counts test cases in a JUnit XML report. */
export function countJunit(xml: string): { passed: number; failed: number; skipped: number } {
  let passed = 0;
  let failed = 0;
  let skipped = 0;
  for (const match of xml.matchAll(/<testcase\b[^>]*?(\/>|>([\s\S]*?)<\/testcase>)/g)) {
    const body = match[2] ?? "";
    if (/<failure|<error/.test(body)) failed++;
    else if (/<skipped/.test(body)) skipped++;
    else passed++;
  }
  return { passed, failed, skipped };
}

if (import.meta.main) {
  const config = JSON.parse(await Deno.readTextFile(new URL("deno.json", ROOT)));
  const permissions = permissionFlags(config.test.permissions);
  await Deno.mkdir(".runnel", { recursive: true });
  await Deno.remove(JUNIT_PATH).catch(() => {});
  const args = Deno.args.length ? Deno.args : ["."];
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "test",
      ...permissions,
      `--lock=${LOCK_PATH}`,
      "--doc",
      `--junit-path=${JUNIT_PATH}`,
      ...args,
    ],
    stdout: "inherit",
    stderr: "inherit",
  }).spawn();
  const status = await child.status;
  let counts = { passed: 0, failed: 0, skipped: 0 };
  try {
    counts = countJunit(await Deno.readTextFile(JUNIT_PATH));
  } catch {
    // No report: the run failed before any test (a type error, say).
  }
  if (!status.success && counts.failed === 0) counts.failed = 1;
  console.log(`${counts.passed} passed, ${counts.failed} failed, ${counts.skipped} skipped`);
  Deno.exit(status.success ? 0 : 1);
}
