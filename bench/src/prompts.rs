//! Prompt files: one JSON string per line (what `scripts/fetch-models.sh humaneval` and
//! `bbh` write).

use anyhow::{Context, Result};
use std::path::Path;

pub fn read(path: &Path) -> Result<Vec<String>> {
    std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str::<String>(l)
                .with_context(|| format!("{} line {}: not a JSON string", path.display(), i + 1))
        })
        .collect()
}
