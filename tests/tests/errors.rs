//! Bad checkpoints, configs and prompts fail with clear errors that name what is wrong.

mod common;
use common::fixture;

use std::path::{Path, PathBuf};
use switchyard_coordinator::generate::{self, Prompt, Request};
use switchyard_coordinator::text::Tokenizer;
use switchyard_coordinator::GenerateError;
use switchyard_kernels::sampling::SamplingParams;
use switchyard_worker::engine::{Engine, EngineOptions};
use switchyard_worker::{presets, WeightDType};

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sy-err-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn copy_fixture(model: &str, to: &Path) {
    for e in std::fs::read_dir(fixture(model)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn load_err(dir: &Path) -> String {
    match Engine::load(dir, &EngineOptions::default()) {
        Ok(_) => panic!("load of {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn truncated_safetensors_is_rejected() {
    let d = scratch("trunc");
    copy_fixture("tiny-qwen3-moe", &d);
    let p = d.join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len - 1000).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    // A file cut inside its header fails the same way.
    f.set_len(20).unwrap();
    let e = load_err(&d);
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let d = scratch("missing");
    let cfg = presets::preset("tiny").unwrap();
    presets::generate(&cfg, &d, WeightDType::F32, 1, 1 << 20, &[]).unwrap();
    // Drop the last shard and its index entries: lm_head goes missing.
    let idx_path = d.join("model.safetensors.index.json");
    let mut idx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&idx_path).unwrap()).unwrap();
    let last = idx["weight_map"]["lm_head.weight"]
        .as_str()
        .unwrap()
        .to_string();
    idx["weight_map"]
        .as_object_mut()
        .unwrap()
        .retain(|_, f| f.as_str() != Some(last.as_str()));
    std::fs::write(&idx_path, idx.to_string()).unwrap();
    std::fs::remove_file(d.join(&last)).unwrap();
    let e = load_err(&d);
    assert!(e.contains("lm_head.weight") && e.contains("missing"), "{e}");
}

#[test]
fn wrong_tensor_shape_is_named() {
    let d = scratch("shape");
    copy_fixture("tiny-qwen3-moe", &d);
    edit_config(&d, |v| v["moe_intermediate_size"] = 48.into());
    let e = load_err(&d);
    assert!(e.contains("experts") && e.contains("shape"), "{e}");
}

#[test]
fn unknown_architecture_and_bad_fields_are_named() {
    let d = scratch("arch");
    copy_fixture("tiny-mixtral", &d);
    edit_config(&d, |v| {
        v["architectures"] = serde_json::json!(["FalconForCausalLM"])
    });
    let e = load_err(&d);
    assert!(
        e.contains("FalconForCausalLM") && e.contains("unsupported architecture"),
        "{e}"
    );

    copy_fixture("tiny-mixtral", &d);
    edit_config(&d, |v| v["hidden_size"] = "64".into());
    assert!(load_err(&d).contains("`hidden_size`"));

    copy_fixture("tiny-mixtral", &d);
    edit_config(&d, |v| {
        v.as_object_mut().unwrap().remove("num_local_experts");
    });
    assert!(load_err(&d).contains("`num_local_experts`"));

    copy_fixture("tiny-qwen3-moe", &d);
    edit_config(&d, |v| {
        v["rope_scaling"] = serde_json::json!({"rope_type": "dynamic", "factor": 2.0})
    });
    let e = load_err(&d);
    assert!(
        e.contains("rope_scaling.rope_type") && e.contains("dynamic"),
        "{e}"
    );

    copy_fixture("tiny-qwen3-moe", &d);
    edit_config(&d, |v| v["num_experts_per_tok"] = 9.into());
    assert!(load_err(&d).contains("`num_experts_per_tok`"));

    copy_fixture("tiny-qwen3-moe", &d);
    edit_config(&d, |v| v["hidden_act"] = "gelu".into());
    assert!(load_err(&d).contains("`hidden_act`"));

    std::fs::write(d.join("config.json"), "{ not json").unwrap();
    assert!(load_err(&d).contains("not valid JSON"));
}

#[test]
fn prompt_longer_than_context_and_bad_requests_are_rejected() {
    let dir = fixture("tiny-qwen3-moe");
    let tok = Tokenizer::load(&dir).unwrap();
    let mut e = Engine::load(
        &dir,
        &EngineOptions {
            max_context: Some(64),
            ..Default::default()
        },
    )
    .unwrap();
    let req = |prompt: Prompt, max_tokens: usize| Request {
        prompt,
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        ignore_eos: true,
        prefill_chunk: 16,
    };
    let field = |r: Result<_, GenerateError>| match r {
        Err(GenerateError::InvalidArgument { field, .. }) => field,
        Err(other) => panic!("wrong error kind: {other}"),
        Ok(_) => panic!("request should fail"),
    };
    assert_eq!(
        field(generate::generate(
            &mut e,
            &tok,
            &req(Prompt::Ids(vec![5; 64]), 4),
            |_, _| {}
        )),
        "prompt"
    );
    assert_eq!(
        field(generate::generate(
            &mut e,
            &tok,
            &req(Prompt::Ids(vec![5; 4]), 0),
            |_, _| {}
        )),
        "max_tokens"
    );
    assert_eq!(
        field(generate::generate(
            &mut e,
            &tok,
            &req(Prompt::Ids(vec![5; 4]), 65),
            |_, _| {}
        )),
        "max_tokens"
    );
    assert_eq!(
        field(generate::generate(
            &mut e,
            &tok,
            &req(Prompt::Ids(vec![]), 4),
            |_, _| {}
        )),
        "prompt"
    );
    assert_eq!(
        field(generate::generate(
            &mut e,
            &tok,
            &req(Prompt::Text(String::new()), 4),
            |_, _| {}
        )),
        "prompt"
    );
    assert_eq!(
        field(generate::generate(
            &mut e,
            &tok,
            &req(Prompt::Ids(vec![4096]), 4),
            |_, _| {}
        )),
        "prompt_ids"
    );
    let mut bad = req(Prompt::Ids(vec![5; 4]), 4);
    bad.sampling.temperature = -1.0;
    assert_eq!(
        field(generate::generate(&mut e, &tok, &bad, |_, _| {})),
        "temperature"
    );
    // A request that could outgrow the context is refused up front, naming both numbers.
    assert_eq!(
        field(generate::generate(
            &mut e,
            &tok,
            &req(Prompt::Ids(vec![5; 60]), 64),
            |_, _| {}
        )),
        "max_tokens"
    );
    // Nothing leaked, and the engine still serves: a request that fills the context to the
    // brim runs to the limit.
    assert_eq!(e.kv_used(), 0);
    let out =
        generate::generate(&mut e, &tok, &req(Prompt::Ids(vec![5; 60]), 4), |_, _| {}).unwrap();
    assert_eq!(out.output_ids.len(), 4);
    assert_eq!(e.kv_used(), 0);
}
