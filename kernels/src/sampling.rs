//! Token sampling: greedy, temperature, top-k, top-p, min-p, logit bias, and the repetition,
//! presence and frequency penalties, applied in the order vLLM's sampler uses (banned tokens,
//! logit bias, penalties, temperature, top-k, top-p, min-p), drawing from a per-request seeded
//! [`Rng`].
//!
//! The repetition penalty (Hugging Face's) covers the prompt and the generated tokens; the
//! presence and frequency penalties (OpenAI's) only the generated ones: `logit[t] -=
//! presence · [c_t > 0] + frequency · c_t`, `c_t` the times `t` was generated so far.

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
    /// In [-2, 2]; 0 disables.
    pub presence_penalty: f32,
    /// In [-2, 2]; 0 disables.
    pub frequency_penalty: f32,
    /// (token, bias in [-100, 100]) added to the logits.
    pub logit_bias: Vec<(u32, f32)>,
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
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
        }
    }
}

/// A logit-bias map (as the protos carry it) as [`SamplingParams::logit_bias`]: in token
/// order, so every rank and every replay applies it identically.
pub fn sorted_bias<'a>(m: impl IntoIterator<Item = (&'a u32, &'a f32)>) -> Vec<(u32, f32)> {
    let mut b: Vec<(u32, f32)> = m.into_iter().map(|(t, v)| (*t, *v)).collect();
    b.sort_by_key(|e| e.0);
    b
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
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(name, format!("must be in [-2, 2], got {v}"));
            }
        }
        if let Some((t, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return bad(
                "logit_bias",
                format!("token {t}: the bias must be in [-100, 100], got {b}"),
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

/// What the sampler knows of a sequence: its tokens so far (the prompt's `prompt_len`, then
/// those generated) and the tokens it may not sample now (end of sequence before
/// `min_tokens`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Seen<'a> {
    pub tokens: &'a [u32],
    pub prompt_len: usize,
    pub banned: &'a [u32],
    /// Constrained decoding: the tokens allowed now, a bitset ([`mask_allows`]).
    pub allowed: Option<&'a [u8]>,
}

/// Whether bit `t` of an allowed-token bitset is set (bit `t % 8` of byte `t / 8`).
pub fn mask_allows(mask: &[u8], t: u32) -> bool {
    mask.get(t as usize / 8)
        .is_some_and(|b| b >> (t % 8) & 1 == 1)
}

/// Everything [`sample`] does to the logits before temperature and the filters, in place:
/// tokens outside the constraint's mask and banned tokens to -inf, the logit bias added, then the repetition penalty (prompt and
/// output) and the presence and frequency penalties (output only).
pub fn adjust_logits(logits: &mut [f32], p: &SamplingParams, seen: Seen<'_>) {
    if let Some(m) = seen.allowed {
        for (t, l) in logits.iter_mut().enumerate() {
            if !mask_allows(m, t as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    for &t in seen.banned {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
    for &(t, b) in &p.logit_bias {
        if let Some(l) = logits.get_mut(t as usize) {
            *l += b;
        }
    }
    apply_repetition_penalty(logits, seen.tokens, p.repetition_penalty);
    if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        let mut counts: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
        for &t in seen.tokens.get(seen.prompt_len..).unwrap_or(&[]) {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= p.presence_penalty + p.frequency_penalty * c as f32;
            }
        }
    }
}

/// Picks the next token. `logits` is modified ([`adjust_logits`]).
pub fn sample(logits: &mut [f32], p: &SamplingParams, seen: Seen<'_>, rng: &mut Rng) -> u32 {
    adjust_logits(logits, p, seen);
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
