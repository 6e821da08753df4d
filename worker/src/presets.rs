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
pub const PRESETS: &[&str] = &["tiny", "tiny-mixtral", "bench", "long"];

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
        _ => None,
    }
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
