//! The engine's prefix cache under random mixes of operations (seeded): sequences that share
//! prefixes started and fed in chunks of random sizes, decoded, cancelled, preempted (released
//! and prefilled again from all their tokens) and cut back, on an engine with little KV (so it
//! evicts), beside an engine without the cache given the same operations. Every logit equals
//! the uncached engine's; the cached engine never runs out of blocks where the other does
//! not; its block accounting is exact after every operation (`free + used + cached ==
//! capacity` and the pool's own invariants); nothing is held at the end.

mod common;
use common::{fixture, golden, ids};

use switchyard_kernels::rng::Rng;
use switchyard_worker::engine::{ChunkSpec, Engine, EngineOptions, Logits};

fn engine(model: &str, prefix_cache: bool) -> Engine {
    Engine::load(
        &fixture(model),
        &EngineOptions {
            prefix_cache,
            kv_blocks: Some(20),
            max_context: Some(600),
            ..Default::default()
        },
    )
    .unwrap()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Feeds `tokens` to `seq` on both engines in one chunk; false (the sequence released on
/// both) when the uncached engine has no room, which must then be the only way it fails.
fn feed(on: &mut Engine, off: &mut Engine, seq: u64, tokens: &[u32], logits: Logits) -> bool {
    let chunk = [ChunkSpec {
        seq_id: seq,
        tokens,
        logits,
    }];
    let a = on.step(&chunk, false);
    let b = off.step(&chunk, false);
    match (a, b) {
        (Ok(a), Ok(b)) => {
            let d = max_abs(&a.logits, &b.logits);
            assert!(d < 1e-5, "seq {seq}: logits {d} from the uncached engine's");
            true
        }
        (a, Err(e)) => {
            assert!(e.to_string().contains("KV"), "uncached engine: {e}");
            if let Err(e) = a {
                assert!(e.to_string().contains("KV"), "cached engine: {e}");
            }
            on.release(seq);
            off.release(seq);
            false
        }
        (Err(e), Ok(_)) => {
            panic!("seq {seq}: the cached engine failed where the other did not: {e}")
        }
    }
}

fn check(e: &Engine) {
    e.check_kv().unwrap();
    assert_eq!(e.kv_free() + e.kv_used() + e.kv_cached(), e.kv_capacity());
}

#[test]
fn random_mixes_keep_the_accounting_exact_and_the_logits_of_no_cache() {
    for model in ["tiny-qwen3-moe", "tiny-deepseek-v3"] {
        let long = ids(&golden(model)["prompts"][3]["input_ids"]); // 281 tokens
        let prefixes: Vec<Vec<u32>> = vec![
            long[..64].to_vec(),
            long[..100].to_vec(),
            long[100..180].iter().rev().copied().collect(),
        ];
        let vocab = engine(model, false).config().vocab_size as u64;
        let mut evicted = 0;
        for seed in 0..6 {
            let mut rng = Rng::new(seed);
            let mut pick = |n: usize| (rng.next_u64() % n as u64) as usize;
            let (mut on, mut off) = (engine(model, true), engine(model, false));
            let mut live: Vec<(u64, Vec<u32>)> = Vec::new();
            let mut next = 1u64;
            for _ in 0..60 {
                match pick(6) {
                    0 | 1 => {
                        let mut tokens = prefixes[pick(3)].clone();
                        for _ in 0..1 + pick(40) {
                            tokens.push(10 + pick(vocab as usize - 10) as u32);
                        }
                        let (id, mut at, mut ok) = (next, 0, true);
                        next += 1;
                        while ok && at < tokens.len() {
                            let n = (1 + pick(60)).min(tokens.len() - at);
                            let last = at + n == tokens.len();
                            let l = if last { Logits::Last } else { Logits::None };
                            ok = feed(&mut on, &mut off, id, &tokens[at..at + n], l);
                            at += n;
                        }
                        if ok {
                            live.push((id, tokens));
                        }
                    }
                    2 if !live.is_empty() => {
                        let i = pick(live.len());
                        let t = 10 + pick(vocab as usize - 10) as u32;
                        let id = live[i].0;
                        if feed(&mut on, &mut off, id, &[t], Logits::Last) {
                            live[i].1.push(t);
                        } else {
                            live.swap_remove(i);
                        }
                    }
                    3 if !live.is_empty() => {
                        let (id, _) = live.swap_remove(pick(live.len()));
                        on.release(id);
                        off.release(id);
                    }
                    4 if !live.is_empty() => {
                        // Preempted: freed, then prefilled again from everything it had.
                        let i = pick(live.len());
                        let (id, tokens) = live[i].clone();
                        on.release(id);
                        off.release(id);
                        if !feed(&mut on, &mut off, id, &tokens, Logits::Last) {
                            live.swap_remove(i);
                        }
                    }
                    5 if !live.is_empty() => {
                        let i = pick(live.len());
                        let len = 1 + pick(live[i].1.len());
                        let id = live[i].0;
                        assert!(off.truncate(id, len));
                        if on.truncate(id, len) {
                            live[i].1.truncate(len);
                        } else {
                            // No block left to copy a shared one to: given up on both.
                            on.release(id);
                            off.release(id);
                            live.swap_remove(i);
                        }
                    }
                    _ => {}
                }
                check(&on);
                check(&off);
            }
            evicted += on.prefix_stats().evicted_blocks;
            assert!(
                on.prefix_stats().hit_blocks > 0,
                "{model} seed {seed}: nothing reused"
            );
            for (id, _) in live {
                on.release(id);
                off.release(id);
            }
            assert_eq!((on.kv_used(), off.kv_used()), (0, 0));
            assert_eq!(off.kv_cached(), 0);
            check(&on);
        }
        assert!(evicted > 0, "{model}: the runs never evicted");
    }
}
