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

/// Keys ahead of the one being read whose key and value rows are asked for early: a
/// decode step reads the whole cache once per layer, too little at a time for the
/// hardware prefetcher of the VM in `results/engine-bench.md` to keep up.
const PREFETCH_ROWS: usize = 4;

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

/// One query row against the keys it sees: softmax-weighted sum of their values into `dst`.
/// `scores` is scratch space.
#[inline(always)]
fn attend_row(
    query: &[f32],
    keys: impl Iterator<Item = usize> + Clone,
    kv: &KvHead<'_>,
    scale: f32,
    scores: &mut Vec<f32>,
    dst: &mut [f32],
) {
    scores.clear();
    scores.extend(keys.clone().map(|j| {
        kv.k.prefetch(kv.head, j + PREFETCH_ROWS);
        dot(query, kv.k.row(kv.head, j)) * scale
    }));
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut total = 0f32;
    for (j, s) in keys.zip(scores.iter()) {
        kv.v.prefetch(kv.head, j + PREFETCH_ROWS);
        let w = (s - max).exp();
        total += w;
        for (o, x) in dst.iter_mut().zip(kv.v.row(kv.head, j)) {
            *o += w * x;
        }
    }
    let inv = 1.0 / total;
    for o in dst.iter_mut() {
        *o *= inv;
    }
}

/// `attend_row` compiled for AVX2: the same operations in the same order (no fused
/// multiply-add), eight lanes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_row_avx2(
    query: &[f32],
    keys: impl Iterator<Item = usize> + Clone,
    kv: &KvHead<'_>,
    scale: f32,
    scores: &mut Vec<f32>,
    dst: &mut [f32],
) {
    attend_row(query, keys, kv, scale, scores, dst)
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
    attend_on(avx2, q, k, v, visibility, scale)
}

/// [`attend`] with the rows compiled for AVX2 (`avx2`, which this CPU must run) or not.
fn attend_on(
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))] avx2: bool,
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
    // The (row, head) cells in one contiguous share per thread of candle's worker pool,
    // the one the matmuls use (its workers spin between ops, so a second pool would fight
    // them for the cores); for one row that is one key/value group per thread, whose rows
    // then come from memory once. A cell's arithmetic is the same on any thread, so the
    // output is too.
    let cells = n * hq;
    let pool = candle_core::utils::barrier_pool();
    let share = cells.div_ceil(pool.n_workers() + 1);
    let dst_base = out.as_mut_ptr() as usize;
    pool.execute_chunked(cells.div_ceil(share), |parts| {
        let mut scores = Vec::with_capacity(t);
        for cell in parts.flat_map(|p| p * share..cells.min((p + 1) * share)) {
            let (i, h) = (cell / hq, cell % hq);
            // SAFETY: `cell < n * hq`, so the `d` values at `cell * d` lie inside `out`,
            // which outlives the pool call; each cell is handed to exactly one share.
            let dst =
                unsafe { std::slice::from_raw_parts_mut((dst_base as *mut f32).add(cell * d), d) };
            let kv = KvHead {
                k: &kr,
                v: &vr,
                head: h / group,
            };
            let query = qr.row(h, i);
            let row = &visible_new[i * n..(i + 1) * n];
            let keys = (0..past).chain((0..n).filter(|&j| row[j]).map(|j| past + j));
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU supports AVX2 (the callers' promise).
                unsafe { attend_row_avx2(query, keys, &kv, scale, &mut scores, dst) };
                continue;
            }
            attend_row(query, keys, &kv, scale, &mut scores, dst);
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
        let (hq, hkv, d, past, n) = (4, 2, 24, 13, 6);
        let (k, v) = (
            tensor((1, hkv, past + n, d), 4),
            tensor((1, hkv, past + n, d), 5),
        );
        let q = tensor((1, hq, n, d), 6);
        for vis in [
            Visibility::Causal,
            Visibility::Tree(vec![-1, 0, 1, 0, 3, 3]),
        ] {
            let fast = attend_on(true, &q, &k, &v, &vis, 0.2).unwrap();
            let plain = attend_on(false, &q, &k, &v, &vis, 0.2).unwrap();
            assert_eq!(
                fast.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                plain.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{vis:?}"
            );
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
            let got = attend_on(avx2, &q, &k, &v, &vis, scale as f32).unwrap();
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
}
