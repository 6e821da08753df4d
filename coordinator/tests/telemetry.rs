//! OpenTelemetry export: `switchyard up --otlp-endpoint` sends its spans over OTLP/HTTP to a
//! collector (here a minimal one that decodes the protobuf export requests). Each request has a
//! `generate` span (the child of the caller's `traceparent` when it sends one) and every step
//! that computed for it is a `step` span linked to it.

mod common;
use common::{fixture, spawn_serving};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A collector on loopback: the URL and the spans received so far.
fn collector() -> (String, Arc<Mutex<Vec<Span>>>) {
    let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let sink = spans.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let app = axum::Router::new().route(
                "/v1/traces",
                axum::routing::post(move |body: axum::body::Bytes| {
                    let sink = sink.clone();
                    async move {
                        let req = ExportTraceServiceRequest::decode(body).unwrap();
                        let mut s = sink.lock().unwrap();
                        for rs in req.resource_spans {
                            for ss in rs.scope_spans {
                                s.extend(ss.spans);
                            }
                        }
                        // An empty ExportTraceServiceResponse.
                        (
                            [("content-type", "application/x-protobuf")],
                            Vec::<u8>::new(),
                        )
                    }
                }),
            );
            axum::serve(listener, app).await.unwrap();
        });
    });
    (url, spans)
}

fn attr(s: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    s.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}

#[test]
fn requests_and_steps_are_exported_as_linked_spans() {
    let (otlp, spans) = collector();
    let dir = fixture("tiny-qwen3-moe");
    let (_up, url) = spawn_serving(&[
        "up",
        "--model",
        dir.to_str().unwrap(),
        "--workers",
        "2",
        "--grpc-addr",
        "127.0.0.1:0",
        "--otlp-endpoint",
        &otlp,
    ]);
    // A caller inside a trace of its own, and one outside any.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    common::block_on(async {
        use switchyard_proto::v1::inference_client::InferenceClient;
        use switchyard_proto::v1::*;
        let mut c = InferenceClient::connect(url.clone()).await.unwrap();
        let mut req = tonic::Request::new(GenerateRequest {
            input: Some(generate_request::Input::TokenIds(TokenIds {
                ids: vec![1, 2, 3, 4, 5],
            })),
            max_tokens: 6,
            ignore_eos: true,
            request_id: "traced".into(),
            ..Default::default()
        });
        req.metadata_mut().insert(
            "traceparent",
            format!("00-{caller_trace}-{caller_span}-01")
                .parse()
                .unwrap(),
        );
        let mut s = c.generate(req).await.unwrap().into_inner();
        while s.message().await.unwrap().is_some() {}
        let got = common::generate_ids(&url, vec![7, 8, 9], 4).await;
        assert_eq!(got.len(), 4);
    });
    // The batch exporter sends every few seconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (gens, steps) = loop {
        let all = spans.lock().unwrap().clone();
        let gens: Vec<Span> = all
            .iter()
            .filter(|s| s.name == "generate")
            .cloned()
            .collect();
        let steps: Vec<Span> = all.iter().filter(|s| s.name == "step").cloned().collect();
        let linked = |g: &Span| {
            steps
                .iter()
                .filter(|s| s.links.iter().any(|l| l.span_id == g.span_id))
                .count()
        };
        if gens.len() >= 2 && gens.iter().all(|g| linked(g) > 0) {
            break (gens, steps);
        }
        assert!(
            Instant::now() < deadline,
            "after 30 s: {} generate spans, {} step spans",
            gens.len(),
            steps.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let traced = gens
        .iter()
        .find(|g| attr(g, "request_id").as_deref() == Some("traced"))
        .expect("the traced request's span");
    // Joined the caller's trace, as the child of the caller's span.
    assert_eq!(hex(&traced.trace_id), caller_trace);
    assert_eq!(hex(&traced.parent_span_id), caller_span);
    assert_eq!(attr(traced, "prompt_tokens").as_deref(), Some("5"));
    for g in &gens {
        // Prefill plus one step per further token: at least as many steps as tokens.
        let n = steps
            .iter()
            .filter(|s| {
                s.links
                    .iter()
                    .any(|l| l.span_id == g.span_id && l.trace_id == g.trace_id)
            })
            .count();
        let want = if attr(g, "request_id").as_deref() == Some("traced") {
            6
        } else {
            4
        };
        assert!(n >= want, "{:?}: {n} linked steps", attr(g, "request_id"));
    }
    assert!(steps
        .iter()
        .all(|s| attr(s, "step").is_some() && attr(s, "rows").is_some()));
}
