// runnel's web UI: the one script of its three pages (runs, a run,
// workers). Served by runnel itself and loaded from no other origin; it
// talks only to the server that served it. Plain DOM, no framework.
//
// Tokens: a cluster asks for an API token. The sign-in form keeps it in
// this tab's sessionStorage (gone when the tab closes, never in a cookie, so
// no other site can make the browser use it) and every call sends it as
// "Authorization: Bearer". Live updates are server-sent events read with
// fetch (EventSource cannot send that header).

const TOKEN_KEY = "runnel.token";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const STEP_TERMINAL = new Set(["succeeded", "failed", "cancelled", "skipped"]);
/** The order a group of matrix legs shows its status by: the first found wins. */
const GROUP_PRIORITY = [
  "failed",
  "retrying",
  "running",
  "scheduled",
  "waiting",
  "pending",
  "cancelled",
  "skipped",
  "succeeded",
];
/** A non-colour cue for each status (the colours are not the only signal). */
const ICONS = {
  pending: "○",
  waiting: "⏸",
  scheduled: "◔",
  running: "▶",
  retrying: "↻",
  succeeded: "✓",
  failed: "✕",
  cancelled: "⊘",
  skipped: "↷",
};
/** Bytes of log text a page keeps per attempt: older text is dropped first. */
const MAX_LOG_CHARS = 2_000_000;
const SVG = "http://www.w3.org/2000/svg";

const page = document.body.dataset.page;

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function authHeaders() {
  const value = token();
  return value ? { authorization: `Bearer ${value}` } : {};
}

class Unauthorized extends Error {}

async function getJson(url) {
  const response = await fetch(url, { headers: authHeaders(), cache: "no-store" });
  if (response.status === 401) throw new Unauthorized(await messageOf(response));
  if (!response.ok) throw new Error(await messageOf(response));
  return await response.json();
}

async function postJson(url, body) {
  const response = await fetch(url, {
    method: "POST",
    headers: { ...authHeaders(), "content-type": "application/json" },
    body: JSON.stringify(body ?? {}),
  });
  if (response.status === 401) throw new Unauthorized(await messageOf(response));
  const value = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(value.message ?? `HTTP ${response.status}`);
  return value;
}

async function messageOf(response) {
  const body = await response.json().catch(() => undefined);
  return body?.message ?? `HTTP ${response.status}`;
}

/**
 * Reads a server-sent-events answer, calling onEvent for each event;
 * resolves true when the server ends the stream ("end"), false when the
 * connection ends without it.
 */
async function readEvents(url, onEvent, signal) {
  const response = await fetch(url, {
    headers: { ...authHeaders(), accept: "text/event-stream" },
    cache: "no-store",
    signal,
  });
  if (response.status === 401) throw new Unauthorized(await messageOf(response));
  if (!response.ok) throw new Error(await messageOf(response));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return false;
    buffer += value;
    let at;
    while ((at = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, at);
      buffer = buffer.slice(at + 2);
      let event = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (!data) continue;
      if (event === "end") return true;
      if (event === "error") throw new Error(JSON.parse(data).message);
      onEvent(event, JSON.parse(data));
    }
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function h(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) {
    if (child !== undefined && child !== null) node.append(child);
  }
  return node;
}

function s(tag, attributes = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

function badge(status) {
  return h("span", { class: `badge st-${status}` }, `${ICONS[status] ?? ""} ${status}`);
}

function formatDuration(ms) {
  if (ms === undefined || ms < 0 || Number.isNaN(ms)) return "";
  if (ms < 10_000) return `${(ms / 1000).toFixed(1)} s`;
  const seconds = Math.round(ms / 1000);
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ${seconds % 60}s`;
  return `${Math.floor(seconds / 3600)}h ${Math.floor(seconds % 3600 / 60)}m`;
}

function formatTime(ms) {
  return ms ? new Date(ms).toLocaleString() : "";
}

function formatBytes(bytes) {
  if (bytes === undefined) return "";
  if (bytes < 1024) return `${bytes} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let value = bytes / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

function pairs(map) {
  return Object.entries(map ?? {}).map(([key, value]) => `${key}=${value}`).join(", ");
}

function runDuration(run) {
  const start = run.startedAt ?? run.createdAt;
  return formatDuration(
    (run.finishedAt ?? (TERMINAL.has(run.status) ? start : Date.now())) - start,
  );
}

// ---- session and sign-in --------------------------------------------------

function showLogin(message) {
  document.getElementById("main").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message ?? "";
  document.getElementById("token").focus();
}

function wireLogin() {
  document.getElementById("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = document.getElementById("token").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    location.reload();
  });
  const signout = document.getElementById("signout");
  signout.hidden = !token();
  signout.addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    location.reload();
  });
}

function refused(error) {
  showLogin(
    token()
      ? `The token was refused: ${error.message}`
      : "This server needs an API token to show its runs.",
  );
}

async function start() {
  wireLogin();
  // A run's page asks for the run at once, beside the session: one round trip less.
  const runId = document.body.dataset.runId;
  const early = runId === undefined
    ? undefined
    : getJson(`/ui/api/runs/${encodeURIComponent(runId)}`);
  early?.catch(() => {});
  let session;
  try {
    session = await getJson("/ui/api/session");
  } catch (error) {
    if (error instanceof Unauthorized) return refused(error);
    document.getElementById("main").hidden = false;
    document.getElementById("main").prepend(
      h("p", { class: "error", role: "alert" }, error.message),
    );
    return;
  }
  document.getElementById("session").textContent = session.mode === "local"
    ? "local mode"
    : `role: ${session.role}`;
  document.getElementById("main").hidden = false;
  if (page === "runs") await runsPage();
  else if (page === "run") await runPage(session, early);
  else if (page === "workers") await workersPage(session);
}

// ---- runs -----------------------------------------------------------------

async function runsPage() {
  const params = new URLSearchParams(location.search);
  const status = document.getElementById("filter-status");
  const pipeline = document.getElementById("filter-pipeline");
  status.value = params.get("status") ?? "";
  pipeline.value = params.get("pipeline") ?? "";
  /** Cursors of the pages seen: the first page has none. */
  const cursors = [params.get("after") ?? undefined];
  let next;
  const newer = document.getElementById("newer");
  const older = document.getElementById("older");
  const body = document.querySelector("#runs tbody");
  const note = document.getElementById("runs-status");

  async function load() {
    const query = new URLSearchParams({ limit: "50" });
    if (status.value) query.set("status", status.value);
    if (pipeline.value.trim()) query.set("pipeline", pipeline.value.trim());
    const after = cursors.at(-1);
    if (after) query.set("after", after);
    let listed;
    try {
      listed = await getJson(`/ui/api/runs?${query}`);
    } catch (error) {
      if (error instanceof Unauthorized) return refused(error);
      note.textContent = `Could not list runs: ${error.message}`;
      return;
    }
    next = listed.next;
    const shownIds = [...body.rows].map((row) => row.dataset.run).join(" ");
    if (shownIds && shownIds === listed.runs.map((run) => run.runId).join(" ")) {
      // The same runs: their cells change in place, so focus and selection stay.
      for (const [i, run] of listed.runs.entries()) {
        const cells = body.rows[i].cells;
        if (cells[2].textContent.trim() !== `${ICONS[run.status]} ${run.status}`) {
          cells[2].replaceChildren(badge(run.status));
        }
        cells[3].textContent = formatTime(run.startedAt ?? run.createdAt);
        cells[4].textContent = runDuration(run);
      }
    } else {
      body.replaceChildren(...listed.runs.map((run) =>
        h(
          "tr",
          { "data-run": run.runId },
          h(
            "td",
            {},
            h("a", { href: `/ui/runs/${encodeURIComponent(run.runId)}` }, run.name ?? run.runId),
          ),
          h("td", {}, run.pipeline),
          h("td", {}, badge(run.status)),
          h("td", {}, formatTime(run.startedAt ?? run.createdAt)),
          h("td", {}, runDuration(run)),
          h("td", {}, run.submitter ?? ""),
          h("td", { class: "mono" }, pairs(run.params)),
        )
      ));
    }
    const count = listed.runs.length;
    note.textContent = count === 0
      ? "No runs match."
      : `${count} run${count === 1 ? "" : "s"} on this page${
        next ? "; older ones on the next" : ""
      }.`;
    newer.disabled = cursors.length <= 1;
    older.disabled = !next;
    const shown = new URLSearchParams();
    if (status.value) shown.set("status", status.value);
    if (pipeline.value.trim()) shown.set("pipeline", pipeline.value.trim());
    if (after) shown.set("after", after);
    history.replaceState(null, "", shown.size ? `?${shown}` : location.pathname);
  }

  document.getElementById("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    cursors.splice(0, cursors.length, undefined);
    load();
  });
  older.addEventListener("click", () => {
    if (!next) return;
    cursors.push(next);
    load();
  });
  newer.addEventListener("click", () => {
    if (cursors.length > 1) cursors.pop();
    load();
  });
  await load();
  // Live statuses: the page shown is read again every few seconds.
  setInterval(() => {
    if (!document.hidden) load();
  }, 3000);
}

// ---- a run ----------------------------------------------------------------

async function runPage(session, early) {
  const runId = document.body.dataset.runId;
  const base = `/ui/api/runs/${encodeURIComponent(runId)}`;
  const view = {
    run: undefined,
    /** Step instances in DAG order. */
    plan: [],
    byId: new Map(),
    steps: new Map(),
    /** name → { ids, node, label, detail } */
    groups: new Map(),
    rows: new Map(),
    edges: [],
    selected: undefined,
    attempt: undefined,
    logStream: undefined,
    dirty: new Set(),
    scheduled: false,
    /** Every row of the step table is made (it is filled in slices). */
    tableDone: false,
  };
  const connection = document.getElementById("connection");

  let detail;
  try {
    detail = await (early ?? getJson(base));
  } catch (error) {
    if (error instanceof Unauthorized) return refused(error);
    connection.textContent = error.message;
    connection.className = "error";
    return;
  }
  view.run = detail.run;
  view.plan = detail.plan;
  for (const step of detail.plan) view.byId.set(step.id, step);
  for (const [id, step] of Object.entries(detail.steps)) view.steps.set(id, step);
  drawLegend();
  drawDag(view, detail.layout);
  view.drawVisible();
  // For bench/ui_bench.ts: when the graph's first frame is painted.
  requestAnimationFrame(() => requestAnimationFrame(() => performance.mark("runnel:dag-painted")));
  drawTable(view);
  renderHeader(view, session);
  for (const name of view.groups.keys()) view.dirty.add(name);
  flush(view);
  wireActions(view, session, base);
  const wanted = new URLSearchParams(location.hash.slice(1)).get("step");
  if (wanted && view.byId.has(wanted)) select(view, wanted, base, session);

  // Durations of running steps and of the run tick while the page is open.
  setInterval(() => {
    if (document.hidden) return;
    for (const [id, step] of view.steps) {
      if (step.status === "running") updateRow(view, id);
    }
    if (!TERMINAL.has(view.run.status)) renderHeader(view, session);
  }, 1000);

  // Live: the events stream starts with every record as it is, then changes;
  // after a lost connection (a server gone, a failover) it is opened again
  // and the view is brought up to date in place.
  let delay = 500;
  for (;;) {
    try {
      const ended = await readEvents(`${base}/events`, (type, data) => {
        delay = 500;
        if (connection.textContent) connection.textContent = "";
        if (type === "run") {
          view.run = data;
          renderHeader(view, session);
        } else if (type === "step") {
          view.steps.set(data.id, data);
          if (!view.byId.has(data.id)) adoptStep(view, data.id);
          const step = view.byId.get(data.id);
          if (step) view.dirty.add(step.name);
          updateRow(view, data.id);
          if (view.selected === data.id) updatePanel(view, base, session);
          schedule(view);
        }
      });
      if (ended && TERMINAL.has(view.run.status)) return;
    } catch (error) {
      if (error instanceof Unauthorized) return refused(error);
    }
    connection.textContent = `Live updates lost; reconnecting in ${delay / 1000} s…`;
    await sleep(delay);
    delay = Math.min(delay * 2, 5000);
  }
}

function drawLegend() {
  const legend = document.getElementById("legend");
  legend.replaceChildren(
    ...GROUP_PRIORITY.map((status) =>
      h("li", {}, h("span", { class: `swatch st-${status}`, "aria-hidden": "true" }), ` ${status}`)
    ),
  );
}

function drawDag(view, layout) {
  const host = document.getElementById("dag");
  const svg = s("svg", {
    viewBox: `0 0 ${layout.width} ${layout.height}`,
    width: String(layout.width),
    height: String(layout.height),
    role: "group",
    "aria-label": `Graph of ${layout.nodes.length} steps`,
  });
  const defs = s("defs");
  const marker = s("marker", {
    id: "arrow",
    viewBox: "0 0 10 10",
    refX: "10",
    refY: "5",
    markerWidth: "8",
    markerHeight: "8",
    markerUnits: "userSpaceOnUse",
    orient: "auto-start-reverse",
  });
  marker.append(s("path", { d: "M0 0L10 5L0 10z", class: "arrow" }));
  defs.append(marker);
  svg.append(defs);
  const edges = s("g", { class: "edges", "aria-hidden": "true" });
  svg.append(edges);
  const members = new Map();
  for (const step of view.plan) {
    if (!members.has(step.name)) members.set(step.name, []);
    members.get(step.name).push(step.id);
  }
  const at = new Map(layout.nodes.map((node) => [node.id, node]));
  for (const node of layout.nodes) {
    view.groups.set(node.id, { ids: members.get(node.id) ?? [], box: node });
  }
  for (const edge of layout.edges) {
    const from = at.get(edge.from);
    const to = at.get(edge.to);
    view.edges.push({
      from: edge.from,
      to: edge.to,
      d: edge.path,
      x: [from.x + layout.nodeWidth, to.x],
      y: [Math.min(from.y, to.y), Math.max(from.y, to.y) + layout.nodeHeight],
    });
  }
  const nodes = s("g", { class: "nodes" });
  svg.append(nodes);
  nodes.addEventListener("click", (event) => pickGroup(view, event.target.closest(".node")));
  nodes.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" && event.key !== " ") return;
    event.preventDefault();
    pickGroup(view, event.target.closest(".node"));
  });
  host.replaceChildren(svg);

  // Only what is on screen (and a screen around it) is made: a 1,000-step
  // graph costs what its visible part does; scrolling makes the rest. The
  // step table below lists every step for keyboards and screen readers.
  const drawVisible = () => {
    const width = host.clientWidth || 1200;
    const height = host.clientHeight || 600;
    const left = host.scrollLeft - width;
    const right = host.scrollLeft + 2 * width;
    const top = host.scrollTop - height;
    const bottom = host.scrollTop + 2 * height;
    const fresh = [];
    for (const edge of view.edges) {
      if (edge.path || edge.x[1] < left || edge.x[0] > right) continue;
      if (edge.y[1] < top || edge.y[0] > bottom) continue;
      edge.path = s("path", {
        d: edge.d,
        class: edge.onPath ? "edge failed-path" : "edge",
        "marker-end": "url(#arrow)",
      });
      fresh.push(edge.path);
    }
    edges.append(...fresh);
    fresh.length = 0;
    for (const [name, group] of view.groups) {
      const box = group.box;
      if (group.node || box.x + layout.nodeWidth < left || box.x > right) continue;
      if (box.y + layout.nodeHeight < top || box.y > bottom) continue;
      const g = s("g", {
        class: "node st-pending",
        transform: `translate(${box.x},${box.y})`,
        tabindex: "0",
        role: "button",
        "data-group": name,
      });
      const title = s("title");
      const rect = s("rect", {
        width: String(layout.nodeWidth),
        height: String(layout.nodeHeight),
        rx: "6",
      });
      const label = s("text", { x: "10", y: "19", class: "label" });
      const shown = name.length > 22 ? `${name.slice(0, 21)}…` : name;
      label.textContent = box.count > 1 ? `${shown} ×${box.count}` : shown;
      const detail = s("text", { x: "10", y: "37", class: "detail" });
      g.append(title, rect, label, detail);
      Object.assign(group, { node: g, title, detail });
      fresh.push(g);
      view.dirty.add(name);
    }
    nodes.append(...fresh);
    if (fresh.length > 0) flush(view);
  };
  let pending = false;
  const later = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      drawVisible();
    });
  };
  host.addEventListener("scroll", later, { passive: true });
  addEventListener("resize", later);
  view.drawVisible = drawVisible;
}

/** A box picked: its step, or of matrix legs the first failed (else running) one. */
function pickGroup(view, node) {
  if (!node) return;
  const group = view.groups.get(node.dataset.group);
  if (!group || group.ids.length === 0) return;
  const statusOf = (id) => view.steps.get(id)?.status ?? "pending";
  const id = group.ids.find((id) => statusOf(id) === "failed") ??
    group.ids.find((id) => statusOf(id) === "running") ?? group.ids[0];
  view.onSelect?.(id);
}

/** Table rows made per task: the graph is painted first, the rows follow in slices. */
const ROWS_PER_SLICE = 200;

function drawTable(view) {
  const body = document.querySelector("#steps tbody");
  body.replaceChildren();
  let next = 0;
  const slice = () => {
    const rows = [];
    for (const step of view.plan.slice(next, next + ROWS_PER_SLICE)) rows.push(stepRow(view, step));
    body.append(...rows);
    next += ROWS_PER_SLICE;
    if (next < view.plan.length) setTimeout(slice, 0);
    else view.tableDone = true;
  };
  // After the graph's first frame.
  requestAnimationFrame(() => setTimeout(slice, 0));
}

function stepRow(view, step) {
  const button = h("button", {
    type: "button",
    class: "link",
    onclick: () => view.onSelect?.(step.id),
  }, step.id);
  const row = h(
    "tr",
    { "data-step": step.id },
    h("th", { scope: "row" }, button),
    h("td"),
    h("td"),
    h("td"),
    h("td", {}, step.backend),
    h("td"),
    h("td"),
    h("td"),
  );
  if (step.id === view.selected) row.setAttribute("aria-selected", "true");
  view.rows.set(step.id, row);
  updateRow(view, step.id);
  return row;
}

/**
 * A step the page has not seen: a leg a split node made at run time
 * (`batch:`, `foreach:`). It joins its step's box and gets a row.
 */
function adoptStep(view, id) {
  const name = id.replace(/\[.*$/, "");
  const group = view.groups.get(name);
  if (!group) return;
  // Its backend: a sibling leg's (the split node's own is `split`).
  const sibling = group.ids.map((other) => view.byId.get(other)).find((other) =>
    other && other.backend !== "split"
  );
  const step = { id, name, backend: sibling?.backend ?? "", needs: [] };
  view.byId.set(id, step);
  view.plan.push(step);
  group.ids.push(id);
  if (view.tableDone) document.querySelector("#steps tbody").append(stepRow(view, step));
}

function updateRow(view, id) {
  const row = view.rows.get(id);
  if (!row) return;
  const step = view.steps.get(id);
  const status = step?.status ?? "pending";
  const last = step?.attempts?.at(-1);
  const usage = last?.result?.usage;
  const cells = row.cells;
  if (cells[1].dataset.status !== status) {
    cells[1].dataset.status = status;
    cells[1].replaceChildren(badge(status));
  }
  cells[2].textContent = String(step?.attempts?.length ?? 0);
  cells[3].textContent = last?.worker ?? "";
  const started = last?.startedAt;
  cells[5].textContent = started === undefined ? "" : formatDuration(
    (last.endedAt ?? (STEP_TERMINAL.has(status) ? started : Date.now())) - started,
  );
  cells[6].textContent = usage?.cpuMs === undefined ? "" : formatDuration(usage.cpuMs);
  cells[7].textContent = formatBytes(usage?.memoryPeakBytes);
}

function schedule(view) {
  if (view.scheduled) return;
  view.scheduled = true;
  requestAnimationFrame(() => flush(view));
}

/** Brings the boxes of changed steps up to date, and the failed path. */
function flush(view) {
  view.scheduled = false;
  let failures = false;
  for (const name of view.dirty) {
    const group = view.groups.get(name);
    if (!group) continue;
    if (group.ids.some((id) => view.steps.get(id)?.status === "failed")) failures = true;
    // Boxes not yet made are brought up to date when they are.
    if (!group.node) continue;
    const counts = {};
    for (const id of group.ids) {
      const status = view.steps.get(id)?.status ?? "pending";
      counts[status] = (counts[status] ?? 0) + 1;
    }
    let status = GROUP_PRIORITY.find((candidate) => counts[candidate]) ?? "pending";
    // Legs partly done and partly waiting are under way.
    if (status === "pending" && counts.succeeded) status = "running";
    if (counts.failed) failures = true;
    const className = `node st-${status}${
      view.selected && group.ids.includes(view.selected) ? " selected" : ""
    }`;
    if (group.node.getAttribute("class") !== className) group.node.setAttribute("class", className);
    const summary = group.ids.length > 1
      ? GROUP_PRIORITY.filter((candidate) => counts[candidate])
        .map((candidate) => `${ICONS[candidate]}${counts[candidate]}`).join(" ")
      : `${ICONS[status]} ${status}`;
    group.detail.textContent = summary;
    group.title.textContent = `${name}: ${
      Object.entries(counts).map(([key, value]) => `${value} ${key}`).join(", ")
    }`;
    group.node.setAttribute("aria-label", `Step ${name}: ${group.title.textContent}`);
  }
  view.dirty.clear();
  if (failures || view.failedPathShown) markFailedPath(view);
}

/** The edges leading to a failed step are drawn red, so its path reads at a glance. */
function markFailedPath(view) {
  const failed = new Set();
  for (const [name, group] of view.groups) {
    if (group.ids.some((id) => view.steps.get(id)?.status === "failed")) failed.add(name);
  }
  const into = new Map();
  for (const edge of view.edges) {
    if (!into.has(edge.to)) into.set(edge.to, []);
    into.get(edge.to).push(edge);
  }
  const onPath = new Set();
  const queue = [...failed];
  const seen = new Set(queue);
  while (queue.length > 0) {
    const name = queue.pop();
    for (const edge of into.get(name) ?? []) {
      onPath.add(edge);
      if (!seen.has(edge.from)) {
        seen.add(edge.from);
        queue.push(edge.from);
      }
    }
  }
  for (const edge of view.edges) {
    edge.onPath = onPath.has(edge);
    const className = edge.onPath ? "edge failed-path" : "edge";
    if (edge.path && edge.path.getAttribute("class") !== className) {
      edge.path.setAttribute("class", className);
    }
  }
  view.failedPathShown = failed.size > 0;
}

function renderHeader(view, session) {
  const run = view.run;
  const facts = [
    ["Pipeline", run.pipeline],
    ["Status", badge(run.status)],
    ["Submitted by", run.submitter ?? "—"],
    ["Created", formatTime(run.createdAt)],
    ["Duration", runDuration(run)],
  ];
  if (run.name) facts.unshift(["Name", run.name]);
  if (run.waiting) facts.push(["Waiting", run.waiting]);
  if (run.params && Object.keys(run.params).length) facts.push(["Parameters", pairs(run.params)]);
  if (run.labels && Object.keys(run.labels).length) facts.push(["Labels", pairs(run.labels)]);
  if (run.rerunOf) {
    facts.push([
      "Rerun of",
      h("a", { href: `/ui/runs/${encodeURIComponent(run.rerunOf)}` }, run.rerunOf),
    ]);
  }
  // The run's OpenTelemetry trace, when the server recorded one.
  if (run.traceId) facts.push(["Trace", h("code", { id: "trace-id" }, run.traceId)]);
  const list = document.getElementById("run-header");
  list.replaceChildren(
    ...facts.flatMap(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]),
  );
  updateActions(view, session);
}

function updateActions(view, session) {
  const status = view.run.status;
  document.getElementById("cancel").hidden = !session.actions.cancel || TERMINAL.has(status);
  document.getElementById("resume").hidden = !session.actions.resume ||
    !(status === "failed" || status === "cancelled");
  const selected = view.selected ? view.steps.get(view.selected)?.status : undefined;
  document.getElementById("retry").hidden = !session.actions.rerun || !TERMINAL.has(status) ||
    !selected || !["failed", "cancelled", "skipped", "succeeded"].includes(selected);
}

function wireActions(view, session, base) {
  const result = document.getElementById("action-result");
  const runApi = `/api/runs/${encodeURIComponent(view.run.runId)}`;
  const act = async (what, call) => {
    result.textContent = `${what}…`;
    try {
      result.textContent = await call();
    } catch (error) {
      if (error instanceof Unauthorized) return refused(error);
      result.textContent = `${what} failed: ${error.message}`;
    }
  };
  document.getElementById("cancel").addEventListener("click", () =>
    act("Cancelling", async () => {
      const answer = await postJson(`${runApi}/cancel`);
      return `Cancel ${answer.outcome ?? "requested"}.`;
    }));
  document.getElementById("resume").addEventListener("click", () =>
    act("Resuming", async () => {
      await postJson(`${runApi}/resume`);
      // The run goes on under the same id: follow it again.
      location.reload();
      return "Resume requested.";
    }));
  document.getElementById("retry").addEventListener("click", () =>
    act("Retrying", async () => {
      const answer = await postJson(`${runApi}/rerun`, { steps: [view.selected] });
      location.assign(`/ui/runs/${encodeURIComponent(answer.runId)}`);
      return `New run ${answer.runId}.`;
    }));
  view.onSelect = (id) => select(view, id, base, session);
}

// ---- the selected step: its log and artifacts -----------------------------

function select(view, id, base, session) {
  const previous = view.selected;
  view.selected = id;
  view.attempt = undefined;
  view.latestSeen = undefined;
  for (const name of view.groups.keys()) {
    const group = view.groups.get(name);
    if (group.ids.includes(id) || (previous && group.ids.includes(previous))) view.dirty.add(name);
  }
  for (const [rowId, row] of view.rows) {
    if (rowId === id) row.setAttribute("aria-selected", "true");
    else if (rowId === previous) row.removeAttribute("aria-selected");
  }
  history.replaceState(null, "", `#step=${encodeURIComponent(id)}`);
  document.getElementById("step-panel").hidden = false;
  updatePanel(view, base, session);
  schedule(view);
  document.getElementById("step-title").focus?.();
}

function updatePanel(view, base, session) {
  const id = view.selected;
  const step = view.steps.get(id);
  const status = step?.status ?? "pending";
  const title = document.getElementById("step-title");
  title.replaceChildren(`Step ${id} `, badge(status));
  title.setAttribute("tabindex", "-1");
  document.getElementById("step-reason").textContent = step?.reason ?? "";
  const attempts = step?.attempts ?? [];
  const select = document.getElementById("attempt");
  const latest = attempts.at(-1)?.attempt;
  const onLatest = view.attempt === undefined || view.attempt === view.latestSeen;
  if (select.options.length !== attempts.length || select.dataset.step !== id) {
    select.replaceChildren(
      ...attempts.map((attempt) =>
        h(
          "option",
          { value: String(attempt.attempt) },
          `#${attempt.attempt}${attempt.worker ? ` on ${attempt.worker}` : ""}`,
        )
      ),
    );
    select.dataset.step = id;
    select.onchange = () => openLog(view, base, Number(select.value));
  }
  view.latestSeen = latest;
  // A new attempt is followed when the latest was being watched.
  if (latest !== undefined && onLatest && view.attempt !== latest) {
    select.value = String(latest);
    openLog(view, base, latest);
  } else if (latest === undefined) {
    view.logStream?.abort();
    document.getElementById("log").textContent = "No attempt yet.";
  }
  drawArtifacts(view, step);
  updateActions(view, session);
}

function openLog(view, base, attempt) {
  view.logStream?.abort();
  const controller = new AbortController();
  view.logStream = controller;
  view.attempt = attempt;
  const log = document.getElementById("log");
  log.textContent = "";
  const follow = document.getElementById("follow");
  const id = view.selected;
  const url = `${base}/logs?${new URLSearchParams({
    step: id,
    attempt: String(attempt),
    follow: "1",
  })}`;
  (async () => {
    let delay = 500;
    while (!controller.signal.aborted) {
      let received = 0;
      log.textContent = "";
      try {
        const ended = await readEvents(url, (type, data) => {
          if (type !== "log") return;
          received++;
          log.append(data.text);
          if (log.textContent.length > MAX_LOG_CHARS) {
            log.textContent = `[earlier output dropped]\n${
              log.textContent.slice(-MAX_LOG_CHARS / 2)
            }`;
          }
          if (follow.checked) log.scrollTop = log.scrollHeight;
        }, controller.signal);
        if (ended) {
          if (received === 0) log.textContent = "(no output)";
          return;
        }
      } catch (error) {
        if (controller.signal.aborted) return;
        if (error instanceof Unauthorized) return refused(error);
      }
      await sleep(delay);
      delay = Math.min(delay * 2, 5000);
    }
  })();
}

function drawArtifacts(view, step) {
  const body = document.querySelector("#artifacts tbody");
  const outputs = Object.values(step?.outputs ?? {});
  if (outputs.length === 0) {
    body.replaceChildren(h("tr", {}, h("td", { colspan: "4", class: "muted" }, "None recorded.")));
    return;
  }
  const runId = view.run.runId;
  body.replaceChildren(...outputs.map((artifact) => {
    const href = `/ui/api/runs/${encodeURIComponent(runId)}/artifacts/${
      encodeURIComponent(step.id)
    }/${encodeURIComponent(artifact.name)}`;
    const link = h("a", {
      href,
      download: artifact.name,
      "data-digest": artifact.digest,
      "aria-label": `Download ${artifact.name}`,
      onclick: (event) => downloadWithToken(event, href, artifact.name),
    }, "Download");
    return h(
      "tr",
      { "data-artifact": artifact.name },
      h("td", { class: "mono" }, artifact.name),
      h("td", {}, formatBytes(artifact.size)),
      h("td", { class: "mono", title: artifact.digest }, artifact.digest.slice(0, 19) + "…"),
      h("td", {}, link),
    );
  }));
}

/** A link cannot carry the token: with one, the file is fetched with it and saved. */
async function downloadWithToken(event, href, name) {
  if (!token()) return;
  event.preventDefault();
  const response = await fetch(href, { headers: authHeaders(), cache: "no-store" });
  if (!response.ok) {
    document.getElementById("action-result").textContent = `Download failed: ${await messageOf(
      response,
    )}`;
    return;
  }
  const url = URL.createObjectURL(await response.blob());
  const save = h("a", { href: url, download: name, hidden: true });
  document.body.append(save);
  save.click();
  save.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

// ---- workers --------------------------------------------------------------

async function workersPage(session) {
  const body = document.querySelector("#workers tbody");
  const plane = document.getElementById("control-plane");
  const note = document.getElementById("workers-status");
  async function load() {
    let listed;
    try {
      listed = await getJson("/ui/api/workers");
    } catch (error) {
      if (error instanceof Unauthorized) return refused(error);
      note.textContent = `Could not read the workers: ${error.message}`;
      return;
    }
    const now = Date.now();
    body.replaceChildren(...listed.workers.map((worker) =>
      h(
        "tr",
        { "data-agent": worker.agentId, "data-status": worker.status },
        h("th", { scope: "row" }, worker.agentId),
        h("td", {}, h("span", { class: `badge wk-${worker.status}` }, worker.status)),
        h("td", { class: "mono" }, pairs(worker.labels)),
        h("td", {}, worker.backends.join(", ")),
        h("td", {}, worker.status === "offline" ? "" : `${worker.slotsInUse} / ${worker.slots}`),
        h(
          "td",
          { title: formatTime(worker.lastHeartbeat) },
          worker.lastHeartbeat ? `${formatDuration(now - worker.lastHeartbeat)} ago` : "",
        ),
        h("td", {}, worker.server ?? ""),
      )
    ));
    const online = listed.workers.filter((worker) => worker.status !== "offline").length;
    note.textContent = session.mode === "local"
      ? "Local mode: this machine runs every step; there are no agents."
      : `${online} of ${listed.workers.length} agents online.`;
    const cp = listed.controlPlane;
    if (!cp) {
      plane.replaceChildren(h("dt", {}, "Mode"), h("dd", {}, "local (embedded store)"));
      return;
    }
    const raft = cp.raft.error ? [["Store", `unreachable: ${cp.raft.error}`]] : [
      ["Store member", `${cp.raft.nodeId} (${cp.raft.state})`],
      ["Store leader", cp.raft.leader],
      ["Term", String(cp.raft.term)],
      ["Commit index", String(cp.raft.commitIndex)],
    ];
    const facts = [
      ["This server", cp.server],
      ["Scheduler", cp.scheduler ?? "none elected"],
      ...raft,
    ];
    plane.replaceChildren(
      ...facts.flatMap((
        [term, value],
      ) => [h("dt", {}, term), h("dd", { "data-fact": term }, value)]),
    );
  }
  await load();
  setInterval(() => {
    if (!document.hidden) load();
  }, 2000);
}

start();
