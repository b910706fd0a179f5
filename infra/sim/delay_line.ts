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

interface Subnet {
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
/** How much of a packet's error corrects the next wake-ups. */
const LAG_GAIN = 0.1;
/** Never wake earlier than this (a stalled loop must not make every packet early). */
const MAX_ARM_EARLY_MS = 3;

interface Held {
  packet: Uint8Array<ArrayBuffer>;
  due: number;
}

class Direction {
  queue: Held[] = [];
  head = 0;
  lastDue = 0;
  armed = false;
  forwarded = 0;
  dropped = 0;
  lateSum = 0;
  lateMax = 0;
  bytes = 0;
}

/** Runs the delay line until the process is killed. */
export async function runDelayLine(config: DelayLineConfig): Promise<never> {
  const order = Object.keys(config.clouds);
  const subnets = order.map((cloud) => parseSubnet(cloud, config.clouds[cloud]));
  const delays = structuredClone(config.delays);
  const partitioned = new Set<string>();
  const directions = new Map<string, Direction>();
  let unrouted = 0;
  const tun = openTun(config.tun);

  const cloudOf = (packet: Uint8Array, offset: number): string | undefined => {
    const address = ((packet[offset] << 24) | (packet[offset + 1] << 16) |
      (packet[offset + 2] << 8) | packet[offset + 3]) >>> 0;
    return subnets.find((subnet) => ((address & subnet.mask) >>> 0) === subnet.base)?.cloud;
  };

  const sleep = preciseSleeper();
  /**
   * Wake-ups come late (a thread hand-off and the event loop): they are
   * asked for this much early, adjusted by every released packet's error,
   * so the mean error of a delay stays near zero.
   */
  let armEarlyMs = 0;

  const release = (direction: Direction) => {
    direction.armed = false;
    const now = performance.now();
    while (direction.head < direction.queue.length) {
      const held = direction.queue[direction.head];
      if (held.due > now + RELEASE_SLACK_MS) break;
      direction.head++;
      const late = now - held.due;
      armEarlyMs = Math.min(MAX_ARM_EARLY_MS, Math.max(0, armEarlyMs + late * LAG_GAIN));
      direction.lateSum += late;
      direction.lateMax = Math.max(direction.lateMax, Math.abs(late));
      direction.forwarded++;
      direction.bytes += held.packet.length;
      tun.write(held.packet);
    }
    if (direction.head === direction.queue.length) {
      direction.queue = [];
      direction.head = 0;
    } else {
      if (direction.head > 1024) {
        direction.queue = direction.queue.slice(direction.head);
        direction.head = 0;
      }
      arm(direction, now);
    }
  };

  const arm = (direction: Direction, now: number) => {
    const wait = Math.max(0, direction.queue[direction.head].due - now - armEarlyMs);
    direction.armed = true;
    // One sleep per direction at a time: a later packet never needs an earlier wake-up.
    sleep(wait).then(() => release(direction));
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
            answer = control(JSON.parse(line) as ControlRequest);
          } catch (error) {
            answer = { error: (error as Error).message };
          }
          await connection.write(encoder.encode(JSON.stringify(answer) + "\n"));
        }
        if (buffer.length > 65_536) throw new Error("control request too long");
      }
    } finally {
      try {
        connection.close();
      } catch {
        // Closed by the peer.
      }
    }
  };

  const control = (request: ControlRequest): unknown => {
    switch (request.op) {
      case "state":
        return state();
      case "partition":
        if (!order.includes(request.cloud)) throw new Error(`Unknown cloud "${request.cloud}"`);
        if (request.cut) partitioned.add(request.cloud);
        else partitioned.delete(request.cloud);
        return state();
      case "delay":
        if (!(request.pair in delays)) throw new Error(`Unknown cloud pair "${request.pair}"`);
        if (!(request.rttMs >= 0 && request.jitterMs >= 0 && request.jitterMs <= request.rttMs)) {
          throw new Error("Expected 0 ≤ jitterMs ≤ rttMs");
        }
        delays[request.pair] = { rttMs: request.rttMs, jitterMs: request.jitterMs };
        return state();
      case "reset-stats":
        for (const direction of directions.values()) {
          Object.assign(direction, { forwarded: 0, dropped: 0, lateSum: 0, lateMax: 0, bytes: 0 });
        }
        unrouted = 0;
        return state();
      default:
        throw new Error(`Unknown op ${JSON.stringify((request as { op: unknown }).op)}`);
    }
  };

  const state = (): DelayLineState => ({
    delays,
    partitioned: [...partitioned],
    unrouted,
    directions: Object.fromEntries(
      [...directions].map(([key, direction]) => [key, {
        forwarded: direction.forwarded,
        dropped: direction.dropped,
        meanLateMs: direction.forwarded ? direction.lateSum / direction.forwarded : 0,
        maxLateMs: direction.lateMax,
        bytes: direction.bytes,
      }]),
    ),
  });

  serveControl().catch((error) => {
    console.error(`delay line: control socket failed: ${error}`);
    Deno.exit(1);
  });
  console.error(`delay line on ${config.tun}: ${JSON.stringify(delays)}`);

  const buffer = new Uint8Array(MAX_PACKET);
  while (true) {
    const length = await tun.read(buffer);
    // IPv4 only: the sim's namespaces have IPv6 turned off.
    if (length < 20 || buffer[0] >> 4 !== 4) {
      unrouted++;
      continue;
    }
    const from = cloudOf(buffer, 12);
    const to = cloudOf(buffer, 16);
    if (from === undefined || to === undefined || from === to) {
      unrouted++;
      continue;
    }
    const key = `${from}>${to}`;
    let direction = directions.get(key);
    if (!direction) directions.set(key, direction = new Direction());
    if (partitioned.has(from) || partitioned.has(to)) {
      direction.dropped++;
      continue;
    }
    const delay = delays[pairKey(order, from, to)];
    const now = performance.now();
    const oneWay = delay ? delay.rttMs / 2 + (Math.random() - 0.5) * delay.jitterMs : 0;
    // FIFO per direction: never earlier than the packet before it.
    const due = Math.max(now + oneWay, direction.lastDue);
    direction.lastDue = due;
    direction.queue.push({ packet: buffer.slice(0, length), due });
    if (!direction.armed) arm(direction, now);
  }
}

if (import.meta.main) {
  await runDelayLine(JSON.parse(Deno.args[0]) as DelayLineConfig);
}
