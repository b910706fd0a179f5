/**
 * `runnel server` as a user starts it: an address another process holds is
 * named with the flag that chose it, and the server exits as bad input
 * instead of crashing or serving half its listeners.
 *
 * @module
 */

import assert from "node:assert/strict";
import { CLI_PERMISSIONS, MAIN, sandbox } from "./_helpers.ts";

/** Long enough for a cold start of the CLI; a server that keeps running past it is a failure. */
const EXIT_DEADLINE_MS = 30_000;

/**
 * Runs `runnel ARGS` expecting it to exit on its own; one still running at
 * the deadline is killed (by its pid, through its handle) and fails the test.
 */
async function runToExit(args: string[], cwd: string) {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", ...CLI_PERMISSIONS, MAIN, ...args],
    cwd,
    env: { NO_COLOR: "1", RUNNEL_TOKEN: "test-token" },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const deadline = new Promise<"deadline">((resolve) => {
    timer = setTimeout(() => resolve("deadline"), EXIT_DEADLINE_MS);
  });
  try {
    const outcome = await Promise.race([child.status, deadline]);
    if (outcome === "deadline") child.kill("SIGKILL");
    const output = await child.output();
    const stderr = new TextDecoder().decode(output.stderr);
    assert.notEqual(outcome, "deadline", `runnel server kept running:\n${stderr}`);
    return { code: output.code, stderr };
  } finally {
    clearTimeout(timer);
  }
}

/** A listener on a free loopback port, holding it for the test. */
function holdPort(): { port: number; listener: Deno.Listener } {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  return { port: (listener.addr as Deno.NetAddr).port, listener };
}

/** A free loopback port (released at once: another listener takes it next). */
function freePort(): number {
  const { port, listener } = holdPort();
  listener.close();
  return port;
}

for (const [flag, other] of [["--listen", "--grpc"], ["--grpc", "--listen"]] as const) {
  Deno.test(`runnel server: a ${flag} address in use is named with its flag`, async () => {
    await using box = await sandbox();
    const held = holdPort();
    try {
      const taken = `127.0.0.1:${held.port}`;
      const result = await runToExit(
        [
          "server",
          "--store",
          `${box.dir}/server.db`,
          flag,
          taken,
          other,
          `127.0.0.1:${freePort()}`,
        ],
        box.dir,
      );
      assert.equal(result.code, 2, result.stderr);
      assert.match(result.stderr, new RegExp(`^error: ${flag} ${taken} is already in use`, "m"));
      assert.doesNotMatch(result.stderr, /internal error|os error|please report/);
    } finally {
      held.listener.close();
    }
  });
}

Deno.test("runnel server: bad security settings are named and stop it before it listens", async () => {
  await using box = await sandbox();
  const short = await box.write("short.token", "hunter2\n");
  const cases: Array<[string[], RegExp]> = [
    [
      ["--admin-token-file", short],
      /^error: --admin-token-file \S+short\.token: Expected an admin token of at least 24 characters/m,
    ],
    [
      ["--admin-token-file", `${box.dir}/missing.token`],
      /^error: Expected a readable file for --admin-token-file/m,
    ],
    [
      ["--webhook-allow", "http://hooks.example.com/x"],
      /^error: --webhook-allow: Expected a webhook host like/m,
    ],
    [["--http-tls-cert", short], /^error: Expected both --http-tls-cert and --http-tls-key/m],
  ];
  for (const [flags, message] of cases) {
    const result = await runToExit(
      [
        "server",
        "--store",
        `${box.dir}/server.db`,
        "--listen",
        "127.0.0.1:0",
        "--grpc",
        "127.0.0.1:0",
        ...flags,
      ],
      box.dir,
    );
    assert.equal(result.code, 2, result.stderr);
    assert.match(result.stderr, message);
    assert.doesNotMatch(result.stderr, /hunter2|internal error|\n\s+at /);
  }
});
