//! Expert parallelism in process: N ranks on threads, each homing some prompts (attention
//! data-parallel) and holding only its share of the experts, exchanging tokens through the
//! `Local` all-to-all. Greedy tokens must equal the transformers goldens, with and without
//! replicated experts, including a rank that homes no sequence but still serves experts.

mod common;
use common::{fixture, floats, golden, ids};

use std::sync::Arc;
use std::time::Duration;
use switchyard_coordinator::placement::rank_holders;
use switchyard_worker::comm::{Comm, LocalComm, TcpComm};
use switchyard_worker::engine::{ChunkSpec, Engine, EngineOptions, ExpertSetup, Logits};

/// `holders[layer][expert]` from the planner, with tight capacity: the experts fit with the
/// requested replicas and little room to spare.
fn holders(model: &str, world: usize, redundant: usize) -> Vec<Vec<Vec<u32>>> {
    let cfg = switchyard_worker::engine::read_config(&fixture(model)).unwrap();
    rank_holders(
        &cfg,
        world,
        (cfg.num_experts + redundant).div_ceil(world),
        redundant,
    )
    .unwrap()
}

struct RankResult {
    /// (prompt index, greedy tokens, logits at the last prompt position)
    per_prompt: Vec<(usize, Vec<u32>, Vec<f32>)>,
}

fn run_rank(
    model: &str,
    comm: Comm,
    holders: Vec<Vec<Vec<u32>>>,
    mine: Vec<(usize, Vec<u32>)>,
    steps: usize,
) -> RankResult {
    let mut e = Engine::load_with(
        &fixture(model),
        &EngineOptions::default(),
        ExpertSetup::Parallel { holders, comm },
    )
    .unwrap();
    let v = e.config().vocab_size;
    let chunks: Vec<ChunkSpec> = mine
        .iter()
        .map(|(i, p)| ChunkSpec {
            seq_id: *i as u64,
            tokens: p,
            logits: Logits::Last,
        })
        .collect();
    let out = e.step(&chunks, false).unwrap();
    let last: Vec<Vec<f32>> = out.logits.chunks(v).map(|c| c.to_vec()).collect();
    let mut seqs: Vec<(u64, Vec<u32>)> = mine
        .iter()
        .zip(&last)
        .map(|((i, p), l)| {
            let mut t = p.clone();
            t.push(switchyard_kernels::sampling::argmax(l) as u32);
            (*i as u64, t)
        })
        .collect();
    // Ranks with no sequences still step: they serve their experts to the others.
    decode(&mut e, &mut seqs, steps - 1);
    RankResult {
        per_prompt: mine
            .iter()
            .zip(seqs)
            .zip(last)
            .map(|(((i, p), (_, t)), l)| (*i, t[p.len()..].to_vec(), l))
            .collect(),
    }
}

/// The golden prompts' token ids.
fn prompt_ids(g: &serde_json::Value) -> Vec<Vec<u32>> {
    g["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| ids(&p["input_ids"]))
        .collect()
}

fn check(model: &str, world: usize, redundant: usize, homing_ranks: usize) {
    check_with(
        model,
        LocalComm::group(world)
            .into_iter()
            .map(Comm::Local)
            .collect(),
        redundant,
        homing_ranks,
    )
}

/// A TCP mesh of `world` ranks on loopback.
fn tcp_group(world: usize) -> Vec<Comm> {
    TcpComm::loopback_mesh(world, Duration::from_secs(30))
        .unwrap()
        .into_iter()
        .map(|c| Comm::Tcp(Arc::new(c)))
        .collect()
}

fn check_with(model: &str, comms: Vec<Comm>, redundant: usize, homing_ranks: usize) {
    let world = comms.len();
    let g = golden(model);
    let prompts = prompt_ids(&g);
    let steps = 24;
    let h = holders(model, world, redundant);
    let handles: Vec<_> = comms
        .into_iter()
        .enumerate()
        .map(|(rank, c)| {
            let mine: Vec<(usize, Vec<u32>)> = prompts
                .iter()
                .cloned()
                .enumerate()
                .filter(|(i, _)| i % homing_ranks == rank)
                .collect();
            let (model, h) = (model.to_string(), h.clone());
            std::thread::spawn(move || run_rank(&model, c, h, mine, steps))
        })
        .collect();
    let mut seen = 0;
    for hd in handles {
        for (i, toks, last) in hd.join().unwrap().per_prompt {
            let p = &g["prompts"][i];
            assert_eq!(
                toks,
                ids(&p["greedy"]["new_ids"]),
                "{model} world={world} redundant={redundant} prompt {i}"
            );
            let rec = p["logits"].as_array().unwrap().last().unwrap();
            let want = floats(&rec["values"]);
            let d = last
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(d < 1e-4, "{model} world={world} prompt {i}: logit diff {d}");
            seen += 1;
        }
    }
    assert_eq!(seen, prompts.len());
}

const MODELS: &[&str] = common::FAMILIES;

#[test]
fn two_ranks_match_goldens() {
    for model in MODELS {
        check(model, 2, 0, 2);
    }
}

#[test]
fn three_ranks_with_replicas_and_an_idle_rank_match_goldens() {
    for model in MODELS {
        check(model, 3, 4, 2);
    }
}

#[test]
fn tcp_mesh_ranks_match_goldens() {
    for model in MODELS {
        check_with(model, tcp_group(3), 2, 3);
    }
}

/// Greedy decode of `seqs` (id → tokens so far, the last not yet fed) for `steps` steps on
/// `e`; appends each sampled token.
fn decode(e: &mut Engine, seqs: &mut [(u64, Vec<u32>)], steps: usize) {
    let v = e.config().vocab_size;
    for _ in 0..steps {
        let last: Vec<[u32; 1]> = seqs.iter().map(|(_, t)| [*t.last().unwrap()]).collect();
        let chunks: Vec<ChunkSpec> = seqs
            .iter()
            .zip(&last)
            .map(|((id, _), t)| ChunkSpec {
                seq_id: *id,
                tokens: t,
                logits: Logits::Last,
            })
            .collect();
        let out = e.step(&chunks, false).unwrap();
        for ((_, t), l) in seqs.iter_mut().zip(out.logits.chunks(v)) {
            t.push(switchyard_kernels::sampling::argmax(l) as u32);
        }
    }
}

/// A worker lost mid-stream: rank 0 of a 2-rank group is carried into a group of one
/// (`Engine::rejoin`) instead of being rebuilt. It keeps its sequences' KV (one of them cut
/// back a position, as when a step completed on it but failed elsewhere), loads only the
/// experts it lacked, and its streams go on to exactly the goldens.
#[test]
fn a_rank_carried_into_a_smaller_group_keeps_its_kv_and_matches_goldens() {
    for model in ["tiny-qwen3-moe", "tiny-deepseek-v3", "tiny-gpt-oss"] {
        let g = golden(model);
        let prompts = prompt_ids(&g);
        let h = holders(model, 2, 0);
        let (before, total) = (5, 24);
        let mut comms = LocalComm::group(2).into_iter().map(Comm::Local);
        let (c0, c1) = (comms.next().unwrap(), comms.next().unwrap());
        // Rank 1 serves its experts for the first steps, then dies (its engine and mesh end
        // of the thread go away).
        let lost = {
            let (model, h) = (model.to_string(), h.clone());
            std::thread::spawn(move || {
                let mut e = Engine::load_with(
                    &fixture(&model),
                    &EngineOptions::default(),
                    ExpertSetup::Parallel {
                        holders: h,
                        comm: c1,
                    },
                )
                .unwrap();
                for _ in 0..before {
                    e.step(&[], false).unwrap();
                }
            })
        };
        let mut e = Engine::load_with(
            &fixture(model),
            &EngineOptions::default(),
            ExpertSetup::Parallel {
                holders: h.clone(),
                comm: c0,
            },
        )
        .unwrap();
        let v = e.config().vocab_size;
        let chunks: Vec<ChunkSpec> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| ChunkSpec {
                seq_id: i as u64,
                tokens: p,
                logits: Logits::Last,
            })
            .collect();
        let out = e.step(&chunks, false).unwrap();
        let mut seqs: Vec<(u64, Vec<u32>)> = prompts
            .iter()
            .zip(out.logits.chunks(v))
            .enumerate()
            .map(|(i, (p, l))| {
                let mut t = p.clone();
                t.push(switchyard_kernels::sampling::argmax(l) as u32);
                (i as u64, t)
            })
            .collect();
        decode(&mut e, &mut seqs, before - 1);
        lost.join().unwrap();
        // Sequence 0's last decode is undone: its KV is cut back a position and its last
        // sampled token dropped, so it is fed again.
        let (id0, t0) = &mut seqs[0];
        let cached = e.seq_len(*id0);
        assert_eq!(cached, t0.len() - 1);
        assert!(e.truncate(*id0, cached - 1));
        assert!(!e.truncate(*id0, cached));
        t0.pop();
        let kv_before = e.kv_used();
        let cfg = e.config().clone();
        let mine = h
            .iter()
            .flatten()
            .filter(|ranks| ranks.contains(&0))
            .count();
        let all: Vec<Vec<Vec<u32>>> = h
            .iter()
            .map(|l| l.iter().map(|_| vec![0]).collect())
            .collect();
        let one = Comm::Local(LocalComm::group(1).pop().unwrap());
        let loaded = e.rejoin(one, all).unwrap();
        let sparse = cfg.sparse_layers.iter().filter(|s| **s).count();
        assert_eq!(
            loaded,
            sparse * cfg.num_experts - mine,
            "{model}: experts loaded"
        );
        assert_eq!(e.kv_used(), kv_before, "{model}: the KV is kept as it was");
        // Sequence 0 catches up by one step, then all go on together.
        let mut first = vec![seqs[0].clone()];
        decode(&mut e, &mut first, 1);
        seqs[0] = first.pop().unwrap();
        let left = total - (seqs[1].1.len() - prompts[1].len());
        decode(&mut e, &mut seqs, left);
        for (i, (_, t)) in seqs.iter().enumerate() {
            assert_eq!(
                &t[prompts[i].len()..],
                &ids(&g["prompts"][i]["greedy"]["new_ids"])[..],
                "{model} prompt {i}"
            );
        }
    }
}

#[test]
fn holders_cover_every_expert_with_replicas() {
    let h = holders("tiny-qwen3-moe", 3, 4);
    for layer in &h {
        assert_eq!(layer.len(), 8);
        assert!(layer.iter().all(|ws| !ws.is_empty()));
        assert_eq!(layer.iter().map(|ws| ws.len()).sum::<usize>(), 12);
    }
}

/// The NCCL transport on one GPU (feature `cuda`; skips, saying why, without a GPU): raw
/// exchanges of empty, small and 8 MiB buffers come back intact, and the expert-parallel
/// engine streams the goldens with its all-to-all going through NCCL.
#[cfg(feature = "cuda")]
#[test]
fn nccl_single_gpu_all_to_all_and_goldens() {
    use switchyard_worker::nccl::NcclComm;
    if let Err(why) = switchyard_kernels::cuda::probe() {
        eprintln!("SKIPPED: no GPU: {why}");
        return;
    }
    // Bootstrapped over a mesh, as a worker does at each epoch.
    let mesh = Comm::Local(LocalComm::group(1).pop().unwrap());
    let nccl = NcclComm::over(&mesh, 0).unwrap();
    for n in [0usize, 1, 4093, 8 << 20] {
        let buf: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
        let got = nccl.all_to_all(vec![buf.clone()]).unwrap();
        assert_eq!(got, vec![buf], "{n} bytes");
    }
    assert!(matches!(
        nccl.all_to_all(vec![vec![], vec![]]),
        Err(switchyard_worker::comm::CommError::Arity {
            expected: 1,
            got: 2
        })
    ));
    let comm = Comm::Nccl(Arc::new(nccl));
    for model in ["tiny-qwen3-moe", "tiny-mixtral"] {
        check_with(model, vec![comm.clone()], 0, 1);
    }
}
