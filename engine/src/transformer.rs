//! The Llama-family decoder (llama, qwen2, mistral) with explicit positions, arbitrary
//! visibility among the new tokens, many sequences per forward, and optional
//! tensor-parallel sharding (column-parallel q/k/v/gate/up, row-parallel o/down).

use crate::api::{ForwardOutput, KvState, LanguageModel, ModelInfo, SeqInput};
use crate::config::{ModelConfig, RopeStyle};
use crate::error::{EngineError, Result};
use crate::f16_matmul::F16Matrix;
use crate::kquant_matmul::{self, KQuantMatrix};
use crate::kv::KvCache;
use crate::mask::Visibility;
use crate::weights::{
    RawWeight, Role, TILE_N, TensorSource, pad_for_tiles, requantize_padded, split_range,
};
use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{D, DType, Device, Module, Tensor};
use std::sync::Arc;

/// Which slice of the model this instance holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    pub const WHOLE: Shard = Shard { rank: 0, world: 1 };
}

/// Sums partial outputs of row-parallel layers across ranks.
pub trait AllReduce: Send + Sync {
    fn sum(&self, rank: usize, t: &Tensor) -> Result<Tensor>;
}

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Keep float weights in f16 instead of widening them to f32.
    pub f16_weights: bool,
    /// Dequantize quantized matmul weights to dense f16 at load: the unquantized
    /// deployment of a model that ships only as GGUF (bigger and, on a CPU, slower).
    pub dequantize_f16: bool,
    /// Cap the context below what the model file allows (saves RoPE-table memory).
    pub max_context: Option<usize>,
    /// Keep Q4_1/Q5_0/Q5_1 blocks as they are instead of requantizing them to Q8_0
    /// (slow on CPU; for comparing against other runtimes bit for bit).
    pub keep_slow_quants: bool,
    /// Keep Q8_0 matrices at their own width instead of zero-padding them (and their
    /// inputs) to a multiple of 256 for candle's fast x86 kernels; for comparing against
    /// runtimes that run the same blocks on the generic kernel.
    pub unpadded: bool,
    /// Re-encode every matmul weight in these blocks at load, zero-padding widths to the
    /// block size: a Q8_0 draft as Q4_K moves about half the bytes per decode step. Other
    /// numbers than the file's, so only for a model whose output is checked anyway (the
    /// draft: the target verifies every token). Not with tensor parallelism.
    pub requantize: Option<GgmlDType>,
    /// Compute the output head over the first N vocabulary entries only: the head is a
    /// quarter of a small model's work per token, and Qwen/GPT-style vocabularies list
    /// tokens in merge order, common ones first. Later tokens are predicted only where a
    /// forward names them (`OutputSpec::also`; elsewhere their logits read -inf), so again
    /// only for a draft, whose tokens the target checks. Keep it a multiple of 16, or
    /// candle takes another kernel for the head.
    pub head_vocab: Option<usize>,
    /// Run Q4_K/Q6_K matrices on candle's kernels instead of ours (`kquant_matmul`);
    /// for comparing the two.
    pub candle_kquants: bool,
    /// Told after each layer is loaded (layers plus the output head in all).
    pub progress: crate::progress::ProgressHook,
}

/// A matmul operand: candle's, or on CPU our kernels for dense f16 weights and for
/// Q4_K/Q6_K blocks.
enum Weight {
    Candle(QMatMul),
    F16(F16Matrix),
    KQuant(KQuantMatrix),
}

struct Linear {
    w: Weight,
    bias: Option<Tensor>,
    /// Zero columns appended to `w` (see `weights::pad_for_tiles`); inputs get as many.
    pad: usize,
}

/// `x @ w^T` with the same per-row arithmetic for any number of rows. candle picks
/// quantized kernels by row count: a one-row Q6_K product takes another kernel than a
/// multi-row one (they differ by ~3e-6), so a lone Q6_K row is paired with a copy of
/// itself; and on CPUs with AMX, Q4_K products of 32 rows or more run on AMX tiles, so
/// those are split into calls of fewer rows.
fn matmul_rows(w: &QMatMul, x: &Tensor) -> Result<Tensor> {
    let dtype = match w {
        QMatMul::QTensor(q) if x.device().is_cpu() && x.rank() == 2 => q.dtype(),
        _ => return Ok(w.forward(x)?),
    };
    let rows = x.dim(0)?;
    match rows_per_call(dtype, rows, amx_present()) {
        RowsPerCall::All => Ok(w.forward(x)?),
        RowsPerCall::Paired => {
            let pair = Tensor::cat(&[x, x], 0)?;
            Ok(w.forward(&pair)?.narrow(0, 0, 1)?)
        }
        RowsPerCall::AtMost(chunk) => {
            let parts = (0..rows)
                .step_by(chunk)
                .map(|at| w.forward(&x.narrow(0, at, chunk.min(rows - at))?))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Tensor::cat(&parts, 0)?)
        }
    }
}

#[derive(Debug, PartialEq)]
enum RowsPerCall {
    All,
    /// One row, sent with a copy of itself.
    Paired,
    AtMost(usize),
}

/// Rows from which candle runs Q4_K products on AMX tiles (where the CPU has them).
const AMX_ROWS: usize = 32;

fn rows_per_call(dtype: GgmlDType, rows: usize, amx: bool) -> RowsPerCall {
    match dtype {
        GgmlDType::Q6K if rows == 1 => RowsPerCall::Paired,
        GgmlDType::Q4K if amx && rows >= AMX_ROWS => RowsPerCall::AtMost(AMX_ROWS - 1),
        _ => RowsPerCall::All,
    }
}

/// Whether this CPU has AMX int8 tiles (CPUID leaf 7: EDX bits 24 and 25), as candle
/// checks before taking its AMX path.
fn amx_present() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AMX.get_or_init(|| {
            let info = core::arch::x86_64::__cpuid_count(7, 0);
            info.edx & (1 << 24) != 0 && info.edx & (1 << 25) != 0
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Linear {
    /// `(w, pad)`: the weight and the zero columns appended to it.
    /// `kquants`: repack Q4_K/Q6_K weights for our kernels where this CPU runs them.
    fn new((w, pad): (QMatMul, usize), bias: Option<Tensor>, kquants: bool) -> Result<Self> {
        let w = match w {
            QMatMul::TensorF16(t) if t.device().is_cpu() => {
                Weight::F16(F16Matrix::from_tensor(&t)?)
            }
            QMatMul::QTensor(q) if kquants && kquant_matmul::supported() => {
                match KQuantMatrix::from_qtensor(&q)? {
                    Some(k) => Weight::KQuant(k),
                    None => Weight::Candle(QMatMul::QTensor(q)),
                }
            }
            w => Weight::Candle(w),
        };
        Ok(Linear { w, bias, pad })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_padded(&pad_columns(x, self.pad)?)
    }

    /// `forward` on an input already padded by `self.pad` columns.
    fn forward_padded(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.w {
            Weight::Candle(w) => matmul_rows(w, x)?,
            Weight::F16(w) => w.forward(x)?,
            Weight::KQuant(w) => w.forward(x)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// Several projections of the same input; quantized ones share one pass over it.
    fn forward_many(x: &Tensor, lins: &[&Linear]) -> Result<Vec<Tensor>> {
        let quants: Option<Vec<_>> = lins
            .iter()
            .map(|l| match &l.w {
                Weight::Candle(QMatMul::QTensor(q)) => Some(q.as_ref()),
                _ => None,
            })
            .collect();
        // Projections of one input have one width, so one padding serves them all.
        let pad = lins.first().map_or(0, |l| l.pad);
        if lins.iter().any(|l| l.pad != pad) {
            return lins.iter().map(|l| l.forward(x)).collect();
        }
        let x = &pad_columns(x, pad)?;
        let kquants: Option<Vec<_>> = lins
            .iter()
            .map(|l| match &l.w {
                Weight::KQuant(k) => Some(k),
                _ => None,
            })
            .collect();
        let outs = match (kquants, quants) {
            (Some(ks), _) if x.device().is_cpu() && x.rank() == 2 => {
                Some(KQuantMatrix::forward_many(x, &ks)?)
            }
            (_, Some(qs)) => candle_core::quantized::QTensor::gemv_fused_shared_lhs(&qs, x)?,
            _ => None,
        };
        if let Some(outs) = outs {
            return outs
                .into_iter()
                .zip(lins)
                .map(|(y, l)| {
                    Ok(match &l.bias {
                        Some(b) => y.broadcast_add(b)?,
                        None => y,
                    })
                })
                .collect();
        }
        lins.iter().map(|l| l.forward_padded(x)).collect()
    }
}

fn pad_columns(x: &Tensor, pad: usize) -> Result<Tensor> {
    Ok(match pad {
        0 => x.clone(),
        _ => x.pad_with_zeros(D::Minus1, 0, pad)?,
    })
}

struct Layer {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// How the loader turns a file's weight into a matmul operand.
#[derive(Debug, Clone, Copy)]
struct Encoding {
    requantize: Option<GgmlDType>,
    f16_weights: bool,
    dequantize_f16: bool,
    /// Zero-pad Q8_0 widths for candle's fast kernels (`weights::pad_for_tiles`).
    pad: bool,
}

impl Encoding {
    fn matmul(&self, w: RawWeight, device: &Device) -> Result<(QMatMul, usize)> {
        if let Some(dtype) = self.requantize {
            return requantize_padded(&w, dtype, device);
        }
        let w = w.into_matmul(self.f16_weights, self.dequantize_f16)?;
        if self.pad {
            pad_for_tiles(w)
        } else {
            Ok((w, 0))
        }
    }
}

/// The whole output head behind a narrowed one, as the file has it, and how the loader
/// encodes matrices: rows taken from it and encoded alike score their tokens exactly as
/// the whole head, loaded with the same options, would. With tied embeddings this is the
/// embedding table itself (no more memory); otherwise the file's head stays in memory.
struct HeadRows {
    full: RawWeight,
    encoding: Encoding,
    kquants: bool,
}

impl HeadRows {
    /// `h @ rows(ids)^T`. The rows go in multiples of 16 (the last one repeated), as
    /// candle's fast kernels need and a narrowed head has them, so that each token's score
    /// comes out of the kernel the whole head runs.
    fn score(&self, h: &Tensor, ids: &[u32]) -> Result<Tensor> {
        let mut padded = ids.to_vec();
        if let Some(&last) = ids.last() {
            padded.resize(ids.len().next_multiple_of(TILE_N), last);
        }
        let rows = self.full.gather_rows(&padded)?;
        let lin = Linear::new(self.encoding.matmul(rows, h.device())?, None, self.kquants)?;
        Ok(lin.forward(h)?.narrow(D::Minus1, 0, ids.len())?)
    }
}

/// Per-rank sizes after sharding.
#[derive(Debug, Clone, Copy)]
struct LocalDims {
    heads: usize,
    kv_heads: usize,
}

pub struct Transformer {
    cfg: ModelConfig,
    shard: Shard,
    local: LocalDims,
    embed: QMatMul,
    layers: Vec<Layer>,
    final_norm: Tensor,
    /// Only the rank that produces outputs holds the head.
    lm_head: Option<Linear>,
    /// Every row of a narrowed head, for tokens beyond it that a forward asks about
    /// (`OutputSpec::also`).
    head_rows: Option<HeadRows>,
    cos: Tensor,
    sin: Tensor,
    info: ModelInfo,
    device: Device,
    all_reduce: Option<Arc<dyn AllReduce>>,
}

impl Transformer {
    pub fn load(
        source: &mut dyn TensorSource,
        cfg: &ModelConfig,
        name: &str,
        shard: Shard,
        opts: &LoadOptions,
        device: &Device,
    ) -> Result<Self> {
        let mut cfg = cfg.clone();
        if let Some(cap) = opts.max_context {
            cfg.max_position = cfg.max_position.min(cap.max(1));
        }
        if shard.world == 0 || shard.rank >= shard.world {
            return Err(EngineError::invalid(format!("bad shard {shard:?}")));
        }
        if shard.world > cfg.num_kv_heads {
            return Err(EngineError::invalid(format!(
                "tensor-parallel size {} exceeds the {} key/value heads",
                shard.world, cfg.num_kv_heads
            )));
        }
        // Padded kernels quantize activations per 256 columns of each matrix, so a split
        // matrix would group them differently from the whole one: shards stay unpadded and
        // compute what the unpadded whole model computes.
        let pad = !opts.unpadded && shard.world == 1;
        if let Some(dtype) = opts.requantize
            && (shard.world > 1 || opts.dequantize_f16)
        {
            return Err(EngineError::invalid(format!(
                "requantizing to {dtype:?} works on a whole model with quantized weights \
                 only (not with tensor parallelism or dense f16)"
            )));
        }
        let h = cfg.hidden_size;
        let d = cfg.head_dim;
        let group = cfg.num_heads / cfg.num_kv_heads;
        let (kv0, kv_n) = split_range(cfg.num_kv_heads, shard.world, shard.rank);
        // The MLP is split in units that keep quantized blocks of down_proj whole.
        let unit = [256, 32, 1]
            .into_iter()
            .find(|u| cfg.intermediate_size.is_multiple_of(*u))
            .unwrap_or(1);
        let (f0, f_n) = split_range(cfg.intermediate_size / unit, shard.world, shard.rank);
        let (f0, f_n) = (f0 * unit, f_n * unit);
        let sharded = shard.world > 1;
        let kquants = !opts.candle_kquants;

        let get =
            |source: &mut dyn TensorSource, role: Role, dims: &[usize]| -> Result<RawWeight> {
                let name = source.describe(role);
                source
                    .get(role)?
                    .ok_or(EngineError::MissingTensor(name.clone()))?
                    .expect_dims(&name, dims)
            };
        // Column-parallel layers keep a slice of output rows, row-parallel ones a slice
        // of input columns.
        let col = |w: RawWeight, start: usize, len: usize| -> Result<RawWeight> {
            if sharded { w.rows(start, len) } else { Ok(w) }
        };
        let row = |w: RawWeight, start: usize, len: usize| -> Result<RawWeight> {
            if sharded { w.cols(start, len) } else { Ok(w) }
        };
        let encoding = Encoding {
            requantize: opts.requantize,
            f16_weights: opts.f16_weights,
            dequantize_f16: opts.dequantize_f16,
            pad,
        };
        let matmul = |w: RawWeight| encoding.matmul(w, device);
        let embed_raw = get(source, Role::Embed, &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
            let (q0, qn) = (kv0 * group * d, kv_n * group * d);
            let (k0, kn) = (kv0 * d, kv_n * d);
            let mut proj =
                |w: Role, b: Role, out: usize, start: usize, len: usize| -> Result<Linear> {
                    let weight = col(get(source, w, &[out, h])?, start, len)?;
                    let bias_name = source.describe(b);
                    let bias = match source.get(b)? {
                        Some(raw) => Some(
                            col(raw.expect_dims(&bias_name, &[out])?, start, len)?
                                .to_f32(device)?,
                        ),
                        None => None,
                    };
                    Linear::new(matmul(weight)?, bias, kquants)
                };
            let q = proj(Role::Q(i), Role::QBias(i), qd, q0, qn)?;
            let k = proj(Role::K(i), Role::KBias(i), kvd, k0, kn)?;
            let v = proj(Role::V(i), Role::VBias(i), kvd, k0, kn)?;
            let inter = cfg.intermediate_size;
            let plain = |w: RawWeight| -> Result<Linear> { Linear::new(matmul(w)?, None, kquants) };
            layers.push(Layer {
                attn_norm: get(source, Role::AttnNorm(i), &[h])?.to_f32(device)?,
                q,
                k,
                v,
                o: plain(row(get(source, Role::O(i), &[h, qd])?, q0, qn)?)?,
                ffn_norm: get(source, Role::FfnNorm(i), &[h])?.to_f32(device)?,
                gate: plain(col(get(source, Role::Gate(i), &[inter, h])?, f0, f_n)?)?,
                up: plain(col(get(source, Role::Up(i), &[inter, h])?, f0, f_n)?)?,
                down: plain(row(get(source, Role::Down(i), &[h, inter])?, f0, f_n)?)?,
            });
            opts.progress.report(i + 1, cfg.num_layers + 1);
        }
        let final_norm = get(source, Role::FinalNorm, &[h])?.to_f32(device)?;
        let mut head_rows = None;
        let lm_head = if shard.rank == 0 {
            let head = match source.get(Role::LmHead)? {
                Some(w) => w.expect_dims(&source.describe(Role::LmHead), &[cfg.vocab_size, h])?,
                None => embed_raw.clone(), // tied embeddings
            };
            let head = match opts.head_vocab {
                Some(n) if n == 0 || n > cfg.vocab_size => {
                    return Err(EngineError::invalid(format!(
                        "head vocabulary {n} must be within 1..={}",
                        cfg.vocab_size
                    )));
                }
                Some(n) if n < cfg.vocab_size => {
                    head_rows = Some(HeadRows {
                        full: head.clone(),
                        encoding,
                        kquants,
                    });
                    head.rows(0, n)?
                }
                _ => head,
            };
            Some(Linear::new(matmul(head)?, None, kquants)?)
        } else {
            None
        };
        let embed = match embed_raw {
            RawWeight::Quant(q) => QMatMul::QTensor(q),
            RawWeight::Dense(t) => QMatMul::Tensor(t.to_dtype(DType::F32)?),
        };
        let (cos, sin) = rope_tables(cfg.rope_theta, d, cfg.max_position, device)?;
        opts.progress.report(cfg.num_layers + 1, cfg.num_layers + 1);
        let info = ModelInfo {
            name: name.to_string(),
            vocab_size: cfg.vocab_size,
            head_vocab: opts.head_vocab.unwrap_or(cfg.vocab_size),
            max_position: cfg.max_position,
            num_layers: cfg.num_layers,
        };
        Ok(Self {
            local: LocalDims {
                heads: kv_n * group,
                kv_heads: kv_n,
            },
            cfg,
            shard,
            embed,
            layers,
            final_norm,
            lm_head,
            head_rows,
            cos,
            sin,
            info,
            device: device.clone(),
            all_reduce: None,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn shard(&self) -> Shard {
        self.shard
    }

    pub fn set_all_reduce(&mut self, ar: Arc<dyn AllReduce>) {
        self.all_reduce = Some(ar);
    }

    /// A cache sized for the key/value heads that `rank` of this model's group holds.
    pub fn new_cache_for_rank(&self, rank: usize) -> KvCache {
        let (_, kv_heads) = split_range(self.cfg.num_kv_heads, self.shard.world, rank);
        KvCache::new(
            self.cfg.num_layers,
            kv_heads,
            self.cfg.head_dim,
            self.cfg.max_position,
            DType::F32,
            &self.device,
        )
    }

    /// Bytes of KV cache one token costs on this shard.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.cfg.num_layers * self.local.kv_heads * self.cfg.head_dim * 4
    }

    fn reduce(&self, t: Tensor) -> Result<Tensor> {
        match &self.all_reduce {
            Some(ar) if self.shard.world > 1 => ar.sum(self.shard.rank, &t),
            _ => Ok(t),
        }
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        Ok(match self.cfg.rope_style {
            RopeStyle::Neox => candle_nn::rotary_emb::rope(x, cos, sin)?,
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(x, cos, sin)?,
        })
    }

    /// The shared part of every forward: runs the layers over all sequences' rows and
    /// returns the final hidden states `(total_rows, hidden)`. Caches are written but
    /// their cursors not moved; the caller commits.
    fn run_layers(&self, batch: &mut [(&mut KvCache, SeqInput<'_>)]) -> Result<Tensor> {
        let (d, hq, hkv) = (self.cfg.head_dim, self.local.heads, self.local.kv_heads);
        let eps = self.cfg.rms_norm_eps as f32;
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut masks = Vec::with_capacity(batch.len());
        // On CPU every forward takes the batch-invariant attention kernel, so a row's output
        // is the same however the tokens were split into forwards: one row or many, and a
        // prompt prefilled whole or (as lookahead and draft catch-up do) in parts.
        // (The kernel reads the visibility itself; the masks are for the matmul path.)
        let invariant = self.device.is_cpu();
        for (cache, input) in batch.iter() {
            tokens.extend_from_slice(input.tokens);
            positions.extend_from_slice(input.positions);
            let n = input.tokens.len();
            let mask = match invariant {
                true => None,
                false => device_mask(input.visibility, n, cache.len(), &self.device)?,
            };
            masks.push(mask);
        }
        let total = tokens.len();
        let ids = Tensor::new(tokens.as_slice(), &self.device)?;
        let pos = Tensor::new(positions.as_slice(), &self.device)?;
        let cos = self.cos.index_select(&pos, 0)?;
        let sin = self.sin.index_select(&pos, 0)?;
        let mut x = self.embed.embedding(&ids)?;
        let scale = 1.0 / (d as f64).sqrt();

        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let qkv = Linear::forward_many(&h, &[&layer.q, &layer.k, &layer.v])?;
            let heads = |t: &Tensor, n: usize| -> Result<Tensor> {
                Ok(t.reshape((1, total, n, d))?.transpose(1, 2)?.contiguous()?)
            };
            let q = self.rope(&heads(&qkv[0], hq)?, &cos, &sin)?;
            let k = self.rope(&heads(&qkv[1], hkv)?, &cos, &sin)?;
            let v = heads(&qkv[2], hkv)?;
            let mut outs = Vec::with_capacity(batch.len());
            let mut off = 0;
            for ((cache, input), mask) in batch.iter().zip(&masks) {
                let n = input.tokens.len();
                let part =
                    |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(2, off, n)?.contiguous()?) };
                let (k_all, v_all) = cache.write(li, &part(&k)?, &part(&v)?)?;
                let q = part(&q)?;
                outs.push(if invariant {
                    crate::attention::attend(&q, &k_all, &v_all, input.visibility, scale as f32)?
                } else {
                    attention(&q, &k_all, &v_all, mask.as_ref(), scale)?
                });
                off += n;
            }
            let attn = if outs.len() == 1 {
                outs.remove(0)
            } else {
                Tensor::cat(&outs, 0)?
            };
            let o = self.reduce(layer.o.forward(&attn)?)?;
            x = (x + o)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let gu = Linear::forward_many(&h, &[&layer.gate, &layer.up])?;
            let m = (gu[0].silu()? * &gu[1])?;
            let down = self.reduce(layer.down.forward(&m)?)?;
            x = (x + down)?;
        }
        Ok(x)
    }

    /// Runs the layers for a batch on this shard (every rank of a tensor-parallel group
    /// calls this in lock-step) and commits the caches. Returns hidden states.
    pub(crate) fn forward_hidden(
        &self,
        batch: &mut [(&mut KvCache, SeqInput<'_>)],
    ) -> Result<Tensor> {
        for (cache, input) in batch.iter_mut() {
            input.validate(self.cfg.vocab_size, self.cfg.max_position)?;
            cache.reserve(input.tokens.len())?;
        }
        let x = self.run_layers(batch)?;
        for (cache, input) in batch.iter_mut() {
            cache.commit(input.tokens.len());
        }
        Ok(x)
    }

    /// Final norm, head and argmax for the requested rows of each sequence.
    pub(crate) fn outputs(
        &self,
        hidden: &Tensor,
        inputs: &[SeqInput<'_>],
    ) -> Result<Vec<ForwardOutput>> {
        let head = self
            .lm_head
            .as_ref()
            .ok_or_else(|| EngineError::invalid("this shard holds no output head"))?;
        let mut global = Vec::new();
        let mut per_seq = Vec::with_capacity(inputs.len());
        let mut off = 0;
        for input in inputs {
            let rows = input.outputs.resolve(input.tokens.len())?;
            global.extend(rows.iter().map(|&r| (off + r) as u32));
            off += input.tokens.len();
            per_seq.push(rows);
        }
        let mut results = Vec::with_capacity(inputs.len());
        if global.is_empty() {
            return Ok(per_seq
                .into_iter()
                .map(|rows| ForwardOutput {
                    rows,
                    argmax: vec![],
                    logits: None,
                    confidence: None,
                })
                .collect());
        }
        let idx = Tensor::new(global.as_slice(), &self.device)?;
        let h = hidden.index_select(&idx, 0)?;
        let h = candle_nn::ops::rms_norm(&h, &self.final_norm, self.cfg.rms_norm_eps as f32)?;
        let logits = head.forward(&h)?.to_dtype(DType::F32)?;
        let mut argmax: Vec<u32> = logits.argmax_keepdim(D::Minus1)?.flatten_all()?.to_vec1()?;
        let mut confidence: Option<Vec<f32>> = if inputs.iter().any(|i| i.outputs.confidence) {
            // The argmax's probability is 1 / sum(exp(logit - max logit)).
            let top = logits.max_keepdim(D::Minus1)?;
            let mass = logits.broadcast_sub(&top)?.exp()?.sum_keepdim(D::Minus1)?;
            Some(mass.recip()?.flatten_all()?.to_vec1()?)
        } else {
            None
        };
        let want_logits = inputs.iter().any(|i| i.outputs.logits);
        let mut all_logits: Option<Vec<Vec<f32>>> = if want_logits {
            let mut rows = logits.to_vec2::<f32>()?;
            // A narrowed head never predicts the rest of the vocabulary (but see below).
            for r in &mut rows {
                r.resize(self.cfg.vocab_size, f32::NEG_INFINITY);
            }
            Some(rows)
        } else {
            None
        };
        if let Some(full) = &self.head_rows {
            // Tokens beyond the narrowed head that a sequence asked about, scored against
            // their own rows of the full head and merged into its rows' outputs.
            let narrow = logits.dim(D::Minus1)?;
            let mut at = 0;
            for (input, rows) in inputs.iter().zip(&per_seq) {
                let m = rows.len();
                let ids = beyond_head(input.outputs.also.as_deref(), narrow);
                if m > 0 && !ids.is_empty() {
                    let scores: Vec<Vec<f32>> = full
                        .score(&h.narrow(0, at, m)?, &ids)?
                        .to_dtype(DType::F32)?
                        .to_vec2()?;
                    let tops: Vec<f32> = logits
                        .narrow(0, at, m)?
                        .max_keepdim(D::Minus1)?
                        .flatten_all()?
                        .to_vec1()?;
                    for (i, (row, top)) in scores.iter().zip(tops).enumerate() {
                        let r = at + i;
                        // On a tie the head's own (lower) token stays, as argmax does.
                        let (best_at, best) = row.iter().enumerate().fold(
                            (usize::MAX, f32::NEG_INFINITY),
                            |acc, (j, &x)| {
                                if x > acc.1 { (j, x) } else { acc }
                            },
                        );
                        let new_top = top.max(best);
                        if best > top {
                            argmax[r] = ids[best_at];
                        }
                        if let Some(conf) = confidence.as_mut() {
                            // 1 / conf is the head's mass relative to its own top.
                            let mass = (top - new_top).exp() / conf[r]
                                + row.iter().map(|&x| (x - new_top).exp()).sum::<f32>();
                            conf[r] = mass.recip();
                        }
                        if let Some(all) = all_logits.as_mut() {
                            for (&t, &x) in ids.iter().zip(row) {
                                all[r][t as usize] = x;
                            }
                        }
                    }
                }
                at += m;
            }
        }
        let mut at = 0;
        for (input, rows) in inputs.iter().zip(per_seq) {
            let m = rows.len();
            results.push(ForwardOutput {
                argmax: argmax[at..at + m].to_vec(),
                logits: match (&all_logits, input.outputs.logits) {
                    (Some(all), true) => Some(all[at..at + m].to_vec()),
                    _ => None,
                },
                confidence: match (&confidence, input.outputs.confidence) {
                    (Some(all), true) => Some(all[at..at + m].to_vec()),
                    _ => None,
                },
                rows,
            });
            at += m;
        }
        Ok(results)
    }
}

/// The distinct tokens of `also` that a head of `narrow` tokens does not score, ascending.
fn beyond_head(also: Option<&[u32]>, narrow: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = also
        .unwrap_or_default()
        .iter()
        .copied()
        .filter(|&t| t as usize >= narrow)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Masked attention of `n` new queries against a sequence's keys. Query heads are grouped
/// under their key/value head (no copy of the cache for grouped-query attention).
/// The additive mask `(n, past + n)` for the matmul attention, built on `device`: only the
/// `n x n` pattern among the new tokens is copied there; the columns of the cache, which
/// every new token sees, are zeros made on the device. None where nothing is hidden (one
/// new token).
fn device_mask(vis: &Visibility, n: usize, past: usize, device: &Device) -> Result<Option<Tensor>> {
    let Some(block) = vis.additive_mask(n, 0) else {
        return Ok(None);
    };
    let block = Tensor::from_vec(block, (n, n), device)?;
    Ok(Some(match past {
        0 => block,
        _ => Tensor::cat(&[Tensor::zeros((n, past), DType::F32, device)?, block], 1)?,
    }))
}

fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (_, hq, n, d) = q.dims4()?;
    let (_, hkv, t, _) = k.dims4()?;
    let g = hq / hkv;
    let q = q.reshape((1, hkv, g * n, d))?;
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match mask {
        Some(m) => scores
            .reshape((1, hkv, g, n, t))?
            .broadcast_add(m)?
            .reshape((1, hkv, g * n, t))?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let out = probs.matmul(v)?; // (1, hkv, g*n, d)
    Ok(out
        .reshape((1, hq, n, d))?
        .transpose(1, 2)?
        .reshape((n, hq * d))?)
}

fn rope_tables(
    theta: f32,
    head_dim: usize,
    max_pos: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv: Vec<f64> = (0..half)
        .map(|i| 1.0 / (theta as f64).powf(2.0 * i as f64 / head_dim as f64))
        .collect();
    let mut cos = Vec::with_capacity(max_pos * half);
    let mut sin = Vec::with_capacity(max_pos * half);
    for p in 0..max_pos {
        for f in &inv {
            let a = p as f64 * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (max_pos, half), device)?,
        Tensor::from_vec(sin, (max_pos, half), device)?,
    ))
}

impl LanguageModel for Transformer {
    type Cache = KvCache;

    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn new_cache(&self) -> KvCache {
        self.new_cache_for_rank(self.shard.rank)
    }

    fn forward_batch(
        &self,
        batch: &mut [(&mut KvCache, SeqInput<'_>)],
    ) -> Result<Vec<ForwardOutput>> {
        if self.shard.world > 1 {
            return Err(EngineError::invalid(
                "a tensor-parallel shard must run inside its group (see tp::TpModel)",
            ));
        }
        let hidden = self.forward_hidden(batch)?;
        let inputs: Vec<SeqInput<'_>> = batch.iter().map(|(_, i)| i.clone()).collect();
        self.outputs(&hidden, &inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_mask_is_the_whole_additive_mask() {
        let shapes = [
            (Visibility::Causal, 4),
            (Visibility::Tree(vec![-1, 0, 0, 1, -1]), 5),
            (
                Visibility::Matrix {
                    n: 3,
                    visible: vec![true, false, true, true, true, false, false, true, true],
                },
                3,
            ),
        ];
        for (vis, n) in shapes {
            for past in [0, 1, 7] {
                let got = device_mask(&vis, n, past, &Device::Cpu).unwrap().unwrap();
                let want = vis.additive_mask(n, past).unwrap();
                assert_eq!(got.dims(), &[n, past + n]);
                assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
            }
        }
        assert!(
            device_mask(&Visibility::Causal, 1, 9, &Device::Cpu)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn rows_are_split_or_paired_only_where_candle_would_switch_kernels() {
        use RowsPerCall::*;
        assert_eq!(rows_per_call(GgmlDType::Q6K, 1, false), Paired);
        assert_eq!(rows_per_call(GgmlDType::Q6K, 2, true), All);
        assert_eq!(rows_per_call(GgmlDType::Q4K, 64, false), All);
        assert_eq!(rows_per_call(GgmlDType::Q4K, 31, true), All);
        assert_eq!(rows_per_call(GgmlDType::Q4K, 32, true), AtMost(31));
        assert_eq!(rows_per_call(GgmlDType::Q8_0, 64, true), All);
    }
}
