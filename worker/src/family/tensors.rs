//! Hugging Face tensor names and shapes, derived from a [`ModelConfig`] and its family's
//! [`Names`]: the one place the loaders, `gen-model` and the parameter counts read them from.

use super::{AttentionSpec, ExpertNames, QkNorm, RouterSpec};
use crate::config::ModelConfig;

/// How `gen-model` initialises a tensor (the fixtures' recipe).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// N(0, 1/fan_in)
    Matrix { fan_in: usize },
    /// N(0, 1)
    Embedding,
    /// 1 + N(0, 0.1)
    Norm,
    /// N(0, 0.1)
    Bias,
}

/// One tensor of a checkpoint.
#[derive(Clone, Debug)]
pub struct Decl {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    /// Routed-expert weights (of one expert, or of all of a layer's experts when fused).
    pub routed: Routed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routed {
    No,
    /// One expert's tensor.
    One,
    /// A tensor holding every expert of its layer.
    All,
}

/// The tensors of one routed expert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExpertTensors {
    /// gate, up, down (`[out, in]` each).
    Separate([String; 3]),
    /// Fused over experts; expert `e` is index `e` of the first axis.
    Fused {
        gate_up: String,
        gate_up_bias: String,
        down: String,
        down_bias: String,
    },
}

pub fn layer(l: usize) -> String {
    format!("model.layers.{l}")
}

pub fn attn(l: usize) -> String {
    format!("model.layers.{l}.self_attn")
}

impl ModelConfig {
    fn names(&self) -> &'static super::Names {
        &self.arch.family().names
    }

    /// `model.layers.{l}.{mlp}`.
    pub fn mlp_prefix(&self, l: usize) -> String {
        format!("model.layers.{l}.{}", self.names().mlp)
    }

    /// The router's weight, and its bias tensor if the family has one (GPT-OSS's logit bias,
    /// DeepSeek's `e_score_correction_bias`).
    pub fn router_tensors(&self, l: usize) -> (String, Option<String>) {
        let r = format!("{}.{}", self.mlp_prefix(l), self.names().router);
        let bias = match self.router {
            RouterSpec::TopkSoftmax => Some(format!("{r}.bias")),
            RouterSpec::SigmoidGrouped { .. } => Some(format!("{r}.e_score_correction_bias")),
            RouterSpec::Softmax { .. } => None,
        };
        (format!("{r}.weight"), bias)
    }

    /// The tensors of routed expert `e` of layer `l`.
    pub fn expert_tensors(&self, l: usize, e: usize) -> ExpertTensors {
        let p = format!("{}.experts", self.mlp_prefix(l));
        match &self.names().experts {
            ExpertNames::Separate { gate, up, down } => ExpertTensors::Separate([
                format!("{p}.{e}.{gate}.weight"),
                format!("{p}.{e}.{up}.weight"),
                format!("{p}.{e}.{down}.weight"),
            ]),
            ExpertNames::FusedInterleaved => ExpertTensors::Fused {
                gate_up: format!("{p}.gate_up_proj"),
                gate_up_bias: format!("{p}.gate_up_proj_bias"),
                down: format!("{p}.down_proj"),
                down_bias: format!("{p}.down_proj_bias"),
            },
        }
    }

    /// The shared expert's gate/up/down and its gate vector (when gated).
    pub fn shared_tensors(&self, l: usize) -> Option<([String; 3], Option<String>)> {
        let s = self.shared_expert?;
        let p = self.mlp_prefix(l);
        let n = self.names();
        let mlp = [
            format!("{p}.{}.gate_proj.weight", n.shared),
            format!("{p}.{}.up_proj.weight", n.shared),
            format!("{p}.{}.down_proj.weight", n.shared),
        ];
        Some((
            mlp,
            s.gated.then(|| format!("{p}.{}.weight", n.shared_gate)),
        ))
    }

    /// A dense layer's MLP.
    pub fn dense_tensors(&self, l: usize) -> [String; 3] {
        let p = self.mlp_prefix(l);
        [
            format!("{p}.gate_proj.weight"),
            format!("{p}.up_proj.weight"),
            format!("{p}.down_proj.weight"),
        ]
    }

    /// Every tensor of the checkpoint, in a stable order.
    pub fn tensors(&self) -> Vec<Decl> {
        let (h, nh, nkv, d) = (
            self.hidden_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        );
        let mut t = Vec::new();
        let mut push = |name: String, shape: Vec<usize>, init: Init, routed: Routed| {
            t.push(Decl {
                name,
                shape,
                init,
                routed,
            })
        };
        let mat = |out: usize, inp: usize| (vec![out, inp], Init::Matrix { fan_in: inp });
        let no = Routed::No;
        push(
            "model.embed_tokens.weight".into(),
            vec![self.vocab_size, h],
            Init::Embedding,
            no,
        );
        for l in 0..self.num_layers {
            let p = layer(l);
            push(
                format!("{p}.input_layernorm.weight"),
                vec![h],
                Init::Norm,
                no,
            );
            push(
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                Init::Norm,
                no,
            );
            let a = attn(l);
            match &self.attention {
                AttentionSpec::Gqa {
                    qkv_bias,
                    o_bias,
                    qk_norm,
                    sinks,
                } => {
                    for (n, out) in [("q", nh * d), ("k", nkv * d), ("v", nkv * d)] {
                        let (s, i) = mat(out, h);
                        push(format!("{a}.{n}_proj.weight"), s, i, no);
                        if *qkv_bias {
                            push(format!("{a}.{n}_proj.bias"), vec![out], Init::Bias, no);
                        }
                    }
                    let (s, i) = mat(h, nh * d);
                    push(format!("{a}.o_proj.weight"), s, i, no);
                    if *o_bias {
                        push(format!("{a}.o_proj.bias"), vec![h], Init::Bias, no);
                    }
                    let norms = match qk_norm {
                        QkNorm::None => None,
                        QkNorm::PerHead => Some((d, d)),
                        QkNorm::Full => Some((nh * d, nkv * d)),
                    };
                    if let Some((qn, kn)) = norms {
                        push(format!("{a}.q_norm.weight"), vec![qn], Init::Norm, no);
                        push(format!("{a}.k_norm.weight"), vec![kn], Init::Norm, no);
                    }
                    if *sinks {
                        push(format!("{a}.sinks"), vec![nh], Init::Bias, no);
                    }
                }
                AttentionSpec::Mla(m) => {
                    let qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
                    match m.q_lora_rank {
                        Some(r) => {
                            let (s, i) = mat(r, h);
                            push(format!("{a}.q_a_proj.weight"), s, i, no);
                            push(format!("{a}.q_a_layernorm.weight"), vec![r], Init::Norm, no);
                            let (s, i) = mat(nh * qk, r);
                            push(format!("{a}.q_b_proj.weight"), s, i, no);
                        }
                        None => {
                            let (s, i) = mat(nh * qk, h);
                            push(format!("{a}.q_proj.weight"), s, i, no);
                        }
                    }
                    let (s, i) = mat(m.kv_lora_rank + m.qk_rope_head_dim, h);
                    push(format!("{a}.kv_a_proj_with_mqa.weight"), s, i, no);
                    push(
                        format!("{a}.kv_a_layernorm.weight"),
                        vec![m.kv_lora_rank],
                        Init::Norm,
                        no,
                    );
                    let (s, i) = mat(nh * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank);
                    push(format!("{a}.kv_b_proj.weight"), s, i, no);
                    let (s, i) = mat(h, nh * m.v_head_dim);
                    push(format!("{a}.o_proj.weight"), s, i, no);
                }
            }
            if self.sparse_layers[l] {
                let (e, mi) = (self.num_experts, self.moe_intermediate_size);
                let (rw, rb) = self.router_tensors(l);
                let (s, i) = mat(e, h);
                push(rw, s, i, no);
                if let Some(b) = rb {
                    push(b, vec![e], Init::Bias, no);
                }
                match &self.names().experts {
                    ExpertNames::Separate { .. } => {
                        for x in 0..e {
                            let ExpertTensors::Separate([g, u, dn]) = self.expert_tensors(l, x)
                            else {
                                unreachable!()
                            };
                            let one = Routed::One;
                            let (s, i) = mat(mi, h);
                            push(g, s.clone(), i, one);
                            push(u, s, i, one);
                            let (s, i) = mat(h, mi);
                            push(dn, s, i, one);
                        }
                    }
                    ExpertNames::FusedInterleaved => {
                        let ExpertTensors::Fused {
                            gate_up,
                            gate_up_bias,
                            down,
                            down_bias,
                        } = self.expert_tensors(l, 0)
                        else {
                            unreachable!()
                        };
                        let all = Routed::All;
                        push(gate_up, vec![e, h, 2 * mi], Init::Matrix { fan_in: h }, all);
                        push(gate_up_bias, vec![e, 2 * mi], Init::Bias, all);
                        push(down, vec![e, mi, h], Init::Matrix { fan_in: mi }, all);
                        push(down_bias, vec![e, h], Init::Bias, all);
                    }
                }
                if let Some(([g, u, dn], gate)) = self.shared_tensors(l) {
                    let si = self.shared_expert.expect("shared").intermediate_size;
                    let (s, i) = mat(si, h);
                    push(g, s.clone(), i, no);
                    push(u, s, i, no);
                    let (s, i) = mat(h, si);
                    push(dn, s, i, no);
                    if let Some(gn) = gate {
                        let (s, i) = mat(1, h);
                        push(gn, s, i, no);
                    }
                }
            } else {
                let [g, u, dn] = self.dense_tensors(l);
                let di = self.intermediate_size;
                let (s, i) = mat(di, h);
                push(g, s.clone(), i, no);
                push(u, s, i, no);
                let (s, i) = mat(h, di);
                push(dn, s, i, no);
            }
        }
        push("model.norm.weight".into(), vec![h], Init::Norm, no);
        if !self.tie_word_embeddings {
            let (s, i) = mat(self.vocab_size, h);
            push("lm_head.weight".into(), s, i, no);
        }
        t
    }

    /// Parameters in the checkpoint and active per token (embeddings and lm_head included).
    pub fn param_counts(&self) -> (u64, u64) {
        let (mut total, mut active) = (0u64, 0u64);
        let (k, e) = (self.experts_per_tok as u64, self.num_experts.max(1) as u64);
        for d in self.tensors() {
            let n: u64 = d.shape.iter().map(|&x| x as u64).product();
            total += n;
            active += match d.routed {
                Routed::No => n,
                // Each routed expert is active for k/E of the tokens.
                Routed::One | Routed::All => n * k / e,
            };
        }
        (total, active)
    }
}
