//! Tiny random-weight models written to real GGUF files and Hugging Face folders, for
//! tests here and in the crates above. Nothing here is used when serving.

use crate::config::{Architecture, ModelConfig, RopeStyle};
use crate::error::Result;
use crate::weights::Role;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// A model small enough to run thousands of forwards in a test.
pub fn tiny_config(arch: Architecture) -> ModelConfig {
    ModelConfig {
        arch,
        vocab_size: 96,
        hidden_size: 64,
        intermediate_size: 160,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rope_theta: 10_000.0,
        rope_style: match arch {
            Architecture::Qwen2 => RopeStyle::Neox,
            _ => RopeStyle::Interleaved,
        },
        rms_norm_eps: 1e-5,
        max_position: 512,
    }
}

/// Random weights by role, as `(out, in)` matrices and vectors. Deterministic in `seed`.
pub fn random_weights(
    cfg: &ModelConfig,
    seed: u64,
    with_bias: bool,
    tied: bool,
) -> Result<Vec<(Role, Tensor)>> {
    let dev = Device::Cpu;
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut rnd = |shape: &[usize], scale: f32, offset: f32| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
                offset + scale * (2.0 * u as f32 - 1.0)
            })
            .collect();
        Ok(Tensor::from_vec(data, shape, &dev)?)
    };
    let (h, v, f) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    let mut out = vec![(Role::Embed, rnd(&[v, h], 1.0, 0.0)?)];
    for i in 0..cfg.num_layers {
        let w = 1.0 / (h as f32).sqrt() * 1.7;
        out.push((Role::AttnNorm(i), rnd(&[h], 0.2, 1.0)?));
        out.push((Role::Q(i), rnd(&[qd, h], w, 0.0)?));
        out.push((Role::K(i), rnd(&[kvd, h], w, 0.0)?));
        out.push((Role::V(i), rnd(&[kvd, h], w, 0.0)?));
        if with_bias {
            out.push((Role::QBias(i), rnd(&[qd], 0.5, 0.0)?));
            out.push((Role::KBias(i), rnd(&[kvd], 0.5, 0.0)?));
            out.push((Role::VBias(i), rnd(&[kvd], 0.5, 0.0)?));
        }
        out.push((Role::O(i), rnd(&[h, qd], 1.0 / (qd as f32).sqrt(), 0.0)?));
        out.push((Role::FfnNorm(i), rnd(&[h], 0.2, 1.0)?));
        out.push((Role::Gate(i), rnd(&[f, h], w, 0.0)?));
        out.push((Role::Up(i), rnd(&[f, h], w, 0.0)?));
        out.push((Role::Down(i), rnd(&[h, f], 1.0 / (f as f32).sqrt(), 0.0)?));
    }
    out.push((Role::FinalNorm, rnd(&[h], 0.2, 1.0)?));
    if !tied {
        out.push((Role::LmHead, rnd(&[v, h], 3.0 / (h as f32).sqrt(), 0.0)?));
    }
    Ok(out)
}

/// Writes a GGUF file that llama.cpp-style readers (ours, candle-transformers) accept.
/// Matrices are stored as `matrix_dtype`, vectors as F32.
pub fn write_gguf(
    path: &Path,
    cfg: &ModelConfig,
    weights: &[(Role, Tensor)],
    matrix_dtype: GgmlDType,
) -> Result<()> {
    write_gguf_with_metadata(path, cfg, weights, matrix_dtype, Vec::new())
}

/// `write_gguf` with more metadata entries (a chat template, a vocabulary, ...).
pub fn write_gguf_with_metadata(
    path: &Path,
    cfg: &ModelConfig,
    weights: &[(Role, Tensor)],
    matrix_dtype: GgmlDType,
    extra: Vec<(String, Value)>,
) -> Result<()> {
    write_gguf_by_role(path, cfg, weights, |_| matrix_dtype, extra)
}

/// The block type of each matrix as llama.cpp's Q4_K_M files have them: Q6_K for the
/// value projections, the down projections and the output head, Q4_K for the rest.
pub fn q4_k_m(role: Role) -> GgmlDType {
    match role {
        Role::V(_) | Role::Down(_) | Role::LmHead => GgmlDType::Q6K,
        _ => GgmlDType::Q4K,
    }
}

/// `write_gguf_with_metadata` with each matrix's block type chosen by its role.
pub fn write_gguf_by_role(
    path: &Path,
    cfg: &ModelConfig,
    weights: &[(Role, Tensor)],
    matrix_dtype: impl Fn(Role) -> GgmlDType,
    extra: Vec<(String, Value)>,
) -> Result<()> {
    let a = cfg.arch.name();
    let u = |x: usize| Value::U32(x as u32);
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        ("general.name".into(), Value::String(format!("tiny-{a}"))),
        (format!("{a}.block_count"), u(cfg.num_layers)),
        (format!("{a}.embedding_length"), u(cfg.hidden_size)),
        (format!("{a}.feed_forward_length"), u(cfg.intermediate_size)),
        (format!("{a}.attention.head_count"), u(cfg.num_heads)),
        (format!("{a}.attention.head_count_kv"), u(cfg.num_kv_heads)),
        (format!("{a}.attention.key_length"), u(cfg.head_dim)),
        (format!("{a}.rope.dimension_count"), u(cfg.head_dim)),
        (format!("{a}.context_length"), u(cfg.max_position)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (format!("{a}.rope.freq_base"), Value::F32(cfg.rope_theta)),
    ];
    meta.extend(extra);
    let mut tensors = Vec::new();
    for (role, t) in weights {
        let q = if t.rank() == 2 {
            QTensor::quantize(t, matrix_dtype(*role))?
        } else {
            QTensor::quantize(t, GgmlDType::F32)?
        };
        tensors.push((role.gguf_name(), q));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).map_err(|source| crate::EngineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    gguf_file::write(&mut file, &meta_refs, &tensor_refs)?;
    Ok(())
}

/// Writes a Hugging Face folder (`config.json` + `model.safetensors`) in `dtype`.
/// llama.cpp stores llama q/k rows permuted for interleaved RoPE; Hugging Face files are
/// not, so the q/k rows are permuted back here to describe the same model.
pub fn write_hf_folder(
    dir: &Path,
    cfg: &ModelConfig,
    weights: &[(Role, Tensor)],
    dtype: DType,
    tied: bool,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| crate::EngineError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let arch = match cfg.arch {
        Architecture::Llama => "LlamaForCausalLM",
        Architecture::Qwen2 => "Qwen2ForCausalLM",
        Architecture::Mistral => "MistralForCausalLM",
    };
    let config = serde_json::json!({
        "architectures": [arch],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position,
        "tie_word_embeddings": tied,
    });
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, config.to_string()).map_err(|source| crate::EngineError::Io {
        path: cfg_path,
        source,
    })?;
    let mut map = HashMap::new();
    for (role, t) in weights {
        let t = match (cfg.rope_style, role) {
            (RopeStyle::Interleaved, Role::Q(_) | Role::QBias(_)) => {
                unpermute_rows(t, cfg.num_heads, cfg.head_dim)?
            }
            (RopeStyle::Interleaved, Role::K(_) | Role::KBias(_)) => {
                unpermute_rows(t, cfg.num_kv_heads, cfg.head_dim)?
            }
            _ => t.clone(),
        };
        map.insert(role.hf_name(), t.to_dtype(dtype)?);
    }
    candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
    Ok(())
}

/// Within each head, moves interleaved rows (0,1),(2,3).. to half-split order: row 2i
/// goes to i and row 2i+1 to d/2 + i. The inverse of llama.cpp's conversion permute.
fn unpermute_rows(t: &Tensor, heads: usize, d: usize) -> Result<Tensor> {
    let cols = t.dim(t.rank() - 1)?;
    let squeeze = t.rank() == 1;
    let t2 = if squeeze {
        t.reshape((heads * d, 1))?
    } else {
        t.clone()
    };
    let cols = if squeeze { 1 } else { cols };
    Ok(t2
        .reshape((heads, d / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((heads * d, cols))?
        .reshape(t.shape())?)
}

/// The config an HF folder written from `cfg` loads as (half-split RoPE).
pub fn hf_equivalent(cfg: &ModelConfig) -> ModelConfig {
    ModelConfig {
        rope_style: RopeStyle::Neox,
        ..cfg.clone()
    }
}

/// Tells the test summary (`scripts/test.sh` lists these lines) that `test` could not run
/// `kernel` on this CPU, and why. Not a skip: the test ran every kernel this CPU runs,
/// the portable one included.
pub fn kernel_not_run(test: &str, kernel: &str, why: &str) {
    println!("KERNEL NOT RUN: {kernel} in {test} ({why})");
}

/// A fetched model file by name, or None after printing the SKIPPED line that the test
/// scripts count (scripts/fetch-models.sh fetches them).
pub fn fetched_model(file: &str) -> Option<std::path::PathBuf> {
    let path = crate::models::models_dir().join(file);
    if path.exists() {
        return Some(path);
    }
    println!(
        "SKIPPED: {} not present (run scripts/fetch-models.sh)",
        path.display()
    );
    None
}

/// Values as f32 regardless of storage dtype (for comparing outputs).
pub fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}
