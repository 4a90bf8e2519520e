"""Where a CPU-computed decoder layer's decode time goes: packed matmuls against everything else.

The offload driver (memory/offload.py) computes some decoder layers on the CPU, with their int4 linears packed
for torch's CPU kernels (quant/cpu_packed.py) and the rest (norms, rotary, KV pages, attention) in fp32. This
builds `--layers` such layers of a real shape (random int4 g128 codes: speed does not depend on the values),
each with its own paged fp32 KV holding `--context` tokens, and runs a batch-1 decode step through the chain,
as a decode step runs its CPU layers one after another (their weights come from DRAM, not the cache).

    python benchmarks/profile_cpu_layer.py                      # Llama-2-13B shape, 6 layers, context 576
    python benchmarks/profile_cpu_layer.py --quick              # shapes / 4: a smoke run on a laptop
    python benchmarks/profile_cpu_layer.py --profile            # + the torch profiler's ops by self CPU time

Prints ms per layer: the whole layer, its packed matmuls alone (same inputs, same order), and the rest; a
markdown table last. Threads: torch.get_num_threads() (set with --threads).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from vramwise.models.attention import AttentionMetadata
from vramwise.models.layers import RotaryEmbedding
from vramwise.models.llama import LlamaDecoderLayer
from vramwise.models.shapes import shape_config
from vramwise.quant.cpu_packed import CpuPackedLinear
from vramwise.quant.formats import make_int4

BLOCK = 16


def _packed(n: int, k: int, g: torch.Generator) -> CpuPackedLinear:
    """A CpuPackedLinear of shape (N, K) from random int4 g128 codes, built through our format as the driver
    builds its CPU units (QuantLinear's PackedWeight -> CpuPackedLinear.from_packed)."""
    scales = (torch.rand(k // 128, n, generator=g) * 0.01 + 0.001).half()
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    return CpuPackedLinear.from_packed(make_int4(codes, scales, -8 * scales.float(), 128))


def build_layer(cfg, rotary: RotaryEmbedding, context: int, g: torch.Generator,
                kv_dtype: torch.dtype = torch.float32) -> LlamaDecoderLayer:
    """One decoder layer as a CPU unit: fused qkv / gate_up packed int4, fp32 norms, a paged KV (fp32 in the
    driver today)."""
    with torch.device("meta"):  # no float weights: the packed linears and norms are set below
        layer = LlamaDecoderLayer(cfg, rotary)
    h, i = cfg.hidden_size, cfg.intermediate_size
    attn, mlp = layer.self_attn, layer.mlp
    qkv_n = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    for owner, names in ((attn, ("q_proj", "k_proj", "v_proj")), (mlp, ("gate_proj", "up_proj"))):
        for name in names:
            if hasattr(owner, name):
                delattr(owner, name)
    attn.qkv_proj = _packed(qkv_n, h, g)
    attn.o_proj = _packed(h, cfg.num_attention_heads * cfg.head_dim, g)
    mlp.gate_up_proj = _packed(2 * i, h, g)
    mlp.down_proj = _packed(h, i, g)
    layer.input_layernorm.weight = torch.nn.Parameter(torch.rand(h) + 0.5, requires_grad=False)
    layer.post_attention_layernorm.weight = torch.nn.Parameter(torch.rand(h) + 0.5, requires_grad=False)
    blocks = -(-(context + 1) // BLOCK)
    kv_shape = (blocks, BLOCK, cfg.num_key_value_heads, cfg.head_dim)
    attn.attn.kv_cache = (torch.randn(kv_shape, generator=g).to(kv_dtype), torch.randn(kv_shape, generator=g).to(kv_dtype))
    return layer


def decode_meta(context: int) -> AttentionMetadata:
    """Batch 1, one new token at position `context` (the pages hold `context` earlier tokens)."""
    blocks = -(-(context + 1) // BLOCK)
    return AttentionMetadata(
        slot_mapping=torch.tensor([context]), block_tables=torch.arange(blocks, dtype=torch.int32)[None],
        query_start_loc=[0, 1], context_lens=[context + 1], all_decode=True,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-2-13b")
    p.add_argument("--layers", type=int, default=6, help="CPU layers in the chain (default 6: the 13B b1 plan)")
    p.add_argument("--context", type=int, default=576, help="tokens already in each layer's KV pages")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--kv-dtype", default="fp32", choices=("fp32", "bf16"), help="the KV pages' dtype")
    p.add_argument("--quick", action="store_true", help="hidden and intermediate sizes / 4, 2 layers")
    p.add_argument("--profile", action="store_true", help="also print the top ops by self CPU time")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = shape_config(args.shape)
    if args.quick:
        cfg = dataclasses.replace(cfg, hidden_size=cfg.hidden_size // 4, intermediate_size=cfg.intermediate_size // 4,
                                  num_attention_heads=cfg.num_attention_heads // 4,
                                  num_key_value_heads=max(1, cfg.num_key_value_heads // 4))
        args.layers, args.steps = min(args.layers, 2), min(args.steps, 5)
    torch.set_grad_enabled(False)
    g = torch.Generator().manual_seed(0)
    rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
    rotary.build_cache("cpu")
    kv_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.kv_dtype]
    layers = [build_layer(cfg, rotary, args.context, g, kv_dtype) for _ in range(args.layers)]
    meta = decode_meta(args.context)
    positions = torch.tensor([args.context])
    x0 = torch.randn(1, cfg.hidden_size, generator=g)

    def step() -> torch.Tensor:
        meta.prepared.clear()  # per-step index cache, as the runner builds a new metadata each step
        x = x0
        for layer in layers:
            x = layer(positions, x, meta)
        return x

    # The packed matmuls alone, on inputs of their shapes, in the layer's order: what the kernels cost.
    xs = {n: torch.randn(1, n, generator=g) for n in {cfg.hidden_size, cfg.intermediate_size}}

    def matmuls() -> None:
        for layer in layers:
            for mod in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                        layer.mlp.down_proj):
                mod(xs[mod.in_features])

    def timed(fn) -> float:
        fn()
        fn()
        ts = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) / args.layers * 1e3

    whole, mm = timed(step), timed(matmuls)
    print(f"threads {torch.get_num_threads()}, shape {args.shape}{' / 4' if args.quick else ''}, "
          f"{args.layers} layers, context {args.context}, KV {args.kv_dtype}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    bytes_per_layer = sum(b.numel() * b.element_size() for b in layers[0].buffers())
    print("| ms per layer | whole layer | packed matmuls | the rest | packed GB/s in the matmuls |")
    print("|---|---:|---:|---:|---:|")
    print(f"| decode, batch 1 | {whole:.3f} | {mm:.3f} | {whole - mm:.3f} | {bytes_per_layer / mm / 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
