import assert from "node:assert/strict";
import { countJunit, permissionFlags } from "./run_all.ts";

Deno.test("run_all: a deno.json permission set becomes --allow-* flags", () => {
  assert.deepEqual(
    permissionFlags({ read: true, net: false, env: [], sys: ["hostname", "osRelease"] }),
    ["--allow-read", "--allow-sys=hostname,osRelease"],
  );
  assert.throws(() => permissionFlags({ read: "yes" as unknown as boolean }), /"read"/);
});

Deno.test("run_all: the suite's own set grants what deno test -P grants", async () => {
  const config = JSON.parse(await Deno.readTextFile(new URL("../deno.json", import.meta.url)));
  const flags = permissionFlags(config.test.permissions);
  for (const [name, value] of Object.entries(config.test.permissions)) {
    if (value === false) continue;
    assert.ok(flags.some((flag) => flag.startsWith(`--allow-${name}`)), name);
  }
  // This test runs under deno test -P: what the flags grant, it must have.
  const field = { read: "path", write: "path", net: "host", env: "variable", run: "command" };
  for (const flag of flags) {
    const [name, list] = flag.replace("--allow-", "").split("=");
    for (const item of list?.split(",") ?? [undefined]) {
      const key = field[name as keyof typeof field] ?? "kind";
      const descriptor = { name, ...(item ? { [key]: item } : {}) } as Deno.PermissionDescriptor;
      assert.equal((await Deno.permissions.query(descriptor)).state, "granted", `${name} ${item}`);
    }
  }
});

Deno.test("run_all: a JUnit report is counted by outcome", () => {
  const xml = `<testcase name="a"/><testcase name="b"><failure/></testcase>` +
    `<testcase name="c"><skipped/></testcase>`;
  assert.deepEqual(countJunit(xml), { passed: 1, failed: 1, skipped: 1 });
});
