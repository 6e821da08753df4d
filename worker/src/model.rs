//! The forward pass of the supported MoE decoders (Qwen3-MoE, Mixtral) over a batch of
//! sequence chunks.
//!
//! A step is a list of [`ForwardInput`]s: each feeds consecutive tokens of one sequence starting
//! at `start_pos` (a whole prompt, a prefill chunk, or one decode token). All rows of all
//! entries go through every layer together; attention reads each row's own sequence through
//! its block table, so batching never mixes sequences. Keys and values of every row are written
//! to the cache before attention runs, so a chunk attends to itself causally.
//!
//! The model holds the dense weights (embeddings, attention, norms, routers, dense MLPs,
//! lm_head); experts are reached through [`ExpertExec`].

#[cfg(feature = "cuda")]
#[path = "cuda_model.rs"]
pub mod cuda;

use crate::config::{Arch, ModelConfig};
use crate::experts::{ExpertExec, Mlp};
use crate::kv::KvCache;
use crate::weights::{Checkpoint, Tensor, WeightDType};
use crate::WorkerError;
use switchyard_kernels::attention::{paged_attention, AttnParams, QueryRow};
use switchyard_kernels::norm::rms_norm;
use switchyard_kernels::rope::Rope;
use switchyard_kernels::{axpy, linear, linear_batch, moe, LinearJob};

struct Attention {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    bias: Option<[Vec<f32>; 3]>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
}

enum Ffn {
    Dense(Mlp),
    Moe { router: Tensor },
}

struct Layer {
    ln1: Vec<f32>,
    ln2: Vec<f32>,
    attn: Attention,
    ffn: Ffn,
}

/// Which logits an entry wants back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    None,
    Last,
    All,
}

/// One sequence's tokens in a step.
pub struct ForwardInput<'a> {
    pub tokens: &'a [u32],
    pub start_pos: usize,
    pub table: &'a [u32],
    pub logits: Logits,
}

/// Router decisions of one MoE layer for every row of the step.
#[derive(Clone, Debug)]
pub struct Routing {
    pub layer: usize,
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

#[derive(Debug, Default)]
pub struct ForwardOutput {
    /// `[rows, vocab]` for the rows listed in `logit_rows`.
    pub logits: Vec<f32>,
    /// (entry index, absolute position) of each logits row.
    pub logit_rows: Vec<(usize, usize)>,
    /// Routing per MoE layer, when recording was asked for.
    pub routing: Vec<Routing>,
    /// Tokens routed to each expert, `[layer * num_experts + expert]`.
    pub expert_load: Vec<u32>,
}

/// The rows of a step that want logits: (row in the step, entry index, absolute position).
pub(crate) fn logit_rows(inputs: &[ForwardInput<'_>]) -> Vec<(usize, usize, usize)> {
    let mut sel = Vec::new();
    let mut row = 0;
    for (ei, inp) in inputs.iter().enumerate() {
        let n = inp.tokens.len();
        match inp.logits {
            Logits::None => {}
            Logits::Last => sel.push((row + n - 1, ei, inp.start_pos + n - 1)),
            Logits::All => sel.extend((0..n).map(|j| (row + j, ei, inp.start_pos + j))),
        }
        row += n;
    }
    sel
}

pub struct Model {
    pub cfg: ModelConfig,
    pub dtype: WeightDType,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Option<Tensor>,
    rope: Rope,
}

impl Model {
    /// Loads the dense weights (everything except the experts).
    pub fn load(
        ck: &Checkpoint,
        cfg: &ModelConfig,
        dtype: WeightDType,
    ) -> Result<Self, WorkerError> {
        let h = cfg.hidden_size;
        let (nh, nkv, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let embed = ck.matrix("model.embed_tokens.weight", &[cfg.vocab_size, h], dtype)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            let bias = if cfg.attention_bias {
                Some([
                    ck.vector(&format!("{a}.q_proj.bias"), &[nh * d])?,
                    ck.vector(&format!("{a}.k_proj.bias"), &[nkv * d])?,
                    ck.vector(&format!("{a}.v_proj.bias"), &[nkv * d])?,
                ])
            } else {
                None
            };
            let attn = Attention {
                q: ck.matrix(&format!("{a}.q_proj.weight"), &[nh * d, h], dtype)?,
                k: ck.matrix(&format!("{a}.k_proj.weight"), &[nkv * d, h], dtype)?,
                v: ck.matrix(&format!("{a}.v_proj.weight"), &[nkv * d, h], dtype)?,
                o: ck.matrix(&format!("{a}.o_proj.weight"), &[h, nh * d], dtype)?,
                bias,
                q_norm: if cfg.qk_norm {
                    Some(ck.vector(&format!("{a}.q_norm.weight"), &[d])?)
                } else {
                    None
                },
                k_norm: if cfg.qk_norm {
                    Some(ck.vector(&format!("{a}.k_norm.weight"), &[d])?)
                } else {
                    None
                },
            };
            let ffn = if cfg.sparse_layers[l] {
                let router = match cfg.arch {
                    Arch::Qwen3Moe => format!("{p}.mlp.gate.weight"),
                    Arch::Mixtral => format!("{p}.block_sparse_moe.gate.weight"),
                };
                Ffn::Moe {
                    router: ck.matrix(&router, &[cfg.num_experts, h], WeightDType::F32)?,
                }
            } else {
                let names = [
                    format!("{p}.mlp.gate_proj.weight"),
                    format!("{p}.mlp.up_proj.weight"),
                    format!("{p}.mlp.down_proj.weight"),
                ];
                Ffn::Dense(Mlp::load(ck, names, h, cfg.intermediate_size, dtype)?)
            };
            layers.push(Layer {
                ln1: ck.vector(&format!("{p}.input_layernorm.weight"), &[h])?,
                ln2: ck.vector(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                attn,
                ffn,
            });
        }
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(ck.matrix("lm_head.weight", &[cfg.vocab_size, h], dtype)?)
        };
        let rope = Rope::new(
            d,
            cfg.rope_theta,
            &cfg.rope_scaling,
            cfg.max_position_embeddings,
        )?;
        Ok(Model {
            cfg: cfg.clone(),
            dtype,
            embed,
            layers,
            norm: ck.vector("model.norm.weight", &[h])?,
            lm_head,
            rope,
        })
    }

    /// Bytes of dense weights held.
    pub fn nbytes(&self) -> usize {
        let mut n = self.embed.nbytes() + self.lm_head.as_ref().map_or(0, |t| t.nbytes());
        for l in &self.layers {
            n += l.attn.q.nbytes() + l.attn.k.nbytes() + l.attn.v.nbytes() + l.attn.o.nbytes();
            n += match &l.ffn {
                Ffn::Dense(m) => m.nbytes(),
                Ffn::Moe { router } => router.nbytes(),
            };
        }
        n
    }

    /// Runs one step. The caller has allocated cache blocks for every position written.
    pub fn forward(
        &self,
        inputs: &[ForwardInput<'_>],
        kv: &mut KvCache,
        experts: &dyn ExpertExec,
        record_routing: bool,
    ) -> Result<ForwardOutput, WorkerError> {
        let cfg = &self.cfg;
        let (h, nh, nkv, d) = (
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        );
        let t: usize = inputs.iter().map(|i| i.tokens.len()).sum();
        let mut out = ForwardOutput {
            expert_load: vec![0; cfg.num_layers * cfg.num_experts],
            ..Default::default()
        };
        // No early return when t == 0: a rank with no tokens still joins every layer's
        // expert exchange.
        // Row -> (entry, position).
        let mut row_pos = Vec::with_capacity(t);
        for (ei, inp) in inputs.iter().enumerate() {
            for j in 0..inp.tokens.len() {
                row_pos.push((ei, inp.start_pos + j));
            }
        }
        let mut hs = vec![0.0f32; t * h];
        let embed = self.embed.weight();
        for (r, tok) in inputs.iter().flat_map(|i| i.tokens.iter()).enumerate() {
            if *tok as usize >= cfg.vocab_size {
                return Err(WorkerError::TokenOutOfRange {
                    token: *tok,
                    vocab: cfg.vocab_size,
                });
            }
            embed.row_into(*tok as usize, h, &mut hs[r * h..(r + 1) * h]);
        }
        // Per-row cos/sin, shared by all layers.
        let half = d / 2;
        let mut cos = vec![0.0f32; t * half];
        let mut sin = vec![0.0f32; t * half];
        for (r, &(_, pos)) in row_pos.iter().enumerate() {
            self.rope.cos_sin(
                pos,
                &mut cos[r * half..(r + 1) * half],
                &mut sin[r * half..(r + 1) * half],
            );
        }
        let (qw, kvw) = (nh * d, nkv * d);
        let mut x = vec![0.0f32; t * h];
        let mut q = vec![0.0f32; t * qw];
        let mut k = vec![0.0f32; t * kvw];
        let mut v = vec![0.0f32; t * kvw];
        let mut att = vec![0.0f32; t * qw];
        let mut tmp = vec![0.0f32; t * h];
        let params = AttnParams {
            heads: nh,
            kv_heads: nkv,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
            window: cfg.sliding_window,
        };
        for (li, layer) in self.layers.iter().enumerate() {
            x.copy_from_slice(&hs);
            rms_norm(&mut x, &layer.ln1, cfg.rms_norm_eps);
            let a = &layer.attn;
            linear_batch(vec![
                LinearJob {
                    x: &x,
                    m: t,
                    k: h,
                    w: a.q.weight(),
                    n: qw,
                    out: &mut q,
                },
                LinearJob {
                    x: &x,
                    m: t,
                    k: h,
                    w: a.k.weight(),
                    n: kvw,
                    out: &mut k,
                },
                LinearJob {
                    x: &x,
                    m: t,
                    k: h,
                    w: a.v.weight(),
                    n: kvw,
                    out: &mut v,
                },
            ]);
            if let Some([bq, bk, bv]) = &a.bias {
                for r in 0..t {
                    axpy(&mut q[r * qw..(r + 1) * qw], 1.0, bq);
                    axpy(&mut k[r * kvw..(r + 1) * kvw], 1.0, bk);
                    axpy(&mut v[r * kvw..(r + 1) * kvw], 1.0, bv);
                }
            }
            if let Some(qn) = &a.q_norm {
                rms_norm(&mut q, qn, cfg.rms_norm_eps);
            }
            if let Some(kn) = &a.k_norm {
                rms_norm(&mut k, kn, cfg.rms_norm_eps);
            }
            for r in 0..t {
                let (c, s) = (
                    &cos[r * half..(r + 1) * half],
                    &sin[r * half..(r + 1) * half],
                );
                switchyard_kernels::rope::apply_with(&mut q[r * qw..(r + 1) * qw], d, c, s);
                switchyard_kernels::rope::apply_with(&mut k[r * kvw..(r + 1) * kvw], d, c, s);
            }
            for (r, &(ei, pos)) in row_pos.iter().enumerate() {
                kv.write(
                    li,
                    inputs[ei].table,
                    pos,
                    &k[r * kvw..(r + 1) * kvw],
                    &v[r * kvw..(r + 1) * kvw],
                );
            }
            let rows: Vec<QueryRow> = row_pos
                .iter()
                .map(|&(ei, pos)| QueryRow {
                    table: inputs[ei].table,
                    pos,
                })
                .collect();
            paged_attention(&q, &rows, kv.layer(li), params, &mut att);
            linear(&att, t, qw, a.o.weight(), h, &mut tmp);
            axpy(&mut hs, 1.0, &tmp);

            x.copy_from_slice(&hs);
            rms_norm(&mut x, &layer.ln2, cfg.rms_norm_eps);
            match &layer.ffn {
                Ffn::Dense(mlp) => mlp.forward(&x, t, &mut tmp),
                Ffn::Moe { router } => {
                    let e = cfg.num_experts;
                    let kk = cfg.experts_per_tok;
                    let mut logits = vec![0.0f32; t * e];
                    linear(&x, t, h, router.weight(), e, &mut logits);
                    let (ids, w) = moe::route(&logits, e, kk, cfg.norm_topk_prob);
                    for id in &ids {
                        out.expert_load[li * e + *id as usize] += 1;
                    }
                    let mut slots = vec![0.0f32; t * kk * h];
                    experts.run(li, &x, h, &ids, kk, &mut slots)?;
                    moe::combine(&slots, &w, kk, h, &mut tmp);
                    if record_routing {
                        out.routing.push(Routing {
                            layer: li,
                            ids,
                            weights: w,
                        });
                    }
                }
            }
            axpy(&mut hs, 1.0, &tmp);
        }
        // Final norm and lm_head on the rows that want logits.
        let sel = logit_rows(inputs);
        let mut xs = vec![0.0f32; sel.len() * h];
        for (i, &(r, _, _)) in sel.iter().enumerate() {
            xs[i * h..(i + 1) * h].copy_from_slice(&hs[r * h..(r + 1) * h]);
        }
        rms_norm(&mut xs, &self.norm, cfg.rms_norm_eps);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        out.logits = vec![0.0f32; sel.len() * cfg.vocab_size];
        linear(
            &xs,
            sel.len(),
            h,
            head.weight(),
            cfg.vocab_size,
            &mut out.logits,
        );
        out.logit_rows = sel.iter().map(|&(_, ei, pos)| (ei, pos)).collect();
        Ok(out)
    }
}
