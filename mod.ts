/**
 * runnel — a pipeline step runner with sandboxed, pluggable execution
 * backends, a replicated state store and content-addressed artifacts.
 *
 * Load, validate and plan a pipeline, then run it in local mode:
 *
 * @example Run a pipeline file
 * ```ts ignore
 * import { loadPipeline, runPipeline } from "./mod.ts";
 *
 * const plan = await loadPipeline("examples/energy/pipeline.yaml");
 * const summary = await runPipeline(plan, { onEvent: (e) => console.log(e.type) });
 * console.log(summary.status); // "succeeded"
 * ```
 *
 * @example Validate a pipeline held in memory
 * ```ts
 * import { formatDiagnostic, parsePipeline, PipelineError } from "./mod.ts";
 *
 * try {
 *   parsePipeline("name: demo\nsteps:\n  a: { backend: shell, run: echo hi, neds: [b] }\n", {
 *     file: "demo.yaml",
 *   });
 * } catch (error) {
 *   if (error instanceof PipelineError) {
 *     console.log(error.diagnostics.map(formatDiagnostic).join("\n"));
 *   }
 * }
 * ```
 *
 * @module
 */

// The pipeline language.
export { loadPipeline, parsePipeline } from "./core/load.ts";
export type { Diagnostic } from "./core/errors.ts";
export { formatDiagnostic, PipelineError } from "./core/errors.ts";
export { parseByteSize, parseDuration } from "./core/duration.ts";
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
export { Masker, resolveSecrets } from "./core/secrets.ts";

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
} from "./agent/config.ts";

// Local mode.
export {
  cancelRun,
  collectGarbage,
  DEFAULT_STATE_DIR,
  deliverWebhook,
  getRunRecord,
  isTerminalRun,
  listRuns,
  LocalRunError,
  logPath,
  openLocalState,
  readStepStates,
  resumeRun,
  runPipeline,
  statePaths,
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
