"""The official `openai` package against Switchyard's OpenAI-style HTTP API.

Usage: openai_client.py BASE_URL API_KEY EXPECT_JSON

EXPECT_JSON (written by coordinator/tests/openai_client.rs from the gRPC API's answers):
  {"model", "chat": {"message", "max_tokens", "reasoning", "content", "prompt_tokens",
   "completion_tokens", "reasoning_tokens"}, "completion": {"prompt_ids", "max_tokens", "text"}}
Prints one line per check; exits non-zero on the first failure.
"""
import json
import sys
import urllib.request

import openai
from prometheus_client.parser import text_string_to_metric_families

base, key, expect_path = sys.argv[1], sys.argv[2], sys.argv[3]
exp = json.load(open(expect_path))
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
model = exp["model"]


def check(cond, what):
    if not cond:
        print("FAIL:", what)
        sys.exit(1)
    print("ok:", what)


def scrape():
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples, name):
    return sum(v for (n, _), v in samples.items() if n == name)


before = scrape()
check(total(before, "switchyard_generated_tokens_total") >= 0, "metrics parse with prometheus_client")

models = client.models.list()
check([m.id for m in models.data] == [model], f"models.list -> {[m.id for m in models.data]}")

c = exp["chat"]
msgs = [{"role": "user", "content": c["message"]}]
r = client.chat.completions.create(model=model, messages=msgs, max_tokens=c["max_tokens"], temperature=0)
m = r.choices[0].message
reasoning = getattr(m, "reasoning_content", None) or (m.model_extra or {}).get("reasoning_content") or ""
check(m.content == c["content"], f"chat content equals the gRPC answer ({len(m.content)} chars)")
check(reasoning == c["reasoning"], f"chat reasoning_content equals the gRPC reasoning ({len(reasoning)} chars)")
check(r.usage.prompt_tokens == c["prompt_tokens"], f"usage.prompt_tokens {r.usage.prompt_tokens}")
check(r.usage.completion_tokens == c["completion_tokens"], f"usage.completion_tokens {r.usage.completion_tokens}")
check(r.usage.completion_tokens_details.reasoning_tokens == c["reasoning_tokens"],
      f"usage reasoning_tokens {r.usage.completion_tokens_details.reasoning_tokens}")
check(r.choices[0].finish_reason in ("length", "stop"), f"finish_reason {r.choices[0].finish_reason}")

stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=c["max_tokens"], temperature=0,
                                        stream=True, stream_options={"include_usage": True})
content, reasoning_s, usage, finish = "", "", None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for ch in chunk.choices:
        d = ch.delta
        content += d.content or ""
        reasoning_s += (getattr(d, "reasoning_content", None) or (d.model_extra or {}).get("reasoning_content") or "")
        if ch.finish_reason:
            finish = ch.finish_reason
check(content == c["content"], "streamed content equals the gRPC answer")
check(reasoning_s == c["reasoning"], "streamed reasoning_content equals the gRPC reasoning")
check(usage is not None and usage.completion_tokens == c["completion_tokens"]
      and usage.completion_tokens_details.reasoning_tokens == c["reasoning_tokens"],
      f"final usage chunk {usage}")
check(finish == r.choices[0].finish_reason, f"streamed finish_reason {finish}")

k = exp["completion"]
cr = client.completions.create(model=model, prompt=k["prompt_ids"], max_tokens=k["max_tokens"], temperature=0,
                               logprobs=2)
check(cr.choices[0].text == k["text"], "completion text equals the gRPC text for the golden prompt")
check(cr.usage.completion_tokens == k["max_tokens"], f"completion usage {cr.usage.completion_tokens}")
lp = cr.choices[0].logprobs
check(len(lp.token_logprobs) == k["max_tokens"] and all(len(t) == 2 for t in lp.top_logprobs),
      "completion logprobs: one per token, 2 alternatives each")

try:
    client.chat.completions.create(model=model, messages=msgs, max_tokens=0)
    check(False, "max_tokens=0 rejected")
except openai.BadRequestError as e:
    body = e.body or {}
    check(e.status_code == 400 and body.get("param") == "max_tokens" and body.get("type") == "invalid_request_error",
          f"max_tokens=0 -> 400 {body}")
try:
    client.chat.completions.create(model="no-such-model", messages=msgs, max_tokens=4)
    check(False, "unknown model rejected")
except openai.NotFoundError as e:
    check(e.status_code == 404 and (e.body or {}).get("code") == "model_not_found", f"unknown model -> 404 {e.body}")

# Nothing ignored: a field the server does not honour is a 400 naming it; OpenAI's fields
# sent with their "off" value (as some clients always do) change nothing and are accepted.
tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
for what, kwargs, param in [
    ("an unknown response_format", {"response_format": {"type": "yaml"}}, "response_format"),
    ("a tool field", {"tools": [{"type": "function", "function": {"name": "f", "returns": {}}}]},
     "tools[0].function.returns"),
    ("a strict tool with tool_choice auto", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object"}, "strict": True}}]}, "tools[0].function.strict"),
    ("a named tool that is not offered", {"tools": tools, "tool_choice": {"type": "function", "function": {"name": "g"}}},
     "tool_choice"),
    ("tools with a response format", {"tools": tools, "response_format": {"type": "json_object"}}, "response_format"),
    ("tool_calls on a user message", {"messages": [{"role": "user", "content": "hi", "tool_calls": []}]},
     "messages[0].tool_calls"),
    ("an unknown field", {"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ("a message field", {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages[0].name"),
    ("a stream option", {"stream_options": {"include_usage": True, "chunked": 1}}, "stream_options.chunked"),
]:
    args = {"model": model, "messages": msgs, "max_tokens": 4, **kwargs}
    try:
        client.chat.completions.create(**args)
        check(False, f"{what} refused")
    except openai.BadRequestError as e:
        body = e.body or {}
        check(e.status_code == 400 and body.get("param") == param and param in body.get("message", ""),
              f"{what} -> 400 naming {param}: {body}")
plain = client.chat.completions.create(model=model, messages=msgs, max_tokens=6, temperature=0)
inert = client.chat.completions.create(model=model, messages=msgs, max_tokens=6, temperature=0,
                                       tools=[], tool_choice="none", response_format={"type": "text"},
                                       logit_bias={}, user="svc-7", store=False)
check(inert.choices[0].message.content == plain.choices[0].message.content,
      "fields sent with their off value are accepted and change nothing")

# Honoured, not ignored: +100 on one token makes it every token, -100 bans it; min_tokens and
# stop_token_ids (vLLM's) hold the stop token back, then end on it.
t = k["prompt_ids"][1]
def completion_tokens(**kw):
    r = client.completions.create(model=model, prompt=k["prompt_ids"], temperature=0, logprobs=0, **kw)
    return r, r.choices[0].logprobs.tokens
_, forced = completion_tokens(max_tokens=5, logit_bias={str(t): 100})
check(len(forced) == 5 and len(set(forced)) == 1, f"logit_bias +100 forces one token: {forced}")
_, banned = completion_tokens(max_tokens=5, logit_bias={str(t): -100})
check(forced[0] not in banned, f"logit_bias -100 bans it: {banned}")
r, held = completion_tokens(max_tokens=8, logit_bias={str(t): 100}, extra_body={"min_tokens": 3, "stop_token_ids": [t]})
check(r.choices[0].finish_reason == "stop" and len(held) == 4 and forced[0] not in held[:3],
      f"min_tokens 3 then the stop token: {held} {r.choices[0].finish_reason}")
pen = client.chat.completions.create(model=model, messages=msgs, max_tokens=6, temperature=0,
                                     presence_penalty=-1.0, frequency_penalty=0.3)
check(pen.choices[0].finish_reason in ("length", "stop"), "presence and frequency penalties accepted")
try:
    client.chat.completions.create(model=model, messages=msgs, max_tokens=4, frequency_penalty=2.5)
    check(False, "frequency_penalty 2.5 refused")
except openai.BadRequestError as e:
    check((e.body or {}).get("param") == "frequency_penalty", f"frequency_penalty 2.5 -> 400 {e.body}")

# Constrained decoding: random weights sampled at temperature 1 still give output that
# parses, because the sampler only sees tokens the schema allows.
import pydantic
from typing import Literal

class Item(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    count: int = pydantic.Field(ge=0, le=999)
    kind: Literal["tool", "part", "gift"]
    ok: bool

# As OpenAI's strict mode has it (and the client's parse() helper sends): no other keys.
item_schema = {**Item.model_json_schema(), "additionalProperties": False}
schema = {"type": "json_schema", "json_schema": {"name": "Item", "schema": item_schema, "strict": True}}
parsed = 0
for seed in range(20):
    r = client.completions.create(model=model, prompt="Item:", max_tokens=120, temperature=1.0, seed=seed,
                                  extra_body={"response_format": schema})
    Item.model_validate_json(r.choices[0].text)
    parsed += 1
check(parsed == 20, "json_schema: 20 seeds at temperature 1 parse as the pydantic model")
r = client.completions.create(model=model, prompt="Code:", max_tokens=20, temperature=1.0, seed=3,
                              extra_body={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2,4}"}})
import re as _re
check(_re.fullmatch("[A-Z]{3}-[0-9]{2,4}", r.choices[0].text) is not None and r.choices[0].finish_reason == "stop",
      f"structured_outputs.regex: {r.choices[0].text!r}")
# The client's own parse() on chat, where the fixtures' templates open a reasoning block: the
# thinking stays free (and, with a budget, ends), the answer follows the model.
parsed = 0
for seed in range(20):
    try:
        r = client.beta.chat.completions.parse(model=model, messages=msgs, response_format=Item,
                                               max_tokens=160, temperature=1.0, seed=seed,
                                               extra_body={"max_reasoning_tokens": 12})
    except openai.BadRequestError as e:
        check((e.body or {}).get("param") == "max_reasoning_tokens",
              f"max_reasoning_tokens refused only for want of an end-of-thinking token: {e.body}")
        print("skipped: chat parse() with a thinking budget (this model marks no end of thinking)")
        break
    m = r.choices[0].message
    check(m.parsed is not None and isinstance(m.parsed, Item), f"parse() seed {seed}: {m.content!r}")
    parsed += 1
if parsed:
    check(parsed == 20, "chat parse(): 20 seeds at temperature 1, reasoning then a valid Item")

# Tool calls: with tool_choice "required" (or a named function) the answer is a call in the
# model's own format (Hermes for Qwen, DeepSeek's markers for DeepSeek-V3), its arguments held
# to the schema while the reasoning stays free; the streamed tool_calls deltas reassemble to
# the same call.
class Weather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=16)
    days: int = pydantic.Field(ge=1, le=14)
    unit: Literal["c", "f"]

weather = openai.pydantic_function_tool(Weather, name="get_weather", description="A city's forecast")
now = {"type": "function", "function": {"name": "now", "description": "The time",
                                        "parameters": {"type": "object", "properties": {},
                                                       "additionalProperties": False}}}
tmsgs = [{"role": "user", "content": "Weather in Rome for 3 days?"}]
think = {"max_reasoning_tokens": 12}


def valid_call(tc, seed):
    args = json.loads(tc.function.arguments)
    if tc.function.name == "get_weather":
        Weather.model_validate(args)
    else:
        check(tc.function.name == "now" and args == {}, f"seed {seed}: a call to an offered tool {tc}")
    check(tc.type == "function" and tc.id, f"seed {seed}: the call has an id")


def streamed_calls(**kw):
    calls, finish = {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        ch = chunk.choices[0]
        finish = ch.finish_reason or finish
        for d in ch.delta.tool_calls or []:
            c = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            c["id"] = d.id or c["id"]
            if d.function:
                c["name"] = d.function.name or c["name"]
                c["arguments"] += d.function.arguments or ""
    return [calls[i] for i in sorted(calls)], finish


for seed in range(20):
    kw = dict(model=model, messages=tmsgs, tools=[weather, now], tool_choice="required", parallel_tool_calls=False,
              max_tokens=160, temperature=1.0, seed=seed, extra_body=think)
    r = client.chat.completions.create(**kw)
    ch = r.choices[0]
    check(ch.finish_reason == "tool_calls" and len(ch.message.tool_calls or []) == 1,
          f"required, seed {seed}: one call ({ch.finish_reason}, {ch.message.content!r})")
    valid_call(ch.message.tool_calls[0], seed)
    if seed < 5:
        got, finish = streamed_calls(**kw)
        tc = ch.message.tool_calls[0]
        check(finish == "tool_calls" and len(got) == 1 and got[0]["id"]
              and (got[0]["name"], got[0]["arguments"]) == (tc.function.name, tc.function.arguments),
              f"required, seed {seed}: streamed deltas reassemble to the same call {got}")
check(True, "tool_choice required: 20 seeds at temperature 1, each a call whose arguments validate")
# Parallel calls: one or more, each valid (a random model may run out of tokens in a later one).
for seed in range(3):
    r = client.chat.completions.create(model=model, messages=tmsgs, tools=[weather, now], tool_choice="required",
                                       max_tokens=400, temperature=1.0, seed=seed, extra_body=think)
    ch = r.choices[0]
    if ch.finish_reason == "tool_calls":
        for tc in ch.message.tool_calls:
            valid_call(tc, seed)
        check(len({tc.id for tc in ch.message.tool_calls}) == len(ch.message.tool_calls), "parallel calls: distinct ids")
    else:
        check(ch.finish_reason == "length" and ch.message.tool_calls, f"parallel, seed {seed}: {ch.finish_reason}")
r = client.chat.completions.create(model=model, messages=tmsgs, tools=[weather, now], max_tokens=160, temperature=1.0,
                                   seed=1, tool_choice={"type": "function", "function": {"name": "now"}}, extra_body=think)
ch = r.choices[0]
check(ch.finish_reason == "tool_calls" and [(t.function.name, t.function.arguments) for t in ch.message.tool_calls]
      == [("now", "{}")], f"a named function: {ch.message.tool_calls}")
# The call and its result go back as assistant and tool messages; the template (or, where it
# knows no tools, the model's call format) renders them.
tc = ch.message.tool_calls[0]
turn = tmsgs + [{"role": "assistant", "content": None, "tool_calls": [
    {"id": tc.id, "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": tc.id, "content": "12:00"}]
r2 = client.chat.completions.create(model=model, messages=turn, tools=[weather, now], tool_choice="none",
                                    max_tokens=4, temperature=0)
check(r2.usage.prompt_tokens > r.usage.prompt_tokens and not r2.choices[0].message.tool_calls,
      f"a tool result round trip ({r.usage.prompt_tokens} -> {r2.usage.prompt_tokens} prompt tokens)")

# A grammar that does not compile is a 400 naming the HTTP field that carried it.
for what, body, param in [
    ("a schema", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format"),
    ("a Lark grammar", {"structured_outputs": {"grammar": "start: ("}}, "structured_outputs.grammar"),
]:
    try:
        client.completions.create(model=model, prompt="x", max_tokens=4, extra_body=body)
        check(False, f"{what} that does not compile refused")
    except openai.BadRequestError as e:
        check((e.body or {}).get("param") == param, f"{what} that does not compile -> 400 naming {param}: {e.body}")

# Any object: nothing bounds its strings, so a random model may run out of tokens inside
# one; every output that ended by itself is an object.
ended = 0
for seed in range(6):
    r = client.completions.create(model=model, prompt="Any:", max_tokens=300, temperature=1.0, seed=seed,
                                  extra_body={"response_format": {"type": "json_object"}})
    if r.choices[0].finish_reason == "stop":
        check(isinstance(json.loads(r.choices[0].text), dict), f"json_object: {r.choices[0].text!r}")
        ended += 1
check(ended >= 1, f"json_object: {ended} of 6 outputs ended by themselves")

bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong-key", max_retries=0)
try:
    bad.chat.completions.create(model=model, messages=msgs, max_tokens=4)
    check(False, "wrong API key rejected")
except openai.AuthenticationError as e:
    check(e.status_code == 401, f"wrong API key -> 401 {e.body}")

after = scrape()
gen = total(after, "switchyard_generated_tokens_total") - total(before, "switchyard_generated_tokens_total")
want = 2 * c["completion_tokens"] + k["max_tokens"]
check(gen >= want, f"switchyard_generated_tokens_total moved by {gen} (served at least {want})")
fin = total(after, "switchyard_requests_finished_total") - total(before, "switchyard_requests_finished_total")
check(fin >= 3, f"switchyard_requests_finished_total moved by {fin}")
q = total(after, "switchyard_prefix_cache_queried_blocks_total")
h = total(after, "switchyard_prefix_cache_hit_blocks_total")
check(any(n == "switchyard_kv_blocks_cached" for (n, _) in after)
      and any(n == "switchyard_prefix_cache_evicted_blocks_total" for (n, _) in after) and 0 <= h <= q,
      f"prefix cache metrics: {h:.0f} of {q:.0f} prompt blocks found cached")
print("all checks passed")
