//! Helpers shared by the CLI and cluster tests: fixture paths, the binary, child processes.
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// `switchyard bench-chaos ARGS --json` on a fixture model: its report (the run must
/// succeed, i.e. lose no request).
pub fn bench_chaos(model: &str, args: &[&str]) -> Value {
    let dir = fixture(model);
    let mut all = vec!["bench-chaos", "--model", dir.to_str().unwrap(), "--json"];
    all.extend(args);
    let out = switchyard(&all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs the `switchyard` binary to completion.
pub fn switchyard(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .output()
        .unwrap()
}

pub fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// A child process killed when the test ends, however it ends.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `switchyard ARGS`, waits for its first stdout line and returns the process and the
/// URL that line announces (`... grpc=URL ...`).
pub fn spawn_serving(args: &[&str]) -> (Proc, String) {
    let (p, line) = spawn_announcing(args);
    let url = announced(&line, "grpc");
    (p, url)
}

/// The `KEY=VALUE` word of an announcement line.
pub fn announced(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|w| w.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .to_string()
}

/// Plain HTTP/1.0 GET of `url`: the status code and the body.
pub fn http_status(url: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    http_exchange(
        host,
        &format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n"),
    )
}

/// Plain HTTP/1.0 POST of a JSON `body` to `base` (http://HOST:PORT) + `path`: the status
/// code and the body.
pub fn http_post(base: &str, path: &str, body: &str) -> (u16, String) {
    let host = base.strip_prefix("http://").unwrap();
    http_exchange(
        host,
        &format!(
            "POST {path} HTTP/1.0\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// Sends `request` to `host` and reads the whole response: status code (0 if none) and body.
fn http_exchange(host: &str, request: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(host).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (code, body)
}

/// Plain HTTP/1.0 GET of `url` (http://HOST:PORT/PATH); the response body.
pub fn http_get(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = std::net::TcpStream::connect(host).unwrap();
    write!(s, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(
        resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200"),
        "{resp}"
    );
    resp.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// Starts `switchyard ARGS` and returns the process and its first stdout line.
pub fn spawn_announcing(args: &[&str]) -> (Proc, String) {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (Proc(child), line)
}

/// A free TCP port on loopback (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real single-node etcd server on free loopback ports, with its data in a fresh directory;
/// killed and removed when dropped. Needs `etcd` on PATH (the README's test command installs
/// Debian's etcd-server).
/// Where a test etcd keeps its data: in memory where there is a tmpfs (its fsyncs on a busy
/// disk stall start-up and lease renewals), else the temporary directory.
fn scratch() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

pub struct Etcd {
    _proc: Proc,
    dir: PathBuf,
    pub url: String,
    args: Vec<String>,
    /// The plain-HTTP port that answers /health (the client port, or the metrics port when
    /// clients speak TLS).
    client_port: u16,
}

impl Etcd {
    /// A server that speaks TLS to clients and requires a client certificate signed by the
    /// same CA: `certs` holds ca.crt, server.crt and server.key.
    pub fn start_tls(certs: &Path) -> Etcd {
        let (client, peer, metrics) = (free_port(), free_port(), free_port());
        let dir = scratch().join(format!("switchyard-etcd-{}-{client}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let url = format!("https://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let f = |n: &str| certs.join(n).to_str().unwrap().to_string();
        let args: Vec<String> = vec![
            "--name".into(),
            "test".into(),
            "--data-dir".into(),
            dir.to_str().unwrap().into(),
            "--listen-client-urls".into(),
            url.clone(),
            "--advertise-client-urls".into(),
            url.clone(),
            "--listen-peer-urls".into(),
            peer_url.clone(),
            "--initial-advertise-peer-urls".into(),
            peer_url.clone(),
            "--initial-cluster".into(),
            format!("test={peer_url}"),
            "--listen-metrics-urls".into(),
            format!("http://127.0.0.1:{metrics}"),
            "--cert-file".into(),
            f("server.crt"),
            "--key-file".into(),
            f("server.key"),
            "--trusted-ca-file".into(),
            f("ca.crt"),
            "--client-cert-auth".into(),
            "--log-level".into(),
            "error".into(),
        ];
        let etcd = Etcd {
            _proc: Self::spawn(&args),
            dir,
            url,
            args,
            client_port: metrics,
        };
        etcd.wait_healthy();
        etcd
    }

    pub fn start() -> Etcd {
        let (client, peer) = (free_port(), free_port());
        let dir = scratch().join(format!("switchyard-etcd-{}-{client}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let args: Vec<String> = [
            "--name",
            "test",
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &format!("test={peer_url}"),
            "--log-level",
            "error",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let etcd = Etcd {
            _proc: Self::spawn(&args),
            dir,
            url,
            args,
            client_port: client,
        };
        etcd.wait_healthy();
        etcd
    }

    fn spawn(args: &[String]) -> Proc {
        Proc(
            Command::new("etcd")
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("etcd on PATH (scripts/ensure-deps.sh installs etcd-server)"),
        )
    }

    /// The server's process id (to freeze it with SIGSTOP).
    pub fn pid(&self) -> u32 {
        self._proc.0.id()
    }

    /// Kills the server (SIGKILL: no goodbye to clients); its data stays.
    pub fn stop(&mut self) {
        let _ = self._proc.0.kill();
        let _ = self._proc.0.wait();
    }

    /// Starts the server again on the same ports and data.
    pub fn restart(&mut self) {
        self._proc = Self::spawn(&self.args);
        self.wait_healthy();
    }

    fn wait_healthy(&self) {
        let client = self.client_port;
        // Ready once its client port answers /health (it can take seconds while other tests
        // load models on the same cores).
        for _ in 0..600 {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", client)) {
                use std::io::{Read, Write};
                let _ = s.write_all(b"GET /health HTTP/1.0\r\n\r\n");
                let mut body = String::new();
                let _ = s.read_to_string(&mut body);
                if body.contains("\"health\":\"true\"") {
                    return;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("etcd did not become healthy at {}", self.url);
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self._proc.0.kill();
        let _ = self._proc.0.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Streams one greedy generation of `prompt_ids` (token ids in, token ids out).
pub async fn generate_ids(url: &str, prompt_ids: Vec<u32>, max_tokens: u32) -> Vec<u32> {
    use switchyard_proto::v1::generate_response::Event;
    use switchyard_proto::v1::inference_client::InferenceClient;
    use switchyard_proto::v1::*;
    let mut c = InferenceClient::connect(url.to_string()).await.unwrap();
    let mut s = c
        .generate(GenerateRequest {
            input: Some(generate_request::Input::TokenIds(TokenIds {
                ids: prompt_ids,
            })),
            max_tokens,
            ignore_eos: true,
            stream_token_ids: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    let mut finished = false;
    while let Some(m) = s.message().await.unwrap() {
        match m.event {
            Some(Event::Delta(d)) => out.extend(d.token_ids),
            Some(Event::Finished(_)) => finished = true,
            _ => {}
        }
    }
    assert!(finished, "stream ended without Finished");
    out
}

/// Every golden prompt of the fixture `model`, all in flight at once (`copies` times each),
/// streams exactly the transformers greedy tokens.
pub async fn assert_goldens(url: &str, model: &str, copies: usize) {
    GoldenStreams::start(url, model, copies).finish().await
}

/// Runs a future to completion on a fresh multi-threaded runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// ClusterStatus of the coordinator at `url`.
pub async fn cluster_status(url: &str) -> switchyard_proto::v1::ClusterStatusResponse {
    switchyard_proto::v1::inference_client::InferenceClient::connect(url.to_string())
        .await
        .unwrap()
        .cluster_status(switchyard_proto::v1::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// `copies` of every golden prompt of a fixture model streaming at once; each task checks that
/// its stream ends with `Finished(LENGTH)` after exactly the transformers greedy tokens.
/// A Generate stream read plainly, or resuming across a lost coordinator.
pub enum Resumable {
    Plain(tonic::Streaming<switchyard_proto::v1::GenerateResponse>),
    Resuming(Box<switchyard_proto::resume::Resuming>),
}

impl Resumable {
    pub async fn message(
        &mut self,
    ) -> Result<Option<switchyard_proto::v1::GenerateResponse>, tonic::Status> {
        match self {
            Resumable::Plain(s) => s.message().await,
            Resumable::Resuming(s) => s.message().await,
        }
    }
}

/// `s` resuming through whichever coordinators `endpoints` lists when it breaks (one slot
/// per possible coordinator: a leader and one standby).
pub fn resuming(
    s: tonic::Streaming<switchyard_proto::v1::GenerateResponse>,
    request: switchyard_proto::v1::GenerateRequest,
    endpoints: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) -> switchyard_proto::resume::Resuming {
    use switchyard_proto::v1::inference_client::InferenceClient;
    let f: switchyard_proto::resume::ReattachFn = Box::new(move |i, req| {
        let url = endpoints.lock().unwrap().get(i).cloned();
        Box::pin(async move {
            let url = url.ok_or_else(|| tonic::Status::unavailable("not up yet"))?;
            let mut c = InferenceClient::connect(url)
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            switchyard_proto::resume::call(&mut c, req).await
        })
    });
    switchyard_proto::resume::Resuming::new(s, request, 2, f, std::time::Duration::from_secs(60))
}

pub struct GoldenStreams {
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Streams that have received their first token / have ended.
    pub started: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub done: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Resuming streams ask for logprobs: each finished one's (prompt index, token logprobs).
    pub logprobs: std::sync::Arc<std::sync::Mutex<Vec<(usize, Vec<f32>)>>>,
    model: String,
}

impl GoldenStreams {
    /// Starts the streams (inside a runtime).
    pub fn start(url: &str, model: &str, copies: usize) -> GoldenStreams {
        Self::start_with(url, model, copies, None)
    }

    /// As [`start`](Self::start), each stream resuming (`switchyard_proto::resume`) across a
    /// lost coordinator through the endpoints listed in `endpoints` when it is taken up.
    pub fn start_resuming(
        url: &str,
        model: &str,
        copies: usize,
        endpoints: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    ) -> GoldenStreams {
        Self::start_with(url, model, copies, Some(endpoints))
    }

    fn start_with(
        url: &str,
        model: &str,
        copies: usize,
        resume: Option<std::sync::Arc<std::sync::Mutex<Vec<String>>>>,
    ) -> GoldenStreams {
        use std::sync::atomic::Ordering;
        use switchyard_proto::v1::generate_response::Event;
        use switchyard_proto::v1::*;
        let golden: Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(model).join("golden.json")).unwrap(),
        )
        .unwrap();
        let started = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let logprobs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for copy in 0..copies {
            for (index, p) in golden["prompts"].as_array().unwrap().iter().enumerate() {
                let prompt: Vec<u32> = ids(&p["input_ids"]).iter().map(|&x| x as u32).collect();
                let want: Vec<u32> = ids(&p["greedy"]["new_ids"])
                    .iter()
                    .map(|&x| x as u32)
                    .collect();
                let name = format!("{}#{copy}", p["name"].as_str().unwrap());
                let (url, started, done) = (url.to_string(), started.clone(), done.clone());
                let (resume, scores) = (resume.clone(), logprobs.clone());
                tasks.push(tokio::spawn(async move {
                    let mut c = inference_client::InferenceClient::connect(url)
                        .await
                        .unwrap();
                    let req = GenerateRequest {
                        input: Some(generate_request::Input::TokenIds(TokenIds { ids: prompt })),
                        max_tokens: want.len() as u32,
                        ignore_eos: true,
                        stream_token_ids: true,
                        logprobs: resume.is_some(),
                        top_logprobs: if resume.is_some() { 2 } else { 0 },
                        ..Default::default()
                    };
                    let s = c
                        .generate(req.clone())
                        .await
                        .unwrap_or_else(|s| panic!("{name}: {s}"))
                        .into_inner();
                    let mut s = match resume {
                        None => Resumable::Plain(s),
                        Some(eps) => Resumable::Resuming(Box::new(resuming(s, req, eps))),
                    };
                    let (mut got, mut fin, mut lps) = (Vec::new(), None, Vec::new());
                    while let Some(msg) =
                        s.message().await.unwrap_or_else(|s| panic!("{name}: {s}"))
                    {
                        match msg.event {
                            Some(Event::Delta(d)) => {
                                if got.is_empty() && !d.token_ids.is_empty() {
                                    started.fetch_add(1, Ordering::SeqCst);
                                }
                                got.extend(d.token_ids);
                                for l in d.logprobs {
                                    assert_eq!(l.top.len(), 2, "{name}: {l:?}");
                                    lps.push(l.logprob);
                                }
                            }
                            Some(Event::Finished(f)) => fin = Some(f.reason()),
                            _ => {}
                        }
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                    assert_eq!(fin, Some(FinishReason::Length), "{name}");
                    assert_eq!(got, want, "{name}");
                    if !lps.is_empty() {
                        assert_eq!(lps.len(), want.len(), "{name}: a logprob per token");
                        scores.lock().unwrap().push((index, lps));
                    }
                }));
            }
        }
        GoldenStreams {
            tasks,
            started,
            done,
            logprobs,
            model: model.to_string(),
        }
    }

    /// [`finish`](Self::finish), then each resumed stream's logprobs against the same prompt's
    /// run alone on `url` (within 1e-4: a different batch rounds differently).
    pub async fn finish_with_logprobs(self, url: &str) {
        use switchyard_proto::v1::generate_response::Event;
        use switchyard_proto::v1::*;
        let (logprobs, model) = (self.logprobs.clone(), self.model.clone());
        self.finish().await;
        let golden: Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(&model).join("golden.json")).unwrap(),
        )
        .unwrap();
        let mut c = inference_client::InferenceClient::connect(url.to_string())
            .await
            .unwrap();
        let got = logprobs.lock().unwrap().clone();
        assert!(!got.is_empty(), "no stream recorded logprobs");
        for (index, p) in golden["prompts"].as_array().unwrap().iter().enumerate() {
            let prompt: Vec<u32> = ids(&p["input_ids"]).iter().map(|&x| x as u32).collect();
            let n = ids(&p["greedy"]["new_ids"]).len() as u32;
            let mut s = c
                .generate(GenerateRequest {
                    input: Some(generate_request::Input::TokenIds(TokenIds { ids: prompt })),
                    max_tokens: n,
                    ignore_eos: true,
                    logprobs: true,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let mut want = Vec::new();
            while let Some(m) = s.message().await.unwrap() {
                if let Some(Event::Delta(d)) = m.event {
                    want.extend(d.logprobs.iter().map(|l| l.logprob));
                }
            }
            for (_, lps) in got.iter().filter(|(i, _)| *i == index) {
                let worst = lps
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    lps.len() == want.len() && worst < 1e-4,
                    "prompt {index}: logprobs differ by {worst}\n{lps:?}\n{want:?}"
                );
            }
        }
    }

    pub fn total(&self) -> usize {
        self.tasks.len()
    }

    /// Waits until `n` streams have their first token.
    pub async fn wait_started(&self, n: usize) {
        while self.started.load(std::sync::atomic::Ordering::SeqCst) < n {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Streams not yet ended.
    pub fn in_flight(&self) -> usize {
        self.total() - self.done.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits for every stream; panics with the first failure.
    pub async fn finish(self) {
        for t in self.tasks {
            t.await.unwrap();
        }
    }
}

/// Admin.Status of the coordinator at `url`.
pub async fn admin_status(url: &str) -> switchyard_proto::v1::ClusterStatusResponse {
    switchyard_proto::v1::admin_client::AdminClient::connect(url.to_string())
        .await
        .unwrap()
        .status(switchyard_proto::v1::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// The Python the cross-language tests run: `$SWITCHYARD_PYTHON`, else the venv that
/// `scripts/ensure-deps.sh test` creates; panics (with what to do) unless it can import
/// `modules` (comma-separated).
pub fn python(modules: &str) -> PathBuf {
    let p = std::env::var_os("SWITCHYARD_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/switchyard/venv/bin/python")
        });
    let ok = Command::new(&p)
        .args(["-c", &format!("import {modules}")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{} cannot import {modules}: run scripts/ensure-deps.sh test or set SWITCHYARD_PYTHON",
        p.display()
    );
    p
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl.
pub fn certificates(dir: &std::path::Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let sh = |cmd: &str| {
        let o = std::process::Command::new("sh")
            .args(["-c", cmd])
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=sy-test-ca");
    for (name, ext) in [
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        sh(&format!(
            "openssl req -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr -subj /CN={name} \
             && printf '{ext}\\n' > {name}.ext \
             && openssl x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
                -out {name}.crt -days 2 -extfile {name}.ext"
        ));
    }
}
