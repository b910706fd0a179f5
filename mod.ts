/**
 * runnel — a pipeline step runner with sandboxed, pluggable execution
 * backends, a replicated state store and content-addressed artifacts.
 *
 * Load, validate and plan a pipeline — from a YAML file or defined in
 * TypeScript — then run it in local mode:
 *
 * @example Define a pipeline in code and run it
 * ```ts
 * import assert from "node:assert/strict";
 * import { definePipeline, runPipeline } from "./mod.ts";
 *
 * const plan = definePipeline({
 *   name: "hello",
 *   steps: {
 *     greet: { run: 'echo hello > "$RUNNEL_OUTPUT_GREETING_TXT"', outputs: ["greeting.txt"] },
 *     shout: {
 *       run: 'tr a-z A-Z < "$RUNNEL_INPUT_GREETING"',
 *       inputs: { greeting: "greet/greeting.txt" },
 *     },
 *   },
 * });
 * const stateDir = await Deno.makeTempDir();
 * const summary = await runPipeline(plan, { stateDir });
 * assert.equal(summary.status, "succeeded");
 * assert.equal(summary.steps.greet.outputs?.["greeting.txt"].size, "hello\n".length);
 * await Deno.remove(stateDir, { recursive: true });
 * ```
 *
 * @example Load a pipeline file
 * ```ts
 * import assert from "node:assert/strict";
 * import { fileURLToPath } from "node:url";
 * import { loadPipeline } from "./mod.ts";
 *
 * const file = fileURLToPath(new URL("./examples/energy/pipeline.yaml", import.meta.url));
 * const plan = await loadPipeline(file);
 * assert.deepEqual(plan.order, ["generate", "analyze", "report"]);
 * assert.equal(plan.steps.analyze.backend, "deno");
 * ```
 *
 * @example Validate a pipeline held in memory
 * ```ts
 * import assert from "node:assert/strict";
 * import { formatDiagnostic, parsePipeline, PipelineError } from "./mod.ts";
 *
 * const source = "name: demo\nsteps:\n  a: { backend: shell, run: echo hi, neds: [b] }\n";
 * assert.throws(() => parsePipeline(source, { file: "demo.yaml" }), (error: unknown) => {
 *   assert.ok(error instanceof PipelineError);
 *   assert.deepEqual(error.diagnostics.map(formatDiagnostic), [
 *     'demo.yaml:3:38: unknown key "neds" in step "a" — did you mean "needs"?',
 *   ]);
 *   return true;
 * });
 * ```
 *
 * @module
 */

// The pipeline language.
export { loadPipeline, parsePipeline } from "./core/load.ts";
export { definePipeline } from "./core/define.ts";
export type { DefineOptions } from "./core/define.ts";
export type { Diagnostic } from "./core/errors.ts";
export { formatDiagnostic, PipelineError } from "./core/errors.ts";
export { parseByteSize, parseDuration } from "./core/duration.ts";
export {
  DEFAULT_PIPELINE_LIMITS,
  parseLimit,
  type PipelineLimits,
  pipelineLimits,
} from "./core/limits.ts";
export { pipelineJsonSchema, PipelineSchema } from "./core/schema.ts";
export type { PipelineFile, StepFile } from "./core/schema.ts";
export { renderPlanText } from "./core/plan.ts";
export { renderMermaid } from "./core/mermaid.ts";
export { evaluateCondition, parseCondition } from "./core/expr.ts";
export type { ConditionContext } from "./core/expr.ts";

// The run engine and its model.
export { RunEngine } from "./core/engine.ts";
export type { EngineStepResult } from "./core/engine.ts";
export * from "./core/model.ts";

// State and artifacts.
export type {
  Compare,
  KeyValue,
  Lease,
  Store,
  TxnOp,
  TxnResult,
  WatchEvent,
} from "./consensus/store.ts";
export { openEmbeddedStore, openMemoryStore } from "./consensus/embedded.ts";
export type { ArtifactRecord, ArtifactStore } from "./core/artifacts/store.ts";
export { openLocalArtifactStore } from "./core/artifacts/local.ts";
export type { S3ArtifactStoreOptions } from "./core/artifacts/s3.ts";
export { openS3ArtifactStore, S3BucketMissingError, S3ConfigError } from "./core/artifacts/s3.ts";
export {
  loadSecretsFile,
  Masker,
  resolveSecrets,
  SecretNotFoundError,
  SecretsFileError,
  SecretStore,
} from "./core/secrets.ts";
export type { SecretPolicy, SecretReaders, SecretSource } from "./core/secrets.ts";

// Backends.
export type {
  AttemptSpec,
  BackendCapabilities,
  BackendManifest,
  ClassifyExitOptions,
  Execution,
  ExecutionBackend,
  ExecutionState,
  ExitStatus,
  Fingerprint,
  HostContext,
  LogChunk,
  RecoveredAttempt,
  RecoverOptions,
} from "./backends/backend.ts";
export { classifyExit } from "./backends/backend.ts";
export {
  builtinPlugins,
  pluginFromLocation,
  PluginHostPool,
  type PluginHostPoolOptions,
  type PluginSource,
  type PoolMetrics,
  validateStepConfigs,
} from "./backends/mod.ts";
export type { StepContext } from "./backends/deno/context.ts";
export { BusinessError } from "./backends/deno/context.ts";

// Agent config.
export {
  type AgentConfig,
  AgentConfigError,
  AgentConfigSchema,
  type HostTuning,
  loadAgentConfig,
  type LoadAgentConfigOptions,
  PolicySchema,
} from "./agent/config.ts";
export {
  agentPolicy,
  type AttemptPolicy,
  localPolicy,
  PolicyError,
  type PolicyOptions,
  type PolicyOverrides,
} from "./agent/attempt/policy.ts";

// Local mode.
export {
  approveStep,
  cancelRun,
  collectGarbage,
  DEFAULT_STATE_DIR,
  defaultConcurrency,
  deliverWebhook,
  getRunRecord,
  listRuns,
  LocalRunError,
  logPath,
  openLocalState,
  type PipelineStorage,
  readStepStates,
  rerunRun,
  resumeRun,
  runPipeline,
  statePaths,
  storageByPipeline,
  storageMetrics,
  waitForRunEnd,
} from "./agent/local/mod.ts";
export type {
  GcResult,
  LocalRunOptions,
  LocalState,
  RunEvent,
  RunRecord,
  RunSummary,
  StatePaths,
} from "./agent/local/mod.ts";
export { createProgress } from "./agent/local/progress.ts";
export type { Progress, ProgressOptions } from "./agent/local/progress.ts";

// Traces (OpenTelemetry, OTLP/HTTP).
export {
  formatTraceparent,
  openTracer,
  OtlpEndpointError,
  otlpTracesUrl,
  parseTraceparent,
  TRACEPARENT_ENV,
} from "./agent/trace/mod.ts";
export type {
  AttributeValue,
  SpanData,
  TraceParent,
  Tracer,
  TracerOptions,
  TracerStats,
} from "./agent/trace/mod.ts";
