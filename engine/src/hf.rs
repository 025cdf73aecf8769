//! Hugging Face model folders: `config.json` plus one or more `*.safetensors` files.

use crate::config::{HfConfig, ModelConfig};
use crate::error::{EngineError, Result};
use crate::weights::{RawWeight, Role, TensorSource};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct HfFolder {
    dir: PathBuf,
    hf: HfConfig,
    tensors: HashMap<String, Tensor>,
}

impl HfFolder {
    pub fn open(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| EngineError::Io {
            path: config_path.clone(),
            source,
        })?;
        let hf: HfConfig = serde_json::from_str(&text).map_err(|e| EngineError::BadFile {
            path: config_path.clone(),
            format: "config.json",
            reason: e.to_string(),
        })?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|source| EngineError::Io {
                path: dir.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(EngineError::BadFile {
                path: dir,
                format: "Hugging Face model folder",
                reason: "no *.safetensors file".into(),
            });
        }
        let mut tensors = HashMap::new();
        for file in &files {
            let loaded =
                candle_core::safetensors::load(file, device).map_err(|e| EngineError::BadFile {
                    path: file.clone(),
                    format: "safetensors",
                    reason: e.to_string(),
                })?;
            tensors.extend(loaded);
        }
        Ok(Self { dir, hf, tensors })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> Result<ModelConfig> {
        self.hf.to_config()
    }

    pub fn tie_word_embeddings(&self) -> bool {
        self.hf.tie_word_embeddings
    }
}

impl TensorSource for HfFolder {
    fn get(&mut self, role: Role) -> Result<Option<RawWeight>> {
        let name = role.hf_name();
        let Some(t) = self.tensors.remove(&name) else {
            return Ok(None);
        };
        match t.dtype() {
            DType::F32 | DType::F16 | DType::BF16 => Ok(Some(RawWeight::Dense(t))),
            other => Err(EngineError::UnsupportedDType {
                tensor: name,
                dtype: format!("{other:?}"),
            }),
        }
    }

    fn describe(&self, role: Role) -> String {
        role.hf_name()
    }
}
