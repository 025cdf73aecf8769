//! Shared helpers for the engine's integration tests: tiny models on disk, sequential
//! reference decoding and tolerant comparisons.
#![allow(dead_code)]

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use engine::testing::{random_weights, tiny_config, write_gguf, write_hf_folder};
use engine::{
    Architecture, KvState, LanguageModel, LoadOptions, ModelConfig, OutputSpec, SeqInput,
    Transformer,
};
use std::path::Path;

pub struct TinyModel {
    pub label: String,
    pub model: Transformer,
}

/// A config whose every matrix row is a whole number of 256-wide K-quant blocks.
pub fn kquant_config() -> ModelConfig {
    ModelConfig {
        hidden_size: 256,
        intermediate_size: 512,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        ..tiny_config(Architecture::Llama)
    }
}

/// One tiny model per supported file kind, architecture and weight type.
pub fn tiny_models(dir: &Path) -> Vec<TinyModel> {
    let dev = Device::Cpu;
    let opts = LoadOptions::default();
    let mut out = Vec::new();
    let mut add = |label: &str, path: &Path| {
        let model =
            engine::load_model(path, &opts, &dev).unwrap_or_else(|e| panic!("{label}: {e}"));
        out.push(TinyModel {
            label: label.to_string(),
            model,
        });
    };
    let llama = tiny_config(Architecture::Llama);
    let qwen = tiny_config(Architecture::Qwen2);
    let w_llama = random_weights(&llama, 1, false, false).unwrap();
    let w_qwen = random_weights(&qwen, 2, true, false).unwrap();
    let w_tied = random_weights(&llama, 3, false, true).unwrap();

    let p = dir.join("llama-f32.gguf");
    write_gguf(&p, &llama, &w_llama, GgmlDType::F32).unwrap();
    add("gguf llama f32", &p);
    let p = dir.join("qwen2-q8_0.gguf");
    write_gguf(&p, &qwen, &w_qwen, GgmlDType::Q8_0).unwrap();
    add("gguf qwen2 q8_0 (biases)", &p);
    let p = dir.join("llama-q4_0-tied.gguf");
    write_gguf(&p, &llama, &w_tied, GgmlDType::Q4_0).unwrap();
    add("gguf llama q4_0 (tied head)", &p);
    let p = dir.join("llama-f16.gguf");
    write_gguf(&p, &llama, &w_llama, GgmlDType::F16).unwrap();
    add("gguf llama f16", &p);
    let p = dir.join("llama-q5_0.gguf");
    write_gguf(&p, &llama, &w_llama, GgmlDType::Q5_0).unwrap();
    add("gguf llama q5_0 (requantized to q8_0)", &p);
    let kq = kquant_config();
    let w_kq = random_weights(&kq, 4, false, false).unwrap();
    for (dtype, label) in [
        (GgmlDType::Q4K, "gguf llama q4_k"),
        (GgmlDType::Q5K, "gguf llama q5_k"),
        (GgmlDType::Q6K, "gguf llama q6_k"),
    ] {
        let p = dir.join(format!("{label}.gguf").replace(' ', "-"));
        write_gguf(&p, &kq, &w_kq, dtype).unwrap();
        add(label, &p);
    }
    let p = dir.join("hf-llama-f32");
    write_hf_folder(&p, &llama, &w_llama, candle_core::DType::F32, false).unwrap();
    add("safetensors llama f32", &p);
    let mistral = ModelConfig {
        arch: Architecture::Mistral,
        ..llama.clone()
    };
    let p = dir.join("hf-mistral-bf16");
    write_hf_folder(&p, &mistral, &w_llama, candle_core::DType::BF16, false).unwrap();
    add("safetensors mistral bf16", &p);
    let p = dir.join("hf-qwen2-f16-tied");
    let w_qwen_tied = random_weights(&qwen, 5, true, true).unwrap();
    write_hf_folder(&p, &qwen, &w_qwen_tied, candle_core::DType::F16, true).unwrap();
    add("safetensors qwen2 f16 (tied)", &p);
    out
}

/// Logits after feeding `path` one token at a time into a fresh cache: the plain
/// sequential decoding every tree row must agree with.
pub fn sequential_last_logits<M: LanguageModel>(model: &M, path: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache();
    let mut last = None;
    for (i, t) in path.iter().enumerate() {
        let out = model
            .forward(
                &mut cache,
                SeqInput::chain(&[*t], &[i as u32], OutputSpec::all().with_logits()),
            )
            .unwrap();
        last = out.logits.map(|mut l| l.remove(0));
    }
    assert_eq!(cache.len(), path.len());
    last.expect("non-empty path")
}

pub fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold((0, f32::MIN), |a, (i, &x)| if x > a.1 { (i, x) } else { a })
        .0 as u32
}

/// Largest absolute difference, relative to the logit size where that exceeds 1.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f32::max)
}

/// Asserts two logit rows agree: every value within `tol`, and the same argmax unless the
/// reference's top two are closer than the numerical noise.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let d = max_diff(got, want);
    assert!(d <= tol, "{what}: logits differ by {d} (tolerance {tol})");
    let (ga, wa) = (argmax(got), argmax(want));
    if ga != wa {
        let gap = (want[wa as usize] - want[ga as usize]).abs();
        assert!(
            gap <= 2.0 * tol,
            "{what}: argmax {ga} vs {wa} with a logit gap of {gap}"
        );
    }
}
