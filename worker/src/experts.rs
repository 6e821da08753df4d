//! Expert weights and the interface through which the model reaches them.
//!
//! An [`ExpertSet`] holds the experts one shard (rank) owns, loading only their tensors.
//! The model hands each MoE layer's routed tokens to an [`ExpertExec`], which fills one output
//! row per (token, slot); the model then combines slots in slot order
//! (`switchyard_kernels::moe::combine`). Where an expert runs therefore never changes the
//! arithmetic of the combine, and results are identical for any sharding.

use crate::config::{Activation, ModelConfig};
use crate::family::tensors::ExpertTensors;
use crate::weights::{Checkpoint, LoadError, Rows, Tensor, WeightDType};
use crate::WorkerError;
use switchyard_kernels::{axpy, linear, linear_batch, LinearJob};

/// Biases of a gated MLP's three projections.
pub struct MlpBias {
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    pub down: Vec<f32>,
}

impl MlpBias {
    /// Expert `e`'s biases from tensors fused over `[experts, hidden, inter]`: the gate/up
    /// bias `[experts, 2·inter]` interleaved (gate at even positions), the down bias
    /// `[experts, hidden]`.
    fn fused(
        ck: &Checkpoint,
        gate_up: &str,
        down: &str,
        [n, h, i]: [usize; 3],
        e: usize,
    ) -> Result<Self, LoadError> {
        let gub = ck.slab(gate_up, &[n, 2 * i], e)?;
        Ok(MlpBias {
            gate: gub.iter().step_by(2).copied().collect(),
            up: gub.iter().skip(1).step_by(2).copied().collect(),
            down: ck.slab(down, &[n, h], e)?,
        })
    }
}

/// A gated MLP: `down(act(gate(x), up(x)))`, with optional biases.
pub struct Mlp {
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
    pub bias: Option<MlpBias>,
    pub act: Activation,
    pub hidden: usize,
    pub inter: usize,
}

/// Adds `b` to every `b.len()`-long row of `x`.
pub(crate) fn add_rows(x: &mut [f32], b: &[f32]) {
    for row in x.chunks_mut(b.len()) {
        axpy(row, 1.0, b);
    }
}

impl Activation {
    /// `gate[i] = act(gate[i], up[i])` in place.
    pub fn apply(&self, gate: &mut [f32], up: &[f32]) {
        match *self {
            Activation::Silu => switchyard_kernels::silu_mul(gate, up),
            Activation::ClampedSwiglu { alpha, limit } => {
                for (g, u) in gate.iter_mut().zip(up) {
                    let x = g.min(limit);
                    let y = u.clamp(-limit, limit);
                    *g = (y + 1.0) * (x / (1.0 + (-alpha * x).exp()));
                }
            }
        }
    }
}

impl Mlp {
    /// A SiLU-gated MLP without biases from separate `[out, in]` tensors.
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
            bias: None,
            act: Activation::Silu,
            hidden,
            inter,
        })
    }

    /// Routed expert `e` of layer `l`, in the family's layout.
    pub fn load_expert(
        ck: &Checkpoint,
        cfg: &ModelConfig,
        l: usize,
        e: usize,
        dtype: WeightDType,
    ) -> Result<Self, LoadError> {
        let (h, i, n) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts);
        match cfg.expert_tensors(l, e) {
            ExpertTensors::Separate(names) => {
                let mut m = Mlp::load(ck, names, h, i, dtype)?;
                m.act = cfg.experts.act;
                Ok(m)
            }
            ExpertTensors::Fused {
                gate_up,
                gate_up_bias,
                down,
                down_bias,
            } if cfg
                .quantization
                .as_ref()
                .is_some_and(|q| q.mxfp4_experts(l)) =>
            {
                // As released in MXFP4: `[experts, out, in]` (transposed from the unquantized
                // layout) with gate and up interleaved along `out`; both halves are views of
                // the one fused tensor, read in place.
                Ok(Mlp {
                    gate: ck.mxfp4_expert(&gate_up, [n, 2 * i, h], e, Rows::Even)?,
                    up: ck.mxfp4_expert(&gate_up, [n, 2 * i, h], e, Rows::Odd)?,
                    down: ck.mxfp4_expert(&down, [n, h, i], e, Rows::All)?,
                    bias: Some(MlpBias::fused(ck, &gate_up_bias, &down_bias, [n, h, i], e)?),
                    act: cfg.experts.act,
                    hidden: h,
                    inter: i,
                })
            }
            ExpertTensors::Fused {
                gate_up,
                gate_up_bias,
                down,
                down_bias,
            } => {
                // gate_up is `x @ W` with W [hidden, 2·inter], gate and up interleaved along
                // the last axis: gate row j of our [inter, hidden] layout is column 2j.
                let gu = ck.slab(&gate_up, &[n, h, 2 * i], e)?;
                let mut gate = vec![0.0f32; i * h];
                let mut up = vec![0.0f32; i * h];
                for r in 0..h {
                    for j in 0..i {
                        gate[j * h + r] = gu[r * 2 * i + 2 * j];
                        up[j * h + r] = gu[r * 2 * i + 2 * j + 1];
                    }
                }
                let dn = ck.slab(&down, &[n, i, h], e)?;
                let mut down_t = vec![0.0f32; h * i];
                for j in 0..i {
                    for r in 0..h {
                        down_t[r * i + j] = dn[j * h + r];
                    }
                }
                Ok(Mlp {
                    gate: Tensor::from_f32(vec![i, h], gate, dtype),
                    up: Tensor::from_f32(vec![i, h], up, dtype),
                    down: Tensor::from_f32(vec![h, i], down_t, dtype),
                    bias: Some(MlpBias::fused(ck, &gate_up_bias, &down_bias, [n, h, i], e)?),
                    act: cfg.experts.act,
                    hidden: h,
                    inter: i,
                })
            }
        }
    }

    /// After the gate and up projections of some rows: biases, then the activation (into
    /// `g`).
    pub(crate) fn activate(&self, g: &mut [f32], u: &mut [f32]) {
        if let Some(b) = &self.bias {
            add_rows(g, &b.gate);
            add_rows(u, &b.up);
        }
        self.act.apply(g, u);
    }

    pub(crate) fn finish(&self, out: &mut [f32]) {
        if let Some(b) = &self.bias {
            add_rows(out, &b.down);
        }
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
        self.activate(&mut g, &mut u);
        linear(&g, rows, self.inter, self.down.weight(), self.hidden, out);
        self.finish(out);
    }

    pub fn nbytes(&self) -> usize {
        self.gate.nbytes() + self.up.nbytes() + self.down.nbytes()
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
                row[e as usize] = Some(Mlp::load_expert(ck, cfg, layer, e as usize, dtype)?);
            }
            experts.push(row);
            crate::weights::return_free_memory();
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

    /// Expert parallel only: the group's all-to-all, which the context exchange shares (in
    /// lockstep with the expert exchange).
    fn comm(&self) -> Option<&crate::comm::Comm> {
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

    /// Expert parallel only: carries this rank into a new group (a new epoch) over `comm`,
    /// routing by `holders`: the experts it still holds stay, those it gains come from `add`.
    fn rejoin(
        &mut self,
        comm: crate::comm::Comm,
        holders: Vec<Vec<Vec<u32>>>,
        add: ExpertSet,
    ) -> Result<(), WorkerError> {
        let _ = (comm, holders, add);
        Err(WorkerError::Placement(
            "experts are all local; there is no group to rejoin".into(),
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

/// Bytes of gathered input rows one group of experts in [`run_experts`] holds at most (a group
/// always takes at least one expert).
const GROUP_BYTES: usize = 8 << 20;

/// Runs several experts on rows of `x` and writes each result row into `out`:
/// `work[i] = (mlp, dst)` computes `out[d] = mlp(x[src(d)])` for every `d` in `dst`
/// (`[·, hidden]` rows throughout).
///
/// Experts go in groups of at most [`GROUP_BYTES`] of gathered rows, each group as two batched
/// parallel regions (all gate/up projections, then all down projections), its down outputs
/// written over its gathered inputs and then scattered into `out`. The transient memory is
/// therefore one group's rows and activations, however many tokens the step routes.
pub fn run_experts(
    work: &[(&Mlp, Vec<usize>)],
    x: &[f32],
    hidden: usize,
    src: impl Fn(usize) -> usize,
    out: &mut [f32],
) {
    run_grouped(work, x, hidden, src, out, GROUP_BYTES)
}

/// [`run_experts`] with groups of at most `group_bytes` of gathered rows.
fn run_grouped(
    work: &[(&Mlp, Vec<usize>)],
    x: &[f32],
    hidden: usize,
    src: impl Fn(usize) -> usize,
    out: &mut [f32],
    group_bytes: usize,
) {
    let row_bytes = hidden * 4;
    let mut groups: Vec<&[(&Mlp, Vec<usize>)]> = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, (_, dst)) in work.iter().enumerate() {
        if i > start && bytes + dst.len() * row_bytes > group_bytes {
            groups.push(&work[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += dst.len() * row_bytes;
    }
    if start < work.len() {
        groups.push(&work[start..]);
    }
    let rows_of = |g: &[(&Mlp, Vec<usize>)]| g.iter().map(|(_, d)| d.len()).sum::<usize>();
    let inter_of =
        |g: &[(&Mlp, Vec<usize>)]| g.iter().map(|(m, d)| d.len() * m.inter).sum::<usize>();
    let mut buf = vec![0.0f32; groups.iter().map(|g| rows_of(g)).max().unwrap_or(0) * hidden];
    let inter_len = groups.iter().map(|g| inter_of(g)).max().unwrap_or(0);
    let (mut gates, mut ups) = (vec![0.0f32; inter_len], vec![0.0f32; inter_len]);
    for group in groups {
        let buf = &mut buf[..rows_of(group) * hidden];
        for (row, &d) in buf
            .chunks_exact_mut(hidden)
            .zip(group.iter().flat_map(|(_, dst)| dst))
        {
            let s = src(d);
            row.copy_from_slice(&x[s * hidden..(s + 1) * hidden]);
        }
        let gu_len = inter_of(group);
        let (gates, ups) = (&mut gates[..gu_len], &mut ups[..gu_len]);
        // Gate and up of every expert in the group, reading the gathered rows.
        let mut jobs = Vec::with_capacity(group.len() * 2);
        let (mut xs, mut gs, mut us) = (&buf[..], &mut gates[..], &mut ups[..]);
        for (mlp, dst) in group {
            let (m, n) = (dst.len(), mlp.inter);
            let (xi, xr) = xs.split_at(m * hidden);
            let (gi, gr) = std::mem::take(&mut gs).split_at_mut(m * n);
            let (ui, ur) = std::mem::take(&mut us).split_at_mut(m * n);
            (xs, gs, us) = (xr, gr, ur);
            for (w, o) in [(mlp.gate.weight(), gi), (mlp.up.weight(), ui)] {
                jobs.push(LinearJob {
                    x: xi,
                    m,
                    k: hidden,
                    w,
                    n,
                    out: o,
                });
            }
        }
        linear_batch(jobs);
        // Activations, then the down projections over the gathered rows' place.
        let mut jobs = Vec::with_capacity(group.len());
        let (mut os, mut gs, mut us) = (&mut buf[..], &mut gates[..], &mut ups[..]);
        for (mlp, dst) in group {
            let (m, n) = (dst.len(), mlp.inter);
            let (oi, or) = std::mem::take(&mut os).split_at_mut(m * hidden);
            let (gi, gr) = std::mem::take(&mut gs).split_at_mut(m * n);
            let (ui, ur) = std::mem::take(&mut us).split_at_mut(m * n);
            (os, gs, us) = (or, gr, ur);
            mlp.activate(gi, ui);
            jobs.push(LinearJob {
                x: gi,
                m,
                k: n,
                w: mlp.down.weight(),
                n: hidden,
                out: oi,
            });
        }
        linear_batch(jobs);
        let mut rows = buf.chunks_exact_mut(hidden);
        for (mlp, dst) in group {
            for &d in dst {
                let row = rows.next().expect("one gathered row per destination");
                mlp.finish(row);
                out[d * hidden..(d + 1) * hidden].copy_from_slice(row);
            }
        }
    }
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
        for (e, pairs) in groups.into_iter().enumerate() {
            if pairs.is_empty() {
                continue;
            }
            let mlp = self
                .owner(layer, e)
                .ok_or(WorkerError::ExpertMissing { layer, expert: e })?;
            work.push((mlp, pairs));
        }
        run_experts(&work, x, hidden, |p| p / k, slots);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_kernels::rng::Rng;

    fn mlp(rng: &mut Rng, hidden: usize, inter: usize, biased: bool) -> Mlp {
        let mut m = |r: usize, c: usize| {
            let v = (0..r * c).map(|_| rng.normal() as f32 * 0.1).collect();
            Tensor::from_f32(vec![r, c], v, WeightDType::F32)
        };
        let (gate, up, down) = (m(inter, hidden), m(inter, hidden), m(hidden, inter));
        let bias = biased.then(|| MlpBias {
            gate: (0..inter).map(|i| i as f32 * 0.01).collect(),
            up: (0..inter).map(|i| -(i as f32) * 0.01).collect(),
            down: (0..hidden).map(|i| i as f32 * 0.02).collect(),
        });
        Mlp {
            gate,
            up,
            down,
            bias,
            act: if biased {
                Activation::ClampedSwiglu {
                    alpha: 1.702,
                    limit: 7.0,
                }
            } else {
                Activation::Silu
            },
            hidden,
            inter,
        }
    }

    /// However the experts are grouped (one per group, a few, all in one), every destination
    /// row is exactly that expert's MLP of its source row, as `Mlp::forward` computes it alone.
    #[test]
    fn grouping_never_changes_a_row() {
        let (hidden, inter, tokens) = (16, 24, 40);
        let mut rng = Rng::new(7);
        let experts: Vec<Mlp> = (0..5)
            .map(|e| mlp(&mut rng, hidden, inter, e % 2 == 1))
            .collect();
        let x: Vec<f32> = (0..tokens * hidden).map(|_| rng.normal() as f32).collect();
        // Destination d reads source row d / 2 (two slots per token); expert 0 takes three
        // in seven destinations (a GEMM's worth of rows), the others one in seven each (few
        // rows: the streaming path).
        let owner = |d: usize| [0, 0, 0, 1, 2, 3, 4][d % 7];
        let work: Vec<(&Mlp, Vec<usize>)> = experts
            .iter()
            .enumerate()
            .map(|(e, m)| (m, (0..2 * tokens).filter(|&d| owner(d) == e).collect()))
            .collect();
        assert!(work[0].1.len() >= 12 && work[1].1.len() < 12);
        let mut want = vec![f32::NAN; 2 * tokens * hidden];
        for (m, dst) in &work {
            for &d in dst {
                let s = d / 2;
                m.forward(
                    &x[s * hidden..(s + 1) * hidden],
                    1,
                    &mut want[d * hidden..(d + 1) * hidden],
                );
            }
        }
        for group_bytes in [1, 3 * hidden * 4 * 8, usize::MAX] {
            let mut got = vec![f32::NAN; 2 * tokens * hidden];
            run_grouped(&work, &x, hidden, |d| d / 2, &mut got, group_bytes);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "group budget {group_bytes}: element {i}: {a} vs {b}"
                );
            }
        }
    }
}
