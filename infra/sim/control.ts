/**
 * The host side of the delay line's control socket: one JSON request per
 * line, one JSON answer per line.
 *
 * @module
 */

import type { ControlRequest, DelayLineState } from "./delay_line.ts";

/** How long the delay line may take to answer. */
const CONTROL_TIMEOUT_MS = 5_000;

/** Sends one request to the delay line at `socket` and returns its answer. */
export async function delayLineRequest(
  socket: string,
  request: ControlRequest,
): Promise<DelayLineState> {
  const connection = await Deno.connect({ transport: "unix", path: socket });
  const timer = setTimeout(() => connection.close(), CONTROL_TIMEOUT_MS);
  try {
    await connection.write(new TextEncoder().encode(JSON.stringify(request) + "\n"));
    let text = "";
    for await (const chunk of connection.readable.pipeThrough(new TextDecoderStream())) {
      text += chunk;
      if (text.includes("\n")) break;
    }
    const answer = JSON.parse(text) as DelayLineState | { error: string };
    if ("error" in answer) throw new Error(`delay line: ${answer.error}`);
    return answer;
  } finally {
    clearTimeout(timer);
    try {
      connection.close();
    } catch {
      // Closed by the reader's end.
    }
  }
}
