//! The command line: `run`, `sweep`, `compare`, `serve-echo`.

use crate::client::{run, RunOptions};
use crate::metrics::{parse_seconds, Record, Slos, Summary, Threshold};
use crate::report::{run_report, sweep_report, SweepPoint};
use crate::workload::{Dist, Prompts, Shape, TraceLine};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "switchyard-loadtest",
    version,
    about = "Capacity testing for Switchyard clusters"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// One load test: writes summary.json, requests.jsonl and report.html to --out.
    Run(RunArgs),
    /// The highest rate that holds the SLOs (search over rates, with repeats).
    Sweep(SweepArgs),
    /// The change in every metric between two summary.json files.
    Compare { a: PathBuf, b: PathBuf },
    /// A trivial endpoint (no model) to measure this tool's own headroom.
    ServeEcho {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Most tokens streamed per request.
        #[arg(long, default_value_t = 64)]
        tokens: u32,
    },
}

fn secs(s: &str) -> Result<Duration, String> {
    parse_seconds(s).map(Duration::from_secs_f64)
}

#[derive(Args, Debug, Clone)]
pub struct Load {
    /// gRPC endpoint (http://127.0.0.1:50051), or with `--api openai` the HTTP base URL
    /// (http://127.0.0.1:8080).
    #[arg(long)]
    pub endpoint: String,
    /// grpc (`switchyard.v1.Generate`) or openai (`/v1/completions`, `/v1/chat/completions`
    /// with `--chat`; streamed SSE, tokens counted from the streamed logprobs).
    #[arg(long, default_value = "grpc", value_parser = ["grpc", "openai"])]
    pub api: String,
    /// HTTP/2 connections to spread the streams over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Input (prompt) length: N, fixed:N, uniform:A-B, normal:MEAN,STD, hist:LEN=W,...
    #[arg(long, default_value = "uniform:32-128")]
    pub input_len: Dist,
    /// Output length (the server is asked to ignore end-of-sequence, so it is exact).
    #[arg(long, default_value = "uniform:16-64")]
    pub output_len: Dist,
    /// Prompts fill the model's context (less the output): the long-context scenario.
    #[arg(long)]
    pub long_context: bool,
    /// Every prompt starts with the same N tokens (the shared-prefix scenario).
    #[arg(long, default_value_t = 0)]
    pub shared_prefix: u32,
    /// With --shared-prefix: that many different prefixes, one drawn at random per request
    /// (several system prompts; what cache-aware homing is for).
    #[arg(long, default_value_t = 1)]
    pub prefix_groups: u32,
    /// Send chat messages of random words instead of token ids.
    #[arg(long)]
    pub chat: bool,
    /// Token ids are drawn from LO-HI (default: 10 to the model's vocabulary).
    #[arg(long)]
    pub token_range: Option<String>,
    /// Fraction of requests that hang up mid-stream...
    #[arg(long, default_value_t = 0.0)]
    pub cancel_fraction: f64,
    /// ...after this many tokens.
    #[arg(long, default_value_t = 4)]
    pub cancel_after: u32,
    /// A per-request deadline (client side), e.g. 30s.
    #[arg(long, value_parser = secs)]
    pub deadline: Option<Duration>,
    /// Excluded from the results at the start...
    #[arg(long, value_parser = secs, default_value = "0s")]
    pub warmup: Duration,
    /// ...and before the end of sending.
    #[arg(long, value_parser = secs, default_value = "0s")]
    pub cooldown: Duration,
    /// Per-request SLOs for goodput: ttft=2s,tpot=100ms,itl=500ms,e2e=30s.
    #[arg(long, default_value = "")]
    pub goodput: Slos,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// No live progress line.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub load: Load,
    /// Closed loop: N clients, each sending when its last request ends.
    #[arg(long, conflicts_with_all = ["rate", "burst", "ramp", "trace"])]
    pub concurrency: Option<usize>,
    /// Open loop at R requests/s.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Arrivals of the open loop: poisson or constant.
    #[arg(long, default_value = "poisson")]
    pub arrival: String,
    /// Bursts: N requests at once every --burst-every.
    #[arg(long)]
    pub burst: Option<usize>,
    #[arg(long, value_parser = secs, default_value = "1s")]
    pub burst_every: Duration,
    /// A stepped ramp of rates, e.g. 5,10,20, each held --ramp-step.
    #[arg(long, value_delimiter = ',')]
    pub ramp: Option<Vec<f64>>,
    #[arg(long, value_parser = secs, default_value = "10s")]
    pub ramp_step: Duration,
    /// Replay a JSONL trace: {"timestamp": s, "input_len": n | "text": "...", "output_len": n}.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Stop sending after this long (e.g. 30s)...
    #[arg(long, value_parser = secs)]
    pub duration: Option<Duration>,
    /// ...or after this many requests.
    #[arg(long)]
    pub requests: Option<usize>,
    /// Where summary.json, requests.jsonl and report.html go.
    #[arg(long)]
    pub out: PathBuf,
    /// Exit with code 3 when a threshold is breached: ttft_p99>2s, error_rate>0.01, ...
    #[arg(long = "fail-if", value_delimiter = ',')]
    pub fail_if: Vec<Threshold>,
}

#[derive(Args, Debug)]
pub struct SweepArgs {
    #[command(flatten)]
    pub load: Load,
    /// Aggregate SLOs a rate must hold: ttft_p99=2s,itl_p99=200ms (any summary metric).
    #[arg(long)]
    pub slo: String,
    /// Largest error rate a passing rate may have.
    #[arg(long, default_value_t = 0.0)]
    pub max_error_rate: f64,
    #[arg(long, default_value_t = 1.0)]
    pub start_rate: f64,
    #[arg(long, default_value_t = 10000.0)]
    pub max_rate: f64,
    /// Bisection steps after the doubling phase.
    #[arg(long, default_value_t = 4)]
    pub iterations: usize,
    /// Runs per rate (all must pass).
    #[arg(long, default_value_t = 2)]
    pub repeats: usize,
    /// Length of each run.
    #[arg(long, value_parser = secs, default_value = "10s")]
    pub duration: Duration,
    #[arg(long)]
    pub out: PathBuf,
}

fn prompts(l: &Load) -> Result<Prompts> {
    let token_range = match &l.token_range {
        None => (10, 0),
        Some(s) => {
            let (a, b) = s.split_once('-').context("--token-range: expected LO-HI")?;
            (a.trim().parse()?, b.trim().parse()?)
        }
    };
    if !(0.0..=1.0).contains(&l.cancel_fraction) {
        bail!("--cancel-fraction must be in [0, 1]");
    }
    Ok(Prompts {
        input: l.input_len.clone(),
        output: l.output_len.clone(),
        token_range,
        shared_prefix: l.shared_prefix,
        prefix_groups: l.prefix_groups,
        chat: l.chat,
        cancel_fraction: l.cancel_fraction,
        cancel_after: l.cancel_after.max(1),
    })
}

fn options(
    l: &Load,
    shape: Shape,
    duration: Option<Duration>,
    requests: Option<usize>,
) -> Result<RunOptions> {
    Ok(RunOptions {
        endpoint: l.endpoint.clone(),
        api: if l.api == "openai" {
            crate::client::Api::OpenAi
        } else {
            crate::client::Api::Grpc
        },
        connections: l.connections.max(1),
        shape,
        duration,
        requests,
        warmup: l.warmup,
        cooldown: l.cooldown,
        deadline: l.deadline,
        prompts: prompts(l)?,
        long_context: l.long_context,
        seed: l.seed,
        slos: l.goodput.clone(),
        progress: !l.quiet,
        trace: Vec::new(),
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

pub fn main_with(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Run(a) => run_cmd(a),
        Command::Sweep(a) => sweep_cmd(a),
        Command::Compare { a, b } => compare_cmd(&a, &b),
        Command::ServeEcho { listen, tokens } => {
            runtime()?.block_on(crate::echo::serve(
                &listen,
                crate::echo::Echo {
                    max_tokens: tokens.max(1),
                    vocab: 1000,
                },
            ))?;
            Ok(0)
        }
    }
}

fn write_outputs(out: &Path, title: &str, records: &[Record], s: &Summary) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("--out {}", out.display()))?;
    std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(s)?)?;
    let mut jl = String::new();
    for r in records {
        jl += &serde_json::to_string(r)?;
        jl.push('\n');
    }
    std::fs::write(out.join("requests.jsonl"), jl)?;
    std::fs::write(out.join("report.html"), run_report(title, s, records))?;
    Ok(())
}

fn print_summary(s: &Summary) {
    println!(
        "window {:.1} s: {} requests, {} ok, error rate {:.4}, {:.2} req/s, {:.1} output tok/s, goodput {:.2} req/s, sends {:.2}/s",
        s.window_s, s.requests, s.ok, s.error_rate, s.requests_per_s, s.output_tokens_per_s,
        s.goodput_per_s, s.measured_rate
    );
    println!(
        "{:<16}{:>8}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}",
        "ms", "count", "p50", "p90", "p95", "p99", "p99.9", "max"
    );
    for (n, st) in [
        ("TTFT", &s.ttft),
        ("TTFA", &s.ttfa),
        ("ITL/token", &s.itl_token),
        ("ITL/message", &s.itl_message),
        ("TPOT", &s.tpot),
        ("E2E", &s.e2e),
        ("schedule lag", &s.schedule_lag),
    ] {
        println!(
            "{n:<16}{:>8}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>10.2}",
            st.count,
            st.p50 * 1e3,
            st.p90 * 1e3,
            st.p95 * 1e3,
            st.p99 * 1e3,
            st.p999 * 1e3,
            st.max * 1e3
        );
    }
    for (k, v) in &s.by_status {
        println!("status {k}: {v}");
    }
}

fn run_cmd(a: RunArgs) -> Result<u8> {
    let shape = if let Some(n) = a.concurrency {
        if n == 0 {
            bail!("--concurrency must be at least 1");
        }
        Shape::Concurrency(n)
    } else if let Some(r) = a.rate {
        if !(r > 0.0) {
            bail!("--rate must be positive");
        }
        let poisson = match a.arrival.as_str() {
            "poisson" => true,
            "constant" => false,
            other => bail!("--arrival {other:?}: poisson or constant"),
        };
        Shape::Rate { rate: r, poisson }
    } else if let Some(n) = a.burst {
        Shape::Burst {
            size: n.max(1),
            every: a.burst_every,
        }
    } else if let Some(r) = &a.ramp {
        if r.iter().any(|x| !(*x > 0.0)) {
            bail!("--ramp rates must be positive");
        }
        Shape::Ramp {
            rates: r.clone(),
            step: a.ramp_step,
        }
    } else if a.trace.is_some() {
        Shape::Trace
    } else {
        bail!("give a load shape: --concurrency, --rate, --burst, --ramp or --trace");
    };
    if a.duration.is_none() && a.requests.is_none() && !matches!(shape, Shape::Trace) {
        bail!("give --duration or --requests");
    }
    let duration = match (&shape, a.duration) {
        (Shape::Ramp { rates, step }, None) => Some(*step * rates.len() as u32),
        (_, d) => d,
    };
    let mut o = options(&a.load, shape, duration, a.requests)?;
    if let Some(t) = &a.trace {
        let text =
            std::fs::read_to_string(t).with_context(|| format!("--trace {}", t.display()))?;
        for (i, l) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let line: TraceLine =
                serde_json::from_str(l).with_context(|| format!("--trace line {}", i + 1))?;
            o.trace.push(line);
        }
    }
    let (records, s, facts) = runtime()?.block_on(run(&o))?;
    write_outputs(
        &a.out,
        &format!("switchyard-loadtest: {}", facts.name),
        &records,
        &s,
    )?;
    print_summary(&s);
    let breaches: Vec<String> = a.fail_if.iter().filter_map(|t| t.breached(&s)).collect();
    for b in &breaches {
        eprintln!("threshold breached: {b}");
    }
    Ok(if breaches.is_empty() { 0 } else { 3 })
}

fn sweep_cmd(a: SweepArgs) -> Result<u8> {
    let slos: Vec<Threshold> = a
        .slo
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| p.replacen('=', "<=", 1))
        .map(|p| {
            let (m, v) = p.split_once("<=").expect("inserted above");
            // A rate passes when metric <= value: breached when above.
            format!("{m}>{v}")
                .parse::<Threshold>()
                .map_err(anyhow::Error::msg)
        })
        .collect::<Result<_>>()?;
    if slos.is_empty() {
        bail!("--slo: give at least one, e.g. ttft_p99=2s");
    }
    let rt = runtime()?;
    let mut points: Vec<SweepPoint> = Vec::new();
    let probe = |rate: f64, points: &mut Vec<SweepPoint>| -> Result<bool> {
        let mut runs = Vec::new();
        let mut pass = true;
        for rep in 0..a.repeats.max(1) {
            let mut o = options(
                &a.load,
                Shape::Rate {
                    rate,
                    poisson: true,
                },
                Some(a.duration),
                None,
            )?;
            o.seed = a.load.seed.wrapping_add(rep as u64 * 7919);
            o.progress = false;
            let (_, s, _) = rt.block_on(run(&o))?;
            let broke: Vec<String> = slos.iter().filter_map(|t| t.breached(&s)).collect();
            let ok = broke.is_empty() && s.error_rate <= a.max_error_rate;
            eprintln!(
                "rate {rate:.2}/s run {}: {} ({:.2} req/s, TTFT p99 {:.1} ms){}",
                rep + 1,
                if ok { "pass" } else { "FAIL" },
                s.requests_per_s,
                s.ttft.p99 * 1e3,
                if broke.is_empty() {
                    String::new()
                } else {
                    format!(": {}", broke.join("; "))
                }
            );
            pass &= ok;
            runs.push(s);
        }
        points.push(SweepPoint { rate, pass, runs });
        Ok(pass)
    };
    // Double until a rate fails, then bisect between the last pass and the first failure.
    let mut lo: Option<f64> = None;
    let mut hi: Option<f64> = None;
    let mut r = a.start_rate.max(1e-3);
    while r <= a.max_rate {
        if probe(r, &mut points)? {
            lo = Some(r);
            r *= 2.0;
        } else {
            hi = Some(r);
            break;
        }
    }
    if let (Some(l), Some(h)) = (lo, hi) {
        let (mut l, mut h) = (l, h);
        for _ in 0..a.iterations {
            let m = (l + h) / 2.0;
            if probe(m, &mut points)? {
                l = m;
            } else {
                h = m;
            }
        }
        lo = Some(l);
        hi = Some(h);
    }
    let knee = match (lo, hi) {
        (Some(l), Some(h)) => format!(
            "highest sustainable rate {l:.2} req/s: every repeat met the SLOs there; the knee lies in [{l:.2}, {h:.2}) req/s (the first failing rate bounds it)"
        ),
        (Some(l), None) => format!("every rate up to {l:.2} req/s met the SLOs (--max-rate reached)"),
        (None, _) => format!("even {:.2} req/s broke the SLOs", a.start_rate),
    };
    println!("{knee}");
    std::fs::create_dir_all(&a.out)?;
    let json = serde_json::json!({
        "knee": lo,
        "first_failing": hi,
        "slo": a.slo,
        "points": points.iter().map(|p| serde_json::json!({
            "rate": p.rate, "pass": p.pass, "runs": p.runs,
        })).collect::<Vec<_>>(),
    });
    std::fs::write(
        a.out.join("sweep.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(
        a.out.join("report.html"),
        sweep_report("switchyard-loadtest sweep", &points, &knee),
    )?;
    Ok(0)
}

fn compare_cmd(a: &Path, b: &Path) -> Result<u8> {
    let load = |p: &Path| -> Result<Summary> {
        let text = std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not a summary.json", p.display()))
    };
    let (sa, sb) = (load(a)?, load(b)?);
    println!("{:<26}{:>14}{:>14}{:>10}", "metric", "A", "B", "change");
    for ((name, va), (_, vb)) in sa.flat().into_iter().zip(sb.flat()) {
        let change = if va.abs() > 0.0 && va.is_finite() && vb.is_finite() {
            format!("{:+.1}%", (vb - va) / va.abs() * 100.0)
        } else {
            "-".into()
        };
        println!("{name:<26}{va:>14.6}{vb:>14.6}{change:>10}");
    }
    Ok(0)
}
