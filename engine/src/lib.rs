//! Model runtime for Ouroboros serving.
//!
//! A forward takes, per sequence, new tokens with explicit positions and a visibility
//! pattern (a causal chain, a verify tree given by parent indices, or any matrix for the
//! draft's lookahead window), attends to that sequence's KV cache plus the visible new
//! tokens, and returns argmax ids (logits only where asked). Caches truncate in O(1) and
//! compact an accepted tree path in place. Sequences from many sessions share one forward.

pub mod api;
mod attention;
pub mod chat_template;
pub mod config;
pub mod device;
pub mod error;
mod f16_matmul;
pub mod gguf;
pub mod hf;
mod kquant_matmul;
pub mod kv;
pub mod mask;
pub mod mock;
pub mod models;
pub mod progress;
pub mod testing;
pub mod tokenizer;
pub mod tp;
pub mod transformer;
pub mod vocab;
pub mod weights;

pub use api::{ForwardOutput, KvState, LanguageModel, ModelInfo, OutputSpec, SeqInput};
pub use config::{Architecture, ModelConfig, RopeStyle};
pub use error::{EngineError, Result};
pub use kv::KvCache;
pub use mask::{Visibility, tree_positions};
pub use mock::{MockCache, MockModel};
pub use transformer::{LoadOptions, Shard, Transformer};
pub use weights::block_type;

use candle_core::Device;
use std::path::Path;

/// Where a model comes from: a `.gguf` file, or a Hugging Face folder with `config.json`.
pub fn load_model(
    path: impl AsRef<Path>,
    opts: &LoadOptions,
    device: &Device,
) -> Result<Transformer> {
    load_shard(path, Shard::WHOLE, opts, device)
}

/// One tensor-parallel shard of a model (`Shard::WHOLE` for all of it).
pub fn load_shard(
    path: impl AsRef<Path>,
    shard: Shard,
    opts: &LoadOptions,
    device: &Device,
) -> Result<Transformer> {
    let path = path.as_ref();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    if path.is_dir() {
        let mut folder = hf::HfFolder::open(path, device)?;
        let cfg = folder.config()?;
        Transformer::load(&mut folder, &cfg, &name, shard, opts, device)
    } else {
        let mut file = gguf::GgufFile::open(path, device)?;
        file.set_requantize(!opts.keep_slow_quants);
        let cfg = file.config()?;
        Transformer::load(&mut file, &cfg, &name, shard, opts, device)
    }
}
