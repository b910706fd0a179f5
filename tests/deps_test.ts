/**
 * runnel is imported by path or URL from projects that have no import map
 * of ours: every import in its code is fully qualified (`npm:zod@4.6.7`),
 * and every package has one version, the one `deno.lock` records.
 *
 * `deno.json` lists no npm packages under "imports" on purpose: `deno task`
 * installs every package listed there (and every package of the lock file
 * it is given) before it runs a task, so the quick start would download the
 * cluster's and the tests' packages too.
 */

import assert from "node:assert/strict";

const ROOT = new URL("../", import.meta.url);
const SOURCE_DIRS = ["core", "backends", "consensus", "agent", "proto", "infra", "tests", "bench"];
const SOURCE_FILES = ["mod.ts", "main.ts"];
const SPECIFIER =
  /(?:^\s*(?:import|export)\b[^\n;"]*?\bfrom\s*|^\s*\}\s*from\s*|^\s*import\s+|\bimport\(\s*)"([^"\n]+)"/gm;

/** Every `.ts` file of the repository's code, relative to its root. */
async function sourceFiles(): Promise<string[]> {
  const files = [...SOURCE_FILES];
  const walk = async (dir: string) => {
    for await (const entry of Deno.readDir(new URL(dir, ROOT))) {
      const path = `${dir}/${entry.name}`;
      if (entry.isDirectory && !entry.name.startsWith(".")) await walk(path);
      else if (entry.isFile && entry.name.endsWith(".ts")) files.push(path);
    }
  };
  for (const dir of SOURCE_DIRS) await walk(dir);
  return files;
}

/** `name` and `version` of an `npm:name@version/sub/path` specifier. */
function npmPackage(specifier: string): { name: string; version: string } | undefined {
  const match = /^npm:((?:@[^/@]+\/)?[^/@]+)@([^/]+)/.exec(specifier);
  return match ? { name: match[1], version: match[2] } : undefined;
}

Deno.test("every import is relative, node:, npm:NAME@VERSION or a URL (no bare specifiers)", async () => {
  const bare: string[] = [];
  for (const file of await sourceFiles()) {
    const text = await Deno.readTextFile(new URL(file, ROOT));
    for (const [, specifier] of text.matchAll(SPECIFIER)) {
      if (/^(\.{1,2}\/|node:|npm:|https?:|file:|data:)/.test(specifier)) continue;
      // The consumer test writes a project of its own that imports runnel by its package name.
      if (specifier.startsWith("@runnel/")) continue;
      bare.push(`${file}: "${specifier}"`);
    }
  }
  assert.deepEqual(bare, [], `bare specifiers resolve only through runnel's own import map`);
});

Deno.test("every npm package has one version, the one deno.lock records", async () => {
  const lock = JSON.parse(await Deno.readTextFile(new URL("deno.lock", ROOT)));
  const pinned = new Map<string, string>();
  for (const specifier of Object.keys(lock.specifiers as Record<string, string>)) {
    const found = npmPackage(specifier);
    if (!found) continue;
    const other = pinned.get(found.name);
    assert.ok(other === undefined, `deno.lock holds ${found.name}@${other} and @${found.version}`);
    pinned.set(found.name, found.version);
  }
  const config = JSON.parse(await Deno.readTextFile(new URL("deno.json", ROOT)));
  const mapped = Object.values(config.imports ?? {}).filter((to) => String(to).startsWith("npm:"));
  assert.deepEqual(
    mapped,
    [],
    "npm packages in deno.json imports are installed by every deno task",
  );
  const wrong: string[] = [];
  for (const file of await sourceFiles()) {
    const text = await Deno.readTextFile(new URL(file, ROOT));
    for (const [, specifier] of text.matchAll(SPECIFIER)) {
      const found = npmPackage(specifier);
      if (!found) {
        if (specifier.startsWith("npm:")) wrong.push(`${file}: "${specifier}" has no version`);
        continue;
      }
      const version = pinned.get(found.name);
      if (version !== found.version) {
        wrong.push(
          `${file}: ${found.name}@${found.version}, deno.lock records ${version ?? "nothing"}`,
        );
      }
    }
  }
  assert.deepEqual(wrong, []);
});
