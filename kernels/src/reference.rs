//! Plain, obviously-correct implementations used as test oracles for the fast kernels.
//! Accumulation is in `f64` where that makes the oracle strictly more accurate.

use crate::linear::WeightRef;

/// `out[m, n] = x[m, k] · w[n, k]ᵀ`, accumulated in f64.
pub fn linear(x: &[f32], m: usize, k: usize, w: WeightRef<'_>, n: usize) -> Vec<f32> {
    let mut out = vec![0.0; m * n];
    for r in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for i in 0..k {
                s += x[r * k + i] as f64 * w.get(j * k + i) as f64;
            }
            out[r * n + j] = s as f32;
        }
    }
    out
}

/// RMSNorm of each `h`-long row: `w * x / sqrt(mean(x²) + eps)`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let h = w.len();
    let mut out = vec![0.0; x.len()];
    for (row, o) in x.chunks(h).zip(out.chunks_mut(h)) {
        let ms = row.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / h as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        for i in 0..h {
            o[i] = (w[i] as f64 * row[i] as f64 * inv) as f32;
        }
    }
    out
}

/// Softmax over all of `x`, in f64.
pub fn softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = x.iter().map(|v| (*v as f64 - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| (v / s) as f32).collect()
}

/// Causal attention for one query against `keys`/`values` (`[len, head_dim]` each), using a
/// full materialised score vector: `softmax(q·Kᵀ · scale) · V`.
pub fn attention_one(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], scale: f32) -> Vec<f32> {
    let scores: Vec<f32> = keys
        .iter()
        .map(|k| {
            (q.iter()
                .zip(k)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
                * scale as f64) as f32
        })
        .collect();
    let p = softmax(&scores);
    let d = q.len();
    let mut out = vec![0.0f64; d];
    for (pi, v) in p.iter().zip(values) {
        for i in 0..d {
            out[i] += *pi as f64 * v[i] as f64;
        }
    }
    out.into_iter().map(|v| v as f32).collect()
}

/// Top-k routing by sorting: softmax over all experts, take the k largest (ties to the lower
/// id), optionally renormalise the chosen weights to sum to one.
pub fn route(logits: &[f32], k: usize, normalize: bool) -> (Vec<u32>, Vec<f32>) {
    let p = softmax(logits);
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|a, b| p[*b].partial_cmp(&p[*a]).unwrap().then(a.cmp(b)));
    let ids: Vec<u32> = idx[..k].iter().map(|i| *i as u32).collect();
    let mut w: Vec<f32> = idx[..k].iter().map(|i| p[*i]).collect();
    if normalize {
        let s: f32 = w.iter().sum();
        for v in &mut w {
            *v /= s;
        }
    }
    (ids, w)
}
