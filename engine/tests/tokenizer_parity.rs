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
