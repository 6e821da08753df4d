//! Config parsing: sparse/dense layer layout, rope scaling variants, parameter counts.

use serde_json::json;
use switchyard_kernels::rope::RopeScaling;
use switchyard_worker::engine::{ChunkSpec, Engine, EngineOptions, Logits};
use switchyard_worker::{presets, ModelConfig, WeightDType};

#[test]
fn dense_layers_follow_mlp_only_layers_and_decoder_sparse_step() {
    let mut c = presets::preset("tiny").unwrap();
    c["num_hidden_layers"] = json!(6);
    c["decoder_sparse_step"] = json!(2);
    c["mlp_only_layers"] = json!([3]);
    let cfg = ModelConfig::from_json(&c).unwrap();
    // Sparse where (l + 1) % 2 == 0 and l not in mlp_only_layers.
    assert_eq!(
        cfg.sparse_layers,
        vec![false, true, false, false, false, true]
    );

    // Such a checkpoint holds dense MLP tensors in the dense layers, loads, and runs.
    let dir = std::env::temp_dir().join(format!("sy-dense-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    presets::generate(&c, &dir, WeightDType::F32, 5, 1 << 30, &[]).unwrap();
    let ck = switchyard_worker::Checkpoint::open(&dir).unwrap();
    assert!(ck.contains("model.layers.0.mlp.gate_proj.weight"));
    assert!(!ck.contains("model.layers.0.mlp.experts.0.gate_proj.weight"));
    assert!(ck.contains("model.layers.1.mlp.experts.0.gate_proj.weight"));
    let mut e = Engine::load(&dir, &EngineOptions::default()).unwrap();
    let out = e
        .step(
            &[ChunkSpec {
                seq_id: 1,
                tokens: &[1, 2, 3],
                logits: Logits::Last,
            }],
            true,
        )
        .unwrap();
    assert!(out.logits.iter().all(|v| v.is_finite()));
    assert_eq!(
        out.routing.iter().map(|r| r.layer).collect::<Vec<_>>(),
        vec![1, 5]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn rope_scaling_variants_parse_like_transformers() {
    let mut c = presets::preset("tiny").unwrap();
    c["max_position_embeddings"] = json!(32768);
    c["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
    assert_eq!(
        ModelConfig::from_json(&c).unwrap().rope_scaling,
        RopeScaling::Linear { factor: 2.0 }
    );

    // An explicit factor wins; beta 0 means the default.
    c["rope_scaling"] = json!({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8192, "beta_fast": 0});
    match ModelConfig::from_json(&c).unwrap().rope_scaling {
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            truncate,
            ..
        } => {
            assert_eq!(
                (
                    factor,
                    original_max_position_embeddings,
                    beta_fast,
                    beta_slow,
                    truncate
                ),
                (2.0, Some(8192), 32.0, 1.0, true)
            );
        }
        other => panic!("{other:?}"),
    }
    // Without a factor it is the extension ratio.
    c["rope_scaling"] = json!({"rope_type": "yarn", "original_max_position_embeddings": 8192});
    match ModelConfig::from_json(&c).unwrap().rope_scaling {
        RopeScaling::Yarn { factor, .. } => assert_eq!(factor, 4.0),
        other => panic!("{other:?}"),
    }
    // transformers 5 nests rope settings in rope_parameters.
    c.as_object_mut().unwrap().remove("rope_scaling");
    c["rope_parameters"] = json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e5});
    let cfg = ModelConfig::from_json(&c).unwrap();
    assert_eq!(cfg.rope_theta, 5e5);
    assert!(matches!(cfg.rope_scaling, RopeScaling::Yarn { factor, .. } if factor == 4.0));

    c["rope_parameters"] = json!({"rope_type": "yarn"});
    let e = ModelConfig::from_json(&c).unwrap_err().to_string();
    assert!(e.contains("rope_scaling.factor"), "{e}");
}

#[test]
fn bench_preset_has_the_specified_size() {
    let cfg = ModelConfig::from_json(&presets::preset("bench").unwrap()).unwrap();
    let (total, active) = cfg.param_counts();
    // 428M parameters; 73.7M active per token when the embedding table (one row read) is left out.
    assert_eq!(total / 1_000_000, 428);
    let active_without_embedding = active - (cfg.vocab_size * cfg.hidden_size) as u64;
    assert_eq!(active_without_embedding / 100_000, 736);
}

/// Features that change what the weights mean are refused at load, naming the field: a
/// quantized layout, and layer kinds other than attention (Qwen3-Next's linear attention).
/// Sliding and full attention may alternate per layer (`layer_types`, as GPT-OSS).
#[test]
fn quantized_layouts_and_linear_attention_layers_are_refused_by_name() {
    let mut c = presets::preset("tiny").unwrap();
    c["quantization_config"] = json!({"quant_method": "fp8", "weight_block_size": [128, 128]});
    let e = ModelConfig::from_json(&c).unwrap_err().to_string();
    assert!(
        e.contains("quantization_config.quant_method") && e.contains("fp8"),
        "{e}"
    );
    let mut c = presets::preset("tiny").unwrap();
    c["layer_types"] = json!([
        "full_attention",
        "linear_attention",
        "full_attention",
        "full_attention"
    ]);
    let e = ModelConfig::from_json(&c).unwrap_err().to_string();
    assert!(
        e.contains("layer_types") && e.contains("linear_attention"),
        "{e}"
    );
    let mut c = presets::preset("tiny").unwrap();
    c["layer_types"] = json!([
        "full_attention",
        "sliding_attention",
        "full_attention",
        "full_attention"
    ]);
    // Sliding layers need a window to slide.
    let e = ModelConfig::from_json(&c).unwrap_err().to_string();
    assert!(e.contains("sliding_window"), "{e}");
    // With one, each layer gets its own kind.
    c["sliding_window"] = json!(32);
    let cfg = ModelConfig::from_json(&c).unwrap();
    assert_eq!(cfg.windows, vec![None, Some(32), None, None]);
    let mut c = presets::preset("tiny").unwrap();
    c["layer_types"] = json!(vec!["full_attention"; 4]);
    assert!(ModelConfig::from_json(&c).is_ok());
    // An architecture not registered names itself and what is supported.
    let mut c = presets::preset("tiny").unwrap();
    c["architectures"] = json!(["Qwen3NextForCausalLM"]);
    let e = ModelConfig::from_json(&c).unwrap_err().to_string();
    assert!(
        e.contains("Qwen3NextForCausalLM") && e.contains("DeepseekV3ForCausalLM"),
        "{e}"
    );
}
