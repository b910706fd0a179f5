/**
 * The HTML of the UI's pages: plain, accessible skeletons (landmarks,
 * labels, a skip link) that hold no data; the one script (`static/app.js`)
 * fetches and fills them. A page has no inline script or style, so the
 * Content-Security-Policy can forbid both.
 *
 * @module
 */

const TITLES = { runs: "Runs", run: "Run", workers: "Workers" } as const;

/** The HTML of a page; `runId` for a run's page. */
export function pageHtml(kind: "runs" | "run" | "workers", runId?: string): string {
  const run = runId === undefined ? "" : ` data-run-id="${escapeHtml(runId)}"`;
  const title = runId === undefined ? TITLES[kind] : `Run ${runId}`;
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${escapeHtml(title)} · runnel</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/ui/assets/app.css">
<script type="module" src="/ui/assets/app.js"></script>
</head>
<body data-page="${kind}"${run}>
<a class="skip" href="#main">Skip to content</a>
<header class="top">
<nav aria-label="Main">
<a class="brand" href="/ui/">runnel</a>
<a href="/ui/"${kind === "runs" ? ' aria-current="page"' : ""}>Runs</a>
<a href="/ui/workers"${kind === "workers" ? ' aria-current="page"' : ""}>Workers</a>
</nav>
<span id="session" class="muted"></span>
<button id="signout" type="button" hidden>Sign out</button>
</header>
<section id="login" class="card" hidden aria-labelledby="login-title">
<h1 id="login-title">Sign in</h1>
<p>This server asks for an API token with the <strong>read</strong> role to show runs
(<strong>submit</strong> to cancel, resume or retry them). The token stays in this tab
(session storage) and is sent only to this server.</p>
<form id="login-form">
<label for="token">API token</label>
<input id="token" name="token" type="password" autocomplete="off" required>
<button type="submit">Sign in</button>
</form>
<p id="login-error" class="error" role="alert"></p>
</section>
<main id="main" tabindex="-1" hidden>
${BODIES[kind](runId)}
</main>
</body>
</html>
`;
}

const BODIES: Record<"runs" | "run" | "workers", (runId?: string) => string> = {
  runs: () =>
    `<h1>Runs</h1>
<form id="filters" class="filters" role="search" aria-label="Filter runs">
<label for="filter-status">Status</label>
<select id="filter-status" name="status">
<option value="">any</option><option>pending</option><option>running</option>
<option>succeeded</option><option>failed</option><option>cancelled</option>
</select>
<label for="filter-pipeline">Pipeline</label>
<input id="filter-pipeline" name="pipeline" type="text" spellcheck="false">
<button type="submit">Filter</button>
</form>
<p id="runs-status" class="muted" role="status"></p>
<table id="runs" class="grid">
<caption class="sr-only">Runs, newest first</caption>
<thead><tr><th scope="col">Run</th><th scope="col">Pipeline</th><th scope="col">Status</th>
<th scope="col">Started</th><th scope="col">Duration</th><th scope="col">Submitted by</th>
<th scope="col">Parameters</th></tr></thead>
<tbody></tbody>
</table>
<nav class="pager" aria-label="Pages of runs">
<button id="newer" type="button" disabled>← Newer</button>
<button id="older" type="button" disabled>Older →</button>
</nav>`,
  run: (runId) =>
    `<h1>Run <code>${escapeHtml(runId ?? "")}</code></h1>
<dl id="run-header" class="facts"></dl>
<div id="actions" class="actions">
<button id="cancel" type="button" hidden>Cancel run</button>
<button id="resume" type="button" hidden>Resume run</button>
<button id="retry" type="button" hidden>Retry step</button>
<span id="action-result" role="status"></span>
</div>
<p id="connection" class="muted" role="status"></p>
<section aria-labelledby="dag-title">
<h2 id="dag-title">Graph</h2>
<ul id="legend" class="legend" aria-label="Status colours"></ul>
<div id="dag" class="dag"></div>
</section>
<div class="split">
<section aria-labelledby="steps-title">
<h2 id="steps-title">Steps</h2>
<table id="steps" class="grid">
<caption class="sr-only">Steps in DAG order</caption>
<thead><tr><th scope="col">Step</th><th scope="col">Status</th><th scope="col">Attempts</th>
<th scope="col">Worker</th><th scope="col">Backend</th><th scope="col">Duration</th>
<th scope="col">CPU</th><th scope="col">Peak memory</th></tr></thead>
<tbody></tbody>
</table>
</section>
<section id="step-panel" aria-labelledby="step-title" hidden>
<h2 id="step-title">Step</h2>
<p id="step-reason" class="muted"></p>
<div class="log-controls">
<label for="attempt">Attempt</label> <select id="attempt"></select>
<label><input id="follow" type="checkbox" checked> Follow</label>
</div>
<pre id="log" class="log" tabindex="0" aria-label="Log of the selected attempt" aria-live="off"></pre>
<h3>Artifacts</h3>
<table id="artifacts" class="grid">
<thead><tr><th scope="col">Name</th><th scope="col">Size</th><th scope="col">Digest</th>
<th scope="col"><span class="sr-only">Download</span></th></tr></thead>
<tbody></tbody>
</table>
</section>
</div>`,
  workers: () =>
    `<h1>Workers</h1>
<section aria-labelledby="cp-title">
<h2 id="cp-title">Control plane</h2>
<dl id="control-plane" class="facts"></dl>
</section>
<section aria-labelledby="workers-title">
<h2 id="workers-title">Agents</h2>
<p id="workers-status" class="muted" role="status"></p>
<table id="workers" class="grid">
<thead><tr><th scope="col">Agent</th><th scope="col">Status</th><th scope="col">Labels</th>
<th scope="col">Backends</th><th scope="col">Slots in use</th><th scope="col">Last heartbeat</th>
<th scope="col">Server</th></tr></thead>
<tbody></tbody>
</table>
</section>`,
};

/** Escapes text for HTML content and attribute values. */
export function escapeHtml(text: string): string {
  return text.replace(
    /[&<>"']/g,
    (char) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[char]!,
  );
}
