/**
 * Writes READINGS synthetic hourly readings for six regions to
 * `energy_data.csv`, streamed (a million rows never sit in memory).
 * Deterministic for a given SEED.
 */
import type { StepContext } from "../../../backends/deno/context.ts";

const REGIONS = ["us-east", "us-west", "eu-central", "eu-west", "ap-south", "sa-east"];

/** A small, fast, seeded PRNG (mulberry32). */
function mulberry32(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export default async function generate(ctx: StepContext): Promise<void> {
  const readings = Number(ctx.env.READINGS ?? "1000");
  const random = mulberry32(Number(ctx.env.SEED ?? "1"));
  const start = Date.UTC(2026, 0, 1);
  using file = await Deno.open(ctx.outputs["energy_data.csv"], { write: true, create: true });
  const encoder = new TextEncoder();
  let block = "timestamp,region,consumption_kwh,production_kwh\n";
  for (let i = 0; i < readings; i++) {
    const region = REGIONS[i % REGIONS.length];
    const hour = Math.floor(i / REGIONS.length);
    const daily = Math.sin((hour % 24) / 24 * 2 * Math.PI);
    const consumption = 120 + 40 * daily + random() * 25;
    const production = Math.max(0, 90 + 60 * daily + (random() - 0.5) * 30);
    const timestamp = new Date(start + hour * 3_600_000).toISOString();
    block += `${timestamp},${region},${consumption.toFixed(2)},${production.toFixed(2)}\n`;
    if (block.length > 1 << 20) {
      await file.write(encoder.encode(block));
      block = "";
    }
  }
  await file.write(encoder.encode(block));
  ctx.log(`wrote ${readings} readings for ${REGIONS.length} regions`);
}
