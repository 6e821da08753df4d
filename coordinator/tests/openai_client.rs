//! The OpenAI-style HTTP API against clients nobody here wrote: the official `openai` Python
//! package (chat, streaming with reasoning and usage, completions with logprobs, error
//! statuses and bodies, a wrong API key) and `prometheus_client`'s text parser on `/metrics`.
//! Expectations are the gRPC API's answers for the same requests, so both paths must agree.
//!
//! Needs a Python with `openai` and `prometheus_client`: `$SWITCHYARD_PYTHON`, else the venv
//! that `scripts/ensure-deps.sh test` creates.

mod common;
use common::{announced, block_on, fixture, http_get, ids, spawn_announcing};

use serde_json::{json, Value};
use std::path::PathBuf;
use switchyard_proto::v1::generate_response::Event;
use switchyard_proto::v1::inference_client::InferenceClient;
use switchyard_proto::v1::*;

const KEY: &str = "sk-test-0123456789";

fn python() -> PathBuf {
    let p = std::env::var_os("SWITCHYARD_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/switchyard/venv/bin/python")
        });
    let ok = std::process::Command::new(&p)
        .args(["-c", "import openai, prometheus_client"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{} cannot import openai and prometheus_client: run scripts/ensure-deps.sh test or set \
         SWITCHYARD_PYTHON",
        p.display()
    );
    p
}

/// Reasoning, answer, usage (prompt, completion, reasoning) of a greedy gRPC generation.
async fn grpc_generate(url: &str, input: generate_request::Input, max_tokens: u32) -> Value {
    let mut c = InferenceClient::connect(url.to_string()).await.unwrap();
    let mut req = tonic::Request::new(GenerateRequest {
        input: Some(input),
        max_tokens,
        sampling: Some(SamplingParams::default()),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    let mut s = c.generate(req).await.unwrap().into_inner();
    let (mut reasoning, mut text, mut usage) = (String::new(), String::new(), None);
    while let Some(m) = s.message().await.unwrap() {
        match m.event {
            Some(Event::Delta(d)) => {
                reasoning.push_str(&d.reasoning_text);
                text.push_str(&d.text);
            }
            Some(Event::Finished(f)) => usage = f.usage,
            _ => {}
        }
    }
    let u = usage.unwrap();
    json!({"reasoning": reasoning, "content": text, "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens, "reasoning_tokens": u.reasoning_tokens})
}

#[test]
fn the_openai_package_gets_what_grpc_gets() {
    let dir = fixture("tiny-qwen3-moe");
    let tmp = std::env::temp_dir().join(format!("switchyard-openai-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let keys = tmp.join("keys");
    std::fs::write(&keys, format!("# test keys\n{KEY}\n")).unwrap();
    let (_p, line) = spawn_announcing(&[
        "up",
        "--model",
        dir.to_str().unwrap(),
        "--workers",
        "2",
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
        "--api-keys-file",
        keys.to_str().unwrap(),
    ]);
    let (grpc, http) = (announced(&line, "grpc"), announced(&line, "http"));
    assert_eq!(http_get(&format!("{http}/healthz")).trim(), "ok");
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let p0 = &golden["prompts"][0];
    let prompt_ids: Vec<u32> = ids(&p0["input_ids"]).iter().map(|&x| x as u32).collect();
    let n = ids(&p0["greedy"]["new_ids"]).len() as u32;
    let (chat, completion) = block_on(async {
        let chat = grpc_generate(
            &grpc,
            generate_request::Input::Chat(ChatInput {
                messages: vec![ChatMessage {
                    role: "user".into(),
                    content: "Why is the sky blue?".into(),
                }],
                add_generation_prompt: Some(true),
            }),
            24,
        )
        .await;
        let completion = grpc_generate(
            &grpc,
            generate_request::Input::TokenIds(TokenIds {
                ids: prompt_ids.clone(),
            }),
            n,
        )
        .await;
        (chat, completion)
    });
    let mut chat = chat;
    chat["message"] = json!("Why is the sky blue?");
    chat["max_tokens"] = json!(24);
    let text = format!(
        "{}{}",
        completion["reasoning"].as_str().unwrap(),
        completion["content"].as_str().unwrap()
    );
    let expect = json!({
        "model": dir.file_name().unwrap().to_str().unwrap(),
        "chat": chat,
        "completion": {"prompt_ids": prompt_ids, "max_tokens": n, "text": text},
    });
    let exp_path = tmp.join("expect.json");
    std::fs::write(&exp_path, expect.to_string()).unwrap();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/openai_client.py");
    let out = std::process::Command::new(python())
        .arg(&script)
        .args([&http, KEY, exp_path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all checks passed"));
    let _ = std::fs::remove_dir_all(&tmp);
}
