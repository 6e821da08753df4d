//! The decoder forward pass every family shares, over a batch of sequence chunks.
//!
//! A step is a list of [`ForwardInput`]s: each feeds consecutive tokens of one sequence starting
//! at `start_pos` (a whole prompt, a prefill chunk, or one decode token). All rows of all
//! entries go through every layer together; attention reads each row's own sequence through
//! its block table, so batching never mixes sequences. Keys and values of every row are written
//! to the cache before attention runs, so a chunk attends to itself causally.
//!
//! Every family is a pre-norm residual decoder: `h += attn(norm(h))`, `h += ffn(norm(h))`,
//! with the pieces ([`crate::layers`]) its config chose. The model holds the dense weights
//! (embeddings, attention, norms, routers, shared experts, dense MLPs, lm_head); routed experts
//! are reached through [`ExpertExec`].

#[cfg(feature = "cuda")]
#[path = "cuda_model.rs"]
pub mod cuda;

use crate::config::ModelConfig;
use crate::experts::ExpertExec;
use crate::kv::KvCache;
pub(crate) use crate::layers::{Attention, Ffn};
use crate::layers::{RopeRows, StepRows};
use crate::weights::{Checkpoint, Tensor, WeightDType};
use crate::WorkerError;
use switchyard_kernels::attention::QueryRow;
use switchyard_kernels::norm::rms_norm;
use switchyard_kernels::rope::Rope;
use switchyard_kernels::{axpy, linear};

pub(crate) struct Layer {
    pub(crate) ln1: Vec<f32>,
    pub(crate) ln2: Vec<f32>,
    pub(crate) attn: Attention,
    pub(crate) ffn: Ffn,
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
    pub seq_id: u64,
    pub tokens: &'a [u32],
    pub start_pos: usize,
    pub table: &'a [u32],
    pub logits: Logits,
    /// Ranges of the sequence held on other ranks (context parallelism; empty: all here).
    pub remote: &'a [crate::context::Span],
}

/// The context exchange of a step: the group's all-to-all and the ranges of other ranks'
/// sequences held here.
#[derive(Clone, Copy)]
pub struct ContextExchange<'a> {
    pub comm: &'a crate::comm::Comm,
    pub guests: &'a std::collections::HashMap<(u64, usize), crate::context::Guest>,
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
    pub(crate) embed: Tensor,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Vec<f32>,
    pub(crate) lm_head: Option<Tensor>,
    pub(crate) rope: Rope,
}

impl Model {
    /// Loads the dense weights (everything except the routed experts).
    pub fn load(
        ck: &Checkpoint,
        cfg: &ModelConfig,
        dtype: WeightDType,
    ) -> Result<Self, WorkerError> {
        let h = cfg.hidden_size;
        let embed = ck.matrix("model.embed_tokens.weight", &[cfg.vocab_size, h], dtype)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = crate::family::tensors::layer(l);
            layers.push(Layer {
                ln1: ck.vector(&format!("{p}.input_layernorm.weight"), &[h])?,
                ln2: ck.vector(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                attn: Attention::load(ck, cfg, l, dtype)?,
                ffn: Ffn::load(ck, cfg, l, dtype)?,
            });
            crate::weights::return_free_memory();
        }
        if cfg.skipped_layers > 0 {
            tracing::info!(
                layers = cfg.skipped_layers,
                first = cfg.num_layers,
                "skipping multi-token-prediction layers (num_nextn_predict_layers): not part of the decoder"
            );
        }
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(ck.matrix("lm_head.weight", &[cfg.vocab_size, h], dtype)?)
        };
        let rope = Rope::new(
            cfg.rope_dim,
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

    /// Bytes of the embedding table (a decoded token reads one row of it).
    pub fn embed_nbytes(&self) -> usize {
        self.embed.nbytes()
    }

    /// Bytes of dense weights held.
    pub fn nbytes(&self) -> usize {
        let mut n = self.embed.nbytes() + self.lm_head.as_ref().map_or(0, |t| t.nbytes());
        for l in &self.layers {
            n += l.attn.nbytes() + l.ffn.nbytes();
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
        exchange: Option<ContextExchange<'_>>,
    ) -> Result<ForwardOutput, WorkerError> {
        let cfg = &self.cfg;
        let h = cfg.hidden_size;
        let t: usize = inputs.iter().map(|i| i.tokens.len()).sum();
        let mut out = ForwardOutput {
            expert_load: vec![0; cfg.num_layers * cfg.num_experts],
            ..Default::default()
        };
        // No early return when t == 0: a rank with no tokens still joins every layer's
        // expert exchange.
        let mut rows = Vec::with_capacity(t);
        for inp in inputs {
            for j in 0..inp.tokens.len() {
                rows.push(QueryRow {
                    table: inp.table,
                    pos: inp.start_pos + j,
                });
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
        let half = cfg.rope_dim / 2;
        let mut cos = vec![0.0f32; t * half];
        let mut sin = vec![0.0f32; t * half];
        for (r, row) in rows.iter().enumerate() {
            self.rope.cos_sin(
                row.pos,
                &mut cos[r * half..(r + 1) * half],
                &mut sin[r * half..(r + 1) * half],
            );
        }
        let cp = exchange.map(|x| crate::context::CpStep {
            comm: x.comm,
            rows: inputs
                .iter()
                .flat_map(|i| std::iter::repeat_n((i.seq_id, i.remote), i.tokens.len()))
                .collect(),
            guests: x.guests,
        });
        let step = StepRows {
            rows,
            rope: RopeRows {
                cos: &cos,
                sin: &sin,
                half,
            },
            cp,
        };
        let mut x = vec![0.0f32; t * h];
        let mut tmp = vec![0.0f32; t * h];
        for (li, layer) in self.layers.iter().enumerate() {
            x.copy_from_slice(&hs);
            rms_norm(&mut x, &layer.ln1, cfg.rms_norm_eps);
            layer.attn.forward(cfg, li, &x, &step, kv, &mut tmp)?;
            axpy(&mut hs, 1.0, &tmp);

            x.copy_from_slice(&hs);
            rms_norm(&mut x, &layer.ln2, cfg.rms_norm_eps);
            if let Some(r) = layer.ffn.forward(cfg, li, &x, t, experts, &mut tmp)? {
                let e = cfg.num_experts;
                for id in &r.ids {
                    out.expert_load[li * e + *id as usize] += 1;
                }
                if record_routing {
                    out.routing.push(Routing {
                        layer: li,
                        ids: r.ids,
                        weights: r.weights,
                    });
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
