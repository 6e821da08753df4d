//! `switchyard bench`: prefill and decode throughput of one model on this machine, with the
//! machine's own memory read bandwidth measured in the same run so decode figures can be
//! stated as a fraction of the bandwidth bound (bytes that must be read per token / bandwidth).
//!
//! Every figure is the best of several runs (prefill 2, decode 3, bandwidth 7), so a noisy
//! neighbour on a shared machine lowers the bound and the engine alike rather than one of them.

use crate::driver::GenRequest;
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;
use switchyard_kernels::rng::Rng;
use switchyard_kernels::sampling::argmax;
use switchyard_worker::engine::{ChunkSpec, Engine, EngineOptions, Logits};
use switchyard_worker::{WeightDType, WorkerError};

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub model: PathBuf,
    pub dtype: Option<WeightDType>,
    pub prefill_tokens: usize,
    pub decode_steps: usize,
    pub batch: usize,
    pub seed: u64,
    /// Skip the memory bandwidth measurement (for profiling the model alone).
    pub skip_bandwidth: bool,
    /// Where the forward pass runs; on a GPU the bound is the device's memory bandwidth.
    pub device: switchyard_worker::Device,
    /// Element type of the KV cache.
    pub kv_dtype: switchyard_worker::kv::KvDType,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub model: String,
    /// Element type of the unquantized weights (and of compute).
    pub dtype: String,
    /// How the checkpoint's quantized weights are held: `fp8` (block-scaled e4m3), `mxfp4`
    /// (routed experts), or `none`.
    pub quantization: String,
    pub device: String,
    pub threads: usize,
    pub weight_bytes: usize,
    /// The model family (`architectures`).
    pub architecture: String,
    /// KV cache bytes per token of context, all layers (MLA: the latent and rope key only).
    pub kv_bytes_per_token: usize,
    /// Element type of the KV cache (f32 or bf16).
    pub kv_dtype: String,
    /// Weight bytes a single decode token must read (dense + top-k experts + lm_head).
    pub bytes_per_token: usize,
    pub load_s: f64,
    pub read_bandwidth_gb_s: f64,
    pub prefill_tokens: usize,
    pub prefill_tok_s: f64,
    pub decode_tok_s_b1: f64,
    /// Sequences decoded together in the batched measurement.
    pub batch: usize,
    pub decode_tok_s_batch: f64,
    pub decode_b1_bound_tok_s: f64,
    pub decode_b1_fraction_of_bound: f64,
    pub peak_rss_bytes: u64,
}

/// Peak resident set size of this process (VmHWM).
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Best-of-7 read bandwidth over a buffer far larger than the caches, in GB/s: one scoped
/// thread per pool thread, each streaming its contiguous share with independent accumulators.
pub fn read_bandwidth_gb_s(bytes: usize) -> f64 {
    let threads = rayon::current_num_threads().max(1);
    let n = bytes / 4;
    let buf: Vec<f32> = (0..n).into_par_iter().map(|i| (i % 7) as f32).collect();
    let share = n.div_ceil(threads);
    let mut best = 0.0f64;
    for _ in 0..7 {
        let t = Instant::now();
        let s: f32 = std::thread::scope(|sc| {
            let hs: Vec<_> = buf
                .chunks(share)
                .map(|c| sc.spawn(move || switchyard_kernels::sum(c)))
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("bandwidth thread"))
                .sum()
        });
        let dt = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max(bytes as f64 / dt / 1e9);
    }
    best
}

fn random_tokens(rng: &mut Rng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect()
}

/// Decodes `steps` greedy tokens for `batch` sequences after a short prefill; returns tok/s.
fn decode(
    engine: &mut Engine,
    rng: &mut Rng,
    batch: usize,
    steps: usize,
) -> Result<f64, WorkerError> {
    let vocab = engine.config().vocab_size;
    let prompts: Vec<Vec<u32>> = (0..batch).map(|_| random_tokens(rng, 32, vocab)).collect();
    let chunks: Vec<ChunkSpec> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| ChunkSpec {
            seq_id: i as u64,
            tokens: p,
            logits: Logits::Last,
        })
        .collect();
    let out = engine.step(&chunks, false)?;
    let mut last: Vec<[u32; 1]> = out
        .logits
        .chunks(vocab)
        .map(|l| [argmax(l) as u32])
        .collect();
    let warmup = 3;
    let mut t0 = Instant::now();
    for s in 0..steps + warmup {
        if s == warmup {
            t0 = Instant::now();
        }
        let chunks: Vec<ChunkSpec> = last
            .iter()
            .enumerate()
            .map(|(i, t)| ChunkSpec {
                seq_id: i as u64,
                tokens: t,
                logits: Logits::Last,
            })
            .collect();
        let out = engine.step(&chunks, false)?;
        last = out
            .logits
            .chunks(vocab)
            .map(|l| [argmax(l) as u32])
            .collect();
    }
    let dt = t0.elapsed().as_secs_f64();
    for i in 0..batch {
        engine.release(i as u64);
    }
    Ok((steps * batch) as f64 / dt)
}

pub fn run(opts: &BenchOptions) -> Result<BenchReport, WorkerError> {
    let t = Instant::now();
    let eopts = EngineOptions {
        dtype: opts.dtype,
        kv_dtype: opts.kv_dtype,
        max_context: Some(opts.prefill_tokens.max(64) + opts.decode_steps + 64),
        kv_blocks: Some(
            (opts.batch.max(4) + 1)
                * (opts.prefill_tokens.max(64) + opts.decode_steps + 64).div_ceil(16),
        ),
        device: opts.device,
        // The prefill is timed on one prompt computed three times: a prefix cache would
        // compute it once. This bench measures computation.
        prefix_cache: false,
        ..Default::default()
    };
    let mut engine = Engine::load(&opts.model, &eopts)?;
    let load_s = t.elapsed().as_secs_f64();
    let cfg = engine.config().clone();
    let dtype = engine.model.dtype;
    let kv_bytes_per_token = engine.kv_bytes_per_token();
    let bytes_per_token = engine.bytes_per_token();
    let mut rng = Rng::new(opts.seed);

    // Prefill: one warm-up pass (pages the weights in), then the timed pass.
    let prompt = random_tokens(&mut rng, opts.prefill_tokens, cfg.vocab_size);
    let mut prefill_tok_s = 0.0f64;
    for rep in 0..3 {
        let t = Instant::now();
        engine.step(
            &[ChunkSpec {
                seq_id: 99,
                tokens: &prompt,
                logits: Logits::Last,
            }],
            false,
        )?;
        let dt = t.elapsed().as_secs_f64();
        engine.release(99);
        if rep > 0 {
            prefill_tok_s = prefill_tok_s.max(opts.prefill_tokens as f64 / dt);
        }
    }
    let decode_tok_s_b1 = decode(&mut engine, &mut rng, 1, opts.decode_steps)?;
    let decode_tok_s_batch = decode(
        &mut engine,
        &mut rng,
        opts.batch,
        opts.decode_steps.div_ceil(2),
    )?;
    let peak_rss = peak_rss_bytes();
    let weight_bytes = engine.weight_bytes();
    drop(engine);
    let bw = if opts.skip_bandwidth {
        f64::NAN
    } else {
        match opts.device {
            switchyard_worker::Device::Cpu => read_bandwidth_gb_s(1 << 30),
            switchyard_worker::Device::Cuda(_n) => {
                #[cfg(feature = "cuda")]
                {
                    switchyard_kernels::cuda::Gpu::get(_n)
                        .and_then(|g| g.copy_bandwidth_gb_s(4 << 30))
                        .map_err(|e| WorkerError::Device(e.to_string()))?
                }
                #[cfg(not(feature = "cuda"))]
                f64::NAN
            }
        }
    };
    let bound = bw * 1e9 / bytes_per_token as f64;
    Ok(BenchReport {
        model: opts.model.display().to_string(),
        dtype: if dtype == WeightDType::Bf16 {
            "bf16".into()
        } else {
            "f32".into()
        },
        quantization: match &cfg.quantization {
            Some(switchyard_worker::config::Quantization::Fp8 { .. }) => "fp8",
            Some(switchyard_worker::config::Quantization::Mxfp4 { .. }) => "mxfp4",
            None => "none",
        }
        .into(),
        device: opts.device.to_string(),
        threads: rayon::current_num_threads(),
        weight_bytes,
        architecture: cfg.arch.hf_name().into(),
        kv_bytes_per_token,
        kv_dtype: opts.kv_dtype.to_string(),
        bytes_per_token,
        load_s,
        read_bandwidth_gb_s: bw,
        prefill_tokens: opts.prefill_tokens,
        prefill_tok_s,
        decode_tok_s_b1,
        batch: opts.batch,
        decode_tok_s_batch,
        decode_b1_bound_tok_s: bound,
        decode_b1_fraction_of_bound: decode_tok_s_b1 / bound,
        peak_rss_bytes: peak_rss,
    })
}

/// `switchyard bench-cluster`: decode throughput of a cluster of local worker processes.
#[derive(Clone, Debug)]
pub struct ClusterBenchOptions {
    pub model: PathBuf,
    /// Worker counts to measure, each a fresh cluster.
    pub workers: Vec<usize>,
    pub batch: usize,
    pub prompt_tokens: usize,
    pub decode_steps: usize,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ClusterBenchRow {
    pub workers: usize,
    pub batch: usize,
    /// Aggregate decode tokens per second over the measured steps.
    pub decode_tok_s: f64,
    /// Mean step wall time seen by the coordinator.
    pub step_ms: f64,
    /// Share of step time the slowest rank spent in the expert all-to-all.
    pub all_to_all_share: f64,
    /// All-to-all bytes sent per step, all ranks together.
    pub all_to_all_bytes_per_step: f64,
    /// Coordinator and transport time per generated token: step wall time minus the slowest
    /// worker's own step time (its forward, sampling and all-to-all), over the step's tokens.
    pub coordinator_us_per_token: f64,
}

/// Steps until every prompt is prefilled and `steps` decode-only steps of all `batch`
/// sequences have run.
fn warm_up(d: &mut crate::driver::Driver, batch: usize, steps: usize) -> anyhow::Result<()> {
    let mut warm = 0;
    while warm < steps {
        d.step()?;
        let s = d.last_step();
        if s.decodes == batch && s.prefill_tokens == 0 {
            warm += 1;
        }
    }
    Ok(())
}

/// Runs `decode_steps` decode steps of `batch` sequences on 1..n local workers each.
pub fn run_cluster(o: &ClusterBenchOptions) -> anyhow::Result<Vec<ClusterBenchRow>> {
    use crate::driver::Driver;
    let cfg = switchyard_worker::engine::read_config(&o.model)?;
    let mut rows = Vec::new();
    for &k in &o.workers {
        let workers = crate::local::LocalWorkers::spawn(&o.model, k, &[])?;
        let blocks = (o.batch * (o.prompt_tokens + o.decode_steps + 8)).div_ceil(16) + 16;
        let cluster =
            crate::remote::GrpcCluster::connect(&workers.urls(), &o.model, 0, blocks, 16)?;
        let mut d = Driver::new(cluster, o.batch * o.prompt_tokens.max(1), o.batch);
        let mut rng = Rng::new(1);
        for id in 0..o.batch as u64 {
            let prompt = (0..o.prompt_tokens)
                .map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32)
                .collect();
            d.submit(GenRequest::greedy(id, prompt, o.decode_steps + 4))?;
        }
        // Prefill everything and take two decode steps before measuring.
        warm_up(&mut d, o.batch, 2)?;
        let (mut tokens, mut wall, mut a2a, mut bytes, mut worker) = (0usize, 0.0, 0.0, 0u64, 0.0);
        let t0 = Instant::now();
        for _ in 0..o.decode_steps {
            let emitted = d.step()?;
            let s = d.last_step();
            tokens += emitted.len();
            wall += s.seconds;
            a2a += s.all_to_all_seconds;
            bytes += s.all_to_all_bytes;
            worker += s.worker_seconds;
        }
        let elapsed = t0.elapsed().as_secs_f64();
        let n = o.decode_steps as f64;
        rows.push(ClusterBenchRow {
            workers: k,
            batch: o.batch,
            decode_tok_s: tokens as f64 / elapsed,
            step_ms: wall / n * 1e3,
            all_to_all_share: a2a / wall,
            all_to_all_bytes_per_step: bytes as f64 / n,
            coordinator_us_per_token: (wall - worker).max(0.0) / tokens as f64 * 1e6,
        });
        drop(d);
        drop(workers);
    }
    Ok(rows)
}

/// `switchyard bench-long`: one long prompt whose KV is split over `workers` worker processes
/// (context parallelism), against one worker at the longest prompt its KV holds, in one run.
#[derive(Clone, Debug)]
pub struct LongBenchOptions {
    pub model: PathBuf,
    pub workers: usize,
    /// Each worker's KV holds this share of a split run's sequence (prompt and decoded
    /// tokens), so every split run does split.
    pub kv_share: f64,
    /// Prompt lengths of the split runs.
    pub prompt_tokens: Vec<usize>,
    pub decode_steps: usize,
    /// Prefill tokens per step (the token budget).
    pub chunk: usize,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct LongBenchRow {
    pub workers: usize,
    pub prompt_tokens: usize,
    /// Submission to the first token.
    pub prefill_s: f64,
    pub prefill_tok_s: f64,
    /// Inter-token latency of the decoded tokens after the first (p50, p99, ms).
    pub itl_ms_p50: f64,
    pub itl_ms_p99: f64,
    /// KV cache bytes per token of context (all layers, f32 pools).
    pub kv_bytes_per_token: usize,
    /// Positions the sequence's KV took on each worker when its prefill ended.
    pub positions_per_worker: Vec<usize>,
}

/// KV blocks (of 16) for each worker of a split run of `n` prompt tokens.
fn long_blocks(o: &LongBenchOptions, n: usize) -> usize {
    (((n + o.decode_steps + 1) as f64 * o.kv_share).ceil() as usize).div_ceil(16) + 1
}

/// Runs [`LongBenchOptions`]: first one worker, with the KV each worker has in the longest
/// split run, at the longest prompt that KV holds; then each prompt length split over
/// `workers` workers.
pub fn run_long(o: &LongBenchOptions) -> anyhow::Result<Vec<LongBenchRow>> {
    use crate::driver::Driver;
    let cfg = switchyard_worker::engine::read_config(&o.model)?;
    let kv_bytes_per_token =
        switchyard_worker::kv::KvCache::new(&cfg, 1, 16, Default::default(), false)
            .bytes_per_position();
    let longest = o.prompt_tokens.iter().copied().max().unwrap_or(1);
    let big = long_blocks(o, longest);
    let mut runs = vec![(1, (big * 16).saturating_sub(o.decode_steps + 1), big)];
    runs.extend(
        o.prompt_tokens
            .iter()
            .map(|&n| (o.workers, n, long_blocks(o, n))),
    );
    let mut rows = Vec::new();
    for (k, n, blocks) in runs {
        let workers = crate::local::LocalWorkers::spawn(&o.model, k, &[])?;
        let cluster =
            crate::remote::GrpcCluster::connect(&workers.urls(), &o.model, 0, blocks, 16)?;
        let mut d = Driver::new(cluster, o.chunk, 1).with_context_parallel(k > 1);
        let mut rng = Rng::new(3);
        let prompt = (0..n)
            .map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32)
            .collect();
        let t0 = Instant::now();
        d.submit(GenRequest::greedy(1, prompt, o.decode_steps))?;
        let mut at = Vec::new();
        let mut held = Vec::new();
        while !d.is_idle() {
            let emitted = d.step()?;
            if !emitted.is_empty() {
                if at.is_empty() {
                    held = d.kv_used().iter().map(|b| *b as usize * 16).collect();
                }
                at.push(Instant::now());
            }
        }
        let prefill_s = at.first().map_or(0.0, |t| (*t - t0).as_secs_f64());
        let mut gaps: Vec<f64> = at
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64() * 1e3)
            .collect();
        gaps.sort_by(f64::total_cmp);
        let pct = |q: f64| {
            gaps.get(((gaps.len().max(1) - 1) as f64 * q).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        rows.push(LongBenchRow {
            workers: k,
            prompt_tokens: n,
            prefill_s,
            prefill_tok_s: n as f64 / prefill_s.max(1e-9),
            itl_ms_p50: pct(0.5),
            itl_ms_p99: pct(0.99),
            kv_bytes_per_token,
            positions_per_worker: held,
        });
        drop(d);
        drop(workers);
    }
    Ok(rows)
}

/// Short streams beside one long prefill split over the workers: their inter-token latency
/// alone and while the long prompt is prefilled (paced, as the server paces), in one run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BesideReport {
    pub workers: usize,
    pub streams: usize,
    pub long_prompt_tokens: usize,
    pub itl_ms_p50_alone: f64,
    pub itl_ms_p99_alone: f64,
    pub itl_ms_p50_beside: f64,
    pub itl_ms_p99_beside: f64,
    /// The long prompt's submission to its first token.
    pub long_prefill_s: f64,
}

/// `o.streams` streams of 16-token prompts decode alone for 64 tokens each, then beside a
/// `long` prompt split over `o.workers` workers until its first token; pacing factor 2 (the
/// server's default).
pub fn run_long_beside(
    o: &LongBenchOptions,
    streams: usize,
    long: usize,
) -> anyhow::Result<BesideReport> {
    use crate::driver::Driver;
    let cfg = switchyard_worker::engine::read_config(&o.model)?;
    let workers = crate::local::LocalWorkers::spawn(&o.model, o.workers, &[])?;
    // Room for each stream to decode up to STREAM_TOKENS beside the long prompt.
    const STREAM_TOKENS: usize = 8192;
    let blocks = long_blocks(o, long) + (streams * (STREAM_TOKENS + 16)).div_ceil(16);
    let cluster = crate::remote::GrpcCluster::connect(&workers.urls(), &o.model, 0, blocks, 16)?;
    let mut d = Driver::new(cluster, o.chunk, streams + 1)
        .with_context_parallel(true)
        .with_pacing(2.0, crate::scheduler::attention_equivalent(&cfg));
    let mut rng = Rng::new(5);
    let mut prompt = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32)
            .collect()
    };
    for id in 0..streams as u64 {
        d.submit(GenRequest::greedy(id, prompt(16), STREAM_TOKENS))?;
    }
    warm_up(&mut d, streams, 4)?;
    let mut last: HashMap<u64, Instant> = HashMap::new();
    // Gaps between consecutive tokens of each stream, while `until` says go on.
    let mut gaps = |d: &mut Driver, until: &mut dyn FnMut(&[crate::driver::Emitted]) -> bool| {
        let mut g = Vec::new();
        loop {
            let emitted = d.step()?;
            let now = Instant::now();
            for e in emitted.iter().filter(|e| (e.id as usize) < streams) {
                if let Some(t) = last.insert(e.id, now) {
                    g.push((now - t).as_secs_f64() * 1e3);
                }
            }
            if !until(&emitted) {
                return anyhow::Ok(g);
            }
        }
    };
    let mut n = 0;
    let alone = gaps(&mut d, &mut |e| {
        n += e.len();
        n < 64 * streams
    })?;
    let long_id = streams as u64;
    let t0 = Instant::now();
    d.submit(GenRequest::greedy(long_id, prompt(long), 1))?;
    let beside = gaps(&mut d, &mut |e| !e.iter().any(|e| e.id == long_id))?;
    let long_prefill_s = t0.elapsed().as_secs_f64();
    let pct = |mut v: Vec<f64>, q: f64| {
        v.sort_by(f64::total_cmp);
        v.get(((v.len().max(1) - 1) as f64 * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Ok(BesideReport {
        workers: o.workers,
        streams,
        long_prompt_tokens: long,
        itl_ms_p50_alone: pct(alone.clone(), 0.5),
        itl_ms_p99_alone: pct(alone, 0.99),
        itl_ms_p50_beside: pct(beside.clone(), 0.5),
        itl_ms_p99_beside: pct(beside, 0.99),
        long_prefill_s,
    })
}

/// `switchyard bench-rebalance`: a skewed workload on local workers before and after a live
/// expert re-placement, measured in the same run.
#[derive(Clone, Debug)]
pub struct RebalanceBenchOptions {
    pub model: PathBuf,
    pub workers: usize,
    /// Compute threads per worker process (each worker stands for one device).
    pub worker_threads: usize,
    pub redundant: usize,
    pub batch: usize,
    pub prompt_tokens: usize,
    /// Distinct prompt tokens across the batch (fewer: more skewed routing).
    pub distinct_tokens: usize,
    pub decode_steps: usize,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct RebalancePhase {
    pub decode_tok_s: f64,
    pub step_ms: f64,
    /// Busiest worker's expert load over the mean worker's, from the tokens actually routed
    /// during the phase (mean over MoE layers).
    pub max_over_mean: f64,
    /// CPU seconds each worker process used during the phase.
    pub worker_cpu_s: Vec<f64>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct RebalanceBenchReport {
    pub workers: usize,
    pub worker_threads: usize,
    pub redundant: usize,
    pub batch: usize,
    pub before: RebalancePhase,
    pub after: RebalancePhase,
    /// Predicted by the planner from the load average at the switch.
    pub predicted_max_over_mean: f64,
    pub experts_moved: usize,
    /// Steps from the plan to the switch (ranks loading the new experts meanwhile).
    pub transition_steps: usize,
    /// Longest step during the transition, over the median step before it.
    pub transition_max_step_ratio: f64,
    /// The same workload and phases on a fresh cluster without the switch: how much the
    /// second phase differs from the first by itself (longer contexts, drifting routing).
    pub control_before: RebalancePhase,
    pub control_after: RebalancePhase,
}

impl RebalanceBenchReport {
    /// Throughput change the switch caused: (after/before) over the control's (after/before).
    pub fn throughput_effect(&self) -> f64 {
        (self.after.decode_tok_s / self.before.decode_tok_s)
            / (self.control_after.decode_tok_s / self.control_before.decode_tok_s)
    }
}

struct RebalanceRun {
    before: RebalancePhase,
    after: RebalancePhase,
    plan: crate::driver::RebalanceReport,
    transition_steps: usize,
    transition_max_step_ratio: f64,
}

/// Tokens routed per expert between two cumulative snapshots, `[layer][expert]`.
fn load_between(a: &[Vec<u64>], b: &[Vec<u64>]) -> Vec<Vec<f64>> {
    b.iter()
        .enumerate()
        .map(|(l, row)| {
            row.iter()
                .enumerate()
                .map(|(e, &n)| (n - a.get(l).and_then(|r| r.get(e)).copied().unwrap_or(0)) as f64)
                .collect()
        })
        .collect()
}

pub fn run_rebalance(o: &RebalanceBenchOptions) -> anyhow::Result<RebalanceBenchReport> {
    let control = rebalance_run(o, false)?;
    let r = rebalance_run(o, true)?;
    Ok(RebalanceBenchReport {
        workers: o.workers,
        worker_threads: o.worker_threads,
        redundant: o.redundant,
        batch: o.batch,
        before: r.before,
        after: r.after,
        predicted_max_over_mean: r.plan.imbalance_after,
        experts_moved: r.plan.moved,
        transition_steps: r.transition_steps,
        transition_max_step_ratio: r.transition_max_step_ratio,
        control_before: control.before,
        control_after: control.after,
    })
}

fn rebalance_run(o: &RebalanceBenchOptions, switch: bool) -> anyhow::Result<RebalanceRun> {
    use crate::driver::Driver;
    use crate::rebalance::RebalancePolicy;
    let cfg = switchyard_worker::engine::read_config(&o.model)?;
    let env = [(
        "RAYON_NUM_THREADS".to_string(),
        o.worker_threads.to_string(),
    )];
    let workers = crate::local::LocalWorkers::spawn_with_env(&o.model, o.workers, &[], &env)?;
    let total_steps = 2 * o.decode_steps + 64;
    let blocks = (o.batch * (o.prompt_tokens + total_steps + 8)).div_ceil(16) + 16;
    let cluster =
        crate::remote::GrpcCluster::connect(&workers.urls(), &o.model, o.redundant, blocks, 16)?;
    let policy = RebalancePolicy {
        threshold: f64::INFINITY,
        window: 16,
        ..Default::default()
    };
    let mut d = Driver::new(cluster, o.batch * o.prompt_tokens.max(1), o.batch).with_rebalancing(
        cfg.clone(),
        o.redundant,
        policy,
    );
    let mut rng = Rng::new(7);
    let pool: Vec<u32> = (0..o.distinct_tokens.max(1))
        .map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32)
        .collect();
    for id in 0..o.batch as u64 {
        let prompt = (0..o.prompt_tokens)
            .map(|i| pool[(i + id as usize) % pool.len()])
            .collect();
        d.submit(GenRequest::greedy(id, prompt, total_steps))?;
    }
    warm_up(&mut d, o.batch, 16)?;
    let phase = |d: &mut Driver| -> anyhow::Result<(RebalancePhase, Vec<f64>)> {
        let start = d.snapshot();
        let cpu0 = workers.cpu_seconds();
        let (mut tokens, mut steps) = (0usize, Vec::new());
        let t0 = Instant::now();
        for _ in 0..o.decode_steps {
            tokens += d.step()?.len();
            steps.push(d.last_step().seconds);
        }
        let elapsed = t0.elapsed().as_secs_f64();
        let end = d.snapshot();
        let load = load_between(&start.expert_load, &end.expert_load);
        Ok((
            RebalancePhase {
                decode_tok_s: tokens as f64 / elapsed,
                step_ms: elapsed / o.decode_steps as f64 * 1e3,
                max_over_mean: crate::placement::imbalance(&end.holders, &load, o.workers),
                worker_cpu_s: workers
                    .cpu_seconds()
                    .iter()
                    .zip(&cpu0)
                    .map(|(b, a)| b - a)
                    .collect(),
            },
            steps,
        ))
    };
    let (before, mut steps) = phase(&mut d)?;
    steps.sort_by(f64::total_cmp);
    let median = steps[steps.len() / 2];
    let plan = if switch {
        d.rebalance_now()?
    } else {
        Default::default()
    };
    let (mut transition_steps, mut longest) = (0, 0.0f64);
    while d.switching() {
        d.step()?;
        transition_steps += 1;
        longest = longest.max(d.last_step().seconds);
    }
    // The switch step itself, and one after it.
    for _ in 0..2 {
        d.step()?;
        longest = longest.max(d.last_step().seconds);
    }
    let (after, _) = phase(&mut d)?;
    Ok(RebalanceRun {
        before,
        after,
        plan,
        transition_steps,
        transition_max_step_ratio: longest / median,
    })
}
