#!/usr/bin/env python3
"""The dequantization fixture of the GGUF reader's tests: random blocks of every tensor type the
importer reads, with the values llama.cpp's own Python package (gguf-py, `gguf.quants`) decodes
them to. Scale fields are drawn as finite half floats so that every block is one a quantizer
could write.

Usage: gguf-dequant-fixture.py OUT.json   (needs gguf and numpy: scripts/bench-peers.sh's venv)
"""
import json
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

rng = np.random.default_rng(20261202)


def half(n):
    return rng.uniform(-0.05, 0.05, n).astype(np.float16).view(np.uint8)


def block(t):
    size, nbytes = GGML_QUANT_SIZES[t][0], GGML_QUANT_SIZES[t][1]
    b = rng.integers(0, 256, nbytes, dtype=np.uint8)
    # Where each type keeps its half-float scales.
    if t == T.Q8_0 or t == T.Q4_0:
        b[0:2] = half(1)
    elif t == T.Q4_1:
        b[0:4] = half(2)
    elif t in (T.Q4_K, T.Q5_K):
        b[0:4] = half(2)
    elif t == T.MXFP4:
        b[0] = rng.integers(100, 150)
    elif t == T.Q6_K:
        b[-2:] = half(1)
    elif t == T.F16:
        b[:] = rng.normal(0, 1, size).astype(np.float16).view(np.uint8)
    elif t == T.BF16:
        b[:] = (rng.normal(0, 1, size).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    elif t == T.F32:
        b[:] = rng.normal(0, 1, size).astype(np.float32).view(np.uint8)
    return b


cases = []
for t in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K, T.MXFP4):
    size = GGML_QUANT_SIZES[t][0]
    blocks = 3 if size > 1 else 40
    raw = np.concatenate([block(t) for _ in range(blocks)])
    n = blocks * size
    vals = dequantize(raw, t).reshape(-1)
    assert vals.size == n
    cases.append({"type": t.name, "ggml_type": int(t), "bytes": raw.tobytes().hex(),
                  "values": [float(v) for v in vals.astype(np.float32)]})
json.dump({"generator": "gguf-py gguf.quants.dequantize", "cases": cases}, open(sys.argv[1], "w"))
print(", ".join(f"{c['type']}: {len(c['values'])}" for c in cases))
