import assert from "node:assert/strict";
import { join } from "node:path";
import type { SplitConfig } from "../../core/fanout.ts";
import { runSplit, SplitError } from "./split.ts";

async function scratch(): Promise<{ dir: string; out: string } & AsyncDisposable> {
  const dir = await Deno.makeTempDir({ prefix: "runnel-split-" });
  const out = join(dir, "out");
  await Deno.mkdir(out);
  return { dir, out, [Symbol.asyncDispose]: () => Deno.remove(dir, { recursive: true }) };
}

async function split(text: string, config: SplitConfig, name = "data.csv") {
  await using s = await scratch();
  const input = join(s.dir, name);
  await Deno.writeTextFile(input, text);
  const outcome = await runSplit(config, input, s.out);
  const files = await Promise.all(
    outcome.outputs.map((output) => Deno.readTextFile(join(s.out, output))),
  );
  return { ...outcome, files };
}

const base = { input: "data", maxLegs: 100 };

Deno.test("batch by lines repeats the header and keeps the extension", async () => {
  const text = "h1,h2\n" + Array.from({ length: 25 }, (_, i) => `${i},x\n`).join("");
  const { outputs, legs, files } = await split(text, {
    ...base,
    mode: "lines",
    lines: 10,
    header: true,
  });
  assert.deepEqual(outputs, ["data.0000.csv", "data.0001.csv", "data.0002.csv"]);
  assert.deepEqual(legs.map((leg) => leg.key), ["0000", "0001", "0002"]);
  for (const file of files) assert.ok(file.startsWith("h1,h2\n"));
  assert.deepEqual(files.map((file) => file.split("\n").length - 2), [10, 10, 5]);
  // Every data line once, in order.
  assert.equal(files.map((file) => file.slice(6)).join(""), text.slice(6));
});

Deno.test("batch by lines without a trailing newline keeps the last line", async () => {
  const { files } = await split("a\nb\nc", { ...base, mode: "lines", lines: 2, header: false });
  assert.deepEqual(files, ["a\nb\n", "c"]);
});

Deno.test("batch by bytes cuts only at line ends, across read chunks", async () => {
  const line = "x".repeat(99) + "\n";
  const text = line.repeat(30_000); // 3 MB: several 1 MiB chunks
  const { files } = await split(text, { ...base, mode: "bytes", bytes: 1_000_000 });
  assert.equal(files.join(""), text);
  for (const file of files) {
    assert.ok(file.endsWith("\n"));
    assert.equal(file.length % 100, 0);
  }
  assert.deepEqual(files.map((file) => file.length), [1_000_000, 1_000_000, 1_000_000]);
});

Deno.test("batch by count makes at most N batches of about equal size", async () => {
  const text = Array.from({ length: 1000 }, (_, i) => `line ${i}\n`).join("");
  const { files } = await split(text, { ...base, mode: "count", count: 4 });
  assert.equal(files.length, 4);
  assert.equal(files.join(""), text);
  const sizes = files.map((file) => file.length);
  assert.ok(Math.max(...sizes) - Math.min(...sizes) < 200, String(sizes));
});

Deno.test("batch by records skips blank lines", async () => {
  const text = '{"a":1}\n\n{"a":2}\n   \n{"a":3}\n';
  const { files } = await split(text, { ...base, mode: "records", records: 2 }, "r.jsonl");
  assert.deepEqual(files, ['{"a":1}\n{"a":2}\n', '{"a":3}\n']);
});

Deno.test("batch by items splits a JSON array without parsing it whole", async () => {
  const items = [
    { id: 1, note: "a, b ] } [ {" },
    'quoted "], text',
    [1, [2, 3]],
    null,
    42.5,
    { nested: { deep: [{}, []] } },
    true,
  ];
  const text = " \n" + JSON.stringify(items, null, 2) + "\n";
  const { files, outputs } = await split(text, { ...base, mode: "items", items: 3 }, "l.json");
  assert.deepEqual(outputs, ["l.0000.json", "l.0001.json", "l.0002.json"]);
  assert.deepEqual(files.flatMap((file) => JSON.parse(file)), items);
  assert.deepEqual(files.map((file) => JSON.parse(file).length), [3, 3, 1]);
});

Deno.test("batch by items refuses what is not a JSON array", async () => {
  for (const text of ['{"a": 1}', "[1, 2", "[1 2]", "[1,,2]", "[1] x"]) {
    await assert.rejects(
      () => split(text, { ...base, mode: "items", items: 2 }, "l.json"),
      SplitError,
      text,
    );
  }
});

Deno.test("a split over the cap fails and says so", async () => {
  const text = "a\n".repeat(50);
  await assert.rejects(
    () => split(text, { ...base, maxLegs: 4, mode: "lines", lines: 10, header: false }),
    /at most 4 batches/,
  );
});

Deno.test("batch files: one leg per file of a directory, sorted", async () => {
  await using s = await scratch();
  const dir = join(s.dir, "counts");
  for (const leg of ["region=us", "region=eu"]) {
    await Deno.mkdir(join(dir, leg), { recursive: true });
    await Deno.writeTextFile(join(dir, leg, "count.txt"), leg);
  }
  const { outputs, legs } = await runSplit({ ...base, mode: "files" }, dir, s.out);
  assert.deepEqual(outputs, ["0000-count.txt", "0001-count.txt"]);
  assert.deepEqual(legs.map((leg) => leg.source), ["region=eu/count.txt", "region=us/count.txt"]);
  assert.equal(await Deno.readTextFile(join(s.out, outputs[1])), "region=us");
});

Deno.test("foreach: keys from the items, a key field, or indexes", async () => {
  const foreach: SplitConfig & { mode: "foreach" } = {
    input: "items",
    maxLegs: 100,
    mode: "foreach",
    fields: [],
  };
  const scalars = await split('["eu-west", "us-east"]', foreach, "s.json");
  assert.deepEqual(scalars.legs.map((leg) => leg.key), ["eu-west", "us-east"]);
  const objects = await split('[{"r":"a"},{"r":"b"}]', { ...foreach, key: "r" }, "s.json");
  assert.deepEqual(objects.legs.map((leg) => [leg.key, leg.item]), [["a", { r: "a" }], [
    "b",
    { r: "b" },
  ]]);
  const unsafe = await split('["a b", "c"]', foreach, "s.json");
  assert.deepEqual(unsafe.legs.map((leg) => leg.key), ["0000", "0001"]);
  await assert.rejects(
    () => split('[{"r":"a"},{"r":"a"}]', { ...foreach, key: "r" }, "s.json"),
    /appears twice/,
  );
  await assert.rejects(
    () => split('[{"r":"a"},{}]', { ...foreach, fields: [["r"]] }, "s.json"),
    /Item 1 of the foreach list has no field "r"/,
  );
  await assert.rejects(() => split('{"no": "list"}', foreach, "s.json"), /a JSON array/);
});

Deno.test({
  name: "a 1 GB input splits by lines with bounded memory",
  // Writes 1 GiB to the temp dir and back; about 3 s.
  async fn() {
    await using s = await scratch();
    const input = join(s.dir, "big.csv");
    const line = new TextEncoder().encode("2026-12-03T00:00:00Z,meter-0001,12.345\n");
    const block = new Uint8Array(Math.floor((1 << 20) / line.length) * line.length);
    for (let at = 0; at < block.length; at += line.length) block.set(line, at);
    {
      using file = await Deno.open(input, { write: true, create: true });
      for (let i = 0; i < 1024; i++) {
        let done = 0;
        while (done < block.length) done += await file.write(block.subarray(done));
      }
    }
    const size = (await Deno.stat(input)).size;
    const before = Deno.memoryUsage().rss;
    let peak = before;
    const sampler = setInterval(() => peak = Math.max(peak, Deno.memoryUsage().rss), 20);
    try {
      const { outputs } = await runSplit(
        { ...base, maxLegs: 4096, mode: "lines", lines: 1_000_000, header: false },
        input,
        s.out,
      );
      const lines = size / line.length;
      assert.equal(outputs.length, Math.ceil(lines / 1_000_000));
      let total = 0;
      for (const output of outputs) total += (await Deno.stat(join(s.out, output))).size;
      assert.equal(total, size);
    } finally {
      clearInterval(sampler);
    }
    peak = Math.max(peak, Deno.memoryUsage().rss);
    const grew = peak - before;
    assert.ok(grew < 64 * 2 ** 20, `RSS grew by ${grew} bytes splitting ${size} bytes`);
  },
});
