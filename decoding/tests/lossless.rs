//! Exact losslessness on the hash mock model: every strategy, with any draft (perfect,
//! adversarial) and any parameters, commits exactly the tokens plain decoding commits,
//! greedy and seeded sampling alike. The mock's outputs hash the visible token path, so any
//! mask, position or KV bookkeeping error changes the output.

use decoding::{
    AutoTuner, CostProfile, DecodeParams, DraftCost, FinishReason, Flow, LocalDraft, LocalTarget,
    LookaheadParams, PhrasePool, Policy, PolicyScores, PoolConfig, SEGMENT_TOKENS, SamplingParams,
    Shared, Strategy, TokenSource, TrieCache, TrieConfig, generate,
};
use engine::{LanguageModel, MockModel, OutputSpec, SeqInput};
use futures::executor::block_on;
use std::sync::Arc;

const VOCAB: usize = 40;

/// Every strategy that samples (lookahead decodes greedily only).
const SAMPLING: [Strategy; 5] = [
    Strategy::Greedy,
    Strategy::Speculative,
    Strategy::Trie,
    Strategy::Ouroboros,
    Strategy::Auto,
];

fn target_model() -> Arc<MockModel> {
    Arc::new(MockModel::new(VOCAB, 2048, 0.7, 1))
}

/// A draft that agrees with `target` (itself), one that mostly agrees (the same weights
/// made less sure of themselves) and an adversarial one.
fn three_drafts(target: &Arc<MockModel>) -> [(&'static str, Arc<MockModel>); 3] {
    [
        ("perfect", target.clone()),
        ("weak", Arc::new(MockModel::new(VOCAB, 2048, 0.4, 1))),
        (
            "adversarial",
            Arc::new(MockModel::new(VOCAB, 2048, 0.7, 99)),
        ),
    ]
}

/// Reference: the model alone, one token per forward, no tree, no pool.
fn plain_decode(m: &MockModel, prompt: &[u32], n: usize, sampling: &SamplingParams) -> Vec<u32> {
    let mut cache = m.new_cache();
    let mut text = prompt.to_vec();
    let mut fed = 0;
    let mut out = Vec::new();
    while out.len() < n {
        let positions: Vec<u32> = (fed as u32..text.len() as u32).collect();
        let o = m
            .forward(
                &mut cache,
                SeqInput::chain(
                    &text[fed..],
                    &positions,
                    OutputSpec::last(text.len() - fed).with_logits(),
                ),
            )
            .unwrap();
        fed = text.len();
        let logits = &o.logits.unwrap()[0];
        let t = sampling.choose(logits, text.len() as u32);
        text.push(t);
        out.push(t);
    }
    out
}

/// A profile where tree rows are nearly free and draft tokens cost a twentieth of a
/// step, so `auto` drafts and verifies wide trees.
fn cheap_tuner() -> AutoTuner {
    tuner(&[(1, 1.0), (64, 1.3)], 0.05)
}

fn tuner(verify: &[(usize, f64)], per_token: f64) -> AutoTuner {
    let draft = DraftCost {
        per_call: 0.0,
        per_token,
        catch_up: per_token,
    };
    AutoTuner::new(CostProfile::new(verify.to_vec(), Some(draft)).unwrap())
}

fn pool(g: usize) -> Arc<PhrasePool> {
    Arc::new(PhrasePool::new(PoolConfig {
        phrase_len: g,
        per_key: 8,
        max_phrases: 10_000,
    }))
}

/// A shared trie filled with `junk` sequences, so its continuations are mostly wrong.
fn junk_trie(junk: impl IntoIterator<Item = Vec<u32>>) -> TrieCache {
    let trie = TrieCache::new(TrieConfig {
        branch_len: 8,
        ..TrieConfig::default()
    });
    for seq in junk {
        trie.record(&seq, 0);
    }
    trie
}

fn run(
    target: &Arc<MockModel>,
    draft_model: &Arc<MockModel>,
    pool: &Arc<PhrasePool>,
    prompt: &[u32],
    params: &DecodeParams,
) -> decoding::Generation {
    run_with_trie(
        target,
        draft_model,
        pool,
        &TrieCache::default(),
        prompt,
        params,
    )
}

fn run_with_trie(
    target: &Arc<MockModel>,
    draft_model: &Arc<MockModel>,
    pool: &Arc<PhrasePool>,
    trie: &TrieCache,
    prompt: &[u32],
    params: &DecodeParams,
) -> decoding::Generation {
    let t = LocalTarget::new(target.clone());
    run_on(&t, target, draft_model, pool, trie, prompt, params)
}

/// [`run_with_trie`] against any target backend over `target` (the lookahead baseline's
/// host).
fn run_on(
    t: &impl decoding::TargetBackend,
    target: &Arc<MockModel>,
    draft_model: &Arc<MockModel>,
    pool: &Arc<PhrasePool>,
    trie: &TrieCache,
    prompt: &[u32],
    params: &DecodeParams,
) -> decoding::Generation {
    let g = params.lookahead.phrase_len();
    let host_pool = if params.strategy == Strategy::Lookahead {
        self::pool(g)
    } else {
        pool.clone()
    };
    let draft_on = if params.strategy == Strategy::Lookahead {
        target.clone()
    } else {
        draft_model.clone()
    };
    let d = LocalDraft::new(draft_on, host_pool);
    let mut streamed = Vec::new();
    let mut streamed_sources = Vec::new();
    let tuner = cheap_tuner();
    let shared = Shared {
        pool,
        trie,
        tuner: Some(&tuner),
    };
    let out = block_on(generate(
        t,
        Some(&d),
        shared,
        prompt,
        params,
        &mut |toks: &[u32], sources: &[TokenSource]| {
            assert_eq!(toks.len(), sources.len());
            streamed.extend_from_slice(toks);
            streamed_sources.extend_from_slice(sources);
            Flow::Continue
        },
    ))
    .unwrap_or_else(|e| panic!("{:?}: {e}", params.strategy));
    assert_eq!(
        streamed, out.tokens,
        "the stream carries exactly the output"
    );
    assert_eq!(streamed_sources, out.sources);
    check_sources(&out, params.strategy);
    out
}

/// One request over `target` and `draft` with a fresh trie, `pool` shared, the output
/// not streamed anywhere.
fn generate_with(
    target: &impl decoding::TargetBackend,
    draft: &impl decoding::DraftBackend,
    pool: &PhrasePool,
    tuner: Option<&AutoTuner>,
    prompt: &[u32],
    params: &DecodeParams,
) -> decoding::Result<decoding::Generation> {
    let trie = TrieCache::default();
    let shared = Shared {
        pool,
        trie: &trie,
        tuner,
    };
    let sink = &mut |_: &[u32], _: &[TokenSource]| Flow::Continue;
    block_on(generate(target, Some(draft), shared, prompt, params, sink))
}

/// Token sources agree with the statistics: the draft's tokens are the accepted chain,
/// pool and trie tokens the accepted candidates, and the rest the target's own.
fn check_sources(out: &decoding::Generation, strategy: Strategy) {
    let count = |s: TokenSource| out.sources.iter().filter(|&&x| x == s).count() as u64;
    let (draft, pool, trie) = (
        count(TokenSource::Draft),
        count(TokenSource::Pool),
        count(TokenSource::Trie),
    );
    let target = count(TokenSource::Target);
    assert_eq!(out.sources.len(), out.tokens.len());
    match strategy {
        Strategy::Greedy => assert_eq!(target, out.tokens.len() as u64),
        Strategy::Lookahead => {
            assert_eq!(draft + trie, 0);
            assert_eq!(out.sources.first(), Some(&TokenSource::Target));
        }
        _ => {
            let s = &out.stats;
            assert_eq!(draft, s.accepted, "{strategy:?}");
            assert_eq!(pool + trie, s.candidate_tokens, "{strategy:?}");
            assert!(trie <= s.trie_accepted, "{strategy:?}");
            // One target token per verify that committed anything.
            assert!(target <= s.target_forwards, "{strategy:?}");
            if strategy == Strategy::Speculative {
                assert_eq!(pool + trie, 0);
            }
        }
    }
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![3],
        vec![1, 2, 3, 4, 5, 6, 7, 8],
        (0..30).map(|i| (i * 7 % VOCAB) as u32).collect(),
        vec![9, 9, 9, 9, 2, 9, 9, 9, 9, 2],
    ]
}

#[test]
fn every_strategy_equals_plain_greedy() {
    let target = target_model();
    let drafts = [
        ("perfect draft", target.clone()),
        (
            "adversarial draft",
            Arc::new(MockModel::new(VOCAB, 2048, 0.7, 99)),
        ),
    ];
    let mut checked = 0;
    let mut candidate_tokens = 0;
    let mut multi = 0;
    let mut trie_tokens = 0;
    for (name, draft) in &drafts {
        for (level, window, gamma, topk, trie_budget, draft_stop) in [
            (3, 1, 1, 0, 1, 0.0),
            (4, 3, 4, 2, 4, 0.3),
            (5, 5, 7, 3, 8, 0.05),
            (7, 8, 12, 3, 64, 0.5),
            (3, 2, 2, 16, 0, 0.0),
        ] {
            let la = LookaheadParams {
                level,
                window,
                guess: window,
            };
            let pool = pool(la.phrase_len());
            // garbage the pool so candidates are often wrong
            for k in 0..VOCAB as u32 {
                pool.insert(k, &vec![(k * 3) % VOCAB as u32; la.phrase_len()]);
            }
            // ... and the trie: every key followed by wrong runs
            let trie = junk_trie((0..VOCAB as u32).map(|k| vec![k, (k * 3) % 40, k, 7, 7, 7]));
            for strategy in Strategy::ALL {
                if strategy == Strategy::Trie && trie_budget == 0 {
                    continue;
                }
                for prompt in prompts() {
                    let n = 60;
                    let params = DecodeParams {
                        strategy,
                        max_new_tokens: n,
                        gamma,
                        lookahead: la,
                        topk,
                        trie_budget,
                        draft_stop,
                        ..DecodeParams::default()
                    };
                    let want = plain_decode(&target, &prompt, n, &SamplingParams::greedy());
                    let out = run_with_trie(&target, draft, &pool, &trie, &prompt, &params);
                    assert_eq!(
                        out.tokens, want,
                        "{name} {strategy:?} N={level} W={window} gamma={gamma} k={topk} trie={trie_budget} stop={draft_stop} prompt {prompt:?}"
                    );
                    trie_tokens += out.stats.trie_accepted;
                    assert_eq!(out.finish, FinishReason::Length);
                    assert_eq!(out.stats.committed, n as u64);
                    candidate_tokens += out.stats.candidate_tokens;
                    if out.stats.mean_accepted_length() > 1.5 {
                        multi += 1;
                    }
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 2 * (6 * 5 - 1) * 4);
    // the comparison is not vacuous: drafts and candidates were really accepted
    assert!(
        candidate_tokens > 0,
        "no candidate suffix was ever accepted"
    );
    assert!(
        multi > 20,
        "only {multi} runs committed >1.5 tokens per forward"
    );
    assert!(trie_tokens > 0, "no trie token was ever accepted");
}

/// The trie strategy against tries that are wrong on purpose (the exact output with one
/// token in three changed, seen many times so it ranks first) and tries that are right
/// (the output of an earlier request): always the plain greedy tokens, and a warm trie
/// commits many tokens per forward.
#[test]
fn the_trie_strategy_is_exact_for_any_trie_contents() {
    let target = target_model();
    for prompt in prompts() {
        let n = 48;
        let want = plain_decode(&target, &prompt, n, &SamplingParams::greedy());
        let mut wrong: Vec<u32> = prompt.iter().chain(&want).copied().collect();
        for (i, t) in wrong.iter_mut().enumerate() {
            if i % 3 == 1 {
                *t = (*t + 1) % VOCAB as u32;
            }
        }
        let adversarial = junk_trie(std::iter::repeat_n(wrong, 5));
        for budget in [1, 3, 12, 40] {
            let params = DecodeParams {
                strategy: Strategy::Trie,
                max_new_tokens: n,
                trie_budget: budget,
                ..DecodeParams::default()
            };
            let out = run_with_trie(&target, &target, &pool(3), &adversarial, &prompt, &params);
            assert_eq!(out.tokens, want, "adversarial trie, budget {budget}");
            assert!(
                out.stats.trie_hits > 0,
                "the adversarial trie was consulted"
            );
        }
        // Warm start: the second run of the same prompt finds the first run's output.
        let trie = TrieCache::default();
        let params = DecodeParams {
            strategy: Strategy::Trie,
            max_new_tokens: n,
            trie_budget: 16,
            ..DecodeParams::default()
        };
        let cold = run_with_trie(&target, &target, &pool(3), &trie, &prompt, &params);
        let warm = run_with_trie(&target, &target, &pool(3), &trie, &prompt, &params);
        assert_eq!(cold.tokens, want);
        assert_eq!(warm.tokens, want);
        assert!(
            warm.stats.mean_accepted_length() > 4.0,
            "warm trie: {:.2} tokens per forward",
            warm.stats.mean_accepted_length()
        );
        assert!(warm.stats.trie_accepted as usize >= n / 2);
        assert!(warm.stats.trie_cache_nodes > 0);
    }
}

/// Text that repeats (here the mock's favourite token follows from the previous token
/// alone, so the output soon runs in a cycle) is copied: the trie strategy commits more
/// tokens per forward than its trie nodes could give, and exactly plain greedy's tokens.
#[test]
fn the_trie_strategy_copies_repeated_text() {
    let target = Arc::new(MockModel::new(VOCAB, 2048, 1.0, 3));
    let prompt = vec![1, 2, 3];
    let n = 200;
    let params = DecodeParams {
        strategy: Strategy::Trie,
        max_new_tokens: n,
        trie_budget: 2,
        ..DecodeParams::default()
    };
    let want = plain_decode(&target, &prompt, n, &SamplingParams::greedy());
    let trie = TrieCache::default();
    let out = run_with_trie(&target, &target, &pool(3), &trie, &prompt, &params);
    assert_eq!(out.tokens, want);
    let per_forward = out.stats.mean_accepted_length();
    assert!(
        per_forward > (params.trie_budget + 1) as f64 * 2.0,
        "{per_forward:.2} tokens per forward: at most {} without copies",
        params.trie_budget + 1
    );
}

/// Sampled decoding through every strategy equals plain sampling with the same seed, with
/// a draft that agrees with the target, one that mostly agrees and an adversarial one; and
/// drafted tokens are really accepted under sampling (speculation is not quietly off).
#[test]
fn seeded_sampling_is_lossless() {
    let target = target_model();
    let drafts = three_drafts(&target);
    let mut accepted = std::collections::HashMap::new();
    for (name, draft) in &drafts {
        for (temperature, top_k, top_p) in [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.9)] {
            for seed in [1u64, 2, 3] {
                let sampling = SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    seed,
                };
                for strategy in SAMPLING {
                    let la = LookaheadParams {
                        level: 4,
                        window: 4,
                        guess: 4,
                    };
                    let pool = pool(la.phrase_len());
                    for prompt in prompts() {
                        let params = DecodeParams {
                            strategy,
                            max_new_tokens: 40,
                            sampling,
                            gamma: 5,
                            lookahead: la,
                            topk: 2,
                            ..DecodeParams::default()
                        };
                        let want = plain_decode(&target, &prompt, 40, &sampling);
                        let out = run(&target, draft, &pool, &prompt, &params);
                        assert_eq!(
                            out.tokens, want,
                            "{name} draft, {strategy:?} {sampling:?} prompt {prompt:?}"
                        );
                        if strategy == Strategy::Speculative {
                            *accepted.entry(*name).or_insert(0) += out.stats.accepted;
                        }
                    }
                }
            }
        }
    }
    eprintln!("accepted draft tokens under sampling, speculative: {accepted:?}");
    // A draft that agrees gets tokens accepted under sampling; a weak one too, less often.
    assert!(accepted["perfect"] > 100, "{accepted:?}");
    assert!(accepted["weak"] > 0, "{accepted:?}");
    assert!(
        accepted["perfect"] > accepted["adversarial"],
        "{accepted:?}"
    );
}

#[test]
fn generation_ends_after_the_first_eos() {
    let target = target_model();
    let prompt = vec![1, 2, 3, 4, 5];
    let want = plain_decode(&target, &prompt, 80, &SamplingParams::greedy());
    let eos = want[17];
    let end = want.iter().position(|&t| t == eos).unwrap() + 1;
    for strategy in Strategy::ALL {
        let la = LookaheadParams {
            level: 4,
            window: 4,
            guess: 4,
        };
        let params = DecodeParams {
            strategy,
            max_new_tokens: 80,
            eos: vec![eos],
            gamma: 6,
            lookahead: la,
            ..DecodeParams::default()
        };
        let out = run(&target, &target, &pool(3), &prompt, &params);
        assert_eq!(out.tokens, want[..end], "{strategy:?}");
        assert_eq!(out.finish, FinishReason::Eos);
    }
}

/// Sampling and EOS together: every strategy that samples, with a draft that agrees only sometimes,
/// ends right after the first EOS of the target's own sampled continuation, with exactly its
/// tokens, whether the EOS came from the target or from accepted draft or pool tokens.
#[test]
fn sampled_generation_ends_after_the_first_eos() {
    let target = target_model();
    let weak = Arc::new(MockModel::new(VOCAB, 2048, 0.4, 1));
    let prompt = vec![1, 2, 3, 4, 5];
    let la = LookaheadParams {
        level: 4,
        window: 4,
        guess: 4,
    };
    let mut ended_by_draft = 0;
    for seed in [4u64, 5, 6] {
        let sampling = SamplingParams {
            temperature: 0.8,
            top_k: 8,
            top_p: 0.95,
            seed,
        };
        let want = plain_decode(&target, &prompt, 80, &sampling);
        // An EOS some way in, at its first occurrence.
        let eos = want[20];
        let end = want.iter().position(|&t| t == eos).unwrap() + 1;
        for strategy in SAMPLING {
            let params = DecodeParams {
                strategy,
                max_new_tokens: 80,
                eos: vec![eos],
                sampling,
                gamma: 5,
                lookahead: la,
                topk: 2,
                ..DecodeParams::default()
            };
            let out = run(&target, &weak, &pool(la.phrase_len()), &prompt, &params);
            assert_eq!(out.tokens, want[..end], "{strategy:?} seed {seed}");
            assert_eq!(out.finish, FinishReason::Eos, "{strategy:?} seed {seed}");
            if out.sources.last() != Some(&TokenSource::Target) {
                ended_by_draft += 1;
            }
        }
    }
    println!("EOS accepted from a drafted or guessed token in {ended_by_draft} runs");
    assert!(ended_by_draft > 0, "no run ended on an accepted guess");
}

#[test]
fn the_sink_can_stop_generation() {
    let target = target_model();
    let t = LocalTarget::new(target.clone());
    let pool = pool(3);
    let d = LocalDraft::new(target.clone(), pool.clone());
    let params = DecodeParams {
        strategy: Strategy::Ouroboros,
        lookahead: LookaheadParams {
            level: 4,
            window: 3,
            guess: 3,
        },
        ..DecodeParams::default()
    };
    let mut seen = 0;
    let trie = TrieCache::default();
    let shared = Shared {
        pool: &pool,
        trie: &trie,
        tuner: None,
    };
    let out = block_on(generate(
        &t,
        Some(&d),
        shared,
        &[1, 2],
        &params,
        &mut |toks: &[u32], _: &[TokenSource]| {
            seen += toks.len();
            if seen >= 10 {
                Flow::Stop
            } else {
                Flow::Continue
            }
        },
    ))
    .unwrap();
    assert_eq!(out.finish, FinishReason::Stop);
    // It ended with the batch the sink stopped on: the sink saw every token returned and
    // nothing was committed after, well before the 256-token budget; and they are greedy's.
    assert!(out.tokens.len() >= 10);
    assert_eq!(out.tokens.len(), seen);
    assert!(seen < 10 + params.gamma + params.topk * 4, "{seen} tokens");
    let want = plain_decode(&target, &[1, 2], seen, &SamplingParams::greedy());
    assert_eq!(out.tokens, want);
}

#[test]
fn context_limit_ends_generation_cleanly() {
    let target = Arc::new(MockModel::new(VOCAB, 48, 0.7, 1));
    let prompt: Vec<u32> = (0..30).map(|i| i % VOCAB as u32).collect();
    for strategy in Strategy::ALL {
        let params = DecodeParams {
            strategy,
            max_new_tokens: 100,
            lookahead: LookaheadParams {
                level: 4,
                window: 4,
                guess: 4,
            },
            ..DecodeParams::default()
        };
        let out = run(&target, &target, &pool(3), &prompt, &params);
        assert_eq!(out.finish, FinishReason::ContextFull, "{strategy:?}");
        assert_eq!(out.tokens.len(), 48 - 30, "{strategy:?}");
        let want = plain_decode(&target, &prompt, 48 - 30, &SamplingParams::greedy());
        assert_eq!(out.tokens, want, "{strategy:?}");
    }
}

#[test]
fn a_missing_draft_falls_back_to_target_only() {
    let target = target_model();
    let t = LocalTarget::new(target.clone());
    let pool = pool(6);
    let params = DecodeParams {
        max_new_tokens: 20,
        ..DecodeParams::default()
    };
    let trie = TrieCache::default();
    let shared = Shared {
        pool: &pool,
        trie: &trie,
        tuner: None,
    };
    let out = block_on(generate::<_, LocalDraft<MockModel>>(
        &t,
        None,
        shared,
        &[5, 6],
        &params,
        &mut |_: &[u32], _: &[TokenSource]| Flow::Continue,
    ))
    .unwrap();
    assert_eq!(
        out.tokens,
        plain_decode(&target, &[5, 6], 20, &SamplingParams::greedy())
    );
    assert!(out.stats.draft_fallback.is_some());
}

#[test]
fn bad_requests_are_refused() {
    let target = target_model();
    let t = LocalTarget::new(target.clone());
    let pool = pool(6);
    let d = LocalDraft::new(target.clone(), pool.clone());
    let trie = TrieCache::default();
    let shared = Shared {
        pool: &pool,
        trie: &trie,
        tuner: None,
    };
    let go = |prompt: &[u32], params: &DecodeParams| {
        block_on(generate(
            &t,
            Some(&d),
            shared,
            prompt,
            params,
            &mut |_: &[u32], _: &[TokenSource]| Flow::Continue,
        ))
    };
    assert!(go(&[], &DecodeParams::default()).is_err());
    assert!(go(&[VOCAB as u32 + 5], &DecodeParams::default()).is_err());
    let zero = DecodeParams {
        max_new_tokens: 0,
        ..DecodeParams::default()
    };
    assert!(go(&[1], &zero).is_err());
    let hot_lookahead = DecodeParams {
        strategy: Strategy::Lookahead,
        sampling: SamplingParams {
            temperature: 1.0,
            ..SamplingParams::greedy()
        },
        ..DecodeParams::default()
    };
    assert!(go(&[1], &hot_lookahead).is_err());
    let bad_level = DecodeParams {
        lookahead: LookaheadParams {
            level: 2,
            window: 4,
            guess: 4,
        },
        ..DecodeParams::default()
    };
    assert!(go(&[1], &bad_level).is_err());
    for trie_budget in [0, 257] {
        let bad_trie = DecodeParams {
            strategy: Strategy::Trie,
            trie_budget,
            ..DecodeParams::default()
        };
        assert!(go(&[1], &bad_trie).is_err());
    }
    // auto without a measured cost profile
    let auto = DecodeParams {
        strategy: Strategy::Auto,
        ..DecodeParams::default()
    };
    let e = go(&[1], &auto).expect_err("auto needs a profile");
    assert!(e.to_string().contains("cost profile"), "{e}");
}

/// One `auto` request of `n` tokens on the mock target, drafting with the target itself
/// (a perfect draft) under `tuner`, with a fresh pool and the given trie.
/// The hash model, each forward taking at least 2 ms: a draft whose calls cost real time,
/// as a real draft's do (the mock's own forwards take microseconds).
struct Slow(Arc<MockModel>);

impl LanguageModel for Slow {
    type Cache = engine::MockCache;

    fn info(&self) -> &engine::ModelInfo {
        self.0.info()
    }

    fn new_cache(&self) -> Self::Cache {
        self.0.new_cache()
    }

    fn forward_batch(
        &self,
        batch: &mut [(&mut Self::Cache, SeqInput<'_>)],
    ) -> engine::Result<Vec<engine::ForwardOutput>> {
        std::thread::sleep(std::time::Duration::from_millis(2));
        self.0.forward_batch(batch)
    }
}

fn auto_request(
    target: &Arc<MockModel>,
    prompt: &[u32],
    n: usize,
    tuner: &AutoTuner,
    trie: &TrieCache,
) -> decoding::Generation {
    let params = DecodeParams {
        strategy: Strategy::Auto,
        max_new_tokens: n,
        ..DecodeParams::default()
    };
    let t = LocalTarget::new(target.clone());
    let pool = pool(params.lookahead.phrase_len());
    // A perfect draft, but not a free one: the policies' scores, which are wall time,
    // then part by what drafting costs instead of by microseconds of noise.
    let d = LocalDraft::new(Arc::new(Slow(target.clone())), pool.clone());
    let shared = Shared {
        pool: &pool,
        trie,
        tuner: Some(tuner),
    };
    block_on(generate(
        &t,
        Some(&d),
        shared,
        prompt,
        &params,
        &mut |_: &[u32], _: &[TokenSource]| Flow::Continue,
    ))
    .unwrap()
}

/// A trie that has seen `prompt` continued by `answer` three times.
fn knowing_trie(prompt: &[u32], answer: &[u32]) -> TrieCache {
    let trie = TrieCache::default();
    let full: Vec<u32> = prompt.iter().chain(answer).copied().collect();
    for _ in 0..3 {
        trie.record(&full, 0);
    }
    trie
}

/// `auto` runs each segment under the policy that scored best: where `Drafting` did it
/// drafts every round, where `ZeroCost` did it never opens the draft, even where the
/// profile says drafting would pay.
#[test]
fn auto_runs_the_policy_with_the_best_record() {
    let target = target_model();
    let prompt: Vec<u32> = (0..30).map(|i| (i * 7 % VOCAB) as u32).collect();
    let n = 40;
    let want = plain_decode(&target, &prompt, n, &SamplingParams::greedy());
    let run = |best: Policy| {
        let tuner = cheap_tuner();
        let mut scores = PolicyScores::default();
        for p in Policy::ALL {
            // Far apart, so that no new segment changes the order.
            let rate = if p == best { 1e9 } else { 1e-3 };
            scores.add(p, 8 * SEGMENT_TOKENS, 8.0 * SEGMENT_TOKENS as f64 / rate);
        }
        tuner.record_scores(true, &scores);
        let rate = |p| tuner.policy_rate(true, p).unwrap_or(0.0);
        assert!(Policy::ALL.iter().all(|&p| rate(p) <= rate(best)));
        auto_request(&target, &prompt, n, &tuner, &TrieCache::default())
    };
    let drafting = run(Policy::Drafting);
    assert_eq!(drafting.tokens, want);
    assert_eq!(drafting.stats.draft_calls, drafting.stats.target_forwards);
    assert!(drafting.stats.mean_accepted_length() > 2.0);
    let zero = run(Policy::ZeroCost);
    assert_eq!(zero.tokens, want);
    assert_eq!(zero.stats.draft_calls, 0);
}

/// Under `Drafting`, `auto` scores the other policies on the same text: where the trie
/// knows the answer, the zero-cost tree it looked up but did not verify scores more tokens
/// per second than the draft's chain, and the next request runs zero-cost rounds without
/// opening the draft. The tokens are plain greedy's throughout.
#[test]
fn auto_scores_the_policies_it_did_not_run_on_the_same_text() {
    let target = target_model();
    let prompt: Vec<u32> = (0..30).map(|i| (i * 7 % VOCAB) as u32).collect();
    let n = 50;
    let want = plain_decode(&target, &prompt, n, &SamplingParams::greedy());
    let trie = knowing_trie(&prompt, &want);
    let tuner = cheap_tuner();
    assert_eq!(tuner.policy_rate(true, Policy::ZeroCost), None);
    // Before any scores, the policy that takes them runs: it drafts.
    let first = auto_request(&target, &prompt, n, &tuner, &trie);
    assert_eq!(first.tokens, want);
    assert!(first.stats.draft_calls > 0);
    let rate = |p| tuner.policy_rate(true, p).unwrap_or(0.0);
    assert!(rate(Policy::Drafting) > 0.0 && rate(Policy::Mixed) > 0.0);
    assert!(
        rate(Policy::ZeroCost) > rate(Policy::Drafting),
        "zero-cost {:.1} vs drafting {:.1} tokens/s",
        rate(Policy::ZeroCost),
        rate(Policy::Drafting)
    );
    let second = auto_request(&target, &prompt, n, &tuner, &trie);
    assert_eq!(second.tokens, want);
    assert_eq!(second.stats.draft_calls, 0);
    assert!(second.stats.mean_accepted_length() > 3.0);
}

/// `auto` follows its cost profile: where tree rows and draft tokens cost as much as a
/// whole step it verifies the root alone and never drafts (plain greedy); where they are
/// nearly free it drafts and verifies wide trees. The tokens are plain greedy's either way.
#[test]
fn auto_sizes_its_rounds_by_the_cost_profile() {
    let target = target_model();
    let prompt: Vec<u32> = (0..30).map(|i| (i * 7 % VOCAB) as u32).collect();
    let n = 50;
    let want = plain_decode(&target, &prompt, n, &SamplingParams::greedy());
    let run_auto =
        |tuner: &AutoTuner, trie: &TrieCache| auto_request(&target, &prompt, n, tuner, trie);
    // A trie that knows the answer, to tempt auto into wide trees.
    let knowing = || knowing_trie(&prompt, &want);
    let dear = tuner(&[(1, 1.0), (2, 2.0), (64, 64.0)], 1.0);
    let out = run_auto(&dear, &knowing());
    assert_eq!(out.tokens, want);
    assert_eq!(out.stats.draft_calls, 0, "drafting cannot pay");
    assert_eq!(out.stats.tree_nodes, out.stats.target_forwards, "root only");
    assert_eq!(out.stats.committed, out.stats.target_forwards);

    let cheap = cheap_tuner();
    let out = run_auto(&cheap, &knowing());
    assert_eq!(out.tokens, want);
    assert!(
        out.stats.mean_accepted_length() > 3.0,
        "a knowing trie on free rows: {:.2} tokens per forward",
        out.stats.mean_accepted_length()
    );
    // With an empty trie and pool, the (perfect) draft is what pays. (A fresh tuner: this
    // one's scores, taken where the trie knew the answer, favour zero-cost rounds.)
    let out = run_auto(&cheap_tuner(), &TrieCache::default());
    assert_eq!(out.tokens, want);
    assert!(out.stats.draft_calls > 0 && out.stats.accepted > 0);
    assert!(out.stats.mean_accepted_length() > 2.0);
}

/// Prices calls at a cost profile's own figures: a clock for `auto` that says its rounds
/// took exactly what the profile predicts.
#[derive(Debug)]
struct ProfileClock(CostProfile);

impl decoding::CallClock for ProfileClock {
    fn seconds(&self, calls: &[decoding::ModelCall], _context: usize) -> f64 {
        use decoding::ModelCall;
        let d = self.0.draft().expect("a draft");
        calls
            .iter()
            .map(|c| match *c {
                ModelCall::Verify { rows, .. } => self.0.verify_cost(rows as usize),
                ModelCall::Draft {
                    forwards,
                    caught_up,
                    ..
                } => d.per_call + d.per_token * forwards as f64 + d.catch_up * caught_up as f64,
                ModelCall::DraftOpen { rows } => d.catch_up * rows as f64,
                _ => 0.0,
            })
            .sum()
    }
}

/// Under a priced clock `auto` learns from its rounds' prices, not from the wall: on a
/// profile where nothing pays but plain steps, a mock model's steps (microseconds against
/// the profile's second) run at the most the record allows above the profile on the wall
/// clock, and exactly at it on the profile's own clock. The tokens are plain greedy's
/// either way, and a drafting run's calls include the draft's opening, to be priced.
#[test]
fn auto_learns_from_a_priced_clock_where_one_is_given() {
    let target = target_model();
    let prompt: Vec<u32> = (0..30).map(|i| (i * 7 % VOCAB) as u32).collect();
    let n = 60;
    let want = plain_decode(&target, &prompt, n, &SamplingParams::greedy());
    let dear = || tuner(&[(1, 1.0), (2, 2.0), (64, 64.0)], 1.0);
    let wall = dear();
    assert!(wall.clock().is_none());
    let out = auto_request(&target, &prompt, n, &wall, &TrieCache::default());
    assert_eq!(out.tokens, want);
    assert_eq!(out.stats.tree_nodes, out.stats.target_forwards, "root only");
    assert_eq!(wall.plain_speed(true), 4.0, "microseconds against a second");

    let priced = dear().priced_by(Arc::new(ProfileClock(dear().profile().clone())));
    let out = auto_request(&target, &prompt, n, &priced, &TrieCache::default());
    assert_eq!(out.tokens, want);
    assert_eq!(out.stats.tree_nodes, out.stats.target_forwards, "root only");
    let speed = priced.plain_speed(true);
    assert!((speed - 1.0).abs() < 1e-9, "{speed}");

    let cheap = cheap_tuner();
    let drafting = cheap.priced_by(Arc::new(ProfileClock(cheap_tuner().profile().clone())));
    let out = auto_request(&target, &prompt, n, &drafting, &TrieCache::default());
    assert_eq!(out.tokens, want);
    assert!(out.stats.draft_calls > 0);
    let is_open = |c: &&decoding::ModelCall| matches!(c, decoding::ModelCall::DraftOpen { .. });
    assert_eq!(out.stats.calls.iter().filter(is_open).count(), 1);
}

/// With `stop_below`, the draft's chain is the plain chain cut right after the token whose
/// running confidence fell below the floor, and each token comes with its probability.
#[test]
fn the_draft_stops_where_its_confidence_falls() {
    use decoding::{DraftBackend, DraftLength, DraftRequest};
    let model = target_model();
    let draft = LocalDraft::new(model.clone(), pool(3));
    let prompt = [3u32, 9, 4, 1];
    let ask = |stop_below: f32| {
        let id = block_on(draft.open(&prompt)).unwrap();
        let request = DraftRequest {
            new_committed: Vec::new(),
            start: None,
            length: DraftLength::new(12, stop_below),
            lookahead: None,
            pool_delta: Vec::new(),
            eos: Vec::new(),
        };
        block_on(draft.draft(id, request)).unwrap().0
    };
    let full = ask(0.0);
    assert_eq!(full.tokens.len(), 12);
    assert!(full.confidence.is_empty(), "not asked for");
    let mut cut_short = 0;
    for floor in [0.9, 0.5, 0.2, 0.05, 1e-6] {
        let o = ask(floor);
        assert_eq!(o.tokens[..], full.tokens[..o.tokens.len()], "floor {floor}");
        assert_eq!(o.confidence.len(), o.tokens.len(), "floor {floor}");
        assert!(o.confidence.iter().all(|&c| c > 0.0 && c <= 1.0));
        let n = o.tokens.len();
        let before: f32 = o.confidence[..n - 1].iter().product();
        assert!(before >= floor, "floor {floor}: stopped late");
        if n < 12 {
            let all: f32 = o.confidence.iter().product();
            assert!(all < floor, "floor {floor}: stopped early at {n}");
            cut_short += 1;
        }
    }
    assert!(cut_short >= 3, "the floors hardly ever cut the chain");
}

/// A draft session told of tokens too early and then told to take them back (a `start`
/// before them) drafts exactly what a session opened on the true text drafts: its cache
/// keeps only what still holds. With lookahead too, for a take-back whose tokens partly
/// come back, and where the early call never reached the session (the caller cancelled
/// it and cannot know): the same `start` is right either way.
#[test]
fn a_rewound_draft_session_drafts_what_a_fresh_one_drafts() {
    use decoding::{DraftBackend, DraftLength, DraftRequest};
    let model = Arc::new(MockModel::new(VOCAB, 2048, 0.7, 5));
    let prompt = [3u32, 9, 4, 1, 7];
    for lookahead in [
        None,
        Some(LookaheadParams {
            level: 3,
            window: 2,
            guess: 2,
        }),
    ] {
        let g = lookahead.map_or(2, |l| l.phrase_len());
        let ask = |new_committed: Vec<u32>, start: Option<usize>| DraftRequest {
            new_committed,
            start,
            length: DraftLength::new(5, 0.0),
            lookahead,
            pool_delta: Vec::new(),
            eos: Vec::new(),
        };
        let fresh = LocalDraft::new(model.clone(), pool(g));
        let fid = block_on(fresh.open(&prompt)).unwrap();
        let first = block_on(fresh.draft(fid, ask(Vec::new(), None)))
            .unwrap()
            .0
            .tokens;
        // The target kept two of the chain's tokens and then chose another.
        let other = (first[2] + 1) % VOCAB as u32;
        let kept = vec![first[0], first[1], other];
        let mut text = prompt.to_vec();
        text.extend_from_slice(&kept);
        let fid = block_on(fresh.open(&text)).unwrap();
        let want = block_on(fresh.draft(fid, ask(Vec::new(), None)))
            .unwrap()
            .0
            .tokens;
        for early_call_ran in [true, false] {
            let draft = LocalDraft::new(model.clone(), pool(g));
            let id = block_on(draft.open(&prompt)).unwrap();
            let chain = block_on(draft.draft(id, ask(Vec::new(), None)))
                .unwrap()
                .0
                .tokens;
            assert_eq!(chain, first);
            if early_call_ran {
                // The caller sends the chain as committed, and the draft drafts on ...
                let ahead = block_on(draft.draft(id, ask(first.clone(), None)))
                    .unwrap()
                    .0
                    .tokens;
                assert!(!ahead.is_empty());
            }
            // ... and then takes it back from where it began.
            let got = block_on(draft.draft(id, ask(kept.clone(), Some(prompt.len()))))
                .unwrap()
                .0
                .tokens;
            let what = format!("early call ran: {early_call_ran}, lookahead: {lookahead:?}");
            if lookahead.is_none() {
                assert_eq!(got, want, "{what}");
            } else {
                // A lookahead window carries its guesses over; the model's own chain is
                // the same however they were found, so compare what the two both drafted.
                let n = got.len().min(want.len());
                assert_eq!(got[..n], want[..n], "{what}");
            }
            // Taking back every token, or starting past the session's end, is refused,
            // naming the field.
            for start in [0, text.len() + 1] {
                let e = block_on(draft.draft(id, ask(Vec::new(), Some(start)))).unwrap_err();
                assert!(e.to_string().contains("start"), "{e}");
            }
        }
    }
}

/// Overlapped drafting (the draft drafts the next round while the target verifies): the
/// output is plain decoding's, greedy and sampled, with drafts that agree (the early work
/// is used) and drafts that do not (it is taken back).
#[test]
fn overlapped_drafting_is_exact_and_its_work_is_used_or_taken_back() {
    let target = target_model();
    let drafts = three_drafts(&target);
    let (mut used, mut discarded, mut steps) = (std::collections::HashMap::new(), 0, 0);
    for (name, draft) in &drafts {
        for strategy in [Strategy::Speculative, Strategy::Ouroboros] {
            for sampling in [
                SamplingParams::greedy(),
                SamplingParams {
                    temperature: 0.9,
                    top_k: 0,
                    top_p: 1.0,
                    seed: 4,
                },
            ] {
                for (gamma, draft_stop) in [(1, 0.0), (4, 0.0), (6, 0.3)] {
                    let la = LookaheadParams {
                        level: 4,
                        window: 3,
                        guess: 3,
                    };
                    let pool = pool(la.phrase_len());
                    for prompt in prompts() {
                        let params = DecodeParams {
                            strategy,
                            max_new_tokens: 50,
                            sampling,
                            gamma,
                            draft_stop,
                            lookahead: la,
                            topk: 2,
                            overlap: true,
                            ..DecodeParams::default()
                        };
                        let want = plain_decode(&target, &prompt, 50, &sampling);
                        let t = TestTarget::new(&target);
                        let trie = TrieCache::default();
                        let out = run_on(&t, &target, draft, &pool, &trie, &prompt, &params);
                        assert_eq!(
                            out.tokens, want,
                            "{name} {strategy:?} gamma {gamma} stop {draft_stop} {sampling:?} prompt {prompt:?}"
                        );
                        assert!(out.stats.draft_fallback.is_none(), "{name}");
                        // Speculative drafts its chain from the committed text however it
                        // got there, so with the draft's bookkeeping right (used work, work
                        // taken back) every chain is what a fresh draft drafts from the
                        // text. (Without a stop floor: with one, the early call's floor
                        // counts the bonus token's probability too, and may stop elsewhere.)
                        if strategy == Strategy::Speculative && draft_stop == 0.0 {
                            let s = check_overlapped_chains(&t, draft, &prompt, &out, &params);
                            steps += s;
                            // Each step follows work thrown away.
                            assert!(s as u64 <= out.stats.overlap_discarded, "{name}");
                        }
                        *used.entry(*name).or_insert(0) += out.stats.overlap_used;
                        discarded += out.stats.overlap_discarded;
                    }
                }
            }
        }
    }
    eprintln!("overlapped calls used: {used:?}; taken back: {discarded}; steps: {steps}");
    // The perfect draft's early work is used round after round; the others' is often
    // taken back, and the output stayed exact through both, and through the plain steps
    // taken beside the draft after work thrown away.
    assert!(used["perfect"] > 200, "{used:?}");
    assert!(used["perfect"] > used["adversarial"], "{used:?}");
    assert!(discarded > 200, "{discarded}");
    assert!(steps > 50, "{steps}");
}

/// A target with the seams these tests need: a verify that lets other work run first (as
/// a remote one does while its reply is on the way, so an overlapped draft call starts
/// before the verdict), a prefill that waits for a gate, and a prefill that fails.
struct TestTarget {
    inner: LocalTarget<MockModel>,
    yields: bool,
    gate: Option<Arc<std::sync::atomic::AtomicBool>>,
    fail_open: bool,
    /// Every verify: the tree's tokens below the root, and how many tokens it committed.
    rounds: std::sync::Mutex<Vec<(Vec<u32>, usize)>>,
}

impl TestTarget {
    fn new(model: &Arc<MockModel>) -> Self {
        Self {
            inner: LocalTarget::new(model.clone()),
            yields: false,
            gate: None,
            fail_open: false,
            rounds: Default::default(),
        }
    }

    /// The verified chains, each with the committed text it was verified after.
    fn chains(&self, prompt: &[u32], output: &[u32]) -> Vec<(Vec<u32>, Vec<u32>)> {
        let mut at = 0;
        let rounds = self.rounds.lock().unwrap();
        rounds
            .iter()
            .map(|(chain, committed)| {
                let mut text = prompt.to_vec();
                text.extend_from_slice(&output[..at.min(output.len())]);
                at += committed;
                (chain.clone(), text)
            })
            .collect()
    }
}

/// The speculative rounds of an overlapped run, checked one by one: every chain verified
/// is what a fresh draft session drafts from the text committed before it (`gamma`
/// tokens, fewer only where the token budget ends), so the draft's bookkeeping over work
/// used and taken back is right; rounds without a chain are the plain steps taken beside
/// the draft's call after thrown-away work. Returns how many such steps there were.
fn check_overlapped_chains(
    target: &TestTarget,
    draft: &MockModel,
    prompt: &[u32],
    out: &decoding::Generation,
    params: &DecodeParams,
) -> usize {
    let mut steps = 0;
    for (i, (chain, text)) in target.chains(prompt, &out.tokens).into_iter().enumerate() {
        let left = params.max_new_tokens - (text.len() - prompt.len());
        if chain.is_empty() && left > 1 {
            steps += 1;
            continue;
        }
        let fresh = plain_decode(
            draft,
            &text,
            params.gamma.min(left - 1),
            &SamplingParams::greedy(),
        );
        assert_eq!(
            chain, fresh,
            "round {i}: not the chain a fresh draft drafts from its text"
        );
    }
    steps
}

impl decoding::TargetBackend for TestTarget {
    fn info(&self) -> decoding::BackendInfo {
        self.inner.info()
    }

    async fn open(&self, committed: &[u32]) -> decoding::Result<decoding::SessionId> {
        if let Some(gate) = &self.gate {
            while !gate.load(std::sync::atomic::Ordering::SeqCst) {
                yield_now().await;
            }
        }
        match self.fail_open {
            true => Err(decoding::DecodingError::Unavailable(
                "the target is down".into(),
            )),
            false => self.inner.open(committed).await,
        }
    }

    async fn verify(
        &self,
        session: decoding::SessionId,
        tree: &decoding::DraftTree,
        sampling: &SamplingParams,
        logprobs: Option<usize>,
    ) -> decoding::Result<(decoding::VerifyOutcome, decoding::ServerTiming)> {
        if self.yields {
            for _ in 0..3 {
                yield_now().await;
            }
        }
        let out = self.inner.verify(session, tree, sampling, logprobs).await;
        if let Ok((v, _)) = &out {
            let below_root = tree.tokens[1..].to_vec();
            self.rounds
                .lock()
                .unwrap()
                .push((below_root, v.accepted.len() + 1));
        }
        out
    }

    async fn close(&self, session: decoding::SessionId) -> decoding::Result<()> {
        self.inner.close(session).await
    }
}

/// Returns `Pending` once, waking itself.
async fn yield_now() {
    let mut yielded = false;
    futures::future::poll_fn(|cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}

/// A draft that never answers a call sending committed tokens the target will not
/// commit (an overlapped call whose chain the target rejects): it hangs until dropped,
/// before or after drafting. A pool replica of its own where `replica` (as a remote
/// draft keeps).
struct DoomedCallsHang {
    inner: LocalDraft<MockModel>,
    truth: Vec<u32>,
    replica: bool,
    /// The tokens the session holds: the prompt, then what the calls that reached it sent
    /// as committed.
    held: std::sync::Mutex<usize>,
    /// Every pool phrase the calls that reached the draft carried.
    received: std::sync::Mutex<std::collections::HashSet<(u32, Vec<u32>)>>,
}

impl DoomedCallsHang {
    fn new(inner: LocalDraft<MockModel>, truth: Vec<u32>, replica: bool) -> Self {
        Self {
            inner,
            truth,
            replica,
            held: Default::default(),
            received: Default::default(),
        }
    }
}

impl decoding::DraftBackend for DoomedCallsHang {
    fn info(&self) -> decoding::BackendInfo {
        self.inner.info()
    }

    fn wants_pool_delta(&self) -> bool {
        self.replica
    }

    async fn open(&self, committed: &[u32]) -> decoding::Result<decoding::SessionId> {
        *self.held.lock().unwrap() = committed.len();
        self.inner.open(committed).await
    }

    async fn draft(
        &self,
        session: decoding::SessionId,
        request: decoding::DraftRequest,
    ) -> decoding::Result<(decoding::DraftOutcome, decoding::ServerTiming)> {
        let from = request.start.unwrap_or(*self.held.lock().unwrap());
        let end = from + request.new_committed.len();
        let doomed = self.truth.get(from..end) != Some(&request.new_committed[..]);
        // Half of the doomed calls never reach the draft, the other half are drafted; with
        // a replica, none reach it (its phrases go again: `overlap`'s unit tests).
        if doomed && (self.replica || end.is_multiple_of(2)) {
            return futures::future::pending().await;
        }
        *self.held.lock().unwrap() = end;
        let phrases = request.pool_delta.iter().map(|n| (n.key, n.phrase.clone()));
        self.received.lock().unwrap().extend(phrases);
        let out = self.inner.draft(session, request).await;
        if doomed {
            yield_now().await;
            return futures::future::pending().await;
        }
        out
    }

    async fn close(&self, session: decoding::SessionId) -> decoding::Result<()> {
        self.inner.close(session).await
    }
}

/// Runs `f` on a thread of its own and returns what it returns; a panic in `f` is passed
/// on, and `f` still running after `secs` seconds fails the test with `hang`.
fn on_a_thread_within<R: Send + 'static>(
    secs: u64,
    hang: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> R {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(r) => r,
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match thread.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the thread sent nothing and did not panic"),
        },
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{hang}"),
    }
}

/// Overlapped drafting stops an early call whose chain the target rejected instead of
/// waiting for it, whether the call had started or not (here such calls never end): the
/// output stays exact, and the next call takes the draft back to where the early call
/// began (right whether or not it ran).
#[test]
fn a_rejected_overlapped_call_is_stopped_not_waited_for() {
    let t = target_model();
    let hang = "the loop waited for an overlapped call the verdict had made useless";
    let (cancelled, used) = on_a_thread_within(60, hang, move || {
        let mut cancelled = 0;
        let mut used = 0;
        for (name, draft_model) in three_drafts(&t) {
            for strategy in [Strategy::Speculative, Strategy::Ouroboros] {
                for (yielding, replica) in [(false, false), (true, false), (true, true)] {
                    let la = LookaheadParams {
                        level: 4,
                        window: 3,
                        guess: 3,
                    };
                    let host = pool(la.phrase_len());
                    for prompt in prompts() {
                        let params = DecodeParams {
                            strategy,
                            max_new_tokens: 40,
                            gamma: 4,
                            lookahead: la,
                            topk: 2,
                            overlap: true,
                            ..DecodeParams::default()
                        };
                        let want = plain_decode(&t, &prompt, 40, &SamplingParams::greedy());
                        let draft_pool = match replica {
                            true => pool(la.phrase_len()),
                            false => host.clone(),
                        };
                        let d = DoomedCallsHang::new(
                            LocalDraft::new(draft_model.clone(), draft_pool),
                            [&prompt[..], &want[..]].concat(),
                            replica,
                        );
                        let target = TestTarget {
                            yields: yielding,
                            ..TestTarget::new(&t)
                        };
                        let out =
                            generate_with(&target, &d, &host, None, &prompt, &params).unwrap();
                        let what =
                            format!("{name} {strategy:?} yielding {yielding} replica {replica}");
                        assert_eq!(out.tokens, want, "{what}");
                        assert!(out.stats.draft_fallback.is_none(), "{what}");
                        cancelled += out.stats.overlap_cancelled;
                        used += out.stats.overlap_used;
                    }
                }
            }
        }
        (cancelled, used)
    });
    eprintln!("overlapped calls cancelled: {cancelled}, used: {used}");
    assert!(cancelled > 100, "{cancelled}");
    assert!(used > 100, "{used}");
}

/// A draft that opens `gate` once it has drafted, counting the sessions it has open.
struct GateOpeningDraft {
    inner: LocalDraft<MockModel>,
    gate: Arc<std::sync::atomic::AtomicBool>,
    sessions: std::sync::atomic::AtomicI64,
}

impl decoding::DraftBackend for GateOpeningDraft {
    fn info(&self) -> decoding::BackendInfo {
        self.inner.info()
    }

    fn wants_pool_delta(&self) -> bool {
        false
    }

    async fn open(&self, committed: &[u32]) -> decoding::Result<decoding::SessionId> {
        self.sessions
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.open(committed).await
    }

    async fn draft(
        &self,
        session: decoding::SessionId,
        request: decoding::DraftRequest,
    ) -> decoding::Result<(decoding::DraftOutcome, decoding::ServerTiming)> {
        let out = self.inner.draft(session, request).await;
        self.gate.store(true, std::sync::atomic::Ordering::SeqCst);
        out
    }

    async fn close(&self, session: decoding::SessionId) -> decoding::Result<()> {
        self.sessions
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.close(session).await
    }
}

/// With overlap the draft's first call (its prefill with it) runs beside the target's
/// prefill: here the target's prefill cannot end before the draft has drafted, so a loop
/// that opened the two one after the other would never end. The output stays exact, the
/// first round verifies the chain drafted beside the prefill (speculative's chains are
/// what a fresh draft drafts from their text), and when the target's prefill fails the
/// draft's session is closed.
#[test]
fn the_first_draft_call_runs_beside_the_prefill() {
    let t = target_model();
    let hang = "the target's prefill waited for a draft call that came after it";
    on_a_thread_within(60, hang, move || {
        for (name, draft_model) in three_drafts(&t) {
            for strategy in [Strategy::Speculative, Strategy::Ouroboros] {
                for prompt in prompts() {
                    let params = DecodeParams {
                        strategy,
                        max_new_tokens: 30,
                        gamma: 1,
                        topk: 2,
                        overlap: true,
                        ..DecodeParams::default()
                    };
                    let host = pool(params.lookahead.phrase_len());
                    let want = plain_decode(&t, &prompt, 30, &SamplingParams::greedy());
                    for fail_open in [false, true] {
                        let gate = Arc::new(std::sync::atomic::AtomicBool::new(false));
                        let target = TestTarget {
                            gate: Some(gate.clone()),
                            fail_open,
                            ..TestTarget::new(&t)
                        };
                        let draft = GateOpeningDraft {
                            inner: LocalDraft::new(draft_model.clone(), host.clone()),
                            gate,
                            sessions: Default::default(),
                        };
                        let shared = Shared {
                            pool: &host,
                            trie: &TrieCache::default(),
                            tuner: None,
                        };
                        let sink = &mut |_: &[u32], _: &[TokenSource]| Flow::Continue;
                        let out = block_on(generate(
                            &target,
                            Some(&draft),
                            shared,
                            &prompt,
                            &params,
                            sink,
                        ));
                        let open = draft.sessions.load(std::sync::atomic::Ordering::SeqCst);
                        let what = format!("{name} {strategy:?} {prompt:?}");
                        assert_eq!(open, 0, "{what}: draft sessions left open");
                        if fail_open {
                            assert!(out.is_err(), "{what}");
                            continue;
                        }
                        let out = out.unwrap();
                        assert_eq!(out.tokens, want, "{what}");
                        assert!(out.stats.draft_fallback.is_none(), "{what}");
                        if strategy == Strategy::Speculative {
                            check_overlapped_chains(&target, &draft_model, &prompt, &out, &params);
                            let first = target.chains(&prompt, &out.tokens)[0].0.clone();
                            assert_eq!(first.len(), 1, "{what}: the first round has its chain");
                        }
                    }
                }
            }
        }
    });
}

/// Ouroboros and auto with a remote draft: what the orchestrator's pool learns from the
/// prompt and the committed text reaches the draft's replica with a later call, with
/// overlap or without, whether the round's chain came from a call of its own, from work
/// drafted beside the last verify, or from a call beside a plain step, and when an
/// overlapped call that carried phrases was stopped before it reached the draft.
#[test]
fn a_draft_replica_learns_the_committed_text_with_and_without_overlap() {
    let target = target_model();
    let la = LookaheadParams {
        level: 4,
        window: 3,
        guess: 3,
    };
    let g = la.phrase_len();
    let (mut used, mut cancelled, mut checked) = (0, 0, 0);
    let tuner = cheap_tuner();
    for (name, draft_model) in three_drafts(&target) {
        for (strategy, overlap) in [
            (Strategy::Ouroboros, false),
            (Strategy::Ouroboros, true),
            (Strategy::Auto, false),
        ] {
            for prompt in prompts() {
                let params = DecodeParams {
                    strategy,
                    max_new_tokens: 60,
                    gamma: 3,
                    lookahead: la,
                    topk: 2,
                    overlap,
                    ..DecodeParams::default()
                };
                let host = pool(g);
                let want = plain_decode(&target, &prompt, 60, &SamplingParams::greedy());
                // Overlapped calls whose chain the target rejects never reach it: their
                // phrases must go again with a later call.
                let draft = DoomedCallsHang::new(
                    LocalDraft::new(draft_model.clone(), pool(g)),
                    [&prompt[..], &want[..]].concat(),
                    true,
                );
                let t = TestTarget {
                    yields: true,
                    ..TestTarget::new(&target)
                };
                let out = generate_with(&t, &draft, &host, Some(&tuner), &prompt, &params).unwrap();
                let what = format!("{name} {strategy:?} overlap {overlap} prompt {prompt:?}");
                assert_eq!(out.tokens, want, "{what}");
                used += out.stats.overlap_used;
                cancelled += out.stats.overlap_cancelled;
                // What was learnt after the last call that reached the draft has no call
                // to go with. Without overlap a call sends committed tokens only; with it,
                // also the chain (at most `gamma` tokens) ahead of its verdict.
                let ahead = if overlap { params.gamma } else { 0 };
                let end = draft.held.lock().unwrap().saturating_sub(ahead);
                let text = [&prompt[..], &out.tokens[..]].concat();
                let text = &text[..end];
                checked += text.len().saturating_sub(g);
                let received = draft.received.lock().unwrap();
                for (i, n) in decoding::pool::ngrams_of(text, g).enumerate() {
                    assert!(
                        received.contains(&(n.key, n.phrase.clone())),
                        "{what}: the n-gram at {i} of the committed text never reached the replica"
                    );
                }
            }
        }
    }
    eprintln!("overlapped calls used: {used}, stopped: {cancelled}; n-grams checked: {checked}");
    assert!(used > 50, "overlapped calls used: {used}");
    assert!(cancelled > 20, "overlapped calls stopped: {cancelled}");
    assert!(checked > 1500, "n-grams checked: {checked}");
}

/// With overlap, a request whose last round ends it (an EOS as the round's bonus token)
/// returns without waiting for the draft's call beside that round, which can be of no use:
/// here that call never ends.
#[test]
fn a_request_that_ends_does_not_wait_for_the_call_beside_its_last_verify() {
    let t = target_model();
    let hang = "the request waited for the draft's call beside its last round";
    let ended = on_a_thread_within(60, hang, move || {
        let mut ended = 0;
        for strategy in [Strategy::Speculative, Strategy::Ouroboros] {
            for prompt in prompts() {
                let full = plain_decode(&t, &prompt, 50, &SamplingParams::greedy());
                // A perfect draft of 4 without a stop floor, nothing beside its chain: every
                // round commits 5 tokens, the bonus tokens at 4, 9, 14, ... Take the first
                // whose token has not come before as the EOS.
                let Some(p) = (4..full.len())
                    .step_by(5)
                    .find(|&p| !full[..p].contains(&full[p]))
                else {
                    continue;
                };
                let params = DecodeParams {
                    strategy,
                    max_new_tokens: 50,
                    eos: vec![full[p]],
                    gamma: 4,
                    draft_stop: 0.0,
                    topk: 0,
                    trie_budget: 0,
                    overlap: true,
                    ..DecodeParams::default()
                };
                let host = pool(params.lookahead.phrase_len());
                // The call beside the last round sends its chain, which ends just before
                // the EOS: a "truth" one token short of that makes it a call that never
                // ends, and no other call reaches that far.
                let draft = DoomedCallsHang::new(
                    LocalDraft::new(t.clone(), host.clone()),
                    [&prompt[..], &full[..p - 1]].concat(),
                    true,
                );
                let target = LocalTarget::new(t.clone());
                let out = generate_with(&target, &draft, &host, None, &prompt, &params).unwrap();
                assert_eq!(out.tokens, full[..=p], "{strategy:?} {prompt:?}");
                assert_eq!(out.finish, FinishReason::Eos);
                ended += 1;
            }
        }
        ended
    });
    assert!(ended >= 4, "requests that ended on an EOS bonus: {ended}");
}
