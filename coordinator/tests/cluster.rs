//! Worker processes on loopback: two `switchyard worker` processes joined by the TCP mesh,
//! driven over their gRPC control streams, produce the transformers golden tokens for many
//! concurrent requests.

mod common;
use common::{fixture, spawn_serving, Proc};

use serde_json::Value;
use std::path::Path;
use switchyard_coordinator::driver::{Driver, GenRequest};
use switchyard_coordinator::remote::GrpcCluster;

/// How a leader holding fencing token `fence` reaches plaintext workers.
fn fenced(fence: u64) -> switchyard_coordinator::remote::ControlAccess {
    switchyard_coordinator::remote::ControlAccess { fence, tls: None }
}

fn spawn_worker(model: &Path) -> (Proc, String) {
    spawn_serving(&["worker", "--model", model.to_str().unwrap()])
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A greedy request for 24 tokens, EOS ignored (the goldens' setting).
fn greedy(id: u64, prompt: Vec<u32>) -> GenRequest {
    GenRequest::greedy(id, prompt, 24)
}

#[test]
fn two_worker_processes_match_goldens() {
    for model in ["tiny-qwen3-moe", "tiny-mixtral"] {
        let dir = fixture(model);
        let golden: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
                .unwrap();
        let workers: Vec<(Proc, String)> = (0..2).map(|_| spawn_worker(&dir)).collect();
        let urls: Vec<String> = workers.iter().map(|w| w.1.clone()).collect();
        let cluster = GrpcCluster::connect(&urls, &dir, 2, 64, 16).unwrap();
        let mut d = Driver::new(cluster, 128, 64);
        let mut want = std::collections::HashMap::new();
        for c in 0..4u64 {
            for (i, p) in golden["prompts"].as_array().unwrap().iter().enumerate() {
                let id = c * 10 + i as u64;
                d.submit(greedy(id, ids(&p["input_ids"]))).unwrap();
                want.insert(id, ids(&p["greedy"]["new_ids"]));
            }
        }
        let mut got: std::collections::HashMap<u64, Vec<u32>> = Default::default();
        for _ in 0..2000 {
            if d.is_idle() {
                break;
            }
            for e in d.step().unwrap() {
                got.entry(e.id).or_default().push(e.token);
            }
        }
        assert_eq!(got, want, "{model}");
        d.step().unwrap();
        assert_eq!(d.kv_used(), &[0, 0]);
    }
}

/// Submits every golden prompt to `d` (request id = prompt index, 24 greedy tokens); the
/// golden tokens per request id.
fn submit_goldens(
    d: &mut Driver,
    golden: &Value,
) -> Result<std::collections::HashMap<u64, Vec<u32>>, String> {
    let mut want = std::collections::HashMap::new();
    for (i, p) in golden["prompts"].as_array().unwrap().iter().enumerate() {
        d.submit(greedy(i as u64, ids(&p["input_ids"])))
            .map_err(|e| e.to_string())?;
        want.insert(i as u64, ids(&p["greedy"]["new_ids"]));
    }
    Ok(want)
}

/// Runs every golden prompt of `model` through `d` at once; the tokens per request id.
fn run_goldens(d: &mut Driver, golden: &Value) -> Result<(), String> {
    let want = submit_goldens(d, golden)?;
    let mut got: std::collections::HashMap<u64, Vec<u32>> = Default::default();
    while !d.is_idle() {
        for e in d.step().map_err(|e| e.to_string())? {
            got.entry(e.id).or_default().push(e.token);
        }
    }
    assert_eq!(got, want);
    Ok(())
}

/// Epochs: a new control stream (a new leader) takes the workers over from a live one, whose
/// next step fails at once instead of hanging; after that one closes, another epoch starts
/// cleanly. Each epoch starts from its own placement with no sequence cached (a coordinator
/// that lists none to keep gets none) and serves the goldens.
#[test]
fn a_new_coordinator_takes_over_the_workers_epoch_by_epoch() {
    let dir = fixture("tiny-qwen3-moe");
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let workers: Vec<(Proc, String)> = (0..2).map(|_| spawn_worker(&dir)).collect();
    let urls: Vec<String> = workers.iter().map(|w| w.1.clone()).collect();

    let mut first = Driver::new(
        GrpcCluster::connect(&urls, &dir, 0, 64, 16).unwrap(),
        128,
        64,
    );
    run_goldens(&mut first, &golden).unwrap();

    // A second coordinator connects while the first still holds its streams.
    let mut second = Driver::new(
        GrpcCluster::connect(&urls, &dir, 2, 64, 16).unwrap(),
        128,
        64,
    );
    run_goldens(&mut second, &golden).unwrap();
    let t0 = std::time::Instant::now();
    let err = run_goldens(&mut first, &golden).unwrap_err();
    assert!(t0.elapsed() < std::time::Duration::from_secs(10), "{err}");
    drop(first);
    drop(second);

    let mut third = Driver::new(
        GrpcCluster::connect(&urls, &dir, 1, 64, 16).unwrap(),
        128,
        64,
    );
    run_goldens(&mut third, &golden).unwrap();
}

/// A worker that stops answering (SIGSTOP) mid-traffic: the step fails within the step timeout,
/// naming the rank, rather than hanging the coordinator.
#[test]
fn a_silent_worker_fails_the_step_within_the_timeout() {
    let dir = fixture("tiny-qwen3-moe");
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let workers: Vec<(Proc, String)> = (0..2).map(|_| spawn_worker(&dir)).collect();
    let urls: Vec<String> = workers.iter().map(|w| w.1.clone()).collect();
    let cluster = GrpcCluster::connect(&urls, &dir, 0, 64, 16)
        .unwrap()
        .with_step_timeout(std::time::Duration::from_secs(2));
    let mut d = Driver::new(cluster, 128, 64);
    run_goldens(&mut d, &golden).unwrap();
    let pid = workers[1].0 .0.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let t0 = std::time::Instant::now();
    let err = run_goldens(&mut d, &golden).unwrap_err();
    let took = t0.elapsed();
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status();
    // Rank 0 waits in the all-to-all behind rank 1, so both are silent; both are named.
    assert!(
        err.contains("no step result") && err.contains("ranks [0, 1]"),
        "{err}"
    );
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");
}

/// Live re-placement: with a rebalancer that re-plans every few steps (threshold barely above
/// even), experts move between worker processes at step boundaries while the golden prompts
/// are being generated, and every token still equals the goldens. Workers announce room for
/// 5 of the 8 experts per layer, so every plan respects that budget.
#[test]
fn experts_re_placed_mid_generation_keep_tokens_exact() {
    use switchyard_coordinator::rebalance::RebalancePolicy;
    let dir = fixture("tiny-qwen3-moe");
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let model = dir.to_str().unwrap();
    let workers: Vec<(Proc, String)> = (0..3)
        .map(|_| spawn_serving(&["worker", "--model", model, "--expert-slots", "5"]))
        .collect();
    let urls: Vec<String> = workers.iter().map(|w| w.1.clone()).collect();
    let cfg = switchyard_worker::engine::read_config(&dir).unwrap();
    let mut d = Driver::new(
        GrpcCluster::connect(&urls, &dir, 2, 64, 16).unwrap(),
        128,
        64,
    )
    .with_rebalancing(
        cfg,
        2,
        RebalancePolicy {
            threshold: 1.0001,
            hysteresis: 0.0,
            min_gain: 0.0,
            window: 2,
            retry_steps: 3,
        },
    );
    run_goldens(&mut d, &golden).unwrap();
    let s = d.snapshot();
    assert!(s.expert_version >= 1, "no switch happened: {s:?}");
    for layer in s.holders.iter().filter(|l| !l.is_empty()) {
        for rank in 0..3u32 {
            let held = layer.iter().filter(|h| h.contains(&rank)).count();
            assert!(held <= 5, "rank {rank} holds {held} experts: {layer:?}");
        }
        assert!(layer.iter().all(|h| !h.is_empty()));
    }
    // An explicit re-plan under the same load is a no-op; generation still matches.
    let first = s.expert_version;
    run_goldens(&mut d, &golden).unwrap();
    assert!(d.snapshot().expert_version >= first);
}

/// Fencing: a worker driven by a leader holding fencing token 5 refuses a control stream with
/// a smaller token (a stale leader) and its epoch goes on undisturbed; a newer token (7) takes
/// it over, after which the old cluster's steps fail.
#[test]
fn a_worker_refuses_a_stale_leader_and_follows_a_newer_one() {
    use switchyard_coordinator::driver::DriverError;
    let dir = fixture("tiny-qwen3-moe");
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let workers: Vec<(Proc, String)> = (0..2).map(|_| spawn_worker(&dir)).collect();
    let urls: Vec<String> = workers.iter().map(|w| w.1.clone()).collect();
    let mut current = Driver::new(
        GrpcCluster::connect_with(&urls, &dir, 0, 64, 16, &fenced(5)).unwrap(),
        128,
        64,
    );
    run_goldens(&mut current, &golden).unwrap();
    match GrpcCluster::connect_with(&urls, &dir, 0, 64, 16, &fenced(3)) {
        Err(DriverError::Fenced { detail, .. }) => {
            assert!(
                detail.contains("fence 5") && detail.contains("fence 3"),
                "{detail}"
            )
        }
        Err(e) => panic!("stale leader refused for the wrong reason: {e}"),
        Ok(_) => panic!("a stale leader was let in"),
    }
    // The epoch the stale leader knocked on is intact.
    run_goldens(&mut current, &golden).unwrap();
    let mut newer = Driver::new(
        GrpcCluster::connect_with(&urls, &dir, 0, 64, 16, &fenced(7)).unwrap(),
        128,
        64,
    );
    run_goldens(&mut newer, &golden).unwrap();
    assert!(run_goldens(&mut current, &golden).is_err());
}

/// A new epoch from the same leader carries the workers' state over: each worker keeps the
/// sequences the coordinator lists for it (at the confirmed lengths) and nothing else, the
/// driver takes them over without re-prefill, and every stream ends on its goldens. A newer
/// leader's epoch keeps nothing (its fence differs), and serves the goldens from a fresh load.
#[test]
fn a_new_epoch_keeps_exactly_what_the_same_leader_asks_for() {
    let dir = fixture("tiny-qwen3-moe");
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let workers: Vec<(Proc, String)> = (0..2).map(|_| spawn_worker(&dir)).collect();
    let urls: Vec<String> = workers.iter().map(|w| w.1.clone()).collect();
    let mut d = Driver::new(
        GrpcCluster::connect_with(&urls, &dir, 0, 64, 16, &fenced(5)).unwrap(),
        128,
        64,
    );
    let want = submit_goldens(&mut d, &golden).unwrap();
    let mut got: std::collections::HashMap<u64, Vec<u32>> = Default::default();
    let mut run = |d: &mut Driver, steps: usize| {
        for _ in 0..steps {
            for e in d.step().unwrap() {
                got.entry(e.id).or_default().push(e.token);
            }
        }
    };
    run(&mut d, 12);
    assert!(!d.is_idle());
    let carry = d.carry();
    let mut asked: Vec<Vec<(u64, usize)>> = urls
        .iter()
        .map(|u| carry.seqs.get(u).cloned().unwrap_or_default())
        .collect();
    for a in &mut asked {
        a.sort_unstable();
    }
    let carried: usize = asked.iter().map(Vec::len).sum();
    assert!(carried > 0);
    // Same leader, same group: a new epoch that keeps everything asked for.
    let next = GrpcCluster::connect_carrying(&urls, &dir, 0, 64, 16, &fenced(5), &carry).unwrap();
    use switchyard_coordinator::driver::Cluster;
    let mut kept = next.kept();
    for k in &mut kept {
        k.sort_unstable();
    }
    assert_eq!(kept, asked);
    assert!(d.rebuild(Box::new(next)).is_empty());
    let s = d.snapshot();
    assert_eq!(
        (s.sequences_kept, s.sequences_reprefilled),
        (carried as u64, 0)
    );
    while !d.is_idle() {
        run(&mut d, 1);
    }
    assert_eq!(got, want);
    // A newer leader asking for the same sequences gets none of them: it starts afresh.
    let newer = GrpcCluster::connect_carrying(&urls, &dir, 0, 64, 16, &fenced(7), &carry).unwrap();
    assert!(newer.kept().iter().all(Vec::is_empty), "{:?}", newer.kept());
    let mut fresh = Driver::new(newer, 128, 64);
    run_goldens(&mut fresh, &golden).unwrap();
}

/// Context parallelism over worker processes: each worker's KV holds 12 blocks of 16 (192
/// positions), less than the golden long prompt and its 24 tokens (305); with context
/// parallelism the driver admits it (the cluster holds 384), the scheduler continues its KV on
/// the other worker, and the plans carry the ranges to the workers, which exchange attention
/// parts over their TCP mesh. Every request, the long one twice among the rest, gets the golden
/// tokens; afterwards no block is held anywhere. Without context parallelism the same long
/// request is refused at the door as longer than one worker's KV.
#[test]
fn a_sequence_longer_than_one_worker_runs_split_over_two_processes() {
    for model in ["tiny-qwen3-moe", "tiny-deepseek-v3"] {
        let dir = fixture(model);
        let golden: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
                .unwrap();
        let workers: Vec<(Proc, String)> = (0..2).map(|_| spawn_worker(&dir)).collect();
        let urls: Vec<String> = workers.iter().map(|w| w.1.clone()).collect();
        let mut plain = Driver::new(GrpcCluster::connect(&urls, &dir, 0, 12, 16).unwrap(), 64, 8);
        let err = submit_goldens(&mut plain, &golden).unwrap_err();
        assert!(err.contains("192"), "{err}");
        drop(plain);
        let mut d = Driver::new(GrpcCluster::connect(&urls, &dir, 0, 12, 16).unwrap(), 64, 8)
            .with_context_parallel(true);
        assert_eq!(d.capacity_tokens(), 384);
        let mut want = submit_goldens(&mut d, &golden).unwrap();
        let long = &golden["prompts"][3];
        d.submit(greedy(9, ids(&long["input_ids"]))).unwrap();
        want.insert(9, ids(&long["greedy"]["new_ids"]));
        let mut got: std::collections::HashMap<u64, Vec<u32>> = Default::default();
        for _ in 0..3000 {
            if d.is_idle() {
                break;
            }
            for e in d.step().unwrap() {
                got.entry(e.id).or_default().push(e.token);
            }
        }
        assert_eq!(got, want, "{model}");
        d.step().unwrap();
        assert_eq!(d.kv_used(), &[0, 0], "{model}");
    }
}
