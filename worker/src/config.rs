//! Hugging Face `config.json` → [`ModelConfig`].
//!
//! Every field the forward pass depends on is read explicitly; a missing or malformed field,
//! an unknown architecture or an unsupported feature is a [`ConfigError`] that names the
//! field. Nothing is silently defaulted unless transformers defaults it the same way.

use serde_json::Value;
use switchyard_kernels::rope::RopeScaling;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config.json: missing field `{0}`")]
    Missing(&'static str),
    #[error("config.json: field `{field}` is invalid: {detail}")]
    Invalid { field: String, detail: String },
    #[error("config.json: unsupported architecture {0:?} (supported: Qwen3MoeForCausalLM, MixtralForCausalLM)")]
    UnsupportedArch(String),
    #[error("config.json: field `{field}`: unsupported: {detail}")]
    Unsupported { field: String, detail: String },
    #[error("config.json: not valid JSON: {0}")]
    Json(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Qwen3Moe,
    Mixtral,
}

impl Arch {
    pub fn hf_name(&self) -> &'static str {
        match self {
            Arch::Qwen3Moe => "Qwen3MoeForCausalLM",
            Arch::Mixtral => "MixtralForCausalLM",
        }
    }
}

/// A validated model configuration.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// Intermediate size of dense (non-MoE) MLP layers.
    pub intermediate_size: usize,
    /// Intermediate size of each expert.
    pub moe_intermediate_size: usize,
    pub num_experts: usize,
    pub experts_per_tok: usize,
    pub norm_topk_prob: bool,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    pub qk_norm: bool,
    pub attention_bias: bool,
    /// Per layer: true when the layer's MLP is a sparse MoE block.
    pub sparse_layers: Vec<bool>,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
}

struct Obj<'a>(&'a serde_json::Map<String, Value>);

impl<'a> Obj<'a> {
    fn get(&self, f: &'static str) -> Option<&'a Value> {
        self.0.get(f).filter(|v| !v.is_null())
    }
    fn usize(&self, f: &'static str) -> Result<usize, ConfigError> {
        self.opt_usize(f)?.ok_or(ConfigError::Missing(f))
    }
    fn opt_usize(&self, f: &'static str) -> Result<Option<usize>, ConfigError> {
        match self.get(f) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| invalid(f, format!("expected a non-negative integer, got {v}"))),
        }
    }
    fn pos(&self, f: &'static str) -> Result<usize, ConfigError> {
        let v = self.usize(f)?;
        if v == 0 {
            return Err(invalid(f, "must be positive".into()));
        }
        Ok(v)
    }
    fn f64(&self, f: &'static str) -> Result<Option<f64>, ConfigError> {
        match self.get(f) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| invalid(f, format!("expected a number, got {v}"))),
        }
    }
    fn bool(&self, f: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(f) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| invalid(f, format!("expected a boolean, got {v}"))),
        }
    }
    fn str(&self, f: &'static str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(f) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| invalid(f, format!("expected a string, got {v}"))),
        }
    }
}

fn invalid(field: &str, detail: String) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        detail,
    }
}

/// Reads token ids given as an integer or a list of integers.
pub fn token_ids(v: Option<&Value>, field: &str) -> Result<Vec<u32>, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(|x| vec![x as u32])
            .ok_or_else(|| invalid(field, format!("bad token id {n}"))),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_u64()
                    .map(|x| x as u32)
                    .ok_or_else(|| invalid(field, format!("bad token id {x}")))
            })
            .collect(),
        Some(other) => Err(invalid(
            field,
            format!("expected an integer or a list, got {other}"),
        )),
    }
}

impl ModelConfig {
    pub fn from_json_str(s: &str) -> Result<Self, ConfigError> {
        let v: Value = serde_json::from_str(s).map_err(|e| ConfigError::Json(e.to_string()))?;
        Self::from_json(&v)
    }

    pub fn from_json(v: &Value) -> Result<Self, ConfigError> {
        let map = v
            .as_object()
            .ok_or_else(|| ConfigError::Json("top level is not an object".into()))?;
        let o = Obj(map);
        let arch_name = match o.get("architectures") {
            Some(Value::Array(a)) if !a.is_empty() => a[0]
                .as_str()
                .ok_or_else(|| invalid("architectures", "expected strings".into()))?
                .to_string(),
            Some(_) => return Err(invalid("architectures", "expected a non-empty list".into())),
            None => match o.str("model_type")? {
                Some("qwen3_moe") => "Qwen3MoeForCausalLM".into(),
                Some("mixtral") => "MixtralForCausalLM".into(),
                Some(other) => return Err(ConfigError::UnsupportedArch(other.into())),
                None => return Err(ConfigError::Missing("architectures")),
            },
        };
        let arch = match arch_name.as_str() {
            "Qwen3MoeForCausalLM" => Arch::Qwen3Moe,
            "MixtralForCausalLM" => Arch::Mixtral,
            other => return Err(ConfigError::UnsupportedArch(other.into())),
        };
        // Refused by name rather than half-honoured: quantized layouts and non-attention
        // layer kinds change what the weights mean.
        if let Some(q) = o.get("quantization_config") {
            let method = q
                .get("quant_method")
                .and_then(Value::as_str)
                .unwrap_or("(none given)");
            return Err(ConfigError::Unsupported {
                field: "quantization_config.quant_method".into(),
                detail: format!("{method:?}: quantized checkpoints are not supported yet"),
            });
        }
        if let Some(Value::Array(kinds)) = o.get("layer_types") {
            if let Some(k) = kinds
                .iter()
                .find(|k| !matches!(k.as_str(), Some("full_attention" | "sliding_attention")))
            {
                return Err(ConfigError::Unsupported {
                    field: "layer_types".into(),
                    detail: format!("layer kind {k} (only full and sliding attention)"),
                });
            }
            // One kind for every layer is what the model runs today (sliding when
            // sliding_window is set); a per-layer mix would be silently mis-run.
            if kinds.windows(2).any(|w| w[0] != w[1]) {
                return Err(ConfigError::Unsupported {
                    field: "layer_types".into(),
                    detail: "attention kinds that differ between layers".into(),
                });
            }
        }
        if let Some(act) = o.str("hidden_act")? {
            if act != "silu" {
                return Err(ConfigError::Unsupported {
                    field: "hidden_act".into(),
                    detail: format!("{act:?} (only \"silu\")"),
                });
            }
        }
        let hidden_size = o.pos("hidden_size")?;
        let num_layers = o.pos("num_hidden_layers")?;
        let num_heads = o.pos("num_attention_heads")?;
        let num_kv_heads = o.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(invalid(
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
            ));
        }
        let head_dim = match o.opt_usize("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(invalid(
                        "hidden_size",
                        "not divisible by num_attention_heads and no head_dim given".into(),
                    ));
                }
                hidden_size / num_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 || head_dim > 512 {
            return Err(invalid(
                "head_dim",
                format!("must be even and in 2..=512, got {head_dim}"),
            ));
        }
        let vocab_size = o.pos("vocab_size")?;
        let intermediate_size = o.pos("intermediate_size")?;
        let (num_experts, moe_intermediate_size, norm_topk_prob, qk_norm, expert_key) = match arch {
            Arch::Qwen3Moe => (
                o.usize("num_experts")?,
                o.pos("moe_intermediate_size")?,
                o.bool("norm_topk_prob", false)?,
                true,
                "num_experts",
            ),
            Arch::Mixtral => (
                o.usize("num_local_experts")?,
                intermediate_size,
                true,
                false,
                "num_local_experts",
            ),
        };
        if num_experts > 128 {
            return Err(ConfigError::Unsupported {
                field: expert_key.into(),
                detail: format!("{num_experts} experts (at most 128)"),
            });
        }
        let experts_per_tok = o.usize("num_experts_per_tok")?;
        if num_experts > 0
            && (experts_per_tok == 0 || experts_per_tok > num_experts || experts_per_tok > 64)
        {
            return Err(invalid(
                "num_experts_per_tok",
                format!("{experts_per_tok} is not in 1..={}", num_experts.min(64)),
            ));
        }
        let rms_norm_eps = o
            .f64("rms_norm_eps")?
            .ok_or(ConfigError::Missing("rms_norm_eps"))? as f32;
        if !(rms_norm_eps > 0.0) {
            return Err(invalid("rms_norm_eps", "must be positive".into()));
        }
        let max_position_embeddings = o.pos("max_position_embeddings")?;
        // transformers 5 may nest rope settings under rope_parameters.
        let rope_params = o.get("rope_parameters").and_then(|v| v.as_object());
        let rope_theta = match rope_params
            .and_then(|p| p.get("rope_theta"))
            .and_then(|v| v.as_f64())
        {
            Some(t) => t,
            None => o.f64("rope_theta")?.unwrap_or(10000.0),
        };
        if !(rope_theta > 0.0) {
            return Err(invalid("rope_theta", "must be positive".into()));
        }
        let scaling_obj = match o.get("rope_scaling") {
            Some(Value::Object(m)) => Some(m),
            Some(other) => {
                return Err(invalid(
                    "rope_scaling",
                    format!("expected an object or null, got {other}"),
                ))
            }
            None => rope_params,
        };
        let rope_scaling = parse_rope_scaling(scaling_obj, max_position_embeddings)?;
        let sliding_window = match arch {
            Arch::Mixtral => o.opt_usize("sliding_window")?,
            Arch::Qwen3Moe => {
                if o.bool("use_sliding_window", false)? {
                    return Err(ConfigError::Unsupported {
                        field: "use_sliding_window".into(),
                        detail: "sliding-window attention for Qwen3-MoE (max_window_layers) is not implemented".into(),
                    });
                }
                None
            }
        };
        if sliding_window == Some(0) {
            return Err(invalid("sliding_window", "must be positive".into()));
        }
        let attention_bias = match arch {
            Arch::Qwen3Moe => o.bool("attention_bias", false)?,
            Arch::Mixtral => false,
        };
        // Bounds far above any released model, so a corrupt or hostile config.json fails here
        // by name instead of overflowing a size computation or asking for terabytes later.
        for (field, v, max) in [
            ("hidden_size", hidden_size, 1 << 16),
            ("num_hidden_layers", num_layers, 1 << 10),
            ("num_attention_heads", num_heads, 1 << 10),
            ("vocab_size", vocab_size, 1 << 22),
            ("intermediate_size", intermediate_size, 1 << 20),
            ("moe_intermediate_size", moe_intermediate_size, 1 << 20),
            ("max_position_embeddings", max_position_embeddings, 1 << 24),
        ] {
            if v > max {
                return Err(invalid(
                    field,
                    format!("{v} is beyond any supported model (at most {max})"),
                ));
            }
        }
        let sparse_layers = match arch {
            Arch::Mixtral => vec![num_experts > 0; num_layers],
            Arch::Qwen3Moe => {
                let step = o.opt_usize("decoder_sparse_step")?.unwrap_or(1);
                if step == 0 {
                    return Err(invalid("decoder_sparse_step", "must be positive".into()));
                }
                let only: Vec<usize> = match o.get("mlp_only_layers") {
                    None => vec![],
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|x| {
                            x.as_u64().map(|x| x as usize).ok_or_else(|| {
                                invalid("mlp_only_layers", format!("bad layer index {x}"))
                            })
                        })
                        .collect::<Result<_, _>>()?,
                    Some(other) => {
                        return Err(invalid(
                            "mlp_only_layers",
                            format!("expected a list, got {other}"),
                        ))
                    }
                };
                (0..num_layers)
                    .map(|l| !only.contains(&l) && num_experts > 0 && (l + 1) % step == 0)
                    .collect()
            }
        };
        let eos_token_ids = token_ids(o.get("eos_token_id"), "eos_token_id")?;
        let bos_token_id = token_ids(o.get("bos_token_id"), "bos_token_id")?
            .first()
            .copied();
        for (field, id) in eos_token_ids
            .iter()
            .map(|&t| ("eos_token_id", t))
            .chain(bos_token_id.map(|t| ("bos_token_id", t)))
        {
            if id as usize >= vocab_size {
                return Err(invalid(
                    field,
                    format!("token id {id} is outside the vocabulary (vocab_size {vocab_size})"),
                ));
            }
        }
        Ok(ModelConfig {
            arch,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            intermediate_size,
            moe_intermediate_size,
            num_experts,
            experts_per_tok,
            norm_topk_prob,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            sliding_window,
            tie_word_embeddings: o.bool("tie_word_embeddings", false)?,
            qk_norm,
            attention_bias,
            sparse_layers,
            eos_token_ids,
            bos_token_id,
        })
    }

    /// Parameters in the checkpoint and active per token (embeddings and lm_head included).
    pub fn param_counts(&self) -> (u64, u64) {
        let h = self.hidden_size as u64;
        let attn = h * (self.num_heads * self.head_dim) as u64 * 2
            + h * (self.num_kv_heads * self.head_dim) as u64 * 2;
        let expert = 3 * h * self.moe_intermediate_size as u64;
        let dense = 3 * h * self.intermediate_size as u64;
        let embed = self.vocab_size as u64 * h * if self.tie_word_embeddings { 1 } else { 2 };
        let (mut total, mut active) = (embed, embed);
        for &sparse in &self.sparse_layers {
            let base = attn + 2 * h;
            if sparse {
                let router = h * self.num_experts as u64;
                total += base + router + expert * self.num_experts as u64;
                active += base + router + expert * self.experts_per_tok as u64;
            } else {
                total += base + dense;
                active += base + dense;
            }
        }
        (total, active)
    }
}

fn parse_rope_scaling(
    m: Option<&serde_json::Map<String, Value>>,
    max_pos: usize,
) -> Result<RopeScaling, ConfigError> {
    let Some(m) = m else {
        return Ok(RopeScaling::Default);
    };
    let o = Obj(m);
    let kind = o.str("rope_type")?.or(o.str("type")?).unwrap_or("default");
    let factor = || -> Result<f32, ConfigError> {
        let f = o
            .f64("factor")?
            .ok_or(ConfigError::Missing("rope_scaling.factor"))?;
        if !(f >= 1.0) {
            return Err(invalid(
                "rope_scaling.factor",
                format!("must be >= 1, got {f}"),
            ));
        }
        Ok(f as f32)
    };
    match kind {
        "default" => Ok(RopeScaling::Default),
        "linear" => Ok(RopeScaling::Linear { factor: factor()? }),
        "yarn" => {
            let orig = o.opt_usize("original_max_position_embeddings")?;
            if orig == Some(0) {
                return Err(invalid(
                    "rope_scaling.original_max_position_embeddings",
                    "must be positive".into(),
                ));
            }
            // transformers 5: an absent factor is the context extension ratio.
            let factor = match (o.f64("factor")?, orig) {
                (None, Some(orig)) => {
                    let f = max_pos as f64 / orig as f64;
                    if f < 1.0 {
                        return Err(invalid(
                            "rope_scaling.original_max_position_embeddings",
                            format!("{orig} exceeds max_position_embeddings {max_pos}"),
                        ));
                    }
                    f as f32
                }
                _ => factor()?,
            };
            // `beta_fast or 32`: zero means the default, as in transformers.
            let nonzero = |v: Option<f64>, d: f64| v.filter(|x| *x != 0.0).unwrap_or(d) as f32;
            Ok(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: orig,
                beta_fast: nonzero(o.f64("beta_fast")?, 32.0),
                beta_slow: nonzero(o.f64("beta_slow")?, 1.0),
                attention_factor: o.f64("attention_factor")?.map(|v| v as f32),
                mscale: o.f64("mscale")?.map(|v| v as f32),
                mscale_all_dim: o.f64("mscale_all_dim")?.map(|v| v as f32),
                truncate: o.bool("truncate", true)?,
            })
        }
        other => Err(ConfigError::Unsupported {
            field: "rope_scaling.rope_type".into(),
            detail: format!("{other:?} (supported: default, linear, yarn)"),
        }),
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// JSON values of every kind a hostile or corrupt config.json could hold.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (0u64..4096).prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            "[a-z_]{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(2, 8, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn base() -> Value {
        crate::presets::preset("tiny").expect("tiny preset")
    }

    /// Found by `fuzz_config_fields`: a huge layer count used to size the layer table before
    /// any bound was checked (an allocation of exabytes).
    #[test]
    fn a_huge_layer_count_is_refused_by_name() {
        let mut v = base();
        v["num_hidden_layers"] = serde_json::json!(8988355094638496528u64);
        match ModelConfig::from_json(&v) {
            Err(ConfigError::Invalid { field, .. }) => assert_eq!(field, "num_hidden_layers"),
            other => panic!("{other:?}"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases()))]

        /// A real config with fields replaced by arbitrary values parses or fails by name,
        /// never panics; what parses satisfies the invariants the model code relies on.
        #[test]
        fn fuzz_config_fields(edits in prop::collection::vec((0usize..64, any_json()), 1..6)) {
            let mut v = base();
            let keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            for (k, val) in edits {
                let key = keys[k % keys.len()].clone();
                v[key] = val;
            }
            if let Ok(c) = ModelConfig::from_json(&v) {
                prop_assert!(c.head_dim > 0 && c.head_dim % 2 == 0);
                prop_assert!(c.num_kv_heads > 0 && c.num_heads % c.num_kv_heads == 0);
                prop_assert_eq!(c.sparse_layers.len(), c.num_layers);
                prop_assert!(c.num_experts == 0 || (1..=c.num_experts).contains(&c.experts_per_tok));
                prop_assert!(c.eos_token_ids.iter().all(|&t| (t as usize) < c.vocab_size));
                prop_assert!(c.hidden_size <= 1 << 16 && c.vocab_size <= 1 << 22);
            }
        }

        /// Arbitrary text: a config or an error.
        #[test]
        fn fuzz_config_text(s in "\\PC{0,200}") {
            let _ = ModelConfig::from_json_str(&s);
        }
    }
}
