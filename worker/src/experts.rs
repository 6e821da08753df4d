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
use switchyard_kernels::{linear, silu_mul};

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
        linear(x, rows, self.hidden, self.gate.weight(), self.inter, &mut g);
        linear(x, rows, self.hidden, self.up.weight(), self.inter, &mut u);
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

/// Runs expert `e` on the rows of `x` listed in `rows` (token indices) and hands each output
/// row to `put(i, row)`, `i` indexing `rows`.
pub fn run_expert_rows(
    mlp: &Mlp,
    x: &[f32],
    hidden: usize,
    rows: &[usize],
    mut put: impl FnMut(usize, &[f32]),
) {
    let n = rows.len();
    let mut gathered = vec![0.0f32; n * hidden];
    for (i, &t) in rows.iter().enumerate() {
        gathered[i * hidden..(i + 1) * hidden].copy_from_slice(&x[t * hidden..(t + 1) * hidden]);
    }
    let mut y = vec![0.0f32; n * hidden];
    mlp.forward(&gathered, n, &mut y);
    for i in 0..n {
        put(i, &y[i * hidden..(i + 1) * hidden]);
    }
}

impl ExpertExec for LocalExperts {
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
        for (e, pairs) in groups.iter().enumerate() {
            if pairs.is_empty() {
                continue;
            }
            let mlp = self
                .owner(layer, e)
                .ok_or(WorkerError::ExpertMissing { layer, expert: e })?;
            let rows: Vec<usize> = pairs.iter().map(|p| p / k).collect();
            run_expert_rows(mlp, x, hidden, &rows, |i, y| {
                let p = pairs[i];
                slots[p * hidden..(p + 1) * hidden].copy_from_slice(y);
            });
        }
        Ok(())
    }
}
