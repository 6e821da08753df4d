//! Many streams against one `up` cluster (2 worker processes): 64 concurrent streams with mixed
//! prompt lengths, output lengths and sampling get exactly what each gets run alone; cancelling
//! half of them mid-stream leaves no KV block or sequence behind; every kind of bad request gets
//! INVALID_ARGUMENT naming its field while the cluster keeps serving.

mod common;
use common::{block_on, cluster_status, fixture, ids};

use serde_json::Value;
use std::time::Duration;
use switchyard_proto::v1::generate_request::Input;
use switchyard_proto::v1::generate_response::Event;
use switchyard_proto::v1::inference_client::InferenceClient;
use switchyard_proto::v1::*;
use tonic::transport::Channel;

fn up() -> (common::Proc, String) {
    let (p, grpc, _) = up_with_metrics();
    (p, grpc)
}

fn up_with_metrics() -> (common::Proc, String, String) {
    let dir = fixture("tiny-qwen3-moe");
    let (p, line) = common::spawn_announcing(&[
        "up",
        "--model",
        dir.to_str().unwrap(),
        "--workers",
        "2",
        "--redundant-experts",
        "2",
        "--grpc-addr",
        "127.0.0.1:0",
        "--token-budget",
        "256",
    ]);
    let (grpc, metrics) = (
        common::announced(&line, "grpc"),
        common::announced(&line, "metrics"),
    );
    (p, grpc, metrics)
}

/// The value of an unlabelled (or fully labelled) sample in a Prometheus text page.
fn sample(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in\n{page}"))
        .parse()
        .unwrap()
}

/// 64 greedy requests: prefixes of the golden prompts (3 to 281 tokens), 1 to 48 new tokens,
/// mixed priorities. (Seeded sampling is reproducible run to run, but not across batch
/// compositions: a row's logits differ in the last bits with the batch's size, since the
/// linear kernels change with the row count, and a draw near a boundary then flips.)
fn requests() -> Vec<GenerateRequest> {
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-qwen3-moe").join("golden.json")).unwrap(),
    )
    .unwrap();
    let prompts: Vec<Vec<u32>> = golden["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| ids(&p["input_ids"]).iter().map(|&x| x as u32).collect())
        .collect();
    (0..64u32)
        .map(|i| {
            let p = &prompts[i as usize % prompts.len()];
            let len = (3 + (i as usize * 37) % p.len()).min(p.len());
            GenerateRequest {
                request_id: format!("r{i}"),
                input: Some(Input::TokenIds(TokenIds {
                    ids: p[..len].to_vec(),
                })),
                max_tokens: 1 + (i * 7) % 48,
                ignore_eos: true,
                stream_token_ids: true,
                priority: (i % 3) as i32 - 1,
                ..Default::default()
            }
        })
        .collect()
}

async fn run(c: &mut InferenceClient<Channel>, r: GenerateRequest) -> (Vec<u32>, FinishReason) {
    let mut s = c.generate(r).await.unwrap().into_inner();
    let (mut out, mut fin) = (Vec::new(), FinishReason::Unspecified);
    while let Some(m) = s.message().await.unwrap() {
        match m.event {
            Some(Event::Delta(d)) => out.extend(d.token_ids),
            Some(Event::Finished(f)) => fin = f.reason(),
            _ => {}
        }
    }
    (out, fin)
}

async fn wait_idle(url: &str) -> ClusterStatusResponse {
    let mut st = cluster_status(url).await;
    for _ in 0..250 {
        if st
            .workers
            .iter()
            .all(|w| w.kv_blocks_used == 0 && w.running_sequences == 0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        st = cluster_status(url).await;
    }
    st
}

#[test]
fn sixty_four_concurrent_streams_match_one_by_one_and_cancelled_ones_free_their_kv() {
    let (_up, url, metrics) = up_with_metrics();
    block_on(async {
        let mut c = InferenceClient::connect(url.clone()).await.unwrap();
        let mut alone = Vec::new();
        for r in requests() {
            alone.push(run(&mut c, r).await);
        }
        let tasks: Vec<_> = requests()
            .into_iter()
            .map(|r| {
                let mut c = c.clone();
                tokio::spawn(async move { run(&mut c, r).await })
            })
            .collect();
        for (i, (t, want)) in tasks.into_iter().zip(&alone).enumerate() {
            let got = t.await.unwrap();
            assert_eq!(&got, want, "request r{i}");
            assert_eq!(got.1, FinishReason::Length);
        }
        // The metrics page counts what was served.
        let generated: usize = alone.iter().map(|a| a.0.len()).sum::<usize>() * 2;
        let page = common::http_get(&metrics);
        assert_eq!(
            sample(&page, "switchyard_generated_tokens_total"),
            generated as f64
        );
        assert_eq!(
            sample(
                &page,
                "switchyard_requests_finished_total{reason=\"length\"}"
            ),
            128.0
        );
        assert_eq!(
            sample(&page, "switchyard_time_to_first_token_seconds_count"),
            128.0
        );
        assert_eq!(
            sample(&page, "switchyard_inter_token_latency_seconds_count"),
            (generated - 128) as f64
        );
        assert!(sample(&page, "switchyard_all_to_all_bytes_total") > 0.0);
        assert!(sample(&page, "switchyard_step_seconds_count") > 0.0);
        assert_eq!(
            sample(&page, "switchyard_kv_blocks_capacity{worker=\"1\"}"),
            1024.0
        );
        let routed: f64 = page
            .lines()
            .filter(|l| l.starts_with("switchyard_expert_tokens_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum();
        assert!(routed > 0.0);

        // 64 long streams; half are dropped by their clients after a few tokens.
        let mut streams = Vec::new();
        for mut r in requests() {
            r.max_tokens = 400;
            streams.push(c.generate(r).await.unwrap().into_inner());
        }
        let mut kept = Vec::new();
        for (i, mut s) in streams.into_iter().enumerate() {
            let mut deltas = 0;
            while deltas < 3 {
                if let Some(Event::Delta(_)) = s.message().await.unwrap().unwrap().event {
                    deltas += 1;
                }
            }
            if i % 2 == 0 {
                kept.push(tokio::spawn(async move {
                    let mut n = 3;
                    let mut fin = None;
                    while let Some(m) = s.message().await.unwrap() {
                        match m.event {
                            Some(Event::Delta(d)) => n += d.token_ids.len(),
                            Some(Event::Finished(f)) => fin = Some(f.reason()),
                            _ => {}
                        }
                    }
                    (n, fin)
                }));
            }
        }
        let busy = cluster_status(&url).await;
        assert!(busy.workers.iter().any(|w| w.kv_blocks_used > 0));
        for k in kept {
            assert_eq!(k.await.unwrap(), (400, Some(FinishReason::Length)));
        }
        let st = wait_idle(&url).await;
        for w in &st.workers {
            assert_eq!((w.kv_blocks_used, w.running_sequences), (0, 0), "{w:?}");
        }
    });
}

#[test]
fn every_bad_request_is_invalid_argument_naming_its_field() {
    let (_up, url) = up();
    block_on(async {
        let mut c = InferenceClient::connect(url.clone()).await.unwrap();
        let ok = || GenerateRequest {
            input: Some(Input::Text("The capital of France is".into())),
            max_tokens: 4,
            ..Default::default()
        };
        let sampling = |temperature: f32, top_p: f32| {
            Some(SamplingParams {
                temperature,
                top_p: Some(top_p),
                ..Default::default()
            })
        };
        let long: Vec<u32> = (0..4096).map(|i| 100 + i % 1000).collect();
        let cases: Vec<(&str, GenerateRequest)> = vec![
            (
                "input",
                GenerateRequest {
                    input: None,
                    ..ok()
                },
            ),
            (
                "prompt",
                GenerateRequest {
                    input: Some(Input::Text(String::new())),
                    ..ok()
                },
            ),
            (
                "prompt",
                GenerateRequest {
                    input: Some(Input::TokenIds(TokenIds { ids: vec![] })),
                    ..ok()
                },
            ),
            (
                "prompt",
                GenerateRequest {
                    input: Some(Input::TokenIds(TokenIds { ids: long })),
                    ..ok()
                },
            ),
            (
                "max_tokens",
                GenerateRequest {
                    max_tokens: 0,
                    ..ok()
                },
            ),
            (
                "max_tokens",
                GenerateRequest {
                    max_tokens: 4097,
                    ..ok()
                },
            ),
            (
                "temperature",
                GenerateRequest {
                    sampling: sampling(-0.5, 1.0),
                    ..ok()
                },
            ),
            (
                "top_p",
                GenerateRequest {
                    sampling: sampling(1.0, 0.0),
                    ..ok()
                },
            ),
            (
                "top_p",
                GenerateRequest {
                    sampling: sampling(1.0, 1.5),
                    ..ok()
                },
            ),
            (
                "model",
                GenerateRequest {
                    model: "no-such-model".into(),
                    ..ok()
                },
            ),
            (
                "top_logprobs",
                GenerateRequest {
                    logprobs: true,
                    top_logprobs: 21,
                    ..ok()
                },
            ),
            (
                "prompt_ids",
                GenerateRequest {
                    input: Some(Input::TokenIds(TokenIds { ids: vec![1, 2048] })),
                    ..ok()
                },
            ),
        ];
        for (field, req) in cases {
            let e = c
                .generate(req.clone())
                .await
                .err()
                .unwrap_or_else(|| panic!("{field}: accepted {req:?}"));
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{field}: {e:?}");
            assert!(e.message().starts_with(field), "{field}: {:?}", e.message());
            // ...and the cluster keeps serving.
            let (out, fin) = run(&mut c, ok()).await;
            assert_eq!(
                (out.len(), fin),
                (0, FinishReason::Length),
                "stream_token_ids off"
            );
        }
    });
}

#[test]
fn a_passed_deadline_ends_the_stream_and_frees_its_kv() {
    let (_up, url) = up();
    block_on(async {
        let mut c = InferenceClient::connect(url.clone()).await.unwrap();
        // The header alone (no client-side timer): the server enforces it.
        let mut req = tonic::Request::new(GenerateRequest {
            input: Some(Input::Text("The capital of France is".into())),
            max_tokens: 4000,
            ignore_eos: true,
            ..Default::default()
        });
        req.metadata_mut()
            .insert("grpc-timeout", "300m".parse().unwrap());
        let t0 = std::time::Instant::now();
        let mut s = c.generate(req).await.unwrap().into_inner();
        let err = loop {
            match s.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("stream ended without the deadline"),
                Err(e) => break e,
            }
        };
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        let st = wait_idle(&url).await;
        for w in &st.workers {
            assert_eq!((w.kv_blocks_used, w.running_sequences), (0, 0), "{w:?}");
        }
        let mut bad = tonic::Request::new(GenerateRequest {
            input: Some(Input::Text("hi".into())),
            max_tokens: 2,
            ..Default::default()
        });
        bad.metadata_mut()
            .insert("grpc-timeout", "soon".parse().unwrap());
        let e = c.generate(bad).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("grpc-timeout"), "{e:?}");
    });
}
