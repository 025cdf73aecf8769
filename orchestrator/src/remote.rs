//! gRPC implementations of the backend traits: the same decoding loops drive draft and
//! target services on other hosts. A status from a service becomes the `DecodingError` the
//! in-process backend would have given. Every call carries the caller's trace context.

use anyhow::Context;
use decoding::{
    BackendInfo, DecodingError, DraftBackend, DraftOutcome, DraftRequest, DraftTree, Result,
    SamplingParams, ServerTiming, SessionId, TargetBackend, VerifyOutcome,
};
use engine::chat_template::ChatTemplateSource;
use proto::common::v1 as common;
use proto::convert::{error_of, sampling_to_pb};
use proto::draft::v1 as dpb;
use proto::draft::v1::draft_service_client::DraftServiceClient;
use proto::target::v1 as tpb;
use proto::target::v1::target_service_client::TargetServiceClient;
use std::future::Future;
use std::time::{Duration, Instant};
use telemetry::traces::traced;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

tokio::task_local! {
    /// The deadline of the public request that internal calls serve, where its client set
    /// one: every call ends by then, whatever its own limit.
    pub static REQUEST_DEADLINE: Option<Instant>;
}

/// The deadline of the request being served here, if any.
pub fn request_deadline() -> Option<Instant> {
    REQUEST_DEADLINE.try_with(|d| *d).ok().flatten()
}

/// A call's message: the caller's trace context, and the request's remaining time for the
/// service to stop by.
fn outgoing<T>(message: T) -> tonic::Request<T> {
    let mut r = traced(message);
    if let Some(d) = request_deadline() {
        r.set_timeout(d.saturating_duration_since(Instant::now()));
    }
    r
}

/// A call cut at the request's deadline even when the peer never answers (the channel's
/// own limit may be far longer).
trait WithinDeadline<R>: Future<Output = std::result::Result<R, tonic::Status>> + Sized {
    async fn within_deadline(self) -> std::result::Result<R, tonic::Status> {
        let Some(d) = request_deadline() else {
            return self.await;
        };
        let left = d.saturating_duration_since(Instant::now());
        let passed = || tonic::Status::deadline_exceeded("the request's deadline passed");
        match tokio::time::timeout(left, self).await {
            Ok(Ok(r)) => Ok(r),
            // The channel's own timer (the request carries the same deadline) may fire
            // first; either way it was the request's deadline.
            Ok(Err(_)) if Instant::now() >= d => Err(passed()),
            Ok(Err(s)) => Err(s),
            Err(_) => Err(passed()),
        }
    }
}

impl<R, F: Future<Output = std::result::Result<R, tonic::Status>>> WithinDeadline<R> for F {}

/// Deadlines of an internal channel: a call past `call` fails with DEADLINE_EXCEEDED (a
/// draft's failure sends its request on target-only; a target's ends the request), and an
/// HTTP/2 ping every `keepalive` finds a peer that stopped answering (a hung process, a
/// blackholed node) even while no call is waiting. With `tls`, the channel speaks TLS (and
/// presents a client certificate where the configuration has one: mutual TLS).
#[derive(Debug, Clone)]
pub struct CallLimits {
    pub connect: Duration,
    pub call: Duration,
    pub keepalive: Duration,
    pub tls: Option<ClientTlsConfig>,
}

impl CallLimits {
    /// What target services get by default: a verify of a long prompt's prefill may take
    /// many seconds on a CPU.
    pub const TARGET: Self = Self {
        connect: Duration::from_secs(5),
        call: Duration::from_secs(120),
        keepalive: Duration::from_secs(20),
        tls: None,
    };
    /// Draft calls are short; a hung draft should cost little before the fallback.
    pub const DRAFT: Self = Self {
        connect: Duration::from_secs(5),
        call: Duration::from_secs(10),
        keepalive: Duration::from_secs(20),
        tls: None,
    };
}

/// Connects a channel to `url` ("http://host:port"; https with TLS) under `limits`,
/// failing fast when nothing answers; it reconnects by itself later.
pub async fn channel(url: &str, limits: &CallLimits) -> anyhow::Result<Channel> {
    let url = match (&limits.tls, url.strip_prefix("http://")) {
        (Some(_), Some(rest)) => format!("https://{rest}"),
        _ => url.to_string(),
    };
    let mut endpoint =
        Endpoint::from_shared(url.clone()).with_context(|| format!("bad endpoint {url}"))?;
    if let Some(tls) = &limits.tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .with_context(|| format!("TLS for {url}"))?;
    }
    let endpoint = endpoint
        .connect_timeout(limits.connect)
        .timeout(limits.call)
        .http2_keep_alive_interval(limits.keepalive)
        .keep_alive_timeout(limits.keepalive)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// TLS toward the draft and target services (`ouro serve` in remote mode).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct BackendTlsArgs {
    /// Talk TLS to the draft and target services, trusting certificates this CA (PEM)
    /// signed.
    #[arg(long, env = "OURO_BACKEND_TLS_CA")]
    pub backend_tls_ca: Option<std::path::PathBuf>,
    /// Mutual TLS: present this certificate (PEM) to the services; needs
    /// --backend-tls-key.
    #[arg(long, env = "OURO_BACKEND_TLS_CERT", requires_all = ["backend_tls_key", "backend_tls_ca"])]
    pub backend_tls_cert: Option<std::path::PathBuf>,
    /// The private key of --backend-tls-cert (PEM).
    #[arg(long, env = "OURO_BACKEND_TLS_KEY", requires = "backend_tls_cert")]
    pub backend_tls_key: Option<std::path::PathBuf>,
    /// The name the services' certificates carry (default: each endpoint's host name as
    /// given, before it is resolved to addresses).
    #[arg(long, env = "OURO_BACKEND_TLS_SERVER_NAME")]
    pub backend_tls_server_name: Option<String>,
}

impl BackendTlsArgs {
    /// The client TLS for the services at `spec` (comma-separated URLs, checked against
    /// the first one's host name); none without --backend-tls-ca.
    pub fn for_endpoint(&self, spec: &str) -> anyhow::Result<Option<ClientTlsConfig>> {
        let Some(ca) = &self.backend_tls_ca else {
            return Ok(None);
        };
        let read = |p: &std::path::Path, what: &str| {
            std::fs::read(p).with_context(|| format!("reading the {what} {}", p.display()))
        };
        let name = match &self.backend_tls_server_name {
            Some(n) => n.clone(),
            None => {
                let first = spec.split(',').map(str::trim).next().unwrap_or_default();
                let uri: tonic::codegen::http::Uri = first
                    .parse()
                    .with_context(|| format!("bad endpoint {first}"))?;
                uri.host()
                    .with_context(|| format!("endpoint {first} has no host"))?
                    .trim_matches(['[', ']'])
                    .to_string()
            }
        };
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(ca, "backend CA")?))
            .domain_name(name);
        if let (Some(cert), Some(key)) = (&self.backend_tls_cert, &self.backend_tls_key) {
            let identity =
                Identity::from_pem(read(cert, "client certificate")?, read(key, "client key")?);
            tls = tls.identity(identity);
        }
        Ok(Some(tls))
    }
}

fn info_of(m: Option<common::ModelInfo>, url: &str) -> anyhow::Result<BackendInfo> {
    let m = m.with_context(|| format!("{url} sent no model info"))?;
    Ok(BackendInfo {
        model: m.model,
        vocab_size: m.vocab_size as usize,
        max_position: m.context_length as usize,
        vocab: m.vocabulary.as_ref().map(Into::into),
    })
}

fn timing_of(t: Option<common::ServerTiming>) -> ServerTiming {
    t.map(ServerTiming::from).unwrap_or_default()
}

#[derive(Clone)]
pub struct RemoteTarget {
    client: TargetServiceClient<Channel>,
    /// The service's gRPC health, on the same channel.
    health: HealthClient<Channel>,
    info: BackendInfo,
    /// The service's limit on one verify's tree (from its Info; 0 there: none said).
    max_tree_nodes: Option<usize>,
    chat_template: Option<ChatTemplateSource>,
    url: String,
}

impl RemoteTarget {
    /// Connects and reads the service's Info (its vocabulary fingerprinted over all its
    /// entries).
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        Self::connect_for(url, 0, &CallLimits::TARGET).await
    }

    /// Connects under `limits`, asking for the fingerprint of the first `vocab_entries`
    /// vocabulary entries (a tokenizer's size; see `vocabulary::check_service`).
    pub async fn connect_for(
        url: &str,
        vocab_entries: usize,
        limits: &CallLimits,
    ) -> anyhow::Result<Self> {
        let channel = channel(url, limits).await?;
        let mut client = TargetServiceClient::new(channel.clone());
        let info = client
            .info(tpb::InfoRequest {
                vocab_fingerprint_entries: vocab_entries as u32,
            })
            .await
            .with_context(|| format!("Info from target {url}"))?
            .into_inner();
        let chat_template = info
            .model
            .as_ref()
            .and_then(|m| m.chat_template.as_ref())
            .map(ChatTemplateSource::from);
        Ok(Self {
            client,
            health: HealthClient::new(channel),
            max_tree_nodes: (info.max_tree_nodes > 0).then_some(info.max_tree_nodes as usize),
            info: info_of(info.model, url)?,
            chat_template,
            url: url.to_string(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The chat template the target's model ships with, as its Info reported it.
    pub fn chat_template(&self) -> Option<&ChatTemplateSource> {
        self.chat_template.as_ref()
    }
}

impl TargetBackend for RemoteTarget {
    fn info(&self) -> BackendInfo {
        self.info.clone()
    }

    fn max_tree_nodes(&self) -> Option<usize> {
        self.max_tree_nodes
    }

    /// Its gRPC health says SERVING within 2 s (a draining service is not reachable for
    /// new sessions either).
    async fn reachable(&self) -> bool {
        let mut health = self.health.clone();
        let call = health.check(HealthCheckRequest::default());
        match tokio::time::timeout(Duration::from_secs(2), call).await {
            Ok(Ok(r)) => r.into_inner().status == ServingStatus::Serving as i32,
            _ => false,
        }
    }

    async fn open(&self, committed: &[u32]) -> Result<SessionId> {
        let r = self
            .client
            .clone()
            .open_session(outgoing(tpb::OpenSessionRequest {
                tokens: committed.to_vec(),
            }))
            .within_deadline()
            .await
            .map_err(|s| error_of(&s, None))?;
        Ok(r.into_inner().session_id)
    }

    async fn verify(
        &self,
        session: SessionId,
        tree: &DraftTree,
        sampling: &SamplingParams,
        logprobs: Option<usize>,
    ) -> Result<(VerifyOutcome, ServerTiming)> {
        let r = self
            .client
            .clone()
            .verify(outgoing(tpb::VerifyRequest {
                session_id: session,
                tokens: tree.tokens.clone(),
                parents: tree.parents.clone(),
                sampling: sampling_to_pb(sampling),
                logprobs: logprobs.map(|n| n as u32),
            }))
            .within_deadline()
            .await
            .map_err(|s| error_of(&s, Some(session)))?
            .into_inner();
        if r.outputs.len() != tree.len() || r.accepted.len() != r.path.len() {
            return Err(DecodingError::Backend(format!(
                "target {} answered {} outputs for {} nodes",
                self.url,
                r.outputs.len(),
                tree.len()
            )));
        }
        let outcome = VerifyOutcome {
            path: r.path.iter().map(|&n| n as usize).collect(),
            accepted: r.accepted,
            bonus: r.bonus,
            outputs: r.outputs,
            logprobs: r.logprobs.into_iter().map(Into::into).collect(),
        };
        Ok((outcome, timing_of(r.timing)))
    }

    async fn close(&self, session: SessionId) -> Result<()> {
        self.client
            .clone()
            .close_session(outgoing(tpb::CloseSessionRequest {
                session_id: session,
            }))
            .within_deadline()
            .await
            .map_err(|s| error_of(&s, Some(session)))?;
        Ok(())
    }
}

#[derive(Clone)]
pub struct RemoteDraft {
    client: DraftServiceClient<Channel>,
    info: BackendInfo,
}

impl RemoteDraft {
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        Self::connect_for(url, 0, &CallLimits::DRAFT).await
    }

    /// As `RemoteTarget::connect_for`.
    pub async fn connect_for(
        url: &str,
        vocab_entries: usize,
        limits: &CallLimits,
    ) -> anyhow::Result<Self> {
        let mut client = DraftServiceClient::new(channel(url, limits).await?);
        let info = client
            .info(dpb::InfoRequest {
                vocab_fingerprint_entries: vocab_entries as u32,
            })
            .await
            .with_context(|| format!("Info from draft {url}"))?
            .into_inner();
        Ok(Self {
            client,
            info: info_of(info.model, url)?,
        })
    }
}

impl DraftBackend for RemoteDraft {
    fn info(&self) -> BackendInfo {
        self.info.clone()
    }

    fn wants_pool_delta(&self) -> bool {
        true
    }

    async fn open(&self, committed: &[u32]) -> Result<SessionId> {
        let r = self
            .client
            .clone()
            .open_session(outgoing(dpb::OpenSessionRequest {
                tokens: committed.to_vec(),
            }))
            .within_deadline()
            .await
            .map_err(|s| error_of(&s, None))?;
        Ok(r.into_inner().session_id)
    }

    async fn draft(
        &self,
        session: SessionId,
        request: DraftRequest,
    ) -> Result<(DraftOutcome, ServerTiming)> {
        let r = self
            .client
            .clone()
            .draft(outgoing(dpb::DraftRequest {
                session_id: session,
                new_committed: request.new_committed,
                start: request.start.map(|s| s as u64),
                gamma: request.length.tokens() as u32,
                lookahead: request.lookahead.as_ref().map(Into::into),
                pool_delta: request.pool_delta.iter().map(Into::into).collect(),
                eos: request.eos,
                stop_below: request.length.stop_below(),
            }))
            .within_deadline()
            .await
            .map_err(|s| error_of(&s, Some(session)))?
            .into_inner();
        let outcome = DraftOutcome {
            tokens: r.tokens,
            harvested: r.harvested.into_iter().map(Into::into).collect(),
            forwards: r.forwards,
            phrase_hits: r.phrase_hits,
            confidence: r.confidence,
            rows: r.rows,
            caught_up: r.caught_up,
        };
        Ok((outcome, timing_of(r.timing)))
    }

    async fn close(&self, session: SessionId) -> Result<()> {
        self.client
            .clone()
            .close_session(outgoing(dpb::CloseSessionRequest {
                session_id: session,
            }))
            .within_deadline()
            .await
            .map_err(|s| error_of(&s, Some(session)))?;
        Ok(())
    }
}
