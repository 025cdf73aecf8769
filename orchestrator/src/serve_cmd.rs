//! `ouro serve`: the public API over models in this process (the embedded default) or
//! over remote draft and target services.

use crate::{DecodeArgs, ModelArgs};
use anyhow::{Context, Result};
use clap::Args;
use decoding::{AutoConfig, DraftBackend, PhrasePool, Strategy, TargetBackend, VocabStamp};
use orchestrator::api::GenerateService;
use orchestrator::auth::ApiKeys;
use orchestrator::embedded::{self, Embedded};
use orchestrator::pipeline::{Pipeline, Runner};
use orchestrator::remote::{CallLimits, RemoteDraft, RemoteTarget};
use orchestrator::replicas::Replicas;
use orchestrator::vocabulary;
use serving::TargetConfig;
use serving::args::TargetLimitsArgs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Args)]
pub struct ServeArgs {
    #[arg(long, env = "OURO_LISTEN", default_value = "0.0.0.0:50051")]
    listen: String,
    /// The OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models,
    /// /health, /metrics); "off" serves gRPC only.
    #[arg(long, env = "OURO_HTTP_LISTEN", default_value = "0.0.0.0:8000")]
    http_listen: String,
    /// Target service URLs (http://host:port, comma-separated; a name that resolves to
    /// many addresses, such as a headless Service, gives a replica per address). Without
    /// it the models run in this process.
    #[arg(long, env = "OURO_TARGET_ENDPOINT")]
    target_endpoint: Option<String>,
    /// Draft service URLs (remote mode), as for the target.
    #[arg(long, env = "OURO_DRAFT_ENDPOINT")]
    draft_endpoint: Option<String>,
    /// Draft services hosting the target model, for the lookahead strategy (remote mode).
    #[arg(long, env = "OURO_LOOKAHEAD_ENDPOINT")]
    lookahead_endpoint: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9090).
    #[arg(long, env = "OURO_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Check this often whether a target replica answers; health says NOT_SERVING while
    /// none does (0: never check).
    #[arg(long, env = "OURO_HEALTH_CHECK_S", default_value_t = 5)]
    health_check_s: u64,
    /// Resolve endpoint names again this often, to follow replicas that come and go
    /// (0: only at start).
    #[arg(long, env = "OURO_DISCOVERY_REFRESH_S", default_value_t = 15)]
    discovery_refresh_s: u64,
    /// Pool snapshot: restored at start when present, written at shutdown.
    #[arg(long, env = "OURO_POOL_SNAPSHOT")]
    pool_snapshot: Option<PathBuf>,
    /// Skip timing the backends at start; `auto` requests then decode greedily.
    #[arg(long, env = "OURO_SKIP_PROFILE")]
    skip_profile: bool,
    /// How much more than their price `auto`'s guesses must promise when the target's
    /// forwards are full of other sessions' trees (1 = their price alone; the margin
    /// grows from 1 alone towards this as the sessions per forward grow).
    #[arg(long, env = "OURO_AUTO_LOAD_MARGIN", default_value_t = AutoConfig::default().load_margin, value_parser = parse_margin)]
    auto_load_margin: f64,
    /// Most requests running at once; past it new ones get RESOURCE_EXHAUSTED (HTTP 429)
    /// while those running finish.
    /// At start, how long to keep retrying draft and target services that do not answer
    /// yet (they may still be loading their models), with backoff; 0 fails at once.
    #[arg(long, env = "OURO_BACKEND_WAIT_S", default_value_t = 600)]
    backend_wait_s: u64,
    #[arg(long, env = "OURO_MAX_RUNNING_REQUESTS", default_value_t = 256)]
    max_running_requests: usize,
    /// A file of API keys (one per line): callers of the public API (gRPC and HTTP, not
    /// health or metrics) must send one as `authorization: Bearer KEY`.
    #[arg(long, env = "OURO_API_KEYS_FILE")]
    api_keys_file: Option<PathBuf>,
    /// API keys, comma-separated (better given by the variable than on a command line).
    #[arg(long, env = "OURO_API_KEYS", hide_env_values = true)]
    api_keys: Option<String>,
    /// Most seconds one call to a target service may take (a verify, a prefill).
    #[arg(long, env = "OURO_TARGET_CALL_TIMEOUT_S", default_value_t = CallLimits::TARGET.call.as_secs_f64())]
    target_call_timeout_s: f64,
    /// Most seconds one call to a draft service may take; past it the request goes on
    /// target-only (still exact; `draft_fallback` says why).
    #[arg(long, env = "OURO_DRAFT_CALL_TIMEOUT_S", default_value_t = CallLimits::DRAFT.call.as_secs_f64())]
    draft_call_timeout_s: f64,
    /// TLS (and mutual TLS) on the public gRPC API.
    #[command(flatten)]
    tls: serving::tls::TlsArgs,
    /// TLS toward the draft and target services.
    #[command(flatten)]
    backend_tls: orchestrator::remote::BackendTlsArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// The in-process target runtime's limits (embedded mode; the same flags and
    /// variables as the target service's).
    #[command(flatten)]
    limits: TargetLimitsArgs,
    /// Defaults for what a request leaves out.
    #[command(flatten)]
    decode: DecodeArgs,
}

pub fn run(a: ServeArgs) -> Result<()> {
    tokio::runtime::Runtime::new()?.block_on(serve(a))
}

async fn serve(a: ServeArgs) -> Result<()> {
    let telemetry = telemetry::init("ouroboros-orchestrator");
    let served = serve_with(a).await;
    telemetry.shutdown().await;
    served
}

async fn serve_with(a: ServeArgs) -> Result<()> {
    let phrase_len = a.decode.phrase_len();
    if let Some(addr) = &a.metrics_listen {
        telemetry::start_metrics(addr).await?;
    }
    let listening = a.tls.listening()?;
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    let http_listener = match a.http_listen.as_str() {
        "off" => None,
        addr => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the HTTP API {addr}"))?,
        ),
    };
    let (service, pool, runner) = match &a.target_endpoint {
        Some(url) => remote(&a, url, phrase_len).await?,
        None => {
            let paths = a.model.paths();
            let limits = embedded::Limits {
                target: TargetConfig {
                    tp_size: a.model.tp,
                    ..a.limits.config()
                },
            };
            if a.model.tp > 1 {
                local(
                    &a,
                    embedded::load_tp(&paths, a.model.tp, phrase_len, &limits)?,
                )
            } else {
                local(&a, embedded::load_single(&paths, phrase_len, &limits)?)
            }
        }
    };
    let service = service.with_max_running(a.max_running_requests);
    let service = match ApiKeys::load(a.api_keys_file.as_deref(), a.api_keys.as_deref())? {
        Some(keys) => {
            tracing::info!("API keys required");
            service.with_api_keys(keys)
        }
        None => {
            tracing::warn!("no API keys: anyone who reaches the API can call it");
            service
        }
    };
    // Snapshots hold token ids: they are kept with the tokenizer they belong to.
    let stamp = stamp_of(service.validator().tokenizer());
    if let Some(p) = &a.pool_snapshot {
        restore(&pool, p, stamp);
    }
    if !a.skip_profile {
        // Before taking traffic, so the timings are of an idle deployment.
        let config = AutoConfig {
            load_margin: a.auto_load_margin,
            ..AutoConfig::default()
        };
        match runner
            .measure_costs(embedded::profile_options(), config)
            .await
        {
            Ok(p) => tracing::info!(profile = %p.describe(), "auto strategy ready"),
            Err(e) => tracing::warn!("no cost profile ({e}); auto requests decode greedily"),
        }
    }
    // On SIGTERM both servers stop taking requests and let those in flight finish.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        serving::server::terminated().await;
        let _ = stop.send(true);
    });
    let on_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let http = http_listener.map(|l| {
        tracing::info!(listen = %a.http_listen, "OpenAI-compatible HTTP API ready");
        tokio::spawn(orchestrator::http::serve(
            service.clone(),
            l,
            on_stop(stopped.clone()),
        ))
    });
    tracing::info!(listen = %a.listen, "ouroboros API ready");
    // Health follows whether the target answers (in process: whether its worker runs).
    let (up, ready) = tokio::sync::watch::channel(true);
    if a.health_check_s > 0 {
        let every = Duration::from_secs(a.health_check_s);
        let runner = runner.clone();
        tokio::spawn(async move {
            while !up.is_closed() {
                tokio::time::sleep(every).await;
                let now = runner.reachable().await;
                // Health is told of changes only.
                up.send_if_modified(|was| {
                    if *was == now {
                        return false;
                    }
                    match now {
                        true => tracing::info!("a target answers again: SERVING"),
                        false => tracing::warn!("no target answers: NOT_SERVING"),
                    }
                    *was = now;
                    true
                });
            }
        });
    }
    let signal = match a.target_endpoint {
        Some(_) => serving::server::Signal::Readiness,
        None => serving::server::Signal::Life,
    };
    orchestrator::serve_ready(
        service,
        listener,
        on_stop(stopped),
        ready,
        signal,
        listening,
    )
    .await?;
    if let Some(h) = http {
        h.await.context("the HTTP server task")??;
    }
    if let Some(p) = &a.pool_snapshot {
        let n = write_snapshot(&pool, p, stamp)
            .with_context(|| format!("writing the pool snapshot {}", p.display()))?;
        tracing::info!(phrases = n, path = %p.display(), "pool snapshot written");
    }
    Ok(())
}

/// Retries `connect` with backoff (0.5 s, doubling to 15 s) until it succeeds or `wait`
/// has passed: a fresh deployment's services may still be loading their models.
async fn patiently<T, F, Fut>(what: &str, wait: Duration, mut connect: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let started = std::time::Instant::now();
    let mut delay = Duration::from_millis(500);
    loop {
        match connect().await {
            Ok(t) => return Ok(t),
            Err(e) if started.elapsed() + delay > wait => {
                return Err(e.context(format!("{what} did not answer within {wait:?}")));
            }
            Err(e) => {
                tracing::warn!("waiting for {what} ({e:#}); trying again in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(15));
            }
        }
    }
}

/// `--auto-load-margin`: a finite number of at least 1.
fn parse_margin(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(m) if m.is_finite() && m >= 1.0 => Ok(m),
        Ok(_) => Err(format!(
            "{s}: the margin is at least 1 (1 asks nothing beyond the price)"
        )),
        Err(e) => Err(format!("{s}: {e}")),
    }
}

fn stamp_of(tokenizer: &tokenizers::Tokenizer) -> VocabStamp {
    let v = engine::vocab::Vocabulary::of_tokenizer(tokenizer, "the tokenizer");
    VocabStamp {
        entries: v.len() as u32,
        fingerprint: v.fingerprint(v.len()),
    }
}

/// Writes the snapshot beside `path`, syncs it and renames it over `path`: a kill at any
/// moment leaves either the old snapshot or the new one, never a torn file.
pub fn write_snapshot(pool: &PhrasePool, path: &Path, stamp: VocabStamp) -> Result<usize> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let file = std::fs::File::create(&tmp)?;
    let mut out = std::io::BufWriter::new(file);
    let n = pool.snapshot(&mut out, stamp)?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(dir)
    {
        // The rename itself, durable.
        let _ = d.sync_all();
    }
    Ok(n)
}

/// Restores a snapshot if there is one. A damaged or foreign one is not a reason to stay
/// down (a crash loop): the server starts with an empty pool and says why.
fn restore(pool: &PhrasePool, p: &Path, stamp: VocabStamp) {
    if !p.exists() {
        return;
    }
    let restored = std::fs::File::open(p)
        .map_err(decoding::pool::SnapshotError::from)
        .and_then(|f| pool.restore(&mut std::io::BufReader::new(f), stamp));
    match restored {
        Ok(n) => tracing::info!(phrases = n, "pool restored (warm start)"),
        Err(e) => tracing::warn!(
            path = %p.display(),
            "pool snapshot not used ({e}); starting with an empty pool"
        ),
    }
}

/// The API service, the pool to snapshot, and the runner to profile.
type Served = (GenerateService, Arc<PhrasePool>, Arc<dyn Runner>);

fn local<T: engine::LanguageModel + 'static>(a: &ServeArgs, e: Embedded<T>) -> Served {
    let defaults = a.decode.params(Strategy::Ouroboros, &e.eos);
    let runner: Arc<dyn Runner> = e.pipeline.clone();
    let service = GenerateService::new(
        runner.clone(),
        Arc::new(e.tokenizer),
        e.chat,
        e.eos,
        defaults,
    );
    (service, e.pipeline.pool.clone(), runner)
}

async fn remote(a: &ServeArgs, url: &str, phrase_len: usize) -> Result<Served> {
    let paths = a.model.paths();
    // The tokenizer given, else the target's own from a local copy of its file.
    let (tokenizer, vocab) = vocabulary::open(paths.tokenizer.as_deref(), &paths.target)
        .context("remote mode runs the tokenizer here: give --tokenizer (a tokenizer.json, a model folder or the target's GGUF file)")?;
    let entries = vocab.len();
    let seconds = |s: f64, flag: &str| {
        Duration::try_from_secs_f64(s)
            .ok()
            .filter(|d| !d.is_zero())
            .with_context(|| format!("--{flag}: a positive number of seconds, got {s}"))
    };
    let target_limits = Arc::new(CallLimits {
        call: seconds(a.target_call_timeout_s, "target-call-timeout-s")?,
        tls: a.backend_tls.for_endpoint(url)?,
        ..CallLimits::TARGET
    });
    let draft_limits = |spec: &str| -> Result<Arc<CallLimits>> {
        Ok(Arc::new(CallLimits {
            call: seconds(a.draft_call_timeout_s, "draft-call-timeout-s")?,
            tls: a.backend_tls.for_endpoint(spec)?,
            ..CallLimits::DRAFT
        }))
    };
    let eos = embedded::stop_ids(Path::new(""), &tokenizer)?;
    let refresh = Duration::from_secs(a.discovery_refresh_s);
    let wait = Duration::from_secs(a.backend_wait_s);
    let target = patiently("the target service", wait, || {
        let limits = target_limits.clone();
        Replicas::connect(
            url,
            move |u| {
                let limits = limits.clone();
                async move { RemoteTarget::connect_for(&u, entries, &limits).await }
            },
            <RemoteTarget as TargetBackend>::info,
            refresh,
        )
    })
    .await?;
    vocabulary::check_service(&vocab, "target", &target.info())?;
    let reported = target.read_first(|t| t.chat_template().cloned()).flatten();
    let drafts = |spec: String, limits: Arc<CallLimits>| async move {
        patiently("the draft service", wait, || {
            let limits = limits.clone();
            Replicas::connect(
                &spec,
                move |u| {
                    let limits = limits.clone();
                    async move { RemoteDraft::connect_for(&u, entries, &limits).await }
                },
                <RemoteDraft as DraftBackend>::info,
                refresh,
            )
        })
        .await
        .map(Arc::new)
    };
    let draft = match &a.draft_endpoint {
        Some(u) => Some(drafts(u.clone(), draft_limits(u)?).await?),
        None => None,
    };
    let lookahead = match &a.lookahead_endpoint {
        Some(u) => Some(drafts(u.clone(), draft_limits(u)?).await?),
        None => None,
    };
    for (role, d) in [("draft", &draft), ("lookahead", &lookahead)] {
        if let Some(d) = d {
            vocabulary::check_service(&vocab, role, &d.info())?;
        }
    }
    let pool = embedded::pool_for(phrase_len);
    let pipeline = Pipeline {
        target: Arc::new(target),
        draft,
        lookahead,
        pool: pool.clone(),
        lookahead_pool: embedded::pool_for(phrase_len),
        trie: Default::default(),
        tuner: Default::default(),
        blocking: false,
    };
    tracing::info!(
        target = url,
        draft = a.draft_endpoint.as_deref().unwrap_or("none"),
        "remote backends connected"
    );
    let chat = Arc::new(embedded::load_chat_template(&paths, None, reported)?);
    let runner: Arc<dyn Runner> = Arc::new(pipeline);
    let defaults = a.decode.params(Strategy::Ouroboros, &eos);
    Ok((
        GenerateService::new(runner.clone(), Arc::new(tokenizer), chat, eos, defaults),
        pool,
        runner,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use decoding::PoolConfig;

    fn pool() -> PhrasePool {
        PhrasePool::new(PoolConfig {
            phrase_len: 2,
            ..PoolConfig::default()
        })
    }

    const STAMP: VocabStamp = VocabStamp {
        entries: 50,
        fingerprint: 0xfeed,
    };

    #[test]
    fn snapshots_are_replaced_whole_and_bad_ones_leave_the_pool_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.bin");
        let first = pool();
        first.insert(1, &[2, 3]);
        assert_eq!(write_snapshot(&first, &path, STAMP).unwrap(), 1);
        // A writer killed mid-write leaves its temporary file; the snapshot is untouched.
        std::fs::write(dir.path().join("pool.bin.tmp"), b"OUROPOOL torn").unwrap();
        let back = pool();
        restore(&back, &path, STAMP);
        assert_eq!(back.all(1), first.all(1));
        // The next write replaces both.
        first.insert(4, &[5, 6]);
        assert_eq!(write_snapshot(&first, &path, STAMP).unwrap(), 2);
        assert!(!dir.path().join("pool.bin.tmp").exists());

        // Foreign (another tokenizer), damaged, or not a snapshot at all: the server starts
        // with an empty pool.
        for bytes in [
            None,
            Some(std::fs::read(&path).unwrap()[..40].to_vec()),
            Some(b"hello".to_vec()),
        ] {
            if let Some(b) = &bytes {
                std::fs::write(&path, b).unwrap();
            }
            let stamp = match bytes {
                None => VocabStamp {
                    fingerprint: 1,
                    ..STAMP
                },
                Some(_) => STAMP,
            };
            let fresh = pool();
            restore(&fresh, &path, stamp);
            assert_eq!(fresh.len(), 0);
        }
    }
}
