//! What every Ouroboros binary shares for observability: the log set-up, span export
//! over OTLP with trace context carried between the services ([`traces`]), and one
//! Prometheus registry with the serving metrics, scraped over HTTP at `/metrics`.
//!
//! Metric names follow vLLM's speculative-decoding and latency metrics under our own
//! prefix (`ouro_`), so the usual dashboards carry over: mean accepted length is
//! `(accepted_tokens + num_drafts) / num_drafts`, acceptance rate
//! `accepted_tokens / draft_tokens`.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::convert::Infallible;
use std::sync::OnceLock;
use tokio::net::TcpListener;

pub mod traces;
pub use traces::{Telemetry, init};

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), without span export: for the
/// one-shot commands and tests. Servers call [`init`].
pub fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // A second call (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(traces::log_layer())
        .try_init();
}

/// The serving metrics. One set per process; each service fills its own part.
pub struct Metrics {
    pub registry: Registry,
    // Orchestrator: per request, by strategy.
    pub requests: IntCounterVec,
    pub generated_tokens: IntCounterVec,
    pub num_drafts: IntCounterVec,
    pub draft_tokens: IntCounterVec,
    pub accepted_tokens: IntCounterVec,
    pub accepted_per_pos: IntCounterVec,
    pub ttft: HistogramVec,
    pub inter_token: HistogramVec,
    pub e2e: HistogramVec,
    pub pool_lookups: IntCounterVec,
    pub pool_hits: IntCounterVec,
    pub pool_phrases: IntGauge,
    pub trie_lookups: IntCounterVec,
    pub trie_hits: IntCounterVec,
    pub trie_nodes: IntGauge,
    pub in_flight: IntGauge,
    pub session_failovers: IntCounter,
    // Draft and target services, by service ("draft" / "target").
    pub sessions: IntGaugeVec,
    pub kv_bytes: IntGaugeVec,
    pub queue_depth: IntGauge,
    pub batch_trees: Histogram,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str], b: Vec<f64>) -> HistogramVec {
    let h =
        HistogramVec::new(HistogramOpts::new(name, help).buckets(b), labels).expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

const LATENCY: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

impl Metrics {
    fn new() -> Self {
        let r = Registry::new_custom(Some("ouro".into()), None).expect("valid prefix");
        let s = &["strategy"];
        Self {
            requests: counter(
                &r,
                "requests_total",
                "Finished Generate requests.",
                &["strategy", "finish"],
            ),
            generated_tokens: counter(
                &r,
                "generation_tokens_total",
                "Tokens returned to clients.",
                s,
            ),
            num_drafts: counter(
                &r,
                "spec_decode_num_drafts_total",
                "Verify rounds (target forwards after the prefill).",
                s,
            ),
            draft_tokens: counter(
                &r,
                "spec_decode_num_draft_tokens_total",
                "Draft tokens sent for verification.",
                s,
            ),
            accepted_tokens: counter(
                &r,
                "spec_decode_num_accepted_tokens_total",
                "Draft tokens the target accepted.",
                s,
            ),
            accepted_per_pos: counter(
                &r,
                "spec_decode_num_accepted_tokens_per_pos_total",
                "Accepted draft tokens by position in the draft.",
                &["strategy", "position"],
            ),
            ttft: histogram(
                &r,
                "time_to_first_token_seconds",
                "Time from request to first committed token.",
                s,
                LATENCY.to_vec(),
            ),
            inter_token: histogram(
                &r,
                "inter_token_latency_seconds",
                "Time between committed tokens.",
                s,
                LATENCY.to_vec(),
            ),
            e2e: histogram(
                &r,
                "e2e_request_latency_seconds",
                "Whole request time.",
                s,
                LATENCY.to_vec(),
            ),
            pool_lookups: counter(
                &r,
                "pool_lookups_total",
                "Candidate look-ups in the phrase pool.",
                s,
            ),
            pool_hits: counter(
                &r,
                "pool_hits_total",
                "Pool look-ups that found phrases.",
                s,
            ),
            pool_phrases: gauge(&r, "pool_phrases", "Phrases in the shared pool."),
            trie_lookups: counter(&r, "trie_lookups_total", "Look-ups in the token tries.", s),
            trie_hits: counter(
                &r,
                "trie_hits_total",
                "Trie look-ups that found continuations.",
                s,
            ),
            trie_nodes: gauge(&r, "trie_nodes", "Nodes in the shared output trie."),
            in_flight: gauge(&r, "requests_running", "Generate requests in progress."),
            session_failovers: {
                let c = IntCounter::new(
                    "session_failovers_total",
                    "Sessions re-opened on another replica after theirs failed.",
                )
                .expect("valid metric");
                r.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            sessions: {
                let g = IntGaugeVec::new(Opts::new("sessions", "Open sessions."), &["service"])
                    .expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            kv_bytes: {
                let g = IntGaugeVec::new(
                    Opts::new("kv_cache_bytes", "KV cache memory of the open sessions."),
                    &["service"],
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            queue_depth: gauge(
                &r,
                "target_queue_depth",
                "Verify trees waiting for the target's worker.",
            ),
            batch_trees: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "target_batch_trees",
                        "Trees (sessions) per batched target forward.",
                    )
                    .buckets(vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0]),
                )
                .expect("valid metric");
                r.register(Box::new(h.clone())).expect("unique metric");
                h
            },
            registry: r,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding our own registry's families into a Vec cannot fail.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!("encoding metrics: {e}");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Open sessions and their KV memory of a draft or target service.
pub fn publish_sessions(service: &str, sessions: usize, kv_bytes: usize) {
    let m = metrics();
    m.sessions
        .with_label_values(&[service])
        .set(sessions as i64);
    m.kv_bytes
        .with_label_values(&[service])
        .set(kv_bytes as i64);
}

/// This process's metrics.
pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

/// Serves `GET /metrics` on `listener` until the process ends.
pub fn serve_metrics(listener: TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("metrics endpoint: {e}");
                    continue;
                }
            };
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let resp = if req.uri().path() == "/metrics" {
                            Response::builder()
                                .header("content-type", "text/plain; version=0.0.4")
                                .body(Full::new(Bytes::from(metrics().render())))
                        } else {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"see /metrics\n")))
                        };
                        Ok::<_, Infallible>(resp.unwrap_or_default())
                    });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    tracing::debug!("metrics connection: {e}");
                }
            });
        }
    })
}

/// Binds `addr` and serves the metrics there.
pub async fn start_metrics(addr: &str) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the metrics endpoint {addr}: {e}"))?;
    tracing::info!(addr, "metrics at /metrics");
    Ok(serve_metrics(l))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_endpoint_serves_the_registry() {
        metrics()
            .requests
            .with_label_values(&["trie", "length"])
            .inc();
        metrics().ttft.with_label_values(&["trie"]).observe(0.2);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        serve_metrics(l);
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).await.unwrap();
            body
        };
        let page = get("/metrics").await;
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(
            page.contains("ouro_requests_total{finish=\"length\",strategy=\"trie\"} 1"),
            "{page}"
        );
        assert!(page.contains("ouro_time_to_first_token_seconds_count{strategy=\"trie\"} 1"));
        assert!(
            page.contains(
                "ouro_time_to_first_token_seconds_bucket{strategy=\"trie\",le=\"0.25\"} 1"
            )
        );
        assert!(get("/other").await.starts_with("HTTP/1.1 404"));
    }
}
