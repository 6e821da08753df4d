//! A worker killed with SIGKILL while 32 greedy streams are in flight: the coordinator's step
//! fails, it rebuilds the cluster over the surviving workers (a new epoch, experts re-placed),
//! re-homes every request with its tokens so far, and every stream completes with exactly the
//! transformers golden tokens: none lost, none duplicated.

mod common;
use common::{block_on, cluster_status, fixture, ids, spawn_serving, Proc};

use serde_json::Value;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use switchyard_proto::v1::generate_request::Input;
use switchyard_proto::v1::generate_response::Event;
use switchyard_proto::v1::inference_client::InferenceClient;
use switchyard_proto::v1::*;

#[test]
fn killing_one_of_three_workers_mid_stream_loses_no_token() {
    let dir = fixture("tiny-qwen3-moe");
    let m = dir.to_str().unwrap();
    let mut workers: Vec<(Proc, String)> = (0..3)
        .map(|_| spawn_serving(&["worker", "--model", m]))
        .collect();
    let mut args = vec![
        "coordinator",
        "--model",
        m,
        "--grpc-addr",
        "127.0.0.1:0",
        "--redundant-experts",
        "2",
    ];
    for w in &workers {
        args.extend(["--worker-url", w.1.as_str()]);
    }
    let (_coord, url) = spawn_serving(&args);
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();

    block_on(async {
        let c = InferenceClient::connect(url.clone()).await.unwrap();
        let (started, done) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let mut tasks = Vec::new();
        for copy in 0..8 {
            for p in golden["prompts"].as_array().unwrap() {
                let prompt: Vec<u32> = ids(&p["input_ids"]).iter().map(|&x| x as u32).collect();
                let want: Vec<u32> = ids(&p["greedy"]["new_ids"])
                    .iter()
                    .map(|&x| x as u32)
                    .collect();
                let name = format!("{}#{copy}", p["name"].as_str().unwrap());
                let (mut c, started, done) = (c.clone(), started.clone(), done.clone());
                tasks.push(tokio::spawn(async move {
                    let mut s = c
                        .generate(GenerateRequest {
                            input: Some(Input::TokenIds(TokenIds { ids: prompt })),
                            max_tokens: want.len() as u32,
                            ignore_eos: true,
                            stream_token_ids: true,
                            ..Default::default()
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    let (mut got, mut fin) = (Vec::new(), None);
                    while let Some(msg) = s.message().await.unwrap() {
                        match msg.event {
                            Some(Event::Delta(d)) => {
                                if got.is_empty() && !d.token_ids.is_empty() {
                                    started.fetch_add(1, Ordering::SeqCst);
                                }
                                got.extend(d.token_ids);
                            }
                            Some(Event::Finished(f)) => fin = Some(f.reason()),
                            _ => {}
                        }
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                    assert_eq!(fin, Some(FinishReason::Length), "{name}");
                    assert_eq!(got, want, "{name}");
                }));
            }
        }
        // Half the streams are producing tokens: kill a worker.
        while started.load(Ordering::SeqCst) < 16 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        workers[1].0 .0.kill().unwrap();
        let in_flight = 32 - done.load(Ordering::SeqCst);
        for t in tasks {
            t.await.unwrap();
        }
        assert!(in_flight > 0, "every stream had finished before the kill");
        let st = cluster_status(&url).await;
        assert_eq!(st.epoch, 2);
        assert_eq!(st.workers.len(), 2);
        assert!(st.placement.iter().all(|p| !p.ranks.is_empty()));
        eprintln!("{in_flight} of 32 streams in flight at the kill; all completed exactly");
    });
    let _ = workers[1].0 .0.wait();
}
