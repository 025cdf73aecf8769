//! Which tokenizer a server runs with, and the check that the models agree with it: ids
//! from one family's tokenizer run through another family's model without any error and
//! come out as garbage, so a mismatch is refused at start, naming both sides.
//!
//! The tokenizer is the one given (a `tokenizer.json`, a model folder or a GGUF file), else
//! the target model's own. In process, every model file's vocabulary must begin with the
//! tokenizer's entries, string for string (models may pad their tables past it). Remote
//! services prove the same with a fingerprint of their first entries (their `Info`).

use anyhow::{Context, Result, bail};
use decoding::BackendInfo;
use engine::vocab::Vocabulary;
use std::path::Path;
use tokenizers::Tokenizer;

/// The tokenizer at `given`, else the target's own (`target` is then a model file or
/// folder), with its vocabulary for the checks below.
pub fn open(given: Option<&Path>, target: &Path) -> Result<(Tokenizer, Vocabulary)> {
    let source = given.unwrap_or(target);
    if !source.exists() {
        bail!(
            "tokenizer source {} does not exist (give --tokenizer: a tokenizer.json, a model \
             folder or a GGUF file; scripts/fetch-models.sh fetches the default pair)",
            source.display()
        );
    }
    let tokenizer = engine::tokenizer::open(source)
        .with_context(|| format!("opening the tokenizer of {}", source.display()))?;
    let vocabulary = Vocabulary::of_tokenizer(&tokenizer, source.display().to_string());
    tracing::info!(from = %source.display(), entries = vocabulary.len(), "tokenizer");
    Ok((tokenizer, vocabulary))
}

/// Every model file (`role`, path) must know the tokenizer's entries as the same strings.
/// A file that carries no vocabulary is only size-checked by the caller (and warned of).
pub fn check_models(tok: &Vocabulary, models: &[(&str, &Path)]) -> Result<()> {
    for (role, path) in models {
        match Vocabulary::of_model(path)
            .with_context(|| format!("reading the vocabulary of {}", path.display()))?
        {
            Some(model) => model.check_covers(tok).map_err(|why| {
                anyhow::anyhow!("the {role} model cannot use this tokenizer: {why}")
            })?,
            None => tracing::warn!(
                model = %path.display(),
                "the {role} model file carries no vocabulary: only its size is checked against the tokenizer"
            ),
        }
    }
    Ok(())
}

/// A remote service (`role` at `url`) must report a vocabulary whose first entries are the
/// tokenizer's (it was asked for the fingerprint of `tok.len()` entries).
pub fn check_service(tok: &Vocabulary, role: &str, info: &BackendInfo) -> Result<()> {
    let of = format!("the {role} service's model {}", info.model);
    match &info.vocab {
        Some(digest) => tok
            .check_digest(digest, &of)
            .map_err(|why| anyhow::anyhow!("{why}")),
        None if info.vocab_size < tok.len() => bail!(
            "the tokenizer ({}) has {} entries, {of} only {}",
            tok.origin(),
            tok.len(),
            info.vocab_size
        ),
        None => {
            tracing::warn!(
                "{of} reports no vocabulary strings: only its size is checked against the tokenizer"
            );
            Ok(())
        }
    }
}
