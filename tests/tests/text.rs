//! Text pipeline against the fixtures: the tokenizer reproduces transformers' input ids and
//! decoded text, streaming detokenization equals one-shot decoding, and the chat template
//! renders the reasoning opener.

mod common;
use common::{fixture, golden, ids};

use switchyard_coordinator::text::tools::{self, ToolEvent, ToolFormat};
use switchyard_coordinator::text::{CallRecord, Chat, DetokStream, Message, OutputText, Tokenizer};

#[test]
fn encode_matches_transformers_input_ids() {
    for model in ["tiny-qwen3-moe", "tiny-mixtral"] {
        let tok = Tokenizer::load(&fixture(model)).unwrap();
        for p in golden(model)["prompts"].as_array().unwrap() {
            assert_eq!(
                tok.encode(p["text"].as_str().unwrap()).unwrap(),
                ids(&p["input_ids"]),
                "{model} {}",
                p["name"]
            );
        }
    }
}

#[test]
fn streaming_detokenization_equals_one_shot_decode_of_golden_outputs() {
    let tok = Tokenizer::load(&fixture("tiny-qwen3-moe")).unwrap();
    let hf_tok =
        tokenizers::Tokenizer::from_file(fixture("tiny-qwen3-moe").join("tokenizer.json")).unwrap();
    for model in ["tiny-qwen3-moe", "tiny-mixtral"] {
        for p in golden(model)["prompts"].as_array().unwrap() {
            let new_ids = ids(&p["greedy"]["new_ids"]);
            let want = p["greedy"]["new_text"].as_str().unwrap();
            assert_eq!(tok.decode(&new_ids, false).unwrap(), want);
            let mut s = DetokStream::new(false);
            let mut got = String::new();
            for id in &new_ids {
                if let Some(piece) = s.push(&hf_tok, *id).unwrap() {
                    // Never a dangling replacement char from a split multi-byte character.
                    assert!(!piece.ends_with('\u{FFFD}') || want.contains('\u{FFFD}'));
                    got.push_str(&piece);
                }
            }
            got.push_str(&s.flush(&hf_tok).unwrap());
            assert_eq!(got, want, "{model} {}", p["name"]);
        }
    }
}

#[test]
fn multibyte_characters_split_across_tokens_are_held_back() {
    let tok =
        tokenizers::Tokenizer::from_file(fixture("tokenizer").join("tokenizer.json")).unwrap();
    let text = "naïve café — 東京 🚀 done";
    let enc = tok.encode(text, false).unwrap();
    let mut s = DetokStream::new(false);
    let mut got = String::new();
    for id in enc.get_ids() {
        if let Some(piece) = s.push(&tok, *id).unwrap() {
            assert!(
                !piece.contains('\u{FFFD}'),
                "emitted a broken character: {piece:?}"
            );
            got.push_str(&piece);
        }
    }
    got.push_str(&s.flush(&tok).unwrap());
    assert_eq!(got, text);
}

#[test]
fn chat_template_opens_reasoning_and_output_splits_at_think_end() {
    let tok = Tokenizer::load(&fixture("tiny-qwen3-moe")).unwrap();
    let msgs = Chat::user("Hi");
    let rendered = tok.render_chat(&msgs).unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    );
    let prompt = tok.encode_chat(&msgs).unwrap();
    assert_eq!(prompt[0], tok.token_to_id("<|im_start|>").unwrap());
    assert!(tok.starts_in_reasoning(&prompt));
    // Feed "plan</think>answer" as generated tokens.
    let mut out = OutputText::new(&tok, &prompt, vec![]);
    let mut gen = tok.encode("plan").unwrap();
    gen.push(tok.think_end.unwrap());
    gen.extend(tok.encode("The answer").unwrap());
    let (mut r, mut a) = (String::new(), String::new());
    for id in gen {
        let d = out.push(&tok, id).unwrap();
        r.push_str(&d.reasoning);
        a.push_str(&d.text);
    }
    let d = out.finish(&tok).unwrap();
    r.push_str(&d.reasoning);
    a.push_str(&d.text);
    assert_eq!((r.as_str(), a.as_str()), ("plan", "The answer"));
}

/// GPT-OSS's harmony format: a tokenizer with its special tokens; the analysis channel streams
/// as reasoning, the final channel as the answer, and no header or marker leaks into either.
#[test]
fn harmony_channels_split_analysis_from_final() {
    let dir = std::env::temp_dir().join(format!("sy-harmony-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut tj: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tokenizer").join("tokenizer.json")).unwrap(),
    )
    .unwrap();
    let marks = [
        "<|start|>",
        "<|channel|>",
        "<|message|>",
        "<|end|>",
        "<|return|>",
    ];
    let base = 3000;
    for (i, m) in marks.iter().enumerate() {
        tj["added_tokens"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "id": base + i, "content": m, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            }));
    }
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"chat_template": "{% for m in messages %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endfor %}{% if add_generation_prompt %}<|start|>assistant{% endif %}"}"#,
    )
    .unwrap();
    let tok = Tokenizer::load(&dir).unwrap();
    let h = tok.harmony.expect("harmony markers found");
    let msgs = Chat::user("Hi");
    let prompt = tok.encode_chat(&msgs).unwrap();
    assert!(tok
        .render_chat(&msgs)
        .unwrap()
        .ends_with("<|start|>assistant"));
    let mut gen = vec![h.channel];
    gen.extend(tok.encode("analysis").unwrap());
    gen.push(h.message);
    gen.extend(tok.encode("Think it through.").unwrap());
    gen.push(h.end);
    gen.push(h.start);
    gen.extend(tok.encode("assistant").unwrap());
    gen.push(h.channel);
    gen.extend(tok.encode("final").unwrap());
    gen.push(h.message);
    gen.extend(tok.encode("Blue light scatters.").unwrap());
    let mut out = OutputText::new(&tok, &prompt, vec![]);
    let (mut r, mut a) = (String::new(), String::new());
    let mut reasoning_tokens = 0;
    for id in gen {
        let d = out.push(&tok, id).unwrap();
        if out.in_reasoning() {
            reasoning_tokens += 1;
        }
        r.push_str(&d.reasoning);
        a.push_str(&d.text);
    }
    let d = out.finish(&tok).unwrap();
    r.push_str(&d.reasoning);
    a.push_str(&d.text);
    assert_eq!(
        (r.as_str(), a.as_str()),
        ("Think it through.", "Blue light scatters.")
    );
    assert!(reasoning_tokens > 0);
    // A message to a function is a tool call (with tools on), its content the arguments; the
    // same message without tools is commentary text.
    let mut gen = vec![h.channel];
    gen.extend(tok.encode("analysis").unwrap());
    gen.push(h.message);
    gen.extend(tok.encode("Look it up.").unwrap());
    gen.extend([h.end, h.start]);
    gen.extend(tok.encode("assistant").unwrap());
    gen.push(h.channel);
    gen.extend(
        tok.encode("commentary to=functions.get_weather json")
            .unwrap(),
    );
    gen.push(h.message);
    gen.extend(tok.encode("{\"city\": \"Rome\"}").unwrap());
    let out = OutputText::new(&tok, &prompt, vec![]);
    let (r, a, calls, _) = feed(
        &tok,
        &mut out.with_tools(&tok, ToolFormat::Harmony, "c", true),
        &gen,
    );
    assert_eq!(
        (r.as_str(), a.as_str(), tools::assemble(&calls).1),
        (
            "Look it up.",
            "",
            vec![(
                "c0".into(),
                "get_weather".into(),
                "{\"city\": \"Rome\"}".into()
            )]
        )
    );
    let (_, a, calls, _) = feed(&tok, &mut OutputText::new(&tok, &prompt, vec![]), &gen);
    assert_eq!((a.as_str(), calls.len()), ("{\"city\": \"Rome\"}", 0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn eos_comes_from_generation_config() {
    let tok = Tokenizer::load(&fixture("tiny-qwen3-moe")).unwrap();
    assert_eq!(tok.eos_ids, vec![2045]);
}

#[test]
fn chat_template_jinja_file_takes_precedence() {
    let dir = std::env::temp_dir().join(format!("sy-tmpl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("tokenizer").join(f), dir.join(f)).unwrap();
    }
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}",
    )
    .unwrap();
    let tok = Tokenizer::load(&dir).unwrap();
    let msgs = Chat::user("x");
    assert_eq!(tok.render_chat(&msgs).unwrap(), "[user]x");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn feed(
    tok: &Tokenizer,
    out: &mut OutputText,
    gen: &[u32],
) -> (String, String, Vec<ToolEvent>, bool) {
    let (mut r, mut a, mut calls, mut stopped) = (String::new(), String::new(), Vec::new(), false);
    for &id in gen {
        let d = out.push(tok, id).unwrap();
        r.push_str(&d.reasoning);
        a.push_str(&d.text);
        calls.extend(d.calls);
        stopped |= d.stopped;
    }
    let d = out.finish(tok).unwrap();
    r.push_str(&d.reasoning);
    a.push_str(&d.text);
    calls.extend(d.calls);
    (r, a, calls, stopped)
}

fn tool_chat() -> Chat {
    let now = serde_json::json!({"type": "function", "function": {"name": "now",
        "parameters": {"type": "object", "properties": {}}}});
    let mut asked = Message::new("assistant", "");
    asked.tool_calls = vec![CallRecord {
        id: "call_1".into(),
        name: "now".into(),
        arguments: "{\"tz\": \"UTC\"}".into(),
    }];
    let mut answer = Message::new("tool", "12:00");
    answer.tool_call_id = Some("call_1".into());
    Chat {
        tools: vec![now],
        ..Chat::of(vec![Message::new("user", "Time?"), asked, answer])
    }
}

/// A chat template that knows no tools (the fixtures') gets them as a system prompt in the
/// model's call format, and past calls written as the model writes them.
#[test]
fn tools_reach_a_template_that_knows_none_in_the_models_format() {
    let tok = Tokenizer::load(&fixture("tiny-qwen3-moe")).unwrap();
    assert_eq!(tok.tool_format, ToolFormat::Hermes);
    let text = tok.render_chat(&tool_chat()).unwrap();
    assert!(
        text.starts_with("<|im_start|>system\n# Tools\n")
            && text.contains("<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"now\"")
            && text.contains(
                "<|im_start|>assistant\n<tool_call>\n{\"name\": \"now\", \"arguments\": {\"tz\": \"UTC\"}}\n</tool_call><|im_end|>\n<|im_start|>tool\n12:00<|im_end|>\n"
            )
            && text.ends_with("<|im_start|>assistant\n<think>\n"),
        "{text}"
    );
    let tok = Tokenizer::load(&fixture("tiny-deepseek-v3")).unwrap();
    assert_eq!(tok.tool_format, ToolFormat::DeepSeekV3);
    let mut chat = tool_chat();
    chat.messages.insert(0, Message::new("system", "Be brief."));
    let text = tok.render_chat(&chat).unwrap();
    assert!(
        text.starts_with("<|im_start|>system\nBe brief.\n\n# Tools\n")
            && text.contains("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>now\n```json\n{\"tz\": \"UTC\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
            && text.matches("<|im_start|>system").count() == 1,
        "{text}"
    );
}

/// A template that renders tools itself gets them, and past calls in Hugging Face's form
/// (arguments as an object).
#[test]
fn a_template_that_knows_tools_gets_them_in_hugging_faces_form() {
    let dir = std::env::temp_dir().join(format!("sy-tools-tpl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("tokenizer").join(f), dir.join(f)).unwrap();
    }
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}\
         {{ m.role }}:{{ m.content }}{% for c in m.tool_calls %}{{ c.id }}={{ c.function.name }}\
         {{ c.function.arguments | tojson }}{{ c.function.arguments.tz }}{% endfor %}\
         {% if m.tool_call_id %}<{{ m.tool_call_id }}>{% endif %};{% endfor %}",
    )
    .unwrap();
    let tok = Tokenizer::load(&dir).unwrap();
    assert_eq!(
        tok.render_chat(&tool_chat()).unwrap(),
        "[now]user:Time?;assistant:call_1=now{\"tz\": \"UTC\"}UTC;tool:12:00<call_1>;"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Generated tokens through the text pipeline with tools: reasoning stays reasoning, calls in
/// the answer become call events (not text), with parallel calls off the output ends where a
/// second call begins; markers that are special tokens of the vocabulary still reach the
/// parser.
#[test]
fn output_text_reads_calls_out_of_the_answer() {
    let tok = Tokenizer::load(&fixture("tiny-qwen3-moe")).unwrap();
    let prompt = tok.encode_chat(&Chat::user("Hi")).unwrap();
    let call = |n: &str| {
        format!("<tool_call>\n{{\"name\": \"{n}\", \"arguments\": {{\"a\": 1}}}}\n</tool_call>")
    };
    let mut gen = tok.encode("plan").unwrap();
    gen.push(tok.think_end.unwrap());
    gen.extend(
        tok.encode(&format!("Sure.\n{}\n{}", call("f"), call("g")))
            .unwrap(),
    );
    for (parallel, names) in [(true, vec!["f", "g"]), (false, vec!["f"])] {
        let mut out = OutputText::new(&tok, &prompt, vec![]).with_tools(
            &tok,
            ToolFormat::Hermes,
            "call_",
            parallel,
        );
        let (r, a, calls, stopped) = feed(&tok, &mut out, &gen);
        let (_, got) = tools::assemble(&calls);
        let want: Vec<(String, String, String)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("call_{i}"), n.to_string(), "{\"a\": 1}".to_string()))
            .collect();
        assert_eq!(
            (r.as_str(), a.as_str(), got, stopped),
            ("plan", "Sure.", want, !parallel)
        );
        assert_eq!(out.tool_calls(), names.len());
    }
    // `<tool_call>` as special tokens (skipped by decoding) in a copy of the vocabulary.
    let dir = std::env::temp_dir().join(format!("sy-tools-special-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut tj: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tokenizer").join("tokenizer.json")).unwrap(),
    )
    .unwrap();
    for (i, m) in ["<tool_call>", "</tool_call>"].iter().enumerate() {
        tj["added_tokens"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "id": 2048 + i, "content": m, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            }));
    }
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
    std::fs::copy(
        fixture("tokenizer").join("tokenizer_config.json"),
        dir.join("tokenizer_config.json"),
    )
    .unwrap();
    let tok = Tokenizer::load(&dir).unwrap();
    let (open, close) = (
        tok.token_to_id("<tool_call>").unwrap(),
        tok.token_to_id("</tool_call>").unwrap(),
    );
    assert_eq!(
        tok.decode(&[open], true).unwrap(),
        "",
        "a special marker is skipped by decoding"
    );
    let gen = tok.encode(&format!("</think>{}", call("f"))).unwrap();
    assert!(gen.contains(&open) && gen.contains(&close), "{gen:?}");
    let mut out =
        OutputText::new(&tok, &prompt, vec![]).with_tools(&tok, ToolFormat::Hermes, "call_", true);
    let (_, a, calls, _) = feed(&tok, &mut out, &gen);
    assert_eq!(
        (a.as_str(), tools::assemble(&calls).1.len()),
        ("", 1),
        "{calls:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
