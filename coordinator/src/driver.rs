//! The step driver: runs the scheduler's steps on a group of ranks and turns their sampled
//! tokens into per-request output. Here the ranks are threads of this process joined by the
//! `Local` all-to-all ([`LocalCluster`]); the gRPC workers plug in behind the same
//! plan-in/result-out exchange.
//!
//! Each step every rank receives a `StepPlan` (possibly empty: it still joins the expert
//! exchange), with the sequences it must free first (finished, cancelled or preempted).

use crate::pacer::Pacer;
use crate::placement::{rank_holders, PlanError};
use crate::rebalance::{RebalancePolicy, Rebalancer};
use crate::scheduler::{chunk_cost, SchedulerConfig, State, Step};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::mpsc;
use switchyard_kernels::sampling::SamplingParams;
use switchyard_proto::cluster::v1::coordinator_message::Msg as CMsg;
use switchyard_proto::cluster::v1::{
    ExpertUpdate, HeldSeq, KvGuest, KvSpan, PrefixCacheStats, SeqChunk, SeqRequest, StepPlan,
    StepResult,
};
use switchyard_runtime::executor::Executor;
use switchyard_worker::blocks::{chain_hash, BlockHash};
use switchyard_worker::comm::{Comm, LocalComm};
use switchyard_worker::engine::{read_config, Engine, EngineOptions, ExpertSetup};
use switchyard_worker::WorkerError;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("rank {rank}: {detail}")]
    Rank { rank: usize, detail: String },
    /// A rank could not be reached or left while the cluster was being formed (a cluster
    /// factory may retry without it).
    #[error("rank {rank} unreachable: {detail}")]
    Unreachable { rank: usize, detail: String },
    /// A worker is driven by a newer leader (a larger fencing token): this coordinator must
    /// not drive it, nor build a cluster without it.
    #[error("rank {rank}: {detail}")]
    Fenced { rank: usize, detail: String },
    /// A rank answered a step with something that cannot be true of the plan it was sent
    /// (a worker that is broken, out of date or hostile): the epoch is over.
    #[error("rank {rank} sent an invalid step result: {detail}")]
    InvalidResult { rank: usize, detail: String },
    /// A request that could never run to its end: it would wait for KV blocks that no
    /// worker has.
    #[error("prompt ({prompt} tokens) + max_tokens ({max_tokens}) = {} exceeds what one sequence's KV may take ({capacity} tokens: one worker's, or every worker's with context parallelism)", .prompt + .max_tokens)]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        capacity: usize,
    },
}

/// A group of ranks that executes one plan each per step, in lockstep.
pub trait Cluster {
    fn world(&self) -> usize;
    /// KV blocks of each rank and positions per block (the scheduler's accounting).
    fn kv_shape(&self) -> (usize, usize);
    /// Sends every rank its plan and waits for all results, in rank order.
    fn step(&mut self, plans: Vec<StepPlan>) -> Result<Vec<StepResult>, DriverError>;
    /// `holders[layer][expert]`: the ranks holding each expert.
    fn holders(&self) -> &[Vec<Vec<u32>>];
    /// How each rank is reached (a URL, or a thread name).
    fn addresses(&self) -> Vec<String>;
    /// Experts per MoE layer each rank has room for (0: all).
    fn expert_slots(&self) -> Vec<usize> {
        vec![0; self.world()]
    }
    /// Sends every rank a new holder table to load in the background (see the worker's
    /// executor); results report `experts_ready` once loaded.
    fn prepare_experts(
        &mut self,
        version: u64,
        holders: &[Vec<Vec<u32>>],
    ) -> Result<(), DriverError>;
    /// Records the holder table the ranks switched to.
    fn set_holders(&mut self, holders: Vec<Vec<Vec<u32>>>);
    /// Per rank, the sequences whose cached positions it kept from the previous epoch
    /// (id, positions), as its ready answer reported them. Empty: nothing kept.
    fn kept(&self) -> Vec<Vec<(u64, usize)>> {
        Vec::new()
    }
    /// Taking over ([`Carry::adopt_held`]): the sequences a previous leader left on the
    /// workers and they kept, with their ranks (once; later calls return nothing).
    fn take_adopted(&mut self) -> Vec<(usize, HeldSeq)> {
        Vec::new()
    }
}

/// What a new epoch may keep from the one before ([`Driver::carry`]): the factory building
/// the next cluster asks each worker to keep its sequences and leaves experts in place.
#[derive(Clone, Debug, Default)]
pub struct Carry {
    /// Per worker address: the live sequences homed there and their confirmed cached
    /// positions (a step that failed does not count).
    pub seqs: HashMap<String, Vec<(u64, usize)>>,
    /// The previous group's addresses (in rank order) and its holder table.
    pub holders: Option<(Vec<String>, Vec<Vec<Vec<u32>>>)>,
    /// Live rebalancing is on: a worker new to the group may start with no experts (the
    /// driver then moves its share to it in the background), so the others keep theirs.
    pub live_placement: bool,
    /// This coordinator is taking the workers over (its first cluster): each worker keeps
    /// what its hello says it holds, sequences and experts, and the driver adopts those
    /// sequences' requests ([`Cluster::take_adopted`]); `seqs` and `holders` are unused.
    pub adopt_held: bool,
}

impl Carry {
    /// What a coordinator's first cluster carries: whatever the workers held.
    pub fn takeover() -> Self {
        Carry {
            adopt_held: true,
            ..Default::default()
        }
    }
}

/// What the cluster looks like after the last step (for ClusterStatus and metrics).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub addresses: Vec<String>,
    pub kv_used: Vec<u32>,
    pub kv_total: usize,
    /// Each rank's prefix cache as of its last step result.
    pub prefix_cache: Vec<PrefixCacheStats>,
    pub running_per_rank: Vec<u32>,
    /// Experts per MoE layer each rank has room for (0: all).
    pub expert_slots: Vec<usize>,
    pub holders: Vec<Vec<Vec<u32>>>,
    /// Tokens routed to each expert since start, `[layer][expert]`.
    pub expert_load: Vec<Vec<u64>>,
    /// 1, plus one per rebuild over a new group of ranks.
    pub epoch: u64,
    /// Expert placement version in use (0: the epoch's initial placement).
    pub expert_version: u64,
    /// Imbalance of the current placement under the load average (1.0: even).
    pub imbalance: f64,
    /// Why requests are refused (empty while serving).
    pub unavailable: String,
    /// Sequences in flight at a rebuild that went on from the KV their worker kept, and those
    /// re-prefilled (since start).
    pub sequences_kept: u64,
    pub sequences_reprefilled: u64,
    /// Requests started again by their clients ([`Driver::resubmit`]), from the tokens they
    /// had received (none, for one still queued when its coordinator was lost).
    pub requests_restarted: u64,
    /// Sequences whose KV came to span several workers (context parallelism), since start.
    pub sequences_split: u64,
}

/// What a re-placement did (or would do).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RebalanceReport {
    pub imbalance_before: f64,
    /// Predicted from the same load average.
    pub imbalance_after: f64,
    /// Expert replicas to load somewhere new.
    pub moved: usize,
    /// The new placement's version; 0 when it was not better and nothing changes.
    pub version: u64,
}

/// Expert re-placement state of a driver.
struct Experts {
    cfg: switchyard_worker::ModelConfig,
    redundant: usize,
    rebalancer: Rebalancer,
    /// Version in use, and the next one to hand out (monotonic across epochs).
    version: u64,
    next_version: u64,
    /// Prepared on the ranks, not yet switched to: version, table, all ranks loaded it.
    pending: Option<(u64, Vec<Vec<Vec<u32>>>, bool)>,
}

/// What the last step did and cost.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepStats {
    /// Wall time of the step as the driver saw it (plans out, results in).
    pub seconds: f64,
    pub decodes: usize,
    pub prefill_tokens: usize,
    /// Longest time any rank spent in the expert all-to-all.
    pub all_to_all_seconds: f64,
    /// Bytes all ranks sent each other.
    pub all_to_all_bytes: u64,
    /// Longest time any rank took for the whole step on its side.
    pub worker_seconds: f64,
}

/// Ranks on threads of this process.
pub struct LocalCluster {
    holders: Vec<Vec<Vec<u32>>>,
    txs: Vec<mpsc::SyncSender<CMsg>>,
    rxs: Vec<mpsc::Receiver<Result<StepResult, String>>>,
    handles: Vec<std::thread::JoinHandle<()>>,
    pub kv_blocks_per_rank: usize,
    pub block_size: usize,
}

impl LocalCluster {
    /// Loads `world` ranks, experts placed by the planner with `redundant` extra replicas.
    pub fn start(
        model: &Path,
        world: usize,
        redundant: usize,
        opts: EngineOptions,
    ) -> Result<Self, DriverError> {
        let cfg = read_config(model)?;
        let holders = rank_holders(&cfg, world, cfg.num_experts, redundant)?;
        let kv_blocks = opts.kv_blocks.unwrap_or(256);
        let block_size = opts.block_size;
        let (mut txs, mut rxs, mut handles) = (vec![], vec![], vec![]);
        let (ready_tx, ready_rx) = mpsc::channel();
        for (rank, comm) in LocalComm::group(world).into_iter().enumerate() {
            let (ptx, prx) = mpsc::sync_channel::<CMsg>(1);
            let (rtx, rrx) = mpsc::sync_channel(1);
            let (model, holders, ready) = (model.to_path_buf(), holders.clone(), ready_tx.clone());
            let opts = EngineOptions {
                kv_blocks: Some(kv_blocks),
                ..opts.clone()
            };
            handles.push(std::thread::spawn(move || {
                let engine = Engine::load_with(
                    &model,
                    &opts,
                    ExpertSetup::Parallel {
                        holders,
                        comm: Comm::Local(comm),
                    },
                );
                let mut ex = match engine {
                    Ok(e) => {
                        let _ = ready.send((rank, Ok(())));
                        Executor::new(e)
                    }
                    Err(e) => {
                        let _ = ready.send((rank, Err(e.to_string())));
                        return;
                    }
                };
                // An update that fails to prepare fails the next step.
                let mut deferred: Option<String> = None;
                while let Ok(m) = prx.recv() {
                    match m {
                        CMsg::Step(plan) => {
                            let r = match deferred.take() {
                                Some(e) => Err(e),
                                None => ex.execute(&plan).map_err(|e| e.to_string()),
                            };
                            if rtx.send(r).is_err() {
                                break;
                            }
                        }
                        CMsg::Experts(u) => {
                            if let Err(e) = ex.prepare(&u) {
                                deferred = Some(e.to_string());
                            }
                        }
                        CMsg::Placement(_) => {}
                    }
                }
            }));
            txs.push(ptx);
            rxs.push(rrx);
        }
        for _ in 0..world {
            let (rank, r) = ready_rx.recv().map_err(|_| DriverError::Rank {
                rank: 0,
                detail: "rank thread died while loading".into(),
            })?;
            r.map_err(|detail| DriverError::Rank { rank, detail })?;
        }
        Ok(LocalCluster {
            holders,
            txs,
            rxs,
            handles,
            kv_blocks_per_rank: kv_blocks,
            block_size,
        })
    }
}

impl Cluster for LocalCluster {
    fn world(&self) -> usize {
        self.txs.len()
    }

    fn kv_shape(&self) -> (usize, usize) {
        (self.kv_blocks_per_rank, self.block_size)
    }

    fn holders(&self) -> &[Vec<Vec<u32>>] {
        &self.holders
    }

    fn addresses(&self) -> Vec<String> {
        (0..self.txs.len()).map(|r| format!("thread:{r}")).collect()
    }

    fn prepare_experts(
        &mut self,
        version: u64,
        holders: &[Vec<Vec<u32>>],
    ) -> Result<(), DriverError> {
        let holders = crate::placement::rank_experts(holders, self.txs.len());
        for (rank, tx) in self.txs.iter().enumerate() {
            tx.send(CMsg::Experts(ExpertUpdate {
                version,
                holders: holders.clone(),
            }))
            .map_err(|_| DriverError::Rank {
                rank,
                detail: "rank stopped".into(),
            })?;
        }
        Ok(())
    }

    fn set_holders(&mut self, holders: Vec<Vec<Vec<u32>>>) {
        self.holders = holders;
    }

    fn step(&mut self, plans: Vec<StepPlan>) -> Result<Vec<StepResult>, DriverError> {
        for (rank, (tx, p)) in self.txs.iter().zip(plans).enumerate() {
            tx.send(CMsg::Step(p)).map_err(|_| DriverError::Rank {
                rank,
                detail: "rank stopped".into(),
            })?;
        }
        self.rxs
            .iter()
            .enumerate()
            .map(|(rank, rx)| {
                rx.recv()
                    .map_err(|_| DriverError::Rank {
                        rank,
                        detail: "rank stopped".into(),
                    })?
                    .map_err(|detail| DriverError::Rank { rank, detail })
            })
            .collect()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.txs.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// A generation request as the driver sees it: token ids in, token ids out.
#[derive(Clone, Debug)]
pub struct GenRequest {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub eos: Vec<u32>,
    pub ignore_eos: bool,
    /// End of sequence and `stop_token_ids` cannot be sampled before this many tokens.
    pub min_tokens: usize,
    /// Tokens that end the sequence as end of sequence does, whatever `ignore_eos` says.
    pub stop_token_ids: Vec<u32>,
    /// Constrained decoding: masks each sampling step; advanced with each token.
    pub constraint: Option<std::sync::Arc<std::sync::Mutex<crate::constrain::Constraint>>>,
    pub priority: i32,
    /// Most likely tokens to report with each sampled one (0: only its own logprob).
    pub top_logprobs: u32,
    /// The request's span: every step that computes for it links to it.
    pub trace: Option<tracing::Span>,
    /// Handed to the worker with the chunk that starts the sequence (kept there for a
    /// coordinator that takes over; see [`Carry::adopt_held`]).
    pub journal: Option<std::sync::Arc<SeqRequest>>,
}

impl GenRequest {
    /// A greedy request for `max_tokens` tokens that ignores end of sequence, with nothing
    /// else set (benchmarks and tests run a fixed number of steps).
    pub fn greedy(id: u64, prompt: Vec<u32>, max_tokens: usize) -> Self {
        GenRequest {
            id,
            prompt,
            max_tokens,
            sampling: SamplingParams::greedy(),
            eos: vec![],
            ignore_eos: true,
            min_tokens: 0,
            stop_token_ids: vec![],
            constraint: None,
            priority: 0,
            top_logprobs: 0,
            trace: None,
            journal: None,
        }
    }

    /// The tokens that end this sequence when sampled.
    pub fn enders(&self) -> impl Iterator<Item = u32> + '_ {
        let eos = if self.ignore_eos { &[][..] } else { &self.eos };
        eos.iter().chain(&self.stop_token_ids).copied()
    }

    /// Whether sampling `token` ends the sequence (end of sequence or a stop token id).
    pub fn ends(&self, token: u32) -> bool {
        (!self.ignore_eos && self.eos.contains(&token)) || self.stop_token_ids.contains(&token)
    }

    /// Whether these tokens, generated for this request, already end it (its last one ends
    /// the sequence, or there are `max_tokens` of them).
    pub fn ended_by(&self, generated: &[u32]) -> bool {
        generated
            .last()
            .is_some_and(|&t| generated.len() >= self.max_tokens || self.ends(t))
    }
}

/// What [`Driver::adopt`] made of a sequence a previous leader left on a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adopted {
    /// It goes on from the KV its worker kept.
    Kept,
    /// It goes on, re-prefilled from its tokens (its worker's cache could not be used).
    Reprefilled,
    /// Its tokens already end it (end of sequence or max_tokens): nothing left to run.
    Finished,
    /// It cannot run here (its whole length does not fit one worker's KV, or its id is
    /// taken): freed on its worker.
    Refused,
}

struct Live {
    req: GenRequest,
    tokens: Vec<u32>,
    generated: usize,
    /// Names of the whole blocks of `tokens` computed so far (prefix homing).
    names: Vec<BlockHash>,
}

/// A token produced for a request; `finished` on its last one.
#[derive(Clone, Debug, PartialEq)]
pub struct Emitted {
    pub id: u64,
    pub token: u32,
    pub finished: bool,
    /// The token's log-probability and the request's top alternatives, most likely first.
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

pub struct Driver {
    cluster: Box<dyn Cluster>,
    state: State,
    live: HashMap<u64, Live>,
    pending_free: Vec<Vec<u64>>,
    step_no: u64,
    kv_used: Vec<u32>,
    prefix_cache: Vec<PrefixCacheStats>,
    /// `Some(load weight)`: sequences are homed by cached prefix against load.
    prefix_homing: Option<f64>,
    /// Per rank, the block names it reported findable in its prefix cache (a mirror kept
    /// from step results; a hint, cleared at every rebuild).
    prefix_index: Vec<HashSet<BlockHash>>,
    preemptions: usize,
    expert_load: Vec<Vec<u64>>,
    pacer: Option<Pacer>,
    last: StepStats,
    token_budget: usize,
    max_running: usize,
    /// Sequences may outgrow one worker's KV ([`Driver::with_context_parallel`]).
    context_parallel: bool,
    epoch: u64,
    experts: Option<Experts>,
    limits: Option<ResultLimits>,
    /// Sequences kept and re-prefilled over every rebuild.
    kept: u64,
    reprefilled: u64,
    /// Requests started again from their clients' tokens ([`Driver::resubmit`]).
    restarted: u64,
    /// Sequences split under the schedulers of earlier epochs.
    split_before: u64,
    /// Constrained sequences whose matcher failed: ended with the error when their token
    /// of the step in flight comes back (see [`Driver::take_errors`]).
    failing: HashMap<u64, String>,
    errors: Vec<(u64, String)>,
}

/// What a valid step result may contain, from the model's shape.
#[derive(Clone, Copy, Debug)]
struct ResultLimits {
    vocab: usize,
    /// `expert_load` entries of every result (layers × experts).
    load_len: usize,
}

/// Checks one rank's result against the plan it was sent for step `step`, whose sampling
/// chunks were `sampled` (sequence, alternatives asked): exactly one token for each and
/// nothing else, token ids inside the vocabulary, no more alternatives than asked for, finite
/// log-probabilities, expert load of the model's shape and a KV count within the rank's
/// blocks. Pure; the step fails on the first violation.
fn check_result(
    step: u64,
    sampled: &[(u64, u32)],
    r: &StepResult,
    limits: Option<ResultLimits>,
    kv_total: usize,
) -> Result<(), String> {
    if r.step != step {
        return Err(format!("answers step {} to plan {step}", r.step));
    }
    let mut asked: HashMap<u64, u32> = sampled.iter().copied().collect();
    if r.tokens.len() != asked.len() {
        return Err(format!(
            "{} sampled tokens for {} sampling chunks",
            r.tokens.len(),
            asked.len()
        ));
    }
    for t in &r.tokens {
        let Some(top) = asked.remove(&t.seq_id) else {
            return Err(format!(
                "a token for sequence {}, which it was not asked to sample (or twice)",
                t.seq_id
            ));
        };
        if t.top.len() > top as usize {
            return Err(format!(
                "{} alternatives for sequence {} (asked for {top})",
                t.top.len(),
                t.seq_id
            ));
        }
        if t.logprob.is_nan() || t.logprob > 0.0 || t.top.iter().any(|x| x.logprob.is_nan()) {
            return Err(format!(
                "log-probability {} for sequence {}",
                t.logprob, t.seq_id
            ));
        }
        if let Some(l) = limits {
            let bad = std::iter::once(t.token)
                .chain(t.top.iter().map(|x| x.token))
                .find(|&id| id as usize >= l.vocab);
            if let Some(id) = bad {
                return Err(format!(
                    "token id {id} for sequence {} is outside the vocabulary (size {})",
                    t.seq_id, l.vocab
                ));
            }
        }
    }
    if let Some(l) = limits {
        if !r.expert_load.is_empty() && r.expert_load.len() != l.load_len {
            return Err(format!(
                "{} expert load entries (the model has {})",
                r.expert_load.len(),
                l.load_len
            ));
        }
    }
    if r.kv_blocks_used as usize > kv_total {
        return Err(format!(
            "{} KV blocks in use of {kv_total}",
            r.kv_blocks_used
        ));
    }
    for (name, x) in [
        ("all_to_all_seconds", r.all_to_all_seconds),
        ("step_seconds", r.step_seconds),
    ] {
        if !x.is_finite() || x < 0.0 {
            return Err(format!("{name} = {x}"));
        }
    }
    Ok(())
}

impl Driver {
    /// Sequences in flight at a rebuild that were kept, and re-prefilled, since start.
    pub fn recovered(&self) -> (u64, u64) {
        (self.kept, self.reprefilled)
    }

    /// What the next epoch may keep from this one: each live sequence's worker address and
    /// confirmed cached positions, and the current group's addresses and holder table.
    pub fn carry(&self) -> Carry {
        let addrs = self.cluster.addresses();
        let mut seqs: HashMap<String, Vec<(u64, usize)>> = HashMap::new();
        for (id, w, computed) in self.state.homed() {
            // A sequence split across workers is prefilled again whole in the next epoch
            // (its ranges elsewhere may be what was lost).
            if !self.state.spans(id).is_empty() {
                continue;
            }
            if let (true, Some(a)) = (self.live.contains_key(&id), addrs.get(w)) {
                seqs.entry(a.clone()).or_default().push((id, computed));
            }
        }
        Carry {
            seqs,
            holders: Some((addrs, self.cluster.holders().to_vec())),
            live_placement: self
                .experts
                .as_ref()
                .is_some_and(|x| x.rebalancer.policy.threshold.is_finite()),
            adopt_held: false,
        }
    }

    /// Replaces the cluster (a rank was lost, or the group changed). A live request whose
    /// worker kept its cached positions ([`Cluster::kept`]) goes on from them on that worker
    /// (its new rank) with no re-prefill; every other one is requeued with all its tokens so
    /// far (prompt and generated), re-homed and re-prefilled, and continues where it was.
    /// Sampling is seeded by position, so either way the continuation is the one the old
    /// group would have produced. A kept sequence that is not taken over is freed on its
    /// worker with the next step.
    ///
    /// Returns the requests that cannot run on the new group (their whole length no longer
    /// fits one worker's KV): they are dropped, and the caller fails them.
    pub fn rebuild(&mut self, cluster: Box<dyn Cluster>) -> Vec<(u64, DriverError)> {
        let w = cluster.world();
        let (blocks, block_size) = cluster.kv_shape();
        let mut state = State::new(SchedulerConfig {
            token_budget: self.token_budget,
            max_running: self.max_running,
            block_size,
            blocks_per_worker: vec![blocks; w],
            attn_equiv: self.state.attn_equiv(),
            context_parallel: self.context_parallel,
        });
        let was_homed: std::collections::HashSet<u64> = self
            .state
            .homed()
            .into_iter()
            .map(|(id, _, _)| id)
            .collect();
        let mut kept: HashMap<u64, (usize, usize)> = HashMap::new();
        for (rank, seqs) in cluster.kept().into_iter().enumerate().take(w) {
            for (id, len) in seqs {
                kept.insert(id, (rank, len));
            }
        }
        let mut pending_free = vec![vec![]; w];
        let mut ids: Vec<u64> = self.live.keys().copied().collect();
        ids.sort_unstable();
        let mut dropped = Vec::new();
        for id in ids {
            let l = &self.live[&id];
            let total = l.req.prompt.len() + l.req.max_tokens;
            let on = kept.remove(&id);
            if !state.fits(total) {
                let e = DriverError::TooLong {
                    prompt: l.req.prompt.len(),
                    max_tokens: l.req.max_tokens,
                    capacity: state.capacity_tokens(),
                };
                self.live.remove(&id);
                dropped.push((id, e));
                if let Some((rank, _)) = on {
                    pending_free[rank].push(id);
                }
                continue;
            }
            match on {
                Some((rank, len)) if state.adopt(id, l.tokens.len(), len, rank, l.req.priority) => {
                    self.kept += 1;
                }
                other => {
                    if let Some((rank, _)) = other {
                        pending_free[rank].push(id);
                    }
                    if was_homed.contains(&id) {
                        self.reprefilled += 1;
                    }
                    state.add(id, l.tokens.len(), l.req.priority);
                }
            }
        }
        // Kept on a worker but no longer live here (finished or cancelled meanwhile).
        for (id, (rank, _)) in kept {
            pending_free[rank].push(id);
        }
        self.split_before += self.state.splits();
        self.state = state;
        self.cluster = cluster;
        self.pending_free = pending_free;
        self.kv_used = vec![0; w];
        self.prefix_cache = vec![PrefixCacheStats::default(); w];
        self.prefix_index = vec![HashSet::new(); w];
        self.epoch += 1;
        if let Some(p) = &mut self.pacer {
            *p = p.fresh();
        }
        if let Some(x) = &mut self.experts {
            // A new epoch starts from its own initial placement.
            x.pending = None;
            x.version = 0;
        }
        // A newcomer placed with no experts gets its share through a live re-placement: it
        // loads in the background while the others go on.
        let holders = self.cluster.holders();
        let empty = (0..w as u32).any(|r| !holders.iter().flatten().any(|h| h.contains(&r)));
        if empty && holders.iter().any(|l| !l.is_empty()) {
            match self.rebalance_now() {
                Ok(r) if r.version > 0 => {}
                Ok(_) => tracing::info!(
                    "a worker holds no expert; it gets some once the expert load shows it"
                ),
                Err(e) => tracing::warn!(error = %e, "re-placing experts onto a newcomer"),
            }
        }
        dropped
    }

    /// Checks every step result against the model's shape as well as the plan (vocabulary,
    /// expert load entries); without it results are checked against the plan only.
    pub fn with_model_limits(mut self, cfg: &switchyard_worker::ModelConfig) -> Self {
        self.limits = Some(ResultLimits {
            vocab: cfg.vocab_size,
            load_len: cfg.num_layers * cfg.num_experts,
        });
        self
    }

    /// Most tokens (prompt + generated) one sequence may reach: one worker's KV cache.
    pub fn capacity_tokens(&self) -> usize {
        self.state.capacity_tokens()
    }

    /// Tracks expert load and re-places experts while serving (see [`crate::rebalance`]);
    /// `policy.threshold = INFINITY` leaves it to [`rebalance_now`](Self::rebalance_now).
    pub fn with_rebalancing(
        mut self,
        cfg: switchyard_worker::ModelConfig,
        redundant: usize,
        policy: RebalancePolicy,
    ) -> Self {
        self.experts = Some(Experts {
            cfg,
            redundant,
            rebalancer: Rebalancer::new(policy),
            version: 0,
            next_version: 1,
            pending: None,
        });
        self
    }

    /// Imbalance of the current placement under the load average.
    pub fn imbalance(&self) -> f64 {
        match &self.experts {
            Some(x) => crate::placement::imbalance(
                self.cluster.holders(),
                x.rebalancer.load(),
                self.cluster.world(),
            ),
            None => 1.0,
        }
    }

    /// Plans a placement for the current load average and, if it is better, starts switching
    /// to it (the ranks load their new experts while steps go on; the switch happens at a step
    /// boundary once all have them).
    pub fn rebalance_now(&mut self) -> Result<RebalanceReport, DriverError> {
        let world = self.cluster.world();
        let slots = self.cluster.expert_slots();
        let Some(x) = &mut self.experts else {
            return Ok(RebalanceReport::default());
        };
        let load = x.rebalancer.load().to_vec();
        let current = self.cluster.holders().to_vec();
        let before = crate::placement::imbalance(&current, &load, world);
        if load.is_empty() {
            return Ok(RebalanceReport {
                imbalance_before: before,
                imbalance_after: before,
                ..Default::default()
            });
        }
        let (next, moved) =
            crate::placement::rebalance(&x.cfg, &slots, x.redundant, &load, &current)?;
        let after = crate::placement::imbalance(&next, &load, world);
        let mut report = RebalanceReport {
            imbalance_before: before,
            imbalance_after: after,
            moved,
            version: 0,
        };
        if x.rebalancer.accept(before, after, moved) {
            let v = x.next_version;
            x.next_version += 1;
            self.cluster.prepare_experts(v, &next)?;
            tracing::info!(
                version = v,
                moved,
                before,
                after,
                "re-placing experts; ranks are loading them"
            );
            x.pending = Some((v, next, false));
            report.version = v;
        }
        Ok(report)
    }

    /// Whether an expert switch is pending (the driver keeps stepping until it lands).
    pub fn switching(&self) -> bool {
        self.experts.as_ref().is_some_and(|x| x.pending.is_some())
    }

    pub fn new(cluster: impl Cluster + 'static, token_budget: usize, max_running: usize) -> Self {
        let w = cluster.world();
        let (blocks, block_size) = cluster.kv_shape();
        let cluster: Box<dyn Cluster> = Box::new(cluster);
        let state = State::new(SchedulerConfig {
            token_budget,
            max_running,
            block_size,
            blocks_per_worker: vec![blocks; w],
            attn_equiv: 0,
            context_parallel: false,
        });
        Driver {
            cluster,
            state,
            live: HashMap::new(),
            pending_free: vec![vec![]; w],
            step_no: 0,
            kv_used: vec![0; w],
            prefix_cache: vec![PrefixCacheStats::default(); w],
            prefix_homing: None,
            prefix_index: vec![HashSet::new(); w],
            preemptions: 0,
            expert_load: Vec::new(),
            pacer: None,
            last: StepStats::default(),
            token_budget,
            max_running,
            context_parallel: false,
            epoch: 1,
            experts: None,
            limits: None,
            kept: 0,
            reprefilled: 0,
            restarted: 0,
            split_before: 0,
            failing: HashMap::new(),
            errors: Vec::new(),
        }
    }

    /// Context parallelism ([`switchyard_worker::context`]): a sequence whose KV outgrows
    /// its home's free blocks continues on further workers, so one sequence may be as long as
    /// the cluster's KV ([`Driver::capacity_tokens`] then counts every worker). The workers
    /// must be an expert-parallel group (any cluster of two or more); on one worker it
    /// changes nothing.
    pub fn with_context_parallel(mut self, on: bool) -> Self {
        self.context_parallel = on;
        self.state.set_context_parallel(on);
        self
    }

    /// Ends `id` with `why` when its next token comes back (see [`Driver::take_errors`]).
    pub fn fail(&mut self, id: u64, why: String) {
        self.failing.insert(id, why);
    }

    /// Requests ended by an error since the last call (their constraint failed), each once.
    pub fn take_errors(&mut self) -> Vec<(u64, String)> {
        std::mem::take(&mut self.errors)
    }

    /// The last step's cost and shape.
    pub fn last_step(&self) -> StepStats {
        self.last
    }

    /// Sequences queued (not yet admitted) and running.
    pub fn queue(&self) -> (usize, usize) {
        (self.state.waiting(), self.state.running())
    }

    /// Homes sequences by cached prefix against load ([`State::set_prefix_homing`]), from
    /// the block names the ranks report; `None` homes by free blocks alone.
    pub fn with_prefix_homing(mut self, load_weight: Option<f64>) -> Self {
        self.prefix_homing = load_weight;
        self.state.set_prefix_homing(load_weight);
        self
    }

    /// Tells the scheduler, for the sequences still to be prefilled, how many of their
    /// positions each rank caches: the leading whole blocks whose names that rank reported,
    /// never the last known token (which is computed to sample from).
    fn refresh_cache_hints(&mut self) {
        if self.prefix_homing.is_none() || self.prefix_index.iter().all(HashSet::is_empty) {
            return;
        }
        let bs = self.state.block_size();
        for id in self.state.needing_prefill().into_iter().take(256) {
            let Some(l) = self.live.get_mut(&id) else {
                continue;
            };
            let whole = l.tokens.len().saturating_sub(1) / bs;
            while l.names.len() < whole {
                let i = l.names.len();
                let h = chain_hash(l.names.last().copied(), &l.tokens[i * bs..(i + 1) * bs]);
                l.names.push(h);
            }
            let cached = self
                .prefix_index
                .iter()
                .map(|ix| {
                    l.names[..whole]
                        .iter()
                        .take_while(|h| ix.contains(h))
                        .count()
                        * bs
                })
                .collect();
            self.state.set_cached(id, cached);
        }
    }

    /// Paces prefill beside decodes (see [`Pacer`]): a step with decodes takes about `factor`
    /// times a decode-only one. `attn_equiv` prices attention ([`attention_equivalent`]).
    ///
    /// [`attention_equivalent`]: crate::scheduler::attention_equivalent
    pub fn with_pacing(mut self, factor: f64, attn_equiv: usize) -> Self {
        self.state.set_attn_equiv(attn_equiv);
        self.pacer = Some(Pacer::new(factor));
        self
    }

    /// Queues a request; refused (and nothing changes) when it could never run to its end.
    pub fn submit(&mut self, req: GenRequest) -> Result<(), DriverError> {
        self.start(req, Vec::new())
    }

    /// Starts again a request that no coordinator holds any more (the one running it was
    /// lost with the worker that held its sequence), from the tokens its client received:
    /// re-prefilled from its prompt and `generated`, it goes on from the next token exactly
    /// as it would have (sampling is seeded by position; penalties, `min_tokens` and the
    /// constraint count `generated` as generated). The caller has checked that `generated`
    /// does not already end it ([`GenRequest::ended_by`]).
    pub fn resubmit(&mut self, req: GenRequest, generated: Vec<u32>) -> Result<(), DriverError> {
        self.start(req, generated)?;
        self.restarted += 1;
        Ok(())
    }

    fn start(&mut self, req: GenRequest, generated: Vec<u32>) -> Result<(), DriverError> {
        if req.prompt.is_empty() || !self.state.fits(req.prompt.len() + req.max_tokens) {
            return Err(DriverError::TooLong {
                prompt: req.prompt.len(),
                max_tokens: req.max_tokens,
                capacity: self.state.capacity_tokens(),
            });
        }
        self.catch_up(&req, &generated);
        let tokens = [&req.prompt[..], &generated].concat();
        self.state.add(req.id, tokens.len(), req.priority);
        self.live.insert(
            req.id,
            Live {
                req,
                tokens,
                generated: generated.len(),
                names: Vec::new(),
            },
        );
        Ok(())
    }

    /// A constrained request's matcher catches up with the tokens already generated; one
    /// they do not match fails the request with its next token.
    fn catch_up(&mut self, req: &GenRequest, generated: &[u32]) {
        let Some(k) = &req.constraint else { return };
        let mut k = k.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = generated.iter().find_map(|t| k.advance(*t).err()) {
            self.failing.insert(req.id, e.to_string());
        }
    }

    /// The sequences a previous leader left on the workers, as the cluster reported them
    /// (once).
    pub fn take_adopted(&mut self) -> Vec<(usize, HeldSeq)> {
        self.cluster.take_adopted()
    }

    /// Takes over a request a previous leader was running: `tokens` are all its tokens known
    /// (prompt, then those generated; a prefix of the prompt while it was prefilling), of
    /// which the first `cached` are cached on rank `rank`. It goes on from that cache when the
    /// scheduler can take it there, else it is re-prefilled from its tokens; either way the
    /// continuation is the one the old leader would have produced (sampling is seeded by
    /// position). A request whose tokens already end it is only freed on its worker.
    pub fn adopt(
        &mut self,
        req: GenRequest,
        tokens: Vec<u32>,
        rank: usize,
        cached: usize,
    ) -> Adopted {
        let id = req.id;
        let tokens = if tokens.len() < req.prompt.len() || !tokens.starts_with(&req.prompt) {
            req.prompt.clone()
        } else {
            tokens
        };
        let generated = tokens.len() - req.prompt.len();
        let ended = req.ended_by(&tokens[req.prompt.len()..]);
        let on_worker = rank < self.pending_free.len();
        let fits = self.state.fits(req.prompt.len() + req.max_tokens);
        if ended || !fits || self.live.contains_key(&id) {
            if on_worker {
                self.pending_free[rank].push(id);
            }
            return if ended {
                Adopted::Finished
            } else {
                Adopted::Refused
            };
        }
        self.catch_up(&req, &tokens[req.prompt.len()..]);
        let (len, priority) = (tokens.len(), req.priority);
        let kept = on_worker && self.state.adopt(id, len, cached, rank, priority);
        if !kept {
            if on_worker {
                self.pending_free[rank].push(id);
            }
            self.state.add(id, len, priority);
        }
        self.live.insert(
            id,
            Live {
                req,
                tokens,
                generated,
                names: Vec::new(),
            },
        );
        if kept {
            self.kept += 1;
            Adopted::Kept
        } else {
            self.reprefilled += 1;
            Adopted::Reprefilled
        }
    }

    /// Drops a request; its KV blocks are freed on its worker with the next step.
    pub fn cancel(&mut self, id: u64) {
        self.release(id);
    }

    fn release(&mut self, id: u64) {
        if let Some(w) = self.state.home(id) {
            self.pending_free[w].push(id);
        }
        for (w, _, _) in self.state.spans(id) {
            self.pending_free[w].push(id);
        }
        self.state.finish(id);
        self.live.remove(&id);
        self.failing.remove(&id);
    }

    pub fn is_idle(&self) -> bool {
        self.live.is_empty() && self.pending_free.iter().all(|f| f.is_empty()) && !self.switching()
    }

    /// The cluster as of the last step.
    pub fn snapshot(&self) -> Snapshot {
        let mut running = vec![0u32; self.cluster.world()];
        for id in self.live.keys() {
            if let Some(w) = self.state.home(*id) {
                running[w] += 1;
            }
        }
        Snapshot {
            addresses: self.cluster.addresses(),
            kv_used: self.kv_used.clone(),
            kv_total: self.cluster.kv_shape().0,
            prefix_cache: self.prefix_cache.clone(),
            running_per_rank: running,
            expert_slots: self.cluster.expert_slots(),
            holders: self.cluster.holders().to_vec(),
            expert_load: self.expert_load.clone(),
            epoch: self.epoch,
            expert_version: self.experts.as_ref().map_or(0, |x| x.version),
            imbalance: self.imbalance(),
            unavailable: String::new(),
            sequences_kept: self.kept,
            sequences_reprefilled: self.reprefilled,
            requests_restarted: self.restarted,
            sequences_split: self.split_before + self.state.splits(),
        }
    }

    /// Sequences preempted (and recomputed) so far.
    pub fn preemptions(&self) -> usize {
        self.preemptions
    }

    /// KV blocks each rank reported in use after the last step.
    pub fn kv_used(&self) -> &[u32] {
        &self.kv_used
    }

    /// Experts per MoE layer (0 for a model without any).
    fn experts_per_layer(&self) -> usize {
        self.cluster
            .holders()
            .iter()
            .map(|l| l.len())
            .max()
            .unwrap_or(0)
    }

    /// Expert bookkeeping after a successful step: record a switch that happened, note when
    /// every rank has loaded a pending placement, feed the load average, and let the policy
    /// start a re-placement.
    fn after_step(
        &mut self,
        switched: Option<u64>,
        results: &[StepResult],
    ) -> Result<(), DriverError> {
        let experts = self.experts_per_layer();
        let Some(x) = &mut self.experts else {
            return Ok(());
        };
        if let Some(v) = switched {
            if let Some((_, holders, _)) = x.pending.take() {
                self.cluster.set_holders(holders);
                x.version = v;
                tracing::info!(version = v, "expert placement switched");
            }
        } else if let Some(p) = &mut x.pending {
            p.2 = results.iter().all(|r| r.experts_ready >= p.0);
        }
        if experts > 0 && !results.is_empty() {
            let mut step_load = vec![0u64; results[0].expert_load.len()];
            for r in results {
                for (t, n) in step_load.iter_mut().zip(&r.expert_load) {
                    *t += *n as u64;
                }
            }
            x.rebalancer.observe(&step_load, experts);
        }
        if x.pending.is_none() && x.rebalancer.policy.threshold.is_finite() {
            let imbalance = self.imbalance();
            let x = self.experts.as_mut().expect("checked above");
            if x.rebalancer.should_plan(imbalance) {
                let r = self.rebalance_now()?;
                if r.version == 0 {
                    tracing::info!(
                        before = r.imbalance_before,
                        after = r.imbalance_after,
                        "expert load is uneven, but no placement does markedly better"
                    );
                }
            }
        }
        Ok(())
    }

    /// Runs one step on every rank.
    pub fn step(&mut self) -> Result<Vec<Emitted>, DriverError> {
        if let Some(p) = &self.pacer {
            self.state.set_prefill_limit(p.limit());
        }
        self.refresh_cache_hints();
        let s = self.state.next_step();
        // None of a failed step's tokens is applied: undo its planning, so that what a rebuild
        // asks the workers to keep is what was confirmed (a worker that did complete the step
        // cuts its sequences back to that).
        self.run(&s).inspect_err(|_| self.state.rollback(&s))
    }

    /// For each constrained sequence this step samples: whether its end is held back and
    /// its mask (`constrain::masks_of`), each constraint locked once. On one thread: spread
    /// over the 2 vCPUs measured, 8 streams' masks took 0.89-1.12x the serial time
    /// (`bench-grammar --streams 8`, docs/performance.md), no gain for a thread start per
    /// step.
    fn masks(&self, s: &Step) -> HashMap<u64, (bool, crate::constrain::MaskResult)> {
        let todo: Vec<(u64, &std::sync::Mutex<crate::constrain::Constraint>)> = s
            .chunks
            .iter()
            .filter(|c| c.sample)
            .filter_map(|c| Some((c.seq, self.live.get(&c.seq)?.req.constraint.as_deref()?)))
            .collect();
        let ks: Vec<_> = todo.iter().map(|t| t.1).collect();
        todo.iter()
            .map(|t| t.0)
            .zip(crate::constrain::masks_of(&ks, 1))
            .collect()
    }

    fn run(&mut self, s: &Step) -> Result<Vec<Emitted>, DriverError> {
        let prefill = &s.chunks[s.decodes..];
        // Positions the scheduler expects the ranks to find cached are priced at nothing.
        let uncached = |c: &crate::scheduler::Chunk| {
            let free = self.state.cached_ahead(c.seq, c.worker, c.start).min(c.len);
            (c.start + free, c.len - free)
        };
        let units: f64 = prefill
            .iter()
            .map(|c| {
                let (start, len) = uncached(c);
                chunk_cost(start, len, self.state.attn_equiv())
            })
            .sum();
        let prefill_tokens: usize = prefill.iter().map(|c| uncached(c).1).sum();
        let t0 = std::time::Instant::now();
        self.step_no += 1;
        // Every rank switches to a prepared placement with the same step.
        let switch = self
            .experts
            .as_ref()
            .and_then(|x| x.pending.as_ref())
            .filter(|p| p.2)
            .map(|p| p.0);
        let mut plans: Vec<StepPlan> = (0..self.cluster.world())
            .map(|w| StepPlan {
                step: self.step_no,
                epoch: 0,
                chunks: vec![],
                free_seqs: std::mem::take(&mut self.pending_free[w]),
                expert_version: switch.unwrap_or(0),
                kv_guests: vec![],
                context_exchange: false,
            })
            .collect();
        for &(id, w) in &s.preempted {
            plans[w].free_seqs.push(id);
        }
        self.preemptions += s.preempted.len();
        // What each rank was asked to sample (its result is checked against it).
        let mut sampled: Vec<Vec<(u64, u32)>> = vec![Vec::new(); plans.len()];
        let mut masks = self.masks(s);
        // Every rank does the context exchange, or none does.
        let mut exchange = false;
        for c in &s.chunks {
            let l = &self.live[&c.seq];
            if c.sample {
                sampled[c.worker].push((c.seq, l.req.top_logprobs));
            }
            let p = &l.req.sampling;
            // Before min_tokens, or while a constrained answer has yet to start, what would
            // end the sequence may not be sampled.
            let (held_back, mask) = match masks.remove(&c.seq).filter(|_| c.sample) {
                Some((h, m)) => (h, Some(m)),
                None => (false, None),
            };
            let banned = if c.sample && (l.generated < l.req.min_tokens || held_back) {
                l.req.enders().collect()
            } else {
                vec![]
            };
            let allowed = match mask {
                Some(Ok(m)) => m.unwrap_or_default(),
                Some(Err(e)) => {
                    // Sampled under end of sequence only; ended with the error.
                    self.failing.insert(c.seq, e.to_string());
                    crate::constrain::only(l.req.eos.first().copied().unwrap_or(0))
                }
                None => vec![],
            };
            plans[c.worker].chunks.push(SeqChunk {
                seq_id: c.seq,
                tokens: l.tokens[c.start..c.start + c.len].to_vec(),
                start_pos: c.start as u32,
                sample: c.sample,
                temperature: p.temperature,
                top_p: p.top_p,
                top_k: p.top_k as u32,
                min_p: p.min_p,
                repetition_penalty: p.repetition_penalty,
                seed: p.seed,
                top_logprobs: l.req.top_logprobs,
                request: if c.start == 0 {
                    l.req.journal.as_deref().cloned()
                } else {
                    None
                },
                presence_penalty: p.presence_penalty,
                frequency_penalty: p.frequency_penalty,
                logit_bias: if c.start == 0 {
                    p.logit_bias.iter().copied().collect()
                } else {
                    Default::default()
                },
                banned,
                prompt_tokens: l.req.prompt.len() as u32,
                allowed,
                kv_spans: vec![],
            });
            // Context parallelism: the ranges held elsewhere go with the home's chunk, and
            // each holder of a range this chunk writes into grows it.
            let spans = self.state.spans(c.seq);
            if spans.is_empty() {
                continue;
            }
            exchange = true;
            for &(w, start, end) in &spans {
                if end > c.start.max(start) {
                    plans[w].kv_guests.push(KvGuest {
                        seq_id: c.seq,
                        home: c.worker as u32,
                        start: start as u32,
                        end: end as u32,
                    });
                }
            }
            let chunk = plans[c.worker].chunks.last_mut().expect("pushed above");
            chunk.kv_spans = spans
                .iter()
                .map(|&(w, start, end)| KvSpan {
                    rank: w as u32,
                    start: start as u32,
                    end: end as u32,
                })
                .collect();
        }
        for p in &mut plans {
            p.context_exchange = exchange;
        }
        let span = tracing::info_span!(
            "step",
            step = self.step_no,
            decodes = s.decodes,
            prefill_tokens,
            rows = s.chunks.len()
        );
        if !span.is_disabled() {
            for c in &s.chunks {
                if let Some(t) = &self.live[&c.seq].req.trace {
                    span.follows_from(t);
                }
            }
        }
        let results = span.in_scope(|| self.cluster.step(plans))?;
        if results.len() != sampled.len() {
            return Err(DriverError::InvalidResult {
                rank: results.len().min(sampled.len()),
                detail: format!("{} results for {} ranks", results.len(), sampled.len()),
            });
        }
        let kv_total = self.cluster.kv_shape().0;
        for (rank, (asked, r)) in sampled.iter().zip(&results).enumerate() {
            check_result(self.step_no, asked, r, self.limits, kv_total).map_err(|detail| {
                tracing::error!(rank, %detail, "invalid step result; ending the epoch");
                DriverError::InvalidResult { rank, detail }
            })?;
        }
        let load_len = results.first().map_or(0, |r| r.expert_load.len());
        if let Some(rank) = results.iter().position(|r| r.expert_load.len() != load_len) {
            return Err(DriverError::InvalidResult {
                rank,
                detail: format!(
                    "{} expert load entries where rank 0 sent {load_len}",
                    results[rank].expert_load.len()
                ),
            });
        }
        let secs = t0.elapsed().as_secs_f64();
        if let Some(p) = &mut self.pacer {
            p.observe(s.decodes, units, secs);
        }
        tracing::trace!(
            step = self.step_no,
            decodes = s.decodes,
            prefill_tokens,
            prefill_units = units,
            ms = secs * 1e3,
            "step"
        );
        if let Err(e) = self.after_step(switch, &results) {
            // A rank that cannot take an expert update fails the next step (and recovery).
            tracing::warn!(error = %e, "expert re-placement");
        }
        let mut out = Vec::new();
        self.last = StepStats {
            seconds: secs,
            decodes: s.decodes,
            prefill_tokens,
            // Ranks exchange in lockstep: the slowest rank's exchange time is the step's.
            all_to_all_seconds: results
                .iter()
                .map(|r| r.all_to_all_seconds)
                .fold(0.0, f64::max),
            all_to_all_bytes: results.iter().map(|r| r.all_to_all_bytes).sum(),
            worker_seconds: results.iter().map(|r| r.step_seconds).fold(0.0, f64::max),
        };
        for (w, r) in results.into_iter().enumerate() {
            self.kv_used[w] = r.kv_blocks_used;
            if let Some(p) = r.prefix_cache {
                self.prefix_cache[w] = p;
            }
            if self.prefix_homing.is_some() {
                let name = |b: &Vec<u8>| b.as_slice().try_into().ok().map(BlockHash::from_le_bytes);
                let index = &mut self.prefix_index[w];
                index.extend(r.blocks_stored.iter().filter_map(name));
                for h in r.blocks_forgotten.iter().filter_map(name) {
                    index.remove(&h);
                }
                // A mirror that lost events cannot grow without bound.
                if index.len() > 4 * self.cluster.kv_shape().0.max(1) {
                    index.clear();
                }
            }
            let experts = self.experts_per_layer();
            if experts > 0 && !r.expert_load.is_empty() {
                let layers = r.expert_load.len() / experts;
                if self.expert_load.len() != layers
                    || self.expert_load.iter().any(|l| l.len() != experts)
                {
                    self.expert_load = vec![vec![0; experts]; layers];
                }
                for (i, n) in r.expert_load.iter().take(layers * experts).enumerate() {
                    self.expert_load[i / experts][i % experts] += *n as u64;
                }
            }
            for t in r.tokens {
                let failed = self.failing.remove(&t.seq_id).or_else(|| {
                    let k = self.live.get(&t.seq_id)?.req.constraint.as_ref()?;
                    let mut k = k.lock().unwrap_or_else(|e| e.into_inner());
                    k.advance(t.token).err().map(|e| e.to_string())
                });
                if let Some(why) = failed {
                    if self.live.contains_key(&t.seq_id) {
                        self.errors.push((t.seq_id, why));
                        self.release(t.seq_id);
                    }
                    continue;
                }
                let Some(l) = self.live.get_mut(&t.seq_id) else {
                    continue;
                };
                l.tokens.push(t.token);
                l.generated += 1;
                let finished = l.req.ends(t.token) || l.generated >= l.req.max_tokens;
                out.push(Emitted {
                    id: t.seq_id,
                    token: t.token,
                    finished,
                    logprob: t.logprob,
                    top: t.top.iter().map(|x| (x.token, x.logprob)).collect(),
                });
                if finished {
                    self.release(t.seq_id);
                } else {
                    self.state.on_sampled(t.seq_id);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use switchyard_proto::cluster::v1::SampledToken;

    /// A scripted group: samples token 7 wherever asked, records every plan, fails the steps
    /// it is told to, and reports `kept` as a new epoch's workers would.
    struct Scripted {
        addrs: Vec<String>,
        plans: Arc<Mutex<Vec<Vec<StepPlan>>>>,
        fail: Arc<Mutex<bool>>,
        kept: Vec<Vec<(u64, usize)>>,
    }

    impl Cluster for Scripted {
        fn world(&self) -> usize {
            self.addrs.len()
        }
        fn kv_shape(&self) -> (usize, usize) {
            (64, 16)
        }
        fn step(&mut self, plans: Vec<StepPlan>) -> Result<Vec<StepResult>, DriverError> {
            self.plans.lock().unwrap().push(plans.clone());
            if *self.fail.lock().unwrap() {
                return Err(DriverError::Rank {
                    rank: 1,
                    detail: "killed".into(),
                });
            }
            Ok(plans
                .iter()
                .map(|p| StepResult {
                    step: p.step,
                    tokens: p
                        .chunks
                        .iter()
                        .filter(|c| c.sample)
                        .map(|c| SampledToken {
                            seq_id: c.seq_id,
                            token: 7,
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                })
                .collect())
        }
        fn holders(&self) -> &[Vec<Vec<u32>>] {
            &[]
        }
        fn addresses(&self) -> Vec<String> {
            self.addrs.clone()
        }
        fn prepare_experts(&mut self, _: u64, _: &[Vec<Vec<u32>>]) -> Result<(), DriverError> {
            Ok(())
        }
        fn set_holders(&mut self, _: Vec<Vec<Vec<u32>>>) {}
        fn kept(&self) -> Vec<Vec<(u64, usize)>> {
            self.kept.clone()
        }
    }

    fn request(id: u64, prompt: usize) -> GenRequest {
        GenRequest::greedy(id, (1..=prompt as u32).collect(), 16)
    }

    #[test]
    fn a_rebuild_takes_over_what_the_workers_kept_and_reprefills_only_the_rest() {
        let plans = Arc::new(Mutex::new(Vec::new()));
        let fail = Arc::new(Mutex::new(false));
        let old = Scripted {
            addrs: vec!["a".into(), "b".into()],
            plans: plans.clone(),
            fail: fail.clone(),
            kept: vec![],
        };
        let mut d = Driver::new(old, 64, 8);
        for id in 1..=3 {
            d.submit(request(id, 5)).unwrap();
        }
        // Prefill, then two decodes each: every sequence has 8 tokens, 7 of them cached.
        for _ in 0..3 {
            assert_eq!(d.step().unwrap().len(), 3);
        }
        // The next step fails (rank 1 died): the carry is what the last good step confirmed.
        *fail.lock().unwrap() = true;
        assert!(d.step().is_err());
        let carry = d.carry();
        let homes: HashMap<u64, String> = carry
            .seqs
            .iter()
            .flat_map(|(a, s)| s.iter().map(move |(id, n)| (*id, (a.clone(), *n))))
            .map(|(id, (a, n))| {
                assert_eq!(n, 7, "sequence {id}: positions confirmed");
                (id, a)
            })
            .collect();
        assert_eq!(homes.len(), 3);
        assert_eq!(carry.holders.as_ref().unwrap().0, vec!["a", "b"]);
        // The survivor "a" is rank 0 of the new group and kept its sequences; it also still
        // holds sequence 99, which this coordinator no longer knows.
        let on_a: Vec<u64> = homes
            .iter()
            .filter(|(_, a)| *a == "a")
            .map(|(i, _)| *i)
            .collect();
        let on_b: Vec<u64> = homes
            .iter()
            .filter(|(_, a)| *a == "b")
            .map(|(i, _)| *i)
            .collect();
        assert!(!on_a.is_empty() && !on_b.is_empty(), "{homes:?}");
        let mut kept: Vec<(u64, usize)> = on_a.iter().map(|id| (*id, 7)).collect();
        kept.push((99, 3));
        let new_plans = Arc::new(Mutex::new(Vec::new()));
        *fail.lock().unwrap() = false;
        let dropped = d.rebuild(Box::new(Scripted {
            addrs: vec!["a".into()],
            plans: new_plans.clone(),
            fail: fail.clone(),
            kept: vec![kept],
        }));
        assert!(dropped.is_empty());
        let snap = d.snapshot();
        assert_eq!(
            (snap.sequences_kept, snap.sequences_reprefilled),
            (on_a.len() as u64, on_b.len() as u64)
        );
        d.step().unwrap();
        let first = new_plans.lock().unwrap()[0][0].clone();
        assert_eq!(
            first.free_seqs,
            vec![99],
            "an unknown kept sequence is freed"
        );
        for c in &first.chunks {
            if on_a.contains(&c.seq_id) {
                // Decoded from its cached positions: the failed step is done again.
                assert_eq!((c.start_pos, c.tokens.len()), (7, 1), "seq {}", c.seq_id);
            } else {
                // Re-prefilled from the start with every token it has.
                assert_eq!((c.start_pos, c.tokens.len()), (0, 8), "seq {}", c.seq_id);
            }
        }
        assert_eq!(first.chunks.len(), 3);
    }

    /// A coordinator taking over: a sequence held with its cache goes on from it, one whose
    /// tokens already end it is only freed, one whose cache cannot be used (a cached length
    /// that covers every token) is re-prefilled, one too long for this cluster is refused;
    /// and the chunk that starts a sequence carries its journal to the worker.
    #[test]
    fn a_takeover_adopts_held_sequences_from_their_caches() {
        let plans = Arc::new(Mutex::new(Vec::new()));
        let mut d = Driver::new(
            Scripted {
                addrs: vec!["a".into(), "b".into()],
                plans: plans.clone(),
                fail: Arc::default(),
                kept: vec![],
            },
            64,
            8,
        );
        let journaled = |id: u64, prompt: usize, max_tokens: usize| {
            let mut r = request(id, prompt);
            r.max_tokens = max_tokens;
            r.journal = Some(Arc::new(SeqRequest {
                request_id: format!("r{id}"),
                prompt: r.prompt.clone(),
                max_tokens: max_tokens as u32,
                ..Default::default()
            }));
            r
        };
        // 5 prompt tokens and 3 generated, 7 of them cached (the last not yet fed).
        let toks = |n: usize| -> Vec<u32> { (1..=5).chain(std::iter::repeat_n(7, n)).collect() };
        assert_eq!(d.adopt(journaled(1, 5, 16), toks(3), 1, 7), Adopted::Kept);
        // max_tokens already reached.
        assert_eq!(
            d.adopt(journaled(2, 5, 3), toks(3), 0, 7),
            Adopted::Finished
        );
        // A cache as long as its tokens cannot be gone on from: re-prefilled.
        assert_eq!(
            d.adopt(journaled(3, 5, 16), toks(2), 0, 7),
            Adopted::Reprefilled
        );
        // Longer than one worker's KV (64 blocks of 16 positions).
        assert_eq!(
            d.adopt(journaled(4, 5, 2000), toks(1), 0, 6),
            Adopted::Refused
        );
        // Its id is taken.
        assert_eq!(
            d.adopt(journaled(1, 5, 16), toks(3), 0, 7),
            Adopted::Refused
        );
        assert_eq!(d.recovered(), (1, 1));
        let out = d.step().unwrap();
        let step = plans.lock().unwrap()[0].clone();
        let mut freed = step[0].free_seqs.clone();
        freed.sort_unstable();
        assert_eq!(
            freed,
            vec![1, 2, 3, 4],
            "every copy not gone on from is freed on rank 0"
        );
        assert!(step[1].free_seqs.is_empty());
        let on_b = &step[1].chunks;
        assert_eq!(on_b.len(), 1);
        assert_eq!(
            (on_b[0].seq_id, on_b[0].start_pos, on_b[0].tokens.len()),
            (1, 7, 1)
        );
        assert!(
            on_b[0].request.is_none(),
            "a cached sequence's worker has its journal"
        );
        let again = step
            .iter()
            .flat_map(|p| &p.chunks)
            .find(|c| c.seq_id == 3)
            .unwrap();
        assert_eq!((again.start_pos, again.tokens.len()), (0, 7));
        assert_eq!(
            again.request.as_ref().map(|r| r.request_id.as_str()),
            Some("r3")
        );
        // Both go on generating where they were.
        let mut ids: Vec<u64> = out.iter().map(|e| e.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![1, 3]);
    }
}
