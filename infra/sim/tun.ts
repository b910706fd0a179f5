/**
 * A TUN device opened through libc (Deno has no TUN API): `open` of
 * `/dev/net/tun`, `ioctl(TUNSETIFF)` to attach to a device by name, then
 * whole IP packets with `read`/`write`. The device itself is made
 * persistent beforehand (`ip tuntap add`), so it outlives the process that
 * reads it and its routes stay in place across a restart.
 *
 * Needs `--allow-ffi` and runs in the network namespace of the device.
 *
 * @module
 */

/** `_IOW('T', 202, int)` from linux/if_tun.h. */
const TUNSETIFF = 0x400454ca;
/** A layer-3 device: packets start at the IP header. */
const IFF_TUN = 0x0001;
/** No 4-byte packet-information prefix before each packet. */
const IFF_NO_PI = 0x1000;
const O_RDWR = 2;
/** `struct ifreq`: a 16-byte name, then a union of which flags take the first 2 bytes. */
const IFREQ_SIZE = 40;
const IFNAMSIZ = 16;
/** Larger than any packet of a 1500-byte MTU; a TUN read returns one packet. */
export const MAX_PACKET = 65_536;

const LIBC_CANDIDATES = [
  "/lib/x86_64-linux-gnu/libc.so.6",
  "/lib/aarch64-linux-gnu/libc.so.6",
  "libc.so.6",
];

const SYMBOLS = {
  open: { parameters: ["buffer", "i32"], result: "i32" },
  ioctl: { parameters: ["i32", "u64", "buffer"], result: "i32" },
  // Blocking reads run on Deno's blocking pool, so the event loop keeps
  // releasing delayed packets while a read waits.
  read: { parameters: ["i32", "buffer", "usize"], result: "isize", nonblocking: true },
  write: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  close: { parameters: ["i32"], result: "i32" },
  // A sleep on the blocking pool: sub-millisecond, and free of the 4 ms
  // clamp browsers' and Deno's timers put on nested setTimeout chains.
  usleep: { parameters: ["u32"], result: "i32", nonblocking: true },
} as const;

/** An open TUN device. */
export interface Tun {
  /** Reads one packet into `buffer`, returning its length. */
  read(buffer: Uint8Array<ArrayBuffer>): Promise<number>;
  /** Writes one whole packet back to the kernel, as if it arrived on the device. */
  write(packet: Uint8Array<ArrayBuffer>): void;
  close(): void;
}

/** Raised when the device cannot be opened or attached. */
export class TunError extends Error {
  readonly code = "tun_unavailable";
  constructor(message: string) {
    super(message);
    this.name = "TunError";
  }
}

function openLibc(): Deno.DynamicLibrary<typeof SYMBOLS> {
  let lastError: unknown;
  for (const path of LIBC_CANDIDATES) {
    try {
      return Deno.dlopen(path, SYMBOLS);
    } catch (error) {
      lastError = error;
    }
  }
  throw new TunError(`Expected libc to be loadable for TUN access: ${lastError}`);
}

/** A sleep accurate to well under a millisecond (libc `usleep` off the event loop). */
export function preciseSleeper(): (ms: number) => Promise<void> {
  const libc = openLibc();
  return async (ms) => {
    await libc.symbols.usleep(Math.max(0, Math.round(ms * 1000)));
  };
}

/** Attaches to the existing TUN device `name` of the current network namespace. */
export function openTun(name: string): Tun {
  const nameBytes = new TextEncoder().encode(name);
  if (nameBytes.length >= IFNAMSIZ) {
    throw new TunError(`Expected an interface name under ${IFNAMSIZ} bytes, got "${name}"`);
  }
  const libc = openLibc();
  const fd = libc.symbols.open(new TextEncoder().encode("/dev/net/tun\0"), O_RDWR);
  if (fd < 0) throw new TunError("Expected /dev/net/tun to open (is the tun device node there?)");
  const ifreq = new Uint8Array(IFREQ_SIZE);
  ifreq.set(nameBytes);
  new DataView(ifreq.buffer).setUint16(IFNAMSIZ, IFF_TUN | IFF_NO_PI, true);
  if (libc.symbols.ioctl(fd, BigInt(TUNSETIFF), ifreq) < 0) {
    libc.symbols.close(fd);
    throw new TunError(
      `Expected TUNSETIFF to attach to "${name}" (made with ip tuntap, mode tun?)`,
    );
  }
  return {
    async read(buffer) {
      const length = Number(await libc.symbols.read(fd, buffer, BigInt(buffer.length)));
      if (length < 0) throw new TunError(`read from ${name} failed`);
      return length;
    },
    write(packet) {
      // A failed write (an unreachable destination) loses the packet, as a wire would.
      libc.symbols.write(fd, packet, BigInt(packet.length));
    },
    close() {
      libc.symbols.close(fd);
      libc.close();
    },
  };
}
