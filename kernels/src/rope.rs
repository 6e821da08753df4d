//! Rotary position embeddings as Hugging Face computes them (`rotate_half` layout: the first
//! and second halves of each head are the two components), with the default, `linear` and
//! `yarn` frequency schemes of `transformers.modeling_rope_utils` (transformers 5: an explicit
//! YaRN `factor` wins; it is derived as `max_position_embeddings / original_max_position_embeddings`
//! only when absent, which the config parser does).
//!
//! Angles are `f32(position) * f32(inv_freq)` rounded to `f32`, exactly as the reference
//! computes them, so long positions match to the last bit of the angle.

use crate::KernelError;

/// The frequency scheme, parsed from a model's `rope_scaling`.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    Default,
    Linear {
        factor: f32,
    },
    Yarn {
        factor: f32,
        original_max_position_embeddings: Option<usize>,
        beta_fast: f32,
        beta_slow: f32,
        attention_factor: Option<f32>,
        mscale: Option<f32>,
        mscale_all_dim: Option<f32>,
        truncate: bool,
    },
}

/// Precomputed inverse frequencies and the attention scaling of one rotary scheme.
#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f32>,
    attention_factor: f32,
    dim: usize,
}

fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl Rope {
    /// `dim` is the rotary dimension (the head dimension for the supported models).
    pub fn new(
        dim: usize,
        theta: f64,
        scaling: &RopeScaling,
        max_position_embeddings: usize,
    ) -> Result<Self, KernelError> {
        if dim == 0 || dim % 2 != 0 {
            return Err(KernelError::Param {
                op: "rope",
                name: "head_dim",
                detail: format!("must be even and positive, got {dim}"),
            });
        }
        if !(theta > 0.0) {
            return Err(KernelError::Param {
                op: "rope",
                name: "rope_theta",
                detail: format!("must be positive, got {theta}"),
            });
        }
        let half = dim / 2;
        // base ** (arange(0, dim, 2).float() / dim), in f32 like torch.
        let pos_freqs: Vec<f32> = (0..half)
            .map(|i| (theta as f32).powf((2 * i) as f32 / dim as f32))
            .collect();
        let default: Vec<f32> = pos_freqs.iter().map(|p| 1.0 / p).collect();
        let (inv_freq, attention_factor) = match scaling {
            RopeScaling::Default => (default, 1.0),
            RopeScaling::Linear { factor } => {
                check_factor(*factor)?;
                (default.iter().map(|f| f / factor).collect(), 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                check_factor(*factor)?;
                // As transformers 5 computes it: the explicit factor, with the correction range
                // taken over the pre-extension context (default: max_position_embeddings).
                let factor = *factor as f64;
                let orig_max = original_max_position_embeddings.unwrap_or(max_position_embeddings);
                let af = match attention_factor {
                    Some(a) => *a as f64,
                    None => match (mscale, mscale_all_dim) {
                        (Some(m), Some(ma)) if *m != 0.0 && *ma != 0.0 => {
                            yarn_get_mscale(factor, *m as f64) / yarn_get_mscale(factor, *ma as f64)
                        }
                        _ => yarn_get_mscale(factor, 1.0),
                    },
                };
                let corr_dim = |rot: f64| {
                    (dim as f64 * (orig_max as f64 / (rot * 2.0 * std::f64::consts::PI)).ln())
                        / (2.0 * theta.ln())
                };
                let (mut low, mut high) =
                    (corr_dim(*beta_fast as f64), corr_dim(*beta_slow as f64));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let high = high.min(dim as f64 - 1.0);
                let (lo, mut hi) = (low as f32, high as f32);
                if lo == hi {
                    hi += 0.001;
                }
                let inv: Vec<f32> = (0..half)
                    .map(|i| {
                        let ramp = ((i as f32 - lo) / (hi - lo)).clamp(0.0, 1.0);
                        let extrap_factor = 1.0 - ramp;
                        let interp = 1.0 / (factor as f32 * pos_freqs[i]);
                        let extrap = 1.0 / pos_freqs[i];
                        interp * (1.0 - extrap_factor) + extrap * extrap_factor
                    })
                    .collect();
                (inv, af as f32)
            }
        };
        Ok(Rope {
            inv_freq,
            attention_factor,
            dim,
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The inverse frequencies (`dim / 2`), what a device kernel needs besides the factor.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    pub fn attention_factor(&self) -> f32 {
        self.attention_factor
    }

    /// cos and sin for one position, each `dim / 2` long, attention factor applied.
    pub fn cos_sin(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        let p = pos as f32;
        for (i, f) in self.inv_freq.iter().enumerate() {
            let a = p * f;
            cos[i] = a.cos() * self.attention_factor;
            sin[i] = a.sin() * self.attention_factor;
        }
    }

    /// Rotates every head of `x` (`[heads, dim]`) in place for position `pos`.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let half = self.dim / 2;
        let mut cos = [0.0f32; 256];
        let mut sin = [0.0f32; 256];
        assert!(half <= 256, "rope: head_dim above 512 is not supported");
        self.cos_sin(pos, &mut cos[..half], &mut sin[..half]);
        apply_with(x, self.dim, &cos[..half], &sin[..half]);
    }
}

/// Rotates `[heads, dim]` with precomputed cos/sin.
pub fn apply_with(x: &mut [f32], dim: usize, cos: &[f32], sin: &[f32]) {
    let half = dim / 2;
    for head in x.chunks_mut(dim) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x1, x2) = (a[i], b[i]);
            a[i] = x1 * cos[i] - x2 * sin[i];
            b[i] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

/// Rotates `[heads, dim]` with precomputed cos/sin, pairs interleaved: `(x[2i], x[2i+1])` is
/// rotated by frequency `i` (DeepSeek's `rope_interleave`). The reference de-interleaves and
/// then rotates halves; the result here keeps the interleaved order, which leaves every dot
/// product between rotated vectors unchanged.
pub fn apply_interleaved_with(x: &mut [f32], dim: usize, cos: &[f32], sin: &[f32]) {
    for head in x.chunks_mut(dim) {
        for (i, pair) in head.chunks_exact_mut(2).enumerate() {
            let (x1, x2) = (pair[0], pair[1]);
            pair[0] = x1 * cos[i] - x2 * sin[i];
            pair[1] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

fn check_factor(f: f32) -> Result<(), KernelError> {
    if !(f >= 1.0) || !f.is_finite() {
        return Err(KernelError::Param {
            op: "rope",
            name: "rope_scaling.factor",
            detail: format!("must be a finite number >= 1, got {f}"),
        });
    }
    Ok(())
}
