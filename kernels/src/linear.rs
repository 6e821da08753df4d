//! Linear layers: `out[m, n] = x[m, k] · w[n, k]ᵀ` with `f32` or `bf16` weights, `f32`
//! accumulation.
//!
//! Two regimes:
//! - few rows (decode, small expert batches): bandwidth-bound; each weight row is streamed
//!   once and dotted with up to four activation rows at a time, output rows split across
//!   threads. Each output element is one dot product with a fixed summation order, so the
//!   result does not depend on the thread count.
//! - many rows (prefill): compute-bound; with AVX-512 the crate's `gemm` (activations packed,
//!   weights read as stored), else the `gemm` crate's packed, cache-blocked GEMM, on `f32`.
//!   bf16 and quantized weights are widened to `f32` one ~1 MB tile of rows at a time (the
//!   tile stays in cache for the GEMM), which costs `O(n·k)` against the GEMM's `O(m·n·k)`
//!   and never holds the whole matrix widened.
//!
//! Parallel regions run on [`crate::pool`] (the caller works, helpers spin between regions).

use crate::simd;
use half::bf16;

/// A borrowed weight matrix in row-major `[n, k]` layout.
#[derive(Clone, Copy, Debug)]
pub enum WeightRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    /// FP8 e4m3 with a scale per block, dequantized in registers.
    Fp8(crate::quant::Fp8Block<'a>),
    /// MXFP4 (e2m1 pairs with an e8m0 scale per 32), dequantized in registers.
    Mxfp4(crate::quant::Mxfp4<'a>),
}

impl WeightRef<'_> {
    pub fn len(&self) -> usize {
        match self {
            WeightRef::F32(w) => w.len(),
            WeightRef::Bf16(w) => w.len(),
            WeightRef::Fp8(w) => w.q.len(),
            WeightRef::Mxfp4(w) => w.n * w.k,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies row `r` (of length `k`) into `out` as `f32`.
    pub fn row_into(&self, r: usize, k: usize, out: &mut [f32]) {
        match self {
            WeightRef::F32(w) => out.copy_from_slice(&w[r * k..(r + 1) * k]),
            WeightRef::Bf16(w) => simd::widen_bf16(&w[r * k..(r + 1) * k], out),
            WeightRef::Fp8(w) => w.row_into(r, out),
            WeightRef::Mxfp4(w) => w.row_into(r, out),
        }
    }
    /// The element at flat index `i`, as `f32`.
    pub fn get(&self, i: usize) -> f32 {
        match self {
            WeightRef::F32(w) => w[i],
            WeightRef::Bf16(w) => w[i].to_f32(),
            WeightRef::Fp8(w) => w.get(i),
            WeightRef::Mxfp4(w) => w.get(i),
        }
    }
}

/// Row count from which the packed GEMM beats streaming dot products.
pub const GEMM_MIN_ROWS: usize = 12;

/// One linear layer of a [`linear_batch`]: `out[m, n] = x[m, k] · w[n, k]ᵀ`.
pub struct LinearJob<'a> {
    pub x: &'a [f32],
    pub m: usize,
    pub k: usize,
    pub w: WeightRef<'a>,
    pub n: usize,
    pub out: &'a mut [f32],
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ`.
///
/// Panics if the slice lengths do not match the shapes (a programming error, not input).
pub fn linear(x: &[f32], m: usize, k: usize, w: WeightRef<'_>, n: usize, out: &mut [f32]) {
    linear_batch(vec![LinearJob { x, m, k, w, n, out }]);
}

/// Runs several independent linear layers in one parallel region (for example q, k and v, or
/// the gate and up projections of every expert hit in a step). Few-row jobs are cut into
/// weight-row chunks of similar byte size and all chunks of all jobs share the thread pool, so
/// small matrices do not each pay a fork-join.
pub fn linear_batch(jobs: Vec<LinearJob<'_>>) {
    let mut small = Vec::with_capacity(jobs.len());
    let mut big = Vec::new();
    for j in jobs {
        assert_eq!(j.x.len(), j.m * j.k, "linear: x is not [m, k]");
        assert_eq!(j.w.len(), j.n * j.k, "linear: w is not [n, k]");
        assert_eq!(j.out.len(), j.m * j.n, "linear: out is not [m, n]");
        if j.m == 0 || j.n == 0 {
            continue;
        }
        if j.m >= GEMM_MIN_ROWS {
            big.push(j);
        } else {
            small.push(j);
        }
    }
    let threads = rayon::current_num_threads().max(1);
    if big.len() >= 4 * threads {
        // Many GEMMs (experts in a prefill step): one per thread at a time, each serial.
        crate::pool::for_each(big, |j| gemm_job(j, false));
    } else {
        for j in big {
            gemm_job(j, threads > 1);
        }
    }
    if small.is_empty() {
        return;
    }
    // Bytes per weight, rounded up (MXFP4's half byte counts as one: chunk sizing only).
    let elem = |w: &WeightRef<'_>| match w {
        WeightRef::F32(_) => 4,
        WeightRef::Bf16(_) => 2,
        WeightRef::Fp8(_) | WeightRef::Mxfp4(_) => 1,
    };
    let total_bytes: usize = small.iter().map(|j| j.n * j.k * elem(&j.w)).sum();
    // About 8 chunks per thread, but never below 32 KiB of weights per chunk.
    let chunk_bytes = (total_bytes / (threads * 8)).max(32 << 10);
    // Split each job into its read-only shape and its output.
    let mut outs: Vec<&mut [f32]> = Vec::with_capacity(small.len());
    let specs: Vec<(&[f32], usize, usize, WeightRef<'_>, usize)> = small
        .into_iter()
        .map(|j| {
            outs.push(j.out);
            (j.x, j.m, j.k, j.w, j.n)
        })
        .collect();
    // Row-major [n, m] scratch for multi-row jobs (transposed into the output afterwards).
    let mut scratch: Vec<Vec<f32>> = specs
        .iter()
        .map(|s| {
            if s.1 > 1 {
                vec![0.0; s.4 * s.1]
            } else {
                Vec::new()
            }
        })
        .collect();
    {
        let mut items: Vec<(usize, usize, &mut [f32])> = Vec::new();
        for (ji, (out, t)) in outs.iter_mut().zip(scratch.iter_mut()).enumerate() {
            let (_, m, k, w, n) = specs[ji];
            let rows = (chunk_bytes / (k * elem(&w))).clamp(1, n);
            let t: &mut [f32] = if m > 1 { t } else { out };
            for (ci, c) in t.chunks_mut(rows * m).enumerate() {
                items.push((ji, ci * rows, c));
            }
        }
        let specs = &specs;
        let work = |(ji, j0, c): (usize, usize, &mut [f32])| {
            let (x, m, k, w, _) = specs[ji];
            dot_block(x, m, k, w, j0, c);
        };
        if total_bytes < (128 << 10) || threads == 1 || items.len() == 1 {
            items.into_iter().for_each(work);
        } else {
            crate::pool::for_each(items, work);
        }
    }
    for ((out, t), &(_, m, _, _, n)) in outs.iter_mut().zip(&scratch).zip(&specs) {
        if m > 1 {
            for jr in 0..n {
                for r in 0..m {
                    out[r * n + jr] = t[jr * m + r];
                }
            }
        }
    }
}

/// The GEMM path widens non-`f32` weights (bf16, FP8, MXFP4) one tile of rows at a time into
/// an `f32` buffer of about this many bytes, which stays in cache while the GEMM packs it; the
/// whole matrix is never widened at once (a 7168×18432 FP8 matrix would be 528 MB).
const WIDEN_TILE_BYTES: usize = 1 << 20;

fn gemm_job(j: LinearJob<'_>, parallel: bool) {
    // Where AVX-512 is present the activations are packed once for every tile of weights.
    #[cfg(target_arch = "x86_64")]
    let packed = simd::has_avx512().then(|| crate::gemm::PackedX::new(j.x, j.m, j.k));
    let (x, m, k, ldo) = (j.x, j.m, j.k, j.n);
    let out = j.out;
    let mut run = |w: &[f32], n: usize, col0: usize| {
        #[cfg(target_arch = "x86_64")]
        if let Some(px) = &packed {
            return crate::gemm::gemm(px, w, n, out, col0, ldo, parallel);
        }
        gemm_f32(x, m, k, w, n, out, col0, ldo, parallel)
    };
    if let WeightRef::F32(wf) = j.w {
        return run(wf, j.n, 0);
    }
    let tile = (WIDEN_TILE_BYTES / (4 * k)).clamp(16, j.n);
    let mut wide = vec![0.0f32; tile * k];
    for j0 in (0..j.n).step_by(tile) {
        let t = tile.min(j.n - j0);
        let buf = &mut wide[..t * k];
        let widen = |(r0, rows): (usize, &mut [f32])| {
            for (r, row) in rows.chunks_mut(k).enumerate() {
                j.w.row_into(j0 + r0 * 8 + r, k, row);
            }
        };
        if parallel {
            crate::pool::for_each(buf.chunks_mut(8 * k).enumerate().collect(), widen);
        } else {
            buf.chunks_mut(8 * k).enumerate().for_each(widen);
        }
        run(buf, t, j0);
    }
}

/// Rows of x handled together while a block of weight rows stays in cache.
const M_BLOCK: usize = 32;

/// `t[jj, r] = x[r] · w[j0 + jj]` for all `r < m` and the weight rows covered by `t`
/// (`[rows, m]`): 4x3 register tiles where possible, row-at-a-time at the edges.
fn dot_block(x: &[f32], m: usize, k: usize, w: WeightRef<'_>, j0: usize, t: &mut [f32]) {
    if let WeightRef::Fp8(f) = w {
        if f.dot_span(x, m, j0, t) {
            return;
        }
    }
    let rows = t.len() / m;
    // Probe the tile kernel only where a whole triple of weight rows exists (a block's last
    // one or two rows at the end of the matrix would be read past).
    let triples = if m >= 4 && rows >= 3 && simd::tile_4x3(&x[..4 * k], k, w, j0).is_some() {
        rows / 3
    } else {
        0
    };
    for mb in (0..m).step_by(M_BLOCK) {
        let me = (mb + M_BLOCK).min(m);
        for tr in 0..triples {
            let jj = tr * 3;
            let mut r = mb;
            while r + 4 <= me {
                let tile =
                    simd::tile_4x3(&x[r * k..(r + 4) * k], k, w, j0 + jj).expect("checked above");
                for (i, row) in tile.iter().enumerate() {
                    for (c, v) in row.iter().enumerate() {
                        t[(jj + c) * m + r + i] = *v;
                    }
                }
                r += 4;
            }
            for rr in r..me {
                for c in 0..3 {
                    t[(jj + c) * m + rr] = dot_one(&x[rr * k..(rr + 1) * k], k, w, j0 + jj + c);
                }
            }
        }
    }
    for jj in triples * 3..rows {
        dot_all_rows(x, m, k, w, j0 + jj, &mut t[jj * m..(jj + 1) * m]);
    }
}

#[inline]
fn dot_one(x: &[f32], k: usize, w: WeightRef<'_>, j: usize) -> f32 {
    match w {
        WeightRef::F32(wf) => simd::dot_rows_f32::<1>(x, k, &wf[j * k..(j + 1) * k])[0],
        WeightRef::Bf16(wb) => simd::dot_rows_bf16::<1>(x, k, &wb[j * k..(j + 1) * k])[0],
        WeightRef::Fp8(w) => w.dot_rows::<1>(x, j)[0],
        WeightRef::Mxfp4(w) => w.dot_rows::<1>(x, j)[0],
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
                WeightRef::Fp8(w) => w.dot_rows::<$R>(&x[r * k..], j),
                WeightRef::Mxfp4(w) => w.dot_rows::<$R>(&x[r * k..], j),
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

/// The bounds both GEMMs write within: `w` holds `n` rows of `k`, and `out` rows `ldo` apart
/// hold columns `col0..col0 + n` for `m` rows.
pub(crate) fn check_gemm_shapes(
    m: usize,
    k: usize,
    w_len: usize,
    n: usize,
    out_len: usize,
    col0: usize,
    ldo: usize,
) {
    assert!(
        w_len >= n * k && col0 + n <= ldo,
        "gemm: w or columns out of shape"
    );
    assert!(
        m == 0 || out_len >= (m - 1) * ldo + col0 + n,
        "gemm: out too short"
    );
}

/// `out[r, col0 + c] = x[r] · w[c]` for `c < n`, `out` rows `ldo` apart.
#[allow(clippy::too_many_arguments)]
fn gemm_f32(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    out: &mut [f32],
    col0: usize,
    ldo: usize,
    parallel: bool,
) {
    assert!(x.len() >= m * k);
    check_gemm_shapes(m, k, w.len(), n, out.len(), col0, ldo);
    let threads = rayon::current_num_threads().max(1);
    let par = if parallel && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the bounds are asserted above: dst is [m, n] at column col0 of a row-major
    // matrix with row stride ldo (rs = ldo, cs = 1), lhs is x [m, k] row-major, rhs is wᵀ
    // [k, n] read from w [n, k] (rs = 1, cs = k). read_dst = false, so dst is overwritten
    // with 1 · lhs · rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr().add(col0),
            1,
            ldo as isize,
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
