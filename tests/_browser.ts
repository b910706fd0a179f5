/**
 * A real browser for the web UI's tests and benchmark: Debian's chromium
 * driven by `npm:playwright-core` (no browser download: the system's
 * binary, started with the flags that keep it from calling home).
 *
 * @module
 */

import type { Browser } from "npm:playwright-core@1.65.2";
import { ROOT } from "./_helpers.ts";

/** The system's chromium (`apt-get install chromium`). */
export const CHROMIUM = Deno.env.get("RUNNEL_CHROMIUM") ?? "/usr/bin/chromium";

/** Flags that keep the browser quiet: no GPU, no QUIC, no updates, sync or other calls home. */
export const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/** Where the tests leave their screenshots (ignored by git). */
export const SCREENSHOTS = `${ROOT}/tests/artifacts/ui`;

/** Whether chromium can be started here. */
export function chromiumInstalled(): boolean {
  try {
    return Deno.statSync(CHROMIUM).isFile;
  } catch {
    return false;
  }
}

/**
 * `ignore` for `Deno.test` of a test needing the browser: never under CI
 * (a missing browser must fail there), otherwise when chromium is missing,
 * saying so once.
 */
export function ignoreWithoutChromium(): boolean {
  if (Deno.env.get("CI") === "true" || chromiumInstalled()) return false;
  if (!warned) {
    console.warn(`browser tests skipped: no ${CHROMIUM} (apt-get install chromium)`);
    warned = true;
  }
  return true;
}
let warned = false;

/** Starts a headless chromium; close it (or dispose it) when done. */
export async function launchBrowser(): Promise<Browser & AsyncDisposable> {
  // playwright-core asks at import whether it runs under WSL by reading
  // /proc, which Deno grants only with --allow-all; this variable makes it
  // ask later, if ever (never for a local chromium).
  Deno.env.set("__IS_WSL_TEST__", "1");
  const { chromium } = await import("npm:playwright-core@1.65.2");
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
  return Object.assign(browser, {
    async [Symbol.asyncDispose]() {
      await browser.close();
    },
  });
}
