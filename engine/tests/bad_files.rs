//! Broken or unsupported model files give errors that name the problem, never a panic.

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use engine::testing::{random_weights, tiny_config, write_gguf, write_hf_folder};
use engine::weights::Role;
use engine::{Architecture, LoadOptions};
use std::path::Path;

fn load_err(path: &Path) -> String {
    match engine::load_model(path, &LoadOptions::default(), &Device::Cpu) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn broken_gguf_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama);
    let w = random_weights(&cfg, 1, false, false).unwrap();

    let missing = dir.path().join("nope.gguf");
    assert!(load_err(&missing).contains("cannot read"));

    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"definitely not a model").unwrap();
    assert!(load_err(&garbage).contains("not a valid GGUF file"));

    let good = dir.path().join("good.gguf");
    write_gguf(&good, &cfg, &w, GgmlDType::Q8_0).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000]).unwrap();
    let err = load_err(&truncated);
    assert!(
        err.contains("remaining in file") || err.contains("not a valid GGUF"),
        "{err}"
    );

    let no_down: Vec<_> = w
        .iter()
        .filter(|(r, _)| *r != Role::Down(1))
        .cloned()
        .collect();
    let p = dir.path().join("missing-tensor.gguf");
    write_gguf(&p, &cfg, &no_down, GgmlDType::Q8_0).unwrap();
    assert!(load_err(&p).contains("missing tensor 'blk.1.ffn_down.weight'"));

    let mut wrong = w.clone();
    let q = wrong.iter_mut().find(|(r, _)| *r == Role::Q(0)).unwrap();
    q.1 = candle_core::Tensor::zeros((32, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    let p = dir.path().join("wrong-shape.gguf");
    write_gguf(&p, &cfg, &wrong, GgmlDType::F32).unwrap();
    let err = load_err(&p);
    assert!(
        err.contains("blk.0.attn_q.weight") && err.contains("[32, 64]"),
        "{err}"
    );

    let gpt = engine::ModelConfig {
        arch: Architecture::Llama,
        ..cfg.clone()
    };
    let p = dir.path().join("arch.gguf");
    write_gguf(&p, &gpt, &w, GgmlDType::F32).unwrap();
    // Rewrite the architecture string in place: same length, unknown name.
    let mut bytes = std::fs::read(&p).unwrap();
    let at = bytes.windows(5).position(|x| x == b"llama").unwrap();
    bytes[at..at + 5].copy_from_slice(b"gemmz");
    std::fs::write(&p, bytes).unwrap();
    assert!(load_err(&p).contains("unsupported model architecture 'gemmz'"));
}

#[test]
fn broken_hf_folders_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama);
    let w = random_weights(&cfg, 1, false, false).unwrap();

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(load_err(&empty).contains("config.json"));

    let p = dir.path().join("no-weights");
    write_hf_folder(&p, &cfg, &w, candle_core::DType::F32, false).unwrap();
    std::fs::remove_file(p.join("model.safetensors")).unwrap();
    assert!(load_err(&p).contains("no *.safetensors file"));

    let p = dir.path().join("bad-json");
    write_hf_folder(&p, &cfg, &w, candle_core::DType::F32, false).unwrap();
    std::fs::write(p.join("config.json"), "{ not json").unwrap();
    assert!(load_err(&p).contains("not a valid config.json file"));

    let p = dir.path().join("other-arch");
    write_hf_folder(&p, &cfg, &w, candle_core::DType::F32, false).unwrap();
    let text = std::fs::read_to_string(p.join("config.json")).unwrap();
    std::fs::write(
        p.join("config.json"),
        text.replace("LlamaForCausalLM", "GPT2LMHeadModel"),
    )
    .unwrap();
    assert!(load_err(&p).contains("unsupported model architecture 'GPT2LMHeadModel'"));

    let p = dir.path().join("int-weights");
    write_hf_folder(&p, &cfg, &w, candle_core::DType::F32, false).unwrap();
    let mut map =
        candle_core::safetensors::load(p.join("model.safetensors"), &Device::Cpu).unwrap();
    let name = Role::Embed.hf_name();
    let ints = map[&name].to_dtype(candle_core::DType::U8).unwrap();
    map.insert(name, ints);
    candle_core::safetensors::save(&map, p.join("model.safetensors")).unwrap();
    assert!(load_err(&p).contains("unsupported type U8"));
}

/// Hostile headers: each gives an error naming the problem, never a panic, an abort or an
/// allocation of what the header claims.
#[test]
fn hostile_gguf_headers_are_refused() {
    use candle_core::quantized::gguf_file::Value;
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama);
    let w = random_weights(&cfg, 1, false, false).unwrap();
    let with = |name: &str, meta: Vec<(String, Value)>| {
        let p = dir.path().join(name);
        engine::testing::write_gguf_with_metadata(&p, &cfg, &w, GgmlDType::F32, meta).unwrap();
        p
    };

    // Alignment 0: candle's reader divides by it.
    let p = with(
        "align0.gguf",
        vec![("general.alignment".into(), Value::U32(0))],
    );
    let err = load_err(&p);
    assert!(
        err.contains("not a valid GGUF") && err.contains("alignment"),
        "{err}"
    );

    // A context length no machine has memory for (RoPE tables are sized from it).
    let p = with(
        "context.gguf",
        vec![("llama.context_length".into(), Value::U64(1 << 40))],
    );
    let err = load_err(&p);
    assert!(err.contains("context length 1099511627776"), "{err}");

    // A tensor with a 0 dimension.
    let mut empty = w.clone();
    let e = empty.iter_mut().find(|(r, _)| *r == Role::Embed).unwrap();
    e.1 = candle_core::Tensor::zeros((0, cfg.hidden_size), candle_core::DType::F32, &Device::Cpu)
        .unwrap();
    let p = dir.path().join("zero-dim.gguf");
    write_gguf(&p, &cfg, &empty, GgmlDType::F32).unwrap();
    let err = load_err(&p);
    assert!(
        err.contains("token_embd.weight") && err.contains("empty shape"),
        "{err}"
    );

    // Dimensions whose product overflows: rewrite the embedding's two u64 dimensions.
    let good = dir.path().join("good.gguf");
    write_gguf(&good, &cfg, &w, GgmlDType::F32).unwrap();
    let mut bytes = std::fs::read(&good).unwrap();
    let name = b"token_embd.weight";
    let at = bytes.windows(name.len()).position(|x| x == name).unwrap() + name.len();
    // n_dims (u32) = 2, then the dimensions (u64 each).
    assert_eq!(&bytes[at..at + 4], &2u32.to_le_bytes());
    for d in 0..2 {
        let o = at + 4 + 8 * d;
        bytes[o..o + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    }
    let p = dir.path().join("overflow.gguf");
    std::fs::write(&p, bytes).unwrap();
    let err = load_err(&p);
    assert!(
        err.contains("token_embd.weight") && err.contains("too large"),
        "{err}"
    );
}
