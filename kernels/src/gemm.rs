//! The prefill GEMM for weights stored as they are released, `[n, k]` row-major:
//! `out[r, col0 + c] = x[r] · w[c]`, with AVX-512 and without a packed copy of the weights.
//!
//! The activations (`x`, the small operand, reused by every weight row) are packed once per
//! call into k-major panels of [`MR`] rows: `panel[p][r] = x[i0 + r, k0 + p]` for each block of
//! [`KC`] columns. The microkernel holds an `MR × NR` tile of `out` in `2 · NR` zmm registers
//! (vectors along m) and, for each `p`, loads the panel's two vectors and broadcasts one weight
//! from each of its `NR` weight rows. Those rows are contiguous along k and read in order, so
//! the weights need neither the strided gather a general GEMM's packing does for this layout
//! nor a transposed copy: the weight operand streams as stored, and each weight is used `MR`
//! times from a register. The tile is then transposed into `out` (stored on the first k block,
//! added after).
//!
//! Loop order per thread (a range of weight rows): k block, then `NR`-row weight tiles
//! (`NR · KC` floats, 24 KB, stays in L1), then the panels of every m tile (`MR · KC` floats,
//! 64 KB each, from L2).
//!
//! Invariants:
//! - Each output element is summed over k in blocks of [`KC`] in order, each block one FMA
//!   chain in k order: the result does not depend on the thread count or the m tiling.
//! - Rows past `m` in the last panel are zero and never written back.

use std::arch::x86_64::*;

/// Rows of `x` per panel (two zmm vectors).
const MR: usize = 32;
/// Weight rows per microkernel tile.
const NR: usize = 12;
/// Columns of k per block.
const KC: usize = 512;

/// `x` packed into k-major panels of [`MR`] rows, per block of [`KC`] columns.
pub(crate) struct PackedX {
    m: usize,
    k: usize,
    tiles: usize,
    /// `[k block][m tile][p < kc][MR]`.
    data: Vec<f32>,
}

impl PackedX {
    pub(crate) fn new(x: &[f32], m: usize, k: usize) -> Self {
        assert!(x.len() >= m * k);
        let tiles = m.div_ceil(MR);
        let mut data = vec![0.0f32; tiles * MR * k];
        let mut off = 0;
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            for t in 0..tiles {
                let panel = &mut data[off..off + kc * MR];
                // 16 columns at a time, so the panel rows written (2 KB) stay in L1.
                for p0 in (0..kc).step_by(16) {
                    let p1 = (p0 + 16).min(kc);
                    for r in 0..MR.min(m - t * MR) {
                        let row = &x[(t * MR + r) * k + k0 + p0..(t * MR + r) * k + k0 + p1];
                        for (p, v) in row.iter().enumerate() {
                            panel[(p0 + p) * MR + r] = *v;
                        }
                    }
                }
                off += kc * MR;
            }
        }
        PackedX { m, k, tiles, data }
    }
}

/// A raw pointer to the output, shared by threads that write disjoint columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: every thread writes only the columns of its own weight rows (see `gemm`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// `out[r * ldo + col0 + c] = x[r] · w[c]` for `r < m`, `c < n`, `w` `[n, k]` row-major.
/// Needs AVX-512 F (the caller checks [`crate::simd::has_avx512`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    px: &PackedX,
    w: &[f32],
    n: usize,
    out: &mut [f32],
    col0: usize,
    ldo: usize,
    parallel: bool,
) {
    let (m, k) = (px.m, px.k);
    crate::linear::check_gemm_shapes(m, k, w.len(), n, out.len(), col0, ldo);
    assert!(crate::simd::has_avx512(), "gemm: AVX-512 F is required");
    if m == 0 || n == 0 {
        return;
    }
    let dst = Out(out.as_mut_ptr());
    // Weight rows per work item: a few microkernel tiles, so two threads balance.
    let per = 4 * NR;
    let items = n.div_ceil(per);
    let work = |it: usize| {
        let (j0, j1) = (it * per, ((it + 1) * per).min(n));
        // SAFETY: AVX-512 F checked above; `w` holds rows j0..j1 of length k, the panels
        // cover every k block and m tile, and this item writes only columns
        // col0 + j0..col0 + j1 of rows < m, inside `out` (asserted above) and disjoint from
        // every other item's.
        unsafe { columns(px, w, j0, j1, dst, col0, ldo) }
    };
    if parallel && items > 1 {
        crate::pool::run(items, &work);
    } else {
        (0..items).for_each(work);
    }
}

/// Weight rows `j0..j1` against every panel.
#[target_feature(enable = "avx512f")]
unsafe fn columns(
    px: &PackedX,
    w: &[f32],
    j0: usize,
    j1: usize,
    dst: Out,
    col0: usize,
    ldo: usize,
) {
    let (m, k) = (px.m, px.k);
    let mut tile = [0.0f32; NR * MR];
    let mut off = 0;
    for (kb, k0) in (0..k).step_by(KC).enumerate() {
        let kc = KC.min(k - k0);
        for jt in (j0..j1).step_by(NR) {
            let nr = NR.min(j1 - jt);
            let wp = w.as_ptr().add(jt * k + k0);
            for t in 0..px.tiles {
                let panel = px.data.as_ptr().add(off + t * kc * MR);
                micro(nr, panel, kc, wp, k, tile.as_mut_ptr());
                let rows = MR.min(m - t * MR);
                for r in 0..rows {
                    let o = dst.0.add((t * MR + r) * ldo + col0 + jt);
                    for c in 0..nr {
                        let v = tile[c * MR + r];
                        if kb == 0 {
                            *o.add(c) = v;
                        } else {
                            *o.add(c) += v;
                        }
                    }
                }
            }
        }
        off += px.tiles * kc * MR;
    }
}

/// Dispatches to the microkernel for `nr` weight rows.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn micro(nr: usize, panel: *const f32, kc: usize, w: *const f32, ldw: usize, c: *mut f32) {
    macro_rules! arms {
        ($($n:literal)*) => {
            match nr {
                $($n => kernel::<$n>(panel, kc, w, ldw, c),)*
                _ => unreachable!("nr <= NR"),
            }
        };
    }
    arms!(1 2 3 4 5 6 7 8 9 10 11 12)
}

/// `c[j * MR + r] = Σ_p panel[p][r] · w[j * ldw + p]` for `j < R`, `r < MR`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn kernel<const R: usize>(
    panel: *const f32,
    kc: usize,
    w: *const f32,
    ldw: usize,
    c: *mut f32,
) {
    let mut a0 = [_mm512_setzero_ps(); R];
    let mut a1 = [_mm512_setzero_ps(); R];
    for p in 0..kc {
        let x0 = _mm512_loadu_ps(panel.add(p * MR));
        let x1 = _mm512_loadu_ps(panel.add(p * MR + 16));
        for j in 0..R {
            let b = _mm512_set1_ps(*w.add(j * ldw + p));
            a0[j] = _mm512_fmadd_ps(x0, b, a0[j]);
            a1[j] = _mm512_fmadd_ps(x1, b, a1[j]);
        }
    }
    for j in 0..R {
        _mm512_storeu_ps(c.add(j * MR), a0[j]);
        _mm512_storeu_ps(c.add(j * MR + 16), a1[j]);
    }
}
