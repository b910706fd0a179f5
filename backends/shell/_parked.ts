/**
 * Parked shells: `shell` steps started in a `/bin/sh` that was started, in a
 * session and process group of its own, before its step was known.
 *
 * A cold step costs two execs on its critical path (`setsid`, then `sh`),
 * and the host's main thread is held in `posix_spawn` meanwhile; on a
 * virtual machine where a process start is slow that is most of a no-op
 * step. A parked shell has done both before its step comes: it waits in
 * `. /dev/stdin`, and its step arrives there as a short script —
 *
 * ```sh
 * cd -P -- '<workdir>' || exit 126
 * unset OLDPWD
 * export NAME='value'      # each of the step's variables
 * set -e
 * eval '<run>' </dev/null
 * ```
 *
 * — then end-of-file. The step sees what a cold `sh -e -c '<run>'` sees:
 * the same variables (the parked shell starts with an empty environment:
 * nothing of another step, no secret before its own), the same working
 * directory (`-P`: the physical path, as a fresh shell computes it), stdin
 * at end-of-file, errexit on, its shell as the leader of its process group,
 * so a cancel reaches everything it started. What differs: the shell names
 * `eval` in its own error messages (`sh: 1: eval: foo: not found`).
 *
 * Steps whose variables a shell would treat specially (`PWD`, `IFS`, …), or
 * whose names or values a shell word cannot carry, start cold; so does a
 * step whose working directory cannot be checked first (a cold start fails
 * to spawn there, a parked one would fail differently).
 *
 * Internal to the `shell` backend.
 *
 * @module
 */

import type { Execution, ExitStatus } from "../backend.ts";
import { parseProcessHandle, spawnExecution } from "../_process.ts";
import { WarmPool, WarmProcess } from "../_warm.ts";
import { DEFAULT_SHELL } from "./manifest.ts";

/** What a parked shell runs until its step arrives: the step itself. */
const PARKED_SCRIPT = ". /dev/stdin";

/** Variables a shell sets or reads at start-up: a step naming one starts cold. */
const SHELL_OWN_VARIABLES = new Set([
  "ENV",
  "HISTFILE",
  "IFS",
  "LINENO",
  "OLDPWD",
  "OPTIND",
  "PPID",
  "PS1",
  "PS2",
  "PS4",
  "PWD",
]);

/** A name `export NAME=…` takes. */
const VARIABLE_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

/** What the step's finish needs, known only once a step is handed over. */
interface ParkedStep {
  finish?: (status: ExitStatus) => ExitStatus | Promise<ExitStatus>;
}

/** A shell step as the backend resolved it. */
export interface ShellLaunch {
  cwd: string;
  env: Record<string, string>;
  run: string;
  finish: (status: ExitStatus) => ExitStatus | Promise<ExitStatus>;
}

/** The parked shells of one backend (a plugin host's). */
export class ParkedShells {
  readonly pool: WarmPool;

  constructor(pool = new WarmPool()) {
    this.pool = pool;
  }

  /**
   * Runs `launch` in a parked shell when there is one and the step can run
   * in one, else by `cold()`. A step that could have run parked counts
   * towards parking shells for the next ones, which are started once it is
   * over: beside it, a start slows it down by more than it saves the next.
   */
  async run(launch: ShellLaunch, cold: () => Execution): Promise<Execution> {
    if (!parkable(launch)) return cold();
    this.pool.noteStep(DEFAULT_SHELL);
    const execution = await this.#startParked(launch) ?? cold();
    const replace = () => {
      // A timer, not a microtask: the host sends the step's result first.
      setTimeout(() => this.pool.prestart(DEFAULT_SHELL, parkShell), 0);
    };
    execution.wait().then(replace, replace);
    return execution;
  }

  async #startParked(launch: ShellLaunch): Promise<Execution | undefined> {
    const parked = this.pool.take<ParkedStep>(DEFAULT_SHELL);
    if (!parked) return undefined;
    parked.watch.finish = launch.finish;
    try {
      await parked.send(stepScript(launch));
    } catch {
      await parked.stop();
      return undefined;
    }
    parked.started = true;
    return parked.execution;
  }

  /** Kills every parked shell and parks no more. */
  close(): Promise<void> {
    return this.pool.close();
  }
}

/** True when `launch` runs the same parked as cold (see the module doc). */
export function parkable(launch: ShellLaunch): boolean {
  if (launch.cwd.includes("\0") || launch.run.includes("\0")) return false;
  for (const [name, value] of Object.entries(launch.env)) {
    if (!VARIABLE_NAME.test(name) || SHELL_OWN_VARIABLES.has(name) || value.includes("\0")) {
      return false;
    }
  }
  try {
    return Deno.statSync(launch.cwd).isDirectory;
  } catch {
    return false;
  }
}

/** The script a parked shell reads on stdin to become the step. */
export function stepScript(launch: ShellLaunch): string {
  const lines = [`cd -P -- ${quote(launch.cwd)} || exit 126`, "unset OLDPWD"];
  for (const [name, value] of Object.entries(launch.env)) {
    lines.push(`export ${name}=${quote(value)}`);
  }
  lines.push("set -e", `eval ${quote(launch.run)} </dev/null`, "");
  return lines.join("\n");
}

/** `text` as one single-quoted shell word. */
function quote(text: string): string {
  return `'${text.replaceAll("'", `'\\''`)}'`;
}

/** Starts a shell that waits for its step, in a session of its own, with an empty environment. */
// Async with nothing to await: a failed spawn must reject, never throw into the pool's timer.
// deno-lint-ignore require-await
async function parkShell(): Promise<WarmProcess<ParkedStep>> {
  const watch: ParkedStep = {};
  let stdin: WritableStream<Uint8Array> | undefined;
  const execution = spawnExecution({
    command: DEFAULT_SHELL,
    args: ["-c", PARKED_SCRIPT],
    cwd: "/",
    env: {},
    finish: (status) => watch.finish ? watch.finish(status) : status,
    onStdin: (stream) => stdin = stream,
  });
  const process = new WarmProcess(
    DEFAULT_SHELL,
    undefined,
    parseProcessHandle(execution.handle)!.pid,
    watch,
  );
  process.bind(execution, stdin!);
  process.markParked();
  return process;
}
