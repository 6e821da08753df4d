//! One generation request run in process against an [`Engine`]: prompt preparation and
//! validation, chunked prefill, sampling, EOS and stop strings, streamed text.
//!
//! Validation happens before any state changes; every error names the offending field.

use crate::text::{Chat, OutputText, TextDelta, Tokenizer};
use crate::GenerateError;
use switchyard_kernels::rng::Rng;
use switchyard_kernels::sampling::{self, SamplingParams};
use switchyard_worker::engine::{ChunkSpec, Engine, Logits};

/// What the model is asked to continue.
#[derive(Clone, Debug)]
pub enum Prompt {
    Text(String),
    Chat(Chat),
    Ids(Vec<u32>),
}

#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Prompt,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Prefill chunk size in tokens.
    pub prefill_chunk: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Output {
    pub prompt_ids: Vec<u32>,
    pub output_ids: Vec<u32>,
    /// Everything generated as text (reasoning then answer), special tokens skipped.
    pub text: String,
    pub reasoning: String,
    pub answer: String,
    pub finish_reason: FinishReason,
}

fn invalid(field: &'static str, detail: impl Into<String>) -> GenerateError {
    GenerateError::InvalidArgument {
        field,
        detail: detail.into(),
    }
}

/// Tokenizes the prompt and checks it against the model.
pub fn prompt_ids(
    tok: &Tokenizer,
    prompt: &Prompt,
    vocab: usize,
) -> Result<Vec<u32>, GenerateError> {
    let ids = match prompt {
        Prompt::Text(t) => {
            if t.is_empty() {
                return Err(invalid("prompt", "is empty"));
            }
            tok.encode(t)?
        }
        Prompt::Chat(c) => {
            if c.messages.is_empty() {
                return Err(invalid("messages", "is empty"));
            }
            tok.encode_chat(c)?
        }
        Prompt::Ids(ids) => {
            if let Some(bad) = ids.iter().find(|t| **t as usize >= vocab) {
                return Err(invalid(
                    "prompt_ids",
                    format!("token id {bad} is outside the vocabulary (size {vocab})"),
                ));
            }
            ids.clone()
        }
    };
    if ids.is_empty() {
        return Err(invalid("prompt", "encodes to no tokens"));
    }
    Ok(ids)
}

/// Checks a request's limits and sampling settings against a prompt length and context size.
///
/// `max_context` is the longest sequence (prompt + generated tokens) the server runs:
/// `--max-model-len`, at most one worker's KV cache. A request that could outgrow it is
/// refused here rather than queued for blocks that would never exist.
pub fn validate(req: &Request, prompt_len: usize, max_context: usize) -> Result<(), GenerateError> {
    if prompt_len >= max_context {
        return Err(invalid("prompt", format!("has {prompt_len} tokens; the maximum context length is {max_context} tokens, leaving no room to generate")));
    }
    if req.max_tokens == 0 {
        return Err(invalid("max_tokens", "must be at least 1"));
    }
    if prompt_len + req.max_tokens > max_context {
        return Err(invalid(
            "max_tokens",
            format!(
                "prompt ({prompt_len} tokens) + max_tokens ({}) = {} exceeds the maximum context length of {max_context} tokens",
                req.max_tokens,
                prompt_len + req.max_tokens
            ),
        ));
    }
    if req.prefill_chunk == 0 {
        return Err(invalid("prefill_chunk", "must be at least 1"));
    }
    req.sampling.validate().map_err(|e| match e {
        switchyard_kernels::KernelError::Param { name, detail, .. } => invalid(name, detail),
        other => invalid("sampling", other.to_string()),
    })
}

/// Runs `req` to completion, calling `on_delta` with each piece of text and token as it is
/// produced. The sequence is released from the engine whatever the outcome.
pub fn generate(
    engine: &mut Engine,
    tok: &Tokenizer,
    req: &Request,
    mut on_delta: impl FnMut(&TextDelta, u32),
) -> Result<Output, GenerateError> {
    let prompt = prompt_ids(tok, &req.prompt, engine.config().vocab_size)?;
    validate(req, prompt.len(), engine.max_context())?;
    const SEQ: u64 = 0;
    engine.release(SEQ);
    let result = run(engine, tok, req, &prompt, SEQ, &mut on_delta);
    engine.release(SEQ);
    result
}

fn run(
    engine: &mut Engine,
    tok: &Tokenizer,
    req: &Request,
    prompt: &[u32],
    seq: u64,
    on_delta: &mut impl FnMut(&TextDelta, u32),
) -> Result<Output, GenerateError> {
    let vocab = engine.config().vocab_size;
    let max_new = req.max_tokens.min(engine.max_context() - prompt.len());
    let mut rng = Rng::new(req.sampling.seed);
    let mut history = prompt.to_vec();
    let mut text = OutputText::new(tok, prompt, req.stop.clone());
    let (mut reasoning, mut answer) = (String::new(), String::new());
    let mut output_ids = Vec::new();
    let chunks: Vec<&[u32]> = prompt.chunks(req.prefill_chunk).collect();
    let mut logits = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let want = if i + 1 == chunks.len() {
            Logits::Last
        } else {
            Logits::None
        };
        logits = engine
            .step(
                &[ChunkSpec {
                    seq_id: seq,
                    tokens: c,
                    logits: want,
                }],
                false,
            )?
            .logits;
    }
    let mut finish = FinishReason::Length;
    loop {
        let seen = sampling::Seen {
            tokens: &history,
            prompt_len: prompt.len(),
            banned: &[],
            allowed: None,
        };
        let next = sampling::sample(&mut logits[..vocab], &req.sampling, seen, &mut rng);
        output_ids.push(next);
        history.push(next);
        let is_eos = !req.ignore_eos && tok.eos_ids.contains(&next);
        let mut delta = if is_eos {
            TextDelta::default()
        } else {
            text.push(tok, next)?
        };
        let done = is_eos || delta.stopped || output_ids.len() >= max_new;
        if done {
            let tail = text.finish(tok)?;
            delta.reasoning.push_str(&tail.reasoning);
            delta.text.push_str(&tail.text);
        }
        reasoning.push_str(&delta.reasoning);
        answer.push_str(&delta.text);
        on_delta(&delta, next);
        if is_eos || delta.stopped {
            finish = FinishReason::Stop;
            break;
        }
        if output_ids.len() >= max_new {
            break;
        }
        logits = engine
            .step(
                &[ChunkSpec {
                    seq_id: seq,
                    tokens: &[next],
                    logits: Logits::Last,
                }],
                false,
            )?
            .logits;
    }
    Ok(Output {
        prompt_ids: prompt.to_vec(),
        output_ids,
        text: format!("{reasoning}{answer}"),
        reasoning,
        answer,
        finish_reason: finish,
    })
}
