//! Vocabularies as token strings by id, so that a tokenizer and the models it feeds can be
//! checked to agree: ids from one family's tokenizer fed to another family's model decode
//! without any error, as garbage. A model's vocabulary comes from its GGUF metadata
//! (`tokenizer.ggml.tokens`) or its folder's `tokenizer.json`; a tokenizer's from its own
//! table (special tokens included).
//!
//! Models often pad their tables past the tokenizer (Qwen2.5: 151,665 tokenizer entries,
//! 151,936 rows), so agreement means: the model knows at least as many entries as the
//! tokenizer, and its first entries are the tokenizer's, string for string. A fingerprint of
//! the first `n` entries lets a remote service prove that without sending its table.

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use candle_core::Device;
use candle_core::quantized::gguf_file::Value;
use sha2::{Digest, Sha256};
use std::path::Path;
use tokenizers::Tokenizer;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vocabulary {
    /// Entry `i` is token `i`'s string; ids the table skips are empty.
    tokens: Vec<String>,
    /// Where it came from, for messages.
    origin: String,
}

/// What a service reports of its vocabulary: how many entries it has and the fingerprint
/// of the first `fingerprinted` (`min(asked, entries)`) of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VocabDigest {
    pub entries: usize,
    pub fingerprinted: usize,
    pub fingerprint: u64,
}

impl Vocabulary {
    pub fn new(tokens: Vec<String>, origin: impl Into<String>) -> Self {
        Self {
            tokens,
            origin: origin.into(),
        }
    }

    /// A tokenizer's table, special tokens included.
    pub fn of_tokenizer(tok: &Tokenizer, origin: impl Into<String>) -> Self {
        let table = tok.get_vocab(true);
        let len = table.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        let mut tokens = vec![String::new(); len];
        for (text, id) in table {
            tokens[id as usize] = text;
        }
        Self::new(tokens, origin)
    }

    /// The vocabulary a model file carries; None where it carries none (a GGUF without
    /// `tokenizer.ggml.tokens`, a folder without `tokenizer.json`).
    pub fn of_model(path: &Path) -> Result<Option<Self>> {
        let origin = path.display().to_string();
        if path.is_dir() {
            let file = path.join("tokenizer.json");
            if !file.exists() {
                return Ok(None);
            }
            let tok = crate::tokenizer::from_file(&file)?;
            return Ok(Some(Self::of_tokenizer(&tok, origin)));
        }
        let f = GgufFile::open(path, &Device::Cpu)?;
        Self::of_gguf(&f).map(|v| v.map(|v| Self { origin, ..v }))
    }

    pub fn of_gguf(f: &GgufFile) -> Result<Option<Self>> {
        const KEY: &str = "tokenizer.ggml.tokens";
        let Some(value) = f.content().metadata.get(KEY) else {
            return Ok(None);
        };
        let bad = |reason: String| EngineError::BadMetadata {
            key: KEY.into(),
            reason,
        };
        let Value::Array(items) = value else {
            return Err(bad(format!(
                "expected an array, found {:?}",
                value.value_type()
            )));
        };
        let tokens = items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(bad(format!(
                    "entry {i} is {:?}, not a string",
                    other.value_type()
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Self::new(tokens, f.path().display().to_string())))
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// SHA-256 over the first `n` entries (each length-prefixed), first 8 bytes.
    pub fn fingerprint(&self, n: usize) -> u64 {
        let mut h = Sha256::new();
        for t in &self.tokens[..n.min(self.tokens.len())] {
            h.update((t.len() as u64).to_le_bytes());
            h.update(t.as_bytes());
        }
        let d = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&d[..8]);
        u64::from_le_bytes(first)
    }

    /// What a service reports when asked for the fingerprint of `n` entries (0: all).
    pub fn digest(&self, n: usize) -> VocabDigest {
        let n = if n == 0 {
            self.len()
        } else {
            n.min(self.len())
        };
        VocabDigest {
            entries: self.len(),
            fingerprinted: n,
            fingerprint: self.fingerprint(n),
        }
    }

    /// Whether a model with this vocabulary can run `tok`'s ids: it has at least as many
    /// entries and the first ones are equal. The error names both and the first id that
    /// differs.
    pub fn check_covers(&self, tok: &Vocabulary) -> std::result::Result<(), String> {
        if self.len() < tok.len() {
            return Err(format!(
                "the tokenizer ({}) has {} entries, the model's vocabulary ({}) only {}",
                tok.origin,
                tok.len(),
                self.origin,
                self.len()
            ));
        }
        match (0..tok.len()).find(|&i| self.tokens[i] != tok.tokens[i]) {
            None => Ok(()),
            Some(i) => Err(format!(
                "the tokenizer ({}, {} entries) and the model's vocabulary ({}, {} entries) \
                 differ from id {i} on: {:?} against {:?}",
                tok.origin,
                tok.len(),
                self.origin,
                self.len(),
                tok.tokens[i],
                self.tokens[i]
            )),
        }
    }

    /// Like `check_covers`, against what a remote service reported for `self.len()`
    /// entries of its vocabulary (`of` names the service).
    pub fn check_digest(&self, digest: &VocabDigest, of: &str) -> std::result::Result<(), String> {
        if digest.entries < self.len() {
            return Err(format!(
                "the tokenizer ({}) has {} entries, the vocabulary of {of} only {}",
                self.origin,
                self.len(),
                digest.entries
            ));
        }
        if digest.fingerprinted != self.len() || digest.fingerprint != self.fingerprint(self.len())
        {
            return Err(format!(
                "the tokenizer ({}, {} entries) is not the vocabulary of {of} ({} entries): \
                 their first {} entries differ (fingerprints {:016x} and {:016x})",
                self.origin,
                self.len(),
                digest.entries,
                self.len(),
                self.fingerprint(self.len()),
                digest.fingerprint
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(prefix: &str, n: usize) -> Vocabulary {
        Vocabulary::new(
            (0..n).map(|i| format!("{prefix}{i}")).collect(),
            format!("{prefix}-table"),
        )
    }

    #[test]
    fn a_padded_model_covers_its_tokenizer() {
        let tok = words("w", 10);
        let mut model = words("w", 10);
        model.tokens.extend(["[PAD10]".into(), "[PAD11]".into()]);
        assert_eq!(model.check_covers(&tok), Ok(()));
        assert_eq!(model.check_digest(&model.digest(0), "m"), Ok(()));
        tok.check_digest(&model.digest(tok.len()), "the target")
            .unwrap();
    }

    #[test]
    fn another_family_is_refused_naming_both() {
        let tok = words("w", 10);
        let mut other = words("w", 10);
        other.tokens[7] = "x7".into();
        other.origin = "other-table".into();
        let err = other.check_covers(&tok).unwrap_err();
        assert!(
            err.contains("w-table") && err.contains("other-table"),
            "{err}"
        );
        assert!(err.contains("id 7"), "{err}");
        let err = tok
            .check_digest(&other.digest(tok.len()), "the target service")
            .unwrap_err();
        assert!(
            err.contains("w-table") && err.contains("the target service"),
            "{err}"
        );
    }

    #[test]
    fn a_smaller_model_is_refused() {
        let (tok, model) = (words("w", 12), words("w", 10));
        assert!(model.check_covers(&tok).unwrap_err().contains("only 10"));
        assert!(
            tok.check_digest(&model.digest(12), "t")
                .unwrap_err()
                .contains("only 10")
        );
    }

    #[test]
    fn fingerprints_see_order_and_boundaries() {
        let a = Vocabulary::new(vec!["ab".into(), "c".into()], "a");
        let b = Vocabulary::new(vec!["a".into(), "bc".into()], "b");
        let c = Vocabulary::new(vec!["c".into(), "ab".into()], "c");
        assert_ne!(a.fingerprint(2), b.fingerprint(2));
        assert_ne!(a.fingerprint(2), c.fingerprint(2));
        assert_eq!(a.fingerprint(0), b.fingerprint(0));
        assert_eq!(a.fingerprint(5), a.fingerprint(2));
    }

    #[test]
    fn a_tokenizer_table_is_read_by_id() {
        let mut t = Tokenizer::new(
            tokenizers::models::wordlevel::WordLevel::builder()
                .vocab([("b".to_string(), 1), ("a".to_string(), 0)].into())
                .unk_token("a".into())
                .build()
                .unwrap(),
        );
        t.add_special_tokens([tokenizers::AddedToken::from("<end>", true)])
            .unwrap();
        let v = Vocabulary::of_tokenizer(&t, "t");
        assert_eq!(v.tokens, ["a", "b", "<end>"]);
    }
}
