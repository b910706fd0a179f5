/** Energy report (Azure): one CSV row per region, best net balance first → `energy_report.csv`. */
import { hold, type StepContext } from "./_context.ts";

interface Region {
  region: string;
  readings: number;
  consumptionKwh: number;
  productionKwh: number;
  netKwh: number;
  peakConsumptionKwh: number;
  selfSufficiency: number;
}

export default async function report(ctx: StepContext): Promise<void> {
  await hold(ctx);
  const summary = JSON.parse(await Deno.readTextFile(ctx.inputs.summary)) as { regions: Region[] };
  const lines = [
    "region,readings,consumption_kwh,production_kwh,net_kwh,peak_kwh,self_sufficiency",
  ];
  for (const r of [...summary.regions].sort((a, b) => b.netKwh - a.netKwh)) {
    lines.push(
      [
        r.region,
        r.readings,
        r.consumptionKwh,
        r.productionKwh,
        r.netKwh,
        r.peakConsumptionKwh,
        r.selfSufficiency,
      ]
        .join(","),
    );
  }
  await Deno.writeTextFile(ctx.outputs["energy_report.csv"], lines.join("\n") + "\n");
  ctx.log(`report covers ${summary.regions.length} regions`);
}
