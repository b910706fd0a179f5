/**
 * Secrets: resolving a step's secret references to values, and masking
 * those values in every log line.
 *
 * A secret is referenced in the pipeline (an env var or a file of the
 * runner), never inlined; its value exists only in the step's environment
 * and is replaced by `***` wherever it would reach a log.
 *
 * @module
 */

import type { SecretRef } from "./model.ts";

/** What a masked secret is replaced with. */
export const MASK = "***";

/**
 * Secrets shorter than this are not masked: replacing every `a` or `12` in
 * a log would make it unreadable while hiding almost nothing, since such a
 * value is guessable anyway. (GitHub Actions has a similar floor.)
 */
export const MIN_MASKED_SECRET_LENGTH = 3;

/** A secret that names no value, or whose value cannot be read. */
export class SecretNotFoundError extends Error {
  /** Stable error code. */
  readonly code = "secret_not_found";
  /** The secret's name in the pipeline. */
  readonly secret: string;

  /** Builds the error for secret `secret` with the sentence saying what is missing. */
  constructor(secret: string, message: string) {
    super(message);
    this.name = "SecretNotFoundError";
    this.secret = secret;
  }
}

/** Options of {@link resolveSecrets}: where values come from (injectable for tests). */
export interface ResolveSecretsOptions {
  /** Reads an env var of the runner (default `Deno.env.get`). */
  env?: (name: string) => string | undefined;
  /** Reads a file as text (default `Deno.readTextFileSync`). */
  readFile?: (path: string) => string;
}

/**
 * Resolves the secrets named by a step to their values.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { resolveSecrets } from "./secrets.ts";
 *
 * const values = resolveSecrets(
 *   { API_KEY: { env: "MY_API_KEY" } },
 *   ["API_KEY"],
 *   { env: (name) => (name === "MY_API_KEY" ? "s3cret" : undefined) },
 * );
 * assert.deepEqual(values, { API_KEY: "s3cret" });
 * ```
 */
export function resolveSecrets(
  refs: Record<string, SecretRef>,
  names: string[],
  options: ResolveSecretsOptions = {},
): Record<string, string> {
  const readEnv = options.env ?? ((name: string) => Deno.env.get(name));
  const readFile = options.readFile ?? ((path: string) => Deno.readTextFileSync(path));
  const values: Record<string, string> = {};
  for (const name of names) {
    const ref = Object.hasOwn(refs, name) ? refs[name] : undefined;
    if (!ref) {
      const known = Object.keys(refs);
      const among = known.length > 0 ? `; defined: ${known.map((k) => `"${k}"`).join(", ")}` : "";
      throw new SecretNotFoundError(
        name,
        `secret "${name}" is not defined under the pipeline's secrets${among}`,
      );
    }
    if (ref.env !== undefined) {
      const value = readEnv(ref.env);
      if (value === undefined) {
        throw new SecretNotFoundError(
          name,
          `secret "${name}" references env var "${ref.env}", which is not set`,
        );
      }
      values[name] = value;
    } else if (ref.file !== undefined) {
      let text: string;
      try {
        text = readFile(ref.file);
      } catch (error) {
        throw new SecretNotFoundError(
          name,
          `secret "${name}" references file "${ref.file}", which cannot be read: ${
            (error as Error).message
          }`,
        );
      }
      values[name] = text.replace(/\r?\n$/, "");
    } else {
      throw new SecretNotFoundError(
        name,
        `secret "${name}" must reference an env var ("env") or a file ("file")`,
      );
    }
  }
  return values;
}

/**
 * Replaces secret values with {@link MASK}, longest first, in whole texts or
 * in streams where a value may be split across chunks.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { Masker } from "./secrets.ts";
 *
 * assert.equal(new Masker(["hunter2"]).mask("password: hunter2"), "password: ***");
 * ```
 */
export class Masker {
  readonly #pattern: RegExp | undefined;
  /** Longest masked value; a stream holds back one less than this. */
  readonly #maxLength: number;

  /** Builds a masker; values shorter than {@link MIN_MASKED_SECRET_LENGTH} are ignored. */
  constructor(secrets: string[]) {
    const masked = [...new Set(secrets)]
      .filter((secret) => secret.length >= MIN_MASKED_SECRET_LENGTH)
      // Longest first: the regex alternation takes the first that matches at
      // a position, so `abcd` wins over its prefix `abc`.
      .sort((a, b) => b.length - a.length);
    this.#maxLength = masked[0]?.length ?? 0;
    this.#pattern = masked.length > 0
      ? new RegExp(masked.map(escapeRegExp).join("|"), "g")
      : undefined;
  }

  /** Returns `text` with every secret occurrence replaced by `***`. */
  mask(text: string): string {
    return this.#pattern ? text.replace(this.#pattern, MASK) : text;
  }

  /**
   * A stream that masks what flows through it, bytes (UTF-8) or strings in,
   * strings out. It holds back at most the longest secret's length − 1
   * characters, so a secret split across chunks is still masked, and
   * everything else passes on at once.
   */
  createStream(): TransformStream<Uint8Array | string, string> {
    const pattern = this.#pattern;
    const holdBack = Math.max(0, this.#maxLength - 1);
    const decoder = new TextDecoder();
    let carry = "";
    const emit = (
      text: string,
      final: boolean,
      controller: TransformStreamDefaultController<string>,
    ) => {
      if (!pattern) {
        if (text) controller.enqueue(text);
        return;
      }
      // Positions before `safeEnd` have every secret that could start there
      // entirely in `text`, so they are decided exactly as `mask` would.
      let safeEnd = final ? text.length : Math.max(0, text.length - holdBack);
      let out = "";
      let last = 0;
      pattern.lastIndex = 0;
      for (let match = pattern.exec(text); match; match = pattern.exec(text)) {
        if (match.index >= safeEnd) break;
        out += text.slice(last, match.index) + MASK;
        last = match.index + match[0].length;
        safeEnd = Math.max(safeEnd, last);
      }
      out += text.slice(last, safeEnd);
      carry = text.slice(safeEnd);
      if (out) controller.enqueue(out);
    };
    return new TransformStream<Uint8Array | string, string>({
      transform(chunk, controller) {
        const text = typeof chunk === "string" ? chunk : decoder.decode(chunk, { stream: true });
        emit(carry + text, false, controller);
      },
      flush(controller) {
        emit(carry + decoder.decode(), true, controller);
      },
    });
  }
}

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}
