//! `switchyard up` (coordinator + 2 worker processes) and `switchyard generate` end to end:
//! streamed greedy output equals the transformers goldens and `run --json`'s contract; bad
//! requests get INVALID_ARGUMENT naming the field and the cluster keeps serving.

mod common;
use common::{fixture, ids, spawn_serving, switchyard};

use serde_json::Value;

#[test]
fn up_and_generate_stream_golden_tokens_and_reject_bad_input() {
    let dir = fixture("tiny-qwen3-moe");
    let (_up, url) = spawn_serving(&[
        "up",
        "--model",
        dir.to_str().unwrap(),
        "--workers",
        "2",
        "--redundant-experts",
        "2",
        "--grpc-addr",
        "127.0.0.1:0",
    ]);

    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    // All prompts at once, from separate client processes.
    let clients: Vec<_> = golden["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let (url, text) = (url.clone(), p["text"].as_str().unwrap().to_string());
            std::thread::spawn(move || {
                switchyard(&[
                    "generate",
                    "--endpoint",
                    &url,
                    "--prompt",
                    &text,
                    "--max-tokens",
                    "24",
                    "--ignore-eos",
                    "--json",
                ])
            })
        })
        .collect();
    for (p, c) in golden["prompts"].as_array().unwrap().iter().zip(clients) {
        let out = c.join().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(ids(&v["prompt_ids"]), ids(&p["input_ids"]));
        assert_eq!(
            ids(&v["output_ids"]),
            ids(&p["greedy"]["new_ids"]),
            "{}",
            p["name"]
        );
        // Streams skip special tokens (as vLLM does by default); the golden text keeps them.
        let mut want = p["greedy"]["new_text"].as_str().unwrap().to_string();
        for special in [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<think>",
            "</think>",
        ] {
            want = want.replace(special, "");
        }
        assert_eq!(v["text"].as_str().unwrap(), want);
        assert_eq!(v["finish_reason"], "length");
    }

    for (args, needle) in [
        (vec!["--prompt", "hi", "--max-tokens", "0"], "max_tokens"),
        (vec!["--prompt", "hi", "--top-p", "1.5"], "top_p"),
        (vec!["--prompt", "hi", "--temperature=-1"], "temperature"),
        (vec!["--prompt", "", "--max-tokens", "2"], "prompt"),
        (
            vec!["--prompt-ids", "1,99999", "--max-tokens", "2"],
            "prompt_ids",
        ),
    ] {
        let mut a = vec!["generate", "--endpoint", &url];
        a.extend(args.iter().copied());
        let out = switchyard(&a);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("InvalidArgument") || err.contains("invalid argument"),
            "{err}"
        );
        assert!(err.contains(needle), "{needle}: {err}");
    }

    // ClusterStatus: both workers, every expert placed (2 replicated), load counted, KV idle.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let st = rt.block_on(async {
        let mut c = switchyard_proto::v1::inference_client::InferenceClient::connect(url.clone())
            .await
            .unwrap();
        c.cluster_status(switchyard_proto::v1::ClusterStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    });
    assert_eq!(st.workers.len(), 2);
    assert!(
        st.workers
            .iter()
            .all(|w| w.kv_blocks_used == 0 && w.running_sequences == 0),
        "{:?}",
        st.workers
    );
    assert_eq!(st.placement.len(), 2 * 8);
    assert!(st.placement.iter().all(|p| !p.ranks.is_empty()));
    assert_eq!(
        st.placement.iter().map(|p| p.ranks.len()).sum::<usize>(),
        2 * (8 + 2)
    );
    assert!(st.placement.iter().map(|p| p.load).sum::<f64>() > 0.0);

    // The long prompt again, twice, one after the other: an idle cluster homes both on the
    // same worker, so the second finds its prompt's blocks in that worker's prefix cache,
    // and the tokens are the goldens still.
    let long = &golden["prompts"][3];
    for _ in 0..2 {
        let out = switchyard(&[
            "generate",
            "--endpoint",
            &url,
            "--prompt",
            long["text"].as_str().unwrap(),
            "--max-tokens",
            "24",
            "--ignore-eos",
            "--json",
        ]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(ids(&v["output_ids"]), ids(&long["greedy"]["new_ids"]));
    }
    let st = rt.block_on(async {
        let mut c = switchyard_proto::v1::inference_client::InferenceClient::connect(url.clone())
            .await
            .unwrap();
        idle_status(&mut c).await
    });
    let hits: u64 = st.workers.iter().map(|w| w.prefix_hit_blocks).sum();
    let queried: u64 = st.workers.iter().map(|w| w.prefix_queried_blocks).sum();
    // 281 prompt tokens: 17 whole blocks before the last position.
    assert!(hits >= 17 && queried >= hits, "{:?}", st.workers);
    assert!(st.workers.iter().any(|w| w.kv_blocks_cached > 0));
    assert!(st.workers.iter().all(|w| w.kv_blocks_used == 0));

    // Still serving, and a stop string ends the stream early with `stop`.
    let out = switchyard(&[
        "generate",
        "--endpoint",
        &url,
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "24",
        "--stop",
        "tools>",
        "--json",
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["finish_reason"], "stop");
    assert!(!v["text"].as_str().unwrap().contains("tools"));
}

#[test]
fn full_admission_queue_refuses_and_a_vanished_client_frees_its_kv() {
    use switchyard_proto::v1::inference_client::InferenceClient;
    use switchyard_proto::v1::*;
    let dir = fixture("tiny-qwen3-moe");
    let (_up, url) = spawn_serving(&[
        "up",
        "--model",
        dir.to_str().unwrap(),
        "--workers",
        "2",
        "--grpc-addr",
        "127.0.0.1:0",
        "--max-queue",
        "1",
    ]);
    let req = |max_tokens: u32| GenerateRequest {
        input: Some(generate_request::Input::Text(
            "The capital of France is".into(),
        )),
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = InferenceClient::connect(url.clone()).await.unwrap();
        // A long request holds the only admission slot...
        let mut long = c.generate(req(4000)).await.unwrap().into_inner();
        assert!(matches!(
            long.message().await.unwrap().unwrap().event,
            Some(generate_response::Event::Started(_))
        ));
        assert!(matches!(
            long.message().await.unwrap().unwrap().event,
            Some(generate_response::Event::Delta(_))
        ));
        // ...so the next one is refused with back-pressure, not queued without bound.
        let refused = c.generate(req(4)).await.unwrap_err();
        assert_eq!(
            refused.code(),
            tonic::Code::ResourceExhausted,
            "{refused:?}"
        );
        // The client of the long request goes away: the request is cancelled, its slot and its
        // KV blocks are freed, and new requests are served.
        drop(long);
        let mut served = None;
        for _ in 0..200 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            if let Ok(s) = c.generate(req(4)).await {
                served = Some(s.into_inner());
                break;
            }
        }
        let mut s = served.expect("a slot frees up after the client goes away");
        let mut finished = false;
        while let Some(m) = s.message().await.unwrap() {
            finished |= matches!(m.event, Some(generate_response::Event::Finished(_)));
        }
        assert!(finished);
        let st = idle_status(&mut c).await;
        assert!(
            st.workers
                .iter()
                .all(|w| w.kv_blocks_used == 0 && w.running_sequences == 0),
            "{:?}",
            st.workers
        );
    });
}

/// ClusterStatus once the last frees have reached the workers (they ride on the step after a
/// request ends), or the last status seen after 5 s.
async fn idle_status(
    c: &mut switchyard_proto::v1::inference_client::InferenceClient<tonic::transport::Channel>,
) -> switchyard_proto::v1::ClusterStatusResponse {
    let mut last = None;
    for _ in 0..250 {
        let st = c
            .cluster_status(switchyard_proto::v1::ClusterStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if st
            .workers
            .iter()
            .all(|w| w.kv_blocks_used == 0 && w.running_sequences == 0)
        {
            return st;
        }
        last = Some(st);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    last.unwrap()
}

/// `up` with 1, 2 and 3 worker processes, with and without replicated experts, on both fixture
/// models: every golden prompt in flight at once streams the transformers greedy tokens; the
/// standard health service reports SERVING.
#[test]
fn worker_counts_and_replicas_all_stream_the_goldens() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{health_check_response::ServingStatus, HealthCheckRequest};
    for model in ["tiny-qwen3-moe", "tiny-mixtral"] {
        for workers in ["1", "2", "3"] {
            for redundant in ["0", "3"] {
                let dir = fixture(model);
                let (_up, url) = spawn_serving(&[
                    "up",
                    "--model",
                    dir.to_str().unwrap(),
                    "--workers",
                    workers,
                    "--redundant-experts",
                    redundant,
                    "--grpc-addr",
                    "127.0.0.1:0",
                ]);
                eprintln!("{model}: {workers} workers, {redundant} redundant");
                common::block_on(async {
                    let ch = tonic::transport::Endpoint::from_shared(url.clone())
                        .unwrap()
                        .connect()
                        .await
                        .unwrap();
                    let mut h = HealthClient::new(ch);
                    // The cluster forms after the listener is up; readiness follows within
                    // a poll (100 ms) of it.
                    for service in ["", "switchyard.v1.Inference"] {
                        let deadline =
                            std::time::Instant::now() + std::time::Duration::from_secs(30);
                        loop {
                            let s = h
                                .check(HealthCheckRequest {
                                    service: service.into(),
                                })
                                .await
                                .unwrap()
                                .into_inner();
                            if s.status() == ServingStatus::Serving {
                                break;
                            }
                            assert!(
                                std::time::Instant::now() < deadline,
                                "{service:?} still {:?} after 30 s",
                                s.status()
                            );
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                    }
                    common::assert_goldens(&url, model, 2).await;
                    let st = common::cluster_status(&url).await;
                    assert_eq!(st.workers.len(), workers.parse::<usize>().unwrap());
                });
            }
        }
    }
}
