#!/usr/bin/env python3
"""The Python peers on one GPU, one scenario per process: what users run today without our engine.

  offload  transformers + accelerate: fp16 weights, `infer_auto_device_map(max_memory={0: cap})` +
           `dispatch_model`, the CPU-resident layers moved to the GPU on every forward (accelerate hooks)
  nf4      bitsandbytes 4-bit NF4 (double quantization, fp16 compute), everything on the GPU
  fp16     plain fp16 on the GPU (uncapped reference)

Random weights of the real Llama-2 shapes (std 0.02, norms 1), batch B of random prompt ids, greedy, exactly
gen_len new tokens. A cap is enforced as users would: accelerate's max_memory and/or
`torch.cuda.set_per_process_memory_fraction`; the real peak is read from NVML (vramwise.bench.gpu_memory,
this process, CUDA context included) and, in side_by_side.sh, by a device-wide poller around the process.
Writes one JSON object (--json); status is "ok", "oom-load", "oom-generate" or "error".

usage: hf_peers.py {offload,nf4,fp16} --shape 13b [--cap-mib 6144] [--batch 1] [--prompt-len 512]
                   [--gen-len 128] --json FILE          (PYTHONPATH: src, and .peer/pylib for nf4)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from typing import Any

import torch
import torch.nn as nn

SHAPES: dict[str, tuple[int, int, int, int]] = {  # hidden, layers, heads, ffn (Llama-2 config.json)
    "7b": (4096, 32, 32, 11008),
    "13b": (5120, 40, 40, 13824),
    "tiny": (256, 2, 4, 512),
}
METHODS = ("offload", "nf4", "fp16")
DEVICE = "cuda"  # --device cpu (fp16 only) is a dry run of the timing code on a machine without a GPU


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="transformers/accelerate/bitsandbytes peers, one scenario")
    ap.add_argument("method", choices=METHODS)
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--cap-mib", type=int, default=0, help="GPU memory cap in MiB (0 = none)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--json", required=True, metavar="FILE")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run, fp16 only")
    a = ap.parse_args(argv)
    for name in ("batch", "prompt_len", "gen_len"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.cap_mib < 0:
        ap.error(f"--cap-mib must be >= 0, got {a.cap_mib}")
    if a.method == "offload" and a.cap_mib == 0:
        ap.error("offload needs --cap-mib (the GPU share accelerate may fill)")
    if a.device == "cpu" and (a.method != "fp16" or a.cap_mib):
        ap.error("--device cpu is a dry run of the fp16 method without a cap")
    return a


def llama_config(shape: str):
    from transformers import LlamaConfig

    hidden, layers, heads, ffn = SHAPES[shape]
    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, intermediate_size=ffn, vocab_size=32000,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


class RandomFill:
    """Fills tensors with N(0, 0.02) quickly: slices of one random pool (64 Mi values) per device, at
    random offsets. Drawing 13e9 normals on the CPU would take minutes; copying slices runs at memcpy speed."""

    def __init__(self, seed: int = 0) -> None:
        self.pools: dict[str, torch.Tensor] = {}
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, t: torch.Tensor) -> None:
        key = str(t.device)
        if key not in self.pools:
            g = torch.Generator(device=t.device).manual_seed(1)
            n = min(1 << 26, 2 * t.numel())  # 64 Mi values, fewer for a tiny model
            self.pools[key] = (torch.randn(n, generator=g, device=t.device) * 0.02).to(t.dtype)
        pool, flat = self.pools[key], t.view(-1)
        step = pool.numel() // 2
        for i in range(0, flat.numel(), step):
            n = min(step, flat.numel() - i)
            off = int(torch.randint(0, pool.numel() - n + 1, (1,), generator=self.gen))
            flat[i:i + n].copy_(pool[off:off + n])


def meta_model(shape: str) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    with init_empty_weights():  # parameters on the meta device; buffers (rotary inv_freq) real, on the CPU
        return LlamaForCausalLM(llama_config(shape)).eval()


def materialize(model: nn.Module, device: str, fill: RandomFill, skip=lambda mod_name, mod: False) -> None:
    """Replace meta parameters by fp16 tensors on `device`: norms 1, matrices random."""
    for mod_name, mod in model.named_modules():
        for p_name, p in list(mod._parameters.items()):
            if p is None or not p.is_meta or skip(mod_name, mod):
                continue
            t = torch.empty(p.shape, dtype=torch.float16, device=device)
            if t.dim() == 1:
                t.fill_(1.0)
            else:
                fill(t)
            mod._parameters[p_name] = nn.Parameter(t, requires_grad=False)


def buffers_to(model: nn.Module, device: str) -> None:
    for mod in model.modules():
        for name, b in list(mod._buffers.items()):
            if b is not None and b.device.type != device:
                mod._buffers[name] = b.to(device)


def build_offload(shape: str, cap_mib: int, fill: RandomFill, info: dict[str, Any]) -> nn.Module:
    from accelerate import dispatch_model, infer_auto_device_map

    model = meta_model(shape)
    materialize(model, "cpu", fill)
    dmap = infer_auto_device_map(model, max_memory={0: f"{cap_mib}MiB", "cpu": "200GiB"},
                                 no_split_module_classes=["LlamaDecoderLayer"], dtype=torch.float16)
    layers = [v for k, v in dmap.items() if k.startswith("model.layers.")]
    info["gpu_layers"] = sum(1 for v in layers if v == 0)
    info["cpu_layers"] = sum(1 for v in layers if v == "cpu")
    info["other_placement"] = {k: str(v) for k, v in dmap.items() if not k.startswith("model.layers.")}
    return dispatch_model(model, device_map=dmap)


def build_nf4(shape: str, fill: RandomFill, info: dict[str, Any]) -> nn.Module:
    import bitsandbytes as bnb

    info["bitsandbytes"] = bnb.__version__
    model = meta_model(shape)
    # embeddings, norms and lm_head stay fp16 on the GPU (as transformers' load_in_4bit leaves them)
    materialize(model, "cuda", fill, skip=lambda n, m: n.startswith("model.layers.") and isinstance(m, nn.Linear))
    info["layers_quantized"] = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float16,
                                      compress_statistics=True, quant_type="nf4", device="meta")
                w = torch.empty(lin.out_features, lin.in_features, dtype=torch.float16, device="cuda")
                fill(w)
                # Params4bit quantizes when moved to the GPU; the fp16 matrix is freed after
                q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                             module=q).to("cuda")
                del w
                setattr(parent, name, q)
        info["layers_quantized"] += 1
    buffers_to(model, "cuda")
    return model


def build_fp16(shape: str, fill: RandomFill) -> nn.Module:
    model = meta_model(shape)
    materialize(model, DEVICE, fill)
    buffers_to(model, DEVICE)
    return model


def timed_generate(model: nn.Module, batch: int, prompt_len: int, gen_len: int, seed: int) -> dict[str, Any]:
    """Greedy generation of exactly gen_len tokens; a StoppingCriteria stamps each step after a sync."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps: list[float] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            _sync()
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 32000, (batch, prompt_len), generator=g).to(DEVICE)  # [batch, prompt_len]
    _sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_len, min_new_tokens=gen_len,
                             do_sample=False, num_beams=1, pad_token_id=0, stopping_criteria=StoppingCriteriaList([Stamp()]))
    _sync()
    ttft = stamps[0] - t0
    steps = len(stamps) - 1
    decode_s = stamps[-1] - stamps[0]
    return {
        "generated": int(out.shape[1] - prompt_len),
        "ttft_ms": round(ttft * 1e3, 1),
        "prefill_tok_s": round(batch * prompt_len / ttft, 1),
        "decode_tok_s": round(batch * steps / decode_s, 3) if steps else None,  # aggregate over the batch
        "decode_steps_timed": steps,
        "total_s": round(time.perf_counter() - t0, 2),
    }


def run(a: argparse.Namespace) -> dict[str, Any]:
    import accelerate
    import transformers

    from vramwise.bench.gpu_memory import NvmlMonitor

    global DEVICE
    DEVICE = a.device
    cuda = DEVICE == "cuda"
    res: dict[str, Any] = {
        "format": "hf-peers", "method": a.method, "shape": a.shape, "cap_mib": a.cap_mib or None, "batch": a.batch,
        "prompt_len": a.prompt_len, "gen_len": a.gen_len, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
    }
    mon = NvmlMonitor().start()
    if a.cap_mib:  # what a user would set so that PyTorch itself refuses to go past the cap
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.cap_mib * 2**20 / total), 0)
    fill = RandomFill()
    t = time.perf_counter()
    try:
        if a.method == "offload":
            model = build_offload(a.shape, a.cap_mib, fill, res)
        elif a.method == "nf4":
            model = build_nf4(a.shape, fill, res)
        else:
            model = build_fp16(a.shape, fill)
    except torch.OutOfMemoryError as e:
        res.update(status="oom-load", error=str(e).split("\n")[0][:300])
        return finish(res, mon)
    res["load_s"] = round(time.perf_counter() - t, 1)
    fill.pools.clear()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    try:
        # warm-up: one short generation (CUDA/cuBLAS initialisation, accelerate hooks' first moves)
        timed_generate(model, 1, 16, 2, seed=1)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        res.update(timed_generate(model, a.batch, a.prompt_len, a.gen_len, seed=2))
        res["status"] = "ok"
    except torch.OutOfMemoryError as e:
        res.update(status="oom-generate", error=str(e).split("\n")[0][:300])
    return finish(res, mon)


def finish(res: dict[str, Any], mon) -> dict[str, Any]:
    _sync()
    res["nvml_peak_mib"] = round(mon.stop() / 2**20) if mon.available else None
    res["nvml_per_process"] = mon.per_process
    res["torch_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20) if DEVICE == "cuda" else None
    return res


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        res = run(a)
    except Exception as e:  # recorded, so that the table says what failed
        traceback.print_exc()
        res = {"format": "hf-peers", "method": a.method, "shape": a.shape, "cap_mib": a.cap_mib or None,
               "batch": a.batch, "prompt_len": a.prompt_len, "gen_len": a.gen_len, "status": "error",
               "error": f"{type(e).__name__}: {e}"[:500]}
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res), flush=True)
    return 0 if res.get("status") == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
