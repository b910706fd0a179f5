/**
 * Fan-in: `inputs.readings` is a directory holding one `reading.json` per
 * matrix leg (`<leg>/reading.json`); merge them into `total.json`.
 */
import type { StepContext } from "../../../backends/deno/context.ts";

export default async function merge(ctx: StepContext): Promise<void> {
  const readings: Array<{ region: string; weight: number; kwh: number }> = [];
  for await (const leg of Deno.readDir(ctx.inputs.readings)) {
    const path = `${ctx.inputs.readings}/${leg.name}/reading.json`;
    readings.push(JSON.parse(await Deno.readTextFile(path)));
  }
  readings.sort((a, b) => a.region.localeCompare(b.region));
  const weighted = readings.reduce((sum, r) => sum + r.weight * r.kwh, 0);
  await Deno.writeTextFile(
    ctx.outputs["total.json"],
    JSON.stringify({ legs: readings.length, weighted, readings }, null, 2) + "\n",
  );
  ctx.log(`merged ${readings.length} legs`);
}
