//! A tree forward must give every row exactly what sequential one-token decoding of that
//! row's path gives; truncating and compacting the cache must equal recomputing.

mod common;

use common::*;
use engine::{KvState, LanguageModel, OutputSpec, SeqInput, Visibility, tree_positions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TOL: f32 = 1e-4;

fn random_tree(rng: &mut StdRng, n: usize, vocab: usize) -> (Vec<u32>, Vec<i32>) {
    let tokens = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
    let parents = (0..n)
        .map(|i| {
            if i == 0 {
                -1
            } else {
                rng.random_range(-1..i as i32)
            }
        })
        .collect();
    (tokens, parents)
}

fn path_to(parents: &[i32], node: usize) -> Vec<usize> {
    let mut path = vec![node];
    let mut at = parents[node];
    while at >= 0 {
        path.push(at as usize);
        at = parents[at as usize];
    }
    path.reverse();
    path
}

#[test]
fn tree_rows_match_sequential_decoding_and_cache_edits_match_recompute() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    for tiny in tiny_models(dir.path()) {
        let m = &tiny.model;
        let vocab = m.info().vocab_size;
        for trial in 0..3 {
            let what = |s: &str| format!("{} trial {trial}: {s}", tiny.label);
            let plen = rng.random_range(1..16);
            let prompt: Vec<u32> = (0..plen)
                .map(|_| rng.random_range(0..vocab as u32))
                .collect();
            let pos: Vec<u32> = (0..plen as u32).collect();
            let mut cache = m.new_cache();
            let pre = m
                .forward(
                    &mut cache,
                    SeqInput::chain(&prompt, &pos, OutputSpec::last(plen).with_logits()),
                )
                .unwrap();
            let want = sequential_last_logits(m, &prompt);
            assert_close(&what("prefill"), &pre.logits.unwrap()[0], &want, TOL);

            let n = rng.random_range(1..12);
            let (tokens, parents) = random_tree(&mut rng, n, vocab);
            let positions = tree_positions(plen as u32, &parents);
            let vis = Visibility::Tree(parents.clone());
            let out = m
                .forward(
                    &mut cache,
                    SeqInput {
                        tokens: &tokens,
                        positions: &positions,
                        visibility: &vis,
                        outputs: OutputSpec::all().with_logits(),
                    },
                )
                .unwrap();
            assert_eq!(cache.len(), plen + n);
            let logits = out.logits.unwrap();
            for (i, row) in logits.iter().enumerate() {
                let mut seq = prompt.clone();
                seq.extend(path_to(&parents, i).iter().map(|&j| tokens[j]));
                let want = sequential_last_logits(m, &seq);
                assert_close(&what(&format!("tree row {i}")), row, &want, TOL);
                assert_eq!(out.argmax[i], argmax(row));
            }

            // Accept the path to a random node, then decode one more token on top of it.
            let node = rng.random_range(0..n);
            let path = path_to(&parents, node);
            let rows: Vec<usize> = path.iter().map(|&j| plen + j).collect();
            let mut accepted = prompt.clone();
            accepted.extend(path.iter().map(|&j| tokens[j]));
            // Cut some of the accepted path off again half the time (rejected tail).
            let keep_len = if rng.random_bool(0.5) {
                rng.random_range(0..=path.len())
            } else {
                path.len()
            };
            cache.keep(plen, &rows).unwrap();
            cache.truncate(plen + keep_len).unwrap();
            accepted.truncate(plen + keep_len);
            assert_eq!(cache.len(), accepted.len());
            let next = rng.random_range(0..vocab as u32);
            let at = [accepted.len() as u32];
            let out = m
                .forward(
                    &mut cache,
                    SeqInput::chain(&[next], &at, OutputSpec::all().with_logits()),
                )
                .unwrap();
            accepted.push(next);
            let want = sequential_last_logits(m, &accepted);
            assert_close(
                &what("decode after keep/truncate"),
                &out.logits.unwrap()[0],
                &want,
                TOL,
            );
        }
    }
}

#[test]
fn a_batch_of_sequences_equals_each_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    for tiny in tiny_models(dir.path()).into_iter().take(3) {
        let m = &tiny.model;
        let vocab = m.info().vocab_size;
        // Three sessions with different histories.
        let histories: Vec<Vec<u32>> = (0..3)
            .map(|_| {
                (0..rng.random_range(1..10))
                    .map(|_| rng.random_range(0..vocab as u32))
                    .collect()
            })
            .collect();
        let mut caches = Vec::new();
        for h in &histories {
            let mut c = m.new_cache();
            let pos: Vec<u32> = (0..h.len() as u32).collect();
            m.forward(&mut c, SeqInput::chain(h, &pos, OutputSpec::all()))
                .unwrap();
            caches.push(c);
        }
        let trees: Vec<(Vec<u32>, Vec<i32>)> = (0..3)
            .map(|_| {
                let n = rng.random_range(1..8);
                random_tree(&mut rng, n, vocab)
            })
            .collect();
        let positions: Vec<Vec<u32>> = trees
            .iter()
            .zip(&histories)
            .map(|((_, p), h)| tree_positions(h.len() as u32, p))
            .collect();
        let vis: Vec<Visibility> = trees
            .iter()
            .map(|(_, p)| Visibility::Tree(p.clone()))
            .collect();

        // Alone, on copies of the caches rebuilt from the same histories.
        let mut alone = Vec::new();
        for i in 0..3 {
            let mut c = m.new_cache();
            let pos: Vec<u32> = (0..histories[i].len() as u32).collect();
            m.forward(
                &mut c,
                SeqInput::chain(&histories[i], &pos, OutputSpec::all()),
            )
            .unwrap();
            let input = SeqInput {
                tokens: &trees[i].0,
                positions: &positions[i],
                visibility: &vis[i],
                outputs: OutputSpec::all().with_logits(),
            };
            alone.push(m.forward(&mut c, input).unwrap());
        }
        let mut batch: Vec<_> = caches
            .iter_mut()
            .enumerate()
            .map(|(i, c)| {
                (
                    c,
                    SeqInput {
                        tokens: &trees[i].0,
                        positions: &positions[i],
                        visibility: &vis[i],
                        outputs: OutputSpec::all().with_logits(),
                    },
                )
            })
            .collect();
        let together = m.forward_batch(&mut batch).unwrap();
        for i in 0..3 {
            let (a, b) = (
                alone[i].logits.as_ref().unwrap(),
                together[i].logits.as_ref().unwrap(),
            );
            for (r, (x, y)) in a.iter().zip(b).enumerate() {
                assert_close(&format!("{} seq {i} row {r}", tiny.label), y, x, TOL);
            }
        }
    }
}

/// A forward that outgrows the cache while it is partly filled (250 of 256 entries, then
/// 10 more) keeps every entry: the result equals one forward over all 260 tokens.
#[test]
fn growing_a_partly_filled_cache_keeps_every_entry() {
    let dir = tempfile::tempdir().unwrap();
    for tiny in tiny_models(dir.path()).into_iter().take(2) {
        let m = &tiny.model;
        let vocab = m.info().vocab_size as u32;
        let text: Vec<u32> = (0..260u32).map(|i| (i * 7 + 3) % vocab).collect();
        let pos: Vec<u32> = (0..260).collect();
        let mut grown = m.new_cache();
        m.forward(
            &mut grown,
            SeqInput::chain(&text[..250], &pos[..250], OutputSpec::all()),
        )
        .unwrap();
        let out = m
            .forward(
                &mut grown,
                SeqInput::chain(
                    &text[250..],
                    &pos[250..],
                    OutputSpec::last(10).with_logits(),
                ),
            )
            .unwrap_or_else(|e| panic!("{}: growing the cache: {e}", tiny.label));
        let mut whole = m.new_cache();
        let want = m
            .forward(
                &mut whole,
                SeqInput::chain(&text, &pos, OutputSpec::last(260).with_logits()),
            )
            .unwrap();
        assert_eq!(grown.len(), 260);
        assert_close(
            &tiny.label,
            &out.logits.unwrap()[0],
            &want.logits.unwrap()[0],
            TOL,
        );
    }
}
