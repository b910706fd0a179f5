/**
 * Runs every test of the repository and ends with one plain summary line,
 * `N passed, N failed, N skipped`, for people and for CI. Extra arguments
 * are passed to `deno test` (e.g. a path filter).
 *
 * The tests get the permission set `deno.json` declares under
 * `test.permissions` (`deno test -P`), the same as a plain `deno test -P`,
 * and resolve npm packages through `deno.lock`, as every task does.
 *
 * @module
 */

const JUNIT_PATH = ".runnel/test-results.xml";
const LOCK_PATH = new URL("../deno.lock", import.meta.url).pathname;

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
  await Deno.mkdir(".runnel", { recursive: true });
  await Deno.remove(JUNIT_PATH).catch(() => {});
  const args = Deno.args.length ? Deno.args : ["."];
  const child = new Deno.Command(Deno.execPath(), {
    args: ["test", "-P", `--lock=${LOCK_PATH}`, "--doc", `--junit-path=${JUNIT_PATH}`, ...args],
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
