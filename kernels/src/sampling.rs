//! Token sampling: greedy, temperature, top-k, top-p, min-p and repetition penalty, applied in
//! the order Hugging Face's and vLLM's samplers use (penalty, temperature, top-k, top-p, min-p),
//! drawing from a per-request seeded [`Rng`].

use crate::rng::Rng;
use crate::KernelError;

/// Per-request sampling settings. `temperature == 0` is greedy.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// In (0, 1]; 1 disables.
    pub top_p: f32,
    /// In [0, 1); 0 disables.
    pub min_p: f32,
    /// > 0; 1 disables.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), KernelError> {
        let bad = |name, detail: String| {
            Err(KernelError::Param {
                op: "sampling",
                name,
                detail,
            })
        };
        if !(self.temperature >= 0.0) || !self.temperature.is_finite() {
            return bad(
                "temperature",
                format!("must be >= 0, got {}", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !(self.min_p >= 0.0 && self.min_p < 1.0) {
            return bad("min_p", format!("must be in [0, 1), got {}", self.min_p));
        }
        if !(self.repetition_penalty > 0.0) || !self.repetition_penalty.is_finite() {
            return bad(
                "repetition_penalty",
                format!("must be > 0, got {}", self.repetition_penalty),
            );
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Index of the largest value (the first one on ties, like `torch.argmax`).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best
}

/// Applies the repetition penalty in place to every token id in `history` (each once).
pub fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &t in history {
        let t = t as usize;
        if t < logits.len() && !seen[t] {
            seen[t] = true;
            let l = &mut logits[t];
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

/// The probability distribution the sampler draws from, as (token, probability) sorted by
/// descending probability, after all filters. Exposed for tests.
pub fn filtered_distribution(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f32)> {
    let t = p.temperature.max(f32::MIN_POSITIVE);
    let mut cand: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32, l / t))
        .collect();
    let by_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if p.top_k > 0 && p.top_k < cand.len() {
        cand.select_nth_unstable_by(p.top_k - 1, by_desc);
        cand.truncate(p.top_k);
    }
    cand.sort_by(by_desc);
    // Softmax over the survivors.
    let max = cand[0].1;
    let mut sum = 0.0f64;
    for c in cand.iter_mut() {
        c.1 = (c.1 - max).exp();
        sum += c.1 as f64;
    }
    for c in cand.iter_mut() {
        c.1 = (c.1 as f64 / sum) as f32;
    }
    if p.top_p < 1.0 {
        let mut cum = 0.0f32;
        let mut keep = cand.len();
        for (i, c) in cand.iter().enumerate() {
            if cum >= p.top_p {
                keep = i;
                break;
            }
            cum += c.1;
        }
        cand.truncate(keep.max(1));
    }
    if p.min_p > 0.0 {
        let thresh = cand[0].1 * p.min_p;
        cand.retain(|c| c.1 >= thresh);
    }
    let s: f32 = cand.iter().map(|c| c.1).sum();
    for c in cand.iter_mut() {
        c.1 /= s;
    }
    cand
}

/// Picks the next token. `logits` is modified (penalty applied). `history` is the prompt plus
/// the tokens generated so far.
pub fn sample(logits: &mut [f32], p: &SamplingParams, history: &[u32], rng: &mut Rng) -> u32 {
    apply_repetition_penalty(logits, history, p.repetition_penalty);
    if p.is_greedy() {
        return argmax(logits) as u32;
    }
    let dist = filtered_distribution(logits, p);
    let u = rng.next_f64() as f32;
    let mut cum = 0.0f32;
    for (tok, prob) in &dist {
        cum += prob;
        if u < cum {
            return *tok;
        }
    }
    dist.last().map(|d| d.0).unwrap_or(0)
}

/// Log-softmax of the logits at `token`, and the `n` most likely tokens with their logprobs.
pub fn logprobs(logits: &[f32], token: u32, n: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    let mut top: Vec<(u32, f32)> = Vec::new();
    if n > 0 {
        let mut idx: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, l)| (i as u32, *l))
            .collect();
        let n = n.min(idx.len());
        idx.select_nth_unstable_by(n - 1, |a, b| b.1.total_cmp(&a.1));
        idx.truncate(n);
        idx.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        top = idx.into_iter().map(|(i, l)| (i, l - lse)).collect();
    }
    (logits[token as usize] - lse, top)
}
