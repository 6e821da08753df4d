//! Switchyard's tensor ops on the CPU.
//!
//! Every fast kernel here has a plain, obviously-correct twin in [`reference`] that serves as
//! the test oracle (seeded random inputs, compared within a stated tolerance). Activations are
//! always `f32`; weights may be `f32` or `bf16` ([`WeightRef`]) and every product accumulates
//! in `f32`.
//!
//! Invariants:
//! - No kernel allocates per element; scratch is sized by the caller or once per call.
//! - Results never depend on the number of threads: each output element is produced by one
//!   thread with a fixed reduction order.

pub mod attention;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(target_arch = "x86_64")]
mod gemm;
pub mod linear;
pub mod moe;
pub mod norm;
pub mod pool;
pub mod quant;
pub mod reference;
pub mod rng;
pub mod rope;
pub mod sampling;
mod simd;

pub use half::bf16;
pub use linear::{linear, linear_batch, LinearJob, WeightRef};

/// Errors raised by kernel setup (bad shapes or parameters given by a caller).
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{op}: shape mismatch: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("{op}: invalid parameter {name}: {detail}")]
    Param {
        op: &'static str,
        name: &'static str,
        detail: String,
    },
}

/// SiLU-gated activation in place: `gate[i] = silu(gate[i]) * up[i]`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    debug_assert_eq!(gate.len(), up.len());
    for (g, u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = x / (1.0 + (-x).exp()) * u;
    }
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Sum of all elements (streaming; AVX2 where available).
pub fn sum(x: &[f32]) -> f32 {
    simd::sum(x)
}

/// `y += a * x`, elementwise.
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    debug_assert_eq!(y.len(), x.len());
    simd::axpy(y, a, x)
}
