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
    c["quantization_config"] = json!({"quant_method": "mxfp4"});
    let e = ModelConfig::from_json(&c).unwrap_err().to_string();
    assert!(
        e.contains("quantization_config.quant_method") && e.contains("mxfp4"),
        "{e}"
    );
    // MXFP4 is read for GPT-OSS only (its fused experts); widening at load is refused.
    let mut g = presets::preset("tiny-gpt-oss").unwrap();
    g["quantization_config"] = json!({"quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.1.mlp.experts"]});
    let q = ModelConfig::from_json(&g).unwrap().quantization.unwrap();
    assert!(q.mxfp4_experts(0) && !q.mxfp4_experts(1));
    g["quantization_config"]["dequantize"] = json!(true);
    let e = ModelConfig::from_json(&g).unwrap_err().to_string();
    assert!(e.contains("quantization_config.dequantize"), "{e}");
    g["quantization_config"] =
        json!({"quant_method": "mxfp4", "modules_to_not_convert": "lm_head"});
    let e = ModelConfig::from_json(&g).unwrap_err().to_string();
    assert!(
        e.contains("quantization_config.modules_to_not_convert"),
        "{e}"
    );
    // FP8 is read as released; its variants that are not implemented are refused by name.
    c["quantization_config"] = json!({"quant_method": "fp8", "weight_block_size": [128, 128]});
    assert!(ModelConfig::from_json(&c).unwrap().quantization.is_some());
    for (k, v, field) in [
        ("fmt", json!("e5m2"), "quantization_config.fmt"),
        (
            "activation_scheme",
            json!("static"),
            "quantization_config.activation_scheme",
        ),
        (
            "weight_block_size",
            json!([128]),
            "quantization_config.weight_block_size",
        ),
    ] {
        let mut q = json!({"quant_method": "fp8"});
        q[k] = v;
        c["quantization_config"] = q;
        let e = ModelConfig::from_json(&c).unwrap_err().to_string();
        assert!(e.contains(field), "{e}");
    }
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

/// DeepSeek-V3's released `config.json` shape (quantization aside), and Kimi K2's changes.
fn deepseek_v3_released() -> serde_json::Value {
    json!({
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 3,
        "hidden_act": "silu", "hidden_size": 7168, "intermediate_size": 18432,
        "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 2048,
        "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1,
        "norm_topk_prob": true, "num_attention_heads": 128, "num_experts_per_tok": 8,
        "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
        "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "rms_norm_eps": 1e-6,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
        "tie_word_embeddings": false, "topk_group": 4, "topk_method": "noaux_tc",
        "v_head_dim": 128, "vocab_size": 129280
    })
}

/// KV bytes per token follow each family's formula, read off the allocated cache:
/// standard attention holds K and V per kv head (`2 · kv_heads · head_dim` floats per layer),
/// MLA only the latent and the rope key (`kv_lora_rank + qk_rope_head_dim`). The formulas
/// are computed here from the raw config fields, not through `ModelConfig`.
#[test]
fn kv_bytes_per_token_follow_each_family_formula() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    for name in [
        "tiny-qwen3-moe",
        "tiny-mixtral",
        "tiny-qwen2-moe",
        "tiny-olmoe",
        "tiny-deepseek-v3",
        "tiny-gpt-oss",
    ] {
        let raw: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures.join(name).join("config.json")).unwrap(),
        )
        .unwrap();
        let u = |f: &str| raw[f].as_u64().unwrap() as usize;
        let layers = u("num_hidden_layers");
        let per_layer_floats = if raw.get("kv_lora_rank").is_some() {
            u("kv_lora_rank") + u("qk_rope_head_dim")
        } else {
            let hd = raw
                .get("head_dim")
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .unwrap_or(u("hidden_size") / u("num_attention_heads"));
            2 * u("num_key_value_heads") * hd
        };
        let want = layers * per_layer_floats * 4;
        let cfg = ModelConfig::from_json(&raw).unwrap();
        use switchyard_worker::kv::{KvCache, KvDType};
        let kv = KvCache::new(&cfg, 8, 16, KvDType::F32, false);
        assert_eq!(kv.bytes_per_position(), want, "{name}");
        assert_eq!(cfg.kv_bytes_per_token(4), want, "{name}");
        // A bf16 cache holds half of it, as allocated.
        let kv = KvCache::new(&cfg, 8, 16, KvDType::Bf16, false);
        assert_eq!(kv.bytes_per_position(), want / 2, "{name} bf16");
        assert_eq!(cfg.kv_bytes_per_token(2), want / 2, "{name} bf16");
    }
    // DeepSeek-V3 in bf16: 61 · (512 + 64) · 2 = 70,272 bytes per token, where caching the
    // expanded per-head keys and values would take 61 · 128 · (192 + 128) · 2 ≈ 5.0 MB.
    let ds = ModelConfig::from_json(&deepseek_v3_released()).unwrap();
    assert_eq!(ds.kv_bytes_per_token(2), 70_272);
    assert_eq!(ds.skipped_layers, 1, "the MTP layer is skipped, not loaded");
    let (total, active) = ds.param_counts();
    // 671B parameters (MTP layer excluded), ~37B active.
    assert_eq!(total / 1_000_000_000, 671, "{total}");
    assert_eq!(active / 1_000_000_000, 37, "{active}");
    // Kimi K2: 384 experts in one group, 64 heads, the first layer dense.
    let mut k2 = deepseek_v3_released();
    k2["n_routed_experts"] = json!(384);
    k2["n_group"] = json!(1);
    k2["topk_group"] = json!(1);
    k2["num_attention_heads"] = json!(64);
    k2["num_key_value_heads"] = json!(64);
    k2["first_k_dense_replace"] = json!(1);
    let k2 = ModelConfig::from_json(&k2).unwrap();
    assert_eq!(k2.num_experts, 384);
    assert_eq!(k2.kv_bytes_per_token(2), 70_272);
}

/// Feeds `tokens` to sequence `seq` and returns the logits at its last position.
fn last_logits(e: &mut Engine, seq: u64, tokens: &[u32]) -> Vec<f32> {
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

/// Every family's `gen-model` preset writes a checkpoint in the released layout that loads and
/// runs a chunked prefill equal to one pass (the bench-shaped DeepSeek preset is checked for
/// size only: 391M parameters, 83M active).
#[test]
fn every_family_preset_generates_loads_and_runs() {
    for name in [
        "tiny",
        "tiny-mixtral",
        "tiny-qwen2-moe",
        "tiny-olmoe",
        "tiny-deepseek-v3",
        "tiny-gpt-oss",
    ] {
        let c = presets::preset(name).unwrap();
        let dir = std::env::temp_dir().join(format!("sy-preset-{name}-{}", std::process::id()));
        presets::generate(&c, &dir, WeightDType::F32, 3, 1 << 22, &[]).unwrap();
        let mut e = Engine::load(&dir, &EngineOptions::default()).unwrap();
        assert_eq!(
            e.config().arch.hf_name(),
            c["architectures"][0].as_str().unwrap()
        );
        let prompt: Vec<u32> = (0..40).map(|i| (i * 37 % 2000) as u32).collect();
        let whole = last_logits(&mut e, 1, &prompt);
        let mut last = vec![];
        for ch in prompt.chunks(16) {
            last = last_logits(&mut e, 2, ch);
        }
        let d = whole
            .iter()
            .zip(&last)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(whole.iter().all(|x| x.is_finite()), "{name}");
        // The bytes a decoded token reads, from the weights held, agree with the parameter
        // count of the tensor list (within the norms and biases, which the first leaves out).
        let (_, active) = e.config().param_counts();
        let cfg = e.config();
        let formula =
            (active - (cfg.vocab_size * cfg.hidden_size) as u64 + cfg.hidden_size as u64) * 4;
        let held = e.bytes_per_token() as u64;
        assert!(
            held <= formula && held * 100 >= formula * 99,
            "{name}: {held} bytes per token held, {formula} by the parameter count"
        );
        assert!(d < 1e-4, "{name}: chunked differs by {d}");
        let _ = std::fs::remove_dir_all(&dir);
    }
    let ds = ModelConfig::from_json(&presets::preset("bench-deepseek-v3").unwrap()).unwrap();
    let (total, active) = ds.param_counts();
    assert_eq!(total / 1_000_000, 391, "{total}");
    assert_eq!(active / 1_000_000, 83, "{active}");
}

/// `modules_to_not_convert` entries as transformers reads them: a regular expression matched
/// from the start up to a dotted boundary, or a suffix.
#[test]
fn modules_to_not_convert_patterns_match_as_transformers_does() {
    use switchyard_worker::config::module_matches;
    let m = "model.layers.12.mlp.experts";
    for p in [
        "model.layers.*.mlp.experts",
        "model.layers.12.mlp",
        "model.layers.12",
        "model",
        "model.layers.*",
        "model.*.experts",
        "experts",
        "mlp.experts",
        m,
    ] {
        assert!(module_matches(p, m), "{p}");
    }
    for p in [
        "model.layers.*.self_attn",
        "model.layers.1",
        "model.layers.1.mlp.experts",
        "model.layers.12.mlp.experts.0",
        "model.layers.12.ml",
        "lm_head",
    ] {
        assert!(!module_matches(p, m), "{p}");
    }
}

/// `gen-model --dtype fp8` and `--dtype mxfp4` write the released layouts (e4m3 matrices with
/// their block scales; GPT-OSS experts as `_blocks`/`_scales`), which load quantized and give
/// logits tracking the f32 checkpoint of the same seed (cosine above 0.98; 4-bit experts give
/// about 0.99 and 8-bit matrices 0.995 here, while a mis-read layout
/// decorrelates them), held in fewer bytes. MXFP4 is refused for families without fused
/// experts, naming the field.
#[test]
fn quantized_gen_model_writes_released_layouts_that_track_f32() {
    use switchyard_worker::presets::GenDType;
    for (name, dtype) in [
        ("tiny-deepseek-v3", GenDType::Fp8),
        ("tiny", GenDType::Fp8),
        ("tiny-gpt-oss", GenDType::Mxfp4),
    ] {
        let c = presets::preset(name).unwrap();
        let base = std::env::temp_dir().join(format!("sy-q-{name}-{}", std::process::id()));
        let (qd, fd) = (base.join("q"), base.join("f"));
        presets::generate(&c, &qd, dtype, 3, 1 << 22, &[]).unwrap();
        presets::generate(&c, &fd, WeightDType::F32, 3, 1 << 22, &[]).unwrap();
        let ck = switchyard_worker::Checkpoint::open(&qd).unwrap();
        let probe = match dtype {
            GenDType::Fp8 => "model.layers.1.self_attn.o_proj.weight",
            _ => "model.layers.1.mlp.experts.gate_up_proj_blocks",
        };
        assert!(
            matches!(ck.dtype_of(probe), Some("F8_E4M3" | "U8")),
            "{name}: {probe}"
        );
        let run = |dir: &std::path::Path| {
            let mut e = Engine::load(dir, &EngineOptions::default()).unwrap();
            let prompt: Vec<u32> = (0..24).map(|i| (i * 37 % 2000) as u32).collect();
            (last_logits(&mut e, 1, &prompt), e.weight_bytes())
        };
        let ((q, qb), (f, fb)) = (run(&qd), run(&fd));
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let cos = dot(&q, &f) / (dot(&q, &q) * dot(&f, &f)).sqrt();
        eprintln!("{name} {dtype:?}: cosine {cos}, {qb} bytes vs {fb} in f32");
        assert!(cos > 0.98, "{name} {dtype:?}: cosine {cos}");
        assert!(qb < fb, "{name}: {qb} vs {fb}");
        let _ = std::fs::remove_dir_all(&base);
    }
    let e = presets::generate(
        &presets::preset("tiny").unwrap(),
        &std::env::temp_dir().join("sy-q-refused"),
        GenDType::Mxfp4,
        3,
        1 << 22,
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("quantization_config.quant_method"), "{e}");
}
