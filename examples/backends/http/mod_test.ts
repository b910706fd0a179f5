import assert from "node:assert/strict";
import { isSuccess } from "../../../backends/backend.ts";
import { checkBackendConformance, runToEnd, scratchSpec } from "../../../backends/testing.ts";
import { PluginHostPool } from "../../../backends/mod.ts";
import createHttpBackend from "./mod.ts";
import { httpManifest } from "./manifest.ts";

/**
 * A server on loopback answering every path with a greeting, 503 on /down;
 * /slow answers only once the client gives up.
 */
function serve(): Deno.HttpServer<Deno.NetAddr> {
  return Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (request) => {
    const path = new URL(request.url).pathname;
    if (path === "/down") return new Response("busy", { status: 503 });
    if (path === "/slow") {
      return new Promise<Response>((resolve) =>
        request.signal.addEventListener("abort", () => resolve(new Response("too late")))
      );
    }
    return new Response(`${request.method} ${path}\n`);
  });
}

Deno.test("http: keeps the backend contract", async () => {
  const server = serve();
  const base = `http://127.0.0.1:${server.addr.port}`;
  try {
    const report = await checkBackendConformance({
      backend: createHttpBackend,
      echo: { config: { with: { url: `${base}/hello` } }, stdout: "GET /hello\n" },
      long: { config: { with: { url: `${base}/slow` } } },
    });
    // A request does not outlive its host: nothing to re-attach.
    assert.deepEqual(report.skipped, ["re-attaches after a restart"]);
  } finally {
    await server.shutdown();
  }
});

Deno.test("http: the body goes to the declared output, the status line to the log", async () => {
  const server = serve();
  const url = `http://127.0.0.1:${server.addr.port}/data`;
  const spec = await scratchSpec({ with: { url, output: "body.txt" } }, {
    spec: { outputs: ["body.txt"] },
  });
  try {
    const result = await runToEnd(await createHttpBackend().start(spec));
    assert.ok(isSuccess(result.status), JSON.stringify(result));
    assert.match(result.stderr, /^GET http:\/\/127\.0\.0\.1:\d+\/data → 200 OK \(\d+ ms\)\n$/);
    assert.equal(await Deno.readTextFile(`${spec.outputsDir}/body.txt`), "GET /data\n");
  } finally {
    await server.shutdown();
    await spec.remove();
  }
});

Deno.test("http: a status outside `expect` fails the step; a refused connection is infrastructure", async () => {
  const server = serve();
  const spec = await scratchSpec({ with: { url: `http://127.0.0.1:${server.addr.port}/down` } });
  try {
    const down = await runToEnd(await createHttpBackend().start(spec));
    assert.equal(down.status.errorClass, "application");
    assert.match(down.status.message ?? "", /HTTP 503/);
    const accepted = await runToEnd(
      await createHttpBackend().start({
        ...spec,
        config: { with: { url: `http://127.0.0.1:${server.addr.port}/down`, expect: [503] } },
      }),
    );
    assert.ok(isSuccess(accepted.status));
  } finally {
    await server.shutdown();
  }
  const refused = await runToEnd(
    await createHttpBackend().start({
      ...spec,
      config: { with: { url: `http://127.0.0.1:${server.addr.port}/gone` } },
    }),
  );
  assert.equal(refused.status.errorClass, "infrastructure");
  await spec.remove();
});

Deno.test("http: the manifest grants the one host the step calls, and only that", async () => {
  const spec = await scratchSpec({});
  try {
    const grant = httpManifest.permissions(
      { with: { url: "https://api.example.com/v1/x" } },
      spec,
    );
    assert.deepEqual(grant, {
      read: [],
      write: [],
      net: ["api.example.com:443"],
      env: [],
      run: [],
    });
  } finally {
    await spec.remove();
  }
});

Deno.test("http: through a plugin host, a redirect to an undeclared host is refused", async () => {
  const target = serve();
  const redirect = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen() {} },
    () => Response.redirect(`http://localhost:${target.addr.port}/elsewhere`, 302),
  );
  const spec = await scratchSpec({
    with: { url: `http://127.0.0.1:${redirect.addr.port}/start` },
  });
  const pool = new PluginHostPool({
    plugins: [{ name: "http", module: new URL("./mod.ts", import.meta.url).href }],
    context: { scratchRoot: spec.scratchRoot, agentId: "http-test" },
  });
  try {
    const result = await runToEnd(
      await pool.backend("http").start(spec),
    );
    assert.equal(result.status.errorClass, "permission", JSON.stringify(result.status));
    assert.match(result.status.message ?? "", /denied net access to "localhost:\d+"/);
  } finally {
    await pool.close();
    await redirect.shutdown();
    await target.shutdown();
    await spec.remove();
  }
});
