//! One worker's engine: the model, its experts, the KV cache and the sequences homed here.
//!
//! A step names, per sequence, the tokens to append. Positions are implied by the sequence's
//! current length, so a step can only extend a sequence contiguously. Cache blocks for the whole
//! step are checked before any is taken: a step that cannot fit fails with
//! [`WorkerError::KvExhausted`] and changes nothing.

use crate::blocks::{chain_hash, BlockHash, PrefixStats};
use crate::comm::Comm;
use crate::config::ModelConfig;
use crate::context::Guest;
pub use crate::context::{ContextPlan, GuestSpec, SeqLayout, Span};
use crate::ep::EpExperts;
use crate::experts::{ExpertExec, ExpertSelection, ExpertSet, LocalExperts};
use crate::kv::KvCache;
use crate::model::{ForwardInput, ForwardOutput, Model};
use crate::weights::{Checkpoint, WeightDType};
use crate::WorkerError;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use crate::model::Logits;

#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Weight dtype; `None` keeps the checkpoint's (f32 or bf16).
    pub dtype: Option<WeightDType>,
    pub block_size: usize,
    /// KV blocks; `None` sizes the cache for `max_context` positions of 4 sequences.
    pub kv_blocks: Option<usize>,
    /// Longest sequence accepted; `None` means the model's `max_position_embeddings`.
    pub max_context: Option<usize>,
    /// Number of expert shards to load in-process (each holds only its experts).
    pub expert_shards: usize,
    /// Where the forward pass runs.
    pub device: Device,
    /// Element type of the KV cache (CPU; the CUDA backend keeps its own f32 pools).
    pub kv_dtype: crate::kv::KvDType,
    /// Automatic prefix caching: full KV blocks are named by their tokens and everything
    /// before them, shared by sequences with the same prefix and kept after release until
    /// their room is needed ([`crate::blocks`]). On by default; off on CUDA (whose pools
    /// cannot yet copy a shared block).
    pub prefix_cache: bool,
}

/// Where a worker runs the forward pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    /// CUDA device ordinal (builds with the `cuda` feature).
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device {s:?} (cpu, cuda or cuda:N)")),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            dtype: None,
            block_size: 16,
            kv_blocks: None,
            max_context: None,
            expert_shards: 1,
            device: Device::Cpu,
            kv_dtype: crate::kv::KvDType::F32,
            prefix_cache: true,
        }
    }
}

/// Tokens to append to one sequence this step.
pub struct ChunkSpec<'a> {
    pub seq_id: u64,
    pub tokens: &'a [u32],
    pub logits: Logits,
}

/// How this engine reaches the experts.
pub enum ExpertSetup {
    /// Every expert in this process (as `EngineOptions::expert_shards` shards).
    Local,
    /// Expert parallel: `holders[layer][expert]` lists the ranks holding each expert (empty
    /// for dense layers); this rank loads its share and exchanges tokens over `comm`.
    Parallel {
        holders: Vec<Vec<Vec<u32>>>,
        comm: Comm,
    },
}

#[derive(Default)]
struct Seq {
    table: Vec<u32>,
    len: usize,
    /// The token at every position, what block names are computed from (kept only while
    /// prefix caching is on).
    tokens: Vec<u32>,
    /// Names of the full blocks held here, `held() / block_size` of them while prefix
    /// caching is on.
    hashes: Vec<BlockHash>,
    /// Context parallelism: positions from here on are held by other ranks (the table
    /// covers `0..local_end` only).
    local_end: Option<usize>,
}

impl Seq {
    /// Positions whose keys and values this rank holds.
    fn held(&self) -> usize {
        self.local_end.map_or(self.len, |e| self.len.min(e))
    }
}

/// What a chunk takes from the prefix cache: the blocks found for the blocks its tokens
/// complete (with their names), whether the first replaces the sequence's partial last
/// block, and how many blocks were there to look up.
struct PrefixHit {
    blocks: Vec<(u32, BlockHash)>,
    replaces_partial: bool,
    queried: usize,
}

impl PrefixHit {
    fn none() -> Self {
        PrefixHit {
            blocks: Vec::new(),
            replaces_partial: false,
            queried: 0,
        }
    }

    /// The chunk's tokens whose positions the hit covers.
    fn tokens(&self, len: usize, bs: usize) -> usize {
        match self.blocks.len() {
            0 => 0,
            n if self.replaces_partial => n * bs - len % bs,
            n => n * bs,
        }
    }
    /// Blocks the hit adds to the sequence's table.
    fn added(&self) -> usize {
        self.blocks.len() - usize::from(self.replaces_partial)
    }
}

/// The cached blocks that extend `seq` (none yet when `None`) by `c`'s first tokens, never
/// covering the token a chunk wants logits for (`Logits::All` takes nothing: every
/// position's logits are computed). From the middle of a block (a chunk boundary of chunked
/// prefill), the cached block named for the sequence's partial last block completed by the
/// chunk's first tokens replaces that block: its first positions hold what the partial one
/// holds (the same tokens after the same prefix).
fn prefix_hit(kv: &KvCache, seq: Option<&Seq>, c: &ChunkSpec<'_>) -> PrefixHit {
    let bs = kv.block_size;
    let (len, have, named) = seq.map_or((0, 0, 0), |s| (s.len, s.table.len(), s.hashes.len()));
    let limit = match c.logits {
        Logits::None => c.tokens.len(),
        Logits::Last => c.tokens.len() - 1,
        Logits::All => 0,
    };
    let mut hit = PrefixHit {
        blocks: Vec::new(),
        replaces_partial: false,
        queried: (len + limit) / bs - len / bs,
    };
    if !kv.blocks().caching() || have != len.div_ceil(bs) || named != len / bs {
        hit.queried = 0;
        return hit;
    }
    let mut prev = seq.and_then(|s| s.hashes.last().copied());
    let mut at = 0;
    let partial = len % bs;
    if partial > 0 && hit.queried > 0 {
        let s = seq.expect("a partial block belongs to a sequence");
        let fill = bs - partial;
        let mut block = s.tokens[len - partial..len].to_vec();
        block.extend_from_slice(&c.tokens[..fill]);
        let h = chain_hash(prev, &block);
        let Some(b) = kv.blocks().lookup(h) else {
            return hit;
        };
        hit.blocks.push((b, h));
        hit.replaces_partial = true;
        prev = Some(h);
        at = fill;
    }
    for block in c.tokens[at..limit].chunks_exact(bs) {
        let h = chain_hash(prev, block);
        let Some(b) = kv.blocks().lookup(h) else {
            break;
        };
        hit.blocks.push((b, h));
        prev = Some(h);
    }
    hit
}

/// Names the sequence's blocks that are full and not yet named, offering each for reuse.
fn name_full_blocks(kv: &mut KvCache, s: &mut Seq) {
    let bs = kv.block_size;
    while s.hashes.len() < s.held() / bs {
        let i = s.hashes.len();
        let h = chain_hash(s.hashes.last().copied(), &s.tokens[i * bs..(i + 1) * bs]);
        s.hashes.push(h);
        kv.blocks_mut().register(s.table[i], h);
    }
}

pub struct Engine {
    pub model: Model,
    dir: PathBuf,
    dtype: WeightDType,
    experts: Box<dyn ExpertExec + Send>,
    kv: KvCache,
    seqs: HashMap<u64, Seq>,
    /// Ranges of other ranks' sequences held here (context parallelism).
    guests: HashMap<(u64, usize), Guest>,
    max_context: usize,
    /// The model on a GPU, when the engine runs there (it then owns the KV data; `kv` keeps
    /// the block allocator).
    #[cfg(feature = "cuda")]
    gpu: Option<crate::model::cuda::CudaModel>,
}

/// Reads and validates `config.json` of a checkpoint folder.
pub fn read_config(dir: &Path) -> Result<ModelConfig, WorkerError> {
    crate::gguf::refuse_as_folder(dir)?;
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p).map_err(|source| crate::weights::LoadError::Io {
        path: p.clone(),
        source,
    })?;
    Ok(ModelConfig::from_json_str(&text)?)
}

/// Checks that a holder table has one row per layer and, for MoE layers, one entry per
/// expert, each held by at least one rank.
pub fn check_holders(cfg: &ModelConfig, holders: &[Vec<Vec<u32>>]) -> Result<(), WorkerError> {
    if holders.len() != cfg.num_layers
        || holders
            .iter()
            .zip(&cfg.sparse_layers)
            .any(|(l, &sparse)| l.len() != if sparse { cfg.num_experts } else { 0 })
    {
        return Err(WorkerError::Placement(format!(
            "holder table has {} layers, the model {} layers of {} experts",
            holders.len(),
            cfg.num_layers,
            cfg.num_experts
        )));
    }
    for (layer, l) in holders.iter().enumerate() {
        if let Some(expert) = l.iter().position(|h| h.is_empty()) {
            return Err(WorkerError::ExpertMissing { layer, expert });
        }
    }
    Ok(())
}

/// The experts a rank gains under a new holder table, to be loaded off the step thread
/// ([`ExpertLoad::load`]) and switched to with [`Engine::switch_experts`].
pub struct ExpertLoad {
    dir: PathBuf,
    cfg: ModelConfig,
    dtype: WeightDType,
    holders: Vec<Vec<Vec<u32>>>,
    gained: ExpertSelection,
}

/// Loaded experts, ready to switch to.
pub struct PreparedExperts {
    holders: Vec<Vec<Vec<u32>>>,
    gained: ExpertSet,
}

impl ExpertLoad {
    /// Experts this rank will load.
    pub fn gained(&self) -> usize {
        self.gained.count()
    }

    /// Reads the gained experts' weights (the slow part; any thread).
    pub fn load(self) -> Result<PreparedExperts, WorkerError> {
        let ck = Checkpoint::open(&self.dir)?.with_quantization(self.cfg.quantization.as_ref());
        let gained = ExpertSet::load(&ck, &self.cfg, &self.gained, self.dtype)?;
        Ok(PreparedExperts {
            holders: self.holders,
            gained,
        })
    }
}

fn is_mapped_bf16(ck: &Checkpoint) -> bool {
    ck.dtype_of("model.embed_tokens.weight") == Some("BF16")
}

impl Engine {
    /// Loads a model with all its experts in this process (`opts.expert_shards` shards).
    pub fn load(dir: &Path, opts: &EngineOptions) -> Result<Self, WorkerError> {
        Self::load_with(dir, opts, ExpertSetup::Local)
    }

    /// Loads the dense weights and the experts `setup` assigns to this rank.
    pub fn load_with(
        dir: &Path,
        opts: &EngineOptions,
        setup: ExpertSetup,
    ) -> Result<Self, WorkerError> {
        let cfg = read_config(dir)?;
        let ck = Checkpoint::open(dir)?.with_quantization(cfg.quantization.as_ref());
        let dtype = opts.dtype.unwrap_or(if is_mapped_bf16(&ck) {
            WeightDType::Bf16
        } else {
            WeightDType::F32
        });
        let model = Model::load(&ck, &cfg, dtype)?;
        #[cfg(not(feature = "cuda"))]
        if let Device::Cuda(_) = opts.device {
            return Err(WorkerError::Device(
                "this build has no CUDA support (build with `--features cuda`)".into(),
            ));
        }
        let max_context = opts
            .max_context
            .unwrap_or(cfg.max_position_embeddings)
            .min(cfg.max_position_embeddings);
        let blocks = opts
            .kv_blocks
            .unwrap_or(4 * max_context.div_ceil(opts.block_size));
        if opts.kv_dtype != crate::kv::KvDType::F32 && opts.device != Device::Cpu {
            return Err(WorkerError::Device(format!(
                "kv dtype {} is CPU-only: the CUDA backend keeps an f32 KV cache",
                opts.kv_dtype
            )));
        }
        let caching = opts.prefix_cache && opts.device == Device::Cpu;
        let kv = KvCache::new(&cfg, blocks, opts.block_size, opts.kv_dtype, caching);
        // On a GPU, the model is uploaded from the experts loaded below (no second load).
        #[cfg(feature = "cuda")]
        let mut gpu = None;
        #[cfg(feature = "cuda")]
        let mut to_gpu = |set: &ExpertSet, ep_world: usize| -> Result<(), WorkerError> {
            if let Device::Cuda(ordinal) = opts.device {
                if ep_world > 1 {
                    return Err(WorkerError::Device(format!(
                        "a CUDA worker holds every expert on its GPU; expert parallelism over \
                         {ep_world} GPU workers is not wired into the GPU forward pass yet \
                         (run one GPU worker, or CPU workers)"
                    )));
                }
                gpu = Some(crate::model::cuda::CudaModel::upload(
                    &model,
                    set,
                    ordinal,
                    blocks,
                    opts.block_size,
                )?);
            }
            Ok(())
        };
        let experts: Box<dyn ExpertExec + Send> = match setup {
            ExpertSetup::Local => {
                // In-process shards only matter to the CPU forward pass.
                let shards = match opts.device {
                    Device::Cpu => opts.expert_shards.max(1),
                    Device::Cuda(_) => 1,
                };
                let sets = (0..shards)
                    .map(|s| {
                        ExpertSet::load(
                            &ck,
                            &cfg,
                            &ExpertSelection::round_robin(&cfg, s, shards),
                            dtype,
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                #[cfg(feature = "cuda")]
                to_gpu(&sets[0], 1)?;
                Box::new(LocalExperts { shards: sets })
            }
            ExpertSetup::Parallel { holders, comm } => {
                check_holders(&cfg, &holders)?;
                let sel = ExpertSelection::of_rank(&holders, comm.rank() as u32);
                let local = ExpertSet::load(&ck, &cfg, &sel, dtype)?;
                #[cfg(feature = "cuda")]
                to_gpu(&local, comm.world())?;
                Box::new(EpExperts {
                    local,
                    holders,
                    comm,
                    stats: Default::default(),
                })
            }
        };
        Ok(Engine {
            model,
            dir: dir.to_path_buf(),
            dtype,
            experts,
            kv,
            seqs: HashMap::new(),
            guests: HashMap::new(),
            max_context,
            #[cfg(feature = "cuda")]
            gpu,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }

    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// The routed experts this rank holds, per sparse layer (layer, expert ids ascending);
    /// empty for an engine holding every expert locally.
    pub fn held_experts(&self) -> Vec<(usize, Vec<u32>)> {
        match self.experts.placement() {
            Some((rank, holders)) => ExpertSelection::of_rank(holders, rank)
                .per_layer
                .into_iter()
                .enumerate()
                .filter(|(l, _)| holders.get(*l).is_some_and(|h| !h.is_empty()))
                .collect(),
            None => Vec::new(),
        }
    }

    /// What this rank must load to serve under the holder table `holders` (expert parallel
    /// engines only).
    pub fn expert_load(&self, holders: Vec<Vec<Vec<u32>>>) -> Result<ExpertLoad, WorkerError> {
        self.load_as(holders, None)
    }

    /// What this rank must load to serve as rank `as_rank` (its current rank when `None`)
    /// under `holders`: the experts that rank holds there minus those held here now.
    fn load_as(
        &self,
        holders: Vec<Vec<Vec<u32>>>,
        as_rank: Option<u32>,
    ) -> Result<ExpertLoad, WorkerError> {
        check_holders(&self.model.cfg, &holders)?;
        let (rank, current) = self.experts.placement().ok_or_else(|| {
            WorkerError::Placement("experts are all local; nothing to re-place".into())
        })?;
        let gained = ExpertSelection::of_rank(&holders, as_rank.unwrap_or(rank))
            .minus(&ExpertSelection::of_rank(current, rank));
        Ok(ExpertLoad {
            dir: self.dir.clone(),
            cfg: self.model.cfg.clone(),
            dtype: self.dtype,
            holders,
            gained,
        })
    }

    /// Switches to prepared experts between steps: routing follows the new holder table from
    /// the next step on; experts no longer held are dropped.
    pub fn switch_experts(&mut self, p: PreparedExperts) -> Result<(), WorkerError> {
        self.experts.switch(p.holders, p.gained)
    }

    /// Carries this engine into a new group of ranks (a new epoch after a worker was lost,
    /// drained or joined) instead of loading afresh: the dense weights, the KV cache and its
    /// sequences stay; the experts this rank gains under `holders` are loaded now (on the
    /// calling thread), those it no longer holds are dropped. Returns how many experts were
    /// loaded. Expert-parallel CPU engines only (anything else is an error, and the caller
    /// loads afresh).
    pub fn rejoin(
        &mut self,
        comm: Comm,
        holders: Vec<Vec<Vec<u32>>>,
    ) -> Result<usize, WorkerError> {
        #[cfg(feature = "cuda")]
        if self.gpu.is_some() {
            return Err(WorkerError::Device(
                "a GPU engine is loaded afresh in each epoch".into(),
            ));
        }
        let job = self.load_as(holders, Some(comm.rank() as u32))?;
        let loaded = job.gained();
        let p = job.load()?;
        self.experts.rejoin(comm, p.holders, p.gained)?;
        Ok(loaded)
    }

    /// Cuts a sequence back to its first `len` positions (cache blocks past them are
    /// released); false, and nothing changed, when it is unknown or shorter, or when the block
    /// it is cut inside is shared with another sequence and no block is left to copy it to.
    pub fn truncate(&mut self, seq_id: u64, len: usize) -> bool {
        let Some(s) = self.seqs.get_mut(&seq_id) else {
            return false;
        };
        if s.len < len {
            return false;
        }
        let bs = self.kv.block_size;
        // A kept block cut short is written past `len` next: it must be this sequence's
        // alone and unnamed (a named block's contents are what its name says).
        if len % bs != 0 && len < s.held() {
            let i = len / bs;
            let b = s.table[i];
            if self.kv.blocks().is_named(b) {
                if self.kv.blocks().refs(b) == 1 {
                    self.kv.blocks_mut().unregister(b);
                } else {
                    let Ok(copy) = self.kv.allocate(1) else {
                        return false;
                    };
                    self.kv.copy_positions(b, copy[0], len % bs);
                    s.table[i] = copy[0];
                    self.kv.release(&[b]);
                }
            }
        }
        let keep = self.kv.blocks_for(s.local_end.map_or(len, |e| len.min(e)));
        if s.local_end.is_some_and(|e| len <= e) {
            // Cut back into this rank's range: wholly here again.
            s.local_end = None;
        }
        if s.table.len() > keep {
            let mut extra = s.table.split_off(keep);
            // The prefix's later blocks are evicted first.
            extra.reverse();
            self.kv.release(&extra);
        }
        s.hashes.truncate(len / bs);
        s.tokens.truncate(len);
        s.len = len;
        true
    }

    /// Cuts the ranges of sequence `seq_id` held here as a guest back to its positions
    /// before `len` (dropping those left empty); false when none is held.
    pub fn truncate_guest(&mut self, seq_id: u64, len: usize) -> bool {
        let keys = self.guest_ranges(seq_id);
        for k in &keys {
            let g = self.guests.get_mut(k).expect("listed");
            let keep = len.saturating_sub(g.start).min(g.len);
            if keep == 0 {
                let g = self.guests.remove(k).expect("listed");
                self.kv.release(&g.table);
                continue;
            }
            g.len = keep;
            let extra = g.table.split_off(self.kv.blocks_for(keep));
            self.kv.release(&extra);
        }
        !keys.is_empty()
    }

    /// The keys of the ranges of `seq_id` held here as a guest.
    fn guest_ranges(&self, seq_id: u64) -> Vec<(u64, usize)> {
        self.guests
            .keys()
            .filter(|k| k.0 == seq_id)
            .copied()
            .collect()
    }

    /// Drops every range held here as a guest (they belong to an epoch's layout); the
    /// sequences homed here stay.
    pub fn release_guests(&mut self) {
        for (_, g) in std::mem::take(&mut self.guests) {
            self.kv.release(&g.table);
        }
    }

    /// Ranges of sequences held here as a guest: (sequence, home rank, first position,
    /// positions held), ordered.
    pub fn guests(&self) -> Vec<(u64, u32, usize, usize)> {
        let mut v: Vec<_> = self
            .guests
            .iter()
            .map(|((id, _), g)| (*id, g.home, g.start, g.len))
            .collect();
        v.sort_unstable();
        v
    }

    /// The sequences holding cache blocks.
    pub fn sequences(&self) -> Vec<u64> {
        self.seqs.keys().copied().collect()
    }

    /// Seconds in, and bytes sent by, the expert all-to-all since the last call.
    pub fn take_exchange_stats(&self) -> (f64, u64) {
        self.experts.take_exchange_stats()
    }

    /// Bytes of weights held (dense + experts).
    pub fn weight_bytes(&self) -> usize {
        self.model.nbytes() + self.experts.nbytes()
    }

    /// Bytes of routed-expert weights held.
    pub fn expert_bytes(&self) -> usize {
        self.experts.nbytes()
    }

    /// Weight bytes one decoded token must read, from the bytes actually held (any dtype,
    /// quantized included): the dense weights but one embedding row, and `k / E` of the
    /// routed experts (this engine must hold all of them for the figure to mean that).
    pub fn bytes_per_token(&self) -> usize {
        let cfg = &self.model.cfg;
        let embed = self.model.embed_nbytes();
        let row = embed / cfg.vocab_size.max(1);
        let experts = self.experts.nbytes() as u128 * cfg.experts_per_tok as u128
            / cfg.num_experts.max(1) as u128;
        self.model.nbytes() - embed + row + experts as usize
    }

    /// Bytes of KV cache per token of context (all layers).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.kv.bytes_per_position()
    }

    pub fn kv_used(&self) -> usize {
        self.kv.used()
    }
    /// Blocks held by no sequence that keep a prefix for reuse.
    pub fn kv_cached(&self) -> usize {
        self.kv.cached()
    }
    /// Blocks neither held nor cached.
    pub fn kv_free(&self) -> usize {
        self.kv.free()
    }
    /// Checks the block pool's invariants, and that the sequences' tables hold exactly the
    /// used blocks with the reference counts the pool has (tests).
    pub fn check_kv(&self) -> Result<(), String> {
        self.kv.blocks().check()?;
        let mut refs: HashMap<u32, u32> = HashMap::new();
        for s in self.seqs.values() {
            if s.table.len() != self.kv.blocks_for(s.held()) {
                return Err(format!(
                    "{} blocks for {} positions",
                    s.table.len(),
                    s.held()
                ));
            }
            for b in &s.table {
                *refs.entry(*b).or_default() += 1;
            }
        }
        for ((id, _), g) in &self.guests {
            if g.table.len() != self.kv.blocks_for(g.len) {
                return Err(format!(
                    "guest {id}: {} blocks for {} positions",
                    g.table.len(),
                    g.len
                ));
            }
            for b in &g.table {
                *refs.entry(*b).or_default() += 1;
            }
        }
        if refs.len() != self.kv.used() {
            return Err(format!(
                "{} blocks in tables, {} used",
                refs.len(),
                self.kv.used()
            ));
        }
        match refs.iter().find(|(b, n)| self.kv.blocks().refs(**b) != **n) {
            Some((b, n)) => Err(format!(
                "block {b}: {n} holders, {} counted",
                self.kv.blocks().refs(*b)
            )),
            None => Ok(()),
        }
    }
    /// The prefix cache's counters since load (all zero when it is off).
    pub fn prefix_stats(&self) -> PrefixStats {
        self.kv.blocks().stats()
    }
    /// Whether released full blocks are kept for reuse.
    pub fn prefix_caching(&self) -> bool {
        self.kv.blocks().caching()
    }
    /// Starts recording the names of blocks made findable and forgotten
    /// ([`crate::blocks::BlockPool::record_events`]).
    pub fn record_prefix_events(&mut self) {
        self.kv.blocks_mut().record_events();
    }
    /// Names made findable and names forgotten since the last call.
    pub fn take_prefix_events(&mut self) -> (Vec<BlockHash>, Vec<BlockHash>) {
        self.kv.blocks_mut().take_events()
    }
    pub fn kv_capacity(&self) -> usize {
        self.kv.capacity()
    }

    /// Current length of a sequence (0 when unknown).
    pub fn seq_len(&self, seq_id: u64) -> usize {
        self.seqs.get(&seq_id).map_or(0, |s| s.len)
    }

    /// Positions of a sequence whose keys and values this rank holds: its length, or where
    /// its range here ends when other ranks hold the rest (0 when unknown).
    pub fn held_len(&self, seq_id: u64) -> usize {
        self.seqs.get(&seq_id).map_or(0, Seq::held)
    }

    /// Appends each chunk's tokens to its sequence (creating it on first use) and runs them.
    pub fn step(
        &mut self,
        chunks: &[ChunkSpec<'_>],
        record_routing: bool,
    ) -> Result<ForwardOutput, WorkerError> {
        self.step_with(chunks, ContextPlan::default(), record_routing)
    }

    /// [`Engine::step`] with context parallelism ([`crate::context`]): sequences of this
    /// rank whose later positions other ranks hold (`plan.layouts`), and ranges of other
    /// ranks' sequences held here that grow (`plan.guests`). Every rank of the group calls it
    /// with the same `plan.exchange`.
    pub fn step_with(
        &mut self,
        chunks: &[ChunkSpec<'_>],
        plan: ContextPlan<'_>,
        record_routing: bool,
    ) -> Result<ForwardOutput, WorkerError> {
        // Check everything before touching state.
        let (me, world) = match (plan.exchange, self.experts.comm()) {
            (false, _) => (0, 1),
            (true, Some(c)) => (c.rank() as u32, c.world()),
            (true, None) => {
                return Err(WorkerError::Placement(
                    "context parallelism needs an expert-parallel group (its exchange shares                      the expert all-to-all)"
                        .into(),
                ))
            }
        };
        #[cfg(feature = "cuda")]
        if plan.exchange && self.gpu.is_some() {
            return Err(WorkerError::Device(
                "context parallelism runs on CPU workers only for now".into(),
            ));
        }
        if !plan.exchange && (!plan.layouts.is_empty() || !plan.guests.is_empty()) {
            return Err(WorkerError::Placement(
                "context layouts or guest ranges in a step without the context exchange".into(),
            ));
        }
        // Each chunk's layout, when its sequence reaches other ranks.
        let layouts: Vec<Option<&SeqLayout>> = chunks
            .iter()
            .map(|c| plan.layouts.iter().find(|l| l.seq_id == c.seq_id))
            .collect();
        let mut need = 0;
        let mut hits = Vec::with_capacity(chunks.len());
        let mut revived = std::collections::HashSet::new();
        for (i, c) in chunks.iter().enumerate() {
            if chunks[..i].iter().any(|o| o.seq_id == c.seq_id) {
                return Err(WorkerError::Sequence {
                    seq_id: c.seq_id,
                    detail: "appears twice in one step".into(),
                });
            }
            if c.tokens.is_empty() {
                return Err(WorkerError::Sequence {
                    seq_id: c.seq_id,
                    detail: "empty chunk".into(),
                });
            }
            let vocab = self.model.cfg.vocab_size;
            if let Some(bad) = c.tokens.iter().find(|t| **t as usize >= vocab) {
                return Err(WorkerError::TokenOutOfRange { token: *bad, vocab });
            }
            let seq = self.seqs.get(&c.seq_id);
            let (len, have) = seq.map_or((0, 0), |s| (s.len, s.table.len()));
            let new_len = len + c.tokens.len();
            if new_len > self.max_context {
                return Err(WorkerError::ContextExceeded {
                    seq_id: c.seq_id,
                    needed: new_len,
                    max: self.max_context,
                });
            }
            let layout = layouts[i];
            let split = seq.and_then(|s| s.local_end);
            let bad = |detail: String| WorkerError::Sequence {
                seq_id: c.seq_id,
                detail,
            };
            match layout {
                Some(l) => crate::context::check_layout(l, world, len, new_len, split)
                    .map_err(|d| bad(format!("context layout: {d}")))?,
                None if split.is_some() => {
                    return Err(bad(
                        "its later positions are held by other ranks; its chunk needs its \
                         context layout"
                            .into(),
                    ))
                }
                None => {}
            }
            // Cached prefixes are for sequences held here whole.
            let hit = match layout {
                Some(l) => {
                    need += self
                        .kv
                        .blocks_for(l.spans[0].start.min(new_len))
                        .saturating_sub(have);
                    hits.push(PrefixHit::none());
                    continue;
                }
                None => prefix_hit(&self.kv, seq, c),
            };
            revived.extend(
                hit.blocks
                    .iter()
                    .filter(|(b, _)| self.kv.blocks().refs(*b) == 0)
                    .map(|(b, _)| *b),
            );
            need += self
                .kv
                .blocks_for(new_len)
                .saturating_sub(have + hit.added());
            hits.push(hit);
        }
        for (i, g) in plan.guests.iter().enumerate() {
            let bad = |detail: String| WorkerError::Sequence {
                seq_id: g.seq_id,
                detail,
            };
            if plan.guests[..i]
                .iter()
                .any(|o| o.seq_id == g.seq_id && o.start == g.start)
            {
                return Err(bad(format!(
                    "guest range from {} twice in one step",
                    g.start
                )));
            }
            if g.end <= g.start || g.home as usize >= world {
                return Err(bad(format!(
                    "guest range {}..{} for rank {} (this rank {me}, world {world})",
                    g.start, g.end, g.home
                )));
            }
            let have = match self.guests.get(&(g.seq_id, g.start)) {
                Some(x) if x.home != g.home || x.start != g.start || g.end < x.start + x.len => {
                    return Err(bad(format!(
                        "guest range {}..{} for rank {}, held here: {}..{} for rank {}",
                        g.start,
                        g.end,
                        g.home,
                        x.start,
                        x.start + x.len,
                        x.home
                    )))
                }
                Some(x) => x.table.len(),
                None => 0,
            };
            need += self.kv.blocks_for(g.end - g.start).saturating_sub(have);
        }
        // Cached blocks a chunk takes are no longer there for allocation.
        let available = self.kv.available() - revived.len();
        if need > available {
            return Err(WorkerError::KvExhausted {
                needed: need,
                free: available,
            });
        }
        let bs = self.kv.block_size;
        let caching = self.kv.blocks().caching();
        let mut before = Vec::with_capacity(chunks.len());
        let mut skips = Vec::with_capacity(chunks.len());
        for ((c, hit), layout) in chunks.iter().zip(hits).zip(&layouts) {
            let seq = self.seqs.entry(c.seq_id).or_default();
            before.push(seq.len);
            if caching {
                self.kv
                    .blocks_mut()
                    .note_lookup(hit.queried, hit.blocks.len());
            }
            let skip = hit.tokens(seq.len, bs);
            for (i, (b, h)) in hit.blocks.iter().enumerate() {
                self.kv.blocks_mut().acquire(*b);
                if i == 0 && hit.replaces_partial {
                    // The sequence's own partial block (unnamed, held by it alone) goes.
                    let own = std::mem::replace(&mut seq.table[seq.len / bs], *b);
                    self.kv.release(&[own]);
                } else {
                    seq.table.push(*b);
                }
                seq.hashes.push(*h);
            }
            if caching {
                seq.tokens.extend_from_slice(&c.tokens[..skip]);
            }
            seq.len += skip;
            skips.push(skip);
            let end = seq.len + c.tokens.len() - skip;
            let here = layout.map_or(end, |l| l.spans[0].start.min(end));
            let want = self.kv.blocks_for(here);
            if want > seq.table.len() {
                let more = self.kv.allocate(want - seq.table.len())?;
                seq.table.extend(more);
            }
        }
        let mut guests_before = Vec::with_capacity(plan.guests.len());
        for g in plan.guests {
            let x = self
                .guests
                .entry((g.seq_id, g.start))
                .or_insert_with(|| Guest {
                    home: g.home,
                    start: g.start,
                    ..Default::default()
                });
            guests_before.push((g.seq_id, g.start + x.len));
            x.len = g.end - g.start;
            let want = self.kv.blocks_for(x.len);
            if want > x.table.len() {
                let more = self.kv.allocate(want - x.table.len())?;
                x.table.extend(more);
            }
        }
        // Positions found cached are not computed again; a chunk left with none is not run.
        let inputs: Vec<ForwardInput> = chunks
            .iter()
            .zip(&skips)
            .zip(&layouts)
            .filter(|((c, skip), _)| **skip < c.tokens.len())
            .map(|((c, skip), layout)| {
                let s = &self.seqs[&c.seq_id];
                ForwardInput {
                    seq_id: c.seq_id,
                    tokens: &c.tokens[*skip..],
                    start_pos: s.len,
                    table: &s.table,
                    logits: c.logits,
                    remote: layout.map_or(&[][..], |l| &l.spans[..]),
                }
            })
            .collect();
        // The forward pass runs on the caller's thread, never inside the thread pool: with
        // expert parallelism it blocks in collectives, which must not hold pool threads.
        let exchange = match (plan.exchange, self.experts.comm()) {
            (true, Some(comm)) => Some(crate::model::ContextExchange {
                comm,
                guests: &self.guests,
            }),
            _ => None,
        };
        #[cfg(feature = "cuda")]
        let out = match &mut self.gpu {
            Some(g) => g.forward(&inputs, record_routing),
            None => self.model.forward(
                &inputs,
                &mut self.kv,
                &*self.experts,
                record_routing,
                exchange,
            ),
        };
        #[cfg(not(feature = "cuda"))]
        let out = self.model.forward(
            &inputs,
            &mut self.kv,
            &*self.experts,
            record_routing,
            exchange,
        );
        drop(inputs);
        if out.is_ok() {
            for ((c, skip), layout) in chunks.iter().zip(&skips).zip(&layouts) {
                let s = self.seqs.get_mut(&c.seq_id).expect("created above");
                s.len += c.tokens.len() - skip;
                if let Some(l) = layout {
                    s.local_end = Some(l.spans[0].start);
                }
                if caching {
                    s.tokens.extend_from_slice(&c.tokens[*skip..]);
                    name_full_blocks(&mut self.kv, s);
                }
            }
        } else {
            // As if the step never ran: the blocks it took go back.
            for (c, len) in chunks.iter().zip(before) {
                self.truncate(c.seq_id, len);
            }
            for (id, len) in guests_before {
                self.truncate_guest(id, len);
            }
        }
        out
    }

    /// Frees a sequence and its cache blocks, or the range of it held here for another
    /// rank. Unknown ids are ignored.
    pub fn release(&mut self, seq_id: u64) {
        if let Some(mut s) = self.seqs.remove(&seq_id) {
            // The prefix's later blocks are evicted first.
            s.table.reverse();
            self.kv.release(&s.table);
        }
        for k in self.guest_ranges(seq_id) {
            let g = self.guests.remove(&k).expect("listed");
            self.kv.release(&g.table);
        }
    }
}
