/**
 * Progress of a run for people and machines: live lines redrawn in place on
 * a terminal, one plain line per change otherwise, JSON lines with `--json`.
 *
 * @module
 */

import type { RunEvent } from "./mod.ts";
import type { StepStatus } from "../../core/model.ts";

/** Options of {@link createProgress}. */
export interface ProgressOptions {
  /** Redraw in place (a terminal) or print plain lines. */
  tty: boolean;
  /** Print every event as a JSON line instead. */
  json?: boolean;
  /** Also print each step's log lines. */
  logs?: boolean;
  /** Colour (off when NO_COLOR is set). */
  color?: boolean;
  /** Where output goes; default stdout. */
  write?: (text: string) => void;
  /** Clock, for tests. */
  now?: () => number;
}

/** A progress display: feed it events, close it at the end. */
export interface Progress {
  onEvent(event: RunEvent): void;
  close(): void;
}

/** How many log lines of a failed step are shown under its failure. */
const FAILURE_TAIL_LINES = 12;
/** Redraw period of the live display: smooth enough, cheap enough. */
const REDRAW_MS = 100;

const SYMBOLS: Record<StepStatus, string> = {
  pending: "·",
  waiting: "⏸",
  scheduled: "○",
  running: "▶",
  retrying: "↻",
  succeeded: "✓",
  failed: "✗",
  cancelled: "■",
  skipped: "»",
};

const COLORS: Partial<Record<StepStatus, string>> = {
  succeeded: "\x1b[32m",
  failed: "\x1b[31m",
  retrying: "\x1b[33m",
  running: "\x1b[36m",
  cancelled: "\x1b[35m",
  skipped: "\x1b[2m",
};

interface StepView {
  status: StepStatus;
  attempt: number;
  since: number;
  reason?: string;
  cached?: boolean;
  tail: string[];
}

/** Creates the display that suits the options. */
export function createProgress(options: ProgressOptions): Progress {
  const encoder = new TextEncoder();
  const write = options.write ?? ((text: string) => Deno.stdout.writeSync(encoder.encode(text)));
  if (options.json) {
    return { onEvent: (event) => write(JSON.stringify(event) + "\n"), close() {} };
  }
  return new HumanProgress({ ...options, write });
}

function formatDuration(ms: number): string {
  if (ms < 1000) return `${Math.round(ms)}ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)}s`;
  const minutes = Math.floor(ms / 60_000);
  return `${minutes}m${Math.round((ms % 60_000) / 1000)}s`;
}

class HumanProgress implements Progress {
  readonly #options: ProgressOptions & { write: (text: string) => void };
  readonly #now: () => number;
  readonly #steps = new Map<string, StepView>();
  #drawnLines = 0;
  #timer?: ReturnType<typeof setInterval>;
  #started = 0;

  constructor(options: ProgressOptions & { write: (text: string) => void }) {
    this.#options = options;
    this.#now = options.now ?? Date.now;
    if (options.tty) this.#timer = setInterval(() => this.#redraw(), REDRAW_MS);
  }

  onEvent(event: RunEvent): void {
    switch (event.type) {
      case "run":
        if (event.status === "running") {
          this.#started = event.at;
          this.#print(`run ${event.runId} · ${event.pipeline} · ${event.steps.length} steps`);
        } else {
          this.#clearLive();
          const counts = new Map<StepStatus, number>();
          for (const view of this.#steps.values()) {
            counts.set(view.status, (counts.get(view.status) ?? 0) + 1);
          }
          const parts = [...counts].map(([status, n]) => `${n} ${status}`).join(", ");
          this.#print(
            `${this.#paint(event.status as StepStatus, event.status)} in ${
              formatDuration(event.at - this.#started)
            } (${parts || "no steps"}) · runnel show ${event.runId}`,
          );
        }
        break;
      case "step":
        this.#onStep(event);
        break;
      case "log": {
        const view = this.#steps.get(event.stepId);
        const lines = event.text.split("\n").filter((line) => line.length > 0);
        if (view) {
          view.tail.push(...lines);
          if (view.tail.length > FAILURE_TAIL_LINES) view.tail.splice(0, view.tail.length - 12);
        }
        if (this.#options.logs) {
          for (const line of lines) this.#print(`  ${event.stepId} │ ${line}`);
        }
        break;
      }
      case "webhook":
        this.#print(`  on-failure ${event.ok ? "sent" : "not sent"}: ${event.detail}`);
        break;
    }
  }

  close(): void {
    clearInterval(this.#timer);
    this.#clearLive();
  }

  #onStep(event: Extract<RunEvent, { type: "step" }>): void {
    const previous = this.#steps.get(event.stepId);
    const view: StepView = {
      status: event.status,
      attempt: event.attempt,
      since: previous && previous.status === event.status ? previous.since : event.at,
      reason: event.reason,
      cached: event.cached,
      tail: previous?.tail ?? [],
    };
    if (event.status === "scheduled" || event.status === "running") {
      if (previous?.status !== "scheduled" && previous?.status !== "running") view.tail = [];
      if (previous?.status === "scheduled") view.since = previous.since;
    }
    this.#steps.set(event.stepId, view);
    const took = previous ? event.at - previous.since : 0;
    switch (event.status) {
      case "succeeded":
        this.#print(
          `${this.#paint("succeeded", SYMBOLS.succeeded)} ${event.stepId} ${
            event.cached ? "(cached)" : formatDuration(took)
          }${event.attempt > 1 ? ` · attempt ${event.attempt}` : ""}`,
        );
        break;
      case "failed":
        this.#print(
          `${this.#paint("failed", SYMBOLS.failed)} ${event.stepId} failed after ${
            formatDuration(took)
          } · attempt ${event.attempt}${event.reason ? `: ${event.reason}` : ""}`,
        );
        for (const line of view.tail.slice(-FAILURE_TAIL_LINES)) this.#print(`    │ ${line}`);
        break;
      case "retrying":
        this.#print(
          `${
            this.#paint("retrying", SYMBOLS.retrying)
          } ${event.stepId} attempt ${event.attempt} failed${
            event.reason ? `: ${event.reason}` : ""
          }; retrying`,
        );
        break;
      case "skipped":
      case "cancelled":
        this.#print(
          `${this.#paint(event.status, SYMBOLS[event.status])} ${event.stepId} ${event.status}${
            event.reason ? ` (${event.reason})` : ""
          }`,
        );
        break;
      case "running":
        if (this.#options.tty) this.#redraw();
        else {
          this.#print(
            `${this.#paint("running", SYMBOLS.running)} ${event.stepId} started${
              event.attempt > 1 ? ` · attempt ${event.attempt}` : ""
            }`,
          );
        }
        break;
      default:
        break;
    }
  }

  #paint(status: StepStatus, text: string): string {
    if (this.#options.color === false || !COLORS[status]) return text;
    return `${COLORS[status]}${text}\x1b[0m`;
  }

  /** Prints a permanent line above the live block. */
  #print(line: string): void {
    this.#clearLive();
    this.#options.write(line + "\n");
    if (this.#options.tty) this.#drawLive();
  }

  #clearLive(): void {
    if (!this.#options.tty || this.#drawnLines === 0) return;
    this.#options.write(`\x1b[${this.#drawnLines}A\x1b[0J`);
    this.#drawnLines = 0;
  }

  #redraw(): void {
    this.#clearLive();
    this.#drawLive();
  }

  #drawLive(): void {
    const now = this.#now();
    const lines: string[] = [];
    for (const [stepId, view] of this.#steps) {
      if (view.status !== "running" && view.status !== "retrying" && view.status !== "scheduled") {
        continue;
      }
      const last = view.tail.at(-1);
      const attempt = view.attempt > 1 ? ` · attempt ${view.attempt}` : "";
      lines.push(
        `${this.#paint(view.status, SYMBOLS[view.status])} ${stepId} ${
          formatDuration(now - view.since)
        }${attempt}${last ? ` · ${last.slice(0, 60)}` : ""}`,
      );
    }
    if (lines.length === 0) return;
    this.#options.write(lines.join("\n") + "\n");
    this.#drawnLines = lines.length;
  }
}
