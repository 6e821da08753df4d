//! `switchyard bench-chaos`: random worker kills and restarts under steady load.
//!
//! Starts `workers` worker processes on fixed loopback ports and a `switchyard coordinator`
//! process over them, records the greedy output of a set of reference prompts on the intact
//! cluster, then keeps `concurrency` clients sending those prompts for `duration` while a
//! chaos loop kills a random live worker with SIGKILL every `interval` (jittered) and restarts
//! it on its port a few seconds later. Every request must finish normally with exactly its
//! reference tokens; anything else counts as lost.
//!
//! Reported: requests, lost, kills; end-to-end latency p50/p99 of requests that overlapped a
//! kill against those that did not (the latency cost of a recovery); per kill, the longest
//! pause in any stream across it (recovery stall) and the median stream's pause, over the
//! streams that had received a token before it and received another after (a request still
//! waiting for its first token is queued or prefilling, not paused); per
//! restart, the same two figures across the moment the returning worker was seen back in the
//! cluster (a new epoch listing every worker), which is what taking it in cost the others.
//! With `rebalance` the coordinator re-places experts live (a returning worker loads its share
//! in the background); without, experts are placed afresh at each rebuild.
//! `SWITCHYARD_CHAOS_LOGS=1` lets the coordinator's log through to stderr (the workers' always
//! goes there).

use crate::local::LocalWorkers;
use anyhow::{bail, Context, Result};
use std::io::BufRead;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchyard_kernels::rng::Rng;
use switchyard_proto::v1::generate_response::Event;
use switchyard_proto::v1::inference_client::InferenceClient;
use switchyard_proto::v1::*;

#[derive(Clone, Debug)]
pub struct ChaosOptions {
    pub model: PathBuf,
    pub workers: usize,
    pub redundant: usize,
    pub concurrency: usize,
    pub duration: Duration,
    /// Mean time between kills (each jittered by ±50%).
    pub interval: Duration,
    /// How long a killed worker stays down.
    pub downtime: Duration,
    pub prompts: usize,
    pub max_tokens: u32,
    pub seed: u64,
    /// Live expert re-placement on (the coordinator's default) instead of off.
    pub rebalance: bool,
    /// Leave the workers' prefix caching on.
    pub prefix_cache: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ChaosReport {
    pub workers: usize,
    pub duration_s: f64,
    pub requests: usize,
    pub lost: usize,
    pub lost_detail: Vec<String>,
    pub kills: usize,
    pub restarts: usize,
    /// End-to-end latency, ms: requests that overlapped no kill, and those that did.
    pub calm_p50_ms: f64,
    pub calm_p99_ms: f64,
    pub disturbed_requests: usize,
    pub disturbed_p50_ms: f64,
    pub disturbed_p99_ms: f64,
    /// Per kill: the longest gap between two tokens of any stream spanning it, ms (the lost
    /// worker's streams: their re-prefill).
    pub stall_ms: Vec<f64>,
    /// Per kill: the median over the streams in flight of their gap spanning it, ms (most
    /// streams are homed on survivors: what a kill costs them).
    pub stall_median_ms: Vec<f64>,
    /// Per restart seen back in the cluster before the next kill: the longest, and the
    /// median stream's, token gap across the moment it was, ms.
    pub rejoin_stall_ms: Vec<f64>,
    pub rejoin_stall_median_ms: Vec<f64>,
    /// Median inter-token gap over the whole run, ms (what a stall is compared with).
    pub median_itl_ms: f64,
    pub final_epoch: u64,
    /// Workers in the cluster at the end (all restarted ones taken back: `workers`).
    pub final_workers: usize,
}

/// Exact percentile (nearest rank) of unsorted values; 0 when empty.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

struct Done {
    start: Instant,
    end: Instant,
    token_times: Vec<Instant>,
    error: Option<String>,
}

async fn one(url: String, prompt: Vec<u32>, want: Vec<u32>) -> Done {
    let start = Instant::now();
    let mut token_times = Vec::new();
    let run = async {
        let mut c = InferenceClient::connect(url)
            .await
            .map_err(|e| e.to_string())?;
        let mut s = c
            .generate(GenerateRequest {
                input: Some(generate_request::Input::TokenIds(TokenIds { ids: prompt })),
                max_tokens: want.len() as u32,
                ignore_eos: true,
                stream_token_ids: true,
                ..Default::default()
            })
            .await
            .map_err(|s| format!("{}: {}", s.code(), s.message()))?
            .into_inner();
        let (mut got, mut fin) = (Vec::new(), None);
        while let Some(m) = s
            .message()
            .await
            .map_err(|s| format!("{}: {}", s.code(), s.message()))?
        {
            match m.event {
                Some(Event::Delta(d)) => {
                    for _ in &d.token_ids {
                        token_times.push(Instant::now());
                    }
                    got.extend(d.token_ids);
                }
                Some(Event::Finished(f)) => fin = Some(f.reason()),
                _ => {}
            }
        }
        if fin != Some(FinishReason::Length) {
            return Err(format!("finished {fin:?}"));
        }
        if got != want {
            return Err(format!("tokens differ: {got:?} != {want:?}"));
        }
        Ok(())
    };
    let error = run.await.err();
    Done {
        start,
        end: Instant::now(),
        token_times,
        error,
    }
}

pub fn run(o: &ChaosOptions) -> Result<ChaosReport> {
    if o.workers < 2 {
        bail!("chaos needs at least 2 workers (one is killed at a time)");
    }
    let ports: Vec<u16> = (0..o.workers)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
        })
        .collect::<std::io::Result<_>>()?;
    let args: Vec<Vec<String>> = ports
        .iter()
        .map(|p| {
            let mut a = vec!["--listen".into(), format!("127.0.0.1:{p}")];
            if !o.prefix_cache {
                a.push("--no-prefix-cache".into());
            }
            a
        })
        .collect();
    let mut workers = LocalWorkers::spawn_each(&o.model, args, &[])?;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["coordinator", "--model"])
        .arg(&o.model)
        .args(["--grpc-addr", "127.0.0.1:0", "--metrics-addr", "off"])
        .args(["--redundant-experts", &o.redundant.to_string()]);
    if !o.rebalance {
        cmd.args(["--rebalance-threshold", "off"]);
    }
    for u in workers.urls() {
        cmd.args(["--worker-url", &u]);
    }
    let mut coord = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(if std::env::var_os("SWITCHYARD_CHAOS_LOGS").is_some() {
            // Diagnosing a recovery: the coordinator's log beside the workers'.
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::null()
        })
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(coord.stdout.take().context("coordinator stdout")?)
        .read_line(&mut line)?;
    let url = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .with_context(|| format!("coordinator did not start: {line:?}"))?
        .to_string();
    let cfg = switchyard_worker::engine::read_config(&o.model)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rng = Rng::new(o.seed);
    let prompts: Vec<Vec<u32>> = (0..o.prompts.max(1))
        .map(|_| {
            let len = 4 + (rng.next_u64() % 60) as usize;
            (0..len)
                .map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32)
                .collect()
        })
        .collect();
    // References from the intact cluster.
    let refs: Vec<Vec<u32>> = rt.block_on(async {
        let mut out = Vec::new();
        for p in &prompts {
            let mut c = InferenceClient::connect(url.clone()).await?;
            let mut s = c
                .generate(GenerateRequest {
                    input: Some(generate_request::Input::TokenIds(TokenIds {
                        ids: p.clone(),
                    })),
                    max_tokens: o.max_tokens,
                    ignore_eos: true,
                    stream_token_ids: true,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let mut got = Vec::new();
            while let Some(m) = s.message().await? {
                if let Some(Event::Delta(d)) = m.event {
                    got.extend(d.token_ids);
                }
            }
            out.push(got);
        }
        Ok::<_, anyhow::Error>(out)
    })?;
    let done: Arc<Mutex<Vec<Done>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t0 = Instant::now();
    let concurrency = o.concurrency;
    let clients: Vec<_> = (0..concurrency)
        .map(|c| {
            let (url, prompts, refs, done, stop) = (
                url.clone(),
                prompts.clone(),
                refs.clone(),
                done.clone(),
                stop.clone(),
            );
            rt.spawn(async move {
                let mut i = c;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let k = i % prompts.len();
                    let d = one(url.clone(), prompts[k].clone(), refs[k].clone()).await;
                    done.lock().unwrap_or_else(|e| e.into_inner()).push(d);
                    i += concurrency;
                }
            })
        })
        .collect();
    // One connection for every status poll (a poll every 20 ms must not churn connections on
    // the coordinator it measures).
    let status_client = rt.block_on(InferenceClient::connect(url.clone())).ok();
    let status = || {
        let mut c = status_client.clone()?;
        rt.block_on(async {
            c.cluster_status(ClusterStatusRequest {})
                .await
                .ok()
                .map(|r| r.into_inner())
        })
    };
    // The chaos loop, on this thread.
    let (mut kills, mut restarts, mut rejoins) = (Vec::new(), 0, Vec::new());
    // A restarted worker not yet seen back: the epoch before its restart.
    let mut returning: Option<u64> = None;
    while t0.elapsed() < o.duration {
        let jitter = 0.5 + (rng.next_u64() % 1000) as f64 / 1000.0;
        let next_kill = Instant::now() + o.interval.mul_f64(jitter);
        // Until the next kill, watch for the returning worker (polled every 20 ms): it is
        // back once a newer epoch lists every worker.
        while Instant::now() < next_kill {
            if let Some(before) = returning {
                if status().is_some_and(|s| s.epoch > before && s.workers.len() == o.workers) {
                    rejoins.push(Instant::now());
                    returning = None;
                }
            }
            let step = if returning.is_some() { 20 } else { 100 };
            std::thread::sleep(
                next_kill
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(step)),
            );
        }
        if t0.elapsed() >= o.duration {
            break;
        }
        let victim = (rng.next_u64() % o.workers as u64) as usize;
        kills.push(Instant::now());
        workers.kill(victim);
        std::thread::sleep(o.downtime);
        returning = Some(status().map_or(0, |s| s.epoch));
        workers.restart(victim)?;
        restarts += 1;
    }
    // Under load still, until every restarted worker is back in the cluster (or 15 s).
    let settle = Instant::now();
    while status().is_none_or(|s| s.workers.len() < o.workers)
        && settle.elapsed() < Duration::from_secs(15)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    rt.block_on(async {
        for c in clients {
            let _ = c.await;
        }
    });
    let last = status();
    let final_epoch = last.as_ref().map(|s| s.epoch);
    let final_workers = last.map_or(0, |s| s.workers.len());
    let _ = coord.kill();
    let _ = coord.wait();
    drop(workers);

    let done = std::mem::take(&mut *done.lock().unwrap_or_else(|e| e.into_inner()));
    let overlaps = |d: &Done| kills.iter().any(|k| d.start <= *k && *k <= d.end);
    let ms = |d: &Done| (d.end - d.start).as_secs_f64() * 1e3;
    let calm: Vec<f64> = done.iter().filter(|d| !overlaps(d)).map(ms).collect();
    let disturbed: Vec<f64> = done.iter().filter(|d| overlaps(d)).map(ms).collect();
    // Gaps between two tokens of a stream: a request still waiting for its first token at
    // an instant is queued or prefilling, not paused (its wait shows in the latency figures).
    let mut gaps = Vec::new();
    for d in &done {
        for w in d.token_times.windows(2) {
            gaps.push((w[0], w[1]));
        }
    }
    // Per instant, each decoding stream's gap spanning it (a stream has at most one): the
    // longest, and the median.
    let across = |at: &[Instant]| -> (Vec<f64>, Vec<f64>) {
        at.iter()
            .map(|k| {
                let g: Vec<f64> = gaps
                    .iter()
                    .filter(|(a, b)| a <= k && k <= b)
                    .map(|(a, b)| (*b - *a).as_secs_f64() * 1e3)
                    .collect();
                (g.iter().copied().fold(0.0, f64::max), percentile(&g, 50.0))
            })
            .unzip()
    };
    let (stall_ms, stall_median_ms) = across(&kills);
    let (rejoin_stall_ms, rejoin_stall_median_ms) = across(&rejoins);
    let itl: Vec<f64> = gaps
        .iter()
        .map(|(a, b)| (*b - *a).as_secs_f64() * 1e3)
        .collect();
    let lost_detail: Vec<String> = done.iter().filter_map(|d| d.error.clone()).collect();
    Ok(ChaosReport {
        workers: o.workers,
        duration_s: t0.elapsed().as_secs_f64(),
        requests: done.len(),
        lost: lost_detail.len(),
        lost_detail: lost_detail.into_iter().take(10).collect(),
        kills: kills.len(),
        restarts,
        calm_p50_ms: percentile(&calm, 50.0),
        calm_p99_ms: percentile(&calm, 99.0),
        disturbed_requests: disturbed.len(),
        disturbed_p50_ms: percentile(&disturbed, 50.0),
        disturbed_p99_ms: percentile(&disturbed, 99.0),
        stall_ms,
        stall_median_ms,
        rejoin_stall_ms,
        rejoin_stall_median_ms,
        median_itl_ms: percentile(&itl, 50.0),
        final_epoch: final_epoch.unwrap_or(0),
        final_workers,
    })
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(|x| x as f64).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), 2.0);
        assert_eq!(percentile(&[], 99.0), 0.0);
    }
}
