//! OpenAI-style HTTP API on the coordinator (axum): `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions` (JSON, or server-sent events with `stream: true`), `GET
//! /healthz`, `GET /readyz`, `GET /metrics`.
//!
//! Each request is translated into a `switchyard.v1.GenerateRequest` and run through the same
//! [`InferenceService`] as gRPC calls (validation, tokenization, chat template, reasoning
//! split, stop strings, admission, API keys, cancellation), then its events are translated
//! back. So both APIs give the same tokens and the same errors, and a client that disconnects
//! drops the event stream, which cancels the request (its KV is freed with the next step).
//!
//! Errors use OpenAI's body, `{"error": {"message", "type", "param", "code"}}`, with the status
//! mapped from the gRPC code (INVALID_ARGUMENT 400, UNAUTHENTICATED 401, NOT_FOUND 404,
//! RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, DEADLINE_EXCEEDED 504, others 500).

use crate::metrics::Metrics;
use crate::server::InferenceService;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use switchyard_proto::v1::generate_response::Event;
use switchyard_proto::v1::*;
use tokio_stream::StreamExt;

/// Whether the coordinator can serve now (`Err` says why not).
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
pub struct HttpState {
    pub svc: Arc<InferenceService>,
    pub metrics: Arc<Metrics>,
    pub ready: Readiness,
}

/// The router: OpenAI-style endpoints, health, readiness and metrics.
pub fn router(state: HttpState) -> axum::Router {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Serves `router(state)` on `listener` until the process ends: plain HTTP, or HTTPS when
/// `tls` is given (each connection's handshake in its own task, bounded by
/// [`TLS_HANDSHAKE_TIMEOUT`], so a silent client holds up nobody else).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<()> {
    let Some(tls) = tls else {
        return axum::serve(listener, router(state)).await;
    };
    let app = router(state);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::debug!(%from, error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%from, "TLS handshake timed out"),
            };
            let svc = hyper_util::service::TowerToHyperService::new(app);
            let served =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            if let Err(e) = served {
                tracing::debug!(%from, error = %e, "HTTPS connection ended");
            }
        });
    }
}

/// Longest a client may take to finish its TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A rustls server configuration (ring) from a listener's PEM files, requiring client
/// certificates when a client CA is given. HTTP/1.1 only (ALPN), as the plain listener.
pub fn rustls_config(
    tls: &switchyard_runtime::tls::ServerTls,
) -> Result<Arc<rustls::ServerConfig>, switchyard_runtime::tls::TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use switchyard_runtime::tls::TlsError;
    let bad = |what: &str, e: &dyn std::fmt::Display| TlsError::Config(format!("{what}: {e}"));
    let (cert, key, ca) = tls.pems()?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&tls.cert.display().to_string(), &e))?;
    let key =
        PrivateKeyDer::from_pem_slice(&key).map_err(|e| bad(&tls.key.display().to_string(), &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("TLS versions", &e))?;
    let builder = match ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&ca) {
                let c = c.map_err(|e| bad("client CA", &e))?;
                roots.add(c).map_err(|e| bad("client CA", &e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| bad("client CA", &e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| bad("certificate and key", &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// An error in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<String>,
    code: Option<&'static str>,
}

impl ApiError {
    /// An error names the typed API's field: here, the HTTP field the request used for it
    /// (a constraint's `json_schema`, `regex`, ... is `response_format` or
    /// `structured_outputs.*`; a tool's `tools[i].name` is `tools[i].function.name`).
    fn in_http_terms(mut self, c: &Common) -> Self {
        let Some(p) = self.param.take() else {
            return self;
        };
        let http = match p.split_once("].") {
            _ if ["json_object", "json_schema", "regex", "lark"].contains(&p.as_str()) => {
                match (&c.response_format, &c.structured_outputs) {
                    (Some(_), _) => "response_format".to_string(),
                    (None, Some(so)) => so
                        .as_object()
                        .and_then(|o| o.keys().next())
                        .map_or("structured_outputs".into(), |k| {
                            format!("structured_outputs.{k}")
                        }),
                    (None, None) => p.clone(),
                }
            }
            Some((t, f)) if t.starts_with("tools[") => format!("{t}].function.{f}"),
            _ if p == "tool_choice_function" => "tool_choice".to_string(),
            _ => p.clone(),
        };
        if http != p {
            self.message = self.message.replacen(&p, &http, 1);
        }
        self.param = Some(http);
        self
    }

    fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: param.map(str::to_string),
            code: None,
        }
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

impl From<crate::api::ApiError> for ApiError {
    fn from(e: crate::api::ApiError) -> Self {
        use crate::api::ApiError as E;
        let (status, kind, code) = match &e {
            E::InvalidArgument { .. } | E::BadRequest(_) => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", None)
            }
            E::Unauthenticated(_) => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
            E::PermissionDenied(_) => (StatusCode::FORBIDDEN, "invalid_request_error", None),
            E::NotFound(_) => (StatusCode::NOT_FOUND, "invalid_request_error", None),
            E::FailedPrecondition(_) => (StatusCode::BAD_REQUEST, "invalid_request_error", None),
            E::ResourceExhausted(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
            ),
            E::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "server_error", None),
            E::DeadlineExceeded(_) => (StatusCode::GATEWAY_TIMEOUT, "server_error", None),
            E::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        };
        let param = match &e {
            E::InvalidArgument { field, .. } => Some(field.clone()),
            _ => None,
        };
        ApiError {
            status,
            kind,
            message: e.to_string(),
            param,
            code,
        }
    }
}

/// A JSON body, with OpenAI-shaped errors for malformed JSON or wrong field types, and no
/// field ignored: every top-level key (and every key of each chat message) is one the server
/// honours ([`Surface::FIELDS`]), or one of OpenAI's it does not implement sent with the
/// value that means "off" ([`inert`]: `tools: []`, `tool_choice: "none"`, `null`, ...), which
/// some clients always send. Anything else is a 400 naming the field, so a request that asks
/// for JSON output or tool calls is refused rather than answered as if it had not.
pub struct Body<T>(T);

/// The fields a request type honours besides [`COMMON_FIELDS`].
pub trait Surface {
    const FIELDS: &'static [&'static str];
}

/// Whether `value` for OpenAI's `key` changes nothing (the field's documented default or
/// `null`), so a server that does not implement `key` still answers the request exactly.
fn inert(key: &str, value: &Value) -> bool {
    if value.is_null() {
        return true;
    }
    match key {
        "metadata" => value.as_object().is_some_and(|m| m.is_empty()),
        "tools" | "functions" => value.as_array().is_some_and(|a| a.is_empty()),
        "tool_choice" | "function_call" => value.as_str() == Some("none"),
        "parallel_tool_calls" => value.as_bool() == Some(true),
        "store" => value.as_bool() == Some(false),
        "service_tier" => matches!(value.as_str(), Some("auto" | "default")),
        "modalities" => value == &json!(["text"]),
        "best_of" => value.as_u64() == Some(1),
        "suffix" => value.as_str() == Some(""),
        // An end-user id for the caller's own attribution: recorded in the request's log.
        "user" => value.is_string(),
        _ => false,
    }
}

/// The 400 for a field of `obj` in none of `known` (see [`Body`]); `at` prefixes its name.
fn unhonoured(
    obj: &serde_json::Map<String, Value>,
    known: &[&[&str]],
    at: &str,
) -> Option<ApiError> {
    let (key, _) = obj
        .iter()
        .find(|(k, v)| !known.iter().any(|f| f.contains(&k.as_str())) && !inert(k, v))?;
    let param = format!("{at}{key}");
    Some(ApiError::invalid(
        Some(&param),
        format!("`{param}` is not supported by this server (send it unset, or null)"),
    ))
}

/// Fields of one chat message.
const MESSAGE_FIELDS: &[&str] = &["role", "content", "tool_calls", "tool_call_id", "name"];

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Surface> axum::extract::FromRequest<S>
    for Body<T>
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::invalid(None, e.to_string()))?;
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::invalid(None, format!("request body: {e}")))?;
        if let Some(obj) = v.as_object() {
            if let Some(e) = unhonoured(obj, &[COMMON_FIELDS, T::FIELDS], "") {
                return Err(e);
            }
            if let Some(user) = obj.get("user").and_then(Value::as_str) {
                tracing::debug!(user, "request from end user");
            }
            let messages = obj.get("messages").and_then(Value::as_array);
            for (i, m) in messages.into_iter().flatten().enumerate() {
                if let Some(e) = m
                    .as_object()
                    .and_then(|m| unhonoured(m, &[MESSAGE_FIELDS], &format!("messages[{i}].")))
                {
                    return Err(e);
                }
            }
            if let Some(o) = obj.get("stream_options").and_then(Value::as_object) {
                if let Some(e) = unhonoured(o, &[&["include_usage"]], "stream_options.") {
                    return Err(e);
                }
            }
        }
        serde_json::from_value(v)
            .map(Body)
            .map_err(|e| ApiError::invalid(None, format!("request body: {e}")))
    }
}

/// Fields both endpoints honour (see [`Common`]).
const COMMON_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "n",
    "stop",
    "stream",
    "stream_options",
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "min_tokens",
    "stop_token_ids",
    "response_format",
    "structured_outputs",
    "max_reasoning_tokens",
];

impl Surface for ChatRequest {
    const FIELDS: &'static [&'static str] = &[
        "messages",
        "logprobs",
        "top_logprobs",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
    ];
}

impl Surface for CompletionRequest {
    const FIELDS: &'static [&'static str] = &["prompt", "logprobs", "echo"];
}

#[derive(Deserialize, Default)]
#[serde(untagged)]
enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Fields both endpoints share.
#[derive(Deserialize, Default)]
struct Common {
    model: String,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    n: Option<u32>,
    #[serde(default)]
    stop: OneOrMany,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    /// Not in OpenAI's API; vLLM's extension, honoured the same way.
    top_k: Option<u32>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    /// vLLM's extension: generate exactly max_tokens (load tests).
    #[serde(default)]
    ignore_eos: bool,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    /// Token ids (as strings, OpenAI's form) to a bias in [-100, 100].
    logit_bias: Option<std::collections::HashMap<String, f32>>,
    /// vLLM's extensions: end of sequence / stop_token_ids only after this many tokens;
    /// tokens that end generation.
    min_tokens: Option<u32>,
    stop_token_ids: Option<Vec<u32>>,
    /// OpenAI's `{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema"}}`.
    response_format: Option<Value>,
    /// vLLM's extension: exactly one of `json` (a schema), `regex`, `grammar` (Lark).
    structured_outputs: Option<Value>,
    /// Thinking budget of a reasoning model (see `GenerateRequest.max_reasoning_tokens`).
    max_reasoning_tokens: Option<u32>,
}

/// The constraint a request's `response_format` or `structured_outputs` asks for.
fn constraint_of(c: &Common) -> Result<Option<generate_request::Constraint>, ApiError> {
    use generate_request::Constraint as C;
    let bad = |p: &str, m: String| Err(ApiError::invalid(Some(p), m));
    if let (Some(_), Some(_)) = (&c.response_format, &c.structured_outputs) {
        return bad(
            "structured_outputs",
            "give response_format or structured_outputs, not both".into(),
        );
    }
    if let Some(rf) = &c.response_format {
        return match rf.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(C::JsonObject(true))),
            Some("json_schema") => match rf.pointer("/json_schema/schema") {
                Some(s) => Ok(Some(C::JsonSchema(s.to_string()))),
                None => bad(
                    "response_format",
                    "response_format.json_schema.schema is required".into(),
                ),
            },
            other => bad(
                "response_format",
                format!(
                    "response_format.type must be text, json_object or json_schema, got {}",
                    other.map_or("nothing".into(), |t| format!("{t:?}"))
                ),
            ),
        };
    }
    let Some(so) = &c.structured_outputs else {
        return Ok(None);
    };
    let Some(o) = so.as_object().filter(|o| o.len() == 1) else {
        return bad(
            "structured_outputs",
            "exactly one of json, regex, grammar".into(),
        );
    };
    let (k, v) = o.iter().next().expect("one entry");
    match (k.as_str(), v) {
        ("json", s) => Ok(Some(C::JsonSchema(s.to_string()))),
        ("regex", Value::String(r)) => Ok(Some(C::Regex(r.clone()))),
        ("grammar", Value::String(g)) => Ok(Some(C::Lark(g.clone()))),
        _ => bad(
            &format!("structured_outputs.{k}"),
            "expected json (a schema), regex or grammar (strings)".into(),
        ),
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
}

#[derive(Deserialize)]
struct ChatMessageIn {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    /// An assistant turn's calls: `[{"id", "type": "function", "function": {"name",
    /// "arguments"}}]`, checked by [`calls_in`].
    tool_calls: Option<Value>,
    tool_call_id: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(flatten)]
    common: Common,
    messages: Vec<ChatMessageIn>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u32>,
    /// `[{"type": "function", "function": {"name", "description", "parameters", "strict"}}]`,
    /// checked by [`tools_in`].
    tools: Option<Value>,
    /// `"auto" | "none" | "required" | {"type": "function", "function": {"name"}}`.
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
}

/// The keys of `v` (an object, else a 400 naming `at`) outside `known` are a 400 naming them.
fn object_at<'a>(
    v: &'a Value,
    at: &str,
    known: &[&str],
) -> Result<&'a serde_json::Map<String, Value>, ApiError> {
    let o = v
        .as_object()
        .ok_or_else(|| ApiError::invalid(Some(at), format!("`{at}` must be an object")))?;
    match unhonoured(o, &[known], &format!("{at}.")) {
        Some(e) => Err(e),
        None => Ok(o),
    }
}

/// A string field of `o` (`at` names it in errors); `None` when absent or null.
fn str_at<'a>(
    o: &'a serde_json::Map<String, Value>,
    key: &str,
    at: &str,
) -> Result<Option<&'a str>, ApiError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::invalid(
            Some(&format!("{at}.{key}")),
            format!("`{at}.{key}` must be a string"),
        )),
    }
}

/// OpenAI's `tools` as the typed API's.
fn tools_in(v: &Value) -> Result<Vec<Tool>, ApiError> {
    let a = v
        .as_array()
        .ok_or_else(|| ApiError::invalid(Some("tools"), "`tools` must be an array"))?;
    let mut out = Vec::with_capacity(a.len());
    for (i, t) in a.iter().enumerate() {
        let at = format!("tools[{i}]");
        let o = object_at(t, &at, &["type", "function"])?;
        if str_at(o, "type", &at)? != Some("function") {
            return Err(ApiError::invalid(
                Some(&format!("{at}.type")),
                format!("`{at}.type` must be \"function\""),
            ));
        }
        let at = format!("{at}.function");
        let f = object_at(
            o.get("function").unwrap_or(&Value::Null),
            &at,
            &["name", "description", "parameters", "strict"],
        )?;
        let strict = match f.get("strict") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ApiError::invalid(
                    Some(&format!("{at}.strict")),
                    format!("`{at}.strict` must be a boolean"),
                ))
            }
        };
        out.push(Tool {
            name: str_at(f, "name", &at)?.unwrap_or_default().to_string(),
            description: str_at(f, "description", &at)?
                .unwrap_or_default()
                .to_string(),
            parameters: match f.get("parameters") {
                None | Some(Value::Null) => String::new(),
                Some(p) => p.to_string(),
            },
            strict,
        });
    }
    Ok(out)
}

/// OpenAI's `tool_choice` as the typed API's (choice, function name).
fn tool_choice_in(v: &Value) -> Result<(ToolChoice, String), ApiError> {
    match v {
        Value::String(s) => match s.as_str() {
            "auto" => Ok((ToolChoice::Auto, String::new())),
            "none" => Ok((ToolChoice::None, String::new())),
            "required" => Ok((ToolChoice::Required, String::new())),
            _ => Err(ApiError::invalid(
                Some("tool_choice"),
                format!("`tool_choice` must be auto, none, required or a function, got {s:?}"),
            )),
        },
        _ => {
            let o = object_at(v, "tool_choice", &["type", "function"])?;
            if str_at(o, "type", "tool_choice")? != Some("function") {
                return Err(ApiError::invalid(
                    Some("tool_choice.type"),
                    "`tool_choice.type` must be \"function\"",
                ));
            }
            let f = object_at(
                o.get("function").unwrap_or(&Value::Null),
                "tool_choice.function",
                &["name"],
            )?;
            let name = str_at(f, "name", "tool_choice.function")?.unwrap_or_default();
            Ok((ToolChoice::Function, name.to_string()))
        }
    }
}

/// An assistant message's `tool_calls` as the typed API's.
fn calls_in(v: &Value, at: &str) -> Result<Vec<ToolCall>, ApiError> {
    let at = format!("{at}.tool_calls");
    let a = v
        .as_array()
        .ok_or_else(|| ApiError::invalid(Some(&at), format!("`{at}` must be an array")))?;
    let mut out = Vec::with_capacity(a.len());
    for (j, c) in a.iter().enumerate() {
        let at = format!("{at}[{j}]");
        let o = object_at(c, &at, &["id", "type", "function"])?;
        let fat = format!("{at}.function");
        let f = object_at(
            o.get("function").unwrap_or(&Value::Null),
            &fat,
            &["name", "arguments"],
        )?;
        out.push(ToolCall {
            id: str_at(o, "id", &at)?.unwrap_or_default().to_string(),
            name: str_at(f, "name", &fat)?.unwrap_or_default().to_string(),
            arguments: str_at(f, "arguments", &fat)?
                .unwrap_or_default()
                .to_string(),
        });
    }
    Ok(out)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptIn {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
}

#[derive(Deserialize)]
struct CompletionRequest {
    #[serde(flatten)]
    common: Common,
    prompt: PromptIn,
    /// Completions' logprobs: how many alternatives per position (0 = only the chosen).
    logprobs: Option<u32>,
    #[serde(default)]
    echo: bool,
}

/// Largest `n` accepted.
const MAX_N: u32 = 16;

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The call context of an HTTP request: the caller's credentials and W3C trace context (so
/// the request's span joins the caller's trace).
fn call_of(headers: &HeaderMap) -> crate::api::Call {
    crate::api::Call {
        authorization: bearer(headers),
        trace: ["traceparent", "tracestate"]
            .into_iter()
            .filter_map(|k| {
                let v = headers.get(k)?.to_str().ok()?;
                Some((k, v.to_string()))
            })
            .collect(),
        ..Default::default()
    }
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn new_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!(
        "{prefix}-{:x}{:06x}",
        now_s(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

impl Common {
    /// The request template (input filled in by the caller), after OpenAI-level checks.
    fn to_grpc(&self, svc: &InferenceService) -> Result<GenerateRequest, ApiError> {
        if self.model != svc.model_name() {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                kind: "invalid_request_error",
                message: format!(
                    "The model `{}` does not exist (serving `{}`)",
                    self.model,
                    svc.model_name()
                ),
                param: Some("model".into()),
                code: Some("model_not_found"),
            });
        }
        let n = self.n.unwrap_or(1);
        if n == 0 || n > MAX_N {
            return Err(ApiError::invalid(
                Some("n"),
                format!("n must be between 1 and {MAX_N}, got {n}"),
            ));
        }
        let stop = match &self.stop {
            OneOrMany::None => vec![],
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        };
        if stop.len() > 4 {
            return Err(ApiError::invalid(Some("stop"), "at most 4 stop sequences"));
        }
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            Some(0) => {
                return Err(ApiError::invalid(
                    Some("max_tokens"),
                    "max_tokens must be at least 1",
                ))
            }
            Some(n) => n,
            // No limit: as many as the context leaves after the prompt (`Call::up_to_context`).
            None => 0,
        };
        let mut logit_bias = std::collections::HashMap::new();
        for (k, v) in self.logit_bias.iter().flatten() {
            let t: u32 = k.parse().map_err(|_| {
                ApiError::invalid(Some("logit_bias"), format!("keys are token ids, got {k:?}"))
            })?;
            logit_bias.insert(t, *v);
        }
        Ok(GenerateRequest {
            model: String::new(),
            sampling: Some(SamplingParams {
                // OpenAI's default temperature is 1.
                temperature: self.temperature.unwrap_or(1.0),
                top_p: self.top_p,
                top_k: self.top_k.unwrap_or(0),
                min_p: self.min_p.unwrap_or(0.0),
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
                presence_penalty: self.presence_penalty.unwrap_or(0.0),
                frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
                logit_bias,
            }),
            max_tokens,
            stop,
            ignore_eos: self.ignore_eos,
            stream_token_ids: true,
            min_tokens: self.min_tokens.unwrap_or(0),
            stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
            constraint: constraint_of(self)?,
            max_reasoning_tokens: self.max_reasoning_tokens.unwrap_or(0),
            ..Default::default()
        })
    }
}

/// One choice's outcome, gathered from its event stream.
#[derive(Default)]
struct Gathered {
    text: String,
    reasoning: String,
    prompt_tokens: u32,
    completion_tokens: u32,
    reasoning_tokens: u32,
    finish: Option<FinishReason>,
    error: String,
    logprobs: Vec<TokenLogprob>,
    /// Tool calls, each with its whole arguments.
    calls: Vec<ToolCallDelta>,
}

fn finish_str(f: Option<FinishReason>) -> Value {
    match f {
        Some(FinishReason::Stop) => json!("stop"),
        Some(FinishReason::Length) => json!("length"),
        Some(FinishReason::ToolCalls) => json!("tool_calls"),
        Some(_) => json!("error"),
        None => Value::Null,
    }
}

type EventStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<GenerateResponse, crate::api::ApiError>> + Send>,
>;

/// Starts one generation; errors before the first event are the request's errors.
async fn start(
    svc: &InferenceService,
    r: GenerateRequest,
    caller: &crate::api::Call,
) -> Result<EventStream, ApiError> {
    let call = crate::api::Call {
        // No limit: as many tokens as the context leaves.
        up_to_context: r.max_tokens == 0,
        ..caller.clone()
    };
    let events = svc.submit(r, call).await?;
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
        events,
    )))
}

async fn gather(mut s: EventStream) -> Result<Gathered, ApiError> {
    let mut g = Gathered::default();
    while let Some(m) = s.next().await {
        match m?.event {
            Some(Event::Started(st)) => g.prompt_tokens = st.prompt_tokens,
            Some(Event::Delta(d)) => {
                g.text.push_str(&d.text);
                g.reasoning.push_str(&d.reasoning_text);
                g.logprobs.extend(d.logprobs);
                for c in d.tool_calls {
                    match g.calls.get_mut(c.index as usize) {
                        Some(have) => have.arguments.push_str(&c.arguments),
                        None => g.calls.push(c),
                    }
                }
            }
            Some(Event::Finished(f)) => {
                g.finish = Some(f.reason());
                g.error = f.error;
                if let Some(u) = f.usage {
                    g.completion_tokens = u.completion_tokens;
                    g.reasoning_tokens = u.reasoning_tokens;
                }
            }
            None => {}
        }
    }
    if g.finish == Some(FinishReason::Error) {
        return Err(ApiError::from(crate::api::ApiError::internal(
            g.error.clone(),
        )));
    }
    Ok(g)
}

fn usage(prompt: u32, completion: u32, reasoning: u32) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    })
}

/// Chat logprobs (`{"content": [...]}`) for some positions.
fn chat_logprobs(svc: &InferenceService, lps: &[TokenLogprob]) -> Value {
    let entry = |id: u32, lp: f32| {
        let t = svc.token_text(id);
        json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
    };
    json!({"content": lps.iter().map(|l| {
        let mut e = entry(l.token_id, l.logprob);
        e["top_logprobs"] = Value::Array(l.top.iter().map(|t| entry(t.token_id, t.logprob)).collect());
        e
    }).collect::<Vec<_>>()})
}

/// Completions logprobs (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).
fn completion_logprobs(svc: &InferenceService, lps: &[TokenLogprob]) -> Value {
    let mut offset = 0usize;
    let (mut tokens, mut lp, mut top, mut offsets) = (vec![], vec![], vec![], vec![]);
    for l in lps {
        let t = svc.token_text(l.token_id);
        offsets.push(offset);
        offset += t.len();
        tokens.push(t);
        lp.push(l.logprob);
        let alts: serde_json::Map<String, Value> = l
            .top
            .iter()
            .map(|a| (svc.token_text(a.token_id), json!(a.logprob)))
            .collect();
        top.push(Value::Object(alts));
    }
    json!({"tokens": tokens, "token_logprobs": lp, "top_logprobs": top, "text_offset": offsets})
}

async fn models(State(st): State<HttpState>, headers: HeaderMap) -> Result<Response, ApiError> {
    st.svc.authorize(bearer(&headers).as_deref())?;
    Ok(axum::Json(json!({
        "object": "list",
        "data": [{
            "id": st.svc.model_name(),
            "object": "model",
            "created": 0,
            "owned_by": "switchyard",
            "max_model_len": st.svc.max_context(),
        }],
    }))
    .into_response())
}

async fn readyz(State(st): State<HttpState>) -> Response {
    readiness_response((st.ready)())
}

/// `/readyz`'s answer: 200 `ready`, or 503 with the reason.
pub fn readiness_response(r: Result<(), String>) -> Response {
    match r {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(st): State<HttpState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        st.metrics.render(),
    )
        .into_response()
}

fn sse(events: impl tokio_stream::Stream<Item = Value> + Send + 'static) -> Response {
    use axum::response::sse::{Event as SseEvent, Sse};
    let s = events
        .map(|v| SseEvent::default().data(v.to_string()))
        .chain(tokio_stream::once(SseEvent::default().data("[DONE]")))
        .map(Ok::<_, std::convert::Infallible>);
    Sse::new(s).into_response()
}

async fn chat_completions(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Body(req): Body<ChatRequest>,
) -> Result<Response, ApiError> {
    let caller = call_of(&headers);
    st.svc.authorize(caller.authorization.as_deref())?;
    let mut g = req.common.to_grpc(&st.svc)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            Some("messages"),
            "at least one message is required",
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut t = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(ApiError::invalid(
                            Some(&format!("messages[{i}].content")),
                            format!("content parts of type {:?} are not supported", p.kind),
                        ));
                    }
                    t.push_str(&p.text);
                }
                t
            }
        };
        let at = format!("messages[{i}]");
        let tool_calls = match &m.tool_calls {
            None | Some(Value::Null) => Vec::new(),
            Some(_) if m.role != "assistant" => {
                let param = format!("{at}.tool_calls");
                return Err(ApiError::invalid(
                    Some(&param),
                    format!("`{param}`: only assistant messages carry tool calls"),
                ));
            }
            Some(v) => calls_in(v, &at)?,
        };
        if m.role != "tool" {
            for (key, set) in [
                ("tool_call_id", m.tool_call_id.is_some()),
                ("name", m.name.is_some()),
            ] {
                if set {
                    let param = format!("{at}.{key}");
                    return Err(ApiError::invalid(
                        Some(&param),
                        format!("`{param}` is only supported on tool messages"),
                    ));
                }
            }
        }
        messages.push(ChatMessage {
            role: m.role,
            content,
            tool_calls,
            tool_call_id: m.tool_call_id.unwrap_or_default(),
            name: m.name.unwrap_or_default(),
        });
    }
    g.input = Some(generate_request::Input::Chat(ChatInput {
        messages,
        add_generation_prompt: Some(true),
    }));
    if let Some(t) = &req.tools {
        g.tools = tools_in(t)?;
    }
    if let Some(c) = req.tool_choice.as_ref().filter(|c| !c.is_null()) {
        let (choice, function) = tool_choice_in(c)?;
        g.set_tool_choice(choice);
        g.tool_choice_function = function;
    }
    g.parallel_tool_calls = req.parallel_tool_calls;
    if req.logprobs {
        g.logprobs = true;
        g.top_logprobs = req.top_logprobs.unwrap_or(0);
    } else if req.top_logprobs.is_some_and(|n| n > 0) {
        return Err(ApiError::invalid(
            Some("top_logprobs"),
            "top_logprobs requires logprobs: true",
        ));
    }
    let n = req.common.n.unwrap_or(1);
    let (id, created, model) = (new_id("chatcmpl"), now_s(), st.svc.model_name().to_string());
    let streams = start_n(&st.svc, &g, n, &id, &caller)
        .await
        .map_err(|e| e.in_http_terms(&req.common))?;
    if !req.common.stream {
        let svc = st.svc.clone();
        let want_lp = req.logprobs;
        return whole(streams, &id, "chat.completion", created, &model, |i, r| {
            let mut message = json!({"role": "assistant", "content": r.text});
            if !r.reasoning.is_empty() {
                message["reasoning_content"] = json!(r.reasoning);
            }
            if !r.calls.is_empty() {
                if r.text.is_empty() {
                    message["content"] = Value::Null;
                }
                message["tool_calls"] = r
                    .calls
                    .iter()
                    .map(|c| {
                        json!({"id": c.id, "type": "function",
                            "function": {"name": c.name, "arguments": c.arguments}})
                    })
                    .collect();
            }
            json!({
                "index": i,
                "message": message,
                "logprobs": if want_lp { chat_logprobs(&svc, &r.logprobs) } else { Value::Null },
                "finish_reason": finish_str(r.finish),
            })
        })
        .await;
    }
    let include_usage = req
        .common
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let svc = st.svc.clone();
    let want_lp = req.logprobs;
    let chunk = chunker(id, "chat.completion.chunk", created, model);
    let c = chunk.clone();
    Ok(sse(merged(
        streams,
        chunk,
        include_usage,
        move |i, ev| match ev {
            Event::Started(_) => Some(c(
                json!([{"index": i, "delta": {"role": "assistant", "content": ""},
                "logprobs": null, "finish_reason": null}]),
                None,
            )),
            Event::Delta(d) => {
                let mut delta = serde_json::Map::new();
                if !d.reasoning_text.is_empty() {
                    delta.insert("reasoning_content".into(), json!(d.reasoning_text));
                }
                if !d.text.is_empty() {
                    delta.insert("content".into(), json!(d.text));
                }
                if !d.tool_calls.is_empty() {
                    let calls: Vec<Value> = d
                        .tool_calls
                        .iter()
                        .map(|c| {
                            let mut f = json!({"arguments": c.arguments});
                            let mut e = json!({"index": c.index});
                            // A call's first piece names it.
                            if !c.id.is_empty() {
                                f["name"] = json!(c.name);
                                e["id"] = json!(c.id);
                                e["type"] = json!("function");
                            }
                            e["function"] = f;
                            e
                        })
                        .collect();
                    delta.insert("tool_calls".into(), Value::Array(calls));
                }
                let lp = if want_lp && !d.logprobs.is_empty() {
                    chat_logprobs(&svc, &d.logprobs)
                } else {
                    Value::Null
                };
                if delta.is_empty() && lp.is_null() {
                    return None;
                }
                Some(c(
                    json!([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": null}]),
                    None,
                ))
            }
            Event::Finished(f) => Some(c(
                json!([{"index": i, "delta": {}, "logprobs": null,
                "finish_reason": finish_str(Some(f.reason()))}]),
                None,
            )),
        },
    )))
}

async fn completions(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Body(req): Body<CompletionRequest>,
) -> Result<Response, ApiError> {
    let caller = call_of(&headers);
    st.svc.authorize(caller.authorization.as_deref())?;
    if req.echo {
        return Err(ApiError::invalid(Some("echo"), "echo is not supported"));
    }
    let mut g = req.common.to_grpc(&st.svc)?;
    // OpenAI's default for completions is 16 tokens.
    if req.common.max_tokens.is_none() && req.common.max_completion_tokens.is_none() {
        g.max_tokens = 16;
    }
    g.input = Some(match req.prompt {
        PromptIn::Text(t) => generate_request::Input::Text(t),
        PromptIn::Ids(ids) => generate_request::Input::TokenIds(TokenIds { ids }),
        PromptIn::Texts(mut v) if v.len() == 1 => generate_request::Input::Text(v.remove(0)),
        PromptIn::Texts(_) => {
            return Err(ApiError::invalid(
                Some("prompt"),
                "one prompt per request (send a batch as separate requests)",
            ))
        }
    });
    if let Some(k) = req.logprobs {
        g.logprobs = true;
        g.top_logprobs = k;
    }
    let n = req.common.n.unwrap_or(1);
    let (id, created, model) = (new_id("cmpl"), now_s(), st.svc.model_name().to_string());
    let streams = start_n(&st.svc, &g, n, &id, &caller)
        .await
        .map_err(|e| e.in_http_terms(&req.common))?;
    let want_lp = req.logprobs.is_some();
    if !req.common.stream {
        let svc = st.svc.clone();
        return whole(streams, &id, "text_completion", created, &model, |i, r| {
            json!({
                "index": i,
                // A raw continuation: thinking, if any, is part of the text.
                "text": format!("{}{}", r.reasoning, r.text),
                "logprobs": if want_lp { completion_logprobs(&svc, &r.logprobs) } else { Value::Null },
                "finish_reason": finish_str(r.finish),
            })
        })
        .await;
    }
    let include_usage = req
        .common
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let svc = st.svc.clone();
    let chunk = chunker(id, "text_completion", created, model);
    let c = chunk.clone();
    Ok(sse(merged(
        streams,
        chunk,
        include_usage,
        move |i, ev| match ev {
            Event::Started(_) => None,
            Event::Delta(d) => {
                let text = format!("{}{}", d.reasoning_text, d.text);
                let lp = if want_lp && !d.logprobs.is_empty() {
                    completion_logprobs(&svc, &d.logprobs)
                } else {
                    Value::Null
                };
                if text.is_empty() && lp.is_null() {
                    return None;
                }
                Some(c(
                    json!([{"index": i, "text": text, "logprobs": lp, "finish_reason": null}]),
                    None,
                ))
            }
            Event::Finished(f) => Some(c(
                json!([{"index": i, "text": "", "logprobs": null,
                "finish_reason": finish_str(Some(f.reason()))}]),
                None,
            )),
        },
    )))
}

/// A whole (non-streaming) response: every choice gathered and formatted by `choice`, with
/// the usage summed over choices.
async fn whole(
    streams: Vec<EventStream>,
    id: &str,
    object: &str,
    created: u64,
    model: &str,
    mut choice: impl FnMut(usize, Gathered) -> Value,
) -> Result<Response, ApiError> {
    let mut choices = Vec::new();
    let (mut prompt, mut completion, mut reasoning) = (0, 0, 0);
    for (i, s) in streams.into_iter().enumerate() {
        let r = gather(s).await?;
        prompt = r.prompt_tokens;
        completion += r.completion_tokens;
        reasoning += r.reasoning_tokens;
        choices.push(choice(i, r));
    }
    Ok(axum::Json(json!({
        "id": id, "object": object, "created": created, "model": model,
        "choices": choices, "usage": usage(prompt, completion, reasoning),
    }))
    .into_response())
}

/// Builds one streamed chunk (`choices`, and `usage` on the last one when asked for).
fn chunker(
    id: String,
    object: &'static str,
    created: u64,
    model: String,
) -> impl Fn(Value, Option<Value>) -> Value + Clone + Send + 'static {
    move |choices, usage| {
        let mut c = json!({"id": id, "object": object, "created": created, "model": model,
            "choices": choices});
        if let Some(u) = usage {
            c["usage"] = u;
        }
        c
    }
}

/// Starts `n` generations of `g` (seeded ones get seeds `seed + i`, so the choices differ).
async fn start_n(
    svc: &InferenceService,
    g: &GenerateRequest,
    n: u32,
    id: &str,
    caller: &crate::api::Call,
) -> Result<Vec<EventStream>, ApiError> {
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n {
        let mut r = g.clone();
        // The response's id names the request (choice N of several: `ID-N`), so a stream
        // broken by a lost coordinator can be resumed over gRPC.
        r.request_id = if n == 1 {
            id.to_string()
        } else {
            format!("{id}-{i}")
        };
        if let Some(s) = r.sampling.as_mut().and_then(|s| s.seed.as_mut()) {
            *s = s.wrapping_add(i as u64);
        }
        out.push(start(svc, r, caller).await?);
    }
    Ok(out)
}

/// Interleaves the choices' event streams in arrival order as streamed chunks: each event is
/// formatted by `f` (choice index, event; `None` skips it), a choice's error is sent as an
/// OpenAI error body (and ends that choice), and after every choice has ended comes a chunk
/// with the usage totals when `include_usage` (prompt tokens; completion and reasoning
/// tokens summed over choices).
fn merged(
    streams: Vec<EventStream>,
    chunk: impl Fn(Value, Option<Value>) -> Value + Send + 'static,
    include_usage: bool,
    mut f: impl FnMut(usize, Event) -> Option<Value> + Send + 'static,
) -> impl tokio_stream::Stream<Item = Value> + Send + 'static {
    let mut all = tokio_stream::StreamMap::new();
    for (i, s) in streams.into_iter().enumerate() {
        all.insert(i, s);
    }
    // `None` marks the end of every choice.
    let items = all.map(Some).chain(tokio_stream::once(None));
    let mut totals = (0u32, 0u32, 0u32);
    items.filter_map(move |item| match item {
        Some((i, Ok(GenerateResponse { event: Some(e) }))) => {
            match &e {
                Event::Started(s) => totals.0 = s.prompt_tokens,
                Event::Finished(fin) => {
                    if let Some(u) = &fin.usage {
                        totals.1 += u.completion_tokens;
                        totals.2 += u.reasoning_tokens;
                    }
                }
                Event::Delta(_) => {}
            }
            f(i, e)
        }
        Some((_, Ok(_))) => None,
        Some((_, Err(s))) => Some(ApiError::from(s).body()),
        None if include_usage => Some(chunk(json!([]), Some(usage(totals.0, totals.1, totals.2)))),
        None => None,
    })
}
