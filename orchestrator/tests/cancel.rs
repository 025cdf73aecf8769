//! A request whose caller leaves (a dropped call, a gRPC deadline) stops its decoding work
//! at the next commit, and `ouro_requests_running` returns to zero when that work ends;
//! past the most requests running at once, new ones are refused until places free up.
//! The runner here works like the real pipeline: on a task of its own, detached from the
//! call, committing a token every few milliseconds until its sink says stop.

use decoding::{BackendInfo, DecodeParams, Flow, Generation, SpecStats, TokenSource};
use futures::future::BoxFuture;
use orchestrator::api::GenerateService;
use orchestrator::chat::ChatTemplate;
use orchestrator::pipeline::{BoxedSink, Runner};
use proto::v1 as pb;
use proto::v1::ouroboros_client::OuroborosClient;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const ENOUGH: usize = 100_000;

/// The tests read the process-wide `ouro_requests_running` gauge: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Default)]
struct Slow {
    /// Tokens committed by the last request, and whether it has ended.
    committed: Arc<AtomicUsize>,
    ended: Arc<AtomicUsize>,
}

impl Runner for Slow {
    fn target_info(&self) -> BackendInfo {
        BackendInfo {
            model: "slow".into(),
            vocab_size: 32,
            max_position: 1 << 20,
            vocab: None,
        }
    }
    fn run(
        &self,
        _: Vec<u32>,
        params: DecodeParams,
        mut sink: BoxedSink,
    ) -> BoxFuture<'static, decoding::Result<Generation>> {
        let (committed, ended) = (self.committed.clone(), self.ended.clone());
        committed.store(0, Ordering::SeqCst);
        let work = tokio::spawn(async move {
            let mut tokens = Vec::new();
            let mut finish = decoding::FinishReason::Length;
            while tokens.len() < params.max_new_tokens {
                tokio::time::sleep(Duration::from_millis(2)).await;
                tokens.push(5);
                committed.fetch_add(1, Ordering::SeqCst);
                if sink(&[5], &[TokenSource::Target]) == Flow::Stop {
                    finish = decoding::FinishReason::Stop;
                    break;
                }
            }
            drop(sink);
            ended.fetch_add(1, Ordering::SeqCst);
            Ok(Generation {
                sources: vec![TokenSource::Target; tokens.len()],
                tokens,
                finish,
                stats: SpecStats::default(),
                logprobs: Vec::new(),
            })
        });
        Box::pin(async move { work.await.expect("the work task") })
    }
}

fn service(runner: Arc<Slow>) -> GenerateService {
    GenerateService::new(
        runner,
        Arc::new(orchestrator::testing::word_tokenizer(32)),
        Arc::new(ChatTemplate::chatml()),
        vec![],
        DecodeParams {
            strategy: decoding::Strategy::Greedy,
            ..DecodeParams::default()
        },
    )
}

fn long_request() -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::TokenIds(pb::TokenIds {
            ids: vec![1, 2, 3],
        })),
        max_new_tokens: Some(ENOUGH as u32),
        strategy: pb::Strategy::Greedy as i32,
        ..Default::default()
    }
}

/// Waits until the runner's work has ended `n` times.
async fn ended(runner: &Slow, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while runner.ended.load(Ordering::SeqCst) < n {
        assert!(Instant::now() < deadline, "the work did not stop");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_stops_when_the_caller_leaves() {
    let _one = SERIAL.lock().await;
    let runner = Arc::new(Slow::default());
    let s = service(runner.clone());
    let running = || telemetry::metrics().in_flight.get();

    // A call dropped by its caller (a client that went away, an HTTP handler cancelled).
    let dropped = tokio::time::timeout(Duration::from_millis(100), s.complete(long_request()));
    assert!(dropped.await.is_err(), "the call should still be running");
    ended(&runner, 1).await;
    let at_stop = runner.committed.load(Ordering::SeqCst);
    assert!(
        at_stop < ENOUGH / 10,
        "{at_stop} tokens after the caller left"
    );
    assert_eq!(running(), 0);

    // A gRPC client's deadline: the server drops the call and the work stops.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(orchestrator::serve(s.clone(), l, std::future::pending()));
    let mut client = OuroborosClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut r = tonic::Request::new(long_request());
    r.set_timeout(Duration::from_millis(150));
    let status = client.generate(r).await.unwrap_err();
    assert!(
        matches!(
            status.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{status:?}"
    );
    ended(&runner, 2).await;
    assert!(runner.committed.load(Ordering::SeqCst) < ENOUGH / 10);
    assert_eq!(running(), 0);

    // A call that is awaited to its end is not cut short.
    let mut whole = long_request();
    whole.max_new_tokens = Some(20);
    let g = s.complete(whole).await.unwrap();
    assert_eq!(g.token_ids.len(), 20);
    assert_eq!(running(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_limit_are_refused_until_one_ends() {
    let _one = SERIAL.lock().await;
    use futures::StreamExt;
    let runner = Arc::new(Slow::default());
    let s = service(runner.clone()).with_max_running(1);
    let mut first = s.stream(long_request()).await.unwrap();
    // It runs: its first tokens arrive.
    assert!(first.next().await.unwrap().is_ok());
    let refused = s.complete(long_request()).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    let Err(refused) = s.stream(long_request()).await else {
        panic!("a second stream is refused")
    };
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    // The first client leaves: its work stops and its place frees.
    drop(first);
    ended(&runner, 1).await;
    let mut short = long_request();
    short.max_new_tokens = Some(5);
    assert_eq!(s.complete(short).await.unwrap().token_ids.len(), 5);
}
