/**
 * Test helpers for the gRPC glue: a throw-away certificate authority made
 * with `openssl`, and whether `openssl` is here at all.
 *
 * @module
 */

import type { AssignmentSpec } from "./messages.ts";

/** PEM files of a test CA, a server certificate for 127.0.0.1/localhost, and a client one. */
export interface TestCertificates {
  dir: string;
  ca: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
  /** A second CA that signed nothing the server uses. */
  otherCa: string;
}

/** Why `openssl` cannot be used here, or undefined when it can. */
export async function opensslMissing(): Promise<string | undefined> {
  try {
    const { success } = await new Deno.Command("openssl", {
      args: ["version"],
      stdout: "null",
      stderr: "null",
    }).output();
    return success ? undefined : "openssl version failed";
  } catch (error) {
    return `openssl cannot be run: ${(error as Error).message}`;
  }
}

/** Makes a CA, a server certificate (IP 127.0.0.1, DNS localhost) and a client certificate in `dir`. */
export async function makeTestCertificates(dir: string): Promise<TestCertificates> {
  const path = (name: string) => `${dir}/${name}`;
  await openssl(
    "req",
    ["-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=runnel test CA"],
    ["-keyout", path("ca.key"), "-out", path("ca.pem")],
  );
  await openssl(
    "req",
    ["-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=other CA"],
    ["-keyout", path("other-ca.key"), "-out", path("other-ca.pem")],
  );
  for (
    const [name, cn, extension] of [
      ["server", "localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
      ["client", "runnel agent", "extendedKeyUsage=clientAuth"],
    ]
  ) {
    await openssl(
      "req",
      ["-newkey", "rsa:2048", "-nodes", "-subj", `/CN=${cn}`],
      ["-keyout", path(`${name}.key`), "-out", path(`${name}.csr`)],
    );
    await Deno.writeTextFile(path(`${name}.ext`), `${extension}\n`);
    await openssl(
      "x509",
      ["-req", "-days", "1", "-CA", path("ca.pem"), "-CAkey", path("ca.key"), "-CAcreateserial"],
      ["-in", path(`${name}.csr`), "-out", path(`${name}.pem`), "-extfile", path(`${name}.ext`)],
    );
  }
  return {
    dir,
    ca: path("ca.pem"),
    serverCert: path("server.pem"),
    serverKey: path("server.key"),
    clientCert: path("client.pem"),
    clientKey: path("client.key"),
    otherCa: path("other-ca.pem"),
  };
}

async function openssl(command: string, options: string[], files: string[]): Promise<void> {
  const output = await new Deno.Command("openssl", {
    args: [command, ...options, ...files],
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!output.success) {
    throw new Error(
      `Expected openssl ${command} to succeed: ${new TextDecoder().decode(output.stderr)}`,
    );
  }
}

let assignedRuns = 0;

/**
 * An assignment spec of a fresh run (`run1`, `run2`, …), for tests that
 * hand an agent assignments as a server would.
 */
export function assignmentSpec(
  stepId: string,
  config: Record<string, unknown>,
  extra: Partial<AssignmentSpec> = {},
): AssignmentSpec {
  const runId = `run${++assignedRuns}`;
  return {
    runId,
    stepId,
    attemptId: `${runId}/${stepId}/1`,
    attempt: 1,
    config,
    inputs: {},
    outputs: [],
    env: {},
    ...extra,
  };
}
