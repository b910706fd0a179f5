import assert from "node:assert/strict";
import {
  Masker,
  MIN_MASKED_SECRET_LENGTH,
  resolveSecrets,
  SecretNotFoundError,
} from "./secrets.ts";

Deno.test("resolveSecrets reads env and file references", () => {
  const values = resolveSecrets(
    { API_KEY: { env: "MY_KEY" }, TOKEN: { file: "/secrets/token" }, UNUSED: { env: "NOPE" } },
    ["API_KEY", "TOKEN"],
    {
      env: (name) => (name === "MY_KEY" ? "key-value" : undefined),
      readFile: (path) => (path === "/secrets/token" ? "tok-value\n" : ""),
    },
  );
  assert.deepEqual(values, { API_KEY: "key-value", TOKEN: "tok-value" });
});

Deno.test("resolveSecrets names an unset env var", () => {
  assert.throws(
    () => resolveSecrets({ API_KEY: { env: "API_KEY" } }, ["API_KEY"], { env: () => undefined }),
    (error: unknown) => {
      assert.ok(error instanceof SecretNotFoundError);
      assert.equal(error.code, "secret_not_found");
      assert.equal(error.secret, "API_KEY");
      assert.equal(
        error.message,
        'secret "API_KEY" references env var "API_KEY", which is not set',
      );
      return true;
    },
  );
});

Deno.test("resolveSecrets names an unreadable file and an undefined secret", () => {
  assert.throws(
    () =>
      resolveSecrets({ T: { file: "/x" } }, ["T"], {
        readFile: () => {
          throw new Deno.errors.NotFound("No such file");
        },
      }),
    /secret "T" references file "\/x", which cannot be read: No such file/,
  );
  assert.throws(
    () => resolveSecrets({ A: { env: "A" } }, ["B"], { env: () => "v" }),
    /secret "B" is not defined under the pipeline's secrets; defined: "A"/,
  );
  assert.throws(() => resolveSecrets({ A: {} }, ["A"]), /must reference an env var/);
});

Deno.test("Masker masks every occurrence, longest first", () => {
  const masker = new Masker(["abc", "abcdef", "zz"]);
  assert.equal(masker.mask("abcdef abc abcxyz"), "*** *** ***xyz");
  // Values shorter than the floor are left alone.
  assert.equal(MIN_MASKED_SECRET_LENGTH, 3);
  assert.equal(masker.mask("zz zz"), "zz zz");
  assert.equal(new Masker(["", "a"]).mask("a b"), "a b");
  assert.equal(new Masker(["a.b(c)"]).mask("x a.b(c) aXb(c)"), "x *** aXb(c)");
});

async function streamed(masker: Masker, chunks: (string | Uint8Array)[]): Promise<string[]> {
  const out: string[] = [];
  const stream = ReadableStream.from(chunks).pipeThrough(masker.createStream());
  for await (const piece of stream) out.push(piece);
  return out;
}

Deno.test("Masker stream masks secrets split across chunks", async () => {
  const masker = new Masker(["s3cret-value"]);
  const out = await streamed(masker, ["token=s3c", "ret-", "value; done"]);
  assert.equal(out.join(""), "token=***; done");
  const bytes = new TextEncoder().encode("é s3cret-value é");
  const split = [bytes.slice(0, 1), bytes.slice(1, 9), bytes.slice(9)];
  assert.equal((await streamed(masker, split)).join(""), "é *** é");
});

Deno.test("Masker stream passes text on without waiting for the end", async () => {
  const masker = new Masker(["secret"]);
  const stream = masker.createStream();
  const writer = stream.writable.getWriter();
  const reader = stream.readable.getReader();
  void writer.write("line one of the log\n");
  const first = await reader.read();
  // Only the last len("secret") - 1 characters may be held back.
  assert.equal(first.value, "line one of the");
  void writer.close();
  const rest = await reader.read();
  assert.equal(rest.value, " log\n");
});

Deno.test("Masker stream equals mask() for random chunkings (seeded)", async () => {
  const seed = Number(Deno.env.get("RUNNEL_SEED") ?? Math.floor(Math.random() * 2 ** 31));
  let state = seed >>> 0;
  const random = () => {
    // mulberry32: small, seedable, good enough to vary chunk boundaries.
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const alphabet = "abc-";
  const word = (min: number, max: number) => {
    const length = min + Math.floor(random() * (max - min + 1));
    let text = "";
    for (let i = 0; i < length; i++) text += alphabet[Math.floor(random() * alphabet.length)];
    return text;
  };
  try {
    for (let round = 0; round < 200; round++) {
      const secrets = Array.from({ length: 1 + Math.floor(random() * 3) }, () => word(1, 6));
      const masker = new Masker(secrets);
      const text = word(0, 60);
      const chunks: string[] = [];
      for (let at = 0; at < text.length;) {
        const size = 1 + Math.floor(random() * 8);
        chunks.push(text.slice(at, at + size));
        at += size;
      }
      const out = (await streamed(masker, chunks)).join("");
      assert.equal(
        out,
        masker.mask(text),
        `secrets ${JSON.stringify(secrets)}, chunks ${JSON.stringify(chunks)}`,
      );
    }
  } catch (error) {
    console.error(`Masker property test failed with RUNNEL_SEED=${seed}`);
    throw error;
  }
});
