/**
 * The message interfaces cannot drift from `runnel.proto`: the file
 * `deno task proto` wrote must be what it would write now, and what the
 * generator cannot type it refuses to write.
 *
 * @module
 */

import assert from "node:assert/strict";
import { MESSAGES_FILE, renderMessages, UnsupportedProtoError } from "./_gen.ts";

Deno.test("proto/_messages.ts is what `deno task proto` writes from runnel.proto", async () => {
  assert.equal(
    await Deno.readTextFile(MESSAGES_FILE),
    renderMessages(),
    "proto/_messages.ts is stale: run `deno task proto` and commit the result",
  );
});

/** Renders the messages of a .proto written to a temporary file. */
async function render(proto: string): Promise<string> {
  const file = await Deno.makeTempFile({ prefix: "runnel_gen_", suffix: ".proto" });
  try {
    await Deno.writeTextFile(file, `syntax = "proto3";\npackage test.v1;\n${proto}`);
    return renderMessages(file);
  } finally {
    await Deno.remove(file);
  }
}

Deno.test("the generator types scalars, repeated fields, maps and one-oneof messages", async () => {
  const source = await render(`
// A thing.
message Thing {
  // Its size, as int64: a number.
  int64 size_bytes = 1;
  repeated Part parts = 2;
  map<int32, Part> by_id = 3;
  bytes blob = 4;
  bool ok = 5; // Trailing comments count too.
}
message Part { double weight = 1; }
message Envelope {
  oneof body {
    Thing thing = 1;
    Part part = 2;
  }
}
`);
  assert.equal(
    source.slice(source.indexOf("/** A thing. */")),
    `/** A thing. */
export interface Thing {
  /** Its size, as int64: a number. */
  sizeBytes: number;
  parts: Part[];
  byId: Record<string, Part>;
  blob: Uint8Array;
  /** Trailing comments count too. */
  ok: boolean;
}

export interface Part {
  weight: number;
}

/** The members of \`Envelope.body\`. */
export interface EnvelopeBodies {
  thing: Thing;
  part: Part;
}
`,
  );
});

Deno.test("the generator refuses what it has no shape for", async () => {
  for (
    const [proto, expected] of [
      ["enum Color { RED = 0; }", /Expected no enums \(\.test\.v1\.Color\)/],
      ["message A { message B {} }", /Expected no types nested in message \.test\.v1\.A/],
      [
        "message A { optional string name = 1; }",
        /Expected no optional fields \(\.test\.v1\.A\.name\)/,
      ],
      ["message A { string id = 1; oneof x { string y = 2; } }", /one oneof and nothing else/],
      ["message A { oneof body { string text = 1; } }", /Expected a message as member text/],
    ] as const
  ) {
    await assert.rejects(
      render(proto),
      (error: unknown) => error instanceof UnsupportedProtoError && expected.test(error.message),
      proto,
    );
  }
});
