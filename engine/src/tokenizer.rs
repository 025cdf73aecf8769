//! Tokenizers: a `tokenizer.json` when one is given, otherwise one built from the GGUF
//! metadata (BPE vocabulary and merges, the pre-tokenizer that `tokenizer.ggml.pre`
//! names, byte-level decoding, special tokens).

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use candle_core::Device;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use std::io::Read;
use std::path::Path;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{PreTokenizerWrapper, Tokenizer};

fn tok_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer> {
    let path = path.as_ref();
    Tokenizer::from_file(path).map_err(|e| EngineError::BadFile {
        path: path.to_path_buf(),
        format: "tokenizer.json",
        reason: e.to_string(),
    })
}

/// The tokenizer a path stands for: a `tokenizer.json`, a model folder (its
/// `tokenizer.json`), or a GGUF file (the tokenizer its metadata describes).
pub fn open(path: &Path) -> Result<Tokenizer> {
    if path.is_dir() {
        return from_file(path.join("tokenizer.json"));
    }
    let mut magic = [0u8; 4];
    let is_gguf = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF";
    if is_gguf {
        return from_gguf(&GgufFile::open(path, &Device::Cpu)?);
    }
    from_file(path)
}

pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer> {
    let mut tok = Tokenizer::from_gguf(file.content()).map_err(tok_err)?;
    // candle knows qwen2 and llama3 pre-tokenizers; SmolLM's splits digits one by one
    // before the GPT-2 byte-level regex.
    if file.meta_str("tokenizer.ggml.pre") == Some("smollm") {
        let seq = Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ]);
        tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(seq)));
    }
    Ok(tok)
}

/// Encodes text as the model sees it (special-token strings become their ids).
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok.encode(text, false).map_err(tok_err)?.get_ids().to_vec())
}

pub fn decode(tok: &Tokenizer, ids: &[u32], skip_special: bool) -> Result<String> {
    tok.decode(ids, skip_special).map_err(tok_err)
}
