/**
 * The gateway's delay line. The gateway namespace routes every packet that
 * crosses clouds into a TUN device; this program reads each packet, holds
 * it for half the configured round trip of its cloud pair (plus jitter) and
 * writes it back, after which the kernel forwards it to the destination
 * cloud's bridge. Each direction is delayed, so a round trip costs the RTT.
 *
 * Jitter never reorders: every direction of a cloud pair is one FIFO whose
 * release times only grow, so no flow (a subset of its packets) is
 * reordered. A partition switch drops every packet to or from a cloud.
 *
 * Run inside the gateway namespace:
 * `deno run --allow-ffi --allow-read --allow-write delay_line.ts CONFIG_JSON`
 * where CONFIG_JSON is a {@link DelayLineConfig}. It is controlled over a
 * Unix socket (one JSON request per line, one JSON answer per line).
 *
 * @module
 */

import { MAX_PACKET, openTun, preciseSleeper } from "./tun.ts";

/** The round trip imposed between two clouds. */
export interface PairDelay {
  rttMs: number;
  /** The round trip varies by ± this much (each direction by ± half). */
  jitterMs: number;
}

/** What the delay line is started with. */
export interface DelayLineConfig {
  tun: string;
  /** Unix socket path for control requests. */
  control: string;
  /** Cloud name → IPv4 subnet (`10.10.0.0/24`). */
  clouds: Record<string, string>;
  /** `a-b` (cloud names in {@link clouds} order) → delay. */
  delays: Record<string, PairDelay>;
}

/** A control request. */
export type ControlRequest =
  | { op: "state" }
  | { op: "partition"; cloud: string; cut: boolean }
  | { op: "delay"; pair: string; rttMs: number; jitterMs: number }
  | { op: "reset-stats" };

/** Per-direction counters (`aws>gcp`). */
export interface DirectionStats {
  forwarded: number;
  dropped: number;
  /** Mean (signed) and max (absolute) time a packet left after its due time: the line's own error. */
  meanLateMs: number;
  maxLateMs: number;
  bytes: number;
}

/** The answer to `state`. */
export interface DelayLineState {
  delays: Record<string, PairDelay>;
  partitioned: string[];
  unrouted: number;
  directions: Record<string, DirectionStats>;
}

/** An IPv4 subnet as a base address and mask. */
export interface Subnet {
  cloud: string;
  base: number;
  mask: number;
}

/** Parses `10.10.0.0/24`. */
export function parseSubnet(cloud: string, cidr: string): Subnet {
  const match = /^(\d+)\.(\d+)\.(\d+)\.(\d+)\/(\d+)$/.exec(cidr);
  if (!match) {
    throw new Error(`Expected an IPv4 subnet like 10.10.0.0/24 for ${cloud}, got "${cidr}"`);
  }
  const bits = Number(match[5]);
  const mask = bits === 0 ? 0 : (~0 << (32 - bits)) >>> 0;
  const base = match.slice(1, 5).reduce((sum, octet) => (sum << 8 | Number(octet)) >>> 0, 0);
  return { cloud, base: (base & mask) >>> 0, mask };
}

/** The pair key of two clouds, in the order the configuration lists them. */
export function pairKey(order: string[], a: string, b: string): string {
  return order.indexOf(a) < order.indexOf(b) ? `${a}-${b}` : `${b}-${a}`;
}

/** A packet due this close to now is released with the ones due already. */
const RELEASE_SLACK_MS = 0.25;
/**
 * Packets one direction may hold (memory stays bounded under a flood: about
 * 100 MB at 1500 bytes; at 10 Gbit/s a 62.5 ms half-RTT holds ~52,000).
 * Beyond it packets are dropped, as a router's full queue would.
 */
const MAX_HELD_PACKETS = 65_536;
/** A control request longer than this is refused (the socket is root's, but still). */
const MAX_CONTROL_LINE = 65_536;
/** How much of a packet's error corrects the next wake-ups. */
const LAG_GAIN = 0.1;
/** Never wake earlier than this (a stalled loop must not make every packet early). */
const MAX_ARM_EARLY_MS = 3;

/** What becomes of one packet read from the TUN device. */
export type Admission =
  /** Not IPv4 between two known clouds (never routed here by the sim). */
  | { kind: "unrouted" }
  /** To or from a partitioned cloud. */
  | { kind: "dropped"; direction: string }
  /** Goes back to the kernel at `due` (ms, the clock `now` was on). */
  | { kind: "delayed"; direction: string; due: number };

interface DirectionCounters {
  lastDue: number;
  forwarded: number;
  dropped: number;
  lateSum: number;
  lateMax: number;
  bytes: number;
}

/**
 * The delay line's decisions without its I/O: which cloud pair a packet
 * crosses, whether a partition drops it, and when it is due (half the
 * pair's RTT plus jitter, never before the packet ahead of it in its
 * direction). Control requests and counters live here too.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { DelayPlan } from "./delay_line.ts";
 *
 * const plan = new DelayPlan({
 *   clouds: { aws: "10.10.0.0/24", gcp: "10.20.0.0/24" },
 *   delays: { "aws-gcp": { rttMs: 50, jitterMs: 0 } },
 * });
 * const packet = new Uint8Array(20);
 * packet[0] = 0x45;
 * packet.set([10, 10, 0, 20], 12);
 * packet.set([10, 20, 0, 11], 16);
 * assert.deepEqual(plan.admit(packet, 1000), { kind: "delayed", direction: "aws>gcp", due: 1025 });
 * plan.control({ op: "partition", cloud: "gcp", cut: true });
 * assert.deepEqual(plan.admit(packet, 1000), { kind: "dropped", direction: "aws>gcp" });
 * ```
 */
export class DelayPlan {
  readonly #order: string[];
  readonly #subnets: Subnet[];
  readonly #delays: Record<string, PairDelay>;
  readonly #partitioned = new Set<string>();
  readonly #directions = new Map<string, DirectionCounters>();
  readonly #random: () => number;
  #unrouted = 0;

  constructor(
    config: Pick<DelayLineConfig, "clouds" | "delays">,
    random: () => number = Math.random,
  ) {
    this.#order = Object.keys(config.clouds);
    this.#subnets = this.#order.map((cloud) => parseSubnet(cloud, config.clouds[cloud]));
    this.#delays = structuredClone(config.delays);
    this.#random = random;
  }

  #cloudOf(packet: Uint8Array, offset: number): string | undefined {
    const address = ((packet[offset] << 24) | (packet[offset + 1] << 16) |
      (packet[offset + 2] << 8) | packet[offset + 3]) >>> 0;
    return this.#subnets.find((subnet) => ((address & subnet.mask) >>> 0) === subnet.base)
      ?.cloud;
  }

  #counters(direction: string): DirectionCounters {
    let counters = this.#directions.get(direction);
    if (!counters) {
      counters = { lastDue: 0, forwarded: 0, dropped: 0, lateSum: 0, lateMax: 0, bytes: 0 };
      this.#directions.set(direction, counters);
    }
    return counters;
  }

  /** Decides the fate of a packet (`packet` holds exactly its bytes) read at `now`. */
  admit(packet: Uint8Array, now: number): Admission {
    // IPv4 only: the sim's namespaces have IPv6 turned off.
    if (packet.length < 20 || packet[0] >> 4 !== 4) {
      this.#unrouted++;
      return { kind: "unrouted" };
    }
    const from = this.#cloudOf(packet, 12);
    const to = this.#cloudOf(packet, 16);
    if (from === undefined || to === undefined || from === to) {
      this.#unrouted++;
      return { kind: "unrouted" };
    }
    const direction = `${from}>${to}`;
    const counters = this.#counters(direction);
    if (this.#partitioned.has(from) || this.#partitioned.has(to)) {
      counters.dropped++;
      return { kind: "dropped", direction };
    }
    const delay = this.#delays[pairKey(this.#order, from, to)];
    const oneWay = delay ? delay.rttMs / 2 + (this.#random() - 0.5) * delay.jitterMs : 0;
    // FIFO per direction: never earlier than the packet before it.
    const due = Math.max(now + oneWay, counters.lastDue);
    counters.lastDue = due;
    return { kind: "delayed", direction, due };
  }

  /** Records a packet dropped because its direction's queue was full (a router's tail drop). */
  overflowed(direction: string): void {
    this.#counters(direction).dropped++;
  }

  /** Records a packet of `bytes` released `lateMs` after its due time. */
  released(direction: string, lateMs: number, bytes: number): void {
    const counters = this.#counters(direction);
    counters.forwarded++;
    counters.bytes += bytes;
    counters.lateSum += lateMs;
    counters.lateMax = Math.max(counters.lateMax, Math.abs(lateMs));
  }

  /** Answers a control request (throws on a bad one). */
  control(request: ControlRequest): DelayLineState {
    switch (request.op) {
      case "state":
        return this.state();
      case "partition":
        if (!this.#order.includes(request.cloud)) {
          throw new Error(`Unknown cloud "${request.cloud}"`);
        }
        if (request.cut) this.#partitioned.add(request.cloud);
        else this.#partitioned.delete(request.cloud);
        return this.state();
      case "delay":
        if (!(request.pair in this.#delays)) {
          throw new Error(`Unknown cloud pair "${request.pair}"`);
        }
        if (!(request.rttMs >= 0 && request.jitterMs >= 0 && request.jitterMs <= request.rttMs)) {
          throw new Error("Expected 0 ≤ jitterMs ≤ rttMs");
        }
        this.#delays[request.pair] = { rttMs: request.rttMs, jitterMs: request.jitterMs };
        return this.state();
      case "reset-stats":
        for (const counters of this.#directions.values()) {
          Object.assign(counters, { forwarded: 0, dropped: 0, lateSum: 0, lateMax: 0, bytes: 0 });
        }
        this.#unrouted = 0;
        return this.state();
      default:
        throw new Error(`Unknown op ${JSON.stringify((request as { op: unknown }).op)}`);
    }
  }

  /** Delays in force, partitions and counters. */
  state(): DelayLineState {
    return {
      delays: structuredClone(this.#delays),
      partitioned: [...this.#partitioned],
      unrouted: this.#unrouted,
      directions: Object.fromEntries(
        [...this.#directions].map(([key, counters]) => [key, {
          forwarded: counters.forwarded,
          dropped: counters.dropped,
          meanLateMs: counters.forwarded ? counters.lateSum / counters.forwarded : 0,
          maxLateMs: counters.lateMax,
          bytes: counters.bytes,
        }]),
      ),
    };
  }
}

/** Packets of one direction waiting for their due time, oldest first. */
class HeldQueue {
  packets: Array<{ packet: Uint8Array<ArrayBuffer>; due: number }> = [];
  head = 0;
  armed = false;
}

/** Runs the delay line until the process is killed. */
export async function runDelayLine(config: DelayLineConfig): Promise<never> {
  const plan = new DelayPlan(config);
  const queues = new Map<string, HeldQueue>();
  const tun = openTun(config.tun);
  const sleep = preciseSleeper();
  /**
   * Wake-ups come late (a thread hand-off and the event loop): they are
   * asked for this much early, adjusted by every released packet's error,
   * so the mean error of a delay stays near zero.
   */
  let armEarlyMs = 0;

  const release = (direction: string, queue: HeldQueue) => {
    queue.armed = false;
    const now = performance.now();
    while (queue.head < queue.packets.length) {
      const held = queue.packets[queue.head];
      if (held.due > now + RELEASE_SLACK_MS) break;
      queue.head++;
      const late = now - held.due;
      armEarlyMs = Math.min(MAX_ARM_EARLY_MS, Math.max(0, armEarlyMs + late * LAG_GAIN));
      plan.released(direction, late, held.packet.length);
      tun.write(held.packet);
    }
    if (queue.head === queue.packets.length) {
      queue.packets = [];
      queue.head = 0;
    } else {
      if (queue.head > 1024) {
        queue.packets = queue.packets.slice(queue.head);
        queue.head = 0;
      }
      arm(direction, queue, now);
    }
  };

  const arm = (direction: string, queue: HeldQueue, now: number) => {
    const wait = Math.max(0, queue.packets[queue.head].due - now - armEarlyMs);
    queue.armed = true;
    // One sleep per direction at a time: a later packet never needs an earlier wake-up.
    sleep(wait).then(() => release(direction, queue));
  };

  const serveControl = async () => {
    await Deno.remove(config.control).catch(() => {});
    const listener = Deno.listen({ transport: "unix", path: config.control });
    for await (const connection of listener) handleControl(connection).catch(() => {});
  };

  const handleControl = async (connection: Deno.Conn) => {
    const encoder = new TextEncoder();
    let buffer = "";
    try {
      for await (const chunk of connection.readable.pipeThrough(new TextDecoderStream())) {
        buffer += chunk;
        let newline;
        while ((newline = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, newline);
          buffer = buffer.slice(newline + 1);
          let answer: unknown;
          try {
            answer = plan.control(JSON.parse(line) as ControlRequest);
          } catch (error) {
            answer = { error: (error as Error).message };
          }
          await connection.write(encoder.encode(JSON.stringify(answer) + "\n"));
        }
        if (buffer.length > MAX_CONTROL_LINE) throw new Error("control request too long");
      }
    } finally {
      try {
        connection.close();
      } catch {
        // Closed by the peer.
      }
    }
  };

  serveControl().catch((error) => {
    console.error(`delay line: control socket failed: ${error}`);
    Deno.exit(1);
  });
  console.error(`delay line on ${config.tun}: ${JSON.stringify(config.delays)}`);

  const buffer = new Uint8Array(MAX_PACKET);
  while (true) {
    const length = await tun.read(buffer);
    const now = performance.now();
    const packet = buffer.slice(0, length);
    const admission = plan.admit(packet, now);
    if (admission.kind !== "delayed") continue;
    let queue = queues.get(admission.direction);
    if (!queue) queues.set(admission.direction, queue = new HeldQueue());
    if (queue.packets.length - queue.head >= MAX_HELD_PACKETS) {
      plan.overflowed(admission.direction);
      continue;
    }
    queue.packets.push({ packet, due: admission.due });
    if (!queue.armed) arm(admission.direction, queue, now);
  }
}

if (import.meta.main) {
  await runDelayLine(JSON.parse(Deno.args[0]) as DelayLineConfig);
}
