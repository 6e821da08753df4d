//! The decode GEMV on its own: weight bytes per second of one activation row against a 64 MB
//! FP8 and a 128 MB bf16 matrix, whole and as 256 expert-sized `[256, 1024]` matrices run 8 at
//! a time (as a decode step's experts are). Best of 5.
//!
//!     cargo run --release -p switchyard-kernels --example linear_bandwidth
//!     RAYON_NUM_THREADS=1 cargo run --release -p switchyard-kernels --example linear_bandwidth
use std::time::Instant;
use switchyard_kernels::quant::Fp8Block;
use switchyard_kernels::{linear, linear_batch, LinearJob, WeightRef};
fn main() {
    let (n, k) = (16384usize, 4096usize);
    let q: Vec<u8> = (0..n * k).map(|i| (i * 7 % 251) as u8 & 0x7e).collect();
    let s = vec![0.01f32; n.div_ceil(128) * k.div_ceil(128)];
    let bf: Vec<half::bf16> = (0..n * k)
        .map(|i| half::bf16::from_f32((i % 13) as f32 * 0.01))
        .collect();
    let x = vec![0.5f32; k];
    let mut out = vec![0.0f32; n];
    for name in ["fp8", "bf16", "fp8-small", "bf16-small"] {
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            match name {
                "fp8" => linear(
                    &x,
                    1,
                    k,
                    WeightRef::Fp8(Fp8Block {
                        q: &q,
                        scale_inv: &s,
                        k,
                        block: [128, 128],
                    }),
                    n,
                    &mut out,
                ),
                "bf16" => linear(&x, 1, k, WeightRef::Bf16(&bf), n, &mut out),
                _ => {
                    // 256 matrices of [256, 1024] as 32 batches of 8 jobs (expert-like)
                    let kk = 1024;
                    let nn = 256;
                    let xs = vec![0.5f32; kk];
                    let mut outs = vec![vec![0.0f32; nn]; 8];
                    for b in 0..32 {
                        let jobs: Vec<LinearJob> = outs
                            .iter_mut()
                            .enumerate()
                            .map(|(j, o)| {
                                let off = (b * 8 + j) * nn * kk;
                                let w = if name == "fp8-small" {
                                    WeightRef::Fp8(Fp8Block {
                                        q: &q[off..off + nn * kk],
                                        scale_inv: &s[..2 * 8],
                                        k: kk,
                                        block: [128, 128],
                                    })
                                } else {
                                    WeightRef::Bf16(&bf[off..off + nn * kk])
                                };
                                LinearJob {
                                    x: &xs,
                                    m: 1,
                                    k: kk,
                                    w,
                                    n: nn,
                                    out: o,
                                }
                            })
                            .collect();
                        linear_batch(jobs);
                    }
                }
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        let bytes = if name.starts_with("fp8") {
            n * k
        } else {
            n * k * 2
        };
        println!(
            "{name}: {:.2} ms, {:.1} GB/s",
            best * 1e3,
            bytes as f64 / best / 1e9
        );
    }
}
