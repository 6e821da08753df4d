//! Executes one `StepPlan` of the cluster protocol on a worker's [`Engine`]: frees finished or
//! preempted sequences, feeds each chunk, samples where the plan asks, and reports sampled
//! tokens, per-expert load and KV usage.
//!
//! Sampling is a pure function of (logits, parameters, the sequence's tokens so far, seed,
//! position): the random draw for position `p` comes from a generator seeded with
//! `mix(seed, p)`, so a sequence re-homed or recomputed after preemption samples exactly what
//! it would have sampled where it was.
//!
//! Live expert re-placement: an `ExpertUpdate` starts loading the experts this rank gains on a
//! background thread while steps go on; each `StepResult.experts_ready` reports the newest
//! version loaded; the first plan naming that version in `expert_version` switches to it before
//! it runs (every rank gets that plan in the same step, so routing never disagrees).

use std::collections::HashMap;
use switchyard_kernels::rng::Rng;
use switchyard_kernels::sampling::{self, SamplingParams};
use switchyard_proto::cluster::v1::{
    ExpertAssignment, ExpertUpdate, HeldSeq, KeptSeq, PrefixCacheStats, RankExperts, SampledToken,
    SeqChunk, SeqRequest, StepPlan, StepResult, TokenLogprob,
};
use switchyard_worker::comm::Comm;
use switchyard_worker::engine::{
    ChunkSpec, ContextPlan, Engine, GuestSpec, Logits, PreparedExperts, SeqLayout, Span,
};
use switchyard_worker::WorkerError;

type Loading = std::thread::JoinHandle<Result<PreparedExperts, WorkerError>>;

pub struct Executor {
    pub engine: Engine,
    /// What each sequence holding KV is, beyond its cache.
    seqs: HashMap<u64, SeqRecord>,
    /// Expert placement version in use (0: the epoch's initial placement).
    version: u64,
    /// The newest update being loaded, and the newest loaded one.
    loading: Option<(u64, Loading)>,
    ready: Option<(u64, PreparedExperts)>,
}

/// `holders[layer][expert]` (ranks, ascending) from per-rank assignments, for a model of
/// `layers` layers of which `sparse` have `experts` experts.
pub fn holder_table(
    ranks: &[RankExperts],
    layers: usize,
    experts: usize,
    sparse: &[bool],
) -> Result<Vec<Vec<Vec<u32>>>, WorkerError> {
    let mut t: Vec<Vec<Vec<u32>>> = (0..layers)
        .map(|l| {
            if sparse[l] {
                vec![vec![]; experts]
            } else {
                vec![]
            }
        })
        .collect();
    for rk in ranks {
        for a in &rk.assignments {
            let layer = t
                .get_mut(a.layer as usize)
                .filter(|l| !l.is_empty())
                .ok_or_else(|| {
                    WorkerError::Placement(format!(
                        "placement names layer {} which has no experts",
                        a.layer
                    ))
                })?;
            for &e in &a.experts {
                layer
                    .get_mut(e as usize)
                    .ok_or_else(|| {
                        WorkerError::Placement(format!(
                            "placement names expert {e} of layer {}",
                            a.layer
                        ))
                    })?
                    .push(rk.rank);
            }
        }
    }
    for l in &mut t {
        for ranks in l.iter_mut() {
            ranks.sort_unstable();
        }
    }
    Ok(t)
}

/// Sampled tokens whose log-probabilities a sequence keeps for a coordinator that takes over
/// ([`SeqRecord::recent`]): a client is rarely more than a few tokens behind its stream.
pub const RECENT_LOGPROBS: usize = 64;

/// A sequence as this rank knows it: every token fed (the repetition-penalty history; its
/// cached positions), the last token sampled and not yet fed, and the request it serves (kept
/// to hand a new leader, see [`Executor::held`]).
#[derive(Default)]
struct SeqRecord {
    fed: Vec<u32>,
    last: Option<SampledToken>,
    /// For a request that streams logprobs: the last [`RECENT_LOGPROBS`] tokens sampled, with
    /// their log-probabilities, oldest first (the newest is `last` until it is fed), so that a
    /// coordinator taking over can stream the ones its client had not received yet.
    recent: std::collections::VecDeque<SampledToken>,
    request: Option<SeqRequest>,
    /// From the chunk that started the sequence (see `SeqChunk.logit_bias`).
    logit_bias: Vec<(u32, f32)>,
}

fn mix(seed: u64, pos: u64) -> u64 {
    seed ^ pos
        .wrapping_add(1)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .rotate_left(17)
}

/// The sampling parameters a chunk carries (unset top_p / penalty mean disabled), with the
/// logit bias of the chunk that started its sequence.
pub fn chunk_params(c: &SeqChunk, logit_bias: &[(u32, f32)]) -> SamplingParams {
    SamplingParams {
        temperature: c.temperature,
        top_k: c.top_k as usize,
        top_p: if c.top_p == 0.0 { 1.0 } else { c.top_p },
        min_p: c.min_p,
        repetition_penalty: if c.repetition_penalty == 0.0 {
            1.0
        } else {
            c.repetition_penalty
        },
        seed: c.seed,
        presence_penalty: c.presence_penalty,
        frequency_penalty: c.frequency_penalty,
        logit_bias: logit_bias.to_vec(),
    }
}

/// A chunk's logit bias in token order (the map's order is unspecified).
fn bias_of(c: &SeqChunk) -> Vec<(u32, f32)> {
    switchyard_kernels::sampling::sorted_bias(&c.logit_bias)
}

impl Executor {
    pub fn new(mut engine: Engine) -> Self {
        // The coordinator mirrors which prefixes this rank caches (prefix homing).
        engine.record_prefix_events();
        Executor {
            engine,
            seqs: HashMap::new(),
            version: 0,
            loading: None,
            ready: None,
        }
    }

    /// Carries this rank into a new epoch ([`Engine::rejoin`]: KV and the experts still held
    /// stay, gained experts load now) keeping the sequences in `keep`, each cut to the length
    /// given; every other sequence is released, as is one this rank holds fewer positions of
    /// than asked. Returns those kept, by id. The expert version restarts at 0 (the new
    /// epoch's placement); an update still loading is abandoned.
    pub fn rejoin(
        &mut self,
        comm: Comm,
        holders: Vec<Vec<Vec<u32>>>,
        keep: &[KeptSeq],
    ) -> Result<Vec<KeptSeq>, WorkerError> {
        // A loading thread finishes on its own; what it loaded is dropped with its handle.
        self.loading = None;
        self.ready = None;
        self.version = 0;
        let loaded = self.engine.rejoin(comm, holders)?;
        // Ranges held as a guest belong to the old group's layout: what a split sequence had
        // beyond its home is prefilled again in the new epoch.
        self.engine.release_guests();
        let want: HashMap<u64, u32> = keep.iter().map(|k| (k.seq_id, k.len)).collect();
        let mut kept = Vec::new();
        for id in self.engine.sequences() {
            let len = want.get(&id).copied().unwrap_or(0) as usize;
            let fed = self.seqs.get(&id).map_or(0, |s| s.fed.len());
            if len > 0 && fed >= len && self.engine.truncate(id, len) {
                if let Some(s) = self.seqs.get_mut(&id) {
                    if s.fed.len() > len {
                        // Cut back past what was sampled after it: that token is void too,
                        // and so are the log-probabilities of every token cut.
                        let cut = s.fed.len() - len + usize::from(s.last.is_some());
                        let keep = s.recent.len().saturating_sub(cut);
                        s.recent.truncate(keep);
                        s.fed.truncate(len);
                        s.last = None;
                    }
                }
                kept.push(KeptSeq {
                    seq_id: id,
                    len: len as u32,
                });
            } else {
                self.engine.release(id);
                self.seqs.remove(&id);
            }
        }
        kept.sort_by_key(|k| k.seq_id);
        tracing::info!(loaded, kept = kept.len(), "new epoch; engine and KV kept");
        Ok(kept)
    }

    /// What this rank holds for a coordinator taking over (in its hello): every sequence with
    /// cached positions and a request, and this rank's experts.
    pub fn held(&self) -> (Vec<HeldSeq>, Vec<ExpertAssignment>) {
        let mut seqs: Vec<HeldSeq> = self
            .engine
            .sequences()
            .into_iter()
            .filter_map(|id| {
                let rec = self.seqs.get(&id)?;
                let request = rec.request.clone()?;
                // A sequence split across ranks is handed over with the positions held
                // here; the rest is prefilled again.
                let cached = self.engine.held_len(id);
                (self.engine.seq_len(id) == rec.fed.len()).then(|| HeldSeq {
                    seq_id: id,
                    tokens: rec
                        .fed
                        .iter()
                        .copied()
                        .chain(rec.last.as_ref().map(|t| t.token))
                        .collect(),
                    cached: cached as u32,
                    request: Some(request),
                    last: rec.last.clone(),
                    recent: rec.recent.iter().cloned().collect(),
                })
            })
            .collect();
        seqs.sort_by_key(|h| h.seq_id);
        let experts = self
            .engine
            .held_experts()
            .into_iter()
            .map(|(layer, experts)| ExpertAssignment {
                layer: layer as u32,
                experts,
            })
            .collect();
        (seqs, experts)
    }

    /// Starts loading the experts of `u` in the background (a newer update replaces an older
    /// one not yet switched to).
    pub fn prepare(&mut self, u: &ExpertUpdate) -> Result<(), WorkerError> {
        if u.version <= self.version {
            return Err(WorkerError::Placement(format!(
                "expert update {} is not newer than the version in use ({})",
                u.version, self.version
            )));
        }
        let cfg = self.engine.config();
        let holders = holder_table(
            &u.holders,
            cfg.num_layers,
            cfg.num_experts,
            &cfg.sparse_layers,
        )?;
        let job = self.engine.expert_load(holders)?;
        tracing::info!(
            version = u.version,
            gained = job.gained(),
            "loading experts"
        );
        let handle = std::thread::Builder::new()
            .name(format!("expert-load-{}", u.version))
            .spawn(move || job.load())?;
        self.loading = Some((u.version, handle));
        Ok(())
    }

    /// The newest expert version this rank can switch to.
    fn experts_ready(&mut self) -> Result<u64, WorkerError> {
        if self.loading.as_ref().is_some_and(|(_, h)| h.is_finished()) {
            self.finish_loading()?;
        }
        Ok(self.ready.as_ref().map_or(self.version, |(v, _)| *v))
    }

    fn finish_loading(&mut self) -> Result<(), WorkerError> {
        if let Some((v, h)) = self.loading.take() {
            let prepared = h
                .join()
                .map_err(|_| WorkerError::Placement("expert loading panicked".into()))??;
            self.ready = Some((v, prepared));
        }
        Ok(())
    }

    /// Switches to expert version `v` (loaded by [`prepare`](Self::prepare)).
    fn switch_to(&mut self, v: u64) -> Result<(), WorkerError> {
        if self.loading.as_ref().is_some_and(|(lv, _)| *lv == v) {
            // Asked before this rank reported it ready: wait for it.
            self.finish_loading()?;
        }
        match self.ready.take() {
            Some((rv, p)) if rv == v => {
                self.engine.switch_experts(p)?;
                self.version = v;
                tracing::info!(version = v, "switched expert placement");
                Ok(())
            }
            other => {
                self.ready = other;
                Err(WorkerError::Placement(format!(
                    "step asks for expert version {v}, which was never prepared here"
                )))
            }
        }
    }

    /// The engine's prefix cache as the step result reports it.
    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        let s = self.engine.prefix_stats();
        PrefixCacheStats {
            cached_blocks: self.engine.kv_cached() as u32,
            queried_blocks: s.queried_blocks,
            hit_blocks: s.hit_blocks,
            evicted_blocks: s.evicted_blocks,
        }
    }

    pub fn execute(&mut self, plan: &StepPlan) -> Result<StepResult, WorkerError> {
        let t0 = std::time::Instant::now();
        if plan.expert_version != 0 && plan.expert_version != self.version {
            self.switch_to(plan.expert_version)?;
        }
        for id in &plan.free_seqs {
            self.engine.release(*id);
            self.seqs.remove(id);
        }
        for c in &plan.chunks {
            let have = self.engine.seq_len(c.seq_id) as u32;
            if c.start_pos == 0 && have > 0 {
                // Recompute after preemption or re-homing: start over.
                self.engine.release(c.seq_id);
                self.seqs.remove(&c.seq_id);
            } else if c.start_pos != have {
                return Err(WorkerError::Sequence {
                    seq_id: c.seq_id,
                    detail: format!(
                        "chunk starts at {} but {} positions are cached",
                        c.start_pos, have
                    ),
                });
            }
            chunk_params(c, &bias_of(c)).validate()?;
        }
        let specs: Vec<ChunkSpec> = plan
            .chunks
            .iter()
            .map(|c| ChunkSpec {
                seq_id: c.seq_id,
                tokens: &c.tokens,
                logits: if c.sample { Logits::Last } else { Logits::None },
            })
            .collect();
        // Context parallelism: the ranges of this rank's sequences held elsewhere, and the
        // ranges of others' it holds that grow.
        let layouts: Vec<SeqLayout> = plan
            .chunks
            .iter()
            .filter(|c| !c.kv_spans.is_empty())
            .map(|c| SeqLayout {
                seq_id: c.seq_id,
                spans: c
                    .kv_spans
                    .iter()
                    .map(|s| Span {
                        rank: s.rank,
                        start: s.start as usize,
                        end: s.end as usize,
                    })
                    .collect(),
            })
            .collect();
        let guests: Vec<GuestSpec> = plan
            .kv_guests
            .iter()
            .map(|g| GuestSpec {
                seq_id: g.seq_id,
                home: g.home,
                start: g.start as usize,
                end: g.end as usize,
            })
            .collect();
        let cp = ContextPlan {
            layouts: &layouts,
            guests: &guests,
            exchange: plan.context_exchange,
        };
        let out = self.engine.step_with(&specs, cp, false)?;
        let vocab = self.engine.config().vocab_size;
        let mut tokens = Vec::new();
        let mut row = 0;
        for c in &plan.chunks {
            let rec = self.seqs.entry(c.seq_id).or_default();
            if c.request.is_some() {
                rec.request = c.request.clone();
            }
            if c.start_pos == 0 {
                rec.logit_bias = bias_of(c);
            }
            rec.last = None;
            rec.fed.extend_from_slice(&c.tokens);
            let h = &rec.fed;
            if c.sample {
                let raw = &out.logits[row * vocab..(row + 1) * vocab];
                let mut logits = raw.to_vec();
                row += 1;
                let p = chunk_params(c, &rec.logit_bias);
                let pos = h.len() as u64;
                let seen = sampling::Seen {
                    tokens: h,
                    prompt_len: c.prompt_tokens as usize,
                    banned: &c.banned,
                    allowed: (!c.allowed.is_empty()).then_some(&c.allowed[..]),
                };
                let token =
                    sampling::sample(&mut logits, &p, seen, &mut Rng::new(mix(p.seed, pos)));
                let (logprob, top) = sampling::logprobs(raw, token, c.top_logprobs as usize);
                let t = SampledToken {
                    seq_id: c.seq_id,
                    token,
                    logprob,
                    top: top
                        .into_iter()
                        .map(|(token, logprob)| TokenLogprob { token, logprob })
                        .collect(),
                };
                if rec.request.as_ref().is_some_and(|r| r.logprobs) {
                    if rec.recent.len() == RECENT_LOGPROBS {
                        rec.recent.pop_front();
                    }
                    rec.recent.push_back(t.clone());
                }
                rec.last = Some(t.clone());
                tokens.push(t);
            }
        }
        let (all_to_all_seconds, all_to_all_bytes) = self.engine.take_exchange_stats();
        let (stored, gone) = self.engine.take_prefix_events();
        let experts_ready = self.experts_ready()?;
        Ok(StepResult {
            step: plan.step,
            tokens,
            expert_load: out.expert_load,
            kv_blocks_used: self.engine.kv_used() as u32,
            all_to_all_seconds,
            all_to_all_bytes,
            step_seconds: t0.elapsed().as_secs_f64(),
            experts_ready,
            kept: vec![],
            prefix_cache: Some(self.prefix_cache_stats()),
            blocks_stored: stored.iter().map(|h| h.to_le_bytes().to_vec()).collect(),
            blocks_forgotten: gone.iter().map(|h| h.to_le_bytes().to_vec()).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_worker::engine::{EngineOptions, ExpertSetup};

    /// A sequence whose request streams logprobs hands a new leader its last
    /// [`RECENT_LOGPROBS`] sampled tokens with exactly the log-probabilities its steps
    /// returned, newest last; one that does not keeps none.
    #[test]
    fn held_sequences_keep_their_recent_logprobs() {
        let model = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/tiny-qwen3-moe"
        );
        let engine = Engine::load_with(
            std::path::Path::new(model),
            &EngineOptions::default(),
            ExpertSetup::Local,
        )
        .unwrap();
        let mut ex = Executor::new(engine);
        let prompt = vec![11u32, 400, 27, 1500];
        let start = |id: u64, logprobs: bool| SeqChunk {
            seq_id: id,
            tokens: prompt.clone(),
            start_pos: 0,
            sample: true,
            top_logprobs: 3,
            prompt_tokens: prompt.len() as u32,
            request: Some(SeqRequest {
                request_id: format!("r{id}"),
                prompt: prompt.clone(),
                logprobs,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut sampled: HashMap<u64, Vec<SampledToken>> = HashMap::new();
        let mut plan = StepPlan {
            step: 1,
            epoch: 1,
            chunks: vec![start(1, true), start(2, false)],
            ..Default::default()
        };
        let steps = RECENT_LOGPROBS + 6;
        for step in 0..steps {
            let r = ex.execute(&plan).unwrap();
            plan.chunks.clear();
            plan.step += 1;
            for t in r.tokens {
                plan.chunks.push(SeqChunk {
                    seq_id: t.seq_id,
                    tokens: vec![t.token],
                    start_pos: (prompt.len() + step) as u32,
                    sample: true,
                    top_logprobs: 3,
                    prompt_tokens: prompt.len() as u32,
                    ..Default::default()
                });
                sampled.entry(t.seq_id).or_default().push(t);
            }
        }
        let (held, _) = ex.held();
        let with = held.iter().find(|h| h.seq_id == 1).unwrap();
        let want = &sampled[&1][steps - RECENT_LOGPROBS..];
        assert_eq!(
            with.recent, want,
            "the last {RECENT_LOGPROBS} sampled, oldest first"
        );
        assert_eq!(with.last.as_ref(), want.last());
        assert!(with
            .recent
            .iter()
            .all(|t| t.top.len() == 3 && t.logprob < 0.0));
        let gen: Vec<u32> = sampled[&1].iter().map(|t| t.token).collect();
        assert_eq!(with.tokens, [&prompt[..], &gen].concat());
        let without = held.iter().find(|h| h.seq_id == 2).unwrap();
        assert!(without.recent.is_empty(), "{:?}", without.recent);
    }
}
