//! The CUDA backend against the CPU kernels (feature `cuda`).
//!
//! - Every `.cu` file compiles with NVRTC (no GPU needed). Where libnvrtc is absent the test
//!   says so and skips, unless `SWITCHYARD_REQUIRE_NVRTC` is set (the test command sets it
//!   after installing the NVRTC wheel), in which case it fails.
//! - Every kernel against its CPU twin on seeded inputs; these need a GPU and print why they
//!   skip where there is none.
#![cfg(feature = "cuda")]

use switchyard_kernels::attention::{paged_attention, AttnParams, KvLayer, QueryRow};
use switchyard_kernels::cuda::{self, AttnRows, DevWeight, Gpu, GpuAttn, SOURCES};
use switchyard_kernels::rng::Rng;
use switchyard_kernels::rope::{self, Rope, RopeScaling};
use switchyard_kernels::sampling::{self, SamplingParams};
use switchyard_kernels::{bf16, linear, moe, norm, WeightRef};

mod common;
use common::{max_abs_diff, randn};

#[test]
fn every_kernel_file_compiles_with_nvrtc() {
    let mut compiled = 0;
    for (file, _, names) in SOURCES {
        match cuda::compile(file) {
            Ok(ptx) => {
                let text = ptx.to_src();
                for n in *names {
                    assert!(
                        text.contains(&format!(".entry {n}(")),
                        "{file}: no kernel {n} in the PTX"
                    );
                }
                compiled += 1;
            }
            Err(cuda::CudaError::Unavailable(why))
                if std::env::var_os("SWITCHYARD_REQUIRE_NVRTC").is_none() =>
            {
                eprintln!("SKIPPED: NVRTC compile test: {why}");
                return;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(compiled, SOURCES.len());
}

/// The device, or `None` with the reason printed.
fn gpu() -> Option<std::sync::Arc<Gpu>> {
    match cuda::probe() {
        Err(why) => {
            eprintln!("SKIPPED: no GPU: {why}");
            None
        }
        Ok(_) => Some(Gpu::get(0).expect("GPU setup")),
    }
}

#[test]
fn rms_norm_silu_and_add_match_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(1);
    let (rows, n) = (7, 320);
    let x = randn(&mut rng, rows * n, 2.0);
    let w = randn(&mut rng, n, 1.0);
    let mut cpu = x.clone();
    norm::rms_norm(&mut cpu, &w, 1e-6);
    let mut dx = g.upload(&x).unwrap();
    let dw = g.upload(&w).unwrap();
    g.rms_norm(&mut dx.slice_mut(..), &dw, rows, n, 1e-6)
        .unwrap();
    let got = g.download(&dx.slice(..)).unwrap();
    assert!(
        max_abs_diff(&got, &cpu) < 1e-5,
        "{}",
        max_abs_diff(&got, &cpu)
    );

    let u = randn(&mut rng, rows * n, 1.0);
    let mut cpu_g = x.clone();
    switchyard_kernels::silu_mul(&mut cpu_g, &u);
    let mut dg = g.upload(&x).unwrap();
    let du = g.upload(&u).unwrap();
    g.silu_mul(&mut dg.slice_mut(..), &du.slice(..), rows * n)
        .unwrap();
    assert!(max_abs_diff(&g.download(&dg.slice(..)).unwrap(), &cpu_g) < 1e-5);

    g.add(&mut dg.slice_mut(..), &du.slice(..), rows * n)
        .unwrap();
    let sum: Vec<f32> = cpu_g.iter().zip(&u).map(|(a, b)| a + b).collect();
    assert!(max_abs_diff(&g.download(&dg.slice(..)).unwrap(), &sum) < 1e-5);
}

#[test]
fn linear_f32_and_bf16_match_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(2);
    for &(m, k, n) in &[(1, 64, 32), (5, 100, 17), (64, 256, 96), (130, 512, 300)] {
        let x = randn(&mut rng, m * k, 1.0);
        let w = randn(&mut rng, n * k, (1.0 / k as f32).sqrt());
        let mut cpu = vec![0.0; m * n];
        linear(&x, m, k, WeightRef::F32(&w), n, &mut cpu);
        let dx = g.upload(&x).unwrap();
        let dw = g.weight(WeightRef::F32(&w)).unwrap();
        let mut out = g.zeros::<f32>(m * n).unwrap();
        g.linear(&dx.slice(..), m, k, &dw, n, &mut out.slice_mut(..), false)
            .unwrap();
        let got = g.download(&out.slice(..m * n)).unwrap();
        assert!(max_abs_diff(&got, &cpu) < 1e-4, "f32 m={m} k={k} n={n}");

        // bf16: the activations are rounded to bf16 before the product (bf16 in, f32 acc).
        let wb: Vec<bf16> = w.iter().map(|v| bf16::from_f32(*v)).collect();
        let xb: Vec<f32> = x.iter().map(|v| bf16::from_f32(*v).to_f32()).collect();
        let mut cpu = vec![0.0; m * n];
        linear(&xb, m, k, WeightRef::Bf16(&wb), n, &mut cpu);
        let dw = g.weight(WeightRef::Bf16(&wb)).unwrap();
        assert!(matches!(dw, DevWeight::Bf16(_)));
        g.linear(&dx.slice(..), m, k, &dw, n, &mut out.slice_mut(..), false)
            .unwrap();
        let got = g.download(&out.slice(..m * n)).unwrap();
        assert!(max_abs_diff(&got, &cpu) < 1e-3, "bf16 m={m} k={k} n={n}");
    }
}

#[test]
fn rope_default_linear_and_yarn_match_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(3);
    let (rows, heads, d) = (9, 4, 128);
    let schemes = [
        RopeScaling::Default,
        RopeScaling::Linear { factor: 4.0 },
        RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: Some(4096),
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: None,
            mscale: None,
            mscale_all_dim: None,
            truncate: true,
        },
    ];
    let pos: Vec<u32> = (0..rows as u32).map(|i| i * 3001 + 7).collect();
    for s in &schemes {
        let r = Rope::new(d, 1e6, s, 32768).unwrap();
        let x = randn(&mut rng, rows * heads * d, 1.0);
        let mut cpu = x.clone();
        for (i, p) in pos.iter().enumerate() {
            r.apply(&mut cpu[i * heads * d..(i + 1) * heads * d], *p as usize);
        }
        let mut dx = g.upload(&x).unwrap();
        let (dp, inv) = (g.upload(&pos).unwrap(), g.upload(r.inv_freq()).unwrap());
        g.rope(
            &mut dx.slice_mut(..),
            &dp,
            &inv,
            r.attention_factor(),
            rows,
            heads,
            d,
        )
        .unwrap();
        let got = g.download(&dx.slice(..)).unwrap();
        // Angles up to ~24000 rad: cos/sin of the same f32 angle agree to a few ulp.
        assert!(
            max_abs_diff(&got, &cpu) < 1e-4,
            "{s:?}: {}",
            max_abs_diff(&got, &cpu)
        );
    }
    let _ = rope::apply_with;
}

#[test]
fn routing_permute_and_combine_match_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(4);
    let (t, e, k, h) = (37, 64, 6, 96);
    let logits = randn(&mut rng, t * e, 2.0);
    for normalize in [false, true] {
        let (ids, w) = moe::route(&logits, e, k, normalize);
        let dl = g.upload(&logits).unwrap();
        let mut di = g.zeros::<u32>(t * k).unwrap();
        let mut dw = g.zeros::<f32>(t * k).unwrap();
        g.route_topk(
            &dl.slice(..),
            t,
            e,
            k,
            normalize,
            &mut di.slice_mut(..),
            &mut dw.slice_mut(..),
        )
        .unwrap();
        assert_eq!(
            g.download(&di.slice(..)).unwrap(),
            ids,
            "normalize={normalize}"
        );
        assert!(max_abs_diff(&g.download(&dw.slice(..)).unwrap(), &w) < 1e-6);
    }
    // Pack rows by expert, "run" each expert (a per-expert scale), unpack and combine.
    let (ids, w) = moe::route(&logits, e, k, true);
    let x = randn(&mut rng, t * h, 1.0);
    let mut order: Vec<usize> = (0..t * k).collect();
    order.sort_by_key(|&i| (ids[i], i));
    let src_row: Vec<u32> = order.iter().map(|&i| (i / k) as u32).collect();
    let mut slot_row = vec![0u32; t * k];
    for (p, &i) in order.iter().enumerate() {
        slot_row[i] = p as u32;
    }
    let dx = g.upload(&x).unwrap();
    let dsrc = g.upload(&src_row).unwrap();
    let mut packed = g.zeros::<f32>(t * k * h).unwrap();
    g.gather_rows(
        &dx.slice(..),
        &dsrc.slice(..),
        &mut packed.slice_mut(..),
        t * k,
        h,
    )
    .unwrap();
    let mut host_packed = g.download(&packed.slice(..)).unwrap();
    for (p, &i) in order.iter().enumerate() {
        let scale = 1.0 + ids[i] as f32 / 10.0;
        assert_eq!(
            &host_packed[p * h..(p + 1) * h],
            &x[(i / k) * h..(i / k + 1) * h]
        );
        host_packed[p * h..(p + 1) * h]
            .iter_mut()
            .for_each(|v| *v *= scale);
    }
    let mut slots = vec![0.0f32; t * k * h];
    for i in 0..t * k {
        let p = slot_row[i] as usize;
        slots[i * h..(i + 1) * h].copy_from_slice(&host_packed[p * h..(p + 1) * h]);
    }
    let mut cpu = vec![0.0; t * h];
    moe::combine(&slots, &w, k, h, &mut cpu);
    let dp = g.upload(&host_packed).unwrap();
    let (dsr, dw) = (g.upload(&slot_row).unwrap(), g.upload(&w).unwrap());
    let mut out = g.zeros::<f32>(t * h).unwrap();
    g.combine_slots(
        &dp.slice(..),
        &dsr.slice(..),
        &dw.slice(..),
        &mut out.slice_mut(..),
        t,
        k,
        h,
    )
    .unwrap();
    assert!(max_abs_diff(&g.download(&out.slice(..)).unwrap(), &cpu) < 1e-5);
}

/// A random paged cache and a step of chunks over it: (chunk lengths, start positions).
fn attention_case(
    g: &Gpu,
    rng: &mut Rng,
    chunks: &[(usize, usize)],
    heads: usize,
    kv_heads: usize,
    d: usize,
    window: Option<usize>,
) {
    let bs = 16;
    let kvw = kv_heads * d;
    let blocks_per: Vec<usize> = chunks.iter().map(|(n, s)| (s + n).div_ceil(bs)).collect();
    let nblocks: usize = blocks_per.iter().sum::<usize>() + 3;
    // Tables: a shuffled block assignment.
    let mut ids: Vec<u32> = (0..nblocks as u32).collect();
    for i in (1..ids.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        ids.swap(i, j);
    }
    let mut tables = Vec::new();
    let mut next = 0;
    for b in &blocks_per {
        tables.push(ids[next..next + b].to_vec());
        next += b;
    }
    let kc = randn(rng, nblocks * bs * kvw, 1.0);
    let vc = randn(rng, nblocks * bs * kvw, 1.0);
    let rows: usize = chunks.iter().map(|c| c.0).sum();
    let q = randn(rng, rows * heads * d, 1.0);
    let p = AttnParams {
        heads,
        kv_heads,
        head_dim: d,
        scale: 1.0 / (d as f32).sqrt(),
        window,
    };
    let mut qrows = Vec::new();
    for (ci, &(n, s)) in chunks.iter().enumerate() {
        for j in 0..n {
            qrows.push(QueryRow {
                table: &tables[ci],
                pos: s + j,
            });
        }
    }
    let mut cpu = vec![0.0; q.len()];
    let layer = KvLayer {
        k: switchyard_kernels::attention::KvSlice::F32(&kc),
        v: switchyard_kernels::attention::KvSlice::F32(&vc),
        block_size: bs,
        kv_heads,
        head_dim: d,
    };
    paged_attention(&q, &qrows, layer, p, &mut cpu);
    let spec: Vec<(&[u32], usize, usize)> = chunks
        .iter()
        .enumerate()
        .map(|(ci, &(n, s))| (tables[ci].as_slice(), s, n))
        .collect();
    let ar = AttnRows::new(g, &spec).unwrap();
    let (dq, dk, dv) = (
        g.upload(&q).unwrap(),
        g.upload(&kc).unwrap(),
        g.upload(&vc).unwrap(),
    );
    let mut out = g.zeros::<f32>(q.len()).unwrap();
    let gp = GpuAttn {
        heads,
        kv_heads,
        head_dim: d,
        block_size: bs,
        scale: p.scale,
        window,
    };
    g.attention(&dq.slice(..), &dk, &dv, &ar, &gp, &mut out.slice_mut(..))
        .unwrap();
    let got = g.download(&out.slice(..)).unwrap();
    let diff = max_abs_diff(&got, &cpu);
    assert!(
        diff < 2e-5,
        "chunks {chunks:?} d={d} window={window:?}: {diff}"
    );
}

#[test]
fn paged_attention_decode_and_tiled_prefill_match_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(5);
    // Decode only: single-row chunks at various context lengths.
    attention_case(
        &g,
        &mut rng,
        &[(1, 0), (1, 17), (1, 300), (1, 1023)],
        8,
        2,
        64,
        None,
    );
    attention_case(&g, &mut rng, &[(1, 5), (1, 700)], 16, 4, 128, Some(100));
    // Prefill: whole prompts, chunks continuing a cached prefix, mixed with decode rows.
    attention_case(&g, &mut rng, &[(37, 0), (1, 50), (20, 64)], 8, 2, 64, None);
    attention_case(&g, &mut rng, &[(300, 200), (1, 9)], 16, 4, 128, None);
    attention_case(&g, &mut rng, &[(100, 0)], 8, 8, 128, Some(33));
    attention_case(&g, &mut rng, &[(40, 3)], 4, 1, 256, None);
    // Small heads (the fixture models' 16): lanes past head_dim idle.
    attention_case(&g, &mut rng, &[(33, 0), (1, 40)], 4, 2, 16, None);
    attention_case(&g, &mut rng, &[(1, 90), (1, 3)], 4, 2, 16, Some(20));
}

#[test]
fn sampling_matches_the_cpu_distribution() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(6);
    let vocab = 1000;
    // Greedy: exactly argmax, ties to the lower id.
    let mut logits = randn(&mut rng, 4 * vocab, 3.0);
    logits[vocab + 10] = 50.0;
    logits[vocab + 20] = 50.0;
    let want: Vec<u32> = logits
        .chunks(vocab)
        .map(|r| sampling::argmax(r) as u32)
        .collect();
    let mut d = g.upload(&logits).unwrap();
    let got = g
        .sample(
            &mut d.slice_mut(..),
            4,
            vocab,
            &vec![SamplingParams::greedy(); 4],
            &[0.5; 4],
        )
        .unwrap();
    assert_eq!(got, want);
    assert_eq!(got[1], 10);
    // Stochastic: many draws of one row: every token is one the CPU filter keeps, and the
    // frequencies follow its probabilities.
    let row = randn(&mut rng, vocab, 2.0);
    let settings = [
        (1.0, 0, 1.0, 0.0),
        (0.7, 50, 1.0, 0.0),
        (1.0, 0, 0.9, 0.0),
        (1.3, 0, 1.0, 0.05),
        (0.8, 40, 0.8, 0.02),
    ];
    let n = 20000;
    for (t, k, p, mp) in settings {
        let sp = SamplingParams {
            temperature: t,
            top_k: k,
            top_p: p,
            min_p: mp,
            ..Default::default()
        };
        let dist = sampling::filtered_distribution(&row, &sp);
        let all: Vec<f32> = (0..n).flat_map(|_| row.iter().copied()).collect();
        let u: Vec<f32> = (0..n).map(|_| rng.next_f64() as f32).collect();
        let mut d = g.upload(&all).unwrap();
        let got = g
            .sample(&mut d.slice_mut(..), n, vocab, &vec![sp.clone(); n], &u)
            .unwrap();
        let mut freq = vec![0usize; vocab];
        for t in &got {
            freq[*t as usize] += 1;
        }
        let mut tv = 0.0f64;
        let mut kept = vec![false; vocab];
        for (tok, prob) in &dist {
            kept[*tok as usize] = true;
            tv += (freq[*tok as usize] as f64 / n as f64 - *prob as f64).abs();
        }
        for (tok, c) in freq.iter().enumerate() {
            assert!(
                *c == 0 || kept[tok],
                "{sp:?}: token {tok} drawn {c} times, filtered on CPU"
            );
        }
        // Total variation of an empirical distribution over ≤ 1000 outcomes from 20000 draws.
        assert!(tv / 2.0 < 0.06, "{sp:?}: total variation {}", tv / 2.0);
    }
}

#[test]
fn small_batch_experts_match_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(7);
    let (e, h, inter, t, k) = (8, 64, 96, 3, 2);
    let ids: Vec<u32> = vec![3, 5, 5, 0, 7, 3];
    let w = randn(&mut rng, t * k, 0.5);
    let x = randn(&mut rng, t * h, 1.0);
    let mats: Vec<[Vec<f32>; 3]> = (0..e)
        .map(|_| {
            [
                randn(&mut rng, inter * h, (1.0 / h as f32).sqrt()),
                randn(&mut rng, inter * h, (1.0 / h as f32).sqrt()),
                randn(&mut rng, h * inter, (1.0 / inter as f32).sqrt()),
            ]
        })
        .collect();
    let hs0 = randn(&mut rng, t * h, 1.0);
    for bf16w in [false, true] {
        let round = |v: &[f32]| -> Vec<f32> {
            if bf16w {
                v.iter().map(|x| bf16::from_f32(*x).to_f32()).collect()
            } else {
                v.to_vec()
            }
        };
        // CPU: each (token, slot) through its expert, inputs rounded as the GPU path does.
        let mut want = hs0.clone();
        for ti in 0..t {
            let mut acc = vec![0.0f32; h];
            for s in 0..k {
                let m = &mats[ids[ti * k + s] as usize];
                let wm: Vec<Vec<f32>> = m.iter().map(|v| round(v)).collect();
                let xr = round(&x[ti * h..(ti + 1) * h]);
                let mut gt = vec![0.0; inter];
                let mut up = vec![0.0; inter];
                linear(&xr, 1, h, WeightRef::F32(&wm[0]), inter, &mut gt);
                linear(&xr, 1, h, WeightRef::F32(&wm[1]), inter, &mut up);
                switchyard_kernels::silu_mul(&mut gt, &up);
                let act = round(&gt);
                let mut y = vec![0.0; h];
                linear(&act, 1, inter, WeightRef::F32(&wm[2]), h, &mut y);
                for i in 0..h {
                    acc[i] += w[ti * k + s] * y[i];
                }
            }
            for i in 0..h {
                want[ti * h + i] += acc[i];
            }
        }
        let dev: Vec<[DevWeight; 3]> = mats
            .iter()
            .map(|m| {
                let up = |v: &Vec<f32>| {
                    if bf16w {
                        let b: Vec<bf16> = v.iter().map(|x| bf16::from_f32(*x)).collect();
                        g.weight(WeightRef::Bf16(&b)).unwrap()
                    } else {
                        g.weight(WeightRef::F32(v)).unwrap()
                    }
                };
                [up(&m[0]), up(&m[1]), up(&m[2])]
            })
            .collect();
        let refs: Vec<(&DevWeight, &DevWeight, &DevWeight)> =
            dev.iter().map(|d| (&d[0], &d[1], &d[2])).collect();
        let table = g.expert_table(&refs, h, inter).unwrap();
        assert!(table.fits_small_batch());
        let (dx, di, dw) = (
            g.upload(&x).unwrap(),
            g.upload(&ids).unwrap(),
            g.upload(&w).unwrap(),
        );
        let mut hs = g.upload(&hs0).unwrap();
        let mut act = g.zeros::<f32>(t * k * inter).unwrap();
        let mut y = g.zeros::<f32>(t * k * h).unwrap();
        g.moe_small_batch(
            &dx.slice(..),
            &di.slice(..),
            &dw.slice(..),
            &table,
            t,
            k,
            &mut hs.slice_mut(..),
            &mut act,
            &mut y,
        )
        .unwrap();
        let got = g.download(&hs.slice(..)).unwrap();
        let tol = if bf16w { 1e-3 } else { 1e-5 };
        assert!(
            max_abs_diff(&got, &want) < tol,
            "bf16={bf16w}: {}",
            max_abs_diff(&got, &want)
        );
    }
}
