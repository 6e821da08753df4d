//! Logs and, optionally, OpenTelemetry traces.
//!
//! Logs go to stderr, filtered by `SWITCHYARD_LOG` (default `info`): human-readable text,
//! coloured only when stderr is a terminal (a file or a pipe gets no ANSI escapes), or one
//! JSON object per line with `--log-format json` (for log shippers). With an OTLP endpoint
//! (`--otlp-endpoint URL` or `OTEL_EXPORTER_OTLP_ENDPOINT`; off by default) the coordinator's
//! spans are exported over OTLP/HTTP (protobuf, `URL/v1/traces`) by a batching background
//! thread, whatever the log filter:
//! - `generate`: one per request (request id, prompt tokens); the child of the caller's span
//!   when the request carries a W3C `traceparent` (gRPC metadata or HTTP header);
//! - `step`: one per engine step (step number, decodes, prefill tokens, rows), with a link to
//!   the `generate` span of every request that had tokens in it.
//!
//! Invariant: exporting never blocks serving; spans queue in memory (bounded, dropped when
//! full) and a collector that is down only costs the failed exports.

use anyhow::Result;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Keeps the exporter alive; dropping it flushes the spans still queued.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`, `span`s).
    Json,
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Installs the global subscriber: logs, plus trace export to `otlp` when given.
pub fn init(otlp: Option<&str>, format: LogFormat) -> Result<Telemetry> {
    use std::io::IsTerminal;
    let filter = || EnvFilter::try_from_env("SWITCHYARD_LOG").unwrap_or_else(|_| "info".into());
    let logs: Box<dyn Layer<_> + Send + Sync> = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_current_span(true)
            .with_filter(filter())
            .boxed(),
    };
    let (traces, provider) = match otlp {
        None => (None, None),
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
                .build()?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name("switchyard")
                        .build(),
                )
                .build();
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("switchyard"))
                .with_filter(
                    Targets::new().with_target("switchyard_coordinator", tracing::Level::INFO),
                );
            opentelemetry::global::set_text_map_propagator(
                opentelemetry_sdk::propagation::TraceContextPropagator::new(),
            );
            (Some(layer), Some(provider))
        }
    };
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()?;
    if format == LogFormat::Json {
        // A panic is a log line like any other (the default hook writes plain text).
        std::panic::set_hook(Box::new(|info| {
            let thread = std::thread::current();
            tracing::error!(
                thread = thread.name().unwrap_or("unnamed"),
                panic = %info,
                "thread panicked"
            );
        }));
    }
    Ok(Telemetry { provider })
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Makes `span` the child of the W3C trace context that `get` finds (`traceparent`,
/// `tracestate`), when there is one and export is on.
pub fn adopt_parent(span: &tracing::Span, get: impl Fn(&str) -> Option<String>) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    // Nothing to do (and nothing to copy) per request while export is off.
    if span.is_disabled() {
        return;
    }
    let carrier: std::collections::HashMap<String, String> = ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|k| Some((k.to_string(), get(k)?)))
        .collect();
    if !carrier.contains_key("traceparent") {
        return;
    }
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    let _ = span.set_parent(cx);
}
