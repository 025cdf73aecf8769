//! The draft scheduler: concurrent draft calls of different sessions advance in shared
//! forwards, one step each, and draft what each would draft alone; a session's long
//! catch-up goes in chunks beside the others' steps.

mod common;

use common::{Gated, poll_once};
use decoding::{DraftLength, DraftRequest, DraftSession, LookaheadParams, PhrasePool, PoolConfig};
use serving::{DraftConfig, DraftRuntime};
use std::sync::Arc;

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + salt) % 500).collect()
}

fn request(gamma: usize) -> DraftRequest {
    DraftRequest {
        new_committed: Vec::new(),
        start: None,
        length: DraftLength::AtLeast(gamma),
        lookahead: None,
        pool_delta: Vec::new(),
        eos: Vec::new(),
    }
}

/// What a session on `tokens` drafts alone, on the ungated model.
fn alone(model: &Gated, tokens: &[u32], gamma: usize) -> Vec<u32> {
    let pool = PhrasePool::new(PoolConfig {
        phrase_len: LookaheadParams::default().phrase_len(),
        ..PoolConfig::default()
    });
    let mut s = DraftSession::open(&model.inner, tokens).unwrap();
    s.draft(&model.inner, &pool, &request(gamma))
        .unwrap()
        .tokens
}

fn runtime(model: &Arc<Gated>, chunk: usize) -> Arc<DraftRuntime<Gated>> {
    let config = DraftConfig {
        catch_up_chunk: chunk,
        ..DraftConfig::default()
    };
    Arc::new(DraftRuntime::new(model.clone(), config))
}

/// Waits (off the async workers) until `n` forwards have started.
async fn forwards_started(model: &Arc<Gated>, n: usize) {
    let m = model.clone();
    tokio::task::spawn_blocking(move || m.wait_for_forwards(n))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_draft_calls_share_forwards() {
    let model = Arc::new(Gated::new());
    let rt = runtime(&model, 64);
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| prompt(6, i)).collect();
    let ids: Vec<u64> = prompts
        .iter()
        .map(|p| rt.open_session(p).unwrap())
        .collect();

    // A's first step holds the model; B, C and D arrive meanwhile.
    model.set_closed(true);
    let mut calls = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        let rt = rt.clone();
        let mut call = Box::pin(async move { rt.draft_call(id, request(4)).await });
        poll_once(&mut call).await;
        if i == 0 {
            forwards_started(&model, 1).await;
        }
        calls.push(call);
    }
    model.set_closed(false);
    let mut outcomes = Vec::new();
    for call in calls {
        outcomes.push(call.await.unwrap());
    }

    for (i, (outcome, timing)) in outcomes.iter().enumerate() {
        assert_eq!(outcome.tokens, alone(&model, &prompts[i], 4), "session {i}");
        assert_eq!(outcome.forwards, 4, "session {i}");
        // B, C and D rode every one of their forwards with the other three.
        if i > 0 {
            assert_eq!(timing.batch_trees, 4, "session {i}");
        }
    }
    // 16 steps in 5 forwards: A's prefill step alone, then A's second step with the
    // others' prefill steps, then one row each.
    let log = model.log();
    assert_eq!(log[0], vec![6], "{log:?}");
    assert_eq!(log[1], vec![1, 6, 6, 6], "{log:?}");
    assert_eq!(log[2..], [vec![1; 4], vec![1; 4], vec![1; 3]], "{log:?}");
    assert_eq!(rt.sessions().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_catch_up_goes_in_chunks_beside_other_sessions_steps() {
    let model = Arc::new(Gated::new());
    let rt = runtime(&model, 8);
    let short = prompt(3, 1);
    let long = prompt(41, 2);
    let (a, b) = (
        rt.open_session(&short).unwrap(),
        rt.open_session(&long).unwrap(),
    );
    model.set_closed(true);
    let rt_a = rt.clone();
    let mut call_a = Box::pin(async move { rt_a.draft_call(a, request(6)).await });
    poll_once(&mut call_a).await;
    forwards_started(&model, 1).await;
    let rt_b = rt.clone();
    let mut call_b = Box::pin(async move { rt_b.draft_call(b, request(2)).await });
    poll_once(&mut call_b).await;
    model.set_closed(false);
    let (got_a, _) = call_a.await.unwrap();
    let (got_b, _) = call_b.await.unwrap();
    assert_eq!(got_a.tokens, alone(&model, &short, 6));
    // The chunked catch-up left the cache a one-shot one leaves: B drafts alike.
    assert_eq!(got_b.tokens, alone(&model, &long, 2));
    // B's 40 unseen tokens and its first step: 8-row chunks while more than 9 remain,
    // then the last 9 with the step; each of those forwards also carries A's one row.
    let log = model.log();
    assert_eq!(log[0], vec![3], "{log:?}");
    assert_eq!(
        log[1..6],
        [vec![1, 8], vec![1, 8], vec![1, 8], vec![1, 8], vec![1, 9]],
        "{log:?}"
    );
    assert!(log.iter().all(|f| f.iter().sum::<usize>() <= 10), "{log:?}");
}

/// A call whose caller left (an overlapped draft call stopped at the target's verdict)
/// ends at its next forward instead of drafting on, and the session's next call starts
/// then, on the state the first call left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_caller_left_ends_at_its_next_forward() {
    let model = Arc::new(Gated::new());
    let rt = runtime(&model, 64);
    let p = prompt(6, 5);
    let id = rt.open_session(&p).unwrap();
    model.set_closed(true);
    let rt_1 = rt.clone();
    let mut first = Box::pin(async move { rt_1.draft_call(id, request(20)).await });
    poll_once(&mut first).await;
    forwards_started(&model, 1).await;
    drop(first);
    let rt_2 = rt.clone();
    let again = DraftRequest {
        start: Some(p.len()),
        ..request(3)
    };
    let mut second = Box::pin(async move { rt_2.draft_call(id, again).await });
    poll_once(&mut second).await;
    model.set_closed(false);
    let (got, _) = second.await.unwrap();
    assert_eq!(got.tokens, alone(&model, &p, 3));
    // The first call's prefill step, then the second call's three steps (a call drafts
    // anew from the committed text): none of the first call's other 19.
    let log = model.log();
    assert_eq!(log, [vec![6], vec![1], vec![1], vec![1]], "{log:?}");
}
