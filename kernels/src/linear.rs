//! Linear layers: `out[m, n] = x[m, k] · w[n, k]ᵀ` with `f32` or `bf16` weights, `f32`
//! accumulation.
//!
//! Two regimes:
//! - few rows (decode, small expert batches): bandwidth-bound; each weight row is streamed
//!   once and dotted with up to four activation rows at a time, output rows split across
//!   threads. Each output element is one dot product with a fixed summation order, so the
//!   result does not depend on the thread count.
//! - many rows (prefill): compute-bound; a packed, cache-blocked GEMM (`gemm` crate) on `f32`.
//!   `bf16` weights are widened to `f32` per call, which costs `O(n·k)` against the GEMM's
//!   `O(m·n·k)`.

use crate::simd;
use half::bf16;
use rayon::prelude::*;

/// A borrowed weight matrix in row-major `[n, k]` layout.
#[derive(Clone, Copy, Debug)]
pub enum WeightRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl WeightRef<'_> {
    pub fn len(&self) -> usize {
        match self {
            WeightRef::F32(w) => w.len(),
            WeightRef::Bf16(w) => w.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies row `r` (of length `k`) into `out` as `f32`.
    pub fn row_into(&self, r: usize, k: usize, out: &mut [f32]) {
        match self {
            WeightRef::F32(w) => out.copy_from_slice(&w[r * k..(r + 1) * k]),
            WeightRef::Bf16(w) => {
                for (o, v) in out.iter_mut().zip(&w[r * k..(r + 1) * k]) {
                    *o = v.to_f32();
                }
            }
        }
    }
    /// The element at flat index `i`, as `f32`.
    pub fn get(&self, i: usize) -> f32 {
        match self {
            WeightRef::F32(w) => w[i],
            WeightRef::Bf16(w) => w[i].to_f32(),
        }
    }
}

/// Row count from which the packed GEMM beats streaming dot products.
pub const GEMM_MIN_ROWS: usize = 12;

/// `out[m, n] = x[m, k] · w[n, k]ᵀ`.
///
/// Panics if the slice lengths do not match the shapes (a programming error, not input).
pub fn linear(x: &[f32], m: usize, k: usize, w: WeightRef<'_>, n: usize, out: &mut [f32]) {
    assert_eq!(x.len(), m * k, "linear: x is not [m, k]");
    assert_eq!(w.len(), n * k, "linear: w is not [n, k]");
    assert_eq!(out.len(), m * n, "linear: out is not [m, n]");
    if m == 0 || n == 0 {
        return;
    }
    if m >= GEMM_MIN_ROWS {
        match w {
            WeightRef::F32(wf) => gemm_f32(x, m, k, wf, n, out),
            WeightRef::Bf16(wb) => {
                let mut wide = vec![0.0f32; n * k];
                wide.par_chunks_mut(k * 64)
                    .zip(wb.par_chunks(k * 64))
                    .for_each(|(d, s)| {
                        for (o, v) in d.iter_mut().zip(s) {
                            *o = v.to_f32();
                        }
                    });
                gemm_f32(x, m, k, &wide, n, out)
            }
        }
        return;
    }
    if m == 1 {
        gemv_rows(x, 1, k, w, out);
        return;
    }
    // Compute outᵀ [n, m] row-parallel, then transpose into out.
    let mut t = vec![0.0f32; n * m];
    gemv_rows(x, m, k, w, &mut t);
    for j in 0..n {
        for r in 0..m {
            out[r * n + j] = t[j * m + r];
        }
    }
}

/// `t[j, r] = x[r] · w[j]` for all weight rows `j`, split across threads by weight rows.
fn gemv_rows(x: &[f32], m: usize, k: usize, w: WeightRef<'_>, t: &mut [f32]) {
    let n = t.len() / m;
    let threads = rayon::current_num_threads().max(1);
    // Enough chunks to balance, large enough that each streams a useful amount of memory.
    let rows_per_chunk = (n / (threads * 4)).max(8).min(n.max(1));
    let work = |(ci, chunk): (usize, &mut [f32])| {
        let j0 = ci * rows_per_chunk;
        for (jj, o) in chunk.chunks_mut(m).enumerate() {
            let j = j0 + jj;
            dot_all_rows(x, m, k, w, j, o);
        }
    };
    if n * k < 32 * 1024 || threads == 1 {
        t.chunks_mut(rows_per_chunk * m).enumerate().for_each(work);
    } else {
        t.par_chunks_mut(rows_per_chunk * m)
            .enumerate()
            .for_each(work);
    }
}

#[inline]
#[allow(unused_assignments)]
fn dot_all_rows(x: &[f32], m: usize, k: usize, w: WeightRef<'_>, j: usize, o: &mut [f32]) {
    let mut r = 0;
    macro_rules! run {
        ($R:literal) => {{
            let v = match w {
                WeightRef::F32(wf) => {
                    simd::dot_rows_f32::<$R>(&x[r * k..], k, &wf[j * k..(j + 1) * k])
                }
                WeightRef::Bf16(wb) => {
                    simd::dot_rows_bf16::<$R>(&x[r * k..], k, &wb[j * k..(j + 1) * k])
                }
            };
            o[r..r + $R].copy_from_slice(&v);
            r += $R;
        }};
    }
    while m - r >= 4 {
        run!(4);
    }
    if m - r >= 2 {
        run!(2);
    }
    if m - r == 1 {
        run!(1);
    }
}

fn gemm_f32(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    let threads = rayon::current_num_threads().max(1);
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the shapes were checked by `linear`: dst is [m, n] row-major (rs = n, cs = 1),
    // lhs is x [m, k] row-major, rhs is wᵀ [k, n] read from w [n, k] (rs = 1, cs = k).
    // read_dst = false, so dst is overwritten with 1 · lhs · rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Dot product of two `f32` slices (SIMD where available).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    simd::dot(a, b)
}
