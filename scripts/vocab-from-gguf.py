#!/usr/bin/env python3
"""A real vocabulary for benchmarks: llama.cpp's vocabulary-only GGUF files (models/ggml-vocab-*.gguf
in its source, which the llama-cpp-python sdist carries) written out as a Hugging Face tokenizer
folder (tokenizer.json, byte-level BPE, and generation_config.json with its end of sequence).

Usage: vocab-from-gguf.py VOCAB.gguf OUT_DIR
No dependencies: the GGUF key/value header is read by hand (tensor data is not needed).
"""
import json
import os
import struct
import sys

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read(f, fmt):
    n = struct.calcsize(fmt)
    return struct.unpack(fmt, f.read(n))[0]


def string(f):
    return f.read(read(f, "<Q")).decode("utf-8", errors="surrogateescape")


def value(f, t):
    if t in SCALARS:
        return read(f, SCALARS[t])
    if t == 8:
        return string(f)
    if t == 9:
        it, n = read(f, "<I"), read(f, "<Q")
        return [value(f, it) for _ in range(n)]
    raise ValueError(f"GGUF value type {t}")


def header(path):
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not GGUF")
        version, _tensors, kvs = read(f, "<I"), read(f, "<Q"), read(f, "<Q")
        if version < 2:
            raise ValueError(f"{path}: GGUF v{version} (need 2 or later)")
        out = {}
        for _ in range(kvs):
            k = string(f)
            out[k] = value(f, read(f, "<I"))
        return out


def main():
    src, out = sys.argv[1], sys.argv[2]
    kv = header(src)
    if kv.get("tokenizer.ggml.model") != "gpt2":
        raise SystemExit(f"{src}: tokenizer model {kv.get('tokenizer.ggml.model')!r}; only byte-level BPE (gpt2) is written")
    tokens, merges = kv["tokenizer.ggml.tokens"], kv.get("tokenizer.ggml.merges", [])
    types = kv.get("tokenizer.ggml.token_type", [1] * len(tokens))
    # Token type 3 is a control token, 4 user-defined: the tokenizer's added tokens.
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": types[i] == 3}
             for i, t in enumerate(tokens) if types[i] in (3, 4)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tj = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        json.dump(tj, f, ensure_ascii=False)
    eos = kv.get("tokenizer.ggml.eos_token_id", 0)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos}, f)
    print(f"{out}: {len(tokens)} tokens, {len(merges)} merges, eos {eos}")


if __name__ == "__main__":
    main()
