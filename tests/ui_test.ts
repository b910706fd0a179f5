/**
 * The web UI in a real browser (Debian's chromium through playwright-core):
 * on a cluster of `runnel server` and `runnel agent` processes over a real
 * 3-member etcd, and over a local state directory with `runnel ui`. Each
 * page's screenshot is left in tests/artifacts/ui/.
 *
 * @module
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import type { Page, Request as BrowserRequest } from "npm:playwright-core@1.65.2";
import { ignoreWithoutEtcd, startEtcdCluster } from "./_etcd.ts";
import { ignoreWithoutChromium, launchBrowser, SCREENSHOTS } from "./_browser.ts";
import { CLI_PERMISSIONS, MAIN, poll, runCli, sandbox, spawnCli, waitForLine } from "./_helpers.ts";

const JOIN_TOKEN = "ui-test-join-token-0123456789";
const ADMIN_TOKEN = "ui-test-admin-token-0123456789abcdef";
const HEARTBEAT = "500ms";
const AS_ADMIN = { authorization: `Bearer ${ADMIN_TOKEN}` };

function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

function spawnRunnel(args: string[], env: Record<string, string> = {}): Deno.ChildProcess {
  return new Deno.Command(Deno.execPath(), {
    args: ["run", ...CLI_PERMISSIONS, MAIN, ...args],
    env: { NO_COLOR: "1", ...env },
    stdout: "null",
    stderr: "null",
  }).spawn();
}

async function stopProcess(child: Deno.ChildProcess, signal: Deno.Signal = "SIGTERM") {
  try {
    child.kill(signal);
  } catch {
    // Already gone.
  }
  await child.status;
}

/** Every request a page makes, to check none leaves its origin. */
function recordRequests(page: Page): string[] {
  // A loaded CI machine (2 cores, suites side by side) gets room beyond playwright's 30 s.
  page.setDefaultTimeout(60_000);
  const urls: string[] = [];
  page.on("request", (request: BrowserRequest) => urls.push(request.url()));
  return urls;
}

function assertSameOrigin(urls: string[], origin: string): void {
  assert.ok(urls.length > 0, "the page made requests");
  const elsewhere = urls.filter((url) =>
    !url.startsWith(`${origin}/`) && !url.startsWith("blob:") && !url.startsWith("data:")
  );
  assert.deepEqual(elsewhere, [], "the page asked another origin");
}

/** A GET of /ui/api/runs naming `host` (fetch cannot set Host), as its status line and headers. */
async function rawGet(origin: string, host: string): Promise<string> {
  const { hostname, port } = new URL(origin);
  const connection = await Deno.connect({ hostname, port: Number(port) });
  try {
    await connection.write(
      new TextEncoder().encode(
        `GET /ui/api/runs HTTP/1.1\r\nhost: ${host}\r\nconnection: close\r\n\r\n`,
      ),
    );
    const buffer = new Uint8Array(4096);
    const read = await connection.read(buffer);
    return new TextDecoder().decode(buffer.subarray(0, read ?? 0));
  } finally {
    connection.close();
  }
}

async function screenshot(page: Page, name: string): Promise<void> {
  await Deno.mkdir(SCREENSHOTS, { recursive: true });
  await page.screenshot({ path: `${SCREENSHOTS}/${name}.png`, fullPage: true });
}

/** The class of a step's box in the graph (its status colour). */
async function boxStatus(page: Page, step: string): Promise<string> {
  const className = await page.getAttribute(`svg g.node[data-group="${step}"]`, "class") ?? "";
  return /st-([a-z]+)/.exec(className)?.[1] ?? "";
}

async function waitForBox(page: Page, step: string, status: string): Promise<void> {
  await page.waitForSelector(`svg g.node[data-group="${step}"].st-${status}`);
}

/** A step that writes a 64 KiB artifact, then ticks until a file appears; a matrix; a long tail. */
function pipeline(release: string): string {
  return `name: ui-demo
steps:
  make:
    backend: shell
    run: |
      echo "starting make"
      head -c 65536 /dev/urandom > "$RUNNEL_OUTPUT_BLOB_BIN"
      i=0
      while [ ! -f ${release} ]; do i=$((i+1)); echo "tick $i"; sleep 0.1; done
      echo "released"
    outputs: [blob.bin]
  fan:
    needs: [make]
    backend: shell
    matrix: { n: [1, 2, 3] }
    run: echo leg \${{ matrix.n }}
  tail:
    needs: [fan]
    backend: shell
    run: |
      while true; do echo still going; sleep 0.2; done
`;
}

Deno.test({
  name:
    "ui: a cluster's run page draws the DAG live, streams a log, survives its server's restart, downloads an artifact, cancels; workers go offline",
  ignore: ignoreWithoutChromium() || ignoreWithoutEtcd(),
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    await using box = await sandbox();
    await using etcd = await startEtcdCluster({ members: 3 });
    const adminFile = `${box.dir}/admin.token`;
    await Deno.writeTextFile(adminFile, `${ADMIN_TOKEN}\n`, { mode: 0o600 });
    const artifacts = `${box.dir}/artifacts`;
    const [httpPort, grpcPort] = [freePort(), freePort()];
    const http = `http://127.0.0.1:${httpPort}`;
    const startServer = () =>
      spawnRunnel([
        "server",
        "--etcd",
        etcd.endpoints.join(","),
        "--id",
        "server-a",
        "--listen",
        `127.0.0.1:${httpPort}`,
        "--grpc",
        `127.0.0.1:${grpcPort}`,
        "--heartbeat",
        HEARTBEAT,
        "--admin-token-file",
        adminFile,
        "--artifacts",
        artifacts,
      ], { RUNNEL_TOKEN: JOIN_TOKEN });
    const ready = () =>
      poll(async () => {
        const response = await fetch(`${http}/ready`);
        await response.body?.cancel();
        return response.ok ? true : undefined;
      }, { what: "server ready", timeoutMs: 30_000, retryOnError: true });
    let server = startServer();
    const agent = spawnRunnel([
      "agent",
      "--server",
      `127.0.0.1:${grpcPort}`,
      "--id",
      "worker-1",
      "--labels",
      "cloud=aws,region=eu",
      "--allow-shell",
      "--artifacts",
      artifacts,
      "--state-dir",
      `${box.dir}/agent`,
    ], { RUNNEL_TOKEN: JOIN_TOKEN });
    await using browser = await launchBrowser();
    try {
      await ready();
      await poll(async () => {
        const state = await (await fetch(`${http}/cluster-state`, { headers: AS_ADMIN })).json();
        return state.workers.length === 1 ? true : undefined;
      }, { what: "worker-1 registered", timeoutMs: 30_000, retryOnError: true });

      const release = `${box.dir}/release`;
      const submitted = await fetch(`${http}/api/runs`, {
        method: "POST",
        headers: { ...AS_ADMIN, "content-type": "application/json" },
        body: JSON.stringify({ source: pipeline(release), file: "ui.yaml" }),
      });
      assert.equal(submitted.status, 201, await submitted.clone().text());
      const { runId } = await submitted.json();

      // Without a token: the page asks for one, and its calls are refused.
      const anonymous = await browser.newPage();
      recordRequests(anonymous);
      const refused = await anonymous.request.get(`${http}/ui/api/runs/${runId}`);
      assert.equal(refused.status(), 401);
      await anonymous.goto(`${http}/ui/runs/${runId}`);
      await anonymous.waitForSelector("#login:not([hidden])");
      assert.equal(await anonymous.isHidden("#main"), true);
      await anonymous.fill("#token", "rnl_wrong_token");
      await anonymous.click("#login-form button");
      await anonymous.waitForSelector("#login-error:has-text('refused')");
      await screenshot(anonymous, "login");
      await anonymous.close();

      // `/` and the old run page lead to the UI.
      const root = await fetch(`${http}/`, { redirect: "manual" });
      await root.body?.cancel();
      assert.equal(root.headers.get("location"), "/ui/");

      const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
      const requests = recordRequests(page);
      const errors: string[] = [];
      page.on("pageerror", (error) => errors.push(error.message));
      await page.goto(`${http}/ui/runs/${runId}`);
      await page.fill("#token", ADMIN_TOKEN);
      await page.click("#login-form button");
      await page.waitForSelector("svg g.node[data-group='make']");
      // The matrix is one box with its count.
      assert.match(await page.textContent("svg g.node[data-group='fan'] .label") ?? "", /fan ×3/);
      assert.equal(await page.locator("#steps tbody tr").count(), 5);
      await waitForBox(page, "make", "running");
      assert.equal(await boxStatus(page, "fan"), "pending");

      // The step's log: lines arrive while it runs.
      await page.click("svg g.node[data-group='make']");
      await page.waitForSelector("#log:has-text('tick 3')");
      const ticks = () =>
        page.$eval("#log", (log) => Number(/tick (\d+)\s*$/.exec(log.textContent ?? "")?.[1] ?? 0));
      const seen = await ticks();
      await poll(async () => (await ticks()) > seen + 3 ? true : undefined, {
        what: "new log lines",
      });
      assert.doesNotMatch(await page.textContent("#log") ?? "", /tick 1\s+tick 1\b/);
      assert.equal(await page.isVisible("#cancel"), true, "an admin may cancel");
      await screenshot(page, "run-running");

      // The server dies and comes back: the page keeps its view and goes on live.
      await page.evaluate("document.body.dataset.marker = 'kept'");
      await stopProcess(server, "SIGKILL");
      await page.waitForSelector("#connection:has-text('reconnecting')");
      server = startServer();
      await ready();
      await Deno.writeTextFile(release, "go\n");
      await waitForBox(page, "make", "succeeded");
      await waitForBox(page, "fan", "succeeded");
      await waitForBox(page, "tail", "running");
      assert.equal(await page.getAttribute("body", "data-marker"), "kept", "no reload");
      assert.equal(await page.textContent("#connection"), "");
      await page.waitForSelector("#log:has-text('released')");

      // The artifact: size, digest, and a download whose bytes hash to it.
      const link = page.locator("#artifacts a[data-digest]");
      await link.waitFor();
      const digest = await link.getAttribute("data-digest");
      const record = await (await fetch(`${http}/api/runs/${runId}`, { headers: AS_ADMIN })).json();
      assert.equal(digest, record.steps.make.outputs["blob.bin"].digest);
      assert.match(await page.textContent("#artifacts tbody") ?? "", /64 KiB/);
      const [download] = await Promise.all([page.waitForEvent("download"), link.click()]);
      assert.equal(download.suggestedFilename(), "blob.bin");
      const saved = `${box.dir}/downloaded.bin`;
      await download.saveAs(saved);
      const bytes = await Deno.readFile(saved);
      assert.equal(bytes.byteLength, 65536);
      assert.equal(`sha256:${createHash("sha256").update(bytes).digest("hex")}`, digest);
      // The same file from the API: an attachment, never a page.
      const direct = await fetch(`${http}/api/runs/${runId}/artifacts/make/blob.bin`, {
        headers: AS_ADMIN,
      });
      await direct.body?.cancel();
      assert.match(direct.headers.get("content-disposition") ?? "", /^attachment;/);
      assert.equal(direct.headers.get("content-type"), "application/octet-stream");

      // Cancel from the page.
      await page.click("svg g.node[data-group='tail']");
      await page.waitForSelector("#log:has-text('still going')");
      await page.click("#cancel");
      await page.waitForSelector("#run-header .badge.st-cancelled");
      await waitForBox(page, "tail", "cancelled");
      assert.equal(await page.isHidden("#cancel"), true);
      const after = await (await fetch(`${http}/api/runs/${runId}`, { headers: AS_ADMIN })).json();
      assert.equal(after.run.status, "cancelled");
      await screenshot(page, "run-cancelled");

      // A read token sees the run and no button that changes it.
      const made = await fetch(`${http}/api/tokens`, {
        method: "POST",
        headers: { ...AS_ADMIN, "content-type": "application/json" },
        body: JSON.stringify({ name: "viewer", role: "read" }),
      });
      const { token: readToken } = await made.json();
      const viewer = await browser.newPage();
      await viewer.goto(`${http}/ui/runs/${runId}`);
      await viewer.fill("#token", readToken);
      await viewer.click("#login-form button");
      await viewer.waitForSelector("#run-header .badge.st-cancelled");
      assert.match(await viewer.textContent("#session") ?? "", /role: read/);
      for (const button of ["#cancel", "#resume", "#retry"]) {
        assert.equal(await viewer.isHidden(button), true, `${button} hidden for read`);
      }
      await viewer.close();

      // Runs: the run is listed, newest first, with who submitted it.
      await page.goto(`${http}/ui/`);
      const row = page.locator(`#runs tr[data-run="${runId}"]`);
      await row.waitFor();
      assert.match(await row.textContent() ?? "", /ui-demo.*cancelled.*admin/s);
      await page.selectOption("#filter-status", "succeeded");
      await page.click("#filters button");
      await page.waitForSelector("#runs-status:has-text('No runs match')");
      await page.selectOption("#filter-status", "");
      await page.click("#filters button");
      await row.waitFor();
      await screenshot(page, "runs");

      // Workers: online, then offline once its agent is SIGKILLed.
      await page.goto(`${http}/ui/workers`);
      await page.waitForSelector("#workers tr[data-agent='worker-1'][data-status='online']");
      assert.match(await page.textContent("#workers") ?? "", /cloud=aws/);
      assert.match(await page.textContent("#workers") ?? "", /shell/);
      assert.equal(await page.textContent("[data-fact='Scheduler']"), "server-a");
      assert.match(await page.textContent("[data-fact='Term']") ?? "", /^\d+$/);
      await screenshot(page, "workers-online");
      await stopProcess(agent, "SIGKILL");
      await page.waitForSelector("#workers tr[data-agent='worker-1'][data-status='offline']");
      await screenshot(page, "workers-offline");

      assertSameOrigin(requests, http);
      assert.deepEqual(errors, []);
      await page.close();
    } finally {
      await stopProcess(agent, "SIGKILL");
      await stopProcess(server);
    }
  },
});

Deno.test({
  name:
    "ui: runnel ui serves a local state directory: the failed path is marked; loopback names and its own origin only",
  ignore: ignoreWithoutChromium(),
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    await using box = await sandbox();
    const file = await box.write(
      "local.yaml",
      `name: local-ui
steps:
  gen:
    backend: shell
    run: echo generated
  fan:
    needs: [gen]
    backend: shell
    matrix: { n: [1, 2] }
    run: echo leg \${{ matrix.n }}
  bad:
    needs: [gen]
    backend: shell
    run: |
      echo "about to fail"
      exit 3
  after:
    needs: [fan, bad]
    backend: shell
    run: echo never
`,
    );
    const ran = await runCli(["run", file, "--state-dir", box.stateDir], { cwd: box.dir });
    assert.equal(ran.code, 1, ran.stderr);
    const ui = spawnCli(["ui", "--state-dir", box.stateDir, "--listen", "127.0.0.1:0"], {
      cwd: box.dir,
    });
    await using browser = await launchBrowser();
    try {
      const line = await waitForLine(ui.lines, (text) => text.startsWith("runnel ui: "));
      const origin = /(http:\/\/127\.0\.0\.1:\d+)/.exec(line)![1];
      // A page of another origin cannot post a cancel; a rebound DNS name is not answered.
      const forged = await fetch(`${origin}/api/runs/x/cancel`, {
        method: "POST",
        headers: { origin: "http://evil.example" },
      });
      await forged.body?.cancel();
      assert.equal(forged.status, 403);
      assert.match(await rawGet(origin, "evil.example"), /^HTTP\/1\.1 421/);
      assert.match(await rawGet(origin, "127.0.0.1"), /^HTTP\/1\.1 200/);

      const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
      const requests = recordRequests(page);
      await page.goto(`${origin}/`);
      const link = page.locator("#runs tbody a");
      await link.waitFor();
      assert.match(await page.textContent("#runs") ?? "", /local-ui.*failed.*local/s);
      await link.click();
      await waitForBox(page, "bad", "failed");
      await waitForBox(page, "after", "skipped");
      await waitForBox(page, "fan", "succeeded");
      // The path to the failure is drawn red; the rest is not.
      assert.equal(await page.locator("path.edge.failed-path").count(), 1);
      assert.equal(await page.locator("path.edge").count(), 4);
      await page.keyboard.press("Tab");
      await page.focus("svg g.node[data-group='bad']");
      await page.keyboard.press("Enter");
      await page.waitForSelector("#log:has-text('about to fail')");
      assert.match(await page.textContent("#step-reason") ?? "", /exited with code 3/);
      // Local runs end with the runner: no resume or retry from here.
      assert.equal(await page.isHidden("#resume"), true);
      await screenshot(page, "local-run");
      await page.goto(`${origin}/ui/workers`);
      await page.waitForSelector("#workers-status:has-text('Local mode')");
      assertSameOrigin(requests, origin);
      await page.close();
    } finally {
      await stopProcess(ui.child);
    }
  },
});
