//! Expert weights and the interface through which the model reaches them.
//!
//! An [`ExpertSet`] holds the experts one shard (rank) owns, loading only their tensors.
//! The model hands each MoE layer's routed tokens to an [`ExpertExec`], which fills one output
//! row per (token, slot); the model then combines slots in slot order
//! (`switchyard_kernels::moe::combine`). Where an expert runs therefore never changes the
//! arithmetic of the combine, and results are identical for any sharding.

use crate::config::{Arch, ModelConfig};
use crate::weights::{Checkpoint, LoadError, Tensor, WeightDType};
use crate::WorkerError;
use switchyard_kernels::{linear, linear_batch, silu_mul, LinearJob};

/// A SiLU-gated MLP: `down(silu(gate(x)) * up(x))`.
pub struct Mlp {
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
    pub hidden: usize,
    pub inter: usize,
}

impl Mlp {
    pub fn load(
        ck: &Checkpoint,
        names: [String; 3],
        hidden: usize,
        inter: usize,
        dtype: WeightDType,
    ) -> Result<Self, LoadError> {
        let [g, u, d] = names;
        Ok(Mlp {
            gate: ck.matrix(&g, &[inter, hidden], dtype)?,
            up: ck.matrix(&u, &[inter, hidden], dtype)?,
            down: ck.matrix(&d, &[hidden, inter], dtype)?,
            hidden,
            inter,
        })
    }

    /// `out[rows, hidden] = mlp(x[rows, hidden])`.
    pub fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let mut g = vec![0.0; rows * self.inter];
        let mut u = vec![0.0; rows * self.inter];
        linear_batch(vec![
            LinearJob {
                x,
                m: rows,
                k: self.hidden,
                w: self.gate.weight(),
                n: self.inter,
                out: &mut g,
            },
            LinearJob {
                x,
                m: rows,
                k: self.hidden,
                w: self.up.weight(),
                n: self.inter,
                out: &mut u,
            },
        ]);
        silu_mul(&mut g, &u);
        linear(&g, rows, self.inter, self.down.weight(), self.hidden, out);
    }

    pub fn nbytes(&self) -> usize {
        self.gate.nbytes() + self.up.nbytes() + self.down.nbytes()
    }
}

/// Tensor names of expert `e` in `layer`: (gate, up, down).
pub fn expert_tensor_names(arch: Arch, layer: usize, e: usize) -> [String; 3] {
    match arch {
        Arch::Qwen3Moe => {
            let p = format!("model.layers.{layer}.mlp.experts.{e}");
            [
                format!("{p}.gate_proj.weight"),
                format!("{p}.up_proj.weight"),
                format!("{p}.down_proj.weight"),
            ]
        }
        Arch::Mixtral => {
            let p = format!("model.layers.{layer}.block_sparse_moe.experts.{e}");
            [
                format!("{p}.w1.weight"),
                format!("{p}.w3.weight"),
                format!("{p}.w2.weight"),
            ]
        }
    }
}

/// Which experts a shard holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertSelection {
    /// Per layer, the expert ids held (sorted). Dense layers have none.
    pub per_layer: Vec<Vec<u32>>,
}

impl ExpertSelection {
    pub fn all(cfg: &ModelConfig) -> Self {
        Self::round_robin(cfg, 0, 1)
    }
    /// The experts `rank` holds under the holder table `holders[layer][expert]`.
    pub fn of_rank(holders: &[Vec<Vec<u32>>], rank: u32) -> Self {
        ExpertSelection {
            per_layer: holders
                .iter()
                .map(|l| {
                    l.iter()
                        .enumerate()
                        .filter(|(_, h)| h.contains(&rank))
                        .map(|(e, _)| e as u32)
                        .collect()
                })
                .collect(),
        }
    }

    /// The experts of `self` that `other` does not have.
    pub fn minus(&self, other: &ExpertSelection) -> ExpertSelection {
        ExpertSelection {
            per_layer: self
                .per_layer
                .iter()
                .enumerate()
                .map(|(l, es)| {
                    let have = other.per_layer.get(l);
                    es.iter()
                        .copied()
                        .filter(|e| !have.is_some_and(|h| h.contains(e)))
                        .collect()
                })
                .collect(),
        }
    }

    /// Number of experts selected, over all layers.
    pub fn count(&self) -> usize {
        self.per_layer.iter().map(|l| l.len()).sum()
    }

    /// Shard `shard` of `shards`: experts `e` with `e % shards == shard`.
    pub fn round_robin(cfg: &ModelConfig, shard: usize, shards: usize) -> Self {
        ExpertSelection {
            per_layer: cfg
                .sparse_layers
                .iter()
                .map(|&s| {
                    if s {
                        (0..cfg.num_experts as u32)
                            .filter(|e| *e as usize % shards == shard)
                            .collect()
                    } else {
                        vec![]
                    }
                })
                .collect(),
        }
    }
}

/// The experts one shard owns: `experts[layer][expert]` is `Some` when held.
pub struct ExpertSet {
    experts: Vec<Vec<Option<Mlp>>>,
}

impl ExpertSet {
    /// A set with no layers (a placeholder while a set is being rebuilt).
    pub fn empty() -> Self {
        ExpertSet { experts: vec![] }
    }

    pub fn load(
        ck: &Checkpoint,
        cfg: &ModelConfig,
        sel: &ExpertSelection,
        dtype: WeightDType,
    ) -> Result<Self, LoadError> {
        let mut experts = Vec::with_capacity(cfg.num_layers);
        for (layer, held) in sel.per_layer.iter().enumerate() {
            let mut row: Vec<Option<Mlp>> = (0..cfg.num_experts).map(|_| None).collect();
            for &e in held {
                let names = expert_tensor_names(cfg.arch, layer, e as usize);
                row[e as usize] = Some(Mlp::load(
                    ck,
                    names,
                    cfg.hidden_size,
                    cfg.moe_intermediate_size,
                    dtype,
                )?);
            }
            experts.push(row);
        }
        Ok(ExpertSet { experts })
    }

    /// The set holding exactly the experts `sel` names, each taken from `self` when held
    /// there, else from `add` (no weight is loaded or copied); the others are dropped.
    pub fn regroup(
        mut self,
        mut add: ExpertSet,
        sel: &ExpertSelection,
    ) -> Result<ExpertSet, WorkerError> {
        let mut experts: Vec<Vec<Option<Mlp>>> = self
            .experts
            .iter()
            .map(|row| row.iter().map(|_| None).collect())
            .collect();
        for (layer, es) in sel.per_layer.iter().enumerate() {
            for &e in es {
                let e = e as usize;
                let take = |set: &mut ExpertSet| {
                    set.experts
                        .get_mut(layer)
                        .and_then(|r| r.get_mut(e))
                        .and_then(|m| m.take())
                };
                let mlp = take(&mut self)
                    .or_else(|| take(&mut add))
                    .ok_or(WorkerError::ExpertMissing { layer, expert: e })?;
                *experts
                    .get_mut(layer)
                    .and_then(|r| r.get_mut(e))
                    .ok_or(WorkerError::ExpertMissing { layer, expert: e })? = Some(mlp);
            }
        }
        Ok(ExpertSet { experts })
    }

    pub fn get(&self, layer: usize, e: usize) -> Option<&Mlp> {
        self.experts.get(layer)?.get(e)?.as_ref()
    }

    pub fn nbytes(&self) -> usize {
        self.experts
            .iter()
            .flatten()
            .flatten()
            .map(|m| m.nbytes())
            .sum()
    }
}

/// Runs routed tokens through experts.
pub trait ExpertExec: Sync {
    /// `x` is `[t, hidden]`, `ids` is `[t, k]`; fills `slots[(ti * k + s) * hidden ..]` with
    /// the output of expert `ids[ti * k + s]` on token `ti` (unweighted).
    fn run(
        &self,
        layer: usize,
        x: &[f32],
        hidden: usize,
        ids: &[u32],
        k: usize,
        slots: &mut [f32],
    ) -> Result<(), WorkerError>;

    /// Bytes of expert weights held.
    fn nbytes(&self) -> usize;

    /// Seconds spent in, and bytes sent by, expert all-to-alls since the last call (zero when
    /// every expert is local).
    fn take_exchange_stats(&self) -> (f64, u64) {
        (0.0, 0)
    }

    /// Expert parallel only: this rank and the holder table it routes by.
    fn placement(&self) -> Option<(u32, &[Vec<Vec<u32>>])> {
        None
    }

    /// Expert parallel only: switches to the holder table `holders`, keeping the experts this
    /// rank still holds and taking the ones it gains from `add`.
    fn switch(&mut self, holders: Vec<Vec<Vec<u32>>>, add: ExpertSet) -> Result<(), WorkerError> {
        let _ = (holders, add);
        Err(WorkerError::Placement(
            "experts are all local; nothing to re-place".into(),
        ))
    }
}

/// Experts held in this process, possibly as several shards.
pub struct LocalExperts {
    pub shards: Vec<ExpertSet>,
}

impl LocalExperts {
    fn owner(&self, layer: usize, e: usize) -> Option<&Mlp> {
        self.shards.iter().find_map(|s| s.get(layer, e))
    }
}

/// Runs several experts, each on its own rows of `x`, as two batched parallel regions (all
/// gate/up projections, then all down projections). `work[i] = (mlp, token rows)`; returns one
/// `[rows.len(), hidden]` output per entry.
pub fn run_experts(work: &[(&Mlp, Vec<usize>)], x: &[f32], hidden: usize) -> Vec<Vec<f32>> {
    let inputs: Vec<Vec<f32>> = work
        .iter()
        .map(|(_, rows)| {
            let mut g = vec![0.0f32; rows.len() * hidden];
            for (i, &t) in rows.iter().enumerate() {
                g[i * hidden..(i + 1) * hidden].copy_from_slice(&x[t * hidden..(t + 1) * hidden]);
            }
            g
        })
        .collect();
    let mut gates: Vec<Vec<f32>> = work
        .iter()
        .map(|(m, r)| vec![0.0; r.len() * m.inter])
        .collect();
    let mut ups: Vec<Vec<f32>> = work
        .iter()
        .map(|(m, r)| vec![0.0; r.len() * m.inter])
        .collect();
    let mut jobs = Vec::with_capacity(work.len() * 2);
    for (((mlp, rows), xin), (g, u)) in work
        .iter()
        .zip(&inputs)
        .zip(gates.iter_mut().zip(ups.iter_mut()))
    {
        jobs.push(LinearJob {
            x: xin,
            m: rows.len(),
            k: hidden,
            w: mlp.gate.weight(),
            n: mlp.inter,
            out: g,
        });
        jobs.push(LinearJob {
            x: xin,
            m: rows.len(),
            k: hidden,
            w: mlp.up.weight(),
            n: mlp.inter,
            out: u,
        });
    }
    linear_batch(jobs);
    for (g, u) in gates.iter_mut().zip(&ups) {
        silu_mul(g, u);
    }
    let mut outs: Vec<Vec<f32>> = work
        .iter()
        .map(|(_, r)| vec![0.0; r.len() * hidden])
        .collect();
    let jobs = work
        .iter()
        .zip(&gates)
        .zip(outs.iter_mut())
        .map(|(((mlp, rows), g), o)| LinearJob {
            x: g,
            m: rows.len(),
            k: mlp.inter,
            w: mlp.down.weight(),
            n: hidden,
            out: o,
        })
        .collect();
    linear_batch(jobs);
    outs
}

impl ExpertExec for LocalExperts {
    fn nbytes(&self) -> usize {
        self.shards.iter().map(|s| s.nbytes()).sum()
    }

    fn run(
        &self,
        layer: usize,
        x: &[f32],
        hidden: usize,
        ids: &[u32],
        k: usize,
        slots: &mut [f32],
    ) -> Result<(), WorkerError> {
        let num_experts = ids.iter().map(|e| *e as usize + 1).max().unwrap_or(0);
        // Group (token, slot) pairs by expert, in token order.
        let mut groups: Vec<Vec<usize>> = vec![Vec::new(); num_experts];
        for (i, &e) in ids.iter().enumerate() {
            groups[e as usize].push(i);
        }
        let mut work = Vec::new();
        let mut pair_lists = Vec::new();
        for (e, pairs) in groups.into_iter().enumerate() {
            if pairs.is_empty() {
                continue;
            }
            let mlp = self
                .owner(layer, e)
                .ok_or(WorkerError::ExpertMissing { layer, expert: e })?;
            work.push((mlp, pairs.iter().map(|p| p / k).collect::<Vec<usize>>()));
            pair_lists.push(pairs);
        }
        let outs = run_experts(&work, x, hidden);
        for (pairs, y) in pair_lists.iter().zip(&outs) {
            for (i, &p) in pairs.iter().enumerate() {
                slots[p * hidden..(p + 1) * hidden]
                    .copy_from_slice(&y[i * hidden..(i + 1) * hidden]);
            }
        }
        Ok(())
    }
}
