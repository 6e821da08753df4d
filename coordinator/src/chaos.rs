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
//!
//! With [`Target::Coordinator`] the coordinator is what dies: an etcd server (`etcd` on PATH,
//! or `etcd_url`), the workers registered in it, and two coordinators on fixed ports, one
//! leading and one standing by. The chaos loop kills the leader with SIGKILL and restarts it
//! (as the new standby) after `downtime`; the clients resume their streams on whichever
//! coordinator leads (`switchyard_proto::resume`). Reported besides: per kill, the time until
//! the standby announced it serves, and over every takeover the sequences adopted with their
//! KV, re-prefilled, and started again by their clients.

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
    /// What is killed.
    pub target: Target,
    /// [`Target::Coordinator`]: the etcd to use (else one is started from `etcd` on PATH),
    /// and the membership and leadership lease TTL, seconds.
    pub etcd_url: Option<String>,
    pub lease_ttl: u64,
}

/// What the chaos loop kills.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// A random worker at a time.
    Workers,
    /// The leading coordinator (a standby takes over).
    Coordinator,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ChaosReport {
    pub target: Target,
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
    /// [`Target::Coordinator`]: per kill, ms until the standby announced it serves; over
    /// every leader, the sequences it adopted with their KV or re-prefilled (rebuilds and
    /// takeovers) and the requests it started again from what their clients had received.
    pub takeover_ms: Vec<f64>,
    pub sequences_kept: u64,
    pub sequences_reprefilled: u64,
    pub requests_restarted: u64,
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

/// One greedy request of `max_tokens`, submitted to whichever of `endpoints` takes it (a
/// standby coordinator's port is closed) and resumed on whichever leads if its coordinator
/// is lost: its tokens, each one's arrival pushed on `token_times`. It must end by length.
async fn stream(
    endpoints: &Arc<Vec<String>>,
    prompt: Vec<u32>,
    max_tokens: u32,
    token_times: &mut Vec<Instant>,
) -> Result<Vec<u32>, String> {
    use switchyard_proto::resume::{ReattachFn, Resuming};
    let req = GenerateRequest {
        input: Some(generate_request::Input::TokenIds(TokenIds { ids: prompt })),
        max_tokens,
        ignore_eos: true,
        stream_token_ids: true,
        ..Default::default()
    };
    let status = |s: tonic::Status| format!("{}: {}", s.code(), s.message());
    let eps = endpoints.clone();
    let reattach: ReattachFn = Box::new(move |i, call| {
        let u = eps[i].clone();
        Box::pin(async move {
            let mut c = InferenceClient::connect(u)
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            switchyard_proto::resume::call(&mut c, call).await
        })
    });
    let mut s = Resuming::start(req, endpoints.len(), reattach, Duration::from_secs(60))
        .await
        .map_err(status)?;
    let (mut got, mut fin) = (Vec::new(), None);
    while let Some(m) = s.message().await.map_err(status)? {
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
    Ok(got)
}

/// One request whose output must be `want`.
async fn one(endpoints: Arc<Vec<String>>, prompt: Vec<u32>, want: Vec<u32>) -> Done {
    let start = Instant::now();
    let mut token_times = Vec::new();
    let error = match stream(&endpoints, prompt, want.len() as u32, &mut token_times).await {
        Ok(got) if got == want => None,
        Ok(got) => Some(format!("tokens differ: {got:?} != {want:?}")),
        Err(e) => Some(e),
    };
    Done {
        start,
        end: Instant::now(),
        token_times,
        error,
    }
}

fn free_port() -> std::io::Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
}

/// An etcd server of this run's own (`etcd` on PATH), in a temporary data directory; killed
/// and removed on drop.
struct EtcdServer {
    child: std::process::Child,
    dir: PathBuf,
    url: String,
}

impl EtcdServer {
    fn start() -> Result<Self> {
        let (client, peer) = (free_port()?, free_port()?);
        // A benchmark's private etcd needs no durable disk: in memory where there is a
        // tmpfs, so that its fsyncs do not stall lease renewals while workers load.
        let shm = std::path::Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("switchyard-chaos-etcd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = std::process::Command::new("etcd")
            .args(["--name", "chaos", "--data-dir"])
            .arg(&dir)
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("chaos={peer_url}")])
            .args(["--log-level", "error"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting etcd (on PATH; or pass --etcd)")?;
        let server = EtcdServer { child, dir, url };
        // Ready once its client port answers /health.
        for _ in 0..200 {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", client)) {
                use std::io::{Read, Write};
                let _ = s.write_all(b"GET /health HTTP/1.0\r\n\r\n");
                let mut body = String::new();
                let _ = s.read_to_string(&mut body);
                if body.contains("\"health\":\"true\"") {
                    return Ok(server);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("etcd did not become healthy at {}", server.url)
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `switchyard coordinator` process on a fixed port; its `serving` announcement is sent
/// on `served` (with its index) when it leads.
struct Coord {
    args: Vec<String>,
    child: std::process::Child,
    url: String,
}

impl Coord {
    fn spawn(
        index: usize,
        args: Vec<String>,
        url: String,
        served: &std::sync::mpsc::Sender<(usize, Instant)>,
    ) -> Result<Coord> {
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(if std::env::var_os("SWITCHYARD_CHAOS_LOGS").is_some() {
                // Diagnosing a recovery: the coordinator's log beside the workers'.
                std::process::Stdio::inherit()
            } else {
                std::process::Stdio::null()
            })
            .spawn()?;
        let out = child.stdout.take().context("coordinator stdout")?;
        let served = served.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if line.contains("grpc=") && served.send((index, Instant::now())).is_err() {
                    return;
                }
            }
        });
        Ok(Coord { args, child, url })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Coord {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The coordinator that announced it serves last, if any did since the last call; the time
/// from the kill that left the cluster leaderless is recorded then.
fn took_over(
    served: &std::sync::mpsc::Receiver<(usize, Instant)>,
    leaderless: &mut Option<Instant>,
    takeover_ms: &mut Vec<f64>,
) -> Option<usize> {
    let mut leader = None;
    while let Ok((i, at)) = served.try_recv() {
        leader = Some(i);
        if let Some(k) = leaderless.take() {
            takeover_ms.push((at - k).as_secs_f64() * 1e3);
        }
    }
    leader
}

pub fn run(o: &ChaosOptions) -> Result<ChaosReport> {
    let coordinators = match o.target {
        Target::Workers => {
            if o.workers < 2 {
                bail!("chaos needs at least 2 workers (one is killed at a time)");
            }
            1
        }
        Target::Coordinator => 2,
    };
    let etcd = match (o.target, &o.etcd_url) {
        (Target::Coordinator, None) => Some(EtcdServer::start()?),
        _ => None,
    };
    let membership: Vec<String> = match o.etcd_url.as_ref().or(etcd.as_ref().map(|e| &e.url)) {
        Some(url) if o.target == Target::Coordinator => vec![
            "--etcd".into(),
            url.clone(),
            "--cluster-prefix".into(),
            format!("/switchyard/chaos-{}", std::process::id()),
            "--lease-ttl".into(),
            o.lease_ttl.to_string(),
        ],
        _ => vec![],
    };
    let ports: Vec<u16> = (0..o.workers)
        .map(|_| free_port())
        .collect::<std::io::Result<_>>()?;
    let args: Vec<Vec<String>> = ports
        .iter()
        .map(|p| {
            let mut a = vec!["--listen".into(), format!("127.0.0.1:{p}")];
            if !o.prefix_cache {
                a.push("--no-prefix-cache".into());
            }
            a.extend(membership.iter().cloned());
            a
        })
        .collect();
    let mut workers = LocalWorkers::spawn_each(&o.model, args, &[])?;
    let (served_tx, served) = std::sync::mpsc::channel();
    let mut coords = Vec::new();
    for i in 0..coordinators {
        let port = free_port()?;
        let mut args: Vec<String> = vec!["coordinator".into(), "--model".into()];
        args.push(o.model.display().to_string());
        args.extend(
            [
                "--grpc-addr",
                &format!("127.0.0.1:{port}"),
                "--metrics-addr",
                "off",
                "--redundant-experts",
                &o.redundant.to_string(),
            ]
            .map(String::from),
        );
        if !o.rebalance {
            args.extend(["--rebalance-threshold".into(), "off".into()]);
        }
        if membership.is_empty() {
            for u in workers.urls() {
                args.extend(["--worker-url".into(), u]);
            }
        } else {
            args.extend(["--workers".into(), o.workers.to_string()]);
            args.extend(["--id".into(), format!("coordinator-{i}")]);
            args.extend(membership.iter().cloned());
        }
        coords.push(Coord::spawn(
            i,
            args,
            format!("http://127.0.0.1:{port}"),
            &served_tx,
        )?);
        if i == 0 {
            // The first leads; the second then stands by.
            served
                .recv_timeout(Duration::from_secs(300))
                .context("the coordinator did not start serving")?;
        }
    }
    let endpoints: Arc<Vec<String>> = Arc::new(coords.iter().map(|c| c.url.clone()).collect());
    let mut leader = 0;
    let url = coords[leader].url.clone();
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
    // References from the intact cluster (resumed like every other request should the
    // leadership change meanwhile).
    let refs: Vec<Vec<u32>> = rt.block_on(async {
        let mut out = Vec::new();
        for p in &prompts {
            let got = stream(&endpoints, p.clone(), o.max_tokens, &mut Vec::new())
                .await
                .map_err(|e| anyhow::anyhow!("a reference run failed: {e}"))?;
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
            let (endpoints, prompts, refs, done, stop) = (
                endpoints.clone(),
                prompts.clone(),
                refs.clone(),
                done.clone(),
                stop.clone(),
            );
            rt.spawn(async move {
                let mut i = c;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let k = i % prompts.len();
                    let d = one(endpoints.clone(), prompts[k].clone(), refs[k].clone()).await;
                    done.lock().unwrap_or_else(|e| e.into_inner()).push(d);
                    i += concurrency;
                }
            })
        })
        .collect();
    // One connection to the leader for every status poll (a poll every 20 ms must not churn
    // connections on the coordinator it measures).
    let connect = |url: &str| rt.block_on(InferenceClient::connect(url.to_string())).ok();
    let mut status_client = connect(&url);
    let status = |c: &Option<InferenceClient<tonic::transport::Channel>>| {
        let mut c = c.clone()?;
        rt.block_on(async {
            c.cluster_status(ClusterStatusRequest {})
                .await
                .ok()
                .map(|r| r.into_inner())
        })
    };
    // Over every leader: what it adopted, re-prefilled and restarted (each one's counters
    // start at its own takeover), read just before it is killed and at the end.
    let mut recovered = (0u64, 0u64, 0u64);
    let mut add = |s: &ClusterStatusResponse| {
        recovered.0 += s.sequences_kept;
        recovered.1 += s.sequences_reprefilled;
        recovered.2 += s.requests_restarted;
    };
    // The chaos loop, on this thread.
    let (mut kills, mut restarts, mut rejoins) = (Vec::new(), 0, Vec::new());
    let mut takeover_ms = Vec::new();
    // A restarted worker not yet seen back: the epoch before its restart.
    let mut returning: Option<u64> = None;
    // A killed leader whose standby has not announced it serves yet.
    let mut leaderless: Option<Instant> = None;
    while t0.elapsed() < o.duration {
        let jitter = 0.5 + (rng.next_u64() % 1000) as f64 / 1000.0;
        let next_kill = Instant::now() + o.interval.mul_f64(jitter);
        // Until the next kill, watch for the returning worker (polled every 20 ms): it is
        // back once a newer epoch lists every worker; and for a new leader.
        while Instant::now() < next_kill || leaderless.is_some() {
            if let Some(before) = returning {
                if status(&status_client)
                    .is_some_and(|s| s.epoch > before && s.workers.len() == o.workers)
                {
                    rejoins.push(Instant::now());
                    returning = None;
                }
            }
            if let Some(i) = took_over(&served, &mut leaderless, &mut takeover_ms) {
                leader = i;
                status_client = connect(&coords[i].url);
            }
            if leaderless.is_some_and(|k| k.elapsed() > Duration::from_secs(120)) {
                bail!("no standby took over within 120 s of the leader's kill");
            }
            let step = if returning.is_some() || leaderless.is_some() {
                20
            } else {
                100
            };
            std::thread::sleep(
                next_kill
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1))
                    .min(Duration::from_millis(step)),
            );
        }
        if t0.elapsed() >= o.duration {
            break;
        }
        match o.target {
            Target::Workers => {
                let victim = (rng.next_u64() % o.workers as u64) as usize;
                kills.push(Instant::now());
                workers.kill(victim);
                std::thread::sleep(o.downtime);
                returning = Some(status(&status_client).map_or(0, |s| s.epoch));
                workers.restart(victim)?;
            }
            Target::Coordinator => {
                if let Some(s) = status(&status_client) {
                    add(&s);
                }
                kills.push(Instant::now());
                leaderless = kills.last().copied();
                coords[leader].kill();
                status_client = None;
                std::thread::sleep(o.downtime);
                // Back as the standby, on its port.
                let c = &coords[leader];
                let (args, url) = (c.args.clone(), c.url.clone());
                coords[leader] = Coord::spawn(leader, args, url, &served_tx)?;
            }
        }
        restarts += 1;
    }
    // Under load still, until a standby leads again after the last kill and every
    // restarted worker is back in the cluster (or 15 s).
    let settle = Instant::now();
    loop {
        if let Some(i) = took_over(&served, &mut leaderless, &mut takeover_ms) {
            status_client = connect(&coords[i].url);
        }
        let whole = status(&status_client).is_some_and(|s| s.workers.len() >= o.workers);
        if (whole && leaderless.is_none()) || settle.elapsed() > Duration::from_secs(15) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    rt.block_on(async {
        for c in clients {
            let _ = c.await;
        }
    });
    let last = status(&status_client);
    if let Some(s) = &last {
        add(s);
    }
    let final_epoch = last.as_ref().map(|s| s.epoch);
    let final_workers = last.map_or(0, |s| s.workers.len());
    drop(coords);
    drop(workers);
    drop(etcd);

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
        target: o.target,
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
        takeover_ms,
        sequences_kept: recovered.0,
        sequences_reprefilled: recovered.1,
        requests_restarted: recovered.2,
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
