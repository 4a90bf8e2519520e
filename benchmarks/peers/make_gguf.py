#!/usr/bin/env python3
"""Write a random-weight Llama GGUF of a real shape, quantized as llama.cpp's Q4_0 preset lays it out.

llama.cpp's speed and memory do not depend on weight values, so a file of random quantized blocks of the
exact Llama-2 shapes measures the same as the real checkpoint (which the GPU machine cannot download).
Layout as `llama-quantize ... Q4_0` writes it: every matrix Q4_0, the output matrix Q6_K, norms F32.
Random block bytes are drawn once into a pool and each tensor is a slice of it at a random block offset,
so the largest tensor (output, 32000 x 5120 as Q6_K = 134 MB) bounds the memory used, not the file.
Block scales are set so that dequantized weights have std ~0.02, like a trained model, keeping activations
finite (a NaN would still run at the same speed, but the logits of a random model stay meaningful).

The tokenizer (tokenizer.* keys) is copied from a vocabulary GGUF: llama.cpp ships
models/ggml-vocab-llama-spm.gguf, the Llama-2 SentencePiece vocabulary. Its size sets n_vocab.

usage: make_gguf.py {7b,13b,tiny} OUT.gguf VOCAB.gguf      (needs numpy and the `gguf` package)
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader, GGUFValueType, GGUFWriter

# name -> (hidden, layers, heads, ffn); published Llama-2 config.json values; tiny is for tests.
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "7b": (4096, 32, 32, 11008),
    "13b": (5120, 40, 40, 13824),
    "tiny": (256, 2, 4, 512),
}

# One quantized block of each type as a numpy record (the byte layout of ggml's block_q4_0 / block_q6_K).
Q4_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])  # 32 weights: d * (nibble - 8)
Q6_K_BLOCK = np.dtype([("ql", "u1", (128,)), ("qh", "u1", (64,)), ("scales", "i1", (16,)), ("d", "<f2")])  # 256


def block_pool(qtype: QType, nbytes: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for at least `nbytes` of `qtype` blocks, scales set for weights of std ~0.02."""
    block = Q4_0_BLOCK if qtype == QType.Q4_0 else Q6_K_BLOCK
    n = nbytes // block.itemsize + 1
    raw = rng.integers(0, 256, size=n * block.itemsize, dtype=np.uint8)
    blocks = raw.view(block)
    if qtype == QType.Q4_0:
        # nibbles uniform in 0..15: (q - 8) has std ~4.6, so d ~ 4e-3 gives std ~0.02
        blocks["d"] = rng.uniform(3e-3, 5e-3, size=n).astype(np.float16)
    else:
        # 6-bit q uniform in 0..63: (q - 32) has std ~18.5; sub-block scales 4..12 and d 1.2e-4 give ~0.02
        blocks["scales"] = rng.integers(4, 13, size=(n, 16), dtype=np.int8)
        blocks["d"] = np.float16(1.2e-4)
    return raw


def tensor_plan(shape: str, n_vocab: int) -> list[tuple[str, int, int, QType]]:
    """(name, rows, cols, type) in llama.cpp's tensor names; cols is the input dimension (GGUF ne0)."""
    hidden, layers, _, ffn = SHAPES[shape]
    plan = [("token_embd.weight", n_vocab, hidden, QType.Q4_0)]
    for i in range(layers):
        b = f"blk.{i}."
        plan += [
            (b + "attn_norm.weight", 1, hidden, QType.F32),
            (b + "attn_q.weight", hidden, hidden, QType.Q4_0),
            (b + "attn_k.weight", hidden, hidden, QType.Q4_0),
            (b + "attn_v.weight", hidden, hidden, QType.Q4_0),
            (b + "attn_output.weight", hidden, hidden, QType.Q4_0),
            (b + "ffn_norm.weight", 1, hidden, QType.F32),
            (b + "ffn_gate.weight", ffn, hidden, QType.Q4_0),
            (b + "ffn_up.weight", ffn, hidden, QType.Q4_0),
            (b + "ffn_down.weight", hidden, ffn, QType.Q4_0),
        ]
    plan += [("output_norm.weight", 1, hidden, QType.F32), ("output.weight", n_vocab, hidden, QType.Q6_K)]
    return plan


def tensor_bytes(rows: int, cols: int, qtype: QType) -> int:
    if qtype == QType.F32:
        return rows * cols * 4
    block_weights, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    if cols % block_weights:
        raise ValueError(f"row length {cols} is not a multiple of the {qtype.name} block ({block_weights})")
    return rows * (cols // block_weights) * block_bytes


def copy_tokenizer(writer: GGUFWriter, vocab_path: str) -> int:
    """Copy every tokenizer.* key of the vocabulary GGUF; returns the vocabulary size."""
    reader = GGUFReader(vocab_path)
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise ValueError(f"{vocab_path}: no tokenizer.ggml.tokens (not a vocabulary GGUF)")
    return len(reader.fields["tokenizer.ggml.tokens"].contents())


def write_random_gguf(shape: str, out: str, vocab_path: str, seed: int = 0) -> dict[str, float]:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    hidden, layers, heads, ffn = SHAPES[shape]
    t0 = time.time()
    rng = np.random.default_rng(seed)
    w = GGUFWriter(out, "llama")
    n_vocab = copy_tokenizer(w, vocab_path)
    w.add_name(f"random-llama-2-{shape}-Q4_0")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_rope_dimension_count(hidden // heads)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)

    plan = tensor_plan(shape, n_vocab)
    for name, rows, cols, qtype in plan:
        nb = tensor_bytes(rows, cols, qtype)
        if qtype == QType.F32:
            w.add_tensor_info(name, (cols,), np.dtype(np.float32), nb)
        else:  # quantized data is passed as rows of raw bytes; raw_dtype tells the reader the real type
            w.add_tensor_info(name, (rows, nb // rows), np.dtype(np.uint8), nb, raw_dtype=qtype)

    largest = {q: max((tensor_bytes(r, c, t) for _, r, c, t in plan if t == q), default=0) for q in (QType.Q4_0, QType.Q6_K)}
    pools = {q: block_pool(q, 2 * n, rng) for q, n in largest.items() if n}
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = 0
    for _, rows, cols, qtype in plan:
        nb = tensor_bytes(rows, cols, qtype)
        if qtype == QType.F32:
            data = np.ones(cols, dtype=np.float32)  # RMSNorm weights
        else:
            pool = pools[qtype]
            bsz = (Q4_0_BLOCK if qtype == QType.Q4_0 else Q6_K_BLOCK).itemsize
            start = int(rng.integers(0, (pool.size - nb) // bsz + 1)) * bsz  # whole blocks only
            data = pool[start:start + nb].reshape(rows, nb // rows)
        w.write_tensor_data(data)
        total += nb
    w.close()
    return {"tensors": len(plan), "GiB": round(total / 2**30, 3), "n_vocab": n_vocab, "seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out")
    ap.add_argument("vocab", help="GGUF whose tokenizer.* keys are copied (llama.cpp's models/ggml-vocab-llama-spm.gguf)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    info = write_random_gguf(a.shape, a.out, a.vocab, a.seed)
    print(f"wrote {a.out}: {info}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
