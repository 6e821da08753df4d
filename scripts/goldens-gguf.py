#!/usr/bin/env python3
"""Goldens for the GGUF import from Hugging Face transformers, which reads GGUF itself
(dequantized to float32, eager attention): for each prompt its ids as transformers' own
GGUF tokenizer encodes them, the chat text its template renders, greedy tokens with their
top-1 margins and the logits of the last prompt position.

Usage: goldens-gguf.py MODEL.gguf OUT.json [MAX_NEW_TOKENS]
Needs torch, transformers and gguf (scripts/bench-peers.sh's venv has them).
"""
import hashlib
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three primary colors."}],
    [{"role": "system", "content": "You answer in one sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
]
TEXTS = ["The quick brown fox jumps over the lazy dog. In 2024, 1234567 people"]


def main():
    path, out = sys.argv[1], sys.argv[2]
    new = int(sys.argv[3]) if len(sys.argv) > 3 else 24
    d, f = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    cases = []
    for chat in CHATS:
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        cases.append({"chat": chat, "text": text, "ids": tok(text, add_special_tokens=False).input_ids})
    for t in TEXTS:
        cases.append({"text": t, "ids": tok(t).input_ids})
    for c in cases:
        ids = list(c["ids"])
        margins = []
        with torch.no_grad():
            first = None
            for _ in range(new):
                logits = model(torch.tensor([ids])).logits[0, -1].double()
                if first is None:
                    first = logits
                top = torch.topk(logits, 2)
                margins.append(float(top.values[0] - top.values[1]))
                nxt = int(top.indices[0])
                ids.append(nxt)
                if nxt == tok.eos_token_id:
                    break
        c["greedy"] = ids[len(c["ids"]):]
        c["margins"] = margins
        c["answer"] = tok.decode(c["greedy"], skip_special_tokens=True)
        top = torch.topk(first, 8)
        c["last_prompt_logits"] = {"ids": top.indices.tolist(), "values": top.values.tolist()}
    sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
    import transformers
    doc = {"gguf": f, "sha256": sha, "transformers": transformers.__version__,
           "torch": torch.__version__, "dtype": "float32", "cases": cases}
    with open(out, "w") as fh:
        json.dump(doc, fh, indent=1)
    for c in cases:
        print(repr(c["answer"]), "min margin %.4f" % min(c["margins"]))


if __name__ == "__main__":
    main()
