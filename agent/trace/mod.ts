/**
 * OpenTelemetry traces of runs: one trace per run, a span per step attempt
 * with its queue wait, input fetch, execution and output upload, exported
 * over OTLP/HTTP (JSON) to the collector an operator names
 * (`--otlp-endpoint URL`, or `OTEL_EXPORTER_OTLP_ENDPOINT`). The context
 * reaches agents in their assignments and each step as `TRACEPARENT`.
 *
 * @module
 */

export * from "./context.ts";
export * from "./exporter.ts";
export * from "./run_spans.ts";
