//! switchyard-loadtest against a real local cluster (`switchyard up`, tiny fixture model):
//! every metric of the summary is recomputed here from the per-request JSONL; token counts
//! equal what the server reported; a Poisson run's arrival rate is within statistical bounds
//! of its target; a breached threshold exits with code 3.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn loadtest() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_switchyard-loadtest"))
}

/// `switchyard`, built beside this crate's binary by the workspace build.
fn switchyard() -> PathBuf {
    let p = loadtest().with_file_name("switchyard");
    assert!(
        p.exists(),
        "{} not found: build the workspace (cargo test --workspace builds it)",
        p.display()
    );
    p
}

/// The process and its announcement line.
fn serving_line(cmd: &mut Command) -> (Proc, String) {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (Proc(child), line)
}

fn serving(cmd: &mut Command) -> (Proc, String) {
    let (p, line) = serving_line(cmd);
    let url = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .unwrap_or_else(|| panic!("no grpc= in {line:?}"))
        .to_string();
    (p, url)
}

fn cluster() -> (Proc, String) {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-qwen3-moe");
    serving(Command::new(switchyard()).args([
        "up",
        "--model",
        model.to_str().unwrap(),
        "--workers",
        "1",
        "--grpc-addr",
        "127.0.0.1:0",
    ]))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sy-loadtest-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn lt(args: &[&str]) -> std::process::Output {
    Command::new(loadtest()).args(args).output().unwrap()
}

/// Nearest-rank percentile, as documented.
fn pct(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).max(1);
    v[rank - 1]
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

#[test]
fn poisson_run_summary_recomputes_from_the_jsonl() {
    let (_up, url) = cluster();
    let out = tmp("poisson");
    let (rate, secs) = (40.0, 5.0);
    let o = lt(&[
        "run",
        "--endpoint",
        &url,
        "--rate",
        "40",
        "--arrival",
        "poisson",
        "--duration",
        "5s",
        "--input-len",
        "uniform:4-24",
        "--output-len",
        "uniform:2-10",
        "--seed",
        "11",
        "--cancel-fraction",
        "0.1",
        "--cancel-after",
        "2",
        "--warmup",
        "1s",
        "--quiet",
        "--goodput",
        "ttft=10s",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let recs: Vec<Value> = std::fs::read_to_string(out.join("requests.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap();
    // Arrivals: all sends over the whole run, against the target (Poisson: sd = sqrt(λT)).
    let expect = rate * secs;
    let n = recs.len() as f64;
    assert!(
        (n - expect).abs() <= 4.0 * expect.sqrt(),
        "{n} sends for an expected {expect}"
    );
    // The window.
    let (w0, w1) = (f(&s, "window_start_s"), f(&s, "window_end_s"));
    assert_eq!(w0, 1.0);
    let win: Vec<&Value> = recs
        .iter()
        .filter(|r| r["in_window"].as_bool().unwrap())
        .collect();
    for r in &recs {
        let sent = f(r, "sent_s");
        assert_eq!(r["in_window"].as_bool().unwrap(), sent >= w0 && sent < w1);
    }
    let ok: Vec<&Value> = win
        .iter()
        .copied()
        .filter(|r| r["status"] == "ok")
        .collect();
    assert_eq!(s["requests"].as_u64().unwrap() as usize, win.len());
    assert_eq!(s["ok"].as_u64().unwrap() as usize, ok.len());
    let cancelled = win.iter().filter(|r| r["status"] == "cancelled").count();
    assert!(
        cancelled > 0 && ok.len() + cancelled == win.len(),
        "statuses: {}",
        s["by_status"]
    );
    // Token counts: stream == server usage == what was asked (EOS ignored).
    for r in &ok {
        let got = r["output_tokens"].as_u64().unwrap();
        assert_eq!(Some(got), r["server_completion_tokens"].as_u64());
        assert_eq!(got, r["max_tokens"].as_u64().unwrap());
    }
    for r in win.iter().filter(|r| r["status"] == "cancelled") {
        assert!(r["output_tokens"].as_u64().unwrap() >= 2);
    }
    // Throughput.
    let wlen = w1 - w0;
    let tokens: f64 = ok.iter().map(|r| f(r, "output_tokens")).sum();
    assert!(close(f(&s, "output_tokens_per_s"), tokens / wlen));
    assert!(close(f(&s, "requests_per_s"), ok.len() as f64 / wlen));
    assert!(close(f(&s, "measured_rate"), win.len() as f64 / wlen));
    let good = ok.iter().filter(|r| f(r, "ttft_s") <= 10.0).count();
    assert!(close(f(&s, "goodput_per_s"), good as f64 / wlen));
    // Latencies, exact percentiles.
    let ttft: Vec<f64> = ok.iter().map(|r| f(r, "ttft_s")).collect();
    let e2e: Vec<f64> = ok.iter().map(|r| f(r, "end_s") - f(r, "sent_s")).collect();
    let lag: Vec<f64> = win
        .iter()
        .map(|r| f(r, "sent_s") - f(r, "scheduled_s"))
        .collect();
    let mut itl = Vec::new();
    let mut tpot = Vec::new();
    for r in &ok {
        let gaps: Vec<f64> = r["message_gaps_s"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let toks: Vec<u64> = r["message_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        for (g, k) in gaps.iter().zip(&toks[1..]) {
            for _ in 0..*k {
                itl.push(g / *k as f64);
            }
        }
        let n = r["output_tokens"].as_u64().unwrap();
        if n >= 2 {
            tpot.push((f(r, "last_token_s") - f(r, "first_token_s")) / (n - 1) as f64);
        }
    }
    for (name, v) in [
        ("ttft", ttft),
        ("e2e", e2e),
        ("schedule_lag", lag),
        ("itl_token", itl),
        ("tpot", tpot),
    ] {
        let st = &s[name];
        assert_eq!(st["count"].as_u64().unwrap() as usize, v.len(), "{name}");
        for (k, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)] {
            assert!(
                close(f(st, k), pct(v.clone(), q)),
                "{name} {k}: {} vs {}",
                st[k],
                pct(v.clone(), q)
            );
        }
    }
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("TTFT"));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn thresholds_gate_with_exit_code_3_and_compare_reads_two_runs() {
    let (_up, url) = cluster();
    let (a, b) = (tmp("gate-a"), tmp("gate-b"));
    let run = |out: &Path, gate: &str| {
        lt(&[
            "run",
            "--endpoint",
            &url,
            "--concurrency",
            "2",
            "--requests",
            "6",
            "--input-len",
            "8",
            "--output-len",
            "4",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
            "--fail-if",
            gate,
        ])
    };
    let o = run(&a, "ttft_p99>1us");
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("threshold breached: ttft_p99"));
    let o = run(&b, "ttft_p99>60s,error_rate>0");
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = lt(&[
        "compare",
        a.join("summary.json").to_str().unwrap(),
        b.join("summary.json").to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("ttft_p99") && text.contains('%'), "{text}");
    // Bad arguments: exit 2 with a message.
    let o = lt(&[
        "run",
        "--endpoint",
        &url,
        "--rate",
        "-1",
        "--duration",
        "1s",
        "--out",
        "/tmp/x",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let _ = (std::fs::remove_dir_all(&a), std::fs::remove_dir_all(&b));
}

#[test]
fn the_openai_http_api_is_driven_with_the_same_accounting() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-qwen3-moe");
    let (_up, line) = serving_line(Command::new(switchyard()).args([
        "up",
        "--model",
        model.to_str().unwrap(),
        "--workers",
        "1",
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ]));
    let http = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http="))
        .unwrap_or_else(|| panic!("no http= in {line:?}"))
        .to_string();
    for chat in [false, true] {
        let out = tmp(if chat { "openai-chat" } else { "openai" });
        let mut args = vec![
            "run",
            "--api",
            "openai",
            "--endpoint",
            &http,
            "--concurrency",
            "3",
            "--requests",
            "12",
            "--input-len",
            "uniform:4-12",
            "--output-len",
            "uniform:3-7",
            "--token-range",
            "10-200",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ];
        if chat {
            args.push("--chat");
        }
        let o = lt(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let s: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap())
                .unwrap();
        assert_eq!(
            s["ok"].as_u64(),
            Some(12),
            "chat={chat}: {}",
            s["by_status"]
        );
        for l in std::fs::read_to_string(out.join("requests.jsonl"))
            .unwrap()
            .lines()
        {
            let r: Value = serde_json::from_str(l).unwrap();
            // Tokens counted from the streamed logprobs == the usage chunk == what was asked.
            let got = r["output_tokens"].as_u64().unwrap();
            assert_eq!(Some(got), r["server_completion_tokens"].as_u64(), "{r}");
            assert_eq!(got, r["max_tokens"].as_u64().unwrap(), "{r}");
            assert!(r["ttft_s"].as_f64().unwrap() > 0.0);
        }
        let _ = std::fs::remove_dir_all(&out);
    }
}
