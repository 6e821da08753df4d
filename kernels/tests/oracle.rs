//! Every fast kernel against its plain reference on seeded random inputs.

use switchyard_kernels::attention::{paged_attention, AttnParams, KvLayer, KvSlice, QueryRow};
use switchyard_kernels::rng::Rng;
use switchyard_kernels::rope::{Rope, RopeScaling};
use switchyard_kernels::sampling::{self, SamplingParams, Seen};
use switchyard_kernels::{bf16, linear, moe, norm, reference, softmax, WeightRef};

mod common;
use common::{max_abs_diff, randn};

#[test]
fn linear_f32_matches_reference_for_all_row_regimes() {
    let mut rng = Rng::new(1);
    for &(m, k, n) in &[
        (1, 64, 32),
        (3, 100, 17),
        (5, 33, 9),
        (8, 256, 96),
        (13, 70, 40),
        (64, 128, 200),
        // A weight block ending one row short of a tile triple (found by the tiny
        // DeepSeek preset's dense down projection).
        (8, 192, 128),
        // The packed GEMM's edges: a partial last panel of rows, a partial last tile of
        // weight rows, k over one block and not a multiple of a vector.
        (45, 1100, 37),
        (100, 520, 300),
        (12, 16, 1),
    ] {
        let x = randn(&mut rng, m * k, 1.0);
        let w = randn(&mut rng, n * k, (1.0 / k as f32).sqrt());
        let mut out = vec![0.0; m * n];
        linear(&x, m, k, WeightRef::F32(&w), n, &mut out);
        let r = reference::linear(&x, m, k, WeightRef::F32(&w), n);
        // f32 accumulation over k terms of unit size: error grows like sqrt(k) ulp.
        assert!(
            max_abs_diff(&out, &r) < 1e-4,
            "m={m} k={k} n={n}: {}",
            max_abs_diff(&out, &r)
        );
    }
}

#[test]
fn linear_bf16_matches_reference_on_the_same_bf16_values() {
    let mut rng = Rng::new(2);
    for &(m, k, n) in &[(1, 64, 32), (4, 96, 50), (7, 48, 8), (20, 128, 64)] {
        let x = randn(&mut rng, m * k, 1.0);
        let w: Vec<bf16> = randn(&mut rng, n * k, (1.0 / k as f32).sqrt())
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let mut out = vec![0.0; m * n];
        linear(&x, m, k, WeightRef::Bf16(&w), n, &mut out);
        let r = reference::linear(&x, m, k, WeightRef::Bf16(&w), n);
        assert!(max_abs_diff(&out, &r) < 1e-4, "m={m} k={k} n={n}");
    }
}

#[test]
fn rms_norm_matches_reference() {
    let mut rng = Rng::new(3);
    for &h in &[16usize, 64, 100] {
        let x = randn(&mut rng, 5 * h, 2.0);
        let w: Vec<f32> = randn(&mut rng, h, 0.1).iter().map(|v| 1.0 + v).collect();
        let mut fast = x.clone();
        norm::rms_norm(&mut fast, &w, 1e-6);
        let r = reference::rms_norm(&x, &w, 1e-6);
        assert!(max_abs_diff(&fast, &r) < 1e-5);
    }
}

#[test]
fn softmax_matches_reference_and_survives_large_logits() {
    let mut rng = Rng::new(4);
    let mut x = randn(&mut rng, 300, 30.0);
    x[7] = 1e4;
    let r = reference::softmax(&x);
    softmax(&mut x);
    assert!(max_abs_diff(&x, &r) < 1e-6);
    assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-5);
}

#[test]
fn routing_matches_sorting_reference_with_and_without_normalisation() {
    let mut rng = Rng::new(5);
    for &(e, k) in &[
        (8usize, 2usize),
        (32, 4),
        (64, 8),
        (128, 8),
        (256, 8),
        (384, 8),
    ] {
        let logits = randn(&mut rng, 20 * e, 1.0);
        for normalize in [false, true] {
            let (ids, w) = moe::route(&logits, e, k, normalize);
            for t in 0..20 {
                let (rid, rw) = reference::route(&logits[t * e..(t + 1) * e], k, normalize);
                assert_eq!(&ids[t * k..(t + 1) * k], &rid[..]);
                assert!(max_abs_diff(&w[t * k..(t + 1) * k], &rw) < 1e-6);
            }
        }
    }
}

/// DeepSeek-V3 (256 experts, 8 groups, 4 kept, top-8), Kimi K2 (384, one group) and the tiny
/// fixture's shape (8, 2 groups, 1 kept): no limit on the expert count.
#[test]
fn grouped_sigmoid_routing_matches_sorting_reference() {
    let mut rng = Rng::new(11);
    for &(e, g, tg, k) in &[
        (256usize, 8usize, 4usize, 8usize),
        (384, 1, 1, 8),
        (8, 2, 1, 2),
    ] {
        let logits = randn(&mut rng, 20 * e, 1.0);
        // Biases large enough that some biased scores go negative (below the masked 0).
        let bias = randn(&mut rng, e, 0.5);
        for normalize in [false, true] {
            let router = moe::Router::SigmoidGrouped {
                bias: &bias,
                n_group: g,
                topk_group: tg,
                renormalize: normalize,
                scaling: 2.5,
            };
            let (ids, w) = moe::route_with(&logits, e, k, router);
            for t in 0..20 {
                let (rid, rw) = reference::route_sigmoid_grouped(
                    &logits[t * e..(t + 1) * e],
                    &bias,
                    g,
                    tg,
                    k,
                    normalize,
                    2.5,
                );
                assert_eq!(&ids[t * k..(t + 1) * k], &rid[..], "e={e} t={t}");
                assert!(max_abs_diff(&w[t * k..(t + 1) * k], &rw) < 1e-6);
            }
        }
    }
}

#[test]
fn topk_then_softmax_routing_matches_sorting_reference() {
    let mut rng = Rng::new(12);
    for &(e, k) in &[(32usize, 4usize), (128, 4)] {
        let logits = randn(&mut rng, 20 * e, 1.0);
        let (ids, w) = moe::route_with(&logits, e, k, moe::Router::TopkSoftmax);
        for t in 0..20 {
            let (rid, rw) = reference::route_topk_softmax(&logits[t * e..(t + 1) * e], k);
            assert_eq!(&ids[t * k..(t + 1) * k], &rid[..]);
            assert!(max_abs_diff(&w[t * k..(t + 1) * k], &rw) < 1e-6);
        }
    }
}

#[test]
fn combine_is_slot_ordered_weighted_sum() {
    let mut rng = Rng::new(6);
    let (t, k, h) = (3, 4, 8);
    let slots = randn(&mut rng, t * k * h, 1.0);
    let w = randn(&mut rng, t * k, 1.0);
    let mut out = vec![0.0; t * h];
    moe::combine(&slots, &w, k, h, &mut out);
    for ti in 0..t {
        for i in 0..h {
            let mut s = 0.0f32;
            for sl in 0..k {
                s += w[ti * k + sl] * slots[(ti * k + sl) * h + i];
            }
            assert!((s - out[ti * h + i]).abs() < 1e-6);
        }
    }
}

/// Builds a paged pool holding `len` positions for one sequence with a shuffled block table.
struct Pool {
    k: Vec<f32>,
    v: Vec<f32>,
    table: Vec<u32>,
    keys: Vec<Vec<Vec<f32>>>, // [g][pos]
    vals: Vec<Vec<Vec<f32>>>,
}

fn pool(rng: &mut Rng, len: usize, bs: usize, kvh: usize, d: usize) -> Pool {
    let blocks = len.div_ceil(bs) + 3;
    let mut table: Vec<u32> = (0..blocks as u32).collect();
    // Fisher-Yates so logical and physical order differ.
    for i in (1..table.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        table.swap(i, j);
    }
    let mut k = vec![f32::NAN; blocks * bs * kvh * d];
    let mut v = vec![f32::NAN; blocks * bs * kvh * d];
    let mut keys = vec![vec![]; kvh];
    let mut vals = vec![vec![]; kvh];
    for pos in 0..len {
        for g in 0..kvh {
            let o = ((table[pos / bs] as usize * bs + pos % bs) * kvh + g) * d;
            let kk = randn(rng, d, 1.0);
            let vv = randn(rng, d, 1.0);
            k[o..o + d].copy_from_slice(&kk);
            v[o..o + d].copy_from_slice(&vv);
            keys[g].push(kk);
            vals[g].push(vv);
        }
    }
    Pool {
        k,
        v,
        table,
        keys,
        vals,
    }
}

/// Paged attention on a random pool of `len` positions, queried at the first, middle and last
/// position, against the full-softmax reference (with per-head sinks when `sinks`).
#[allow(clippy::too_many_arguments)]
fn check_attention(
    rng: &mut Rng,
    heads: usize,
    kvh: usize,
    d: usize,
    bs: usize,
    len: usize,
    window: Option<usize>,
    sinks: bool,
) {
    let pl = pool(rng, len, bs, kvh, d);
    let positions: Vec<usize> = vec![0, len / 2, len - 1];
    let rows: Vec<QueryRow> = positions
        .iter()
        .map(|&pos| QueryRow {
            table: &pl.table,
            pos,
        })
        .collect();
    let q = randn(rng, rows.len() * heads * d, 1.0);
    let sk = randn(rng, heads, 2.0);
    let mut out = vec![0.0; q.len()];
    let p = AttnParams {
        heads,
        kv_heads: kvh,
        head_dim: d,
        scale: 0.25,
        window,
    };
    let kv = KvLayer {
        k: KvSlice::F32(&pl.k),
        v: KvSlice::F32(&pl.v),
        block_size: bs,
        kv_heads: kvh,
        head_dim: d,
    };
    if sinks {
        switchyard_kernels::attention::paged_attention_with(&q, &rows, kv, p, Some(&sk), &mut out);
    } else {
        paged_attention(&q, &rows, kv, p, &mut out);
    }
    for (t, &pos) in positions.iter().enumerate() {
        let lo = window.map(|w| (pos + 1).saturating_sub(w)).unwrap_or(0);
        for h in 0..heads {
            let g = h / (heads / kvh);
            let qi = &q[(t * heads + h) * d..(t * heads + h + 1) * d];
            let (ks, vs) = (&pl.keys[g][lo..=pos], &pl.vals[g][lo..=pos]);
            let r = if sinks {
                reference::attention_one_with_sink(qi, ks, vs, 0.25, sk[h])
            } else {
                reference::attention_one(qi, ks, vs, 0.25)
            };
            let o = &out[(t * heads + h) * d..(t * heads + h + 1) * d];
            assert!(
                max_abs_diff(o, &r) < 1e-5,
                "heads={heads} kvh={kvh} d={d} len={len} pos={pos} h={h} sinks={sinks}"
            );
        }
    }
}

#[test]
fn paged_attention_matches_full_softmax_reference() {
    let mut rng = Rng::new(7);
    for &(len, window) in &[
        (1usize, None),
        (17, None),
        (100, None),
        (300, None),
        (100, Some(40usize)),
        // Longer than the split-K threshold: segments computed in parallel, then merged.
        (3000, None),
        (5000, Some(2500)),
    ] {
        check_attention(&mut rng, 4, 2, 16, 16, len, window, false);
    }
}

/// Sinks (GPT-OSS) and many query heads on one kv head of a wide dimension (MLA's absorbed
/// form: 128 heads on one latent of 64+8 here), on the direct and the split-K paths.
#[test]
fn paged_attention_with_sinks_and_wide_groups_matches_reference() {
    let mut rng = Rng::new(13);
    for &(heads, kvh, d, len, window, sinks) in &[
        (4usize, 2usize, 16usize, 100usize, None, true),
        (4, 2, 16, 100, Some(32usize), true),
        (4, 2, 16, 3000, None, true),
        (128, 1, 72, 50, None, false),
        (24, 1, 40, 3000, None, false),
        (20, 4, 8, 60, Some(7), true),
        // MLA's absorbed decode shape (all heads on one latent, the heads split over
        // threads), on the AVX-512 path where present.
        (16, 1, 288, 200, None, false),
    ] {
        check_attention(&mut rng, heads, kvh, d, 16, len, window, sinks);
    }
}

/// Context parallelism's attention: a row's keys held in up to three pools (as three workers
/// would hold ranges of one sequence, each table counting from its range's first position),
/// each pool's part computed unnormalised and the parts merged, equals the full softmax over
/// all the keys (with sinks, with a window cutting into the first range, with parts that
/// hold no visible key, and over the split-K threshold).
#[test]
fn partial_attention_over_split_pools_merges_to_the_full_softmax() {
    use switchyard_kernels::attention::{
        merge_partial_states, paged_attention_partial, KeySpan, PartialState,
    };
    let mut rng = Rng::new(21);
    for &(heads, kvh, d, cuts, len, window, sinks) in &[
        (
            4usize,
            2usize,
            16usize,
            &[40usize][..],
            100usize,
            None,
            false,
        ),
        (4, 2, 16, &[33, 70][..], 100, None, true),
        (4, 2, 16, &[50][..], 100, Some(30usize), true),
        (8, 2, 16, &[1500][..], 3300, None, false),
        (16, 1, 72, &[20, 21][..], 64, None, false),
    ] {
        let mut bounds = vec![0];
        bounds.extend_from_slice(cuts);
        bounds.push(len);
        let pools: Vec<Pool> = bounds
            .windows(2)
            .map(|b| pool(&mut rng, b[1] - b[0], 16, kvh, d))
            .collect();
        let p = AttnParams {
            heads,
            kv_heads: kvh,
            head_dim: d,
            scale: 0.25,
            window,
        };
        let sk = randn(&mut rng, heads, 2.0);
        for pos in [0, cuts[0], len / 2, len - 1] {
            let q = randn(&mut rng, heads * d, 1.0);
            let lo = window.map(|w| (pos + 1).saturating_sub(w)).unwrap_or(0);
            let parts: Vec<PartialState> = pools
                .iter()
                .zip(bounds.windows(2))
                .map(|(pl, b)| {
                    let kv = KvLayer {
                        k: KvSlice::F32(&pl.k),
                        v: KvSlice::F32(&pl.v),
                        block_size: 16,
                        kv_heads: kvh,
                        head_dim: d,
                    };
                    let (a, z) = (lo.max(b[0]), (pos + 1).min(b[1]));
                    // Keys of this pool the query sees (none: an empty span).
                    let (a, z) = if a < z { (a - b[0], z - b[0]) } else { (0, 0) };
                    let span = KeySpan {
                        table: &pl.table,
                        lo: a,
                        hi: z,
                    };
                    paged_attention_partial(&q, &[span], kv, p).remove(0)
                })
                .collect();
            let mut out = vec![0.0; heads * d];
            let refs: Vec<&PartialState> = parts.iter().collect();
            merge_partial_states(&refs, d, sinks.then_some(&sk[..]), &mut out);
            for h in 0..heads {
                let g = h / (heads / kvh);
                let keys: Vec<Vec<f32>> = pools.iter().flat_map(|pl| pl.keys[g].clone()).collect();
                let vals: Vec<Vec<f32>> = pools.iter().flat_map(|pl| pl.vals[g].clone()).collect();
                let qi = &q[h * d..(h + 1) * d];
                let (ks, vs) = (&keys[lo..=pos], &vals[lo..=pos]);
                let r = if sinks {
                    reference::attention_one_with_sink(qi, ks, vs, 0.25, sk[h])
                } else {
                    reference::attention_one(qi, ks, vs, 0.25)
                };
                let o = &out[h * d..(h + 1) * d];
                assert!(
                    max_abs_diff(o, &r) < 1e-5,
                    "heads={heads} d={d} cuts={cuts:?} len={len} pos={pos} h={h}"
                );
            }
        }
    }
}

/// Interleaved rope rotates pairs (2i, 2i+1) by frequency i: the reference's de-interleave
/// then rotate-half, up to that permutation (so dot products agree).
#[test]
fn interleaved_rope_equals_deinterleaved_rotate_half() {
    let mut rng = Rng::new(14);
    let d = 8;
    let rope = Rope::new(d, 10000.0, &RopeScaling::Default, 4096).unwrap();
    let (mut c, mut s) = (vec![0.0; d / 2], vec![0.0; d / 2]);
    rope.cos_sin(29, &mut c, &mut s);
    let x = randn(&mut rng, d, 1.0);
    let mut a = x.clone();
    switchyard_kernels::rope::apply_interleaved_with(&mut a, d, &c, &s);
    // Reference: de-interleave (evens then odds), rotate halves.
    let mut b: Vec<f32> = (0..d / 2)
        .map(|i| x[2 * i])
        .chain((0..d / 2).map(|i| x[2 * i + 1]))
        .collect();
    switchyard_kernels::rope::apply_with(&mut b, d, &c, &s);
    for i in 0..d / 2 {
        assert!((a[2 * i] - b[i]).abs() < 1e-6);
        assert!((a[2 * i + 1] - b[d / 2 + i]).abs() < 1e-6);
    }
}

#[test]
fn rope_is_a_rotation_and_linear_scaling_divides_positions() {
    let mut rng = Rng::new(8);
    let d = 64;
    let base = Rope::new(d, 10000.0, &RopeScaling::Default, 4096).unwrap();
    let lin = Rope::new(d, 10000.0, &RopeScaling::Linear { factor: 4.0 }, 4096).unwrap();
    let x = randn(&mut rng, 2 * d, 1.0);
    let mut a = x.clone();
    base.apply(&mut a, 37);
    // Norm preserved per head (each pair is rotated).
    for h in 0..2 {
        let n0: f32 = x[h * d..(h + 1) * d].iter().map(|v| v * v).sum();
        let n1: f32 = a[h * d..(h + 1) * d].iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-3);
    }
    // Position 0 is the identity.
    let mut z = x.clone();
    base.apply(&mut z, 0);
    assert!(max_abs_diff(&z, &x) < 1e-7);
    // Linear scaling at position 4p equals the default at position p.
    let mut b = x.clone();
    lin.apply(&mut b, 148);
    assert!(max_abs_diff(&a, &b) < 1e-4);
}

#[test]
fn yarn_keeps_high_frequencies_and_interpolates_low_ones() {
    let d = 64;
    let theta = 1_000_000.0;
    let base = Rope::new(d, theta, &RopeScaling::Default, 32768).unwrap();
    let yarn = Rope::new(
        d,
        theta,
        &RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: Some(8192),
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: None,
            mscale: None,
            mscale_all_dim: None,
            truncate: true,
        },
        32768,
    )
    .unwrap();
    // factor = 32768 / 8192 = 4 -> attention factor 0.1 ln 4 + 1.
    assert!((yarn.attention_factor() - (0.1 * 4f32.ln() + 1.0)).abs() < 1e-6);
    let (mut cb, mut sb) = (vec![0.0; d / 2], vec![0.0; d / 2]);
    let (mut cy, mut sy) = (vec![0.0; d / 2], vec![0.0; d / 2]);
    let pos = 1000;
    base.cos_sin(pos, &mut cb, &mut sb);
    yarn.cos_sin(pos, &mut cy, &mut sy);
    let af = yarn.attention_factor();
    // Highest frequency (i = 0) is extrapolated: same angle as the default.
    assert!((cy[0] / af - cb[0]).abs() < 1e-5 && (sy[0] / af - sb[0]).abs() < 1e-5);
    // Lowest frequency is fully interpolated: the default angle at pos / 4.
    let (mut cq, mut sq) = (vec![0.0; d / 2], vec![0.0; d / 2]);
    base.cos_sin(pos / 4, &mut cq, &mut sq);
    let last = d / 2 - 1;
    assert!((cy[last] / af - cq[last]).abs() < 1e-4 && (sy[last] / af - sq[last]).abs() < 1e-4);
}

#[test]
fn rope_rejects_bad_parameters_naming_the_field() {
    let e = Rope::new(63, 1e4, &RopeScaling::Default, 10)
        .unwrap_err()
        .to_string();
    assert!(e.contains("head_dim"), "{e}");
    let e = Rope::new(64, 1e4, &RopeScaling::Linear { factor: 0.5 }, 10)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rope_scaling.factor"), "{e}");
}

#[test]
fn greedy_is_argmax_and_repetition_penalty_follows_hf() {
    let mut logits = vec![1.0, 3.0, -2.0, 2.5];
    let mut rng = Rng::new(0);
    let p = SamplingParams::greedy();
    assert_eq!(
        sampling::sample(&mut logits.clone(), &p, Seen::default(), &mut rng),
        1
    );
    let pen = SamplingParams {
        repetition_penalty: 2.0,
        ..SamplingParams::greedy()
    };
    // Token 1 penalised: 3.0 / 2 = 1.5 < 2.5, so token 3 wins; negative logits are multiplied.
    let seen = Seen {
        tokens: &[1, 2, 1],
        ..Seen::default()
    };
    assert_eq!(sampling::sample(&mut logits, &pen, seen, &mut rng), 3);
    assert_eq!(logits, vec![1.0, 1.5, -4.0, 2.5]);
}

/// OpenAI's penalties count only generated tokens (`logit -= presence · [c > 0] + frequency ·
/// c`), the logit bias adds, banned tokens cannot win, each against values worked by hand.
#[test]
fn presence_frequency_bias_and_bans_follow_openai() {
    let logits = vec![2.0f32, 1.0, 0.5, 0.0, -1.0];
    let p = SamplingParams {
        presence_penalty: 0.5,
        frequency_penalty: 0.25,
        logit_bias: vec![(3, 1.5), (4, -100.0)],
        ..SamplingParams::greedy()
    };
    // Prompt [0, 0]; generated [1, 1, 1, 2]; token 4 banned.
    let seen = Seen {
        tokens: &[0, 0, 1, 1, 1, 2],
        prompt_len: 2,
        banned: &[0],
        allowed: None,
    };
    let mut l = logits.clone();
    sampling::adjust_logits(&mut l, &p, seen);
    let want = [
        f32::NEG_INFINITY,
        1.0 - 0.5 - 0.25 * 3.0,
        0.5 - 0.5 - 0.25,
        1.5,
        -101.0,
    ];
    assert_eq!(l, want);
    let mut rng = Rng::new(0);
    assert_eq!(sampling::sample(&mut logits.clone(), &p, seen, &mut rng), 3);
    // A constraint's mask (tokens 2 and 4 allowed) outranks the bias on token 3.
    let masked = Seen {
        allowed: Some(&[0b0001_0100]),
        ..seen
    };
    assert_eq!(
        sampling::sample(&mut logits.clone(), &p, masked, &mut rng),
        2
    );
    // Negative penalties favour repeats; the prompt never counts (token 0 would reach 4).
    let q = SamplingParams {
        presence_penalty: -2.0,
        ..SamplingParams::greedy()
    };
    let unbanned = Seen {
        banned: &[],
        ..seen
    };
    assert_eq!(
        sampling::sample(&mut logits.clone(), &q, unbanned, &mut rng),
        1
    );
    for (bad, name) in [
        (
            SamplingParams {
                presence_penalty: 2.5,
                ..Default::default()
            },
            "presence_penalty",
        ),
        (
            SamplingParams {
                frequency_penalty: -3.0,
                ..Default::default()
            },
            "frequency_penalty",
        ),
        (
            SamplingParams {
                logit_bias: vec![(1, 101.0)],
                ..Default::default()
            },
            "logit_bias",
        ),
    ] {
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains(name), "{e}");
    }
}

#[test]
fn filters_restrict_the_support_as_specified() {
    let logits: Vec<f32> = vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
    let base = SamplingParams {
        temperature: 1.0,
        seed: 1,
        ..Default::default()
    };
    let d = sampling::filtered_distribution(
        &logits,
        &SamplingParams {
            top_k: 2,
            ..base.clone()
        },
    );
    assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![5, 4]);
    let full = reference::softmax(&logits);
    // top_p = 0.8: the smallest prefix whose mass reaches 0.8.
    let d = sampling::filtered_distribution(
        &logits,
        &SamplingParams {
            top_p: 0.8,
            ..base.clone()
        },
    );
    let mut cum = 0.0;
    let mut expect = 0;
    for p in full.iter().rev() {
        expect += 1;
        cum += p;
        if cum >= 0.8 {
            break;
        }
    }
    assert_eq!(d.len(), expect);
    // min_p = 0.2: keep tokens with p >= 0.2 * p_max.
    let d = sampling::filtered_distribution(
        &logits,
        &SamplingParams {
            min_p: 0.2,
            ..base.clone()
        },
    );
    let pmax = full[5];
    assert_eq!(d.len(), full.iter().filter(|p| **p >= 0.2 * pmax).count());
    assert!((d.iter().map(|x| x.1).sum::<f32>() - 1.0).abs() < 1e-5);
}

#[test]
fn seeded_sampling_is_reproducible_and_follows_the_distribution() {
    let logits: Vec<f32> = vec![0.0, 1.0, 2.0];
    let p = SamplingParams {
        temperature: 1.0,
        seed: 42,
        ..Default::default()
    };
    let draw = |seed| {
        let mut rng = Rng::new(seed);
        (0..4000)
            .map(|_| sampling::sample(&mut logits.clone(), &p, Seen::default(), &mut rng))
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(42), draw(42));
    assert_ne!(draw(42), draw(43));
    let s = draw(7);
    let probs = reference::softmax(&logits);
    for (t, p) in probs.iter().enumerate() {
        let f = s.iter().filter(|x| **x == t as u32).count() as f32 / s.len() as f32;
        assert!((f - p).abs() < 0.03, "token {t}: freq {f} vs p {p}");
    }
}

#[test]
fn sampling_params_validation_names_the_field() {
    let e = SamplingParams {
        top_p: 0.0,
        ..Default::default()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("top_p"));
    let e = SamplingParams {
        temperature: -1.0,
        ..Default::default()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("temperature"));
}

/// FP8 e4m3 as the OCP format defines it: 1.0, the largest finite 448, the smallest
/// subnormal 2⁻⁹, negative zero, NaN.
#[test]
fn e4m3_decodes_the_format_corners() {
    use switchyard_kernels::quant::e4m3_decode;
    assert_eq!(e4m3_decode(0x38), 1.0);
    assert_eq!(e4m3_decode(0x7e), 448.0);
    assert_eq!(e4m3_decode(0xfe), -448.0);
    assert_eq!(e4m3_decode(0x01), 2f32.powi(-9));
    assert_eq!(e4m3_decode(0x08), 2f32.powi(-6));
    assert_eq!(e4m3_decode(0x80), 0.0);
    assert!(e4m3_decode(0x7f).is_nan() && e4m3_decode(0xff).is_nan());
}

/// FP8 block-scaled weights dequantized in registers equal dequantize-then-f32, for decode
/// and prefill row counts, blocks that do not divide the matrix, weight-row chunks that
/// start inside a block row, and codes drawn from every finite code, only from those with
/// a nonzero exponent, or only from zeros and subnormals (the kernels widen the two kinds
/// differently).
#[test]
fn linear_fp8_matches_dequantized_reference() {
    use switchyard_kernels::quant::Fp8Block;
    let mut rng = Rng::new(21);
    let shapes = [
        (1usize, 96usize, 50usize, 16usize, 32usize),
        (4, 128, 64, 128, 128),
        (7, 200, 33, 32, 64),
        (20, 96, 50, 16, 32),
        (8, 192, 128, 128, 128),
        (1, 256, 1100, 128, 128),
        (3, 1024, 300, 128, 128),
    ];
    // Every finite code (0x7f and 0xff are NaN), those with a nonzero exponent, or only
    // zeros and subnormals (whose values next to normal codes' are below the tolerance).
    let kinds = ["all", "normal", "subnormal"];
    for (&(m, k, n, br, bc), codes) in shapes.iter().flat_map(|s| kinds.map(|c| (s, c))) {
        let x = randn(&mut rng, m * k, 1.0);
        let q: Vec<u8> = (0..n * k)
            .map(|_| {
                let b = (rng.next_u64() % 256) as u8;
                match codes {
                    _ if b & 0x7f == 0x7f => 0x38,
                    "normal" if b & 0x78 == 0 => b | 0x40,
                    "subnormal" => b & 0x87,
                    _ => b,
                }
            })
            .collect();
        let scales: Vec<f32> = (0..n.div_ceil(br) * k.div_ceil(bc))
            .map(|_| 0.001 + (rng.next_u64() % 1000) as f32 * 1e-5)
            .collect();
        let w = WeightRef::Fp8(Fp8Block {
            q: &q,
            scale_inv: &scales,
            k,
            block: [br, bc],
        });
        let mut out = vec![0.0; m * n];
        linear(&x, m, k, w, n, &mut out);
        let r = reference::linear(&x, m, k, w, n);
        let scale = r.iter().fold(f32::MIN_POSITIVE, |a, v| a.max(v.abs()));
        assert!(
            max_abs_diff(&out, &r) < 1e-5 * scale,
            "m={m} k={k} n={n} block={br}x{bc} codes {codes}: {}",
            max_abs_diff(&out, &r)
        );
    }
}

/// e2m1 from its bits as the OCP MX format defines it (1 sign, 2 exponent with bias 1,
/// 1 mantissa bit; exponent 0 is subnormal), independent of the kernels' tables.
fn e2m1_from_bits(n: u8) -> f32 {
    let sign = if n & 8 != 0 { -1.0 } else { 1.0 };
    let e = ((n >> 1) & 3) as i32;
    let m = (n & 1) as f32;
    sign * if e == 0 {
        m * 0.5
    } else {
        (1.0 + m / 2.0) * 2f32.powi(e - 1)
    }
}

/// MXFP4 weights dequantized in registers (AVX2 where present) equal a dequantization written
/// from the format's definition, for decode and prefill row counts, every nibble and a wide
/// range of block exponents, and for a view taking every second stored row (GPT-OSS's
/// interleaved gate/up).
#[test]
fn linear_mxfp4_matches_dequantized_reference() {
    use switchyard_kernels::quant::Mxfp4;
    let mut rng = Rng::new(22);
    for &(m, k, n, step) in &[
        (1usize, 64usize, 50usize, 1usize),
        (3, 96, 33, 2),
        (4, 128, 64, 1),
        (9, 32, 7, 2),
        (20, 256, 40, 1),
    ] {
        let stored = (n - 1) * step + 1 + (step - 1);
        let x = randn(&mut rng, m * k, 1.0);
        let blocks: Vec<u8> = (0..stored * k / 2).map(|_| rng.next_u64() as u8).collect();
        let scales: Vec<u8> = (0..stored * k / 32)
            .map(|_| 110 + (rng.next_u64() % 30) as u8)
            .collect();
        // Row 1 of the stored matrix starts the odd view when step is 2.
        for off in 0..step {
            let b = &blocks[off * k / 2..];
            let s = &scales[off * k / 32..];
            let w = Mxfp4::new(b, s, n, k, step).expect("view fits");
            let mut dense = vec![0.0f32; n * k];
            for r in 0..n {
                let sr = r * step;
                for c in 0..k {
                    let byte = b[sr * k / 2 + c / 2];
                    let nib = if c % 2 == 0 { byte & 15 } else { byte >> 4 };
                    dense[r * k + c] =
                        e2m1_from_bits(nib) * 2f32.powi(s[sr * k / 32 + c / 32] as i32 - 127);
                }
            }
            let mut out = vec![0.0; m * n];
            linear(&x, m, k, WeightRef::Mxfp4(w), n, &mut out);
            let r = reference::linear(&x, m, k, WeightRef::F32(&dense), n);
            let scale = r.iter().fold(1e-30f32, |a, v| a.max(v.abs()));
            assert!(
                max_abs_diff(&out, &r) < 1e-5 * scale,
                "m={m} k={k} n={n} step={step} off={off}: {}",
                max_abs_diff(&out, &r)
            );
            let mut row = vec![0.0; k];
            WeightRef::Mxfp4(w).row_into(n - 1, k, &mut row);
            assert_eq!(row, dense[(n - 1) * k..]);
        }
    }
}

/// The e8m0 scale is an exact power of two over its whole range, NaN at 255.
#[test]
fn e8m0_decodes_every_exponent() {
    use switchyard_kernels::quant::e8m0_decode;
    for e in 0..255u8 {
        assert_eq!(e8m0_decode(e), 2f64.powi(e as i32 - 127) as f32, "e={e}");
    }
    assert!(e8m0_decode(255).is_nan());
}

/// The encoders invert the decoders on every finite code and round to the nearest code
/// otherwise; the block quantizers reproduce their inputs within half a step.
#[test]
fn fp8_and_mxfp4_encoders_round_to_nearest() {
    use switchyard_kernels::quant::*;
    for b in 0..=255u8 {
        let v = e4m3_decode(b);
        if v.is_nan() {
            continue;
        }
        let back = e4m3_encode(v);
        // ±0 both decode to 0: either code is right.
        assert!(back == b || v == 0.0, "{b:#x} -> {v} -> {back:#x}");
    }
    for n in 0..16u8 {
        let v = E2M1[n as usize];
        assert!(e2m1_encode(v) == n || v == 0.0, "{n}");
    }
    assert_eq!(e4m3_encode(1000.0), 0x7e);
    assert_eq!(e2m1_encode(-9.0), 0x0f);
    assert_eq!(e2m1_encode(2.4), 4);
    assert_eq!(e2m1_encode(2.6), 5);
    let mut rng = Rng::new(3);
    let (n, k) = (5, 300);
    let w = randn(&mut rng, n * k, 0.05);
    let (q, s) = quantize_fp8(&w, n, k, [2, 128]);
    let blk = Fp8Block {
        q: &q,
        scale_inv: &s,
        k,
        block: [2, 128],
    };
    for (i, x) in w.iter().enumerate() {
        let got = blk.get(i);
        // e4m3 has 3 mantissa bits: within 1/16 relative, or the subnormal step absolute.
        let scale = s[(i / k / 2) * 3 + (i % k) / 128];
        assert!(
            (got - x).abs() <= x.abs() / 16.0 + scale * 2f32.powi(-10),
            "{x} vs {got}"
        );
    }
    let k = 64;
    let w = randn(&mut rng, 3 * k, 1.0);
    let (mut blocks, mut scales) = (vec![], vec![]);
    for r in w.chunks(k) {
        quantize_mxfp4_row(r, &mut blocks, &mut scales);
    }
    let m = Mxfp4::new(&blocks, &scales, 3, k, 1).unwrap();
    for (i, x) in w.iter().enumerate() {
        let step = e8m0_decode(scales[i / 32]);
        // Half the widest e2m1 gap (2, between 4 and 6) at the block's scale, or the
        // saturation of a block's largest values (below 8 steps) to 6.
        assert!(
            (m.get(i) - x).abs() <= 2.0 * step + 1e-6,
            "{x} vs {}",
            m.get(i)
        );
    }
}

/// Row slices of an FP8 block matrix, plain and transposed, hold exactly the stored values,
/// on and off block boundaries (MLA's per-head splits of `kv_b_proj`).
#[test]
fn fp8_row_slices_are_exact() {
    use switchyard_kernels::quant::Fp8Block;
    let mut rng = Rng::new(8);
    let (n, k, block) = (384usize, 200usize, [128usize, 64usize]);
    let q: Vec<u8> = (0..n * k).map(|_| (rng.next_u64() as u8) & 0xfe).collect();
    let s: Vec<f32> = (0..3 * 4).map(|i| 0.01 * (i + 1) as f32).collect();
    let w = Fp8Block {
        q: &q,
        scale_inv: &s,
        k,
        block,
    };
    for (r0, len) in [
        (0usize, 64usize),
        (64, 64),
        (128, 128),
        (96, 200),
        (200, 184),
    ] {
        for t in [false, true] {
            let sub = w.rows(r0, len, t);
            let v = sub.view();
            for i in 0..len {
                for c in 0..k {
                    let at = if t { c * len + i } else { i * k + c };
                    assert_eq!(
                        v.get(at),
                        w.get((r0 + i) * k + c),
                        "r0={r0} t={t} ({i},{c})"
                    );
                }
            }
        }
    }
}

/// The GEMM path widens bf16 and quantized weights one tile of rows at a time; a matrix of
/// several tiles (the last one partial) gives the reference's result.
#[test]
fn gemm_over_several_widened_tiles_matches_reference() {
    use switchyard_kernels::quant::quantize_fp8;
    let mut rng = Rng::new(31);
    let (m, k, n) = (20usize, 512usize, 1100usize);
    let x = randn(&mut rng, m * k, 1.0);
    let w = randn(&mut rng, n * k, 0.05);
    let wb: Vec<half::bf16> = w.iter().map(|v| half::bf16::from_f32(*v)).collect();
    let (q, s) = quantize_fp8(&w, n, k, [128, 128]);
    for wr in [
        WeightRef::Bf16(&wb),
        WeightRef::Fp8(switchyard_kernels::quant::Fp8Block {
            q: &q,
            scale_inv: &s,
            k,
            block: [128, 128],
        }),
    ] {
        let mut out = vec![0.0; m * n];
        linear(&x, m, k, wr, n, &mut out);
        let r = reference::linear(&x, m, k, wr, n);
        let scale = r.iter().fold(1.0f32, |a, v| a.max(v.abs()));
        assert!(
            max_abs_diff(&out, &r) < 1e-5 * scale,
            "{}",
            max_abs_diff(&out, &r)
        );
    }
}

/// A bf16 KV pool reads as its values widened: attention over it equals, bit for bit,
/// attention over an f32 pool holding the same (bf16-rounded) values — for separate keys and
/// values, for one pool serving as both (MLA's latent), and past the split-K threshold.
#[test]
fn bf16_kv_pools_read_as_their_widened_values() {
    let mut rng = Rng::new(41);
    for &(heads, kvh, d, len) in &[
        (8usize, 2usize, 64usize, 150usize),
        (16, 1, 288, 70),
        (4, 2, 16, 3000),
    ] {
        let bs = 16;
        let pl = pool(&mut rng, len, bs, kvh, d);
        let round = |x: &[f32]| -> (Vec<bf16>, Vec<f32>) {
            let b: Vec<bf16> = x.iter().map(|v| bf16::from_f32(*v)).collect();
            let f = b.iter().map(|v| v.to_f32()).collect();
            (b, f)
        };
        let ((kb, kf), (vb, vf)) = (round(&pl.k), round(&pl.v));
        let rows: Vec<QueryRow> = [0, len / 2, len - 1]
            .iter()
            .map(|&pos| QueryRow {
                table: &pl.table,
                pos,
            })
            .collect();
        let q = randn(&mut rng, rows.len() * heads * d, 1.0);
        let p = AttnParams {
            heads,
            kv_heads: kvh,
            head_dim: d,
            scale: 0.1,
            window: None,
        };
        for shared in [false, true] {
            let (vbs, vfs): (&[bf16], &[f32]) = if shared { (&kb, &kf) } else { (&vb, &vf) };
            let layer = |k, v| KvLayer {
                k,
                v,
                block_size: bs,
                kv_heads: kvh,
                head_dim: d,
            };
            let mut a = vec![0.0; q.len()];
            let mut b = vec![0.0; q.len()];
            paged_attention(
                &q,
                &rows,
                layer(KvSlice::Bf16(&kb), KvSlice::Bf16(vbs)),
                p,
                &mut a,
            );
            paged_attention(
                &q,
                &rows,
                layer(KvSlice::F32(&kf), KvSlice::F32(vfs)),
                p,
                &mut b,
            );
            assert_eq!(a, b, "heads={heads} d={d} len={len} shared={shared}");
            assert!(a.iter().all(|v| v.is_finite()));
        }
    }
}
