"""Swap space in the engine: preempted sequences' KV goes to host blocks and back, greedy outputs unchanged.

CPU as both sides here (the 'device' pool and the swap pool are both host tensors); the gpu-marked test
does the same with CUDA pages (copies through a pinned staging buffer).
"""

from __future__ import annotations

import pytest
import torch

from fixtures import make_tiny_hf_model
from vramwise.engine.runner import KVCache
from vramwise.llm import LLM
from vramwise.sampling_params import SamplingParams

# 8 prompts of 12..33 tokens + 24 generated: 3 blocks of 16 each by the end, 24 in all; a pool of 9 blocks
# forces preemptions while every single request still fits.
PROMPTS = [[3 + (7 * i + j) % 200 for j in range(12 + 3 * i)] for i in range(8)]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
SMALL_POOL = 9


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return make_tiny_hf_model(tmp_path_factory.mktemp("kvswap") / "m", "llama_gqa")


def run(model: str, device: str = "cpu", **kw) -> tuple[LLM, list[list[int]]]:
    llm = LLM(model, device=device, show_progress=False, **kw)
    return llm, [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def unconstrained(tiny_model) -> list[list[int]]:
    return run(tiny_model, num_kv_blocks=64)[1]


def block_bytes(llm: LLM) -> int:
    e = llm.engine
    return KVCache.bytes_per_block(e.model_config, e.block_manager.block_size, e.kv_dtype)


def test_swap_keeps_outputs_identical(tiny_model, unconstrained):
    probe = LLM(tiny_model, device="cpu", num_kv_blocks=1, show_progress=False)
    llm, out = run(tiny_model, num_kv_blocks=SMALL_POOL, swap_space=64 * block_bytes(probe))
    s = llm.engine.scheduler
    assert s.num_swap_outs > 0 and s.num_swap_ins == s.num_swap_outs
    assert s.num_preemptions == s.num_swap_outs  # room for every victim: no recompute
    assert s.num_blocks_swapped_in == s.num_blocks_swapped_out > 0
    assert out == unconstrained
    assert llm.engine.kv_blocks_used == 0 and s.swap_manager.num_free_blocks == 64 and not s.swapped


def test_recompute_fallback_when_swap_space_fills(tiny_model, unconstrained):
    probe = LLM(tiny_model, device="cpu", num_kv_blocks=1, show_progress=False)
    llm, out = run(tiny_model, num_kv_blocks=SMALL_POOL, swap_space=3 * block_bytes(probe))
    s = llm.engine.scheduler
    assert s.num_swap_outs > 0 and s.num_preemptions > s.num_swap_outs  # some victims found the host pool full
    assert out == unconstrained
    assert llm.engine.kv_blocks_used == 0 and s.swap_manager.num_free_blocks == 3


def test_swap_space_too_small_for_one_block_is_refused(tiny_model):
    with pytest.raises(ValueError, match="swap space of 100 bytes holds no KV block"):
        LLM(tiny_model, device="cpu", num_kv_blocks=4, swap_space=100, show_progress=False)


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_swap_with_quantized_kv_moves_scales_too(tiny_model, kv):
    # int8 / fp8 pages carry scale pools; a swap that forgot them would dequantize with another sequence's scales.
    ref = run(tiny_model, num_kv_blocks=64, kv_cache_dtype=kv)[1]
    llm, out = run(tiny_model, num_kv_blocks=SMALL_POOL, kv_cache_dtype=kv, swap_space=1 << 20)
    assert llm.engine.scheduler.num_swap_outs > 0
    assert out == ref


@pytest.mark.gpu
@pytest.mark.parametrize("kv", ["auto", "int8", "fp8"])
def test_gpu_swap_through_pinned_stage(tiny_model, kv):
    # fp32 on CUDA, as the other GPU preemption tests: batch composition differs between the two runs, and
    # fp16 rounding could flip a near-tie of the random model's greedy choice.
    kw = dict(device="cuda", dtype="float32", kv_cache_dtype=kv)
    ref = run(tiny_model, num_kv_blocks=64, **kw)[1]
    llm, out = run(tiny_model, num_kv_blocks=SMALL_POOL, swap_space=1 << 20, **kw)
    s = llm.engine.scheduler
    assert llm.engine.runner.swap_space.staging.is_pinned()  # GPU copies went through the pinned stage
    assert all(p.is_cuda for p in llm.engine.runner.kv_cache.all_pools())
    assert s.num_swap_outs > 0 and s.num_swap_ins == s.num_swap_outs
    assert out == ref
    assert llm.engine.kv_blocks_used == 0 and not s.swapped


def test_swap_with_offloaded_layers(tiny_model, unconstrained):
    # A streamed and a CPU-computed layer: the swap copies every pool the KV cache has, wherever it lives.
    llm, out = run(tiny_model, num_kv_blocks=SMALL_POOL, offload="s,c", swap_space=1 << 20)
    assert llm.engine.offload is not None and llm.engine.scheduler.num_swap_outs > 0
    assert out == unconstrained


def test_staged_copies_move_the_same_blocks():
    # The GPU copy path (gather, one copy through the staging buffer, scatter) forced on CPU pools, with a
    # stage smaller than the swap so that it is reused across chunks.
    from vramwise.config import ModelConfig
    from vramwise.engine import kv_swap

    cfg = ModelConfig("LlamaForCausalLM", 100, 32, 64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=64)  # fmt: skip
    cache = KVCache(cfg, 6, 4, torch.int8, torch.device("cpu"))
    for p in cache.all_pools():
        p.copy_(torch.randint(-100, 100, p.shape).to(p.dtype))
    before = [p.clone() for p in cache.all_pools()]
    space = kv_swap.HostSwapSpace(cache, 5)
    space.staged = [True] * len(space.staged)
    saved, kv_swap._MAX_CHUNK_BYTES = kv_swap._MAX_CHUNK_BYTES, cache.block_nbytes  # one block per chunk at most
    try:
        space.swap_out([(4, 0), (1, 3), (5, 4)])
        for p in cache.all_pools():
            p.zero_()
        space.swap_in([(3, 2), (0, 0), (4, 5)])  # block 1 -> 2, 4 -> 0, 5 -> 5
    finally:
        kv_swap._MAX_CHUNK_BYTES = saved
    assert space.staging is not None
    for p, b in zip(cache.all_pools(), before):
        assert torch.equal(p[:, :, 2], b[:, :, 1]) and torch.equal(p[:, :, 0], b[:, :, 4])
        assert torch.equal(p[:, :, 5], b[:, :, 5]) and not p[:, :, [1, 3, 4]].any()
