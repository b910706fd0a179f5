/**
 * Secrets: the operator's secret store, resolving a step's secret
 * references to values, and masking those values in every log line.
 *
 * A pipeline never holds a value. It maps the env var a step sees to the
 * name of a secret the operator declared (`DB_PASSWORD: db-password`); the
 * operator's store says where each name's value is read (an env var or a
 * file of the process that resolves it: a server, an agent, or the local
 * runner). Only in local mode, where the user is the operator, may the
 * pipeline point at an env var or file itself. Values live in memory only
 * and are replaced by `***` wherever they would reach a log.
 *
 * @module
 */

import { dirname, isAbsolute, resolve } from "node:path";
import type { z } from "npm:zod@4.6.7";
import { parse as parseYaml } from "npm:yaml@2.9.1";
import type { SecretRef } from "./model.ts";
import { type SecretSourceSchema, SecretSourcesSchema } from "./schema.ts";

/** What a masked secret is replaced with. */
export const MASK = "***";

/**
 * Secrets shorter than this are not masked: replacing every `a` or `12` in
 * a log would make it unreadable while hiding almost nothing, since such a
 * value is guessable anyway. (GitHub Actions has a similar floor.)
 */
export const MIN_MASKED_SECRET_LENGTH = 3;

/** Where an operator keeps a secret's value: `{ env: VAR }` or `{ file: path }`. */
export type SecretSource = z.infer<typeof SecretSourceSchema>;

/** A secret that names no value, or whose value cannot be read. */
export class SecretNotFoundError extends Error {
  /** Stable error code. */
  readonly code = "secret_not_found";
  /** Attempts fail with this class: trying again would not make the secret appear. */
  readonly errorClass = "permission";
  /** The secret's name (the env name in the pipeline, or the operator's name). */
  readonly secret: string;

  /** Builds the error for secret `secret` with the sentence saying what is missing. */
  constructor(secret: string, message: string) {
    super(message);
    this.name = "SecretNotFoundError";
    this.secret = secret;
  }
}

/** A secrets file (or config section) an operator wrote that cannot be used. */
export class SecretsFileError extends Error {
  /** Stable error code. */
  readonly code = "bad_secrets_file";

  /** Builds the error from a full sentence. */
  constructor(message: string) {
    super(message);
    this.name = "SecretsFileError";
  }
}

/** Where values are read (injectable for tests). */
export interface SecretReaders {
  /** Reads an env var of this process (default `Deno.env.get`). */
  env?: (name: string) => string | undefined;
  /** Reads a file as text (default `Deno.readTextFileSync`). */
  readFile?: (path: string) => string;
}

/**
 * The secrets an operator declared, by name, and where each value is read.
 * Values are read when asked for, never kept: a rotated file takes effect at
 * the next attempt.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { SecretStore } from "./secrets.ts";
 *
 * const store = new SecretStore({ "db-password": { env: "DB_PASSWORD" } }, {
 *   env: (name) => (name === "DB_PASSWORD" ? "hunter2" : undefined),
 * });
 * assert.deepEqual(store.names, ["db-password"]);
 * assert.equal(store.read("db-password"), "hunter2");
 * ```
 */
export class SecretStore {
  readonly #sources: Map<string, SecretSource>;
  readonly #readers: SecretReaders;

  /** A store of `sources` (name → env var or file), read through `readers`. */
  constructor(sources: Record<string, SecretSource> = {}, readers: SecretReaders = {}) {
    this.#sources = new Map(Object.entries(sources));
    this.#readers = readers;
  }

  /** The declared names, sorted. */
  get names(): string[] {
    return [...this.#sources.keys()].sort();
  }

  /** Whether `name` is declared. */
  has(name: string): boolean {
    return this.#sources.has(name);
  }

  /** Reads the value of a declared secret. Throws {@link SecretNotFoundError}. */
  read(name: string): string {
    const source = this.#sources.get(name);
    if (!source) {
      throw new SecretNotFoundError(name, `Secret "${name}" is not declared here`);
    }
    return readSource(`Secret "${name}"`, name, source, this.#readers);
  }
}

/** Options of {@link resolveSecrets}. */
export interface ResolveSecretsOptions extends SecretReaders {
  /** The operator's secrets, which named references resolve through. */
  store?: SecretStore;
}

/**
 * Resolves the secrets a step is given (their env names) to their values,
 * as the local runner does: named references through the operator's
 * `store`, and `{ env }`/`{ file }` references (local mode only) directly.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { resolveSecrets, SecretStore } from "./secrets.ts";
 *
 * const readers = { env: (name: string) => ({ A: "from-env", B: "named" })[name] };
 * const values = resolveSecrets(
 *   { API_KEY: { env: "A" }, DB: { secret: "db-password" } },
 *   ["API_KEY", "DB"],
 *   { ...readers, store: new SecretStore({ "db-password": { env: "B" } }, readers) },
 * );
 * assert.deepEqual(values, { API_KEY: "from-env", DB: "named" });
 * ```
 */
export function resolveSecrets(
  refs: Record<string, SecretRef>,
  names: string[],
  options: ResolveSecretsOptions = {},
): Record<string, string> {
  const values: Record<string, string> = {};
  for (const name of names) {
    const ref = Object.hasOwn(refs, name) ? refs[name] : undefined;
    if (!ref) {
      const known = Object.keys(refs);
      const among = known.length > 0 ? `; defined: ${known.map((k) => `"${k}"`).join(", ")}` : "";
      throw new SecretNotFoundError(
        name,
        `Secret "${name}" is not defined under the pipeline's secrets${among}`,
      );
    }
    if (ref.secret !== undefined) {
      if (!options.store?.has(ref.secret)) {
        throw new SecretNotFoundError(
          name,
          `Secret "${name}" names "${ref.secret}", which the operator did not declare ` +
            `(declare it in a secrets file: --secrets FILE, or "secrets:" in the --config file)`,
        );
      }
      values[name] = options.store.read(ref.secret);
    } else {
      values[name] = readSource(`Secret "${name}"`, name, ref, options);
    }
  }
  return values;
}

/** The value a source holds; `what` starts the error sentence. */
function readSource(
  what: string,
  name: string,
  source: SecretRef,
  readers: SecretReaders,
): string {
  if (source.env !== undefined) {
    const value = (readers.env ?? ((key: string) => Deno.env.get(key)))(source.env);
    if (value === undefined) {
      throw new SecretNotFoundError(
        name,
        `${what} reads env var "${source.env}", which is not set`,
      );
    }
    return value;
  }
  if (source.file !== undefined) {
    try {
      const text = (readers.readFile ?? ((path: string) => Deno.readTextFileSync(path)))(
        source.file,
      );
      return text.replace(/\r?\n$/, "");
    } catch (error) {
      throw new SecretNotFoundError(
        name,
        `${what} reads file "${source.file}", which cannot be read: ${(error as Error).message}`,
      );
    }
  }
  throw new SecretNotFoundError(name, `${what} must name a secret, an env var or a file`);
}

/**
 * An operator's secret sources as written (in a secrets file or an agent
 * config's `secrets:`), checked, with relative file paths resolved against
 * `baseDir` (the directory of the file they were written in).
 */
export function parseSecretSources(
  raw: unknown,
  options: { baseDir: string; origin: string },
): Record<string, SecretSource> {
  const parsed = SecretSourcesSchema.safeParse(raw ?? {});
  if (!parsed.success) {
    const problems = parsed.error.issues.map((issue) =>
      `${issue.path.length ? `"${issue.path.join(".")}": ` : ""}${issue.message}`
    );
    throw new SecretsFileError(
      `${options.origin}: expected secret name → { env: VAR } or { file: path }; ` +
        problems.join("; "),
    );
  }
  return Object.fromEntries(
    Object.entries(parsed.data).map(([name, source]) => [
      name,
      "file" in source && !isAbsolute(source.file)
        ? { file: resolve(options.baseDir, source.file) }
        : source,
    ]),
  );
}

/**
 * Reads an operator's secrets file (YAML or JSON): secret name → where its
 * value is read. Relative file paths are relative to the secrets file.
 *
 * ```yaml
 * db-password: { env: DB_PASSWORD }
 * deploy-key: { file: /etc/runnel/deploy-key }
 * ```
 *
 * @throws {SecretsFileError} when the file cannot be read or is not such a map.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { loadSecretsFile } from "./secrets.ts";
 *
 * const dir = await Deno.makeTempDir();
 * await Deno.writeTextFile(`${dir}/secrets.yaml`, "deploy-key: { file: key.txt }\n");
 * const sources = await loadSecretsFile(`${dir}/secrets.yaml`);
 * assert.deepEqual(sources, { "deploy-key": { file: `${dir}/key.txt` } });
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function loadSecretsFile(path: string): Promise<Record<string, SecretSource>> {
  let raw: unknown;
  try {
    raw = parseYaml(await Deno.readTextFile(path));
  } catch (error) {
    throw new SecretsFileError(
      `Expected a readable YAML secrets file at ${path}: ${(error as Error).message}`,
    );
  }
  return parseSecretSources(raw, { baseDir: dirname(resolve(path)), origin: path });
}

/** What validation knows of the operator's secrets (see `CheckOptions.secrets`). */
export interface SecretPolicy {
  /**
   * The secret names the operator declared: a pipeline naming another is
   * refused. Absent: names are not checked.
   */
  names?: Iterable<string>;
  /**
   * Whether a pipeline may read env vars and files of the runner itself
   * (`{ env }`, `{ file }`): yes in local mode, where the user is the
   * operator; never for a cluster. Default true.
   */
  allowSources?: boolean;
}

/**
 * A line this long with no newline yet is passed on in pieces rather than
 * held whole (its secrets are still masked): a step printing a progress bar
 * with `\r` must not fill the runner's memory.
 */
export const MAX_HELD_LINE_CHARS = 64 * 1024;

/**
 * What a secret may look like in output besides itself: each line of a
 * multi-line secret (a step that prints a key line by line, or JSON-escapes
 * it), and its base64 encoding. A secret inside a longer base64 text is
 * encoded differently at each of the three byte alignments, so for each the
 * characters that depend on the secret alone are taken, in the standard and
 * the URL-safe alphabet (GitHub Actions' runner masks the same three shifts).
 * Base64 wrapped over lines (`base64` without `-w0` past 57 bytes) is not
 * recognised.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { secretVariants } from "./secrets.ts";
 *
 * assert.ok(secretVariants("hunter2-SECRET").includes(btoa("hunter2-SECRET").slice(0, 16)));
 * assert.ok(secretVariants("line one\nline two").includes("line two"));
 * ```
 */
export function secretVariants(secret: string): string[] {
  const variants = new Set<string>([secret]);
  if (/[\r\n]/.test(secret)) {
    for (const line of secret.split(/\r?\n|\r/)) variants.add(line);
  }
  const bytes = new TextEncoder().encode(secret);
  for (let shift = 0; shift < 3; shift++) {
    const shifted = new Uint8Array(shift + bytes.length);
    shifted.set(bytes, shift);
    const encoded = encodeBase64(shifted);
    // A character depends on the bytes before the secret up to `shift`
    // characters in, and on those after it in the last, partial group.
    const core = encoded.slice(shift === 0 ? 0 : shift + 1, Math.floor(shifted.length / 3) * 4);
    variants.add(core);
    variants.add(core.replaceAll("+", "-").replaceAll("/", "_"));
  }
  return [...variants].filter((variant) => variant.length >= MIN_MASKED_SECRET_LENGTH);
}

/** Options of {@link Masker.stream}. */
export interface MaskingStreamOptions {
  /**
   * Pass text on in whole lines only (the rest at the end, or once a line
   * grows past {@link MAX_HELD_LINE_CHARS}); default false.
   */
  wholeLines?: boolean;
}

/** One stream of text being masked: pieces in, masked text out. */
export interface MaskingStream {
  /** Takes the next piece; returns the masked text that is now decided (maybe ""). */
  push(text: string): string;
  /** Ends the stream; returns the masked rest. */
  end(): string;
}

/**
 * Replaces secret values (and their {@link secretVariants}) with
 * {@link MASK}, longest first, in whole texts or in streams where a value
 * may be split across chunks and lines.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { Masker } from "./secrets.ts";
 *
 * const masker = new Masker(["hunter2"]);
 * assert.equal(masker.mask("password: hunter2"), "password: ***");
 * const stream = masker.stream({ wholeLines: true });
 * assert.equal(stream.push("password: hun"), "");
 * assert.equal(stream.push("ter2\nnext"), "password: ***\n");
 * assert.equal(stream.end(), "next");
 * ```
 */
export class Masker {
  readonly #pattern: RegExp | undefined;
  readonly #values: string[];

  /** Builds a masker; values shorter than {@link MIN_MASKED_SECRET_LENGTH} are ignored. */
  constructor(secrets: string[]) {
    const values = new Set(secrets.flatMap(secretVariants));
    // Longest first: the regex alternation takes the first that matches at
    // a position, so `abcd` wins over its prefix `abc`.
    this.#values = [...values].sort((a, b) => b.length - a.length);
    this.#pattern = this.#values.length > 0
      ? new RegExp(this.#values.map(escapeRegExp).join("|"), "g")
      : undefined;
  }

  /** Returns `text` with every secret occurrence replaced by `***`. */
  mask(text: string): string {
    return this.#pattern ? text.replace(this.#pattern, MASK) : text;
  }

  /**
   * Masks a stream of text pieces. Text is held back only from the first
   * position where a secret may begin but has not yet been seen whole (a
   * tail that is a prefix of a secret), so a secret split across pieces or
   * lines is masked and everything else passes on at once.
   */
  stream(options: MaskingStreamOptions = {}): MaskingStream {
    let carry = "";
    return {
      push: (text) => {
        const [out, rest] = this.#decide(carry + text, false, options.wholeLines ?? false);
        carry = rest;
        return out;
      },
      end: () => {
        const [out] = this.#decide(carry, true, false);
        carry = "";
        return out;
      },
    };
  }

  /**
   * A stream that masks what flows through it, bytes (UTF-8) or strings in,
   * strings out (see {@link stream}).
   */
  createStream(): TransformStream<Uint8Array | string, string> {
    const decoder = new TextDecoder();
    const masking = this.stream();
    return new TransformStream<Uint8Array | string, string>({
      transform(chunk, controller) {
        const text = typeof chunk === "string" ? chunk : decoder.decode(chunk, { stream: true });
        const out = masking.push(text);
        if (out) controller.enqueue(out);
      },
      flush(controller) {
        const out = masking.push(decoder.decode()) + masking.end();
        if (out) controller.enqueue(out);
      },
    });
  }

  /** Splits `text` into its masked decided part and the raw rest to hold back. */
  #decide(text: string, final: boolean, wholeLines: boolean): [string, string] {
    // Every secret that starts before `safeEnd` is entirely in `text` or
    // cannot match there, so those positions are decided exactly as `mask`
    // decides them.
    let safeEnd = final ? text.length : this.#heldFrom(text);
    const matches: Array<[number, number]> = [];
    const pattern = this.#pattern;
    if (pattern) {
      pattern.lastIndex = 0;
      for (let match = pattern.exec(text); match; match = pattern.exec(text)) {
        if (match.index >= safeEnd) break;
        const end = match.index + match[0].length;
        matches.push([match.index, end]);
        safeEnd = Math.max(safeEnd, end);
      }
    }
    let cut = safeEnd;
    if (wholeLines && !final) {
      cut = lineStart(text, safeEnd);
      // Never inside a masked value (a multi-line secret spans newlines).
      for (let i = matches.length - 1; i >= 0 && cut > 0; i--) {
        const [start, end] = matches[i];
        if (end <= cut) break;
        if (start < cut) cut = lineStart(text, start);
      }
      if (cut === 0 && safeEnd > MAX_HELD_LINE_CHARS) cut = safeEnd;
    }
    // A surrogate pair stays whole (a cut at a match's end never splits one).
    if (!final && cut > 0 && cut < text.length && isHighSurrogate(text.charCodeAt(cut - 1))) {
      if (!matches.some(([, end]) => end === cut)) cut--;
    }
    let out = "";
    let last = 0;
    for (const [start, end] of matches) {
      if (end > cut) break;
      out += text.slice(last, start) + MASK;
      last = end;
    }
    out += text.slice(last, cut);
    return [out, text.slice(cut)];
  }

  /** The first position of `text` whose rest is a proper prefix of a masked value. */
  #heldFrom(text: string): number {
    let from = text.length;
    for (const value of this.#values) {
      for (let at = Math.max(0, text.length - value.length + 1); at < from; at++) {
        if (text.charCodeAt(at) === value.charCodeAt(0) && value.startsWith(text.slice(at))) {
          from = at;
          break;
        }
      }
    }
    return from;
  }
}

/** Where the line holding position `before - 1` starts: just after the last newline before `before`. */
function lineStart(text: string, before: number): number {
  // lastIndexOf reads a negative start as 0, which would find a newline at 0.
  return before > 0 ? text.lastIndexOf("\n", before - 1) + 1 : 0;
}

function isHighSurrogate(code: number): boolean {
  return code >= 0xd800 && code <= 0xdbff;
}

function encodeBase64(bytes: Uint8Array): string {
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary);
}

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}
