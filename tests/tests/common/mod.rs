//! Helpers shared by the test files: fixture paths and golden parsing.
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};

/// Every family with a transformers fixture: the original two, Qwen2-MoE (gated shared
/// expert), OLMoE, DeepSeek-V3 (MLA, a dense first layer, grouped routing, shared expert) and
/// GPT-OSS (sinks, alternating windows, fused biased experts).
pub const FAMILIES: &[&str] = &[
    "tiny-qwen3-moe",
    "tiny-mixtral",
    "tiny-qwen2-moe",
    "tiny-olmoe",
    "tiny-deepseek-v3",
    "tiny-gpt-oss",
];

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// The transformers goldens of a fixture model.
pub fn golden(model: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(model).join("golden.json")).unwrap())
        .unwrap()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Feeds `tokens` to sequence `seq` in one chunk and returns the logits at its last position.
pub fn last_logits(
    e: &mut switchyard_worker::engine::Engine,
    seq: u64,
    tokens: &[u32],
) -> Vec<f32> {
    use switchyard_worker::engine::{ChunkSpec, Logits};
    e.step(
        &[ChunkSpec {
            seq_id: seq,
            tokens,
            logits: Logits::Last,
        }],
        false,
    )
    .unwrap()
    .logits
}

/// Full-prompt logits at every position, one pass.
pub fn prompt_logits(
    e: &mut switchyard_worker::engine::Engine,
    seq: u64,
    prompt: &[u32],
) -> Vec<Vec<f32>> {
    let out = e
        .step(
            &[switchyard_worker::engine::ChunkSpec {
                seq_id: seq,
                tokens: prompt,
                logits: switchyard_worker::engine::Logits::All,
            }],
            false,
        )
        .unwrap();
    let v = e.config().vocab_size;
    out.logits.chunks(v).map(|c| c.to_vec()).collect()
}
