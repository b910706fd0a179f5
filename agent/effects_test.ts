import assert from "node:assert/strict";
import { deliverWebhook, MAX_TIMER_DELAY_MS, WakeTimer, WebhookAllowList } from "./effects.ts";
import type { FailureInfo, WebhookSpec } from "../core/model.ts";

Deno.test("webhook allow-list: hosts, ports, subdomains; nothing by default", () => {
  const allow = new WebhookAllowList(["hooks.example.com", "10.0.0.5:8443", "*.corp.example"]);
  assert.ok(allow.allows("https://hooks.example.com/x"));
  assert.ok(allow.allows("http://HOOKS.example.com/x"));
  assert.ok(!allow.allows("https://hooks.example.com:8443/x"), "a bare host is its default port");
  assert.ok(allow.allows("http://10.0.0.5:8443/"));
  assert.ok(!allow.allows("http://10.0.0.5/"));
  assert.ok(allow.allows("https://a.b.corp.example/"));
  assert.ok(!allow.allows("https://corp.example/"));
  assert.ok(!allow.allows("https://evilcorp.example/"));
  assert.ok(!allow.allows("https://hooks.example.com.evil.test/"));
  assert.ok(!allow.allows("ftp://hooks.example.com/"));
  assert.ok(!allow.allows("not a url"));
  const none = new WebhookAllowList([]);
  assert.ok(!none.allows("http://127.0.0.1/"));
  assert.equal(none.describe(), "none");
  for (const bad of ["http://x", "a/b", "host:99999", ""]) {
    assert.throws(() => new WebhookAllowList([bad]), /Expected a webhook host/);
  }
});

Deno.test("webhook delivery: a host off the list is refused before anything is sent", async () => {
  let hits = 0;
  await using server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, () => {
    hits++;
    return new Response(null, { status: 302, headers: { location: "http://169.254.169.254/" } });
  });
  const url = `http://127.0.0.1:${server.addr.port}/hook?key=secret-in-query`;
  const spec: WebhookSpec = { url, headers: {}, retries: 0, backoffMs: 0, timeoutMs: 5_000 };
  const failure = { runId: "r", stepId: "s" } as FailureInfo;
  await assert.rejects(
    deliverWebhook(spec, failure, { allow: new WebhookAllowList([]) }),
    (error: Error) =>
      /127\.0\.0\.1:\d+ refused: not a host this server allows \(--webhook-allow: none\)/.test(
        error.message,
      ) && !error.message.includes("secret-in-query"),
  );
  assert.equal(hits, 0);
  // Allowed, but its redirect is not followed.
  await assert.rejects(
    deliverWebhook(spec, failure, {
      allow: new WebhookAllowList([`127.0.0.1:${server.addr.port}`]),
    }),
    /HTTP 302 \(redirects are not followed\)/,
  );
  assert.equal(hits, 1);
});

Deno.test("webhook delivery: a failure names host:port, never the URL's path", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  const url = `http://127.0.0.1:${port}/services/T000/B000/secret-path-token`;
  await assert.rejects(
    deliverWebhook(
      { url, headers: {}, retries: 0, backoffMs: 0, timeoutMs: 2_000 },
      { runId: "r", stepId: "s" } as FailureInfo,
    ),
    (error: Error) =>
      error.message.startsWith(`webhook 127.0.0.1:${port} failed:`) &&
      !error.message.includes("secret-path-token"),
  );
});

/** Replaces the global timers while `body` runs: timers fire only when the test says so. */
function withFakeTimers(
  body: (timers: { delays: number[]; fire: () => void }) => void,
): void {
  const real = { setTimeout: globalThis.setTimeout, clearTimeout: globalThis.clearTimeout };
  const armed = new Map<number, () => void>();
  const delays: number[] = [];
  let next = 1;
  globalThis.setTimeout = ((callback: () => void, delay: number) => {
    delays.push(delay);
    armed.set(next, callback);
    return next++;
  }) as unknown as typeof setTimeout;
  globalThis.clearTimeout = ((id: number) => armed.delete(id)) as unknown as typeof clearTimeout;
  const fire = () => {
    assert.equal(armed.size, 1, "expected exactly one armed timer");
    const [[id, callback]] = armed;
    armed.delete(id);
    callback();
  };
  try {
    body({ delays, fire });
  } finally {
    globalThis.setTimeout = real.setTimeout;
    globalThis.clearTimeout = real.clearTimeout;
  }
}

Deno.test("a wake 30 days away is reached in steps a timer can wait, then fires once", () => {
  withFakeTimers(({ delays, fire }) => {
    let now = 0;
    let woken = 0;
    const timer = new WakeTimer(() => woken++, () => now);
    const at = 30 * 86_400_000;
    timer.arm(at);
    assert.deepEqual(delays, [MAX_TIMER_DELAY_MS]);
    now += MAX_TIMER_DELAY_MS;
    fire();
    assert.equal(woken, 0, "a partial wait re-arms instead of waking");
    assert.deepEqual(delays, [MAX_TIMER_DELAY_MS, at - MAX_TIMER_DELAY_MS]);
    now = at;
    fire();
    assert.equal(woken, 1);
  });
});

Deno.test("a later wake never postpones an earlier one; NaN and Infinity arm nothing", () => {
  withFakeTimers(({ delays }) => {
    const timer = new WakeTimer(() => {}, () => 1_000);
    timer.arm(5_000);
    timer.arm(9_000);
    timer.arm(Number.NaN);
    timer.arm(Infinity);
    assert.deepEqual(delays, [4_000]);
    timer.arm(2_000);
    assert.deepEqual(delays, [4_000, 1_000]);
    timer.clear();
  });
});
