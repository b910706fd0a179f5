/**
 * SSH connections, shared per (host, port, user, key): one `ssh2` client
 * each (like OpenSSH's ControlMaster), with keepalive and a ready timeout,
 * one shared SFTP session, and a bound on the exec channels open at once
 * (OpenSSH's `MaxSessions` is 10 by default: one for SFTP, one kept for
 * cancels, the rest for steps).
 *
 * `ssh2` ships no types; the part used here is typed below.
 *
 * @module
 */

import ssh2 from "npm:ssh2@1.17.0";
import { type HostKeyError, type HostTrust, verifyHostKey } from "./_hostkey.ts";

/** Keepalive period; a dead connection is noticed after {@link KEEPALIVE_COUNT_MAX} misses. */
export const KEEPALIVE_INTERVAL_MS = 2_000;
/** Unanswered keepalives before the connection is declared dead. */
export const KEEPALIVE_COUNT_MAX = 3;
/** Longest handshake (TCP, key exchange, auth). */
export const READY_TIMEOUT_MS = 15_000;
/** Exec channels open at once per connection. */
export const MAX_EXEC_CHANNELS = 8;

/** A remote command's channel, as far as it is used. */
export interface Channel {
  on(event: "data", listener: (data: Uint8Array) => void): this;
  on(event: "exit", listener: (code: number | null, signal?: string) => void): this;
  on(event: "close", listener: () => void): this;
  on(event: string, listener: (...args: never[]) => void): this;
  stderr: {
    on(event: "data", listener: (data: Uint8Array) => void): void;
    on(event: "end", listener: () => void): void;
    /** Stops reading (the SSH window closes, the remote process waits). */
    pause(): void;
    resume(): void;
  };
  end(): void;
  close(): void;
  /** Stops reading (the SSH window closes, the remote process waits). */
  pause(): void;
  resume(): void;
}

/** The SFTP session, as far as it is used. */
export interface Sftp {
  mkdir(path: string, attrs: { mode: number }, cb: (error?: Error) => void): void;
  fastPut(
    local: string,
    remote: string,
    options: { chunkSize: number; concurrency: number },
    cb: (error?: Error) => void,
  ): void;
  fastGet(
    remote: string,
    local: string,
    options: { chunkSize: number; concurrency: number },
    cb: (error?: Error) => void,
  ): void;
  writeFile(path: string, data: string, options: { mode: number }, cb: (e?: Error) => void): void;
  readFile(path: string, cb: (error: Error | undefined, data: Uint8Array) => void): void;
  lstat(
    path: string,
    cb: (error: Error | undefined, stats: { isFile(): boolean; size: number }) => void,
  ): void;
  realpath(path: string, cb: (error: Error | undefined, absolute: string) => void): void;
  readdir(
    path: string,
    cb: (
      error: Error | undefined,
      entries: Array<{ filename: string; attrs: { isDirectory(): boolean } }>,
    ) => void,
  ): void;
  unlink(path: string, cb: (error?: Error) => void): void;
  rmdir(path: string, cb: (error?: Error) => void): void;
  end(): void;
}

interface Client {
  on(event: string, listener: (...args: never[]) => void): Client;
  connect(options: Record<string, unknown>): void;
  exec(command: string, cb: (error: Error | undefined, channel: Channel) => void): void;
  sftp(cb: (error: Error | undefined, sftp: Sftp) => void): void;
  setNoDelay(noDelay: boolean): void;
  end(): void;
}

/** The connection failed or died: the attempt is worth retrying. */
export class ConnectionError extends Error {
  /** Stable error code. */
  readonly code = "ssh_connection";
  /** Error class of the attempt it fails. */
  readonly errorClass = "infrastructure";

  /** Builds the error from a full sentence. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "ConnectionError";
  }
}

/** The remote host refused the key. */
export class AuthError extends Error {
  /** Stable error code. */
  readonly code = "ssh_auth";
  /** Error class of the attempt it fails. */
  readonly errorClass = "permission";

  /** Builds the error from a full sentence. */
  constructor(message: string) {
    super(message);
    this.name = "AuthError";
  }
}

/** What a connection is made with. */
export interface Target {
  host: string;
  port: number;
  user: string;
  /** Private key text. */
  privateKey?: string;
  /** The private key's passphrase (a secret of the step). */
  passphrase?: string;
  /** Path of the ssh-agent socket to authenticate with. */
  agent?: string;
  /** Login password (a secret of the step). */
  password?: string;
  trust: HostTrust;
}

/**
 * The private key as ssh2 can sign with it here. ssh2 turns an OpenSSH-format
 * ECDSA key into an SEC1 PEM whose private scalar keeps the SSH mpint's
 * sign byte (33 bytes for P-256 when its high bit is set); OpenSSL accepts
 * that, Deno's node:crypto does not, so about half of such keys would fail
 * to sign. Those are handed over re-encoded (decrypted in memory, if they
 * had a passphrase); every other key as it was.
 */
export function usableKey(
  text: string,
  passphrase: string | undefined,
): { privateKey: string; passphrase?: string } {
  let parsed:
    | Error
    | { type: string; getPrivatePEM(): string }
    | Array<{ type: string; getPrivatePEM(): string }>;
  try {
    parsed = ssh2.utils.parseKey(text, passphrase);
  } catch (error) {
    // ECDSA P-521: Deno's node:crypto has no ECDH on that curve.
    parsed = new Error(
      `${(error as Error).message} (ed25519, RSA and ECDSA P-256/P-384 keys are supported)`,
    );
  }
  if (parsed instanceof Error) {
    throw new AuthError(`cannot use the key: ${parsed.message}`);
  }
  const key = Array.isArray(parsed) ? parsed[0] : parsed;
  if (!key?.type.startsWith("ecdsa-")) {
    return passphrase === undefined ? { privateKey: text } : { privateKey: text, passphrase };
  }
  return { privateKey: withoutSignByte(key.getPrivatePEM()) };
}

/** Drops the mpint sign byte from an SEC1 EC private key's scalar, if it has one. */
function withoutSignByte(pem: string): string {
  const body = pem.split("\n").filter((line) => line && !line.startsWith("-----")).join("");
  const der = Uint8Array.from(atob(body), (char) => char.charCodeAt(0));
  // SEQUENCE { INTEGER 1, OCTET STRING d, ... }, the outer length short or long form.
  const lengthBytes = der[1] & 0x80 ? der[1] & 0x7f : 0;
  const version = 2 + lengthBytes;
  const octet = version + 3;
  if (der[0] !== 0x30 || der[version] !== 0x02 || der[octet] !== 0x04) return pem;
  const length = der[octet + 1];
  if (der[octet + 2] !== 0x00 || (der[octet + 3] & 0x80) === 0) return pem;
  const fixed = new Uint8Array(der.length - 1);
  fixed.set(der.subarray(0, octet + 2));
  fixed.set(der.subarray(octet + 3), octet + 2);
  fixed[octet + 1] = length - 1;
  const outer = (lengthBytes === 0 ? der[1] : der[2 + lengthBytes - 1]) - 1;
  if (lengthBytes === 0) fixed[1] = outer;
  else fixed[2 + lengthBytes - 1] = outer;
  const base64 = btoa(String.fromCharCode(...fixed)).replace(/(.{64})/g, "$1\n").trim();
  return `-----BEGIN EC PRIVATE KEY-----\n${base64}\n-----END EC PRIVATE KEY-----\n`;
}

/** A counting semaphore. */
class Slots {
  #free: number;
  #waiting: (() => void)[] = [];
  constructor(count: number) {
    this.#free = count;
  }
  async take(): Promise<void> {
    if (this.#free > 0) {
      this.#free--;
      return;
    }
    await new Promise<void>((resolve) => this.#waiting.push(resolve));
  }
  give(): void {
    const next = this.#waiting.shift();
    if (next) next();
    else this.#free++;
  }
}

/** One live SSH connection. */
export class Connection {
  readonly #client: Client;
  readonly #slots = new Slots(MAX_EXEC_CHANNELS);
  #sftp: Promise<Sftp> | undefined;
  #closed = false;
  #closeReason: string | undefined;
  readonly #onClose: (() => void)[] = [];
  /** Where it leads, for messages. */
  readonly where: string;

  private constructor(client: Client, where: string) {
    this.#client = client;
    this.where = where;
  }

  /** Connects and authenticates; rejects with a typed error. */
  static open(target: Target): Promise<Connection> {
    const client = new ssh2.Client() as unknown as Client;
    const where = `${target.user}@${target.host}:${target.port}`;
    const connection = new Connection(client, where);
    return new Promise((resolve, reject) => {
      let hostKeyError: HostKeyError | undefined;
      let ready = false;
      client.on("ready", () => {
        ready = true;
        // Small requests (channel opens, SFTP calls) must not wait for Nagle.
        client.setNoDelay(true);
        resolve(connection);
      });
      client.on("error", (error: Error & { level?: string }) => {
        if (!ready) {
          if (hostKeyError) return reject(hostKeyError);
          if (error.level === "client-authentication") {
            const methods = [
              target.privateKey ? "publickey (key file)" : "",
              target.agent ? "publickey (ssh-agent)" : "",
              target.password ? "password" : "",
            ].filter(Boolean).join(", ");
            return reject(
              new AuthError(`${where} refused the login (tried ${methods || "nothing"})`),
            );
          }
          if (error.level === "agent") {
            return reject(new AuthError(`cannot use the ssh-agent for ${where}: ${error.message}`));
          }
          return reject(new ConnectionError(`cannot connect to ${where}: ${error.message}`));
        }
        connection.#closeReason = error.message;
      });
      client.on("close", () => {
        connection.#closed = true;
        if (!ready) {
          reject(hostKeyError ?? new ConnectionError(`${where} closed the connection`));
        }
        for (const listener of connection.#onClose.splice(0)) listener();
      });
      try {
        client.connect({
          host: target.host,
          port: target.port,
          username: target.user,
          ...(target.privateKey ? usableKey(target.privateKey, target.passphrase) : {}),
          ...(target.agent ? { agent: target.agent } : {}),
          ...(target.password !== undefined ? { password: target.password } : {}),
          readyTimeout: READY_TIMEOUT_MS,
          keepaliveInterval: KEEPALIVE_INTERVAL_MS,
          keepaliveCountMax: KEEPALIVE_COUNT_MAX,
          hostVerifier: (key: Uint8Array) => {
            try {
              verifyHostKey(target.trust, target.host, target.port, key);
              return true;
            } catch (error) {
              hostKeyError = error as HostKeyError;
              return false;
            }
          },
        });
      } catch (error) {
        // A key ssh2 cannot parse (or one that needs a passphrase).
        reject(new AuthError(`cannot use the key for ${where}: ${(error as Error).message}`));
      }
    });
  }

  /** True once the connection has closed (or died). */
  get closed(): boolean {
    return this.#closed;
  }

  /** Why it closed, when known. */
  get closeReason(): string {
    return this.#closeReason ?? "connection closed";
  }

  /** Calls `listener` when the connection closes (at once when it has). */
  onClose(listener: () => void): void {
    if (this.#closed) listener();
    else this.#onClose.push(listener);
  }

  /** The shared SFTP session. */
  sftp(): Promise<Sftp> {
    this.#sftp ??= new Promise<Sftp>((resolve, reject) => {
      this.#client.sftp((error, sftp) => error ? reject(error) : resolve(sftp));
    }).catch((error) => {
      this.#sftp = undefined;
      throw new ConnectionError(`no SFTP session on ${this.where}: ${error.message}`);
    });
    return this.#sftp;
  }

  /**
   * Opens an exec channel; `bounded` ones wait for one of the
   * {@link MAX_EXEC_CHANNELS} slots and give it back when closed.
   */
  async exec(command: string, bounded = true): Promise<Channel> {
    if (bounded) await this.#slots.take();
    if (this.#closed) {
      if (bounded) this.#slots.give();
      throw new ConnectionError(`lost the connection to ${this.where}: ${this.closeReason}`);
    }
    try {
      const channel = await new Promise<Channel>((resolve, reject) => {
        this.#client.exec(command, (error, channel) => error ? reject(error) : resolve(channel));
      });
      if (bounded) channel.on("close", () => this.#slots.give());
      return channel;
    } catch (error) {
      if (bounded) this.#slots.give();
      throw new ConnectionError(
        `cannot open a channel on ${this.where}: ${(error as Error).message}`,
      );
    }
  }

  /** Runs a short command to its end; its stdout, or a rejection naming its exit code. */
  async run(command: string, bounded = false): Promise<string> {
    const channel = await this.exec(command, bounded);
    let out = "";
    let err = "";
    const decoder = new TextDecoder();
    return await new Promise((resolve, reject) => {
      let code: number | null = null;
      channel.on("data", (data) => out += decoder.decode(data, { stream: true }));
      channel.stderr.on("data", (data) => err += new TextDecoder().decode(data));
      channel.on("exit", (exit) => code = exit);
      channel.on("close", () => {
        if (code === 0) resolve(out);
        else if (code === null) {
          reject(new ConnectionError(`lost ${this.where}: ${this.closeReason}`));
        } else reject(new Error(`remote command failed (exit ${code}): ${err.trim()}`));
      });
    });
  }

  /** Closes the connection. */
  close(): void {
    this.#client.end();
  }
}

/** Connections by (host, port, user, key), reused while alive. */
export class ConnectionPool {
  readonly #connections = new Map<string, Promise<Connection>>();

  /** A live connection for `target`, opened when there is none. */
  async get(target: Target): Promise<Connection> {
    const trust = "fingerprint" in target.trust
      ? target.trust.fingerprint
      : target.trust.knownHosts;
    const key = JSON.stringify([
      target.host,
      target.port,
      target.user,
      target.privateKey,
      target.passphrase,
      target.agent,
      target.password,
      trust,
    ]);
    const existing = this.#connections.get(key);
    if (existing) {
      const connection = await existing.catch(() => undefined);
      if (connection && !connection.closed) return connection;
      if (this.#connections.get(key) === existing) this.#connections.delete(key);
    }
    const opening = Connection.open(target);
    this.#connections.set(key, opening);
    opening.then(
      (connection) =>
        connection.onClose(() => {
          if (this.#connections.get(key) === opening) this.#connections.delete(key);
        }),
      () => {
        if (this.#connections.get(key) === opening) this.#connections.delete(key);
      },
    );
    return await opening;
  }

  /** Closes every connection. */
  async close(): Promise<void> {
    for (const opening of this.#connections.values()) {
      (await opening.catch(() => undefined))?.close();
    }
    this.#connections.clear();
  }
}
