//! Random-initialised checkpoints in the Hugging Face layout, for demos and benchmarks.
//!
//! [`generate`] writes `config.json`, `generation_config.json`, sharded safetensors with
//! `model.safetensors.index.json`, and the tokenizer files it is given. Weights follow the
//! fixtures' recipe: matrices `N(0, 1/fan_in)`, embeddings `N(0, 1)`, norm weights
//! `1 + N(0, 0.1)`. The same seed always writes the same bytes.

use crate::config::ModelConfig;
use crate::family::tensors::{Init, Routed};
use crate::weights::{dtype_bytes, SafetensorsWriter, WeightDType};
use crate::WorkerError;
use rayon::prelude::*;
use serde_json::{json, Value};
use std::path::Path;
use switchyard_kernels::rng::Rng;

/// Names of the built-in presets.
pub const PRESETS: &[&str] = &[
    "tiny",
    "tiny-mixtral",
    "tiny-qwen2-moe",
    "tiny-olmoe",
    "tiny-deepseek-v3",
    "tiny-gpt-oss",
    "bench",
    "bench-deepseek-v3",
    "bench-gpt-oss",
    "long",
];

/// The `config.json` of a preset.
pub fn preset(name: &str) -> Option<Value> {
    let qwen = |hidden: usize,
                layers: usize,
                heads: usize,
                kv: usize,
                hd: usize,
                experts: usize,
                topk: usize,
                inter: usize,
                ctx: usize| {
        json!({
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "attention_bias": false,
            "bos_token_id": 2043,
            "eos_token_id": 2045,
            "pad_token_id": 2043,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "head_dim": hd,
            "hidden_act": "silu",
            "hidden_size": hidden,
            "intermediate_size": inter * 2,
            "max_position_embeddings": ctx,
            "moe_intermediate_size": inter,
            "norm_topk_prob": true,
            "num_attention_heads": heads,
            "num_experts": experts,
            "num_experts_per_tok": topk,
            "num_hidden_layers": layers,
            "num_key_value_heads": kv,
            "rms_norm_eps": 1e-6,
            "rope_scaling": null,
            "rope_theta": 1000000.0,
            "sliding_window": null,
            "use_sliding_window": false,
            "tie_word_embeddings": false,
            "torch_dtype": "float32",
            "vocab_size": 2048
        })
    };
    match name {
        "tiny" => Some(qwen(128, 4, 4, 2, 32, 16, 4, 64, 4096)),
        "bench" => Some(qwen(1024, 8, 16, 4, 64, 32, 4, 512, 32768)),
        // A 256K context as the released long-context configs reach it (YaRN over a 32K
        // original), kept to one layer of two heads so that a 256K-token prompt prefills on
        // two CPU cores in minutes (attention is quadratic in the prompt).
        "long" => {
            let mut c = qwen(128, 1, 2, 1, 32, 8, 2, 128, 262144);
            c["rope_scaling"] = json!({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32768});
            Some(c)
        }
        "tiny-mixtral" => Some(json!({
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "bos_token_id": 2043,
            "eos_token_id": 2045,
            "pad_token_id": 2043,
            "hidden_act": "silu",
            "hidden_size": 128,
            "intermediate_size": 128,
            "max_position_embeddings": 4096,
            "num_attention_heads": 4,
            "num_experts_per_tok": 2,
            "num_hidden_layers": 4,
            "num_key_value_heads": 2,
            "num_local_experts": 8,
            "rms_norm_eps": 1e-5,
            "rope_scaling": null,
            "rope_theta": 1000000.0,
            "sliding_window": 1024,
            "tie_word_embeddings": false,
            "torch_dtype": "float32",
            "vocab_size": 2048
        })),
        "tiny-qwen2-moe" => Some(json!({
            "architectures": ["Qwen2MoeForCausalLM"],
            "model_type": "qwen2_moe",
            "bos_token_id": 2043, "eos_token_id": 2045, "pad_token_id": 2043,
            "decoder_sparse_step": 1, "mlp_only_layers": [],
            "hidden_act": "silu", "hidden_size": 128, "intermediate_size": 192,
            "max_position_embeddings": 4096, "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 96, "norm_topk_prob": true,
            "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_experts": 16, "num_experts_per_tok": 4, "num_hidden_layers": 4,
            "qkv_bias": true, "rms_norm_eps": 1e-6, "rope_scaling": null,
            "rope_theta": 1000000.0, "sliding_window": null, "use_sliding_window": false,
            "tie_word_embeddings": false, "torch_dtype": "float32", "vocab_size": 2048
        })),
        "tiny-olmoe" => Some(json!({
            "architectures": ["OlmoeForCausalLM"],
            "model_type": "olmoe",
            "bos_token_id": 2043, "eos_token_id": 2045, "pad_token_id": 2043,
            "attention_bias": false, "clip_qkv": null,
            "hidden_act": "silu", "hidden_size": 128, "intermediate_size": 64,
            "max_position_embeddings": 4096, "norm_topk_prob": false,
            "num_attention_heads": 4, "num_key_value_heads": 4,
            "num_experts": 16, "num_experts_per_tok": 4, "num_hidden_layers": 4,
            "rms_norm_eps": 1e-5, "rope_scaling": null, "rope_theta": 10000.0,
            "tie_word_embeddings": false, "torch_dtype": "float32", "vocab_size": 2048
        })),
        "tiny-deepseek-v3" => Some(deepseek(128, 4, 4, 48, 32, 16, 8, 16, 192, 32, 16, 2, 2, 1)),
        // DeepSeek-V3's shape scaled to the `bench` preset's budget: MLA (q_lora 384,
        // kv_lora 256, nope 64 + rope 32, v 64), one dense layer then 64 routed experts in
        // 8 groups (4 kept), top-8, one shared expert.
        "bench-deepseek-v3" => Some(deepseek(
            1024, 8, 16, 384, 256, 64, 32, 64, 2048, 256, 64, 8, 8, 4,
        )),
        // GPT-OSS's shape at the `bench` preset's budget: 32 experts top-4 (as GPT-OSS-20B),
        // sliding (128) and full layers alternating, attention sinks.
        "bench-gpt-oss" => Some(gpt_oss(1024, 8, 16, 4, 64, 32, 4, 512, 32.0, 4096)),
        "tiny-gpt-oss" => Some(gpt_oss(128, 4, 4, 2, 32, 16, 4, 64, 4.0, 1024)),
        _ => None,
    }
}

/// A `GptOssForCausalLM` config: sliding (128) and full layers alternating, YaRN by
/// `factor` over `original_ctx`.
#[allow(clippy::too_many_arguments)]
fn gpt_oss(
    hidden: usize,
    layers: usize,
    heads: usize,
    kv: usize,
    hd: usize,
    experts: usize,
    topk: usize,
    inter: usize,
    factor: f64,
    original_ctx: usize,
) -> Value {
    let types = crate::family::gpt_oss::alternating_layer_types(layers);
    json!({
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "bos_token_id": 2043, "eos_token_id": 2045, "pad_token_id": 2043,
        "attention_bias": true, "head_dim": hd,
        "hidden_act": "silu", "hidden_size": hidden, "intermediate_size": inter,
        "layer_types": types,
        "max_position_embeddings": original_ctx * factor as usize,
        "num_attention_heads": heads, "num_key_value_heads": kv,
        "num_local_experts": experts, "num_experts_per_tok": topk, "num_hidden_layers": layers,
        "rms_norm_eps": 1e-5,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": factor,
            "original_max_position_embeddings": original_ctx, "rope_type": "yarn", "truncate": false},
        "rope_theta": 150000.0, "sliding_window": 128,
        "swiglu_alpha": 1.702, "swiglu_limit": 7.0,
        "tie_word_embeddings": false, "torch_dtype": "float32", "vocab_size": 2048
    })
}

/// A `DeepseekV3ForCausalLM` config (layer 0 dense, the rest sparse, one shared expert).
#[allow(clippy::too_many_arguments)]
fn deepseek(
    hidden: usize,
    layers: usize,
    heads: usize,
    q_lora: usize,
    kv_lora: usize,
    nope: usize,
    rope: usize,
    v: usize,
    inter: usize,
    moe_inter: usize,
    experts: usize,
    topk: usize,
    groups: usize,
    topk_group: usize,
) -> Value {
    json!({
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "bos_token_id": 2043, "eos_token_id": 2045, "pad_token_id": 2043,
        "attention_bias": false, "first_k_dense_replace": 1, "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": inter, "kv_lora_rank": kv_lora,
        "max_position_embeddings": 32768, "moe_intermediate_size": moe_inter,
        "n_group": groups, "n_routed_experts": experts, "n_shared_experts": 1,
        "norm_topk_prob": true, "num_attention_heads": heads, "num_experts_per_tok": topk,
        "num_hidden_layers": layers, "num_key_value_heads": heads,
        "num_nextn_predict_layers": 0, "q_lora_rank": q_lora, "qk_nope_head_dim": nope,
        "qk_rope_head_dim": rope, "rms_norm_eps": 1e-6, "rope_interleave": true,
        "rope_scaling": null, "rope_theta": 10000.0, "routed_scaling_factor": 2.5,
        "tie_word_embeddings": false, "topk_group": topk_group, "torch_dtype": "float32",
        "v_head_dim": v, "vocab_size": 2048
    })
}

fn fill(name_seed: u64, shape: &[usize], init: &Init) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let (mean, std) = match init {
        Init::Matrix { fan_in } => (0.0, 1.0 / (*fan_in as f64).sqrt()),
        Init::Embedding => (0.0, 1.0),
        Init::Norm => (1.0, 0.1),
        Init::Bias => (0.0, 0.1),
    };
    let mut v = vec![0.0f32; n];
    const CHUNK: usize = 1 << 16;
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, c)| {
        let mut rng = Rng::new(name_seed ^ (ci as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for x in c.iter_mut() {
            *x = (mean + std * rng.normal()) as f32;
        }
    });
    v
}

pub(crate) fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a over the name, mixed with the seed.
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// The weight format [`generate`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenDType {
    F32,
    Bf16,
    /// The released FP8 layout (DeepSeek-V3, Qwen3 *-FP8): every `*_proj.weight` matrix in
    /// e4m3 with an f32 `weight_scale_inv` per 128×128 block; embeddings, head, norms and
    /// routers in bf16.
    Fp8,
    /// The released MXFP4 layout (GPT-OSS): routed experts as `*_blocks` / `*_scales`, the
    /// rest in bf16.
    Mxfp4,
}

impl std::str::FromStr for GenDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(GenDType::F32),
            "bf16" | "bfloat16" => Ok(GenDType::Bf16),
            "fp8" => Ok(GenDType::Fp8),
            "mxfp4" => Ok(GenDType::Mxfp4),
            other => Err(format!("unknown dtype {other:?} (f32, bf16, fp8 or mxfp4)")),
        }
    }
}

impl From<WeightDType> for GenDType {
    fn from(d: WeightDType) -> Self {
        match d {
            WeightDType::F32 => GenDType::F32,
            WeightDType::Bf16 => GenDType::Bf16,
        }
    }
}

const FP8_BLOCK: [usize; 2] = [128, 128];

/// How one generated tensor is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stored {
    F32,
    Bf16,
    /// e4m3 + `_scale_inv`.
    Fp8,
    /// `[E, in, out]` fused experts as `_blocks` + `_scales` of the transposed `[E, out, in]`.
    Mxfp4,
}

impl Stored {
    fn of(dtype: GenDType, name: &str, shape: &[usize], routed: bool) -> Stored {
        match dtype {
            GenDType::F32 => Stored::F32,
            GenDType::Bf16 => Stored::Bf16,
            GenDType::Fp8 if shape.len() == 2 && name.ends_with("_proj.weight") => Stored::Fp8,
            GenDType::Mxfp4 if routed && shape.len() == 3 && !name.ends_with("_bias") => {
                Stored::Mxfp4
            }
            _ => Stored::Bf16,
        }
    }

    /// The safetensors entries (name, dtype, shape) this tensor becomes.
    fn entries(self, name: &str, shape: &[usize]) -> Vec<(String, &'static str, Vec<usize>)> {
        match self {
            Stored::F32 => vec![(name.into(), "F32", shape.to_vec())],
            Stored::Bf16 => vec![(name.into(), "BF16", shape.to_vec())],
            Stored::Fp8 => vec![
                (name.into(), "F8_E4M3", shape.to_vec()),
                (
                    format!("{name}_scale_inv"),
                    "F32",
                    vec![
                        shape[0].div_ceil(FP8_BLOCK[0]),
                        shape[1].div_ceil(FP8_BLOCK[1]),
                    ],
                ),
            ],
            Stored::Mxfp4 => {
                let (e, inp, out) = (shape[0], shape[1], shape[2]);
                vec![
                    (format!("{name}_blocks"), "U8", vec![e, out, inp / 32, 16]),
                    (format!("{name}_scales"), "U8", vec![e, out, inp / 32]),
                ]
            }
        }
    }

    /// The bytes of each entry, from the tensor's `f32` values.
    fn encode(self, v: &[f32], shape: &[usize]) -> Vec<Vec<u8>> {
        use switchyard_kernels::quant::{quantize_fp8, quantize_mxfp4_row};
        match self {
            Stored::F32 => vec![bytemuck::cast_slice(v).to_vec()],
            Stored::Bf16 => vec![v
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
                .collect()],
            Stored::Fp8 => {
                let (q, s) = quantize_fp8(v, shape[0], shape[1], FP8_BLOCK);
                vec![q, bytemuck::cast_slice(&s).to_vec()]
            }
            Stored::Mxfp4 => {
                let (e, inp, out) = (shape[0], shape[1], shape[2]);
                let (mut blocks, mut scales) = (Vec::new(), Vec::new());
                let mut row = vec![0.0f32; inp];
                for ei in 0..e {
                    for o in 0..out {
                        for (c, r) in row.iter_mut().enumerate() {
                            *r = v[(ei * inp + c) * out + o];
                        }
                        quantize_mxfp4_row(&row, &mut blocks, &mut scales);
                    }
                }
                vec![blocks, scales]
            }
        }
    }
}

/// Writes a random checkpoint for `config` into `out`. `tokenizer_files` are copied in as
/// (file name, contents). Shards hold at most `shard_bytes` each (at least one tensor).
/// Quantized dtypes quantize the same random weights into the released layouts and declare
/// them in `quantization_config`.
pub fn generate(
    config: &Value,
    out: &Path,
    dtype: impl Into<GenDType>,
    seed: u64,
    shard_bytes: usize,
    tokenizer_files: &[(&str, &[u8])],
) -> Result<(), WorkerError> {
    let dtype = dtype.into();
    let mut config = config.clone();
    match dtype {
        GenDType::Fp8 => {
            config["quantization_config"] = json!({"quant_method": "fp8", "fmt": "e4m3",
                "activation_scheme": "dynamic", "weight_block_size": FP8_BLOCK});
        }
        GenDType::Mxfp4 => {
            config["quantization_config"] = json!({"quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                    "model.embed_tokens", "lm_head"]});
        }
        GenDType::F32 | GenDType::Bf16 => {}
    }
    // Parsing refuses MXFP4 for families without fused experts, naming the field.
    let cfg = ModelConfig::from_json(&config)?;
    std::fs::create_dir_all(out)?;
    config["torch_dtype"] = json!(if dtype == GenDType::F32 {
        "float32"
    } else {
        "bfloat16"
    });
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config).expect("json"),
    )?;
    let gen = json!({
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": config.get("eos_token_id"),
        "pad_token_id": config.get("pad_token_id"),
        "do_sample": false
    });
    std::fs::write(
        out.join("generation_config.json"),
        serde_json::to_string_pretty(&gen).expect("json"),
    )?;
    for (name, bytes) in tokenizer_files {
        std::fs::write(out.join(name), bytes)?;
    }
    let all: Vec<(String, Vec<usize>, Init, Stored)> = cfg
        .tensors()
        .into_iter()
        .map(|d| {
            let st = Stored::of(dtype, &d.name, &d.shape, d.routed != Routed::No);
            (d.name, d.shape, d.init, st)
        })
        .collect();
    // Group consecutive tensors into shards (a quantized tensor and its scales together).
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut size = 0;
    for (i, (name, shape, _, st)) in all.iter().enumerate() {
        let n: usize = st
            .entries(name, shape)
            .iter()
            .map(|(_, d, s)| dtype_bytes(d).unwrap_or(1) * s.iter().product::<usize>())
            .sum();
        if size + n > shard_bytes && !shards.last().unwrap().is_empty() {
            shards.push(vec![]);
            size = 0;
        }
        shards.last_mut().unwrap().push(i);
        size += n;
    }
    let count = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (si, members) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", si + 1, count);
        let decl: Vec<(String, &str, Vec<usize>)> = members
            .iter()
            .flat_map(|&i| all[i].3.entries(&all[i].0, &all[i].1))
            .collect();
        let mut w = SafetensorsWriter::create(&out.join(&file), &decl)?;
        for &i in members {
            let (name, shape, init, st) = &all[i];
            let v = fill(name_seed(seed, name), shape, init);
            for ((ename, _, _), bytes) in st.entries(name, shape).iter().zip(st.encode(&v, shape)) {
                total += bytes.len();
                w.write_next(ename, &bytes)?;
                weight_map.insert(ename.clone(), json!(file));
            }
        }
        w.finish()?;
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(
        out.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).expect("json"),
    )?;
    Ok(())
}
