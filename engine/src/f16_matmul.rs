//! `x @ w^T` for dense f16 weights on CPU (the unquantized deployment).
//!
//! candle widens nothing here: it multiplies in f16 through its generic gemm, which on
//! this CPU takes ~485 ms for one row of the 1.5B model and ~2.4 s for two
//! (`results/humaneval-f16`), so no tree of any size could pay for itself. This kernel
//! keeps the weights in f16 (half the memory traffic of f32), widens them in registers and
//! multiplies in f32. Several input rows share every weight load, so a few rows cost
//! about as much as one while the weights stream from memory.
//!
//! Every output element is one fixed sequence of operations over `k` (16 lanes, then a
//! fixed horizontal sum, then the tail in order), whatever the number of rows or how they
//! are blocked: a row's result does not depend on what it was batched with.

use crate::error::{EngineError, Result};
use candle_core::{DType, Device, Tensor};
use half::f16;
use rayon::prelude::*;

/// Weight rows per task: enough work per task to amortize scheduling, and many tasks for
/// the pool to balance.
const COLS_PER_TASK: usize = 64;
/// Input rows that share one pass over a block of weights.
const ROW_BLOCK: usize = 4;
/// Weight rows multiplied together against each input row block.
const COL_BLOCK: usize = 4;

/// A dense `(n, k)` f16 weight held in host memory.
pub struct F16Matrix {
    w: Vec<f16>,
    n: usize,
    k: usize,
}

impl F16Matrix {
    /// From an `(n, k)` tensor of any float dtype (converted to f16).
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let (n, k) = t.dims2()?;
        let w = t
            .to_dtype(DType::F16)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f16>()?;
        Ok(Self { w, n, k })
    }

    /// `x (m, k) f32 -> (m, n) f32`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.k {
            return Err(EngineError::invalid(format!(
                "f16 matmul: input width {k}, weight width {}",
                self.k
            )));
        }
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let out = self.multiply(&xs, m);
        Ok(Tensor::from_vec(out, (m, self.n), x.device())?)
    }

    /// Row-major `(m, n)` product of row-major `(m, k)` input.
    fn multiply(&self, xs: &[f32], m: usize) -> Vec<f32> {
        self.multiply_on(simd(), xs, m)
    }

    /// [`Self::multiply`] on the kernel `simd`, which this CPU must run.
    fn multiply_on(&self, simd: Simd, xs: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        // Each task fills its columns for every row, column-major, then the parts are
        // laid out row-major.
        let parts: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(COLS_PER_TASK))
            .into_par_iter()
            .map(|task| {
                let c0 = task * COLS_PER_TASK;
                let cols = COLS_PER_TASK.min(n - c0);
                let mut part = vec![0f32; cols * m];
                let w = &self.w[c0 * k..(c0 + cols) * k];
                multiply_block(simd, xs, m, k, w, cols, &mut part);
                (c0, part)
            })
            .collect();
        let mut out = vec![0f32; m * n];
        for (c0, part) in parts {
            let cols = part.len() / m.max(1);
            for c in 0..cols {
                for r in 0..m {
                    out[r * n + c0 + c] = part[c * m + r];
                }
            }
        }
        out
    }
}

/// `out[c * m + r] = x[r] . w[c]` for `cols` weight rows, on `simd`.
fn multiply_block(
    simd: Simd,
    xs: &[f32],
    m: usize,
    k: usize,
    w: &[f16],
    cols: usize,
    out: &mut [f32],
) {
    match simd {
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => {
            // SAFETY: the CPU has AVX-512F (callers pass what `simd` found, or tests what
            // `tests::runnable` found); the kernel checks its slices.
            let kernel = |r, c, x: &[f32], w: &[f16], s: &mut [f32]| unsafe {
                avx512::block(r, c, x, w, k, s)
            };
            return blocked(xs, m, k, w, cols, out, kernel);
        }
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => {
            // SAFETY: the CPU has AVX2, FMA and F16C (as above).
            let kernel = |r, c, x: &[f32], w: &[f16], s: &mut [f32]| unsafe {
                avx2::block(r, c, x, w, k, s)
            };
            return blocked(xs, m, k, w, cols, out, kernel);
        }
        _ => {}
    }
    for c in 0..cols {
        let wc = &w[c * k..(c + 1) * k];
        for r in 0..m {
            out[c * m + r] = portable_dot(&xs[r * k..(r + 1) * k], wc);
        }
    }
}

/// Walks `cols` weight rows in blocks of `COL_BLOCK` against the input in blocks of
/// `ROW_BLOCK` rows, so a block of weights is read from memory once for all the input.
/// `kernel(rows, cols, x, w, sums)` fills `sums[i * cols + j] = x[i] . w[j]`; every
/// block shape runs the same per-element sequence, so the blocking does not show in the
/// results.
fn blocked(
    xs: &[f32],
    m: usize,
    k: usize,
    w: &[f16],
    cols: usize,
    out: &mut [f32],
    kernel: impl Fn(usize, usize, &[f32], &[f16], &mut [f32]),
) {
    let mut c = 0;
    while c < cols {
        let cb = COL_BLOCK.min(cols - c);
        let wb = &w[c * k..(c + cb) * k];
        let mut r = 0;
        while r < m {
            let rb = ROW_BLOCK.min(m - r);
            let mut sums = [0f32; ROW_BLOCK * COL_BLOCK];
            kernel(rb, cb, &xs[r * k..(r + rb) * k], wb, &mut sums);
            for i in 0..rb {
                for j in 0..cb {
                    out[(c + j) * m + r + i] = sums[i * cb + j];
                }
            }
            r += rb;
        }
        c += cb;
    }
}

/// The f16 kernels: two instruction sets and the portable loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Simd {
    Avx512,
    Avx2,
    None,
}

/// Whether this CPU runs the AVX2 kernel.
#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// The widest f16 kernel this CPU runs.
fn simd() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            if is_x86_feature_detected!("avx512f") {
                Simd::Avx512
            } else if has_avx2() {
                Simd::Avx2
            } else {
                Simd::None
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Simd::None
    }
}

/// The SIMD kernels' lane layout in plain code (without fused multiply-adds: a software
/// `fma` would be far slower): 16 partial sums, a pairwise fold, then the tail.
fn portable_dot(x: &[f32], w: &[f16]) -> f32 {
    let k = x.len();
    let body = k - k % 16;
    let mut lanes = [0f32; 16];
    for (xc, wc) in x[..body].chunks_exact(16).zip(w[..body].chunks_exact(16)) {
        for l in 0..16 {
            lanes[l] += xc[l] * wc[l].to_f32();
        }
    }
    finish(lanes, &x[body..], &w[body..])
}

/// A dot product's end, the same in every kernel: the 16 lanes summed pairwise in a fixed
/// order, then the products of the `k % 16` tail added one by one.
fn finish(lanes: [f32; 16], x_tail: &[f32], w_tail: &[f16]) -> f32 {
    let mut sum = fold_lanes(lanes);
    for (x, w) in x_tail.iter().zip(w_tail) {
        sum += x * w.to_f32();
    }
    sum
}

/// Pairwise sum of 16 lanes in a fixed order.
fn fold_lanes(mut lanes: [f32; 16]) -> f32 {
    let mut width = 16;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            lanes[l] += lanes[l + width];
        }
    }
    lanes[0]
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{COL_BLOCK, ROW_BLOCK, finish};
    use core::arch::x86_64::*;
    use half::f16;

    /// `sums[i * cols + j] = x[i] . w[j]` for `rows` input rows and `cols` weight rows:
    /// whole blocks at once, a column tail one weight row at a time.
    #[target_feature(enable = "avx512f")]
    pub(super) fn block(
        rows: usize,
        cols: usize,
        x: &[f32],
        w: &[f16],
        k: usize,
        sums: &mut [f32],
    ) {
        match (rows, cols) {
            (4, COL_BLOCK) => tile::<4, COL_BLOCK>(x, w, k, sums),
            (3, COL_BLOCK) => tile::<3, COL_BLOCK>(x, w, k, sums),
            (2, COL_BLOCK) => tile::<2, COL_BLOCK>(x, w, k, sums),
            (1, COL_BLOCK) => tile::<1, COL_BLOCK>(x, w, k, sums),
            _ => {
                for j in 0..cols {
                    let mut one = [0f32; ROW_BLOCK];
                    let wj = &w[j * k..(j + 1) * k];
                    match rows {
                        4 => tile::<4, 1>(x, wj, k, &mut one),
                        3 => tile::<3, 1>(x, wj, k, &mut one),
                        2 => tile::<2, 1>(x, wj, k, &mut one),
                        _ => tile::<1, 1>(x, wj, k, &mut one),
                    }
                    for i in 0..rows {
                        sums[i * cols + j] = one[i];
                    }
                }
            }
        }
    }

    /// `sums[i * C + j] = x[i] . w[j]` for `R` input rows and `C` weight rows of width `k`.
    #[target_feature(enable = "avx512f")]
    fn tile<const R: usize, const C: usize>(x: &[f32], w: &[f16], k: usize, sums: &mut [f32]) {
        assert!(x.len() >= R * k && w.len() >= C * k && sums.len() >= R * C);
        let body = k - k % 16;
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let (xp, wp) = (x.as_ptr(), w.as_ptr() as *const u16);
        let mut at = 0;
        while at < body {
            let mut wv = [_mm512_setzero_ps(); C];
            for (j, v) in wv.iter_mut().enumerate() {
                // SAFETY: at + 16 <= body <= k, and w holds C rows of k.
                *v = _mm512_cvtph_ps(unsafe {
                    _mm256_loadu_si256(wp.add(j * k + at) as *const __m256i)
                });
            }
            for (i, row) in acc.iter_mut().enumerate() {
                // SAFETY: as above, x holds R rows of k.
                let xv = unsafe { _mm512_loadu_ps(xp.add(i * k + at)) };
                for (a, v) in row.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(xv, *v, *a);
                }
            }
            at += 16;
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, a) in row.iter().enumerate() {
                let mut lanes = [0f32; 16];
                // SAFETY: lanes has room for 16 f32.
                unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *a) };
                sums[i * C + j] = finish(
                    lanes,
                    &x[i * k + body..(i + 1) * k],
                    &w[j * k + body..(j + 1) * k],
                );
            }
        }
    }
}

/// The AVX-512 kernel's arithmetic on 8-lane registers: each 16-lane chunk is two halves
/// with their own accumulators, so every lane adds the same products in the same order
/// and the results are the AVX-512 kernel's bit for bit. Sixteen registers hold 2 x 2
/// accumulator pairs with their weights and input; larger blocks are walked in those.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::finish;
    use core::arch::x86_64::*;
    use half::f16;

    /// `sums[i * cols + j] = x[i] . w[j]` for `rows` input rows and `cols` weight rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn block(
        rows: usize,
        cols: usize,
        x: &[f32],
        w: &[f16],
        k: usize,
        sums: &mut [f32],
    ) {
        for i0 in (0..rows).step_by(2) {
            for j0 in (0..cols).step_by(2) {
                let (xs, ws) = (&x[i0 * k..], &w[j0 * k..]);
                let (rb, cb) = (2.min(rows - i0), 2.min(cols - j0));
                let mut part = [0f32; 4];
                match (rb, cb) {
                    (2, 2) => tile::<2, 2>(xs, ws, k, &mut part),
                    (2, _) => tile::<2, 1>(xs, ws, k, &mut part),
                    (_, 2) => tile::<1, 2>(xs, ws, k, &mut part),
                    _ => tile::<1, 1>(xs, ws, k, &mut part),
                }
                for i in 0..rb {
                    for j in 0..cb {
                        sums[(i0 + i) * cols + j0 + j] = part[i * cb + j];
                    }
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn tile<const R: usize, const C: usize>(x: &[f32], w: &[f16], k: usize, sums: &mut [f32]) {
        assert!(x.len() >= R * k && w.len() >= C * k && sums.len() >= R * C);
        let body = k - k % 16;
        let mut lo = [[_mm256_setzero_ps(); C]; R];
        let mut hi = [[_mm256_setzero_ps(); C]; R];
        let (xp, wp) = (x.as_ptr(), w.as_ptr() as *const u16);
        let mut at = 0;
        while at < body {
            let mut wl = [_mm256_setzero_ps(); C];
            let mut wh = [_mm256_setzero_ps(); C];
            for j in 0..C {
                // SAFETY: at + 16 <= body <= k, and w holds C rows of k.
                unsafe {
                    wl[j] = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(j * k + at) as *const __m128i));
                    wh[j] =
                        _mm256_cvtph_ps(_mm_loadu_si128(wp.add(j * k + at + 8) as *const __m128i));
                }
            }
            for i in 0..R {
                // SAFETY: as above, x holds R rows of k.
                let (xl, xh) = unsafe {
                    (
                        _mm256_loadu_ps(xp.add(i * k + at)),
                        _mm256_loadu_ps(xp.add(i * k + at + 8)),
                    )
                };
                for j in 0..C {
                    lo[i][j] = _mm256_fmadd_ps(xl, wl[j], lo[i][j]);
                    hi[i][j] = _mm256_fmadd_ps(xh, wh[j], hi[i][j]);
                }
            }
            at += 16;
        }
        for i in 0..R {
            for j in 0..C {
                let mut lanes = [0f32; 16];
                // SAFETY: lanes has room for 16 f32.
                unsafe {
                    _mm256_storeu_ps(lanes.as_mut_ptr(), lo[i][j]);
                    _mm256_storeu_ps(lanes.as_mut_ptr().add(8), hi[i][j]);
                }
                sums[i * C + j] = finish(
                    lanes,
                    &x[i * k + body..(i + 1) * k],
                    &w[j * k + body..(j + 1) * k],
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::kernel_not_run;

    /// Every kernel this CPU runs, the portable one last; names the ones it cannot run.
    fn runnable(test: &str) -> Vec<Simd> {
        let mut out = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                out.push(Simd::Avx512);
            } else {
                kernel_not_run(test, "f16 AVX-512", "no avx512f");
            }
            if has_avx2() {
                out.push(Simd::Avx2);
            } else {
                kernel_not_run(test, "f16 AVX2", "no avx2, fma or f16c");
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        kernel_not_run(test, "f16 AVX-512 and AVX2", "not an x86-64 CPU");
        out.push(Simd::None);
        out
    }

    fn matrix(n: usize, k: usize) -> F16Matrix {
        let w = (0..n * k)
            .map(|i| f16::from_f32(((i * 7919 % 1000) as f32 - 500.0) / 700.0))
            .collect();
        F16Matrix { w, n, k }
    }

    fn input(m: usize, k: usize, salt: usize) -> Vec<f32> {
        (0..m * k)
            .map(|i| (((i + salt) * 104_729 % 997) as f32 - 498.0) / 311.0)
            .collect()
    }

    #[test]
    fn products_match_a_float64_reference() {
        // widths with and without a 16-lane tail, heights with and without a 4-row tail
        for simd in runnable("products_match_a_float64_reference") {
            products_match_on(simd);
        }
    }

    fn products_match_on(simd: Simd) {
        for (n, k) in [(9, 48), (70, 37), (130, 16), (5, 3)] {
            let w = matrix(n, k);
            for m in [1, 3, 4, 6, 9] {
                let xs = input(m, k, n);
                let got = w.multiply_on(simd, &xs, m);
                for r in 0..m {
                    for c in 0..n {
                        let want: f64 = (0..k)
                            .map(|t| xs[r * k + t] as f64 * w.w[c * k + t].to_f64())
                            .sum();
                        let g = got[r * n + c] as f64;
                        assert!(
                            (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{simd:?} ({n}, {k}) m {m} row {r} col {c}: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// A kernel lane's sequence in plain code, with exact fused multiply-adds.
    fn fused_dot(x: &[f32], w: &[f16]) -> f32 {
        let body = x.len() - x.len() % 16;
        let mut lanes = [0f32; 16];
        for (xc, wc) in x[..body].chunks_exact(16).zip(w[..body].chunks_exact(16)) {
            for l in 0..16 {
                lanes[l] = xc[l].mul_add(wc[l].to_f32(), lanes[l]);
            }
        }
        finish(lanes, &x[body..], &w[body..])
    }

    #[test]
    fn every_kernel_gives_the_same_bits_as_its_plain_code() {
        // AVX-512 and AVX2 machines must agree to the bit (one fixed per-lane sequence of
        // fused multiply-adds), so a tree verified on one decodes as on the other. The
        // portable loop has no fused multiply-adds (a software one would be far slower):
        // it is held to its own plain-code sequence.
        let (n, k) = (70, 100);
        let w = matrix(n, k);
        for simd in runnable("every_kernel_gives_the_same_bits_as_its_plain_code") {
            let reference = match simd {
                Simd::None => portable_dot,
                _ => fused_dot,
            };
            for m in [1, 2, 3, 5] {
                let xs = input(m, k, 3);
                let got = w.multiply_on(simd, &xs, m);
                for r in 0..m {
                    for c in 0..n {
                        let want = reference(&xs[r * k..(r + 1) * k], &w.w[c * k..(c + 1) * k]);
                        assert_eq!(
                            got[r * n + c].to_bits(),
                            want.to_bits(),
                            "{simd:?} m {m} ({r}, {c})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_or_among_others() {
        let (n, k) = (150, 100);
        let w = matrix(n, k);
        for simd in runnable("a_row_gives_the_same_bits_alone_or_among_others") {
            for m in [2, 3, 4, 5, 8, 13] {
                let xs = input(m, k, m);
                let together = w.multiply_on(simd, &xs, m);
                for r in 0..m {
                    let alone = w.multiply_on(simd, &xs[r * k..(r + 1) * k], 1);
                    assert_eq!(
                        alone,
                        together[r * n..(r + 1) * n],
                        "{simd:?} m {m} row {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_tensor_interface_checks_widths() {
        let w = F16Matrix::from_tensor(&Tensor::ones((8, 32), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!((w.n, w.k), (8, 32));
        let x = Tensor::ones((2, 32), DType::F32, &Device::Cpu).unwrap();
        let y = w.forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, 8]);
        assert_eq!(y.to_vec2::<f32>().unwrap()[1][7], 32.0);
        let bad = Tensor::ones((2, 31), DType::F32, &Device::Cpu).unwrap();
        assert!(w.forward(&bad).is_err());
    }
}
