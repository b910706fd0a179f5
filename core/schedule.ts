/**
 * Schedules of registered pipelines: a cron expression read by a
 * well-kept library (`npm:croner`), in a time zone, with the policies of
 * Kubernetes CronJobs (concurrency, starting deadline, suspend, history).
 * Pure: the firing loop lives with the cluster's scheduler
 * (`agent/server/schedules.ts`).
 *
 * @module
 */

import { Cron } from "npm:croner@11.0.1";
import { parseDuration } from "./duration.ts";
import type { ScheduleFile } from "./schema.ts";

/** A schedule as the cluster keeps it. */
export interface ScheduleSpec {
  cron: string;
  timezone?: string;
  params: Record<string, string | number | boolean>;
  concurrency: "allow" | "forbid" | "replace";
  /** A tick missed by more than this is skipped; absent: a missed tick runs once. */
  startingDeadlineMs?: number;
  suspend: boolean;
  historyLimit: number;
  /** The parameter a run gets its tick in (ISO 8601), if any. */
  logicalDateParam?: string;
}

/** Runs `runnel schedules` remembers unless told otherwise. */
export const DEFAULT_HISTORY_LIMIT = 10;

/** The spec of a pipeline file's `schedule:` section. */
export function scheduleSpec(schedule: ScheduleFile): ScheduleSpec {
  return {
    cron: schedule.cron,
    ...(schedule.timezone ? { timezone: schedule.timezone } : {}),
    params: { ...schedule.params },
    concurrency: schedule.concurrency ?? "allow",
    ...(schedule["starting-deadline"]
      ? { startingDeadlineMs: parseDuration(schedule["starting-deadline"]) }
      : {}),
    suspend: schedule.suspend ?? false,
    historyLimit: schedule["history-limit"] ?? DEFAULT_HISTORY_LIMIT,
    ...(schedule["logical-date-param"] ? { logicalDateParam: schedule["logical-date-param"] } : {}),
  };
}

/** Why a cron expression or time zone cannot be used, or undefined. */
export function scheduleProblem(
  schedule: { cron: string; timezone?: string },
): { key: "cron" | "timezone"; message: string } | undefined {
  let cron: Cron;
  try {
    cron = new Cron(schedule.cron, { paused: true });
  } catch (error) {
    return {
      key: "cron",
      message: `invalid cron expression "${schedule.cron}": ${messageOf(error)}`,
    };
  }
  if (cron.nextRun() === null) {
    return { key: "cron", message: `cron expression "${schedule.cron}" never fires` };
  }
  if (schedule.timezone !== undefined) {
    try {
      new Cron(schedule.cron, { paused: true, timezone: schedule.timezone }).nextRun();
    } catch {
      return {
        key: "timezone",
        message: `unknown time zone "${schedule.timezone}" (an IANA name such as "Europe/Paris")`,
      };
    }
  }
  return undefined;
}

/** Ticks a backfill may start at most. */
export const MAX_BACKFILL_TICKS = 1_000;

/**
 * The ticks in `[fromMs, toMs]`, in order; throws beyond
 * {@link MAX_BACKFILL_TICKS}.
 */
export function ticksBetween(
  spec: Pick<ScheduleSpec, "cron" | "timezone">,
  fromMs: number,
  toMs: number,
): number[] {
  const ticks: number[] = [];
  for (let at = nextFire(spec, fromMs - 1); at !== undefined && at <= toMs;) {
    if (ticks.length === MAX_BACKFILL_TICKS) {
      throw new RangeError(
        `Expected at most ${MAX_BACKFILL_TICKS} ticks to backfill; narrow --from/--to`,
      );
    }
    ticks.push(at);
    at = nextFire(spec, at);
  }
  return ticks;
}

/** The values of a run started for `tick`: the schedule's, and its logical date if it names one. */
export function tickParams(
  spec: ScheduleSpec,
  tick: number,
): Record<string, string | number | boolean> {
  return spec.logicalDateParam
    ? { ...spec.params, [spec.logicalDateParam]: new Date(tick).toISOString() }
    : spec.params;
}

/** The first tick strictly after `afterMs`, or undefined when there is none. */
export function nextFire(
  spec: Pick<ScheduleSpec, "cron" | "timezone">,
  afterMs: number,
): number | undefined {
  const cron = new Cron(spec.cron, {
    paused: true,
    ...(spec.timezone ? { timezone: spec.timezone } : {}),
  });
  return cron.nextRun(new Date(afterMs))?.getTime();
}

function messageOf(error: unknown): string {
  return (error instanceof Error ? error.message : String(error)).replace(/^CronPattern: /, "");
}
