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
    #[error("config.json: unsupported architecture {name:?} (supported: {list})", name = .0, list = crate::family::supported())]
    UnsupportedArch(String),
    #[error("config.json: field `{field}`: unsupported: {detail}")]
    Unsupported { field: String, detail: String },
    #[error("config.json: not valid JSON: {0}")]
    Json(String),
}

pub use crate::family::{
    Activation, Arch, AttentionSpec, ExpertSpec, MlaSpec, QkNorm, RouterSpec, SharedExpertSpec,
};

/// A validated model configuration: the shape every family shares, and the family's choice
/// of shared pieces (see [`crate::family`]).
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// Query/key head dimension (MLA: nope + rope dims).
    pub head_dim: usize,
    pub vocab_size: usize,
    /// Intermediate size of dense (non-MoE) MLP layers.
    pub intermediate_size: usize,
    /// Intermediate size of each expert.
    pub moe_intermediate_size: usize,
    pub num_experts: usize,
    pub experts_per_tok: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Dimensions rotated by rope.
    pub rope_dim: usize,
    pub max_position_embeddings: usize,
    /// Per layer: the sliding window, if the layer has one.
    pub windows: Vec<Option<usize>>,
    pub tie_word_embeddings: bool,
    pub attention: AttentionSpec,
    pub router: RouterSpec,
    pub experts: ExpertSpec,
    pub shared_expert: Option<SharedExpertSpec>,
    /// Per layer: true when the layer's MLP is a sparse MoE block.
    pub sparse_layers: Vec<bool>,
    /// Layers after the decoder's in the checkpoint (multi-token prediction), never loaded.
    pub skipped_layers: usize,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// Quantized weights, as released.
    pub quantization: Option<Quantization>,
}

/// How a checkpoint's weights are quantized (`quantization_config`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Quantization {
    /// FP8 e4m3 weights with an f32 `weight_scale_inv` per `block` (`weight_block_size`);
    /// activations stay unquantized (W8A16).
    Fp8 { block: [usize; 2] },
    /// MXFP4 routed experts (`*_blocks` + `*_scales`, W4A16) in the layers where `experts[l]`
    /// is set: those whose `model.layers.{l}.mlp.experts` no `modules_to_not_convert` entry
    /// covers (matched once, at parse). Everything else is unquantized, as in transformers,
    /// which quantizes only GPT-OSS's expert modules.
    Mxfp4 { experts: Vec<bool> },
}

impl Quantization {
    /// Whether layer `l`'s routed experts are stored in MXFP4.
    pub fn mxfp4_experts(&self, l: usize) -> bool {
        match self {
            Quantization::Fp8 { .. } => false,
            Quantization::Mxfp4 { experts } => experts.get(l).copied().unwrap_or(false),
        }
    }

    /// The FP8 block size, for FP8 checkpoints.
    pub fn fp8_block(&self) -> Option<[usize; 2]> {
        match self {
            Quantization::Fp8 { block } => Some(*block),
            Quantization::Mxfp4 { .. } => None,
        }
    }
}

/// Whether a `modules_to_not_convert` entry covers `module`, as transformers decides it: the
/// entry, a regular expression, matches from the start of the module's name up to a dotted
/// boundary (`"model.layers.1"` covers `model.layers.1.mlp`, not `model.layers.11`), or the
/// name ends with the entry as written. An entry that is not a valid expression is matched
/// only as a suffix (parsing refuses it first; see [`parse_mxfp4`]).
pub fn module_matches(pattern: &str, module: &str) -> bool {
    if module.ends_with(pattern) {
        return true;
    }
    let Ok(re) = regex::Regex::new(&format!("^(?:{pattern})$")) else {
        return false;
    };
    let b = module.as_bytes();
    (0..=b.len())
        .filter(|&p| p == b.len() || b[p] == b'.' || (p > 0 && b[p - 1] == b'.'))
        .any(|p| re.is_match(&module[..p]))
}

/// What one cached position holds per layer: `k_width` key floats and `v_width` value
/// floats. MLA caches only the latent and the rope key (`v_width` 0: values are read from
/// the latent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    pub k_width: usize,
    pub v_width: usize,
}

/// A JSON object with typed, field-naming accessors.
pub struct Obj<'a>(pub &'a serde_json::Map<String, Value>);

impl<'a> Obj<'a> {
    pub fn get(&self, f: &'static str) -> Option<&'a Value> {
        self.0.get(f).filter(|v| !v.is_null())
    }
    pub fn usize(&self, f: &'static str) -> Result<usize, ConfigError> {
        self.opt_usize(f)?.ok_or(ConfigError::Missing(f))
    }
    pub fn opt_usize(&self, f: &'static str) -> Result<Option<usize>, ConfigError> {
        match self.get(f) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| invalid(f, format!("expected a non-negative integer, got {v}"))),
        }
    }
    pub fn pos(&self, f: &'static str) -> Result<usize, ConfigError> {
        let v = self.usize(f)?;
        if v == 0 {
            return Err(invalid(f, "must be positive".into()));
        }
        Ok(v)
    }
    pub fn f64(&self, f: &'static str) -> Result<Option<f64>, ConfigError> {
        match self.get(f) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| invalid(f, format!("expected a number, got {v}"))),
        }
    }
    pub fn bool(&self, f: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(f) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| invalid(f, format!("expected a boolean, got {v}"))),
        }
    }
    pub fn str(&self, f: &'static str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(f) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| invalid(f, format!("expected a string, got {v}"))),
        }
    }
}

pub(crate) fn invalid(field: &str, detail: String) -> ConfigError {
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
        let family = match o.get("architectures") {
            Some(Value::Array(a)) if !a.is_empty() => {
                let name = a[0]
                    .as_str()
                    .ok_or_else(|| invalid("architectures", "expected strings".into()))?;
                crate::family::by_hf_name(name)
                    .ok_or_else(|| ConfigError::UnsupportedArch(name.into()))?
            }
            Some(_) => return Err(invalid("architectures", "expected a non-empty list".into())),
            None => match o.str("model_type")? {
                Some(t) => crate::family::by_model_type(t)
                    .ok_or_else(|| ConfigError::UnsupportedArch(t.into()))?,
                None => return Err(ConfigError::Missing("architectures")),
            },
        };
        // Refused by name rather than half-honoured: quantized layouts and non-attention
        // layer kinds change what the weights mean.
        let num_layers = o.pos("num_hidden_layers")?;
        let quantization = match o.get("quantization_config") {
            None => None,
            Some(q) => Some(parse_quantization(q, num_layers)?),
        };
        if let Some(Quantization::Mxfp4 { .. }) = quantization {
            if family.arch != Arch::GptOss {
                return Err(ConfigError::Unsupported {
                    field: "quantization_config.quant_method".into(),
                    detail: format!(
                        "\"mxfp4\" for {} (MXFP4 is read for GPT-OSS's fused experts)",
                        family.hf_name
                    ),
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
        let num_heads = o.pos("num_attention_heads")?;
        let num_kv_heads = o.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(invalid(
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
            ));
        }
        // Bounds far above any released model, so a corrupt or hostile config.json fails here
        // by name instead of overflowing a size computation or asking for terabytes later.
        for (field, v, max) in [
            ("hidden_size", hidden_size, 1 << 16),
            ("num_hidden_layers", num_layers, 1 << 10),
            ("num_attention_heads", num_heads, 1 << 10),
        ] {
            if v > max {
                return Err(invalid(
                    field,
                    format!("{v} is beyond any supported model (at most {max})"),
                ));
            }
        }
        let common = crate::family::Common {
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
        };
        let parts = (family.parse)(&o, &common)?;
        let head_dim = parts.head_dim;
        if head_dim == 0 || head_dim % 2 != 0 || head_dim > 512 {
            return Err(invalid(
                "head_dim",
                format!("must be even and in 2..=512, got {head_dim}"),
            ));
        }
        let vocab_size = o.pos("vocab_size")?;
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
        for (field, v, max) in [
            ("vocab_size", vocab_size, 1 << 22),
            ("intermediate_size", parts.intermediate_size, 1 << 20),
            (
                "moe_intermediate_size",
                parts.moe_intermediate_size,
                1 << 20,
            ),
            ("max_position_embeddings", max_position_embeddings, 1 << 24),
            (
                "shared_expert_intermediate_size",
                parts.shared_expert.map_or(0, |s| s.intermediate_size),
                1 << 20,
            ),
        ] {
            if v > max {
                return Err(invalid(
                    field,
                    format!("{v} is beyond any supported model (at most {max})"),
                ));
            }
        }
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
            arch: family.arch,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            intermediate_size: parts.intermediate_size,
            moe_intermediate_size: parts.moe_intermediate_size,
            num_experts: parts.num_experts,
            experts_per_tok: parts.experts_per_tok,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            rope_dim: parts.rope_dim,
            max_position_embeddings,
            windows: parts.windows,
            tie_word_embeddings: o.bool("tie_word_embeddings", false)?,
            attention: parts.attention,
            router: parts.router,
            experts: parts.experts,
            shared_expert: parts.shared_expert,
            sparse_layers: parts.sparse_layers,
            skipped_layers: parts.skipped_layers,
            eos_token_ids,
            bos_token_id,
            quantization,
        })
    }

    /// What one cached position holds per layer.
    pub fn kv_shape(&self) -> KvShape {
        match &self.attention {
            AttentionSpec::Gqa { .. } => KvShape {
                k_width: self.num_kv_heads * self.head_dim,
                v_width: self.num_kv_heads * self.head_dim,
            },
            AttentionSpec::Mla(m) => KvShape {
                k_width: m.kv_lora_rank + m.qk_rope_head_dim,
                v_width: 0,
            },
        }
    }

    /// Bytes the KV cache holds per token over all layers, at `elem_bytes` per element.
    pub fn kv_bytes_per_token(&self, elem_bytes: usize) -> usize {
        let s = self.kv_shape();
        self.num_layers * (s.k_width + s.v_width) * elem_bytes
    }
}

/// `quantization_config`: FP8 block-scaled (e4m3, dynamic activations) and MXFP4 are read as
/// released; any other method, format or scheme is refused naming the field.
fn parse_quantization(q: &Value, num_layers: usize) -> Result<Quantization, ConfigError> {
    let Some(m) = q.as_object() else {
        return Err(invalid(
            "quantization_config",
            format!("expected an object, got {q}"),
        ));
    };
    let o = Obj(m);
    let method = o.str("quant_method")?.unwrap_or("(none given)");
    if method == "mxfp4" {
        return parse_mxfp4(&o, num_layers);
    }
    if method != "fp8" {
        return Err(ConfigError::Unsupported {
            field: "quantization_config.quant_method".into(),
            detail: format!("{method:?} (supported: \"fp8\", \"mxfp4\")"),
        });
    }
    if let Some(f) = o.str("fmt")? {
        if f != "e4m3" {
            return Err(ConfigError::Unsupported {
                field: "quantization_config.fmt".into(),
                detail: format!("{f:?} (only \"e4m3\")"),
            });
        }
    }
    if let Some(s) = o.str("activation_scheme")? {
        if s != "dynamic" {
            return Err(ConfigError::Unsupported {
                field: "quantization_config.activation_scheme".into(),
                detail: format!("{s:?} (only \"dynamic\": activations are not quantized)"),
            });
        }
    }
    // transformers' FineGrainedFP8Config defaults to 128x128 blocks.
    let block = match o.get("weight_block_size") {
        None => [128, 128],
        Some(Value::Array(a)) if a.len() == 2 => {
            let mut b = [0usize; 2];
            for (i, v) in a.iter().enumerate() {
                b[i] = v
                    .as_u64()
                    .filter(|x| (1..=1 << 16).contains(x))
                    .ok_or_else(|| {
                        invalid(
                            "quantization_config.weight_block_size",
                            format!("{v} is not a block size in 1..=65536"),
                        )
                    })? as usize;
            }
            b
        }
        Some(other) => {
            return Err(invalid(
                "quantization_config.weight_block_size",
                format!("expected [rows, cols], got {other}"),
            ))
        }
    };
    Ok(Quantization::Fp8 { block })
}

/// MXFP4 (transformers' `Mxfp4Config`): `modules_to_not_convert` is honoured; `dequantize`
/// (widening at load) is refused, since the point of the layout is to stay 4-bit.
fn parse_mxfp4(o: &Obj<'_>, num_layers: usize) -> Result<Quantization, ConfigError> {
    if o.bool("dequantize", false)? {
        return Err(ConfigError::Unsupported {
            field: "quantization_config.dequantize".into(),
            detail: "true (MXFP4 experts are kept 4-bit and dequantized in the kernels)".into(),
        });
    }
    let not_converted = match o.get("modules_to_not_convert") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                let p = v.as_str().ok_or_else(|| {
                    invalid(
                        "quantization_config.modules_to_not_convert",
                        format!("expected module names, got {v}"),
                    )
                })?;
                regex::Regex::new(p).map_err(|e| {
                    invalid(
                        "quantization_config.modules_to_not_convert",
                        format!("{p:?} is not a valid pattern: {e}"),
                    )
                })?;
                Ok(p.to_string())
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(invalid(
                "quantization_config.modules_to_not_convert",
                format!("expected a list of module names, got {other}"),
            ))
        }
    };
    let experts = (0..num_layers)
        .map(|l| {
            let module = format!("model.layers.{l}.mlp.experts");
            !not_converted
                .iter()
                .any(|p: &String| module_matches(p, &module))
        })
        .collect();
    Ok(Quantization::Mxfp4 { experts })
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
