//! The forward pass on one GPU (feature `cuda`): the same arithmetic as [`super::Model`], with
//! weights uploaded once, the KV cache and every activation in device memory, GEMMs through
//! cuBLAS and the rest through Switchyard's kernels (`switchyard_kernels::cuda`).
//!
//! The engine keeps ownership of block tables (its host [`crate::kv::KvCache`] allocator stays
//! authoritative); this model holds the device pools those tables index, in the same
//! `[block][slot][kv_head][head_dim]` layout.
//!
//! Host round-trips per step: the inputs going up, the router's choices coming down once per
//! MoE layer (t·k ids: the per-expert GEMM sizes are needed on the host to launch cuBLAS), and
//! the requested logits coming down at the end.

use super::{Attention, Ffn, ForwardInput, ForwardOutput, Model, Routing};
use crate::config::{Activation, AttentionSpec, ModelConfig, QkNorm, RouterSpec};
use crate::experts::{ExpertSet, Mlp};
use crate::WorkerError;
use std::sync::Arc;
use switchyard_kernels::cuda::{
    AttnRows, CudaError, CudaSlice, CudaView, CudaViewMut, DevWeight, ExpertTable, GemmJob, Gpu,
    GpuAttn, SMALL_BATCH_PAIRS,
};

impl From<CudaError> for WorkerError {
    fn from(e: CudaError) -> Self {
        WorkerError::Device(e.to_string())
    }
}

struct GMlp {
    gate: DevWeight,
    up: DevWeight,
    down: DevWeight,
    inter: usize,
}

impl GMlp {
    fn upload(gpu: &Gpu, m: &Mlp) -> Result<Self, CudaError> {
        Ok(GMlp {
            gate: gpu.weight(m.gate.weight())?,
            up: gpu.weight(m.up.weight())?,
            down: gpu.weight(m.down.weight())?,
            inter: m.inter,
        })
    }
    fn nbytes(&self) -> usize {
        self.gate.nbytes() + self.up.nbytes() + self.down.nbytes()
    }
}

enum GFfn {
    Dense(GMlp),
    Moe {
        router: DevWeight,
        experts: Vec<Option<GMlp>>,
        /// Pointer tables of `experts` for the small-batch path.
        table: ExpertTable,
    },
}

struct GLayer {
    ln1: CudaSlice<f32>,
    ln2: CudaSlice<f32>,
    q: DevWeight,
    k: DevWeight,
    v: DevWeight,
    o: DevWeight,
    bias: Option<[CudaSlice<f32>; 3]>,
    q_norm: Option<CudaSlice<f32>>,
    k_norm: Option<CudaSlice<f32>>,
    ffn: GFfn,
}

/// A model resident on one GPU with all its experts.
pub struct CudaModel {
    gpu: Arc<Gpu>,
    cfg: crate::ModelConfig,
    embed: DevWeight,
    lm_head: Option<DevWeight>,
    norm: CudaSlice<f32>,
    layers: Vec<GLayer>,
    inv_freq: CudaSlice<f32>,
    attention_factor: f32,
    kc: Vec<CudaSlice<f32>>,
    vc: Vec<CudaSlice<f32>>,
    block_size: usize,
    weight_bytes: usize,
}

/// The pieces this backend implements so far; anything else is refused at load, naming it.
fn check_supported(cfg: &ModelConfig) -> Result<(), WorkerError> {
    let missing = match &cfg.attention {
        AttentionSpec::Mla(_) => Some("multi-head latent attention"),
        AttentionSpec::Gqa { o_bias: true, .. } => Some("an o_proj bias"),
        AttentionSpec::Gqa { sinks: true, .. } => Some("attention sinks"),
        AttentionSpec::Gqa {
            qk_norm: QkNorm::Full,
            ..
        } => Some("q/k norms over the full projection"),
        AttentionSpec::Gqa { .. } => None,
    }
    .or(match cfg.router {
        RouterSpec::Softmax { .. } => None,
        _ => Some("this router"),
    })
    .or((cfg.experts.act != Activation::Silu || cfg.experts.bias)
        .then_some("clamped SwiGLU experts with biases"))
    .or(cfg.shared_expert.map(|_| "shared experts"))
    .or(cfg.quantization.as_ref().map(|q| match q {
        crate::config::Quantization::Fp8 { .. } => "FP8 weights",
        crate::config::Quantization::Mxfp4 { .. } => "MXFP4 experts",
    }))
    .or(cfg
        .windows
        .windows(2)
        .any(|w| w[0] != w[1])
        .then_some("per-layer sliding windows"));
    match missing {
        None => Ok(()),
        Some(what) => Err(WorkerError::Device(format!(
            "{} on the CUDA backend: {what} is not implemented there yet (run with --device cpu)",
            cfg.arch.hf_name()
        ))),
    }
}

impl CudaModel {
    /// Uploads the dense weights of `model` and every expert of `experts` (which must hold
    /// all of them) to device `ordinal`, and allocates a `kv_blocks`-block cache.
    pub fn upload(
        model: &Model,
        experts: &ExpertSet,
        ordinal: usize,
        kv_blocks: usize,
        block_size: usize,
    ) -> Result<Self, WorkerError> {
        let cfg = &model.cfg;
        check_supported(cfg)?;
        let gpu = Gpu::get(ordinal)?;
        let g = &*gpu;
        let vec = |v: &[f32]| g.upload(v);
        let mut weight_bytes = 0;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for (li, l) in model.layers.iter().enumerate() {
            let Attention::Gqa(a) = &l.attn else {
                unreachable!("checked by check_supported")
            };
            let ffn = match &l.ffn {
                Ffn::Dense(m) => GFfn::Dense(GMlp::upload(g, m)?),
                Ffn::Moe { router, .. } => {
                    let mut ex = Vec::with_capacity(cfg.num_experts);
                    for e in 0..cfg.num_experts {
                        let m = experts.get(li, e).ok_or(WorkerError::ExpertMissing {
                            layer: li,
                            expert: e,
                        })?;
                        ex.push(Some(GMlp::upload(g, m)?));
                    }
                    let refs: Vec<(&DevWeight, &DevWeight, &DevWeight)> = ex
                        .iter()
                        .flatten()
                        .map(|m| (&m.gate, &m.up, &m.down))
                        .collect();
                    let table =
                        g.expert_table(&refs, cfg.hidden_size, cfg.moe_intermediate_size)?;
                    GFfn::Moe {
                        router: g.weight(router.weight.weight())?,
                        experts: ex,
                        table,
                    }
                }
            };
            let layer = GLayer {
                ln1: vec(&l.ln1)?,
                ln2: vec(&l.ln2)?,
                q: g.weight(a.q.weight())?,
                k: g.weight(a.k.weight())?,
                v: g.weight(a.v.weight())?,
                o: g.weight(a.o.weight())?,
                bias: match &a.bias {
                    Some([bq, bk, bv]) => Some([vec(bq)?, vec(bk)?, vec(bv)?]),
                    None => None,
                },
                q_norm: a.q_norm.as_deref().map(vec).transpose()?,
                k_norm: a.k_norm.as_deref().map(vec).transpose()?,
                ffn,
            };
            weight_bytes += layer.q.nbytes() + layer.k.nbytes() + layer.v.nbytes();
            weight_bytes += layer.o.nbytes();
            weight_bytes += match &layer.ffn {
                GFfn::Dense(m) => m.nbytes(),
                GFfn::Moe {
                    router, experts, ..
                } => router.nbytes() + experts.iter().flatten().map(GMlp::nbytes).sum::<usize>(),
            };
            layers.push(layer);
        }
        let embed = g.weight(model.embed.weight())?;
        let lm_head = model
            .lm_head
            .as_ref()
            .map(|t| g.weight(t.weight()))
            .transpose()?;
        weight_bytes += embed.nbytes() + lm_head.as_ref().map_or(0, DevWeight::nbytes);
        let per_layer = kv_blocks * block_size * cfg.num_kv_heads * cfg.head_dim;
        let mut kc = Vec::with_capacity(cfg.num_layers);
        let mut vc = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            kc.push(g.zeros::<f32>(per_layer)?);
            vc.push(g.zeros::<f32>(per_layer)?);
        }
        Ok(CudaModel {
            cfg: cfg.clone(),
            embed,
            lm_head,
            norm: vec(&model.norm)?,
            layers,
            inv_freq: vec(model.rope.inv_freq())?,
            attention_factor: model.rope.attention_factor(),
            kc,
            vc,
            block_size,
            weight_bytes,
            gpu,
        })
    }

    /// Bytes of weights on the device.
    pub fn nbytes(&self) -> usize {
        self.weight_bytes
    }

    /// Runs one step; same contract as [`Model::forward`] (the caller has allocated blocks
    /// for every position written).
    pub fn forward(
        &mut self,
        inputs: &[ForwardInput<'_>],
        record_routing: bool,
    ) -> Result<ForwardOutput, WorkerError> {
        let cfg = &self.cfg;
        let g = &*self.gpu;
        let (h, nh, nkv, d) = (
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        );
        let (qw, kvw) = (nh * d, nkv * d);
        let t: usize = inputs.iter().map(|i| i.tokens.len()).sum();
        let mut out = ForwardOutput {
            expert_load: vec![0; cfg.num_layers * cfg.num_experts],
            ..Default::default()
        };
        if t == 0 {
            return Ok(out);
        }
        let mut tokens = Vec::with_capacity(t);
        let mut chunks = Vec::with_capacity(inputs.len());
        let mut pos = Vec::with_capacity(t);
        for inp in inputs {
            for (j, tok) in inp.tokens.iter().enumerate() {
                if *tok as usize >= cfg.vocab_size {
                    return Err(WorkerError::TokenOutOfRange {
                        token: *tok,
                        vocab: cfg.vocab_size,
                    });
                }
                tokens.push(*tok);
                pos.push((inp.start_pos + j) as u32);
            }
            chunks.push((inp.table, inp.start_pos, inp.tokens.len()));
        }
        let rows = AttnRows::new(g, &chunks)?;
        let dtok = g.upload(&tokens)?;
        let dpos = g.upload(&pos)?;
        let mut hs = g.scratch::<f32>(t * h)?;
        g.embed(&self.embed, &dtok, t, h, &mut hs.slice_mut(..))?;
        let mut x = g.scratch::<f32>(t * h)?;
        let mut q = g.scratch::<f32>(t * qw)?;
        let mut k = g.scratch::<f32>(t * kvw)?;
        let mut v = g.scratch::<f32>(t * kvw)?;
        let mut att = g.scratch::<f32>(t * qw)?;
        let ap = GpuAttn {
            heads: nh,
            kv_heads: nkv,
            head_dim: d,
            block_size: self.block_size,
            scale: 1.0 / (d as f32).sqrt(),
            window: cfg.windows.first().copied().flatten(),
        };
        let eps = cfg.rms_norm_eps;
        // Every MoE layer's choices stay on the device until the step ends (one download).
        let (ne, kk) = (cfg.num_experts, cfg.experts_per_tok);
        let pairs = t * kk;
        let mut all_ids = g.zeros::<u32>(cfg.num_layers * pairs)?;
        let mut all_w = g.zeros::<f32>(cfg.num_layers * pairs)?;
        let small = pairs <= SMALL_BATCH_PAIRS;
        let (mut act, mut ys) = if small {
            (
                g.scratch::<f32>(pairs * cfg.moe_intermediate_size)?,
                g.scratch::<f32>(pairs * h)?,
            )
        } else {
            (g.scratch::<f32>(1)?, g.scratch::<f32>(1)?)
        };
        for (li, layer) in self.layers.iter().enumerate() {
            g.rms_norm_to(&hs.slice(..), &layer.ln1, &mut x.slice_mut(..), t, h, eps)?;
            g.linear_many(
                &x.slice(..),
                t,
                h,
                &mut [
                    job(&layer.q, qw, &mut q.slice_mut(..)),
                    job(&layer.k, kvw, &mut k.slice_mut(..)),
                    job(&layer.v, kvw, &mut v.slice_mut(..)),
                ],
            )?;
            if let Some([bq, bk, bv]) = &layer.bias {
                g.add_bias(&mut q.slice_mut(..), bq, qw, t * qw)?;
                g.add_bias(&mut k.slice_mut(..), bk, kvw, t * kvw)?;
                g.add_bias(&mut v.slice_mut(..), bv, kvw, t * kvw)?;
            }
            if let Some(qn) = &layer.q_norm {
                g.rms_norm(&mut q.slice_mut(..), qn, t * nh, d, eps)?;
            }
            if let Some(kn) = &layer.k_norm {
                g.rms_norm(&mut k.slice_mut(..), kn, t * nkv, d, eps)?;
            }
            let af = self.attention_factor;
            g.rope(&mut q.slice_mut(..), &dpos, &self.inv_freq, af, t, nh, d)?;
            g.rope(&mut k.slice_mut(..), &dpos, &self.inv_freq, af, t, nkv, d)?;
            g.kv_write(
                &k.slice(..),
                &v.slice(..),
                &mut self.kc[li],
                &mut self.vc[li],
                &rows,
                kvw,
                self.block_size,
            )?;
            g.attention(
                &q.slice(..),
                &self.kc[li],
                &self.vc[li],
                &rows,
                &ap,
                &mut att.slice_mut(..),
            )?;
            // The residual add rides on the GEMM (beta = 1).
            g.linear(
                &att.slice(..),
                t,
                qw,
                &layer.o,
                h,
                &mut hs.slice_mut(..),
                true,
            )?;
            g.rms_norm_to(&hs.slice(..), &layer.ln2, &mut x.slice_mut(..), t, h, eps)?;
            match &layer.ffn {
                GFfn::Dense(m) => mlp(g, m, &x.slice(..), t, h, &mut hs.slice_mut(..))?,
                GFfn::Moe {
                    router,
                    experts,
                    table,
                } => {
                    let e = ne;
                    let mut logits = g.scratch::<f32>(t * e)?;
                    g.linear(
                        &x.slice(..),
                        t,
                        h,
                        router,
                        e,
                        &mut logits.slice_mut(..),
                        false,
                    )?;
                    let span = li * pairs..(li + 1) * pairs;
                    g.route_topk(
                        &logits.slice(..),
                        t,
                        e,
                        kk,
                        matches!(cfg.router, RouterSpec::Softmax { renormalize: true }),
                        &mut all_ids.slice_mut(span.clone()),
                        &mut all_w.slice_mut(span.clone()),
                    )?;
                    let (ids, w) = (all_ids.slice(span.clone()), all_w.slice(span.clone()));
                    if small && table.fits_small_batch() {
                        g.moe_small_batch(
                            &x.slice(..),
                            &ids,
                            &w,
                            table,
                            t,
                            kk,
                            &mut hs.slice_mut(..),
                            &mut act,
                            &mut ys,
                        )?;
                        continue;
                    }
                    let host_ids = g.download(&ids)?;
                    // Counting sort of the (token, slot) pairs by expert.
                    let mut counts = vec![0usize; e];
                    for id in &host_ids {
                        counts[*id as usize] += 1;
                    }
                    let mut start = vec![0usize; e + 1];
                    for i in 0..e {
                        start[i + 1] = start[i] + counts[i];
                    }
                    let mut fill = start.clone();
                    let mut src_row = vec![0u32; t * kk];
                    let mut slot_row = vec![0u32; t * kk];
                    for (i, id) in host_ids.iter().enumerate() {
                        let p = fill[*id as usize];
                        fill[*id as usize] += 1;
                        src_row[p] = (i / kk) as u32;
                        slot_row[i] = p as u32;
                    }
                    let (dsrc, dslot) = (g.upload(&src_row)?, g.upload(&slot_row)?);
                    let n = t * kk;
                    let mut packed = g.scratch::<f32>(n * h)?;
                    g.gather_rows(
                        &x.slice(..),
                        &dsrc.slice(..),
                        &mut packed.slice_mut(..),
                        n,
                        h,
                    )?;
                    let inter = cfg.moe_intermediate_size;
                    let mut gate = g.scratch::<f32>(n * inter)?;
                    let mut up = g.scratch::<f32>(n * inter)?;
                    let mut y = g.scratch::<f32>(n * h)?;
                    for ex in 0..e {
                        let (a, b) = (start[ex], start[ex + 1]);
                        if a == b {
                            continue;
                        }
                        let m = experts[ex].as_ref().ok_or(WorkerError::ExpertMissing {
                            layer: li,
                            expert: ex,
                        })?;
                        let xs = packed.slice(a * h..b * h);
                        let rows_e = b - a;
                        g.linear_many(
                            &xs,
                            rows_e,
                            h,
                            &mut [
                                job(&m.gate, m.inter, &mut gate.slice_mut(a * inter..b * inter)),
                                job(&m.up, m.inter, &mut up.slice_mut(a * inter..b * inter)),
                            ],
                        )?;
                    }
                    g.silu_mul(&mut gate.slice_mut(..), &up.slice(..), n * inter)?;
                    for ex in 0..e {
                        let (a, b) = (start[ex], start[ex + 1]);
                        if a == b {
                            continue;
                        }
                        let m = experts[ex].as_ref().expect("checked above");
                        g.linear(
                            &gate.slice(a * inter..b * inter),
                            b - a,
                            inter,
                            &m.down,
                            h,
                            &mut y.slice_mut(a * h..b * h),
                            false,
                        )?;
                    }
                    g.combine_slots(
                        &y.slice(..),
                        &dslot.slice(..),
                        &w,
                        &mut x.slice_mut(..),
                        t,
                        kk,
                        h,
                    )?;
                    g.add(&mut hs.slice_mut(..), &x.slice(..), t * h)?;
                }
            }
        }
        // Expert load (and routing, when asked) from the choices kept on the device.
        let moe_layers: Vec<usize> = self
            .layers
            .iter()
            .enumerate()
            .filter(|(_, l)| matches!(l.ffn, GFfn::Moe { .. }))
            .map(|(i, _)| i)
            .collect();
        if !moe_layers.is_empty() {
            let ids = g.download(&all_ids.slice(..cfg.num_layers * pairs))?;
            let ws = if record_routing {
                g.download(&all_w.slice(..cfg.num_layers * pairs))?
            } else {
                Vec::new()
            };
            for &li in &moe_layers {
                let span = li * pairs..(li + 1) * pairs;
                for id in &ids[span.clone()] {
                    out.expert_load[li * ne + *id as usize] += 1;
                }
                if record_routing {
                    out.routing.push(Routing {
                        layer: li,
                        ids: ids[span.clone()].to_vec(),
                        weights: ws[span].to_vec(),
                    });
                }
            }
        }
        // Final norm and lm_head on the rows that want logits.
        let sel = super::logit_rows(inputs);
        out.logit_rows = sel.iter().map(|&(_, ei, pos)| (ei, pos)).collect();
        if sel.is_empty() {
            g.sync()?;
            return Ok(out);
        }
        let idx: Vec<u32> = sel.iter().map(|s| s.0 as u32).collect();
        let didx = g.upload(&idx)?;
        let ns = sel.len();
        g.gather_rows(&hs.slice(..), &didx.slice(..), &mut x.slice_mut(..), ns, h)?;
        g.rms_norm(&mut x.slice_mut(..ns * h), &self.norm, ns, h, eps)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let vocab = cfg.vocab_size;
        let mut logits = g.scratch::<f32>(ns * vocab)?;
        g.linear(
            &x.slice(..),
            ns,
            h,
            head,
            vocab,
            &mut logits.slice_mut(..),
            false,
        )?;
        out.logits = g.download(&logits.slice(..ns * vocab))?;
        Ok(out)
    }
}

/// `acc += mlp(x)` for a dense layer.
fn mlp(
    g: &Gpu,
    m: &GMlp,
    x: &CudaView<'_, f32>,
    t: usize,
    h: usize,
    acc: &mut CudaViewMut<'_, f32>,
) -> Result<(), CudaError> {
    let mut gate = g.scratch::<f32>(t * m.inter)?;
    let mut up = g.scratch::<f32>(t * m.inter)?;
    g.linear_many(
        x,
        t,
        h,
        &mut [
            job(&m.gate, m.inter, &mut gate.slice_mut(..)),
            job(&m.up, m.inter, &mut up.slice_mut(..)),
        ],
    )?;
    g.silu_mul(&mut gate.slice_mut(..), &up.slice(..), t * m.inter)?;
    g.linear(&gate.slice(..), t, m.inter, &m.down, h, acc, true)
}

fn job<'a, 'b>(w: &'a DevWeight, n: usize, out: &'a mut CudaViewMut<'b, f32>) -> GemmJob<'a, 'b> {
    GemmJob {
        w,
        n,
        out,
        accumulate: false,
    }
}
