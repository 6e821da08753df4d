//! One worker's engine: the model, its experts, the KV cache and the sequences homed here.
//!
//! A step names, per sequence, the tokens to append. Positions are implied by the sequence's
//! current length, so a step can only extend a sequence contiguously. Cache blocks for the whole
//! step are checked before any is taken: a step that cannot fit fails with
//! [`WorkerError::KvExhausted`] and changes nothing.

use crate::comm::Comm;
use crate::config::ModelConfig;
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

struct Seq {
    table: Vec<u32>,
    len: usize,
}

pub struct Engine {
    pub model: Model,
    dir: PathBuf,
    dtype: WeightDType,
    experts: Box<dyn ExpertExec + Send>,
    kv: KvCache,
    seqs: HashMap<u64, Seq>,
    max_context: usize,
    /// The model on a GPU, when the engine runs there (it then owns the KV data; `kv` keeps
    /// the block allocator).
    #[cfg(feature = "cuda")]
    gpu: Option<crate::model::cuda::CudaModel>,
}

/// Reads and validates `config.json` of a checkpoint folder.
pub fn read_config(dir: &Path) -> Result<ModelConfig, WorkerError> {
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
        let kv = KvCache::new(&cfg, blocks, opts.block_size, opts.kv_dtype);
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

    /// Cuts a sequence back to its first `len` positions (cache blocks past them are freed);
    /// false, and nothing changed, when it is unknown or shorter.
    pub fn truncate(&mut self, seq_id: u64, len: usize) -> bool {
        let Some(s) = self.seqs.get_mut(&seq_id) else {
            return false;
        };
        if s.len < len {
            return false;
        }
        let keep = self.kv.blocks_for(len);
        if s.table.len() > keep {
            let extra = s.table.split_off(keep);
            self.kv.release(&extra);
        }
        s.len = len;
        true
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
    pub fn kv_capacity(&self) -> usize {
        self.kv.capacity()
    }

    /// Current length of a sequence (0 when unknown).
    pub fn seq_len(&self, seq_id: u64) -> usize {
        self.seqs.get(&seq_id).map_or(0, |s| s.len)
    }

    /// Appends each chunk's tokens to its sequence (creating it on first use) and runs them.
    pub fn step(
        &mut self,
        chunks: &[ChunkSpec<'_>],
        record_routing: bool,
    ) -> Result<ForwardOutput, WorkerError> {
        // Check everything before touching state.
        let mut need = 0;
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
            let (len, have) = self
                .seqs
                .get(&c.seq_id)
                .map_or((0, 0), |s| (s.len, s.table.len()));
            let new_len = len + c.tokens.len();
            if new_len > self.max_context {
                return Err(WorkerError::ContextExceeded {
                    seq_id: c.seq_id,
                    needed: new_len,
                    max: self.max_context,
                });
            }
            need += self.kv.blocks_for(new_len).saturating_sub(have);
        }
        if need > self.kv.free() {
            return Err(WorkerError::KvExhausted {
                needed: need,
                free: self.kv.free(),
            });
        }
        for c in chunks {
            let seq = self.seqs.entry(c.seq_id).or_insert(Seq {
                table: Vec::new(),
                len: 0,
            });
            let want = self.kv.blocks_for(seq.len + c.tokens.len());
            if want > seq.table.len() {
                let more = self.kv.allocate(want - seq.table.len())?;
                seq.table.extend(more);
            }
        }
        let inputs: Vec<ForwardInput> = chunks
            .iter()
            .map(|c| {
                let s = &self.seqs[&c.seq_id];
                ForwardInput {
                    tokens: c.tokens,
                    start_pos: s.len,
                    table: &s.table,
                    logits: c.logits,
                }
            })
            .collect();
        // The forward pass runs on the caller's thread, never inside the thread pool: with
        // expert parallelism it blocks in collectives, which must not hold pool threads.
        #[cfg(feature = "cuda")]
        let out = match &mut self.gpu {
            Some(g) => g.forward(&inputs, record_routing),
            None => self
                .model
                .forward(&inputs, &mut self.kv, &*self.experts, record_routing),
        };
        #[cfg(not(feature = "cuda"))]
        let out = self
            .model
            .forward(&inputs, &mut self.kv, &*self.experts, record_routing);
        drop(inputs);
        if out.is_ok() {
            for c in chunks {
                self.seqs.get_mut(&c.seq_id).expect("created above").len += c.tokens.len();
            }
        }
        out
    }

    /// Frees a sequence and its cache blocks. Unknown ids are ignored.
    pub fn release(&mut self, seq_id: u64) {
        if let Some(s) = self.seqs.remove(&seq_id) {
            self.kv.release(&s.table);
        }
    }
}
