//! Context parallelism in process: one sequence's KV split over 2 and 3 ranks (threads over
//! the `Local` all-to-all, each rank's cache made small on purpose so that the sequence cannot
//! fit in one), its attention merged from the holders' partial states at its home. Greedy
//! tokens and logits at every position must equal the same sequence on one big worker (logits
//! within 1e-5) and the transformers goldens; a rank that holds a range of the long sequence
//! also homes a short sequence of its own, whose tokens must be the goldens too.

mod common;
use common::{fixture, floats, golden, ids};

use switchyard_coordinator::placement::rank_holders;
use switchyard_kernels::sampling::argmax;
use switchyard_worker::comm::{Comm, LocalComm};
use switchyard_worker::engine::{
    ChunkSpec, ContextPlan, Engine, EngineOptions, ExpertSetup, GuestSpec, Logits, SeqLayout, Span,
};

const LONG: u64 = 7;
const SHORT: u64 = 8;
const DECODE: usize = 24;

/// The model and how the long sequence is fed: prefill chunks of `chunk` tokens, then
/// `decode` greedy tokens, each step returning `logits` (all rows, or the last).
#[derive(Clone)]
struct Case {
    dir: std::path::PathBuf,
    chunk: usize,
    decode: usize,
    logits: Logits,
}

impl Case {
    fn fixture(model: &str) -> Self {
        Case {
            dir: fixture(model),
            chunk: 37,
            decode: DECODE,
            logits: Logits::All,
        }
    }
}

/// What one run of the long sequence gives: every position's logits (prompt, then each
/// decoded token's) and the greedy tokens.
struct Run {
    logits: Vec<Vec<f32>>,
    tokens: Vec<u32>,
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The largest difference between two runs' logits, every position.
fn worst(a: &Run, b: &Run) -> f32 {
    a.logits
        .iter()
        .zip(&b.logits)
        .map(|(x, y)| max_abs(x, y))
        .fold(0.0, f32::max)
}

/// The chunks of the long sequence's steps: the prompt `case.chunk` tokens at a time, then
/// one decoded token per step (`None`: the token the last step sampled).
fn steps(case: &Case, prompt: &[u32]) -> Vec<Option<Vec<u32>>> {
    let mut s: Vec<_> = prompt
        .chunks(case.chunk)
        .map(|c| Some(c.to_vec()))
        .collect();
    s.extend((0..case.decode - 1).map(|_| None));
    s
}

/// The long sequence on one engine with room for all of it.
fn unsplit(case: &Case, prompt: &[u32]) -> Run {
    let mut e = Engine::load(&case.dir, &EngineOptions::default()).unwrap();
    let v = e.config().vocab_size;
    let mut run = Run {
        logits: Vec::new(),
        tokens: Vec::new(),
    };
    let prefill = prompt.len().div_ceil(case.chunk);
    for (i, chunk) in steps(case, prompt).into_iter().enumerate() {
        let toks = chunk.unwrap_or_else(|| vec![*run.tokens.last().unwrap()]);
        let out = e
            .step(
                &[ChunkSpec {
                    seq_id: LONG,
                    tokens: &toks,
                    logits: case.logits,
                }],
                false,
            )
            .unwrap();
        run.logits.extend(out.logits.chunks(v).map(<[f32]>::to_vec));
        if i + 1 >= prefill {
            run.tokens.push(argmax(run.logits.last().unwrap()) as u32);
        }
    }
    run
}

/// `ranges[i] = (rank, start)`: that rank holds the long sequence's positions from `start` to
/// the next range's start (the last: to its end); `ranges[0]` is `(0, 0)`, its home. The spans
/// beyond the home's range once the sequence is `len` long.
fn spans(ranges: &[(u32, usize)], len: usize) -> Vec<Span> {
    (1..ranges.len())
        .filter(|&i| ranges[i].1 < len)
        .map(|i| Span {
            rank: ranges[i].0,
            start: ranges[i].1,
            end: ranges.get(i + 1).map_or(len, |&(_, e)| e.min(len)),
        })
        .collect()
}

/// The long sequence homed on rank 0 of `blocks.len()` ranks, its KV split as `ranges` say;
/// each rank's cache has `blocks[rank]` blocks of 16. Rank 1 also homes `short` (prefilled in
/// the first step, then decoded beside). Returns the long run and the short sequence's tokens.
fn split(
    case: &Case,
    prompt: &[u32],
    short: &[u32],
    ranges: &[(u32, usize)],
    blocks: &[usize],
) -> (Run, Vec<u32>) {
    let world = blocks.len();
    let cfg = switchyard_worker::engine::read_config(&case.dir).unwrap();
    let holders = rank_holders(&cfg, world, cfg.num_experts.div_ceil(world), 0).unwrap();
    let plan = steps(case, prompt);
    let handles: Vec<_> = LocalComm::group(world)
        .into_iter()
        .enumerate()
        .map(|(rank, comm)| {
            let (case, holders, plan) = (case.clone(), holders.clone(), plan.clone());
            let (ranges, short) = (ranges.to_vec(), short.to_vec());
            let kv_blocks = blocks[rank];
            std::thread::spawn(move || {
                let opts = EngineOptions {
                    kv_blocks: Some(kv_blocks),
                    ..Default::default()
                };
                let setup = ExpertSetup::Parallel {
                    holders,
                    comm: Comm::Local(comm),
                };
                let mut e = Engine::load_with(&case.dir, &opts, setup).unwrap();
                let v = e.config().vocab_size;
                let mut run = Run {
                    logits: Vec::new(),
                    tokens: Vec::new(),
                };
                let mut short_tokens: Vec<u32> = Vec::new();
                let mut len = 0;
                let prefill = plan.iter().filter(|c| c.is_some()).count();
                for (i, chunk) in plan.iter().enumerate() {
                    let n = chunk.as_ref().map_or(1, Vec::len);
                    let (before, after) = (len, len + n);
                    len = after;
                    let all = spans(&ranges, after);
                    let layouts = if rank == 0 && !all.is_empty() {
                        vec![SeqLayout {
                            seq_id: LONG,
                            spans: all.clone(),
                        }]
                    } else {
                        Vec::new()
                    };
                    // A range grows when this step writes into it.
                    let guests: Vec<GuestSpec> = all
                        .iter()
                        .filter(|s| s.rank as usize == rank && s.end > before.max(s.start))
                        .map(|s| GuestSpec {
                            seq_id: LONG,
                            home: 0,
                            start: s.start,
                            end: s.end,
                        })
                        .collect();
                    let long_toks: Vec<u32> = chunk
                        .clone()
                        .unwrap_or_else(|| run.tokens.last().copied().into_iter().collect());
                    let short_toks: Vec<u32> = match short_tokens.last() {
                        None => short.clone(),
                        Some(t) => vec![*t],
                    };
                    let mut chunks = Vec::new();
                    if rank == 0 {
                        chunks.push(ChunkSpec {
                            seq_id: LONG,
                            tokens: &long_toks,
                            logits: case.logits,
                        });
                    }
                    if rank == 1 && !short.is_empty() && short_tokens.len() < DECODE {
                        chunks.push(ChunkSpec {
                            seq_id: SHORT,
                            tokens: &short_toks,
                            logits: Logits::Last,
                        });
                    }
                    let cp = ContextPlan {
                        layouts: &layouts,
                        guests: &guests,
                        exchange: !all.is_empty(),
                    };
                    let out = e
                        .step_with(&chunks, cp, false)
                        .unwrap_or_else(|err| panic!("rank {rank}, step {i}: {err}"));
                    let rows: Vec<Vec<f32>> = out.logits.chunks(v).map(<[f32]>::to_vec).collect();
                    if rank == 0 {
                        run.logits.extend(rows);
                        if i + 1 >= prefill {
                            run.tokens.push(argmax(run.logits.last().unwrap()) as u32);
                        }
                    } else if rank == 1 && !rows.is_empty() {
                        short_tokens.push(argmax(rows.last().unwrap()) as u32);
                    }
                    e.check_kv().unwrap();
                }
                // What each rank holds of the long sequence is its ranges, no more.
                let want: Vec<(u64, u32, usize, usize)> = spans(&ranges, len)
                    .iter()
                    .filter(|s| s.rank as usize == rank)
                    .map(|s| (LONG, 0, s.start, s.end - s.start))
                    .collect();
                assert_eq!(e.guests(), want, "rank {rank}");
                e.release(LONG);
                e.release(SHORT);
                assert_eq!(e.kv_used(), 0, "rank {rank}: blocks left after release");
                (run, short_tokens)
            })
        })
        .collect();
    let mut results: Vec<(Run, Vec<u32>)> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();
    let short_tokens = results.swap_remove(1).1;
    (results.swap_remove(0).0, short_tokens)
}

/// The golden long prompt split over 2 and 3 ranks, each cache too small for it alone.
fn check(model: &str) {
    let g = golden(model);
    let prompts = g["prompts"].as_array().unwrap();
    let long = &prompts[3];
    let prompt = ids(&long["input_ids"]);
    let want = ids(&long["greedy"]["new_ids"]);
    let short = ids(&prompts[0]["input_ids"]);
    let short_want = ids(&prompts[0]["greedy"]["new_ids"]);
    let total = prompt.len() + DECODE;
    let case = Case::fixture(model);
    let whole = unsplit(&case, &prompt);
    assert_eq!(whole.tokens, want[..DECODE], "{model}: unsplit run");
    for (ranges, blocks) in [
        // Home 0..128 (8 blocks), rank 1 the rest.
        (vec![(0, 0), (1, 128)], vec![8, 16]),
        // Home 0..96, rank 1 96..200 (cut inside a block), rank 2 the rest.
        (vec![(0, 0), (1, 96), (2, 200)], vec![6, 10, 8]),
        // Home 0..64, rank 1 64..160, then the home again from 160 (a second range there),
        // and rank 1 again from 250.
        (vec![(0, 0), (1, 64), (0, 160), (1, 250)], vec![11, 13]),
    ] {
        let (run, short_got) = split(&case, &prompt, &short, &ranges, &blocks);
        assert!(
            blocks[0] * 16 < total,
            "the home could have held the sequence alone"
        );
        assert_eq!(
            run.tokens,
            want[..DECODE],
            "{model} {ranges:?}: greedy tokens"
        );
        assert_eq!(
            short_got,
            short_want[..DECODE],
            "{model} {ranges:?}: the short sequence"
        );
        assert_eq!(run.logits.len(), whole.logits.len());
        let worst = worst(&run, &whole);
        assert!(
            worst < 1e-5,
            "{model} {ranges:?}: logits {worst} from the unsplit run"
        );
        // And the goldens' logits at their positions.
        for rec in long["logits"].as_array().unwrap() {
            let p = rec["position"].as_u64().unwrap() as usize;
            let d = max_abs(&run.logits[p], &floats(&rec["values"]));
            assert!(
                d < 1e-4,
                "{model} {ranges:?}: position {p} is {d} from the golden"
            );
        }
    }
}

#[test]
fn split_gqa_sequence_equals_unsplit_and_goldens() {
    check("tiny-qwen3-moe");
}

#[test]
fn split_sequence_with_sinks_and_sliding_window_equals_unsplit() {
    check("tiny-gpt-oss");
}

#[test]
fn split_mla_latent_cache_equals_unsplit() {
    check("tiny-deepseek-v3");
}

/// A generated 32K-token prompt on the `long` preset (256K context, YaRN over a 32K original:
/// its positions reach the scaled range), split over 2 and 3 workers: the same greedy tokens,
/// and logits within 1e-5, as on one worker.
#[test]
fn a_generated_32k_prompt_split_over_2_and_3_workers_equals_unsplit() {
    let dir = std::env::temp_dir().join(format!("switchyard-cp-long-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = switchyard_worker::presets::preset("long").unwrap();
    switchyard_worker::presets::generate(
        &cfg,
        &dir,
        switchyard_worker::WeightDType::F32,
        5,
        1 << 30,
        &[],
    )
    .unwrap();
    let case = Case {
        dir: dir.clone(),
        chunk: 2048,
        decode: 8,
        logits: Logits::Last,
    };
    let mut rng = switchyard_kernels::rng::Rng::new(11);
    let prompt: Vec<u32> = (0..32768).map(|_| (rng.next_u64() % 2000) as u32).collect();
    let whole = unsplit(&case, &prompt);
    for (ranges, blocks) in [
        (vec![(0, 0), (1, 20000)], vec![1250, 1000]),
        (vec![(0, 0), (1, 11000), (2, 22000)], vec![700, 700, 700]),
    ] {
        let (run, _) = split(&case, &prompt, &[], &ranges, &blocks);
        assert_eq!(run.tokens, whole.tokens, "{ranges:?}: greedy tokens");
        let worst = worst(&run, &whole);
        assert!(
            worst < 1e-5,
            "{ranges:?}: logits {worst} from the unsplit run"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
