//! Where model files live on this machine.

/// Where scripts/fetch-models.sh puts the real models: `$OURO_MODELS_DIR`, else
/// `~/.cache/ouroboros/models` (the script's default).
pub fn models_dir() -> std::path::PathBuf {
    std::env::var_os("OURO_MODELS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/ouroboros/models")
        })
}
