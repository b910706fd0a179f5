/**
 * `when` conditions: a small, safe expression language evaluated without
 * `eval`. Grammar (lowest precedence first):
 *
 * ```
 * or      := and ("||" and)*
 * and     := unary ("&&" unary)*
 * unary   := "!" unary | compare
 * compare := primary (("==" | "!=" | "<" | "<=" | ">" | ">=") primary)?
 * primary := literal | path | call | "(" or ")"
 * path    := ("steps" | "needs") "." name "." ("outcome" | "values" "." name)
 *          | ("env" | "matrix") "." name
 * call    := ("success" | "failure" | "always" | "cancelled") "(" ")"
 * ```
 *
 * A path segment may also be written `['name']`, for matrix instance ids.
 *
 * @module
 */

import { ConditionSyntaxError } from "./errors.ts";
import type { StepStatus } from "./model.ts";

export { ConditionSyntaxError } from "./errors.ts";

/** A literal value of a condition. */
export type ConditionValue = string | number | boolean | null | undefined;

/** Parsed form of a condition. */
export type ConditionAst =
  | { kind: "literal"; value: string | number | boolean | null }
  | { kind: "path"; root: "steps" | "env" | "matrix"; name: string }
  /** A value a need published: a number when it reads as one, else its text. */
  | { kind: "value"; step: string; key: string }
  | { kind: "call"; name: "success" | "failure" | "always" | "cancelled" }
  | { kind: "not"; operand: ConditionAst }
  | { kind: "logical"; op: "&&" | "||"; left: ConditionAst; right: ConditionAst }
  | {
    kind: "compare";
    op: "==" | "!=" | "<" | "<=" | ">" | ">=";
    left: ConditionAst;
    right: ConditionAst;
  };

/** What a condition can see when it is evaluated. */
export interface ConditionContext {
  /** Outcomes (and published values) of this step's needs, keyed by step names and instance ids. */
  needs: Record<string, { outcome: StepStatus; values?: Record<string, string> }>;
  /** True once the run has been cancelled. */
  runCancelled: boolean;
  /** This leg's matrix values. */
  matrix?: Record<string, string | number | boolean>;
  env: Record<string, string>;
}

/** Longest condition accepted; conditions are one-liners, this bounds work. */
export const MAX_CONDITION_LENGTH = 4096;
/** Deepest nesting accepted, so a hostile condition cannot exhaust the stack. */
export const MAX_CONDITION_DEPTH = 64;

type Token =
  | { type: "op"; value: string; offset: number }
  | { type: "ident"; value: string; offset: number }
  | { type: "string"; value: string; offset: number }
  | { type: "number"; value: number; offset: number }
  | { type: "end"; offset: number };

const OPERATORS = ["==", "!=", "<=", ">=", "&&", "||", "<", ">", "!", "(", ")", ".", "[", "]"];
const FUNCTIONS = new Set(["success", "failure", "always", "cancelled"]);
const IDENT_START = /[A-Za-z_]/;
const IDENT_PART = /[A-Za-z0-9_-]/;
const NUMBER_AT = /-?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][+-]?\d+)?/y;

function tokenize(src: string, start: number, end: number): Token[] {
  const tokens: Token[] = [];
  let i = start;
  while (i < end) {
    const c = src[i];
    if (c === " " || c === "\t" || c === "\n" || c === "\r") {
      i++;
      continue;
    }
    if (c === "'" || c === '"') {
      const open = i;
      let value = "";
      i++;
      for (;;) {
        if (i >= end) throw new ConditionSyntaxError("Unterminated string literal", open);
        if (src[i] === c) {
          // Doubled quote is an escaped quote, as in GitHub expressions.
          if (src[i + 1] === c && i + 1 < end) {
            value += c;
            i += 2;
            continue;
          }
          i++;
          break;
        }
        value += src[i++];
      }
      tokens.push({ type: "string", value, offset: open });
      continue;
    }
    NUMBER_AT.lastIndex = i;
    const prev = tokens.at(-1);
    const numberAllowed = c !== "-" || !prev || prev.type === "op" && prev.value !== ")" &&
        prev.value !== "]";
    const number = numberAllowed ? NUMBER_AT.exec(src) : null;
    if (number && i + number[0].length <= end && /[-\d.]/.test(c)) {
      tokens.push({ type: "number", value: Number(number[0]), offset: i });
      i += number[0].length;
      continue;
    }
    if (IDENT_START.test(c)) {
      const open = i;
      while (i < end && IDENT_PART.test(src[i])) i++;
      tokens.push({ type: "ident", value: src.slice(open, i), offset: open });
      continue;
    }
    const op = OPERATORS.find((candidate) => src.startsWith(candidate, i));
    if (op && i + op.length <= end) {
      tokens.push({ type: "op", value: op, offset: i });
      i += op.length;
      continue;
    }
    throw new ConditionSyntaxError(`Unexpected character "${c}"`, i);
  }
  tokens.push({ type: "end", offset: end });
  return tokens;
}

class Parser {
  #tokens: Token[];
  #pos = 0;
  #depth = 0;

  constructor(tokens: Token[]) {
    this.#tokens = tokens;
  }

  parse(): ConditionAst {
    const ast = this.#or();
    const next = this.#peek();
    if (next.type !== "end") {
      throw new ConditionSyntaxError(
        `Expected an operator or the end, got ${describe(next)}`,
        next.offset,
      );
    }
    return ast;
  }

  #peek(): Token {
    return this.#tokens[this.#pos];
  }

  #next(): Token {
    return this.#tokens[this.#pos++];
  }

  #isOp(value: string): boolean {
    const token = this.#peek();
    return token.type === "op" && token.value === value;
  }

  #expectOp(value: string): void {
    const token = this.#next();
    if (token.type !== "op" || token.value !== value) {
      throw new ConditionSyntaxError(`Expected "${value}", got ${describe(token)}`, token.offset);
    }
  }

  #enter(offset: number): void {
    if (++this.#depth > MAX_CONDITION_DEPTH) {
      throw new ConditionSyntaxError(
        `Expected at most ${MAX_CONDITION_DEPTH} levels of nesting`,
        offset,
      );
    }
  }

  #or(): ConditionAst {
    let left = this.#and();
    while (this.#isOp("||")) {
      this.#next();
      left = { kind: "logical", op: "||", left, right: this.#and() };
    }
    return left;
  }

  #and(): ConditionAst {
    let left = this.#unary();
    while (this.#isOp("&&")) {
      this.#next();
      left = { kind: "logical", op: "&&", left, right: this.#unary() };
    }
    return left;
  }

  #unary(): ConditionAst {
    if (this.#isOp("!")) {
      const token = this.#next();
      this.#enter(token.offset);
      const operand = this.#unary();
      this.#depth--;
      return { kind: "not", operand };
    }
    return this.#compare();
  }

  #compare(): ConditionAst {
    const left = this.#primary();
    const token = this.#peek();
    if (
      token.type === "op" && ["==", "!=", "<", "<=", ">", ">="].includes(token.value)
    ) {
      this.#next();
      const op = token.value as "==" | "!=" | "<" | "<=" | ">" | ">=";
      return { kind: "compare", op, left, right: this.#primary() };
    }
    return left;
  }

  #primary(): ConditionAst {
    const token = this.#next();
    switch (token.type) {
      case "string":
      case "number":
        return { kind: "literal", value: token.value };
      case "op":
        if (token.value === "(") {
          this.#enter(token.offset);
          const inner = this.#or();
          this.#depth--;
          this.#expectOp(")");
          return inner;
        }
        throw new ConditionSyntaxError(`Expected a value, got ${describe(token)}`, token.offset);
      case "end":
        throw new ConditionSyntaxError(
          "Expected a value, got the end of the condition",
          token.offset,
        );
      case "ident":
        return this.#identifier(token);
    }
  }

  #identifier(token: Token & { type: "ident" }): ConditionAst {
    const word = token.value;
    if (word === "true" || word === "false") return { kind: "literal", value: word === "true" };
    if (word === "null") return { kind: "literal", value: null };
    if (FUNCTIONS.has(word)) {
      this.#expectOp("(");
      this.#expectOp(")");
      return { kind: "call", name: word as "success" | "failure" | "always" | "cancelled" };
    }
    if (this.#isOp("(")) {
      throw new ConditionSyntaxError(
        `Unknown function "${word}"; expected success(), failure(), always() or cancelled()`,
        token.offset,
      );
    }
    if (word === "steps" || word === "needs") {
      const name = this.#segment();
      const field = this.#segment();
      if (field.value === "values") {
        return { kind: "value", step: name.value, key: this.#segment().value };
      }
      if (field.value !== "outcome") {
        throw new ConditionSyntaxError(
          `Expected "outcome" or "values.NAME" after "${word}.${name.value}", got "${field.value}"`,
          field.offset,
        );
      }
      return { kind: "path", root: "steps", name: name.value };
    }
    if (word === "env" || word === "matrix") {
      return { kind: "path", root: word, name: this.#segment().value };
    }
    throw new ConditionSyntaxError(
      `Unknown name "${word}"; expected steps, needs, env, matrix, a literal or a function call`,
      token.offset,
    );
  }

  /** One `.name` or `['name']` path segment. */
  #segment(): { value: string; offset: number } {
    const token = this.#next();
    if (token.type === "op" && token.value === ".") {
      const name = this.#next();
      if (name.type !== "ident") {
        throw new ConditionSyntaxError(
          `Expected a name after ".", got ${describe(name)}`,
          name.offset,
        );
      }
      return { value: name.value, offset: name.offset };
    }
    if (token.type === "op" && token.value === "[") {
      const name = this.#next();
      if (name.type !== "string") {
        throw new ConditionSyntaxError(
          `Expected a quoted name after "[", got ${describe(name)}`,
          name.offset,
        );
      }
      this.#expectOp("]");
      return { value: name.value, offset: name.offset };
    }
    throw new ConditionSyntaxError(`Expected "." and a name, got ${describe(token)}`, token.offset);
  }
}

function describe(token: Token): string {
  switch (token.type) {
    case "end":
      return "the end of the condition";
    case "string":
      return `'${token.value}'`;
    default:
      return `"${token.value}"`;
  }
}

/**
 * Parses a condition, with or without its `${{ … }}` wrapper.
 *
 * @throws {ConditionSyntaxError} with the 0-based offset of the problem.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseCondition } from "./expr.ts";
 *
 * assert.deepEqual(parseCondition("${{ success() && matrix.os == 'linux' }}"), {
 *   kind: "logical",
 *   op: "&&",
 *   left: { kind: "call", name: "success" },
 *   right: {
 *     kind: "compare",
 *     op: "==",
 *     left: { kind: "path", root: "matrix", name: "os" },
 *     right: { kind: "literal", value: "linux" },
 *   },
 * });
 * ```
 */
export function parseCondition(src: string): ConditionAst {
  if (src.length > MAX_CONDITION_LENGTH) {
    throw new ConditionSyntaxError(
      `Expected a condition of at most ${MAX_CONDITION_LENGTH} characters`,
      MAX_CONDITION_LENGTH,
    );
  }
  let start = 0;
  let end = src.length;
  const open = src.indexOf("${{");
  if (open >= 0 && src.slice(0, open).trim() === "") {
    const close = src.lastIndexOf("}}");
    if (close < open + 3 || src.slice(close + 2).trim() !== "") {
      throw new ConditionSyntaxError('Expected "}}" closing "${{"', src.length);
    }
    start = open + 3;
    end = close;
  }
  const tokens = tokenize(src, start, end);
  if (tokens.length === 1) {
    throw new ConditionSyntaxError("Expected a condition, got nothing", start);
  }
  return new Parser(tokens).parse();
}

function truthy(value: ConditionValue): boolean {
  return value !== undefined && value !== null && value !== false && value !== 0 &&
    value !== "" && !Number.isNaN(value);
}

function equal(a: ConditionValue, b: ConditionValue): boolean {
  if (a === undefined || b === undefined) return false;
  if (typeof a === typeof b) return a === b;
  // Matrix values arrive as numbers while users often quote them.
  if (typeof a === "number" && typeof b === "string") return b.trim() !== "" && Number(b) === a;
  if (typeof a === "string" && typeof b === "number") return a.trim() !== "" && Number(a) === b;
  return false;
}

function order(a: ConditionValue, b: ConditionValue, op: "<" | "<=" | ">" | ">="): boolean {
  if (
    !(typeof a === "number" && typeof b === "number") &&
    !(typeof a === "string" && typeof b === "string")
  ) return false;
  switch (op) {
    case "<":
      return a < b;
    case "<=":
      return a <= b;
    case ">":
      return a > b;
    case ">=":
      return a >= b;
  }
}

function lookup<T>(record: Record<string, T> | undefined, key: string): T | undefined {
  return record && Object.hasOwn(record, key) ? record[key] : undefined;
}

function evaluate(ast: ConditionAst, ctx: ConditionContext): ConditionValue {
  switch (ast.kind) {
    case "literal":
      return ast.value;
    case "value": {
      const text = lookup(lookup(ctx.needs, ast.step)?.values, ast.key);
      if (text === undefined) return undefined;
      const number = Number(text);
      return text.trim() !== "" && Number.isFinite(number) ? number : text;
    }
    case "path":
      if (ast.root === "steps") return lookup(ctx.needs, ast.name)?.outcome;
      if (ast.root === "env") return lookup(ctx.env, ast.name);
      return lookup(ctx.matrix, ast.name);
    case "call": {
      const outcomes = Object.values(ctx.needs).map((need) => need.outcome);
      switch (ast.name) {
        case "success":
          return outcomes.every((outcome) => outcome === "succeeded");
        case "failure":
          return outcomes.some((outcome) => outcome === "failed");
        case "always":
          return true;
        case "cancelled":
          return ctx.runCancelled;
      }
      break;
    }
    case "not":
      return !truthy(evaluate(ast.operand, ctx));
    case "logical": {
      const left = evaluate(ast.left, ctx);
      if (ast.op === "&&") return truthy(left) ? evaluate(ast.right, ctx) : left;
      return truthy(left) ? left : evaluate(ast.right, ctx);
    }
    case "compare": {
      const left = evaluate(ast.left, ctx);
      const right = evaluate(ast.right, ctx);
      if (ast.op === "==") return equal(left, right);
      if (ast.op === "!=") return !equal(left, right);
      return order(left, right, ast.op);
    }
  }
}

/**
 * Evaluates a condition (source or parsed) against a step's context.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { evaluateCondition } from "./expr.ts";
 *
 * const needs = { build: { outcome: "failed" as const } };
 * const context = { needs, runCancelled: false, env: {} };
 * assert.equal(evaluateCondition("steps.build.outcome == 'failed'", context), true);
 * assert.equal(evaluateCondition("success()", context), false);
 * ```
 */
export function evaluateCondition(
  cond: string | ConditionAst,
  ctx: ConditionContext,
): boolean {
  const ast = typeof cond === "string" ? parseCondition(cond) : cond;
  return truthy(evaluate(ast, ctx));
}
