/**
 * Signals to process groups from a sandboxed backend host, without a spawn
 * each. `Deno.kill` needs an unrestricted run grant, which a host does not
 * have; it may run its shell, whose `kill` is a builtin. One long-lived
 * `sh` reads `kill` lines from a pipe and answers each with its status, in
 * order: a signal costs a pipe round trip instead of a fork and an exec of
 * `kill(1)` (which was a third process per `shell` step: every step's group
 * is killed once it ends, to reap what it left behind).
 *
 * Only numbers and a signal name checked against a fixed pattern ever reach
 * the shell. The shell lives in the host's own process group (a step's
 * group kill never reaches it) and exits when its stdin closes, that is
 * with the host.
 *
 * Internal to `backends/`.
 *
 * @module
 */

/** A signal name as `kill -s` takes it: `SIGKILL` → `KILL`. */
const SIGNAL_NAME = /^SIG([A-Z0-9]{1,10})$/;

const encoder = new TextEncoder();

/** A `sh` answering `kill` requests over its stdin and stdout. */
export class ShellSignaller {
  #child: Deno.ChildProcess;
  #writer: WritableStreamDefaultWriter<Uint8Array>;
  #reader: ReadableStreamDefaultReader<Uint8Array>;
  #decoder = new TextDecoder();
  #buffered = "";
  /** Requests written and not yet answered, oldest first. */
  #waiting: Array<(ok: boolean | undefined) => void> = [];
  #reading = false;
  #broken = false;

  /** Starts `shell` (an absolute path the caller may run). */
  constructor(shell: string) {
    this.#child = new Deno.Command(shell, {
      args: ["-s"],
      env: { LC_ALL: "C" },
      clearEnv: true,
      stdin: "piped",
      stdout: "piped",
      stderr: "null",
    }).spawn();
    // Never the reason a host stays up; it ends with the host's stdin.
    this.#child.unref();
    this.#writer = this.#child.stdin.getWriter();
    this.#reader = this.#child.stdout.getReader();
  }

  /** False once the shell is unusable (then the caller falls back to `kill(1)`). */
  get usable(): boolean {
    return !this.#broken;
  }

  /**
   * Sends `signal` to the group `pgid`: true when it was delivered, false
   * when there is no such group, undefined when the shell could not be used.
   */
  async signal(pgid: number, signal: Deno.Signal): Promise<boolean | undefined> {
    const name = SIGNAL_NAME.exec(signal)?.[1];
    if (this.#broken || !name || !Number.isSafeInteger(pgid) || pgid <= 1) return undefined;
    const answer = new Promise<boolean | undefined>((resolve) => this.#waiting.push(resolve));
    try {
      await this.#writer.write(
        encoder.encode(`kill -s ${name} -- -${pgid} 2>/dev/null && echo 0 || echo 1\n`),
      );
    } catch {
      this.#break();
    }
    if (!this.#reading) this.#read();
    return await answer;
  }

  /** Stops the shell (its stdin closes; it exits). */
  async close(): Promise<void> {
    this.#break();
    await this.#writer.close().catch(() => {});
    await this.#child.status.catch(() => {});
  }

  /** Reads answers while requests wait (no read is left pending otherwise). */
  async #read(): Promise<void> {
    this.#reading = true;
    try {
      while (this.#waiting.length > 0 && !this.#broken) {
        const newline = this.#buffered.indexOf("\n");
        if (newline !== -1) {
          const line = this.#buffered.slice(0, newline);
          this.#buffered = this.#buffered.slice(newline + 1);
          this.#waiting.shift()!(line === "0");
          continue;
        }
        const { done, value } = await this.#reader.read();
        if (done) break;
        this.#buffered += this.#decoder.decode(value, { stream: true });
      }
    } catch {
      // The shell is gone.
    } finally {
      this.#reading = false;
    }
    if (this.#waiting.length > 0) this.#break();
  }

  #break(): void {
    this.#broken = true;
    for (const resolve of this.#waiting.splice(0)) resolve(undefined);
  }
}
