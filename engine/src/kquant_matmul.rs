//! `x @ w^T` for Q4_K and Q6_K weights on x86 CPUs with AVX-512 VNNI or AVX2.
//!
//! candle's repacked x86 kernels widen every block's scales to f32 (Q4_K tiles move 0.75
//! bytes per weight instead of 0.56, Q6_K tiles 1.25 instead of 0.82) and pass over the
//! weights once per 4 input rows, so a 5-row verify tree reads the model twice. A decode
//! step here is bound by memory bandwidth, not arithmetic. These tiles keep the scales as
//! small integers and the Q6_K quants as 4 + 2 bits (0.58 and 0.83 bytes per weight,
//! within 3 % of the file's blocks) and let up to [`ROW_BLOCK`] input rows share every
//! load, so a verify tree of a few nodes costs little more than one row.
//!
//! Layout: a tile holds 16 output rows (one 32-bit lane each) by one 256-value block, its
//! quants interleaved so that one `vpdpbusd` multiplies 4 consecutive inputs into all 16
//! rows. Inputs are quantized to 8 bits per 256 values. Each sub-block's sum is exact in
//! integers, then scaled and accumulated in floats in one fixed order per output element:
//! a row's result does not depend on how many rows it was batched with.
//!
//! The AVX2 kernels read the same tiles as two halves of 8 rows and form each 4-value dot
//! product with `vpmaddubsw` + `vpmaddwd` (no partial sum can saturate: see `mod avx2`).
//! Their integer sums are the same numbers and their float steps the same operations in
//! the same order per output, so both instruction sets give the same bits.
//!
//! On the CPU of `results/engine-bench.md` one row is bound by memory and every further
//! row by `vpdpbusd` throughput, so the kernels keep everything else off the port that
//! runs it.

use crate::error::{EngineError, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;

/// Output rows per tile: the 16 f32 lanes of a 512-bit register.
const TILE_ROWS: usize = 16;
/// Values per quantized block (K-quants' super-block, and our input blocks).
const QK: usize = 256;
/// Input rows multiplied against each tile load (AVX-512; AVX2 has half the registers
/// and takes [`ROW_BLOCK_AVX2`]).
const ROW_BLOCK: usize = 8;
const ROW_BLOCK_AVX2: usize = 4;

const Q4K_BLOCK_BYTES: usize = 144;
const Q6K_BLOCK_BYTES: usize = 210;

/// 16 rows x 256 values of Q4_K: 2368 bytes, 0.58 per weight (the file's blocks: 0.56).
#[repr(C, align(64))]
#[derive(Clone)]
struct Q4Tile {
    /// `[group of 8 values (32)][row (16)][4 bytes]`; byte `j` of a group `g` holds value
    /// `8g + j` in its low nibble and `8g + 4 + j` in its high one.
    qs: [u8; QK / 8 * TILE_ROWS * 4],
    /// `[sub-block of 32 (8)][row]`, 6-bit scales.
    scales: [[u8; TILE_ROWS]; 8],
    /// `[pair of sub-blocks (4)][row][2]`: 6-bit mins, widened to i16 pairs for
    /// `vpdpwssd` when used.
    mins: [[u8; TILE_ROWS * 2]; 4],
    /// The blocks' f16 scales, as the file has them.
    d: [u16; TILE_ROWS],
    dmin: [u16; TILE_ROWS],
}

/// 16 rows x 256 values of Q6_K: 3392 bytes, 0.83 per weight (the file's blocks: 0.82).
#[repr(C, align(64))]
#[derive(Clone)]
struct Q6Tile {
    /// The quants' low 4 bits, `[pair of 4-value groups (32)][row (16)][4 bytes]`: byte `j`
    /// of pair `p` holds value `8p + j` in its low nibble and `8p + 4 + j` in its high one.
    ql: [u8; QK / 8 * TILE_ROWS * 4],
    /// Their high 2 bits, `[sub-block of 16 (16)][row][4 bytes]`: bits `2i..2i + 2` of
    /// byte `j` of sub-block `s` belong to value `16s + 4i + j`.
    qh: [u8; QK / 16 * TILE_ROWS * 4],
    /// `[sub-block of 16 (16)][row]`.
    scales: [[i8; TILE_ROWS]; 16],
    /// The blocks' f16 scales.
    d: [u16; TILE_ROWS],
}

enum Tiles {
    Q4(Vec<Q4Tile>),
    Q6(Vec<Q6Tile>),
}

/// A Q4_K or Q6_K `(n, k)` weight repacked into tiles, `[n / 16][k / 256]`.
pub struct KQuantMatrix {
    tiles: Tiles,
    n: usize,
    k: usize,
}

/// The instruction sets the kernels are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Avx512,
    Avx2,
}

/// The best kernel this CPU runs, if any.
fn isa() -> Option<Isa> {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
            {
                Some(Isa::Avx512)
            } else if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                Some(Isa::Avx2)
            } else {
                None
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Whether this CPU runs these kernels.
pub fn supported() -> bool {
    isa().is_some()
}

/// The 6-bit scale and min of Q4_K sub-block `j` from the block's 12 packed bytes.
fn q4k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// One Q4_K block: its quants (0..15) in value order, scales, mins, d and dmin.
struct Q4Block {
    q: [u8; QK],
    scales: [u8; 8],
    mins: [u8; 8],
    d: f32,
    dmin: f32,
}

fn decode_q4k(b: &[u8]) -> Q4Block {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let s = &b[4..16];
    let qs = &b[16..144];
    let mut out = Q4Block {
        q: [0; QK],
        scales: [0; 8],
        mins: [0; 8],
        d,
        dmin,
    };
    for j in 0..8 {
        (out.scales[j], out.mins[j]) = q4k_scale_min(j, s);
    }
    // 64 values per 32 bytes: the low nibbles first, then the high ones.
    for chunk in 0..4 {
        for l in 0..32 {
            let byte = qs[chunk * 32 + l];
            out.q[chunk * 64 + l] = byte & 0x0F;
            out.q[chunk * 64 + 32 + l] = byte >> 4;
        }
    }
    out
}

/// One Q6_K block: quants (0..63, value + 32) in value order, 16 scales and d.
struct Q6Block {
    q: [u8; QK],
    scales: [i8; 16],
    d: f32,
}

fn decode_q6k(b: &[u8]) -> Q6Block {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let mut out = Q6Block {
        q: [0; QK],
        scales: [0; 16],
        d: f16_at(b, 208),
    };
    for (i, s) in out.scales.iter_mut().enumerate() {
        *s = b[192 + i] as i8;
    }
    // Two halves of 128 values; in each, byte l of ql and of qh serve four values 32 apart.
    for half in 0..2 {
        let (ql, qh) = (&ql[half * 64..], &qh[half * 32..]);
        let q = &mut out.q[half * 128..];
        for l in 0..32 {
            q[l] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
            q[l + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
            q[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            q[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    out
}

impl KQuantMatrix {
    /// Repacks `q` when it is a Q4_K or Q6_K matrix whose shape the tiles cover; `None`
    /// otherwise (other block types, other shapes, a non-CPU tensor).
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let Ok((n, k)) = q.shape().dims2() else {
            return Ok(None);
        };
        if !q.device().is_cpu() || n == 0 || !n.is_multiple_of(TILE_ROWS) || !k.is_multiple_of(QK) {
            return Ok(None);
        }
        let data = q.data()?;
        let kb = k / QK;
        let tiles = match q.dtype() {
            GgmlDType::Q4K => Tiles::Q4(pack(&data, n, kb, Q4K_BLOCK_BYTES, pack_q4_tile)),
            GgmlDType::Q6K => Tiles::Q6(pack(&data, n, kb, Q6K_BLOCK_BYTES, pack_q6_tile)),
            _ => return Ok(None),
        };
        Ok(Some(Self { tiles, n, k }))
    }

    /// `x (m, k) -> (m, n)` f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut out = Self::forward_many(x, &[self])?;
        Ok(out.remove(0))
    }

    /// Several weights applied to the same input, sharing its quantization and one
    /// parallel region.
    pub fn forward_many(x: &Tensor, ws: &[&KQuantMatrix]) -> Result<Vec<Tensor>> {
        let isa = isa().ok_or_else(|| {
            EngineError::invalid("quantized matmul kernels need AVX-512 VNNI or AVX2")
        })?;
        Self::forward_many_on(isa, x, ws)
    }

    /// [`Self::forward_many`] on the kernels for `isa`, which this CPU must run.
    fn forward_many_on(isa: Isa, x: &Tensor, ws: &[&KQuantMatrix]) -> Result<Vec<Tensor>> {
        let (m, k) = x.dims2()?;
        if let Some(w) = ws.iter().find(|w| w.k != k) {
            return Err(EngineError::invalid(format!(
                "quantized matmul: input width {k}, weight width {}",
                w.k
            )));
        }
        let xs = x
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let input = QuantizedInput::new(isa, &xs, m, k);
        let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; m * w.n]).collect();
        let mut jobs: Vec<(&KQuantMatrix, &mut Vec<f32>)> =
            ws.iter().copied().zip(outs.iter_mut()).collect();
        multiply_many(isa, &input, &mut jobs);
        outs.into_iter()
            .zip(ws)
            .map(|(o, w)| Ok(Tensor::from_vec(o, (m, w.n), &Device::Cpu)?.to_device(x.device())?))
            .collect()
    }

    /// The weights as f32, `(n, k)` row-major, read back from the tiles.
    #[cfg(test)]
    fn dequantize(&self) -> Vec<f32> {
        let kb = self.k / QK;
        let mut out = vec![0f32; self.n * self.k];
        for nt in 0..self.n / TILE_ROWS {
            for b in 0..kb {
                for r in 0..TILE_ROWS {
                    let row = &mut out[(nt * TILE_ROWS + r) * self.k + b * QK..][..QK];
                    match &self.tiles {
                        Tiles::Q4(t) => unpack_q4_row(&t[nt * kb + b], r, row),
                        Tiles::Q6(t) => unpack_q6_row(&t[nt * kb + b], r, row),
                    }
                }
            }
        }
        out
    }
}

fn pack<T>(
    data: &[u8],
    n: usize,
    kb: usize,
    block_bytes: usize,
    pack_tile: fn(&[&[u8]; TILE_ROWS]) -> T,
) -> Vec<T> {
    let row_bytes = kb * block_bytes;
    let mut tiles = Vec::with_capacity(n / TILE_ROWS * kb);
    for nt in 0..n / TILE_ROWS {
        for b in 0..kb {
            let blocks: [&[u8]; TILE_ROWS] = std::array::from_fn(|r| {
                let at = (nt * TILE_ROWS + r) * row_bytes + b * block_bytes;
                &data[at..at + block_bytes]
            });
            tiles.push(pack_tile(&blocks));
        }
    }
    tiles
}

fn pack_q4_tile(blocks: &[&[u8]; TILE_ROWS]) -> Q4Tile {
    let mut t = Q4Tile {
        qs: [0; QK / 8 * TILE_ROWS * 4],
        scales: [[0; TILE_ROWS]; 8],
        mins: [[0; TILE_ROWS * 2]; 4],
        d: [0; TILE_ROWS],
        dmin: [0; TILE_ROWS],
    };
    for (r, raw) in blocks.iter().enumerate() {
        let b = decode_q4k(raw);
        t.d[r] = f16::from_f32(b.d).to_bits();
        t.dmin[r] = f16::from_f32(b.dmin).to_bits();
        for s in 0..8 {
            t.scales[s][r] = b.scales[s];
            t.mins[s / 2][r * 2 + s % 2] = b.mins[s];
        }
        for g in 0..QK / 8 {
            for j in 0..4 {
                t.qs[(g * TILE_ROWS + r) * 4 + j] = b.q[8 * g + j] | (b.q[8 * g + 4 + j] << 4);
            }
        }
    }
    t
}

fn pack_q6_tile(blocks: &[&[u8]; TILE_ROWS]) -> Q6Tile {
    let mut t = Q6Tile {
        ql: [0; QK / 8 * TILE_ROWS * 4],
        qh: [0; QK / 16 * TILE_ROWS * 4],
        scales: [[0; TILE_ROWS]; 16],
        d: [0; TILE_ROWS],
    };
    for (r, raw) in blocks.iter().enumerate() {
        let b = decode_q6k(raw);
        t.d[r] = f16::from_f32(b.d).to_bits();
        for s in 0..16 {
            t.scales[s][r] = b.scales[s];
        }
        for p in 0..QK / 8 {
            for j in 0..4 {
                t.ql[(p * TILE_ROWS + r) * 4 + j] =
                    (b.q[8 * p + j] & 0x0F) | ((b.q[8 * p + 4 + j] & 0x0F) << 4);
            }
        }
        for s in 0..QK / 16 {
            for j in 0..4 {
                t.qh[(s * TILE_ROWS + r) * 4 + j] = (0..4)
                    .map(|i| (b.q[16 * s + 4 * i + j] >> 4) << (2 * i))
                    .fold(0, |a, v| a | v);
            }
        }
    }
    t
}

#[cfg(test)]
fn unpack_q4_row(t: &Q4Tile, r: usize, out: &mut [f32]) {
    for (v, o) in out.iter_mut().enumerate() {
        let (g, j) = (v / 8, v % 8);
        let byte = t.qs[(g * TILE_ROWS + r) * 4 + j % 4];
        let q = if j < 4 { byte & 0x0F } else { byte >> 4 };
        let s = v / 32;
        let min = t.mins[s / 2][r * 2 + s % 2] as f32;
        let (d, dmin) = (
            f16::from_bits(t.d[r]).to_f32(),
            f16::from_bits(t.dmin[r]).to_f32(),
        );
        *o = d * t.scales[s][r] as f32 * q as f32 - dmin * min;
    }
}

#[cfg(test)]
fn unpack_q6_row(t: &Q6Tile, r: usize, out: &mut [f32]) {
    for (v, o) in out.iter_mut().enumerate() {
        let (g, j) = (v / 4, v % 4);
        let low = (t.ql[(g / 2 * TILE_ROWS + r) * 4 + j] >> (4 * (g % 2))) & 0x0F;
        let high = (t.qh[(v / 16 * TILE_ROWS + r) * 4 + j] >> (2 * (g % 4))) & 3;
        let q = (low | (high << 4)) as i32 - 32;
        *o = f16::from_bits(t.d[r]).to_f32() * t.scales[v / 16][r] as f32 * q as f32;
    }
}

/// Input rows quantized to i8 per 256 values: `x ~ d * q`.
struct QuantizedInput {
    m: usize,
    kb: usize,
    /// `(m, k)` row-major.
    q: Vec<i8>,
    /// `(m, kb)`.
    d: Vec<f32>,
    /// `(m, kb, 16)`: sums of the quants of each 16 values.
    sums16: Vec<i32>,
    /// `(m, kb, 4)`: sums of each 64 values' two 32-value halves, packed as two i16 in
    /// one i32 (the operand layout of `vpdpwssd`).
    sums32_pairs: Vec<i32>,
}

impl QuantizedInput {
    fn new(isa: Isa, xs: &[f32], m: usize, k: usize) -> Self {
        let kb = k / QK;
        let mut me = Self {
            m,
            kb,
            q: vec![0; m * k],
            d: vec![0.0; m * kb],
            sums16: vec![0; m * kb * 16],
            sums32_pairs: vec![0; m * kb * 4],
        };
        for (blk, (x, q)) in xs
            .chunks_exact(QK)
            .zip(me.q.chunks_exact_mut(QK))
            .enumerate()
        {
            me.d[blk] = quantize_block_on(isa, x, q);
            let s16 = &mut me.sums16[blk * 16..][..16];
            for (s, part) in s16.iter_mut().zip(q.chunks_exact(16)) {
                *s = part.iter().map(|&v| v as i32).sum();
            }
            for p in 0..4 {
                let lo = s16[4 * p] + s16[4 * p + 1];
                let hi = s16[4 * p + 2] + s16[4 * p + 3];
                me.sums32_pairs[blk * 4 + p] =
                    (lo as i16 as u16 as i32) | ((hi as i16 as i32) << 16);
            }
        }
        me
    }
}

/// Block `b` of input rows `r0..r0 + R`, as both kernels read it.
struct BlockRows<const R: usize> {
    /// Each row's 256 quants.
    qs: [*const i8; R],
    /// Each row's scale.
    dx: [f32; R],
    /// Each row's sums for the tile type: `sums32_pairs` (4) for Q4_K, `sums16` (16) for Q6_K.
    sums: [*const i32; R],
}

impl QuantizedInput {
    fn block_rows<const R: usize>(&self, r0: usize, b: usize, q6: bool) -> BlockRows<R> {
        let at = |i: usize| (r0 + i) * self.kb + b;
        BlockRows {
            qs: std::array::from_fn(|i| self.q[at(i) * QK..].as_ptr()),
            dx: std::array::from_fn(|i| self.d[at(i)]),
            sums: std::array::from_fn(|i| match q6 {
                true => self.sums16[at(i) * 16..].as_ptr(),
                false => self.sums32_pairs[at(i) * 4..].as_ptr(),
            }),
        }
    }
}

/// 256 values to i8 with a shared scale (returned): round to nearest, ties to even, as
/// the vector versions do, so all give the same bits.
#[cfg(any(test, not(target_arch = "x86_64")))]
fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (qi, xi) in q.iter_mut().zip(x) {
        *qi = (xi * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    d
}

/// [`quantize_block`] on the vector unit of `isa` (same bits).
fn quantize_block_on(isa: Isa, x: &[f32], q: &mut [i8]) -> f32 {
    debug_assert!(x.len() == QK && q.len() == QK);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `isa` is one this CPU runs (callers got it from `isa()`, or, in tests,
    // checked it); both blocks hold 256 values.
    unsafe {
        match isa {
            Isa::Avx512 => avx512::quantize_block(x, q),
            Isa::Avx2 => avx2::quantize_block(x, q),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        quantize_block(x, q)
    }
}

/// Runs every `(weight, output)` job over the same input on candle's worker pool, one
/// unit of work per 16 output rows, on the kernels for `isa` (one this CPU runs).
fn multiply_many(isa: Isa, input: &QuantizedInput, jobs: &mut [(&KQuantMatrix, &mut Vec<f32>)]) {
    let mut starts = Vec::with_capacity(jobs.len());
    let mut total = 0;
    for (w, _) in jobs.iter() {
        starts.push(total);
        total += w.n / TILE_ROWS;
    }
    // Each unit writes its own 16 columns of one output: disjoint, so shared raw pointers.
    let outs: Vec<(&KQuantMatrix, usize)> = jobs
        .iter_mut()
        .map(|(w, o)| (*w, o.as_mut_ptr() as usize))
        .collect();
    candle_core::utils::barrier_pool().execute_chunked(total, |units| {
        for unit in units {
            let job = starts.partition_point(|&s| s <= unit) - 1;
            let (w, out) = outs[job];
            let nt = unit - starts[job];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` is one this CPU runs; `nt` is in range and every unit writes
            // only its own columns.
            unsafe {
                match isa {
                    Isa::Avx512 => avx512::tile_strip(w, input, nt, out as *mut f32),
                    Isa::Avx2 => avx2::tile_strip(w, input, nt, out as *mut f32),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (isa, w, out, nt);
        }
    });
}

/// Tiles ahead of the one being multiplied whose memory is asked for early: every cache
/// line of that tile. Measured on a 2-core Zen 5 VM (82 GB/s with two reading threads):
/// without it, or with only the lines at the start of each 4 KiB page (where hardware
/// prefetchers stop), a streamed one-row product ran at 19 GB/s on one thread and 34-38
/// on two (Q4_K; Q6_K 16 and 29-31); with every line two tiles ahead at 39 and 47-50
/// (Q6_K 40 and 47-53), and a one-token step of the 1.5B target took 24 ms instead of 33.
/// One tile ahead or three to four did as well or up to 5 % worse. (On the earlier VM of
/// `results/engine-bench.md`, 29 GB/s, the page starts alone had measured best: its
/// hardware prefetcher kept up within pages, and there every line cost more than it saved.)
#[cfg(target_arch = "x86_64")]
const PREFETCH_TILES: usize = 2;

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch<T>(tiles: &[T], at: usize) {
    use core::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    if let Some(t) = tiles.get(at) {
        let start = t as *const T as usize;
        let mut line = start & !63;
        while line < start + std::mem::size_of::<T>() {
            // SAFETY: a prefetch never faults; the line holds part of the tile.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line as *const i8) };
            line += 64;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use core::arch::x86_64::*;

    /// Output columns `16 nt..16 nt + 16` of every input row.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile_strip(
        w: &KQuantMatrix,
        x: &QuantizedInput,
        nt: usize,
        out: *mut f32,
    ) {
        let mut r0 = 0;
        while r0 < x.m {
            let rows = (x.m - r0).min(ROW_BLOCK);
            unsafe {
                match rows {
                    1 => strip::<1>(w, x, nt, r0, out),
                    2 => strip::<2>(w, x, nt, r0, out),
                    3 => strip::<3>(w, x, nt, r0, out),
                    4 => strip::<4>(w, x, nt, r0, out),
                    5 => strip::<5>(w, x, nt, r0, out),
                    6 => strip::<6>(w, x, nt, r0, out),
                    7 => strip::<7>(w, x, nt, r0, out),
                    _ => strip::<8>(w, x, nt, r0, out),
                }
            }
            r0 += rows;
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn strip<const R: usize>(
        w: &KQuantMatrix,
        x: &QuantizedInput,
        nt: usize,
        r0: usize,
        out: *mut f32,
    ) {
        let kb = x.kb;
        let mut acc = [_mm512_setzero_ps(); R];
        // Only the first rows' pass streams the strip in from memory; the passes after it
        // find its tiles in L2, and asking for them again cost a loop of prefetches per
        // tile (7 % of a 64-row forward's time, by a profile).
        let first_pass = r0 == 0;
        for b in 0..kb {
            let rows = x.block_rows::<R>(r0, b, matches!(w.tiles, Tiles::Q6(_)));
            unsafe {
                match &w.tiles {
                    Tiles::Q4(t) => {
                        if first_pass {
                            prefetch(t, nt * kb + b + PREFETCH_TILES);
                        }
                        q4_block::<R>(&t[nt * kb + b], &rows.qs, &rows.sums, &rows.dx, &mut acc)
                    }
                    Tiles::Q6(t) => {
                        if first_pass {
                            prefetch(t, nt * kb + b + PREFETCH_TILES);
                        }
                        q6_block::<R>(&t[nt * kb + b], &rows.qs, &rows.sums, &rows.dx, &mut acc)
                    }
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            unsafe { _mm512_storeu_ps(out.add((r0 + i) * w.n + nt * TILE_ROWS), *a) };
        }
    }

    /// [`super::quantize_block`] with 16 lanes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
        debug_assert!(x.len() == QK && q.len() == QK);
        unsafe {
            let mut amax = _mm512_setzero_ps();
            for c in 0..QK / 16 {
                amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(x.as_ptr().add(c * 16))));
            }
            let d = _mm512_reduce_max_ps(amax) / 127.0;
            let inv = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
            for c in 0..QK / 16 {
                let v = _mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(c * 16)), inv);
                // The default rounding mode: to nearest, ties to even.
                let i = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(v), lo), hi);
                _mm_storeu_si128(
                    q.as_mut_ptr().add(c * 16) as *mut _,
                    _mm512_cvtepi32_epi8(i),
                );
            }
            d
        }
    }

    /// 6-bit quants from a vector of low nibbles (bits 0..4 of `lo`) and one of high bits
    /// (bits 4..6 of `hi`).
    #[inline(always)]
    unsafe fn six(lo: __m512i, hi: __m512i, low4: __m512i, high2: __m512i) -> __m512i {
        // 0xF8: a | (b & c), per bit.
        unsafe { _mm512_ternarylogic_epi32::<0xF8>(_mm512_and_si512(lo, low4), hi, high2) }
    }

    /// 4 input bytes at `p`, broadcast to every lane.
    #[inline(always)]
    unsafe fn bcast4(p: *const i8) -> __m512i {
        unsafe { _mm512_set1_epi32(std::ptr::read_unaligned(p as *const i32)) }
    }

    #[inline(always)]
    unsafe fn q4_block<const R: usize>(
        t: &Q4Tile,
        qs: &[*const i8; R],
        sums32_pairs: &[*const i32; R],
        dx: &[f32; R],
        acc: &mut [__m512; R],
    ) {
        unsafe {
            let nibble = _mm512_set1_epi8(0x0F);
            let mut facc = [_mm512_setzero_ps(); R];
            for sub in 0..8 {
                let mut isum = [_mm512_setzero_si512(); R];
                for g4 in 0..4 {
                    let g = sub * 4 + g4;
                    let wq = _mm512_load_si512(t.qs.as_ptr().add(g * 64) as *const _);
                    let lo = _mm512_and_si512(wq, nibble);
                    let hi = _mm512_and_si512(_mm512_srli_epi16(wq, 4), nibble);
                    for i in 0..R {
                        isum[i] = _mm512_dpbusd_epi32(isum[i], lo, bcast4(qs[i].add(g * 8)));
                        isum[i] = _mm512_dpbusd_epi32(isum[i], hi, bcast4(qs[i].add(g * 8 + 4)));
                    }
                }
                // Scaled in floats, as in `q6_block`.
                let sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                    t.scales[sub].as_ptr() as *const _,
                )));
                for i in 0..R {
                    facc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i]), sc, facc[i]);
                }
            }
            let mut imin = [_mm512_setzero_si512(); R];
            for p in 0..4 {
                let mins = _mm512_cvtepu8_epi16(_mm256_load_si256(t.mins[p].as_ptr() as *const _));
                for i in 0..R {
                    let s = _mm512_set1_epi32(*sums32_pairs[i].add(p));
                    imin[i] = _mm512_dpwssd_epi32(imin[i], mins, s);
                }
            }
            let d = _mm512_cvtph_ps(_mm256_load_si256(t.d.as_ptr() as *const _));
            let dmin = _mm512_cvtph_ps(_mm256_load_si256(t.dmin.as_ptr() as *const _));
            for i in 0..R {
                let dxi = _mm512_set1_ps(dx[i]);
                acc[i] = _mm512_fmadd_ps(facc[i], _mm512_mul_ps(d, dxi), acc[i]);
                acc[i] = _mm512_fnmadd_ps(
                    _mm512_cvtepi32_ps(imin[i]),
                    _mm512_mul_ps(dmin, dxi),
                    acc[i],
                );
            }
        }
    }

    #[inline(always)]
    unsafe fn q6_block<const R: usize>(
        t: &Q6Tile,
        qs: &[*const i8; R],
        sums16: &[*const i32; R],
        dx: &[f32; R],
        acc: &mut [__m512; R],
    ) {
        unsafe {
            let (low4, high2) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x30));
            let mut facc = [_mm512_setzero_ps(); R];
            for sub in 0..16 {
                // The 16 values of the sub-block as four 4-value groups of 6-bit quants:
                // low nibbles from two `ql` vectors, high bits shifted up from one `qh`.
                let l0 = _mm512_load_si512(t.ql.as_ptr().add(sub * 128) as *const _);
                let l1 = _mm512_load_si512(t.ql.as_ptr().add(sub * 128 + 64) as *const _);
                let h = _mm512_load_si512(t.qh.as_ptr().add(sub * 64) as *const _);
                let groups = [
                    six(l0, _mm512_slli_epi16::<4>(h), low4, high2),
                    six(
                        _mm512_srli_epi16::<4>(l0),
                        _mm512_slli_epi16::<2>(h),
                        low4,
                        high2,
                    ),
                    six(l1, h, low4, high2),
                    six(
                        _mm512_srli_epi16::<4>(l1),
                        _mm512_srli_epi16::<2>(h),
                        low4,
                        high2,
                    ),
                ];
                // The quants are stored + 32: each sum starts at -32 x the inputs' sum (a
                // broadcast where a subtraction after would take a slot of the port that
                // runs vpdpbusd; the same integers, as two's-complement sums commute).
                let mut isum = [_mm512_setzero_si512(); R];
                for i in 0..R {
                    isum[i] = _mm512_set1_epi32(-32 * *sums16[i].add(sub));
                }
                for (g4, wq) in groups.into_iter().enumerate() {
                    let g = sub * 4 + g4;
                    for i in 0..R {
                        isum[i] = _mm512_dpbusd_epi32(isum[i], wq, bcast4(qs[i].add(g * 4)));
                    }
                }
                // Scaled in floats: a conversion and an FMA take one slot of the port that
                // runs vpdpbusd, an integer multiply two.
                let sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    t.scales[sub].as_ptr() as *const _,
                )));
                for i in 0..R {
                    facc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i]), sc, facc[i]);
                }
            }
            let d = _mm512_cvtph_ps(_mm256_load_si256(t.d.as_ptr() as *const _));
            for i in 0..R {
                acc[i] = _mm512_fmadd_ps(facc[i], _mm512_mul_ps(d, _mm512_set1_ps(dx[i])), acc[i]);
            }
        }
    }
}

/// The AVX2 kernels: each 16-row tile as two halves of 8 rows (a 256-bit register of
/// 32-bit lanes). `vpmaddubsw` multiplies the unsigned weights by the signed inputs and adds
/// neighbouring products into i16, `vpmaddwd` by ones adds those pairs into the 4-value dot
/// product `vpdpbusd` gives. Nothing saturates, with inputs in -127..=127: a Q4_K pair is
/// at most 2 * 15 * 127 = 3810 in size, so the 8 pairs of one 32-value sub-block (30480)
/// are added in i16; a Q6_K pair (quants 0..63) at most 16002, so two of them are.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use core::arch::x86_64::*;

    /// Output columns `16 nt..16 nt + 16` of every input row.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_strip(
        w: &KQuantMatrix,
        x: &QuantizedInput,
        nt: usize,
        out: *mut f32,
    ) {
        let mut r0 = 0;
        while r0 < x.m {
            let rows = (x.m - r0).min(ROW_BLOCK_AVX2);
            // The second half finds the strip's tiles still in L2.
            for half in 0..2 {
                unsafe {
                    match rows {
                        1 => strip::<1>(w, x, nt, half, r0, out),
                        2 => strip::<2>(w, x, nt, half, r0, out),
                        3 => strip::<3>(w, x, nt, half, r0, out),
                        _ => strip::<4>(w, x, nt, half, r0, out),
                    }
                }
            }
            r0 += rows;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn strip<const R: usize>(
        w: &KQuantMatrix,
        x: &QuantizedInput,
        nt: usize,
        half: usize,
        r0: usize,
        out: *mut f32,
    ) {
        let kb = x.kb;
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..kb {
            let rows = x.block_rows::<R>(r0, b, matches!(w.tiles, Tiles::Q6(_)));
            let (qs, sums, dx) = (&rows.qs, &rows.sums, &rows.dx);
            unsafe {
                match &w.tiles {
                    Tiles::Q4(t) => {
                        if half == 0 && r0 == 0 {
                            prefetch(t, nt * kb + b + PREFETCH_TILES);
                        }
                        q4_block::<R>(&t[nt * kb + b], half, qs, sums, dx, &mut acc)
                    }
                    Tiles::Q6(t) => {
                        if half == 0 && r0 == 0 {
                            prefetch(t, nt * kb + b + PREFETCH_TILES);
                        }
                        q6_block::<R>(&t[nt * kb + b], half, qs, sums, dx, &mut acc)
                    }
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            let at = (r0 + i) * w.n + nt * TILE_ROWS + half * 8;
            unsafe { _mm256_storeu_ps(out.add(at), *a) };
        }
    }

    /// [`super::quantize_block`] with 8 lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
        debug_assert!(x.len() == QK && q.len() == QK);
        unsafe {
            let sign = _mm256_set1_ps(-0.0);
            let mut amax = _mm256_setzero_ps();
            for c in 0..QK / 8 {
                let v = _mm256_loadu_ps(x.as_ptr().add(c * 8));
                amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
            }
            let m4 = _mm_max_ps(
                _mm256_castps256_ps128(amax),
                _mm256_extractf128_ps::<1>(amax),
            );
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let m1 = _mm_max_ss(m2, _mm_shuffle_ps::<1>(m2, m2));
            let d = _mm_cvtss_f32(m1) / 127.0;
            let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            let (lo, hi) = (_mm256_set1_epi32(-127), _mm256_set1_epi32(127));
            // The packs below interleave 128-bit lanes; this puts the values back in order.
            let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            for c in 0..QK / 32 {
                let v: [__m256i; 4] = std::array::from_fn(|j| {
                    let f = _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(c * 32 + j * 8)), inv);
                    // The default rounding mode: to nearest, ties to even.
                    _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(f), lo), hi)
                });
                let ab = _mm256_packs_epi32(v[0], v[1]);
                let cd = _mm256_packs_epi32(v[2], v[3]);
                let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order);
                _mm256_storeu_si256(q.as_mut_ptr().add(c * 32) as *mut _, bytes);
            }
            d
        }
    }

    /// 6-bit quants, as in the AVX-512 kernel.
    #[inline(always)]
    unsafe fn six(lo: __m256i, hi: __m256i, low4: __m256i, high2: __m256i) -> __m256i {
        unsafe { _mm256_or_si256(_mm256_and_si256(lo, low4), _mm256_and_si256(hi, high2)) }
    }

    /// 4 input bytes at `p`, broadcast to every lane.
    #[inline(always)]
    unsafe fn bcast4(p: *const i8) -> __m256i {
        unsafe { _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32)) }
    }

    /// 8 f16 values at `p` as 8 floats.
    #[inline(always)]
    unsafe fn halfs_to_ps(p: *const u16) -> __m256 {
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const _)) }
    }

    /// 8 bytes at `p` as 8 floats (`signed` or not).
    #[inline(always)]
    unsafe fn bytes_to_ps<const SIGNED: bool>(p: *const u8) -> __m256 {
        unsafe {
            let b = _mm_loadl_epi64(p as *const _);
            _mm256_cvtepi32_ps(if SIGNED {
                _mm256_cvtepi8_epi32(b)
            } else {
                _mm256_cvtepu8_epi32(b)
            })
        }
    }

    #[inline(always)]
    unsafe fn q4_block<const R: usize>(
        t: &Q4Tile,
        half: usize,
        qs: &[*const i8; R],
        sums32_pairs: &[*const i32; R],
        dx: &[f32; R],
        acc: &mut [__m256; R],
    ) {
        unsafe {
            let nibble = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let mut facc = [_mm256_setzero_ps(); R];
            for sub in 0..8 {
                let mut pairs = [_mm256_setzero_si256(); R];
                for g4 in 0..4 {
                    let g = sub * 4 + g4;
                    let wq = _mm256_loadu_si256(t.qs.as_ptr().add(g * 64 + half * 32) as *const _);
                    let lo = _mm256_and_si256(wq, nibble);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(wq, 4), nibble);
                    for i in 0..R {
                        let a = _mm256_maddubs_epi16(lo, bcast4(qs[i].add(g * 8)));
                        let b = _mm256_maddubs_epi16(hi, bcast4(qs[i].add(g * 8 + 4)));
                        pairs[i] = _mm256_add_epi16(pairs[i], _mm256_add_epi16(a, b));
                    }
                }
                let sc = bytes_to_ps::<false>(t.scales[sub].as_ptr().add(half * 8));
                for i in 0..R {
                    let isum = _mm256_madd_epi16(pairs[i], ones);
                    facc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), sc, facc[i]);
                }
            }
            let mut imin = [_mm256_setzero_si256(); R];
            for p in 0..4 {
                let mins = _mm256_cvtepu8_epi16(_mm_loadu_si128(
                    t.mins[p].as_ptr().add(half * 16) as *const _
                ));
                for i in 0..R {
                    let s = _mm256_set1_epi32(*sums32_pairs[i].add(p));
                    imin[i] = _mm256_add_epi32(imin[i], _mm256_madd_epi16(mins, s));
                }
            }
            let d = halfs_to_ps(t.d.as_ptr().add(half * 8));
            let dmin = halfs_to_ps(t.dmin.as_ptr().add(half * 8));
            for i in 0..R {
                let dxi = _mm256_set1_ps(dx[i]);
                acc[i] = _mm256_fmadd_ps(facc[i], _mm256_mul_ps(d, dxi), acc[i]);
                acc[i] = _mm256_fnmadd_ps(
                    _mm256_cvtepi32_ps(imin[i]),
                    _mm256_mul_ps(dmin, dxi),
                    acc[i],
                );
            }
        }
    }

    #[inline(always)]
    unsafe fn q6_block<const R: usize>(
        t: &Q6Tile,
        half: usize,
        qs: &[*const i8; R],
        sums16: &[*const i32; R],
        dx: &[f32; R],
        acc: &mut [__m256; R],
    ) {
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let (low4, high2) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
            let mut facc = [_mm256_setzero_ps(); R];
            for sub in 0..16 {
                // As in the AVX-512 kernel, on this half's 8 rows.
                let at = |offset: usize| offset + half * 32;
                let l0 = _mm256_loadu_si256(t.ql.as_ptr().add(at(sub * 128)) as *const _);
                let l1 = _mm256_loadu_si256(t.ql.as_ptr().add(at(sub * 128 + 64)) as *const _);
                let h = _mm256_loadu_si256(t.qh.as_ptr().add(at(sub * 64)) as *const _);
                let groups = [
                    six(l0, _mm256_slli_epi16::<4>(h), low4, high2),
                    six(
                        _mm256_srli_epi16::<4>(l0),
                        _mm256_slli_epi16::<2>(h),
                        low4,
                        high2,
                    ),
                    six(l1, h, low4, high2),
                    six(
                        _mm256_srli_epi16::<4>(l1),
                        _mm256_srli_epi16::<2>(h),
                        low4,
                        high2,
                    ),
                ];
                // Starting at -32 x the inputs' sum, as in the AVX-512 kernel.
                let mut isum = [_mm256_setzero_si256(); R];
                for i in 0..R {
                    isum[i] = _mm256_set1_epi32(-32 * *sums16[i].add(sub));
                }
                for g2 in 0..2 {
                    let g = sub * 4 + g2 * 2;
                    let (w0, w1) = (groups[g2 * 2], groups[g2 * 2 + 1]);
                    for i in 0..R {
                        let a = _mm256_maddubs_epi16(w0, bcast4(qs[i].add(g * 4)));
                        let b = _mm256_maddubs_epi16(w1, bcast4(qs[i].add(g * 4 + 4)));
                        let pair = _mm256_madd_epi16(_mm256_add_epi16(a, b), ones);
                        isum[i] = _mm256_add_epi32(isum[i], pair);
                    }
                }
                let sc = bytes_to_ps::<true>(t.scales[sub].as_ptr().add(half * 8) as *const u8);
                for i in 0..R {
                    facc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i]), sc, facc[i]);
                }
            }
            let d = halfs_to_ps(t.d.as_ptr().add(half * 8));
            for i in 0..R {
                acc[i] = _mm256_fmadd_ps(facc[i], _mm256_mul_ps(d, _mm256_set1_ps(dx[i])), acc[i]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::kernel_not_run;

    /// Every kernel this CPU runs (an AVX-512 CPU runs the AVX2 ones too); names the ones
    /// it cannot run. Without either, K-quant matrices stay on candle's portable kernels
    /// (`from_qtensor` is not called), and what runs here anyway is the tiles' layout and
    /// the scalar input quantization, the references the kernels are held to.
    fn runnable(test: &str) -> Vec<Isa> {
        let all = match isa() {
            Some(Isa::Avx512) => vec![Isa::Avx512, Isa::Avx2],
            Some(Isa::Avx2) => vec![Isa::Avx2],
            None => vec![],
        };
        if !all.contains(&Isa::Avx512) {
            kernel_not_run(
                test,
                "K-quant AVX-512 VNNI",
                "no avx512f, avx512bw or avx512vnni",
            );
        }
        if !all.contains(&Isa::Avx2) {
            kernel_not_run(test, "K-quant AVX2", "no avx2, fma or f16c");
        }
        all
    }

    fn random_q(dtype: GgmlDType, n: usize, k: usize, seed: u64) -> QTensor {
        let dense = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        // Shift by the seed so different calls give different weights.
        let dense = (dense + seed as f64 * 0.01).unwrap();
        QTensor::quantize(&dense, dtype).unwrap()
    }

    #[test]
    fn tiles_hold_exactly_the_blocks_values() {
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let q = random_q(dtype, 32, 512, 1);
            let want = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
            let want = want.to_vec1::<f32>().unwrap();
            let m = KQuantMatrix::from_qtensor(&q).unwrap().unwrap();
            let got = m.dequantize();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "{dtype:?} [{i}]: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn vector_and_scalar_input_quantization_agree() {
        let isas = runnable("vector_and_scalar_input_quantization_agree");
        let mut x: Vec<f32> = Tensor::randn(0f32, 3.0, QK, &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        // Exact ties and the extremes.
        x[0] = 127.0;
        x[1] = -0.5;
        x[2] = 2.5;
        x[3] = -126.5;
        let zeros = [0f32; QK];
        for isa in isas {
            let (mut a, mut b) = ([0i8; QK], [0i8; QK]);
            let da = quantize_block(&x, &mut a);
            let db = quantize_block_on(isa, &x, &mut b);
            assert_eq!((da, a), (db, b), "{isa:?}");
            assert_eq!(quantize_block_on(isa, &zeros, &mut b), 0.0);
            assert!(b.iter().all(|&v| v == 0));
        }
    }

    #[test]
    fn other_types_and_shapes_are_declined() {
        let q8 = random_q(GgmlDType::Q8_0, 32, 256, 0);
        assert!(KQuantMatrix::from_qtensor(&q8).unwrap().is_none());
        let narrow = random_q(GgmlDType::Q4K, 24, 256, 0);
        assert!(KQuantMatrix::from_qtensor(&narrow).unwrap().is_none());
    }

    #[test]
    fn products_match_the_dequantized_weights_and_ignore_batching() {
        for isa in runnable("products_match_the_dequantized_weights_and_ignore_batching") {
            products_match_on(isa);
        }
    }

    fn products_match_on(isa: Isa) {
        let forward = |w: &KQuantMatrix, x: &Tensor| {
            KQuantMatrix::forward_many_on(isa, x, &[w])
                .unwrap()
                .remove(0)
        };
        for (dtype, n, k) in [
            (GgmlDType::Q4K, 48, 768),
            (GgmlDType::Q6K, 48, 768),
            (GgmlDType::Q4K, 768, 256),
            (GgmlDType::Q4K, 256, 768),
            (GgmlDType::Q4K, 512, 256),
        ] {
            let q = random_q(dtype, n, k, 2);
            let w = KQuantMatrix::from_qtensor(&q).unwrap().unwrap();
            let dense = q.dequantize(&Device::Cpu).unwrap();
            // Several passes of a row block (8 rows; 4 on AVX2), the last one short.
            for m in [1usize, 3, 8, 12, 13, 16, 21] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
                let got = forward(&w, &x).to_vec2::<f32>().unwrap();
                // The reference sees the same 8-bit inputs, so only float rounding differs.
                let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let qx = QuantizedInput::new(isa, &xs, m, k);
                let xq: Vec<f32> =
                    qx.q.iter()
                        .enumerate()
                        .map(|(i, &v)| qx.d[i / QK] * v as f32)
                        .collect();
                let xq = Tensor::from_vec(xq, (m, k), &Device::Cpu).unwrap();
                let want = xq
                    .matmul(&dense.t().unwrap())
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                let scale = xq
                    .abs()
                    .unwrap()
                    .matmul(&dense.abs().unwrap().t().unwrap())
                    .unwrap();
                let scale = scale.to_vec2::<f32>().unwrap();
                for ((gr, wr), sr) in got.iter().zip(&want).zip(&scale) {
                    for ((g, w), s) in gr.iter().zip(wr).zip(sr) {
                        assert!(
                            (g - w).abs() <= 1e-4 * s,
                            "{isa:?} {dtype:?} m={m}: {g} vs {w}"
                        );
                    }
                }
                // Each row alone gives the very same bits.
                for (r, gr) in got.iter().enumerate() {
                    let alone = forward(&w, &x.narrow(0, r, 1).unwrap());
                    assert_eq!(
                        &alone.to_vec2::<f32>().unwrap()[0],
                        gr,
                        "{isa:?} {dtype:?} m={m} row {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn shared_input_products_equal_separate_ones() {
        let isas = runnable("shared_input_products_equal_separate_ones");
        let a = KQuantMatrix::from_qtensor(&random_q(GgmlDType::Q4K, 512, 512, 3))
            .unwrap()
            .unwrap();
        let b = KQuantMatrix::from_qtensor(&random_q(GgmlDType::Q6K, 128, 512, 4))
            .unwrap()
            .unwrap();
        let c = KQuantMatrix::from_qtensor(&random_q(GgmlDType::Q4K, 128, 512, 5))
            .unwrap()
            .unwrap();
        let x = Tensor::randn(0f32, 1.0, (12, 512), &Device::Cpu).unwrap();
        let bad = Tensor::zeros((2, 256), candle_core::DType::F32, &Device::Cpu).unwrap();
        for isa in isas {
            let all = KQuantMatrix::forward_many_on(isa, &x, &[&a, &b, &c]).unwrap();
            for (y, w) in all.iter().zip([&a, &b, &c]) {
                let alone = KQuantMatrix::forward_many_on(isa, &x, &[w]).unwrap();
                assert_eq!(
                    y.to_vec2::<f32>().unwrap(),
                    alone[0].to_vec2::<f32>().unwrap(),
                    "{isa:?}"
                );
            }
            assert!(KQuantMatrix::forward_many_on(isa, &bad, &[&a]).is_err());
        }
    }

    /// A tensor-parallel rank multiplies its share of the input blocks and the all-reduce
    /// adds the ranks' sums; the whole product carries one sum through every block in fused
    /// multiply-adds. Same 8-bit inputs, same weights: only the rounding of the partial sums
    /// differs, by a few ulps of the terms' magnitude (`tests/tensor_parallel.rs` says where
    /// that leads).
    #[test]
    fn a_row_split_product_differs_only_in_rounding() {
        for isa in runnable("a_row_split_product_differs_only_in_rounding") {
            for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
                let (n, k, m) = (64, 1024, 5);
                let dense =
                    (Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap() + 0.1).unwrap();
                let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
                let product = |from: usize, len: usize| {
                    let w = dense.narrow(1, from, len).unwrap();
                    let w = KQuantMatrix::from_qtensor(&QTensor::quantize(&w, dtype).unwrap())
                        .unwrap()
                        .unwrap();
                    let x = x.narrow(1, from, len).unwrap().contiguous().unwrap();
                    KQuantMatrix::forward_many_on(isa, &x, &[&w]).unwrap()[0]
                        .to_vec2::<f32>()
                        .unwrap()
                };
                let whole = product(0, k);
                let (left, right) = (product(0, 512), product(512, 512));
                let scale = x
                    .abs()
                    .unwrap()
                    .matmul(&dense.abs().unwrap().t().unwrap())
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                let mut differ = 0;
                for r in 0..m {
                    for c in 0..n {
                        let split = left[r][c] + right[r][c];
                        let gap = (whole[r][c] - split).abs();
                        assert!(
                            gap <= 4.0 * f32::EPSILON * scale[r][c],
                            "{isa:?} {dtype:?} ({r}, {c}): {} vs {split}",
                            whole[r][c]
                        );
                        differ += usize::from(gap > 0.0);
                    }
                }
                println!(
                    "{isa:?} {dtype:?}: {differ} of {} outputs differ in their last bits",
                    m * n
                );
            }
        }
    }

    #[test]
    fn instruction_sets_give_the_same_bits() {
        // Needs both kernels; `runnable` names the one missing where it is not so.
        let isas = runnable("instruction_sets_give_the_same_bits");
        if isas.len() < 2 {
            return;
        }
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let w = KQuantMatrix::from_qtensor(&random_q(dtype, 64, 768, 6))
                .unwrap()
                .unwrap();
            for m in [11, 19] {
                let x = Tensor::randn(0f32, 2.0, (m, 768), &Device::Cpu).unwrap();
                let outs: Vec<Vec<Vec<f32>>> = isas
                    .iter()
                    .map(|&isa| {
                        KQuantMatrix::forward_many_on(isa, &x, &[&w]).unwrap()[0]
                            .to_vec2()
                            .unwrap()
                    })
                    .collect();
                assert_eq!(outs[0], outs[1], "{dtype:?} m={m}");
            }
        }
    }

    /// The kernels' numbers are pinned: a change for speed must give the very same bits
    /// (the target's outputs, and so every exactness test's reference, depend on them). A
    /// deliberate change of the arithmetic changes this digest, and says so here.
    #[test]
    fn the_products_bits_are_pinned() {
        const DIGEST: u64 = 0x1ec4_8df6_89f7_4133;
        let det = |n: usize, k: usize, p: usize| -> Vec<f32> {
            (0..n * k)
                .map(|i| (i * p % 2003) as f32 / 1000.0 - 1.0)
                .collect()
        };
        for isa in runnable("the_products_bits_are_pinned") {
            // FNV-1a over every output's bits.
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for (dtype, n, k) in [(GgmlDType::Q6K, 48, 768), (GgmlDType::Q4K, 48, 768)] {
                let dense = Tensor::from_vec(det(n, k, 104_729), (n, k), &Device::Cpu).unwrap();
                let q = QTensor::quantize(&dense, dtype).unwrap();
                let w = KQuantMatrix::from_qtensor(&q).unwrap().unwrap();
                for m in [1usize, 3, 8, 13, 21] {
                    let x = Tensor::from_vec(det(m, k, 7919), (m, k), &Device::Cpu).unwrap();
                    let got = KQuantMatrix::forward_many_on(isa, &x, &[&w])
                        .unwrap()
                        .remove(0);
                    for v in got.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
                        for byte in v.to_bits().to_le_bytes() {
                            h = (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
                        }
                    }
                }
            }
            assert_eq!(h, DIGEST, "{isa:?}: the kernel's numbers changed ({h:#x})");
        }
    }
}
