#!/usr/bin/env python3
"""Goldens for the q8_0 GGUF fixtures (tests/fixtures/gguf/*-q8_0.gguf): transformers on the
fixture checkpoint with every weight rounded as llama.cpp's converter stores it -- Q8_0
(gguf-py's own quantize, then dequantize) where the converter wrote Q8_0, F16 where it fell
back to F16 (rows not a whole number of 32-value blocks), F32 for norms, biases and routers --
in float32 with eager attention. Records, per golden prompt, the logits at the fixture's
recorded positions and the greedy tokens with their top-1 margins.

Usage: goldens-gguf-q8.py FIXTURE_DIR GGUF OUT.json
Needs torch, transformers and gguf (scripts/bench-peers.sh's venv has them).
"""
import collections
import json
import re
import sys

import numpy as np
import torch
from gguf import GGMLQuantizationType as T, GGUFReader
from gguf.quants import dequantize, quantize
from transformers import AutoModelForCausalLM


def stored_type(name, shape):
    if len(shape) == 1 or name.endswith("bias") or "norm" in name:
        return T.F32
    if re.search(r"(mlp|block_sparse_moe)\.gate\.weight$|router|shared_expert_gate", name):
        return T.F32
    return T.Q8_0 if shape[-1] % 32 == 0 else T.F16


def main():
    fixture, gguf_path, out = sys.argv[1:4]
    g = json.load(open(f"{fixture}/golden.json"))
    model = AutoModelForCausalLM.from_pretrained(fixture, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    ours = collections.Counter()
    cfg = model.config
    arch = cfg.architectures[0]

    def rounded(a, t):
        ours[t.name] += 1
        if t == T.Q8_0:
            return dequantize(quantize(np.ascontiguousarray(a), T.Q8_0), T.Q8_0).reshape(a.shape)
        if t == T.F16:
            return a.astype(np.float16).astype(np.float32)
        return a

    with torch.no_grad():
        for name, p in model.named_parameters():
            a = p.detach().numpy().astype(np.float32)
            if arch == "GptOssForCausalLM" and re.search(r"experts\.(gate_up|down)_proj$", name):
                # Stored `x @ W` here, `[out, in]` in the file: blocks run along this axis -2.
                t = T.Q8_0 if a.shape[-2] % 32 == 0 else T.F16
                a = rounded(a.swapaxes(-1, -2), t).swapaxes(-1, -2)
            elif name.endswith("kv_b_proj.weight"):
                # Written as k_b `[heads, kv_lora, nope]` and v_b `[heads, v, kv_lora]`.
                nope, v = cfg.qk_nope_head_dim, cfg.v_head_dim
                h = a.reshape(cfg.num_attention_heads, nope + v, -1)
                k_t = T.Q8_0 if nope % 32 == 0 else T.F16
                v_t = T.Q8_0 if h.shape[-1] % 32 == 0 else T.F16
                k = rounded(h[:, :nope].swapaxes(-1, -2), k_t).swapaxes(-1, -2)
                a = np.concatenate([k, rounded(h[:, nope:], v_t)], axis=1).reshape(a.shape)
            else:
                a = rounded(a, stored_type(name, a.shape))
            p.copy_(torch.from_numpy(np.ascontiguousarray(a)))
    # The converter's own choices, to check the rounding above against.
    theirs = collections.Counter(t.tensor_type.name for t in GGUFReader(gguf_path).tensors)
    if set(theirs) != set(ours):
        raise SystemExit(f"types differ: converter {dict(theirs)}, here {dict(ours)}")
    prompts = []
    for p in g["prompts"]:
        ids = list(p["input_ids"])
        with torch.no_grad():
            lg = model(torch.tensor([ids])).logits[0]
        logits = [{"position": r["position"], "values": lg[r["position"]].tolist()} for r in p["logits"]]
        new, margins = [], []
        for _ in range(len(p["greedy"]["new_ids"])):
            with torch.no_grad():
                last = model(torch.tensor([ids + new])).logits[0, -1].double()
            top = torch.topk(last, 2)
            margins.append(float(top.values[0] - top.values[1]))
            new.append(int(top.indices[0]))
        prompts.append({"name": p["name"], "input_ids": ids, "logits": logits,
                        "greedy": {"new_ids": new, "top1_margins": margins}})
        print(p["name"], "min margin %.4f" % min(margins),
              "agrees with the f32 golden for", next((i for i, (a, b) in enumerate(zip(new, p["greedy"]["new_ids"])) if a != b), len(new)), "tokens")
    json.dump({"fixture": fixture.rstrip("/").split("/")[-1], "gguf": gguf_path.split("/")[-1],
               "rounding": "gguf-py quantize/dequantize per tensor as the converter stored it",
               "converter_types": dict(theirs), "prompts": prompts}, open(out, "w"))


if __name__ == "__main__":
    main()
