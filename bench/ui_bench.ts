/**
 * Benchmark: the web UI's page of a 1,000-step run in a real browser
 * (Debian's chromium through playwright-core), served by the UI's handler
 * over a cluster read model on an in-memory store:
 *
 * - time to first DAG render: from navigation in a fresh tab to the graph's
 *   first frame painted, against a blank page loaded from the same server
 *   (the anchor);
 * - update latency: from a step's state written to the store to its box's
 *   colour changed in the page (watch → SSE → DOM), against a fetch round
 *   trip from the same page (the anchor);
 * - the page's JS heap and DOM nodes, against the blank page's;
 * - the server's layout of the 1,000 steps, against serialising the plan.
 *
 * Targets from issue 16: first render ≤ 1 s, updates ≤ 100 ms.
 *
 * `deno task bench` (or `deno run -A bench/ui_bench.ts`); skipped with a
 * reason when /usr/bin/chromium is missing.
 *
 * @module
 */

import { openMemoryStore } from "../consensus/embedded.ts";
import type { StepState } from "../core/model.ts";
import { parsePipeline } from "../core/load.ts";
import { clusterKeys, type ClusterRunRecord } from "../agent/server/keys.ts";
import { clusterReadModel, createUiHandler, layoutDag, stepViews } from "../agent/ui/mod.ts";
import { chromiumInstalled, launchBrowser } from "../tests/_browser.ts";
import { median, printTable } from "./_table.ts";

const STEPS = 1_000;
const LOADS = 5;
const UPDATES = 30;
const TARGET_RENDER_MS = 1_000;
const TARGET_UPDATE_MS = 100;
const RUN_ID = "20261203-000000-bench1";

/** A 1,000-step DAG: each step needs 1 to 3 of the 40 before it (a deterministic LCG). */
function generate(): string {
  let state = 16;
  const next = () => (state = (state * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
  const lines = ["name: ui-bench", "steps:"];
  for (let i = 0; i < STEPS; i++) {
    lines.push(`  s${i}:`, `    backend: shell`, `    run: echo ${i}`);
    if (i > 0) {
      const needs = new Set<string>();
      const count = 1 + Math.floor(next() * 3);
      for (let n = 0; n < count; n++) {
        needs.add(`s${Math.max(0, i - 1 - Math.floor(next() * 40))}`);
      }
      lines.push(`    needs: [${[...needs].join(", ")}]`);
    }
  }
  return lines.join("\n") + "\n";
}

/** What the page functions use of the browser's globals (this file is checked without the DOM's types). */
interface Dom {
  document: { querySelectorAll(selector: string): { length: number } };
}

function pending(id: string): StepState {
  return { id, status: "pending", attemptsThisRound: 0, attempts: [] };
}

function running(id: string, at: number): StepState {
  return {
    id,
    status: "running",
    attemptsThisRound: 1,
    attemptId: `${RUN_ID}/${id}/1`,
    attempts: [{
      attemptId: `${RUN_ID}/${id}/1`,
      attempt: 1,
      scheduledAt: at,
      startedAt: at,
      worker: "bench",
    }],
  };
}

/** Runs the benchmark and prints its table. */
export async function benchUi(): Promise<void> {
  if (!chromiumInstalled()) {
    console.log("\nui bench skipped: no /usr/bin/chromium (apt-get install chromium)");
    return;
  }
  const plan = parsePipeline(generate(), { file: "ui-bench.yaml", baseDir: "/" });
  const store = openMemoryStore();
  const now = Date.now();
  const record: ClusterRunRecord = {
    runId: RUN_ID,
    pipeline: plan.name,
    file: "ui-bench.yaml",
    planDigest: plan.digest,
    status: "running",
    createdAt: now,
    startedAt: now,
    round: 1,
  };
  await store.put(clusterKeys.plan(RUN_ID), JSON.stringify(plan));
  await store.put(clusterKeys.run(RUN_ID), JSON.stringify(record));
  for (const id of plan.order) {
    await store.put(clusterKeys.step(RUN_ID, id), JSON.stringify(pending(id)));
  }

  // The server side alone: laying out the plan, against serialising it.
  const views = stepViews(plan);
  const layoutMs = median(Array.from({ length: LOADS }, () => {
    const start = performance.now();
    layoutDag(views);
    return performance.now() - start;
  }));
  const serialiseMs = median(Array.from({ length: LOADS }, () => {
    const start = performance.now();
    JSON.stringify(plan);
    return performance.now() - start;
  }));

  const ui = createUiHandler(
    clusterReadModel({
      serverId: "bench",
      store,
      heartbeatMs: 5_000,
      raftState: () =>
        Promise.resolve({
          node_id: "bench",
          state: "standalone",
          leader: "bench",
          term: 1,
          commit_index: 0,
        }),
      schedulerLeader: () => Promise.resolve("bench"),
    }),
  );
  const stop = new AbortController();
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, signal: stop.signal, onListen: () => {} },
    (request, info) => {
      if (new URL(request.url).pathname === "/blank") {
        return new Response("<!doctype html><title>blank</title><p>blank</p>", {
          headers: { "content-type": "text/html" },
        });
      }
      const gone = new AbortController();
      info.completed.finally(() => gone.abort());
      return ui(request, { role: "admin", signal: gone.signal });
    },
  );
  const origin = `http://127.0.0.1:${server.addr.port}`;
  await using browser = await launchBrowser();
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
    const cdp = await page.context().newCDPSession(page);
    await cdp.send("Performance.enable");
    const metrics = async () => {
      await cdp.send("HeapProfiler.collectGarbage");
      const { metrics } = await cdp.send("Performance.getMetrics");
      const of = (name: string) => metrics.find((metric) => metric.name === name)?.value ?? 0;
      return { heapMb: of("JSHeapUsedSize") / 2 ** 20, nodes: of("Nodes") };
    };

    const blankMs: number[] = [];
    for (let i = 0; i < LOADS; i++) {
      const fresh = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
      const start = performance.now();
      await fresh.goto(`${origin}/blank`);
      blankMs.push(performance.now() - start);
      await fresh.close();
    }
    await page.goto(`${origin}/blank`);
    const blank = await metrics();

    const boxes = new Set(plan.order.map((id) => plan.steps[id].name)).size;

    const renderMs: number[] = [];
    const inPageMs: number[] = [];
    for (let i = 0; i < LOADS; i++) {
      // A fresh tab each time, as a user opening the run's page.
      const fresh = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
      const start = performance.now();
      await fresh.goto(`${origin}/ui/runs/${RUN_ID}`);
      const painted = await fresh.waitForFunction(
        () => performance.getEntriesByName("runnel:dag-painted")[0]?.startTime,
        undefined,
        { polling: "raf", timeout: 30_000 },
      );
      renderMs.push(performance.now() - start);
      inPageMs.push(Number(await painted.jsonValue()));
      await fresh.close();
    }
    await page.goto(`${origin}/ui/runs/${RUN_ID}`);
    await page.waitForFunction(
      () => performance.getEntriesByName("runnel:dag-painted").length > 0,
      undefined,
      { polling: "raf", timeout: 30_000 },
    );
    // Every box coloured from the first records (the live stream is open).
    await page.waitForFunction(() =>
      (globalThis as unknown as Dom).document.querySelectorAll("#steps td .badge").length > 0
    );
    const loaded = await metrics();

    // Update latency: a step's record written to the store → its box's class changed.
    await page.evaluate(`
      globalThis.seen = {};
      new MutationObserver((changes) => {
        for (const change of changes) {
          if (change.target.classList.contains("st-running")) {
            globalThis.seen[change.target.getAttribute("data-group")] ??= Date.now();
          }
        }
      }).observe(document.querySelector("#dag"), {
        attributes: true,
        attributeFilter: ["class"],
        subtree: true,
      });
    `);
    // Steps whose boxes are on screen (the page makes the others as they scroll into view).
    const drawn: string[] = await page.$$eval(
      "#dag g.node",
      (nodes) => nodes.map((node) => node.getAttribute("data-group")!),
    );
    const updateMs: number[] = [];
    for (let i = 0; i < UPDATES; i++) {
      const id = drawn[Math.floor((i + 0.5) * drawn.length / UPDATES)];
      const written = Date.now();
      await store.put(clusterKeys.step(RUN_ID, id), JSON.stringify(running(id, written)));
      const at = await page.waitForFunction(
        (group) => (globalThis as unknown as { seen: Record<string, number> }).seen[group],
        id,
        { polling: 5, timeout: 10_000 },
      );
      updateMs.push(Number(await at.jsonValue()) - written);
    }
    const roundTripMs: number[] = await page.evaluate(async (count) => {
      const samples: number[] = [];
      for (let i = 0; i < count; i++) {
        const start = performance.now();
        await (await fetch("/blank", { cache: "no-store" })).text();
        samples.push(performance.now() - start);
      }
      return samples;
    }, UPDATES);

    const p95 = (samples: number[]) =>
      [...samples].sort((a, b) => a - b)[Math.ceil(samples.length * 0.95) - 1];
    const ms = (value: number) => `${value.toFixed(1)} ms`;
    const ratio = (value: number, anchor: number) => `${(value / anchor).toFixed(1)}×`;
    const render = median(renderMs);
    const update = median(updateMs);
    const anchorLoad = median(blankMs);
    const anchorTrip = median(roundTripMs);
    printTable(
      `ui · a ${STEPS}-step run's page in chromium (${boxes} boxes, ${LOADS} loads, ${UPDATES} updates)`,
      [
        {
          measure: "first DAG render",
          value: ms(render),
          anchor: `blank page load ${ms(anchorLoad)}`,
          ratio: ratio(render, anchorLoad),
          target: `≤ ${TARGET_RENDER_MS} ms ${render <= TARGET_RENDER_MS ? "ok" : "MISSED"}`,
        },
        {
          measure: "  of it in the page: navigation → painted",
          value: ms(median(inPageMs)),
          anchor: "",
          ratio: ratio(median(inPageMs), anchorLoad),
          target: "",
        },
        {
          measure: "update after a store write (median)",
          value: ms(update),
          anchor: `fetch round trip ${ms(anchorTrip)}`,
          ratio: ratio(update, anchorTrip),
          target: `≤ ${TARGET_UPDATE_MS} ms ${update <= TARGET_UPDATE_MS ? "ok" : "MISSED"}`,
        },
        {
          measure: "update (p95)",
          value: ms(p95(updateMs)),
          anchor: `fetch round trip ${ms(p95(roundTripMs))}`,
          ratio: ratio(p95(updateMs), p95(roundTripMs)),
          target: `≤ ${TARGET_UPDATE_MS} ms ${p95(updateMs) <= TARGET_UPDATE_MS ? "ok" : "MISSED"}`,
        },
        {
          measure: "JS heap after render",
          value: `${loaded.heapMb.toFixed(1)} MiB`,
          anchor: `blank page ${blank.heapMb.toFixed(1)} MiB`,
          ratio: ratio(loaded.heapMb, blank.heapMb),
          target: "",
        },
        {
          measure: "DOM nodes",
          value: String(loaded.nodes),
          anchor: `blank page ${blank.nodes}`,
          ratio: ratio(loaded.nodes, blank.nodes),
          target: "",
        },
        {
          measure: "server layout of the DAG",
          value: ms(layoutMs),
          anchor: `JSON.stringify(plan) ${ms(serialiseMs)}`,
          ratio: ratio(layoutMs, serialiseMs),
          target: "",
        },
      ],
    );
    await page.close();
  } finally {
    stop.abort();
    await server.finished;
    await store.close();
  }
}

if (import.meta.main) await benchUi();
