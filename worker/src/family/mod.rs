//! Model families: one module per family, each declaring its `config.json` fields, its tensor
//! names and how its layers compose the shared pieces; [`REGISTRY`] maps `architectures` to
//! them.
//!
//! The shared pieces are described here as plain data ([`AttentionSpec`], [`RouterSpec`],
//! [`ExpertSpec`], [`SharedExpertSpec`], per-layer windows and dense/sparse layers) and
//! implemented once in [`crate::model`]; a family only chooses among them. Adding a family
//! touches its module, the registry and its fixture.
//!
//! Invariants of a parsed [`Parts`]: per-layer vectors are `num_hidden_layers` long; a sparse
//! layer exists only when the family has experts; every size the forward pass multiplies by
//! is positive and bounded.

pub mod deepseek_v3;
pub mod gpt_oss;
pub mod llama;
pub mod mixtral;
pub mod olmoe;
pub mod qwen2_moe;
pub mod qwen3_moe;
pub mod tensors;

use crate::config::{invalid, ConfigError, Obj};
use serde_json::Value;

/// The families Switchyard runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Qwen3Moe,
    Mixtral,
    Qwen2Moe,
    Olmoe,
    DeepseekV3,
    GptOss,
    /// Dense: no experts.
    Llama,
}

/// A family: its names in `config.json`, its tensor names and its config parser.
pub struct Family {
    pub arch: Arch,
    /// The `architectures` entry.
    pub hf_name: &'static str,
    /// The `model_type`, for configs without `architectures`.
    pub model_type: &'static str,
    pub names: Names,
    /// Reads the family's own fields.
    pub parse: fn(&Obj<'_>, &Common) -> Result<Parts, ConfigError>,
}

/// Every family, in the order error messages list them.
pub static REGISTRY: &[&Family] = &[
    &qwen3_moe::FAMILY,
    &mixtral::FAMILY,
    &qwen2_moe::FAMILY,
    &olmoe::FAMILY,
    &deepseek_v3::FAMILY,
    &gpt_oss::FAMILY,
    &llama::FAMILY,
];

impl Arch {
    pub fn family(&self) -> &'static Family {
        REGISTRY
            .iter()
            .find(|f| f.arch == *self)
            .expect("every arch is registered")
    }
    pub fn hf_name(&self) -> &'static str {
        self.family().hf_name
    }
}

/// The family named by an `architectures` entry.
pub fn by_hf_name(name: &str) -> Option<&'static Family> {
    REGISTRY.iter().copied().find(|f| f.hf_name == name)
}

/// The family of a `model_type`.
pub fn by_model_type(name: &str) -> Option<&'static Family> {
    REGISTRY.iter().copied().find(|f| f.model_type == name)
}

/// The supported `architectures` names, comma-separated.
pub fn supported() -> String {
    REGISTRY
        .iter()
        .map(|f| f.hf_name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where a family keeps its MoE tensors, under `model.layers.{l}.{mlp}`.
#[derive(Debug)]
pub struct Names {
    /// The MLP block: `mlp` or `block_sparse_moe`.
    pub mlp: &'static str,
    /// The router under the block: `gate` or `router`.
    pub router: &'static str,
    pub experts: ExpertNames,
    /// The shared expert under the block (`shared_expert`, `shared_experts`), if any.
    pub shared: &'static str,
    /// Its sigmoid gate (`shared_expert_gate`), if gated.
    pub shared_gate: &'static str,
}

impl Names {
    /// The layout most families use: `mlp.gate`, `mlp.experts.{e}.{gate,up,down}_proj`, no
    /// shared expert.
    pub const STANDARD: Names = Names {
        mlp: "mlp",
        router: "gate",
        experts: ExpertNames::Separate {
            gate: "gate_proj",
            up: "up_proj",
            down: "down_proj",
        },
        shared: "",
        shared_gate: "",
    };
}

#[derive(Debug)]
pub enum ExpertNames {
    /// `experts.{e}.{gate|up|down}.weight`, each `[out, in]`.
    Separate {
        gate: &'static str,
        up: &'static str,
        down: &'static str,
    },
    /// `experts.gate_up_proj` `[E, hidden, 2·inter]` with gate and up interleaved along the
    /// last axis, `experts.down_proj` `[E, inter, hidden]` (both `x @ W`), and `_bias` twins.
    FusedInterleaved,
}

/// What every family shares, read before the family's own fields.
#[derive(Clone, Debug)]
pub struct Common {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
}

/// Query/key normalisation of standard attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// One `[head_dim]` RMSNorm applied to every head (Qwen3).
    PerHead,
    /// One RMSNorm over the whole projection (`[heads · head_dim]`, OLMoE).
    Full,
}

/// Multi-head latent attention (DeepSeek-V2/V3, Kimi K2).
#[derive(Clone, Debug, PartialEq)]
pub struct MlaSpec {
    /// Rank of the query compression; `None` projects queries directly (`q_proj`).
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// Rotary pairs interleaved (`rope_interleave`).
    pub interleave: bool,
    /// `qk_head_dim^-0.5`, times YaRN's `mscale_all_dim` correction squared.
    pub softmax_scale: f32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum AttentionSpec {
    /// Grouped-query attention.
    Gqa {
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: QkNorm,
        /// A learned sink logit per head (GPT-OSS).
        sinks: bool,
    },
    Mla(MlaSpec),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RouterSpec {
    /// Softmax over all experts, then top-k (renormalised when `norm_topk_prob`).
    Softmax { renormalize: bool },
    /// Sigmoid scores with `e_score_correction_bias`, group-limited top-k, scaled weights.
    SigmoidGrouped {
        n_group: usize,
        topk_group: usize,
        renormalize: bool,
        scaling: f32,
    },
    /// Router with a bias; top-k logits, softmax over those k (GPT-OSS).
    TopkSoftmax,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// `silu(gate) · up`.
    Silu,
    /// GPT-OSS: `gate = min(gate, limit)`, `up = clamp(up, ±limit)`,
    /// `(up + 1) · gate · sigmoid(alpha · gate)`.
    ClampedSwiglu { alpha: f32, limit: f32 },
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExpertSpec {
    pub act: Activation,
    /// Biases on the gate, up and down projections.
    pub bias: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SharedExpertSpec {
    pub intermediate_size: usize,
    /// Scaled by `sigmoid(x · shared_expert_gate)` (Qwen2-MoE).
    pub gated: bool,
}

/// A family's reading of its own fields.
#[derive(Clone, Debug)]
pub struct Parts {
    pub head_dim: usize,
    /// Intermediate size of dense layers.
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_experts: usize,
    pub experts_per_tok: usize,
    pub attention: AttentionSpec,
    pub router: RouterSpec,
    pub experts: ExpertSpec,
    pub shared_expert: Option<SharedExpertSpec>,
    pub sparse_layers: Vec<bool>,
    pub windows: Vec<Option<usize>>,
    /// Dimensions rotated by rope (the head dim, or MLA's rope part).
    pub rope_dim: usize,
    /// Trailing layers in the checkpoint that are not part of the decoder (DeepSeek's
    /// multi-token-prediction layers), skipped at load.
    pub skipped_layers: usize,
}

/// `head_dim`, or `hidden_size / num_attention_heads` when absent.
pub(crate) fn head_dim(o: &Obj<'_>, c: &Common) -> Result<usize, ConfigError> {
    match o.opt_usize("head_dim")? {
        Some(d) => Ok(d),
        None => {
            if c.hidden_size % c.num_heads != 0 {
                return Err(invalid(
                    "hidden_size",
                    "not divisible by num_attention_heads and no head_dim given".into(),
                ));
            }
            Ok(c.hidden_size / c.num_heads)
        }
    }
}

/// A list of layer indices (`mlp_only_layers`).
pub(crate) fn layer_list(o: &Obj<'_>, field: &'static str) -> Result<Vec<usize>, ConfigError> {
    match o.get(field) {
        None => Ok(vec![]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| invalid(field, format!("bad layer index {x}")))
            })
            .collect(),
        Some(other) => Err(invalid(field, format!("expected a list, got {other}"))),
    }
}

/// Qwen's layout: sparse every `decoder_sparse_step` layers, except `mlp_only_layers`.
pub(crate) fn sparse_by_step(
    o: &Obj<'_>,
    layers: usize,
    num_experts: usize,
) -> Result<Vec<bool>, ConfigError> {
    let step = o.opt_usize("decoder_sparse_step")?.unwrap_or(1);
    if step == 0 {
        return Err(invalid("decoder_sparse_step", "must be positive".into()));
    }
    let only = layer_list(o, "mlp_only_layers")?;
    Ok((0..layers)
        .map(|l| !only.contains(&l) && num_experts > 0 && (l + 1) % step == 0)
        .collect())
}

/// Per-layer windows from `layer_types` (`sliding_attention` layers use `sliding_window`);
/// without `layer_types`, every layer gets `all`.
pub(crate) fn layer_windows(
    o: &Obj<'_>,
    layers: usize,
    all: Option<usize>,
) -> Result<Vec<Option<usize>>, ConfigError> {
    let Some(kinds) = o.get("layer_types") else {
        return Ok(vec![all; layers]);
    };
    let Value::Array(kinds) = kinds else {
        return Err(invalid(
            "layer_types",
            format!("expected a list, got {kinds}"),
        ));
    };
    if kinds.len() != layers {
        return Err(invalid(
            "layer_types",
            format!("{} entries for {layers} layers", kinds.len()),
        ));
    }
    kinds
        .iter()
        .map(|k| match k.as_str() {
            Some("full_attention") => Ok(None),
            Some("sliding_attention") => match o.opt_usize("sliding_window")? {
                Some(w) if w > 0 => Ok(Some(w)),
                _ => Err(invalid(
                    "sliding_window",
                    "sliding_attention layers need a positive sliding_window".into(),
                )),
            },
            _ => Err(ConfigError::Unsupported {
                field: "layer_types".into(),
                detail: format!("layer kind {k} (only full and sliding attention)"),
            }),
        })
        .collect()
}

/// The routed-expert count and top-k, checked.
pub(crate) fn experts(o: &Obj<'_>, key: &'static str) -> Result<(usize, usize), ConfigError> {
    let n = o.usize(key)?;
    if n > 1 << 14 {
        return Err(invalid(
            key,
            format!("{n} experts is beyond any supported model"),
        ));
    }
    let k = o.usize("num_experts_per_tok")?;
    if n > 0 && (k == 0 || k > n || k > 64) {
        return Err(invalid(
            "num_experts_per_tok",
            format!("{k} is not in 1..={}", n.min(64)),
        ));
    }
    Ok((n, k))
}

/// Qwen's `use_sliding_window` (windows from `max_window_layers`) is not implemented.
pub(crate) fn refuse_qwen_sliding_window(o: &Obj<'_>) -> Result<(), ConfigError> {
    refuse_if(
        o.bool("use_sliding_window", false)?,
        "use_sliding_window",
        "sliding-window attention for Qwen MoE (max_window_layers) is not implemented",
    )
}

/// Refuses a field that changes the arithmetic in a way not implemented, when it is set to
/// anything but its neutral value.
pub(crate) fn refuse_if(cond: bool, field: &'static str, detail: &str) -> Result<(), ConfigError> {
    if cond {
        return Err(ConfigError::Unsupported {
            field: field.into(),
            detail: detail.into(),
        });
    }
    Ok(())
}
