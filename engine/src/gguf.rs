//! GGUF files: hyper-parameters from the metadata, tensors by role, and the tokenizer
//! embedded in the metadata.

use crate::config::{Architecture, ModelConfig, RopeStyle};
use crate::error::{EngineError, Result};
use crate::weights::{RawWeight, Role, TensorSource, needs_requant, requant_q8_0};
use candle_core::Device;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
    device: Device,
    requantize: bool,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(io_err(path))?;
        let mut reader = BufReader::new(file);
        let bad = |reason: String| EngineError::BadFile {
            path: path.to_path_buf(),
            format: "GGUF",
            reason,
        };
        // candle's reader divides by the file's alignment and trusts its sizes: a damaged
        // or hostile header can make it panic. That is this file's fault, reported as such.
        let read =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut reader)));
        let content = match read {
            Ok(r) => r.map_err(|e| bad(e.to_string()))?,
            Err(_) => {
                return Err(bad(
                    "its header made the GGUF reader fail (a zero alignment or impossible sizes)"
                        .into(),
                ));
            }
        };
        check_tensor_shapes(&content).map_err(bad)?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader,
            device: device.clone(),
            requantize: true,
        })
    }

    /// Whether Q4_1/Q5_0/Q5_1 tensors are turned into Q8_0 at load (the default).
    pub fn set_requantize(&mut self, on: bool) {
        self.requantize = on;
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn content(&self) -> &Content {
        &self.content
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn meta_usize(&self, key: &str) -> Result<Option<usize>> {
        self.meta(key).map(|v| value_usize(v, key)).transpose()
    }

    fn required_usize(&self, key: &str) -> Result<usize> {
        self.meta_usize(key)?
            .ok_or_else(|| EngineError::BadMetadata {
                key: key.into(),
                reason: "missing".into(),
            })
    }

    fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        self.meta(key)
            .map(|v| match v {
                Value::F32(x) => Ok(*x as f64),
                Value::F64(x) => Ok(*x),
                other => Err(EngineError::BadMetadata {
                    key: key.into(),
                    reason: format!("expected a float, found {:?}", other.value_type()),
                }),
            })
            .transpose()
    }

    pub fn meta_str(&self, key: &str) -> Option<&str> {
        match self.meta(key) {
            Some(Value::String(s)) => Some(s.as_str()),
            _ => None,
        }
    }

    /// Hyper-parameters from `general.architecture` and `<arch>.*` keys.
    pub fn config(&self) -> Result<ModelConfig> {
        let arch_name =
            self.meta_str("general.architecture")
                .ok_or_else(|| EngineError::BadMetadata {
                    key: "general.architecture".into(),
                    reason: "missing".into(),
                })?;
        let arch = Architecture::parse(arch_name)?;
        let a = arch_name;
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            return Err(EngineError::BadMetadata {
                key: "rope_freqs.weight".into(),
                reason: "per-dimension rope frequency scaling is not supported".into(),
            });
        }
        let hidden = self.required_usize(&format!("{a}.embedding_length"))?;
        let heads = self.required_usize(&format!("{a}.attention.head_count"))?;
        let embed = self
            .content
            .tensor_infos
            .get(&Role::Embed.gguf_name())
            .ok_or_else(|| EngineError::MissingTensor(Role::Embed.gguf_name()))?;
        let cfg = ModelConfig {
            arch,
            vocab_size: embed.shape.dims()[0],
            hidden_size: hidden,
            intermediate_size: self.required_usize(&format!("{a}.feed_forward_length"))?,
            num_layers: self.required_usize(&format!("{a}.block_count"))?,
            num_heads: heads,
            num_kv_heads: self
                .meta_usize(&format!("{a}.attention.head_count_kv"))?
                .unwrap_or(heads),
            head_dim: self
                .meta_usize(&format!("{a}.attention.key_length"))?
                .unwrap_or(hidden / heads.max(1)),
            rope_theta: self
                .meta_f64(&format!("{a}.rope.freq_base"))?
                .unwrap_or(10_000.0) as f32,
            rope_style: match arch {
                Architecture::Qwen2 => RopeStyle::Neox,
                Architecture::Llama | Architecture::Mistral => RopeStyle::Interleaved,
            },
            rms_norm_eps: self
                .meta_f64(&format!("{a}.attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-6),
            max_position: self
                .meta_usize(&format!("{a}.context_length"))?
                .unwrap_or(4096),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The text of the vocabulary entry whose id the metadata key holds
    /// (`tokenizer.ggml.bos_token_id`, say).
    pub fn token_text(&self, id_key: &str) -> Option<&str> {
        let id = self.meta_usize(id_key).ok()??;
        match self.meta("tokenizer.ggml.tokens") {
            Some(Value::Array(tokens)) => match tokens.get(id) {
                Some(Value::String(s)) => Some(s.as_str()),
                _ => None,
            },
            _ => None,
        }
    }

    /// Stop ids named by the metadata (eos, and eot where present).
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut ids = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            if let Ok(Some(id)) = self.meta_usize(key)
                && !ids.contains(&(id as u32))
            {
                ids.push(id as u32);
            }
        }
        ids
    }
}

/// Every tensor has dimensions, none of them 0, and a product that fits in memory's
/// address range (candle multiplies them unchecked).
fn check_tensor_shapes(content: &Content) -> std::result::Result<(), String> {
    for (name, info) in &content.tensor_infos {
        let dims = info.shape.dims();
        if dims.is_empty() || dims.contains(&0) {
            return Err(format!("tensor '{name}' has an empty shape {dims:?}"));
        }
        let elems = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let bytes = elems.and_then(|e| {
            let block = info.ggml_dtype.block_size();
            (e / block).checked_mul(info.ggml_dtype.type_size())
        });
        if bytes.is_none_or(|b| b > isize::MAX as usize) {
            return Err(format!(
                "tensor '{name}' has dimensions {dims:?} too large to address"
            ));
        }
    }
    Ok(())
}

/// Writes a copy of a GGUF file with its Q4_1/Q5_0/Q5_1 tensors requantized to Q8_0,
/// the form candle runs fast on CPU. Metadata is carried over unchanged.
pub fn write_requantized(src: &Path, dst: &Path) -> Result<usize> {
    write_converted(src, dst, Conversion::SlowQuantsToQ8_0)
}

/// What [`write_converted`] does to each tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conversion {
    /// Q4_1/Q5_0/Q5_1 become Q8_0, as the engine does at load; the rest is copied.
    SlowQuantsToQ8_0,
    /// Every tensor becomes F32: the same weights without activation quantization, so two
    /// runtimes can be compared to float precision.
    DequantizeToF32,
}

/// Copies a GGUF file with its tensors converted; returns how many tensors changed.
pub fn write_converted(src: &Path, dst: &Path, conversion: Conversion) -> Result<usize> {
    let mut file = GgufFile::open(src, &Device::Cpu)?;
    let names: Vec<String> = file.content.tensor_infos.keys().cloned().collect();
    let mut tensors = Vec::with_capacity(names.len());
    let mut changed = 0;
    for name in names {
        let info = &file.content.tensor_infos[&name];
        let q = info
            .read(
                &mut file.reader,
                file.content.tensor_data_offset,
                &Device::Cpu,
            )
            .map_err(|e| EngineError::BadFile {
                path: src.to_path_buf(),
                format: "GGUF",
                reason: format!("tensor '{name}': {e}"),
            })?;
        let q = match conversion {
            Conversion::SlowQuantsToQ8_0 if needs_requant(q.dtype()) => requant_q8_0(q)?,
            Conversion::DequantizeToF32 if q.dtype() != GgmlDType::F32 => {
                let dense = q.dequantize(&Device::Cpu)?;
                QTensor::quantize(&dense, GgmlDType::F32)?
            }
            _ => {
                tensors.push((name, q));
                continue;
            }
        };
        changed += 1;
        tensors.push((name, q));
    }
    let meta: Vec<(&str, &Value)> = file
        .content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let refs: Vec<(&str, &candle_core::quantized::QTensor)> =
        tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::io::BufWriter::new(File::create(dst).map_err(io_err(dst))?);
    candle_core::quantized::gguf_file::write(&mut out, &meta, &refs)?;
    Ok(changed)
}

fn value_usize(v: &Value, key: &str) -> Result<usize> {
    let n: i128 = match v {
        Value::U8(x) => *x as i128,
        Value::I8(x) => *x as i128,
        Value::U16(x) => *x as i128,
        Value::I16(x) => *x as i128,
        Value::U32(x) => *x as i128,
        Value::I32(x) => *x as i128,
        Value::U64(x) => *x as i128,
        Value::I64(x) => *x as i128,
        other => {
            return Err(EngineError::BadMetadata {
                key: key.into(),
                reason: format!("expected an integer, found {:?}", other.value_type()),
            });
        }
    };
    usize::try_from(n).map_err(|_| EngineError::BadMetadata {
        key: key.into(),
        reason: format!("{n} is not a valid size"),
    })
}

impl TensorSource for GgufFile {
    fn get(&mut self, role: Role) -> Result<Option<RawWeight>> {
        let name = role.gguf_name();
        let Some(info) = self.content.tensor_infos.get(&name) else {
            return Ok(None);
        };
        let dtype = info.ggml_dtype;
        if matches!(dtype, GgmlDType::Q8_1 | GgmlDType::Q8K) {
            return Err(EngineError::UnsupportedDType {
                tensor: name,
                dtype: format!("{dtype:?}"),
            });
        }
        let q = info
            .read(
                &mut self.reader,
                self.content.tensor_data_offset,
                &self.device,
            )
            .map_err(|e| EngineError::BadFile {
                path: self.path.clone(),
                format: "GGUF",
                reason: format!("tensor '{name}': {e}"),
            })?;
        let q = if self.requantize && needs_requant(dtype) {
            requant_q8_0(q)?
        } else {
            q
        };
        Ok(Some(RawWeight::Quant(Arc::new(q))))
    }

    fn describe(&self, role: Role) -> String {
        role.gguf_name()
    }
}
