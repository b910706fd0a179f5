/**
 * The splitter: what a split node's attempt does (`batch:` / `foreach:`,
 * see `core/fanout.ts`). It runs inside the runner (local mode or an
 * agent), not on a backend: it reads the input the attempt fetched and
 * writes one file per batch into the attempt's outputs directory, in one
 * pass with a fixed buffer, so a 1 GB input never sits in memory. A
 * `foreach` list is read whole, but only up to {@link MAX_FOREACH_BYTES}.
 *
 * @module
 */

import { basename, extname, join, relative } from "node:path";
import {
  itemField,
  LEG_KEY_PATTERN,
  MAX_ITEM_BYTES,
  MAX_ITEMS_BYTES,
  type SplitConfig,
} from "../../core/fanout.ts";
import type { FanOutLeg } from "../../core/model.ts";
import { concatBytes } from "../../core/_bytes.ts";

/** Largest JSON list a `foreach` reads. */
export const MAX_FOREACH_BYTES = 4 * MAX_ITEMS_BYTES;

/** Longest header line (`header: true`). */
const MAX_HEADER_BYTES = 1 << 20;

/** Bytes read from the input at a time. */
const CHUNK = 1 << 20;

/** The input cannot be split as the step says: the step's (or its upstream's) fault. */
export class SplitError extends Error {
  /** Attempts fail with this class. */
  readonly errorClass = "application";

  /** Builds the error from a full sentence. */
  constructor(message: string) {
    super(message);
    this.name = "SplitError";
  }
}

/** What a split wrote: output names in the outputs directory, and the legs. */
export interface SplitOutcome {
  outputs: string[];
  legs: FanOutLeg[];
}

/** Zero-padded leg keys: at least 4 digits, more when there are 10,000 legs or more. */
function keyOf(index: number, total: number): string {
  return String(index).padStart(Math.max(4, String(Math.max(total - 1, 0)).length), "0");
}

/** A batch file being written: buffered, so each write is large. */
class BatchWriter {
  #file: Deno.FsFile | undefined;
  #buffer = new Uint8Array(CHUNK);
  #used = 0;
  /** Bytes written into the current batch. */
  size = 0;
  /** Names of the batches written, in order. */
  readonly names: string[] = [];

  constructor(
    readonly dir: string,
    readonly nameOf: (index: number) => string,
    readonly maxLegs: number,
  ) {}

  get open(): boolean {
    return this.#file !== undefined;
  }

  async start(): Promise<void> {
    if (this.names.length >= this.maxLegs) {
      throw new SplitError(
        `Expected at most ${this.maxLegs} batches; the input makes more (use larger batches)`,
      );
    }
    const name = this.nameOf(this.names.length);
    this.names.push(name);
    this.#file = await Deno.open(join(this.dir, name), {
      write: true,
      createNew: true,
      mode: 0o600,
    });
    this.size = 0;
  }

  async write(bytes: Uint8Array): Promise<void> {
    if (!this.#file) await this.start();
    this.size += bytes.length;
    if (this.#used + bytes.length > this.#buffer.length) await this.#flush();
    if (bytes.length >= this.#buffer.length) {
      await writeAll(this.#file!, bytes);
      return;
    }
    this.#buffer.set(bytes, this.#used);
    this.#used += bytes.length;
  }

  async end(): Promise<void> {
    if (!this.#file) return;
    await this.#flush();
    this.#file.close();
    this.#file = undefined;
  }

  async #flush(): Promise<void> {
    if (this.#used === 0) return;
    await writeAll(this.#file!, this.#buffer.subarray(0, this.#used));
    this.#used = 0;
  }
}

async function writeAll(file: Deno.FsFile, bytes: Uint8Array): Promise<void> {
  let done = 0;
  while (done < bytes.length) done += await file.write(bytes.subarray(done));
}

/** Reads a file chunk by chunk (one reused buffer). */
async function* chunks(path: string, stopped?: () => boolean): AsyncGenerator<Uint8Array> {
  using file = await Deno.open(path, { read: true });
  const buffer = new Uint8Array(CHUNK);
  for (;;) {
    if (stopped?.()) throw new SplitError("The split was stopped");
    const n = await file.read(buffer);
    if (n === null) return;
    yield buffer.subarray(0, n);
  }
}

const NEWLINE = 0x0a;

/**
 * Splits a text file at line ends: a new batch after `linesPer` lines, or,
 * with `bytesPer`, at the first line end once a batch holds that many
 * bytes. With `header`, the first line is written at the top of every
 * batch. Spans of a chunk are written whole: newlines are found with
 * `indexOf`, never a byte at a time in JavaScript.
 */
async function splitLines(
  path: string,
  writer: BatchWriter,
  how: { linesPer?: number; bytesPer?: number; header?: boolean },
  stopped?: () => boolean,
): Promise<void> {
  let header: Uint8Array | undefined;
  let headerParts: Uint8Array[] | undefined = how.header ? [] : undefined;
  let headerBytes = 0;
  /** Lines (or bytes) the current batch still takes before it may end. */
  let left = 0;
  for await (const chunk of chunks(path, stopped)) {
    let at = 0;
    while (at < chunk.length) {
      if (headerParts) {
        const end = chunk.indexOf(NEWLINE, at);
        const part = chunk.subarray(at, end === -1 ? chunk.length : end + 1);
        headerParts.push(part.slice());
        headerBytes += part.length;
        if (headerBytes > MAX_HEADER_BYTES) {
          throw new SplitError(`Expected a header line of at most ${MAX_HEADER_BYTES} bytes`);
        }
        at += part.length;
        if (end !== -1) {
          header = concatBytes(headerParts);
          headerParts = undefined;
        }
        continue;
      }
      if (!writer.open) {
        await writer.start();
        if (header) await writer.write(header);
        left = how.linesPer ?? how.bytesPer!;
      }
      let cut = -1;
      if (how.linesPer !== undefined) {
        // The end of the batch's last line in this chunk, if it is here.
        let scan = at;
        while (left > 0) {
          const end = chunk.indexOf(NEWLINE, scan);
          if (end === -1) break;
          left -= 1;
          scan = end + 1;
        }
        if (left === 0) cut = scan;
        else {
          await writer.write(chunk.subarray(at));
          break;
        }
      } else if (left > 0) {
        const room = chunk.length - at;
        if (room < left) {
          await writer.write(chunk.subarray(at));
          left -= room;
          break;
        }
        const end = chunk.indexOf(NEWLINE, at + left - 1);
        left = 0;
        if (end === -1) {
          await writer.write(chunk.subarray(at));
          break;
        }
        cut = end + 1;
      } else {
        // Full already: the batch ends at the end of the line it is in.
        const end = chunk.indexOf(NEWLINE, at);
        if (end === -1) {
          await writer.write(chunk.subarray(at));
          break;
        }
        cut = end + 1;
      }
      await writer.write(chunk.subarray(at, cut));
      await writer.end();
      at = cut;
    }
  }
  await writer.end();
}

/** Splits JSON lines into batches of `per` records; blank lines are not records. */
async function splitRecords(
  path: string,
  writer: BatchWriter,
  per: number,
  stopped?: () => boolean,
): Promise<void> {
  let records = 0;
  /** Whether what was written of the current line is blank so far. */
  let blankSoFar = true;
  let pending: Uint8Array[] = [];
  let pendingBytes = 0;
  for await (const chunk of chunks(path, stopped)) {
    let at = 0;
    while (at < chunk.length) {
      const end = chunk.indexOf(NEWLINE, at);
      const part = chunk.subarray(at, end === -1 ? chunk.length : end + 1);
      at += part.length;
      if (blankSoFar && isBlank(part)) {
        // Held back until the line proves not blank (a line is cut across chunks).
        if (end === -1) {
          pending.push(part.slice());
          pendingBytes += part.length;
          if (pendingBytes > MAX_HEADER_BYTES) {
            throw new SplitError(`Expected lines of at most ${MAX_HEADER_BYTES} blank bytes`);
          }
        } else {
          pending = [];
          pendingBytes = 0;
        }
        continue;
      }
      if (!writer.open) {
        await writer.start();
        records = 0;
      }
      for (const held of pending) await writer.write(held);
      pending = [];
      pendingBytes = 0;
      await writer.write(part);
      blankSoFar = end !== -1;
      if (end === -1) continue;
      records += 1;
      if (records >= per) await writer.end();
    }
  }
  await writer.end();
}

function isBlank(bytes: Uint8Array): boolean {
  for (const byte of bytes) {
    if (byte !== 0x20 && byte !== 0x09 && byte !== 0x0d && byte !== NEWLINE) return false;
  }
  return true;
}

/**
 * Splits a JSON array into arrays of `per` items, streaming: items are
 * copied byte for byte between the array's top-level commas (strings and
 * escapes tracked), so an item is never parsed whole.
 */
async function splitItems(
  path: string,
  writer: BatchWriter,
  per: number,
  stopped?: () => boolean,
): Promise<void> {
  const encoder = new TextEncoder();
  const open = encoder.encode("[");
  const close = encoder.encode("]\n");
  const comma = encoder.encode(",");
  let state: "before" | "items" | "after" = "before";
  let depth = 0;
  let inString = false;
  let escaped = false;
  let inBatch = 0;
  let itemOpen = false;
  /** A top-level value ended (by white space) and no comma came yet. */
  let ended = false;
  let offset = 0;
  const fail = (what: string): never => {
    throw new SplitError(`Expected a JSON array to split by items; ${what} at byte ${offset}`);
  };
  const startItem = async () => {
    if (inBatch === per) {
      await writer.write(close);
      await writer.end();
      inBatch = 0;
    }
    if (!writer.open) {
      await writer.start();
      await writer.write(open);
    } else await writer.write(comma);
    inBatch += 1;
    itemOpen = true;
  };
  for await (const chunk of chunks(path, stopped)) {
    let runStart = -1;
    for (let i = 0; i < chunk.length; i++, offset++) {
      const c = chunk[i];
      if (state === "before") {
        if (c === 0x5b) state = "items";
        else if (!isSpace(c) && !(offset === 0 && c === 0xef)) {
          if (offset < 3 && (c === 0xbb || c === 0xbf)) continue; // a UTF-8 BOM
          fail("found something else than [");
        }
        continue;
      }
      if (state === "after") {
        if (!isSpace(c)) fail("found more after the closing ]");
        continue;
      }
      if (inString) {
        if (escaped) escaped = false;
        else if (c === 0x5c) escaped = true;
        else if (c === 0x22) inString = false;
        continue;
      }
      if (depth === 0 && (c === 0x2c || c === 0x5d)) {
        if (runStart !== -1) {
          await writer.write(chunk.subarray(runStart, i));
          runStart = -1;
        }
        if (c === 0x2c && !itemOpen) fail("found an empty item");
        itemOpen = false;
        ended = false;
        if (c === 0x5d) state = "after";
        continue;
      }
      if (depth === 0 && isSpace(c)) {
        if (runStart !== -1) {
          // The end of a top-level value: what follows is a comma or the ].
          await writer.write(chunk.subarray(runStart, i));
          runStart = -1;
          ended = true;
        }
        continue;
      }
      if (depth === 0 && runStart === -1) {
        if (ended) fail("found two values without a comma between them");
        if (!itemOpen) await startItem();
        runStart = i;
      }
      if (c === 0x22) inString = true;
      else if (c === 0x5b || c === 0x7b) depth++;
      else if (c === 0x5d || c === 0x7d) {
        depth--;
        if (depth < 0) fail("found an unbalanced bracket");
      }
    }
    if (runStart !== -1) await writer.write(chunk.subarray(runStart));
  }
  if (state !== "after") fail("the array does not end");
  if (writer.open) {
    await writer.write(close);
    await writer.end();
  }
}

function isSpace(c: number): boolean {
  return c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09;
}

/** Every regular file below `dir`, in sorted order (paths relative to it). */
async function filesBelow(dir: string): Promise<string[]> {
  const found: string[] = [];
  const walk = async (at: string): Promise<void> => {
    const entries: Deno.DirEntry[] = [];
    for await (const entry of Deno.readDir(at)) entries.push(entry);
    entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    for (const entry of entries) {
      const path = join(at, entry.name);
      if (entry.isDirectory) await walk(path);
      else if (entry.isFile) found.push(relative(dir, path));
    }
  };
  await walk(dir);
  return found;
}

/**
 * Splits `inputPath` as `config` says into `outputsDir`; returns the batch
 * files written and the legs. Throws {@link SplitError} when the input does
 * not fit (not a JSON list, too many batches, an item without a field the
 * legs read).
 */
export async function runSplit(
  config: SplitConfig,
  inputPath: string,
  outputsDir: string,
  stopped?: () => boolean,
): Promise<SplitOutcome> {
  if (config.mode === "foreach") return { outputs: [], legs: await readItems(config, inputPath) };
  const base = basename(inputPath);
  const ext = config.mode === "items" ? ".json" : extname(base);
  const stem = (ext ? base.slice(0, -ext.length) : base).replace(/^[.-]+/, "") || "batch";
  if (config.mode === "files") {
    const files = await filesBelow(inputPath);
    if (files.length > config.maxLegs) {
      throw new SplitError(
        `Expected at most ${config.maxLegs} files to fan out over; the input has ${files.length}`,
      );
    }
    const legs: FanOutLeg[] = [];
    const outputs: string[] = [];
    for (const [index, file] of files.entries()) {
      const key = keyOf(index, files.length);
      const name = `${key}-${basename(file)}`.slice(0, 128);
      await Deno.copyFile(join(inputPath, file), join(outputsDir, name));
      outputs.push(name);
      legs.push({ key, output: name, source: file });
    }
    return { outputs, legs };
  }
  // Names are made before the count is known: 4 digits, renamed after if more.
  const writer = new BatchWriter(
    outputsDir,
    (index) => `${stem}.${String(index).padStart(4, "0")}${ext}`,
    config.maxLegs,
  );
  switch (config.mode) {
    case "lines":
      await splitLines(
        inputPath,
        writer,
        { linesPer: config.lines, header: config.header },
        stopped,
      );
      break;
    case "records":
      await splitRecords(inputPath, writer, config.records, stopped);
      break;
    case "bytes":
      await splitLines(inputPath, writer, { bytesPer: config.bytes }, stopped);
      break;
    case "count": {
      const { size } = await Deno.stat(inputPath);
      const bytesPer = Math.max(1, Math.ceil(size / config.count));
      await splitLines(inputPath, writer, { bytesPer }, stopped);
      break;
    }
    case "items":
      await splitItems(inputPath, writer, config.items, stopped);
      break;
  }
  const total = writer.names.length;
  const legs: FanOutLeg[] = [];
  const outputs: string[] = [];
  for (const [index, written] of writer.names.entries()) {
    const key = keyOf(index, total);
    let name = written;
    if (key.length > 4) {
      name = `${stem}.${key}${ext}`;
      await Deno.rename(join(outputsDir, written), join(outputsDir, name));
    }
    outputs.push(name);
    legs.push({ key, output: name });
  }
  return { outputs, legs };
}

/** The items of a `foreach` list, each with its leg key. */
async function readItems(
  config: Extract<SplitConfig, { mode: "foreach" }>,
  path: string,
): Promise<FanOutLeg[]> {
  const { size } = await Deno.stat(path);
  if (size > MAX_FOREACH_BYTES) {
    throw new SplitError(
      `Expected the foreach list to be at most ${MAX_FOREACH_BYTES} bytes, got ${size}`,
    );
  }
  let items: unknown;
  try {
    items = JSON.parse(await Deno.readTextFile(path));
  } catch (error) {
    throw new SplitError(`Expected the foreach list to be JSON: ${(error as Error).message}`);
  }
  if (!Array.isArray(items)) {
    throw new SplitError(`Expected the foreach list to be a JSON array, got ${typeOf(items)}`);
  }
  if (items.length > config.maxLegs) {
    throw new SplitError(
      `Expected at most ${config.maxLegs} items to fan out over, got ${items.length}`,
    );
  }
  let bytes = 0;
  items.forEach((item, i) => {
    const size = JSON.stringify(item).length;
    bytes += size;
    if (size > MAX_ITEM_BYTES) {
      throw new SplitError(`Expected item ${i} to be at most ${MAX_ITEM_BYTES} bytes of JSON`);
    }
    for (const field of config.fields) {
      if (itemField(item, field) === undefined) {
        throw new SplitError(
          `Item ${i} of the foreach list has no field "${field.join(".")}", which the step ` +
            `reads as \${{ item.${field.join(".")} }}`,
        );
      }
    }
  });
  if (bytes > MAX_ITEMS_BYTES) {
    throw new SplitError(`Expected the items to be at most ${MAX_ITEMS_BYTES} bytes of JSON`);
  }
  const keys = legKeys(items, config.key);
  return items.map((item, i) => ({ key: keys[i], item }));
}

/**
 * Leg keys of items: the `key` field when the step names one (each must be
 * a short safe name, and unique), else the items themselves when they all
 * are, else their indexes.
 */
function legKeys(items: unknown[], keyField: string | undefined): string[] {
  if (keyField !== undefined) {
    const keys = items.map((item, i) => {
      const value = itemField(item, [keyField]);
      const key = typeof value === "string" || typeof value === "number" ? String(value) : "";
      if (!LEG_KEY_PATTERN.test(key)) {
        throw new SplitError(
          `Expected field "${keyField}" of item ${i} to be a short name ` +
            `(${LEG_KEY_PATTERN}), got ${JSON.stringify(value)?.slice(0, 80)}`,
        );
      }
      return key;
    });
    const seen = new Set<string>();
    for (const key of keys) {
      if (seen.has(key)) throw new SplitError(`Expected unique keys; "${key}" appears twice`);
      seen.add(key);
    }
    return keys;
  }
  const own = items.map((item) =>
    typeof item === "string" || typeof item === "number" ? String(item) : ""
  );
  if (own.every((key) => LEG_KEY_PATTERN.test(key)) && new Set(own).size === own.length) {
    return own;
  }
  return items.map((_, i) => keyOf(i, items.length));
}

function typeOf(value: unknown): string {
  return value === null ? "null" : Array.isArray(value) ? "an array" : typeof value;
}
