#!/usr/bin/env python3
"""Hugging Face transformers baseline for `switchyard bench` (CPU or `--device cuda`).

Measures the same three figures as Switchyard's bench on the same checkpoint and device:
prefill tokens/s of one prompt, and greedy decode tokens/s at batch 1 and batch B (prompts of
32 random tokens, KV cache on, no padding). Prints one JSON line.

    python3 scripts/bench-hf.py MODEL_DIR [--device cuda|cpu] [--dtype bf16|f32]
                                [--prefill 512] [--steps 64] [--batch 64]
"""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def decode(model, vocab, batch, steps, gen, device):
    ids = torch.randint(0, vocab, (batch, 32), generator=gen).to(device)
    with torch.no_grad():
        cache = DynamicCache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        warm = 3
        for s in range(steps + warm):
            if s == warm:
                sync()
                t0 = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        return batch * steps / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = (
        AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="sdpa")
        .to(a.device)
        .eval()
    )
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, a.prefill), generator=gen).to(a.device)
    best = 0.0
    with torch.no_grad():
        for rep in range(3):
            _, dt = timed(lambda: model(input_ids=prompt, use_cache=False))
            if rep > 0:
                best = max(best, a.prefill / dt)
    print(json.dumps({
        "impl": "transformers " + __import__("transformers").__version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
        "dtype": a.dtype,
        "threads": torch.get_num_threads(),
        "prefill_tokens": a.prefill,
        "prefill_tok_s": best,
        "decode_tok_s_b1": decode(model, vocab, 1, a.steps, gen, a.device),
        "batch": a.batch,
        "decode_tok_s_batch": decode(model, vocab, a.batch, a.steps // 2, gen, a.device),
    }))


if __name__ == "__main__":
    main()
