//! Many streams against one `up` cluster (2 worker processes): 64 concurrent streams with mixed
//! prompt lengths, output lengths and sampling get exactly what each gets run alone; cancelling
//! half of them mid-stream leaves no KV block or sequence behind; every kind of bad request gets
//! INVALID_ARGUMENT naming its field while the cluster keeps serving; penalties, logit bias,
//! min_tokens and stop token ids do what their definitions say.

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
    use switchyard_proto::v1::generate_request::Constraint as C;
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
        let chat = || GenerateRequest {
            input: Some(Input::Chat(ChatInput {
                messages: vec![ChatMessage {
                    role: "user".into(),
                    content: "Time?".into(),
                    ..Default::default()
                }],
                add_generation_prompt: None,
            })),
            ..ok()
        };
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
            (
                "presence_penalty",
                GenerateRequest {
                    sampling: Some(SamplingParams {
                        presence_penalty: 2.5,
                        ..Default::default()
                    }),
                    ..ok()
                },
            ),
            (
                "frequency_penalty",
                GenerateRequest {
                    sampling: Some(SamplingParams {
                        frequency_penalty: f32::NAN,
                        ..Default::default()
                    }),
                    ..ok()
                },
            ),
            (
                "logit_bias",
                GenerateRequest {
                    sampling: Some(SamplingParams {
                        logit_bias: [(5, 100.5)].into(),
                        ..Default::default()
                    }),
                    ..ok()
                },
            ),
            (
                "logit_bias",
                GenerateRequest {
                    sampling: Some(SamplingParams {
                        logit_bias: [(2048, 1.0)].into(),
                        ..Default::default()
                    }),
                    ..ok()
                },
            ),
            (
                "stop_token_ids",
                GenerateRequest {
                    stop_token_ids: vec![7, 4096],
                    ..ok()
                },
            ),
            (
                "min_tokens",
                GenerateRequest {
                    min_tokens: 5,
                    ..ok()
                },
            ),
            (
                "json_schema",
                GenerateRequest {
                    constraint: Some(C::JsonSchema("{not json".into())),
                    ..ok()
                },
            ),
            (
                "lark",
                GenerateRequest {
                    constraint: Some(C::Lark("start: (".into())),
                    ..ok()
                },
            ),
            (
                "ignore_eos",
                GenerateRequest {
                    constraint: Some(C::JsonObject(true)),
                    ignore_eos: true,
                    ..ok()
                },
            ),
            (
                "tools",
                GenerateRequest {
                    tools: vec![tool("now")],
                    ..ok()
                },
            ),
            (
                "tools[0].name",
                GenerateRequest {
                    tools: vec![tool("rm -rf")],
                    ..chat()
                },
            ),
            (
                "tools[1].name",
                GenerateRequest {
                    tools: vec![tool("now"), tool("now")],
                    ..chat()
                },
            ),
            (
                "tools[0].parameters",
                GenerateRequest {
                    tools: vec![Tool {
                        parameters: "{\"type\": ".into(),
                        ..tool("now")
                    }],
                    ..chat()
                },
            ),
            (
                "tools[0].strict",
                GenerateRequest {
                    tools: vec![Tool {
                        strict: true,
                        ..tool("now")
                    }],
                    ..chat()
                },
            ),
            (
                "tool_choice",
                GenerateRequest {
                    tool_choice: ToolChoice::Required as i32,
                    ..chat()
                },
            ),
            (
                "tool_choice_function",
                GenerateRequest {
                    tools: vec![tool("now")],
                    tool_choice: ToolChoice::Function as i32,
                    tool_choice_function: "later".into(),
                    ..chat()
                },
            ),
            (
                "parallel_tool_calls",
                GenerateRequest {
                    parallel_tool_calls: Some(false),
                    ..chat()
                },
            ),
            (
                "json_object",
                GenerateRequest {
                    tools: vec![tool("now")],
                    constraint: Some(C::JsonObject(true)),
                    ..chat()
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

/// One greedy stream with logprobs: (token, raw logprob, raw top 20) per position.
type Scored = Vec<(u32, f32, Vec<(u32, f32)>)>;

async fn scored(c: &mut InferenceClient<Channel>, r: GenerateRequest) -> (Scored, FinishReason) {
    let mut s = c.generate(r).await.unwrap().into_inner();
    let (mut out, mut fin) = (Vec::new(), FinishReason::Unspecified);
    while let Some(m) = s.message().await.unwrap() {
        match m.event {
            Some(Event::Delta(d)) => out.extend(d.logprobs.into_iter().map(|l| {
                let top = l.top.iter().map(|t| (t.token_id, t.logprob)).collect();
                (l.token_id, l.logprob, top)
            })),
            Some(Event::Finished(f)) => fin = f.reason(),
            _ => {}
        }
    }
    (out, fin)
}

/// Presence and frequency penalties and logit bias as OpenAI defines them, checked against
/// the model's own (unpenalised) logprobs that every token comes with: at each position the
/// greedy pick must be the argmax of `logprob + bias − presence·[c > 0] − frequency·c` over
/// the 20 most likely tokens and itself, `c` counting that token in the output so far (never
/// the prompt). Then min_tokens and stop_token_ids: a token given +100 and made a stop token
/// cannot end the stream before min_tokens, and ends it right after.
#[test]
fn penalties_logit_bias_and_min_tokens_follow_their_formulas() {
    let (_up, url) = up();
    block_on(async {
        let mut c = InferenceClient::connect(url.clone()).await.unwrap();
        let first = GenerateRequest {
            input: Some(Input::TokenIds(TokenIds {
                ids: vec![11, 400, 27, 1500, 93, 400, 27],
            })),
            max_tokens: 40,
            ignore_eos: true,
            stream_token_ids: true,
            ..Default::default()
        };
        // A prompt that ends in the model's own greedy continuation: its tokens stay likely,
        // so counting the prompt (which OpenAI's penalties do not) would show.
        let (cont, _) = run(&mut c, first).await;
        let prompt: Vec<u32> = [11, 400, 27, 1500, 93, 400, 27]
            .into_iter()
            .chain(cont)
            .collect();
        let base = |sampling: SamplingParams| GenerateRequest {
            input: Some(Input::TokenIds(TokenIds {
                ids: prompt.clone(),
            })),
            max_tokens: 24,
            ignore_eos: true,
            logprobs: true,
            top_logprobs: 20,
            stream_token_ids: true,
            sampling: Some(sampling),
            ..Default::default()
        };
        let (plain, _) = scored(&mut c, base(SamplingParams::default())).await;
        // Bias the runner-up of the first position past the winner.
        let (b, lb) = plain[0].2[1];
        let bias = plain[0].1 - lb + 0.5;
        // Random weights rarely repeat a token, so positive penalties would seldom bite: a
        // negative presence penalty favours repeats and the frequency penalty ends them.
        let (pres, freq) = (-1.0f32, 0.3f32);
        let p = SamplingParams {
            presence_penalty: pres,
            frequency_penalty: freq,
            logit_bias: [(b, bias)].into(),
            ..Default::default()
        };
        let (got, fin) = scored(&mut c, base(p)).await;
        assert_eq!((got.len(), fin), (24, FinishReason::Length));
        assert_eq!(got[0].0, b, "the bias lifts token {b} over the greedy pick");
        let mut counts = std::collections::HashMap::<u32, u32>::new();
        let mut differs = 0;
        for (i, (tok, lp, top)) in got.iter().enumerate() {
            let score = |t: u32, lp: f32| {
                let n = counts.get(&t).copied().unwrap_or(0) as f32;
                let pen = if n > 0.0 { pres + freq * n } else { 0.0 };
                lp + if t == b { bias } else { 0.0 } - pen
            };
            let mine = score(*tok, *lp);
            for &(t, l) in top {
                assert!(
                    score(t, l) <= mine + 1e-4,
                    "position {i}: token {t} scores {} over the pick {tok} ({mine})",
                    score(t, l)
                );
            }
            differs += usize::from(*tok != top[0].0);
            *counts.entry(*tok).or_default() += 1;
        }
        assert!(differs >= 2, "the penalties changed only {differs} picks");

        // min_tokens: the stop token (biased to win at every position) waits for it.
        let stopper = plain[3].0;
        let r = GenerateRequest {
            min_tokens: 6,
            stop_token_ids: vec![stopper],
            ..base(SamplingParams {
                logit_bias: [(stopper, 100.0)].into(),
                ..Default::default()
            })
        };
        let (got, fin) = scored(&mut c, r.clone()).await;
        let toks: Vec<u32> = got.iter().map(|g| g.0).collect();
        assert_eq!(fin, FinishReason::Stop, "{toks:?}");
        assert_eq!(toks.len(), 7, "six tokens, then the stop token: {toks:?}");
        assert!(
            !toks[..6].contains(&stopper) && toks[6] == stopper,
            "{toks:?}"
        );
        // Without min_tokens it ends the stream at once.
        let (got, fin) = scored(&mut c, GenerateRequest { min_tokens: 0, ..r }).await;
        assert_eq!((got.len(), got[0].0, fin), (1, stopper, FinishReason::Stop));
    });
}

/// Constrained decoding over real worker processes: whatever the random weights would say,
/// sampled at temperature 1, the text matches the regex and ends (end of sequence) once the
/// pattern is complete; a JSON schema's output parses and has the schema's fields and types.
#[test]
fn constrained_streams_match_their_grammar() {
    use switchyard_proto::v1::generate_request::Constraint as C;
    let (_up, url) = up();
    block_on(async {
        let c = InferenceClient::connect(url.clone()).await.unwrap();
        let text_of = |r: GenerateRequest| {
            let mut c = c.clone();
            async move {
                let mut s = c.generate(r).await.unwrap().into_inner();
                let (mut text, mut fin) = (String::new(), FinishReason::Unspecified);
                while let Some(m) = s.message().await.unwrap() {
                    match m.event {
                        Some(Event::Delta(d)) => text.push_str(&d.text),
                        Some(Event::Finished(f)) => fin = f.reason(),
                        _ => {}
                    }
                }
                (text, fin)
            }
        };
        for seed in 0..6u64 {
            let req = |constraint| GenerateRequest {
                input: Some(Input::TokenIds(TokenIds {
                    ids: vec![11, 400, 27, 1500],
                })),
                max_tokens: 80,
                sampling: Some(SamplingParams {
                    temperature: 1.0,
                    seed: Some(seed),
                    ..Default::default()
                }),
                constraint: Some(constraint),
                ..Default::default()
            };
            let (t, fin) = text_of(req(C::Regex("(yes|no), [a-f]{2,5}!".into()))).await;
            assert_eq!(fin, FinishReason::Stop, "seed {seed}: {t:?}");
            let (word, rest) = t.split_once(", ").unwrap_or_else(|| panic!("{t:?}"));
            let letters = rest.strip_suffix('!').unwrap_or_else(|| panic!("{t:?}"));
            assert!(
                matches!(word, "yes" | "no")
                    && (2..=5).contains(&letters.len())
                    && letters.bytes().all(|b| (b'a'..=b'f').contains(&b)),
                "seed {seed}: {t:?}"
            );
            let schema = r#"{"type": "object", "properties": {"n": {"type": "integer",
                "minimum": 0, "maximum": 99}, "tag": {"enum": ["a", "b"]}},
                "required": ["n", "tag"], "additionalProperties": false}"#;
            let (t, fin) = text_of(req(C::JsonSchema(schema.into()))).await;
            assert_eq!(fin, FinishReason::Stop, "seed {seed}: {t:?}");
            let v: Value = serde_json::from_str(&t).unwrap_or_else(|e| panic!("{t:?}: {e}"));
            let n = v["n"].as_u64().unwrap_or_else(|| panic!("{t:?}"));
            assert!(
                n <= 99 && matches!(v["tag"].as_str(), Some("a" | "b")),
                "{t:?}"
            );
            assert_eq!(v.as_object().unwrap().len(), 2, "{t:?}");
        }
    });
}

/// A thinking budget: the fixture's template opens `<think>`, and random weights would think
/// to max_tokens; with `max_reasoning_tokens` the end of thinking comes after that many
/// tokens, and the answer follows.
#[test]
fn a_thinking_budget_ends_the_reasoning() {
    let (_up, url) = up();
    block_on(async {
        let c = InferenceClient::connect(url.clone()).await.unwrap();
        let req = |budget| GenerateRequest {
            input: Some(Input::Chat(ChatInput {
                messages: vec![ChatMessage {
                    role: "user".into(),
                    content: "Name a colour.".into(),
                    ..Default::default()
                }],
                add_generation_prompt: None,
            })),
            max_tokens: 30,
            ignore_eos: false,
            max_reasoning_tokens: budget,
            ..Default::default()
        };
        let usage = |r: GenerateRequest| {
            let mut c = c.clone();
            async move {
                let mut s = c.generate(r).await.unwrap().into_inner();
                let mut u = None;
                while let Some(m) = s.message().await.unwrap() {
                    if let Some(Event::Finished(f)) = m.event {
                        u = f.usage;
                    }
                }
                u.expect("usage")
            }
        };
        let free = usage(req(0)).await;
        assert!(free.reasoning_tokens > 6, "without a budget: {free:?}");
        let capped = usage(req(5)).await;
        assert!(
            capped.reasoning_tokens <= 6 && capped.completion_tokens > capped.reasoning_tokens,
            "five tokens of thinking, its end, then the answer: {capped:?}"
        );
    });
}

fn tool(name: &str) -> Tool {
    Tool {
        name: name.into(),
        description: "The time".into(),
        parameters: r#"{"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}},
            "required": ["tz"], "additionalProperties": false}"#
            .into(),
        strict: false,
    }
}

/// The typed API's tool calls: a named function's call arrives as `Delta.tool_calls` (its
/// first piece with id and name, then the arguments, which match the schema) and the stream
/// finishes with TOOL_CALLS; the answer holds no text.
#[test]
fn a_named_tool_call_streams_as_typed_deltas() {
    let (_up, url) = up();
    block_on(async {
        let mut c = InferenceClient::connect(url.clone()).await.unwrap();
        for seed in 0..4 {
            let req = GenerateRequest {
                request_id: format!("tools-{seed}"),
                input: Some(Input::Chat(ChatInput {
                    messages: vec![ChatMessage {
                        role: "user".into(),
                        content: "Time?".into(),
                        ..Default::default()
                    }],
                    add_generation_prompt: None,
                })),
                sampling: Some(SamplingParams {
                    temperature: 1.0,
                    seed: Some(seed),
                    ..Default::default()
                }),
                max_tokens: 120,
                max_reasoning_tokens: 8,
                tools: vec![tool("now"), tool("later")],
                tool_choice: ToolChoice::Function as i32,
                tool_choice_function: "later".into(),
                ..Default::default()
            };
            let mut s = c.generate(req).await.unwrap().into_inner();
            let (mut deltas, mut text, mut fin) = (Vec::new(), String::new(), None);
            while let Some(m) = s.message().await.unwrap() {
                match m.event {
                    Some(Event::Delta(d)) => {
                        text.push_str(&d.text);
                        deltas.extend(d.tool_calls);
                    }
                    Some(Event::Finished(f)) => fin = Some(f.reason()),
                    _ => {}
                }
            }
            assert_eq!(
                fin,
                Some(FinishReason::ToolCalls),
                "seed {seed}: {deltas:?}"
            );
            assert_eq!(text, "", "seed {seed}");
            let first = &deltas[0];
            assert_eq!(
                (first.index, first.id.as_str(), first.name.as_str()),
                (0, format!("call_tools-{seed}_0").as_str(), "later"),
                "seed {seed}"
            );
            assert!(deltas.iter().all(|d| d.index == 0), "{deltas:?}");
            assert!(deltas[1..]
                .iter()
                .all(|d| d.id.is_empty() && d.name.is_empty()));
            let args: String = deltas.iter().map(|d| d.arguments.as_str()).collect();
            let v: serde_json::Value = serde_json::from_str(&args).unwrap();
            assert!(
                v == serde_json::json!({"tz": "UTC"}) || v == serde_json::json!({"tz": "CET"}),
                "seed {seed}: {args}"
            );
        }
    });
}

/// Tokenize renders a chat's tools as Generate does (the fixtures' template knows none, so
/// they come as the Hermes preamble), and refuses them with text input.
#[test]
fn tokenize_counts_a_prompt_with_tools() {
    let (_up, url) = up();
    block_on(async {
        let mut c = InferenceClient::connect(url.clone()).await.unwrap();
        let chat = || {
            Some(tokenize_request::Input::Chat(ChatInput {
                messages: vec![ChatMessage {
                    role: "user".into(),
                    content: "Time?".into(),
                    ..Default::default()
                }],
                add_generation_prompt: None,
            }))
        };
        let plain = c
            .tokenize(TokenizeRequest {
                input: chat(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let with = c
            .tokenize(TokenizeRequest {
                input: chat(),
                tools: vec![tool("now")],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!plain.rendered.contains("<tools>"), "{}", plain.rendered);
        assert!(
            with.rendered.starts_with("<|im_start|>system\n# Tools")
                && with.rendered.contains("\"name\": \"now\"")
                && with.rendered.ends_with(&plain.rendered),
            "{}",
            with.rendered
        );
        assert!(with.ids.len() > plain.ids.len());
        let e = c
            .tokenize(TokenizeRequest {
                input: Some(tokenize_request::Input::Text("x".into())),
                tools: vec![tool("now")],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("tools:"), "{}", e.message());
    });
}

/// What one stream delivered, delta by delta.
#[derive(Debug, PartialEq)]
struct Streamed {
    resumed_after: u32,
    tokens: Vec<u32>,
    /// (reasoning, answer) text of each delta.
    texts: Vec<(String, String)>,
    fin: FinishReason,
    usage: Option<Usage>,
}

async fn streamed(mut s: tonic::Streaming<GenerateResponse>) -> Streamed {
    let mut out = Streamed {
        resumed_after: u32::MAX,
        tokens: vec![],
        texts: vec![],
        fin: FinishReason::Unspecified,
        usage: None,
    };
    while let Some(m) = s.message().await.unwrap() {
        match m.event {
            Some(Event::Started(st)) => out.resumed_after = st.resumed_after,
            Some(Event::Delta(d)) => {
                out.tokens.extend(d.token_ids);
                out.texts.push((d.reasoning_text, d.text));
            }
            Some(Event::Finished(f)) => {
                out.fin = f.reason();
                out.usage = f.usage;
            }
            None => {}
        }
    }
    out
}

/// A request no coordinator holds (lost with its coordinator and its worker at once) is
/// resumed with the request and the tokens its client received: the stream goes on from the
/// next token exactly as the uninterrupted one did, delta by delta, for greedy decoding with
/// penalties and bias (the received tokens count as generated), seeded sampling, min_tokens
/// with a stop token, a constrained answer sampled at temperature 1 and a thinking budget.
/// A call without the request is NOT_FOUND; a malformed one is INVALID_ARGUMENT naming its
/// field.
#[test]
fn a_request_no_coordinator_holds_goes_on_from_the_tokens_its_client_received() {
    use switchyard_proto::v1::generate_request::Constraint as C;
    let (_up, url) = up();
    block_on(async {
        let mut c = InferenceClient::connect(url.clone()).await.unwrap();
        let prompt = || {
            Some(Input::TokenIds(TokenIds {
                ids: vec![11, 400, 27, 1500, 93, 400, 27],
            }))
        };
        let base = GenerateRequest {
            input: prompt(),
            max_tokens: 20,
            ignore_eos: true,
            stream_token_ids: true,
            ..Default::default()
        };
        let sampled = |seed| {
            Some(SamplingParams {
                temperature: 1.0,
                top_p: Some(0.9),
                seed: Some(seed),
                ..Default::default()
            })
        };
        let (greedy, _) = run(&mut c, base.clone()).await;
        let stopper = greedy[2];
        let requests = vec![
            GenerateRequest {
                sampling: Some(SamplingParams {
                    presence_penalty: -1.0,
                    frequency_penalty: 0.3,
                    logit_bias: [(greedy[4], 3.0)].into(),
                    ..Default::default()
                }),
                ..base.clone()
            },
            GenerateRequest {
                sampling: sampled(7),
                ..base.clone()
            },
            GenerateRequest {
                min_tokens: 6,
                stop_token_ids: vec![stopper],
                sampling: Some(SamplingParams {
                    logit_bias: [(stopper, 100.0)].into(),
                    ..Default::default()
                }),
                ..base.clone()
            },
            GenerateRequest {
                max_tokens: 60,
                ignore_eos: false,
                sampling: sampled(3),
                constraint: Some(C::Regex("(yes|no), [a-f]{2,9}!".into())),
                ..base.clone()
            },
            GenerateRequest {
                input: Some(Input::Chat(ChatInput {
                    messages: vec![ChatMessage {
                        role: "user".into(),
                        content: "Name a colour.".into(),
                        ..Default::default()
                    }],
                    add_generation_prompt: None,
                })),
                max_tokens: 24,
                ignore_eos: false,
                max_reasoning_tokens: 5,
                sampling: sampled(11),
                ..base.clone()
            },
        ];
        let mut restarted = 0;
        for (i, r) in requests.into_iter().enumerate() {
            let full = streamed(c.generate(r.clone()).await.unwrap().into_inner()).await;
            let n = full.tokens.len();
            assert!(n >= 4 && full.texts.len() == n, "request {i}: {full:?}");
            let mut ks = vec![0, 1, n / 2, n - 1, n];
            ks.dedup();
            for k in ks {
                let id = format!("restart-{i}-{k}");
                let resume = ResumeRequest {
                    request_id: id.clone(),
                    received_tokens: k as u32,
                    request: Some(r.clone()),
                    received_token_ids: full.tokens[..k].to_vec(),
                };
                let got = streamed(c.resume(resume).await.unwrap().into_inner()).await;
                let want = Streamed {
                    resumed_after: k as u32,
                    tokens: full.tokens[k..].to_vec(),
                    texts: full.texts[k..].to_vec(),
                    fin: full.fin,
                    usage: full.usage,
                };
                assert_eq!(got, want, "request {i} resumed after {k} tokens");
                restarted += u64::from(k < n);
            }
        }
        let st = wait_idle(&url).await;
        assert_eq!(st.requests_restarted, restarted, "{st:?}");
        assert!(st.workers.iter().all(|w| w.kv_blocks_used == 0), "{st:?}");

        // Without the request there is nothing to start again.
        let bare = ResumeRequest {
            request_id: "never-seen".into(),
            received_tokens: 2,
            ..Default::default()
        };
        let e = c.resume(bare.clone()).await.err().expect("not found");
        assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
        let bad = [
            (
                ResumeRequest {
                    request: Some(base.clone()),
                    received_token_ids: vec![greedy[0]],
                    ..bare.clone()
                },
                "received_token_ids",
            ),
            (
                ResumeRequest {
                    request: Some(base.clone()),
                    received_token_ids: vec![greedy[0], 1 << 30],
                    ..bare.clone()
                },
                "received_token_ids",
            ),
            (
                ResumeRequest {
                    request: Some(GenerateRequest {
                        request_id: "another".into(),
                        ..base.clone()
                    }),
                    received_token_ids: greedy[..2].to_vec(),
                    ..bare.clone()
                },
                "request.request_id",
            ),
            (
                ResumeRequest {
                    request: Some(GenerateRequest {
                        max_tokens: 1,
                        ..base.clone()
                    }),
                    received_token_ids: greedy[..2].to_vec(),
                    ..bare.clone()
                },
                "received_token_ids",
            ),
        ];
        for (r, field) in bad {
            let e = c.resume(r.clone()).await.err().expect("refused");
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{r:?}: {e}");
            assert!(e.message().contains(field), "{field}: {e}");
        }
    });
}
