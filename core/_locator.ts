/**
 * Where a problem of a pipeline is: a line and column of its YAML source,
 * found by key path, or — for a pipeline defined in code, which has no
 * source text — the key path alone.
 *
 * @module
 */

import { isAlias, isMap, isScalar, isSeq, type LineCounter, Scalar } from "npm:yaml@2.9.1";
import type { Document, Node, Pair, YAMLMap } from "npm:yaml@2.9.1";

/** One step of a key path: a mapping key or a list index. */
export type PathSegment = string | number;

/** A line and column, both from 1; 0:0 when there is no source text. */
export interface Position {
  line: number;
  col: number;
}

/** Finds positions of keys and values by key path. */
export interface Positions {
  /** Path of the file as the user named it (or the name of a pipeline defined in code). */
  readonly file: string;
  /** Position of the value at a path (its key with `key: true`). */
  at(path: readonly PathSegment[], options?: { key?: boolean }): Position;
  /** Position of a character of the string value at a path. */
  inString(path: readonly PathSegment[], offset: number): Position;
}

/** The position of a problem in a pipeline that has no source text. */
export const NO_POSITION: Readonly<Position> = Object.freeze({ line: 0, col: 0 });

/** Positions of a pipeline defined in code: none; diagnostics carry their key path instead. */
export function unlocated(file: string): Positions {
  return { file, at: () => ({ ...NO_POSITION }), inString: () => ({ ...NO_POSITION }) };
}

/** Finds positions of YAML nodes by key path; map lookups are cached for large files. */
export class Locator implements Positions {
  readonly file: string;
  #doc: Document | undefined;
  #lines: LineCounter;
  #maps = new WeakMap<YAMLMap, Map<string, Pair>>();

  /** Builds a locator over a parsed document (absent for files that never parsed). */
  constructor(file: string, lines: LineCounter, doc?: Document) {
    this.file = file;
    this.#lines = lines;
    this.#doc = doc;
  }

  /** Line and column (from 1) of a character offset. */
  position(offset: number): Position {
    const pos = this.#lines.linePos(Math.max(0, offset));
    return { line: Math.max(1, pos.line), col: Math.max(1, pos.col) };
  }

  #pair(map: YAMLMap, key: PathSegment): Pair | undefined {
    let index = this.#maps.get(map);
    if (!index) {
      index = new Map();
      for (const pair of map.items) {
        const k = isScalar(pair.key) ? String(pair.key.value) : String(pair.key);
        if (!index.has(k)) index.set(k, pair as Pair);
      }
      this.#maps.set(map, index);
    }
    return index.get(String(key));
  }

  /** The node at a path, or the deepest one found. */
  node(path: readonly PathSegment[], options: { key?: boolean } = {}): Node | undefined {
    let node: unknown = this.#doc?.contents;
    let found: Node | undefined = node as Node | undefined;
    for (let i = 0; i < path.length; i++) {
      if (isAlias(node)) return found;
      if (isMap(node)) {
        const pair = this.#pair(node, path[i]);
        if (!pair) return found;
        const last = i === path.length - 1;
        if (last && options.key || pair.value === null || pair.value === undefined) {
          return pair.key as Node;
        }
        node = pair.value;
      } else if (isSeq(node) && typeof path[i] === "number") {
        node = node.items[path[i] as number];
        if (!node) return found;
      } else {
        return found;
      }
      found = node as Node;
    }
    return found;
  }

  /** Position of the node at a path (its key with `key: true`); 1:1 when unknown. */
  at(path: readonly PathSegment[], options: { key?: boolean } = {}): Position {
    const node = this.node(path, options);
    return node?.range ? this.position(node.range[0]) : { line: 1, col: 1 };
  }

  /** Position of a character inside the string scalar at a path. */
  inString(path: readonly PathSegment[], offset: number): Position {
    const node = this.node(path);
    if (!node?.range) return { line: 1, col: 1 };
    if (
      isScalar(node) && (node.type === Scalar.PLAIN || node.type === Scalar.QUOTE_SINGLE ||
        node.type === Scalar.QUOTE_DOUBLE)
    ) {
      const quote = node.type === Scalar.PLAIN ? 0 : 1;
      const text = String(node.value);
      if (!text.includes("\n")) return this.position(node.range[0] + quote + offset);
    }
    return this.position(node.range[0]);
  }
}
