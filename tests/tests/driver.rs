//! The step driver over an in-process cluster (ranks on threads, `Local` all-to-all): many
//! concurrent greedy requests, under KV pressure and a small token budget, each produce exactly
//! the transformers golden tokens; cancelling half of them mid-stream leaves no KV in use.

mod common;
use common::{fixture, golden, ids};

use std::collections::HashMap;
use switchyard_coordinator::driver::{Driver, GenRequest, LocalCluster};
use switchyard_worker::engine::EngineOptions;

fn requests(model: &str, copies: usize) -> (Vec<GenRequest>, HashMap<u64, Vec<u32>>) {
    let g = golden(model);
    let mut reqs = Vec::new();
    let mut want = HashMap::new();
    for c in 0..copies {
        for (i, p) in g["prompts"].as_array().unwrap().iter().enumerate() {
            let id = (c * 10 + i) as u64;
            // Mixed lengths: copies ask for different numbers of tokens.
            let n = 8 + (c * 5 + i * 3) % 17;
            reqs.push(GenRequest {
                priority: (c % 3) as i32,
                ..GenRequest::greedy(id, ids(&p["input_ids"]), n)
            });
            want.insert(id, ids(&p["greedy"]["new_ids"])[..n].to_vec());
        }
    }
    (reqs, want)
}

fn run(d: &mut Driver, max_steps: usize) -> HashMap<u64, Vec<u32>> {
    let mut got: HashMap<u64, Vec<u32>> = HashMap::new();
    for _ in 0..max_steps {
        if d.is_idle() {
            break;
        }
        for e in d.step().unwrap() {
            got.entry(e.id).or_default().push(e.token);
        }
    }
    assert!(d.is_idle(), "driver did not drain");
    got
}

#[test]
fn concurrent_streams_under_kv_pressure_match_goldens() {
    for model in ["tiny-qwen3-moe", "tiny-mixtral"] {
        // 2 ranks, 40 blocks of 16 positions each: far fewer than 32 requests of up to ~300
        // positions need, so requests queue and get preempted and recomputed.
        let cluster = LocalCluster::start(
            &fixture(model),
            2,
            2,
            EngineOptions {
                kv_blocks: Some(40),
                ..Default::default()
            },
        )
        .unwrap();
        let mut d = Driver::new(cluster, 96, 64);
        let (reqs, want) = requests(model, 8);
        for r in reqs {
            d.submit(r).unwrap();
        }
        let got = run(&mut d, 5000);
        assert_eq!(got.len(), want.len());
        for (id, toks) in &want {
            assert_eq!(&got[id], toks, "{model} request {id}");
        }
        assert!(
            d.preemptions() > 0,
            "{model}: the test meant to exercise preemption had none"
        );
        // One more (empty) step reports every rank's KV after the last frees.
        d.step().unwrap();
        assert_eq!(d.kv_used(), &[0, 0]);
    }
}

#[test]
fn cancelling_half_mid_stream_frees_all_kv() {
    let model = "tiny-qwen3-moe";
    let cluster = LocalCluster::start(
        &fixture(model),
        2,
        0,
        EngineOptions {
            kv_blocks: Some(128),
            ..Default::default()
        },
    )
    .unwrap();
    let mut d = Driver::new(cluster, 256, 64);
    let (reqs, want) = requests(model, 4);
    let ids: Vec<u64> = reqs.iter().map(|r| r.id).collect();
    for r in reqs {
        d.submit(r).unwrap();
    }
    let mut got: HashMap<u64, Vec<u32>> = HashMap::new();
    for _ in 0..4 {
        for e in d.step().unwrap() {
            got.entry(e.id).or_default().push(e.token);
        }
    }
    assert!(d.kv_used().iter().sum::<u32>() > 0);
    let cancelled: Vec<u64> = ids.iter().copied().filter(|i| i % 2 == 0).collect();
    for id in &cancelled {
        d.cancel(*id);
    }
    for (id, toks) in run(&mut d, 5000) {
        got.entry(id).or_default().extend(toks);
    }
    d.step().unwrap();
    assert_eq!(d.kv_used(), &[0, 0]);
    for id in ids.iter().filter(|i| *i % 2 == 1) {
        assert_eq!(&got[id], &want[id], "request {id}");
    }
}
