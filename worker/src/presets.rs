//! Random-initialised checkpoints in the Hugging Face layout, for demos and benchmarks.
//!
//! [`generate`] writes `config.json`, `generation_config.json`, sharded safetensors with
//! `model.safetensors.index.json`, and the tokenizer files it is given. Weights follow the
//! fixtures' recipe: matrices `N(0, 1/fan_in)`, embeddings `N(0, 1)`, norm weights
//! `1 + N(0, 0.1)`. The same seed always writes the same bytes.

use crate::config::ModelConfig;
use crate::family::tensors::Init;
use crate::weights::{SafetensorsWriter, WeightDType};
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
        "long" => {
            let mut c = qwen(256, 4, 8, 2, 32, 16, 4, 128, 32768);
            c["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192});
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
        "tiny-gpt-oss" => Some(json!({
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "bos_token_id": 2043, "eos_token_id": 2045, "pad_token_id": 2043,
            "attention_bias": true, "head_dim": 32,
            "hidden_act": "silu", "hidden_size": 128, "intermediate_size": 64,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            "max_position_embeddings": 4096,
            "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_local_experts": 16, "num_experts_per_tok": 4, "num_hidden_layers": 4,
            "rms_norm_eps": 1e-5,
            "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 4.0,
                "original_max_position_embeddings": 1024, "rope_type": "yarn", "truncate": false},
            "rope_theta": 150000.0, "sliding_window": 128,
            "swiglu_alpha": 1.702, "swiglu_limit": 7.0,
            "tie_word_embeddings": false, "torch_dtype": "float32", "vocab_size": 2048
        })),
        _ => None,
    }
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

fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a over the name, mixed with the seed.
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Writes a random checkpoint for `config` into `out`. `tokenizer_files` are copied in as
/// (file name, contents). Shards hold at most `shard_bytes` each (at least one tensor).
pub fn generate(
    config: &Value,
    out: &Path,
    dtype: WeightDType,
    seed: u64,
    shard_bytes: usize,
    tokenizer_files: &[(&str, &[u8])],
) -> Result<(), WorkerError> {
    let cfg = ModelConfig::from_json(config)?;
    std::fs::create_dir_all(out)?;
    let mut config = config.clone();
    config["torch_dtype"] = json!(if dtype == WeightDType::Bf16 {
        "bfloat16"
    } else {
        "float32"
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
    let elem = if dtype == WeightDType::Bf16 { 2 } else { 4 };
    let st_dtype = if dtype == WeightDType::Bf16 {
        "BF16"
    } else {
        "F32"
    };
    let all: Vec<(String, Vec<usize>, Init)> = cfg
        .tensors()
        .into_iter()
        .map(|d| (d.name, d.shape, d.init))
        .collect();
    // Group consecutive tensors into shards.
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut size = 0;
    for (i, (_, shape, _)) in all.iter().enumerate() {
        let n = shape.iter().product::<usize>() * elem;
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
            .map(|&i| (all[i].0.clone(), st_dtype, all[i].1.clone()))
            .collect();
        let mut w = SafetensorsWriter::create(&out.join(&file), &decl)?;
        for &i in members {
            let (name, shape, init) = &all[i];
            let v = fill(name_seed(seed, name), shape, init);
            let bytes: Vec<u8> = match dtype {
                WeightDType::F32 => bytemuck::cast_slice(&v).to_vec(),
                WeightDType::Bf16 => v
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
                    .collect(),
            };
            total += bytes.len();
            w.write_next(name, &bytes)?;
            weight_map.insert(name.clone(), json!(file));
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
