//! Tool calls as models write them, parsed out of the answer text while it streams.
//!
//! Each family writes calls in its own format ([`ToolFormat`]): Qwen2/Qwen3 (and the Hermes
//! convention many others follow) `<tool_call>{"name": …, "arguments": …}</tool_call>`,
//! Mistral `[TOOL_CALLS] [{…}, …]`, DeepSeek-V3/R1 and V3.1 their `<｜tool▁call▁begin｜>`
//! blocks, Kimi K2 `<|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>…`.
//! [`ToolParser`] turns the answer text into [`ToolEvent`]s: plain text, the start of a
//! call (its index, id and name), and pieces of its arguments (JSON text, as generated).
//!
//! Invariants (tested):
//! - Feeding a text in any split yields, concatenated per kind, the same events as feeding it
//!   whole: a streamed call reassembles to the call of the whole reply.
//! - Text that could still become a marker is held back, never emitted and later retracted;
//!   text that turns out not to be a well-formed call (no name) is passed through as text.
//! - A call's arguments are the model's own JSON text, byte for byte.
//! - Whitespace around calls (before the first, between and after them) is not content.

/// How a model writes tool calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>\n{"name": "f", "arguments": {…}}\n</tool_call>` (Qwen2, Qwen3, Hermes).
    Hermes,
    /// `[TOOL_CALLS] [{"name": "f", "arguments": {…}}, …]` (Mistral, Mixtral 8x22B).
    Mistral,
    /// DeepSeek-V3/R1: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f`
    /// then the arguments in a ```` ```json ```` fence, `<｜tool▁call▁end｜>`, …,
    /// `<｜tool▁calls▁end｜>`.
    DeepSeekV3,
    /// DeepSeek-V3.1: `<｜tool▁call▁begin｜>f<｜tool▁sep｜>{…}<｜tool▁call▁end｜>`.
    DeepSeekV31,
    /// Kimi K2: `<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0
    /// <|tool_call_argument_begin|>{…}<|tool_call_end|>…<|tool_calls_section_end|>`.
    KimiK2,
    /// GPT-OSS's harmony messages: `<|start|>assistant<|channel|>commentary to=functions.f
    /// <|constrain|>json<|message|>{…}<|call|>`. A call is a message whose header names a
    /// function: read by [`super::OutputText`]'s harmony state, not by [`ToolParser`] (for
    /// which the answer text is all text).
    Harmony,
}

/// The delimiters of a format whose calls are marker-separated fields (not one JSON value).
struct Delimited {
    open: &'static str,
    call_open: &'static str,
    /// Ends the call's header (its name, or its id from which the name is read).
    header_end: &'static str,
    /// Ends the arguments.
    args_end: &'static str,
    /// Expected (after whitespace) once the arguments end, if anything.
    after_args: Option<&'static str>,
    close: &'static str,
}

impl ToolFormat {
    pub const ALL: [ToolFormat; 5] = [
        ToolFormat::Hermes,
        ToolFormat::Mistral,
        ToolFormat::DeepSeekV3,
        ToolFormat::DeepSeekV31,
        ToolFormat::KimiK2,
    ];

    /// The name `--tool-call-parser` takes (vLLM's names).
    pub fn name(self) -> &'static str {
        match self {
            ToolFormat::Hermes => "hermes",
            ToolFormat::Mistral => "mistral",
            ToolFormat::DeepSeekV3 => "deepseek_v3",
            ToolFormat::DeepSeekV31 => "deepseek_v31",
            ToolFormat::KimiK2 => "kimi_k2",
            ToolFormat::Harmony => "openai",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .chain([ToolFormat::Harmony])
            .find(|f| f.name() == s)
    }

    /// The format a model writes: the one whose markers its vocabulary holds, else the one
    /// its architecture's releases use (Hermes where nothing says otherwise).
    pub fn detect(has_token: impl Fn(&str) -> bool, architecture: &str) -> ToolFormat {
        if has_token("<|call|>") && has_token("<|channel|>") {
            ToolFormat::Harmony
        } else if has_token("<|tool_calls_section_begin|>") {
            ToolFormat::KimiK2
        } else if has_token("<｜tool▁calls▁begin｜>") {
            ToolFormat::DeepSeekV3
        } else if has_token("[TOOL_CALLS]") {
            ToolFormat::Mistral
        } else if has_token("<tool_call>") {
            ToolFormat::Hermes
        } else {
            match architecture {
                "DeepseekV3ForCausalLM" => ToolFormat::DeepSeekV3,
                // A ChatML vocabulary (an upcycled SmolLM2 or Qwen) speaks Hermes.
                "MixtralForCausalLM" if !has_token("<|im_start|>") => ToolFormat::Mistral,
                "GptOssForCausalLM" if has_token("<|channel|>") => ToolFormat::Harmony,
                _ => ToolFormat::Hermes,
            }
        }
    }

    /// The marker that opens a model's tool calls.
    pub fn open(self) -> &'static str {
        match self {
            ToolFormat::Hermes => "<tool_call>",
            ToolFormat::Mistral => "[TOOL_CALLS]",
            ToolFormat::Harmony => "<|channel|>commentary to=functions.",
            _ => self.delimited().expect("delimited").open,
        }
    }

    /// Every marker the format writes (what must reach the parser as text even where the
    /// vocabulary holds it as a special token).
    pub fn markers(self) -> Vec<&'static str> {
        match self {
            ToolFormat::Hermes => vec!["<tool_call>", "</tool_call>"],
            ToolFormat::Mistral => vec!["[TOOL_CALLS]"],
            // Message headers: the harmony state reads them.
            ToolFormat::Harmony => vec![],
            f => {
                let d = f.delimited().expect("delimited");
                let mut m = vec![d.open, d.call_open, d.args_end, d.close, d.header_end];
                m.extend(d.after_args);
                if f == ToolFormat::DeepSeekV3 {
                    m.push("<｜tool▁sep｜>");
                }
                m.retain(|s| !s.starts_with('\n'));
                m
            }
        }
    }

    /// `calls` (name, arguments as JSON text) written as the model writes them: what a
    /// chat template that knows no tools is given for an assistant turn's calls, and the
    /// example the tool preamble shows. [`ToolParser`] reads it back as those calls (tested).
    pub fn render_calls(self, calls: &[(&str, &str)]) -> String {
        let object = |name: &str, args: &str| {
            format!(
                "{{\"name\": {}, \"arguments\": {args}}}",
                serde_json::to_string(name).expect("a string serializes")
            )
        };
        match self {
            ToolFormat::Hermes => calls
                .iter()
                .map(|(n, a)| format!("<tool_call>\n{}\n</tool_call>", object(n, a)))
                .collect::<Vec<_>>()
                .join("\n"),
            ToolFormat::Mistral => {
                let objs: Vec<String> = calls.iter().map(|(n, a)| object(n, a)).collect();
                format!("[TOOL_CALLS] [{}]", objs.join(", "))
            }
            ToolFormat::Harmony => calls
                .iter()
                .map(|(n, a)| {
                    format!(
                        "<|start|>assistant<|channel|>commentary to=functions.{n} \
                         <|constrain|>json<|message|>{a}<|call|>"
                    )
                })
                .collect(),
            f => {
                let d = f.delimited().expect("delimited");
                let mut s = d.open.to_string();
                for (i, (n, a)) in calls.iter().enumerate() {
                    let header = match f {
                        ToolFormat::DeepSeekV3 => format!("function<｜tool▁sep｜>{n}"),
                        ToolFormat::KimiK2 => format!("functions.{n}:{i}"),
                        _ => n.to_string(),
                    };
                    s.push_str(&format!(
                        "{}{header}{}{a}{}{}",
                        d.call_open,
                        d.header_end,
                        d.args_end,
                        d.after_args.unwrap_or("")
                    ));
                }
                s.push_str(d.close);
                s
            }
        }
    }

    /// The system prompt that offers `tools` (OpenAI's `{"type": "function", "function":
    /// {…}}` objects) to a model whose chat template knows no tools: their schemas, one per
    /// line, and how to call them in this format (Qwen2.5's wording for Hermes).
    pub fn preamble(self, tools: &[serde_json::Value]) -> String {
        let lines: Vec<String> = tools.iter().map(super::template::py_dumps).collect();
        let example = self.render_calls(&[("<function-name>", "<args-json-object>")]);
        format!(
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
             You are provided with function signatures within <tools></tools> XML tags:\n\
             <tools>\n{}\n</tools>\n\n\
             For each function call, return a json object with function name and arguments \
             written as follows:\n{example}",
            lines.join("\n")
        )
    }

    fn delimited(self) -> Option<Delimited> {
        match self {
            ToolFormat::DeepSeekV3 => Some(Delimited {
                open: "<｜tool▁calls▁begin｜>",
                call_open: "<｜tool▁call▁begin｜>",
                header_end: "\n```json\n",
                args_end: "\n```",
                after_args: Some("<｜tool▁call▁end｜>"),
                close: "<｜tool▁calls▁end｜>",
            }),
            ToolFormat::DeepSeekV31 => Some(Delimited {
                open: "<｜tool▁calls▁begin｜>",
                call_open: "<｜tool▁call▁begin｜>",
                header_end: "<｜tool▁sep｜>",
                args_end: "<｜tool▁call▁end｜>",
                after_args: None,
                close: "<｜tool▁calls▁end｜>",
            }),
            ToolFormat::KimiK2 => Some(Delimited {
                open: "<|tool_calls_section_begin|>",
                call_open: "<|tool_call_begin|>",
                header_end: "<|tool_call_argument_begin|>",
                args_end: "<|tool_call_end|>",
                after_args: None,
                close: "<|tool_calls_section_end|>",
            }),
            ToolFormat::Hermes | ToolFormat::Mistral | ToolFormat::Harmony => None,
        }
    }

    /// A call's name and, where the format carries one, its id, from a delimited header.
    fn header(self, h: &str) -> (String, Option<String>) {
        match self {
            ToolFormat::DeepSeekV3 => {
                let name = h.split_once("<｜tool▁sep｜>").map_or(h, |(_, n)| n);
                (name.trim().to_string(), None)
            }
            ToolFormat::KimiK2 => {
                let id = h.trim();
                let name = id.strip_prefix("functions.").unwrap_or(id);
                let name = name.rsplit_once(':').map_or(name, |(n, _)| n);
                (name.to_string(), Some(id.to_string()))
            }
            _ => (h.trim().to_string(), None),
        }
    }
}

/// What the answer text holds, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum ToolEvent {
    /// Answer text that is not part of a call.
    Text(String),
    /// A call begins: its index in the reply (from 0), id and function name.
    Call {
        index: usize,
        id: String,
        name: String,
    },
    /// More of call `index`'s arguments (JSON text, as generated).
    Args { index: usize, text: String },
}

/// Where a JSON call object (`{"name": …, "arguments": …}`) stands, character by character.
#[derive(Clone, Debug, PartialEq)]
enum Json {
    /// Before the object's `{`.
    Start,
    /// Expecting a key or `}`.
    Key,
    /// Inside a key string (its text so far, raw).
    KeyStr { raw: String, esc: bool },
    /// After a key, expecting `:`.
    Colon { key: String },
    /// After `:`, expecting the value.
    ValueStart { key: String },
    /// Inside a value: nesting depth of brackets, string state, its text so far (kept only
    /// for `name`; `arguments` is streamed).
    Value {
        key: String,
        depth: usize,
        in_str: bool,
        esc: bool,
        raw: String,
    },
    /// After a value, expecting `,` or `}`.
    AfterValue,
}

/// One call object being read.
#[derive(Clone, Debug)]
struct JsonCall {
    state: Json,
    /// Everything consumed, for passing a malformed object through as text.
    raw: String,
    name: Option<String>,
    /// Arguments read before the name (emitted once it is known).
    early_args: String,
    has_args: bool,
}

/// What the arguments key of a call object may be called.
fn is_args_key(k: &str) -> bool {
    k == "arguments" || k == "parameters"
}

/// What one character did to a call object.
enum Step {
    Continue,
    /// The object's closing brace.
    Done,
    /// Not a call object after all.
    Malformed,
}

impl JsonCall {
    fn new() -> Self {
        JsonCall {
            state: Json::Start,
            raw: String::new(),
            name: None,
            early_args: String::new(),
            has_args: false,
        }
    }

    /// Consumes `c`; argument text goes to `args`.
    fn push(&mut self, c: char, args: &mut String) -> Step {
        self.raw.push(c);
        let ws = c.is_whitespace();
        let state = std::mem::replace(&mut self.state, Json::Start);
        self.state = match state {
            Json::Start if ws => Json::Start,
            Json::Start if c == '{' => Json::Key,
            Json::Key if ws || c == ',' => Json::Key,
            Json::Key if c == '"' => Json::KeyStr {
                raw: String::new(),
                esc: false,
            },
            Json::Key if c == '}' => return Step::Done,
            Json::KeyStr { mut raw, esc } => {
                if c == '"' && !esc {
                    let key = serde_json::from_str::<String>(&format!("\"{raw}\"")).unwrap_or(raw);
                    Json::Colon { key }
                } else {
                    raw.push(c);
                    Json::KeyStr {
                        raw,
                        esc: c == '\\' && !esc,
                    }
                }
            }
            Json::Colon { key } if ws => Json::Colon { key },
            Json::Colon { key } if c == ':' => Json::ValueStart { key },
            Json::ValueStart { key } if ws => Json::ValueStart { key },
            Json::ValueStart { key } => {
                if is_args_key(&key) {
                    self.has_args = true;
                }
                let v = Json::Value {
                    key,
                    depth: 0,
                    in_str: false,
                    esc: false,
                    raw: String::new(),
                };
                self.raw.pop();
                self.state = v;
                return self.push(c, args);
            }
            Json::Value {
                key,
                mut depth,
                mut in_str,
                mut esc,
                mut raw,
            } => {
                // A scalar ends at the delimiter after it, which is not part of it.
                if !in_str && depth == 0 && !raw.is_empty() && (c == ',' || c == '}' || ws) {
                    let scalar_done = !raw.starts_with(['{', '[', '"']);
                    if scalar_done {
                        self.end_value(&key, &raw);
                        self.raw.pop();
                        self.state = Json::AfterValue;
                        return self.push(c, args);
                    }
                }
                if in_str {
                    if esc {
                        esc = false;
                    } else if c == '\\' {
                        esc = true;
                    } else if c == '"' {
                        in_str = false;
                    }
                } else if c == '"' {
                    in_str = true;
                } else if c == '{' || c == '[' {
                    depth += 1;
                } else if c == '}' || c == ']' {
                    if depth == 0 {
                        return Step::Malformed;
                    }
                    depth -= 1;
                }
                raw.push(c);
                if is_args_key(&key) {
                    if self.name.is_some() {
                        args.push(c);
                    } else {
                        self.early_args.push(c);
                    }
                }
                let closed = !in_str && depth == 0 && raw.starts_with(['{', '[', '"']);
                if closed {
                    self.end_value(&key, &raw);
                    Json::AfterValue
                } else {
                    Json::Value {
                        key,
                        depth,
                        in_str,
                        esc,
                        raw,
                    }
                }
            }
            Json::AfterValue if ws => Json::AfterValue,
            Json::AfterValue if c == ',' => Json::Key,
            Json::AfterValue if c == '}' => return Step::Done,
            _ => return Step::Malformed,
        };
        Step::Continue
    }

    fn end_value(&mut self, key: &str, raw: &str) {
        if key == "name" {
            self.name = serde_json::from_str::<String>(raw).ok();
        }
    }
}

/// Where the parser stands.
#[derive(Clone, Debug)]
enum State {
    /// Answer text, watching for the format's opening marker.
    Text,
    /// Reading call objects (Hermes, Mistral).
    Object(JsonCall),
    /// After a Hermes object: expecting `</tool_call>`.
    HermesClose,
    /// Mistral: after the marker, expecting `[` (or a lone object).
    MistralList,
    /// Mistral: after an object in the list, expecting `,` or `]`.
    MistralNext,
    /// Delimited formats: between calls, expecting a call or the closing marker.
    Between,
    /// Delimited formats: reading a call's header.
    Header(String),
    /// Delimited formats: streaming a call's arguments.
    Args,
    /// Delimited formats: expecting the marker that follows the arguments.
    AfterArgs,
}

/// Parses one reply's answer text into text and tool calls (see the module docs).
pub struct ToolParser {
    format: ToolFormat,
    id_prefix: String,
    state: State,
    /// Unconsumed text (possibly the start of a marker).
    buf: String,
    /// Whitespace held until text that is not whitespace follows it.
    ws: String,
    calls: usize,
    /// Whether the current object's call event is out (it then may not turn back into text).
    announced: bool,
    /// What a Mistral call list consumed before its first object (`[TOOL_CALLS] [`): text
    /// again if that object turns out not to be a call.
    opener: String,
}

/// The length of the longest suffix of `s` that is a proper prefix of `marker`.
fn partial_suffix(s: &str, marker: &str) -> usize {
    (1..marker.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && marker.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

impl ToolParser {
    /// A parser for `format`; calls without an id of the model's own get `{id_prefix}{index}`.
    pub fn new(format: ToolFormat, id_prefix: impl Into<String>) -> Self {
        ToolParser {
            format,
            id_prefix: id_prefix.into(),
            state: State::Text,
            buf: String::new(),
            ws: String::new(),
            calls: 0,
            announced: false,
            opener: String::new(),
        }
    }

    pub fn format(&self) -> ToolFormat {
        self.format
    }

    /// What call ids without one of the model's own start with.
    pub fn id_prefix(&self) -> &str {
        &self.id_prefix
    }

    /// Calls begun so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    fn text(&mut self, s: &str, out: &mut Vec<ToolEvent>) {
        if s.is_empty() {
            return;
        }
        if s.chars().all(char::is_whitespace) {
            self.ws.push_str(s);
            return;
        }
        let mut t = std::mem::take(&mut self.ws);
        t.push_str(s);
        let trail = t.len() - t.trim_end().len();
        self.ws = t.split_off(t.len() - trail);
        match out.last_mut() {
            Some(ToolEvent::Text(prev)) => prev.push_str(&t),
            _ => out.push(ToolEvent::Text(t)),
        }
    }

    /// Emits the current object's call once its name is known (with arguments read before it).
    fn announce(&mut self, call: &mut JsonCall, out: &mut Vec<ToolEvent>) {
        if self.announced {
            return;
        }
        if let Some(name) = call.name.clone() {
            self.begin(name, None, out);
            self.announced = true;
            self.opener.clear();
            let early = std::mem::take(&mut call.early_args);
            self.args(early, out);
        }
    }

    /// A call object that was not a call, as the text it was (with the marker, and for
    /// Mistral the list opener, that preceded it).
    fn passed_through(&mut self, raw: &str) -> String {
        let marker = match self.format {
            ToolFormat::Mistral => std::mem::take(&mut self.opener),
            f => f.open().to_string(),
        };
        format!("{marker}{raw}")
    }

    fn begin(&mut self, name: String, id: Option<String>, out: &mut Vec<ToolEvent>) {
        let index = self.calls;
        self.calls += 1;
        self.ws.clear();
        let id = id.unwrap_or_else(|| format!("{}{index}", self.id_prefix));
        out.push(ToolEvent::Call { index, id, name });
    }

    fn args(&self, text: String, out: &mut Vec<ToolEvent>) {
        if text.is_empty() {
            return;
        }
        let index = self.calls - 1;
        match out.last_mut() {
            Some(ToolEvent::Args { index: i, text: t }) if *i == index => t.push_str(&text),
            _ => out.push(ToolEvent::Args { index, text }),
        }
    }

    /// Feeds answer text; returns the events it completes.
    pub fn push(&mut self, s: &str) -> Vec<ToolEvent> {
        self.buf.push_str(s);
        let mut out = Vec::new();
        while self.step(&mut out) {}
        out
    }

    /// Expects `marker` at the start of the buffer (after whitespace): Some(true) consumed,
    /// Some(false) the buffer cannot start with it, None not enough text yet.
    fn expect(&mut self, marker: &str) -> Option<bool> {
        let t = self.buf.trim_start();
        if t.starts_with(marker) {
            let skip = self.buf.len() - t.len() + marker.len();
            self.buf.drain(..skip);
            Some(true)
        } else if marker.starts_with(t) {
            None
        } else {
            Some(false)
        }
    }

    /// One transition; false when it needs more text.
    fn step(&mut self, out: &mut Vec<ToolEvent>) -> bool {
        let state = std::mem::replace(&mut self.state, State::Text);
        match state {
            State::Text if self.format == ToolFormat::Harmony => {
                let all = std::mem::take(&mut self.buf);
                self.text(&all, out);
                false
            }
            State::Text => {
                let open = self.format.open();
                if let Some(i) = self.buf.find(open) {
                    let before: String = self.buf.drain(..i + open.len()).collect();
                    self.text(&before[..i], out);
                    if self.format == ToolFormat::Mistral {
                        self.opener = open.to_string();
                    }
                    self.state = match self.format {
                        ToolFormat::Hermes => State::Object(JsonCall::new()),
                        ToolFormat::Mistral => State::MistralList,
                        _ => State::Between,
                    };
                    self.announced = false;
                    return true;
                }
                let keep = partial_suffix(&self.buf, open);
                let emit: String = self.buf.drain(..self.buf.len() - keep).collect();
                self.text(&emit, out);
                false
            }
            State::Object(mut call) => {
                let mut chars = 0;
                let mut args = String::new();
                let mut result = None;
                let buf = std::mem::take(&mut self.buf);
                for c in buf.chars() {
                    chars += c.len_utf8();
                    match call.push(c, &mut args) {
                        Step::Continue => {}
                        Step::Done => {
                            result = Some(true);
                            break;
                        }
                        Step::Malformed => {
                            result = Some(false);
                            break;
                        }
                    }
                    self.announce(&mut call, out);
                }
                self.buf = buf[chars..].to_string();
                self.announce(&mut call, out);
                if self.announced {
                    self.args(args, out);
                }
                match result {
                    None => {
                        self.state = State::Object(call);
                        false
                    }
                    Some(true) if self.announced => {
                        if !call.has_args {
                            self.args("{}".into(), out);
                        }
                        self.announced = false;
                        self.state = match self.format {
                            ToolFormat::Mistral => State::MistralNext,
                            _ => State::HermesClose,
                        };
                        true
                    }
                    // Not a call (no name, or not an object): what was read is text.
                    _ => {
                        let t = self.passed_through(&call.raw);
                        self.text(&t, out);
                        self.state = State::Text;
                        true
                    }
                }
            }
            State::HermesClose => match self.expect("</tool_call>") {
                Some(_) => true,
                None => {
                    self.state = State::HermesClose;
                    false
                }
            },
            State::MistralList => {
                let t = self.buf.trim_start();
                if t.is_empty() {
                    self.state = State::MistralList;
                    return false;
                }
                if t.starts_with('[') {
                    let n = self.buf.len() - t.len() + 1;
                    let consumed: String = self.buf.drain(..n).collect();
                    self.opener.push_str(&consumed);
                }
                // A list, or a lone object, or text.
                self.state = State::Object(JsonCall::new());
                true
            }
            State::MistralNext => {
                if let Some(true) = self.expect(",") {
                    self.state = State::Object(JsonCall::new());
                    return true;
                }
                match self.expect("]") {
                    None if self.buf.trim().is_empty() => {
                        self.state = State::MistralNext;
                        false
                    }
                    _ => true,
                }
            }
            State::Between => {
                let d = self.format.delimited().expect("delimited");
                if let Some(true) = self.expect(d.call_open) {
                    self.state = State::Header(String::new());
                    return true;
                }
                match self.expect(d.close) {
                    Some(true) => true,
                    Some(false) if !d.call_open.starts_with(self.buf.trim_start()) => {
                        // Neither another call nor the end: back to text.
                        true
                    }
                    _ => {
                        self.state = State::Between;
                        false
                    }
                }
            }
            State::Header(mut h) => {
                let d = self.format.delimited().expect("delimited");
                h.push_str(&std::mem::take(&mut self.buf));
                if let Some(i) = h.find(d.header_end) {
                    self.buf = h.split_off(i + d.header_end.len());
                    h.truncate(i);
                    let (name, id) = self.format.header(&h);
                    self.begin(name, id, out);
                    self.state = State::Args;
                    true
                } else {
                    self.state = State::Header(h);
                    false
                }
            }
            State::Args => {
                let d = self.format.delimited().expect("delimited");
                if let Some(i) = self.buf.find(d.args_end) {
                    let a: String = self.buf.drain(..i + d.args_end.len()).collect();
                    self.args(a[..i].to_string(), out);
                    self.state = if d.after_args.is_some() {
                        State::AfterArgs
                    } else {
                        State::Between
                    };
                    return true;
                }
                let keep = partial_suffix(&self.buf, d.args_end);
                let a: String = self.buf.drain(..self.buf.len() - keep).collect();
                self.args(a, out);
                self.state = State::Args;
                false
            }
            State::AfterArgs => {
                let d = self.format.delimited().expect("delimited");
                match self.expect(d.after_args.unwrap_or_default()) {
                    None => {
                        self.state = State::AfterArgs;
                        false
                    }
                    Some(_) => {
                        self.state = State::Between;
                        true
                    }
                }
            }
        }
    }

    /// The end of the answer: text still held that can no longer become a call.
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.buf);
        match std::mem::replace(&mut self.state, State::Text) {
            State::Text => self.text(&rest, &mut out),
            State::Object(call) if !self.announced => {
                let mut t = self.passed_through(&call.raw);
                t.push_str(&rest);
                self.text(&t, &mut out);
            }
            State::MistralList => {
                let t = format!("{}{rest}", std::mem::take(&mut self.opener));
                self.text(&t, &mut out);
            }
            State::Header(h) if !h.is_empty() || !rest.is_empty() => {
                let (name, id) = self.format.header(&format!("{h}{rest}"));
                if !name.is_empty() {
                    self.begin(name, id, &mut out);
                }
            }
            State::Args => self.args(rest, &mut out),
            // A call cut short (length) keeps what it had; markers after it are not text.
            _ => {}
        }
        if self.calls == 0 {
            let ws = std::mem::take(&mut self.ws);
            if let Some(ToolEvent::Text(t)) = out.last_mut() {
                t.push_str(&ws);
            } else if !ws.is_empty() {
                out.push(ToolEvent::Text(ws));
            }
        }
        out
    }
}

/// A function a request offers the model: its name and JSON schema.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub parameters: serde_json::Value,
}

/// `s` as a Lark string literal, or, where `special(s)` gives its id, a reference to that
/// special token (`<[id]>`).
fn lark_lit(s: &str, special: &dyn Fn(&str) -> Option<u32>) -> String {
    match special(s) {
        Some(id) => format!("<[{id}]>"),
        None => serde_json::to_string(s).expect("a string serializes"),
    }
}

/// A tool's parameters as an inline `%json` schema: compact (see `constrain`); a function
/// declared without parameters takes none (`{}`).
fn params_json(t: &ToolSpec) -> String {
    let mut p = match &t.parameters {
        serde_json::Value::Object(m) if !m.is_empty() => t.parameters.clone(),
        _ => serde_json::json!({"type": "object", "properties": {}, "additionalProperties": false}),
    };
    if let Some(o) = p.as_object_mut() {
        o.entry("x-guidance")
            .or_insert(serde_json::json!({"whitespace_flexible": false}));
    }
    format!("%json {p}")
}

/// A Lark grammar (llguidance's dialect) for the calls a request requires: one call to one of
/// `tools` (several, one after another, when `parallel`), written in `format`, each call's
/// arguments matching its tool's schema. Every sentence of it [`ToolParser`] reads back as
/// those calls (tested). `special(m)` gives marker `m`'s id where it is a special token of
/// the vocabulary (matched as that token, not as its text).
pub fn call_grammar(
    format: ToolFormat,
    tools: &[ToolSpec],
    parallel: bool,
    special: &dyn Fn(&str) -> Option<u32>,
) -> String {
    let lit = |s: &str| lark_lit(s, special);
    let mut g = String::new();
    let alts: Vec<String> = (0..tools.len()).map(|i| format!("call_{i}")).collect();
    let alts = alts.join(" | ");
    let many = |one: &str, sep: &str| {
        if parallel {
            format!("{one} ({sep} {one})*")
        } else {
            one.to_string()
        }
    };
    match format {
        ToolFormat::Hermes | ToolFormat::Mistral => {
            for (i, t) in tools.iter().enumerate() {
                let head = format!(
                    "{{\"name\": {}, \"arguments\": ",
                    serde_json::to_string(&t.name).expect("name")
                );
                g.push_str(&format!(
                    "call_{i}: {} {} \"}}\"\n",
                    lit(&head),
                    params_json(t)
                ));
            }
            if format == ToolFormat::Hermes {
                g.push_str(&format!(
                    "call: {} \"\\n\" ({alts}) \"\\n</tool_call>\"\n",
                    lit("<tool_call>")
                ));
                g.insert_str(0, &format!("start: {}\n", many("call", "\"\\n\"")));
            } else {
                g.push_str(&format!("call: {alts}\n"));
                g.insert_str(
                    0,
                    &format!(
                        "start: {} \" [\" {} \"]\"\n",
                        lit("[TOOL_CALLS]"),
                        many("call", "\", \"")
                    ),
                );
            }
        }
        ToolFormat::Harmony => {
            // Generation starts in the assistant's header; thinking (the analysis channel)
            // stays free, then come the calls, each its own message.
            for (i, t) in tools.iter().enumerate() {
                g.push_str(&format!(
                    "call_{i}: {} {} {} {} {} {}\n",
                    lit("<|channel|>"),
                    lit(&format!("commentary to=functions.{} ", t.name)),
                    lit("<|constrain|>"),
                    lit("json"),
                    lit("<|message|>"),
                    params_json(t),
                ));
            }
            let next = [lit("<|call|>"), lit("<|start|>"), lit("assistant")].join(" ");
            let end = lit("<|call|>");
            g.insert_str(
                0,
                &format!(
                    "start: analysis? {} {end}\n\
                     analysis: {} {} {} THOUGHT {} {} {}\n\
                     THOUGHT: /(?s:.*)/\n\
                     call: {alts}\n",
                    many("call", &next),
                    lit("<|channel|>"),
                    lit("analysis"),
                    lit("<|message|>"),
                    lit("<|end|>"),
                    lit("<|start|>"),
                    lit("assistant"),
                ),
            );
        }
        ToolFormat::DeepSeekV3 | ToolFormat::DeepSeekV31 | ToolFormat::KimiK2 => {
            let d = format.delimited().expect("delimited");
            for (i, t) in tools.iter().enumerate() {
                let header = match format {
                    ToolFormat::DeepSeekV3 => format!(
                        "{} {}",
                        lit("function"),
                        [lit("<｜tool▁sep｜>"), lit(&t.name)].join(" ")
                    ),
                    ToolFormat::KimiK2 => {
                        format!("{} /[0-9]+/", lit(&format!("functions.{}:", t.name)))
                    }
                    _ => lit(&t.name),
                };
                let after = d
                    .after_args
                    .map(|a| format!(" {}", lit(a)))
                    .unwrap_or_default();
                g.push_str(&format!(
                    "call_{i}: {} {header} {} {} {}{after}\n",
                    lit(d.call_open),
                    lit(d.header_end),
                    params_json(t),
                    lit(d.args_end),
                ));
            }
            g.push_str(&format!("call: {alts}\n"));
            let calls = if parallel { "call+" } else { "call" };
            g.insert_str(
                0,
                &format!("start: {} {calls} {}\n", lit(d.open), lit(d.close)),
            );
        }
    }
    g
}

/// A reply's calls, assembled from its events: (id, name, arguments).
pub fn assemble(events: &[ToolEvent]) -> (String, Vec<(String, String, String)>) {
    let mut text = String::new();
    let mut calls: Vec<(String, String, String)> = Vec::new();
    for e in events {
        match e {
            ToolEvent::Text(t) => text.push_str(t),
            ToolEvent::Call { id, name, .. } => {
                calls.push((id.clone(), name.clone(), String::new()))
            }
            ToolEvent::Args { index, text: a } => calls[*index].2.push_str(a),
        }
    }
    (text, calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(f: ToolFormat, s: &str) -> (String, Vec<(String, String, String)>) {
        let mut p = ToolParser::new(f, "call_");
        let mut ev = p.push(s);
        ev.extend(p.finish());
        assemble(&ev)
    }

    /// Every split into pieces of `n` characters gives the whole text's result.
    fn check_splits(f: ToolFormat, s: &str) -> (String, Vec<(String, String, String)>) {
        let want = whole(f, s);
        let chars: Vec<char> = s.chars().collect();
        for n in 1..=4 {
            let mut p = ToolParser::new(f, "call_");
            let mut ev = Vec::new();
            for piece in chars.chunks(n) {
                ev.extend(p.push(&piece.iter().collect::<String>()));
            }
            ev.extend(p.finish());
            assert_eq!(assemble(&ev), want, "{f:?} pieces of {n}: {s:?}");
        }
        // Two-way splits at every character boundary.
        for (i, _) in s.char_indices() {
            let mut p = ToolParser::new(f, "call_");
            let mut ev = p.push(&s[..i]);
            ev.extend(p.push(&s[i..]));
            ev.extend(p.finish());
            assert_eq!(assemble(&ev), want, "{f:?} split at {i}: {s:?}");
        }
        want
    }

    fn call(id: &str, name: &str, args: &str) -> (String, String, String) {
        (id.into(), name.into(), args.into())
    }

    #[test]
    fn hermes_calls_text_and_parallel() {
        let s = "Let me check.\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris \\\"FR\\\"\", \"days\": [1, {\"x\": \"}\"}]}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>\n";
        let (text, calls) = check_splits(ToolFormat::Hermes, s);
        assert_eq!(text, "Let me check.");
        assert_eq!(
            calls,
            vec![
                call(
                    "call_0",
                    "get_weather",
                    "{\"city\": \"Paris \\\"FR\\\"\", \"days\": [1, {\"x\": \"}\"}]}"
                ),
                call("call_1", "now", "{}"),
            ]
        );
        for (_, _, a) in &calls {
            serde_json::from_str::<serde_json::Value>(a).expect("arguments are JSON");
        }
    }

    #[test]
    fn hermes_arguments_before_name_and_missing_arguments() {
        let (_, calls) = check_splits(
            ToolFormat::Hermes,
            "<tool_call>{\"arguments\": {\"a\": 1}, \"name\": \"f\"}</tool_call>",
        );
        assert_eq!(calls, vec![call("call_0", "f", "{\"a\": 1}")]);
        let (_, calls) = check_splits(
            ToolFormat::Hermes,
            "<tool_call>{\"name\": \"g\"}</tool_call>",
        );
        assert_eq!(calls, vec![call("call_0", "g", "{}")]);
        let (_, calls) = check_splits(
            ToolFormat::Hermes,
            "<tool_call>{\"name\": \"h\", \"arguments\": 17, \"x\": true}</tool_call>",
        );
        assert_eq!(calls, vec![call("call_0", "h", "17")]);
    }

    #[test]
    fn hermes_not_a_call_is_text() {
        for s in [
            "a <tool_call> is written like this",
            "<tool_call>{\"arguments\": {}}</tool_call> done",
            "x < y and <tool_ca",
            "plain answer",
            "  spaced answer \n",
        ] {
            let (text, calls) = check_splits(ToolFormat::Hermes, s);
            assert!(calls.is_empty(), "{s:?}");
            assert_eq!(text, s, "{s:?}");
        }
    }

    #[test]
    fn mistral_not_a_call_is_text() {
        for s in [
            "[TOOL_CALLS] [{\"arguments\": {}}] done",
            "[TOOL_CALLS] plain",
            "[TOOL_CALLS][1, 2]",
            "[TOOL_CALLS] [",
            "[TOOL_CALLS]",
        ] {
            let (text, calls) = check_splits(ToolFormat::Mistral, s);
            assert!(calls.is_empty(), "{s:?}");
            assert_eq!(text, s, "{s:?}");
        }
    }

    #[test]
    fn hermes_cut_short_keeps_the_partial_call() {
        let (text, calls) = check_splits(
            ToolFormat::Hermes,
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"q\": \"par",
        );
        assert_eq!(text, "");
        assert_eq!(calls, vec![call("call_0", "f", "{\"q\": \"par")]);
    }

    #[test]
    fn mistral_list() {
        let s = "[TOOL_CALLS] [{\"name\": \"a\", \"arguments\": {\"x\": [1, 2]}}, {\"name\": \"b\", \"arguments\": {}}]";
        let (text, calls) = check_splits(ToolFormat::Mistral, s);
        assert_eq!(text, "");
        assert_eq!(
            calls,
            vec![
                call("call_0", "a", "{\"x\": [1, 2]}"),
                call("call_1", "b", "{}")
            ]
        );
    }

    #[test]
    fn deepseek_v3_blocks() {
        let s = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Oslo\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>now\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        let (text, calls) = check_splits(ToolFormat::DeepSeekV3, s);
        assert_eq!(text, "");
        assert_eq!(
            calls,
            vec![
                call("call_0", "get_weather", "{\"city\": \"Oslo\"}"),
                call("call_1", "now", "{}")
            ]
        );
        let s31 = "Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Oslo\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        let (text, calls) = check_splits(ToolFormat::DeepSeekV31, s31);
        assert_eq!(text, "Sure.");
        assert_eq!(
            calls,
            vec![call("call_0", "get_weather", "{\"city\": \"Oslo\"}")]
        );
    }

    #[test]
    fn kimi_ids_are_the_models() {
        let s = "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Rome\"}<|tool_call_end|><|tool_call_begin|>functions.now:1<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>";
        let (_, calls) = check_splits(ToolFormat::KimiK2, s);
        assert_eq!(
            calls,
            vec![
                call(
                    "functions.get_weather:0",
                    "get_weather",
                    "{\"city\": \"Rome\"}"
                ),
                call("functions.now:1", "now", "{}"),
            ]
        );
    }

    #[test]
    fn detection_by_vocabulary_then_architecture() {
        let none = |_: &str| false;
        assert_eq!(
            ToolFormat::detect(none, "Qwen3MoeForCausalLM"),
            ToolFormat::Hermes
        );
        assert_eq!(
            ToolFormat::detect(none, "DeepseekV3ForCausalLM"),
            ToolFormat::DeepSeekV3
        );
        assert_eq!(
            ToolFormat::detect(none, "MixtralForCausalLM"),
            ToolFormat::Mistral
        );
        let chatml = |t: &str| t == "<|im_start|>";
        assert_eq!(
            ToolFormat::detect(chatml, "MixtralForCausalLM"),
            ToolFormat::Hermes
        );
        let kimi = |t: &str| t == "<|tool_calls_section_begin|>";
        assert_eq!(
            ToolFormat::detect(kimi, "DeepseekV3ForCausalLM"),
            ToolFormat::KimiK2
        );
        for f in ToolFormat::ALL {
            assert_eq!(ToolFormat::from_name(f.name()), Some(f));
        }
    }

    #[test]
    fn rendered_calls_parse_back_in_every_split() {
        let calls = [("get_weather", "{\"city\": \"Rome\"}"), ("now", "{}")];
        for f in ToolFormat::ALL {
            for n in [1, 2] {
                let text = f.render_calls(&calls[..n]);
                let (rest, got) = check_splits(f, &text);
                assert_eq!(rest, "", "{f:?}: {text:?}");
                let got: Vec<(&str, &str)> =
                    got.iter().map(|c| (c.1.as_str(), c.2.as_str())).collect();
                assert_eq!(got, calls[..n], "{f:?}: {text:?}");
            }
            for m in f.markers() {
                assert!(!m.is_empty() && !m.starts_with('\n'), "{f:?} marker {m:?}");
            }
            let p =
                f.preamble(&[serde_json::json!({"type": "function", "function": {"name": "now"}})]);
            assert!(
                p.contains("\"name\": \"now\"")
                    && p.contains(&f.render_calls(&[("<function-name>", "<args-json-object>")]))
            );
        }
    }
}
