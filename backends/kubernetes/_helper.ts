/**
 * The in-pod helper of the `kubernetes` backend, baked into
 * `runnel/kube-helper:local` (`deno task images`) and run with Deno's
 * sandbox (net to the object store only, files below `/runnel` only):
 *
 * - `fetch` (the init container): downloads the inputs into `/runnel/in`
 *   from their presigned URLs, makes `/runnel/out`, and copies a static
 *   busybox to `/runnel/bin` for the step's wrapper.
 * - `upload` (beside the step): waits for the wrapper's `/runnel/exit`,
 *   and after an exit 0 uploads each declared output that is a regular
 *   file (never a link) with its SHA-256 to presigned URLs.
 *
 * The plan (with the URLs) comes in `RUNNEL_ARTIFACTS` from the attempt's
 * Secret. This file imports nothing: it runs offline.
 *
 * @module
 */

interface Plan {
  inputs: Array<{ path: string; url: string }>;
  outputs: Array<{ name: string; url: string; digestUrl: string }>;
}

const ROOT = "/runnel";
/** How often `upload` looks for the exit file (an inotify watch is not portable across volumes). */
const EXIT_POLL_MS = 50;
/** How often a transfer is tried before the helper gives up. */
const TRANSFER_ATTEMPTS = 4;

async function transfer(url: string, init: RequestInit): Promise<Response> {
  let lastError: unknown;
  for (let attempt = 0; attempt < TRANSFER_ATTEMPTS; attempt++) {
    try {
      const response = await fetch(url, init);
      if (response.ok) return response;
      lastError = new Error(`HTTP ${response.status}: ${(await response.text()).slice(0, 200)}`);
      if (response.status < 500) break;
    } catch (error) {
      lastError = error;
    }
    await new Promise((resolve) => setTimeout(resolve, 200 * 2 ** attempt));
  }
  throw lastError;
}

async function fetchInputs(plan: Plan): Promise<void> {
  await Deno.mkdir(`${ROOT}/in`, { recursive: true });
  await Deno.mkdir(`${ROOT}/out`, { recursive: true });
  await Deno.mkdir(`${ROOT}/bin`, { recursive: true });
  // The step may run as any user: it must be able to write its outputs.
  await Deno.chmod(`${ROOT}/out`, 0o777);
  await Deno.copyFile("/bin/busybox", `${ROOT}/bin/busybox`);
  await Deno.chmod(`${ROOT}/bin/busybox`, 0o755);
  await Promise.all(plan.inputs.map(async ({ path, url }) => {
    if (path.split("/").includes("..") || path.startsWith("/")) {
      throw new Error(`refusing input path "${path}"`);
    }
    const target = `${ROOT}/${path}`;
    await Deno.mkdir(target.slice(0, target.lastIndexOf("/")), { recursive: true });
    const response = await transfer(url, {});
    await Deno.writeFile(target, new Uint8Array(await response.arrayBuffer()), { mode: 0o644 });
  }));
  console.log(`runnel: fetched ${plan.inputs.length} input file(s)`);
}

async function uploadOutputs(plan: Plan): Promise<void> {
  let code: string | undefined;
  while (code === undefined) {
    try {
      code = (await Deno.readTextFile(`${ROOT}/exit`)).trim();
    } catch {
      await new Promise((resolve) => setTimeout(resolve, EXIT_POLL_MS));
    }
  }
  if (code !== "0") return;
  for (const { name, url, digestUrl } of plan.outputs) {
    if (!/^[A-Za-z0-9_][A-Za-z0-9_.-]*$/.test(name)) continue;
    const path = `${ROOT}/out/${name}`;
    let info: Deno.FileInfo;
    try {
      info = await Deno.lstat(path);
    } catch {
      continue;
    }
    if (!info.isFile) continue;
    const bytes = await Deno.readFile(path);
    const digest = Array.from(
      new Uint8Array(await crypto.subtle.digest("SHA-256", bytes)),
      (byte) => byte.toString(16).padStart(2, "0"),
    ).join("");
    await (await transfer(url, { method: "PUT", body: bytes })).body?.cancel();
    await (await transfer(digestUrl, { method: "PUT", body: digest })).body?.cancel();
  }
  console.log(`runnel: uploaded the outputs`);
}

if (import.meta.main) {
  const plan = JSON.parse(Deno.env.get("RUNNEL_ARTIFACTS") ?? "{}") as Plan;
  plan.inputs ??= [];
  plan.outputs ??= [];
  try {
    if (Deno.args[0] === "fetch") await fetchInputs(plan);
    else if (Deno.args[0] === "upload") await uploadOutputs(plan);
    else throw new Error(`unknown mode "${Deno.args[0]}"`);
  } catch (error) {
    console.error(`runnel helper: ${(error as Error).message}`);
    Deno.exit(1);
  }
}
