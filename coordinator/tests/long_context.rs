//! Long context beside streaming decodes: a 16K-token prompt (a generated YaRN model with a 32K
//! context; one layer and two heads keep the test's 16K prefill to seconds on two cores) is
//! prefilled in paced chunks while 8 short streams keep decoding. Their
//! inter-token latency p99 during the long prefill stays within 3x of their p99 without it,
//! and the long request's output equals a run of it alone.

mod common;
use common::{block_on, spawn_serving, switchyard};

use std::time::{Duration, Instant};
use switchyard_proto::v1::generate_request::Input;
use switchyard_proto::v1::generate_response::Event;
use switchyard_proto::v1::inference_client::InferenceClient;
use switchyard_proto::v1::*;
use tokio::sync::watch;

const LONG: usize = 16384;

fn model_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("switchyard-long-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = serde_json::json!({
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "attention_bias": false,
        "bos_token_id": 2043, "eos_token_id": 2045, "pad_token_id": 2043,
        "decoder_sparse_step": 1, "mlp_only_layers": [],
        "head_dim": 32, "hidden_act": "silu", "hidden_size": 128,
        "intermediate_size": 256, "moe_intermediate_size": 128,
        "max_position_embeddings": 32768,
        "norm_topk_prob": true,
        "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 1,
        "num_experts": 8, "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-6,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192},
        "rope_theta": 1000000.0,
        "sliding_window": null, "use_sliding_window": false,
        "tie_word_embeddings": false, "torch_dtype": "float32",
        "vocab_size": 2048
    });
    let cfg = dir.join("config.json.in");
    std::fs::write(&cfg, config.to_string()).unwrap();
    let out = dir.join("model");
    let r = switchyard(&[
        "gen-model",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--seed",
        "7",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    out
}

fn request(ids: Vec<u32>, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        input: Some(Input::TokenIds(TokenIds { ids })),
        max_tokens,
        ignore_eos: true,
        stream_token_ids: true,
        ..Default::default()
    }
}

/// Streams `req`, recording when each token arrives, until the stream ends or `stop` turns true.
async fn timed(
    mut c: InferenceClient<tonic::transport::Channel>,
    req: GenerateRequest,
    mut stop: watch::Receiver<bool>,
    first: Option<tokio::sync::oneshot::Sender<()>>,
) -> (Vec<u32>, Vec<Instant>) {
    let mut s = c.generate(req).await.unwrap().into_inner();
    let (mut ids, mut at) = (Vec::new(), Vec::new());
    let mut first = first;
    loop {
        tokio::select! {
            m = s.message() => match m.unwrap() {
                Some(GenerateResponse { event: Some(Event::Delta(d)) }) => {
                    let now = Instant::now();
                    for t in d.token_ids {
                        ids.push(t);
                        at.push(now);
                    }
                    if ids.len() >= 2 {
                        if let Some(f) = first.take() {
                            let _ = f.send(());
                        }
                    }
                }
                Some(_) => {}
                None => break,
            },
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    (ids, at)
}

fn p99(mut gaps: Vec<f64>) -> f64 {
    assert!(gaps.len() >= 50, "only {} gaps", gaps.len());
    gaps.sort_by(f64::total_cmp);
    let q = |f: usize| gaps[(gaps.len() * f).div_ceil(100) - 1] * 1e3;
    eprintln!(
        "{} gaps: p50 {:.2} ms, p90 {:.2}, p99 {:.2}, max {:.2}",
        gaps.len(),
        q(50),
        q(90),
        q(99),
        q(100)
    );
    gaps[(gaps.len() * 99).div_ceil(100) - 1]
}

fn short_prompt(i: u32) -> Vec<u32> {
    (0..8).map(|j| 10 + (i * 131 + j * 17) % 2000).collect()
}

#[test]
fn long_prefill_keeps_short_streams_latency_and_matches_a_run_alone() {
    let model = model_dir();
    let (_up, url) = spawn_serving(&[
        "up",
        "--model",
        model.to_str().unwrap(),
        "--workers",
        "2",
        "--grpc-addr",
        "127.0.0.1:0",
        "--kv-blocks",
        "4096",
        "--token-budget",
        "512",
        // Paced steps aim at 1.5x a decode-only step, which leaves room for the one-token
        // floor's overshoot at 16K context and this shared machine's noise under the 3x bound.
        "--pace-factor",
        "1.5",
    ]);
    let long: Vec<u32> = (0..LONG as u32).map(|i| 10 + (i * 7919) % 2000).collect();
    block_on(async {
        let c = InferenceClient::connect(url.clone()).await.unwrap();
        let spawn_shorts = |max_tokens: &[u32], stop: &watch::Receiver<bool>, started: bool| {
            let mut ready = Vec::new();
            let tasks: Vec<_> = max_tokens
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    ready.push(rx);
                    let first = started.then_some(tx);
                    tokio::spawn(timed(
                        c.clone(),
                        request(short_prompt(i as u32), n),
                        stop.clone(),
                        first,
                    ))
                })
                .collect::<Vec<_>>();
            (tasks, ready)
        };
        let (_never, idle) = watch::channel(false);
        // Warm-up (thread pools, first-touch KV pages).
        for t in spawn_shorts(&[32; 8], &idle, false).0 {
            t.await.unwrap();
        }

        // 8 short streams decoding; the long prompt arrives once they all are.
        let (stop_tx, stop) = watch::channel(false);
        let (shorts, ready) = spawn_shorts(&[30000; 8], &stop, true);
        for r in ready {
            r.await.unwrap();
        }
        let t_submit = Instant::now();
        let (ids_with, at_long) =
            timed(c.clone(), request(long.clone(), 8), stop.clone(), None).await;
        let t_first = at_long[0];
        stop_tx.send(true).unwrap();
        let (mut gaps, mut produced) = (Vec::new(), Vec::new());
        for t in shorts {
            let (_, at) = t.await.unwrap();
            // Gaps that end while the long prompt was being prefilled.
            gaps.extend(
                at.windows(2)
                    .filter(|w| w[1] > t_submit && w[1] <= t_first)
                    .map(|w| (w[1] - w[0]).as_secs_f64()),
            );
            produced.push(at.iter().filter(|&&a| a <= t_first).count() as u32);
        }
        let n = gaps.len();
        let loaded_p99 = p99(gaps);
        let prefill_s = (t_first - t_submit).as_secs_f64();

        // Without it: the same 8 streams over the same lengths (their contexts grow as they
        // decode, and so does their step time), nothing else running.
        let mut base_gaps = Vec::new();
        for t in spawn_shorts(&produced, &idle, false).0 {
            let (_, at) = t.await.unwrap();
            base_gaps.extend(at.windows(2).skip(2).map(|w| (w[1] - w[0]).as_secs_f64()));
        }
        let base_p99 = p99(base_gaps);
        eprintln!(
            "ITL p99 alone {:.2} ms, during a {LONG}-token prefill ({prefill_s:.1} s, {n} gaps) {:.2} ms",
            base_p99 * 1e3,
            loaded_p99 * 1e3
        );
        assert!(
            loaded_p99 <= 3.0 * base_p99,
            "p99 {loaded_p99:.4} s vs {base_p99:.4} s alone"
        );

        // Alone, with nothing else running, the long request produces the same tokens.
        let (_never, stop) = watch::channel(false);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (ids_alone, _) = timed(c.clone(), request(long, 8), stop, None).await;
        assert_eq!(ids_with.len(), 8);
        assert_eq!(ids_with, ids_alone);
    });
    let _ = std::fs::remove_dir_all(model.parent().unwrap());
}
