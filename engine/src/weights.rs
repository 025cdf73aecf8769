//! Weight tensors as they come out of a file, named by their role in the model, and the
//! slicing that tensor parallelism needs (rows for column-parallel layers, columns for
//! row-parallel ones). Quantized tensors stay quantized wherever the cut falls on block
//! boundaries.

use crate::error::{EngineError, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use std::borrow::Cow;
use std::sync::Arc;

/// What a weight does in the model; each file format maps roles to its own names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Embed,
    FinalNorm,
    LmHead,
    AttnNorm(usize),
    Q(usize),
    K(usize),
    V(usize),
    QBias(usize),
    KBias(usize),
    VBias(usize),
    O(usize),
    FfnNorm(usize),
    Gate(usize),
    Up(usize),
    Down(usize),
}

impl Role {
    pub fn gguf_name(&self) -> String {
        match *self {
            Role::Embed => "token_embd.weight".into(),
            Role::FinalNorm => "output_norm.weight".into(),
            Role::LmHead => "output.weight".into(),
            Role::AttnNorm(i) => format!("blk.{i}.attn_norm.weight"),
            Role::Q(i) => format!("blk.{i}.attn_q.weight"),
            Role::K(i) => format!("blk.{i}.attn_k.weight"),
            Role::V(i) => format!("blk.{i}.attn_v.weight"),
            Role::QBias(i) => format!("blk.{i}.attn_q.bias"),
            Role::KBias(i) => format!("blk.{i}.attn_k.bias"),
            Role::VBias(i) => format!("blk.{i}.attn_v.bias"),
            Role::O(i) => format!("blk.{i}.attn_output.weight"),
            Role::FfnNorm(i) => format!("blk.{i}.ffn_norm.weight"),
            Role::Gate(i) => format!("blk.{i}.ffn_gate.weight"),
            Role::Up(i) => format!("blk.{i}.ffn_up.weight"),
            Role::Down(i) => format!("blk.{i}.ffn_down.weight"),
        }
    }

    pub fn hf_name(&self) -> String {
        match *self {
            Role::Embed => "model.embed_tokens.weight".into(),
            Role::FinalNorm => "model.norm.weight".into(),
            Role::LmHead => "lm_head.weight".into(),
            Role::AttnNorm(i) => format!("model.layers.{i}.input_layernorm.weight"),
            Role::Q(i) => format!("model.layers.{i}.self_attn.q_proj.weight"),
            Role::K(i) => format!("model.layers.{i}.self_attn.k_proj.weight"),
            Role::V(i) => format!("model.layers.{i}.self_attn.v_proj.weight"),
            Role::QBias(i) => format!("model.layers.{i}.self_attn.q_proj.bias"),
            Role::KBias(i) => format!("model.layers.{i}.self_attn.k_proj.bias"),
            Role::VBias(i) => format!("model.layers.{i}.self_attn.v_proj.bias"),
            Role::O(i) => format!("model.layers.{i}.self_attn.o_proj.weight"),
            Role::FfnNorm(i) => format!("model.layers.{i}.post_attention_layernorm.weight"),
            Role::Gate(i) => format!("model.layers.{i}.mlp.gate_proj.weight"),
            Role::Up(i) => format!("model.layers.{i}.mlp.up_proj.weight"),
            Role::Down(i) => format!("model.layers.{i}.mlp.down_proj.weight"),
        }
    }
}

/// A weight as loaded: quantized blocks, or a dense float tensor.
#[derive(Debug, Clone)]
pub enum RawWeight {
    Quant(Arc<QTensor>),
    Dense(Tensor),
}

/// Anything that can hand out weights by role (a GGUF file, a safetensors folder).
pub trait TensorSource {
    /// The weight for `role`, or `None` when the file does not have it.
    fn get(&mut self, role: Role) -> Result<Option<RawWeight>>;
    fn describe(&self, role: Role) -> String;
}

impl RawWeight {
    pub fn dims(&self) -> Vec<usize> {
        match self {
            RawWeight::Quant(q) => q.shape().dims().to_vec(),
            RawWeight::Dense(t) => t.dims().to_vec(),
        }
    }

    pub fn expect_dims(self, name: &str, expected: &[usize]) -> Result<Self> {
        let got = self.dims();
        if got != expected {
            return Err(EngineError::ShapeMismatch {
                tensor: name.to_string(),
                expected: expected.to_vec(),
                got,
            });
        }
        Ok(self)
    }

    /// A dense f32 tensor (norms, biases).
    pub fn to_f32(&self, device: &Device) -> Result<Tensor> {
        Ok(match self {
            RawWeight::Quant(q) => q.dequantize(device)?,
            RawWeight::Dense(t) => t.to_dtype(DType::F32)?,
        })
    }

    /// The matmul operand for a `(out, in)` weight. Quantized weights keep their blocks
    /// (or become dense f16 when asked); float weights become dense f32 (or stay f16 when
    /// asked, to halve their memory).
    pub fn into_matmul(self, keep_f16: bool, dequantize_f16: bool) -> Result<QMatMul> {
        Ok(match self {
            RawWeight::Quant(q) if dequantize_f16 => {
                QMatMul::TensorF16(q.dequantize_f16(&q.device())?)
            }
            RawWeight::Quant(q) => QMatMul::from_arc(q)?,
            RawWeight::Dense(t) if keep_f16 => QMatMul::TensorF16(t.to_dtype(DType::F16)?),
            RawWeight::Dense(t) => QMatMul::Tensor(t.to_dtype(DType::F32)?),
        })
    }

    /// Rows `start..start + len` of a `(rows, cols)` weight (or elements of a vector).
    pub fn rows(&self, start: usize, len: usize) -> Result<Self> {
        match self {
            RawWeight::Dense(t) => Ok(RawWeight::Dense(t.narrow(0, start, len)?.contiguous()?)),
            RawWeight::Quant(q) => quant_rows(q, start..start + len),
        }
    }

    /// The rows `ids` of a `(rows, cols)` weight, in that order.
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Self> {
        match self {
            RawWeight::Dense(t) => {
                let idx = Tensor::new(ids, t.device())?;
                Ok(RawWeight::Dense(t.index_select(&idx, 0)?))
            }
            RawWeight::Quant(q) => quant_rows(q, ids.iter().map(|&i| i as usize)),
        }
    }

    /// Columns `start..start + len` of a `(rows, cols)` weight. A cut inside a quantized
    /// block falls back to the exact dequantized values (dense f32): slower and bigger,
    /// but requantizing would change the weights.
    pub fn cols(&self, start: usize, len: usize) -> Result<Self> {
        match self {
            RawWeight::Dense(t) => Ok(RawWeight::Dense(t.narrow(1, start, len)?.contiguous()?)),
            RawWeight::Quant(q) => {
                let (rows, cols) = q.shape().dims2()?;
                let dtype = q.dtype();
                let bs = dtype.block_size();
                if start.is_multiple_of(bs) && len.is_multiple_of(bs) {
                    let row_bytes = cols / bs * dtype.type_size();
                    let (from, take) =
                        (start / bs * dtype.type_size(), len / bs * dtype.type_size());
                    let data = q.data()?;
                    let mut bytes = Vec::with_capacity(rows * take);
                    for r in 0..rows {
                        bytes.extend_from_slice(
                            &data[r * row_bytes + from..r * row_bytes + from + take],
                        );
                    }
                    let storage = QStorage::from_data(Cow::Owned(bytes), &q.device(), dtype)?;
                    return Ok(RawWeight::Quant(Arc::new(QTensor::new(
                        storage,
                        (rows, len),
                    )?)));
                }
                let dense = q
                    .dequantize(&q.device())?
                    .narrow(1, start, len)?
                    .contiguous()?;
                if len.is_multiple_of(GgmlDType::Q8_0.block_size()) {
                    Ok(RawWeight::Quant(Arc::new(QTensor::quantize(
                        &dense,
                        GgmlDType::Q8_0,
                    )?)))
                } else {
                    Ok(RawWeight::Dense(dense))
                }
            }
        }
    }
}

/// A quantized weight's rows (whole blocks each), copied in the order given.
fn quant_rows(q: &QTensor, rows: impl ExactSizeIterator<Item = usize>) -> Result<RawWeight> {
    let dims = q.shape().dims();
    let cols: usize = dims[1..].iter().product();
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let mut shape = dims.to_vec();
    shape[0] = rows.len();
    let mut bytes = Vec::with_capacity(shape[0] * row_bytes);
    for r in rows {
        let from = r * row_bytes;
        let row = data.get(from..from + row_bytes).ok_or_else(|| {
            EngineError::invalid(format!("row {r} is past the weight's {} rows", dims[0]))
        })?;
        bytes.extend_from_slice(row);
    }
    let storage = QStorage::from_data(Cow::Owned(bytes), &q.device(), dtype)?;
    Ok(RawWeight::Quant(Arc::new(QTensor::new(storage, shape)?)))
}

/// candle has no fast CPU kernels for these block types; Q8_0 gives the same greedy
/// output at several times the speed (see shared/design/models.md).
pub(crate) fn needs_requant(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1)
}

pub(crate) fn requant_q8_0(q: QTensor) -> Result<QTensor> {
    let dense = q.dequantize(&q.device())?;
    Ok(QTensor::quantize(&dense, GgmlDType::Q8_0)?)
}

/// The block type named `name` as on the command line (`q4k`, `q6k`, `q8_0`): the ones
/// with fast CPU kernels, for [`crate::LoadOptions::requantize`].
pub fn block_type(name: &str) -> Result<GgmlDType> {
    match name.to_ascii_lowercase().replace('_', "").as_str() {
        "q4k" => Ok(GgmlDType::Q4K),
        "q6k" => Ok(GgmlDType::Q6K),
        "q80" => Ok(GgmlDType::Q8_0),
        _ => Err(EngineError::invalid(format!(
            "unknown block type {name:?}: use q4k, q6k or q8_0"
        ))),
    }
}

/// A `(out, in)` weight re-encoded in `dtype` blocks, its width zero-padded to the block
/// size (the input gets as many zero columns); returns the weight and that padding.
pub(crate) fn requantize_padded(
    w: &RawWeight,
    dtype: GgmlDType,
    device: &Device,
) -> Result<(QMatMul, usize)> {
    let dense = w.to_f32(device)?;
    let (n, k) = dense.dims2()?;
    let wide = k.next_multiple_of(dtype.block_size());
    let dense = match wide - k {
        0 => dense,
        extra => Tensor::cat(&[dense, Tensor::zeros((n, extra), DType::F32, device)?], 1)?,
    };
    let q = QTensor::quantize(&dense, dtype)?;
    Ok((QMatMul::from_arc(Arc::new(q))?, wide - k))
}

/// Splits `total` items into `world` nearly equal consecutive parts; part `rank`'s range.
pub fn split_range(total: usize, world: usize, rank: usize) -> (usize, usize) {
    let base = total / world;
    let extra = total % world;
    let start = rank * base + rank.min(extra);
    let len = base + usize::from(rank < extra);
    (start, len)
}

/// Width multiple that candle's repacked x86 kernels need (one Q8_K activation block).
const TILE_K: usize = 256;
/// Output rows per repacked tile.
pub(crate) const TILE_N: usize = 16;

/// Zero columns appended to a Q8_0 `(out, in)` weight whose `in` is not a multiple of 256,
/// so that it reaches candle's repacked VNNI kernels. candle takes any other width to its
/// generic kernel, which on the 0.5B Qwen's 896-wide layers is 2-3x slower at one row and
/// about 10x at sixteen (`results/engine-bench.md`). The blocks are copied, not
/// requantized, and zero blocks add nothing, so the weights are unchanged; only the
/// activations are quantized per 256 values instead of per 32. Returns the weight and the
/// number of zero columns the input must be padded with (0 where nothing was done).
pub(crate) fn pad_for_tiles(w: QMatMul) -> Result<(QMatMul, usize)> {
    let QMatMul::QTensor(q) = &w else {
        return Ok((w, 0));
    };
    let (n, k) = match q.shape().dims2() {
        Ok(d) => d,
        Err(_) => return Ok((w, 0)),
    };
    let dtype = q.dtype();
    if dtype != GgmlDType::Q8_0
        || !q.device().is_cpu()
        || k.is_multiple_of(TILE_K)
        || !n.is_multiple_of(TILE_N)
        || !has_vnni()
    {
        return Ok((w, 0));
    }
    let padded = k.next_multiple_of(TILE_K);
    let block_bytes = dtype.type_size();
    let row_bytes = k / dtype.block_size() * block_bytes;
    let zeros = vec![0u8; (padded - k) / dtype.block_size() * block_bytes];
    let data = q.data()?;
    let mut bytes = Vec::with_capacity(n * (row_bytes + zeros.len()));
    for row in data.chunks_exact(row_bytes) {
        bytes.extend_from_slice(row);
        bytes.extend_from_slice(&zeros);
    }
    let storage = QStorage::from_data(Cow::Owned(bytes), &q.device(), dtype)?;
    let wide = QTensor::new(storage, (n, padded))?;
    Ok((QMatMul::from_arc(Arc::new(wide))?, padded - k))
}

/// Whether candle's repacked Q8_0 kernels run here: they need a true `vpdpbusd`.
fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        (is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni"))
            || (is_x86_feature_detected!("avxvnni") && is_x86_feature_detected!("avx2"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_copies_the_blocks_and_appends_zeros() {
        let dense = Tensor::randn(0f32, 1.0, (32, 96), &Device::Cpu).unwrap();
        let q = Arc::new(QTensor::quantize(&dense, GgmlDType::Q8_0).unwrap());
        let original = q.dequantize(&Device::Cpu).unwrap();
        let (padded, pad) = pad_for_tiles(QMatMul::QTensor(q)).unwrap();
        let QMatMul::QTensor(p) = padded else {
            panic!("the padded weight must stay quantized");
        };
        if !has_vnni() {
            assert_eq!((pad, p.shape().dims2().unwrap()), (0, (32, 96)));
            return;
        }
        assert_eq!((pad, p.shape().dims2().unwrap()), (160, (32, 256)));
        let wide = p.dequantize(&Device::Cpu).unwrap();
        let head = wide.narrow(1, 0, 96).unwrap().flatten_all().unwrap();
        assert_eq!(
            head.to_vec1::<f32>().unwrap(),
            original.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let tail = wide
            .narrow(1, 96, 160)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap();
        assert_eq!(tail.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn widths_the_fast_kernels_take_are_left_alone() {
        for (dtype, k) in [
            (GgmlDType::Q8_0, 256),
            (GgmlDType::Q4K, 256),
            (GgmlDType::F32, 96),
        ] {
            let dense = Tensor::randn(0f32, 1.0, (32, k), &Device::Cpu).unwrap();
            let q = QMatMul::from_qtensor(QTensor::quantize(&dense, dtype).unwrap()).unwrap();
            let (_, pad) = pad_for_tiles(q).unwrap();
            assert_eq!(pad, 0, "{dtype:?} width {k}");
        }
    }
}
