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
    attention_scores_softmax(q, keys, values, scale, None)
}

/// Scores in f64, an optional sink logit joining the softmax (then dropped), the weighted sum
/// of values.
fn attention_scores_softmax(
    q: &[f32],
    keys: &[Vec<f32>],
    values: &[Vec<f32>],
    scale: f32,
    sink: Option<f32>,
) -> Vec<f32> {
    let mut scores: Vec<f32> = keys
        .iter()
        .map(|k| {
            (q.iter()
                .zip(k)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
                * scale as f64) as f32
        })
        .collect();
    scores.extend(sink);
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

/// [`attention_one`] with a sink logit joining the softmax and then dropped (GPT-OSS).
pub fn attention_one_with_sink(
    q: &[f32],
    keys: &[Vec<f32>],
    values: &[Vec<f32>],
    scale: f32,
    sink: f32,
) -> Vec<f32> {
    attention_scores_softmax(q, keys, values, scale, Some(sink))
}

/// Indices of `v` sorted by value, descending, ties to the lower index.
fn order(v: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|a, b| v[*b].partial_cmp(&v[*a]).unwrap().then(a.cmp(b)));
    idx
}

/// DeepSeek-V3's router by sorting: sigmoid scores, groups ranked by the sum of their two
/// best biased scores, experts outside the best `topk_group` groups masked to 0, top-k of the
/// biased (masked) scores, unbiased weights, renormalised (+1e-20) and scaled.
#[allow(clippy::too_many_arguments)]
pub fn route_sigmoid_grouped(
    logits: &[f32],
    bias: &[f32],
    n_group: usize,
    topk_group: usize,
    k: usize,
    normalize: bool,
    scaling: f32,
) -> (Vec<u32>, Vec<f32>) {
    let s: Vec<f32> = logits.iter().map(|x| 1.0 / (1.0 + (-x).exp())).collect();
    let mut c: Vec<f32> = s.iter().zip(bias).map(|(a, b)| a + b).collect();
    let per = c.len() / n_group;
    let gs: Vec<f32> = c
        .chunks(per)
        .map(|g| order(g).iter().take(2).map(|&i| g[i]).sum())
        .collect();
    let keep: Vec<usize> = order(&gs).into_iter().take(topk_group).collect();
    for (gi, g) in c.chunks_mut(per).enumerate() {
        if !keep.contains(&gi) {
            g.fill(0.0);
        }
    }
    let ids: Vec<usize> = order(&c).into_iter().take(k).collect();
    let mut w: Vec<f32> = ids.iter().map(|&i| s[i]).collect();
    let sum: f32 = w.iter().sum();
    for v in &mut w {
        if normalize {
            *v /= sum + 1e-20;
        }
        *v *= scaling;
    }
    (ids.into_iter().map(|i| i as u32).collect(), w)
}

/// GPT-OSS's router by sorting: the k largest logits, softmax over them.
pub fn route_topk_softmax(logits: &[f32], k: usize) -> (Vec<u32>, Vec<f32>) {
    let ids: Vec<usize> = order(logits).into_iter().take(k).collect();
    let top: Vec<f32> = ids.iter().map(|&i| logits[i]).collect();
    (ids.into_iter().map(|i| i as u32).collect(), softmax(&top))
}
