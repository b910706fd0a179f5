/** Energy analyzer (GCP): per-region totals, peak and self-sufficiency → `output1.json`. */
import { hold, type StepContext } from "./_context.ts";

export default async function analyze(ctx: StepContext): Promise<void> {
  await hold(ctx);
  const [header, ...rows] = (await Deno.readTextFile(ctx.inputs.data)).trim().split("\n");
  if (header !== "timestamp,region,consumption_kwh,production_kwh") {
    throw new Error(`Expected the energy CSV header, got: ${header}`);
  }
  const regions = new Map<
    string,
    { readings: number; consumption: number; production: number; peak: number }
  >();
  for (const row of rows) {
    const [, region, consumption, production] = row.split(",");
    const c = Number(consumption);
    const p = Number(production);
    if (!Number.isFinite(c) || !Number.isFinite(p)) throw new Error(`Expected numbers in: ${row}`);
    const totals = regions.get(region) ?? { readings: 0, consumption: 0, production: 0, peak: 0 };
    totals.readings++;
    totals.consumption += c;
    totals.production += p;
    totals.peak = Math.max(totals.peak, c);
    regions.set(region, totals);
  }
  const round = (value: number) => Math.round(value * 100) / 100;
  const summary = {
    readings: rows.length,
    regions: [...regions].map(([region, t]) => ({
      region,
      readings: t.readings,
      consumptionKwh: round(t.consumption),
      productionKwh: round(t.production),
      netKwh: round(t.production - t.consumption),
      peakConsumptionKwh: round(t.peak),
      selfSufficiency: round(t.production / t.consumption),
    })),
  };
  await Deno.writeTextFile(ctx.outputs["output1.json"], JSON.stringify(summary, null, 2) + "\n");
  ctx.log(`analyzed ${rows.length} readings in ${regions.size} regions`);
}
