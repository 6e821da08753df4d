//! Attacks on the cluster through its real interfaces, each of which used to jam, crash or
//! wedge it: a request longer than a worker's KV cache, a client that leaves while queued, a
//! worker that answers steps with results that cannot be true, a panicking engine loop, and
//! logs written to files.

mod common;
use common::{fixture, free_port, http_post, spawn_announcing, spawn_serving, Proc};

use std::time::{Duration, Instant};
use switchyard_proto::v1::generate_response::Event;
use switchyard_proto::v1::inference_client::InferenceClient;
use switchyard_proto::v1::*;

fn text_request(text: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        input: Some(generate_request::Input::Text(text.into())),
        max_tokens,
        ignore_eos: true,
        stream_token_ids: true,
        ..Default::default()
    }
}

/// Runs a stream to its end: the tokens, or the status it failed with.
async fn run_stream(
    c: &mut InferenceClient<tonic::transport::Channel>,
    req: GenerateRequest,
) -> Result<(Vec<u32>, Finished), tonic::Status> {
    let mut s = c.generate(req).await?.into_inner();
    let mut ids = Vec::new();
    while let Some(m) = s.message().await? {
        match m.event {
            Some(Event::Delta(d)) => ids.extend(d.token_ids),
            Some(Event::Finished(f)) => return Ok((ids, f)),
            _ => {}
        }
    }
    Err(tonic::Status::unknown("stream ended without Finished"))
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    common::block_on(f)
}

/// About `words` words of ordinary prose.
fn prose(words: usize) -> String {
    let base =
        "the quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing";
    base.split(' ')
        .cycle()
        .take(words)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `up --kv-blocks 8` gives each worker 128 positions: a ~300-word prompt used to wait forever
/// for blocks that never exist, and every request behind it hung. Now it is refused at once with
/// both numbers, over gRPC and HTTP, the requests behind it are served, and chat's default
/// max_tokens fits by construction.
#[test]
fn a_request_longer_than_a_workers_kv_is_refused_and_the_next_is_served() {
    let dir = fixture("tiny-qwen3-moe");
    let (_up, line) = spawn_announcing(&[
        "up",
        "--model",
        dir.to_str().unwrap(),
        "--workers",
        "2",
        "--kv-blocks",
        "8",
        "--grpc-addr",
        "127.0.0.1:0",
    ]);
    let url = common::announced(&line, "grpc");
    let http = common::announced(&line, "http");
    block_on(async {
        let mut c = InferenceClient::connect(url.clone()).await.unwrap();
        let models = c
            .list_models(ListModelsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            models.models[0].max_context, 128,
            "max-model-len is one worker's KV"
        );
        let t0 = Instant::now();
        let err = run_stream(&mut c, text_request(&prose(300), 16))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("128"), "{}", err.message());
        assert!(t0.elapsed() < Duration::from_secs(10));
        // Fits as a prompt, but not with what it asks to generate: both numbers named.
        let err = run_stream(&mut c, text_request("hello there", 200))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains("max_tokens")
                && err.message().contains("200")
                && err.message().contains("128"),
            "{}",
            err.message()
        );
        // The request behind them is served, to its end.
        let (ids, fin) = run_stream(&mut c, text_request("hello there", 24))
            .await
            .unwrap();
        assert_eq!(ids.len(), 24);
        assert_eq!(fin.reason, FinishReason::Length as i32);
    });
    let long =
        serde_json::json!({"model": "tiny-qwen3-moe", "prompt": prose(300), "max_tokens": 8});
    let (code, body) = http_post(&http, "/v1/completions", &long.to_string());
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("128"), "{body}");
    // Chat without max_tokens: as many as the context leaves, which always fits.
    let chat = serde_json::json!({
        "model": "tiny-qwen3-moe",
        "messages": [{"role": "user", "content": "hello"}],
        "ignore_eos": true,
    });
    let (code, body) = http_post(&http, "/v1/chat/completions", &chat.to_string());
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let u = &v["usage"];
    assert_eq!(
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap(),
        128,
        "{v}"
    );
}

/// `switchyard up` on the fixture with `extra` flags, which must refuse to start: its stderr.
fn refused_start(extra: &[&str]) -> String {
    let dir = fixture("tiny-qwen3-moe");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["up", "--model", dir.to_str().unwrap(), "--workers", "1"])
        .args(["--grpc-addr", "127.0.0.1:0"])
        .args(extra)
        .env_remove("SWITCHYARD_ADMIN_KEYS")
        .output()
        .unwrap();
    assert!(!out.status.success(), "started with {extra:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// An explicit --max-model-len that one worker's KV cannot hold refuses to start, saying what
/// to change.
#[test]
fn a_max_model_len_the_kv_cannot_hold_refuses_to_start() {
    let err = refused_start(&["--kv-blocks", "8", "--max-model-len", "1000"]);
    assert!(
        err.contains("--max-model-len 1000") && err.contains("--kv-blocks") && err.contains("63"),
        "{err}"
    );
}

/// The Admin API never listens where other hosts can reach it without a credential.
#[test]
fn an_admin_listener_off_loopback_needs_admin_keys() {
    let err = refused_start(&["--admin-addr", "0.0.0.0:0"]);
    assert!(
        err.contains("--admin-addr 0.0.0.0:0") && err.contains("admin keys"),
        "{err}"
    );
}

/// A client that leaves while its request is still queued gives back its key's permit and its
/// admission slot at once: the same key (limited to one request in flight) is served again
/// right away, long before the request ahead finishes.
#[test]
fn a_client_that_leaves_while_queued_frees_its_permit_at_once() {
    let dir = fixture("tiny-qwen3-moe");
    let (_up, url) = spawn_serving_with_env(
        &[
            "up",
            "--model",
            dir.to_str().unwrap(),
            "--workers",
            "1",
            "--kv-blocks",
            "8",
            "--max-requests-per-key",
            "1",
            "--grpc-addr",
            "127.0.0.1:0",
        ],
        &[("SWITCHYARD_API_KEYS", "alpha,beta")],
    );
    block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let keyed = |key: &str, r: GenerateRequest| {
            let mut req = tonic::Request::new(r);
            req.metadata_mut()
                .insert("authorization", format!("Bearer {key}").parse().unwrap());
            req
        };
        // alpha holds most of the one worker's 128 positions for a long generation.
        let mut c = InferenceClient::new(channel.clone());
        let mut first = c
            .generate(keyed("alpha", text_request("hello", 120)))
            .await
            .unwrap()
            .into_inner();
        // Its first token: it is running.
        loop {
            if let Some(Event::Delta(_)) = first.message().await.unwrap().unwrap().event {
                break;
            }
        }
        // beta's request needs the whole worker: it queues behind alpha's.
        let ids: Vec<u32> = (0..100).map(|i| 10 + i % 50).collect();
        let queued = GenerateRequest {
            input: Some(generate_request::Input::TokenIds(TokenIds { ids })),
            max_tokens: 20,
            ignore_eos: true,
            ..Default::default()
        };
        let mut c2 = InferenceClient::new(channel.clone());
        let s = c2.generate(keyed("beta", queued.clone())).await.unwrap();
        // beta's permit is held: a second request is refused.
        let mut c3 = InferenceClient::new(channel.clone());
        let refused = c3.generate(keyed("beta", text_request("hi", 2))).await;
        assert_eq!(refused.unwrap_err().code(), tonic::Code::ResourceExhausted);
        // beta hangs up while queued; its permit comes back at once.
        drop(s);
        let t0 = Instant::now();
        let served = loop {
            match c3.generate(keyed("beta", text_request("hi", 2))).await {
                Ok(s) => break s,
                Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                    assert!(t0.elapsed() < Duration::from_secs(2), "permit still held");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("{e:?}"),
            }
        };
        drop(served);
        // alpha is still generating: the permit did not come back by alpha finishing.
        let mut more = 0;
        while let Some(m) = first.message().await.unwrap() {
            if let Some(Event::Delta(d)) = m.event {
                more += d.token_ids.len().max(1);
            }
        }
        assert!(more > 0);
    });
}

fn spawn_serving_with_env(args: &[&str], env: &[(&str, &str)]) -> (Proc, String) {
    use std::io::{BufRead, BufReader};
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.args(args).stdout(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (Proc(child), common::announced(&line, "grpc"))
}

/// A hostile worker: speaks the Control protocol, then answers every step with a result that
/// cannot be true of its plan, a different lie on each control stream (epoch).
mod hostile {
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use switchyard_proto::cluster::v1::coordinator_message::Msg as CMsg;
    use switchyard_proto::cluster::v1::worker_message::Msg as WMsg;
    use switchyard_proto::cluster::v1::worker_server::{Worker, WorkerServer};
    use switchyard_proto::cluster::v1::*;
    use tokio_stream::{Stream, StreamExt};

    pub const LIES: [&str; 5] = ["load", "stranger", "vocab", "missing", "kv"];

    pub struct Liar {
        pub streams: Arc<AtomicUsize>,
    }

    fn lie(kind: &str, plan: &StepPlan) -> StepResult {
        let sampled: Vec<u64> = plan
            .chunks
            .iter()
            .filter(|c| c.sample)
            .map(|c| c.seq_id)
            .collect();
        let honest = |seq_id| SampledToken {
            seq_id,
            token: 5,
            logprob: -1.0,
            top: vec![],
        };
        let mut r = StepResult {
            step: plan.step,
            tokens: sampled.iter().map(|&s| honest(s)).collect(),
            ..Default::default()
        };
        match kind {
            // Three entries where the model has layers × experts.
            "load" => r.expert_load = vec![7; 3],
            "stranger" => r.tokens.iter_mut().for_each(|t| t.seq_id = 987_654),
            "vocab" => r.tokens.iter_mut().for_each(|t| t.token = 1 << 30),
            "missing" => r.tokens.clear(),
            _ => r.kv_blocks_used = u32::MAX,
        }
        r
    }

    type Out = Pin<Box<dyn Stream<Item = Result<WorkerMessage, tonic::Status>> + Send>>;

    #[tonic::async_trait]
    impl Worker for Liar {
        type ControlStream = Out;
        async fn control(
            &self,
            req: tonic::Request<tonic::Streaming<CoordinatorMessage>>,
        ) -> Result<tonic::Response<Out>, tonic::Status> {
            let n = self.streams.fetch_add(1, Ordering::SeqCst);
            let kind = LIES[n % LIES.len()];
            let mut inbound = req.into_inner();
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tokio::spawn(async move {
                let hello = WorkerMessage {
                    msg: Some(WMsg::Hello(WorkerHello {
                        worker_id: "liar".into(),
                        comm_address: "127.0.0.1:9".into(),
                        ..Default::default()
                    })),
                };
                if tx.send(Ok(hello)).await.is_err() {
                    return;
                }
                while let Some(Ok(m)) = inbound.next().await {
                    let reply = match m.msg {
                        Some(CMsg::Placement(_)) => StepResult::default(),
                        Some(CMsg::Step(plan)) if plan.chunks.iter().any(|c| c.sample) => {
                            lie(kind, &plan)
                        }
                        Some(CMsg::Step(plan)) => StepResult {
                            step: plan.step,
                            ..Default::default()
                        },
                        _ => continue,
                    };
                    let msg = WorkerMessage {
                        msg: Some(WMsg::Result(reply)),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
            });
            Ok(tonic::Response::new(Box::pin(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            )))
        }
    }

    pub fn server(streams: Arc<AtomicUsize>) -> WorkerServer<Liar> {
        WorkerServer::new(Liar { streams })
    }
}

/// A worker that lies in its step results (expert load of the wrong shape, a token for a
/// sequence it was not asked about, a token outside the vocabulary, a missing token, more KV
/// blocks than exist) fails its epoch each time, logged; the coordinator never panics, the
/// request ends with an error naming the invalid result instead of hanging, and the
/// coordinator keeps answering.
#[test]
fn a_worker_that_lies_in_its_step_results_fails_its_epoch_not_the_coordinator() {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let streams = Arc::new(AtomicUsize::new(0));
    let port = free_port();
    let svc = hostile::server(streams.clone());
    rt.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve(format!("127.0.0.1:{port}").parse().unwrap())
            .await
            .unwrap();
    });
    std::thread::sleep(Duration::from_millis(200));
    let dir = fixture("tiny-qwen3-moe");
    let log = std::env::temp_dir().join(format!("switchyard-liar-{}.log", std::process::id()));
    let args: Vec<String> = [
        "coordinator",
        "--model",
        dir.to_str().unwrap(),
        "--worker-url",
        &format!("http://127.0.0.1:{port}"),
        "--grpc-addr",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (mut coord, line) = spawn_logged(&args, &log);
    let line = line.join().unwrap();
    let url = common::announced(&line, "grpc");
    rt.block_on(async {
        let mut c = InferenceClient::connect(url.clone()).await.unwrap();
        for round in 0..2 {
            if round > 0 {
                // Unavailable after the first request's failed epochs; the engine loop rebuilds
                // (and so meets the next lie) within a second or two.
                tokio::time::sleep(Duration::from_millis(2500)).await;
            }
            let r = tokio::time::timeout(
                Duration::from_secs(60),
                run_stream(&mut c, text_request("hello", 4)),
            )
            .await
            .expect("the request hung");
            let msg = match r {
                Err(s) => s.message().to_string(),
                Ok((_, f)) => f.error,
            };
            assert!(msg.contains("invalid step result"), "{msg}");
        }
        // Still alive and answering.
        assert!(coord.0.try_wait().unwrap().is_none(), "coordinator exited");
        c.cluster_status(ClusterStatusRequest {}).await.unwrap();
    });
    let logs = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    for needle in [
        "expert load entries",
        "which it was not asked to sample",
        "outside the vocabulary",
        "sampled tokens for",
        "KV blocks in use",
    ] {
        assert!(logs.contains(needle), "no {needle:?} in the log:\n{logs}");
    }
    assert!(!logs.contains("panicked"), "{logs}");
    // Logs written to a file carry no terminal colour codes.
    assert!(!logs.contains('\u{1b}'), "ANSI escapes in a log file");
}

/// A panic in the engine loop (injected) makes the coordinator give up: health NOT_SERVING,
/// requests refused as UNAVAILABLE, leadership resigned so a standby takes over at once (long
/// before the 30 s lease would lapse), and the process exits non-zero for its supervisor to
/// restart it.
#[test]
fn a_panicking_engine_loop_resigns_and_exits_non_zero() {
    let etcd = common::Etcd::start();
    let model = fixture("tiny-qwen3-moe");
    let m = model.to_str().unwrap();
    let flags = [
        "--etcd",
        &etcd.url,
        "--cluster-prefix",
        "/switchyard/panic",
        "--lease-ttl",
        "30",
    ];
    let mut args = vec!["worker", "--model", m, "--id", "w0"];
    args.extend(flags);
    let (_worker, _) = spawn_serving(&args);
    let coordinator = |extra: &[&str]| {
        let mut a = vec![
            "coordinator",
            "--model",
            m,
            "--workers",
            "1",
            "--grpc-addr",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ];
        a.extend(flags);
        a.extend(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let log = std::env::temp_dir().join(format!("switchyard-panic-{}.log", std::process::id()));
    let (mut leader, line) = spawn_logged(
        &coordinator(&["--fault-panic-after-steps", "3", "--id", "faulty"]),
        &log,
    );
    let line = line.join().unwrap();
    let url = common::announced(&line, "grpc");
    // The standby waits in the election.
    let standby_args = coordinator(&["--id", "standby"]);
    let standby = std::thread::spawn(move || {
        let t = Instant::now();
        let a: Vec<&str> = standby_args.iter().map(|s| s.as_str()).collect();
        let (p, url) = spawn_serving(&a);
        (p, url, t)
    });
    std::thread::sleep(Duration::from_secs(1));
    block_on(async {
        let mut c = InferenceClient::connect(url.clone()).await.unwrap();
        // Serves its first steps, then the loop panics mid-request.
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            run_stream(&mut c, text_request("hello", 16)),
        )
        .await
        .expect("the request hung");
        let failed = match &r {
            Err(_) => true,
            Ok((_, f)) => f.reason == FinishReason::Error as i32,
        };
        assert!(failed, "{r:?}");
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = leader.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the faulty leader did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let (_standby, standby_url, started) = standby.join().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "the standby waited out the lease: leadership was not resigned"
    );
    block_on(async {
        let mut c = InferenceClient::connect(standby_url).await.unwrap();
        let (ids, _) = run_stream(&mut c, text_request("hello", 8)).await.unwrap();
        assert_eq!(ids.len(), 8);
    });
    let logs = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(logs.contains("engine loop panicked"), "{logs}");
    // --log-format json: every line one JSON object.
    for l in logs.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string(), "{l}");
    }
}

/// Starts `switchyard ARGS` with stderr in `log`; the process, and a thread that yields its
/// first stdout line.
fn spawn_logged(args: &[String], log: &std::path::Path) -> (Proc, std::thread::JoinHandle<String>) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let line = std::thread::spawn(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).unwrap();
        line
    });
    (Proc(child), line)
}

/// A worker and a coordinator started before etcd is reachable wait for it with backoff,
/// saying so in their logs, and serve once it comes (they used to exit at once).
#[test]
fn roles_started_before_etcd_wait_for_it_and_serve() {
    let mut etcd = common::Etcd::start();
    etcd.stop();
    let model = fixture("tiny-qwen3-moe");
    let m = model.to_str().unwrap().to_string();
    let flags: Vec<String> = [
        "--etcd",
        &etcd.url,
        "--cluster-prefix",
        "/switchyard/order",
        "--lease-ttl",
        "3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let tmp = std::env::temp_dir();
    let (wlog, clog) = (
        tmp.join(format!("switchyard-order-w-{}.log", std::process::id())),
        tmp.join(format!("switchyard-order-c-{}.log", std::process::id())),
    );
    let mut wargs: Vec<String> = ["worker", "--model", &m, "--id", "w0"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    wargs.extend(flags.clone());
    let mut cargs: Vec<String> = [
        "coordinator",
        "--model",
        &m,
        "--workers",
        "1",
        "--grpc-addr",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    cargs.extend(flags);
    let (mut coord, coord_line) = spawn_logged(&cargs, &clog);
    let (mut worker, worker_line) = spawn_logged(&wargs, &wlog);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        coord.0.try_wait().unwrap().is_none(),
        "the coordinator gave up"
    );
    assert!(worker.0.try_wait().unwrap().is_none(), "the worker gave up");
    etcd.restart();
    let _ = worker_line.join().unwrap();
    let line = coord_line.join().unwrap();
    let url = common::announced(&line, "grpc");
    block_on(async {
        let mut c = InferenceClient::connect(url).await.unwrap();
        let (ids, _) = run_stream(&mut c, text_request("hello", 8)).await.unwrap();
        assert_eq!(ids.len(), 8);
    });
    for log in [&wlog, &clog] {
        let text = std::fs::read_to_string(log).unwrap();
        let _ = std::fs::remove_file(log);
        assert!(text.contains("etcd not reachable; waiting"), "{text}");
    }
}

/// Cases for the end-to-end fuzz properties (each is a request to a live server):
/// `PROPTEST_CASES`, or 2000.
fn e2e_cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// JSON values for request fields: every type, odd numbers, long strings.
fn any_field() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
    use proptest::prelude::*;
    use serde_json::{json, Value};
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (0u64..40).prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "\\PC{0,24}".prop_map(Value::from),
        Just(json!("tiny-qwen3-moe")),
        Just(json!([{"role": "user", "content": "hi"}])),
        Just(
            json!([{"role": "system", "content": [{"type": "text", "text": "x"}]}, {"role": "user"}])
        ),
    ];
    leaf.prop_recursive(2, 6, 3, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Hostile HTTP bodies against a live server: random bytes, and objects made of the API's
/// fields with values of any type. Every one gets an answer with a status that says whose
/// fault it was (never a 5xx, never a dropped connection), and the server serves on.
#[test]
fn fuzz_http_bodies() {
    use proptest::prelude::*;
    let dir = fixture("tiny-qwen3-moe");
    let (_up, line) = spawn_announcing(&[
        "up",
        "--model",
        dir.to_str().unwrap(),
        "--workers",
        "1",
        "--kv-blocks",
        "4",
        "--grpc-addr",
        "127.0.0.1:0",
    ]);
    let http = common::announced(&line, "http");
    const FIELDS: &[&str] = &[
        "model",
        "prompt",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "stop",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "logprobs",
        "top_logprobs",
        "stream",
        "stream_options",
        "echo",
        "ignore_eos",
        "repetition_penalty",
    ];
    let body = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..80)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        (
            any::<bool>(),
            proptest::collection::vec((proptest::sample::select(FIELDS), any_field()), 0..5),
        )
            .prop_map(|(chat, kv)| {
                // A valid request of either kind, then fields overwritten with anything.
                let mut m = serde_json::Map::new();
                m.insert("model".into(), "tiny-qwen3-moe".into());
                if chat {
                    m.insert(
                        "messages".into(),
                        serde_json::json!([{"role": "user", "content": "hi"}]),
                    );
                } else {
                    m.insert("prompt".into(), "hello".into());
                }
                m.insert("max_tokens".into(), 4.into());
                for (k, v) in kv {
                    m.insert(k.to_string(), v);
                }
                serde_json::Value::Object(m).to_string()
            }),
    ];
    let path = proptest::sample::select(vec!["/v1/completions", "/v1/chat/completions"]);
    let mut runner =
        proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(e2e_cases()));
    let codes = std::sync::Mutex::new(std::collections::BTreeMap::<u16, usize>::new());
    runner
        .run(&(body, path), |(body, path)| {
            let (code, resp) = http_post(&http, path, &body);
            *codes.lock().unwrap().entry(code).or_default() += 1;
            prop_assert!(
                (200..500).contains(&code),
                "{path} {body:?} -> {code} {resp}"
            );
            if code != 200 {
                let v: serde_json::Value = serde_json::from_str(&resp).map_err(|e| {
                    TestCaseError::fail(format!("error body not JSON ({e}): {resp}"))
                })?;
                prop_assert!(v["error"]["message"].is_string(), "{resp}");
            }
            Ok(())
        })
        .unwrap();
    let codes = codes.into_inner().unwrap();
    eprintln!("HTTP statuses over {} bodies: {codes:?}", e2e_cases());
    assert_eq!(codes.values().sum::<usize>(), e2e_cases() as usize);
    let ok = serde_json::json!({"model": "tiny-qwen3-moe", "prompt": "hello", "max_tokens": 4});
    assert_eq!(http_post(&http, "/v1/completions", &ok.to_string()).0, 200);
}

/// Bounds on what one request may ask for: stop strings (count and length), alternatives per
/// token, and priorities only from keys granted them.
#[test]
fn request_bounds_and_priorities_only_for_keys_granted_them() {
    let dir = fixture("tiny-qwen3-moe");
    let tmp = std::env::temp_dir().join(format!("sy-bounds-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let keys = tmp.join("keys");
    std::fs::write(&keys, "plain\nboss priority\n").unwrap();
    let (_up, url) = spawn_serving(&[
        "up",
        "--model",
        dir.to_str().unwrap(),
        "--workers",
        "1",
        "--api-keys-file",
        keys.to_str().unwrap(),
        "--grpc-addr",
        "127.0.0.1:0",
    ]);
    block_on(async {
        let mut c = InferenceClient::connect(url).await.unwrap();
        let call = |key: &str, r: GenerateRequest| {
            let mut req = tonic::Request::new(r);
            req.metadata_mut()
                .insert("authorization", format!("Bearer {key}").parse().unwrap());
            req
        };
        let refused = |r: Result<
            tonic::Response<tonic::Streaming<GenerateResponse>>,
            tonic::Status,
        >| { r.err().expect("accepted") };
        let mut r = text_request("hello", 2);
        r.stop = (0..17).map(|i| format!("s{i}")).collect();
        let e = refused(c.generate(call("plain", r)).await);
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("stop:"), "{}", e.message());
        let mut r = text_request("hello", 2);
        r.stop = vec!["x".repeat(257)];
        let e = refused(c.generate(call("plain", r)).await);
        assert!(e.message().starts_with("stop:"), "{}", e.message());
        let mut r = text_request("hello", 2);
        r.logprobs = true;
        r.top_logprobs = 21;
        let e = refused(c.generate(call("plain", r)).await);
        assert!(e.message().starts_with("top_logprobs:"), "{}", e.message());
        let mut r = text_request("hello", 2);
        r.priority = 5;
        let e = refused(c.generate(call("plain", r.clone())).await);
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().starts_with("priority:"), "{}", e.message());
        let mut s = c.generate(call("boss", r)).await.unwrap().into_inner();
        let mut finished = false;
        while let Some(m) = s.message().await.unwrap() {
            finished |= matches!(m.event, Some(Event::Finished(_)));
        }
        assert!(finished);
    });
    let _ = std::fs::remove_dir_all(&tmp);
}

/// A leader that cannot renew its lease in time stops driving workers before a standby could
/// take over: with etcd frozen past two thirds of the lease TTL, a request is accepted but no
/// step runs. Once etcd answers again the request ends either way, never hanging: completed
/// if the lease survived, failed with "leadership lost" (and the coordinator stops) if not.
#[test]
fn a_leader_that_cannot_renew_stops_stepping_until_it_can() {
    let mut etcd = common::Etcd::start();
    let model = fixture("tiny-qwen3-moe");
    let (_worker, _coord, line) = etcd_pair(&etcd, &model, "/switchyard/fresh", "3");
    let url = common::announced(&line, "grpc");
    block_on(async {
        let mut client = InferenceClient::connect(url).await.unwrap();
        let (ids, _) = run_stream(&mut client, text_request("hello", 4))
            .await
            .unwrap();
        assert_eq!(ids.len(), 4);
        let pid = etcd.pid().to_string();
        let signal = |sig: &str| {
            assert!(std::process::Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success())
        };
        signal("-STOP");
        // Past the renew deadline (2 s of a 3 s TTL), with room for the renewal timeouts.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let mut s = client
            .generate(text_request("hello", 8))
            .await
            .unwrap()
            .into_inner();
        let early = tokio::time::timeout(Duration::from_secs(3), async {
            while let Some(m) = s.message().await.unwrap() {
                if let Some(Event::Delta(_)) = m.event {
                    return true;
                }
            }
            false
        })
        .await;
        signal("-CONT");
        assert!(
            early.is_err(),
            "a step ran while leadership could not be renewed"
        );
        let mut n = 0;
        let ended = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match s.message().await {
                    Ok(Some(m)) => match m.event {
                        Some(Event::Delta(d)) => n += d.token_ids.len(),
                        Some(Event::Finished(f)) => return Ok(f),
                        _ => {}
                    },
                    Ok(None) => return Err("stream ended without Finished".to_string()),
                    Err(e) => return Err(e.message().to_string()),
                }
            }
        })
        .await
        .expect("the request hung after etcd came back");
        match ended {
            Ok(f) => {
                assert!(f.error.is_empty(), "{f:?}");
                assert_eq!(n, 8);
            }
            Err(why) => assert!(why.contains("leadership lost"), "{why}"),
        }
    });
    etcd.stop();
}

/// Hostile peers on the mesh port of rank 0 while an epoch's mesh forms (silent, forging rank
/// 1 without the epoch's secret, speaking HTTP): the real workers still form the mesh and
/// serve the goldens; the intruders are dropped (they used to be taken for rank 1, or to hold
/// the accept loop for the whole mesh timeout).
#[test]
fn intruders_on_a_workers_mesh_port_are_dropped() {
    use std::io::Write;
    let dir = fixture("tiny-qwen3-moe");
    let m = dir.to_str().unwrap();
    let workers: Vec<(Proc, String)> = (0..2)
        .map(|_| spawn_announcing(&["worker", "--model", m]))
        .collect();
    let comm0 = common::announced(&workers[0].1, "comm");
    let mut intruders = vec![std::net::TcpStream::connect(&comm0).unwrap()];
    let mut forger = std::net::TcpStream::connect(&comm0).unwrap();
    let mut hello = 1u32.to_le_bytes().to_vec();
    hello.extend_from_slice(&[0u8; 32]);
    forger.write_all(&hello).unwrap();
    intruders.push(forger);
    let mut http = std::net::TcpStream::connect(&comm0).unwrap();
    http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    intruders.push(http);
    let urls: Vec<String> = workers
        .iter()
        .map(|w| common::announced(&w.1, "grpc"))
        .collect();
    let t0 = Instant::now();
    let (_coord, url) = spawn_serving(&[
        "coordinator",
        "--model",
        m,
        "--grpc-addr",
        "127.0.0.1:0",
        "--worker-url",
        &urls[0],
        "--worker-url",
        &urls[1],
    ]);
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    block_on(common::assert_goldens(&url, "tiny-qwen3-moe", 1));
    drop(intruders);
}

/// etcd as others may leave it: a malformed record under the workers prefix is skipped (it
/// used to fail the list, so the coordinator could not start), and an etcd outage leaves the
/// leader ready (readiness used to ask etcd every second and drop every coordinator out of the
/// Service the moment etcd stopped answering).
#[test]
fn a_garbage_member_record_and_an_etcd_outage_leave_the_coordinator_ready() {
    let mut etcd = common::Etcd::start();
    let prefix = "/switchyard/garbage";
    block_on(async {
        let mut c = etcd_client::Client::connect([etcd.url.as_str()], None)
            .await
            .unwrap();
        c.put(format!("{prefix}/workers/bogus"), "{not json", None)
            .await
            .unwrap();
    });
    let model = fixture("tiny-qwen3-moe");
    let (_worker, _coord, line) = etcd_pair(&etcd, &model, prefix, "10");
    let (url, http) = (
        common::announced(&line, "grpc"),
        common::announced(&line, "http"),
    );
    block_on(async {
        let mut client = InferenceClient::connect(url.clone()).await.unwrap();
        let (ids, _) = run_stream(&mut client, text_request("hello", 4))
            .await
            .unwrap();
        assert_eq!(ids.len(), 4);
    });
    etcd.stop();
    // Well past the old once-a-second etcd probe, inside the lease's renew deadline.
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(500));
        let (code, body) = common::http_status(&format!("{http}/readyz"));
        assert_eq!(code, 200, "not ready during an etcd outage: {body}");
    }
    block_on(async {
        let mut client = InferenceClient::connect(url).await.unwrap();
        let (ids, _) = run_stream(&mut client, text_request("hello", 4))
            .await
            .unwrap();
        assert_eq!(ids.len(), 4);
    });
}

/// A Control client that sends a worker a placement it cannot act on (a rank outside the
/// world, holders naming ranks that do not exist) gets an error; the worker stays up and
/// serves the next, real coordinator.
#[test]
fn a_worker_refuses_placements_outside_the_world() {
    use switchyard_proto::cluster::v1::coordinator_message::Msg as CMsg;
    use switchyard_proto::cluster::v1::worker_client::WorkerClient;
    use switchyard_proto::cluster::v1::*;
    let dir = fixture("tiny-qwen3-moe");
    let m = dir.to_str().unwrap();
    let (_worker, line) = spawn_announcing(&["worker", "--model", m]);
    let url = common::announced(&line, "grpc");
    let bad = [
        Placement {
            world_size: 2,
            rank: 5,
            peer_addresses: vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
            ..Default::default()
        },
        Placement {
            world_size: 1,
            rank: 0,
            peer_addresses: vec!["127.0.0.1:1".into()],
            holders: vec![RankExperts {
                rank: 9,
                assignments: vec![],
            }],
            ..Default::default()
        },
        Placement {
            world_size: 0,
            ..Default::default()
        },
    ];
    block_on(async {
        for p in bad {
            let mut client = WorkerClient::connect(url.clone()).await.unwrap();
            let (tx, rx) = tokio::sync::mpsc::channel(2);
            let mut inbound = client
                .control(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let hello = inbound.message().await.unwrap();
            assert!(hello.is_some());
            tx.send(CoordinatorMessage {
                msg: Some(CMsg::Placement(p.clone())),
            })
            .await
            .unwrap();
            let answer = tokio::time::timeout(Duration::from_secs(10), inbound.message())
                .await
                .expect("no answer to a bad placement");
            let e = answer.expect_err(&format!("{p:?} was accepted"));
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
            assert!(e.message().contains("placement"), "{}", e.message());
        }
    });
    let (_coord, curl) = spawn_serving(&[
        "coordinator",
        "--model",
        m,
        "--grpc-addr",
        "127.0.0.1:0",
        "--worker-url",
        &url,
    ]);
    block_on(common::assert_goldens(&curl, "tiny-qwen3-moe", 1));
}

/// One `worker --id w0` and a `coordinator --workers 1` with membership in `etcd` under
/// `prefix` (lease TTL `ttl` seconds): the processes and the coordinator's announcement.
fn etcd_pair(
    etcd: &common::Etcd,
    model: &std::path::Path,
    prefix: &str,
    ttl: &str,
) -> (Proc, Proc, String) {
    let m = model.to_str().unwrap();
    let flags = [
        "--etcd",
        &etcd.url,
        "--cluster-prefix",
        prefix,
        "--lease-ttl",
        ttl,
    ];
    let mut w = vec!["worker", "--model", m, "--id", "w0"];
    w.extend(flags);
    let (worker, _) = spawn_serving(&w);
    let mut c = vec![
        "coordinator",
        "--model",
        m,
        "--workers",
        "1",
        "--grpc-addr",
        "127.0.0.1:0",
    ];
    c.extend(flags);
    let (coord, line) = spawn_announcing(&c);
    (worker, coord, line)
}
