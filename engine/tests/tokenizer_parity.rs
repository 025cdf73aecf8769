//! The tokenizer built from GGUF metadata gives the same ids as the model's tokenizer.json.

use candle_core::Device;
use engine::models::models_dir;

const TEXTS: &[&str] = &[
    "The quick brown fox jumps over the lazy dog. It's 2026, isn't it?",
    "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n    return a + b\n\n\nclass Foo:\n\tpass\n",
    "    if x:\n        y = [i ** 2 for i in range(10)]  # squares\n",
    "日本語のテキストと中文文本, café naïve résumé, Ελληνικά, emoji 🚀🔥",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "numbers 1234567890 and 3.14159, hex 0xDEADBEEF",
];

#[test]
fn qwen_gguf_tokenizer_matches_tokenizer_json() {
    let dir = models_dir();
    let (gguf, json) = (
        dir.join("qwen2.5-coder-0.5b-instruct.gguf"),
        dir.join("qwen-tokenizer.json"),
    );
    if !gguf.exists() || !json.exists() {
        println!(
            "SKIPPED: {} or {} not present (run scripts/fetch-models.sh)",
            gguf.display(),
            json.display()
        );
        return;
    }
    let file = engine::gguf::GgufFile::open(&gguf, &Device::Cpu).unwrap();
    let built = engine::tokenizer::from_gguf(&file).unwrap();
    let reference = engine::tokenizer::from_file(&json).unwrap();
    for text in TEXTS {
        let a = engine::tokenizer::encode(&built, text).unwrap();
        let b = engine::tokenizer::encode(&reference, text).unwrap();
        assert_eq!(a, b, "{text:?}");
        assert_eq!(engine::tokenizer::decode(&built, &a, false).unwrap(), *text);
    }
    assert_eq!(file.eos_ids(), vec![151645]);
}

/// The vocabulary check on real files: a Qwen2.5-Coder GGUF covers the tokenizer built from
/// its own metadata; the fetched Qwen tokenizer.json agrees with it on every regular token
/// but adds tool tokens where the Coder file has padding, so it is refused (from the first
/// id past the Coder's tokens, 151665); SmolLM2's vocabulary refuses Qwen's.
#[test]
fn vocabularies_of_the_fetched_files_agree_only_within_a_family() {
    use engine::testing::fetched_model;
    use engine::vocab::Vocabulary;
    let (Some(qwen), Some(json), Some(smol)) = (
        fetched_model("qwen2.5-coder-0.5b-instruct.gguf"),
        fetched_model("qwen-tokenizer.json"),
        fetched_model("smollm2-135m-instruct-q4_1.gguf"),
    ) else {
        return;
    };
    let own = |path: &std::path::Path| {
        let file = engine::gguf::GgufFile::open(path, &Device::Cpu).unwrap();
        let tok = engine::tokenizer::from_gguf(&file).unwrap();
        Vocabulary::of_tokenizer(&tok, format!("{}'s own", path.display()))
    };
    let qwen_model = Vocabulary::of_model(&qwen).unwrap().unwrap();
    let smol_model = Vocabulary::of_model(&smol).unwrap().unwrap();
    assert_eq!(qwen_model.check_covers(&own(&qwen)), Ok(()));
    assert_eq!(smol_model.check_covers(&own(&smol)), Ok(()));

    let json_tok = Vocabulary::of_tokenizer(
        &engine::tokenizer::from_file(&json).unwrap(),
        json.display().to_string(),
    );
    let refused = qwen_model.check_covers(&json_tok).unwrap_err();
    assert!(refused.contains("from id 151665"), "{refused}");
    let refused = smol_model.check_covers(&own(&qwen)).unwrap_err();
    assert!(refused.contains("qwen2.5-coder-0.5b"), "{refused}");
    assert!(refused.contains("smollm2-135m"), "{refused}");
    // What a remote check sees: the same verdicts from fingerprints alone.
    let qwen_tok = own(&qwen);
    assert_eq!(
        qwen_tok.check_digest(&qwen_model.digest(qwen_tok.len()), "the target service"),
        Ok(())
    );
    for wrong in [&json_tok, &own(&smol)] {
        assert!(
            wrong
                .check_digest(&qwen_model.digest(wrong.len()), "the target service")
                .is_err()
        );
    }
}
