//! Distributed tracing: `tracing` spans exported over OTLP/gRPC, and the W3C
//! `traceparent` carried in gRPC metadata so one `Generate` is one trace across the
//! orchestrator, the draft service and the target service.
//!
//! Off unless an OTLP endpoint is configured with the standard variables
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`). When off no
//! OpenTelemetry layer is installed, the per-round spans (debug level) stay disabled at
//! their call sites, and nothing is read from or written to gRPC metadata.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::sync::atomic::{AtomicBool, Ordering};
use tonic::codegen::http;
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tracing::Span;
use tracing::level_filters::LevelFilter;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{Targets, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Whether this process exports spans (set once by [`init`]).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Our crates: their debug spans (rounds, draft and verify calls, batched forwards) are
/// exported; other crates' (h2, tower, tonic) are not.
const OUR_TARGETS: &[&str] = &[
    "decoding",
    "serving",
    "engine",
    "orchestrator",
    "ouro",
    "target_service",
    "draft_service",
    "proto",
    "telemetry",
];

/// What the standard OpenTelemetry variables ask for: export when an OTLP endpoint is set,
/// unless the SDK is disabled or the traces exporter is `none`.
pub fn export_requested(var: impl Fn(&str) -> Option<String>) -> bool {
    let set = |k: &str| var(k).is_some_and(|v| !v.trim().is_empty());
    let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let exporter_none = var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim() == "none");
    (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        && !disabled
        && !exporter_none
}

/// Whether spans leave this process (and trace context is propagated).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Flushes the spans still buffered when the process stops.
#[must_use = "dropping the guard at once stops the export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is buffered and stops the exporter (off the async threads: the
    /// export blocks until the collector answers or times out).
    pub async fn shutdown(mut self) {
        if let Some(p) = self.provider.take() {
            let done = tokio::task::spawn_blocking(move || p.shutdown()).await;
            if let Ok(Err(e)) = done {
                tracing::warn!("span export did not shut down cleanly: {e}");
            }
        }
    }
}

/// Logs to stderr (filtered by `RUST_LOG`, default `info`) and, when the OTLP variables
/// ask for it, exports spans as `service` (unless `OTEL_SERVICE_NAME` names it). Call it
/// once, inside the Tokio runtime that serves: the exporter's channel lives there. An
/// exporter that cannot be built is logged, and the process runs without it.
pub fn init(service: &str) -> Telemetry {
    let (provider, failed) = if export_requested(|k| std::env::var(k).ok()) {
        match provider(service) {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e)),
        }
    } else {
        (None, None)
    };
    let ours = OUR_TARGETS.iter().fold(Targets::new(), |t, &name| {
        t.with_target(name, LevelFilter::DEBUG)
    });
    // Spans of our crates down to debug; events (logs inside spans) at info and above.
    let export_filter = filter_fn(move |m| {
        if m.is_span() {
            ours.would_enable(m.target(), m.level())
        } else {
            *m.level() <= tracing::Level::INFO
        }
    });
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("ouroboros"))
            .with_filter(export_filter)
    });
    let exporting = otel.is_some();
    if tracing_subscriber::registry()
        .with(log_layer())
        .with(otel)
        .try_init()
        .is_ok()
        && exporting
    {
        EXPORTING.store(true, Ordering::Relaxed);
        tracing::info!(service, "exporting spans over OTLP");
    }
    if let Some(e) = failed {
        tracing::warn!("tracing export is off: {e}");
    }
    Telemetry { provider }
}

/// Log lines to stderr, filtered by `RUST_LOG` (default `info`).
pub(crate) fn log_layer<S>() -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter)
}

fn provider(service: &str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_string());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

struct MetadataWriter<'a>(&'a mut MetadataMap);

impl Injector for MetadataWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct MetadataReader<'a>(&'a MetadataMap);

impl Extractor for MetadataReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                KeyRef::Ascii(k) => Some(k.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct HeaderReader<'a>(&'a http::HeaderMap);

impl Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Writes the current span's trace context (`traceparent`) into outgoing metadata.
pub fn inject_current(metadata: &mut MetadataMap) {
    if exporting() {
        let cx = Span::current().context();
        TraceContextPropagator::new().inject_context(&cx, &mut MetadataWriter(metadata));
    }
}

/// A request carrying the current span's trace context.
pub fn traced<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    inject_current(r.metadata_mut());
    r
}

/// Makes `span` a child of the trace context that `metadata` carries, if any.
pub fn adopt_parent(span: &Span, metadata: &MetadataMap) {
    if exporting() {
        let cx = TraceContextPropagator::new().extract(&MetadataReader(metadata));
        let _ = span.set_parent(cx);
    }
}

/// The server span of one gRPC call (for tonic's `Server::trace_fn`): named after the
/// method, a child of the caller's `traceparent`. Health checks and reflection get none,
/// so probes do not flood the traces. Servers install it only while [`exporting`].
pub fn grpc_server_span(request: &http::Request<()>) -> Span {
    let path = request.uri().path().trim_start_matches('/');
    if path.starts_with("grpc.") {
        return Span::none();
    }
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = path,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
    );
    let cx = TraceContextPropagator::new().extract(&HeaderReader(request.headers()));
    let _ = span.set_parent(cx);
    span
}

/// Links `span` to `other` (a batched forward to the requests it served beyond the
/// first, which is its parent).
pub fn link(span: &Span, other: &Span) {
    if exporting() {
        let cx = other.context();
        let sc = opentelemetry::trace::TraceContextExt::span(&cx)
            .span_context()
            .clone();
        span.add_link(sc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn export_follows_the_standard_variables() {
        assert!(!export_requested(env(&[])));
        assert!(!export_requested(env(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            " "
        )])));
        let ep = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317");
        assert!(export_requested(env(&[ep])));
        assert!(export_requested(env(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://collector:4317"
        )])));
        assert!(!export_requested(env(&[ep, ("OTEL_SDK_DISABLED", "TRUE")])));
        assert!(!export_requested(env(&[
            ep,
            ("OTEL_TRACES_EXPORTER", "none")
        ])));
        assert!(export_requested(env(&[ep, ("OTEL_SDK_DISABLED", "false")])));
    }

    #[test]
    fn metadata_round_trips_a_traceparent() {
        let mut m = MetadataMap::new();
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        MetadataWriter(&mut m).set("traceparent", tp.to_string());
        assert_eq!(MetadataReader(&m).get("traceparent"), Some(tp));
        let cx = TraceContextPropagator::new().extract(&MetadataReader(&m));
        let sc = opentelemetry::trace::TraceContextExt::span(&cx)
            .span_context()
            .clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert!(sc.is_remote() && sc.is_sampled());
        // Binary keys are skipped, not mistaken for text.
        m.insert_bin("x-bin", tonic::metadata::MetadataValue::from_bytes(b"\x01"));
        assert_eq!(MetadataReader(&m).keys(), vec!["traceparent"]);
    }
}
