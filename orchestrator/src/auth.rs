//! API keys for the public API. With keys configured (`--api-keys-file`, one per line, or
//! `OURO_API_KEYS`, comma-separated), every Generate, Info and Tokenize call and every
//! HTTP `/v1/*`, `/info`, `/tokenize` and `/detokenize` request must carry one, as
//! `authorization: Bearer KEY` (what OpenAI clients send) or `x-api-key: KEY`; otherwise
//! UNAUTHENTICATED (HTTP 401). Health and metrics stay open for probes and scrapers.
//! Keys are kept as SHA-256 digests and compared as such.

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::path::Path;

#[derive(Debug, Clone)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl ApiKeys {
    pub fn new<S: AsRef<str>>(keys: impl IntoIterator<Item = S>) -> Result<Self> {
        let digests: Vec<[u8; 32]> = keys
            .into_iter()
            .map(|k| k.as_ref().trim().to_string())
            .filter(|k| !k.is_empty())
            .map(|k| digest(&k))
            .collect();
        if digests.is_empty() {
            bail!("no API key given (empty file or variable)");
        }
        Ok(Self { digests })
    }

    /// The keys of a file (one per line, `#` comments) and of a comma-separated list;
    /// None when neither is given.
    pub fn load(file: Option<&Path>, list: Option<&str>) -> Result<Option<Self>> {
        let mut keys: Vec<String> = Vec::new();
        if let Some(f) = file {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("reading the API keys file {}", f.display()))?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
        }
        if let Some(l) = list {
            keys.extend(l.split(',').map(String::from));
        }
        if file.is_none() && list.is_none() {
            return Ok(None);
        }
        Self::new(keys).map(Some)
    }

    /// Whether the `authorization` or `x-api-key` header value carries a known key.
    pub fn admits(&self, authorization: Option<&str>, x_api_key: Option<&str>) -> bool {
        let given = authorization
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .or(x_api_key)
            .map(str::trim);
        match given {
            Some(k) if !k.is_empty() => {
                let d = digest(k);
                self.digests.contains(&d)
            }
            _ => false,
        }
    }
}

pub const REFUSED: &str =
    "a valid API key is required: send 'authorization: Bearer KEY' (or 'x-api-key: KEY')";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_from_a_file_and_a_list() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("keys");
        std::fs::write(&f, "# ours\nalpha\n\n  beta  \n").unwrap();
        let keys = ApiKeys::load(Some(&f), Some("gamma, delta"))
            .unwrap()
            .unwrap();
        for k in ["alpha", "beta", "gamma", "delta"] {
            assert!(keys.admits(Some(&format!("Bearer {k}")), None), "{k}");
            assert!(keys.admits(None, Some(k)), "{k}");
        }
        assert!(!keys.admits(Some("Bearer alph"), None));
        assert!(!keys.admits(Some("alpha"), None), "the scheme is required");
        assert!(!keys.admits(None, None));
        assert!(!keys.admits(Some("Bearer "), None));
        assert!(ApiKeys::load(None, None).unwrap().is_none());
        assert!(ApiKeys::load(None, Some(" , ")).is_err());
    }
}
