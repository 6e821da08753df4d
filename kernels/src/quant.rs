//! Quantized weight layouts, read as released and dequantized in registers (W8A16: the
//! activations stay `f32`).
//!
//! FP8 block-scaled (DeepSeek-V3/R1, Kimi K2, Qwen3 *-FP8): `q[n, k]` holds e4m3 bytes, and
//! `scale_inv[⌈n/br⌉, ⌈k/bc⌉]` one `f32` per `br × bc` block; the weight is
//! `w[r, c] = e4m3(q[r, c]) · scale_inv[r / br, c / bc]`, exactly as transformers'
//! dequantizing loader computes it.
//!
//! MXFP4 (GPT-OSS experts): `blocks[n, k/32, 16]` packs two e2m1 values per byte (low nibble
//! first), `scales[n, k/32]` one e8m0 exponent per 32 values; the weight is
//! `w[r, 32g + 2b + h] = e2m1(nibble h of blocks[r, g, b]) · 2^(scales[r, g] − 127)`, as
//! transformers' `convert_moe_packed_tensors` computes it. A view may take every `step`-th
//! row of the stored matrix (GPT-OSS interleaves gate and up rows in one fused tensor), so
//! both halves are read in place.

use std::sync::OnceLock;

/// The 256 values of FP8 e4m3 (OCP "fn": no infinities, `0x7f`/`0xff` are NaN).
pub(crate) fn e4m3_table() -> &'static [f32; 256] {
    static T: OnceLock<[f32; 256]> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = [0.0f32; 256];
        for (b, v) in t.iter_mut().enumerate() {
            *v = e4m3_decode(b as u8);
        }
        t
    })
}

/// Decodes one e4m3 byte: 1 sign, 4 exponent (bias 7), 3 mantissa bits; subnormals at
/// exponent 0; `S.1111.111` is NaN.
pub fn e4m3_decode(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = ((b >> 3) & 0x0f) as i32;
    let m = (b & 0x07) as f32;
    if e == 0x0f && b & 0x07 == 0x07 {
        return f32::NAN;
    }
    if e == 0 {
        sign * m / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + m / 8.0) * 2f32.powi(e - 7)
    }
}

/// A borrowed FP8 block-scaled matrix `[n, k]`.
#[derive(Clone, Copy, Debug)]
pub struct Fp8Block<'a> {
    pub q: &'a [u8],
    pub scale_inv: &'a [f32],
    pub k: usize,
    /// Block rows and columns (`weight_block_size`).
    pub block: [usize; 2],
}

impl Fp8Block<'_> {
    fn scale_cols(&self) -> usize {
        self.k.div_ceil(self.block[1])
    }

    #[inline]
    fn scale(&self, r: usize, c: usize) -> f32 {
        self.scale_inv[(r / self.block[0]) * self.scale_cols() + c / self.block[1]]
    }

    /// Row `r`'s codes and the scales of its block row.
    #[inline]
    fn row(&self, r: usize) -> (&[u8], &[f32]) {
        let (k, sc) = (self.k, self.scale_cols());
        let b = r / self.block[0];
        (
            &self.q[r * k..(r + 1) * k],
            &self.scale_inv[b * sc..(b + 1) * sc],
        )
    }

    /// Row `r` dequantized into `out` (`k` long).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let (q, s) = self.row(r);
        crate::simd::dequant_row_fp8(q, s, self.block[1], &mut out[..self.k]);
    }

    /// The element at flat index `i`.
    pub fn get(&self, i: usize) -> f32 {
        let (r, c) = (i / self.k, i % self.k);
        e4m3_table()[self.q[i] as usize] * self.scale(r, c)
    }

    /// `out[i] = x[i] · w[j]` for `R` activation rows at stride `k`: the e4m3 codes are
    /// decoded in registers and each block's partial sums scaled by its factor.
    pub fn dot_rows<const R: usize>(&self, x: &[f32], j: usize) -> [f32; R] {
        let (q, s) = self.row(j);
        crate::simd::dot_rows_fp8::<R>(x, self.k, q, s, self.block[1])
    }

    /// `t[jj * m + r] = x[r] · w[j0 + jj]` for the `t.len() / m` weight rows from `j0`
    /// and the `m` rows of `x` (decode's few-row products), where this CPU has the kernel for
    /// it (AVX-512; `false` otherwise, `t` untouched). For each stretch of rows in one block
    /// row, `x` is multiplied once by that block row's scales (and 2⁻⁸, which the kernel's
    /// widening of the codes undoes), so every weight row is then one plain dot product with
    /// no per-block scaling: the scales cost `m · k` multiplies per `block[0]` rows instead
    /// of a reduction per block per row. (Rounding: each `x · scale` is rounded once more
    /// than when the scale multiplies a block's partial sum; within f32 noise.)
    pub fn dot_span(&self, x: &[f32], m: usize, j0: usize, t: &mut [f32]) -> bool {
        if !crate::simd::has_avx512() || m == 0 {
            return false;
        }
        let (k, [br, bc]) = (self.k, self.block);
        let rows = t.len() / m;
        let mut xs = vec![0.0f32; m * k];
        let mut jj = 0;
        while jj < rows {
            let j = j0 + jj;
            let end = (((j / br) + 1) * br - j0).min(rows);
            let (_, s) = self.row(j);
            for (xr, xsr) in x.chunks_exact(k).zip(xs.chunks_exact_mut(k)).take(m) {
                for ((o, v), f) in xsr.chunks_mut(bc).zip(xr.chunks(bc)).zip(s) {
                    let f = f * (1.0 / 256.0);
                    for (o, v) in o.iter_mut().zip(v) {
                        *o = v * f;
                    }
                }
            }
            for jr in jj..end {
                let q = &self.q[(j0 + jr) * k..(j0 + jr + 1) * k];
                let o = &mut t[jr * m..(jr + 1) * m];
                let mut r = 0;
                macro_rules! run {
                    ($R:literal) => {{
                        let v = crate::simd::dot_rows_fp8_prescaled::<$R>(&xs[r * k..], k, q)
                            .expect("AVX-512 checked above");
                        o[r..r + $R].copy_from_slice(&v);
                        r + $R
                    }};
                }
                while m - r >= 4 {
                    r = run!(4);
                }
                if m - r >= 2 {
                    r = run!(2);
                }
                if m - r == 1 {
                    r = run!(1);
                }
                debug_assert_eq!(r, m);
            }
            jj = end;
        }
        true
    }

    /// Rows `r0..r0 + n` as an owned block-scaled matrix, transposed (`[k, n]`) if asked:
    /// exact, no value is re-rounded. Where `r0` is not on a block boundary the slice's row
    /// blocks shrink to `gcd(br, r0 mod br)` rows, which never straddle a stored block.
    pub fn rows(&self, r0: usize, n: usize, transpose: bool) -> Fp8Owned {
        let [br, bc] = self.block;
        let k = self.k;
        let rb = if r0 % br == 0 { br } else { gcd(br, r0 % br) };
        let (sc, gr) = (self.scale_cols(), n.div_ceil(rb));
        let scale = |j: usize, cb: usize| self.scale_inv[((r0 + j * rb) / br) * sc + cb];
        if !transpose {
            let mut grid = Vec::with_capacity(gr * sc);
            for j in 0..gr {
                grid.extend((0..sc).map(|cb| scale(j, cb)));
            }
            return Fp8Owned {
                q: self.q[r0 * k..(r0 + n) * k].to_vec(),
                scale_inv: grid,
                k,
                block: [rb, bc],
            };
        }
        let mut q = vec![0u8; k * n];
        for i in 0..n {
            for c in 0..k {
                q[c * n + i] = self.q[(r0 + i) * k + c];
            }
        }
        let mut grid = Vec::with_capacity(sc * gr);
        for cb in 0..sc {
            grid.extend((0..gr).map(|j| scale(j, cb)));
        }
        Fp8Owned {
            q,
            scale_inv: grid,
            k: n,
            block: [bc, rb],
        }
    }

    /// The whole matrix in `f32` (for the GEMM path).
    pub fn to_f32(&self) -> Vec<f32> {
        let n = self.q.len() / self.k;
        let mut out = vec![0.0f32; n * self.k];
        for (r, o) in out.chunks_mut(self.k).enumerate() {
            self.row_into(r, o);
        }
        out
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// An owned FP8 block-scaled matrix (a slice of a stored one; see [`Fp8Block::rows`]).
#[derive(Clone, Debug)]
pub struct Fp8Owned {
    pub q: Vec<u8>,
    pub scale_inv: Vec<f32>,
    pub k: usize,
    pub block: [usize; 2],
}

impl Fp8Owned {
    pub fn view(&self) -> Fp8Block<'_> {
        Fp8Block {
            q: &self.q,
            scale_inv: &self.scale_inv,
            k: self.k,
            block: self.block,
        }
    }
}

/// The 16 values of FP4 e2m1 (OCP MX): 1 sign, 2 exponent (bias 1), 1 mantissa bit.
pub const E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Values per MXFP4 scale block.
pub const MX_BLOCK: usize = 32;

/// An e8m0 scale: `2^(e − 127)`, exact in `f32` (`2^-127` is subnormal); 255 is NaN.
#[inline]
pub fn e8m0_decode(e: u8) -> f32 {
    match e {
        255 => f32::NAN,
        0 => f32::from_bits(1 << 22),
        e => f32::from_bits((e as u32) << 23),
    }
}

/// A borrowed MXFP4 matrix `[n, k]` (`k` a multiple of 32): row `r` is stored row `r · step`
/// of `blocks` / `scales`, which begin at the view's row 0.
#[derive(Clone, Copy, Debug)]
pub struct Mxfp4<'a> {
    pub blocks: &'a [u8],
    pub scales: &'a [u8],
    pub n: usize,
    pub k: usize,
    pub step: usize,
}

impl<'a> Mxfp4<'a> {
    /// A view of `n` rows, checked against the slices (`None` when they are too short or `k`
    /// is not a multiple of 32).
    pub fn new(
        blocks: &'a [u8],
        scales: &'a [u8],
        n: usize,
        k: usize,
        step: usize,
    ) -> Option<Self> {
        if k % MX_BLOCK != 0 || step == 0 {
            return None;
        }
        let stored = if n == 0 { 0 } else { (n - 1) * step + 1 };
        (blocks.len() >= stored * k / 2 && scales.len() >= stored * k / MX_BLOCK).then_some(Mxfp4 {
            blocks,
            scales,
            n,
            k,
            step,
        })
    }

    /// Packed bytes and scales of row `r`.
    #[inline]
    pub fn row(&self, r: usize) -> (&'a [u8], &'a [u8]) {
        let s = r * self.step;
        (
            &self.blocks[s * self.k / 2..(s + 1) * self.k / 2],
            &self.scales[s * self.k / MX_BLOCK..(s + 1) * self.k / MX_BLOCK],
        )
    }

    /// Bytes this view reads (packed values and scales).
    pub fn nbytes(&self) -> usize {
        self.n * (self.k / 2 + self.k / MX_BLOCK)
    }

    /// Row `r` dequantized into `out` (`k` long).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        // Both values of a byte from one lookup.
        static PAIRS: OnceLock<[[f32; 2]; 256]> = OnceLock::new();
        let pairs = PAIRS.get_or_init(|| std::array::from_fn(|b| [E2M1[b & 15], E2M1[b >> 4]]));
        let (b, s) = self.row(r);
        for ((o, q), e) in out.chunks_mut(MX_BLOCK).zip(b.chunks(MX_BLOCK / 2)).zip(s) {
            let sc = e8m0_decode(*e);
            for (pair, byte) in o.chunks_mut(2).zip(q) {
                let [lo, hi] = pairs[*byte as usize];
                pair[0] = lo * sc;
                pair[1] = hi * sc;
            }
        }
    }

    /// The element at flat index `i`.
    pub fn get(&self, i: usize) -> f32 {
        let (r, c) = (i / self.k, i % self.k);
        let (b, s) = self.row(r);
        let byte = b[c / 2];
        let nib = if c % 2 == 0 { byte & 15 } else { byte >> 4 };
        E2M1[nib as usize] * e8m0_decode(s[c / MX_BLOCK])
    }

    /// `out[i] = x[i] · w[j]` for `R` activation rows at stride `k`, each 32-value block
    /// decoded once into registers and scaled after its dot products.
    pub fn dot_rows<const R: usize>(&self, x: &[f32], j: usize) -> [f32; R] {
        crate::simd::dot_rows_mxfp4::<R>(x, self.k, self.row(j))
    }

    /// The whole matrix in `f32` (for the GEMM path).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.n * self.k];
        for (r, o) in out.chunks_mut(self.k).enumerate() {
            self.row_into(r, o);
        }
        out
    }
}

/// The e4m3 code nearest to `x` (ties to the even code), saturating at ±448; NaN maps to
/// `0x7f`. Inverse of [`e4m3_decode`] on its finite values.
pub fn e4m3_encode(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let t = e4m3_table();
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    // Codes 0x00..=0x7e are the non-negative finite values, increasing.
    let (mut lo, mut hi) = (0usize, 0x7e);
    if a >= t[hi] {
        return sign | hi as u8;
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if t[mid] <= a {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (dl, dh) = (a - t[lo], t[hi] - a);
    let code = if dl < dh || (dl == dh && lo % 2 == 0) {
        lo
    } else {
        hi
    };
    sign | code as u8
}

/// The e2m1 nibble nearest to `x` (ties to the even code), saturating at ±6.
pub fn e2m1_encode(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 8u8 } else { 0 };
    let a = x.abs();
    let mut best = 0usize;
    for (c, v) in E2M1[..8].iter().enumerate() {
        let (d, db) = ((a - v).abs(), (a - E2M1[best]).abs());
        if d < db || (d == db && c % 2 == 0) {
            best = c;
        }
    }
    sign | best as u8
}

/// Block-scaled FP8 of a row-major `[n, k]` matrix: per `block` tile, `scale_inv = amax /
/// 448` (1 for an all-zero tile) and `q = e4m3(w / scale_inv)`. Returns `(q, scale_inv)` in
/// the released layout.
pub fn quantize_fp8(w: &[f32], n: usize, k: usize, block: [usize; 2]) -> (Vec<u8>, Vec<f32>) {
    let (sr, sc) = (n.div_ceil(block[0]), k.div_ceil(block[1]));
    let mut scales = vec![0.0f32; sr * sc];
    for r in 0..n {
        for c in 0..k {
            let s = &mut scales[(r / block[0]) * sc + c / block[1]];
            *s = s.max(w[r * k + c].abs());
        }
    }
    for s in &mut scales {
        *s = if *s > 0.0 { *s / 448.0 } else { 1.0 };
    }
    let q = (0..n * k)
        .map(|i| {
            let (r, c) = (i / k, i % k);
            e4m3_encode(w[i] / scales[(r / block[0]) * sc + c / block[1]])
        })
        .collect();
    (q, scales)
}

/// MXFP4 of one row of `k` values (`k % 32 == 0`), appended to `blocks` (`k / 2` bytes) and
/// `scales` (`k / 32` e8m0 exponents): each block's exponent is the OCP MX rule's,
/// `⌊log2 amax⌋ − 2` (e2m1's largest exponent), the values then rounded to the nearest e2m1,
/// saturating at ±6.
pub fn quantize_mxfp4_row(row: &[f32], blocks: &mut Vec<u8>, scales: &mut Vec<u8>) {
    assert!(
        row.len() % MX_BLOCK == 0,
        "MXFP4 rows are whole blocks of 32"
    );
    for b in row.chunks(MX_BLOCK) {
        let amax = b.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let e = if amax > 0.0 {
            (amax.log2().floor() as i32 - 2).clamp(-127, 127)
        } else {
            -127
        };
        let inv = 2f32.powi(-e);
        scales.push((e + 127) as u8);
        for pair in b.chunks(2) {
            blocks.push(e2m1_encode(pair[0] * inv) | (e2m1_encode(pair[1] * inv) << 4));
        }
    }
}
