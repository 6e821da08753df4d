//! Inner loops with AVX2/FMA fast paths chosen at run time, and portable fallbacks.
//!
//! The fallbacks use eight independent accumulators so the compiler can vectorise them; the
//! AVX2 paths are selected once per call through `is_x86_feature_detected!` (cached by std).

use half::bf16;

#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX2, FMA and F16C (the FP8 kernels widen codes through f16).
#[inline]
pub fn has_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx2() && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX-512 F and BW (used where they halve the shuffle-port work of a kernel: FP8 decoding).
#[inline]
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `dst[i] = src[i]` widened from bf16 (exact).
#[inline]
pub fn widen_bf16(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// Dot products of `R` activation rows with one weight row: `out[r] = x[r] . w`.
/// Rows of `x` are `k` long and laid out one after another.
#[inline]
pub fn dot_rows_f32<const R: usize>(x: &[f32], k: usize, w: &[f32]) -> [f32; R] {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: avx512f/bw present (checked); slices are bounds-checked inside.
        return unsafe { avx512::dot_rows_f32::<R>(x, k, w) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports avx2 and fma (checked above); slices are bounds-checked
        // by the asserts inside.
        return unsafe { avx2::dot_rows_f32::<R>(x, k, w) };
    }
    let mut out = [0.0; R];
    for (r, o) in out.iter_mut().enumerate() {
        *o = dot_portable(&x[r * k..(r + 1) * k], w, |v| v);
    }
    out
}

/// As [`dot_rows_f32`] with a bf16 weight row.
#[inline]
pub fn dot_rows_bf16<const R: usize>(x: &[f32], k: usize, w: &[bf16]) -> [f32; R] {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: avx512f/bw present (checked); slices are bounds-checked inside.
        return unsafe { avx512::dot_rows_bf16::<R>(x, k, w) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { avx2::dot_rows_bf16::<R>(x, k, w) };
    }
    let mut out = [0.0; R];
    for (r, o) in out.iter_mut().enumerate() {
        *o = dot_portable(&x[r * k..(r + 1) * k], w, |v: bf16| v.to_f32());
    }
    out
}

fn dot_portable<T: Copy>(x: &[f32], w: &[T], f: impl Fn(T) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += x[c * 8 + l] * f(w[c * 8 + l]);
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for i in chunks * 8..x.len() {
        s += x[i] * f(w[i]);
    }
    s
}

/// `out[r] = xs[r] · e4m3(q)` for `R` rows of `xs` that already carry the row's block
/// scales times 2⁻⁸ (`Fp8Block::dot_span` prepares them); `None` where this CPU has no
/// AVX-512 F/BW (callers then use [`dot_rows_fp8`]).
#[inline]
pub fn dot_rows_fp8_prescaled<const R: usize>(xs: &[f32], k: usize, q: &[u8]) -> Option<[f32; R]> {
    assert!(xs.len() >= R * k && q.len() >= k);
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: avx512f/bw present (checked); lengths asserted above.
        return Some(unsafe { avx512::dot_rows_fp8_prescaled::<R>(xs, k, q) });
    }
    None
}

/// As [`dot_rows_f32`] with an FP8 e4m3 weight row whose scales `scales[c / bc]` cover
/// `bc` columns each.
#[inline]
pub fn dot_rows_fp8<const R: usize>(
    x: &[f32],
    k: usize,
    q: &[u8],
    scales: &[f32],
    bc: usize,
) -> [f32; R] {
    assert!(x.len() >= R * k && q.len() >= k && scales.len() >= k.div_ceil(bc));
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: avx512f/bw present (checked); lengths asserted above.
        return unsafe { avx512::dot_rows_fp8::<R>(x, k, q, scales, bc) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_f16c() {
        // SAFETY: avx2, fma and f16c present; lengths asserted above.
        return unsafe { avx2::dot_rows_fp8::<R>(x, k, q, scales, bc) };
    }
    portable_dot_rows_fp8(x, k, q, scales, bc)
}

fn portable_dot_rows_fp8<const R: usize>(
    x: &[f32],
    k: usize,
    q: &[u8],
    scales: &[f32],
    bc: usize,
) -> [f32; R] {
    let t = crate::quant::e4m3_table();
    let mut out = [0.0f32; R];
    let mut buf = [0.0f32; 128];
    for (b, s) in scales.iter().enumerate().take(k.div_ceil(bc)) {
        let (c0, c1) = (b * bc, ((b + 1) * bc).min(k));
        let mut c = c0;
        while c < c1 {
            let e = (c + 128).min(c1);
            for (v, q) in buf.iter_mut().zip(&q[c..e]) {
                *v = t[*q as usize];
            }
            for (r, o) in out.iter_mut().enumerate() {
                *o += s * dot_portable(&x[r * k + c..r * k + e], &buf[..e - c], |v| v);
            }
            c = e;
        }
    }
    out
}

/// One FP8 weight row dequantized into `out` (`k = out.len()` codes, `scales[c / bc]` covering
/// `bc` columns each): `out[c] = e4m3(q[c]) · scales[c / bc]`, exactly.
#[inline]
pub fn dequant_row_fp8(q: &[u8], scales: &[f32], bc: usize, out: &mut [f32]) {
    let k = out.len();
    assert!(q.len() >= k && scales.len() >= k.div_ceil(bc));
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: avx512f/bw present (checked); lengths asserted above.
        return unsafe { avx512::dequant_row_fp8(q, scales, bc, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_f16c() {
        // SAFETY: avx2, fma and f16c present; lengths asserted above.
        return unsafe { avx2::dequant_row_fp8(q, scales, bc, out) };
    }
    let t = crate::quant::e4m3_table();
    for (c, o) in out.iter_mut().enumerate() {
        *o = t[q[c] as usize] * scales[c / bc];
    }
}

/// As [`dot_rows_f32`] with an MXFP4 weight row: `row.0` the packed e2m1 pairs (`k / 2`
/// bytes), `row.1` one e8m0 scale per 32 values.
#[inline]
pub fn dot_rows_mxfp4<const R: usize>(x: &[f32], k: usize, row: (&[u8], &[u8])) -> [f32; R] {
    let (q, sc) = row;
    assert!(k % 32 == 0 && x.len() >= R * k && q.len() >= k / 2 && sc.len() >= k / 32);
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: avx512f/bw present (checked); lengths asserted above.
        return unsafe { avx512::dot_rows_mxfp4::<R>(x, k, q, sc) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: avx2+fma present; lengths asserted above.
        return unsafe { avx2::dot_rows_mxfp4::<R>(x, k, q, sc) };
    }
    portable_dot_rows_mxfp4(x, k, q, sc)
}

fn portable_dot_rows_mxfp4<const R: usize>(x: &[f32], k: usize, q: &[u8], sc: &[u8]) -> [f32; R] {
    let mut out = [0.0f32; R];
    let mut buf = [0.0f32; 32];
    for (g, e) in sc.iter().enumerate().take(k / 32) {
        let s = crate::quant::e8m0_decode(*e);
        for (pair, byte) in buf.chunks_mut(2).zip(&q[g * 16..(g + 1) * 16]) {
            pair[0] = crate::quant::E2M1[(byte & 15) as usize] * s;
            pair[1] = crate::quant::E2M1[(byte >> 4) as usize] * s;
        }
        for (r, o) in out.iter_mut().enumerate() {
            *o += dot_portable(&x[r * k + g * 32..r * k + g * 32 + 32], &buf, |v| v);
        }
    }
    out
}

/// A 4x3 tile `out[r][c] = x[r] . w[c]` when the AVX2 kernel applies (`k % 8 == 0`); `None`
/// tells the caller to fall back to row-at-a-time dot products.
#[inline]
pub fn tile_4x3(x: &[f32], k: usize, w: crate::WeightRef<'_>, j: usize) -> Option<[[f32; 3]; 4]> {
    #[cfg(target_arch = "x86_64")]
    if k % 8 == 0 && has_avx2() {
        // SAFETY: avx2+fma present, k % 8 == 0; lengths are asserted inside.
        return Some(unsafe {
            match w {
                crate::WeightRef::F32(w) => avx2::tile_4x3_f32(x, k, &w[j * k..(j + 3) * k]),
                crate::WeightRef::Bf16(w) => avx2::tile_4x3_bf16(x, k, &w[j * k..(j + 3) * k]),
                // Quantized rows take the row-at-a-time path (their own dequantizing dot).
                crate::WeightRef::Fp8(_) | crate::WeightRef::Mxfp4(_) => return None,
            }
        });
    }
    let _ = (x, k, w, j);
    None
}

/// Sum of a slice, streaming (used to measure memory read bandwidth).
pub fn sum(a: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: avx2 present.
        return unsafe { avx2::sum(a) };
    }
    let mut acc = [0.0f32; 8];
    for c in a.chunks_exact(8) {
        for l in 0..8 {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + a[a.len() / 8 * 8..].iter().sum::<f32>()
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_rows_f32::<1>(a, a.len(), b)[0]
}

pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += a * xv;
    }
}

/// Attention's probabilities times one tile of values, stamped out per instruction set
/// (`$lanes` columns per vector): `out[h * d + c] += Σ_j p[h][j] · vals[j][c]` for
/// `h < group`, `c < d` (`d % $lanes == 0`), eight heads' accumulators held in registers over
/// the whole tile (one store per head and vector, not one per key).
#[cfg(target_arch = "x86_64")]
macro_rules! pv_kernels {
    ($feat:literal, $lanes:literal, $zero:ident, $load:ident, $fma:ident, $set1:ident,
     $add:ident, $store:ident) => {
        #[target_feature(enable = $feat)]
        pub unsafe fn pv<const T: usize>(
            out: &mut [f32],
            d: usize,
            group: usize,
            p: &[[f32; T]],
            vals: &[&[f32]],
        ) {
            assert!(d % $lanes == 0 && out.len() >= group * d && p.len() >= group);
            assert!(vals.len() <= T && vals.iter().all(|v| v.len() >= d));
            let op = out.as_mut_ptr();
            for c in (0..d).step_by($lanes) {
                let mut h0 = 0;
                while h0 + 8 <= group {
                    pv_block::<8, T>(op, d, c, h0, p, vals);
                    h0 += 8;
                }
                while h0 + 4 <= group {
                    pv_block::<4, T>(op, d, c, h0, p, vals);
                    h0 += 4;
                }
                while h0 < group {
                    pv_block::<1, T>(op, d, c, h0, p, vals);
                    h0 += 1;
                }
            }
        }

        /// [`pv`] for heads `h0..h0 + H` and one vector of columns from `c` (a fixed count,
        /// so the accumulators stay in registers).
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn pv_block<const H: usize, const T: usize>(
            op: *mut f32,
            d: usize,
            c: usize,
            h0: usize,
            p: &[[f32; T]],
            vals: &[&[f32]],
        ) {
            let mut acc = [$zero(); H];
            for (j, v) in vals.iter().enumerate() {
                let v = $load(v.as_ptr().add(c));
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = $fma($set1(p[h0 + i][j]), v, *a);
                }
            }
            for (i, a) in acc.iter().enumerate() {
                let o = op.add((h0 + i) * d + c);
                $store(o, $add($load(o), *a));
            }
        }
    };
}

/// The FP8 e4m3 dot-product kernel, stamped out per instruction set: `$conv` turns 16 codes,
/// each sign-extended to 16 bits and shifted left by 7 with bit 14 cleared (`h`), into f32
/// vectors of `$lanes` lanes. Such a 16-bit pattern is the f16 of the code's value times 2⁻⁸
/// (sign, exponent `0eeee` with bias 15 against e4m3's 7, mantissa `mmm`, subnormals
/// included), so F16C's widening is exact; each block's partial sums are scaled by 2⁸ and its
/// block scale. 32 codes per iteration (two conversions) keep several FMA chains in flight;
/// a block's last < 32 codes go through the table. The NaN codes read as ±480 (no finite
/// weight uses them).
#[cfg(target_arch = "x86_64")]
macro_rules! fp8_dot_rows {
    ($feat:literal, $v:ty, $lanes:literal, $zero:ident, $load:ident, $fma:ident, $add:ident,
     $set1:ident, $reduce:path, $mul:ident, $store:ident, |$h:ident| $conv:expr) => {
        /// One FP8 weight row (`scales[c / bc]` covering `bc` columns each) dequantized into
        /// `out` (the GEMM path's widening), 32 codes per iteration as the dot product reads
        /// them.
        #[target_feature(enable = $feat)]
        pub unsafe fn dequant_row_fp8(q: &[u8], scales: &[f32], bc: usize, out: &mut [f32]) {
            const N: usize = 32 / $lanes;
            let t = crate::quant::e4m3_table();
            let k = out.len();
            let (qp, op) = (q.as_ptr(), out.as_mut_ptr());
            let keep = _mm256_set1_epi16(!0x4000u16 as i16);
            for (b, &s) in scales.iter().enumerate().take(k.div_ceil(bc)) {
                let (c0, c1) = (b * bc, ((b + 1) * bc).min(k));
                let sv = $set1(s * 256.0);
                let mut c = c0;
                while c + 32 <= c1 {
                    for half in 0..2 {
                        let raw = _mm_loadu_si128(qp.add(c + 16 * half) as *const __m128i);
                        let $h =
                            _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(raw), 7), keep);
                        let conv: [$v; N / 2] = $conv;
                        for (i, w) in conv.iter().enumerate() {
                            $store(op.add(c + 16 * half + i * $lanes), $mul(*w, sv));
                        }
                    }
                    c += 32;
                }
                for cc in c..c1 {
                    *op.add(cc) = t[*qp.add(cc) as usize] * s;
                }
            }
        }

        /// `out[r] = x[r] · w` for `R` rows of `x` (each `k` long) and one FP8 weight row
        /// whose scales `scales[c / bc]` cover `bc` columns each.
        #[target_feature(enable = $feat)]
        pub unsafe fn dot_rows_fp8<const R: usize>(
            x: &[f32],
            k: usize,
            q: &[u8],
            scales: &[f32],
            bc: usize,
        ) -> [f32; R] {
            const N: usize = 32 / $lanes;
            let t = crate::quant::e4m3_table();
            let (xp, qp) = (x.as_ptr(), q.as_ptr());
            let keep = _mm256_set1_epi16(!0x4000u16 as i16);
            let mut acc: [$v; R] = [$zero(); R];
            let mut tail = [0.0f32; R];
            for (b, &s) in scales.iter().enumerate().take(k.div_ceil(bc)) {
                let (c0, c1) = (b * bc, ((b + 1) * bc).min(k));
                let mut part: [[$v; N]; R] = [[$zero(); N]; R];
                let mut c = c0;
                while c + 32 <= c1 {
                    // Prefetch into L2 ahead of the codes (a hint; see the bf16 dot).
                    if c % 64 == 0 {
                        _mm_prefetch::<_MM_HINT_T1>((qp as *const i8).wrapping_add(c + 2048));
                    }
                    let mut w: [$v; N] = [$zero(); N];
                    for half in 0..2 {
                        let raw = _mm_loadu_si128(qp.add(c + 16 * half) as *const __m128i);
                        let $h =
                            _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(raw), 7), keep);
                        let conv: [$v; N / 2] = $conv;
                        w[half * N / 2..(half + 1) * N / 2].copy_from_slice(&conv);
                    }
                    for r in 0..R {
                        for i in 0..N {
                            let xv = $load(xp.add(r * k + c + i * $lanes));
                            part[r][i] = $fma(xv, w[i], part[r][i]);
                        }
                    }
                    c += 32;
                }
                let sv = $set1(s * 256.0);
                for r in 0..R {
                    let mut p = part[r][0];
                    for v in &part[r][1..] {
                        p = $add(p, *v);
                    }
                    acc[r] = $fma(p, sv, acc[r]);
                    for cc in c..c1 {
                        tail[r] += s * t[*qp.add(cc) as usize] * *xp.add(r * k + cc);
                    }
                }
            }
            let mut out = [0.0f32; R];
            for r in 0..R {
                out[r] = $reduce(acc[r]) + tail[r];
            }
            out
        }
    };
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use half::bf16;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let hi = _mm256_extractf128_ps(v, 1);
        let lo = _mm256_castps256_ps128(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_bf16(p: *const bf16) -> __m256 {
        let raw = _mm_loadu_si128(p as *const __m128i);
        let wide = _mm256_cvtepu16_epi32(raw);
        _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))
    }

    /// Loads 8 weights as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_f32(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }

    /// The streaming and tiled dot-product kernels, stamped out for each weight dtype
    /// (`$load` widens 8 weights to an f32 vector).
    macro_rules! weight_kernels {
        ($wt:ty, $load:ident, $dot_rows:ident, $tile:ident, $pf:expr) => {
            /// `out[r] = x[r] . w` for `R` rows of `x` (each `k` long), two accumulators per
            /// row, with a software prefetch into L2 `$pf` bytes ahead of the weights.
            #[target_feature(enable = "avx2,fma")]
            pub unsafe fn $dot_rows<const R: usize>(x: &[f32], k: usize, w: &[$wt]) -> [f32; R] {
                assert!(x.len() >= R * k && w.len() >= k);
                let mut acc0 = [_mm256_setzero_ps(); R];
                let mut acc1 = [_mm256_setzero_ps(); R];
                let xp = x.as_ptr();
                let wp = w.as_ptr();
                let size = std::mem::size_of::<$wt>();
                let mut i = 0;
                while i + 16 <= k {
                    // One prefetch per line: an iteration reads 16 weights.
                    if (i * size) % 64 == 0 {
                        let ahead = (wp as *const i8).wrapping_add(i * size + $pf);
                        _mm_prefetch::<_MM_HINT_T1>(ahead);
                    }
                    let w0 = $load(wp.add(i));
                    let w1 = $load(wp.add(i + 8));
                    for r in 0..R {
                        let xr = xp.add(r * k + i);
                        acc0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), w0, acc0[r]);
                        acc1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr.add(8)), w1, acc1[r]);
                    }
                    i += 16;
                }
                let mut out = [0.0; R];
                for r in 0..R {
                    let mut s = hsum(_mm256_add_ps(acc0[r], acc1[r]));
                    for j in i..k {
                        s += *xp.add(r * k + j) * f32::from(*wp.add(j));
                    }
                    out[r] = s;
                }
                out
            }

            /// A 4x3 tile of dot products: rows `x[r*k..]` (r < 4) against weight rows
            /// `w[c*k..]` (c < 3), `k % 8 == 0`. Twelve independent accumulators; no packing
            /// is needed because both operands are contiguous along `k`.
            #[inline]
            #[target_feature(enable = "avx2,fma")]
            pub unsafe fn $tile(x: &[f32], k: usize, w: &[$wt]) -> [[f32; 3]; 4] {
                assert!(k % 8 == 0 && x.len() >= 4 * k && w.len() >= 3 * k);
                let (xp, wp) = (x.as_ptr(), w.as_ptr());
                let mut a = [[_mm256_setzero_ps(); 3]; 4];
                let mut c = 0;
                while c < k {
                    let w0 = $load(wp.add(c));
                    let w1 = $load(wp.add(k + c));
                    let w2 = $load(wp.add(2 * k + c));
                    for r in 0..4 {
                        let xr = _mm256_loadu_ps(xp.add(r * k + c));
                        a[r][0] = _mm256_fmadd_ps(xr, w0, a[r][0]);
                        a[r][1] = _mm256_fmadd_ps(xr, w1, a[r][1]);
                        a[r][2] = _mm256_fmadd_ps(xr, w2, a[r][2]);
                    }
                    c += 8;
                }
                a.map(|row| row.map(|v| hsum(v)))
            }
        };
    }

    weight_kernels!(f32, load_f32, dot_rows_f32, tile_4x3_f32, 2048);
    weight_kernels!(bf16, load_bf16, dot_rows_bf16, tile_4x3_bf16, 4096);

    fp8_dot_rows!(
        "avx2,fma,f16c",
        __m256,
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_fmadd_ps,
        _mm256_add_ps,
        _mm256_set1_ps,
        hsum,
        _mm256_mul_ps,
        _mm256_storeu_ps,
        |h| [
            _mm256_cvtph_ps(_mm256_castsi256_si128(h)),
            _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1))
        ]
    );

    /// MXFP4 dot products: each 16-byte block's nibbles are split, interleaved back into
    /// value order and looked up (`pshufb`) as twice their e2m1 value in i8, widened to f32
    /// and scaled by half the block's power of two (exact), then dotted with every row.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_rows_mxfp4<const R: usize>(
        x: &[f32],
        k: usize,
        q: &[u8],
        sc: &[u8],
    ) -> [f32; R] {
        let lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
        let low = _mm_set1_epi8(0x0f);
        let xp = x.as_ptr();
        let mut acc0 = [_mm256_setzero_ps(); R];
        let mut acc1 = [_mm256_setzero_ps(); R];
        for g in 0..k / 32 {
            let raw = _mm_loadu_si128(q.as_ptr().add(g * 16) as *const __m128i);
            let lo = _mm_and_si128(raw, low);
            let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
            let v0 = _mm_shuffle_epi8(lut, _mm_unpacklo_epi8(lo, hi));
            let v1 = _mm_shuffle_epi8(lut, _mm_unpackhi_epi8(lo, hi));
            let s = _mm256_set1_ps(0.5 * crate::quant::e8m0_decode(sc[g]));
            let w = [
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v0)), s),
                _mm256_mul_ps(
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v0, 8))),
                    s,
                ),
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v1)), s),
                _mm256_mul_ps(
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v1, 8))),
                    s,
                ),
            ];
            for r in 0..R {
                let xr = xp.add(r * k + g * 32);
                acc0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), w[0], acc0[r]);
                acc1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr.add(8)), w[1], acc1[r]);
                acc0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr.add(16)), w[2], acc0[r]);
                acc1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr.add(24)), w[3], acc1[r]);
            }
        }
        let mut out = [0.0f32; R];
        for r in 0..R {
            out[r] = hsum(_mm256_add_ps(acc0[r], acc1[r]));
        }
        out
    }

    /// Four dot products of consecutive `d`-long rows of `q4` with `key` (d % 8 == 0).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4(q4: &[f32], key: &[f32]) -> [f32; 4] {
        let d = key.len();
        assert!(d % 8 == 0 && q4.len() >= 4 * d);
        let (qp, kp) = (q4.as_ptr(), key.as_ptr());
        let mut a = [_mm256_setzero_ps(); 4];
        let mut c = 0;
        while c < d {
            let kc = _mm256_loadu_ps(kp.add(c));
            for h in 0..4 {
                a[h] = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(h * d + c)), kc, a[h]);
            }
            c += 8;
        }
        [hsum(a[0]), hsum(a[1]), hsum(a[2]), hsum(a[3])]
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sum(a: &[f32]) -> f32 {
        let p = a.as_ptr();
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= a.len() {
            for (l, v) in acc.iter_mut().enumerate() {
                *v = _mm256_add_ps(*v, _mm256_loadu_ps(p.add(i + 8 * l)));
            }
            i += 32;
        }
        let mut s = hsum(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ));
        while i < a.len() {
            s += *p.add(i);
            i += 1;
        }
        s
    }

    pv_kernels!(
        "avx2,fma",
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_fmadd_ps,
        _mm256_set1_ps,
        _mm256_add_ps,
        _mm256_storeu_ps
    );

    /// `y += a * x` (equal lengths).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        let n = y.len().min(x.len());
        let (yp, xp) = (y.as_mut_ptr(), x.as_ptr());
        let av = _mm256_set1_ps(a);
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(
                yp.add(i),
                _mm256_fmadd_ps(av, _mm256_loadu_ps(xp.add(i)), _mm256_loadu_ps(yp.add(i))),
            );
            i += 8;
        }
        while i < n {
            *yp.add(i) += a * *xp.add(i);
            i += 1;
        }
    }

    /// `x[i] = exp(x[i] - m)` for every element; returns their sum. Cephes-style range
    /// reduction and degree-5 polynomial (relative error below 2e-7 on the range used here,
    /// `x - m <= 0`); arguments below -87.3 give 0 like the scalar `exp` underflowing.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
        let n = x.len();
        let p = x.as_mut_ptr();
        let mv = _mm256_set1_ps(m);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mv));
            _mm256_storeu_ps(p.add(i), e);
            acc = _mm256_add_ps(acc, e);
            i += 8;
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let mut s = lanes.iter().sum::<f32>();
        while i < n {
            let e = (*p.add(i) - m).exp();
            *p.add(i) = e;
            s += e;
            i += 1;
        }
        s
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp8(x: __m256) -> __m256 {
        let lo = _mm256_set1_ps(-87.3);
        let under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
        let x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.3));
        // x = n ln2 + r, |r| <= ln2 / 2
        let fx = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_2e-3f32,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let y = _mm256_add_ps(_mm256_fmadd_ps(y, r2, r), _mm256_set1_ps(1.0));
        let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)),
            23,
        ));
        _mm256_andnot_ps(under, _mm256_mul_ps(y, pow2))
    }
}

/// AVX-512 kernels for the quantized formats, whose AVX2 forms are bound by the shuffle port:
/// FP8 takes two shuffle-port uops per 16 codes here against four (widening, lane extract,
/// two F16C conversions), MXFP4 five per 32 values against ten.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use half::bf16;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    unsafe fn load_bf16(p: *const bf16) -> __m512 {
        let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
        _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16))
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    unsafe fn load_f32(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }

    /// The streaming dot products of [`super::avx2`], 16 lanes wide, with a software
    /// prefetch into L2 a few KB ahead of the weight stream: one core's demand misses alone
    /// do not keep enough lines in flight to draw the memory bandwidth at decode.
    macro_rules! weight_dot_rows {
        ($wt:ty, $load:ident, $dot_rows:ident, $pf:expr) => {
            #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
            pub unsafe fn $dot_rows<const R: usize>(x: &[f32], k: usize, w: &[$wt]) -> [f32; R] {
                assert!(x.len() >= R * k && w.len() >= k);
                let mut acc0 = [_mm512_setzero_ps(); R];
                let mut acc1 = [_mm512_setzero_ps(); R];
                let xp = x.as_ptr();
                let wp = w.as_ptr();
                let mut i = 0;
                let size = std::mem::size_of::<$wt>();
                while i + 32 <= k {
                    // Software prefetch into L2, `$pf` bytes ahead, one per line this
                    // iteration reads (a hint: addresses past the matrix are harmless).
                    let ahead = (wp as *const i8).wrapping_add(i * size + $pf);
                    for line in 0..size / 2 {
                        _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(64 * line));
                    }
                    let w0 = $load(wp.add(i));
                    let w1 = $load(wp.add(i + 16));
                    for r in 0..R {
                        let xr = xp.add(r * k + i);
                        acc0[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), w0, acc0[r]);
                        acc1[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr.add(16)), w1, acc1[r]);
                    }
                    i += 32;
                }
                if i + 16 <= k {
                    let w0 = $load(wp.add(i));
                    for r in 0..R {
                        let xr = xp.add(r * k + i);
                        acc0[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), w0, acc0[r]);
                    }
                    i += 16;
                }
                let mut out = [0.0; R];
                for r in 0..R {
                    let mut s = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
                    for j in i..k {
                        s += *xp.add(r * k + j) * f32::from(*wp.add(j));
                    }
                    out[r] = s;
                }
                out
            }
        };
    }

    // Prefetch distances measured with `examples/linear_bandwidth` (2 vCPUs, AVX-512): bf16
    // 16–18 → 20–23 GB/s at 4 KB ahead, f32 23–24 → 25–28 at 2 KB.
    weight_dot_rows!(f32, load_f32, dot_rows_f32, 2048);
    weight_dot_rows!(bf16, load_bf16, dot_rows_bf16, 4096);

    /// Four heads' scores against one key (`d % 16 == 0`), the key loaded once per vector.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    pub unsafe fn dot4(q4: &[f32], key: &[f32]) -> [f32; 4] {
        let d = key.len();
        assert!(d % 16 == 0 && q4.len() >= 4 * d);
        let (qp, kp) = (q4.as_ptr(), key.as_ptr());
        let mut a = [_mm512_setzero_ps(); 4];
        for c in (0..d).step_by(16) {
            let kc = _mm512_loadu_ps(kp.add(c));
            for (h, acc) in a.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(h * d + c)), kc, *acc);
            }
        }
        a.map(|v| _mm512_reduce_add_ps(v))
    }

    pv_kernels!(
        "avx512f,avx512bw,avx2,fma",
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_fmadd_ps,
        _mm512_set1_ps,
        _mm512_add_ps,
        _mm512_storeu_ps
    );

    /// The F16C widening at 16 lanes: the GEMM path's dequantization, and the dot product
    /// for chunks that hold a zero-exponent code (see [`dot_rows_fp8`]); its whole dot
    /// product is kept as the tests' second opinion.
    #[cfg_attr(not(test), allow(dead_code))]
    mod f16c {
        use std::arch::x86_64::*;
        fp8_dot_rows!(
            "avx512f,avx512bw,avx2,fma",
            __m512,
            16,
            _mm512_setzero_ps,
            _mm512_loadu_ps,
            _mm512_fmadd_ps,
            _mm512_add_ps,
            _mm512_set1_ps,
            _mm512_reduce_add_ps,
            _mm512_mul_ps,
            _mm512_storeu_ps,
            |h| [_mm512_cvtph_ps(h)]
        );
    }
    pub use f16c::dequant_row_fp8;
    #[cfg(test)]
    pub use f16c::dot_rows_fp8 as dot_rows_fp8_f16c;

    /// `out[r] = x[r] · w` for `R` rows of `x` (each `k` long) and one FP8 weight row whose
    /// scales `scales[c / bc]` cover `bc` columns each, 32 codes per iteration, widened by
    /// [`fp8_f32x32`] (values times 2⁸); each block's partial sums are scaled back by the
    /// block scale / 2⁸. A block's last < 32 codes go through the table.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    pub unsafe fn dot_rows_fp8<const R: usize>(
        x: &[f32],
        k: usize,
        q: &[u8],
        scales: &[f32],
        bc: usize,
    ) -> [f32; R] {
        let t = crate::quant::e4m3_table();
        let mut acc = [_mm512_setzero_ps(); R];
        let mut tail = [0.0f32; R];
        for (b, &s) in scales.iter().enumerate().take(k.div_ceil(bc)) {
            let (c0, c1) = (b * bc, ((b + 1) * bc).min(k));
            let mut p = [[_mm512_setzero_ps(); 2]; R];
            let mut c = c0;
            while c + 32 <= c1 {
                fp8_chunk32(x, k, q, c, &mut p);
                c += 32;
            }
            let f = _mm512_set1_ps(s / 256.0);
            for r in 0..R {
                acc[r] = _mm512_fmadd_ps(_mm512_add_ps(p[r][0], p[r][1]), f, acc[r]);
                for cc in c..c1 {
                    tail[r] += s * t[*q.get_unchecked(cc) as usize] * *x.get_unchecked(r * k + cc);
                }
            }
        }
        fp8_reduce(acc, tail)
    }

    /// `out[r] = xs[r] · e4m3(q)` for `R` rows of `xs` (each `k` long) already multiplied
    /// by their column block's scale and by 2⁻⁸ (see `Fp8Block::dot_span`): one FP8 weight
    /// row with no block scale left to apply, so one chain of partial sums runs the whole
    /// row (widened as in [`dot_rows_fp8`]) and a short row costs no per-block epilogue.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    pub unsafe fn dot_rows_fp8_prescaled<const R: usize>(
        xs: &[f32],
        k: usize,
        q: &[u8],
    ) -> [f32; R] {
        let t = crate::quant::e4m3_table();
        let mut p = [[_mm512_setzero_ps(); 2]; R];
        let mut c = 0;
        while c + 32 <= k {
            fp8_chunk32(xs, k, q, c, &mut p);
            c += 32;
        }
        let mut out = [0.0f32; R];
        for r in 0..R {
            let mut tail = 0.0f32;
            for cc in c..k {
                tail += t[*q.get_unchecked(cc) as usize] * *xs.get_unchecked(r * k + cc);
            }
            out[r] = _mm512_reduce_add_ps(_mm512_add_ps(p[r][0], p[r][1])) + 256.0 * tail;
        }
        out
    }

    /// f32 bit patterns of m / 2 at index m < 8 (repeated to fill the 16-entry permute): a
    /// zero-exponent e4m3 code's value times 2⁸.
    static SUBNORMAL_F32: [u32; 16] = {
        let m = [0.0f32, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5];
        let mut t = [0u32; 16];
        let mut i = 0;
        while i < 16 {
            t[i] = m[i % 8].to_bits();
            i += 1;
        }
        t
    };

    /// The 32 e4m3 codes at `qp` as f32 values times 2⁸, exactly, 16 per vector: each code
    /// sign-extended to 32 bits and shifted left by 20 (sign to bit 31, exponent and
    /// mantissa to bits 26..20), then `(v & 0x87f0_0000) | 0x4000_0000` in one ternary-logic
    /// op — exponent field 128 + e. Four vector ops per 16 codes against six through F16C
    /// (whose widening alone takes two); decode's FP8 GEMV is bound by them on one core. A
    /// zero-exponent code (zero or subnormal: below 1/28672 of its block's largest value,
    /// rare in real weights) would come out wrong that way, so a half holding one is patched
    /// from [`SUBNORMAL_F32`] by a permute on the code's low four bits (the mantissa, as
    /// e = 0) with the sign put back; the test for it is one op per 32 codes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    unsafe fn fp8_f32x32(qp: *const u8) -> [__m512; 2] {
        let raw = _mm256_loadu_si256(qp as *const __m256i);
        // Bits 32..63 test the zero upper half: set, and dropped by the cast.
        let zero =
            _mm512_testn_epi8_mask(_mm512_zextsi256_si512(raw), _mm512_set1_epi8(0x78)) as u32;
        let v =
            [0, 1].map(|h| _mm512_cvtepi8_epi32(_mm_loadu_si128(qp.add(16 * h) as *const __m128i)));
        let mut bits = v.map(|v| {
            _mm512_ternarylogic_epi32::<0xEA>(
                _mm512_slli_epi32::<20>(v),
                _mm512_set1_epi32(0x87f0_0000u32 as i32),
                _mm512_set1_epi32(0x4000_0000),
            )
        });
        // One test and branch per 32 codes on the hot path; the patch is the rare path.
        if zero != 0 {
            let sub = _mm512_loadu_si512(SUBNORMAL_F32.as_ptr() as *const _);
            for (h, (b, v)) in bits.iter_mut().zip(v).enumerate() {
                let fix = _mm512_ternarylogic_epi32::<0xF8>(
                    _mm512_permutexvar_epi32(v, sub),
                    *b,
                    _mm512_set1_epi32(0x8000_0000u32 as i32),
                );
                *b = _mm512_mask_mov_epi32(*b, (zero >> (16 * h)) as u16, fix);
            }
        }
        bits.map(|b| _mm512_castsi512_ps(b))
    }

    /// The 32 codes at `c` dotted into `p` (see [`fp8_f32x32`]).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    unsafe fn fp8_chunk32<const R: usize>(
        x: &[f32],
        k: usize,
        q: &[u8],
        c: usize,
        p: &mut [[__m512; 2]; R],
    ) {
        let (xp, qp) = (x.as_ptr(), q.as_ptr().add(c));
        // Prefetch into L2 ahead of the codes (a hint; see the bf16 dot).
        if c % 64 == 0 {
            _mm_prefetch::<_MM_HINT_T1>((qp as *const i8).wrapping_add(2048));
        }
        let w = fp8_f32x32(qp);
        for (r, p) in p.iter_mut().enumerate() {
            for i in 0..2 {
                let xv = _mm512_loadu_ps(xp.add(r * k + c + i * 16));
                p[i] = _mm512_fmadd_ps(xv, w[i], p[i]);
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    fn fp8_reduce<const R: usize>(acc: [__m512; R], tail: [f32; R]) -> [f32; R] {
        let mut out = [0.0f32; R];
        for r in 0..R {
            out[r] = _mm512_reduce_add_ps(acc[r]) + tail[r];
        }
        out
    }

    /// MXFP4 dot products, 32 values (one scale block) per iteration: the 16 packed bytes
    /// widened to 16-bit lanes and each lane's two nibbles moved one byte apart (value
    /// order), looked up with `vpshufb` as twice their e2m1 value in i8, widened to f32 16 at
    /// a time, FMA'd with every row; each block's partial sums are then scaled by half its
    /// power of two (exact).
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    pub unsafe fn dot_rows_mxfp4<const R: usize>(
        x: &[f32],
        k: usize,
        q: &[u8],
        sc: &[u8],
    ) -> [f32; R] {
        let lut = _mm256_setr_epi8(
            0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12, 0, 1, 2, 3, 4, 6, 8, 12, 0,
            -1, -2, -3, -4, -6, -8, -12,
        );
        let lo = _mm256_set1_epi16(0x000f);
        let hi = _mm256_set1_epi16(0x0f00);
        let xp = x.as_ptr();
        let mut acc = [_mm512_setzero_ps(); R];
        for g in 0..k / 32 {
            if g % 4 == 0 {
                // Prefetch into L2 ahead of the codes (a hint; see the bf16 dot).
                _mm_prefetch::<_MM_HINT_T1>((q.as_ptr() as *const i8).wrapping_add(g * 16 + 2048));
            }
            let w16 =
                _mm256_cvtepu8_epi16(_mm_loadu_si128(q.as_ptr().add(g * 16) as *const __m128i));
            let idx = _mm256_or_si256(
                _mm256_and_si256(w16, lo),
                _mm256_and_si256(_mm256_slli_epi16(w16, 4), hi),
            );
            let v = _mm256_shuffle_epi8(lut, idx);
            let w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
            let w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1)));
            let s = _mm512_set1_ps(0.5 * crate::quant::e8m0_decode(sc[g]));
            for r in 0..R {
                let xr = xp.add(r * k + g * 32);
                let p = _mm512_fmadd_ps(
                    _mm512_loadu_ps(xr.add(16)),
                    w1,
                    _mm512_mul_ps(_mm512_loadu_ps(xr), w0),
                );
                acc[r] = _mm512_fmadd_ps(p, s, acc[r]);
            }
        }
        let mut out = [0.0f32; R];
        for r in 0..R {
            out[r] = _mm512_reduce_add_ps(acc[r]);
        }
        out
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    /// The AVX-512 f32 and bf16 dot products agree with the AVX2 ones and the portable sum,
    /// for lengths with and without a 16- or 32-wide tail.
    #[test]
    fn avx512_dots_match_avx2_and_portable() {
        if !super::has_avx512() || !super::has_avx2() {
            eprintln!("skipped: no AVX-512 F/BW (or AVX2) on this CPU");
            return;
        }
        let mut rng = crate::rng::Rng::new(11);
        for &k in &[16usize, 32, 48, 1024, 1000, 13, 77] {
            let x: Vec<f32> = (0..3 * k).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let wf: Vec<f32> = (0..k).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let wb: Vec<half::bf16> = wf.iter().map(|v| half::bf16::from_f32(*v)).collect();
            // SAFETY: AVX-512 F/BW and AVX2/FMA checked above.
            let (a5, a2, b5, b2) = unsafe {
                (
                    super::avx512::dot_rows_f32::<3>(&x, k, &wf),
                    super::avx2::dot_rows_f32::<3>(&x, k, &wf),
                    super::avx512::dot_rows_bf16::<3>(&x, k, &wb),
                    super::avx2::dot_rows_bf16::<3>(&x, k, &wb),
                )
            };
            for r in 0..3 {
                let xr = &x[r * k..(r + 1) * k];
                let pf = super::dot_portable(xr, &wf, |v| v);
                let pb = super::dot_portable(xr, &wb, |v: half::bf16| v.to_f32());
                let tol = |p: f32| 1e-5 * p.abs().max(1.0);
                assert!(
                    (a5[r] - pf).abs() <= tol(pf) && (a2[r] - pf).abs() <= tol(pf),
                    "f32 k={k}"
                );
                assert!(
                    (b5[r] - pb).abs() <= tol(pb) && (b2[r] - pb).abs() <= tol(pb),
                    "bf16 k={k}"
                );
            }
        }
    }

    /// The AVX2 quantized dot products equal the portable ones (which the oracle tests reach
    /// only on CPUs without AVX2), for every code and tails shorter than a vector.
    #[test]
    fn quantized_avx2_dots_match_portable() {
        if !super::has_f16c() {
            eprintln!("skipped: no AVX2/FMA/F16C on this CPU");
            return;
        }
        let mut rng = crate::rng::Rng::new(9);
        // Codes at random (most 32-code chunks hold a zero-exponent code), codes none of
        // which has a zero exponent (AVX-512's direct widening only), and such codes with a
        // zero or subnormal now and then (both AVX-512 widenings in one block).
        let cases = [
            (64usize, 32usize),
            (200, 64),
            (96, 128),
            (13, 8),
            (300, 40),
            (512, 128),
        ];
        // Also codes that all have a zero exponent, whose dot is then theirs alone (next to
        // normal codes their values are too small for a tolerance to see).
        for (&(k, bc), codes) in cases.iter().flat_map(|c| [(c, 0), (c, 1), (c, 2), (c, 3)]) {
            let x: Vec<f32> = (0..3 * k).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let q: Vec<u8> = (0..k)
                .map(|_| {
                    let b = rng.next_u64() as u8;
                    let c = match codes {
                        0 => b,
                        1 => b | 0x08,
                        2 if rng.next_u64() % 40 == 0 => b & 0x87,
                        2 => b | 0x08,
                        _ => b & 0x87,
                    };
                    // Any code but the two NaNs.
                    if c & 0x7f == 0x7f {
                        c ^ 1
                    } else {
                        c
                    }
                })
                .collect();
            let s: Vec<f32> = (0..k.div_ceil(bc)).map(|i| 0.01 * (i + 1) as f32).collect();
            // SAFETY: AVX2 and FMA checked above.
            let a = unsafe { super::avx2::dot_rows_fp8::<3>(&x, k, &q, &s, bc) };
            let p = super::portable_dot_rows_fp8::<3>(&x, k, &q, &s, bc);
            // Tolerances scale with the sum of the terms' magnitudes (a sum that cancels
            // keeps the rounding of its terms).
            let xa: Vec<f32> = x.iter().map(|v| v.abs()).collect();
            let qa: Vec<u8> = q.iter().map(|c| c & 0x7f).collect();
            let mag = super::portable_dot_rows_fp8::<3>(&xa, k, &qa, &s, bc);
            let tol = |r: usize| 1e-6 * mag[r].max(1e-6);
            for (r, (a, p)) in a.iter().zip(&p).enumerate() {
                assert!((a - p).abs() <= tol(r), "fp8 k={k}: {a} vs {p}");
            }
            // Dequantized rows (the GEMM path's widening) are exact on every path.
            let t = crate::quant::e4m3_table();
            let want: Vec<f32> = (0..k).map(|c| t[q[c] as usize] * s[c / bc]).collect();
            let mut got = vec![0.0f32; k];
            // SAFETY: AVX2, FMA and F16C checked above.
            unsafe { super::avx2::dequant_row_fp8(&q, &s, bc, &mut got) };
            assert_eq!(got, want, "avx2 dequant k={k}");
            if super::has_avx512() {
                // SAFETY: AVX-512 F/BW checked.
                unsafe { super::avx512::dequant_row_fp8(&q, &s, bc, &mut got) };
                assert_eq!(got, want, "avx512 dequant k={k}");
            }
            if super::has_avx512() {
                // SAFETY: AVX-512 F/BW checked.
                let a = unsafe { super::avx512::dot_rows_fp8::<3>(&x, k, &q, &s, bc) };
                // SAFETY: as above.
                let f = unsafe { super::avx512::dot_rows_fp8_f16c::<3>(&x, k, &q, &s, bc) };
                for (r, ((a, f), p)) in a.iter().zip(&f).zip(&p).enumerate() {
                    let tol = tol(r);
                    assert!(
                        (a - p).abs() <= tol && (f - p).abs() <= tol,
                        "avx512 k={k} codes {codes}: {a}, {f} (f16c) vs {p}"
                    );
                }
            } else {
                eprintln!("AVX-512 FP8 path not checked: no AVX-512 F/BW on this CPU");
            }
            if k % 32 == 0 {
                let sc: Vec<u8> = (0..k / 32).map(|i| 120 + i as u8).collect();
                let q4: Vec<u8> = (0..k / 2).map(|_| rng.next_u64() as u8).collect();
                // SAFETY: as above.
                let a = unsafe { super::avx2::dot_rows_mxfp4::<3>(&x, k, &q4, &sc) };
                let p = super::portable_dot_rows_mxfp4::<3>(&x, k, &q4, &sc);
                let qa: Vec<u8> = q4.iter().map(|c| c & 0x77).collect();
                let mag = super::portable_dot_rows_mxfp4::<3>(&xa, k, &qa, &sc);
                let tol = |r: usize| 1e-6 * mag[r].max(1e-6);
                for (r, (a, p)) in a.iter().zip(&p).enumerate() {
                    assert!((a - p).abs() <= tol(r), "mxfp4 k={k}: {a} vs {p}");
                }
                if super::has_avx512() {
                    // SAFETY: AVX-512 F/BW checked.
                    let a = unsafe { super::avx512::dot_rows_mxfp4::<3>(&x, k, &q4, &sc) };
                    for (r, (a, p)) in a.iter().zip(&p).enumerate() {
                        assert!((a - p).abs() <= tol(r), "avx512 mxfp4 k={k}: {a} vs {p}");
                    }
                }
            }
        }
    }

    #[test]
    fn vector_exp_matches_scalar_exp() {
        if !super::has_avx2() {
            eprintln!("skipped: no AVX2/FMA on this CPU (the portable path uses scalar exp)");
            return;
        }
        let mut rng = crate::rng::Rng::new(5);
        for n in [1usize, 7, 8, 9, 64, 1000] {
            let x: Vec<f32> = (0..n).map(|_| -100.0 * rng.next_f64() as f32).collect();
            let m = 0.25f32;
            let mut got = x.clone();
            // SAFETY: AVX2 and FMA checked above.
            let s = unsafe { super::avx2::exp_sub_sum(&mut got, m) };
            let want: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 4e-7 * w + 1e-37, "{g} vs {w}");
            }
            let ws: f32 = want.iter().sum();
            assert!((s - ws).abs() <= 1e-6 * ws + 1e-37, "{s} vs {ws}");
        }
    }
}
