//! The public `switchyard.v1.Inference` gRPC service over a [`Driver`].
//!
//! The driver is synchronous and owns the cluster: it runs on its own thread (the engine loop),
//! which takes submissions and cancellations from a channel, steps while any request is live,
//! and sends each request's tokens to its handler. Each `Generate` handler validates the
//! request (INVALID_ARGUMENT naming the field), tokenizes, streams `Started`, then `Delta`s built
//! by [`OutputText`] (reasoning split, stop strings held back), then one `Finished`. A client
//! that goes away, or a stop string, cancels the request in the driver at once (its KV blocks
//! are freed with the next step).

use crate::api::{ApiError, Call, Events};
use crate::driver::{Cluster, Driver, Emitted, GenRequest, RebalanceReport, Snapshot};
use crate::generate::{self, Prompt, Request as GenReq};
use crate::metrics::{Metrics, WorkerKv};
use crate::recovery::{Action, Event as Fault, Recovery};
use crate::text::{CallRecord, Chat, Message, OutputText, Tokenizer};
use crate::GenerateError;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;
use switchyard_kernels::sampling::SamplingParams;
use switchyard_proto::cluster::v1::{HeldSeq, SampledToken, SeqRequest};
use switchyard_proto::v1::generate_request::Input;
use switchyard_proto::v1::generate_response::Event;
use switchyard_proto::v1::inference_server::{Inference, InferenceServer};
use switchyard_proto::v1::*;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// What the engine loop sends a request's handler: its tokens, or why it failed.
type Sink = tokio::sync::mpsc::UnboundedSender<Result<Emitted, ApiError>>;

/// A reply to an operator command.
type Reply<T> = tokio::sync::oneshot::Sender<Result<T, String>>;

enum Cmd {
    /// A request to run; with the tokens generated for it before when it is started again
    /// from what its client received ([`Driver::resubmit`]).
    Submit(GenRequest, Option<Vec<u32>>, Sink),
    Cancel(u64),
    /// Rebuild the cluster from the factory now (a worker joined or was drained); replies
    /// with the new epoch and world size. Asked at the instant given: a rebuild that happened
    /// since (e.g. recovering from the step the same event failed) already satisfies it.
    Rebuild(Instant, Option<Reply<(u64, usize)>>),
    /// Plan a re-placement of experts for the current load and start it if better.
    Rebalance(Reply<RebalanceReport>),
    /// Stop for good (leadership lost): every request in flight fails with the reason and the
    /// loop ends, so nothing waits on a coordinator that may no longer drive its workers.
    Stop(String),
}

/// Builds a new cluster from the ranks still reachable (after a failed step, a join or a
/// drain).
/// It is handed what the old epoch can pass on ([`Driver::carry`]): each survivor keeps its
/// sequences and experts.
type Recover = Box<
    dyn FnMut(&crate::driver::Carry) -> Result<Box<dyn Cluster>, crate::driver::DriverError> + Send,
>;

/// Replaces the driver's cluster with a fresh one from `recover` (requests re-homed); on
/// failure the old one is kept and the error returned.
fn rebuild(
    driver: &mut Driver,
    recover: &mut Recover,
    why: &str,
    sinks: &mut HashMap<u64, Sink>,
) -> Result<(), String> {
    let (kept, reprefilled) = driver.recovered();
    match recover(&driver.carry()) {
        Ok(c) => {
            for (id, e) in driver.rebuild(c) {
                if let Some(sink) = sinks.remove(&id) {
                    let _ = sink.send(Err(ApiError::bad_request(e.to_string())));
                }
            }
            let (kept_now, reprefilled_now) = driver.recovered();
            tracing::warn!(
                world = driver.snapshot().addresses.len(),
                kept = kept_now - kept,
                reprefilled = reprefilled_now - reprefilled,
                "cluster rebuilt after {why}; requests re-homed"
            );
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "rebuild after {why} failed");
            Err(e.to_string())
        }
    }
}

/// Ends every request in flight with UNAVAILABLE and `why`. Callers publish the unavailable
/// state first, so a client that sees its stream fail and retries at once is refused too.
fn fail_all(driver: &mut Driver, sinks: &mut HashMap<u64, Sink>, why: &str) {
    tracing::error!("{why}; failing the requests in flight");
    for (id, sink) in sinks.drain() {
        let _ = sink.send(Err(ApiError::unavailable(why.to_string())));
        driver.cancel(id);
    }
}

/// What may stop the engine loop from stepping: a leadership that is not fresh, or a fault
/// injected by the supervision tests.
struct LoopGates {
    panic_after_steps: Option<u64>,
    may_drive: Option<tokio::sync::watch::Receiver<bool>>,
}

/// The engine loop's I/O around the [`Recovery`] machine: what it acts on.
struct Shell<'a> {
    driver: Driver,
    recover: Recover,
    sinks: HashMap<u64, Sink>,
    /// The operator waiting on the membership rebuild in progress (a drain).
    reply: Option<Reply<(u64, usize)>>,
    snapshot: &'a std::sync::Mutex<Snapshot>,
    metrics: &'a Metrics,
}

impl Shell<'_> {
    fn publish(&self, unavailable: Option<&str>) {
        let mut s = self.driver.snapshot();
        s.unavailable = unavailable.unwrap_or_default().to_string();
        self.metrics.on_recovered(&s);
        *self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }

    /// Feeds `e` to the machine and carries out what it asks (a rebuild's outcome is fed
    /// back at once); false once the loop must stop.
    fn on(&mut self, rec: &mut Recovery, e: Fault) -> bool {
        let mut todo: std::collections::VecDeque<Action> =
            rec.on(e, Instant::now()).into_iter().collect();
        while let Some(a) = todo.pop_front() {
            match a {
                Action::Rebuild { why } => {
                    let r = rebuild(&mut self.driver, &mut self.recover, why, &mut self.sinks);
                    todo.extend(rec.on(Fault::Rebuilt(r), Instant::now()));
                }
                Action::FailAll(why) => fail_all(&mut self.driver, &mut self.sinks, &why),
                Action::Reply(r) => {
                    if let Some(reply) = self.reply.take() {
                        let s = self.driver.snapshot();
                        let _ = reply.send(r.map(|()| (s.epoch, s.addresses.len())));
                    }
                }
                Action::Publish => self.publish(rec.unavailable()),
                Action::Available => tracing::warn!("cluster available again"),
                Action::Stop => return false,
            }
        }
        true
    }
}

/// Runs the driver loop on the current thread until the command channel closes (or
/// leadership is lost). What to do about faults is decided by [`Recovery`]; this is its
/// shell: commands in, steps, and the actions carried out.
///
/// Unavailable state: when a failed step cannot be recovered from (no cluster can be built
/// from the workers left, e.g. they cannot hold every expert), every request in flight fails
/// with UNAVAILABLE and the reason, new requests are refused the same way, and the loop
/// retries the rebuild every second (and at once on a join) until it succeeds.
fn engine_loop(
    driver: Driver,
    rx: mpsc::Receiver<Cmd>,
    snapshot: Arc<std::sync::Mutex<Snapshot>>,
    metrics: Arc<Metrics>,
    recover: Recover,
    gates: LoopGates,
    sinks: HashMap<u64, Sink>,
) {
    let LoopGates {
        panic_after_steps,
        may_drive,
    } = gates;
    let mut steps = 0u64;
    let mut paused = false;
    let mut rec = Recovery::new(Instant::now());
    let mut sh = Shell {
        driver,
        recover,
        sinks,
        reply: None,
        snapshot: &snapshot,
        metrics: &metrics,
    };
    sh.publish(None);
    loop {
        // Wait for a command: while unavailable until the next retry, while idle for ever.
        let first = if let Some(at) = rec.next_retry() {
            match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                Ok(c) => Some(c),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        } else if sh.driver.is_idle() {
            match rx.recv() {
                Ok(c) => Some(c),
                Err(_) => return,
            }
        } else {
            None
        };
        for c in first.into_iter().chain(rx.try_iter()) {
            match c {
                Cmd::Submit(r, generated, sink) => match rec.unavailable() {
                    Some(why) => {
                        let _ = sink.send(Err(ApiError::unavailable(why.to_string())));
                    }
                    None => {
                        let id = r.id;
                        let started = match generated {
                            None => sh.driver.submit(r),
                            Some(g) => sh.driver.resubmit(r, g),
                        };
                        match started {
                            Ok(()) => {
                                sh.sinks.insert(id, sink);
                            }
                            Err(e) => {
                                let _ = sink.send(Err(ApiError::bad_request(e.to_string())));
                            }
                        }
                    }
                },
                Cmd::Cancel(id) => {
                    sh.sinks.remove(&id);
                    sh.driver.cancel(id);
                }
                Cmd::Rebuild(asked, reply) => {
                    let operator = reply.is_some();
                    sh.reply = reply;
                    if !sh.on(&mut rec, Fault::MembershipChanged { asked, operator }) {
                        return;
                    }
                }
                Cmd::Stop(why) => {
                    sh.on(&mut rec, Fault::LeadershipLost(why));
                    return;
                }
                Cmd::Rebalance(reply) => {
                    let r = if rec.unavailable().is_some() {
                        Err("the cluster is unavailable".into())
                    } else {
                        sh.driver.rebalance_now().map_err(|e| e.to_string())
                    };
                    let _ = reply.send(r);
                }
            }
        }
        if !rec.may_step() {
            if !sh.on(&mut rec, Fault::Tick) {
                return;
            }
            continue;
        }
        if let Some(g) = &may_drive {
            let drive = *g.borrow();
            if drive == paused {
                paused = !drive;
                if paused {
                    tracing::warn!("leadership not renewed in time: pausing steps");
                } else {
                    tracing::info!("leadership renewed: stepping again");
                }
            }
            if paused {
                std::thread::sleep(std::time::Duration::from_millis(20));
                continue;
            }
        }
        steps += 1;
        if panic_after_steps.is_some_and(|n| steps > n) {
            panic!("fault injected after {} steps", steps - 1);
        }
        let driver = &mut sh.driver;
        let stepped = driver.step();
        let snap = driver.snapshot();
        metrics.on_step(
            &driver.last_step(),
            driver.queue(),
            snap.kv_used
                .iter()
                .enumerate()
                .map(|(r, &used)| WorkerKv {
                    worker: r.to_string(),
                    used,
                    total: snap.kv_total as u32,
                    prefix: snap.prefix_cache.get(r).copied().unwrap_or_default(),
                })
                .collect(),
            &snap.expert_load,
        );
        metrics.on_recovered(&snap);
        *snapshot.lock().unwrap_or_else(|e| e.into_inner()) = snap;
        match stepped {
            Ok(emitted) => {
                sh.on(&mut rec, Fault::StepOk);
                let driver = &mut sh.driver;
                if emitted.is_empty() && driver.switching() && driver.queue() == (0, 0) {
                    // Idle but for an expert switch: poll the ranks gently until it lands.
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                for e in emitted {
                    let (id, finished) = (e.id, e.finished);
                    let gone = match sh.sinks.get(&id) {
                        Some(s) => s.send(Ok(e)).is_err(),
                        None => true,
                    };
                    if finished || gone {
                        sh.sinks.remove(&id);
                        if gone && !finished {
                            driver.cancel(id);
                        }
                    }
                }
                for (id, why) in driver.take_errors() {
                    if let Some(s) = sh.sinks.remove(&id) {
                        let _ = s.send(Err(ApiError::internal(why)));
                    }
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "step failed");
                if !sh.on(&mut rec, Fault::StepFailed(err.to_string())) {
                    return;
                }
            }
        }
    }
}

/// How the engine loop batches and admits.
#[derive(Clone, Debug)]
pub struct ServiceOptions {
    /// Tokens computed per step across the cluster.
    pub token_budget: usize,
    /// Requests in flight (queued or running) beyond this get RESOURCE_EXHAUSTED.
    pub max_in_flight: usize,
    /// Prefill pacing (see `pacer`): a step beside decodes takes about this many times a
    /// decode-only step; 0 disables pacing (prefill uses the whole token budget).
    pub pace_factor: f64,
    /// Home sequences by cached prefix against load, with this weight on load
    /// (`Driver::with_prefix_homing`); `None`: by free blocks.
    pub prefix_homing: Option<f64>,
    /// Context parallelism (`Driver::with_context_parallel`): a request may span the
    /// cluster's KV, not one worker's.
    pub context_parallel: bool,
    /// Extra expert replicas per layer (placement at start, rebuilds and rebalancing).
    pub redundant: usize,
    /// Live rebalancing (threshold INFINITY: only on an operator's request).
    pub rebalance: crate::rebalance::RebalancePolicy,
    /// Most tokens (prompt + max_tokens) a request may span; `None`: the model's context or
    /// what one sequence's KV may take (one worker's, or the cluster's with context
    /// parallelism), whichever is smaller. A value the KV cannot hold is
    /// refused at start.
    pub max_model_len: Option<usize>,
    /// How the model writes tool calls (`None`: `Tokenizer::tool_format`, detected).
    pub tool_format: Option<crate::text::tools::ToolFormat>,
    /// Fault injection for the supervision tests: the engine loop panics after this many
    /// steps.
    pub panic_after_steps: Option<u64>,
    /// While this reads false the engine loop does not step (its leadership could not be
    /// renewed in time, so a standby may be about to take over); requests wait.
    pub may_drive: Option<tokio::sync::watch::Receiver<bool>>,
    /// How long a request adopted from a previous leader runs on without a client before it
    /// is cancelled (its client has that long to call Resume).
    pub resume_grace: std::time::Duration,
}

/// Requests adopted from a previous leader that no client has resumed yet, by request id.
type Parking = Arc<std::sync::Mutex<HashMap<String, Parked>>>;

/// An adopted request waiting for its client: its tokens so far are already queued in `rx`
/// (then the ones generated meanwhile).
struct Parked {
    job: Job,
    rx: tokio::sync::mpsc::UnboundedReceiver<Result<Emitted, ApiError>>,
    /// Tokens generated before the takeover, and the first of them whose log-probability is
    /// known (the workers keep the last `RECENT_LOGPROBS` tokens').
    known: usize,
    logprobs_from: usize,
    owner: String,
    since: Instant,
    admitted: InFlight,
}

/// Adopts every sequence the driver's first cluster kept from a previous leader
/// ([`Driver::adopt`]) and parks its request for [`Inference::resume`]. Returns the engine
/// loop's sinks for them, and the first request id above every adopted one.
fn adopt_all(
    d: &mut Driver,
    tok: &Arc<Tokenizer>,
    grammars: &crate::constrain::GrammarCell,
    parking: &Parking,
    in_flight: &Arc<std::sync::atomic::AtomicUsize>,
) -> (HashMap<u64, Sink>, u64) {
    let mut sinks = HashMap::new();
    let mut next = 1;
    let mut parked = parking.lock().unwrap_or_else(|e| e.into_inner());
    let (mut kept, mut reprefilled, mut done) = (0, 0, 0);
    for (rank, h) in d.take_adopted() {
        let HeldSeq {
            seq_id: id,
            tokens,
            cached,
            request,
            last,
            recent,
        } = h;
        let Some(journal) = request else { continue };
        next = next.max(id + 1);
        let prompt = journal.prompt.len();
        let generated: Vec<u32> = if tokens.len() > prompt && tokens.starts_with(&journal.prompt) {
            tokens[prompt..].to_vec()
        } else {
            vec![]
        };
        let job = Job::of(id, &journal);
        let owner = journal.owner.clone();
        let constraint = grammars.for_request(
            tok,
            &journal.grammar,
            &journal.prompt,
            journal.max_reasoning_tokens,
        );
        let (constraint, broken) = match constraint {
            Ok(c) => (c, None),
            Err(e) => (None, Some(e.to_string())),
        };
        let outcome = d.adopt(
            gen_request(id, journal, &tok.eos_ids, constraint),
            tokens,
            rank,
            cached as usize,
        );
        if let Some(why) = broken {
            d.fail(id, why);
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let n = generated.len();
        let recent = if recent.is_empty() {
            last.into_iter().collect()
        } else {
            recent
        };
        let scored = scored_tail(&generated, &recent);
        let logprobs_from = n - scored.len();
        for (i, &token) in generated.iter().enumerate() {
            let l = i.checked_sub(logprobs_from).map(|j| &scored[j]);
            let _ = tx.send(Ok(Emitted {
                id,
                token,
                finished: outcome == crate::driver::Adopted::Finished && i + 1 == n,
                logprob: l.map_or(f32::NAN, |l| l.logprob),
                top: l.map_or(vec![], |l| {
                    l.top.iter().map(|x| (x.token, x.logprob)).collect()
                }),
            }));
        }
        match outcome {
            crate::driver::Adopted::Kept => kept += 1,
            crate::driver::Adopted::Reprefilled => reprefilled += 1,
            crate::driver::Adopted::Finished => done += 1,
            crate::driver::Adopted::Refused => {
                let _ = tx.send(Err(ApiError::failed_precondition(
                    "this coordinator cannot run the request it took over (its length \
                     exceeds what one sequence's KV may take here)",
                )));
            }
        }
        if matches!(
            outcome,
            crate::driver::Adopted::Kept | crate::driver::Adopted::Reprefilled
        ) {
            sinks.insert(id, tx);
        }
        in_flight.fetch_add(1, Ordering::AcqRel);
        let p = Parked {
            known: n,
            logprobs_from,
            job,
            rx,
            owner,
            since: Instant::now(),
            admitted: InFlight(in_flight.clone()),
        };
        if let Some(old) = parked.insert(p.job.request_id.clone(), p) {
            tracing::warn!(
                request_id = %old.job.request_id,
                "two adopted requests share an id; only the later one can be resumed"
            );
            sinks.remove(&old.job.id);
            d.cancel(old.job.id);
        }
    }
    if kept + reprefilled + done > 0 {
        tracing::warn!(
            kept,
            reprefilled,
            finished = done,
            "took over the requests a previous leader left on the workers; they wait for \
             their clients to resume them"
        );
    }
    (sinks, next)
}

/// The log-probabilities a worker kept (`recent`, oldest first) for the newest of the
/// `generated` tokens: the longest tail of `recent` whose tokens end `generated`.
fn scored_tail<'a>(generated: &[u32], recent: &'a [SampledToken]) -> &'a [SampledToken] {
    let k = generated
        .iter()
        .rev()
        .zip(recent.iter().rev())
        .take_while(|(g, r)| **g == r.token)
        .count();
    &recent[recent.len() - k..]
}

/// Cancels adopted requests no client resumed within `grace`; stops with the service.
fn spawn_reaper(parking: &Parking, grace: std::time::Duration, cmds: mpsc::Sender<Cmd>) {
    let weak = Arc::downgrade(parking);
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_millis(500).min(grace));
        let Some(p) = weak.upgrade() else { return };
        let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
        p.retain(|rid, x| {
            let keep = x.since.elapsed() < grace;
            if !keep {
                tracing::warn!(request_id = %rid, "no client resumed an adopted request in time; cancelling it");
                let _ = cmds.send(Cmd::Cancel(x.job.id));
            }
            keep
        });
    });
}

/// Why the engine loop stopped for good (it panicked), once it has.
pub type EngineFailure = tokio::sync::watch::Receiver<Option<String>>;

/// The longest context the service accepts: `explicit`, checked against the model's context
/// and one worker's KV capacity (`kv_tokens`), or the smaller of the two.
pub fn max_model_len(
    explicit: Option<usize>,
    model_context: usize,
    kv_tokens: usize,
    block_size: usize,
    sharers: usize,
) -> Result<usize, String> {
    match explicit {
        None => Ok(model_context.min(kv_tokens)),
        Some(0) => Err("--max-model-len must be at least 1".into()),
        Some(n) if n > model_context => Err(format!(
            "--max-model-len {n} exceeds the model's context ({model_context} tokens, \
             max_position_embeddings); lower it"
        )),
        Some(n) if n > kv_tokens => Err(format!(
            "--max-model-len {n} exceeds what one sequence's KV may take ({kv_tokens} tokens = \
             {} blocks of {block_size}: one worker's, or every worker's with \
             --context-parallel); raise --kv-blocks to at least {} or lower --max-model-len to \
             {kv_tokens}",
            kv_tokens / block_size.max(1),
            n.div_ceil(block_size.max(1)).div_ceil(sharers.max(1))
        )),
        Some(n) => Ok(n),
    }
}

/// A panic's message, as far as it has one.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

pub struct InferenceService {
    model_name: String,
    tok: Arc<Tokenizer>,
    cfg: switchyard_worker::ModelConfig,
    cmds: std::sync::Mutex<mpsc::Sender<Cmd>>,
    next_id: AtomicU64,
    snapshot: Arc<std::sync::Mutex<Snapshot>>,
    /// Admission bound: requests in flight (queued or running) beyond this are refused with
    /// RESOURCE_EXHAUSTED.
    max_in_flight: usize,
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// Requests adopted from a previous leader, by request id, until their clients resume.
    parked: Parking,
    roster: Arc<std::sync::Mutex<Roster>>,
    metrics: Arc<Metrics>,
    keys: Option<Arc<crate::auth::ApiKeys>>,
    /// Prompt + max_tokens of one request, at most.
    max_model_len: usize,
    failed: EngineFailure,
    grammars: crate::constrain::GrammarCell,
}

/// Which member serves each control URL, and which members are registered now (membership's
/// view). Empty `ids`: every rank is listed as `rank-N`.
#[derive(Clone, Debug, Default)]
pub struct Roster {
    pub ids: HashMap<String, String>,
    pub live: std::collections::BTreeSet<String>,
    /// Members an operator drained (left out of the cluster until they re-register).
    pub drained: std::collections::BTreeSet<String>,
}

/// Counts a request as in flight until dropped.
struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl InferenceService {
    /// Starts the engine loop; `make_cluster` runs on the loop's thread, first to start, then
    /// again to recover after a failed step (a lost rank): it should build the cluster from
    /// the ranks still reachable.
    pub fn start<C: Cluster + 'static>(
        model_dir: &std::path::Path,
        model_name: String,
        mut make_cluster: impl FnMut(&crate::driver::Carry) -> Result<C, crate::driver::DriverError>
            + Send
            + 'static,
        opts: ServiceOptions,
    ) -> anyhow::Result<Self> {
        let ServiceOptions {
            token_budget,
            max_in_flight,
            pace_factor,
            prefix_homing,
            context_parallel,
            redundant,
            rebalance,
            max_model_len: explicit_len,
            tool_format,
            panic_after_steps,
            may_drive,
            resume_grace,
        } = opts;
        let mut tok = Tokenizer::load(model_dir)?;
        if let Some(f) = tool_format {
            tok.tool_format = f;
        }
        tracing::info!(format = tok.tool_format.name(), "tool calls");
        let tok = Arc::new(tok);
        let cfg = switchyard_worker::engine::read_config(model_dir)?;
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let snapshot = Arc::new(std::sync::Mutex::new(Snapshot::default()));
        let snap = snapshot.clone();
        let attn_equiv = crate::scheduler::attention_equivalent(&cfg);
        let metrics = Arc::new(Metrics::default());
        let m = metrics.clone();
        let model_cfg = cfg.clone();
        let (failed_tx, failed) = tokio::sync::watch::channel(None);
        let parked: Parking = Arc::default();
        let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let grammars = crate::constrain::GrammarCell::default();
        let (parking, in_flight_adopt, tok_adopt, grammars_adopt) = (
            parked.clone(),
            in_flight.clone(),
            tok.clone(),
            grammars.clone(),
        );
        std::thread::spawn(
            move || match make_cluster(&crate::driver::Carry::takeover()) {
                Ok(c) => {
                    let shape = c.kv_shape();
                    let mut d = Driver::new(c, token_budget, 256)
                        .with_model_limits(&model_cfg)
                        .with_rebalancing(model_cfg, redundant, rebalance)
                        .with_prefix_homing(prefix_homing)
                        .with_context_parallel(context_parallel);
                    if pace_factor > 0.0 {
                        d = d.with_pacing(pace_factor, attn_equiv);
                    }
                    // What a previous leader left running: adopted before the first step,
                    // each parked until its client resumes it.
                    let (sinks, next) = adopt_all(
                        &mut d,
                        &tok_adopt,
                        &grammars_adopt,
                        &parking,
                        &in_flight_adopt,
                    );
                    // ClusterStatus shows the cluster from the moment the service is ready.
                    *snap.lock().unwrap_or_else(|e| e.into_inner()) = d.snapshot();
                    let sharers = d.capacity_tokens() / (shape.0 * shape.1).max(1);
                    let _ = ready_tx.send(Ok((shape, sharers, next)));
                    let recover: Recover = Box::new(move |carry: &crate::driver::Carry| {
                        make_cluster(carry).map(|c| Box::new(c) as Box<dyn Cluster>)
                    });
                    // Supervision: a panic anywhere in the loop (a bug; no input should reach
                    // one) makes the service unavailable and reports the failure, so the process
                    // stops leading and exits instead of reading ready while every request fails.
                    let published = snap.clone();
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        engine_loop(
                            d,
                            rx,
                            snap,
                            m,
                            recover,
                            LoopGates {
                                panic_after_steps,
                                may_drive,
                            },
                            sinks,
                        )
                    }));
                    if let Err(p) = r {
                        let why = format!("the engine loop panicked: {}", panic_message(&*p));
                        tracing::error!("{why}");
                        published
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .unavailable = why.clone();
                        let _ = failed_tx.send(Some(why));
                    }
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                }
            },
        );
        let ((kv_blocks, block_size), sharers, next_id) =
            ready_rx.recv()?.map_err(anyhow::Error::msg)?;
        spawn_reaper(&parked, resume_grace, tx.clone());
        let kv_tokens = kv_blocks * block_size * sharers;
        let max_model_len = max_model_len(
            explicit_len,
            cfg.max_position_embeddings,
            kv_tokens,
            block_size,
            sharers,
        )
        .map_err(anyhow::Error::msg)?;
        tracing::info!(
            max_model_len,
            model_context = cfg.max_position_embeddings,
            kv_tokens_per_sequence = kv_tokens,
            "maximum context length"
        );
        Ok(InferenceService {
            model_name,
            tok,
            cfg,
            cmds: std::sync::Mutex::new(tx),
            next_id: AtomicU64::new(next_id),
            snapshot,
            max_in_flight,
            in_flight,
            parked,
            roster: Default::default(),
            metrics,
            keys: None,
            max_model_len,
            failed,
            grammars,
        })
    }

    /// Resolves, with the reason, once the engine loop has stopped for good.
    pub fn engine_failure(&self) -> EngineFailure {
        self.failed.clone()
    }

    /// Requires one of `keys` on every call (and limits each key's requests in flight).
    pub fn with_api_keys(mut self, keys: Option<Arc<crate::auth::ApiKeys>>) -> Self {
        self.keys = keys;
        self
    }

    /// Checks a caller's `authorization` value (`Bearer KEY`) when keys are required.
    pub fn authorize(&self, authorization: Option<&str>) -> Result<(), ApiError> {
        match &self.keys {
            Some(k) => k.check(authorization).map(|_| ()),
            None => Ok(()),
        }
    }

    /// The served model's name (as ListModels reports it).
    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// The longest context a request may span (prompt + max_tokens): `--max-model-len`.
    pub fn max_context(&self) -> usize {
        self.max_model_len
    }

    /// A token's text as it would appear in output (special tokens included).
    pub fn token_text(&self, id: u32) -> String {
        self.tok.decode(&[id], false).unwrap_or_default()
    }

    /// A handle that asks the engine loop to rebuild the cluster from its factory at the next
    /// step boundary (requests are re-homed, as after a lost rank).
    pub fn rebuilder(&self) -> impl Fn() + Send + Sync + 'static {
        let tx = self.cmds.lock().unwrap_or_else(|e| e.into_inner()).clone();
        move || {
            let _ = tx.send(Cmd::Rebuild(Instant::now(), None));
        }
    }

    /// The operator's handle on the engine loop (the Admin service's back end).
    pub fn control(&self) -> EngineControl {
        EngineControl {
            cmds: self.cmds.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            snapshot: self.snapshot.clone(),
        }
    }

    /// The service's metrics (served by `metrics::serve`).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The roster ClusterStatus reports from; the caller keeps it current with membership.
    pub fn roster(&self) -> Arc<std::sync::Mutex<Roster>> {
        self.roster.clone()
    }

    pub fn into_server(self) -> InferenceServer<Self> {
        InferenceServer::new(self)
    }

    /// UNAVAILABLE with the reason while the cluster cannot serve.
    fn check_available(&self) -> Result<(), ApiError> {
        let s = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        if s.unavailable.is_empty() {
            Ok(())
        } else {
            Err(ApiError::unavailable(s.unavailable.clone()))
        }
    }

    fn send(&self, c: Cmd) {
        let _ = self.cmds.lock().unwrap_or_else(|e| e.into_inner()).send(c);
    }

    /// Streams a request's output from the engine loop's tokens (`tok_rx`): `Started`, then a
    /// `Delta` per generated token (reasoning split, stop strings held back), then one
    /// `Finished`. The first `skip` tokens are the ones a resuming client already has: they go
    /// through the same text state without being sent, so the stream goes on exactly as the
    /// original would have. A client that goes away, a stop string or the deadline cancels the
    /// request in the driver.
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        job: Job,
        skip: usize,
        mut tok_rx: tokio::sync::mpsc::UnboundedReceiver<Result<Emitted, ApiError>>,
        t0: Instant,
        deadline: Option<tokio::time::Instant>,
        permits: (InFlight, Option<tokio::sync::OwnedSemaphorePermit>),
        span: tracing::Span,
    ) -> Events {
        let (out_tx, out_rx) = tokio::sync::mpsc::channel(64);
        let tok = self.tok.clone();
        let cmds = self.cmds.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let metrics = self.metrics.clone();
        let Job {
            id,
            request_id,
            prompt: ids,
            stop,
            ignore_eos,
            stream_ids,
            want_logprobs,
            stop_ids,
            tools,
        } = job;
        let call_ids = format!("call_{request_id}_");
        let prompt_tokens = ids.len() as u32;
        tokio::spawn(
            async move {
                let _permits = permits;
                let cancel = |cmds: &mpsc::Sender<Cmd>| {
                    let _ = cmds.send(Cmd::Cancel(id));
                };
                if out_tx
                    .send(ev(Event::Started(Started {
                        request_id,
                        prompt_tokens,
                        resumed_after: skip as u32,
                    })))
                    .await
                    .is_err()
                {
                    return cancel(&cmds);
                }
                let mut text = OutputText::new(&tok, &ids, stop);
                if let Some((format, parallel)) = tools {
                    text = text.with_tools(&tok, format, &call_ids, parallel);
                }
                let (mut completion, mut reasoning_tokens, mut ttft) = (0u32, 0u32, None);
                let mut reason = FinishReason::Length;
                let mut error = String::new();
                let mut last = Instant::now();
                let cancel = |cmds: &mpsc::Sender<Cmd>| {
                    metrics.on_finished("cancelled");
                    cancel(cmds)
                };
                // One timer for the request's whole life (armed only with a deadline).
                let expiry = tokio::time::sleep_until(deadline.unwrap_or_else(|| {
                    tokio::time::Instant::now() + std::time::Duration::from_secs(1 << 30)
                }));
                tokio::pin!(expiry);
                loop {
                    // A client that leaves is noticed at once, whether its request is queued,
                    // prefilling or decoding: its admission slot, key permit and KV go back
                    // now, not at its next token.
                    let next = tokio::select! {
                        biased;
                        _ = out_tx.closed() => return cancel(&cmds),
                        _ = &mut expiry, if deadline.is_some() => {
                            metrics.on_finished("deadline");
                            let _ = cmds.send(Cmd::Cancel(id));
                            let _ = out_tx
                                .send(Err(ApiError::deadline_exceeded(format!(
                                    "deadline passed after {completion} tokens"
                                ))))
                                .await;
                            return;
                        }
                        n = tok_rx.recv() => n,
                    };
                    let e = match next {
                        Some(Ok(e)) => e,
                        Some(Err(status)) => {
                            metrics.on_finished("error");
                            let _ = out_tx.send(Err(status)).await;
                            return;
                        }
                        None => {
                            // Dropped without a word (the engine loop stopped).
                            reason = FinishReason::Error;
                            error = "the engine stopped; see the coordinator's log".into();
                            break;
                        }
                    };
                    let (t, finished) = (e.token, e.finished);
                    let replay = (completion as usize) < skip;
                    let now = Instant::now();
                    if !replay {
                        metrics.on_token();
                        if completion as usize == skip {
                            metrics.ttft.observe((now - t0).as_secs_f64());
                        } else {
                            metrics.itl.observe((now - last).as_secs_f64());
                        }
                        ttft.get_or_insert_with(|| t0.elapsed().as_secs_f64() * 1e3);
                    }
                    last = now;
                    completion += 1;
                    if text.in_reasoning() {
                        reasoning_tokens += 1;
                    }
                    let is_eos = (!ignore_eos && tok.eos_ids.contains(&t)) || stop_ids.contains(&t);
                    let mut d = if is_eos {
                        Default::default()
                    } else {
                        text.push(&tok, t).unwrap_or_default()
                    };
                    let stop = is_eos || d.stopped;
                    if finished || stop {
                        if let Ok(tail) = text.finish(&tok) {
                            d.reasoning.push_str(&tail.reasoning);
                            d.text.push_str(&tail.text);
                            d.calls.extend(tail.calls);
                        }
                    }
                    if !replay {
                        let delta = Delta {
                            reasoning_text: d.reasoning,
                            text: d.text,
                            token_ids: if stream_ids { vec![t] } else { vec![] },
                            logprobs: if want_logprobs {
                                vec![TokenLogprob {
                                    token_id: t,
                                    logprob: e.logprob,
                                    top: e
                                        .top
                                        .iter()
                                        .map(|&(token_id, logprob)| TopLogprob {
                                            token_id,
                                            logprob,
                                        })
                                        .collect(),
                                }]
                            } else {
                                vec![]
                            },
                            completion_tokens: completion,
                            tool_calls: call_deltas(d.calls),
                        };
                        if out_tx.send(ev(Event::Delta(delta))).await.is_err() {
                            return cancel(&cmds);
                        }
                    }
                    if stop {
                        reason = if text.tool_calls() > 0 {
                            FinishReason::ToolCalls
                        } else {
                            FinishReason::Stop
                        };
                        if !finished {
                            let _ = cmds.send(Cmd::Cancel(id));
                        }
                        break;
                    }
                    if finished {
                        break;
                    }
                }
                metrics.on_finished(match reason {
                    FinishReason::Stop | FinishReason::ToolCalls => "stop",
                    FinishReason::Length => "length",
                    _ => "error",
                });
                let fin = Finished {
                    reason: reason as i32,
                    usage: Some(Usage {
                        prompt_tokens,
                        reasoning_tokens,
                        completion_tokens: completion,
                    }),
                    timings: Some(Timings {
                        queue_ms: 0.0,
                        time_to_first_token_ms: ttft.unwrap_or(0.0),
                        total_ms: t0.elapsed().as_secs_f64() * 1e3,
                    }),
                    error,
                };
                let _ = out_tx.send(ev(Event::Finished(fin))).await;
            }
            .instrument(span),
        );
        out_rx
    }
}

/// A request checked, tokenized and admitted, ready for the engine loop and its stream.
struct Prepared {
    gen: GenRequest,
    job: Job,
    t0: Instant,
    deadline: Option<tokio::time::Instant>,
    permits: (InFlight, Option<tokio::sync::OwnedSemaphorePermit>),
    span: tracing::Span,
}

/// What streaming a request's output needs to know of it.
struct Job {
    id: u64,
    request_id: String,
    prompt: Vec<u32>,
    stop: Vec<String>,
    ignore_eos: bool,
    stream_ids: bool,
    want_logprobs: bool,
    /// `stop_token_ids`: they end the stream as end of sequence does.
    stop_ids: Vec<u32>,
    /// Tool calls parsed out of the answer in this format; several allowed.
    tools: Option<(crate::text::tools::ToolFormat, bool)>,
}

/// Sends the engine loop operator commands and reads its state.
#[derive(Clone)]
pub struct EngineControl {
    cmds: mpsc::Sender<Cmd>,
    snapshot: Arc<std::sync::Mutex<Snapshot>>,
}

impl EngineControl {
    /// Rebuilds the cluster from the factory at the next step boundary; the new epoch and
    /// world size.
    pub async fn rebuild(&self) -> Result<(u64, usize), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.cmds
            .send(Cmd::Rebuild(Instant::now(), Some(tx)))
            .map_err(|_| "the engine loop has stopped".to_string())?;
        rx.await
            .map_err(|_| "the engine loop has stopped".to_string())?
    }

    /// Stops the engine loop for good: requests in flight fail with `why`.
    pub fn stop(&self, why: &str) {
        let _ = self.cmds.send(Cmd::Stop(why.to_string()));
    }

    /// Plans a re-placement for the current load and starts it if better.
    pub async fn rebalance(&self) -> Result<RebalanceReport, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.cmds
            .send(Cmd::Rebalance(tx))
            .map_err(|_| "the engine loop has stopped".to_string())?;
        rx.await
            .map_err(|_| "the engine loop has stopped".to_string())?
    }

    /// The cluster as of the last step.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Largest `top_logprobs` a request may ask for (as OpenAI's API).
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Stop strings a request may give, and the longest one in bytes.
pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;

/// Checks the stop strings a request gives.
fn check_stop(stop: &[String]) -> Result<(), ApiError> {
    if stop.len() > MAX_STOP_STRINGS {
        return Err(invalid(
            "stop",
            format!("{} stop strings; at most {MAX_STOP_STRINGS}", stop.len()),
        ));
    }
    if let Some(s) = stop
        .iter()
        .find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(invalid(
            "stop",
            format!(
                "a stop string of {} bytes; each must have 1 to {MAX_STOP_BYTES}",
                s.len()
            ),
        ));
    }
    Ok(())
}

/// Parses a `grpc-timeout` header (`<digits><unit>`, unit one of H M S m u n; gRPC over HTTP/2
/// spec).
fn grpc_timeout(
    v: Option<&tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
) -> Result<Option<std::time::Duration>, String> {
    use std::time::Duration;
    let Some(v) = v else { return Ok(None) };
    let s = v.to_str().map_err(|e| e.to_string())?;
    let bad = || format!("malformed {s:?}");
    if s.len() < 2 || s.len() > 9 {
        return Err(bad());
    }
    let (n, unit) = s.split_at(s.len() - 1);
    let n: u64 = n.parse().map_err(|_| bad())?;
    Ok(Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(bad()),
    }))
}

/// The `authorization` metadata value of a call, if any.
pub fn auth_value(m: &tonic::metadata::MetadataMap) -> Option<&str> {
    m.get("authorization").and_then(|v| v.to_str().ok())
}

fn invalid(field: &str, detail: impl std::fmt::Display) -> ApiError {
    ApiError::invalid(field, detail)
}

fn gen_status(e: GenerateError) -> ApiError {
    match e {
        GenerateError::InvalidArgument { field, detail } => invalid(field, detail),
        other => ApiError::internal(other.to_string()),
    }
}

/// Who may resume a request: a digest of the API key that submitted it (the key itself never
/// leaves the coordinator).
fn owner_of(key: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    d.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A proto chat as the text layer renders it.
fn chat_of(c: ChatInput) -> Chat {
    let some = |s: String| (!s.is_empty()).then_some(s);
    Chat {
        messages: c
            .messages
            .into_iter()
            .map(|m| Message {
                role: m.role,
                content: m.content,
                tool_calls: m
                    .tool_calls
                    .into_iter()
                    .map(|t| CallRecord {
                        id: t.id,
                        name: t.name,
                        arguments: t.arguments,
                    })
                    .collect(),
                tool_call_id: some(m.tool_call_id),
                name: some(m.name),
            })
            .collect(),
        tools: Vec::new(),
        add_generation_prompt: c.add_generation_prompt.unwrap_or(true),
    }
}

/// Parser events as `Delta.tool_calls`: one entry per call begun, arguments merged per run.
fn call_deltas(events: Vec<crate::text::tools::ToolEvent>) -> Vec<ToolCallDelta> {
    use crate::text::tools::ToolEvent as E;
    let mut out: Vec<ToolCallDelta> = Vec::new();
    for e in events {
        match e {
            E::Call { index, id, name } => out.push(ToolCallDelta {
                index: index as u32,
                id,
                name,
                arguments: String::new(),
            }),
            E::Args { index, text } => match out.last_mut() {
                Some(d) if d.index == index as u32 => d.arguments.push_str(&text),
                _ => out.push(ToolCallDelta {
                    index: index as u32,
                    arguments: text,
                    ..Default::default()
                }),
            },
            E::Text(_) => {}
        }
    }
    out
}

/// What a request's tools ask: the function objects the template shows, whether calls are
/// parsed out of the answer (and several allowed), and the grammar a required or named
/// choice constrains the answer to.
#[derive(Default)]
struct ToolPlan {
    offered: Vec<serde_json::Value>,
    parse: bool,
    parallel: bool,
    grammar: Option<crate::constrain::Grammar>,
}

/// Tools as the chat template takes them (OpenAI's `{"type": "function", "function": {…}}`)
/// and as grammars take them, checked (names, duplicates, schemas; INVALID_ARGUMENT naming
/// `tools[i].…`).
fn offered_tools(
    tools: &[Tool],
) -> Result<(Vec<serde_json::Value>, Vec<crate::text::tools::ToolSpec>), ApiError> {
    use crate::text::tools::ToolSpec;
    let mut specs: Vec<ToolSpec> = Vec::with_capacity(tools.len());
    let mut offered = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        if t.name.is_empty() || t.name.len() > 64 || !t.name.chars().all(ok) {
            return Err(invalid(
                &format!("tools[{i}].name"),
                format!("{:?}: 1 to 64 of a-z, A-Z, 0-9, _ and -", t.name),
            ));
        }
        if specs.iter().any(|s| s.name == t.name) {
            return Err(invalid(
                &format!("tools[{i}].name"),
                format!("{:?} is offered twice", t.name),
            ));
        }
        let parameters = if t.parameters.is_empty() {
            serde_json::Value::Null
        } else {
            match serde_json::from_str::<serde_json::Value>(&t.parameters) {
                Ok(v @ serde_json::Value::Object(_)) => v,
                Ok(_) => {
                    return Err(invalid(
                        &format!("tools[{i}].parameters"),
                        "is not a JSON schema object",
                    ))
                }
                Err(e) => {
                    return Err(invalid(
                        &format!("tools[{i}].parameters"),
                        format!("not JSON: {e}"),
                    ))
                }
            }
        };
        let mut function = serde_json::json!({"name": t.name});
        if !t.description.is_empty() {
            function["description"] = t.description.clone().into();
        }
        if !parameters.is_null() {
            function["parameters"] = parameters.clone();
        }
        offered.push(serde_json::json!({"type": "function", "function": function}));
        specs.push(ToolSpec {
            name: t.name.clone(),
            parameters,
        });
    }
    Ok((offered, specs))
}

/// Checks a request's tools and tool choice (INVALID_ARGUMENT naming the field).
fn tool_plan(r: &GenerateRequest, tok: &Tokenizer) -> Result<ToolPlan, ApiError> {
    use crate::text::tools::call_grammar;
    let choice = ToolChoice::try_from(r.tool_choice)
        .map_err(|_| invalid("tool_choice", format!("unknown value {}", r.tool_choice)))?;
    if choice != ToolChoice::Function && !r.tool_choice_function.is_empty() {
        return Err(invalid(
            "tool_choice_function",
            "is only given with tool_choice FUNCTION",
        ));
    }
    if r.tools.is_empty() {
        if matches!(choice, ToolChoice::Required | ToolChoice::Function) {
            return Err(invalid(
                "tool_choice",
                format!("{} needs tools", choice.as_str_name()),
            ));
        }
        if r.parallel_tool_calls.is_some() {
            return Err(invalid(
                "parallel_tool_calls",
                "is only allowed when tools are given",
            ));
        }
        return Ok(ToolPlan::default());
    }
    if !matches!(r.input, Some(Input::Chat(_))) {
        return Err(invalid(
            "tools",
            "need chat input (the chat template shows them to the model)",
        ));
    }
    if let Some(i) = r.tools.iter().position(|t| t.strict) {
        if choice == ToolChoice::Auto {
            return Err(invalid(
                &format!("tools[{i}].strict"),
                "is honoured by constraining the call, so only with tool_choice required or \
                 a named function (with auto the model may answer in text)",
            ));
        }
    }
    let (offered, specs) = offered_tools(&r.tools)?;
    let parallel = r.parallel_tool_calls.unwrap_or(true);
    let constrained = match choice {
        ToolChoice::Auto | ToolChoice::None => None,
        ToolChoice::Required => Some((specs, parallel)),
        ToolChoice::Function => {
            let Some(t) = specs.iter().find(|s| s.name == r.tool_choice_function) else {
                return Err(invalid(
                    "tool_choice_function",
                    format!("no tool named {:?} is offered", r.tool_choice_function),
                ));
            };
            Some((vec![t.clone()], false))
        }
    };
    let special = |m: &str| tok.token_to_id(m);
    Ok(ToolPlan {
        offered,
        parse: choice != ToolChoice::None,
        parallel,
        grammar: constrained.map(|(specs, par)| {
            crate::constrain::Grammar::Calls(call_grammar(tok.tool_format, &specs, par, &special))
        }),
    })
}

/// The driver's request for a journal (what workers keep of it for a coordinator that takes
/// over): a new request and an adopted one are built the same way.
fn gen_request(
    id: u64,
    journal: SeqRequest,
    eos: &[u32],
    constraint: Option<Arc<std::sync::Mutex<crate::constrain::Constraint>>>,
) -> GenRequest {
    GenRequest {
        id,
        prompt: journal.prompt.clone(),
        max_tokens: journal.max_tokens as usize,
        sampling: SamplingParams {
            temperature: journal.temperature,
            top_k: journal.top_k as usize,
            top_p: journal.top_p,
            min_p: journal.min_p,
            repetition_penalty: journal.repetition_penalty,
            seed: journal.seed,
            presence_penalty: journal.presence_penalty,
            frequency_penalty: journal.frequency_penalty,
            logit_bias: switchyard_kernels::sampling::sorted_bias(&journal.logit_bias),
        },
        eos: eos.to_vec(),
        ignore_eos: journal.ignore_eos,
        min_tokens: journal.min_tokens as usize,
        stop_token_ids: journal.stop_token_ids.clone(),
        constraint,
        priority: journal.priority,
        top_logprobs: if journal.logprobs {
            journal.top_logprobs
        } else {
            0
        },
        trace: None,
        journal: Some(Arc::new(journal)),
    }
}

impl Job {
    fn of(id: u64, j: &SeqRequest) -> Job {
        Job {
            id,
            request_id: j.request_id.clone(),
            prompt: j.prompt.clone(),
            stop: j.stop.clone(),
            ignore_eos: j.ignore_eos,
            stream_ids: j.stream_token_ids,
            want_logprobs: j.logprobs,
            stop_ids: j.stop_token_ids.clone(),
            tools: crate::text::tools::ToolFormat::from_name(&j.tool_format)
                .map(|f| (f, j.parallel_tool_calls)),
        }
    }
}

type GenStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

fn ev(e: Event) -> Result<GenerateResponse, ApiError> {
    Ok(GenerateResponse { event: Some(e) })
}

impl InferenceService {
    /// Starts one generation (the API both front ends adapt, see [`crate::api`]): checks the
    /// call's key and the request (INVALID_ARGUMENT naming the field), tokenizes, compiles
    /// its constraint, admits it and streams its events.
    pub async fn submit(&self, r: GenerateRequest, call: Call) -> Result<Events, ApiError> {
        let p = self.prepare(r, call).await?;
        let (tok_tx, tok_rx) = tokio::sync::mpsc::unbounded_channel();
        self.send(Cmd::Submit(p.gen, None, tok_tx));
        Ok(self.stream(p.job, 0, tok_rx, p.t0, p.deadline, p.permits, p.span))
    }

    /// Everything [`InferenceService::submit`] does before handing the request to the
    /// engine loop: checks, tokenizing, the constraint, admission.
    async fn prepare(&self, mut r: GenerateRequest, call: Call) -> Result<Prepared, ApiError> {
        let t0 = Instant::now();
        let (key_permit, may_prioritize, owner) = match &self.keys {
            Some(k) => {
                let key = k.check(call.authorization.as_deref())?;
                (Some(k.acquire(key)?), k.may_prioritize(key), owner_of(key))
            }
            None => (None, true, String::new()),
        };
        let up_to_context = call.up_to_context;
        if !r.model.is_empty() && r.model != self.model_name {
            return Err(invalid(
                "model",
                format!(
                    "unknown model {:?} (serving {:?})",
                    r.model, self.model_name
                ),
            ));
        }
        let plan = tool_plan(&r, &self.tok)?;
        let prompt = match r.input.take() {
            Some(Input::Text(t)) => Prompt::Text(t),
            Some(Input::Chat(c)) => Prompt::Chat(Chat {
                tools: plan.offered.clone(),
                ..chat_of(c)
            }),
            Some(Input::TokenIds(t)) => Prompt::Ids(t.ids),
            None => {
                return Err(invalid(
                    "input",
                    "one of text, chat or token_ids is required",
                ))
            }
        };
        let s = r.sampling.unwrap_or_default();
        let sampling = SamplingParams {
            temperature: s.temperature,
            top_k: s.top_k as usize,
            top_p: s.top_p.unwrap_or(1.0),
            min_p: s.min_p,
            repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
            seed: s.seed.unwrap_or(0),
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            logit_bias: switchyard_kernels::sampling::sorted_bias(&s.logit_bias),
        };
        check_stop(&r.stop)?;
        let vocab = self.cfg.vocab_size;
        let outside = |t: &u32| *t as usize >= vocab;
        if let Some(t) = sampling.logit_bias.iter().map(|b| b.0).find(|t| outside(t)) {
            return Err(invalid(
                "logit_bias",
                format!("token id {t} is outside the vocabulary (size {vocab})"),
            ));
        }
        if let Some(t) = r.stop_token_ids.iter().find(|t| outside(t)) {
            return Err(invalid(
                "stop_token_ids",
                format!("token id {t} is outside the vocabulary (size {vocab})"),
            ));
        }
        use switchyard_proto::v1::generate_request::Constraint as C;
        let grammar = match r.constraint.clone() {
            None | Some(C::JsonObject(false)) => None,
            Some(C::JsonObject(true)) => Some(crate::constrain::Grammar::JsonObject),
            Some(C::JsonSchema(s)) => Some(crate::constrain::Grammar::JsonSchema(
                serde_json::from_str(&s)
                    .map_err(|e| invalid("json_schema", format!("not JSON: {e}")))?,
            )),
            Some(C::Regex(s)) => Some(crate::constrain::Grammar::Regex(s)),
            Some(C::Lark(s)) => Some(crate::constrain::Grammar::Lark(s)),
        };
        if let (Some(g), true) = (&grammar, plan.parse) {
            return Err(invalid(
                g.field(),
                "cannot be combined with tools unless tool_choice is NONE (the answer would \
                 be held to both)",
            ));
        }
        let grammar = grammar.or(plan.grammar);
        let grammar_field = grammar.as_ref().map_or("grammar", |g| g.field());
        if grammar.is_some() {
            if r.ignore_eos {
                return Err(invalid(
                    "ignore_eos",
                    format!(
                        "cannot be combined with {grammar_field} (a complete output ends the \
                         sequence)"
                    ),
                ));
            }
            if r.min_tokens > 0 {
                return Err(invalid(
                    "min_tokens",
                    format!("cannot be combined with {grammar_field}"),
                ));
            }
        }
        if r.max_reasoning_tokens > 0 && self.tok.think_end.is_none() {
            return Err(invalid(
                "max_reasoning_tokens",
                "this model's vocabulary marks no end of thinking (no </think> token)",
            ));
        }
        if r.min_tokens > r.max_tokens && r.max_tokens > 0 {
            return Err(invalid(
                "min_tokens",
                format!("{} exceeds max_tokens ({})", r.min_tokens, r.max_tokens),
            ));
        }
        if r.priority != 0 && !may_prioritize {
            return Err(ApiError::permission_denied(format!(
                "priority: this API key may not set request priorities (asked for {}); grant it \
                 with `KEY priority` in the API keys file",
                r.priority
            )));
        }
        let greq = GenReq {
            prompt,
            max_tokens: r.max_tokens as usize,
            sampling: sampling.clone(),
            stop: r.stop.clone(),
            ignore_eos: r.ignore_eos,
            prefill_chunk: 1,
        };
        // Tokenizing a long prompt (and rendering a chat template) is CPU work: off the
        // runtime's threads, so one large request cannot stall every other connection.
        let (tok, prompt, vocab) = (self.tok.clone(), greq.prompt.clone(), self.cfg.vocab_size);
        let ids = tokio::task::spawn_blocking(move || generate::prompt_ids(&tok, &prompt, vocab))
            .await
            .map_err(|e| ApiError::internal(format!("tokenizer task: {e}")))?
            .map_err(gen_status)?;
        let mut greq = greq;
        if up_to_context && greq.max_tokens == 0 {
            greq.max_tokens = self.max_model_len.saturating_sub(ids.len()).max(1);
            r.max_tokens = greq.max_tokens as u32;
        }
        generate::validate(&greq, ids.len(), self.max_model_len).map_err(gen_status)?;
        // Compiling a grammar (and, the first time, the vocabulary's trie) is CPU work: off
        // the runtime's threads, as tokenizing is; before admission, so a bad one costs nothing.
        let grammar_json = grammar
            .as_ref()
            .map(|g| serde_json::to_string(g).expect("a grammar serializes"))
            .unwrap_or_default();
        let constraint = {
            let (cells, tok, g, p) = (
                self.grammars.clone(),
                self.tok.clone(),
                grammar_json.clone(),
                ids.clone(),
            );
            let budget = r.max_reasoning_tokens;
            tokio::task::spawn_blocking(move || cells.for_request(&tok, &g, &p, budget))
                .await
                .map_err(|e| ApiError::internal(format!("grammar task: {e}")))?
                .map_err(|e| match e {
                    crate::constrain::ConstraintError::Grammar { detail, .. } => {
                        invalid(grammar_field, detail)
                    }
                    other => ApiError::internal(other.to_string()),
                })?
        };
        if r.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(invalid(
                "top_logprobs",
                format!("{} exceeds {MAX_TOP_LOGPROBS}", r.top_logprobs),
            ));
        }
        let deadline = call.timeout.map(|d| tokio::time::Instant::from_std(t0) + d);
        self.check_available()?;
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= self.max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(ApiError::resource_exhausted(format!(
                "admission queue full: {} requests in flight",
                self.max_in_flight
            )));
        }
        let admitted = InFlight(self.in_flight.clone());
        let metrics = self.metrics.clone();
        metrics.on_admitted(ids.len());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let request_id = if r.request_id.is_empty() {
            format!("req-{id}")
        } else {
            r.request_id.clone()
        };
        let span =
            tracing::info_span!("generate", request_id = %request_id, prompt_tokens = ids.len());
        crate::telemetry::adopt_parent(&span, |k| call.trace_header(k));
        let journal = SeqRequest {
            request_id: request_id.clone(),
            prompt: ids.clone(),
            max_tokens: greq.max_tokens as u32,
            ignore_eos: r.ignore_eos,
            priority: r.priority,
            stop: r.stop.clone(),
            stream_token_ids: r.stream_token_ids,
            logprobs: r.logprobs,
            top_logprobs: r.top_logprobs,
            temperature: sampling.temperature,
            top_p: sampling.top_p,
            top_k: sampling.top_k as u32,
            min_p: sampling.min_p,
            repetition_penalty: sampling.repetition_penalty,
            seed: sampling.seed,
            owner,
            presence_penalty: sampling.presence_penalty,
            frequency_penalty: sampling.frequency_penalty,
            logit_bias: s.logit_bias,
            min_tokens: r.min_tokens,
            stop_token_ids: r.stop_token_ids.clone(),
            grammar: grammar_json,
            max_reasoning_tokens: r.max_reasoning_tokens,
            tool_format: if plan.parse {
                self.tok.tool_format.name().to_string()
            } else {
                String::new()
            },
            parallel_tool_calls: plan.parallel,
        };
        let mut gen = gen_request(id, journal, &self.tok.eos_ids, constraint);
        gen.trace = Some(span.clone());
        let job = Job::of(id, gen.journal.as_deref().expect("set above"));
        Ok(Prepared {
            gen,
            job,
            t0,
            deadline,
            permits: (admitted, key_permit),
            span,
        })
    }

    /// Starts again, from the tokens its client received, a request no coordinator holds
    /// (see `ResumeRequest.request`): the received tokens are replayed into the stream's
    /// text state unsent, then it streams on from the next one.
    async fn restart(
        &self,
        request_id: String,
        mut req: GenerateRequest,
        received: Vec<u32>,
        call: Call,
    ) -> Result<Events, ApiError> {
        if !req.request_id.is_empty() && req.request_id != request_id {
            return Err(invalid(
                "request.request_id",
                format!(
                    "{:?} differs from the request_id being resumed ({request_id:?})",
                    req.request_id
                ),
            ));
        }
        req.request_id = request_id;
        let vocab = self.cfg.vocab_size;
        if let Some(t) = received.iter().find(|t| **t as usize >= vocab) {
            return Err(invalid(
                "received_token_ids",
                format!("token id {t} is outside the vocabulary (size {vocab})"),
            ));
        }
        let p = self.prepare(req, call).await?;
        if received.len() > p.gen.max_tokens {
            return Err(invalid(
                "received_token_ids",
                format!(
                    "{} tokens, more than the request's max_tokens ({})",
                    received.len(),
                    p.gen.max_tokens
                ),
            ));
        }
        let (tok_tx, tok_rx) = tokio::sync::mpsc::unbounded_channel();
        let ended = p.gen.ended_by(&received);
        for (i, &token) in received.iter().enumerate() {
            let _ = tok_tx.send(Ok(Emitted {
                id: p.gen.id,
                token,
                finished: ended && i + 1 == received.len(),
                logprob: f32::NAN,
                top: vec![],
            }));
        }
        let skip = received.len();
        if !ended {
            tracing::warn!(
                request_id = %p.job.request_id,
                received = skip,
                "no coordinator holds this request any more; started again from the tokens \
                 its client received"
            );
            self.send(Cmd::Submit(p.gen, Some(received), tok_tx));
        }
        Ok(self.stream(p.job, skip, tok_rx, p.t0, p.deadline, p.permits, p.span))
    }

    /// Reattaches to a generation adopted from a lost coordinator (see `Resume`).
    pub async fn reattach(&self, r: ResumeRequest, call: Call) -> Result<Events, ApiError> {
        let t0 = Instant::now();
        let (key_permit, owner) = match &self.keys {
            Some(k) => {
                let key = k.check(call.authorization.as_deref())?;
                (Some(k.acquire(key)?), owner_of(key))
            }
            None => (None, String::new()),
        };
        let deadline = call.timeout.map(|d| tokio::time::Instant::from_std(t0) + d);
        self.check_available()?;
        let not_found = || {
            ApiError::not_found(format!(
                "request_id: no request {:?} to resume here (finished and delivered, \
                 cancelled, never seen by the coordinator this one took over from, or not \
                 resumed within the grace period)",
                r.request_id
            ))
        };
        fn held<'a>(p: &'a HashMap<String, Parked>, id: &str, owner: &str) -> Option<&'a Parked> {
            p.get(id).filter(|p| p.owner == owner)
        }
        let is_held = held(
            &self.parked.lock().unwrap_or_else(|e| e.into_inner()),
            &r.request_id,
            &owner,
        )
        .is_some();
        if !is_held {
            let Some(request) = r.request else {
                return Err(not_found());
            };
            if r.received_token_ids.len() != r.received_tokens as usize {
                return Err(invalid(
                    "received_token_ids",
                    format!(
                        "{} ids for received_tokens {}",
                        r.received_token_ids.len(),
                        r.received_tokens
                    ),
                ));
            }
            drop(key_permit);
            return self
                .restart(r.request_id, request, r.received_token_ids, call)
                .await;
        }
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        let Some(p) = held(&parked, &r.request_id, &owner) else {
            return Err(not_found());
        };
        let received = r.received_tokens as usize;
        if received > p.known {
            return Err(invalid(
                "received_tokens",
                format!(
                    "{received}, but only {} tokens were generated before this \
                     coordinator took over",
                    p.known
                ),
            ));
        }
        if p.job.want_logprobs && received < p.logprobs_from {
            return Err(ApiError::failed_precondition(format!(
                "logprobs: tokens {received}..{} were generated before the takeover and \
                 their log-probabilities are lost (the workers keep the last {}); the \
                 request cannot be resumed with logprobs from token {received}",
                p.logprobs_from,
                switchyard_runtime::executor::RECENT_LOGPROBS,
            )));
        }
        let p = parked.remove(&r.request_id).expect("found above");
        drop(parked);
        tracing::info!(
            request_id = %p.job.request_id,
            received,
            generated = p.known,
            "a client resumed an adopted request"
        );
        let span = tracing::info_span!("resume", request_id = %p.job.request_id, received);
        let out_rx = self.stream(
            p.job,
            received,
            p.rx,
            t0,
            deadline,
            (p.admitted, key_permit),
            span,
        );
        Ok(out_rx)
    }
}

/// The call context a gRPC request's metadata carries: `authorization`, `grpc-timeout`,
/// W3C trace context.
fn grpc_call<T>(req: &Request<T>) -> Result<Call, Status> {
    let m = req.metadata();
    let timeout = grpc_timeout(m.get("grpc-timeout")).map_err(|d| invalid("grpc-timeout", d))?;
    Ok(Call {
        authorization: auth_value(m).map(str::to_string),
        timeout,
        trace: ["traceparent", "tracestate"]
            .into_iter()
            .filter_map(|k| Some((k, m.get(k)?.to_str().ok()?.to_string())))
            .collect(),
        up_to_context: false,
    })
}

/// Events as a gRPC response stream (errors mapped to status codes here, at the edge).
fn grpc_stream(rx: Events) -> GenStream {
    use tokio_stream::StreamExt;
    Box::pin(ReceiverStream::new(rx).map(|r| r.map_err(Status::from)))
}

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStream = GenStream;

    async fn generate(&self, req: Request<GenerateRequest>) -> Result<Response<GenStream>, Status> {
        let call = grpc_call(&req)?;
        let events = self.submit(req.into_inner(), call).await?;
        Ok(Response::new(grpc_stream(events)))
    }

    type ResumeStream = GenStream;

    async fn resume(&self, req: Request<ResumeRequest>) -> Result<Response<GenStream>, Status> {
        let call = grpc_call(&req)?;
        let events = self.reattach(req.into_inner(), call).await?;
        Ok(Response::new(grpc_stream(events)))
    }

    async fn tokenize(
        &self,
        req: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        self.authorize(auth_value(req.metadata()))?;
        let r = req.into_inner();
        let (ids, rendered) = match r.input {
            Some(tokenize_request::Input::Text(_)) if !r.tools.is_empty() => {
                return Err(invalid(
                    "tools",
                    "need chat input (the chat template shows them to the model)",
                )
                .into())
            }
            Some(tokenize_request::Input::Text(t)) => {
                (self.tok.encode(&t).map_err(|e| invalid("text", e))?, t)
            }
            Some(tokenize_request::Input::Chat(c)) => {
                let chat = Chat {
                    tools: offered_tools(&r.tools)?.0,
                    ..chat_of(c)
                };
                let text = self
                    .tok
                    .render_chat(&chat)
                    .map_err(|e| invalid("chat", e))?;
                (
                    self.tok
                        .encode_chat(&chat)
                        .map_err(|e| invalid("chat", e))?,
                    text,
                )
            }
            None => return Err(invalid("input", "text or chat is required").into()),
        };
        Ok(Response::new(TokenizeResponse { ids, rendered }))
    }

    async fn list_models(
        &self,
        req: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        self.authorize(auth_value(req.metadata()))?;
        Ok(Response::new(ListModelsResponse {
            models: vec![ModelInfo {
                name: self.model_name.clone(),
                architecture: self.cfg.arch.hf_name().into(),
                max_context: self.max_model_len as u32,
                num_experts: self.cfg.num_experts as u32,
                experts_per_token: self.cfg.experts_per_tok as u32,
                vocab_size: self.cfg.vocab_size as u32,
            }],
        }))
    }

    async fn cluster_status(
        &self,
        req: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        self.authorize(auth_value(req.metadata()))?;
        let s = self
            .snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let roster = self
            .roster
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Ok(Response::new(status_response(&s, &roster)))
    }
}

/// ClusterStatus (and Admin.Status) from the engine's snapshot and membership's roster.
pub fn status_response(s: &Snapshot, roster: &Roster) -> ClusterStatusResponse {
    // A rank whose member has left membership (lease lost) is no longer listed.
    let workers = s
        .addresses
        .iter()
        .enumerate()
        .filter_map(|(r, a)| {
            let id = if roster.ids.is_empty() {
                format!("rank-{r}")
            } else {
                match roster.ids.get(a) {
                    Some(id) if roster.live.contains(id) => id.clone(),
                    _ => return None,
                }
            };
            let prefix = s.prefix_cache.get(r).copied().unwrap_or_default();
            Some(WorkerStatus {
                id,
                rank: r as u32,
                address: a.clone(),
                kv_blocks_used: s.kv_used.get(r).copied().unwrap_or(0),
                kv_blocks_total: s.kv_total as u32,
                running_sequences: s.running_per_rank.get(r).copied().unwrap_or(0),
                kv_blocks_cached: prefix.cached_blocks,
                prefix_queried_blocks: prefix.queried_blocks,
                prefix_hit_blocks: prefix.hit_blocks,
                prefix_evicted_blocks: prefix.evicted_blocks,
            })
        })
        .collect();
    let placement = s
        .holders
        .iter()
        .enumerate()
        .flat_map(|(layer, l)| {
            let load = s.expert_load.get(layer);
            l.iter().enumerate().map(move |(e, ranks)| ExpertReplicas {
                layer: layer as u32,
                expert: e as u32,
                ranks: ranks.clone(),
                load: load.and_then(|x| x.get(e)).copied().unwrap_or(0) as f64,
            })
        })
        .collect();
    ClusterStatusResponse {
        epoch: s.epoch,
        workers,
        placement,
        expert_version: s.expert_version,
        imbalance: s.imbalance,
        drained: roster.drained.iter().cloned().collect(),
        unavailable: s.unavailable.clone(),
        sequences_kept: s.sequences_kept,
        sequences_reprefilled: s.sequences_reprefilled,
        requests_restarted: s.requests_restarted,
        sequences_split: s.sequences_split,
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    use crate::fuzz_cases;

    fn parse(s: &str) -> Result<Option<std::time::Duration>, String> {
        match tonic::metadata::MetadataValue::try_from(s) {
            Ok(v) => grpc_timeout(Some(&v)),
            Err(_) => Err("not a header value".into()),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(fuzz_cases()))]

        /// Any header value: a deadline or an error, never a panic or an overflow.
        #[test]
        fn fuzz_grpc_timeout(s in "\\PC{0,12}") {
            let _ = parse(&s);
        }

        /// The spec's form (1 to 8 digits and a unit) parses to exactly its value.
        #[test]
        fn fuzz_grpc_timeout_values(n in 0u64..100_000_000, unit in prop::sample::select(vec!['H', 'M', 'S', 'm', 'u', 'n'])) {
            use std::time::Duration;
            let want = match unit {
                'H' => Duration::from_secs(n * 3600),
                'M' => Duration::from_secs(n * 60),
                'S' => Duration::from_secs(n),
                'm' => Duration::from_millis(n),
                'u' => Duration::from_micros(n),
                _ => Duration::from_nanos(n),
            };
            let good = format!("{n}{unit}");
            prop_assert_eq!(parse(&good), Ok(Some(want)));
            let bad = format!("{n}x");
            prop_assert!(parse(&bad).is_err());
        }
    }

    #[test]
    fn max_model_len_defaults_and_refusals() {
        assert_eq!(max_model_len(None, 4096, 128, 16, 1), Ok(128));
        assert_eq!(max_model_len(None, 100, 128, 16, 1), Ok(100));
        assert_eq!(max_model_len(Some(64), 4096, 128, 16, 1), Ok(64));
        let e = max_model_len(Some(1000), 4096, 128, 16, 1).unwrap_err();
        assert!(e.contains("--kv-blocks to at least 63"), "{e}");
        // With context parallelism over 4 workers, each needs a quarter of the blocks.
        let e = max_model_len(Some(1000), 4096, 512, 16, 4).unwrap_err();
        assert!(e.contains("--kv-blocks to at least 16"), "{e}");
        assert!(max_model_len(Some(5000), 4096, 1 << 20, 16, 1)
            .unwrap_err()
            .contains("context"));
        assert!(max_model_len(Some(0), 4096, 128, 16, 1).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The logprobs a worker kept line up with the newest generated tokens: all of them when
    /// they are the tail, only the matching tail when the oldest were cut back, none when the
    /// newest does not match (a token sampled after what the worker kept).
    #[test]
    fn kept_logprobs_score_the_newest_generated_tokens() {
        let s = |token| SampledToken {
            token,
            logprob: -(token as f32),
            ..Default::default()
        };
        let recent = [s(5), s(6), s(7)];
        let tail = |g: &[u32]| {
            scored_tail(g, &recent)
                .iter()
                .map(|t| t.token)
                .collect::<Vec<_>>()
        };
        assert_eq!(tail(&[1, 2, 5, 6, 7]), [5, 6, 7]);
        assert_eq!(tail(&[6, 7]), [6, 7]);
        assert_eq!(tail(&[9, 6, 7]), [6, 7]);
        assert_eq!(tail(&[5, 6, 7, 8]), Vec::<u32>::new());
        assert_eq!(tail(&[]), Vec::<u32>::new());
        assert!(scored_tail(&[1, 2], &[]).is_empty());
    }
}
