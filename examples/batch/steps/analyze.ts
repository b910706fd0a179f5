/**
 * One batch of `energy_data.csv` (its header repeated by the split): sums
 * per region, written to `summary.json`.
 */
import { BusinessError, type StepContext } from "../../../backends/deno/context.ts";

export default async function analyze(ctx: StepContext): Promise<void> {
  const text = await Deno.readTextFile(ctx.inputs.data);
  const [header, ...rows] = text.trimEnd().split("\n");
  if (header !== "timestamp,region,consumption_kwh,production_kwh") {
    throw new BusinessError(`unexpected CSV header: ${header}`);
  }
  const regions: Record<string, { readings: number; consumption: number; production: number }> = {};
  for (const row of rows) {
    const [, region, consumption, production] = row.split(",");
    const c = Number(consumption);
    const p = Number(production);
    if (!Number.isFinite(c) || !Number.isFinite(p)) {
      throw new BusinessError(`malformed reading: ${row}`);
    }
    const sum = regions[region] ??= { readings: 0, consumption: 0, production: 0 };
    sum.readings++;
    sum.consumption += c;
    sum.production += p;
  }
  await Deno.writeTextFile(
    ctx.outputs["summary.json"],
    JSON.stringify({ batch: Number(ctx.env.RUNNEL_BATCH_INDEX), rows: rows.length, regions }),
  );
  ctx.log(`batch ${ctx.env.RUNNEL_BATCH_INDEX}: ${rows.length} readings`);
}
