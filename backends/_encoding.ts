/**
 * Byte and name encodings the backends share: hex, digests and file-safe
 * names, each written once.
 *
 * @module
 */

import { createHash } from "node:crypto";

/** Lower-case hex of some bytes. */
export function toHex(bytes: Uint8Array): string {
  return Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

/** `byteCount` random bytes from the system's CSPRNG, as hex: a nonce. */
export function randomHex(byteCount: number): string {
  return toHex(crypto.getRandomValues(new Uint8Array(byteCount)));
}

/** The SHA-256 digest of a text (UTF-8), as hex. */
export function sha256Hex(text: string): string {
  return createHash("sha256").update(text).digest("hex");
}

/**
 * A readable name made safe for a file or container name: every run of
 * characters other than letters, digits, `_`, `.` and `-` becomes one `_`.
 * Distinct names may map alike; callers that need them apart add a digest.
 */
export function fileSafe(name: string): string {
  return name.replace(/[^A-Za-z0-9_.-]+/g, "_");
}
