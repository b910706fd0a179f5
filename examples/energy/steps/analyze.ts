/**
 * Energy analyzer: parses `energy_data.csv` and writes per-region totals,
 * peaks and the net balance to `output1.json`.
 */
// Step modules import the light step API, not the whole library.
import { BusinessError, type StepContext } from "../../../backends/deno/context.ts";

interface RegionSummary {
  region: string;
  readings: number;
  consumptionKwh: number;
  productionKwh: number;
  netKwh: number;
  peakConsumptionKwh: number;
  selfSufficiency: number;
}

export default async function analyze(ctx: StepContext): Promise<void> {
  const text = await Deno.readTextFile(ctx.inputs.data);
  const [header, ...rows] = text.trim().split("\n");
  if (header !== "timestamp,region,consumption_kwh,production_kwh") {
    // Bad data will not get better on a retry: a business error.
    throw new BusinessError(`unexpected CSV header: ${header}`);
  }
  const byRegion = new Map<string, RegionSummary>();
  for (const row of rows) {
    const [, region, consumption, production] = row.split(",");
    const c = Number(consumption);
    const p = Number(production);
    if (!Number.isFinite(c) || !Number.isFinite(p)) {
      throw new BusinessError(`malformed reading: ${row}`);
    }
    const summary = byRegion.get(region) ?? {
      region,
      readings: 0,
      consumptionKwh: 0,
      productionKwh: 0,
      netKwh: 0,
      peakConsumptionKwh: 0,
      selfSufficiency: 0,
    };
    summary.readings++;
    summary.consumptionKwh += c;
    summary.productionKwh += p;
    summary.peakConsumptionKwh = Math.max(summary.peakConsumptionKwh, c);
    byRegion.set(region, summary);
  }
  const regions = [...byRegion.values()].map((s) => ({
    ...s,
    consumptionKwh: round(s.consumptionKwh),
    productionKwh: round(s.productionKwh),
    netKwh: round(s.productionKwh - s.consumptionKwh),
    selfSufficiency: round(s.productionKwh / s.consumptionKwh),
  }));
  await Deno.writeTextFile(
    ctx.outputs["output1.json"],
    JSON.stringify({ readings: rows.length, regions }, null, 2) + "\n",
  );
  ctx.log(`analysed ${rows.length} readings across ${regions.length} regions`);
}

function round(value: number): number {
  return Math.round(value * 100) / 100;
}
