//! Helpers for tests of the orchestrator and of code built on it.

use std::collections::HashMap;
use tokenizers::Tokenizer;
use tokenizers::models::wordlevel::WordLevel;

/// One word per id ("w0", "w1", ...), enough to turn ids into text and back.
pub fn word_tokenizer(vocab: usize) -> Tokenizer {
    let words: HashMap<String, u32> = (0..vocab as u32).map(|i| (format!("w{i}"), i)).collect();
    let model = WordLevel::builder()
        .vocab(words.into_iter().collect())
        .unk_token("w0".into())
        .build()
        .unwrap();
    let mut t = Tokenizer::new(model);
    t.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
    t
}
