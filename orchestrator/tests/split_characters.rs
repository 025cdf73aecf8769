//! Text over gRPC where characters are split across tokens (Qwen's byte-level vocabulary
//! spells rare characters and emoji as several tokens of one or two bytes each): a stream
//! never sends half a character or a replacement character, its pieces add up to the whole
//! answer, and a stop string next to (or made of) such a character cuts the text exactly
//! there, whatever the token batches the decoding loop commits.
//!
//! The runner at the API seam replays a fixed token sequence in batches of a chosen size,
//! as the real loop commits a round's tokens at once; the tokenizer is the fetched Qwen one.

use decoding::{BackendInfo, DecodeParams, Flow, Generation, SpecStats, TokenSource};
use futures::future::BoxFuture;
use orchestrator::api::GenerateService;
use orchestrator::chat::ChatTemplate;
use orchestrator::pipeline::{BoxedSink, Runner};
use proto::v1 as pb;
use proto::v1::ouroboros_client::OuroborosClient;
use std::sync::Arc;
use tokenizers::Tokenizer;

const TEXT: &str = "価格は 🦀🚀 です, naïve 𝔘𝔫𝔦 and done.";

/// Commits `tokens` in batches of `batch` until the sink says stop.
struct Replay {
    tokens: Vec<u32>,
    batch: usize,
}

impl Runner for Replay {
    fn target_info(&self) -> BackendInfo {
        BackendInfo {
            model: "replay".into(),
            vocab_size: 151_936,
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
        let (tokens, batch) = (self.tokens.clone(), self.batch);
        Box::pin(async move {
            let mut out = Vec::new();
            let mut finish = decoding::FinishReason::Eos;
            for chunk in tokens.chunks(batch) {
                let chunk = &chunk[..chunk.len().min(params.max_new_tokens - out.len())];
                out.extend_from_slice(chunk);
                let flow = sink(chunk, &vec![TokenSource::Target; chunk.len()]);
                if flow == Flow::Stop {
                    finish = decoding::FinishReason::Stop;
                    break;
                }
                if out.len() == params.max_new_tokens {
                    finish = decoding::FinishReason::Length;
                    break;
                }
                tokio::task::yield_now().await;
            }
            Ok(Generation {
                sources: vec![TokenSource::Target; out.len()],
                tokens: out,
                finish,
                stats: SpecStats::default(),
                logprobs: Vec::new(),
            })
        })
    }
}

fn qwen() -> Option<Arc<Tokenizer>> {
    let p = engine::testing::fetched_model("qwen-tokenizer.json")?;
    Some(Arc::new(engine::tokenizer::from_file(&p).unwrap()))
}

/// A server replaying `tokens` in batches of `batch`, and a client to it.
async fn serve(
    tok: &Arc<Tokenizer>,
    tokens: &[u32],
    batch: usize,
) -> OuroborosClient<tonic::transport::Channel> {
    let runner = Arc::new(Replay {
        tokens: tokens.to_vec(),
        batch,
    });
    let service = GenerateService::new(
        runner,
        tok.clone(),
        Arc::new(ChatTemplate::chatml()),
        vec![],
        DecodeParams {
            strategy: decoding::Strategy::Greedy,
            ..DecodeParams::default()
        },
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(orchestrator::serve(service, l, std::future::pending()));
    OuroborosClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn request(stop: Option<&str>) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::TokenIds(pb::TokenIds {
            ids: vec![1, 2, 3],
        })),
        max_new_tokens: Some(200),
        strategy: pb::Strategy::Greedy as i32,
        stop: stop.map(|s| vec![s.to_string()]).unwrap_or_default(),
        ..Default::default()
    }
}

/// The streamed messages' texts and the last finish reason.
async fn stream(
    c: &mut OuroborosClient<tonic::transport::Channel>,
    r: pb::GenerateRequest,
) -> (Vec<String>, i32) {
    let mut s = c.generate_stream(r).await.unwrap().into_inner();
    let (mut pieces, mut finish) = (Vec::new(), 0);
    while let Some(m) = s.message().await.unwrap() {
        pieces.push(m.text);
        finish = finish.max(m.finish_reason);
    }
    (pieces, finish)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_characters_stream_whole_and_stop_strings_beside_them_cut_exactly() {
    let Some(tok) = qwen() else { return };
    let ids = engine::tokenizer::encode(&tok, TEXT).unwrap();
    assert_eq!(engine::tokenizer::decode(&tok, &ids, true).unwrap(), TEXT);
    // The case this is about: tokens that hold part of a character.
    let partial = ids
        .iter()
        .filter(|&&t| {
            engine::tokenizer::decode(&tok, &[t], true)
                .unwrap()
                .contains('\u{FFFD}')
        })
        .count();
    assert!(partial >= 4, "{partial} tokens hold part of a character");

    for batch in [1, 2, 3] {
        let mut c = serve(&tok, &ids, batch).await;
        let whole = c.generate(request(None)).await.unwrap().into_inner();
        assert_eq!(whole.text, TEXT, "batches of {batch}");
        let (pieces, _) = stream(&mut c, request(None)).await;
        for p in &pieces {
            assert!(!p.contains('\u{FFFD}'), "batches of {batch}: sent {p:?}");
        }
        assert_eq!(pieces.concat(), TEXT, "batches of {batch}: {pieces:?}");

        // Stop strings right after a split character, made of split characters, and
        // starting with one: the text ends right before, streamed or not, and nothing
        // past the cut is ever sent.
        for stop in [" です", "🚀", "🚀 で", "𝔫𝔦 and", "ïve"] {
            let cut = &TEXT[..TEXT.find(stop).unwrap()];
            let g = c.generate(request(Some(stop))).await.unwrap().into_inner();
            assert_eq!(g.text, cut, "batches of {batch}, stop {stop:?}");
            assert_eq!(g.finish_reason, pb::FinishReason::Stop as i32);
            let (pieces, finish) = stream(&mut c, request(Some(stop))).await;
            let mut sent = String::new();
            for p in &pieces {
                sent += p;
                assert!(
                    cut.starts_with(&sent) && !p.contains('\u{FFFD}'),
                    "batches of {batch}, stop {stop:?}: sent {sent:?}"
                );
            }
            assert_eq!(sent, cut, "batches of {batch}, stop {stop:?}");
            assert_eq!(finish, pb::FinishReason::Stop as i32);
        }
    }
}
