import assert from "node:assert/strict";
import {
  MASK,
  Masker,
  MAX_HELD_LINE_CHARS,
  MIN_MASKED_SECRET_LENGTH,
  parseSecretSources,
  resolveSecrets,
  SecretNotFoundError,
  SecretsFileError,
  SecretStore,
  secretVariants,
} from "./secrets.ts";
import { mulberry32, testSeed } from "./_random.ts";
import { PipelineError } from "./errors.ts";
import { parsePipeline } from "./load.ts";

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
      assert.equal(error.errorClass, "permission");
      assert.equal(error.secret, "API_KEY");
      assert.equal(error.message, 'Secret "API_KEY" reads env var "API_KEY", which is not set');
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
    /Secret "T" reads file "\/x", which cannot be read: No such file/,
  );
  assert.throws(
    () => resolveSecrets({ A: { env: "A" } }, ["B"], { env: () => "v" }),
    /Secret "B" is not defined under the pipeline's secrets; defined: "A"/,
  );
  assert.throws(() => resolveSecrets({ A: {} }, ["A"]), /must name a secret, an env var or a file/);
});

Deno.test("resolveSecrets resolves named references through the operator's store only", () => {
  const readers = {
    env: (name: string) => ({ DB_PASSWORD: "db-value" } as Record<string, string>)[name],
    readFile: (path: string) => path === "/run/key" ? "key-value\n" : "",
  };
  const store = new SecretStore({
    "db-password": { env: "DB_PASSWORD" },
    "deploy-key": { file: "/run/key" },
  }, readers);
  assert.deepEqual(store.names, ["db-password", "deploy-key"]);
  const refs = { DB: { secret: "db-password" }, KEY: { secret: "deploy-key" } };
  assert.deepEqual(resolveSecrets(refs, ["DB", "KEY"], { ...readers, store }), {
    DB: "db-value",
    KEY: "key-value",
  });
  assert.throws(
    () => resolveSecrets({ X: { secret: "nope" } }, ["X"], { store }),
    /Secret "X" names "nope", which the operator did not declare \(declare it in a secrets file/,
  );
  assert.throws(() => store.read("nope"), SecretNotFoundError);
});

Deno.test("parseSecretSources checks names and sources, resolving relative files", () => {
  assert.deepEqual(
    parseSecretSources({ a: { env: "A" }, "b.key": { file: "k" }, c: { file: "/abs" } }, {
      baseDir: "/etc/runnel",
      origin: "s.yaml",
    }),
    { a: { env: "A" }, "b.key": { file: "/etc/runnel/k" }, c: { file: "/abs" } },
  );
  assert.throws(
    () => parseSecretSources({ "../x": { env: "A" } }, { baseDir: "/", origin: "s.yaml" }),
    (error: unknown) =>
      error instanceof SecretsFileError && /^s\.yaml: .*"\.\.\/x"/.test(error.message),
  );
  assert.throws(
    () => parseSecretSources({ a: "hunter2" }, { baseDir: "/", origin: "s.yaml" }),
    /expected secret name → \{ env: VAR \} or \{ file: path \}/,
  );
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

Deno.test("Masker stream holds back only what may start a secret", async () => {
  const masker = new Masker(["secret"]);
  const stream = masker.createStream();
  const writer = stream.writable.getWriter();
  const reader = stream.readable.getReader();
  void writer.write("line one of the log\nsec");
  const first = await reader.read();
  // "sec" may begin the secret: only it waits.
  assert.equal(first.value, "line one of the log\n");
  void writer.write("ond line");
  assert.equal((await reader.read()).value, "second line");
  void writer.close();
  assert.equal((await reader.read()).done, true);
});

Deno.test("Masker masks each line of a multi-line secret and its base64", () => {
  const key = "-----BEGIN KEY-----\nMIIEowIBAAKCAQEA\n-----END KEY-----";
  const masker = new Masker([key]);
  assert.equal(masker.mask(`key:\n${key}\n`), "key:\n***\n");
  assert.equal(masker.mask("second: MIIEowIBAAKCAQEA only"), "second: *** only");
  assert.equal(masker.mask(JSON.stringify({ key })), `{"key":"***\\n***\\n***"}`);
  const token = "hunter2-SECRET";
  const tokenMasker = new Masker([token]);
  for (const prefix of ["", "a", "ab", "user:"]) {
    const encoded = btoa(`${prefix}${token}!`);
    const masked = tokenMasker.mask(`auth ${encoded}`);
    assert.match(masked, /\*\*\*/, `base64 of ${prefix}${token}`);
    assert.ok(masked.length < `auth ${encoded}`.length - 8, masked);
  }
  const urlSafe = btoa("\xfb\xff" + token).replaceAll("+", "-").replaceAll("/", "_");
  assert.match(tokenMasker.mask(urlSafe), /\*\*\*/);
  assert.ok(secretVariants(token).every((variant) => variant.length >= MIN_MASKED_SECRET_LENGTH));
});

Deno.test("Masker stream masks a multi-line secret whose lines arrive in separate chunks", () => {
  const secret = "first-line-abc\nsecond-line-xyz";
  const masker = new Masker([secret]);
  const stream = masker.stream({ wholeLines: true });
  let out = stream.push("before\nfirst-line-abc\n");
  out += stream.push("second-line-xyz\nafter\n");
  out += stream.end();
  assert.equal(out, "before\n***\nafter\n");
  // A long line with no newline is not held whole.
  const long = masker.stream({ wholeLines: true });
  assert.equal(long.push("x".repeat(MAX_HELD_LINE_CHARS + 1)).length, MAX_HELD_LINE_CHARS + 1);
});

Deno.test("Masker stream equals mask() for random secrets and chunkings (seeded)", async () => {
  const seed = testSeed();
  const random = mulberry32(seed);
  const alphabet = "abc-\n";
  const word = (min: number, max: number) => {
    const length = min + Math.floor(random() * (max - min + 1));
    let text = "";
    for (let i = 0; i < length; i++) text += alphabet[Math.floor(random() * alphabet.length)];
    return text;
  };
  try {
    for (let round = 0; round < 400; round++) {
      const secrets = Array.from({ length: 1 + Math.floor(random() * 3) }, () => word(1, 9));
      const masker = new Masker(secrets);
      // Output that holds the secrets (and their lines) among random text.
      let text = "";
      for (let i = Math.floor(random() * 6); i >= 0; i--) {
        text += word(0, 12) +
          (random() < 0.6 ? secrets[Math.floor(random() * secrets.length)] : "");
      }
      const chunks: string[] = [];
      for (let at = 0; at < text.length;) {
        const size = 1 + Math.floor(random() * 8);
        chunks.push(text.slice(at, at + size));
        at += size;
      }
      const context = `secrets ${JSON.stringify(secrets)}, chunks ${JSON.stringify(chunks)}`;
      const expected = masker.mask(text);
      assert.equal((await streamed(masker, chunks)).join(""), expected, context);
      const lines = masker.stream({ wholeLines: true });
      const pieces = chunks.map((chunk) => lines.push(chunk));
      pieces.push(lines.end());
      assert.equal(pieces.join(""), expected, context);
      // Every piece but the last ends a line (maybe a masked one's newline).
      for (const piece of pieces.slice(0, -1)) {
        assert.ok(
          piece === "" || piece.endsWith("\n") || piece.endsWith(MASK),
          `${context}: piece ${JSON.stringify(piece)}`,
        );
      }
      for (const secret of secrets) {
        if (secret.trim().length >= MIN_MASKED_SECRET_LENGTH && !secret.includes("\n")) {
          assert.ok(!expected.includes(secret), `${context}: ${JSON.stringify(secret)} leaked`);
        }
      }
    }
  } catch (error) {
    console.error(`Masker property test failed with RUNNEL_SEED=${seed}`);
    throw error;
  }
});

Deno.test("validation: a pipeline names declared secrets; a cluster refuses env and file references", () => {
  const source = `name: p
secrets:
  DB: db-pasword
  TOK: { env: RUNNEL_TOKEN }
  SHADOW: { file: /etc/shadow }
steps:
  a: { run: echo, secrets: [DB, TOK, SHADOW] }
`;
  // Local mode, no operator names known: references as written.
  const plan = parsePipeline(source, { file: "p.yaml" });
  assert.deepEqual(plan.secrets, {
    DB: { secret: "db-pasword" },
    TOK: { env: "RUNNEL_TOKEN" },
    SHADOW: { file: "/etc/shadow" },
  });
  assert.throws(
    () =>
      parsePipeline(source, {
        file: "p.yaml",
        secrets: { names: ["db-password"], allowSources: false },
      }),
    (error: unknown) => {
      assert.ok(error instanceof PipelineError);
      assert.deepEqual(
        error.diagnostics.map((d) => [d.code, d.line, d.col]),
        [["undeclared_secret", 3, 7], ["secret_source_refused", 4, 8], [
          "secret_source_refused",
          5,
          11,
        ]],
      );
      assert.match(error.diagnostics[0].message, /names "db-pasword", which the operator did not/);
      assert.equal(error.diagnostics[0].hint, 'did you mean "db-password"?');
      assert.match(
        error.diagnostics[1].message,
        /reads env var "RUNNEL_TOKEN" of the server or agent: a cluster resolves only/,
      );
      assert.match(error.diagnostics[1].hint ?? "", /write TOK: <its name>/);
      return true;
    },
  );
  // Local mode with declared names: a typo is located, env and files stay allowed.
  assert.throws(
    () => parsePipeline(source, { file: "p.yaml", secrets: { names: [] } }),
    /p\.yaml:3:7: secret "DB" names "db-pasword", which the operator did not declare/,
  );
});
