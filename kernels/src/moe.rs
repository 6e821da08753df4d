//! Mixture-of-experts routing and the slot-ordered combine.
//!
//! Routers ([`Router`]), as the reference implementations compute them, all in `f32`:
//! - `Softmax`: softmax over all experts, the `k` largest probabilities (Qwen, Mixtral, OLMoE),
//!   optionally renormalised to sum to one (`norm_topk_prob`).
//! - `SigmoidGrouped` (DeepSeek-V3, Kimi K2): sigmoid scores; choice by score plus a per-expert
//!   correction bias, restricted to the `topk_group` groups whose two best biased scores sum
//!   highest (other experts' choice values are masked to 0, as the reference masks them); the
//!   weights are the unbiased scores of the chosen experts, optionally renormalised (plus
//!   1e-20), times `scaling`.
//! - `TopkSoftmax` (GPT-OSS): the `k` largest logits (the router's bias already added), then a
//!   softmax over those `k`.
//!
//! Selection is by value, descending, ties to the lower expert id; slot `s` of a token is its
//! `s`-th choice. Nothing bounds the number of experts.
//!
//! Combine: a token's output is `Σ_s w[s] · y[s]` summed in slot order. The order never
//! depends on which rank computed which slot, so results are identical for any placement.

use crate::softmax;

/// How router logits become expert choices and weights.
#[derive(Clone, Copy, Debug)]
pub enum Router<'a> {
    Softmax {
        renormalize: bool,
    },
    SigmoidGrouped {
        /// Per-expert `e_score_correction_bias` (used for choosing only).
        bias: &'a [f32],
        n_group: usize,
        topk_group: usize,
        renormalize: bool,
        scaling: f32,
    },
    TopkSoftmax,
}

/// The indices of the `k` largest values of `v`, descending, ties to the lower index.
/// `taken` is scratch of `v.len()`.
fn top_k(v: &[f32], k: usize, taken: &mut [bool], chosen: &mut Vec<usize>) {
    taken.fill(false);
    chosen.clear();
    for _ in 0..k {
        let mut best = usize::MAX;
        for (e, x) in v.iter().enumerate() {
            if taken[e] {
                continue;
            }
            if best == usize::MAX || *x > v[best] {
                best = e;
            }
        }
        taken[best] = true;
        chosen.push(best);
    }
}

/// Routes `t` tokens given router logits `[t, num_experts]`. Returns expert ids `[t, k]` and
/// weights `[t, k]`.
pub fn route_with(
    logits: &[f32],
    num_experts: usize,
    k: usize,
    router: Router<'_>,
) -> (Vec<u32>, Vec<f32>) {
    assert!(k >= 1 && k <= num_experts);
    let t = logits.len() / num_experts;
    let mut ids = Vec::with_capacity(t * k);
    let mut weights = Vec::with_capacity(t * k);
    let mut p = vec![0.0f32; num_experts];
    let mut choice = vec![0.0f32; num_experts];
    let mut taken = vec![false; num_experts];
    let mut chosen = Vec::with_capacity(k);
    // Grouped routing's scratch, sized once.
    let groups_n = match router {
        Router::SigmoidGrouped { n_group, .. } => n_group,
        _ => 0,
    };
    let mut group_scores = vec![0.0f32; groups_n];
    let mut gtaken = vec![false; groups_n];
    let mut groups = Vec::with_capacity(groups_n);
    for row in logits.chunks(num_experts) {
        p.copy_from_slice(row);
        let start = ids.len();
        match router {
            Router::Softmax { renormalize } => {
                softmax(&mut p);
                top_k(&p, k, &mut taken, &mut chosen);
                let mut sum = 0.0f32;
                for &e in &chosen {
                    ids.push(e as u32);
                    weights.push(p[e]);
                    sum += p[e];
                }
                if renormalize {
                    for w in &mut weights[start..] {
                        *w /= sum;
                    }
                }
            }
            Router::SigmoidGrouped {
                bias,
                n_group,
                topk_group,
                renormalize,
                scaling,
            } => {
                assert_eq!(bias.len(), num_experts);
                assert!(n_group >= 1 && num_experts % n_group == 0);
                let per = num_experts / n_group;
                for (e, x) in p.iter_mut().enumerate() {
                    *x = 1.0 / (1.0 + (-*x).exp());
                    choice[e] = *x + bias[e];
                }
                // Group score: the sum of its two best biased scores.
                for (gs, g) in group_scores.iter_mut().zip(choice.chunks(per)) {
                    *gs = {
                        let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                        for &x in g {
                            if x > a {
                                b = a;
                                a = x;
                            } else if x > b {
                                b = x;
                            }
                        }
                        if per == 1 {
                            a
                        } else {
                            a + b
                        }
                    };
                }
                top_k(&group_scores, topk_group, &mut gtaken, &mut groups);
                for (gi, g) in choice.chunks_mut(per).enumerate() {
                    if !gtaken[gi] {
                        g.fill(0.0);
                    }
                }
                top_k(&choice, k, &mut taken, &mut chosen);
                let mut sum = 0.0f32;
                for &e in &chosen {
                    ids.push(e as u32);
                    weights.push(p[e]);
                    sum += p[e];
                }
                let denom = if renormalize { sum + 1e-20 } else { 1.0 };
                for w in &mut weights[start..] {
                    *w = *w / denom * scaling;
                }
            }
            Router::TopkSoftmax => {
                top_k(&p, k, &mut taken, &mut chosen);
                let mut top: Vec<f32> = chosen.iter().map(|&e| p[e]).collect();
                softmax(&mut top);
                for (&e, w) in chosen.iter().zip(top) {
                    ids.push(e as u32);
                    weights.push(w);
                }
            }
        }
    }
    (ids, weights)
}

/// Softmax routing (see [`Router::Softmax`]).
pub fn route(
    logits: &[f32],
    num_experts: usize,
    k: usize,
    normalize: bool,
) -> (Vec<u32>, Vec<f32>) {
    route_with(
        logits,
        num_experts,
        k,
        Router::Softmax {
            renormalize: normalize,
        },
    )
}

/// `out[t, :] = Σ_s weights[t, s] · slots[t, s, :]`, summed in slot order.
pub fn combine(slots: &[f32], weights: &[f32], k: usize, hidden: usize, out: &mut [f32]) {
    let t = out.len() / hidden;
    assert_eq!(slots.len(), t * k * hidden);
    assert_eq!(weights.len(), t * k);
    for ti in 0..t {
        let o = &mut out[ti * hidden..(ti + 1) * hidden];
        o.fill(0.0);
        for s in 0..k {
            let y = &slots[(ti * k + s) * hidden..(ti * k + s + 1) * hidden];
            crate::axpy(o, weights[ti * k + s], y);
        }
    }
}
