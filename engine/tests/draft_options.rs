//! Load options meant for a draft model, whose tokens the target checks: a narrowed output
//! head (`head_vocab`) and weights re-encoded in other blocks at load (`requantize`).

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use engine::testing::{random_weights, tiny_config, write_gguf};
use engine::{Architecture, LanguageModel, LoadOptions, OutputSpec, SeqInput, Transformer};

fn model(opts: &LoadOptions) -> Transformer {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Qwen2);
    let path = dir.path().join("draft.gguf");
    let w = random_weights(&cfg, 5, true, true).unwrap();
    write_gguf(&path, &cfg, &w, GgmlDType::Q8_0).unwrap();
    engine::load_model(&path, opts, &Device::Cpu).unwrap()
}

/// Argmax and logits of every position of a fixed 12-token text.
fn run(m: &Transformer) -> (Vec<u32>, Vec<Vec<f32>>) {
    let tokens: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 96).collect();
    let pos: Vec<u32> = (0..12).collect();
    let mut cache = m.new_cache();
    let out = m
        .forward(
            &mut cache,
            SeqInput::chain(&tokens, &pos, OutputSpec::all().with_logits()),
        )
        .unwrap();
    (out.argmax, out.logits.unwrap())
}

#[test]
fn a_narrow_head_predicts_the_best_of_its_tokens_and_never_the_rest() {
    let (_, full) = run(&model(&LoadOptions::default()));
    let narrow = model(&LoadOptions {
        head_vocab: Some(48),
        ..LoadOptions::default()
    });
    let (argmax, logits) = run(&narrow);
    for (row, (a, (l, f))) in argmax.iter().zip(logits.iter().zip(&full)).enumerate() {
        assert_eq!(l.len(), 96, "logits still span the vocabulary");
        assert!(l[48..].iter().all(|x| *x == f32::NEG_INFINITY), "row {row}");
        // the first 48 logits are the full head's own
        assert_eq!(&l[..48], &f[..48], "row {row}");
        let best = (0..48).max_by(|&i, &j| f[i].total_cmp(&f[j])).unwrap();
        assert_eq!(*a as usize, best, "row {row}");
    }
    for bad in [0, 97] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny_config(Architecture::Qwen2);
        let path = dir.path().join("d.gguf");
        let w = random_weights(&cfg, 5, true, true).unwrap();
        write_gguf(&path, &cfg, &w, GgmlDType::Q8_0).unwrap();
        let opts = LoadOptions {
            head_vocab: Some(bad),
            ..LoadOptions::default()
        };
        let Err(err) = engine::load_model(&path, &opts, &Device::Cpu) else {
            panic!("head vocabulary {bad} was accepted");
        };
        assert!(err.to_string().contains("head vocabulary"), "{err}");
    }
}

#[test]
fn requantized_weights_stay_close_to_the_file() {
    let (_, want) = run(&model(&LoadOptions::default()));
    // Q4_K blocks span 256 columns: the 64- and 160-wide matrices are zero-padded.
    for (dtype, tolerance) in [(GgmlDType::Q8_0, 0.02), (GgmlDType::Q4K, 0.25)] {
        let m = model(&LoadOptions {
            requantize: Some(dtype),
            ..LoadOptions::default()
        });
        let (_, got) = run(&m);
        let scale = want.iter().flatten().map(|x| x.abs()).fold(0f32, f32::max);
        let worst = want
            .iter()
            .flatten()
            .zip(got.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= tolerance * scale,
            "{dtype:?}: worst logit error {worst} against a scale of {scale}"
        );
    }
}

#[test]
fn block_types_are_named_as_on_the_command_line() {
    assert_eq!(engine::block_type("q4k").unwrap(), GgmlDType::Q4K);
    assert_eq!(engine::block_type("Q8_0").unwrap(), GgmlDType::Q8_0);
    assert!(engine::block_type("q3k").is_err());
}

/// The confidence a draft stops on is the softmax probability of the row's argmax, the
/// same with or without logits asked for, and over a narrowed head's own tokens.
#[test]
fn confidence_is_the_argmax_probability() {
    for head_vocab in [None, Some(48)] {
        let m = model(&LoadOptions {
            head_vocab,
            ..LoadOptions::default()
        });
        let (argmax, logits) = run(&m);
        let tokens: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 96).collect();
        let pos: Vec<u32> = (0..12).collect();
        let rows = vec![0, 5, 11];
        let spec = OutputSpec {
            rows: Some(rows.clone()),
            ..OutputSpec::default()
        }
        .with_confidence();
        let out = m
            .forward(&mut m.new_cache(), SeqInput::chain(&tokens, &pos, spec))
            .unwrap();
        assert!(out.logits.is_none(), "logits were not asked for");
        let conf = out.confidence.expect("confidence was asked for");
        assert_eq!(conf.len(), rows.len());
        for (i, &r) in rows.iter().enumerate() {
            assert_eq!(out.argmax[i], argmax[r]);
            let l = &logits[r];
            let top = l[argmax[r] as usize];
            let mass: f64 = l.iter().map(|&x| f64::from(x - top).exp()).sum();
            let want = (1.0 / mass) as f32;
            assert!(
                (conf[i] - want).abs() < 1e-4 && conf[i] > 0.0 && conf[i] <= 1.0,
                "{head_vocab:?} row {r}: {} against {want}",
                conf[i]
            );
        }
        // without asking, none is computed
        let plain = m
            .forward(
                &mut m.new_cache(),
                SeqInput::chain(&tokens, &pos, OutputSpec::last(12)),
            )
            .unwrap();
        assert!(plain.confidence.is_none());
    }
}

/// Tokens beyond a narrowed head that a forward names (`OutputSpec::also`) are scored
/// with the full head's rows: their logits, the argmax and its confidence are the full
/// head's over the head's tokens and those, while unnamed ones stay out.
#[test]
fn tokens_named_beyond_a_narrow_head_are_scored_as_the_full_head_scores_them() {
    // Also with the weights re-encoded at load: the named rows are encoded alike.
    for requantize in [None, Some(GgmlDType::Q4K)] {
        let (_, full) = run(&model(&LoadOptions {
            requantize,
            ..LoadOptions::default()
        }));
        let narrow = model(&LoadOptions {
            head_vocab: Some(48),
            requantize,
            ..LoadOptions::default()
        });
        assert_eq!(narrow.info().head_vocab, 48);
        let tokens: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 96).collect();
        let pos: Vec<u32> = (0..12).collect();
        // Beyond the head: each row's best token past 48 for some rows, so that the named
        // tokens win there; repeats and tokens the head covers are allowed.
        let mut named: Vec<u32> = full
            .iter()
            .step_by(3)
            .map(|f| (48..96).max_by(|&i, &j| f[i].total_cmp(&f[j])).unwrap() as u32)
            .collect();
        named.extend([3, 95, 95]);
        let set: std::collections::BTreeSet<u32> =
            named.iter().copied().filter(|&t| t >= 48).collect();
        let spec = OutputSpec::all()
            .with_logits()
            .with_confidence()
            .also(named.clone().into());
        let out = narrow
            .forward(
                &mut narrow.new_cache(),
                SeqInput::chain(&tokens, &pos, spec),
            )
            .unwrap();
        let (logits, conf) = (out.logits.unwrap(), out.confidence.unwrap());
        let mut won = 0;
        for (row, f) in full.iter().enumerate() {
            let l = &logits[row];
            let allowed = |t: usize| t < 48 || set.contains(&(t as u32));
            for t in 0..96 {
                if allowed(t) {
                    assert_eq!(l[t], f[t], "{requantize:?} row {row} token {t}");
                } else {
                    assert_eq!(
                        l[t],
                        f32::NEG_INFINITY,
                        "{requantize:?} row {row} token {t}"
                    );
                }
            }
            let best = (0..96)
                .filter(|&t| allowed(t))
                .max_by(|&i, &j| f[i].total_cmp(&f[j]))
                .unwrap();
            assert_eq!(out.argmax[row] as usize, best, "{requantize:?} row {row}");
            won += usize::from(best >= 48);
            let mass: f64 = (0..96)
                .filter(|&t| allowed(t))
                .map(|t| f64::from(f[t] - f[best]).exp())
                .sum();
            assert!(
                (conf[row] - (1.0 / mass) as f32).abs() < 1e-4,
                "{requantize:?} row {row}"
            );
        }
        assert!(won > 0, "no named token beyond the head was ever the best");
        // a token outside the vocabulary is refused, naming the field
        let bad = OutputSpec::all().also(vec![96].into());
        let err = narrow
            .forward(&mut narrow.new_cache(), SeqInput::chain(&tokens, &pos, bad))
            .unwrap_err();
        assert!(err.to_string().contains("outputs.also[0]"), "{err}");
    }
}
