import assert from "node:assert/strict";
import { generateSchemaFiles, REFERENCE_PATH, SCHEMA_PATH } from "./_gen_schema.ts";
import { pipelineJsonSchema, PipelineSchema, STEP_KEYS } from "./schema.ts";

const root = new URL("../", import.meta.url);

Deno.test("committed JSON Schema and reference match the zod schema", () => {
  const { schemaJson, reference } = generateSchemaFiles();
  const hint = "run `deno run --allow-write=. core/_gen_schema.ts`";
  assert.equal(Deno.readTextFileSync(new URL(SCHEMA_PATH, root)), schemaJson, hint);
  assert.equal(Deno.readTextFileSync(new URL(REFERENCE_PATH, root)), reference, hint);
});

Deno.test("schema is strict and the JSON Schema forbids unknown keys", () => {
  assert.equal(PipelineSchema.safeParse({ name: "x", steps: { a: { run: "x" } } }).success, true);
  assert.equal(PipelineSchema.safeParse({ name: "x", steps: { a: { rn: "x" } } }).success, false);
  assert.equal(PipelineSchema.safeParse({ name: "x", steps: {} }).success, false);
  assert.equal(PipelineSchema.safeParse({ name: "a b", steps: { a: {} } }).success, false);
  const json = pipelineJsonSchema() as { additionalProperties?: boolean; required?: string[] };
  assert.equal(json.additionalProperties, false);
  assert.deepEqual(json.required, ["name", "steps"]);
  assert.ok(STEP_KEYS.includes("next_node") && STEP_KEYS.includes("continue-on-error"));
});
