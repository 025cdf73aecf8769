//! Batch-invariant attention on CPU: every query row is reduced in one fixed order over
//! the keys it sees, so its output never depends on how many other rows share the forward.
//!
//! Why: plain greedy decoding forwards one row per step while speculative strategies verify
//! many rows at once. candle's f32 matmul picks kernels by shape (a 3-row and a 15-row
//! `q @ k^T` over the same keys round differently, by about 1e-5), and a difference that
//! small flips the argmax at a near-tie, so "exactly what the target alone produces" would
//! hold only up to rounding.

use crate::error::{EngineError, Result};
use crate::mask::Visibility;
use candle_core::{Layout, Storage, Tensor};

/// Lanes of the dot-product accumulator: a fixed split, so the order of additions is the
/// same on every machine and for every row.
const LANES: usize = 8;

/// Read access to a `(1, heads, len, d)` f32 tensor on CPU whose last dimension is
/// contiguous (a cache view narrowed from a larger buffer qualifies).
struct Rows<'a> {
    data: &'a [f32],
    start: usize,
    head_stride: usize,
    row_stride: usize,
    d: usize,
}

impl<'a> Rows<'a> {
    fn new(storage: &'a Storage, layout: &Layout) -> Option<Self> {
        let Storage::Cpu(cpu) = storage else {
            return None;
        };
        let data = cpu.as_slice::<f32>().ok()?;
        let dims = layout.dims();
        let stride = layout.stride();
        if dims.len() != 4 || dims[0] != 1 || stride[3] != 1 {
            return None;
        }
        Some(Self {
            data,
            start: layout.start_offset(),
            head_stride: stride[1],
            row_stride: stride[2],
            d: dims[3],
        })
    }

    fn row(&self, head: usize, i: usize) -> &[f32] {
        let at = self.start + head * self.head_stride + i * self.row_stride;
        &self.data[at..at + self.d]
    }

    /// Asks for row `i` of `head` to be brought into cache (it need not exist: a
    /// prefetch never faults).
    #[inline(always)]
    fn prefetch(&self, head: usize, i: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            use core::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            let at = self.start + head * self.head_stride + i * self.row_stride;
            let first = self.data.as_ptr().wrapping_add(at) as usize;
            let mut line = first & !63;
            while line < first + self.d * 4 {
                // SAFETY: prefetching any address is allowed; it never faults.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(line as *const i8) };
                line += 64;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (head, i);
    }
}

/// Keys ahead of the one being read whose key rows are asked for early: a decode step
/// reads the whole cache once per layer, too little at a time for the hardware prefetcher
/// of the VM in `results/engine-bench.md` to keep up. On a 2-core Zen 5 VM (`ab` timing
/// of 28 layers' decode attention at 1200 keys) 16 rows ahead (8 KiB at `d` 128) took
/// 2.0-2.2 ms, 4 rows 2.4, 64 rows 2.3-2.5.
const PREFETCH_ROWS: usize = 16;

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = a.len() / LANES * LANES;
    for (x, y) in a[..chunks]
        .chunks_exact(LANES)
        .zip(b[..chunks].chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (x, y) in a[chunks..].iter().zip(&b[chunks..]) {
        sum += x * y;
    }
    sum
}

/// The keys and values of one key/value head.
#[derive(Clone, Copy)]
struct KvHead<'a> {
    k: &'a Rows<'a>,
    v: &'a Rows<'a>,
    head: usize,
}

/// Scratch space of one worker, reused across its cells.
#[derive(Default)]
struct Scratch {
    /// The key positions the cell's query row sees, in order.
    keys: Vec<usize>,
    /// Per query head of the cell, its scores over `keys` (then their softmax weights).
    scores: Vec<f32>,
    /// Per query head, its largest score and the sum of its softmax numerators.
    maxes: Vec<f32>,
    totals: Vec<f32>,
}

impl Scratch {
    /// Head `g`'s score for key `jj` (of `t`), and its largest so far.
    #[inline(always)]
    fn record(&mut self, g: usize, jj: usize, t: usize, score: f32) {
        self.scores[g * t + jj] = score;
        self.maxes[g] = self.maxes[g].max(score);
    }
}

/// `e^x` for the softmax's `x <= 0` (a score less the row's largest), in plain `f32`
/// operations that a vector of lanes repeats exactly ([`avx2::exp_neg`]), so the weights
/// are the same bits with and without SIMD and on every machine (a C library's `expf`
/// may differ between CPUs and versions). `x = n ln 2 + r` with `n` an integer and
/// `|r| <= ln 2 / 2`; `e^r` by its Taylor series to `r^7 / 7!` (the next term is about
/// 5e-9, a tenth of an `f32` step); `2^n` built in the exponent bits. Below -87 (`e^-87`,
/// about 1.6e-38, near the least normal `f32`) the weight is `e^-87`: next to the row's
/// largest weight, 1, it adds nothing.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    let x = x.max(EXP_FLOOR);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = EXP_TAYLOR[0];
    for c in &EXP_TAYLOR[1..] {
        p = p * r + c;
    }
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Where [`exp_neg`] stops going down.
const EXP_FLOOR: f32 = -87.0;
/// ln 2 in two parts: `n * LN2_HI` is exact for the `n` that occur (its 9 significant
/// bits times at most 126), `LN2_LO` the rest (Cody and Waite's reduction).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// `1/k!` from `k = 7` down to 0: Horner's order.
const EXP_TAYLOR: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// Query heads that share one key/value head, for one query row: each head's
/// softmax-weighted sum of the values into its `d` values of `dst` (zeroed), the heads one
/// after another. Every key and value row is read once for all the heads, while it is in
/// cache; each head's arithmetic is what it would be alone (the same operations in the
/// same order), so how heads are grouped never changes a bit. `simd` runs the passes on
/// AVX2 (which the CPU must have): the same operations, 8 lanes at once.
#[inline(always)]
fn attend_heads(
    simd: bool,
    queries: &[&[f32]],
    kv: &KvHead<'_>,
    scale: f32,
    s: &mut Scratch,
    dst: &mut [f32],
) {
    let (heads, t, d) = (queries.len(), s.keys.len(), kv.k.d);
    s.scores.clear();
    s.scores.resize(heads * t, 0.0);
    s.maxes.clear();
    s.maxes.resize(heads, f32::NEG_INFINITY);
    let simd = cfg!(target_arch = "x86_64") && simd && d.is_multiple_of(LANES);
    if simd {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the callers' promise that the CPU has AVX2; `d` is a multiple of 8.
        unsafe {
            avx2::scores(queries, kv, scale, s)
        };
    } else {
        scores(queries, kv, scale, s);
    }
    // The softmax numerators, in place, and their sum in key order.
    s.totals.clear();
    for g in 0..heads {
        let max = s.maxes[g];
        let row = &mut s.scores[g * t..(g + 1) * t];
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: as above.
            done = unsafe { avx2::exps(row, max) };
        }
        for x in &mut row[done..] {
            *x = exp_neg(*x - max);
        }
        s.totals.push(row.iter().fold(0f32, |a, &w| a + w));
    }
    if simd {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; `dst` holds `heads * d` values.
        unsafe {
            avx2::values(heads, kv, s, dst)
        };
    } else {
        values(heads, kv, s, dst);
    }
    for g in 0..heads {
        let inv = 1.0 / s.totals[g];
        for o in &mut dst[g * d..(g + 1) * d] {
            *o *= inv;
        }
    }
}

/// Every head's scaled dot product with every key it sees, into `s.scores` (head-major),
/// and each head's largest into `s.maxes`.
fn scores(queries: &[&[f32]], kv: &KvHead<'_>, scale: f32, s: &mut Scratch) {
    let t = s.keys.len();
    for jj in 0..t {
        if let Some(&ahead) = s.keys.get(jj + PREFETCH_ROWS) {
            kv.k.prefetch(kv.head, ahead);
        }
        let key = kv.k.row(kv.head, s.keys[jj]);
        for (g, query) in queries.iter().enumerate() {
            s.record(g, jj, t, dot(query, key) * scale);
        }
    }
}

/// Every head's values weighted by its softmax numerators (`s.scores`), added into `dst`
/// in key order.
fn values(heads: usize, kv: &KvHead<'_>, s: &Scratch, dst: &mut [f32]) {
    let (t, d) = (s.keys.len(), kv.v.d);
    for jj in 0..t {
        if let Some(&ahead) = s.keys.get(jj + PREFETCH_ROWS) {
            kv.v.prefetch(kv.head, ahead);
        }
        let value = kv.v.row(kv.head, s.keys[jj]);
        for g in 0..heads {
            let w = s.scores[g * t + jj];
            for (o, x) in dst[g * d..(g + 1) * d].iter_mut().zip(value) {
                *o += w * x;
            }
        }
    }
}

/// The passes of [`attend_heads`] on AVX2, for `d` a multiple of 8: the portable code's
/// operations in its order (each lane of [`dot`]'s accumulator in its own lane, products
/// and sums rounded separately, the lanes summed in order; [`exp_neg`] lane by lane; each
/// output value summed in key order).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use core::arch::x86_64::*;

    /// Heads whose dot products with one key run side by side (one accumulator each).
    const HEADS: usize = 8;
    /// Keys whose value rows are added into registers holding part of a head's output
    /// before the registers go back to memory.
    const KEY_BLOCK: usize = 32;

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn scores(queries: &[&[f32]], kv: &KvHead<'_>, scale: f32, s: &mut Scratch) {
        debug_assert!(kv.k.d.is_multiple_of(LANES) && queries.iter().all(|q| q.len() == kv.k.d));
        for (first, block) in queries.chunks(HEADS).enumerate() {
            let first = first * HEADS;
            // SAFETY (each arm): the caller's promise, passed on.
            unsafe {
                match block.len() {
                    1 => scores_of::<1>(block, first, kv, scale, s),
                    2 => scores_of::<2>(block, first, kv, scale, s),
                    3 => scores_of::<3>(block, first, kv, scale, s),
                    4 => scores_of::<4>(block, first, kv, scale, s),
                    5 => scores_of::<5>(block, first, kv, scale, s),
                    6 => scores_of::<6>(block, first, kv, scale, s),
                    7 => scores_of::<7>(block, first, kv, scale, s),
                    _ => scores_of::<8>(block, first, kv, scale, s),
                }
            }
        }
    }

    /// [`scores`] for the `H` heads `block`, the heads `first..first + H` of the cell: one
    /// accumulator register each, over every key.
    #[inline(always)]
    unsafe fn scores_of<const H: usize>(
        block: &[&[f32]],
        first: usize,
        kv: &KvHead<'_>,
        scale: f32,
        s: &mut Scratch,
    ) {
        let (t, d) = (s.keys.len(), kv.k.d);
        let q: [*const f32; H] = std::array::from_fn(|i| block[i].as_ptr());
        for jj in 0..t {
            if let Some(&ahead) = s.keys.get(jj + PREFETCH_ROWS) {
                kv.k.prefetch(kv.head, ahead);
            }
            let key = kv.k.row(kv.head, s.keys[jj]).as_ptr();
            // SAFETY: the caller runs on a CPU with AVX2.
            let mut acc = [unsafe { _mm256_setzero_ps() }; H];
            for c in (0..d).step_by(LANES) {
                // SAFETY: `c + 8 <= d`, the length of the key and of every query.
                unsafe {
                    let k = _mm256_loadu_ps(key.add(c));
                    for i in 0..H {
                        let p = _mm256_mul_ps(_mm256_loadu_ps(q[i].add(c)), k);
                        acc[i] = _mm256_add_ps(acc[i], p);
                    }
                }
            }
            for (i, a) in acc.iter().enumerate() {
                let mut lanes = [0f32; LANES];
                // SAFETY: `lanes` holds 8 floats.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *a) };
                s.record(first + i, jj, t, lanes.iter().sum::<f32>() * scale);
            }
        }
    }

    /// [`exp_neg`] on 8 lanes.
    #[inline(always)]
    unsafe fn exp_neg(x: __m256) -> __m256 {
        unsafe {
            let x = _mm256_max_ps(x, _mm256_set1_ps(EXP_FLOOR));
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            );
            let r = _mm256_sub_ps(
                _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(LN2_HI))),
                _mm256_mul_ps(n, _mm256_set1_ps(LN2_LO)),
            );
            let mut p = _mm256_set1_ps(EXP_TAYLOR[0]);
            for c in &EXP_TAYLOR[1..] {
                p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(*c));
            }
            let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_cvtps_epi32(n),
                _mm256_set1_epi32(127),
            ));
            _mm256_mul_ps(p, _mm256_castsi256_ps(bits))
        }
    }

    /// `e^(x - max)` in place for the leading multiple of 8 of `row`; returns how many.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn exps(row: &mut [f32], max: f32) -> usize {
        let done = row.len() / LANES * LANES;
        let m = _mm256_set1_ps(max);
        for c in (0..done).step_by(LANES) {
            // SAFETY: `c + 8 <= done <= row.len()`.
            unsafe {
                let at = row.as_mut_ptr().add(c);
                _mm256_storeu_ps(at, exp_neg(_mm256_sub_ps(_mm256_loadu_ps(at), m)));
            }
        }
        done
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn values(heads: usize, kv: &KvHead<'_>, s: &Scratch, dst: &mut [f32]) {
        // SAFETY (each arm): the caller's promise, passed on.
        unsafe {
            match kv.v.d.is_multiple_of(REGS * LANES) {
                true => values_in::<REGS>(heads, kv, s, dst),
                false => values_in::<1>(heads, kv, s, dst),
            }
        }
    }

    /// Registers of a head's output that [`values`] keeps while it adds a block's values.
    const REGS: usize = 8;

    /// [`values`] with `W` registers of output at a time (`d` a multiple of `8 W`).
    #[inline(always)]
    unsafe fn values_in<const W: usize>(
        heads: usize,
        kv: &KvHead<'_>,
        s: &Scratch,
        dst: &mut [f32],
    ) {
        let (t, d) = (s.keys.len(), kv.v.d);
        debug_assert!(d.is_multiple_of(W * LANES) && dst.len() == heads * d);
        let out = dst.as_mut_ptr();
        for block in (0..t).step_by(KEY_BLOCK) {
            let keys = &s.keys[block..t.min(block + KEY_BLOCK)];
            // The next block's rows are asked for while this one is added, a share before
            // each head's pass, so that the requests do not queue up at once.
            let next = &s.keys[block + keys.len()..t.min(block + 2 * KEY_BLOCK)];
            let share = next.len().div_ceil(heads).max(1);
            for g in 0..heads {
                for &j in next.iter().skip(g * share).take(share) {
                    kv.v.prefetch(kv.head, j);
                }
                let weights = &s.scores[g * t + block..g * t + block + keys.len()];
                // `W` registers of the head's output at a time, over every key of the
                // block; each value still sums its terms in key order.
                for c0 in (0..d).step_by(W * LANES) {
                    // SAFETY: `g * d + c0 + 8 W <= heads * d`; every value row holds `d`
                    // values.
                    unsafe {
                        let o = out.add(g * d + c0);
                        let mut acc = [_mm256_setzero_ps(); W];
                        for (r, a) in acc.iter_mut().enumerate() {
                            *a = _mm256_loadu_ps(o.add(r * LANES));
                        }
                        for (&j, &w) in keys.iter().zip(weights) {
                            let v = kv.v.row(kv.head, j).as_ptr().add(c0);
                            let w = _mm256_set1_ps(w);
                            for (r, a) in acc.iter_mut().enumerate() {
                                let x = _mm256_mul_ps(w, _mm256_loadu_ps(v.add(r * LANES)));
                                *a = _mm256_add_ps(*a, x);
                            }
                        }
                        for (r, a) in acc.iter().enumerate() {
                            _mm256_storeu_ps(o.add(r * LANES), *a);
                        }
                    }
                }
            }
        }
    }
}

/// Attention of `n` new queries `q: (1, hq, n, d)` against a sequence's keys and values
/// `(1, hkv, past + n, d)`: query row `i` sees every cached entry and the new entries that
/// `visibility` lets it see. Returns `(n, hq * d)`.
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    visibility: &Visibility,
    scale: f32,
) -> Result<Tensor> {
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    let avx2 = false;
    let pool = candle_core::utils::barrier_pool();
    attend_on(avx2, pool.n_workers() + 1, q, k, v, visibility, scale)
}

/// [`attend`] with the rows compiled for AVX2 (`avx2`, which this CPU must run) or not,
/// its cells shared among `threads` of candle's worker pool.
fn attend_on(
    avx2: bool,
    threads: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    visibility: &Visibility,
    scale: f32,
) -> Result<Tensor> {
    let (_, hq, n, d) = q.dims4()?;
    let (_, hkv, t, _) = k.dims4()?;
    let past = t.checked_sub(n).ok_or_else(|| {
        EngineError::invalid(format!("attention: {n} new rows but only {t} keys"))
    })?;
    if hkv == 0 || hq % hkv != 0 {
        return Err(EngineError::invalid(format!(
            "attention: {hq} query heads do not group under {hkv} key/value heads"
        )));
    }
    let group = hq / hkv;
    let q = q.contiguous()?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Some(qr), Some(kr), Some(vr)) =
        (Rows::new(&qs, ql), Rows::new(&ks, kl), Rows::new(&vs, vl))
    else {
        return Err(EngineError::invalid(
            "attention: expected f32 CPU tensors with a contiguous last dimension",
        ));
    };
    let visible_new = visibility.dense(n);
    let mut out = vec![0f32; n * hq * d];
    // A cell is one query row's heads under one key/value head (all `group` of them, or a
    // part when there are fewer (row, key/value head) pairs than threads, as for one decode
    // row of a tensor-parallel shard). The cells are dealt out in turn to one share per
    // thread of candle's worker pool, the one the matmuls use (its workers spin between
    // ops, so a second pool would fight them for the cores): for one row, one key/value
    // group per thread, whose rows then come from memory once; for many (a prefill, whose
    // later rows see more keys), every thread gets early and late rows alike (in
    // contiguous shares the last thread had three times the first's work). A head's
    // arithmetic is the same in any cell on any thread, so the output is too.
    let threads = threads.max(1);
    let parts = match n * hkv < threads {
        true => threads.div_ceil(n * hkv).min(group),
        false => 1,
    };
    let per_part = group.div_ceil(parts);
    let cells = n * hkv * parts;
    let shares = threads.min(cells);
    let dst_base = out.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(shares, |mine| {
        let mut s = Scratch::default();
        let mut queries: Vec<&[f32]> = Vec::with_capacity(per_part);
        for cell in mine.flat_map(|p| (p..cells).step_by(shares)) {
            let (i, h, part) = (cell / (hkv * parts), cell / parts % hkv, cell % parts);
            let first = h * group + part * per_part;
            let heads = per_part.min((h + 1) * group - first.min((h + 1) * group));
            if heads == 0 {
                continue;
            }
            // SAFETY: the heads `first..first + heads` of row `i` are `heads * d` values at
            // `(i * hq + first) * d` inside `out`, which outlives the pool call; each
            // (row, head) belongs to exactly one cell and each cell to one share.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    (dst_base as *mut f32).add((i * hq + first) * d),
                    heads * d,
                )
            };
            let kv = KvHead {
                k: &kr,
                v: &vr,
                head: h,
            };
            queries.clear();
            queries.extend((first..first + heads).map(|g| qr.row(g, i)));
            let row = &visible_new[i * n..(i + 1) * n];
            s.keys.clear();
            s.keys.extend(0..past);
            s.keys.extend((0..n).filter(|&j| row[j]).map(|j| past + j));
            attend_heads(avx2, &queries, &kv, scale, &mut s, dst);
        }
    });
    drop((qs, ks, vs));
    Ok(Tensor::from_vec(out, (n, hq * d), q.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn tensor(shape: (usize, usize, usize, usize), seed: u32) -> Tensor {
        let len = shape.0 * shape.1 * shape.2 * shape.3;
        let data: Vec<f32> = (0..len as u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// The same rows through softmax(q k^T) v with candle ops, for reference.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, vis: &Visibility, scale: f64) -> Tensor {
        let (_, hq, n, d) = q.dims4().unwrap();
        let (_, hkv, t, _) = k.dims4().unwrap();
        let g = hq / hkv;
        let mask = vis
            .additive_mask(n, t - n)
            .unwrap_or_else(|| vec![0.0; n * t]);
        let mask = Tensor::from_vec(mask, (n, t), &Device::Cpu).unwrap();
        let qg = q.reshape((1, hkv, g * n, d)).unwrap();
        let s = (qg.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let s = s
            .reshape((1, hkv, g, n, t))
            .unwrap()
            .broadcast_add(&mask)
            .unwrap()
            .reshape((1, hkv, g * n, t))
            .unwrap();
        let p = candle_nn::ops::softmax_last_dim(&s).unwrap();
        p.matmul(&v.contiguous().unwrap())
            .unwrap()
            .reshape((1, hq, n, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((n, hq * d))
            .unwrap()
    }

    /// Whether the AVX2 rows can run here, naming them where not.
    fn avx2_runs(test: &str) -> bool {
        #[cfg(target_arch = "x86_64")]
        let yes = std::arch::is_x86_feature_detected!("avx2");
        #[cfg(not(target_arch = "x86_64"))]
        let yes = false;
        if !yes {
            crate::testing::kernel_not_run(test, "attention AVX2", "no avx2");
        }
        yes
    }

    /// The AVX2 build of a row runs the portable code's operations in the same order, so
    /// both give the same bits: machines with and without AVX2 verify alike.
    #[test]
    fn the_avx2_rows_give_the_portable_bits() {
        if !avx2_runs("the_avx2_rows_give_the_portable_bits") {
            return;
        }
        // Value rows a register at a time (d 24) and 8 at a time (d 128); groups of 2 heads
        // and of 10 (a block of 8 heads, then 2); keys in one block and in several.
        for (hq, hkv, d, past, n) in [(4, 2, 24, 13, 6), (20, 2, 128, 70, 6)] {
            let (k, v) = (
                tensor((1, hkv, past + n, d), 4),
                tensor((1, hkv, past + n, d), 5),
            );
            let q = tensor((1, hq, n, d), 6);
            for vis in [
                Visibility::Causal,
                Visibility::Tree(vec![-1, 0, 1, 0, 3, 3]),
            ] {
                let fast = attend_on(true, 2, &q, &k, &v, &vis, 0.2).unwrap();
                let plain = attend_on(false, 2, &q, &k, &v, &vis, 0.2).unwrap();
                assert_eq!(
                    fast.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    plain.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    "d {d}, {vis:?}"
                );
            }
        }
    }

    #[test]
    fn matches_softmax_attention_and_each_row_alone() {
        let (hq, hkv, d, past, n) = (6, 2, 20, 9, 5);
        // Keys and values as views into a larger buffer, like the cache hands them out.
        let kbuf = tensor((1, hkv, 32, d), 1);
        let vbuf = tensor((1, hkv, 32, d), 2);
        let (k, v) = (
            kbuf.narrow(2, 0, past + n).unwrap(),
            vbuf.narrow(2, 0, past + n).unwrap(),
        );
        let q = tensor((1, hq, n, d), 3);
        let scale = 1.0 / (d as f64).sqrt();
        let avx2 = avx2_runs("matches_softmax_attention_and_each_row_alone");
        for (avx2, vis) in [false, true]
            .into_iter()
            .filter(|&a| !a || avx2)
            .flat_map(|a| {
                [
                    (a, Visibility::Causal),
                    (a, Visibility::Tree(vec![-1, 0, 0, 2, -1])),
                ]
            })
        {
            let got = attend_on(avx2, 2, &q, &k, &v, &vis, scale as f32).unwrap();
            let want = reference(&q, &k, &v, &vis, scale);
            let diff = (&got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "avx2 {avx2} {vis:?}: {diff}");
            // Row 3 of a chain alone (its keys: the cache and new rows 0..=3) must give
            // bit for bit what it gave among five rows.
            if vis == Visibility::Causal {
                let alone = attend_on(
                    avx2,
                    2,
                    &q.narrow(2, 3, 1).unwrap(),
                    &kbuf.narrow(2, 0, past + 4).unwrap(),
                    &vbuf.narrow(2, 0, past + 4).unwrap(),
                    &Visibility::Causal,
                    scale as f32,
                )
                .unwrap();
                let row: Vec<f32> = got.get(3).unwrap().to_vec1().unwrap();
                assert_eq!(alone.get(0).unwrap().to_vec1::<f32>().unwrap(), row);
            }
        }
    }

    /// A cell's heads are computed one after another with each head's own arithmetic, so
    /// the split of a key/value group's heads into cells (all in one, as for many rows, or
    /// one head each, as for one decode row on many threads) never changes a bit.
    #[test]
    fn splitting_a_group_among_threads_keeps_every_bit() {
        let (hq, hkv, d, past) = (6, 2, 16, 11);
        for n in [1, 4] {
            let (k, v) = (
                tensor((1, hkv, past + n, d), 7),
                tensor((1, hkv, past + n, d), 8),
            );
            let q = tensor((1, hq, n, d), 9);
            let vis = match n {
                1 => Visibility::Causal,
                _ => Visibility::Tree(vec![-1, 0, 0, 1]),
            };
            let bits = |avx2, threads| {
                attend_on(avx2, threads, &q, &k, &v, &vis, 0.3)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            for avx2 in [false, true] {
                if avx2 && !avx2_runs("splitting_a_group_among_threads_keeps_every_bit") {
                    continue;
                }
                let whole = bits(avx2, 1);
                for threads in [2, 3, 5, 12, 64] {
                    assert_eq!(bits(avx2, threads), whole, "n {n}, {threads} threads");
                }
            }
        }
    }

    /// The softmax's exponential is within 2 `f32` steps of `e^x` over the range a score
    /// less the row's largest takes, its 8-lane form gives the same bits, and below the
    /// floor it stays at `e^-87`.
    #[test]
    fn exp_neg_is_accurate_and_the_same_on_every_path() {
        let xs: Vec<f32> = (0..=200_000)
            .map(|i| -(i as f32) * 87.0 / 200_000.0)
            .chain([-0.0, -1e-30, -88.0, -1e4, f32::NEG_INFINITY])
            .collect();
        let mut worst = 0f64;
        for &x in &xs {
            let got = exp_neg(x) as f64;
            let want = (x.max(EXP_FLOOR) as f64).exp();
            let step = (want as f32).next_up() as f64 - want as f32 as f64;
            worst = worst.max((got - want).abs() / step);
        }
        assert!(worst <= 2.0, "off by {worst} steps");
        assert_eq!(exp_neg(0.0), 1.0);
        #[cfg(target_arch = "x86_64")]
        if avx2_runs("exp_neg_is_accurate_and_the_same_on_every_path") {
            let mut lanes = xs.clone();
            lanes.truncate(xs.len() / LANES * LANES);
            // SAFETY: the CPU has AVX2.
            let done = unsafe { avx2::exps(&mut lanes, 0.0) };
            assert_eq!(done, lanes.len());
            for (x, y) in xs.iter().zip(&lanes) {
                assert_eq!(exp_neg(*x).to_bits(), y.to_bits(), "at {x}");
            }
        }
    }
}
