//! RMSNorm, computed in `f32` as Hugging Face does for `f32` models:
//! `w * (x / sqrt(mean(x²) + eps))`.

/// Normalises each `w.len()`-long row of `x` in place.
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    let h = w.len();
    debug_assert_eq!(x.len() % h, 0);
    for row in x.chunks_mut(h) {
        let mut acc = [0.0f32; 8];
        let chunks = h / 8;
        for c in 0..chunks {
            for l in 0..8 {
                let v = row[c * 8 + l];
                acc[l] += v * v;
            }
        }
        let mut ss: f32 = acc.iter().sum();
        for v in &row[chunks * 8..] {
            ss += v * v;
        }
        let inv = 1.0 / (ss / h as f32 + eps).sqrt();
        for (v, wi) in row.iter_mut().zip(w) {
            *v = wi * (*v * inv);
        }
    }
}
