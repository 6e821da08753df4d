//! Constrained decoding: JSON schema, any JSON object, regular expressions and Lark grammars,
//! compiled by llguidance against the model's vocabulary.
//!
//! The coordinator holds one [`Constraint`] per constrained sequence. Before each step that
//! samples the sequence it computes the allowed tokens ([`Constraint::mask`]) and sends them
//! with the chunk; the worker sets every other token's logit to -inf before its sampler runs;
//! the sampled token then advances the matcher ([`Constraint::advance`]). Invariants: the
//! matcher has consumed exactly the sequence's generated tokens after its activation point
//! (for a reasoning model: the end of its thinking, so the reasoning stays free and the answer
//! is constrained); a grammar that is complete allows only end of sequence; a token the
//! matcher rejects ends the request with an error, never with unconstrained output.

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use std::sync::Arc;

/// What a request constrains its output to.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grammar {
    /// Any JSON object (OpenAI's `json_object`).
    JsonObject,
    /// A JSON schema (OpenAI's `json_schema`; llguidance's extensions under `x-guidance`).
    JsonSchema(Value),
    /// A regular expression (Rust `regex` syntax) the whole output matches.
    Regex(String),
    /// A Lark grammar (llguidance's dialect).
    Lark(String),
    /// The tool calls a request requires (`text::tools::call_grammar`): a Lark grammar over
    /// the whole output, a harmony model's message headers included.
    Calls(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ConstraintError {
    /// The grammar does not compile; `field` names the request field that carried it.
    #[error("{field}: {detail}")]
    Grammar { field: &'static str, detail: String },
    /// The matcher refused a token or failed computing a mask.
    #[error("constrained decoding: {0}")]
    Matcher(String),
}

impl Grammar {
    /// The request field it came from (for errors).
    pub fn field(&self) -> &'static str {
        match self {
            Grammar::JsonObject => "json_object",
            Grammar::JsonSchema(_) => "json_schema",
            Grammar::Regex(_) => "regex",
            Grammar::Lark(_) => "lark",
            Grammar::Calls(_) => "tools",
        }
    }

    fn top_level(&self) -> TopLevelGrammar {
        // Compact JSON unless the schema asks otherwise: a model free to emit whitespace
        // between tokens can run to max_tokens on it.
        let compact = |mut schema: Value| {
            if let Some(o) = schema.as_object_mut() {
                o.entry("x-guidance")
                    .or_insert(json!({"whitespace_flexible": false}));
            }
            schema
        };
        match self {
            Grammar::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(json!({"type": "object"})))
            }
            Grammar::JsonSchema(s) => TopLevelGrammar::from_json_schema(compact(s.clone())),
            Grammar::Regex(r) => TopLevelGrammar::from_regex(r),
            Grammar::Lark(l) | Grammar::Calls(l) => TopLevelGrammar::from_lark(l.clone()),
        }
    }

    /// The grammar for an output that starts in a harmony message header (GPT-OSS after
    /// `<|start|>assistant`): free thinking in analysis messages, then the final channel's
    /// content, which is this grammar. Tool calls' grammar spans the headers itself.
    fn in_harmony(&self, h: &crate::text::Harmony) -> TopLevelGrammar {
        let mut answer = self.top_level();
        if matches!(self, Grammar::Calls(_)) {
            return answer;
        }
        answer.grammars[0].name = Some("answer".into());
        let t = |id: u32| format!("<[{id}]>");
        let wrapper = format!(
            "start: analysis* {channel} \"final\" {message} @answer\n\
             analysis: {channel} \"analysis\" {message} THOUGHT {end} {start} \"assistant\"\n\
             THOUGHT: /(?s:.*)/\n",
            channel = t(h.channel),
            message = t(h.message),
            end = t(h.end),
            start = t(h.start),
        );
        let mut g = TopLevelGrammar::from_lark(wrapper);
        g.grammars.extend(answer.grammars);
        g
    }
}

/// The model's vocabulary as llguidance sees it.
struct Vocab {
    trie: TokTrie,
    tok: Arc<crate::text::Tokenizer>,
}

impl TokenizerEnv for Vocab {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.trie
            .tokenize_with_greedy_fallback(s, |s| self.tok.encode_plain(s))
    }
}

/// Compiles grammars for one model (the token trie is built once, at load).
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    pub fn new(tok: Arc<crate::text::Tokenizer>) -> Result<Self, ConstraintError> {
        let bytes: Vec<Vec<u8>> = tok
            .token_bytes()
            .into_iter()
            .map(|(b, name)| {
                b.unwrap_or_else(|| {
                    let mut v = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    v.extend_from_slice(name.as_bytes());
                    v
                })
            })
            .collect();
        let eos = *tok.eos_ids.first().unwrap_or(&0);
        let mut info = TokRxInfo::new(bytes.len() as u32, eos);
        info.tok_end_of_turn = tok.eos_ids.get(1).copied();
        let trie = TokTrie::from(&info, &bytes);
        let env: TokEnv = Arc::new(Vocab { trie, tok });
        let mut factory = ParserFactory::new(
            &env,
            InferenceCapabilities::default(),
            &llguidance::earley::SlicedBiasComputer::general_slices(),
        )
        .map_err(|e| ConstraintError::Matcher(e.to_string()))?;
        factory.quiet();
        Ok(Grammars { factory })
    }

    /// A matcher for `g`.
    pub fn compile(&self, g: &Grammar) -> Result<Matcher, ConstraintError> {
        self.compile_in(g, None)
    }

    /// A matcher for `g` over an output that starts in a harmony header, when `harmony`
    /// (see [`Grammar::in_harmony`]).
    pub fn compile_in(
        &self,
        g: &Grammar,
        harmony: Option<&crate::text::Harmony>,
    ) -> Result<Matcher, ConstraintError> {
        let top = match harmony {
            Some(h) => g.in_harmony(h),
            None => g.top_level(),
        };
        let parser = self
            .factory
            .create_parser(top)
            .map_err(|e| ConstraintError::Grammar {
                field: g.field(),
                detail: e.to_string(),
            })?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(ConstraintError::Grammar {
                field: g.field(),
                detail: e,
            });
        }
        Ok(matcher)
    }
}

/// The grammars of one model, compiled from the first constrained request on (building the
/// token trie takes a while on a large vocabulary; a server that never sees one never pays).
#[derive(Clone, Default)]
pub struct GrammarCell(Arc<std::sync::OnceLock<Result<Arc<Grammars>, String>>>);

impl GrammarCell {
    pub fn get(&self, tok: &Arc<crate::text::Tokenizer>) -> Result<Arc<Grammars>, ConstraintError> {
        self.0
            .get_or_init(|| {
                Grammars::new(tok.clone())
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(ConstraintError::Matcher)
    }

    /// The constraint of a journaled request (`SeqRequest.grammar`, `max_reasoning_tokens`),
    /// if it has one: a grammar active at once, or once the thinking its prompt opened has
    /// ended; and a thinking budget, after which the end of thinking is the only token
    /// allowed (`max_reasoning_tokens`, 0: none).
    pub fn for_request(
        &self,
        tok: &Arc<crate::text::Tokenizer>,
        grammar: &str,
        prompt: &[u32],
        max_reasoning_tokens: u32,
    ) -> Result<Option<Arc<std::sync::Mutex<Constraint>>>, ConstraintError> {
        let thinking = tok
            .starts_in_reasoning(prompt)
            .then_some(tok.think_end)
            .flatten();
        let budget = (max_reasoning_tokens > 0).then_some(max_reasoning_tokens as usize);
        let matcher = if grammar.is_empty() {
            None
        } else {
            let g: Grammar =
                serde_json::from_str(grammar).map_err(|e| ConstraintError::Grammar {
                    field: "grammar",
                    detail: e.to_string(),
                })?;
            let header = tok.harmony_header(prompt);
            Some(self.get(tok)?.compile_in(&g, header.as_ref())?)
        };
        if matcher.is_none() && (budget.is_none() || thinking.is_none()) {
            return Ok(None);
        }
        Ok(Some(Arc::new(std::sync::Mutex::new(Constraint {
            matcher,
            waiting_for: thinking,
            budget,
            thought: 0,
        }))))
    }
}

/// One sequence's matcher (see the module docs).
pub struct Constraint {
    /// `None`: a thinking budget alone.
    matcher: Option<Matcher>,
    /// Not active until this token is sampled (the end of a reasoning model's thinking).
    waiting_for: Option<u32>,
    /// Thinking tokens allowed before `waiting_for` is forced, and those sampled so far.
    budget: Option<usize>,
    thought: usize,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("waiting_for", &self.waiting_for)
            .finish_non_exhaustive()
    }
}

impl Constraint {
    /// The tokens allowed next as a bitset (bit `t % 32` of little-endian word `t / 32`),
    /// or `None` while the constraint is not active yet.
    pub fn mask(&mut self) -> Result<Option<Vec<u8>>, ConstraintError> {
        if let Some(end) = self.waiting_for {
            if self.budget.is_some_and(|b| self.thought >= b) {
                return Ok(Some(only(end)));
            }
            return Ok(None);
        }
        let Some(matcher) = self.matcher.as_mut() else {
            return Ok(None);
        };
        let m = matcher
            .compute_mask_or_eos()
            .map_err(|e| ConstraintError::Matcher(e.to_string()))?;
        Ok(Some(
            m.as_slice().iter().flat_map(|w| w.to_le_bytes()).collect(),
        ))
    }

    /// Whether the sequence may not end yet: its grammar waits for the end of thinking, and
    /// an answer must follow it.
    pub fn holds_back_end(&self) -> bool {
        self.waiting_for.is_some() && self.matcher.is_some()
    }

    /// Takes the sampled `token` into account.
    pub fn advance(&mut self, token: u32) -> Result<(), ConstraintError> {
        if let Some(t) = self.waiting_for {
            self.thought += 1;
            if t == token {
                self.waiting_for = None;
            }
            return Ok(());
        }
        let Some(matcher) = self.matcher.as_mut().filter(|m| !m.is_stopped()) else {
            return Ok(());
        };
        matcher
            .consume_token(token)
            .map_err(|e| ConstraintError::Matcher(e.to_string()))
    }
}

/// A single-token bitset (only `t` allowed; see [`Constraint::mask`]).
pub fn only(t: u32) -> Vec<u8> {
    let t = t as usize;
    let mut m = vec![0u8; t / 8 + 1];
    m[t / 8] |= 1 << (t % 8);
    m
}

/// What [`measure`] saw: the cost of constrained decoding on one vocabulary.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MaskCost {
    pub vocab: usize,
    /// Building the token trie (once per model).
    pub trie_ms: f64,
    /// Compiling the grammar, median over the outputs.
    pub compile_ms_p50: f64,
    pub masks: usize,
    pub mask_us_p50: f64,
    pub mask_us_p90: f64,
    pub mask_us_p99: f64,
    pub mask_us_max: f64,
    /// Allowed tokens per mask, median.
    pub allowed_p50: usize,
    /// Outputs completed (the grammar accepted, end of sequence chosen).
    pub outputs: usize,
}

/// Walks `g` for `tokens` steps as a sampler would, choosing uniformly among the allowed
/// tokens (a fresh matcher after each completed output) and timing every mask.
pub fn measure(
    tok: Arc<crate::text::Tokenizer>,
    g: &Grammar,
    tokens: usize,
    seed: u64,
) -> Result<MaskCost, ConstraintError> {
    use std::time::Instant;
    let vocab = tok.vocab_size();
    let eos = tok.eos_ids.first().copied();
    let t0 = Instant::now();
    let grammars = Grammars::new(tok)?;
    let trie_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut rng = switchyard_kernels::rng::Rng::new(seed);
    let (mut compile, mut times, mut allowed) = (Vec::new(), Vec::new(), Vec::new());
    let mut outputs = 0;
    let fresh = |compile: &mut Vec<f64>| -> Result<Matcher, ConstraintError> {
        let t = Instant::now();
        let m = grammars.compile(g)?;
        compile.push(t.elapsed().as_secs_f64() * 1e3);
        Ok(m)
    };
    let mut m = fresh(&mut compile)?;
    while times.len() < tokens {
        let t = Instant::now();
        let mask = m
            .compute_mask_or_eos()
            .map_err(|e| ConstraintError::Matcher(e.to_string()))?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        let ids: Vec<u32> = (0..mask.len() as u32)
            .filter(|t| mask.is_allowed(*t))
            .collect();
        allowed.push(ids.len());
        let Some(&pick) = ids.get(rng.next_u64() as usize % ids.len().max(1)) else {
            return Err(ConstraintError::Matcher("no token allowed".into()));
        };
        if Some(pick) == eos || m.is_stopped() {
            outputs += 1;
            m = fresh(&mut compile)?;
            continue;
        }
        m.consume_token(pick)
            .map_err(|e| ConstraintError::Matcher(e.to_string()))?;
    }
    let pct = |v: &mut Vec<f64>, q: f64| {
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * q).round() as usize]
    };
    allowed.sort_unstable();
    Ok(MaskCost {
        vocab,
        trie_ms,
        compile_ms_p50: pct(&mut compile, 0.5),
        masks: times.len(),
        mask_us_p50: pct(&mut times, 0.5),
        mask_us_p90: pct(&mut times, 0.9),
        mask_us_p99: pct(&mut times, 0.99),
        mask_us_max: pct(&mut times, 1.0),
        allowed_p50: allowed[allowed.len() / 2],
        outputs,
    })
}

/// A sequence's allowed tokens this step (`None`: its constraint is not active yet).
pub type MaskResult = Result<Option<Vec<u8>>, ConstraintError>;

/// Each constraint's (end held back, mask), in order, computed on up to `threads` threads
/// when there are several (a mask taken inside a string walks the vocabulary's trie, ~1 ms at
/// 152K entries, and the masks of one step are independent); each constraint is locked once.
pub fn masks_of(ks: &[&std::sync::Mutex<Constraint>], threads: usize) -> Vec<(bool, MaskResult)> {
    let one = |k: &std::sync::Mutex<Constraint>| {
        let mut k = k.lock().unwrap_or_else(|e| e.into_inner());
        (k.holds_back_end(), k.mask())
    };
    let threads = threads.clamp(1, ks.len().max(1));
    if threads == 1 {
        return ks.iter().map(|k| one(k)).collect();
    }
    let per = ks.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let parts: Vec<_> = ks
            .chunks(per)
            .map(|part| scope.spawn(move || part.iter().map(|k| one(k)).collect::<Vec<_>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|h| h.join().expect("a mask thread panicked"))
            .collect()
    })
}

/// Per-step time (µs) of the masks of `streams` constrained sequences walked in lockstep as a
/// sampler would (each draws uniformly from its allowed tokens; a finished one starts a fresh
/// matcher), computed by [`masks_of`] on `threads` threads: what a step of the engine loop
/// spends on them. The same seed gives the same walks whatever `threads` is.
pub fn step_cost(
    tok: Arc<crate::text::Tokenizer>,
    g: &Grammar,
    streams: usize,
    steps: usize,
    seed: u64,
    threads: usize,
) -> Result<Vec<f64>, ConstraintError> {
    let eos = tok.eos_ids.first().copied();
    let grammars = Grammars::new(tok)?;
    let fresh = || -> Result<std::sync::Mutex<Constraint>, ConstraintError> {
        Ok(std::sync::Mutex::new(Constraint {
            matcher: Some(grammars.compile(g)?),
            waiting_for: None,
            budget: None,
            thought: 0,
        }))
    };
    let mut ks: Vec<std::sync::Mutex<Constraint>> =
        (0..streams).map(|_| fresh()).collect::<Result<_, _>>()?;
    let mut rng = switchyard_kernels::rng::Rng::new(seed);
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let refs: Vec<&std::sync::Mutex<Constraint>> = ks.iter().collect();
        let t = std::time::Instant::now();
        let masks = masks_of(&refs, threads);
        times.push(t.elapsed().as_secs_f64() * 1e6);
        for (i, (_, m)) in masks.into_iter().enumerate() {
            let m = m?.unwrap_or_default();
            let ids: Vec<u32> = (0..m.len() as u32 * 8)
                .filter(|t| m[*t as usize / 8] >> (t % 8) & 1 == 1)
                .collect();
            let pick = ids[rng.next_u64() as usize % ids.len().max(1)];
            let done = {
                let mut k = ks[i].lock().unwrap_or_else(|e| e.into_inner());
                Some(pick) == eos
                    || k.advance(pick).is_err()
                    || k.matcher.as_ref().is_some_and(|m| m.is_stopped())
            };
            if done {
                ks[i] = fresh()?;
            }
        }
    }
    Ok(times)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::tools::{assemble, call_grammar, ToolFormat, ToolParser, ToolSpec};

    fn fixture_tokenizer() -> Arc<crate::text::Tokenizer> {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer");
        Arc::new(crate::text::Tokenizer::load(&dir).expect("fixture tokenizer"))
    }

    fn tools() -> Vec<ToolSpec> {
        vec![
            ToolSpec {
                name: "get_weather".into(),
                parameters: json!({"type": "object", "properties": {
                    "city": {"type": "string", "maxLength": 8},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                    "required": ["city", "days"], "additionalProperties": false}),
            },
            ToolSpec {
                name: "now".into(),
                parameters: json!({}),
            },
        ]
    }

    /// Random walks through each format's call grammar (uniform over the allowed tokens, as
    /// random weights sample) end in text the format's parser reads as calls to the offered
    /// tools whose arguments satisfy their schemas.
    #[test]
    fn call_grammars_generate_what_the_parsers_read() {
        let tok = fixture_tokenizer();
        let grammars = Grammars::new(tok.clone()).unwrap();
        let eos = tok.eos_ids[0];
        let mut rng = switchyard_kernels::rng::Rng::new(7);
        for format in ToolFormat::ALL {
            for parallel in [false, true] {
                let g = call_grammar(format, &tools(), parallel, &|_| None);
                let mut names = std::collections::HashSet::new();
                for walk in 0..6 {
                    let mut m = grammars
                        .compile(&Grammar::Lark(g.clone()))
                        .unwrap_or_else(|e| panic!("{format:?}: {e}\n{g}"));
                    let mut out = Vec::new();
                    loop {
                        assert!(out.len() < 400, "{format:?} walk {walk}: no end");
                        let mask = m.compute_mask_or_eos().unwrap();
                        let ids: Vec<u32> = (0..mask.len() as u32)
                            .filter(|t| mask.is_allowed(*t))
                            .collect();
                        let pick = ids[rng.next_u64() as usize % ids.len()];
                        if pick == eos || m.is_stopped() {
                            break;
                        }
                        m.consume_token(pick).unwrap();
                        out.push(pick);
                    }
                    let text = tok.decode(&out, false).unwrap();
                    let mut p = ToolParser::new(format, "call_");
                    let mut ev = p.push(&text);
                    ev.extend(p.finish());
                    let (rest, calls) = assemble(&ev);
                    assert_eq!(rest, "", "{format:?}: {text:?}");
                    assert!(!calls.is_empty(), "{format:?}: {text:?}");
                    assert!(parallel || calls.len() == 1, "{format:?}: {text:?}");
                    for (_, name, args) in calls {
                        let a: Value = serde_json::from_str(&args)
                            .unwrap_or_else(|e| panic!("{format:?} {args:?}: {e}"));
                        match name.as_str() {
                            "get_weather" => {
                                assert!(
                                    a["city"].as_str().is_some_and(|c| c.chars().count() <= 8),
                                    "{a}"
                                );
                                assert!(
                                    a["days"].as_i64().is_some_and(|d| (1..=7).contains(&d)),
                                    "{a}"
                                );
                                assert_eq!(a.as_object().unwrap().len(), 2, "{a}");
                            }
                            "now" => assert!(a.is_object(), "{a}"),
                            other => panic!("{format:?}: a call to {other:?}"),
                        }
                        names.insert(name);
                    }
                }
                assert!(!names.is_empty());
            }
        }
    }

    /// A call to a tool the request did not offer is not in the grammar.
    #[test]
    fn call_grammar_refuses_other_names() {
        let tok = fixture_tokenizer();
        let grammars = Grammars::new(tok.clone()).unwrap();
        let g = call_grammar(ToolFormat::Hermes, &tools(), false, &|_| None);
        let mut m = grammars.compile(&Grammar::Lark(g)).unwrap();
        let ok =
            tok.encode_plain("<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>");
        assert_eq!(m.validate_tokens(&ok).unwrap(), ok.len());
        let bad =
            tok.encode_plain("<tool_call>\n{\"name\": \"rm\", \"arguments\": {}}\n</tool_call>");
        assert!(m.validate_tokens(&bad).unwrap() < bad.len());
    }

    /// The fixture vocabulary with GPT-OSS's harmony tokens added (special, as released).
    fn harmony_tokenizer() -> Arc<crate::text::Tokenizer> {
        let fixture =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer");
        let dir = std::env::temp_dir().join(format!("sy-harmony-grammar-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut tj: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture.join("tokenizer.json")).unwrap())
                .unwrap();
        let marks = [
            "<|start|>",
            "<|channel|>",
            "<|message|>",
            "<|end|>",
            "<|call|>",
            "<|constrain|>",
        ];
        for (i, m) in marks.iter().enumerate() {
            tj["added_tokens"].as_array_mut().unwrap().push(json!({
                "id": 2048 + i, "content": m, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            }));
        }
        std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
        std::fs::copy(
            fixture.join("tokenizer_config.json"),
            dir.join("tokenizer_config.json"),
        )
        .unwrap();
        let tok = crate::text::Tokenizer::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        Arc::new(tok)
    }

    /// A random walk through `m` on [`harmony_tokenizer`]'s vocabulary, fed to `out`: its
    /// reasoning, answer text and call events. Uniform over the allowed tokens, but a marker
    /// the grammar allows is taken one time in four (a uniform walk would think for thousands
    /// of tokens).
    fn harmony_walk(
        tok: &crate::text::Tokenizer,
        m: &mut Matcher,
        out: &mut crate::text::OutputText,
        rng: &mut switchyard_kernels::rng::Rng,
    ) -> (String, String, Vec<crate::text::tools::ToolEvent>) {
        let (mut reasoning, mut text, mut events) = (String::new(), String::new(), vec![]);
        for n in 0.. {
            assert!(n < 600, "no end");
            let mask = m.compute_mask_or_eos().unwrap();
            let ids: Vec<u32> = (0..mask.len() as u32)
                .filter(|t| mask.is_allowed(*t))
                .collect();
            let marks: Vec<u32> = ids.iter().copied().filter(|t| *t >= 2048).collect();
            let pick = if !marks.is_empty() && rng.next_u64() % 4 == 0 {
                marks[rng.next_u64() as usize % marks.len()]
            } else {
                ids[rng.next_u64() as usize % ids.len()]
            };
            if tok.eos_ids.contains(&pick) || m.is_stopped() {
                break;
            }
            m.consume_token(pick).unwrap();
            let d = out.push(tok, pick).unwrap();
            reasoning.push_str(&d.reasoning);
            text.push_str(&d.text);
            events.extend(d.calls);
        }
        let d = out.finish(tok).unwrap();
        text.push_str(&d.text);
        events.extend(d.calls);
        (reasoning, text, events)
    }

    /// GPT-OSS: random walks through the harmony call grammar (thinking in the analysis
    /// channel, then calls as messages to functions) read back, token by token through
    /// `OutputText`, as reasoning and calls to the offered tools within their schemas.
    #[test]
    fn harmony_call_grammar_generates_what_output_text_reads() {
        let tok = harmony_tokenizer();
        assert_eq!(tok.tool_format, ToolFormat::Harmony);
        let h = tok.harmony.expect("harmony tokens");
        let grammars = Grammars::new(tok.clone()).unwrap();
        let mut rng = switchyard_kernels::rng::Rng::new(11);
        let mut prompt = vec![h.start];
        prompt.extend(tok.encode_plain("assistant"));
        let (mut thought, mut names) = (0, std::collections::HashSet::new());
        for parallel in [false, true] {
            let g = call_grammar(ToolFormat::Harmony, &tools(), parallel, &|m| {
                tok.token_to_id(m)
            });
            for walk in 0..8 {
                let mut m = grammars
                    .compile(&Grammar::Lark(g.clone()))
                    .unwrap_or_else(|e| panic!("{e}\n{g}"));
                let mut out = crate::text::OutputText::new(&tok, &prompt, vec![]).with_tools(
                    &tok,
                    ToolFormat::Harmony,
                    "call_",
                    parallel,
                );
                let (reasoning, text, events) = harmony_walk(&tok, &mut m, &mut out, &mut rng);
                thought += usize::from(!reasoning.is_empty());
                let (_, calls) = assemble(&events);
                assert_eq!(text, "", "walk {walk}: {events:?}");
                assert!(
                    !calls.is_empty() && (parallel || calls.len() == 1),
                    "{calls:?}"
                );
                for (id, name, args) in calls {
                    let a: Value = serde_json::from_str(&args)
                        .unwrap_or_else(|e| panic!("{name} {args:?}: {e}"));
                    match name.as_str() {
                        "get_weather" => {
                            assert!(a["city"].as_str().is_some_and(|c| c.chars().count() <= 8));
                            assert!(a["days"].as_i64().is_some_and(|d| (1..=7).contains(&d)));
                        }
                        "now" => assert_eq!(a, json!({})),
                        other => panic!("a call to {other:?}"),
                    }
                    assert!(id.starts_with("call_"));
                    names.insert(name);
                }
            }
        }
        assert!(thought > 0, "no walk thought first");
        assert_eq!(names.len(), 2, "{names:?}");
    }

    /// GPT-OSS with a response format: generation starts in a harmony header, so the
    /// request's grammar is the final channel's content, after free analysis messages. Random
    /// walks read back through `OutputText` as an answer that matches (JSON schema, regex,
    /// Lark alike), never as header text.
    #[test]
    fn harmony_answers_are_constrained_after_the_analysis() {
        let tok = harmony_tokenizer();
        let grammars = Grammars::new(tok.clone()).unwrap();
        let h = tok.harmony.expect("harmony tokens");
        let mut prompt = vec![h.start];
        prompt.extend(tok.encode_plain("assistant"));
        assert_eq!(tok.harmony_header(&prompt), Some(h));
        let mut rng = switchyard_kernels::rng::Rng::new(5);
        let schema = json!({"type": "object", "properties": {
            "n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["n"],
            "additionalProperties": false});
        let cases = [
            Grammar::JsonSchema(schema),
            Grammar::Regex("[a-c]{2,4}".into()),
            Grammar::Lark("start: \"x\" | \"yz\"".into()),
        ];
        let mut thought = 0;
        for g in cases {
            for walk in 0..6 {
                let mut m = grammars.compile_in(&g, Some(&h)).unwrap();
                let mut out = crate::text::OutputText::new(&tok, &prompt, vec![]);
                let (reasoning, text, _) = harmony_walk(&tok, &mut m, &mut out, &mut rng);
                thought += usize::from(!reasoning.is_empty());
                let ok = match &g {
                    Grammar::JsonSchema(_) => serde_json::from_str::<Value>(&text)
                        .is_ok_and(|v| v["n"].as_u64().is_some_and(|n| n <= 99)),
                    Grammar::Regex(_) => {
                        (2..=4).contains(&text.len()) && text.chars().all(|c| "abc".contains(c))
                    }
                    _ => text == "x" || text == "yz",
                };
                assert!(ok, "{g:?} walk {walk}: answer {text:?}");
            }
        }
        assert!(thought > 0, "no walk thought first");
    }

    /// Masks computed on several threads are the ones computed one by one, in order, and
    /// each constraint's state is unchanged by taking its mask.
    #[test]
    fn masks_on_threads_equal_masks_one_by_one() {
        let tok = fixture_tokenizer();
        let grammars = Grammars::new(tok.clone()).unwrap();
        let g = Grammar::JsonSchema(json!({"type": "object", "properties": {
            "a": {"type": "string", "maxLength": 5}, "b": {"type": "integer"}},
            "required": ["a", "b"], "additionalProperties": false}));
        let mut ks = Vec::new();
        for i in 0..7u32 {
            let mut m = grammars.compile(&g).unwrap();
            let prefix = ["{\"a\":\"", "{\"a\":\"x\",\"b\":", "{", ""][i as usize % 4];
            m.consume_tokens(&tok.encode_plain(prefix)).unwrap();
            let waiting = (i == 6).then_some(tok.think_end.unwrap());
            ks.push(std::sync::Mutex::new(Constraint {
                matcher: Some(m),
                waiting_for: waiting,
                budget: None,
                thought: 0,
            }));
        }
        let refs: Vec<_> = ks.iter().collect();
        let one = masks_of(&refs, 1);
        for threads in [2, 3, 16] {
            let many = masks_of(&refs, threads);
            assert_eq!(one.len(), many.len());
            for (i, (a, b)) in one.iter().zip(&many).enumerate() {
                assert_eq!(a.0, b.0, "{i}");
                assert_eq!(a.1.as_ref().unwrap(), b.1.as_ref().unwrap(), "{i}");
            }
        }
        assert!(
            one[6].0 && one[6].1.as_ref().unwrap().is_none(),
            "waiting for the end of thinking"
        );
        let distinct: std::collections::HashSet<_> = one[..4]
            .iter()
            .map(|m| m.1.as_ref().unwrap().clone())
            .collect();
        assert_eq!(distinct.len(), 4, "four states, four masks");
    }
}
