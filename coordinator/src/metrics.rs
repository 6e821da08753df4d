//! Prometheus metrics of the coordinator, rendered in the text exposition format (0.0.4) on
//! `GET /metrics` of the metrics HTTP port.
//!
//! Updated by the engine loop after every step (queue, running, KV per worker, step time,
//! all-to-all time and bytes, tokens per expert) and by each request's stream (TTFT,
//! inter-token latency, finishes by reason). Lock-free where hot (atomics); the per-worker and
//! per-expert tables are replaced under a mutex once per step.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// A histogram with fixed upper bounds (seconds), cumulative on render.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_bits: AtomicU64,
    count: AtomicU64,
}

/// Latency buckets from 1 ms to 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0f64.to_bits()),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        add_f64(&self.sum_bits, v);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let n = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            f64::from_bits(self.sum_bits.load(Relaxed))
        );
        let _ = writeln!(out, "{name}_count {n}");
    }
}

fn add_f64(a: &AtomicU64, v: f64) {
    let _ = a.fetch_update(Relaxed, Relaxed, |b| {
        Some((f64::from_bits(b) + v).to_bits())
    });
}

/// One worker's row in the KV table.
#[derive(Clone, Debug)]
pub struct WorkerKv {
    pub worker: String,
    pub used: u32,
    pub total: u32,
    /// The worker's prefix cache (blocks kept now; counters since its engine loaded).
    pub prefix: switchyard_proto::cluster::v1::PrefixCacheStats,
}

pub struct Metrics {
    pub ttft: Histogram,
    pub itl: Histogram,
    pub step: Histogram,
    pub all_to_all: Histogram,
    queued: AtomicU64,
    running: AtomicU64,
    steps: AtomicU64,
    a2a_bytes: AtomicU64,
    a2a_seconds_bits: AtomicU64,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    kv: Mutex<Vec<WorkerKv>>,
    /// `[layer][expert]` tokens routed since start.
    expert_tokens: Mutex<Vec<Vec<u64>>>,
    finished: Mutex<BTreeMap<&'static str, u64>>,
    seqs_kept: AtomicU64,
    seqs_reprefilled: AtomicU64,
    requests_restarted: AtomicU64,
    seqs_split: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            ttft: Histogram::new(LATENCY_BUCKETS),
            itl: Histogram::new(LATENCY_BUCKETS),
            step: Histogram::new(LATENCY_BUCKETS),
            all_to_all: Histogram::new(LATENCY_BUCKETS),
            queued: AtomicU64::new(0),
            running: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            a2a_bytes: AtomicU64::new(0),
            a2a_seconds_bits: AtomicU64::new(0f64.to_bits()),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            kv: Mutex::new(Vec::new()),
            expert_tokens: Mutex::new(Vec::new()),
            finished: Mutex::new(BTreeMap::new()),
            seqs_kept: AtomicU64::new(0),
            seqs_reprefilled: AtomicU64::new(0),
            requests_restarted: AtomicU64::new(0),
            seqs_split: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// After each engine step.
    pub fn on_step(
        &self,
        s: &crate::driver::StepStats,
        (queued, running): (usize, usize),
        kv: Vec<WorkerKv>,
        expert_tokens: &[Vec<u64>],
    ) {
        self.steps.fetch_add(1, Relaxed);
        self.step.observe(s.seconds);
        self.all_to_all.observe(s.all_to_all_seconds);
        add_f64(&self.a2a_seconds_bits, s.all_to_all_seconds);
        self.a2a_bytes.fetch_add(s.all_to_all_bytes, Relaxed);
        self.queued.store(queued as u64, Relaxed);
        self.running.store(running as u64, Relaxed);
        *self.kv.lock().unwrap_or_else(|e| e.into_inner()) = kv;
        let mut e = self.expert_tokens.lock().unwrap_or_else(|e| e.into_inner());
        e.clear();
        e.extend_from_slice(expert_tokens);
    }

    /// Totals since start of the sequences in flight at a rebuild that kept their KV and of
    /// those re-prefilled.
    /// The driver's counters since start: sequences kept and re-prefilled over rebuilds,
    /// requests started again from their clients' tokens, sequences split across workers.
    pub fn on_recovered(&self, s: &crate::driver::Snapshot) {
        self.seqs_kept.store(s.sequences_kept, Relaxed);
        self.seqs_reprefilled
            .store(s.sequences_reprefilled, Relaxed);
        self.requests_restarted.store(s.requests_restarted, Relaxed);
        self.seqs_split.store(s.sequences_split, Relaxed);
    }

    pub fn on_admitted(&self, prompt_tokens: usize) {
        self.prompt_tokens.fetch_add(prompt_tokens as u64, Relaxed);
    }

    pub fn on_token(&self) {
        self.generated_tokens.fetch_add(1, Relaxed);
    }

    pub fn on_finished(&self, reason: &'static str) {
        *self
            .finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        let gauge = |o: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let counter = |o: &mut String, name: &str, help: &str, v: String| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        gauge(
            &mut o,
            "switchyard_queue_depth",
            "Requests waiting for admission.",
            self.queued.load(Relaxed),
        );
        gauge(
            &mut o,
            "switchyard_running_requests",
            "Requests admitted and running.",
            self.running.load(Relaxed),
        );
        counter(
            &mut o,
            "switchyard_steps_total",
            "Engine steps run.",
            self.steps.load(Relaxed).to_string(),
        );
        counter(
            &mut o,
            "switchyard_prompt_tokens_total",
            "Prompt tokens admitted.",
            self.prompt_tokens.load(Relaxed).to_string(),
        );
        counter(
            &mut o,
            "switchyard_generated_tokens_total",
            "Tokens generated.",
            self.generated_tokens.load(Relaxed).to_string(),
        );
        counter(
            &mut o,
            "switchyard_all_to_all_bytes_total",
            "Bytes sent between workers by the expert all-to-all.",
            self.a2a_bytes.load(Relaxed).to_string(),
        );
        counter(
            &mut o,
            "switchyard_all_to_all_seconds_total",
            "Step time spent in the expert all-to-all (slowest rank).",
            f64::from_bits(self.a2a_seconds_bits.load(Relaxed)).to_string(),
        );
        let _ = writeln!(
            o,
            "# HELP switchyard_recovered_sequences_total Sequences in flight when the cluster was \
             rebuilt (a worker lost, drained or joined): kept (went on from the KV their worker \
             kept) or reprefilled.\n# TYPE switchyard_recovered_sequences_total counter\n\
             switchyard_recovered_sequences_total{{outcome=\"kept\"}} {}\n\
             switchyard_recovered_sequences_total{{outcome=\"reprefilled\"}} {}",
            self.seqs_kept.load(Relaxed),
            self.seqs_reprefilled.load(Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP switchyard_restarted_requests_total Requests no coordinator held any more \
             (lost with their coordinator and worker) started again from the tokens their \
             clients had received.\n# TYPE switchyard_restarted_requests_total counter\n\
             switchyard_restarted_requests_total {}",
            self.requests_restarted.load(Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP switchyard_split_sequences_total Sequences whose KV came to span more than \
             one worker (--context-parallel).\n# TYPE switchyard_split_sequences_total counter\n\
             switchyard_split_sequences_total {}",
            self.seqs_split.load(Relaxed)
        );
        let _ = writeln!(o, "# HELP switchyard_kv_blocks_used KV blocks in use per worker.\n# TYPE switchyard_kv_blocks_used gauge");
        let kv = self.kv.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for w in &kv {
            let _ = writeln!(
                o,
                "switchyard_kv_blocks_used{{worker=\"{}\"}} {}",
                w.worker, w.used
            );
        }
        let _ = writeln!(o, "# HELP switchyard_kv_blocks_capacity KV blocks per worker.\n# TYPE switchyard_kv_blocks_capacity gauge");
        for w in &kv {
            let _ = writeln!(
                o,
                "switchyard_kv_blocks_capacity{{worker=\"{}\"}} {}",
                w.worker, w.total
            );
        }
        let _ = writeln!(o, "# HELP switchyard_kv_blocks_cached KV blocks per worker held by no sequence that keep a prefix for reuse (evicted when room is needed).\n# TYPE switchyard_kv_blocks_cached gauge");
        for w in &kv {
            let _ = writeln!(
                o,
                "switchyard_kv_blocks_cached{{worker=\"{}\"}} {}",
                w.worker, w.prefix.cached_blocks
            );
        }
        for (name, help, get) in [
            (
                "switchyard_prefix_cache_queried_blocks_total",
                "Full prompt blocks looked up in each worker's prefix cache (since its engine loaded).",
                (|p| p.queried_blocks) as fn(&switchyard_proto::cluster::v1::PrefixCacheStats) -> u64,
            ),
            (
                "switchyard_prefix_cache_hit_blocks_total",
                "Prompt blocks found in each worker's prefix cache, their positions not computed again (since its engine loaded).",
                |p| p.hit_blocks,
            ),
            (
                "switchyard_prefix_cache_evicted_blocks_total",
                "Cached blocks each worker evicted to make room (since its engine loaded).",
                |p| p.evicted_blocks,
            ),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            for w in &kv {
                let _ = writeln!(o, "{name}{{worker=\"{}\"}} {}", w.worker, get(&w.prefix));
            }
        }
        let _ = writeln!(o, "# HELP switchyard_expert_tokens_total Tokens routed to each expert.\n# TYPE switchyard_expert_tokens_total counter");
        for (l, row) in self
            .expert_tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .enumerate()
        {
            for (e, n) in row.iter().enumerate() {
                let _ = writeln!(
                    o,
                    "switchyard_expert_tokens_total{{layer=\"{l}\",expert=\"{e}\"}} {n}"
                );
            }
        }
        let _ = writeln!(o, "# HELP switchyard_requests_finished_total Requests finished, by reason.\n# TYPE switchyard_requests_finished_total counter");
        for (r, n) in self
            .finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                o,
                "switchyard_requests_finished_total{{reason=\"{r}\"}} {n}"
            );
        }
        self.ttft.render(
            &mut o,
            "switchyard_time_to_first_token_seconds",
            "Time from request arrival to its first token.",
        );
        self.itl.render(
            &mut o,
            "switchyard_inter_token_latency_seconds",
            "Time between consecutive tokens of a stream.",
        );
        self.step
            .render(&mut o, "switchyard_step_seconds", "Engine step wall time.");
        self.all_to_all.render(
            &mut o,
            "switchyard_all_to_all_seconds",
            "Expert all-to-all time per step (slowest rank).",
        );
        o
    }
}

/// Serves `GET /metrics` on `listener` until the process ends.
/// Serves `/metrics`, and `/healthz` and `/readyz` for probes: the plaintext port kubelet
/// can probe when the public listeners require TLS client certificates (it reveals load
/// figures and readiness, and changes nothing).
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: std::sync::Arc<Metrics>,
    ready: crate::http::Readiness,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let r = ready();
                async move { crate::http::readiness_response(r) }
            }),
        )
        .route(
            "/metrics",
            axum::routing::get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        m.render(),
                    )
                }
            }),
        );
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_renders_cumulative_buckets_sum_and_count() {
        let h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.5, 0.5, 3.0] {
            h.observe(v);
        }
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"0.1\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"1\"} 3\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 4\n"), "{s}");
        assert!(s.contains("x_sum 4.05\n"), "{s}");
        assert!(s.contains("x_count 4\n"), "{s}");
    }
}
