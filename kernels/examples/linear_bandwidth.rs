//! The decode GEMV on its own: weight bytes per second of one activation row against one
//! large matrix in FP8 (512 MB), bf16 and f32 (1 GB) and MXFP4 (272 MB) — all larger than the last-level
//! cache, so the weights stream from memory as in a decode step — and against the same bytes as
//! expert-sized `[256, 1024]` matrices run 8 per `linear_batch` (as a decode step's experts
//! are). Best of 3.
//!
//!     cargo run --release -p switchyard-kernels --example linear_bandwidth
//!     RAYON_NUM_THREADS=1 cargo run --release -p switchyard-kernels --example linear_bandwidth
//!
//! Names given as arguments (`fp8 bf16-experts`) run only those. With `cache`, the decoding alone: one `[128, 4096]` matrix (512 KB in FP8) read 4000
//! times, so it stays in L2 — weights per second from cache, best of 5.
use std::time::Instant;
use switchyard_kernels::quant::{Fp8Block, Mxfp4};
use switchyard_kernels::{linear, linear_batch, LinearJob, WeightRef};

fn main() {
    if std::env::args().any(|a| a == "cache") {
        return from_cache();
    }
    let (n, k) = (65536usize, 8192usize);
    let (q, s, bf) = fp8_and_bf16(n, k);
    let blocks: Vec<u8> = (0..n * k / 2).map(|i| (i * 13 % 251) as u8).collect();
    let mxs: Vec<u8> = (0..n * k / 32).map(|i| 120 + (i % 7) as u8).collect();
    // f32: the bf16 matrix's bytes (1 GB) as half its rows.
    let f: Vec<f32> = (0..n * k / 2).map(|i| (i % 13) as f32 * 0.01).collect();
    let x = vec![0.5f32; k];
    let mut out = vec![0.0f32; n];
    let only: Vec<String> = std::env::args().skip(1).collect();
    for name in ["fp8", "bf16", "f32", "mxfp4", "fp8-experts", "bf16-experts"] {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        let mut best = f64::MAX;
        for _ in 0..3 {
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
                "f32" => linear(&x, 1, k, WeightRef::F32(&f), n / 2, &mut out[..n / 2]),
                "mxfp4" => {
                    let w = Mxfp4::new(&blocks, &mxs, n, k, 1).unwrap();
                    linear(&x, 1, k, WeightRef::Mxfp4(w), n, &mut out)
                }
                _ => {
                    let (kk, nn) = (1024, 256);
                    let xs = vec![0.5f32; kk];
                    let mut outs = vec![vec![0.0f32; nn]; 8];
                    for b in 0..n * k / (nn * kk) / 8 {
                        let jobs: Vec<LinearJob> = outs
                            .iter_mut()
                            .enumerate()
                            .map(|(j, o)| {
                                let off = (b * 8 + j) * nn * kk;
                                let w = if name == "fp8-experts" {
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
        let bytes = match name {
            "mxfp4" => n * k / 2 + n * k / 32,
            f if f.starts_with("fp8") => n * k,
            _ => n * k * 2,
        };
        println!(
            "{name}: {:.2} ms, {:.1} GB/s",
            best * 1e3,
            bytes as f64 / best / 1e9
        );
    }
}

/// An `[n, k]` FP8 matrix (codes all normal, as real weights' are, with 128x128 block
/// scales) and a bf16 one.
fn fp8_and_bf16(n: usize, k: usize) -> (Vec<u8>, Vec<f32>, Vec<half::bf16>) {
    let q: Vec<u8> = (0..n * k)
        .map(|i| (i * 7 % 251) as u8 & 0x7e | 0x08)
        .collect();
    let s = vec![0.01f32; n.div_ceil(128) * k.div_ceil(128)];
    let bf: Vec<half::bf16> = (0..n * k)
        .map(|i| half::bf16::from_f32((i % 13) as f32 * 0.01))
        .collect();
    (q, s, bf)
}

fn from_cache() {
    let (n, k, reps) = (128usize, 4096usize, 4000);
    let (q, s, bf) = fp8_and_bf16(n, k);
    let x = vec![0.5f32; k];
    let mut out = vec![0.0f32; n];
    for name in ["fp8", "bf16"] {
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..reps {
                let w = match name {
                    "fp8" => WeightRef::Fp8(Fp8Block {
                        q: &q,
                        scale_inv: &s,
                        k,
                        block: [128, 128],
                    }),
                    _ => WeightRef::Bf16(&bf),
                };
                linear(&x, 1, k, w, n, &mut out);
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{name} from cache: {:.1} G weights/s",
            (n * k * reps) as f64 / best / 1e9
        );
    }
}
