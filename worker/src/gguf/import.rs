//! A GGUF checkpoint written out as a Hugging Face folder (`config.json`, `model.safetensors`,
//! `tokenizer.json`, `tokenizer_config.json`, `generation_config.json`), which the engine then
//! loads as any other: one loader, one set of family modules.
//!
//! - **Config**: the architecture's metadata (`{arch}.block_count`, `.embedding_length`, ...)
//!   become the family's `config.json` fields. What a GGUF does not carry takes the value
//!   llama.cpp itself runs the architecture with: Qwen2-MoE and OLMoE weights are not
//!   renormalised over the top-k, Qwen3-MoE's and Mixtral's are (`{arch}.expert_weights_norm`
//!   overrides). An architecture, tokenizer or rope scaling not handled here is refused naming
//!   the key.
//! - **Tensors**: the output config's own tensor list ([`ModelConfig::tensors`]) drives the
//!   write; each HF tensor is found under its llama.cpp name (`blk.{l}.attn_q.weight`, one
//!   expert's slice of `blk.{l}.ffn_gate_exps.weight`), its shape checked, dequantized
//!   ([`super::dequant`]) and written as f32 or bf16. llama.cpp's converter permutes the rows
//!   of the `llama` architecture's q and k projections (rotary pairs interleaved); that is
//!   undone here.
//! - **Tokenizer**: byte-level BPE (`tokenizer.ggml.model` "gpt2") with the vocabulary, merges
//!   and control / user-defined tokens of the metadata, split as `tokenizer.ggml.pre` says
//!   (llama.cpp's pre-tokenizer names); the chat template from `tokenizer.chat_template`.
//! - **Upcycling** ([`Upcycle`]): a dense model becomes a Mixtral-layout MoE whose experts are
//!   copies of each layer's MLP (Komatsuzaki et al., 2022). With identical experts and a zero
//!   router every expert gets the same weight, so the output is the dense model's exactly;
//!   `perturb` > 0 scales each expert weight by `1 + perturb·u` (u uniform in [-1, 1], seeded
//!   by the tensor's name) and gives the router random weights, so experts and routing differ
//!   while the answers stay close.

use super::{GgufError, GgufFile, TensorInfo};
use crate::config::ModelConfig;
use crate::family::tensors::Decl;
use crate::presets::name_seed;
use crate::weights::SafetensorsWriter;
use crate::weights::WeightDType;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::Path;
use switchyard_kernels::rng::Rng;

/// Turning a dense model into a Mixtral-layout MoE.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Upcycle {
    pub experts: usize,
    pub top_k: usize,
    pub perturb: f32,
    pub seed: u64,
}

#[derive(Clone, Copy, Debug)]
pub struct ImportOptions {
    pub dtype: WeightDType,
    pub upcycle: Option<Upcycle>,
    /// Write the tokenizer files only (a vocabulary-only GGUF has no tensors).
    pub tokenizer_only: bool,
}

/// What an import wrote.
#[derive(Clone, Debug, Default)]
pub struct Imported {
    /// The `architectures` entry written.
    pub architecture: String,
    pub tensors: usize,
    pub bytes: usize,
    /// Source tensors read, by ggml type.
    pub source_types: BTreeMap<&'static str, usize>,
    pub vocab_size: usize,
}

/// The GGUF architectures read, as the error lists them.
pub const ARCHITECTURES: &str =
    "llama (dense, and Mixtral's experts), qwen3moe, qwen2moe, olmoe, deepseek2 (V3), gpt-oss";

/// Imports `src` into the folder `out` (created).
pub fn import(src: &Path, out: &Path, opts: &ImportOptions) -> Result<Imported, GgufError> {
    let g = GgufFile::open(src)?;
    let io = |source| GgufError::Io {
        path: out.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(out).map_err(io)?;
    let mut done = Imported::default();
    let tok = tokenizer_files(&g)?;
    done.vocab_size = tok.vocab_size;
    for (name, v) in [
        ("tokenizer.json", &tok.tokenizer),
        ("tokenizer_config.json", &tok.config),
        ("generation_config.json", &tok.generation),
    ] {
        std::fs::write(out.join(name), serde_json::to_vec(v).expect("json")).map_err(io)?;
    }
    if opts.tokenizer_only {
        return Ok(done);
    }
    let mut config = hf_config(&g, &tok)?;
    let arch = g.str("general.architecture")?.to_string();
    if let Some(u) = opts.upcycle {
        config = upcycled(&g, config, u)?;
    }
    config["torch_dtype"] = json!(match opts.dtype {
        WeightDType::F32 => "float32",
        WeightDType::Bf16 => "bfloat16",
    });
    let cfg = ModelConfig::from_json(&config).map_err(|e| GgufError::Unsupported {
        path: g.path.clone(),
        detail: format!("the config written from its metadata is refused: {e}"),
    })?;
    done.architecture = config["architectures"][0]
        .as_str()
        .unwrap_or_default()
        .into();
    let decls = cfg.tensors();
    let st = match opts.dtype {
        WeightDType::F32 => "F32",
        WeightDType::Bf16 => "BF16",
    };
    let list: Vec<(String, &str, Vec<usize>)> = decls
        .iter()
        .map(|d| (d.name.clone(), st, d.shape.clone()))
        .collect();
    let file = out.join("model.safetensors");
    let mut w = SafetensorsWriter::create(&file, &list).map_err(io)?;
    let reader = Reader {
        g: &g,
        arch: &arch,
        permute_qk: arch == "llama",
        heads: cfg.num_heads,
        kv_heads: cfg.num_kv_heads,
        upcycle: opts.upcycle,
    };
    for d in &decls {
        let (v, ty) = reader.values(d)?;
        if let Some(ty) = ty {
            *done.source_types.entry(ty).or_default() += 1;
        }
        let bytes: Vec<u8> = match opts.dtype {
            WeightDType::F32 => bytemuck::cast_slice(&v).to_vec(),
            WeightDType::Bf16 => v
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
                .collect(),
        };
        done.bytes += bytes.len();
        w.write_next(&d.name, &bytes).map_err(io)?;
        done.tensors += 1;
    }
    w.finish().map_err(io)?;
    // A stale index from an earlier import into this folder would shadow the new file.
    let _ = std::fs::remove_file(out.join("model.safetensors.index.json"));
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config).expect("json"),
    )
    .map_err(io)?;
    Ok(done)
}

/// The tokenizer files and what the config needs from them.
struct TokenizerFiles {
    tokenizer: Value,
    config: Value,
    generation: Value,
    vocab_size: usize,
    bos: Option<usize>,
    eos: Option<usize>,
    pad: Option<usize>,
}

const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer names read (llama.cpp's `tokenizer.ggml.pre`).
const PRE_TOKENIZERS: &str =
    "default, gpt2, smollm, qwen2, deepseek-r1-qwen, llama3, llama-bpe, smaug-bpe, dbrx";

fn tokenizer_files(g: &GgufFile) -> Result<TokenizerFiles, GgufError> {
    let model = g.str("tokenizer.ggml.model")?;
    if model != "gpt2" && model != "llama" {
        return Err(GgufError::Unsupported {
            path: g.path.clone(),
            detail: format!(
                "tokenizer.ggml.model {model:?}: byte-level BPE (\"gpt2\") and SentencePiece BPE (\"llama\") vocabularies are imported"
            ),
        });
    }
    let tokens = g.strings("tokenizer.ggml.tokens")?;
    let merges = match g.get("tokenizer.ggml.merges") {
        Some(_) => g.strings("tokenizer.ggml.merges")?,
        None => vec![],
    };
    let types: Vec<u64> = match g
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.as_array())
    {
        Some(a) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(GgufError::Metadata {
            path: g.path.clone(),
            key: "tokenizer.ggml.token_type".into(),
            detail: format!("{} entries for {} tokens", types.len(), tokens.len()),
        });
    }
    let byte_level = |use_regex: bool, trim: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": trim, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    let pre = g
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let (normalizer, pre_tokenizer, ignore_merges) = match pre {
        _ if model == "llama" => (Value::Null, Value::Null, false),
        "default" | "gpt2" | "gpt-2" | "olmo" | "mpt" => {
            (Value::Null, byte_level(true, true), false)
        }
        "smollm" | "starcoder" | "refact" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true, true)]}),
            false,
        ),
        "qwen2" | "deepseek-r1-qwen" => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false, false)]}),
            false,
        ),
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" | "dbrx" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false, false)]}),
            true,
        ),
        other => {
            return Err(GgufError::Unsupported {
                path: g.path.clone(),
                detail: format!(
                    "tokenizer.ggml.pre {other:?} is not imported (known: {PRE_TOKENIZERS})"
                ),
            })
        }
    };
    // 2: unknown, 3: control (special), 4: user-defined (added, matched whole, not special).
    let added: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &t))| t == 2 || t == 3 || t == 4)
        .map(|(i, (tok, &t))| {
            json!({"id": i, "content": tok, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": t != 4})
        })
        .collect();
    let vocab: Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    let merges: Vec<Value> = if model == "llama" {
        sentencepiece_merges(g, &tokens)?
    } else {
        merges
            .iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok(json!([a, b])),
                None => Err(GgufError::Metadata {
                    path: g.path.clone(),
                    key: "tokenizer.ggml.merges".into(),
                    detail: format!("merge {m:?} is not two tokens"),
                }),
            })
            .collect::<Result<_, _>>()?
    };
    let id = |key: &str| g.opt_usize(key);
    let (bos, eos, pad) = (
        id("tokenizer.ggml.bos_token_id")?,
        id("tokenizer.ggml.eos_token_id")?,
        id("tokenizer.ggml.padding_token_id")?,
    );
    for (key, v) in [("bos", bos), ("eos", eos), ("padding", pad)] {
        if v.is_some_and(|v| v >= tokens.len()) {
            return Err(GgufError::Metadata {
                path: g.path.clone(),
                key: format!("tokenizer.ggml.{key}_token_id"),
                detail: format!("{v:?} is outside the vocabulary ({})", tokens.len()),
            });
        }
    }
    // llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
    let add_bos = g
        .opt_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(model == "llama");
    let post = match (add_bos, bos) {
        (true, Some(b)) => json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": tokens[b], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": tokens[b], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {tokens[b]: {"id": tokens[b], "ids": [b], "tokens": [tokens[b]]}}}),
        _ => Value::Null,
    };
    let mut tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
    });
    if model == "llama" {
        // SentencePiece: spaces are `▁`, one prepended (`add_space_prefix`, llama.cpp's default),
        // unknown bytes fall back to `<0xNN>` tokens.
        let space = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
        tokenizer["normalizer"] = match g
            .opt_bool("tokenizer.ggml.add_space_prefix")?
            .unwrap_or(true)
        {
            true => json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"}, space]}),
            false => space,
        };
        tokenizer["decoder"] = json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]});
        let unk = g
            .opt_usize("tokenizer.ggml.unknown_token_id")?
            .filter(|&u| u < tokens.len());
        let m = &mut tokenizer["model"];
        m["unk_token"] = json!(unk.map(|u| tokens[u]));
        m["fuse_unk"] = json!(true);
        m["byte_fallback"] = json!(true);
    }
    let name = |i: Option<usize>| i.map(|i| tokens[i]);
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "bos_token": name(bos), "eos_token": name(eos), "pad_token": name(pad),
    });
    if let Some(t) = g.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
        config["chat_template"] = json!(t);
    }
    let generation = json!({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad});
    Ok(TokenizerFiles {
        tokenizer,
        config,
        generation,
        vocab_size: tokens.len(),
        bos,
        eos,
        pad,
    })
}

/// The merges a SentencePiece BPE vocabulary implies (its GGUF lists none), as transformers
/// derives them (`generate_merges`): every split of a token into two tokens, ranked by the
/// token's score, higher first, then by the pieces' lengths, longer first; ties keep
/// vocabulary order.
fn sentencepiece_merges(g: &GgufFile, tokens: &[&str]) -> Result<Vec<Value>, GgufError> {
    let scores: Vec<f64> = match g.get("tokenizer.ggml.scores").and_then(|v| v.as_array()) {
        Some(a) if a.len() == tokens.len() => a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
        _ => {
            return Err(GgufError::Metadata {
                path: g.path.clone(),
                key: "tokenizer.ggml.scores".into(),
                detail: "a SentencePiece vocabulary needs a score per token".into(),
            })
        }
    };
    let index: std::collections::HashMap<&str, usize> =
        tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for (t, &score) in tokens.iter().zip(&scores) {
        let mut local: Vec<(&str, &str, f64)> = t
            .char_indices()
            .skip(1)
            .map(|(b, _)| (&t[..b], &t[b..]))
            .filter(|(l, r)| index.contains_key(l) && index.contains_key(r))
            .map(|(l, r)| (l, r, score))
            .collect();
        local.sort_by_key(|(l, r, _)| (index[l], index[r]));
        merges.extend(local);
    }
    let chars = |s: &str| s.chars().count();
    merges.sort_by(|a, b| {
        (b.2, chars(b.0), chars(b.1))
            .partial_cmp(&(a.2, chars(a.0), chars(a.1)))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    Ok(merges.into_iter().map(|(l, r, _)| json!([l, r])).collect())
}

/// The Hugging Face `config.json` of the file's architecture.
fn hf_config(g: &GgufFile, tok: &TokenizerFiles) -> Result<Value, GgufError> {
    let arch = g.str("general.architecture")?;
    let k = |s: &str| format!("{arch}.{s}");
    let unsupported = |detail: String| GgufError::Unsupported {
        path: g.path.clone(),
        detail,
    };
    let hidden = g.usize(&k("embedding_length"))?;
    let heads = g.usize(&k("attention.head_count"))?;
    let kv_heads = g.opt_usize(&k("attention.head_count_kv"))?.unwrap_or(heads);
    if heads == 0 || kv_heads == 0 || hidden % heads != 0 {
        return Err(unsupported(format!(
            "{}: {heads} heads for embedding_length {hidden}",
            k("attention.head_count")
        )));
    }
    let head_dim = g
        .opt_usize(&k("attention.key_length"))?
        .unwrap_or(hidden / heads);
    // MLA's key/value lengths are the latent's; its head dims are read below.
    let mla = arch == "deepseek2";
    if let (false, Some(v)) = (mla, g.opt_usize(&k("attention.value_length"))?) {
        if v != head_dim {
            return Err(unsupported(format!(
                "{}: value heads of {v} beside key heads of {head_dim} are not implemented",
                k("attention.value_length")
            )));
        }
    }
    if let (false, Some(r)) = (mla, g.opt_usize(&k("rope.dimension_count"))?) {
        if r != head_dim {
            return Err(unsupported(format!(
                "{}: rotary over {r} of {head_dim} head dims (partial rotary) is not implemented",
                k("rope.dimension_count")
            )));
        }
    }
    let context = g.usize(&k("context_length"))?;
    let rope_scaling = match g.get(&k("rope.scaling.type")).and_then(|v| v.as_str()) {
        None | Some("none") => Value::Null,
        Some(t @ ("linear" | "yarn")) => {
            let factor = g.opt_f64(&k("rope.scaling.factor"))?.ok_or_else(|| {
                unsupported(format!("{} without a factor", k("rope.scaling.type")))
            })?;
            let mut s = json!({"rope_type": t, "factor": factor});
            if t == "yarn" {
                s["original_max_position_embeddings"] =
                    json!(g.usize(&k("rope.scaling.original_context_length"))?);
                for (key, field) in [
                    ("yarn_beta_fast", "beta_fast"),
                    ("yarn_beta_slow", "beta_slow"),
                ] {
                    if let Some(v) = g.opt_f64(&k(&format!("rope.scaling.{key}")))? {
                        s[field] = json!(v);
                    }
                }
                // DeepSeek's converter writes 0.1 · mscale_all_dim here.
                if let Some(m) = g.opt_f64(&k("rope.scaling.yarn_log_multiplier"))? {
                    s["mscale"] = json!(m / 0.1);
                    s["mscale_all_dim"] = json!(m / 0.1);
                }
                if arch == "gpt-oss" {
                    s["truncate"] = json!(false);
                }
            }
            s
        }
        Some(t) => {
            return Err(unsupported(format!(
                "{} {t:?} is not imported (none, linear, yarn)",
                k("rope.scaling.type")
            )))
        }
    };
    let experts = g.opt_usize(&k("expert_count"))?.unwrap_or(0);
    let used = g.opt_usize(&k("expert_used_count"))?.unwrap_or(0);
    let norm = g.opt_bool(&k("expert_weights_norm"))?;
    let vocab = g.opt_usize(&k("vocab_size"))?.unwrap_or(tok.vocab_size);
    let mut c = json!({
        "hidden_size": hidden,
        "num_hidden_layers": g.usize(&k("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": g.opt_f64(&k("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| unsupported(format!("{}: missing (only RMSNorm models are imported)",
                k("attention.layer_norm_rms_epsilon"))))?,
        "rope_theta": g.opt_f64(&k("rope.freq_base"))?.unwrap_or(10000.0),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": context,
        "vocab_size": vocab,
        "tie_word_embeddings": g.tensor("output.weight").is_none(),
        "bos_token_id": tok.bos, "eos_token_id": tok.eos, "pad_token_id": tok.pad,
        "hidden_act": "silu",
    });
    let ff = || g.usize(&k("feed_forward_length"));
    let expert_ff = || g.usize(&k("expert_feed_forward_length"));
    let fields = match arch {
        "llama" if experts > 0 => {
            if norm == Some(false) {
                return Err(unsupported(format!(
                    "{}: false (Mixtral always renormalises)",
                    k("expert_weights_norm")
                )));
            }
            json!({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                   "num_local_experts": experts, "num_experts_per_tok": used,
                   "intermediate_size": ff()?, "sliding_window": null})
        }
        "llama" => json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "intermediate_size": ff()?,
            "attention_bias": g.tensor("blk.0.attn_q.bias").is_some(), "mlp_bias": false}),
        "qwen3moe" => json!({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "num_experts": experts, "num_experts_per_tok": used,
            "moe_intermediate_size": expert_ff()?, "intermediate_size": ff()?,
            "norm_topk_prob": norm.unwrap_or(true), "decoder_sparse_step": 1,
            "mlp_only_layers": [], "attention_bias": false}),
        "qwen2moe" => json!({"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
            "num_experts": experts, "num_experts_per_tok": used,
            "moe_intermediate_size": expert_ff()?, "intermediate_size": ff()?,
            "shared_expert_intermediate_size": g.usize(&k("expert_shared_feed_forward_length"))?,
            "norm_topk_prob": norm.unwrap_or(false), "decoder_sparse_step": 1,
            "mlp_only_layers": []}),
        "olmoe" => json!({"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe",
            "num_experts": experts, "num_experts_per_tok": used, "intermediate_size": ff()?,
            "norm_topk_prob": norm.unwrap_or(false), "clip_qkv": null}),
        "deepseek2" => {
            let rope = g.usize(&k("rope.dimension_count"))?;
            let key = g
                .opt_usize(&k("attention.key_length_mla"))?
                .unwrap_or(head_dim);
            let value = match g.opt_usize(&k("attention.value_length_mla"))? {
                Some(v) => v,
                None => g.usize(&k("attention.value_length"))?,
            };
            if key <= rope {
                return Err(unsupported(format!(
                    "{}: {key} is not more than the rope dims {rope}",
                    k("attention.key_length_mla")
                )));
            }
            let first_dense = g.opt_usize(&k("leading_dense_block_count"))?.unwrap_or(0);
            // 1: softmax (DeepSeek-V2), 2: sigmoid (V3). Files without the key predate V3,
            // except that a V3 has its correction bias (`exp_probs_b`).
            let sigmoid = match g.opt_usize(&k("expert_gating_func"))? {
                Some(2) => true,
                Some(1) => false,
                None => g
                    .tensor(&format!("blk.{first_dense}.exp_probs_b.bias"))
                    .is_some(),
                Some(f) => return Err(unsupported(format!("{}: {f}", k("expert_gating_func")))),
            };
            if !sigmoid {
                return Err(unsupported(format!(
                    "{}: softmax routing (DeepSeek-V2) is not implemented, only V3's sigmoid",
                    k("expert_gating_func")
                )));
            }
            let q_lora = g.opt_usize(&k("attention.q_lora_rank"))?.filter(|&r| r > 0);
            c["num_key_value_heads"] = json!(heads);
            c.as_object_mut().expect("object").remove("head_dim");
            json!({"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
                "q_lora_rank": q_lora, "kv_lora_rank": g.usize(&k("attention.kv_lora_rank"))?,
                "qk_nope_head_dim": key - rope, "qk_rope_head_dim": rope, "v_head_dim": value,
                "rope_interleave": true,
                "n_routed_experts": experts, "num_experts_per_tok": used,
                "moe_intermediate_size": expert_ff()?, "intermediate_size": ff()?,
                "n_shared_experts": g.opt_usize(&k("expert_shared_count"))?.unwrap_or(0),
                "first_k_dense_replace": first_dense,
                "n_group": g.opt_usize(&k("expert_group_count"))?.unwrap_or(1),
                "topk_group": g.opt_usize(&k("expert_group_used_count"))?.unwrap_or(1),
                "routed_scaling_factor": g.opt_f64(&k("expert_weights_scale"))?.unwrap_or(1.0),
                "norm_topk_prob": norm.unwrap_or(false),
                "scoring_func": "sigmoid", "topk_method": "noaux_tc",
                // The converter counts multi-token-prediction layers in block_count; the
                // decoder is the layers before them, and they are not imported.
                "num_hidden_layers": g.usize(&k("block_count"))?
                    .saturating_sub(g.opt_usize(&k("nextn_predict_layers"))?.unwrap_or(0)),
                "num_nextn_predict_layers": 0,
                "attention_bias": false})
        }
        "gpt-oss" => {
            let layers = g.usize(&k("block_count"))?;
            let window = g.usize(&k("attention.sliding_window"))?;
            // llama.cpp's pattern for gpt-oss, as released.
            let kinds = crate::family::gpt_oss::alternating_layer_types(layers);
            json!({"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
                "num_local_experts": experts, "num_experts_per_tok": used,
                "intermediate_size": expert_ff()?, "attention_bias": true,
                "sliding_window": window, "layer_types": kinds,
                "swiglu_alpha": 1.702, "swiglu_limit": 7.0})
        }
        other => {
            return Err(unsupported(format!(
                "general.architecture {other:?} is not imported (imported: {ARCHITECTURES})"
            )))
        }
    };

    for (key, v) in fields.as_object().expect("object") {
        c[key] = v.clone();
    }
    Ok(c)
}

/// The config of `dense` upcycled into a Mixtral-layout MoE.
fn upcycled(g: &GgufFile, mut dense: Value, u: Upcycle) -> Result<Value, GgufError> {
    if dense["architectures"][0] != "LlamaForCausalLM" {
        return Err(GgufError::Unsupported {
            path: g.path.clone(),
            detail: format!(
                "--upcycle-experts needs a dense model; this one is {}",
                dense["architectures"][0]
            ),
        });
    }
    if u.experts < 1 || u.top_k < 1 || u.top_k > u.experts {
        return Err(GgufError::Unsupported {
            path: g.path.clone(),
            detail: format!(
                "upcycling to {} experts with top-{}: need 1 <= top-k <= experts",
                u.experts, u.top_k
            ),
        });
    }
    if dense["attention_bias"] == true {
        return Err(GgufError::Unsupported {
            path: g.path.clone(),
            detail: "upcycling a model with attention biases (Mixtral has none)".into(),
        });
    }
    let o = dense.as_object_mut().expect("object");
    o.remove("attention_bias");
    o.remove("mlp_bias");
    o.insert("architectures".into(), json!(["MixtralForCausalLM"]));
    o.insert("model_type".into(), json!("mixtral"));
    o.insert("num_local_experts".into(), json!(u.experts));
    o.insert("num_experts_per_tok".into(), json!(u.top_k));
    o.insert("sliding_window".into(), Value::Null);
    o.insert(
        "upcycled_from".into(),
        json!({"experts": u.experts, "perturb": u.perturb, "seed": u.seed}),
    );
    Ok(dense)
}

/// Where an HF tensor's values come from.
enum Source {
    /// A whole GGUF tensor.
    Whole(String),
    /// Expert `e`'s slice of a `[E, out, in]` GGUF tensor.
    Expert(String, usize),
    /// Upcycling: a copy of a dense tensor for expert `e`.
    Copy(String, usize),
    /// Upcycling: the router.
    Router,
    /// GPT-OSS's fused `gate_up_proj` `[E, hidden, 2·inter]` (or its bias `[E, 2·inter]`),
    /// gate and up interleaved, from `ffn_{gate,up}_exps` (`[E, inter, hidden]`).
    FusedGateUp { bias: bool, block: String },
    /// GPT-OSS's fused `down_proj` `[E, inter, hidden]` from `ffn_down_exps`
    /// `[E, hidden, inter]` (transposed), or its bias as is.
    FusedDown { bias: bool, block: String },
    /// MLA's `kv_b_proj` `[heads·(nope + v), kv_lora]`, from `attn_kv_b` or from the split
    /// `attn_k_b` `[heads, kv_lora, nope]` and `attn_v_b` `[heads, v, kv_lora]` that newer
    /// converters write.
    KvB(String),
}

struct Reader<'a> {
    g: &'a GgufFile,
    arch: &'a str,
    permute_qk: bool,
    heads: usize,
    kv_heads: usize,
    upcycle: Option<Upcycle>,
}

impl Reader<'_> {
    fn missing(&self, d: &Decl, what: &str) -> GgufError {
        GgufError::Tensor {
            path: self.g.path.clone(),
            tensor: what.into(),
            detail: format!("missing (needed for {})", d.name),
        }
    }

    /// The GGUF source of an HF tensor name.
    fn source(&self, name: &str) -> Option<Source> {
        let whole = |s: &str| Some(Source::Whole(s.to_string()));
        match name {
            "model.embed_tokens.weight" => return whole("token_embd.weight"),
            "lm_head.weight" => return whole("output.weight"),
            "model.norm.weight" => return whole("output_norm.weight"),
            _ => {}
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (l, rest) = rest.split_once('.')?;
        let b = format!("blk.{l}");
        let block = b.clone();
        match rest {
            "self_attn.sinks" => return whole(&format!("{b}.attn_sinks.weight")),
            "mlp.gate.e_score_correction_bias" => return whole(&format!("{b}.exp_probs_b.bias")),
            "self_attn.kv_b_proj.weight" => return Some(Source::KvB(b)),
            "mlp.experts.gate_up_proj" => return Some(Source::FusedGateUp { bias: false, block }),
            "mlp.experts.gate_up_proj_bias" => {
                return Some(Source::FusedGateUp { bias: true, block })
            }
            "mlp.experts.down_proj" => return Some(Source::FusedDown { bias: false, block }),
            "mlp.experts.down_proj_bias" => return Some(Source::FusedDown { bias: true, block }),
            _ => {}
        }
        let (stem, suffix) = rest.rsplit_once('.')?;
        let plain = match stem {
            "input_layernorm" => Some("attn_norm"),
            "post_attention_layernorm" if self.arch == "gpt-oss" => Some("post_attention_norm"),
            "post_attention_layernorm" => Some("ffn_norm"),
            "self_attn.q_a_proj" => Some("attn_q_a"),
            "self_attn.q_a_layernorm" => Some("attn_q_a_norm"),
            "self_attn.q_b_proj" => Some("attn_q_b"),
            "self_attn.kv_a_proj_with_mqa" => Some("attn_kv_a_mqa"),
            "self_attn.kv_a_layernorm" => Some("attn_kv_a_norm"),
            "mlp.shared_experts.gate_proj" => Some("ffn_gate_shexp"),
            "mlp.shared_experts.up_proj" => Some("ffn_up_shexp"),
            "mlp.shared_experts.down_proj" => Some("ffn_down_shexp"),
            "mlp.router" => Some("ffn_gate_inp"),
            "self_attn.q_proj" => Some("attn_q"),
            "self_attn.k_proj" => Some("attn_k"),
            "self_attn.v_proj" => Some("attn_v"),
            "self_attn.o_proj" => Some("attn_output"),
            "self_attn.q_norm" => Some("attn_q_norm"),
            "self_attn.k_norm" => Some("attn_k_norm"),
            "mlp.gate_proj" => Some("ffn_gate"),
            "mlp.up_proj" => Some("ffn_up"),
            "mlp.down_proj" => Some("ffn_down"),
            "mlp.shared_expert.gate_proj" => Some("ffn_gate_shexp"),
            "mlp.shared_expert.up_proj" => Some("ffn_up_shexp"),
            "mlp.shared_expert.down_proj" => Some("ffn_down_shexp"),
            "mlp.shared_expert_gate" => Some("ffn_gate_inp_shexp"),
            "mlp.gate" | "block_sparse_moe.gate" => {
                if self.upcycle.is_some() {
                    return Some(Source::Router);
                }
                Some("ffn_gate_inp")
            }
            _ => None,
        };
        if let Some(p) = plain {
            return Some(Source::Whole(format!("{b}.{p}.{suffix}")));
        }
        // `{mlp}.experts.{e}.{proj}`
        let experts = stem
            .strip_prefix("mlp.experts.")
            .or_else(|| stem.strip_prefix("block_sparse_moe.experts."))?;
        let (e, proj) = experts.split_once('.')?;
        let e: usize = e.parse().ok()?;
        let kind = match proj {
            "gate_proj" | "w1" => "gate",
            "up_proj" | "w3" => "up",
            "down_proj" | "w2" => "down",
            _ => return None,
        };
        Some(match self.upcycle {
            Some(_) => Source::Copy(format!("{b}.ffn_{kind}.{suffix}"), e),
            None => Source::Expert(format!("{b}.ffn_{kind}_exps.{suffix}"), e),
        })
    }

    fn info(&self, d: &Decl, name: &str) -> Result<&TensorInfo, GgufError> {
        self.g.tensor(name).ok_or_else(|| self.missing(d, name))
    }

    fn shape_err(&self, d: &Decl, t: &TensorInfo, want: &[usize]) -> GgufError {
        GgufError::Tensor {
            path: self.g.path.clone(),
            tensor: t.name.clone(),
            detail: format!("shape {:?} where {} needs {want:?}", t.shape(), d.name),
        }
    }

    /// The tensor's values (row-major in `d.shape`) and the ggml type read.
    fn values(&self, d: &Decl) -> Result<(Vec<f32>, Option<&'static str>), GgufError> {
        let src = self.source(&d.name).ok_or_else(|| GgufError::Unsupported {
            path: self.g.path.clone(),
            detail: format!("no GGUF tensor is known for {}", d.name),
        })?;
        match src {
            Source::Whole(n) => self.whole(d, &n, None),
            Source::Copy(n, e) => self.whole(d, &n, Some(e)),
            Source::Expert(n, e) => {
                let t = self.info(d, &n)?;
                let s = t.shape();
                if s.len() != 3 || e >= s[0] || s[1..] != d.shape[..] {
                    return Err(self.shape_err(d, t, &[e + 1, d.shape[0], d.shape[1]]));
                }
                // Rows are whole blocks, so one expert's bytes are a contiguous slice.
                let per = t.nbytes / s[0];
                let bytes = &self.g.bytes(t)[e * per..(e + 1) * per];
                let v = super::dequant::dequantize(t.ty, bytes, s[1] * s[2]);
                Ok((v, Some(t.ty.name())))
            }
            Source::FusedGateUp { bias, block } => self.fused_gate_up(d, &block, bias),
            Source::FusedDown { bias, block } => self.fused_down(d, &block, bias),
            Source::KvB(block) => self.kv_b(d, &block),
            Source::Router => {
                let n: usize = d.shape.iter().product();
                let u = self.upcycle.expect("router only when upcycling");
                if u.perturb == 0.0 {
                    return Ok((vec![0.0; n], None));
                }
                let mut rng = Rng::new(name_seed(u.seed, &d.name));
                let std = 1.0 / (d.shape[1] as f64).sqrt();
                Ok(((0..n).map(|_| (std * rng.normal()) as f32).collect(), None))
            }
        }
    }

    /// A tensor of the given row-major shape, checked.
    fn shaped(
        &self,
        d: &Decl,
        name: &str,
        want: &[usize],
    ) -> Result<(&TensorInfo, Vec<f32>), GgufError> {
        let t = self.info(d, name)?;
        if t.shape() != want {
            return Err(self.shape_err(d, t, want));
        }
        Ok((t, self.g.f32s(t)))
    }

    fn fused_gate_up(
        &self,
        d: &Decl,
        b: &str,
        bias: bool,
    ) -> Result<(Vec<f32>, Option<&'static str>), GgufError> {
        let (e, two_i) = (d.shape[0], *d.shape.last().expect("shape"));
        let i = two_i / 2;
        let suffix = if bias { "bias" } else { "weight" };
        let h = if bias { 1 } else { d.shape[1] };
        let want: Vec<usize> = if bias { vec![e, i] } else { vec![e, i, h] };
        let (t, gate) = self.shaped(d, &format!("{b}.ffn_gate_exps.{suffix}"), &want)?;
        let (_, up) = self.shaped(d, &format!("{b}.ffn_up_exps.{suffix}"), &want)?;
        let mut out = vec![0.0; e * h * two_i];
        for x in 0..e {
            for r in 0..i {
                for c in 0..h {
                    let src = (x * i + r) * h + c;
                    let dst = (x * h + c) * two_i + 2 * r;
                    out[dst] = gate[src];
                    out[dst + 1] = up[src];
                }
            }
        }
        Ok((out, Some(t.ty.name())))
    }

    fn fused_down(
        &self,
        d: &Decl,
        b: &str,
        bias: bool,
    ) -> Result<(Vec<f32>, Option<&'static str>), GgufError> {
        if bias {
            let (t, v) = self.shaped(d, &format!("{b}.ffn_down_exps.bias"), &d.shape)?;
            return Ok((v, Some(t.ty.name())));
        }
        let (e, i, h) = (d.shape[0], d.shape[1], d.shape[2]);
        let (t, v) = self.shaped(d, &format!("{b}.ffn_down_exps.weight"), &[e, h, i])?;
        let mut out = vec![0.0; v.len()];
        for x in 0..e {
            for r in 0..h {
                for c in 0..i {
                    out[(x * i + c) * h + r] = v[(x * h + r) * i + c];
                }
            }
        }
        Ok((out, Some(t.ty.name())))
    }

    fn kv_b(&self, d: &Decl, b: &str) -> Result<(Vec<f32>, Option<&'static str>), GgufError> {
        let whole = format!("{b}.attn_kv_b.weight");
        if self.g.tensor(&whole).is_some() {
            let (t, v) = self.shaped(d, &whole, &d.shape)?;
            return Ok((v, Some(t.ty.name())));
        }
        let (rows, lora) = (d.shape[0], d.shape[1]);
        let heads = self.heads;
        let kb = self.info(d, &format!("{b}.attn_k_b.weight"))?;
        let nope = *kb.shape().last().expect("shape");
        let per = rows / heads;
        if per <= nope {
            return Err(self.shape_err(d, kb, &[heads, lora, per]));
        }
        let v_dim = per - nope;
        let (t, k) = self.shaped(d, &format!("{b}.attn_k_b.weight"), &[heads, lora, nope])?;
        let (_, v) = self.shaped(d, &format!("{b}.attn_v_b.weight"), &[heads, v_dim, lora])?;
        let mut out = vec![0.0; rows * lora];
        for h in 0..heads {
            for r in 0..nope {
                for c in 0..lora {
                    out[(h * per + r) * lora + c] = k[(h * lora + c) * nope + r];
                }
            }
            let dst = (h * per + nope) * lora;
            out[dst..dst + v_dim * lora]
                .copy_from_slice(&v[h * v_dim * lora..(h + 1) * v_dim * lora]);
        }
        Ok((out, Some(t.ty.name())))
    }

    /// A whole tensor (q/k rows put back in HF order); with `expert`, an upcycled copy.
    fn whole(
        &self,
        d: &Decl,
        n: &str,
        expert: Option<usize>,
    ) -> Result<(Vec<f32>, Option<&'static str>), GgufError> {
        let squeeze = |s: &[usize]| s.iter().copied().filter(|&x| x != 1).collect::<Vec<_>>();
        let t = self.info(d, n)?;
        if squeeze(&t.shape()) != squeeze(&d.shape) {
            return Err(self.shape_err(d, t, &d.shape));
        }
        let mut v = self.g.f32s(t);
        if self.permute_qk {
            let heads = match n.rsplit('.').nth(1) {
                Some("attn_q") => Some(self.heads),
                Some("attn_k") => Some(self.kv_heads),
                _ => None,
            };
            if let Some(heads) = heads {
                v = unpermute_rows(&v, heads, t.shape().get(1).copied().unwrap_or(1));
            }
        }
        if let (Some(e), Some(u)) = (expert, self.upcycle) {
            perturb(&mut v, u, &d.name, e);
        }
        Ok((v, Some(t.ty.name())))
    }
}

/// Undoes llama.cpp's `permute` of a q/k projection: GGUF row `h·d + 2i + j` is HF row
/// `h·d + j·d/2 + i` (rotary halves interleaved into pairs). `cols` is 1 for a bias.
pub fn unpermute_rows(v: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = v.len() / cols;
    let d = rows / heads;
    let half = d / 2;
    let mut out = vec![0.0; v.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * d + 2 * i + j) * cols;
                let dst = (h * d + j * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&v[src..src + cols]);
            }
        }
    }
    out
}

fn perturb(v: &mut [f32], u: Upcycle, name: &str, e: usize) {
    if u.perturb == 0.0 {
        return;
    }
    let mut rng = Rng::new(name_seed(u.seed ^ e as u64, name));
    for x in v.iter_mut() {
        *x *= 1.0 + u.perturb * (2.0 * rng.next_f64() as f32 - 1.0);
    }
}
