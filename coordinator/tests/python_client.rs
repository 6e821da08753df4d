//! A client from another ecosystem: Python grpcio stubs generated at run time from the
//! project's .proto files stream `Generate` from a 2-worker `up` cluster and get the
//! transformers golden tokens; grpcio's health and reflection helpers see the standard
//! services; `Tokenize` agrees with the golden input ids; the streamed
//! logprobs of the first generated token equal log-softmax of the golden logits there.
//!
//! Needs a Python with grpcio and grpcio-tools: `$SWITCHYARD_PYTHON`, else the venv that
//! `scripts/ensure-deps.sh test` creates (the README's test command does).

mod common;
use common::{fixture, ids, spawn_serving};

use serde_json::Value;
use std::path::Path;

fn log_softmax(v: &[f64]) -> Vec<f64> {
    let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
    v.iter().map(|x| x - lse).collect()
}

#[test]
fn python_grpcio_client_streams_the_golden_tokens() {
    let py = common::python("grpc, grpc_tools");
    let dir = fixture("tiny-qwen3-moe");
    let (_up, url) = spawn_serving(&[
        "up",
        "--model",
        dir.to_str().unwrap(),
        "--workers",
        "2",
        "--grpc-addr",
        "127.0.0.1:0",
    ]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new(py)
        .arg(root.join("tests/python/client.py"))
        .arg(root.join("proto"))
        .arg(url.trim_start_matches("http://"))
        .arg(dir.join("golden.json"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let mut lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // grpc.health.v1 and server reflection, through grpcio's own helpers.
    let standard = lines.remove(0);
    assert_eq!(standard["health"], "SERVING");
    let services: Vec<&str> = standard["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for s in ["switchyard.v1.Inference", "grpc.health.v1.Health"] {
        assert!(services.contains(&s), "{services:?}");
    }
    let prompts = golden["prompts"].as_array().unwrap();
    assert_eq!(lines.len(), prompts.len());
    let mut checked_logprobs = 0;
    for (got, p) in lines.iter().zip(prompts) {
        let name = p["name"].as_str().unwrap();
        let want = ids(&p["greedy"]["new_ids"]);
        assert_eq!(ids(&got["ids"]), want, "{name}");
        assert_eq!(ids(&got["tokenized"]), ids(&p["input_ids"]), "{name}");
        assert_eq!(got["model"], "tiny-qwen3-moe");
        assert_eq!(got["request_id"], format!("py-{name}"));
        assert_eq!(
            got["prompt_tokens"],
            p["input_ids"].as_array().unwrap().len()
        );
        assert_eq!(got["finish"], "FINISH_REASON_LENGTH");
        assert_eq!(got["completion_tokens"], want.len());
        let lps = got["logprobs"].as_array().unwrap();
        assert_eq!(lps.len(), want.len(), "{name}");
        for (lp, &t) in lps.iter().zip(&want) {
            assert_eq!(lp["token_id"], t);
            let top = lp["top"].as_array().unwrap();
            assert_eq!(top.len(), 5);
            // Greedy: the chosen token is the most likely one.
            assert_eq!(top[0][0], t, "{name}");
            assert!((top[0][1].as_f64().unwrap() - lp["logprob"].as_f64().unwrap()).abs() < 1e-6);
        }
        // Where the goldens record the logits at the last prompt position, the first token's
        // logprobs are their log-softmax.
        let last = p["input_ids"].as_array().unwrap().len() - 1;
        if let Some(rec) = p["logits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["position"].as_u64() == Some(last as u64))
        {
            let vals: Vec<f64> = rec["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            let ls = log_softmax(&vals);
            for pair in lps[0]["top"].as_array().unwrap() {
                let (id, lp) = (
                    pair[0].as_u64().unwrap() as usize,
                    pair[1].as_f64().unwrap(),
                );
                assert!(
                    (ls[id] - lp).abs() < 1e-3,
                    "{name}: token {id}: {lp} vs {}",
                    ls[id]
                );
            }
            let mut sorted = ls.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let top_vals: Vec<f64> = lps[0]["top"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p[1].as_f64().unwrap())
                .collect();
            for (a, b) in top_vals.iter().zip(&sorted) {
                assert!((a - b).abs() < 1e-3, "{name}: top {a} vs {b}");
            }
            checked_logprobs += 1;
        }
    }
    assert!(
        checked_logprobs > 0,
        "no golden records the last prompt position"
    );
}
