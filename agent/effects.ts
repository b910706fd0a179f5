/**
 * Engine effects both drivers (local mode and the cluster scheduler)
 * perform the same way: the one timer that wakes a run's engine (`WakeAt`),
 * and `on-failure` webhooks (`Notify`), delivered beside the run with
 * retries and never holding it up. In a cluster a webhook goes only to a
 * host the server's allow-list names (`--webhook-allow`): the server checks
 * at submit, and delivery checks again, in case a run was stored before the
 * list changed. Local mode (the user's own machine) allows any URL.
 *
 * @module
 */

import type { EmailAlert, FailureInfo, RunNotice, WebhookSpec } from "../core/model.ts";
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
  /** `delivered to host:port (HTTP 200)`, or why it failed (never the URL's path: it may hold a secret). */
  detail: string;
}

/**
 * The hosts webhooks may reach: entries `host`, `host:port` or `*.domain`
 * (any subdomain). An entry without a port allows the scheme's default port
 * (80 for http, 443 for https) only.
 */
export class WebhookAllowList {
  readonly #entries: Array<{ host: string; port?: number; subdomains: boolean }>;

  /**
   * Parses the entries of `--webhook-allow`.
   *
   * @throws {TypeError} for an entry that is not `host[:port]`.
   */
  constructor(readonly entries: readonly string[]) {
    this.#entries = entries.map((entry) => {
      const match = /^(\*\.)?(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?$/.exec(
        entry.trim(),
      );
      const port = match?.[3] === undefined ? undefined : Number(match[3]);
      if (!match || (port !== undefined && (port < 1 || port > 65535))) {
        throw new TypeError(
          `Expected a webhook host like "hooks.example.com", "10.0.0.5:8443" or ` +
            `"*.example.com", got "${entry}"`,
        );
      }
      return { host: match[2].toLowerCase(), port, subdomains: match[1] !== undefined };
    });
  }

  /** Whether a webhook to `url` may be delivered. */
  allows(url: string): boolean {
    let parsed: URL;
    try {
      parsed = new URL(url);
    } catch {
      return false;
    }
    if (parsed.protocol !== "http:" && parsed.protocol !== "https:") return false;
    const host = parsed.hostname.toLowerCase();
    const port = Number(parsed.port || (parsed.protocol === "https:" ? 443 : 80));
    return this.#entries.some((entry) =>
      (entry.subdomains ? host.endsWith(`.${entry.host}`) : host === entry.host) &&
      port === (entry.port ?? (parsed.protocol === "https:" ? 443 : 80))
    );
  }

  /** The list for a message: `hooks.example.com, *.corp` or `none`. */
  describe(): string {
    return this.entries.length === 0 ? "none" : this.entries.join(", ");
  }
}

/** The SMTP server the operator names for email alerts (`--smtp HOST:PORT --smtp-from ADDR`). */
export interface SmtpSettings {
  host: string;
  port: number;
  from: string;
}

/** Delivers webhooks (and email alerts) in the background and can wait for those in flight. */
export class WebhookNotifier {
  readonly #inFlight = new Set<Promise<void>>();
  readonly #allow: WebhookAllowList | undefined;
  readonly #smtp: SmtpSettings | undefined;

  /**
   * Calls `onOutcome` once per delivery, when it succeeded or gave up; with
   * `allow`, delivers only to the hosts it names (cluster mode); mails
   * through `smtp` when the operator names one.
   */
  constructor(
    readonly onOutcome: (outcome: WebhookOutcome) => void = () => {},
    allow?: WebhookAllowList,
    smtp?: SmtpSettings,
  ) {
    this.#allow = allow;
    this.#smtp = smtp;
  }

  /** Starts mailing a run's end to its alert's recipients, retried, never blocking. */
  alert(email: EmailAlert, notice: RunNotice): void {
    const outcome = (ok: boolean, detail: string) =>
      this.onOutcome({ runId: notice.runId, stepId: "", ok, detail });
    const delivery = sendAlertMail(email, notice, this.#smtp).then(
      (detail) => outcome(true, detail),
      (error) => outcome(false, error instanceof Error ? error.message : String(error)),
    );
    this.#inFlight.add(delivery);
    delivery.finally(() => this.#inFlight.delete(delivery));
  }

  /** Starts delivering `failure` to `webhook`. */
  notify(webhook: WebhookSpec, failure: FailureInfo): void {
    this.#deliver(webhook, failure, failure.runId, failure.stepId);
  }

  /** Starts telling `webhook` that a run ended (`on-success`, `on-exit`). */
  notifyRun(webhook: WebhookSpec, notice: RunNotice): void {
    this.#deliver(webhook, notice, notice.runId, "");
  }

  #deliver(
    webhook: WebhookSpec,
    payload: FailureInfo | RunNotice,
    runId: string,
    stepId: string,
  ): void {
    const outcome = (ok: boolean, detail: string) => this.onOutcome({ runId, stepId, ok, detail });
    const delivery = deliverWebhook(webhook, payload, { allow: this.#allow }).then(
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

/** Options of {@link deliverWebhook}. */
export interface DeliverOptions {
  /** The hosts it may go to (default: any, as in local mode). */
  allow?: WebhookAllowList;
}

/**
 * POSTs the failure metadata to a webhook, retrying with exponential
 * backoff; resolves with a sentence saying where it was delivered, rejects
 * with one saying why it was not. With an allow-list, a URL outside it is
 * refused before anything is sent, and redirects are not followed (they
 * could lead anywhere).
 */
export async function deliverWebhook(
  webhook: WebhookSpec,
  payload: FailureInfo | RunNotice,
  options: DeliverOptions = {},
): Promise<string> {
  if (options.allow && !options.allow.allows(webhook.url)) {
    throw new Error(
      `on-failure webhook ${webhookHost(webhook.url)} refused: not a host this server ` +
        `allows (--webhook-allow: ${options.allow.describe()})`,
    );
  }
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
        body: JSON.stringify(webhookBody(webhook, payload)),
        signal: AbortSignal.timeout(webhook.timeoutMs),
        redirect: options.allow ? "manual" : "follow",
      });
      await response.body?.cancel();
      if (response.ok) return `delivered to ${webhookHost(webhook.url)} (HTTP ${response.status})`;
      lastError = response.status >= 300 && response.status < 400
        ? `HTTP ${response.status} (redirects are not followed)`
        : `HTTP ${response.status}`;
      // A 4xx other than 408/429 will not change on a retry.
      if (response.status < 500 && response.status !== 408 && response.status !== 429) break;
    } catch (error) {
      // fetch's messages quote the URL; only its host goes further.
      lastError = withoutUrl(error instanceof Error ? error.message : String(error), webhook.url);
    }
  }
  throw new Error(`webhook ${webhookHost(webhook.url)} failed: ${lastError}`);
}

/**
 * The body a webhook gets: runnel's JSON (`event` and the metadata), or a
 * Slack incoming-webhook message.
 */
export function webhookBody(
  webhook: Pick<WebhookSpec, "format">,
  payload: FailureInfo | RunNotice,
): Record<string, unknown> {
  const isFailure = "stepId" in payload;
  if (webhook.format !== "slack") {
    return { event: isFailure ? "step.failed" : `run.${payload.status}`, ...payload };
  }
  if (isFailure) {
    return {
      text: `:x: *${payload.pipeline}*: step \`${payload.stepId}\` failed ` +
        `(${payload.errorClass}${
          payload.exitCode !== undefined ? `, exit ${payload.exitCode}` : ""
        }` +
        `): ${payload.message} · run ${payload.runId}`,
    };
  }
  const icon = payload.status === "succeeded"
    ? ":white_check_mark:"
    : payload.status === "failed"
    ? ":x:"
    : ":no_entry_sign:";
  const failed = payload.failedSteps.length > 0
    ? ` (failed: ${payload.failedSteps.map((step) => `\`${step}\``).join(", ")})`
    : "";
  return { text: `${icon} *${payload.pipeline}*: run ${payload.runId} ${payload.status}${failed}` };
}

/** Deliveries of an email alert before it is given up. */
const MAIL_ATTEMPTS = 3;

/**
 * Mails a run's end through the operator's SMTP server (`npm:nodemailer`),
 * retried with backoff; resolves with where it went, rejects with why not.
 */
export async function sendAlertMail(
  email: EmailAlert,
  notice: RunNotice,
  smtp: SmtpSettings | undefined,
): Promise<string> {
  if (!smtp) {
    throw new Error("email alert not sent: no SMTP server is configured here (--smtp HOST:PORT)");
  }
  const { default: nodemailer } = await import("npm:nodemailer@10.6.1");
  const transport = nodemailer.createTransport({
    host: smtp.host,
    port: smtp.port,
    secure: smtp.port === 465,
    connectionTimeout: 10_000,
    greetingTimeout: 10_000,
  });
  const subject = `${email.subject ? `${email.subject} ` : ""}[runnel] ${notice.pipeline}: run ` +
    `${notice.runId} ${notice.status}`;
  const text = [
    `Pipeline ${notice.pipeline}, run ${notice.runId}: ${notice.status}.`,
    ...(notice.failedSteps.length > 0 ? [`Failed steps: ${notice.failedSteps.join(", ")}.`] : []),
    `Ended at ${new Date(notice.at).toISOString()}.`,
    "",
    `runnel show ${notice.runId}`,
  ].join("\n");
  let last = "";
  for (let attempt = 0; attempt < MAIL_ATTEMPTS; attempt++) {
    if (attempt > 0) await abortableDelay(Math.min(1_000 * 2 ** (attempt - 1), 10_000));
    try {
      const info = await transport.sendMail({ from: smtp.from, to: email.to, subject, text });
      return `mailed to ${info.accepted.length} recipient(s) through ${smtp.host}:${smtp.port}`;
    } catch (error) {
      last = error instanceof Error ? error.message : String(error);
    }
  }
  throw new Error(`email alert through ${smtp.host}:${smtp.port} failed: ${last}`);
}

/** `host:port` of a webhook URL, for messages (its path and query may hold secrets). */
export function webhookHost(url: string): string {
  try {
    const parsed = new URL(url);
    return `${parsed.hostname}:${parsed.port || (parsed.protocol === "https:" ? 443 : 80)}`;
  } catch {
    return "(not a URL)";
  }
}

function withoutUrl(message: string, url: string): string {
  const host = webhookHost(url);
  let href = url;
  try {
    href = new URL(url).href;
  } catch {
    // Not a URL: nothing else to strip.
  }
  return message.split(url).join(host).split(href).join(host);
}
