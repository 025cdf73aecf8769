//! The public API, `ouroboros.v1.Ouroboros`: validates a request, tokenizes it, runs it on
//! the pipeline and answers with text, tokens, finish reason, usage and statistics, whole
//! or as a stream.

use crate::chat::ChatTemplate;
use crate::pipeline::{BoxedSink, Runner};
use crate::remote::{REQUEST_DEADLINE, request_deadline};
use crate::text::StopScan;
use crate::validation::{ValidRequest, Validator};
use decoding::{DecodeParams, FinishReason, Flow, Generation, SpecStats, TokenSource};
use proto::convert::status_of;
use proto::v1 as pb;
use proto::v1::ouroboros_server::Ouroboros;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokenizers::Tokenizer;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

#[derive(Clone)]
pub struct GenerateService {
    runner: Arc<dyn Runner>,
    validator: Validator,
    /// One per request whose decoding work runs; none left: RESOURCE_EXHAUSTED.
    admission: Arc<Semaphore>,
    most_running: usize,
    /// When set, callers must carry one of these keys (checked by the front ends).
    api_keys: Option<Arc<crate::auth::ApiKeys>>,
}

impl GenerateService {
    pub fn new(
        runner: Arc<dyn Runner>,
        tokenizer: Arc<Tokenizer>,
        chat: Arc<ChatTemplate>,
        eos: Vec<u32>,
        defaults: DecodeParams,
    ) -> Self {
        Self {
            validator: Validator::new(runner.clone(), tokenizer, chat, eos, defaults),
            runner,
            admission: Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)),
            most_running: Semaphore::MAX_PERMITS,
            api_keys: None,
        }
    }

    /// Requires one of `keys` from every caller of both front ends.
    pub fn with_api_keys(mut self, keys: crate::auth::ApiKeys) -> Self {
        self.api_keys = Some(Arc::new(keys));
        self
    }

    pub fn api_keys(&self) -> Option<&Arc<crate::auth::ApiKeys>> {
        self.api_keys.as_ref()
    }

    /// UNAUTHENTICATED unless the call carries a key (when keys are set).
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(keys) = &self.api_keys else {
            return Ok(());
        };
        let header = |name: &str| request.metadata().get(name).and_then(|v| v.to_str().ok());
        match keys.admits(header("authorization"), header("x-api-key")) {
            true => Ok(()),
            false => Err(Status::unauthenticated(crate::auth::REFUSED)),
        }
    }

    /// Refuses requests past `n` running at once (RESOURCE_EXHAUSTED, HTTP 429); those
    /// running finish as they would.
    pub fn with_max_running(mut self, n: usize) -> Self {
        let n = n.clamp(1, Semaphore::MAX_PERMITS);
        self.admission = Arc::new(Semaphore::new(n));
        self.most_running = n;
        self
    }

    /// A place for one more request, held until its decoding work ends.
    fn admit(&self) -> Result<OwnedSemaphorePermit, Status> {
        self.admission.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "this server runs at most {} requests at once; try again shortly",
                self.most_running
            ))
        })
    }

    /// Runs a request; `chunks` receives text deltas and tokens as they are committed.
    async fn run(
        &self,
        ValidRequest {
            prompt,
            params,
            stop,
        }: ValidRequest,
        chunks: Option<mpsc::UnboundedSender<Result<pb::GenerateStreamResponse, Status>>>,
        place: OwnedSemaphorePermit,
    ) -> Result<Finished, Status> {
        let scan = Arc::new(Mutex::new(StopScan::new(
            self.validator.tokenizer().clone(),
            stop,
        )));
        let sink_scan = scan.clone();
        let m = telemetry::metrics();
        let strategy = params.strategy.name();
        let started = Instant::now();
        let mut last: Option<Instant> = None;
        // The request counts as running until its decoding work ends (the sink, which that
        // work owns, is dropped), not only until this call returns.
        let running = Running::start();
        // Dropped with this call's future: a caller that left or ran out of time stops the
        // work at its next commit, which closes its sessions.
        let caller = Caller::default();
        let gone = caller.gone.clone();
        let sink: BoxedSink = Box::new(move |tokens: &[u32], sources: &[TokenSource]| {
            let _running = (&running, &place);
            if gone.load(Ordering::Relaxed) {
                return Flow::Stop;
            }
            let now = Instant::now();
            match last {
                None => m
                    .ttft
                    .with_label_values(&[strategy])
                    .observe((now - started).as_secs_f64()),
                Some(t) if !tokens.is_empty() => {
                    // Tokens committed together share the gap since the previous batch.
                    let each = (now - t).as_secs_f64() / tokens.len() as f64;
                    for _ in tokens {
                        m.inter_token.with_label_values(&[strategy]).observe(each);
                    }
                }
                Some(_) => {}
            }
            last = Some(now);
            let mut s = serving::sessions::lock(&sink_scan);
            // Runs of one source go out as messages of their own.
            let mut at = 0;
            for run in sources.chunk_by(|a, b| a == b) {
                let delta = s.push(&tokens[at..at + run.len()]);
                at += run.len();
                if let Some(tx) = &chunks
                    && !delta.tokens.is_empty()
                {
                    let msg = pb::GenerateStreamResponse {
                        text: delta.text,
                        token_sources: vec![source_to_pb(run[0]) as i32; delta.tokens.len()],
                        token_ids: delta.tokens,
                        ..Default::default()
                    };
                    if tx.send(Ok(msg)).is_err() {
                        // The client went away.
                        return Flow::Stop;
                    }
                }
                if s.stopped() {
                    break;
                }
            }
            if s.stopped() {
                Flow::Stop
            } else {
                Flow::Continue
            }
        });
        let prompt_tokens = prompt.len();
        let seed = (!params.sampling.is_greedy()).then_some(params.sampling.seed);
        let g = self.runner.run(prompt, params, sink).await;
        drop(caller);
        let g = g.map_err(|e| failed(&e))?;
        record(
            &g.stats,
            started.elapsed().as_secs_f64(),
            self.runner.cache_sizes(),
        );
        let mut s = serving::sessions::lock(&scan);
        s.finish();
        let (finish, finish_name) = if s.stopped() {
            (pb::FinishReason::Stop, "stop")
        } else {
            (finish_of(&g), g.finish.name())
        };
        m.requests.with_label_values(&[strategy, finish_name]).inc();
        let kept = s.tokens().len().min(g.sources.len());
        let logprobs = g.logprobs[..s.tokens().len().min(g.logprobs.len())]
            .iter()
            .map(Into::into)
            .collect();
        Ok(Finished {
            text: s.text().to_string(),
            tail: s.tail(),
            tokens: s.tokens().to_vec(),
            sources: g.sources[..kept]
                .iter()
                .map(|&x| source_to_pb(x) as i32)
                .collect(),
            finish,
            usage: pb::Usage {
                prompt_tokens: prompt_tokens as u32,
                completion_tokens: s.tokens().len() as u32,
            },
            stats: stats_of(&g.stats),
            seed,
            logprobs,
        })
    }
}

/// Raises `ouro_requests_running` for as long as it lives.
struct Running;

impl Running {
    fn start() -> Self {
        telemetry::metrics().in_flight.inc();
        Self
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        telemetry::metrics().in_flight.dec();
    }
}

/// Marks the caller gone when dropped before the request's end was awaited.
#[derive(Default)]
struct Caller {
    gone: Arc<AtomicBool>,
}

impl Drop for Caller {
    fn drop(&mut self) {
        self.gone.store(true, Ordering::Relaxed);
    }
}

/// The span of one request (its rounds and backend calls are its children).
fn request_span(r: &ValidRequest) -> tracing::Span {
    tracing::debug_span!(
        "generate",
        strategy = r.params.strategy.name(),
        prompt_tokens = r.prompt.len(),
        max_new_tokens = r.params.max_new_tokens,
        completion_tokens = tracing::field::Empty,
    )
}

struct Finished {
    text: String,
    /// Text not yet streamed (held back as a possible stop-string start).
    tail: String,
    tokens: Vec<u32>,
    sources: Vec<i32>,
    finish: pb::FinishReason,
    usage: pb::Usage,
    stats: pb::SpecStats,
    /// The seed a sampled request ran with (None when greedy).
    seed: Option<u64>,
    /// Where asked for, parallel to `tokens`.
    logprobs: Vec<proto::common::v1::TokenLogprobs>,
}

pub fn source_to_pb(s: TokenSource) -> pb::TokenSource {
    match s {
        TokenSource::Target => pb::TokenSource::Target,
        TokenSource::Draft => pb::TokenSource::Draft,
        TokenSource::Pool => pb::TokenSource::Pool,
        TokenSource::Trie => pb::TokenSource::Trie,
    }
}

fn finish_of(g: &Generation) -> pb::FinishReason {
    match g.finish {
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Eos => pb::FinishReason::Eos,
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::ContextFull => pb::FinishReason::ContextFull,
    }
}

/// Adds a finished request to the metrics.
fn record(s: &SpecStats, seconds: f64, (pool, trie): (usize, usize)) {
    let m = telemetry::metrics();
    let name = s.strategy.map_or("unknown", |st| st.name());
    let l = &[name];
    m.e2e.with_label_values(l).observe(seconds);
    m.generated_tokens.with_label_values(l).inc_by(s.committed);
    m.num_drafts.with_label_values(l).inc_by(s.target_forwards);
    m.draft_tokens.with_label_values(l).inc_by(s.drafted);
    m.accepted_tokens.with_label_values(l).inc_by(s.accepted);
    for (i, &n) in s.accepted_at.iter().enumerate() {
        m.accepted_per_pos
            .with_label_values(&[name, &i.to_string()])
            .inc_by(n);
    }
    m.pool_lookups.with_label_values(l).inc_by(s.pool_lookups);
    m.pool_hits.with_label_values(l).inc_by(s.pool_hits);
    m.trie_lookups.with_label_values(l).inc_by(s.trie_lookups);
    m.trie_hits.with_label_values(l).inc_by(s.trie_hits);
    m.pool_phrases.set(pool as i64);
    m.trie_nodes.set(trie as i64);
}

pub fn stats_of(s: &SpecStats) -> pb::SpecStats {
    pb::SpecStats {
        strategy: s.strategy.map(|s| s.name().to_string()).unwrap_or_default(),
        target_forwards: s.target_forwards,
        draft_forwards: s.draft_forwards,
        draft_calls: s.draft_calls,
        drafted_tokens: s.drafted,
        accepted_tokens: s.accepted,
        mean_accepted_length: s.mean_accepted_length(),
        acceptance_by_position: s.acceptance_by_position(),
        candidate_tokens: s.candidate_tokens,
        candidate_rounds: s.candidate_rounds,
        pool_lookups: s.pool_lookups,
        pool_hits: s.pool_hits,
        draft_phrase_hits: s.draft_phrase_hits,
        tree_nodes: s.tree_nodes,
        draft_fallback: s.draft_fallback.clone().unwrap_or_default(),
        prefill_s: s.prefill_s,
        draft_s: s.draft_s,
        verify_s: s.verify_s,
        network_s: s.network_s,
        total_s: s.total_s,
        trie_lookups: s.trie_lookups,
        trie_hits: s.trie_hits,
        trie_nodes: s.trie_nodes,
        trie_accepted: s.trie_accepted,
        trie_prompt_nodes: s.trie_prompt_nodes,
        trie_cache_nodes: s.trie_cache_nodes,
        trie_cache_bytes: s.trie_cache_bytes,
        overlap_used: s.overlap_used,
        overlap_discarded: s.overlap_discarded,
        overlap_cancelled: s.overlap_cancelled,
    }
}

type StreamOf<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The messages of a streamed request: text deltas, then a last one with the finish
/// reason, usage and statistics (or an error).
pub type Chunks = UnboundedReceiverStream<Result<pb::GenerateStreamResponse, Status>>;

/// What both front ends (gRPC here, HTTP in [`crate::http`]) call.
impl GenerateService {
    /// The served (target) model: name, vocabulary and context.
    pub fn target_info(&self) -> decoding::BackendInfo {
        self.runner.target_info()
    }

    pub fn validator(&self) -> &Validator {
        &self.validator
    }

    /// Validates and runs a request to its end.
    pub async fn complete(&self, r: pb::GenerateRequest) -> Result<pb::GenerateResponse, Status> {
        let valid = self.validator.validate(r).await?;
        let span = request_span(&valid);
        let place = self.admit()?;
        let f = self
            .run(valid, None, place)
            .instrument(span.clone())
            .await?;
        span.record("completion_tokens", f.tokens.len());
        Ok(pb::GenerateResponse {
            text: f.text,
            token_ids: f.tokens,
            token_sources: f.sources,
            finish_reason: f.finish as i32,
            usage: Some(f.usage),
            stats: Some(f.stats),
            seed: f.seed,
            logprobs: f.logprobs,
        })
    }

    /// Validates a request (a bad one fails here, not in the stream) and starts it; its
    /// messages arrive on the returned stream. Dropping the stream stops the request at
    /// its next commit.
    pub async fn stream(&self, r: pb::GenerateRequest) -> Result<Chunks, Status> {
        let valid = self.validator.validate(r).await?;
        if valid.params.logprobs.is_some() {
            return Err(proto::convert::field_status(
                "logprobs",
                "logprobs: not with streaming yet (ask Generate for the whole answer)".into(),
            ));
        }
        let place = self.admit()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let service = self.clone();
        let span = request_span(&valid);
        let task_span = span.clone();
        let task = async move {
            let last = match service.run(valid, Some(tx.clone()), place).await {
                Ok(f) => {
                    span.record("completion_tokens", f.tokens.len());
                    Ok(pb::GenerateStreamResponse {
                        text: f.tail,
                        token_ids: Vec::new(),
                        token_sources: Vec::new(),
                        finish_reason: f.finish as i32,
                        usage: Some(f.usage),
                        stats: Some(f.stats),
                        seed: f.seed,
                        logprobs: Vec::new(),
                    })
                }
                Err(status) => Err(status),
            };
            let _ = tx.send(last);
        };
        // The request's deadline goes with it onto its task.
        let task = REQUEST_DEADLINE.scope(request_deadline(), task);
        tokio::spawn(task.instrument(task_span));
        Ok(UnboundedReceiverStream::new(rx))
    }
}

/// The status of a request that failed: DEADLINE_EXCEEDED once its client's deadline has
/// passed (whatever internal call noticed it first), else the error's own.
fn failed(e: &decoding::DecodingError) -> Status {
    match request_deadline() {
        Some(d) if std::time::Instant::now() >= d => {
            Status::deadline_exceeded(format!("the request's deadline passed: {e}"))
        }
        _ => status_of(e),
    }
}

/// Info, Tokenize and Detokenize, for both front ends.
impl GenerateService {
    pub fn info(&self) -> pb::InfoResponse {
        let target = self.runner.target_info();
        let mut strategies = vec![
            pb::Strategy::Auto,
            pb::Strategy::Greedy,
            pb::Strategy::Speculative,
            pb::Strategy::Trie,
            pb::Strategy::Ouroboros,
        ];
        if self.runner.has_lookahead() {
            strategies.push(pb::Strategy::Lookahead);
        }
        let profile = self.runner.cost_profile();
        let draft_cost = profile.as_ref().and_then(|p| p.draft());
        pb::InfoResponse {
            model: target.model,
            draft_model: self
                .runner
                .draft_info()
                .map(|d| d.model)
                .unwrap_or_default(),
            context_length: target.max_position as u32,
            vocab_size: target.vocab_size as u32,
            tokenizer_entries: self.validator.tokenizer().get_vocab_size(true) as u32,
            chat_template_source: self.validator.chat().origin().to_string(),
            strategies: strategies.into_iter().map(|s| s as i32).collect(),
            verify_costs: profile
                .iter()
                .flat_map(|p| p.verify_points())
                .map(|&(n, s)| pb::VerifyCost {
                    tree_nodes: n as u32,
                    seconds: s,
                })
                .collect(),
            draft_token_s: draft_cost.map(|d| d.per_token),
            draft_call_s: draft_cost.map(|d| d.per_call),
        }
    }

    /// Token ids of text or rendered chat messages (on the blocking pool).
    pub async fn tokenize(&self, r: pb::TokenizeRequest) -> Result<pb::TokenizeResponse, Status> {
        let validator = self.validator.clone();
        tokio::task::spawn_blocking(move || {
            use pb::tokenize_request::Input;
            let ids = match r.input {
                Some(Input::Text(t)) => validator.encode(&t, "text")?,
                Some(Input::Chat(c)) => {
                    let text = validator.render_chat(&c.messages)?;
                    validator.encode(&text, "chat")?
                }
                None => {
                    return Err(proto::convert::field_status(
                        "input",
                        "input: expected text or chat, got none".into(),
                    ));
                }
            };
            let tok = validator.tokenizer();
            let tokens = ids
                .iter()
                .map(|&i| tok.id_to_token(i).unwrap_or_default())
                .collect();
            Ok(pb::TokenizeResponse {
                token_ids: ids,
                tokens,
            })
        })
        .await
        .map_err(|e| Status::internal(format!("tokenize task failed: {e}")))?
    }

    pub async fn detokenize(
        &self,
        r: pb::DetokenizeRequest,
    ) -> Result<pb::DetokenizeResponse, Status> {
        let tok = self.validator.tokenizer().clone();
        tokio::task::spawn_blocking(move || {
            let entries = tok.get_vocab_size(true);
            decoding::validate::check_vocab(&r.token_ids, entries, "token_ids")
                .map_err(|e| status_of(&e))?;
            let text = engine::tokenizer::decode(&tok, &r.token_ids, r.skip_special_tokens)
                .map_err(|e| Status::internal(format!("detokenize: {e}")))?;
            Ok(pb::DetokenizeResponse { text })
        })
        .await
        .map_err(|e| Status::internal(format!("detokenize task failed: {e}")))?
    }
}

#[tonic::async_trait]
impl Ouroboros for GenerateService {
    async fn info(
        &self,
        request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(GenerateService::info(self)))
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        self.authorize(&request)?;
        GenerateService::tokenize(self, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn detokenize(
        &self,
        request: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        self.authorize(&request)?;
        GenerateService::detokenize(self, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        self.authorize(&request)?;
        let deadline = deadline_of(request.metadata());
        REQUEST_DEADLINE
            .scope(deadline, self.complete(request.into_inner()))
            .await
            .map(Response::new)
    }

    type GenerateStreamStream = StreamOf<pb::GenerateStreamResponse>;

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        self.authorize(&request)?;
        let deadline = deadline_of(request.metadata());
        let chunks = REQUEST_DEADLINE
            .scope(deadline, self.stream(request.into_inner()))
            .await?;
        Ok(Response::new(Box::pin(chunks)))
    }
}

/// The deadline a gRPC client set (its `grpc-timeout` header: up to 8 digits and a unit,
/// H M S m u n), as an instant; none for a missing or malformed header.
fn deadline_of(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Instant> {
    let v = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    std::time::Instant::now().checked_add(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_become_deadlines() {
        let of = |v: &str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            deadline_of(&m).map(|d| d.saturating_duration_since(Instant::now()))
        };
        let near = |got: Option<Duration>, want: Duration| {
            let got = got.expect("a deadline");
            assert!(
                got <= want && want - got < Duration::from_secs(1),
                "{got:?}"
            );
        };
        near(of("1500m"), Duration::from_millis(1500));
        near(of("2S"), Duration::from_secs(2));
        near(of("3M"), Duration::from_secs(180));
        near(of("1H"), Duration::from_secs(3600));
        near(of("250000u"), Duration::from_millis(250));
        near(of("99999999n"), Duration::from_nanos(99_999_999));
        for bad in ["", "m", "12", "123456789S", "1.5S", "-1S", "5x"] {
            assert_eq!(of(bad), None, "{bad:?}");
        }
        assert_eq!(deadline_of(&tonic::metadata::MetadataMap::new()), None);
    }
}
