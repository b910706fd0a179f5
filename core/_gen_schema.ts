/**
 * Regenerates `pipeline.schema.json` and `docs/pipeline-reference.md` from
 * the zod schema: `deno run --allow-write=. core/_gen_schema.ts` at the repo
 * root. `schema_test.ts` fails when the committed files are stale.
 *
 * @module
 */

import { formatDuration, MAX_DURATION_MS } from "./duration.ts";
import { DEFAULT_PIPELINE_LIMITS } from "./limits.ts";
import { pipelineJsonSchema } from "./schema.ts";

type JsonSchema = {
  type?: string | string[];
  description?: string;
  default?: unknown;
  properties?: Record<string, JsonSchema>;
  additionalProperties?: JsonSchema | boolean;
  propertyNames?: JsonSchema;
  required?: string[];
  items?: JsonSchema;
  anyOf?: JsonSchema[];
  oneOf?: JsonSchema[];
  enum?: unknown[];
  const?: unknown;
  pattern?: string;
  format?: string;
};

/** Path of the JSON Schema, relative to the repository root. */
export const SCHEMA_PATH = "pipeline.schema.json";
/** Path of the key reference, relative to the repository root. */
export const REFERENCE_PATH = "docs/pipeline-reference.md";

function typeOf(schema: JsonSchema): string {
  const alternatives = schema.anyOf ?? schema.oneOf;
  if (alternatives) return [...new Set(alternatives.map(typeOf))].join(" \\| ");
  if (schema.const !== undefined) return `\`${JSON.stringify(schema.const)}\``;
  if (schema.enum) return schema.enum.map((v) => `\`${JSON.stringify(v)}\``).join(" \\| ");
  if (schema.type === "array") {
    const item = schema.items ? typeOf(schema.items) : "any";
    return item.includes("\\|") ? `(${item})[]` : `${item}[]`;
  }
  if (schema.type === "object" && !schema.properties) {
    const value = typeof schema.additionalProperties === "object"
      ? typeOf(schema.additionalProperties)
      : "any";
    return `map → ${value}`;
  }
  if (schema.format === "uri") return "url";
  return Array.isArray(schema.type) ? schema.type.join(" \\| ") : schema.type ?? "any";
}

function objectsOf(schema: JsonSchema): JsonSchema[] {
  if (schema.properties) return [schema];
  return (schema.anyOf ?? schema.oneOf ?? []).flatMap(objectsOf);
}

function rows(schema: JsonSchema, prefix: string, out: string[][]): void {
  const required = new Set(schema.required ?? []);
  for (const [key, property] of Object.entries(schema.properties ?? {})) {
    const path = prefix ? `${prefix}.${key}` : key;
    const description = (property.description ?? "").replaceAll("|", "\\|").replaceAll("\n", " ");
    const fallback = property.default === undefined
      ? ""
      : `\`${JSON.stringify(property.default)}\``;
    out.push([
      `\`${path}\``,
      typeOf(property),
      required.has(key) ? "yes" : "",
      fallback,
      description,
    ]);
    for (const nested of objectsOf(property)) rows(nested, path, out);
    if (typeof property.additionalProperties === "object") {
      for (const values of objectsOf(property.additionalProperties)) {
        rows(values, `${path}.<name>`, out);
      }
    }
  }
}

/** How secrets are named and where their values come from, after the key table. */
const SECRETS_SECTION = [
  "## Secrets",
  "",
  "A pipeline never holds a secret's value. Under `secrets:` it maps the env var a step sees to the",
  "name of a secret the operator declared, and each step lists the env names it is given:",
  "",
  "```yaml",
  "secrets:",
  "  DB_PASSWORD: db-password # env name → the operator's secret name",
  "steps:",
  "  migrate:",
  "    run: ./migrate.sh # reads $DB_PASSWORD",
  "    secrets: [DB_PASSWORD]",
  "```",
  "",
  "The operator declares names, each backed by an env var or a file of the process that resolves it, in",
  "a secrets file (`runnel server --secrets FILE`, `runnel agent --secrets FILE`,",
  "`runnel run --secrets FILE`) or under `secrets:` in an agent's `--config` file:",
  "",
  "```yaml",
  "db-password: { env: DB_PASSWORD }",
  "deploy-key: { file: /etc/runnel/deploy-key } # a relative path is relative to this file",
  "```",
  "",
  "In a cluster a step gets the value from the agent that runs it when the agent's config declares the",
  "name, else from the server the agent is connected to. A server refuses, with the line and column, a",
  "submitted pipeline naming a secret that neither it nor a connected agent declares, and every",
  "`{ env: … }` or `{ file: … }` reference: a pipeline cannot read the server's environment or files.",
  "In local mode you are the operator: a pipeline may also read `{ env: VAR }` or `{ file: path }`",
  "itself. Values are masked as `***` in every log (each line of a multi-line secret and its base64",
  "too) and are never written to the state store, attempt records or bundles.",
  "",
];

/**
 * Generates the JSON Schema file and the Markdown key reference.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { generateSchemaFiles } from "./_gen_schema.ts";
 *
 * const { schemaJson, reference } = generateSchemaFiles();
 * assert.equal(JSON.parse(schemaJson).title, "runnel pipeline");
 * assert.match(reference, /\| `steps` /);
 * ```
 */
export function generateSchemaFiles(): { schemaJson: string; reference: string } {
  const schema = pipelineJsonSchema() as JsonSchema;
  const limits = DEFAULT_PIPELINE_LIMITS;
  const count = (n: number) => n.toLocaleString("en-US");
  const mib = limits.maxPlanBytes / 2 ** 20;
  const schemaJson = JSON.stringify(schema, null, 2) + "\n";
  const table: string[][] = [["key", "type", "required", "default", "description"]];
  rows(schema, "", table);
  // Padded the way `deno fmt` pads Markdown tables, so the file stays fmt-clean.
  const widths = table[0].map((_, c) => Math.max(...table.map((row) => row[c].length)));
  const line = (cells: string[]) =>
    `| ${cells.map((cell, c) => cell.padEnd(widths[c])).join(" | ")} |`;
  const tableLines = [
    line(table[0]),
    line(widths.map((w) => "-".repeat(w))),
    ...table.slice(1).map(line),
  ];
  const reference = [
    "# Pipeline file reference",
    "",
    "<!-- Generated by core/_gen_schema.ts from core/schema.ts; do not edit by hand. -->",
    "",
    "A pipeline is a YAML file. Unknown keys are rejected everywhere. Durations are written like",
    '`"500ms"`, `"2s"`, `"10m"`, `"1h30m"`, `"1d"`; memory like `"64Mi"`, `"1G"` or a byte count; CPU as',
    'a number or millicores (`"500m"`). Strings in a matrix step may use `${{ matrix.<key> }}`. Editors',
    "can validate the file with [`pipeline.schema.json`](../pipeline.schema.json).",
    "",
    // Wrapped as `deno fmt` wraps Markdown prose at the default limits.
    `Timeouts and delays are at most \`${
      formatDuration(MAX_DURATION_MS)
    }\`. A pipeline expands to at ` +
    `most ${count(limits.maxMatrixLegs)} legs per matrix, ${count(limits.maxStepInstances)}`,
    `step instances, ${
      count(limits.maxDependencies)
    } dependencies between instances and ${mib} MiB of step definitions written out`,
    "per leg; these are counted from the matrix sizes before anything expands, and whoever runs runnel",
    "may change them (`--limit NAME=N`, the `limits` option of `parsePipeline`).",
    "",
    ...tableLines,
    "",
    ...SECRETS_SECTION,
  ].join("\n");
  return { schemaJson, reference };
}

if (import.meta.main) {
  const { schemaJson, reference } = generateSchemaFiles();
  const root = new URL("../", import.meta.url);
  Deno.mkdirSync(new URL("docs/", root), { recursive: true });
  Deno.writeTextFileSync(new URL(SCHEMA_PATH, root), schemaJson);
  Deno.writeTextFileSync(new URL(REFERENCE_PATH, root), reference);
  console.log(`wrote ${SCHEMA_PATH} and ${REFERENCE_PATH}`);
}
