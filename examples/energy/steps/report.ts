/**
 * Report generator: turns the analyzer's `output1.json` into the final
 * `energy_report.csv`, one line per region, sorted by net balance.
 */
import type { StepContext } from "../../../backends/deno/context.ts";

interface Summary {
  readings: number;
  regions: Array<{
    region: string;
    readings: number;
    consumptionKwh: number;
    productionKwh: number;
    netKwh: number;
    peakConsumptionKwh: number;
    selfSufficiency: number;
  }>;
}

export default async function report(ctx: StepContext): Promise<void> {
  const summary: Summary = JSON.parse(await Deno.readTextFile(ctx.inputs.summary));
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
      ].join(","),
    );
  }
  await Deno.writeTextFile(ctx.outputs["energy_report.csv"], lines.join("\n") + "\n");
  ctx.log(`report covers ${summary.regions.length} regions`);
}
