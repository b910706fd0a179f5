/**
 * Lays a run's DAG out on the server, so the page only draws boxes and
 * curves: a layered ("Sugiyama") layout, left to right. Matrix legs of one
 * step are one box with their count, so a step fanned out to 500 legs is
 * one box, not 500.
 *
 * Written here rather than taken from a library because what a run page
 * needs is small and must stay fast for a 1,000-step run: layers by longest
 * path (linear), a few barycenter sweeps to reduce crossings (linear in
 * edges per sweep), no edge routing beyond a curve. A 1,000-step plan lays
 * out in a few milliseconds (bench/ui_bench.ts).
 *
 * @module
 */

import type { StepView } from "./model.ts";

/** Width of a step's box, in SVG units. */
export const NODE_WIDTH = 184;
/** Height of a step's box. */
export const NODE_HEIGHT = 46;
/** Room between layers, for the edges. */
const LAYER_GAP = 64;
/** Room between boxes of one layer. */
const ROW_GAP = 14;
/** Margin around the drawing. */
const MARGIN = 12;
/** Barycenter sweeps (down and up): more barely change a DAG of pipeline shape. */
const SWEEPS = 4;

/** One box: a step, or the matrix legs of one step. */
export interface LayoutNode {
  /** The step's name. */
  id: string;
  /** Step instances in the box (1, or the matrix legs). */
  count: number;
  /** Its layer (column), from 0. */
  layer: number;
  x: number;
  y: number;
}

/** One edge between boxes, as an SVG path. */
export interface LayoutEdge {
  from: string;
  to: string;
  /** SVG path data. */
  path: string;
}

/** A laid out DAG. */
export interface DagLayout {
  width: number;
  height: number;
  nodeWidth: number;
  nodeHeight: number;
  nodes: LayoutNode[];
  edges: LayoutEdge[];
}

/**
 * Lays out the steps of a plan (in plan order), one box per step name.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { layoutDag } from "./layout.ts";
 *
 * const layout = layoutDag([
 *   { id: "a", name: "a", backend: "shell", needs: [] },
 *   { id: "b[x=1]", name: "b", backend: "shell", needs: ["a"] },
 *   { id: "b[x=2]", name: "b", backend: "shell", needs: ["a"] },
 * ]);
 * assert.deepEqual(layout.nodes.map((node) => [node.id, node.layer, node.count]), [
 *   ["a", 0, 1],
 *   ["b", 1, 2],
 * ]);
 * assert.equal(layout.edges.length, 1);
 * ```
 */
export function layoutDag(steps: StepView[]): DagLayout {
  const groupOf = new Map<string, string>();
  const count = new Map<string, number>();
  const names: string[] = [];
  for (const step of steps) {
    groupOf.set(step.id, step.name);
    if (!count.has(step.name)) names.push(step.name);
    count.set(step.name, (count.get(step.name) ?? 0) + 1);
  }
  const index = new Map(names.map((name, i) => [name, i]));
  const preds: Set<number>[] = names.map(() => new Set());
  const succs: Set<number>[] = names.map(() => new Set());
  for (const step of steps) {
    const to = index.get(step.name)!;
    for (const need of step.needs) {
      const name = groupOf.get(need);
      if (name === undefined) continue;
      const from = index.get(name)!;
      if (from === to) continue;
      preds[to].add(from);
      succs[from].add(to);
    }
  }
  const layer = longestPathLayers(names.length, preds, succs);
  const layers: number[][] = [];
  for (let i = 0; i < names.length; i++) (layers[layer[i]] ??= []).push(i);
  orderLayers(layers, preds, succs);

  const rows = Math.max(1, ...layers.map((members) => members.length));
  const height = MARGIN * 2 + rows * NODE_HEIGHT + (rows - 1) * ROW_GAP;
  const width = MARGIN * 2 + layers.length * NODE_WIDTH +
    Math.max(0, layers.length - 1) * LAYER_GAP;
  const x = new Array<number>(names.length);
  const y = new Array<number>(names.length);
  for (const [column, members] of layers.entries()) {
    const used = members.length * NODE_HEIGHT + (members.length - 1) * ROW_GAP;
    // Each column is centred: a lone join step sits level with what it joins.
    const top = MARGIN + (height - 2 * MARGIN - used) / 2;
    for (const [row, node] of members.entries()) {
      x[node] = MARGIN + column * (NODE_WIDTH + LAYER_GAP);
      y[node] = Math.round(top + row * (NODE_HEIGHT + ROW_GAP));
    }
  }
  const nodes = names.map((name, i) => ({
    id: name,
    count: count.get(name)!,
    layer: layer[i],
    x: x[i],
    y: y[i],
  }));
  const edges: LayoutEdge[] = [];
  for (let from = 0; from < names.length; from++) {
    for (const to of succs[from]) {
      const x1 = x[from] + NODE_WIDTH;
      const y1 = y[from] + NODE_HEIGHT / 2;
      const x2 = x[to];
      const y2 = y[to] + NODE_HEIGHT / 2;
      const bend = LAYER_GAP / 2;
      edges.push({
        from: names[from],
        to: names[to],
        path: `M${x1} ${y1}C${x1 + bend} ${y1} ${x2 - bend} ${y2} ${x2} ${y2}`,
      });
    }
  }
  return { width, height, nodeWidth: NODE_WIDTH, nodeHeight: NODE_HEIGHT, nodes, edges };
}

/** Each node's layer: one more than its deepest predecessor's (Kahn's order). */
function longestPathLayers(size: number, preds: Set<number>[], succs: Set<number>[]): number[] {
  const layer = new Array<number>(size).fill(0);
  const remaining = preds.map((set) => set.size);
  const queue: number[] = [];
  for (let i = 0; i < size; i++) if (remaining[i] === 0) queue.push(i);
  let done = 0;
  for (let head = 0; head < queue.length; head++) {
    const node = queue[head];
    done++;
    for (const next of succs[node]) {
      layer[next] = Math.max(layer[next], layer[node] + 1);
      if (--remaining[next] === 0) queue.push(next);
    }
  }
  if (done < size) {
    // A plan is acyclic; should steps of one name still form a cycle between
    // names, their boxes go last rather than nowhere.
    const last = Math.max(0, ...layer) + 1;
    for (let i = 0; i < size; i++) if (remaining[i] > 0) layer[i] = last;
  }
  return layer;
}

/** Reorders each layer by the mean position of its neighbours, sweeping down then up. */
function orderLayers(layers: number[][], preds: Set<number>[], succs: Set<number>[]): void {
  const position = new Map<number, number>();
  const place = () => {
    for (const members of layers) members.forEach((node, i) => position.set(node, i));
  };
  place();
  const sortBy = (members: number[], neighbours: Set<number>[]) => {
    const key = new Map<number, number>();
    for (const node of members) {
      let sum = 0;
      let n = 0;
      for (const other of neighbours[node]) {
        sum += position.get(other)!;
        n++;
      }
      key.set(node, n === 0 ? position.get(node)! : sum / n);
    }
    // Stable: ties keep their order, so the layout is deterministic.
    members.sort((a, b) => key.get(a)! - key.get(b)!);
    members.forEach((node, i) => position.set(node, i));
  };
  for (let sweep = 0; sweep < SWEEPS; sweep++) {
    for (let i = 1; i < layers.length; i++) sortBy(layers[i], preds);
    for (let i = layers.length - 2; i >= 0; i--) sortBy(layers[i], succs);
  }
}
