/** Energy generator (AWS): synthetic hourly readings per region → `energy_data.csv`. */
import { hold, type StepContext } from "./_context.ts";

const REGIONS = ["us-east", "us-west", "eu-central", "ap-south"];

/** A small seeded generator, so every run writes the same data. */
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
  await hold(ctx);
  const readings = Number(ctx.env.READINGS ?? "1000");
  const random = mulberry32(Number(ctx.env.SEED ?? "1"));
  const start = Date.UTC(2026, 0, 1);
  const lines = ["timestamp,region,consumption_kwh,production_kwh"];
  for (let i = 0; i < readings; i++) {
    const hour = Math.floor(i / REGIONS.length);
    const daily = Math.sin((hour % 24) / 24 * 2 * Math.PI);
    const consumption = 120 + 40 * daily + random() * 25;
    const production = Math.max(0, 90 + 60 * daily + (random() - 0.5) * 30);
    const timestamp = new Date(start + hour * 3_600_000).toISOString();
    lines.push(
      `${timestamp},${REGIONS[i % REGIONS.length]},${consumption.toFixed(2)},${
        production.toFixed(2)
      }`,
    );
  }
  await Deno.writeTextFile(ctx.outputs["energy_data.csv"], lines.join("\n") + "\n");
  ctx.log(`wrote ${readings} readings for ${REGIONS.length} regions`);
}
