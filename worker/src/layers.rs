//! The shared layers every family composes: attention (GQA with its variants, MLA), routers,
//! shared experts and dense MLPs. Each piece loads its tensors by the names
//! [`crate::family::tensors`] gives and runs over a step's rows (`[t, hidden]`, row-major).
//!
//! MLA runs in the absorbed form for every row: the cache holds the normalised KV latent
//! `c` (`kv_lora_rank`) and the rotated rope key (`qk_rope_head_dim`) per position; each
//! head's no-rope query is mapped into latent space through its slice of `kv_b_proj`
//! (`q_lat = W_UKᵀ q_nope`), attention runs as one shared "kv head" of width
//! `kv_lora_rank + qk_rope_head_dim` whose values are the latent itself, and each head's
//! output is mapped back through its value slice (`o = W_UV · Σ p c`). This is exactly the
//! reference's `softmax((q_nope·k_nope + q_pe·k_pe) · scale) · v` with `k_nope = W_UK c` and
//! `v = W_UV c`, reassociated.

use crate::config::{AttentionSpec, MlaSpec, ModelConfig, QkNorm, RouterSpec};
use crate::experts::{add_rows, ExpertExec, Mlp};
use crate::family::tensors::attn;
use crate::kv::KvCache;
use crate::weights::{Checkpoint, Tensor, WeightDType};
use crate::WorkerError;
use switchyard_kernels::attention::{AttnParams, QueryRow};
use switchyard_kernels::norm::rms_norm;
use switchyard_kernels::rope::{apply_interleaved_with, apply_with};
use switchyard_kernels::{linear, linear_batch, moe, LinearJob, WeightRef};

/// Per-row rotary tables, shared by all layers of a step.
pub struct RopeRows<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub half: usize,
}

impl RopeRows<'_> {
    fn row(&self, r: usize) -> (&[f32], &[f32]) {
        (
            &self.cos[r * self.half..(r + 1) * self.half],
            &self.sin[r * self.half..(r + 1) * self.half],
        )
    }
}

/// The rows of a step as attention sees them.
pub struct StepRows<'a> {
    /// Per row: (block table, absolute position).
    pub rows: Vec<QueryRow<'a>>,
    pub rope: RopeRows<'a>,
    /// The context exchange, in a step with context parallelism.
    pub(crate) cp: Option<crate::context::CpStep<'a>>,
}

/// Standard (grouped-query) attention.
pub struct Gqa {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub o: Tensor,
    /// q, k, v biases.
    pub bias: Option<[Vec<f32>; 3]>,
    pub o_bias: Option<Vec<f32>>,
    pub qk_norm: QkNorm,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub sinks: Option<Vec<f32>>,
    pub window: Option<usize>,
}

/// Multi-head latent attention, with `kv_b_proj` split per head at load.
pub struct Mla {
    spec: MlaSpec,
    /// `q_a_proj`, `q_a_layernorm`, `q_b_proj` (or `q_proj` alone).
    q_a: Option<(Tensor, Vec<f32>)>,
    q_b: Tensor,
    kv_a: Tensor,
    kv_norm: Vec<f32>,
    /// Per head: `W_UKᵀ` `[kv_lora, nope]` (maps a no-rope query into latent space).
    uk_t: Vec<Tensor>,
    /// Per head: `W_UV` `[v_head_dim, kv_lora]`.
    uv: Vec<Tensor>,
    o: Tensor,
}

pub enum Attention {
    Gqa(Gqa),
    Mla(Mla),
}

impl Attention {
    pub fn load(
        ck: &Checkpoint,
        cfg: &ModelConfig,
        l: usize,
        dtype: WeightDType,
    ) -> Result<Self, WorkerError> {
        let a = attn(l);
        let h = cfg.hidden_size;
        let nh = cfg.num_heads;
        match &cfg.attention {
            AttentionSpec::Gqa {
                qkv_bias,
                o_bias,
                qk_norm,
                sinks,
            } => {
                let (nkv, d) = (cfg.num_kv_heads, cfg.head_dim);
                let bias = if *qkv_bias {
                    Some([
                        ck.vector(&format!("{a}.q_proj.bias"), &[nh * d])?,
                        ck.vector(&format!("{a}.k_proj.bias"), &[nkv * d])?,
                        ck.vector(&format!("{a}.v_proj.bias"), &[nkv * d])?,
                    ])
                } else {
                    None
                };
                let (qn, kn) = match qk_norm {
                    QkNorm::None => (None, None),
                    QkNorm::PerHead => (Some(d), Some(d)),
                    QkNorm::Full => (Some(nh * d), Some(nkv * d)),
                };
                Ok(Attention::Gqa(Gqa {
                    q: ck.matrix(&format!("{a}.q_proj.weight"), &[nh * d, h], dtype)?,
                    k: ck.matrix(&format!("{a}.k_proj.weight"), &[nkv * d, h], dtype)?,
                    v: ck.matrix(&format!("{a}.v_proj.weight"), &[nkv * d, h], dtype)?,
                    o: ck.matrix(&format!("{a}.o_proj.weight"), &[h, nh * d], dtype)?,
                    bias,
                    o_bias: o_bias
                        .then(|| ck.vector(&format!("{a}.o_proj.bias"), &[h]))
                        .transpose()?,
                    qk_norm: *qk_norm,
                    q_norm: qn
                        .map(|n| ck.vector(&format!("{a}.q_norm.weight"), &[n]))
                        .transpose()?,
                    k_norm: kn
                        .map(|n| ck.vector(&format!("{a}.k_norm.weight"), &[n]))
                        .transpose()?,
                    sinks: sinks
                        .then(|| ck.vector(&format!("{a}.sinks"), &[nh]))
                        .transpose()?,
                    window: cfg.windows[l],
                }))
            }
            AttentionSpec::Mla(m) => {
                let qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
                let (q_a, q_b) = match m.q_lora_rank {
                    Some(r) => (
                        Some((
                            ck.matrix(&format!("{a}.q_a_proj.weight"), &[r, h], dtype)?,
                            ck.vector(&format!("{a}.q_a_layernorm.weight"), &[r])?,
                        )),
                        ck.matrix(&format!("{a}.q_b_proj.weight"), &[nh * qk, r], dtype)?,
                    ),
                    None => (
                        None,
                        ck.matrix(&format!("{a}.q_proj.weight"), &[nh * qk, h], dtype)?,
                    ),
                };
                let (lora, nope, vd) = (m.kv_lora_rank, m.qk_nope_head_dim, m.v_head_dim);
                let kv_b_name = format!("{a}.kv_b_proj.weight");
                let shape = [nh * (nope + vd), lora];
                let mut uk_t = Vec::with_capacity(nh);
                let mut uv = Vec::with_capacity(nh);
                let kv_b = ck.matrix(&kv_b_name, &shape, dtype)?;
                if let WeightRef::Fp8(w) = kv_b.weight() {
                    // FP8 stays FP8: each head's rows (W_UK transposed, W_UV as stored) with
                    // the block scales that cover them, exactly.
                    for hd in 0..nh {
                        let base = hd * (nope + vd);
                        uk_t.push(Tensor::fp8(w.rows(base, nope, true)));
                        uv.push(Tensor::fp8(w.rows(base + nope, vd, false)));
                    }
                } else {
                    let kv_b = kv_b.to_f32();
                    for hd in 0..nh {
                        let base = hd * (nope + vd);
                        // Rows base..base+nope are W_UK [nope, lora]; store its transpose.
                        let mut t = vec![0.0f32; lora * nope];
                        for i in 0..nope {
                            for c in 0..lora {
                                t[c * nope + i] = kv_b[(base + i) * lora + c];
                            }
                        }
                        uk_t.push(Tensor::from_f32(vec![lora, nope], t, dtype));
                        let v = kv_b[(base + nope) * lora..(base + nope + vd) * lora].to_vec();
                        uv.push(Tensor::from_f32(vec![vd, lora], v, dtype));
                    }
                }
                Ok(Attention::Mla(Mla {
                    spec: m.clone(),
                    q_a,
                    q_b,
                    kv_a: ck.matrix(
                        &format!("{a}.kv_a_proj_with_mqa.weight"),
                        &[lora + m.qk_rope_head_dim, h],
                        dtype,
                    )?,
                    kv_norm: ck.vector(&format!("{a}.kv_a_layernorm.weight"), &[lora])?,
                    uk_t,
                    uv,
                    o: ck.matrix(&format!("{a}.o_proj.weight"), &[h, nh * vd], dtype)?,
                }))
            }
        }
    }

    pub fn nbytes(&self) -> usize {
        match self {
            Attention::Gqa(a) => a.q.nbytes() + a.k.nbytes() + a.v.nbytes() + a.o.nbytes(),
            Attention::Mla(m) => {
                m.q_a.as_ref().map_or(0, |(t, _)| t.nbytes())
                    + m.q_b.nbytes()
                    + m.kv_a.nbytes()
                    + m.uk_t
                        .iter()
                        .chain(&m.uv)
                        .map(Tensor::nbytes)
                        .sum::<usize>()
                    + m.o.nbytes()
            }
        }
    }

    /// `out[t, hidden]` = attention of the normalised rows `x`, after writing this step's
    /// keys and values into layer `li` of the cache.
    pub fn forward(
        &self,
        cfg: &ModelConfig,
        li: usize,
        x: &[f32],
        step: &StepRows<'_>,
        kv: &mut KvCache,
        out: &mut [f32],
    ) -> Result<(), WorkerError> {
        match self {
            Attention::Gqa(a) => a.forward(cfg, li, x, step, kv, out),
            Attention::Mla(m) => m.forward(cfg, li, x, step, kv, out),
        }
    }
}

fn job<'a>(
    x: &'a [f32],
    m: usize,
    k: usize,
    w: &'a Tensor,
    n: usize,
    out: &'a mut [f32],
) -> LinearJob<'a> {
    LinearJob {
        x,
        m,
        k,
        w: w.weight(),
        n,
        out,
    }
}

impl Gqa {
    fn forward(
        &self,
        cfg: &ModelConfig,
        li: usize,
        x: &[f32],
        step: &StepRows<'_>,
        kv: &mut KvCache,
        out: &mut [f32],
    ) -> Result<(), WorkerError> {
        let (h, nh, nkv, d) = (
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        );
        let t = step.rows.len();
        let (qw, kvw) = (nh * d, nkv * d);
        let mut q = vec![0.0f32; t * qw];
        let mut k = vec![0.0f32; t * kvw];
        let mut v = vec![0.0f32; t * kvw];
        linear_batch(vec![
            job(x, t, h, &self.q, qw, &mut q),
            job(x, t, h, &self.k, kvw, &mut k),
            job(x, t, h, &self.v, kvw, &mut v),
        ]);
        if let Some([bq, bk, bv]) = &self.bias {
            add_rows(&mut q, bq);
            add_rows(&mut k, bk);
            add_rows(&mut v, bv);
        }
        if let Some(qn) = &self.q_norm {
            rms_norm(&mut q, qn, cfg.rms_norm_eps);
        }
        if let Some(kn) = &self.k_norm {
            rms_norm(&mut k, kn, cfg.rms_norm_eps);
        }
        for r in 0..t {
            let (c, s) = step.rope.row(r);
            apply_with(&mut q[r * qw..(r + 1) * qw], d, c, s);
            apply_with(&mut k[r * kvw..(r + 1) * kvw], d, c, s);
        }
        let params = AttnParams {
            heads: nh,
            kv_heads: nkv,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
            window: self.window,
        };
        let mut att = vec![0.0f32; t * qw];
        crate::context::attend(
            &step.rows,
            step.cp.as_ref(),
            li,
            kv,
            &q,
            &k,
            &v,
            params,
            self.sinks.as_deref(),
            &mut att,
        )?;
        linear(&att, t, qw, self.o.weight(), h, out);
        if let Some(b) = &self.o_bias {
            add_rows(out, b);
        }
        Ok(())
    }
}

impl Mla {
    fn forward(
        &self,
        cfg: &ModelConfig,
        li: usize,
        x: &[f32],
        step: &StepRows<'_>,
        kv: &mut KvCache,
        out: &mut [f32],
    ) -> Result<(), WorkerError> {
        let m = &self.spec;
        let (h, nh) = (cfg.hidden_size, cfg.num_heads);
        let (lora, nope, rope, vd) = (
            m.kv_lora_rank,
            m.qk_nope_head_dim,
            m.qk_rope_head_dim,
            m.v_head_dim,
        );
        let t = step.rows.len();
        let qk = nope + rope;
        let width = lora + rope;
        // Queries, and the latent and rope key of every row (one parallel region for the
        // projections that read `x`).
        let mut q = vec![0.0f32; t * nh * qk];
        let mut ckv = vec![0.0f32; t * width];
        match &self.q_a {
            Some((qa, qa_norm)) => {
                let r = qa_norm.len();
                let mut c = vec![0.0f32; t * r];
                linear_batch(vec![
                    job(x, t, h, qa, r, &mut c),
                    job(x, t, h, &self.kv_a, width, &mut ckv),
                ]);
                rms_norm(&mut c, qa_norm, cfg.rms_norm_eps);
                linear(&c, t, r, self.q_b.weight(), nh * qk, &mut q);
            }
            None => linear_batch(vec![
                job(x, t, h, &self.q_b, nh * qk, &mut q),
                job(x, t, h, &self.kv_a, width, &mut ckv),
            ]),
        }
        let rot = |v: &mut [f32], c: &[f32], s: &[f32]| {
            if m.interleave {
                apply_interleaved_with(v, rope, c, s)
            } else {
                apply_with(v, rope, c, s)
            }
        };
        for r in 0..t {
            let e = &mut ckv[r * width..(r + 1) * width];
            let (lat, pe) = e.split_at_mut(lora);
            rms_norm(lat, &self.kv_norm, cfg.rms_norm_eps);
            let (c, s) = step.rope.row(r);
            rot(pe, c, s);
        }
        // Absorbed queries `[t, nh, lora + rope]`: W_UKᵀ q_nope, then the rotated q_pe.
        let mut nope_in: Vec<Vec<f32>> = (0..nh).map(|_| vec![0.0f32; t * nope]).collect();
        let mut qa = vec![0.0f32; t * nh * width];
        for r in 0..t {
            let (c, s) = step.rope.row(r);
            for hd in 0..nh {
                let src = &mut q[(r * nh + hd) * qk..(r * nh + hd + 1) * qk];
                nope_in[hd][r * nope..(r + 1) * nope].copy_from_slice(&src[..nope]);
                rot(&mut src[nope..], c, s);
                qa[(r * nh + hd) * width + lora..(r * nh + hd + 1) * width]
                    .copy_from_slice(&src[nope..]);
            }
        }
        // Buffers go as soon as they are read: at a long prefill chunk each is megabytes.
        drop(q);
        let mut lat_q: Vec<Vec<f32>> = (0..nh).map(|_| vec![0.0f32; t * lora]).collect();
        linear_batch(
            nope_in
                .iter()
                .zip(lat_q.iter_mut())
                .zip(&self.uk_t)
                .map(|((xi, o), w)| job(xi, t, nope, w, lora, o))
                .collect(),
        );
        for (hd, lq) in lat_q.iter().enumerate() {
            for r in 0..t {
                qa[(r * nh + hd) * width..(r * nh + hd) * width + lora]
                    .copy_from_slice(&lq[r * lora..(r + 1) * lora]);
            }
        }
        drop((nope_in, lat_q));
        let params = AttnParams {
            heads: nh,
            kv_heads: 1,
            head_dim: width,
            scale: m.softmax_scale,
            window: None,
        };
        // The latent and rope key of each row is the cache entry (keys and values at once).
        let mut ctx = vec![0.0f32; t * nh * width];
        crate::context::attend(
            &step.rows,
            step.cp.as_ref(),
            li,
            kv,
            &qa,
            &ckv,
            &[],
            params,
            None,
            &mut ctx,
        )?;
        drop((qa, ckv));
        // Back from latent space per head: o_h = W_UV Σ p c.
        let lat_o: Vec<Vec<f32>> = (0..nh)
            .map(|hd| {
                let mut v = vec![0.0f32; t * lora];
                for r in 0..t {
                    v[r * lora..(r + 1) * lora]
                        .copy_from_slice(&ctx[(r * nh + hd) * width..(r * nh + hd) * width + lora]);
                }
                v
            })
            .collect();
        drop(ctx);
        let mut heads: Vec<Vec<f32>> = (0..nh).map(|_| vec![0.0f32; t * vd]).collect();
        linear_batch(
            lat_o
                .iter()
                .zip(heads.iter_mut())
                .zip(&self.uv)
                .map(|((xi, o), w)| job(xi, t, lora, w, vd, o))
                .collect(),
        );
        drop(lat_o);
        let mut att = vec![0.0f32; t * nh * vd];
        for (hd, o) in heads.iter().enumerate() {
            for r in 0..t {
                att[(r * nh + hd) * vd..(r * nh + hd + 1) * vd]
                    .copy_from_slice(&o[r * vd..(r + 1) * vd]);
            }
        }
        drop(heads);
        linear(&att, t, nh * vd, self.o.weight(), h, out);
        Ok(())
    }
}

/// A sparse layer's router.
pub struct Router {
    pub weight: Tensor,
    /// GPT-OSS's logit bias, or DeepSeek's `e_score_correction_bias`.
    pub bias: Option<Vec<f32>>,
    pub spec: RouterSpec,
}

impl Router {
    fn load(ck: &Checkpoint, cfg: &ModelConfig, l: usize) -> Result<Self, WorkerError> {
        let (w, b) = cfg.router_tensors(l);
        Ok(Router {
            weight: ck.matrix(&w, &[cfg.num_experts, cfg.hidden_size], WeightDType::F32)?,
            bias: b.map(|b| ck.vector(&b, &[cfg.num_experts])).transpose()?,
            spec: cfg.router,
        })
    }

    /// Expert ids and weights `[t, k]` from router logits `[t, num_experts]` (consumed).
    pub fn choose(&self, mut logits: Vec<f32>, k: usize) -> (Vec<u32>, Vec<f32>) {
        let e = self.weight.shape[0];
        let router = match self.spec {
            RouterSpec::Softmax { renormalize } => moe::Router::Softmax { renormalize },
            RouterSpec::TopkSoftmax => {
                if let Some(b) = &self.bias {
                    add_rows(&mut logits, b);
                }
                moe::Router::TopkSoftmax
            }
            RouterSpec::SigmoidGrouped {
                n_group,
                topk_group,
                renormalize,
                scaling,
            } => moe::Router::SigmoidGrouped {
                bias: self
                    .bias
                    .as_deref()
                    .expect("loaded with its correction bias"),
                n_group,
                topk_group,
                renormalize,
                scaling,
            },
        };
        moe::route_with(&logits, e, k, router)
    }
}

/// An always-on expert, optionally behind a sigmoid gate.
pub struct SharedExpert {
    pub mlp: Mlp,
    pub gate: Option<Vec<f32>>,
}

impl SharedExpert {
    /// `out += gate(x) · down(act(g, u))` row by row, given the gate and up projections of
    /// `x` (computed together with the router's logits).
    fn add_to(&self, x: &[f32], t: usize, mut g: Vec<f32>, mut u: Vec<f32>, out: &mut [f32]) {
        let h = self.mlp.hidden;
        let mut y = vec![0.0f32; t * h];
        self.mlp.activate(&mut g, &mut u);
        linear(&g, t, self.mlp.inter, self.mlp.down.weight(), h, &mut y);
        self.mlp.finish(&mut y);
        for r in 0..t {
            let s = match &self.gate {
                Some(gw) => {
                    let z = switchyard_kernels::linear::dot(&x[r * h..(r + 1) * h], gw);
                    1.0 / (1.0 + (-z).exp())
                }
                None => 1.0,
            };
            switchyard_kernels::axpy(&mut out[r * h..(r + 1) * h], s, &y[r * h..(r + 1) * h]);
        }
    }
}

pub enum Ffn {
    Dense(Mlp),
    Moe {
        router: Router,
        shared: Option<SharedExpert>,
    },
}

/// What a sparse layer routed, for the caller's accounting.
pub struct Routed {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Ffn {
    pub fn load(
        ck: &Checkpoint,
        cfg: &ModelConfig,
        l: usize,
        dtype: WeightDType,
    ) -> Result<Self, WorkerError> {
        let h = cfg.hidden_size;
        if !cfg.sparse_layers[l] {
            return Ok(Ffn::Dense(Mlp::load(
                ck,
                cfg.dense_tensors(l),
                h,
                cfg.intermediate_size,
                dtype,
            )?));
        }
        let shared = match cfg.shared_tensors(l) {
            None => None,
            Some((names, gate)) => {
                let inter = cfg.shared_expert.expect("shared").intermediate_size;
                Some(SharedExpert {
                    mlp: Mlp::load(ck, names, h, inter, dtype)?,
                    gate: gate.map(|g| ck.vector(&g, &[1, h])).transpose()?,
                })
            }
        };
        Ok(Ffn::Moe {
            router: Router::load(ck, cfg, l)?,
            shared,
        })
    }

    pub fn nbytes(&self) -> usize {
        match self {
            Ffn::Dense(m) => m.nbytes(),
            Ffn::Moe { router, shared } => {
                router.weight.nbytes() + shared.as_ref().map_or(0, |s| s.mlp.nbytes())
            }
        }
    }

    /// `out = ffn(x)` for `t` rows; a sparse layer reaches its experts through `experts`
    /// (every rank joins the exchange, even with `t == 0`).
    pub fn forward(
        &self,
        cfg: &ModelConfig,
        li: usize,
        x: &[f32],
        t: usize,
        experts: &dyn ExpertExec,
        out: &mut [f32],
    ) -> Result<Option<Routed>, WorkerError> {
        let h = cfg.hidden_size;
        match self {
            Ffn::Dense(mlp) => {
                mlp.forward(x, t, out);
                Ok(None)
            }
            Ffn::Moe { router, shared } => {
                let kk = cfg.experts_per_tok;
                let e = router.weight.shape[0];
                // The router and the shared expert's gate/up read the same rows: one region.
                let mut logits = vec![0.0f32; t * e];
                let si = shared.as_ref().map_or(0, |s| s.mlp.inter);
                let (mut g, mut u) = (vec![0.0f32; t * si], vec![0.0f32; t * si]);
                let mut jobs = vec![job(x, t, h, &router.weight, e, &mut logits)];
                if let Some(s) = shared {
                    jobs.push(job(x, t, h, &s.mlp.gate, si, &mut g));
                    jobs.push(job(x, t, h, &s.mlp.up, si, &mut u));
                }
                linear_batch(jobs);
                let (ids, w) = router.choose(logits, kk);
                let mut slots = vec![0.0f32; t * kk * h];
                experts.run(li, x, h, &ids, kk, &mut slots)?;
                moe::combine(&slots, &w, kk, h, out);
                if let Some(s) = shared {
                    s.add_to(x, t, g, u, out);
                }
                Ok(Some(Routed { ids, weights: w }))
            }
        }
    }
}
