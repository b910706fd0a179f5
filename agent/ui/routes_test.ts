import assert from "node:assert/strict";
import { createUiHandler } from "./routes.ts";
import { type ReadModel, UiNotFoundError } from "./model.ts";

/** A read model with one run whose names are hostile, and one artifact that is HTML. */
function fakeModel(): ReadModel {
  const html = new TextEncoder().encode("<script>alert(1)</script>");
  return {
    mode: "cluster",
    actions: { cancel: true, resume: true, rerun: true },
    listRuns: () => Promise.resolve({ runs: [] }),
    getRun: (runId) => {
      if (runId !== "r1") return Promise.reject(new UiNotFoundError(`No run "${runId}"`));
      return Promise.resolve({
        run: { runId: "r1", pipeline: "p", status: "running", createdAt: 1 },
        plan: [{ id: "a", name: "a", backend: "shell", needs: [] }],
        steps: {},
      });
    },
    watchRun: async function* () {},
    logs: async function* () {},
    artifact: (_run, _step, name) =>
      Promise.resolve({
        name,
        digest: "sha256:00",
        size: html.byteLength,
        body: new Blob([html]).stream(),
      }),
    workers: () => Promise.resolve({ workers: [] }),
  };
}

const call = { role: "read" as const, signal: new AbortController().signal };

Deno.test("ui: step output is downloaded as an attachment, never served as a page", async () => {
  const ui = createUiHandler(fakeModel());
  const response = await ui(
    new Request(
      `http://x/ui/api/runs/r1/artifacts/a/${encodeURIComponent('rep"ort\r\n.html')}`,
    ),
    call,
  );
  assert.equal(response.status, 200);
  assert.equal(response.headers.get("content-type"), "application/octet-stream");
  assert.equal(response.headers.get("x-content-type-options"), "nosniff");
  assert.match(response.headers.get("content-security-policy")!, /sandbox/);
  const disposition = response.headers.get("content-disposition")!;
  assert.match(disposition, /^attachment; filename="rep_ort__\.html"; filename\*=UTF-8''rep/);
  assert.doesNotMatch(disposition, /[\r\n]/);
  await response.body?.cancel();
});

Deno.test("ui: a run id is escaped in its page; pages load nothing from another origin", async () => {
  const ui = createUiHandler(fakeModel());
  const id = '"><script>alert(1)</script>';
  const response = await ui(new Request(`http://x/ui/runs/${encodeURIComponent(id)}`), call);
  const page = await response.text();
  assert.ok(!page.includes("<script>alert"), "the id is escaped");
  assert.match(page, /&lt;script&gt;/);
  assert.doesNotMatch(page, /<script>[^<]/, "no inline script");
  assert.ok(!/(src|href)="(https?:)?\/\//.test(page), "nothing from another origin");
  const policy = response.headers.get("content-security-policy")!;
  assert.match(policy, /default-src 'none'/);
  assert.match(policy, /script-src 'self'/);
  assert.match(policy, /connect-src 'self'/);
});

Deno.test("ui: a read role is offered no action; unknown runs and bad queries are 404 and 400", async () => {
  const ui = createUiHandler(fakeModel());
  const session = await (await ui(new Request("http://x/ui/api/session"), call)).json();
  assert.deepEqual(session.actions, { cancel: false, resume: false, rerun: false });
  const admin = await ui(new Request("http://x/ui/api/session"), { ...call, role: "admin" });
  assert.deepEqual((await admin.json()).actions, { cancel: true, resume: true, rerun: true });
  const cancel = await ui(new Request("http://x/api/runs/r1/cancel", { method: "POST" }), call);
  assert.equal(cancel.status, 404, "a read role cannot cancel");
  await cancel.body?.cancel();
  const missing = await ui(new Request("http://x/ui/api/runs/nope"), call);
  assert.equal(missing.status, 404);
  assert.match((await missing.json()).message, /No run "nope"/);
  const bad = await ui(new Request("http://x/ui/api/runs?limit=100000"), call);
  assert.equal(bad.status, 400);
  await bad.body?.cancel();
  const detail = await (await ui(new Request("http://x/ui/api/runs/r1"), call)).json();
  assert.deepEqual(detail.layout.nodes.map((node: { id: string }) => node.id), ["a"]);
});
