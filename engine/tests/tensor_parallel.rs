//! A model split over ranks (threads) must give the tokens of the whole model.

mod common;

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use common::{kquant_config, max_diff};
use engine::testing::{random_weights, tiny_config, write_gguf};
use engine::tp::TpModel;
use engine::{
    Architecture, KvState, LanguageModel, LoadOptions, ModelConfig, OutputSpec, SeqInput,
    Visibility, tree_positions,
};

/// How far a model split over two ranks strays from the whole model, on one random model.
struct Divergence {
    /// The largest logit difference (relative where a logit exceeds 1) over the prefill
    /// rows, the verify tree's rows and 16 greedy steps on top of a kept path.
    logits: f32,
    /// The row of the first difference above 1e-4, counting prefill, tree, then steps.
    first_row: Option<usize>,
    /// Whether the tree's argmax and the greedy steps' tokens were all the same.
    same_tokens: bool,
}

/// Runs the whole model and a two-rank split side by side. `opts` for both; `seed` picks
/// the random weights.
fn divergence(
    cfg: &ModelConfig,
    dtype: GgmlDType,
    bias: bool,
    seed: u64,
    opts: &LoadOptions,
) -> Divergence {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_gguf(
        &path,
        cfg,
        &random_weights(cfg, seed, bias, false).unwrap(),
        dtype,
    )
    .unwrap();
    // Shards run candle's plain kernels (see `Transformer::load`), so the reference is the
    // whole model on them too; the default options must still give that split.
    let plain = LoadOptions {
        unpadded: true,
        ..opts.clone()
    };
    let whole = engine::load_model(&path, &plain, &Device::Cpu).unwrap();
    let tp = TpModel::load(&path, 2, opts, &Device::Cpu).unwrap();
    compare(&whole, &tp, cfg.vocab_size)
}

/// Runs `whole` and `tp` side by side on the same inputs: a prefill, a verify tree, a kept
/// path and 16 greedy steps (both following `whole`'s tokens).
fn compare<A: LanguageModel, B: LanguageModel>(whole: &A, tp: &B, vocab: usize) -> Divergence {
    let (mut c1, mut c2) = (whole.new_cache(), tp.new_cache());
    let mut rows: Vec<f32> = Vec::new();
    let mut same_tokens = true;
    let prompt: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % vocab as u32).collect();
    let pos: Vec<u32> = (0..12).collect();
    let all = || OutputSpec::all().with_logits();
    let a = whole
        .forward(&mut c1, SeqInput::chain(&prompt, &pos, all()))
        .unwrap();
    let b = tp
        .forward(&mut c2, SeqInput::chain(&prompt, &pos, all()))
        .unwrap();
    let mut compare_rows = |a: Vec<Vec<f32>>, b: Vec<Vec<f32>>| {
        rows.extend(a.iter().zip(&b).map(|(x, y)| max_diff(y, x)));
    };
    compare_rows(a.logits.unwrap(), b.logits.unwrap());
    // A verify tree, then keep a path and decode greedily on top of it.
    let parents = vec![-1, 0, 0, 1, 2, 4];
    let tokens = vec![5, 6, 7, 8, 9, 10];
    let tpos = tree_positions(12, &parents);
    let vis = Visibility::Tree(parents);
    let tree = |outputs| SeqInput {
        tokens: &tokens,
        positions: &tpos,
        visibility: &vis,
        outputs,
    };
    let a = whole.forward(&mut c1, tree(all())).unwrap();
    let b = tp.forward(&mut c2, tree(all())).unwrap();
    same_tokens &= a.argmax == b.argmax;
    compare_rows(a.logits.unwrap(), b.logits.unwrap());
    c1.keep(12, &[12, 14, 16]).unwrap();
    c2.keep(12, &[12, 14, 16]).unwrap();
    // Both follow the whole model's tokens, so their rows stay comparable after a split.
    let mut t = a.argmax[5];
    for p in 15u32..31 {
        let x = whole
            .forward(&mut c1, SeqInput::chain(&[t], &[p], all()))
            .unwrap();
        let y = tp
            .forward(&mut c2, SeqInput::chain(&[t], &[p], all()))
            .unwrap();
        same_tokens &= x.argmax == y.argmax;
        t = x.argmax[0];
        compare_rows(x.logits.unwrap(), y.logits.unwrap());
    }
    assert_eq!(c1.len(), c2.len());
    Divergence {
        logits: rows.iter().copied().fold(0.0, f32::max),
        first_row: rows.iter().position(|&d| d > 1e-4),
        same_tokens,
    }
}

const SEEDS: std::ops::RangeInclusive<u64> = 1..=16;

/// Every seed: the split model agrees with the whole one to `tol` and picks its tokens.
fn assert_every_seed_agrees(label: &str, cfg: &ModelConfig, dtype: GgmlDType, bias: bool) {
    for seed in SEEDS {
        let d = divergence(cfg, dtype, bias, seed, &LoadOptions::default());
        println!(
            "{label} seed {seed}: largest logit difference {:.1e}",
            d.logits
        );
        assert!(d.logits <= 1e-4, "{label} seed {seed}: {:.2e}", d.logits);
        assert!(d.same_tokens, "{label} seed {seed}: tokens differ");
    }
}

#[test]
fn tp2_matches_tp1_with_even_and_uneven_splits() {
    // 160 intermediate columns = 5 blocks of 32: ranks get 96 and 64 (uneven).
    assert_every_seed_agrees(
        "llama q8_0",
        &tiny_config(Architecture::Llama),
        GgmlDType::Q8_0,
        false,
    );
    assert_every_seed_agrees(
        "qwen2 f32 with biases",
        &tiny_config(Architecture::Qwen2),
        GgmlDType::F32,
        true,
    );
}

/// K-quant models, on candle's kernels and on ours (`kquant_matmul`, where this CPU runs
/// them). 768 = 3 K-quant blocks of 256: ranks get 512 and 256; 8 heads of 64 put the
/// o_proj cut on a block boundary, as the real Qwen pair's head splits do.
///
/// Why a split model can part from the whole one here. The row-parallel products
/// (o_proj, down) are summed in another order: the whole model's kernel carries its sum
/// from one 256-wide input block to the next inside fused multiply-adds, while each rank
/// rounds its own blocks' sum and the all-reduce adds the two. That moves outputs by an
/// ulp or so (~1e-7 relative; `kquant_matmul`'s `a_row_split_product_differs_only_in_rounding`
/// pins it). Alone that is harmless: the dense and Q8_0 models above agree to 1e-5 on every
/// seed. But a K-quant matmul rounds its input to 8 bits per 256 values (as llama.cpp's
/// Q8_K does), and an input that sits within an ulp of a rounding boundary then lands on
/// the other step: a jump of 1/127 of its block's largest value, which the layers after it
/// carry to the logits. Traced once on our kernels, seed 9 (instrumented, not kept): layer
/// 0's o_proj outputs differ by ~1e-7, gate/up's by ~5e-7, and one of the 768 inputs of row
/// 6's down product, 0.58705854 whole vs 0.58705900 split, rounds to step 19 vs 20; no
/// other input of that layer changes step, and only rows 6 on (which see row 6) part, by up
/// to 5 %. It cannot be removed by reordering the all-reduce without the whole model
/// knowing the split, so it is bounded: such flips are rare (probability ~ ulp x step
/// count per input), so most seeds agree to 1e-4 everywhere and the rest stay within a
/// quarter of a logit, each seed's figure printed.
#[test]
fn kquant_splits_part_from_the_whole_model_only_by_rare_rounding_flips() {
    let kq = ModelConfig {
        intermediate_size: 768,
        num_heads: 8,
        ..kquant_config()
    };
    let candle = LoadOptions {
        candle_kquants: true,
        ..LoadOptions::default()
    };
    let kernels = [("candle kernels", candle), ("ours", LoadOptions::default())];
    for (label, opts) in kernels {
        let mut parted = Vec::new();
        for seed in SEEDS {
            let d = divergence(&kq, GgmlDType::Q4K, false, seed, &opts);
            println!(
                "llama q4_k, {label}, seed {seed}: largest logit difference {:.1e}{}",
                d.logits,
                match d.first_row {
                    Some(r) => format!(" from row {r} on"),
                    None => String::new(),
                }
            );
            assert!(
                d.logits <= 0.25,
                "{label} seed {seed}: logits differ by {}",
                d.logits
            );
            match d.first_row {
                Some(_) => parted.push(seed),
                None => assert!(d.same_tokens, "{label} seed {seed}: tokens differ"),
            }
        }
        println!(
            "llama q4_k, {label}: {} of {} seeds part by more than 1e-4 ({parted:?})",
            parted.len(),
            SEEDS.count()
        );
        assert!(
            parted.len() * 3 <= SEEDS.count(),
            "{label}: seeds {parted:?} part; rounding flips should be rare"
        );
    }
}

#[test]
fn tp_larger_than_kv_heads_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama);
    let path = dir.path().join("m.gguf");
    write_gguf(
        &path,
        &cfg,
        &random_weights(&cfg, 1, false, false).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let err = TpModel::load(&path, 3, &LoadOptions::default(), &Device::Cpu)
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("exceeds the 2 key/value heads"),
        "{err}"
    );
}

/// A rank that fails mid-forward (a panic in its shard) fails that forward on every rank,
/// the leader included, instead of leaving the others waiting in the all-reduce for ever;
/// the forward after it runs as if nothing had happened.
#[test]
fn a_failing_rank_fails_the_forward_on_every_rank_instead_of_hanging() {
    use std::sync::Arc;
    use std::sync::mpsc::channel;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama);
    let path = dir.path().join("m.gguf");
    write_gguf(
        &path,
        &cfg,
        &random_weights(&cfg, 1, false, false).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let tp = Arc::new(TpModel::load(&path, 2, &LoadOptions::default(), &Device::Cpu).unwrap());
    let prompt: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % 64).collect();
    // One forward of the prompt on a fresh cache, on another thread, within a minute.
    let run = || {
        let (tx, rx) = channel();
        let (tp, prompt) = (tp.clone(), prompt.clone());
        std::thread::spawn(move || {
            let pos: Vec<u32> = (0..prompt.len() as u32).collect();
            let mut cache = tp.new_cache();
            let input = SeqInput::chain(&prompt, &pos, OutputSpec::all().with_logits());
            let _ = tx.send(tp.forward(&mut cache, input));
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the forward hung")
    };
    let before = run().unwrap();
    for rank in [1, 0] {
        tp.inject_panic(rank);
        let err = run().unwrap_err();
        assert!(
            err.to_string().contains(&format!("rank {rank} panicked")),
            "rank {rank}: {err}"
        );
        let after = run().unwrap();
        assert_eq!(after.argmax, before.argmax);
        assert_eq!(after.logits, before.logits);
    }
}

/// The same comparisons with the ranks on GPUs (one each), their partial sums meeting in
/// NCCL's all-reduce on the devices. Built with `--features cuda`, run by
/// scripts/gpu-check.sh on a machine with two GPUs or more.
#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use engine::tp::Reduction;

    /// Two GPUs, or None after saying why the test did nothing.
    fn two_gpus() -> Option<Vec<Device>> {
        let n = candle_core::cuda::cudarc::driver::CudaContext::device_count().unwrap_or(0);
        if n < 2 {
            println!("SKIPPED: {n} GPU(s); tensor parallelism over NCCL needs two");
            return None;
        }
        Some((0..2).map(|i| Device::new_cuda(i).unwrap()).collect())
    }

    fn model(
        dir: &std::path::Path,
        cfg: &ModelConfig,
        dtype: GgmlDType,
        seed: u64,
    ) -> std::path::PathBuf {
        let path = dir.join(format!("m{seed}.gguf"));
        write_gguf(
            &path,
            cfg,
            &random_weights(cfg, seed, true, false).unwrap(),
            dtype,
        )
        .unwrap();
        path
    }

    /// NCCL's sum of two partials is the host's (a + b either way), so both reductions
    /// give the same logits bit for bit; and the split model stays with the whole model on
    /// one GPU as closely as the CPU split does.
    #[test]
    #[ignore = "needs two NVIDIA GPUs: scripts/gpu-check.sh runs it"]
    fn nccl_tp2_equals_host_tp2_and_follows_the_whole_model() {
        let Some(gpus) = two_gpus() else { return };
        let dir = tempfile::tempdir().unwrap();
        let opts = LoadOptions::default();
        for (label, cfg, dtype) in [
            (
                "qwen2 f32",
                tiny_config(Architecture::Qwen2),
                GgmlDType::F32,
            ),
            (
                "llama q8_0",
                tiny_config(Architecture::Llama),
                GgmlDType::Q8_0,
            ),
        ] {
            for seed in 1..=4 {
                let path = model(dir.path(), &cfg, dtype, seed);
                let nccl = TpModel::load_with(&path, &opts, &gpus, Reduction::Nccl).unwrap();
                let host = TpModel::load_with(&path, &opts, &gpus, Reduction::Host).unwrap();
                let d = compare(&nccl, &host, cfg.vocab_size);
                println!(
                    "{label} seed {seed}: NCCL against host sums {:.1e}",
                    d.logits
                );
                assert_eq!(d.logits, 0.0, "{label} seed {seed}");
                let whole = engine::load_model(&path, &opts, &gpus[0]).unwrap();
                let d = compare(&whole, &nccl, cfg.vocab_size);
                println!(
                    "{label} seed {seed}: whole model against NCCL split {:.1e}",
                    d.logits
                );
                assert!(d.logits <= 1e-4, "{label} seed {seed}: {:.2e}", d.logits);
                assert!(d.same_tokens, "{label} seed {seed}: tokens differ");
            }
        }
    }

    /// A rank that fails on its GPU fails the forward everywhere instead of leaving the
    /// other inside an NCCL all-reduce it will never finish; the next forward works.
    #[test]
    #[ignore = "needs two NVIDIA GPUs: scripts/gpu-check.sh runs it"]
    fn a_failing_gpu_rank_fails_the_forward_instead_of_hanging_in_nccl() {
        let Some(gpus) = two_gpus() else { return };
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny_config(Architecture::Llama);
        let path = model(dir.path(), &cfg, GgmlDType::F32, 1);
        let tp =
            TpModel::load_with(&path, &LoadOptions::default(), &gpus, Reduction::Nccl).unwrap();
        let prompt = [1u32, 2, 3, 4];
        let pos = [0u32, 1, 2, 3];
        tp.inject_panic(1);
        let mut cache = tp.new_cache();
        let e = tp
            .forward(
                &mut cache,
                SeqInput::chain(&prompt, &pos, OutputSpec::last(4)),
            )
            .unwrap_err();
        assert!(e.to_string().contains("rank 1 panicked"), "{e}");
        let mut cache = tp.new_cache();
        tp.forward(
            &mut cache,
            SeqInput::chain(&prompt, &pos, OutputSpec::last(4)),
        )
        .unwrap();
    }
}
