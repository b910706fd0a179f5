import assert from "node:assert/strict";
import {
  isTerminalRunStatus,
  isTerminalStepStatus,
  type RunStatus,
  type StepStatus,
  TERMINAL_RUN_STATUSES,
  TERMINAL_STEP_STATUSES,
} from "./model.ts";

Deno.test("terminal step statuses: the four a step never leaves", () => {
  const all: StepStatus[] = [
    "pending",
    "scheduled",
    "running",
    "retrying",
    "succeeded",
    "failed",
    "cancelled",
    "skipped",
  ];
  assert.deepEqual(all.filter(isTerminalStepStatus), [...TERMINAL_STEP_STATUSES]);
  assert.deepEqual(TERMINAL_STEP_STATUSES, ["succeeded", "failed", "cancelled", "skipped"]);
});

Deno.test("terminal run statuses: the three a run never leaves", () => {
  const all: RunStatus[] = ["pending", "running", "succeeded", "failed", "cancelled"];
  assert.deepEqual(all.filter(isTerminalRunStatus), [...TERMINAL_RUN_STATUSES]);
  assert.deepEqual(TERMINAL_RUN_STATUSES, ["succeeded", "failed", "cancelled"]);
});
