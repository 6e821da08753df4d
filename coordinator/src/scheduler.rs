//! The step scheduler as a pure state machine: `State::next_step()` decides what every worker
//! computes in the next lockstep step; the async driver only ships plans and feeds results back
//! (`on_sampled`, `finish`).
//!
//! Policy (continuous batching with chunked prefill, as vLLM's and SGLang's schedulers):
//! 1. running sequences that need one decode token go first, highest priority then oldest;
//! 2. then partially prefilled sequences continue, in chunks, under the per-step token budget;
//! 3. then waiting sequences are admitted in priority order while budget, `max_running` and
//!    blocks allow, each homed on the worker with the most free KV blocks — or, with prefix
//!    homing on ([`State::set_prefix_homing`]) and a worker reported to cache a prefix of it
//!    ([`State::set_cached`]), on the worker of least cost among those with room:
//!    `cost(w) = tokens w must compute + load_weight · positions of the sequences homed on w`
//!    (computed or still to be: what its steps attend over and must yet compute, as Dynamo's
//!    KV router weighs prefill blocks against active blocks). Ties go to the most free
//!    blocks, then the lowest index.
//!
//! Positions a sequence's home caches (its hint) are fed without charge: a prefill chunk may
//! carry them beyond the token budget and pacing prices only the rest (the worker takes them
//! from its prefix cache; were they evicted meanwhile it computes them, a longer step).
//!
//! When a decode needs a block and its worker has none, the lowest-priority, newest running
//! sequence on that worker is preempted by recompute: its blocks are freed and it returns to
//! the front of the queue with all its tokens (prompt and generated), to be prefilled again.
//!
//! With context parallelism ([`SchedulerConfig::context_parallel`]) a sequence that outgrows
//! the worker holding its last range continues in a new range on the worker with the most free
//! blocks ([`State::spans`]); admission counts the cluster's blocks, and preempting a split
//! sequence frees every range.
//!
//! Invariants (tested): a step's tokens beyond cached positions never exceed the budget; a worker never holds more
//! blocks than it has; a sequence appears at most once per step; decodes precede prefill
//! chunks; freed sequences hold no blocks; every sequence that fits a worker completes.

use std::collections::{BTreeMap, VecDeque};

pub type SeqId = u64;

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Tokens computed per step, over all workers (decodes count one each).
    pub token_budget: usize,
    pub max_running: usize,
    pub block_size: usize,
    /// KV blocks of each worker.
    pub blocks_per_worker: Vec<usize>,
    /// Context positions whose attention work equals one token's projections and experts
    /// ([`attention_equivalent`]); prices prefill chunks for the pacing limit. 0: tokens only.
    pub attn_equiv: usize,
    /// Context parallelism: a sequence whose KV outgrows its home's free blocks continues on
    /// further workers, each holding a range of its positions ([`State::spans`]), so a
    /// sequence may be as long as the cluster's KV rather than one worker's.
    pub context_parallel: bool,
}

/// A range of a sequence's positions held beyond its home (context parallelism): from
/// `start`, in `blocks` blocks of `worker`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Extent {
    worker: usize,
    start: usize,
    blocks: usize,
}

/// Cost of feeding `len` tokens at positions `start..start + len`, in token-equivalents: each
/// token costs 1 (projections, experts) plus its context length over `attn_equiv` (attention).
pub fn chunk_cost(start: usize, len: usize, attn_equiv: usize) -> f64 {
    let len_f = len as f64;
    if attn_equiv == 0 {
        return len_f;
    }
    len_f + len_f * (start as f64 + (len_f + 1.0) / 2.0) / attn_equiv as f64
}

/// How many context positions of attention cost as much as one token's dense and expert
/// matmuls, from the model's shape (multiply-adds per layer).
pub fn attention_equivalent(cfg: &switchyard_worker::ModelConfig) -> usize {
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let proj = h * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads);
    let mlp = if cfg.num_experts > 0 {
        cfg.experts_per_tok * 3 * h * cfg.moe_intermediate_size + h * cfg.num_experts
    } else {
        3 * h * cfg.intermediate_size
    };
    // q·k and p·v over one position, every head.
    let per_position = 2 * cfg.num_heads * hd;
    ((proj + mlp) / per_position.max(1)).max(1)
}

/// One sequence's part of a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub seq: SeqId,
    pub worker: usize,
    /// Position of the first token fed.
    pub start: usize,
    pub len: usize,
    /// Whether a token is sampled after this chunk (it reaches the sequence's end).
    pub sample: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    pub chunks: Vec<Chunk>,
    /// How many of the chunks are decodes (they come first).
    pub decodes: usize,
    /// Sequences whose KV was dropped this step; their workers must free them.
    pub preempted: Vec<(SeqId, usize)>,
}

#[derive(Clone, Debug)]
struct Seq {
    /// Prompt and generated tokens.
    len: usize,
    /// Positions whose KV exists (or is being computed) on `home`.
    computed: usize,
    home: Option<usize>,
    blocks: usize,
    priority: i32,
    arrival: u64,
    /// Positions from the start each worker is reported to cache (a hint; empty: none).
    cached: Vec<usize>,
    /// Ranges held beyond the home (context parallelism), in position order; the home's
    /// range ends where the first starts.
    spans: Vec<Extent>,
}

impl Seq {
    /// Positions from `start` on worker `w` that are cached there (fed without charge).
    fn cached_ahead(&self, w: usize, start: usize) -> usize {
        self.cached
            .get(w)
            .copied()
            .unwrap_or(0)
            .saturating_sub(start)
            .min(self.len.saturating_sub(start))
    }
}

#[derive(Debug)]
pub struct State {
    cfg: SchedulerConfig,
    seqs: BTreeMap<SeqId, Seq>,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    free: Vec<usize>,
    arrivals: u64,
    prefill_limit: Option<f64>,
    /// `Some(load_weight)`: home by cached overlap against load (see the module doc).
    prefix_homing: Option<f64>,
    /// Sequences whose KV came to span more than their home's (context parallelism).
    splits: u64,
}

impl State {
    pub fn new(cfg: SchedulerConfig) -> Self {
        let free = cfg.blocks_per_worker.clone();
        State {
            cfg,
            seqs: BTreeMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            free,
            arrivals: 0,
            prefill_limit: None,
            prefix_homing: None,
            splits: 0,
        }
    }

    /// Sequences split so far: each time one's KV grew past its home's into a range on
    /// another worker for the first time (context parallelism; again after a recompute).
    pub fn splits(&self) -> u64 {
        self.splits
    }

    /// Homing by cached overlap against load, with that weight on a worker's waiting tokens
    /// (see the module doc); `None` homes by free blocks alone.
    pub fn set_prefix_homing(&mut self, load_weight: Option<f64>) {
        self.prefix_homing = load_weight.filter(|w| w.is_finite() && *w >= 0.0);
    }

    /// Hints that worker `w` caches the first `cached[w]` positions of sequence `id` (the
    /// position a sample follows is never among them). Unknown ids are ignored.
    pub fn set_cached(&mut self, id: SeqId, cached: Vec<usize>) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.cached = cached;
        }
    }

    /// Positions of `id` from `start` that its hint says worker `w` caches.
    pub fn cached_ahead(&self, id: SeqId, w: usize, start: usize) -> usize {
        self.seqs.get(&id).map_or(0, |s| s.cached_ahead(w, start))
    }

    /// Sequences waiting for admission, in admission order, then those homed with prompt
    /// positions still to compute: the ones whose cache hints matter.
    pub fn needing_prefill(&self) -> Vec<SeqId> {
        let mut v: Vec<SeqId> = self.waiting.iter().copied().collect();
        v.extend(
            self.running
                .iter()
                .filter(|id| self.seqs[*id].computed < self.seqs[*id].len)
                .copied(),
        );
        v
    }

    /// Each worker's load: the positions of the sequences homed there, computed or still to
    /// be (what its steps attend over and must yet compute, and its KV held).
    fn homed_positions(&self) -> Vec<usize> {
        let mut p = vec![0; self.free.len()];
        for id in &self.running {
            let s = &self.seqs[id];
            if let Some(w) = s.home {
                p[w] += s.len;
            }
        }
        p
    }

    /// Caps the prefill work ([`chunk_cost`]) of steps that carry decodes, to protect their
    /// inter-token latency (see `pacer`); `Some(0.0)` makes such steps decode-only. Steps
    /// without decodes always use the whole token budget.
    pub fn set_attn_equiv(&mut self, attn_equiv: usize) {
        self.cfg.attn_equiv = attn_equiv;
    }

    /// Lets sequences outgrow their home's KV (see [`SchedulerConfig::context_parallel`]).
    pub fn set_context_parallel(&mut self, on: bool) {
        self.cfg.context_parallel = on;
    }

    pub fn attn_equiv(&self) -> usize {
        self.cfg.attn_equiv
    }

    pub fn set_prefill_limit(&mut self, limit: Option<f64>) {
        self.prefill_limit = limit;
    }

    /// Positions per KV block.
    pub fn block_size(&self) -> usize {
        self.cfg.block_size
    }

    fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.cfg.block_size)
    }

    /// Positions of KV the smallest worker holds: a sequence may be homed on any worker, so
    /// none may ever need more. With context parallelism, every worker's together.
    pub fn capacity_tokens(&self) -> usize {
        let b = &self.cfg.blocks_per_worker;
        let blocks = if self.cfg.context_parallel {
            b.iter().sum()
        } else {
            b.iter().copied().min().unwrap_or(0)
        };
        blocks * self.cfg.block_size
    }

    /// Where sequence `id`'s positions beyond its home are held: (worker, start, end) in
    /// position order, the last ending at its computed positions (empty: all at home).
    pub fn spans(&self, id: SeqId) -> Vec<(usize, usize, usize)> {
        let Some(s) = self.seqs.get(&id) else {
            return Vec::new();
        };
        let mut v: Vec<(usize, usize, usize)> = s
            .spans
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let end = s.spans.get(i + 1).map_or(s.computed, |n| n.start);
                (e.worker, e.start, end.min(s.computed))
            })
            .collect();
        v.retain(|(_, start, end)| start < end);
        v
    }

    /// Whether a sequence that may reach `total` tokens (prompt + max new tokens) can run to
    /// its end on any worker, alone. A sequence that cannot would wait for blocks that never
    /// exist; callers refuse it at the door instead of queueing it.
    pub fn fits(&self, total: usize) -> bool {
        total > 0 && total <= self.capacity_tokens()
    }

    /// Queues a sequence of `len` known tokens (its prompt).
    pub fn add(&mut self, id: SeqId, len: usize, priority: i32) {
        assert!(len > 0 && !self.seqs.contains_key(&id));
        self.arrivals += 1;
        self.seqs.insert(
            id,
            Seq {
                len,
                computed: 0,
                home: None,
                blocks: 0,
                priority,
                arrival: self.arrivals,
                cached: Vec::new(),
                spans: Vec::new(),
            },
        );
        self.enqueue(id, false);
    }

    /// Inserts into the waiting queue by (priority desc, arrival asc); preempted sequences go
    /// ahead of equal-priority newcomers.
    fn enqueue(&mut self, id: SeqId, front: bool) {
        let s = &self.seqs[&id];
        let key = (-(s.priority as i64), if front { 0 } else { s.arrival });
        let pos = self
            .waiting
            .iter()
            .position(|o| {
                let t = &self.seqs[o];
                key < (-(t.priority as i64), t.arrival)
            })
            .unwrap_or(self.waiting.len());
        self.waiting.insert(pos, id);
    }

    /// A token was sampled for `id` after the last step.
    pub fn on_sampled(&mut self, id: SeqId) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.len += 1;
        }
    }

    /// The sequence is done (finished, cancelled or failed): its blocks return at once.
    pub fn finish(&mut self, id: SeqId) {
        if let Some(s) = self.seqs.remove(&id) {
            if let Some(w) = s.home {
                self.free[w] += s.blocks;
            }
            for e in s.spans {
                self.free[e.worker] += e.blocks;
            }
        }
        self.running.retain(|x| *x != id);
        self.waiting.retain(|x| *x != id);
    }

    /// Takes over a sequence whose first `computed` positions are cached on worker `home`
    /// (its worker kept them over an epoch change): it runs on from there with no re-prefill.
    /// `len` is its known tokens (prompt and generated). Refused (false, nothing changed) when
    /// `computed` is not a cached prefix awaiting more (`0 < computed < len`) or `home` lacks
    /// the blocks; the caller then queues it with [`add`](Self::add).
    pub fn adopt(
        &mut self,
        id: SeqId,
        len: usize,
        computed: usize,
        home: usize,
        priority: i32,
    ) -> bool {
        let blocks = self.blocks_for(computed);
        if self.seqs.contains_key(&id)
            || computed == 0
            || computed >= len
            || home >= self.free.len()
            || blocks > self.free[home]
        {
            return false;
        }
        self.arrivals += 1;
        self.free[home] -= blocks;
        self.seqs.insert(
            id,
            Seq {
                len,
                computed,
                home: Some(home),
                blocks,
                priority,
                arrival: self.arrivals,
                cached: Vec::new(),
                spans: Vec::new(),
            },
        );
        self.running.push(id);
        true
    }

    /// Undoes what planning `step` assumed about progress, after the step failed: each
    /// chunk's positions count as not computed again (its worker's engine does not advance a
    /// sequence whose step failed). Blocks stay reserved.
    pub fn rollback(&mut self, step: &Step) {
        for c in &step.chunks {
            if let Some(s) = self.seqs.get_mut(&c.seq) {
                if s.home == Some(c.worker) {
                    s.computed = s.computed.min(c.start);
                }
            }
        }
    }

    /// Every homed sequence with cached positions: (id, worker, positions computed).
    pub fn homed(&self) -> Vec<(SeqId, usize, usize)> {
        self.seqs
            .iter()
            .filter_map(|(id, s)| s.home.map(|w| (*id, w, s.computed)))
            .filter(|(_, _, c)| *c > 0)
            .collect()
    }

    /// The worker a sequence is homed on, if it holds KV anywhere.
    pub fn home(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).and_then(|s| s.home)
    }

    pub fn free_blocks(&self) -> &[usize] {
        &self.free
    }
    pub fn running(&self) -> usize {
        self.running.len()
    }
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Grows `id`'s allocation to cover `positions`, all or nothing; false when its worker
    /// lacks blocks (with context parallelism: when the cluster does).
    ///
    /// With context parallelism, the worker holding the sequence's last range gives what it
    /// has; then the range closes at its blocks' end and the next starts there on the worker
    /// with the most free blocks (any other: one that holds an earlier range too, the home
    /// included, may hold another), so a sequence grows while the cluster has a free block.
    fn reserve(&mut self, id: SeqId, positions: usize) -> bool {
        let bs = self.cfg.block_size;
        let s = &self.seqs[&id];
        let w = s.home.expect("reserved sequences are homed");
        let (last_worker, start, blocks) = match s.spans.last() {
            Some(e) => (e.worker, e.start, e.blocks),
            None => (w, 0, s.blocks),
        };
        let need = positions.saturating_sub(start).div_ceil(bs);
        let more = need.saturating_sub(blocks);
        if more <= self.free[last_worker] {
            self.free[last_worker] -= more;
            let s = self.seqs.get_mut(&id).expect("present");
            match s.spans.last_mut() {
                Some(e) => e.blocks += more,
                None => s.blocks += more,
            }
            return true;
        }
        if !self.cfg.context_parallel {
            return false;
        }
        // Plan the whole extension first: the last holder's free blocks, then new ranges.
        let mut free = self.free.clone();
        let grow = free[last_worker];
        free[last_worker] = 0;
        let mut end = start + (blocks + grow) * bs;
        let mut new = Vec::new();
        while end < positions {
            let Some(next) = (0..free.len())
                .filter(|x| free[*x] > 0)
                .max_by_key(|x| (free[*x], std::cmp::Reverse(*x)))
            else {
                return false;
            };
            let take = (positions - end).div_ceil(bs).min(free[next]);
            free[next] -= take;
            new.push(Extent {
                worker: next,
                start: end,
                blocks: take,
            });
            end += take * bs;
        }
        self.free = free;
        let s = self.seqs.get_mut(&id).expect("present");
        match s.spans.last_mut() {
            Some(e) => e.blocks += grow,
            None => s.blocks += grow,
        }
        if s.spans.is_empty() && !new.is_empty() {
            self.splits += 1;
        }
        s.spans.extend(new);
        true
    }

    /// The worker holding the last range of `id` (its home unless it is split).
    fn last_holder(&self, id: SeqId) -> Option<usize> {
        let s = &self.seqs[&id];
        s.spans.last().map(|e| e.worker).or(s.home)
    }

    fn preempt(&mut self, id: SeqId, step: &mut Step) {
        let s = self.seqs.get_mut(&id).expect("present");
        let w = s.home.take().expect("running sequences are homed");
        self.free[w] += s.blocks;
        for e in std::mem::take(&mut s.spans) {
            self.free[e.worker] += e.blocks;
            step.preempted.push((id, e.worker));
        }
        s.blocks = 0;
        s.computed = 0;
        self.running.retain(|x| *x != id);
        step.chunks.retain(|c| c.seq != id);
        step.preempted.push((id, w));
        self.enqueue(id, true);
    }

    /// Order of running sequences: priority desc, arrival asc.
    fn sorted_running(&self) -> Vec<SeqId> {
        let mut r = self.running.clone();
        r.sort_by_key(|id| {
            let s = &self.seqs[id];
            (-(s.priority as i64), s.arrival)
        });
        r
    }

    pub fn next_step(&mut self) -> Step {
        let mut step = Step::default();
        let mut budget = self.cfg.token_budget;
        // 1. Decodes.
        for id in self.sorted_running() {
            let Some(s) = self.seqs.get(&id) else {
                continue;
            };
            if s.home.is_none() || s.computed + 1 != s.len || budget == 0 {
                continue;
            }
            let (w, need) = (s.home.expect("checked"), s.computed + 1);
            while !self.reserve(id, need) {
                // Victim: the lowest-priority, newest running sequence on the worker that
                // must grow (this one's home, or where its last range is), else itself.
                let grows = self.last_holder(id).unwrap_or(w);
                let victim = self
                    .sorted_running()
                    .into_iter()
                    .rev()
                    .find(|v| self.seqs[v].home == Some(grows))
                    .unwrap_or(id);
                self.preempt(victim, &mut step);
                if victim == id {
                    break;
                }
            }
            let s = &self.seqs[&id];
            if s.home.is_none() {
                continue;
            }
            step.chunks.push(Chunk {
                seq: id,
                worker: w,
                start: s.computed,
                len: 1,
                sample: true,
            });
            self.seqs.get_mut(&id).expect("present").computed += 1;
            budget -= 1;
        }
        step.decodes = step.chunks.len();
        let mut units = match self.prefill_limit {
            Some(l) if step.decodes > 0 => l.max(0.0),
            _ => f64::INFINITY,
        };
        // 2. Continuing prefills.
        for id in self.sorted_running() {
            if budget == 0 || units <= 0.0 {
                break;
            }
            let s = &self.seqs[&id];
            if s.home.is_none() || s.computed >= s.len || step.chunks.iter().any(|c| c.seq == id) {
                continue;
            }
            self.push_prefill(id, &mut budget, &mut units, &mut step);
        }
        // 3. Admissions: none in a step that had to preempt (the freed blocks go to the
        // sequences already running, or admission and preemption would chase each other), and
        // only when the worker can hold the whole known sequence plus one decoded token.
        while budget > 0
            && units > 0.0
            && self.running.len() < self.cfg.max_running
            && step.preempted.is_empty()
        {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let Some(w) = self.pick_home(id) else {
                break;
            };
            // Under a prefill limit that its first token no longer fits, admission waits.
            if step.chunks.len() > step.decodes && chunk_cost(0, 1, self.cfg.attn_equiv) > units {
                break;
            }
            self.waiting.pop_front();
            self.seqs.get_mut(&id).expect("present").home = Some(w);
            self.running.push(id);
            self.push_prefill(id, &mut budget, &mut units, &mut step);
        }
        step
    }

    /// Where waiting sequence `id` goes: the worker with the most free blocks (lowest index
    /// on ties), or by cost when prefix homing is on and some worker caches a prefix of it;
    /// `None` when the chosen worker (by free blocks) or every worker (by cost) lacks room for
    /// the whole known sequence plus one decoded token.
    fn pick_home(&self, id: SeqId) -> Option<usize> {
        let s = &self.seqs[&id];
        let need = self.blocks_for(s.len + 1);
        if self.cfg.context_parallel {
            // Homed where most blocks are free, continuing elsewhere once they run out (every
            // range but the last fills its blocks): the cluster must have room for it.
            let best =
                (0..self.free.len()).max_by_key(|w| (self.free[*w], std::cmp::Reverse(*w)))?;
            let total: usize = self.free.iter().sum();
            return (self.free[best] > 0 && need <= total).then_some(best);
        }
        let by_free = |w: &usize| (self.free[*w], std::cmp::Reverse(*w));
        let cached = |w: usize| s.cached_ahead(w, 0);
        match self.prefix_homing {
            Some(weight) if (0..self.free.len()).any(|w| cached(w) > 0) => {
                let load = self.homed_positions();
                let cost = |w: usize| (s.len - cached(w)) as f64 + weight * load[w] as f64;
                (0..self.free.len())
                    .filter(|w| need <= self.free[*w])
                    .min_by(|a, b| {
                        cost(*a)
                            .total_cmp(&cost(*b))
                            .then_with(|| by_free(b).cmp(&by_free(a)))
                    })
            }
            _ => (0..self.free.len())
                .max_by_key(by_free)
                .filter(|w| need <= self.free[*w]),
        }
    }

    fn push_prefill(&mut self, id: SeqId, budget: &mut usize, units: &mut f64, step: &mut Step) {
        let s = &self.seqs[&id];
        let (start, w) = (s.computed, s.home.expect("homed"));
        // Cached positions at the chunk's head ride along without charge.
        let free = s.cached_ahead(w, start);
        let start = start + free;
        let mut len = (s.len - start).min(*budget);
        if units.is_finite() {
            // The longest chunk within the remaining units (cost grows with len); the step's
            // first prefill chunk gets at least one token so that paced prefill progresses.
            let a = self.cfg.attn_equiv;
            let floor = usize::from(step.chunks.len() == step.decodes);
            let (mut lo, mut hi) = (floor, len.max(1));
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                if chunk_cost(start, mid, a) <= *units {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            len = len.min(lo);
        }
        // Shrink to what the worker's blocks allow.
        let mut total = free + len;
        while total > 0 && !self.reserve(id, start - free + total) {
            total -= 1;
        }
        if total == 0 {
            return;
        }
        let charged = total.saturating_sub(free);
        let s = self.seqs.get_mut(&id).expect("present");
        s.computed += total;
        step.chunks.push(Chunk {
            seq: id,
            worker: w,
            start: start - free,
            len: total,
            sample: s.computed == s.len,
        });
        *budget -= charged;
        *units -= chunk_cost(start, charged, self.cfg.attn_equiv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(budget: usize, blocks: Vec<usize>) -> SchedulerConfig {
        SchedulerConfig {
            token_budget: budget,
            max_running: 64,
            block_size: 4,
            blocks_per_worker: blocks,
            attn_equiv: 0,
            context_parallel: false,
        }
    }

    /// Prefix homing sends a sequence to the worker that caches its prefix even when another
    /// has more free blocks, feeds the cached positions beyond the budget, and still weighs
    /// load: a cached worker buried in queued prefill loses to an idle one.
    #[test]
    fn prefix_homing_prefers_the_cached_worker_against_load() {
        let mut st = State::new(cfg(8, vec![100, 200]));
        st.set_prefix_homing(Some(1.0));
        st.add(1, 40, 0);
        st.set_cached(1, vec![32, 0]);
        let s = st.next_step();
        assert_eq!(s.chunks.len(), 1);
        // Worker 0 caches 32 of the 40 positions: the chunk carries them and 8 more (the
        // budget), then it is done.
        assert_eq!(
            (s.chunks[0].worker, s.chunks[0].start, s.chunks[0].len),
            (0, 0, 40)
        );
        assert!(s.chunks[0].sample);
        // Without prefix homing the hint does not move homing (most free blocks: worker 1,
        // which caches nothing, so the chunk is the budget's 8 tokens).
        let mut plain = State::new(cfg(8, vec![100, 200]));
        plain.add(1, 40, 0);
        plain.set_cached(1, vec![32, 0]);
        let s = plain.next_step();
        assert_eq!((s.chunks[0].worker, s.chunks[0].len), (1, 8));
        // Load: worker 0 holds a 300-position sequence, more than the 32 it would save
        // (set up by hand: admissions only happen with budget left after continuing prefills).
        let mut busy = State::new(cfg(8, vec![400, 400]));
        busy.set_prefix_homing(Some(1.0));
        busy.add(9, 300, 0);
        busy.waiting.retain(|x| *x != 9);
        busy.running.push(9);
        let s9 = busy.seqs.get_mut(&9).unwrap();
        (s9.home, s9.computed) = (Some(0), 8);
        busy.add(1, 40, 0);
        busy.set_cached(1, vec![32, 0]);
        assert_eq!(busy.pick_home(1), Some(1));
        // With a load weight of 0 only the cache counts.
        busy.set_prefix_homing(Some(0.0));
        assert_eq!(busy.pick_home(1), Some(0));
        // No room on the cached worker: the other one.
        busy.set_prefix_homing(Some(0.0));
        busy.free[0] = 1;
        assert_eq!(busy.pick_home(1), Some(1));
    }

    /// What the coordinator does with a step's results: every sampling chunk yields a token;
    /// a sequence with no tokens `left` finishes.
    fn feed_samples(st: &mut State, step: &Step, left: &mut BTreeMap<u64, usize>) {
        for c in step.chunks.iter().filter(|c| c.sample) {
            let n = left.get_mut(&c.seq).unwrap();
            *n -= 1;
            if *n == 0 {
                left.remove(&c.seq);
                st.finish(c.seq);
            } else {
                st.on_sampled(c.seq);
            }
        }
    }

    /// Drives the state like the coordinator would: every sampling chunk yields a token; a
    /// sequence finishes after `gen` tokens. Returns the steps taken.
    fn drive(st: &mut State, reqs: &[(u64, usize, usize, i32)], max_steps: usize) -> Vec<Step> {
        let mut left: BTreeMap<u64, usize> = reqs.iter().map(|r| (r.0, r.2)).collect();
        for r in reqs {
            st.add(r.0, r.1, r.3);
        }
        let mut steps = Vec::new();
        for _ in 0..max_steps {
            if left.is_empty() {
                break;
            }
            let step = st.next_step();
            feed_samples(st, &step, &mut left);
            steps.push(step);
        }
        assert!(
            left.is_empty(),
            "unfinished after {max_steps} steps: {left:?}"
        );
        steps
    }

    #[test]
    fn an_adopted_sequence_runs_on_from_its_cached_positions() {
        let mut st = State::new(cfg(8, vec![10, 10]));
        // 6 tokens known, 5 cached on worker 1: its next step is the decode of position 5.
        assert!(st.adopt(7, 6, 5, 1, 0));
        assert_eq!(st.free_blocks(), &[10, 8]);
        assert_eq!(st.home(7), Some(1));
        let s = st.next_step();
        assert_eq!(
            s.chunks,
            vec![Chunk {
                seq: 7,
                worker: 1,
                start: 5,
                len: 1,
                sample: true
            }]
        );
        // A partly prefilled one continues its prefill where it was.
        assert!(st.adopt(8, 12, 4, 0, 0));
        let s = st.next_step();
        assert!(s.chunks.contains(&Chunk {
            seq: 8,
            worker: 0,
            start: 4,
            len: 8,
            sample: true
        }));
        // Refused: nothing cached, nothing left to compute, a worker without the blocks, a
        // sequence already known, a worker outside the group.
        assert!(!st.adopt(9, 5, 0, 0, 0));
        assert!(!st.adopt(9, 5, 5, 0, 0));
        assert!(!st.adopt(9, 200, 100, 0, 0));
        assert!(!st.adopt(7, 6, 5, 0, 0));
        assert!(!st.adopt(9, 6, 5, 2, 0));
        assert_eq!(st.homed().len(), 2);
    }

    #[test]
    fn a_failed_step_is_rolled_back_to_what_was_computed_before_it() {
        let mut st = State::new(cfg(8, vec![10]));
        st.add(1, 3, 0);
        let first = st.next_step();
        assert_eq!(first.chunks[0].len, 3);
        st.on_sampled(1);
        let failed = st.next_step();
        assert_eq!(failed.chunks[0].start, 3);
        assert_eq!(st.homed(), vec![(1, 0, 4)]);
        st.rollback(&failed);
        assert_eq!(st.homed(), vec![(1, 0, 3)]);
        // The step is planned again exactly.
        assert_eq!(st.next_step().chunks, failed.chunks);
    }

    #[test]
    fn decodes_go_first_and_prefill_is_chunked_under_the_budget() {
        let mut st = State::new(cfg(8, vec![100]));
        st.add(1, 3, 0);
        let s1 = st.next_step();
        assert_eq!(
            s1.chunks,
            vec![Chunk {
                seq: 1,
                worker: 0,
                start: 0,
                len: 3,
                sample: true
            }]
        );
        st.on_sampled(1);
        st.add(2, 20, 0);
        let s2 = st.next_step();
        assert_eq!(
            s2.chunks[0],
            Chunk {
                seq: 1,
                worker: 0,
                start: 3,
                len: 1,
                sample: true
            }
        );
        assert_eq!(
            s2.chunks[1],
            Chunk {
                seq: 2,
                worker: 0,
                start: 0,
                len: 7,
                sample: false
            }
        );
        st.on_sampled(1);
        let s3 = st.next_step();
        assert_eq!(
            s3.chunks[1],
            Chunk {
                seq: 2,
                worker: 0,
                start: 7,
                len: 7,
                sample: false
            }
        );
    }

    #[test]
    fn kv_pressure_preempts_the_newest_lowest_priority_and_it_recomputes() {
        // One worker with 4 blocks of 4 positions.
        let mut st = State::new(cfg(64, vec![4]));
        st.add(1, 7, 1); // 2 blocks
        st.add(2, 7, 0); // 2 blocks
        let s = st.next_step();
        assert_eq!(s.chunks.len(), 2);
        st.on_sampled(1);
        st.on_sampled(2);
        // Both need a third block at position 8: only one can have it; seq 2 (lower priority) yields.
        let s = st.next_step();
        st.on_sampled(1);
        let s2 = st.next_step();
        assert!(s.preempted.is_empty());
        assert_eq!(s2.preempted, vec![(2, 0)]);
        assert_eq!(st.free_blocks(), &[1]);
        st.finish(1);
        // Seq 2 comes back and is prefilled again from position 0 with all 8 known tokens.
        let s3 = st.next_step();
        assert_eq!(
            s3.chunks,
            vec![Chunk {
                seq: 2,
                worker: 0,
                start: 0,
                len: 8,
                sample: true
            }]
        );
    }

    #[test]
    fn a_sequence_longer_than_one_worker_does_not_fit() {
        let st = State::new(cfg(8, vec![4, 2]));
        assert_eq!(st.capacity_tokens(), 8);
        assert!(st.fits(8));
        assert!(!st.fits(9));
        assert!(!st.fits(0));
    }

    /// Checks a split sequence's ranges: contiguous from the home's, each on another worker
    /// than the range before it, within the blocks each was given.
    fn check_spans(st: &State) -> Result<(), String> {
        let bs = st.cfg.block_size;
        for (id, s) in &st.seqs {
            let Some(home) = s.home else {
                if !s.spans.is_empty() {
                    return Err(format!("{id}: ranges but no home"));
                }
                continue;
            };
            let mut at = s.blocks * bs;
            let mut prev = home;
            for e in &s.spans {
                if e.start != at || e.worker == prev || e.blocks == 0 {
                    return Err(format!("{id}: range {e:?} after {at} on {prev}"));
                }
                prev = e.worker;
                at = e.start + e.blocks * bs;
            }
            if at < s.computed {
                return Err(format!("{id}: {} computed, room for {at}", s.computed));
            }
        }
        Ok(())
    }

    #[test]
    fn context_parallel_admits_what_only_the_cluster_holds_and_splits_it() {
        let mut c = cfg(16, vec![4, 4, 4]);
        c.context_parallel = true;
        let mut st = State::new(c);
        // 48 positions in all; one worker holds 16.
        assert_eq!(st.capacity_tokens(), 48);
        assert!(st.fits(40) && !st.fits(49));
        st.add(1, 30, 0);
        let s = st.next_step();
        assert_eq!((s.chunks[0].worker, s.chunks[0].len), (0, 16));
        assert!(st.spans(1).is_empty());
        // The next chunk runs past the home's 16 positions: worker 1 holds 16..30 (4 blocks
        // reserved, the most free), and the spans end where the sequence is computed.
        let s = st.next_step();
        assert_eq!((s.chunks[0].start, s.chunks[0].len), (16, 14));
        assert!(s.chunks[0].sample);
        assert_eq!(st.spans(1), vec![(1, 16, 30)]);
        assert_eq!(st.free_blocks(), &[0, 0, 4]);
        st.on_sampled(1);
        // Decodes grow the last range, then the next worker's.
        for _ in 0..3 {
            st.next_step();
            st.on_sampled(1);
        }
        assert_eq!(st.spans(1), vec![(1, 16, 32), (2, 32, 33)]);
        assert_eq!(st.free_blocks(), &[0, 0, 3]);
        check_spans(&st).unwrap();
        st.finish(1);
        assert_eq!(st.free_blocks(), &[4, 4, 4]);
        // Without context parallelism the same sequence waits at the door.
        let st = State::new(cfg(16, vec![4, 4, 4]));
        assert!(!st.fits(30));
    }

    #[test]
    fn sequences_are_homed_on_the_emptiest_worker() {
        let mut st = State::new(cfg(100, vec![10, 10, 10]));
        for id in 0..3 {
            st.add(id, 8, 0);
        }
        let s = st.next_step();
        let homes: Vec<usize> = s.chunks.iter().map(|c| c.worker).collect();
        assert_eq!(homes, vec![0, 1, 2]);
    }

    /// Drives requests `(prompt, generated, priority, arrival step)` to completion, each
    /// shrunk to what the door lets in, checking after every step that no worker holds more
    /// blocks than it has and `each`; then that everything finished and every block is back.
    /// Every step makes progress on some sequence and each is recomputed at most once per other
    /// sequence's growth, so the step bound is generous but finite (a livelock fails it).
    fn drive_arrivals(
        st: &mut State,
        blocks: &[usize],
        reqs: Vec<(usize, usize, i32, usize)>,
        each: impl Fn(&State) -> Result<(), String>,
    ) -> Result<(), String> {
        let cap = st.capacity_tokens();
        let reqs: Vec<(u64, usize, usize, i32, usize)> = reqs
            .into_iter()
            .enumerate()
            .map(|(i, (p, g, pr, at))| {
                let p = p.min(cap - 1).max(1);
                let g = g.min(cap - p).max(1);
                (i as u64, p, g, pr, at)
            })
            .collect();
        if let Some(r) = reqs.iter().find(|r| !st.fits(r.1 + r.2)) {
            return Err(format!("{r:?} does not fit"));
        }
        let mut left: BTreeMap<u64, usize> = BTreeMap::new();
        let work: usize = reqs.iter().map(|r| r.1 + r.2).sum();
        let max_steps = 64 + work * (reqs.len() + 1) * 4;
        let mut steps = 0;
        while steps < max_steps {
            for r in reqs.iter().filter(|r| r.4 == steps) {
                st.add(r.0, r.1, r.3);
                left.insert(r.0, r.2);
            }
            if left.is_empty() && reqs.iter().all(|r| r.4 < steps) {
                break;
            }
            let step = st.next_step();
            if let Some(w) = (0..blocks.len()).find(|&w| st.free_blocks()[w] > blocks[w]) {
                return Err(format!(
                    "worker {w}: {:?} free of {blocks:?}",
                    st.free_blocks()
                ));
            }
            each(st)?;
            feed_samples(st, &step, &mut left);
            steps += 1;
        }
        if !left.is_empty() {
            return Err(format!("livelock: {left:?} unfinished after {steps} steps"));
        }
        if st.free_blocks() != blocks {
            return Err(format!(
                "{:?} free at the end of {blocks:?}",
                st.free_blocks()
            ));
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn invariants_hold_and_everything_finishes(
            budget in 1usize..64,
            // Every sequence (<= 30 + 12 positions, 11 blocks of 4) fits on any worker.
            blocks in prop::collection::vec(11usize..40, 1..4),
            reqs in prop::collection::vec((1usize..30, 1usize..12, -1i32..2), 1..20),
        ) {
            let reqs: Vec<(u64, usize, usize, i32)> = reqs.into_iter().enumerate().map(|(i, (p, g, pr))| (i as u64, p, g, pr)).collect();
            let total: Vec<usize> = blocks.clone();
            let mut st = State::new(cfg(budget, blocks));
            let steps = drive(&mut st, &reqs, 5000);
            for step in &steps {
                prop_assert!(step.chunks.iter().map(|c| c.len).sum::<usize>() <= budget);
                let mut ids: Vec<u64> = step.chunks.iter().map(|c| c.seq).collect();
                ids.sort();
                ids.dedup();
                prop_assert_eq!(ids.len(), step.chunks.len());
                // Decodes (len 1 continuing a sequence) come before any prefill chunk of length > 1.
                if let Some(first_long) = step.chunks.iter().position(|c| c.len > 1) {
                    prop_assert!(step.chunks[first_long..].iter().all(|c| c.len > 1 || c.start == 0 || c.sample));
                }
            }
            // Everything finished: every block is back.
            prop_assert_eq!(st.free_blocks(), &total[..]);
            prop_assert_eq!(st.running() + st.waiting(), 0);
        }

        /// Preemption never livelocks: sequences up to a whole worker's KV each (prompt +
        /// generated == capacity at most, as admission allows), far more than fit at once,
        /// mixed priorities and arrivals while running; everything finishes within a bound
        /// that grows only linearly with the work.
        #[test]
        fn oversubscribed_workloads_finish_without_livelock(
            budget in 1usize..48,
            blocks in prop::collection::vec(2usize..12, 1..4),
            reqs in prop::collection::vec((1usize..64, 1usize..64, -2i32..3, 0usize..40), 2..24),
        ) {
            let mut st = State::new(cfg(budget, blocks.clone()));
            if let Err(e) = drive_arrivals(&mut st, &blocks, reqs, |_| Ok(())) {
                prop_assert!(false, "{}", e);
            }
        }

        /// Context parallelism under oversubscription: sequences up to the whole cluster's
        /// KV, far more than fit at once; ranges stay contiguous and within their blocks, no
        /// worker holds more blocks than it has, preempting a split sequence frees every range,
        /// and everything finishes.
        #[test]
        fn context_parallel_workloads_finish_and_keep_ranges_consistent(
            budget in 1usize..48,
            blocks in prop::collection::vec(2usize..8, 2..4),
            reqs in prop::collection::vec((1usize..64, 1usize..40, -1i32..2, 0usize..30), 1..12),
        ) {
            let mut c = cfg(budget, blocks.clone());
            c.context_parallel = true;
            let mut st = State::new(c);
            let total: usize = blocks.iter().sum();
            let r = drive_arrivals(&mut st, &blocks, reqs, |st| {
                let held: usize = st
                    .seqs
                    .values()
                    .map(|s| s.blocks + s.spans.iter().map(|e| e.blocks).sum::<usize>())
                    .sum();
                if held + st.free_blocks().iter().sum::<usize>() != total {
                    return Err(format!("{held} blocks held, {:?} free of {total}", st.free_blocks()));
                }
                check_spans(st)
            });
            if let Err(e) = r {
                prop_assert!(false, "{}", e);
            }
        }

        #[test]
        fn a_prefill_limit_caps_steps_with_decodes_and_everything_still_finishes(
            limit in 0.5f64..40.0,
            attn_equiv in 1usize..64,
            reqs in prop::collection::vec((1usize..30, 1usize..12), 1..12),
        ) {
            let reqs: Vec<(u64, usize, usize, i32)> = reqs.into_iter().enumerate().map(|(i, (p, g))| (i as u64, p, g, 0)).collect();
            let mut c = cfg(64, vec![40, 40]);
            c.attn_equiv = attn_equiv;
            let mut st = State::new(c);
            st.set_prefill_limit(Some(limit));
            let steps = drive(&mut st, &reqs, 5000);
            for step in &steps {
                if step.decodes == 0 {
                    continue;
                }
                let prefill = &step.chunks[step.decodes..];
                let cost: f64 = prefill.iter().map(|c| chunk_cost(c.start, c.len, attn_equiv)).sum();
                // Within the limit, or a single one-token chunk (the progress guarantee).
                prop_assert!(
                    cost <= limit + 1e-9 || (prefill.len() == 1 && prefill[0].len == 1),
                    "cost {} over limit {} in {:?}", cost, limit, step
                );
            }
            prop_assert_eq!(st.running() + st.waiting(), 0);
        }
    }
}
