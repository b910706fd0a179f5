/**
 * What a pipeline may ask of the host that runs its steps: the attempt
 * policy, checked by the attempt lifecycle before anything of an attempt
 * starts (after Kubernetes' admission: the pipeline asks, the host's
 * operator decides). A step that asks more is refused as a `permission`
 * failure naming the rule and how an operator would allow it:
 *
 * ```text
 * agent policy: deno read "/etc" is outside the pipeline directory; allow it with policy.deno.read in agent.yaml
 * ```
 *
 * Two defaults, one per driver:
 *
 * - **agent** ({@link agentPolicy}): whoever may submit a run is not the
 *   host's operator. `deno` and `shell` (which the agent still runs only
 *   with `--allow-shell`) and the plugins its config names; `docker` only
 *   when listed. A pipeline directory is one the agent was sent (a bundle
 *   it unpacked) unless `pipeline-dirs` lists others. A deno step gets
 *   paths of its pipeline directory only, no host, no env var of the
 *   agent. A docker step gets no network, does not run as root (nor do its
 *   services), and builds from its pipeline directory only.
 * - **local** ({@link localPolicy}): the user is the operator. Every
 *   backend; deno steps reach the hosts and env vars they declare; docker
 *   steps may have a network, run as root and build from anywhere. A deno
 *   path outside the pipeline directory (absolute, or through `..`) is
 *   still refused unless the user names it in the config's `policy.deno`.
 *
 * Whatever the policy, a deno step's module lies in its pipeline directory,
 * and no grant may cover the runner's state directory (attempt records,
 * artifacts, the state db) or its scratch root (other attempts' files).
 *
 * @module
 */

import { dirname, isAbsolute, resolve } from "node:path";

/** What a pipeline may ask of this host. */
export interface AttemptPolicy {
  /** How refusals name it: `agent policy`, `local policy`. */
  name: string;
  /** Where an operator changes it, for refusals: `agent.yaml`, `a --config file`. */
  configHint: string;
  /** Backends steps may use; undefined: every backend the runner has. */
  backends?: string[];
  /**
   * Where a pipeline directory may be besides the runner's state directory
   * (where an agent unpacks the bundles it is sent and keeps its work
   * directories); undefined: anywhere (local mode, where the user names
   * it). A deno step is confined to its pipeline directory, so a plan that
   * names `/` as one must not be believed. Not checked for shell steps
   * (trusted) and docker steps without a build (they use none).
   */
  pipelineDirs?: string[];
  /** What a `deno` step may be granted besides its pipeline directory. */
  deno: {
    /** Host paths (absolute) outside the pipeline directory it may read. */
    read: string[];
    /** Host paths (absolute) outside the pipeline directory it may write. */
    write: string[];
    /** Hosts it may reach (`host` allows every port, `host:port` one); `*`: any. */
    net: string[];
    /** The runner's env vars it may read; `*`: any. */
    env: string[];
  };
  /** What a `docker` step may ask for. */
  docker: {
    /** `network: true`. */
    network: boolean;
    /** Running as root: no `user`, or `user: root` / `0`. */
    root: boolean;
    /** Host directories outside the pipeline directory a build context may be; `/`: any. */
    buildContexts: string[];
  };
  /** What an `ssh` step may name. */
  ssh: {
    /**
     * A host (and its key files) the step names itself, rather than an
     * alias of the agent config's `ssh.hosts`.
     */
    inlineHosts: boolean;
    /** The aliases of the agent config's `ssh.hosts`. */
    hosts: string[];
  };
}

/** What an operator's config may change of a policy (`policy:` in agent.yaml). */
export interface PolicyOverrides {
  backends?: string[];
  pipelineDirs?: string[];
  deno?: Partial<AttemptPolicy["deno"]>;
  docker?: Partial<AttemptPolicy["docker"]>;
  ssh?: Partial<AttemptPolicy["ssh"]>;
}

/** Options of {@link agentPolicy} and {@link localPolicy}. */
export interface PolicyOptions {
  /** The config file the overrides came from, named in refusals. */
  configFile?: string;
  /** Third-party backends the agent loads: allowed unless `backends` says otherwise. */
  plugins?: string[];
}

/** Backends an agent allows unless its config lists others: docker must be asked for. */
export const AGENT_DEFAULT_BACKENDS: readonly string[] = ["deno", "shell"];

/**
 * The policy of a cluster agent: its defaults (see the module docs) with
 * the config's `policy:` on top.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { agentPolicy } from "./policy.ts";
 *
 * const policy = agentPolicy({ backends: ["deno", "docker"], deno: { net: ["api.example.com"] } });
 * assert.deepEqual(policy.backends, ["deno", "docker"]);
 * assert.deepEqual(policy.deno, { read: [], write: [], net: ["api.example.com"], env: [] });
 * assert.equal(policy.docker.root, false);
 * ```
 */
export function agentPolicy(
  overrides: PolicyOverrides = {},
  options: PolicyOptions = {},
): AttemptPolicy {
  return withOverrides({
    name: "agent policy",
    configHint: options.configFile ?? "agent.yaml",
    backends: [...AGENT_DEFAULT_BACKENDS, ...(options.plugins ?? [])],
    pipelineDirs: [],
    deno: { read: [], write: [], net: [], env: [] },
    docker: { network: false, root: false, buildContexts: [] },
    ssh: { inlineHosts: false, hosts: [] },
  }, overrides);
}

/** The policy of local mode: its defaults (see the module docs) with the config's on top. */
export function localPolicy(
  overrides: PolicyOverrides = {},
  options: PolicyOptions = {},
): AttemptPolicy {
  return withOverrides({
    name: "local policy",
    configHint: options.configFile ?? "a --config file",
    deno: { read: [], write: [], net: ["*"], env: ["*"] },
    docker: { network: true, root: true, buildContexts: ["/"] },
    ssh: { inlineHosts: true, hosts: [] },
  }, overrides);
}

function withOverrides(base: AttemptPolicy, overrides: PolicyOverrides): AttemptPolicy {
  return {
    ...base,
    ...(overrides.backends ? { backends: [...overrides.backends] } : {}),
    ...(overrides.pipelineDirs ? { pipelineDirs: [...overrides.pipelineDirs] } : {}),
    deno: { ...base.deno, ...overrides.deno },
    docker: { ...base.docker, ...overrides.docker },
    ssh: { ...base.ssh, ...overrides.ssh },
  };
}

/** What {@link checkAttempt} looks at. */
export interface PolicyAttempt {
  backend: string;
  config: Record<string, unknown>;
  /** The pipeline directory the attempt runs in (absolute). */
  baseDir: string;
  /** The runner's scratch root. */
  scratchRoot: string;
  /** The runner's state directory (attempt records, artifacts, the state db). */
  stateDir: string;
}

/** A step asked more than the policy allows; the attempt fails as `permission`, never retried. */
export class PolicyError extends Error {
  /** Stable error code. */
  readonly code = "policy_refused";
  /** Not retried: the same step would ask again. */
  readonly errorClass = "permission";
  /** Each rule the step broke, as a sentence. */
  readonly problems: string[];

  /** Builds the error from the policy's name and the problems. */
  constructor(policyName: string, problems: string[]) {
    super(`${policyName}: ${problems.join("; ")}`);
    this.name = "PolicyError";
    this.problems = problems;
  }
}

/** Why the policy refuses a backend outright, or undefined when it allows it. */
export function backendRefusal(policy: AttemptPolicy, backend: string): string | undefined {
  if (!policy.backends || policy.backends.includes(backend)) return undefined;
  return `${policy.name}: ${backend} steps are off here; allow them with policy.backends in ${policy.configHint}`;
}

/**
 * Checks what an attempt asks against the policy; throws a
 * {@link PolicyError} naming every rule it breaks.
 */
export async function checkAttempt(policy: AttemptPolicy, attempt: PolicyAttempt): Promise<void> {
  const refused = backendRefusal(policy, attempt.backend);
  if (refused) throw new PolicyError(policy.name, [refused.slice(policy.name.length + 2)]);
  const unheld = await pipelineDirProblem(policy, attempt);
  if (unheld) throw new PolicyError(policy.name, [unheld]);
  const problems = attempt.backend === "deno"
    ? await denoProblems(policy, attempt)
    : attempt.backend === "docker"
    ? await dockerProblems(policy, attempt)
    : attempt.backend === "ssh"
    ? sshProblems(policy, attempt)
    : [];
  if (problems.length > 0) throw new PolicyError(policy.name, problems);
}

/** Why the attempt's pipeline directory cannot be believed, if it cannot. */
async function pipelineDirProblem(
  policy: AttemptPolicy,
  attempt: PolicyAttempt,
): Promise<string | undefined> {
  // Shell steps are trusted; an ssh step runs nothing of its pipeline directory here.
  if (!policy.pipelineDirs || attempt.backend === "shell" || attempt.backend === "ssh") {
    return undefined;
  }
  if (attempt.backend === "docker" && !(attempt.config as { build?: unknown }).build) {
    return undefined;
  }
  const real = await realPath(attempt.baseDir);
  for (const dir of [attempt.stateDir, ...policy.pipelineDirs.filter(isAbsolute)]) {
    for (const root of new Set([dir, await realPath(dir)])) {
      if (isInside(attempt.baseDir, root) && isInside(real, root)) return undefined;
    }
  }
  return `the pipeline directory "${attempt.baseDir}" is not one this host was sent; allow it ` +
    `with policy.pipeline-dirs in ${policy.configHint}`;
}

async function denoProblems(policy: AttemptPolicy, attempt: PolicyAttempt): Promise<string[]> {
  const config = attempt.config as {
    module?: unknown;
    permissions?: { read?: unknown; write?: unknown; net?: unknown; env?: unknown };
  };
  const problems: string[] = [];
  const places = await placesOf(attempt);
  if (typeof config.module === "string") {
    const where = await placeOf(resolve(attempt.baseDir, config.module), places, []);
    if (where !== "pipeline") {
      problems.push(
        `deno module "${config.module}" ${describePlace(where)}; a step module must be a file ` +
          "of its pipeline directory",
      );
    }
  }
  const permissions = config.permissions ?? {};
  for (const kind of ["read", "write"] as const) {
    for (const path of strings(permissions[kind])) {
      const where = await placeOf(resolve(attempt.baseDir, path), places, policy.deno[kind]);
      if (kind === "write" && where === "pipeline" && isSharedBundle(policy, attempt)) {
        // An agent unpacks a pipeline once per digest and every run of it
        // runs there: a step writing into it would change what later runs read.
        problems.push(
          `deno write "${path}" is inside the pipeline copy that every run of this pipeline ` +
            "shares on this agent; write the step's outputs instead",
        );
        continue;
      }
      if (where === "pipeline" || where === "allowed") continue;
      problems.push(
        where === "outside"
          ? `deno ${kind} "${path}" is outside the pipeline directory; allow it with ` +
            `policy.deno.${kind} in ${policy.configHint}`
          : `deno ${kind} "${path}" ${describePlace(where)}; grant a path that does not cover it`,
      );
    }
  }
  for (const host of strings(permissions.net)) {
    if (!hostAllowed(host, policy.deno.net)) {
      problems.push(
        `deno net "${host}" is not an allowed host; allow it with policy.deno.net in ` +
          policy.configHint,
      );
    }
  }
  for (const name of strings(permissions.env)) {
    if (!policy.deno.env.includes("*") && !policy.deno.env.includes(name)) {
      problems.push(
        `deno env "${name}" is not an env var this host passes on; allow it with ` +
          `policy.deno.env in ${policy.configHint}`,
      );
    }
  }
  return problems;
}

/** Whether the attempt runs in a pipeline copy an agent keeps for every run of it (its bundles). */
function isSharedBundle(policy: AttemptPolicy, attempt: PolicyAttempt): boolean {
  return policy.pipelineDirs !== undefined &&
    isInside(attempt.baseDir, `${attempt.stateDir}/bundles`);
}

/**
 * An ssh step names an alias of the agent config, unless inline hosts are
 * allowed: a pipeline must not point the operator's keys at a host of its
 * choosing, nor read a key file of the agent by naming its path.
 */
function sshProblems(policy: AttemptPolicy, attempt: PolicyAttempt): string[] {
  if (policy.ssh.inlineHosts) return [];
  const config = attempt.config as { host?: unknown; with?: { host?: unknown } };
  const host = config.host ?? config.with?.host;
  if (typeof host === "string" && policy.ssh.hosts.includes(host)) return [];
  const known = policy.ssh.hosts.length > 0
    ? `its ssh hosts are ${policy.ssh.hosts.map((name) => `"${name}"`).join(", ")}`
    : "it has none";
  return [
    `ssh step names host "${String(host)}", which is not one of this host's ssh.hosts ` +
    `(${known}); add it to ssh.hosts, or allow inline hosts with policy.ssh.inline-hosts, ` +
    `in ${policy.configHint}`,
  ];
}

async function dockerProblems(policy: AttemptPolicy, attempt: PolicyAttempt): Promise<string[]> {
  const config = attempt.config as {
    user?: unknown;
    network?: unknown;
    services?: unknown;
    build?: { context?: unknown; copy?: unknown; dependencies?: unknown };
  };
  const problems: string[] = [];
  if (config.network === true && !policy.docker.network) {
    problems.push(
      `docker network is off here; allow it with policy.docker.network in ${policy.configHint}`,
    );
  }
  const user = typeof config.user === "string" ? config.user : undefined;
  if (!policy.docker.root && (user === undefined || /^(root|0)(:|$)/.test(user))) {
    problems.push(
      `docker step would run as root (${
        user === undefined ? 'no "user"' : `user "${user}"`
      }); set a user such as "65534", or allow it with policy.docker.root in ${policy.configHint}`,
    );
  }
  // Its services are containers of the same host: the same rule. (Their
  // network is the step's: internal unless the step's network is allowed.)
  const services = Array.isArray(config.services) ? config.services : [];
  for (const service of services as Array<{ name?: unknown; user?: unknown }>) {
    const serviceUser = typeof service?.user === "string" ? service.user : undefined;
    if (policy.docker.root || (serviceUser !== undefined && !/^(root|0)(:|$)/.test(serviceUser))) {
      continue;
    }
    problems.push(
      `docker service "${String(service?.name)}" would run as root (${
        serviceUser === undefined ? 'no "user"' : `user "${serviceUser}"`
      }); set its user such as "65534", or allow it with policy.docker.root in ` +
        policy.configHint,
    );
  }
  if (config.build) {
    const places = await placesOf(attempt);
    const context = typeof config.build.context === "string" ? config.build.context : ".";
    const contextDir = resolve(attempt.baseDir, context);
    const where = await placeOf(contextDir, places, policy.docker.buildContexts, false);
    if (where === "outside") {
      problems.push(
        `docker build context "${context}" is outside the pipeline directory; allow it with ` +
          `policy.docker.build-contexts in ${policy.configHint}`,
      );
    } else {
      // What the build copies must not come from the runner's own files.
      const entries = [...strings(config.build.copy), ...strings([config.build.dependencies])];
      for (const entry of entries) {
        const entryWhere = await placeOf(resolve(contextDir, entry), places, ["/"]);
        if (entryWhere === "state" || entryWhere === "scratch") {
          problems.push(`docker build copies "${entry}", which ${describePlace(entryWhere)}`);
        }
      }
      if (where === "state" || where === "scratch") {
        problems.push(`docker build context "${context}" ${describePlace(where)}`);
      }
    }
  }
  return problems;
}

/** The directories a path is judged against, as given and with links resolved. */
interface Places {
  baseDirs: string[];
  stateDirs: string[];
  scratchRoots: string[];
}

async function placesOf(attempt: PolicyAttempt): Promise<Places> {
  const both = async (path: string) => [...new Set([path, await realPath(path)])];
  return {
    baseDirs: await both(attempt.baseDir),
    stateDirs: await both(attempt.stateDir),
    scratchRoots: await both(attempt.scratchRoot),
  };
}

/** Where a path lies: in the pipeline directory, an allowed host path, the runner's own, outside. */
type Place = "pipeline" | "allowed" | "state" | "scratch" | "outside";

/**
 * Where `path` (absolute, normalised) lies. In the pipeline directory it is
 * the pipeline's, unless it overlaps (lies in, or contains) the state
 * directory or scratch root where they lie inside it (local mode's
 * `.runnel`); an agent keeps its pipeline copies inside its state
 * directory, which is therefore the runner's only outside them. A build
 * context is not `covering`: only the entries named are read from it.
 * Judged as written and again with links resolved: the worse answer wins.
 */
async function placeOf(
  path: string,
  places: Places,
  allowed: string[],
  covering = true,
): Promise<Place> {
  const judge = (candidate: string): Place => {
    const overlaps = (dir: string) =>
      isInside(candidate, dir) || (covering && isInside(dir, candidate));
    const base = places.baseDirs.find((dir) => isInside(candidate, dir));
    const within = (dirs: string[]) =>
      dirs.some((dir) => (!base || (dir !== base && isInside(dir, base))) && overlaps(dir));
    if (within(places.stateDirs)) return "state";
    if (within(places.scratchRoots)) return "scratch";
    if (base) return "pipeline";
    if (allowed.some((root) => isAbsolute(root) && isInside(candidate, resolve(root)))) {
      return "allowed";
    }
    return "outside";
  };
  const written = judge(path);
  if (written !== "pipeline" && written !== "allowed") return written;
  const real = judge(await realPath(path));
  return real === "pipeline" || real === "allowed" ? written : real;
}

function describePlace(place: Place): string {
  switch (place) {
    case "state":
      return "reaches into the runner's state directory";
    case "scratch":
      return "reaches into the runner's scratch directory";
    default:
      return "is outside the pipeline directory";
  }
}

/** A path with its links resolved; the path itself (or its parent's) when it does not exist. */
async function realPath(path: string): Promise<string> {
  try {
    return await Deno.realPath(path);
  } catch {
    const parent = dirname(path);
    if (parent === path) return path;
    const real = await realPath(parent);
    return real === parent ? path : `${real}/${path.slice(parent.length + 1)}`;
  }
}

/** Whether a requested host (`host` or `host:port`) is within an allow-list. */
function hostAllowed(host: string, allowed: string[]): boolean {
  if (allowed.includes("*") || allowed.includes(host)) return true;
  const name = hostName(host);
  // `host` allows every port; a request for every port needs exactly that.
  return name !== host && allowed.includes(name);
}

/** `example.com` of `example.com:443`, `[::1]` of `[::1]:80`. */
function hostName(host: string): string {
  const port = /:(\d+)$/.exec(host);
  if (!port) return host;
  const name = host.slice(0, port.index);
  // A bare IPv6 address has colons of its own.
  return name.includes(":") && !name.startsWith("[") ? host : name;
}

function strings(value: unknown): string[] {
  return Array.isArray(value)
    ? value.filter((item): item is string => typeof item === "string")
    : [];
}

function isInside(path: string, dir: string): boolean {
  return path === dir || path.startsWith(dir.endsWith("/") ? dir : `${dir}/`);
}
