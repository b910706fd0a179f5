/**
 * Email alerts (seed 004: "Email/Slack Alerts"): a run's end mailed
 * through the SMTP server the operator names, to a sink on loopback
 * written here; a missing server is said, never blocking the run.
 */

import assert from "node:assert/strict";
import { poll, runCli, sandbox } from "./_helpers.ts";

/** A loopback SMTP sink: accepts every message, keeps it. */
function smtpSink(): { port: number; messages: string[]; close(): void } {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const messages: string[] = [];
  const encoder = new TextEncoder();
  (async () => {
    for await (const conn of listener) {
      (async () => {
        const say = (line: string) => conn.write(encoder.encode(`${line}\r\n`));
        await say("220 sink ESMTP");
        let buffer = "";
        let data: string[] | undefined;
        const decoder = new TextDecoder();
        const chunk = new Uint8Array(64 * 1024);
        try {
          for (;;) {
            const read = await conn.read(chunk);
            if (read === null) break;
            buffer += decoder.decode(chunk.subarray(0, read), { stream: true });
            let end;
            while ((end = buffer.indexOf("\r\n")) >= 0) {
              const line = buffer.slice(0, end);
              buffer = buffer.slice(end + 2);
              if (data) {
                if (line === ".") {
                  messages.push(data.join("\n"));
                  data = undefined;
                  await say("250 queued");
                } else data.push(line);
                continue;
              }
              const verb = line.slice(0, 4).toUpperCase();
              if (verb === "DATA") {
                data = [];
                await say("354 go on");
              } else if (verb === "QUIT") {
                await say("221 bye");
                conn.close();
                return;
              } else await say("250 ok");
            }
          }
        } catch {
          // The client went away.
        }
      })();
    }
  })();
  return {
    port: (listener.addr as Deno.NetAddr).port,
    messages,
    close: () => listener.close(),
  };
}

Deno.test("alerts: a failed run is mailed through the operator's SMTP server; a success is not", async () => {
  await using box = await sandbox();
  const sink = smtpSink();
  try {
    const pipeline = (fail: boolean) =>
      `name: nightly-report
alerts:
  email: { to: [ops@example.com, oncall@example.com], subject: "[prod]" }
steps:
  report: { run: "${fail ? "exit 3" : "true"}", retry: { max: 0 } }
`;
    const smtp = ["--smtp", `127.0.0.1:${sink.port}`, "--smtp-from", "runnel@example.com"];
    const ok = await box.write("ok.yaml", pipeline(false));
    assert.equal(
      (await runCli(["run", ok, ...smtp, "--state-dir", box.stateDir], { cwd: box.dir })).code,
      0,
    );
    const bad = await box.write("bad.yaml", pipeline(true));
    const failed = await runCli(["run", bad, ...smtp, "--state-dir", box.stateDir], {
      cwd: box.dir,
    });
    assert.equal(failed.code, 1);
    const runId = /^run (\S+)/m.exec(failed.stdout)![1];
    await poll(() => sink.messages.length >= 1 || undefined, { what: "the alert mailed" });
    assert.equal(sink.messages.length, 1, "the success was not mailed");
    const mail = sink.messages[0];
    assert.match(
      mail,
      new RegExp(`Subject: \\[prod\\] \\[runnel\\] nightly-report: run ${runId} failed`),
    );
    assert.match(mail, /To: ops@example\.com, oncall@example\.com/);
    assert.match(mail, /Failed steps: report\./);

    // No SMTP server named: the run is not held up, and the run says why nothing was sent.
    const unsent = await runCli(["run", bad, "--state-dir", box.stateDir, "--json"], {
      cwd: box.dir,
    });
    assert.equal(unsent.code, 1);
    assert.match(unsent.stdout, /no SMTP server is configured here/);
  } finally {
    sink.close();
  }
});
