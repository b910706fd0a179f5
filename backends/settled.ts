/**
 * Executions that have already ended: what a backend returns when nothing
 * could run (a refused host key, a missing image) or once it has learnt an
 * end without a live process to watch.
 *
 * @module
 */

import type { Execution, ExitStatus } from "./backend.ts";
import { LogQueue } from "./log_queue.ts";

/** An execution that has ended with `status`; `queue` holds what it logged. */
export function settledExecution(
  handle: string,
  queue: LogQueue,
  status: ExitStatus,
  release: () => Promise<void> = () => Promise.resolve(),
): Execution {
  queue.close();
  let releasing: Promise<void> | undefined;
  return {
    handle,
    logs: queue,
    wait: () => Promise.resolve(status),
    status: () => Promise.resolve({ state: "exited", exit: status }),
    cancel: () => Promise.resolve(),
    cleanup: () => releasing ??= release(),
  };
}

/** An attempt that ended before anything ran: its reason on stderr, as `runnel: …`. */
export function failedExecution(handle: string, status: ExitStatus): Execution {
  const queue = new LogQueue();
  queue.push({
    stream: "stderr",
    data: new TextEncoder().encode(`runnel: ${status.message}\n`),
  });
  return settledExecution(handle, queue, status);
}
