//! Mixture-of-experts routing and the slot-ordered combine.
//!
//! Routing: softmax over all experts in `f32`, the `k` largest probabilities in descending
//! order (ties to the lower expert id), optionally renormalised to sum to one
//! (`norm_topk_prob`). Slot `s` of a token is its `s`-th choice.
//!
//! Combine: a token's output is `Σ_s w[s] · y[s]` summed in slot order. The order never
//! depends on which rank computed which slot, so results are identical for any placement.

use crate::softmax;

/// Routes `t` tokens given router logits `[t, num_experts]`. Returns expert ids `[t, k]` and
/// weights `[t, k]`.
pub fn route(
    logits: &[f32],
    num_experts: usize,
    k: usize,
    normalize: bool,
) -> (Vec<u32>, Vec<f32>) {
    assert!(k >= 1 && k <= num_experts);
    let t = logits.len() / num_experts;
    let mut ids = Vec::with_capacity(t * k);
    let mut weights = Vec::with_capacity(t * k);
    let mut p = vec![0.0f32; num_experts];
    for row in logits.chunks(num_experts) {
        p.copy_from_slice(row);
        softmax(&mut p);
        let start = ids.len();
        // Partial selection: k passes over a small expert count.
        let mut taken = 0u128;
        let mut chosen = [0usize; 64];
        assert!(
            k <= 64 && num_experts <= 128,
            "route: at most 128 experts and top-64"
        );
        for slot in 0..k {
            let mut best = usize::MAX;
            for (e, v) in p.iter().enumerate() {
                if taken & (1u128 << e) != 0 {
                    continue;
                }
                if best == usize::MAX || *v > p[best] {
                    best = e;
                }
            }
            taken |= 1u128 << best;
            chosen[slot] = best;
        }
        let mut sum = 0.0f32;
        for &e in &chosen[..k] {
            ids.push(e as u32);
            weights.push(p[e]);
            sum += p[e];
        }
        if normalize {
            for w in &mut weights[start..] {
                *w /= sum;
            }
        }
    }
    (ids, weights)
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
