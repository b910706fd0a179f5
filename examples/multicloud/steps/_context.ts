/**
 * What a deno step receives (runnel's `StepContext`, the part these steps
 * use). Declared here because a submitted pipeline ships only its own
 * directory: its steps may import nothing outside it.
 */
export interface StepContext {
  env: Record<string, string | undefined>;
  inputs: Record<string, string>;
  outputs: Record<string, string>;
  log(message: string): void;
}

/** Holds a step for `HOLD_MS` (demos and tests kill nodes while steps run). */
export async function hold(ctx: StepContext): Promise<void> {
  const ms = Number(ctx.env.HOLD_MS ?? "0");
  if (ms > 0) await new Promise((resolve) => setTimeout(resolve, ms));
}
