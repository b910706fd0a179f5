/**
 * Engine effects both drivers (local mode and the cluster scheduler)
 * perform the same way: the one timer that wakes a run's engine (`WakeAt`),
 * and `on-failure` webhooks (`Notify`), delivered beside the run with
 * retries and never holding it up.
 *
 * @module
 */

import type { FailureInfo, WebhookSpec } from "../core/model.ts";
import { abortableDelay } from "../core/_async.ts";

/** Longest wait between two tries of a webhook. */
const WEBHOOK_MAX_BACKOFF_MS = 30_000;

/**
 * Longest delay one `setTimeout` can wait (2^31-1 ms, 24.8 days): a longer
 * one overflows and fires after 1 ms, which turned a far wake into a 1 ms loop.
 */
export const MAX_TIMER_DELAY_MS = 2 ** 31 - 1;

/**
 * One timer per run, armed for the earliest `WakeAt` the engine asked for:
 * a later wake never postpones an earlier one. A wake further away than a
 * timer can wait is reached in steps of {@link MAX_TIMER_DELAY_MS}.
 */
export class WakeTimer {
  #timer: ReturnType<typeof setTimeout> | undefined;
  #at = Infinity;

  /** Calls `wake` at `at` (epoch ms, by `now`) unless an earlier wake is armed. */
  constructor(readonly wake: () => void, readonly now: () => number = Date.now) {}

  /** Arms the timer for `at`, if that is earlier than the wake already armed. */
  arm(at: number): void {
    // Written so that NaN is refused too.
    if (!(at < this.#at)) return;
    this.#at = at;
    this.#schedule();
  }

  /** Disarms it. */
  clear(): void {
    clearTimeout(this.#timer);
    this.#at = Infinity;
  }

  #schedule(): void {
    clearTimeout(this.#timer);
    const wait = Math.max(0, this.#at - this.now());
    const partial = wait > MAX_TIMER_DELAY_MS;
    this.#timer = setTimeout(() => {
      if (partial) return this.#schedule();
      this.#at = Infinity;
      this.wake();
    }, partial ? MAX_TIMER_DELAY_MS : wait);
  }
}

/** How a webhook delivery went. */
export interface WebhookOutcome {
  runId: string;
  stepId: string;
  ok: boolean;
  /** `delivered to URL (HTTP 200)`, or why it failed. */
  detail: string;
}

/** Delivers webhooks in the background and can wait for those in flight. */
export class WebhookNotifier {
  readonly #inFlight = new Set<Promise<void>>();

  /** Calls `onOutcome` once per delivery, when it succeeded or gave up. */
  constructor(readonly onOutcome: (outcome: WebhookOutcome) => void = () => {}) {}

  /** Starts delivering `failure` to `webhook`. */
  notify(webhook: WebhookSpec, failure: FailureInfo): void {
    const outcome = (ok: boolean, detail: string) =>
      this.onOutcome({ runId: failure.runId, stepId: failure.stepId, ok, detail });
    const delivery = deliverWebhook(webhook, failure).then(
      (detail) => outcome(true, detail),
      (error) => outcome(false, error instanceof Error ? error.message : String(error)),
    );
    this.#inFlight.add(delivery);
    delivery.finally(() => this.#inFlight.delete(delivery));
  }

  /** Waits for the deliveries in flight, `ms` at most. */
  async drain(ms: number): Promise<void> {
    if (this.#inFlight.size === 0) return;
    const timeout = new AbortController();
    await Promise.race([
      Promise.allSettled([...this.#inFlight]),
      abortableDelay(ms, timeout.signal),
    ]);
    timeout.abort();
  }
}

/**
 * POSTs the failure metadata to a webhook, retrying with exponential
 * backoff; resolves with a sentence saying where it was delivered, rejects
 * with one saying why it was not.
 */
export async function deliverWebhook(webhook: WebhookSpec, failure: FailureInfo): Promise<string> {
  let lastError = "";
  for (let attempt = 0; attempt <= webhook.retries; attempt++) {
    if (attempt > 0) {
      await abortableDelay(
        Math.min(webhook.backoffMs * 2 ** (attempt - 1), WEBHOOK_MAX_BACKOFF_MS),
      );
    }
    try {
      const response = await fetch(webhook.url, {
        method: "POST",
        headers: { "content-type": "application/json", ...webhook.headers },
        body: JSON.stringify({ event: "step.failed", ...failure }),
        signal: AbortSignal.timeout(webhook.timeoutMs),
      });
      await response.body?.cancel();
      if (response.ok) return `delivered to ${webhook.url} (HTTP ${response.status})`;
      lastError = `HTTP ${response.status}`;
      // A 4xx other than 408/429 will not change on a retry.
      if (response.status < 500 && response.status !== 408 && response.status !== 429) break;
    } catch (error) {
      lastError = error instanceof Error ? error.message : String(error);
    }
  }
  throw new Error(`on-failure webhook ${webhook.url} failed: ${lastError}`);
}
