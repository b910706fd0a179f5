/**
 * Mermaid rendering of a plan's DAG, optionally coloured by step status.
 *
 * @module
 */

import type { Plan, StepStatus } from "./model.ts";

const STATUS_STYLES: Record<StepStatus, string> = {
  pending: "fill:#eeeeee,stroke:#999999,color:#333333",
  waiting: "fill:#fff8e1,stroke:#b8860b,color:#6b4e00,stroke-dasharray:6 3",
  scheduled: "fill:#e0f0ff,stroke:#6699cc,color:#333333",
  running: "fill:#cce5ff,stroke:#004085,color:#004085",
  retrying: "fill:#fff3cd,stroke:#856404,color:#856404",
  succeeded: "fill:#d4edda,stroke:#155724,color:#155724",
  failed: "fill:#f8d7da,stroke:#721c24,color:#721c24",
  cancelled: "fill:#e2e3e5,stroke:#383d41,color:#383d41,stroke-dasharray:4 2",
  skipped: "fill:#ffffff,stroke:#aaaaaa,color:#888888,stroke-dasharray:2 2",
};

function label(text: string): string {
  return text.replace(/["<>&#]/g, (c) => `#${c.charCodeAt(0)};`);
}

/**
 * Renders a plan as a Mermaid `flowchart TD`, nodes classed by status.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parsePipeline } from "./load.ts";
 * import { renderMermaid } from "./mermaid.ts";
 *
 * const plan = parsePipeline("name: x\nsteps:\n  a: { run: 'true' }\n", { file: "x.yaml" });
 * const chart = renderMermaid(plan, { a: "running" });
 * assert.match(chart, /^flowchart TD\n/);
 * assert.match(chart, /class s0 running/);
 * ```
 */
export function renderMermaid(plan: Plan, statuses?: Record<string, StepStatus>): string {
  const nodeIds = new Map(plan.order.map((id, i) => [id, `s${i}`]));
  const lines = ["flowchart TD"];
  for (const id of plan.order) {
    const step = plan.steps[id];
    lines.push(`  ${nodeIds.get(id)}["${label(id)}<br/><small>${label(step.backend)}</small>"]`);
  }
  for (const id of plan.order) {
    for (const need of plan.steps[id].needs) {
      lines.push(`  ${nodeIds.get(need)} --> ${nodeIds.get(id)}`);
    }
  }
  if (statuses) {
    const used = new Set<StepStatus>();
    for (const id of plan.order) {
      const status = statuses[id] ?? "pending";
      used.add(status);
      lines.push(`  class ${nodeIds.get(id)} ${status}`);
    }
    for (const status of used) lines.push(`  classDef ${status} ${STATUS_STYLES[status]}`);
  }
  return lines.join("\n") + "\n";
}
