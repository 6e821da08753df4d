//! The text side of a request: tokenizer, chat template, incremental detokenization, stop
//! strings and the reasoning/answer split.
//!
//! - [`Tokenizer`] wraps a `tokenizer.json` (Hugging Face `tokenizers`) and the chat template
//!   from `chat_template.jinja` or `tokenizer_config.json`, rendered by [`template`].
//! - [`DetokStream`] turns token ids into text incrementally and never emits a broken UTF-8
//!   sequence: text is held back while its decoding ends in a replacement character.
//! - [`StopMatcher`] holds back any suffix that could still become a stop string, so a partial
//!   match never leaks into the stream.
//! - [`OutputText`] combines the two and splits reasoning from the answer by the model's
//!   convention: text inside `<think>…</think>` (DeepSeek-R1, Qwen3 templates), or GPT-OSS's
//!   harmony channels (`<|channel|>analysis<|message|>…<|end|>` is reasoning, the `final`
//!   channel is the answer; headers are never emitted as text).

pub mod detok;
pub mod stop;
pub mod template;
pub mod tools;

pub use detok::DetokStream;
pub use stop::StopMatcher;

use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("{path}: {detail}")]
    File { path: PathBuf, detail: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("the model has no chat template (tokenizer_config.json `chat_template` or chat_template.jinja)")]
    NoTemplate,
    #[error("{field}: {detail}")]
    Invalid { field: &'static str, detail: String },
}

/// A chat message, as chat templates read it: an assistant turn may carry the calls it made,
/// a `tool` turn the id of the call it answers (and the function's name).
#[derive(Clone, Debug, Default, serde::Serialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<CallRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
            ..Default::default()
        }
    }
}

/// A call an assistant turn made: templates see Hugging Face's form, `{"id", "type":
/// "function", "function": {"name", "arguments"}}` with the arguments as an object (their
/// JSON text where it is not one).
#[derive(Clone, Debug, PartialEq)]
pub struct CallRecord {
    pub id: String,
    pub name: String,
    /// JSON text.
    pub arguments: String,
}

impl serde::Serialize for CallRecord {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let args = serde_json::from_str::<Value>(&self.arguments)
            .unwrap_or_else(|_| Value::String(self.arguments.clone()));
        serde_json::json!({
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": args},
        })
        .serialize(s)
    }
}

/// A chat to render: its messages, the tools offered (OpenAI's `{"type": "function",
/// "function": {…}}` objects, as templates take them) and whether the assistant's turn is
/// opened after it.
#[derive(Clone, Debug, PartialEq)]
pub struct Chat {
    pub messages: Vec<Message>,
    pub tools: Vec<Value>,
    pub add_generation_prompt: bool,
}

impl Chat {
    /// One user message, the assistant's turn opened.
    pub fn user(content: impl Into<String>) -> Self {
        Chat::of(vec![Message::new("user", content)])
    }

    pub fn of(messages: Vec<Message>) -> Self {
        Chat {
            messages,
            tools: Vec::new(),
            add_generation_prompt: true,
        }
    }
}

/// Tokenizer, chat template and special tokens of one model.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// End-of-sequence ids: generation_config.json, then config.json, then tokenizer eos.
    pub eos_ids: Vec<u32>,
    pub think_start: Option<u32>,
    pub think_end: Option<u32>,
    /// GPT-OSS's harmony markers, when the vocabulary has them.
    pub harmony: Option<Harmony>,
    /// How the model writes tool calls (its vocabulary's markers, else its architecture's).
    pub tool_format: tools::ToolFormat,
    /// The chat template renders `tools` itself; otherwise [`Chat::tools`] and past calls
    /// reach the model through [`tools::ToolFormat::preamble`] and
    /// [`tools::ToolFormat::render_calls`].
    template_has_tools: bool,
}

/// The special tokens of OpenAI's harmony format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Harmony {
    pub start: u32,
    pub channel: u32,
    pub message: u32,
    pub end: u32,
    /// `<|call|>`, which ends a message that calls a function (and, as an end-of-sequence
    /// token in GPT-OSS's generation config, usually the output).
    pub call: Option<u32>,
}

fn read_json(path: &Path) -> Result<Option<Value>, TextError> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| TextError::File {
        path: path.into(),
        detail: e.to_string(),
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TextError::File {
            path: path.into(),
            detail: e.to_string(),
        })
}

/// GPT-2's byte-level BPE alphabet, reversed: the printable Latin-1 bytes stand for
/// themselves, every other byte for the next code point from U+0100 in byte order.
fn gpt2_unicode_to_byte() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                (b as char, b)
            } else {
                let c = char::from_u32(next).expect("below the surrogates");
                next += 1;
                (c, b)
            }
        })
        .collect()
}

/// A special token given as a string or as `{"content": ...}`.
fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads the text assets of a Hugging Face model folder.
    pub fn load(dir: &Path) -> Result<Self, TextError> {
        switchyard_worker::gguf::refuse_as_folder(dir)
            .map_err(|e| TextError::Tokenizer(e.to_string()))?;
        let tpath = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&tpath).map_err(|e| TextError::File {
            path: tpath,
            detail: e.to_string(),
        })?;
        let tc = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.exists() {
            Some(
                std::fs::read_to_string(&jinja).map_err(|e| TextError::File {
                    path: jinja,
                    detail: e.to_string(),
                })?,
            )
        } else {
            match tc.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: use "default".
                Some(Value::Array(a)) => a
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(String::from)),
                _ => None,
            }
        };
        let bos_token = token_str(tc.get("bos_token"));
        let eos_token = token_str(tc.get("eos_token"));
        let mut eos_ids = Vec::new();
        for file in ["generation_config.json", "config.json"] {
            if let Some(v) = read_json(&dir.join(file))? {
                let ids =
                    switchyard_worker::config::token_ids(v.get("eos_token_id"), "eos_token_id")
                        .map_err(|e| TextError::Invalid {
                            field: "eos_token_id",
                            detail: e.to_string(),
                        })?;
                if !ids.is_empty() {
                    eos_ids = ids;
                    break;
                }
            }
        }
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        let architecture = read_json(&dir.join("config.json"))?
            .and_then(|c| c.get("architectures")?.get(0)?.as_str().map(String::from))
            .unwrap_or_default();
        let tool_format =
            tools::ToolFormat::detect(|t| inner.token_to_id(t).is_some(), &architecture);
        let template_has_tools = chat_template
            .as_deref()
            .is_some_and(|t| t.contains("tools"));
        let think_start = inner.token_to_id("<think>");
        let think_end = inner.token_to_id("</think>");
        let harmony = match (
            inner.token_to_id("<|start|>"),
            inner.token_to_id("<|channel|>"),
            inner.token_to_id("<|message|>"),
            inner.token_to_id("<|end|>"),
        ) {
            (Some(start), Some(channel), Some(message), Some(end)) => Some(Harmony {
                start,
                channel,
                message,
                end,
                call: inner.token_to_id("<|call|>"),
            }),
            _ => None,
        };
        Ok(Tokenizer {
            inner,
            chat_template,
            bos_token,
            eos_token,
            eos_ids,
            think_start,
            think_end,
            harmony,
            tool_format,
            template_has_tools,
        })
    }

    /// Encodes plain text as Hugging Face's `tokenizer(text)` does.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TextError> {
        self.encode_with(text, true)
    }

    fn encode_with(&self, text: &str, special: bool) -> Result<Vec<u32>, TextError> {
        let enc = self
            .inner
            .encode(text, special)
            .map_err(|e| TextError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Renders the chat template. A template that does not render tools gets them as a
    /// system prompt in the model's call format, past calls written into their assistant
    /// turns as the model writes them, and tool results as `tool` turns.
    pub fn render_chat(&self, chat: &Chat) -> Result<String, TextError> {
        let src = self.chat_template.as_deref().ok_or(TextError::NoTemplate)?;
        let uses_tools =
            !chat.tools.is_empty() || chat.messages.iter().any(|m| !m.tool_calls.is_empty());
        let (messages, tools) = if self.template_has_tools || !uses_tools {
            (std::borrow::Cow::Borrowed(&chat.messages), &chat.tools[..])
        } else {
            (std::borrow::Cow::Owned(self.tools_as_text(chat)), &[][..])
        };
        template::render(
            src,
            &messages,
            tools,
            chat.add_generation_prompt,
            self.bos_token.as_deref(),
            self.eos_token.as_deref(),
        )
    }

    /// `chat`'s messages with its tools and calls written as text (see [`Self::render_chat`]).
    fn tools_as_text(&self, chat: &Chat) -> Vec<Message> {
        let f = self.tool_format;
        let mut out = Vec::with_capacity(chat.messages.len() + 1);
        if !chat.tools.is_empty() {
            let preamble = f.preamble(&chat.tools);
            match chat.messages.first() {
                Some(m) if m.role == "system" => out.push(Message::new(
                    "system",
                    format!("{}\n\n{preamble}", m.content),
                )),
                _ => out.push(Message::new("system", preamble)),
            }
        }
        let merged = !out.is_empty() && chat.messages.first().is_some_and(|m| m.role == "system");
        for m in &chat.messages[usize::from(merged)..] {
            let mut m = m.clone();
            if !m.tool_calls.is_empty() {
                let calls: Vec<(&str, &str)> = m
                    .tool_calls
                    .iter()
                    .map(|c| (c.name.as_str(), c.arguments.as_str()))
                    .collect();
                let sep = if m.content.is_empty() { "" } else { "\n" };
                m.content = format!("{}{sep}{}", m.content, f.render_calls(&calls));
                m.tool_calls.clear();
            }
            out.push(m);
        }
        out
    }

    /// Renders and encodes a chat as `apply_chat_template(tokenize=True)` does (the template
    /// supplies special tokens, none are added).
    pub fn encode_chat(&self, chat: &Chat) -> Result<Vec<u32>, TextError> {
        let text = self.render_chat(chat)?;
        self.encode_with(&text, false)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TextError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TextError::Tokenizer(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, t: &str) -> Option<u32> {
        self.inner.token_to_id(t)
    }

    /// Every id's bytes as the model emits them (what constrained decoding matches against):
    /// byte-level BPE vocabularies (GPT-2's byte-to-unicode map undone), SentencePiece ones
    /// with byte fallback (`<0xAB>` is that byte, `▁` a space); a special token is `None`
    /// with its content, an id the vocabulary lacks an empty `Some`.
    pub fn token_bytes(&self) -> Vec<(Option<Vec<u8>>, String)> {
        let json = self.inner.to_string(false).unwrap_or_default();
        let decoder = serde_json::from_str::<Value>(&json)
            .ok()
            .and_then(|v| v.get("decoder").map(|d| d.to_string()))
            .unwrap_or_default();
        let byte_level = decoder.contains("\"ByteLevel\"");
        let unicode_to_byte = gpt2_unicode_to_byte();
        let added = self.inner.get_added_tokens_decoder();
        (0..self.vocab_size() as u32)
            .map(|id| {
                if let Some(a) = added.get(&id) {
                    return if a.special {
                        (None, a.content.clone())
                    } else {
                        (Some(a.content.clone().into_bytes()), a.content.clone())
                    };
                }
                let Some(name) = self.inner.id_to_token(id) else {
                    return (Some(Vec::new()), String::new());
                };
                let bytes = if byte_level {
                    name.chars()
                        .map(|c| unicode_to_byte.get(&c).copied())
                        .collect::<Option<Vec<u8>>>()
                        .unwrap_or_else(|| name.clone().into_bytes())
                } else if let Some(b) = name
                    .strip_prefix("<0x")
                    .and_then(|h| h.strip_suffix('>'))
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    vec![b]
                } else {
                    name.replace('\u{2581}', " ").into_bytes()
                };
                (Some(bytes), name)
            })
            .collect()
    }

    /// `text` as ids, special tokens as text (what a grammar's literal strings encode to).
    pub fn encode_plain(&self, text: &str) -> Vec<u32> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    }

    /// The harmony markers, when generation after `prompt` starts in a message header
    /// (`…<|start|>assistant`).
    pub fn harmony_header(&self, prompt: &[u32]) -> Option<Harmony> {
        let h = self.harmony?;
        let last = prompt
            .iter()
            .rev()
            .find(|t| [h.start, h.message, h.end].contains(t));
        (last == Some(&h.start)).then_some(h)
    }

    /// Whether generation after `prompt` starts inside a `<think>` block.
    pub fn starts_in_reasoning(&self, prompt: &[u32]) -> bool {
        let (Some(s), Some(e)) = (self.think_start, self.think_end) else {
            return false;
        };
        let last_s = prompt.iter().rposition(|t| *t == s);
        let last_e = prompt.iter().rposition(|t| *t == e);
        match (last_s, last_e) {
            (Some(a), Some(b)) => a > b,
            (Some(_), None) => true,
            _ => false,
        }
    }
}

/// Text produced by one step of output.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TextDelta {
    pub reasoning: String,
    pub text: String,
    /// Tool calls begun and their arguments, in order (never [`tools::ToolEvent::Text`]).
    pub calls: Vec<tools::ToolEvent>,
    /// A stop string matched (or, with parallel calls off, a second call began): nothing
    /// after it is produced.
    pub stopped: bool,
}

/// Where a harmony-format output stands.
#[derive(Clone, Debug, PartialEq)]
enum HarmonyState {
    /// Inside a message header (`<|start|>role<|channel|>name`): nothing is emitted;
    /// `channel` collects the channel name once `<|channel|>` is seen, `words` the whole
    /// header's text (a recipient, `to=functions.f`, may come before or after the channel;
    /// other special tokens in it, such as `<|constrain|>`, separate words).
    Header {
        channel: Option<String>,
        words: String,
    },
    /// Inside a message's content.
    Content,
}

impl HarmonyState {
    fn header() -> Self {
        HarmonyState::Header {
            channel: None,
            words: String::new(),
        }
    }
}

/// Turns output tokens into reasoning and answer text, with stop strings.
pub struct OutputText {
    detok: DetokStream,
    stop: StopMatcher,
    in_reasoning: bool,
    think_start: Option<u32>,
    think_end: Option<u32>,
    harmony: Option<(Harmony, HarmonyState)>,
    stopped: bool,
    /// Reads tool calls out of the answer, when the request offers tools.
    tools: Option<Tools>,
}

/// An [`OutputText`]'s tool-call parsing.
struct Tools {
    parser: tools::ToolParser,
    /// The format's markers that are tokens of the vocabulary, with their text: they reach
    /// the parser as text even where decoding would skip them as special.
    markers: Vec<(u32, String)>,
    /// Calls allowed (1 with parallel calls off): the output ends where one more begins.
    max_calls: Option<usize>,
    /// Harmony calls begun, and the one whose arguments the current message holds.
    harmony_calls: usize,
    in_call: Option<usize>,
}

impl OutputText {
    pub fn new(tok: &Tokenizer, prompt: &[u32], stops: Vec<String>) -> Self {
        // Harmony: generation after `…<|start|>assistant` begins in a header; otherwise in
        // the content of whatever message is open (the answer unless its channel says).
        let in_header = tok.harmony_header(prompt).is_some();
        let harmony = tok.harmony.map(|h| {
            let state = if in_header {
                HarmonyState::header()
            } else {
                HarmonyState::Content
            };
            (h, state)
        });
        OutputText {
            detok: DetokStream::new(true),
            stop: StopMatcher::new(stops),
            in_reasoning: harmony.is_none() && tok.starts_in_reasoning(prompt),
            think_start: tok.think_start,
            think_end: tok.think_end,
            harmony,
            stopped: false,
            tools: None,
        }
    }

    /// Parses tool calls out of the answer in `format`, ids `{id_prefix}{index}`; with
    /// `parallel` off the output ends where a second call would begin.
    pub fn with_tools(
        mut self,
        tok: &Tokenizer,
        format: tools::ToolFormat,
        id_prefix: &str,
        parallel: bool,
    ) -> Self {
        let markers = format
            .markers()
            .into_iter()
            .filter_map(|m| Some((tok.token_to_id(m)?, m.to_string())))
            .collect();
        self.tools = Some(Tools {
            parser: tools::ToolParser::new(format, id_prefix),
            markers,
            max_calls: (!parallel).then_some(1),
            harmony_calls: 0,
            in_call: None,
        });
        self
    }

    /// Tool calls begun so far (those emitted: not one past the limit).
    pub fn tool_calls(&self) -> usize {
        self.tools.as_ref().map_or(0, |t| {
            (t.parser.calls() + t.harmony_calls).min(t.max_calls.unwrap_or(usize::MAX))
        })
    }

    /// Answer text through the tool-call parser (when there is one); `None`: the end.
    fn answer(&mut self, s: Option<&str>, d: &mut TextDelta) {
        let Some(t) = &mut self.tools else {
            d.text.push_str(s.unwrap_or_default());
            return;
        };
        if let Some(index) = t.in_call {
            if let Some(text) = s.filter(|s| !s.is_empty()) {
                d.calls.push(tools::ToolEvent::Args {
                    index,
                    text: text.to_string(),
                });
            }
            return;
        }
        let events = match s {
            Some(s) => t.parser.push(s),
            None => t.parser.finish(),
        };
        let over = |index: usize| t.max_calls.is_some_and(|m| index >= m);
        for e in events {
            match e {
                tools::ToolEvent::Text(x) => d.text.push_str(&x),
                tools::ToolEvent::Call { index, .. } if over(index) => {
                    self.stopped = true;
                    d.stopped = true;
                    return;
                }
                tools::ToolEvent::Args { index, .. } if over(index) => {}
                call => d.calls.push(call),
            }
        }
    }

    /// Harmony markers and header tokens: returns true when `id` was consumed.
    fn harmony_token(
        &mut self,
        tok: &Tokenizer,
        id: u32,
        d: &mut TextDelta,
    ) -> Result<bool, TextError> {
        let Some((h, state)) = self.harmony.clone() else {
            return Ok(false);
        };
        let next = if id == h.start || id == h.end || Some(id) == h.call {
            if state == HarmonyState::Content {
                self.flush_segment(tok, d)?;
                self.detok = DetokStream::new(true);
            }
            if let Some(t) = &mut self.tools {
                t.in_call = None;
            }
            self.in_reasoning = false;
            HarmonyState::header()
        } else if let HarmonyState::Header { channel, mut words } = state {
            if id == h.channel {
                words.push(' ');
                HarmonyState::Header {
                    channel: Some(String::new()),
                    words,
                }
            } else if id == h.message {
                // Only the analysis channel is reasoning; final (and commentary) is text,
                // except a message to a function: a tool call, its content the arguments.
                self.in_reasoning = channel.as_deref().map(str::trim) == Some("analysis");
                let to = words
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("to=functions."));
                if let (Some(name), Some(t)) = (to, &mut self.tools) {
                    let index = t.harmony_calls;
                    if t.max_calls.is_some_and(|m| index >= m) {
                        self.stopped = true;
                        d.stopped = true;
                    } else {
                        t.harmony_calls += 1;
                        t.in_call = Some(index);
                        self.in_reasoning = false;
                        d.calls.push(tools::ToolEvent::Call {
                            index,
                            id: format!("{}{index}", t.parser.id_prefix()),
                            name: name.to_string(),
                        });
                    }
                }
                HarmonyState::Content
            } else {
                let text = tok.decode(&[id], true).unwrap_or_default();
                // A special token (e.g. `<|constrain|>`) separates words.
                words.push_str(if text.is_empty() { " " } else { &text });
                let channel = channel.map(|mut c| {
                    c.push_str(&text);
                    c
                });
                HarmonyState::Header { channel, words }
            }
        } else {
            return Ok(false);
        };
        if let Some((_, s)) = &mut self.harmony {
            *s = next;
        }
        Ok(true)
    }

    pub fn in_reasoning(&self) -> bool {
        self.in_reasoning
    }

    fn route(&mut self, s: String, d: &mut TextDelta) {
        if self.stopped || s.is_empty() {
            return;
        }
        let (emit, stopped) = self.stop.push(&s);
        if self.in_reasoning {
            d.reasoning.push_str(&emit);
        } else if !emit.is_empty() {
            self.answer(Some(&emit), d);
        }
        if stopped {
            self.stopped = true;
            d.stopped = true;
        }
    }

    fn flush_segment(&mut self, tok: &Tokenizer, d: &mut TextDelta) -> Result<(), TextError> {
        let rest = self.detok.flush(&tok.inner)?;
        self.route(rest, d);
        if !self.stopped {
            let held = self.stop.flush();
            if self.in_reasoning {
                d.reasoning.push_str(&held);
            } else if !held.is_empty() {
                self.answer(Some(&held), d);
            }
        }
        Ok(())
    }

    /// Feeds one generated token.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<TextDelta, TextError> {
        let mut d = TextDelta::default();
        if self.stopped {
            return Ok(d);
        }
        if self.harmony_token(tok, id, &mut d)? {
            return Ok(d);
        }
        if Some(id) == self.think_end && self.in_reasoning {
            self.flush_segment(tok, &mut d)?;
            self.in_reasoning = false;
            self.detok = DetokStream::new(true);
            return Ok(d);
        }
        if Some(id) == self.think_start && !self.in_reasoning {
            self.flush_segment(tok, &mut d)?;
            self.in_reasoning = true;
            self.detok = DetokStream::new(true);
            return Ok(d);
        }
        if let Some(m) = self
            .tools
            .as_ref()
            .and_then(|t| t.markers.iter().find(|m| m.0 == id))
            .map(|m| m.1.clone())
        {
            let rest = self.detok.flush(&tok.inner)?;
            self.route(rest, &mut d);
            self.route(m, &mut d);
            self.detok = DetokStream::new(true);
            return Ok(d);
        }
        if let Some(s) = self.detok.push(&tok.inner, id)? {
            self.route(s, &mut d);
        }
        Ok(d)
    }

    /// Emits whatever is still held back at the end of generation.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<TextDelta, TextError> {
        let mut d = TextDelta::default();
        if !self.stopped {
            self.flush_segment(tok, &mut d)?;
            if !self.stopped && self.tools.is_some() {
                self.answer(None, &mut d);
            }
        }
        Ok(d)
    }
}
