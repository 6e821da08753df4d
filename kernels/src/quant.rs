//! Quantized weight layouts, read as released and dequantized in registers (W8A16: the
//! activations stay `f32`).
//!
//! FP8 block-scaled (DeepSeek-V3/R1, Kimi K2, Qwen3 *-FP8): `q[n, k]` holds e4m3 bytes, and
//! `scale_inv[⌈n/br⌉, ⌈k/bc⌉]` one `f32` per `br × bc` block; the weight is
//! `w[r, c] = e4m3(q[r, c]) · scale_inv[r / br, c / bc]`, exactly as transformers'
//! dequantizing loader computes it.

use std::sync::OnceLock;

/// The 256 values of FP8 e4m3 (OCP "fn": no infinities, `0x7f`/`0xff` are NaN).
fn e4m3_table() -> &'static [f32; 256] {
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

    /// Row `r` dequantized into `out` (`k` long).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let t = e4m3_table();
        let row = &self.q[r * self.k..(r + 1) * self.k];
        for (c0, (o, q)) in out
            .chunks_mut(self.block[1])
            .zip(row.chunks(self.block[1]))
            .enumerate()
        {
            let s = self.scale(r, c0 * self.block[1]);
            for (ov, qv) in o.iter_mut().zip(q) {
                *ov = t[*qv as usize] * s;
            }
        }
    }

    /// The element at flat index `i`.
    pub fn get(&self, i: usize) -> f32 {
        let (r, c) = (i / self.k, i % self.k);
        e4m3_table()[self.q[i] as usize] * self.scale(r, c)
    }

    /// `out[i] = x[i] · w[j]` for `R` activation rows at stride `k`: per block of columns,
    /// the e4m3 values are decoded once into a register-sized buffer and dotted with every
    /// row, then scaled by the block's factor.
    pub fn dot_rows<const R: usize>(&self, x: &[f32], j: usize) -> [f32; R] {
        let t = e4m3_table();
        let k = self.k;
        let row = &self.q[j * k..(j + 1) * k];
        let mut acc = [0.0f32; R];
        let mut buf = [0.0f32; 128];
        let mut c0 = 0;
        while c0 < k {
            let c1 = (c0 + self.block[1]).min(k);
            let s = self.scale(j, c0);
            let mut c = c0;
            while c < c1 {
                let e = (c + 128).min(c1);
                for (b, q) in buf.iter_mut().zip(&row[c..e]) {
                    *b = t[*q as usize];
                }
                for (ri, a) in acc.iter_mut().enumerate() {
                    *a += s * crate::linear::dot(&x[ri * k + c..ri * k + e], &buf[..e - c]);
                }
                c = e;
            }
            c0 = c1;
        }
        acc
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
