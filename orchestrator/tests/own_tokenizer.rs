//! A model runs with its own tokenizer unless told otherwise, and a tokenizer of another
//! family is refused at start (before, Qwen ids ran through SmolLM2 and came out as
//! "agepB?CEpcdpBp(sp").

use candle_core::Device;
use engine::testing::fetched_model;
use engine::{LanguageModel, LoadOptions, OutputSpec, SeqInput};
use std::path::Path;
use std::process::{Command, Output};

const PROMPT: &str = "The capital of France is";
const NEW: usize = 12;

fn ouro_generate(target: &Path, tokenizer: Option<&Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ouro"));
    cmd.arg("generate")
        .arg("--target")
        .arg(target)
        .args(["--draft", "none", "--strategy", "greedy"])
        .args(["--max-new-tokens", &NEW.to_string()])
        .env("RUST_LOG", "warn")
        .env_remove("OURO_TOKENIZER");
    if let Some(t) = tokenizer {
        cmd.arg("--tokenizer").arg(t);
    }
    cmd.arg(PROMPT).output().unwrap()
}

/// Plain greedy decoding written here, with the tokenizer the GGUF describes.
fn reference(target: &Path) -> String {
    let file = engine::gguf::GgufFile::open(target, &Device::Cpu).unwrap();
    let tok = engine::tokenizer::from_gguf(&file).unwrap();
    let model = engine::load_model(target, &LoadOptions::default(), &Device::Cpu).unwrap();
    let mut cache = model.new_cache();
    let mut input = engine::tokenizer::encode(&tok, PROMPT).unwrap();
    let mut pos = 0u32;
    let mut out = Vec::new();
    for _ in 0..NEW {
        let positions: Vec<u32> = (pos..pos + input.len() as u32).collect();
        let step = model
            .forward(
                &mut cache,
                SeqInput::chain(&input, &positions, OutputSpec::last(input.len())),
            )
            .unwrap();
        pos += input.len() as u32;
        let next = step.argmax[0];
        if file.eos_ids().contains(&next) {
            break;
        }
        out.push(next);
        input = vec![next];
    }
    engine::tokenizer::decode(&tok, &out, true).unwrap()
}

#[test]
fn a_gguf_target_runs_with_its_own_tokenizer_by_default() {
    let Some(smol) = fetched_model("smollm2-135m-instruct-q4_1.gguf") else {
        return;
    };
    let by_default = ouro_generate(&smol, None);
    assert!(by_default.status.success(), "{by_default:?}");
    let text = String::from_utf8(by_default.stdout).unwrap();
    assert!(text.contains("Paris"), "{text:?}");
    // `ouro generate` ends its output with one newline of its own.
    assert_eq!(text.strip_suffix('\n'), Some(reference(&smol).as_str()));
    // Naming the GGUF as the tokenizer is the same thing.
    let named = ouro_generate(&smol, Some(&smol));
    assert!(named.status.success(), "{named:?}");
    assert_eq!(String::from_utf8(named.stdout).unwrap(), text);
}

#[test]
fn another_familys_tokenizer_is_refused_naming_both() {
    let (Some(smol), Some(qwen)) = (
        fetched_model("smollm2-135m-instruct-q4_1.gguf"),
        fetched_model("qwen-tokenizer.json"),
    ) else {
        return;
    };
    let refused = ouro_generate(&smol, Some(&qwen));
    assert!(!refused.status.success(), "{refused:?}");
    assert!(refused.stdout.is_empty(), "{refused:?}");
    let err = String::from_utf8(refused.stderr).unwrap();
    assert!(err.contains("qwen-tokenizer.json"), "{err}");
    assert!(err.contains("smollm2-135m-instruct-q4_1.gguf"), "{err}");
    assert!(err.contains("cannot use this tokenizer"), "{err}");
}
