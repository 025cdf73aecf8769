//! Model hyper-parameters, read from GGUF metadata or a Hugging Face `config.json`.

use crate::error::{EngineError, Result};
use serde::Deserialize;

/// Most positions a model may declare (Qwen2.5 and Llama 3.1 declare 128K; this leaves
/// room for longer ones while refusing values that only a damaged file would hold).
pub const MAX_CONTEXT: usize = 1 << 24;
/// Most any one model dimension may be.
pub const MAX_DIMENSION: usize = 1 << 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
    Mistral,
}

impl Architecture {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "llama" | "LlamaForCausalLM" => Ok(Self::Llama),
            "qwen2" | "Qwen2ForCausalLM" => Ok(Self::Qwen2),
            "mistral" | "MistralForCausalLM" => Ok(Self::Mistral),
            other => Err(EngineError::UnsupportedArchitecture(other.to_string())),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Mistral => "mistral",
        }
    }
}

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// (2i, 2i+1) pairs: llama.cpp permutes llama/mistral q/k weights into this layout.
    Interleaved,
    /// (i, i + d/2) pairs: Hugging Face checkpoints and every qwen2 file.
    Neox,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub rms_norm_eps: f64,
    pub max_position: usize,
}

impl ModelConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| EngineError::BadMetadata {
            key: "model config".into(),
            reason,
        };
        if self.num_layers == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            return Err(bad(format!("empty model: {self:?}")));
        }
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            return Err(bad(format!(
                "{} attention heads cannot be grouped over {} key/value heads",
                self.num_heads, self.num_kv_heads
            )));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(bad(format!(
                "head dimension {} must be even",
                self.head_dim
            )));
        }
        if self.max_position == 0 {
            return Err(bad("context length is 0".into()));
        }
        // RoPE tables and KV budgets are sized from it: an absurd value would ask for
        // memory no machine has rather than fail.
        if self.max_position > MAX_CONTEXT {
            return Err(bad(format!(
                "context length {} is beyond the {MAX_CONTEXT} positions this runtime supports \
                 (cap it with LoadOptions::max_context)",
                self.max_position
            )));
        }
        // Sizes that multiply into tensor shapes must not overflow.
        for (what, n) in [
            ("hidden size", self.hidden_size),
            ("feed-forward size", self.intermediate_size),
            ("vocabulary", self.vocab_size),
            ("head dimension", self.head_dim),
            ("attention heads", self.num_heads),
            ("layers", self.num_layers),
        ] {
            if n > MAX_DIMENSION {
                return Err(bad(format!("{what} {n} is beyond {MAX_DIMENSION}")));
            }
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// The subset of a Hugging Face `config.json` that the supported architectures use.
#[derive(Debug, Deserialize)]
pub(crate) struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_max_position")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
}

fn default_rope_theta() -> f32 {
    10_000.0
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_max_position() -> usize {
    4096
}

impl HfConfig {
    pub fn to_config(&self) -> Result<ModelConfig> {
        let arch_name = self
            .architectures
            .first()
            .cloned()
            .or_else(|| self.model_type.clone())
            .ok_or_else(|| EngineError::BadMetadata {
                key: "architectures".into(),
                reason: "config.json names no architecture".into(),
            })?;
        let arch = Architecture::parse(&arch_name)?;
        if let Some(scaling) = &self.rope_scaling
            && !scaling.is_null()
        {
            return Err(EngineError::BadMetadata {
                key: "rope_scaling".into(),
                reason: format!("rope scaling {scaling} is not supported"),
            });
        }
        let cfg = ModelConfig {
            arch,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            rope_theta: self.rope_theta,
            rope_style: RopeStyle::Neox,
            rms_norm_eps: self.rms_norm_eps,
            max_position: self.max_position_embeddings,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
