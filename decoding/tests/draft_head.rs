//! A draft with a narrowed output head (`LoadOptions::head_vocab`) still proposes the
//! tokens its text has held beyond the head, scored exactly as the whole head scores them.

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use decoding::{
    DraftBackend, DraftLength, DraftRequest, LocalDraft, LookaheadParams, PhrasePool, PoolConfig,
};
use engine::testing::{random_weights, tiny_config, write_gguf};
use engine::weights::Role;
use engine::{Architecture, LoadOptions, Transformer};
use futures::executor::block_on;
use std::sync::Arc;

fn models() -> (Arc<Transformer>, Arc<Transformer>) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Qwen2);
    assert_eq!(cfg.vocab_size, 96);
    let path = dir.path().join("draft.gguf");
    let mut w = random_weights(&cfg, 11, true, false).unwrap();
    // A random model settles on one token; output rows past the head made three times
    // as long have them drafted often.
    for (role, t) in &mut w {
        if *role == Role::LmHead {
            let tail = (t.narrow(0, 48, 48).unwrap() * 3.0).unwrap();
            *t = Tensor::cat(&[&t.narrow(0, 0, 48).unwrap(), &tail], 0).unwrap();
        }
    }
    write_gguf(&path, &cfg, &w, GgmlDType::Q8_0).unwrap();
    let load = |head_vocab| {
        let opts = LoadOptions {
            head_vocab,
            ..LoadOptions::default()
        };
        Arc::new(engine::load_model(&path, &opts, &Device::Cpu).unwrap())
    };
    (load(None), load(Some(48)))
}

fn drafts(
    model: &Arc<Transformer>,
    prompt: &[u32],
    lookahead: Option<LookaheadParams>,
) -> Vec<u32> {
    let g = lookahead.map_or(2, |l| l.phrase_len());
    let pool = Arc::new(PhrasePool::new(PoolConfig {
        phrase_len: g,
        per_key: 8,
        max_phrases: 1000,
    }));
    let draft = LocalDraft::new(model.clone(), pool);
    let id = block_on(draft.open(prompt)).unwrap();
    let mut out = Vec::new();
    let mut new_committed = Vec::new();
    for _ in 0..4 {
        let chain = block_on(draft.draft(
            id,
            DraftRequest {
                new_committed: std::mem::take(&mut new_committed),
                start: None,
                length: DraftLength::new(6, 0.0),
                lookahead,
                pool_delta: Vec::new(),
                eos: Vec::new(),
            },
        ))
        .unwrap()
        .0
        .tokens;
        // The target takes the chain but its last token: the draft catches up each round.
        new_committed = chain[..chain.len() - 1].to_vec();
        out.extend(chain);
    }
    out
}

#[test]
fn a_narrow_draft_head_drafts_what_the_whole_head_drafts_over_the_tokens_its_text_held() {
    let (full, narrow) = models();
    // Every token past the head is in the prompt, so the narrowed draft may propose any.
    let mut everything: Vec<u32> = (48..96).rev().collect();
    everything.extend([5, 17, 60, 2]);
    let plain: Vec<u32> = vec![5, 17, 30, 2, 9, 41, 7];
    for lookahead in [
        None,
        Some(LookaheadParams {
            level: 3,
            window: 2,
            guess: 2,
        }),
    ] {
        let want = drafts(&full, &everything, lookahead);
        assert!(
            want.iter().any(|&t| t >= 48),
            "{lookahead:?}: the whole head never drafted past token 48: {want:?}"
        );
        assert_eq!(
            drafts(&narrow, &everything, lookahead),
            want,
            "{lookahead:?}"
        );
        // A text without such tokens leaves the narrowed head to its own.
        let own = drafts(&narrow, &plain, lookahead);
        assert!(own.iter().all(|&t| t < 48), "{lookahead:?}: {own:?}");
        assert_ne!(own, drafts(&full, &plain, lookahead), "{lookahead:?}");
    }
}
