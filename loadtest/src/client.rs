//! The async shell: sends a planned workload to a Switchyard gRPC endpoint and records what
//! happened to every request ([`Record`]). Many streams share a few HTTP/2 connections; every
//! request is its own task, so a slow stream never delays another's send.

use crate::metrics::{summarize, Record, Slos, Summary};
use crate::workload::{plan, Planned, Prompts, Shape, TraceLine};
use anyhow::{bail, Context, Result};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchyard_proto::resume::Resuming;
use switchyard_proto::v1::generate_response::Event;
use switchyard_proto::v1::inference_client::InferenceClient;
use switchyard_proto::v1::*;
use tokio::time::Instant;
use tonic::transport::Channel;

/// Which API the requests use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// `switchyard.v1` gRPC `Generate` (token ids and timing per stream message).
    Grpc,
    /// OpenAI-style HTTP: `/v1/completions` (token-id prompts) or `/v1/chat/completions`
    /// (chat), streamed as server-sent events; tokens per event from its logprobs.
    OpenAi,
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub endpoint: String,
    pub api: Api,
    /// HTTP/2 connections the streams are spread over.
    pub connections: usize,
    pub shape: Shape,
    pub duration: Option<Duration>,
    pub requests: Option<usize>,
    pub warmup: Duration,
    pub cooldown: Duration,
    /// Client-side deadline per request.
    pub deadline: Option<Duration>,
    pub prompts: Prompts,
    /// Fill the input length with the model's context (less the output) when set.
    pub long_context: bool,
    pub seed: u64,
    pub slos: Slos,
    pub progress: bool,
    pub trace: Vec<TraceLine>,
}

/// What the endpoint serves.
pub struct ModelFacts {
    pub name: String,
    pub vocab: u32,
    pub max_context: u32,
}

pub async fn connect(endpoint: &str, n: usize) -> Result<Vec<InferenceClient<Channel>>> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let ch = tonic::transport::Endpoint::from_shared(endpoint.to_string())
            .with_context(|| format!("endpoint {endpoint:?}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to {endpoint}"))?;
        v.push(InferenceClient::new(ch).max_decoding_message_size(64 << 20));
    }
    Ok(v)
}

pub async fn model_facts(c: &mut InferenceClient<Channel>) -> Result<ModelFacts> {
    let m = c
        .list_models(ListModelsRequest {})
        .await
        .context("ListModels")?
        .into_inner();
    let m = m
        .models
        .into_iter()
        .next()
        .context("the endpoint serves no model")?;
    Ok(ModelFacts {
        name: m.name,
        vocab: m.vocab_size,
        max_context: m.max_context,
    })
}

struct Live {
    sent: AtomicUsize,
    done: AtomicUsize,
    errors: AtomicUsize,
    ttfts: Mutex<Vec<f64>>,
}

/// Runs the workload; returns every record (window marked) and the summary.
pub async fn run(o: &RunOptions) -> Result<(Vec<Record>, Summary, ModelFacts)> {
    let (clients, facts): (Vec<Conn>, ModelFacts) = match o.api {
        Api::Grpc => {
            let mut cs = connect(&o.endpoint, o.connections).await?;
            let facts = model_facts(&mut cs[0]).await?;
            (cs.into_iter().map(Conn::Grpc).collect(), facts)
        }
        Api::OpenAi => {
            let base = o.endpoint.trim_end_matches('/').to_string();
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(4096)
                .tcp_nodelay(true)
                .build()?;
            let model = openai_model(&client, &base).await?;
            let facts = ModelFacts {
                name: model.clone(),
                vocab: 0,
                max_context: 0,
            };
            (
                vec![Conn::Http {
                    client,
                    base,
                    model,
                }],
                facts,
            )
        }
    };
    let mut prompts = o.prompts.clone();
    if prompts.token_range.1 == 0 && !prompts.chat {
        if facts.vocab == 0 {
            bail!(
                "the endpoint does not report its vocabulary size; give --token-range LO-HI \
                 (the OpenAI API has no such field)"
            );
        }
        prompts.token_range.1 = facts.vocab;
    }
    if prompts.token_range.1 == 0 {
        // Chat prompts are words; the range only feeds the unused id draws.
        prompts.token_range.1 = prompts.token_range.0 + 1;
    }
    if prompts.token_range.0 >= prompts.token_range.1 {
        bail!("--token-range is empty for a vocabulary of {}", facts.vocab);
    }
    if o.long_context {
        if facts.max_context == 0 {
            bail!("--long-context needs the model's context size, which only the gRPC API reports");
        }
        let room = facts.max_context.saturating_sub(o.prompts.output.max() + 8);
        if room == 0 {
            bail!(
                "the model's context ({}) leaves no room for the prompt",
                facts.max_context
            );
        }
        prompts.input = crate::workload::Dist::Fixed(room);
    }
    let planned = Arc::new(plan(
        &o.shape, &prompts, o.duration, o.requests, o.seed, &o.trace,
    ));
    if planned.is_empty() {
        bail!("the workload has no requests (check --duration, --requests and the rate)");
    }
    let live = Arc::new(Live {
        sent: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        errors: AtomicUsize::new(0),
        ttfts: Mutex::new(Vec::new()),
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Record>();
    let t0 = Instant::now();
    let progress = o.progress.then(|| {
        let live = live.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let el = t0.elapsed().as_secs_f64();
                let (sent, done, errs) = (
                    live.sent.load(Ordering::Relaxed),
                    live.done.load(Ordering::Relaxed),
                    live.errors.load(Ordering::Relaxed),
                );
                let mut t = live.ttfts.lock().unwrap_or_else(|e| e.into_inner()).clone();
                t.sort_by(f64::total_cmp);
                let p = |q| crate::metrics::percentile(&t, q) * 1e3;
                eprintln!(
                    "{el:6.1}s  sent {sent} ({:.1}/s)  in flight {}  done {done}  errors {errs}  \
                     TTFT p50 {:.1} ms p99 {:.1} ms",
                    sent as f64 / el,
                    sent - done,
                    p(0.5),
                    p(0.99)
                );
            }
        })
    });
    let deadline = o.deadline;
    let (tx1, live1) = (tx.clone(), live.clone());
    let start_one = move |p: Planned, scheduled: f64, client: Conn| {
        let (tx, live) = (tx1.clone(), live1.clone());
        async move {
            live.sent.fetch_add(1, Ordering::Relaxed);
            let r = one_any(client, &p, t0, scheduled, deadline).await;
            if let Some(t) = r.ttft_s {
                live.ttfts.lock().unwrap_or_else(|e| e.into_inner()).push(t);
            }
            if !r.ok() && r.status != "cancelled" {
                live.errors.fetch_add(1, Ordering::Relaxed);
            }
            live.done.fetch_add(1, Ordering::Relaxed);
            let _ = tx.send(r);
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    match &o.shape {
        Shape::Concurrency(n) => {
            let next = Arc::new(AtomicUsize::new(0));
            let stop = o.duration.map(|d| t0 + d);
            for w in 0..*n {
                let (next, planned) = (next.clone(), planned.clone());
                let client = clients[w % clients.len()].clone();
                let start_one = start_one.clone();
                tasks.spawn(async move {
                    loop {
                        if stop.is_some_and(|s| Instant::now() >= s) {
                            break;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(p) = planned.get(i) else { break };
                        let at = t0.elapsed().as_secs_f64();
                        start_one(p.clone(), at, client.clone()).await;
                    }
                });
            }
        }
        _ => {
            for (i, p) in planned.iter().enumerate() {
                let at = t0 + Duration::from_secs_f64(p.at);
                tokio::time::sleep_until(at).await;
                let client = clients[i % clients.len()].clone();
                tasks.spawn(start_one(p.clone(), p.at, client));
            }
        }
    }
    drop((tx, start_one));
    while tasks.join_next().await.is_some() {}
    let mut records = Vec::new();
    while let Some(r) = rx.recv().await {
        records.push(r);
    }
    if let Some(p) = progress {
        p.abort();
    }
    records.sort_by_key(|r| r.index);
    // The window: warm-up off the front, cool-down off the end of sending.
    let send_end = match (&o.shape, o.duration) {
        (Shape::Concurrency(_), Some(d)) => d.as_secs_f64(),
        (_, Some(d)) => d
            .as_secs_f64()
            .min(planned.last().map_or(0.0, |p| p.at) + interval(&o.shape)),
        // Limited by count: the window ends just after the last send (it is included).
        _ => records.iter().map(|r| r.sent_s).fold(0.0, f64::max) + interval(&o.shape).max(1e-9),
    };
    let start = o.warmup.as_secs_f64();
    let end = (send_end - o.cooldown.as_secs_f64()).max(start + 1e-6);
    for r in &mut records {
        r.in_window = r.sent_s >= start && r.sent_s < end;
    }
    let target = match &o.shape {
        Shape::Rate { rate, .. } => Some(*rate),
        Shape::Burst { size, every } => Some(*size as f64 / every.as_secs_f64()),
        _ => None,
    };
    let summary = summarize(&records, start, end, target, &o.slos);
    Ok((records, summary, facts))
}

/// The mean gap between sends of an open-loop shape (so the window covers the last send's
/// slot), 0 for the others.
fn interval(shape: &Shape) -> f64 {
    match shape {
        Shape::Rate { rate, .. } => 1.0 / rate,
        Shape::Burst { every, .. } => every.as_secs_f64(),
        Shape::Ramp { rates, .. } => 1.0 / rates.last().copied().unwrap_or(1.0),
        _ => 0.0,
    }
}

impl Record {
    /// Accounts one stream message carrying `n` tokens (answer text and/or reasoning),
    /// received `since` seconds after sending at `now`. True when the plan hangs up here.
    #[allow(clippy::too_many_arguments)]
    fn on_tokens(
        &mut self,
        p: &Planned,
        since: f64,
        now: Instant,
        last_msg: &mut Option<Instant>,
        n: u32,
        answer: bool,
        reasoning: bool,
    ) -> bool {
        if self.ttft_s.is_none() {
            self.ttft_s = Some(since);
            self.first_token_s = Some(since);
        }
        if self.ttfa_s.is_none() && answer {
            self.ttfa_s = Some(since);
        }
        if reasoning && !answer {
            self.reasoning_tokens_seen += n;
        }
        if let Some(l) = *last_msg {
            self.message_gaps_s.push((now - l).as_secs_f64());
        }
        *last_msg = Some(now);
        self.last_token_s = Some(since);
        self.message_tokens.push(n);
        self.output_tokens += n;
        let cancel = p.cancel_after.is_some_and(|c| self.output_tokens >= c);
        if cancel {
            self.status = "cancelled".into();
        }
        cancel
    }
}

/// A record before anything came back.
fn blank(p: &Planned, t0: Instant, sent: Instant, scheduled: f64) -> Record {
    Record {
        index: p.index,
        scheduled_s: scheduled,
        sent_s: (sent - t0).as_secs_f64(),
        end_s: 0.0,
        status: "ok".into(),
        finish: String::new(),
        error: String::new(),
        in_window: false,
        prompt_tokens: p.prompt.len() as u32,
        max_tokens: p.max_tokens,
        ttft_s: None,
        ttfa_s: None,
        first_token_s: None,
        last_token_s: None,
        output_tokens: 0,
        reasoning_tokens_seen: 0,
        server_completion_tokens: None,
        server_reasoning_tokens: None,
        message_tokens: Vec::new(),
        message_gaps_s: Vec::new(),
        resumes: 0,
    }
}

/// A connection to send one request on.
#[derive(Clone)]
enum Conn {
    Grpc(InferenceClient<Channel>),
    Http {
        client: reqwest::Client,
        base: String,
        model: String,
    },
}

async fn one_any(
    conn: Conn,
    p: &Planned,
    t0: Instant,
    scheduled: f64,
    deadline: Option<Duration>,
) -> Record {
    match conn {
        Conn::Grpc(c) => one(c, p, t0, scheduled, deadline).await,
        Conn::Http {
            client,
            base,
            model,
        } => one_http(client, base, model, p, t0, scheduled, deadline).await,
    }
}

/// Sends one request and follows its stream.
async fn one(
    client: InferenceClient<Channel>,
    p: &Planned,
    t0: Instant,
    scheduled: f64,
    deadline: Option<Duration>,
) -> Record {
    let sent = Instant::now();
    let mut r = blank(p, t0, sent, scheduled);
    let input = match &p.chat {
        Some(text) => generate_request::Input::Chat(ChatInput {
            messages: vec![ChatMessage {
                role: "user".into(),
                content: text.clone(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        None => generate_request::Input::TokenIds(TokenIds {
            ids: p.prompt.clone(),
        }),
    };
    let req = GenerateRequest {
        request_id: format!("lt-{}", p.index),
        input: Some(input),
        max_tokens: p.max_tokens,
        ignore_eos: true,
        stream_token_ids: true,
        ..Default::default()
    };
    let follow = async {
        // A stream whose coordinator is lost is taken up again on the one that takes over
        // (the channel reconnects to the same endpoint: a Service in front of the leader).
        let again = client.clone();
        let reattach: switchyard_proto::resume::ReattachFn = Box::new(move |_, call| {
            let mut c = again.clone();
            Box::pin(async move { switchyard_proto::resume::call(&mut c, call).await })
        });
        let mut s = Resuming::start(req, 1, reattach, Duration::from_secs(30)).await?;
        let mut last_msg: Option<Instant> = None;
        while let Some(m) = s.message().await? {
            r.resumes = s.resumes;
            let now = Instant::now();
            let since = (now - sent).as_secs_f64();
            match m.event {
                Some(Event::Started(st)) => r.prompt_tokens = st.prompt_tokens,
                Some(Event::Delta(d)) => {
                    let n = d.token_ids.len() as u32;
                    if n == 0 {
                        continue;
                    }
                    let (answer, reasoning) = (!d.text.is_empty(), !d.reasoning_text.is_empty());
                    if r.on_tokens(p, since, now, &mut last_msg, n, answer, reasoning) {
                        // Hang up mid-stream: dropping the stream resets it.
                        return Ok(());
                    }
                }
                Some(Event::Finished(f)) => {
                    r.finish = format!("{:?}", f.reason());
                    if let Some(u) = f.usage {
                        r.server_completion_tokens = Some(u.completion_tokens);
                        r.server_reasoning_tokens = Some(u.reasoning_tokens);
                    }
                    if !f.error.is_empty() {
                        r.status = "FINISHED_WITH_ERROR".into();
                        r.error = f.error;
                    }
                }
                None => {}
            }
        }
        Ok::<(), tonic::Status>(())
    };
    let res = match deadline {
        Some(d) => match tokio::time::timeout(d, follow).await {
            Ok(x) => x,
            Err(_) => {
                r.status = "deadline".into();
                Ok(())
            }
        },
        None => follow.await,
    };
    if let Err(st) = res {
        r.status = code_name(st.code());
        r.error = st.message().to_string();
    }
    r.end_s = (Instant::now() - t0).as_secs_f64();
    r
}

/// A gRPC code as its canonical name (`RESOURCE_EXHAUSTED`).
pub fn code_name(c: tonic::Code) -> String {
    let mut out = String::new();
    for (i, ch) in format!("{c:?}").chars().enumerate() {
        if ch.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(ch.to_ascii_uppercase());
    }
    out
}

/// What the OpenAI-style endpoint serves (`GET /v1/models`): the model id. The vocabulary
/// and context are not part of that API, so token ranges must come from `--token-range`
/// or a gRPC endpoint's ListModels (`--grpc-facts`).
pub async fn openai_model(http: &reqwest::Client, base: &str) -> Result<String> {
    let r = http
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .with_context(|| format!("GET {base}/v1/models"))?;
    let status = r.status();
    let body = r.text().await?;
    if !status.is_success() {
        bail!("GET {base}/v1/models: {status}: {body}");
    }
    let v: serde_json::Value = serde_json::from_str(&body)?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .context("the endpoint lists no model")
}

/// One request over the OpenAI-style HTTP API, streamed (SSE).
async fn one_http(
    http: reqwest::Client,
    base: String,
    model: String,
    p: &Planned,
    t0: Instant,
    scheduled: f64,
    deadline: Option<Duration>,
) -> Record {
    use futures_util::StreamExt;
    let sent = Instant::now();
    let mut r = blank(p, t0, sent, scheduled);
    let chat = p.chat.is_some();
    let body = if let Some(text) = &p.chat {
        serde_json::json!({
            "model": model, "messages": [{"role": "user", "content": text}],
            "max_tokens": p.max_tokens, "temperature": 0, "ignore_eos": true, "stream": true,
            "logprobs": true, "stream_options": {"include_usage": true},
        })
    } else {
        serde_json::json!({
            "model": model, "prompt": p.prompt, "max_tokens": p.max_tokens, "temperature": 0,
            "ignore_eos": true, "stream": true, "logprobs": 0,
            "stream_options": {"include_usage": true},
        })
    };
    let path = if chat {
        "chat/completions"
    } else {
        "completions"
    };
    let follow = async {
        let resp = http
            .post(format!("{base}/v1/{path}"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| ("UNAVAILABLE".to_string(), e.to_string()))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err((format!("HTTP_{}", status.as_u16()), text));
        }
        let mut stream = resp.bytes_stream();
        let mut buf = String::new();
        let mut last_msg: Option<Instant> = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ("UNAVAILABLE".to_string(), e.to_string()))?;
            let now = Instant::now();
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                for line in event.lines() {
                    let Some(data) = line.strip_prefix("data: ") else {
                        continue;
                    };
                    if data == "[DONE]" {
                        continue;
                    }
                    let v: serde_json::Value = serde_json::from_str(data)
                        .map_err(|e| ("MALFORMED".to_string(), format!("{e}: {data}")))?;
                    if let Some(err) = v.get("error") {
                        return Err(("FINISHED_WITH_ERROR".to_string(), err.to_string()));
                    }
                    if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                        r.server_completion_tokens =
                            u["completion_tokens"].as_u64().map(|x| x as u32);
                        r.server_reasoning_tokens = Some(
                            u["completion_tokens_details"]["reasoning_tokens"]
                                .as_u64()
                                .unwrap_or(0) as u32,
                        );
                        r.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as u32;
                    }
                    let Some(c) = v["choices"].get(0) else {
                        continue;
                    };
                    if let Some(f) = c["finish_reason"].as_str() {
                        r.finish = f.to_string();
                    }
                    let (n, answer, reasoning) = if chat {
                        let d = &c["delta"];
                        (
                            c["logprobs"]["content"].as_array().map_or(0, |a| a.len()),
                            d["content"].as_str().is_some_and(|s| !s.is_empty()),
                            d["reasoning_content"]
                                .as_str()
                                .is_some_and(|s| !s.is_empty()),
                        )
                    } else {
                        (
                            c["logprobs"]["tokens"].as_array().map_or(0, |a| a.len()),
                            c["text"].as_str().is_some_and(|s| !s.is_empty()),
                            false,
                        )
                    };
                    let n = n as u32;
                    if n == 0 {
                        continue;
                    }
                    let since = (now - sent).as_secs_f64();
                    if r.on_tokens(p, since, now, &mut last_msg, n, answer, reasoning) {
                        // Hang up mid-stream: dropping the response closes the connection.
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    };
    let res = match deadline {
        Some(d) => tokio::time::timeout(d, follow).await.unwrap_or_else(|_| {
            r.status = "deadline".into();
            Ok(())
        }),
        None => follow.await,
    };
    if let Err((status, error)) = res {
        r.status = status;
        r.error = error;
    }
    r.end_s = (Instant::now() - t0).as_secs_f64();
    r
}
