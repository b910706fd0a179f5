/**
 * A binary min-heap, shared by the engine's ready queues and timers and the
 * planner's topological sort.
 *
 * @module
 */

/** A binary min-heap ordered by `less`. */
export class MinHeap<T> {
  /** Builds an empty heap. */
  readonly #items: T[] = [];
  readonly #less: (a: T, b: T) => boolean;

  constructor(less: (a: T, b: T) => boolean) {
    this.#less = less;
  }

  /** Number of items. */
  get size(): number {
    return this.#items.length;
  }

  /** The least item, left in place. */
  peek(): T | undefined {
    return this.#items[0];
  }

  /** Adds an item. */
  push(item: T): void {
    const items = this.#items;
    items.push(item);
    let i = items.length - 1;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (!this.#less(item, items[parent])) break;
      // Moved, not swapped: a destructuring swap allocates until the code is optimised.
      items[i] = items[parent];
      i = parent;
    }
    items[i] = item;
  }

  /** Removes and returns the least item. */
  pop(): T | undefined {
    const items = this.#items;
    const top = items[0];
    const last = items.pop();
    if (items.length > 0 && last !== undefined) {
      // Sift the last item down from the top, moving children up into the hole.
      let i = 0;
      for (;;) {
        const left = 2 * i + 1;
        const right = left + 1;
        let smallest = left < items.length && this.#less(items[left], last) ? left : -1;
        if (
          right < items.length && this.#less(items[right], smallest < 0 ? last : items[smallest])
        ) smallest = right;
        if (smallest < 0) break;
        items[i] = items[smallest];
        i = smallest;
      }
      items[i] = last;
    }
    return top;
  }
}
