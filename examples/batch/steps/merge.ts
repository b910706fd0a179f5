/**
 * Fan-in of every batch's `summary.json` (one directory per leg, in batch
 * order): totals per region as `energy_report.csv`, and the regions as a
 * JSON list for the next fan-out.
 */
import { join } from "node:path";
import type { StepContext } from "../../../backends/deno/context.ts";

export default async function merge(ctx: StepContext): Promise<void> {
  const legs = [...Deno.readDirSync(ctx.inputs.summaries)].map((entry) => entry.name).sort();
  const totals = new Map<string, { readings: number; consumption: number; production: number }>();
  let rows = 0;
  for (const [i, leg] of legs.entries()) {
    const summary = JSON.parse(
      await Deno.readTextFile(join(ctx.inputs.summaries, leg, "summary.json")),
    );
    if (summary.batch !== i) throw new Error(`expected batch ${i} at ${leg}, got ${summary.batch}`);
    rows += summary.rows;
    for (const [region, sum] of Object.entries(summary.regions)) {
      const total = totals.get(region) ?? { readings: 0, consumption: 0, production: 0 };
      const s = sum as typeof total;
      total.readings += s.readings;
      total.consumption += s.consumption;
      total.production += s.production;
      totals.set(region, total);
    }
  }
  const regions = [...totals.keys()].sort();
  const lines = ["region,readings,consumption_kwh,production_kwh,net_kwh"];
  for (const region of regions) {
    const t = totals.get(region)!;
    lines.push(
      [region, t.readings, t.consumption.toFixed(2), t.production.toFixed(2)]
        .concat((t.production - t.consumption).toFixed(2)).join(","),
    );
  }
  await Deno.writeTextFile(ctx.outputs["energy_report.csv"], lines.join("\n") + "\n");
  await Deno.writeTextFile(ctx.outputs["regions.json"], JSON.stringify(regions));
  ctx.log(`merged ${legs.length} batches, ${rows} readings, ${regions.length} regions`);
}
