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
use switchyard_proto::v1::generate_response::Event;
use switchyard_proto::v1::inference_client::InferenceClient;
use switchyard_proto::v1::*;

const KEY: &str = "sk-test-0123456789";

/// Adds `authorization: Bearer KEY` to a gRPC request.
fn with_key<T>(req: &mut tonic::Request<T>, key: &str) {
    req.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
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
    with_key(&mut req, KEY);
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
    openai_agrees_with_grpc("tiny-qwen3-moe", &["--workers", "2"]);
}

/// Every family streams over gRPC and through the official `openai` package on a 3-worker
/// cluster with replicated experts: greedy tokens equal the transformers goldens, reasoning
/// (the fixtures' templates open `<think>`) arrives as reasoning, and both APIs agree.
#[test]
fn each_family_streams_over_grpc_and_the_openai_package() {
    for model in [
        "tiny-qwen2-moe",
        "tiny-olmoe",
        "tiny-deepseek-v3",
        "tiny-gpt-oss",
    ] {
        openai_agrees_with_grpc(model, &["--workers", "3", "--redundant-experts", "2"]);
    }
}

/// The quantized fixtures (DeepSeek-V3 in block-scaled FP8, GPT-OSS with MXFP4 experts), kept
/// quantized in two worker processes: the dequantized goldens' greedy tokens, streamed over
/// both APIs.
#[test]
fn quantized_checkpoints_stream_the_goldens_on_two_workers() {
    for model in ["tiny-deepseek-v3-fp8", "tiny-gpt-oss-mxfp4"] {
        openai_agrees_with_grpc(model, &["--workers", "2"]);
    }
}

fn openai_agrees_with_grpc(model: &str, cluster: &[&str]) {
    let dir = fixture(model);
    let tmp =
        std::env::temp_dir().join(format!("switchyard-openai-{model}-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let keys = tmp.join("keys");
    std::fs::write(&keys, format!("# test keys\n{KEY}\n")).unwrap();
    let mut args = vec!["up", "--model", dir.to_str().unwrap()];
    args.extend_from_slice(cluster);
    args.extend_from_slice(&[
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
        "--api-keys-file",
        keys.to_str().unwrap(),
    ]);
    let (_p, line) = spawn_announcing(&args);
    let (grpc, http) = (announced(&line, "grpc"), announced(&line, "http"));
    assert_eq!(http_get(&format!("{http}/healthz")).trim(), "ok");
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let p0 = &golden["prompts"][0];
    let prompt_ids: Vec<u32> = ids(&p0["input_ids"]).iter().map(|&x| x as u32).collect();
    let n = ids(&p0["greedy"]["new_ids"]).len() as u32;
    let want: Vec<u32> = ids(&p0["greedy"]["new_ids"])
        .iter()
        .map(|&x| x as u32)
        .collect();
    let (chat, completion, greedy) = block_on(async {
        let chat = grpc_generate(
            &grpc,
            generate_request::Input::Chat(ChatInput {
                messages: vec![ChatMessage {
                    role: "user".into(),
                    content: "Why is the sky blue?".into(),
                    ..Default::default()
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
        let mut c = InferenceClient::connect(grpc.clone()).await.unwrap();
        let mut req = tonic::Request::new(GenerateRequest {
            input: Some(generate_request::Input::TokenIds(TokenIds {
                ids: prompt_ids.clone(),
            })),
            max_tokens: n,
            ignore_eos: true,
            stream_token_ids: true,
            ..Default::default()
        });
        with_key(&mut req, KEY);
        let mut s = c.generate(req).await.unwrap().into_inner();
        let mut greedy = Vec::new();
        while let Some(m) = s.message().await.unwrap() {
            if let Some(Event::Delta(d)) = m.event {
                greedy.extend(d.token_ids);
            }
        }
        (chat, completion, greedy)
    });
    assert_eq!(greedy, want, "{model}: greedy tokens over gRPC");
    assert!(
        !chat["reasoning"].as_str().unwrap().is_empty(),
        "{model}: the template opens <think>, so the chat starts in reasoning: {chat}"
    );
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
    let out = std::process::Command::new(common::python("openai, prometheus_client"))
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

/// POSTs `body` to `path` with an API key; the open connection (for streaming) after the
/// response head, and the status code.
fn post(
    http: &str,
    path: &str,
    key: &str,
    body: &Value,
) -> (u16, std::io::BufReader<std::net::TcpStream>) {
    use std::io::{BufRead, Write};
    let host = http.strip_prefix("http://").unwrap();
    let mut s = std::net::TcpStream::connect(host).unwrap();
    let b = body.to_string();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
        b.len()
    )
    .unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    let code = status.split_whitespace().nth(1).unwrap().parse().unwrap();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        if h == "\r\n" || h.is_empty() {
            break;
        }
    }
    (code, r)
}

/// A key's requests in flight are bounded (the third of a 2-per-key limit gets 429 over HTTP
/// and RESOURCE_EXHAUSTED over gRPC, another key is unaffected), and a client that hangs up
/// on a stream cancels its request: nothing stays running and the KV comes back.
#[test]
fn per_key_limits_and_disconnects_cancel() {
    let dir = fixture("tiny-qwen3-moe");
    let tmp = std::env::temp_dir().join(format!("switchyard-keys-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let keys = tmp.join("keys");
    std::fs::write(&keys, "key-a\nkey-b\n").unwrap();
    let admin_keys = tmp.join("admin-keys");
    std::fs::write(&admin_keys, "# operators\nroot-key\n").unwrap();
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
        "--max-requests-per-key",
        "2",
        "--admin-keys-file",
        admin_keys.to_str().unwrap(),
    ]);
    let (grpc, http, admin) = (
        announced(&line, "grpc"),
        announced(&line, "http"),
        announced(&line, "admin"),
    );
    let model = dir.file_name().unwrap().to_str().unwrap().to_string();
    let long = json!({"model": model, "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4000, "stream": true, "temperature": 0});
    let short = json!({"model": model, "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2, "temperature": 0});
    let (c1, mut s1) = post(&http, "/v1/chat/completions", "key-a", &long);
    let (c2, s2) = post(&http, "/v1/chat/completions", "key-a", &long);
    assert_eq!((c1, c2), (200, 200));
    // Both are streaming: read the first event of one.
    // (HTTP/1.1 chunked: a chunk-size line comes first.)
    let mut first = String::new();
    for _ in 0..4 {
        first.clear();
        std::io::BufRead::read_line(&mut s1, &mut first).unwrap();
        if first.starts_with("data: ") {
            break;
        }
    }
    assert!(first.starts_with("data: "), "{first:?}");
    let (c3, mut r3) = post(&http, "/v1/chat/completions", "key-a", &short);
    let mut body = String::new();
    let _ = std::io::Read::read_to_string(&mut r3, &mut body);
    assert_eq!(c3, 429, "{body}");
    assert!(body.contains("rate_limit"), "{body}");
    let (c4, _) = post(&http, "/v1/chat/completions", "key-b", &short);
    assert_eq!(c4, 200, "another key is not limited");
    block_on(async {
        let mut c = InferenceClient::connect(grpc.clone()).await.unwrap();
        let mut req = tonic::Request::new(GenerateRequest {
            input: Some(generate_request::Input::TokenIds(TokenIds {
                ids: vec![1, 2, 3],
            })),
            max_tokens: 2,
            ..Default::default()
        });
        with_key(&mut req, "key-a");
        let err = c.generate(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    });
    assert!(first.contains("chat.completion.chunk"), "{first}");
    let running = |grpc: String| async move {
        let mut c = InferenceClient::connect(grpc).await.unwrap();
        let mut req = tonic::Request::new(ClusterStatusRequest {});
        with_key(&mut req, "key-b");
        let st = c.cluster_status(req).await.unwrap().into_inner();
        (
            st.workers.iter().map(|w| w.running_sequences).sum::<u32>(),
            st.workers.iter().map(|w| w.kv_blocks_used).sum::<u32>(),
        )
    };
    let (before, _) = block_on(running(grpc.clone()));
    assert_eq!(before, 2, "both long streams are running");
    // Hang up on both long streams: they are cancelled and free their KV.
    drop(s1);
    drop(s2);
    block_on(async {
        let t0 = std::time::Instant::now();
        loop {
            let mut c = InferenceClient::connect(grpc.clone()).await.unwrap();
            let mut req = tonic::Request::new(ClusterStatusRequest {});
            with_key(&mut req, "key-b");
            let st = c.cluster_status(req).await.unwrap().into_inner();
            let running: u32 = st.workers.iter().map(|w| w.running_sequences).sum();
            let kv: u32 = st.workers.iter().map(|w| w.kv_blocks_used).sum();
            if running == 0 && kv == 0 {
                break;
            }
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(10),
                "still running {running}, kv {kv}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    });
    // The key's slots are free again.
    let (c5, _) = post(&http, "/v1/chat/completions", "key-a", &short);
    assert_eq!(c5, 200);
    // Operators apart from tenants: the Admin API is on its own listener and takes only an
    // admin key (--admin-key or SWITCHYARD_ADMIN_KEY); a tenant's key is refused there, and
    // the public port does not serve it at all.
    let ok = common::switchyard(&[
        "admin",
        "--endpoint",
        &admin,
        "--admin-key",
        "root-key",
        "status",
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let tenant = common::switchyard(&[
        "admin",
        "--endpoint",
        &admin,
        "--admin-key",
        "key-b",
        "status",
    ]);
    assert!(!tenant.status.success());
    let err = String::from_utf8_lossy(&tenant.stderr);
    assert!(
        err.contains("PermissionDenied") || err.contains("permission"),
        "{err}"
    );
    assert!(err.contains("tenant API key"), "{err}");
    let refused = common::switchyard(&["admin", "--endpoint", &admin, "status"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("API key"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let public = common::switchyard(&[
        "admin",
        "--endpoint",
        &grpc,
        "--admin-key",
        "root-key",
        "status",
    ]);
    assert!(
        !public.status.success(),
        "the public port serves the Admin API"
    );
    assert!(
        String::from_utf8_lossy(&public.stderr).contains("not implemented"),
        "{}",
        String::from_utf8_lossy(&public.stderr)
    );
    let gen = common::switchyard(&[
        "generate",
        "--endpoint",
        &grpc,
        "--api-key",
        "key-b",
        "--prompt-ids",
        "1,2,3",
        "--max-tokens",
        "3",
        "--json",
    ]);
    assert!(
        gen.status.success(),
        "{}",
        String::from_utf8_lossy(&gen.stderr)
    );
    let _ = std::fs::remove_dir_all(&tmp);
}
