"""Prefill offload on the CPU (memory/offload.py, "Prefill offload"): long steps run the CPU decoder layers on the
device through their twins, with the CPU as both sides. The twin computes from the layer's weights as loaded in
the model dtype (float32 here, as the CPU layers), so every output is bit for bit the all-resident one: whole
prompts, chunked prompts (a later chunk's twin reads the earlier chunk's KV back from the host), steps mixing
decodes and a prefill chunk, and CPU-computed decode steps reading the KV the twins wrote. The ring lends a slot
and gets it back: the next step starts from the step-start state with no miss."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_offload import PROMPTS, greedy, make_deep_tiny_model, new_llm, offload

from vramwise.engine.runner import ModelRunner
from vramwise.memory.offload import CPU, STREAMED, apply_plan
from vramwise.sampling_params import SamplingParams

LONG = list(range(40, 77))  # 37 tokens: 5 chunks of 8 with max_num_batched_tokens=8
SHORT = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def deep_path(tmp_path_factory) -> str:
    return make_deep_tiny_model(tmp_path_factory.mktemp("deep_prefill"))


@pytest.fixture(scope="module")
def reference(deep_path):
    llm = new_llm(deep_path)
    return greedy(llm), llm.engine.score(PROMPTS[2] + PROMPTS[0])


def _step_at_start(driver) -> bool:
    """Slot s holds streamed unit s, in its bytes too (what a captured decode step expects to find)."""
    ring = driver._ring
    if ring.copy_stream is not None:
        ring.copy_stream.synchronize()  # the copies in flight (the next step's prefetches) have landed
    return all(ring.owner[s] == s and torch.equal(ring.slots[s][: driver._streamed[s].layout.nbytes].cpu(),
                                                  driver._streamed[s].host) for s in range(driver.num_slots))


@pytest.mark.parametrize(
    "placements, buffers, extra, reloads",
    [
        # A CPU layer right after a streamed one takes that unit's slot, whose next load waits for the twin:
        # the step copies what a step without offload copies, plus the twins.
        ("r,s,c,s,s,c,r", 2, {}, 0),
        # 3 slots for 3 streamed layers (each keeps its slot): each run of CPU layers displaces one unit
        ("c,c,s,s,s,c,c", 3, {}, 2),
        # CPU layers after a resident one: they borrow the slot of the next step's first unit
        ("s,s,s,r,r,c,c", 2, {"lm_head": "streamed"}, 1),
        ("c:3,r:4", 2, {}, 0),  # nothing streams: the twins get a slot of their own
        # embeddings and lm_head on the CPU (the head has no twin): the first units' slots are borrowed
        ("c:2,s:4,r", 3, {"embed_on_cpu": True, "lm_head": "cpu"}, 1),
    ],
)
def test_offloaded_prefill_gives_the_resident_output_bit_for_bit(deep_path, reference, placements, buffers, extra,
                                                                 reloads):
    ref_tokens, ref_logits = reference
    base = new_llm(deep_path)
    base_driver = offload(base, placements, buffers, **extra)
    base.engine.score(PROMPTS[2] + PROMPTS[0])
    greedy(base)
    llm = new_llm(deep_path)
    driver = offload(llm, placements, buffers, prefill_offload_min_tokens=5, **extra)
    cpu = driver.layers_with(CPU)
    assert sorted(t.index for t in driver._twins.values()) == cpu
    assert torch.equal(llm.engine.score(PROMPTS[2] + PROMPTS[0]), ref_logits)  # one 18-token step, offloaded
    assert driver.stats.offloaded_layers == len(cpu)
    # The prompts prefill in one 23-token step (offloaded); 9 decode steps of 4 tokens run on the CPU and read
    # the KV the twins wrote back to the host pages.
    assert greedy(llm) == ref_tokens
    assert driver.stats.offloaded_layers == 2 * len(cpu)
    assert driver.stats.misses == 0  # every slot a twin borrowed was reloaded ahead of its streamed unit
    assert driver.stats.loads == base_driver.stats.loads + 2 * reloads  # streamed units' copies
    assert driver.stats.offload_bytes == 2 * sum(t.layout.nbytes for t in driver._twins.values())
    if driver._ring is not None:
        assert driver.stats.slots_borrowed > 0 and _step_at_start(driver)
        assert driver._twin_ring is None and driver.prefill_offload_bytes() == (driver.bytes_kv_scratch, 0)
    else:
        assert driver.bytes_twin_slot == driver.twin_slot_bytes > 0
    host_k = llm.engine.model.model.layers[cpu[0]].self_attn.attn.kv_cache[0]
    assert driver._kv_scratch[0].shape == host_k.shape and driver.bytes_kv_scratch == 2 * host_k.numel() * 4
    assert driver.prefill_offload_bytes(tuple(host_k.shape)) == driver.prefill_offload_bytes()


def test_ring_is_back_in_its_step_start_state_after_an_offloaded_prefill(deep_path):
    """A CPU layer after the last streamed one borrows a slot that holds the NEXT step's first unit; the
    prefill leaves the ring as every step leaves it, so ensure_step_start (before a captured decode step)
    has nothing to load."""
    llm = new_llm(deep_path)
    driver = offload(llm, "s,s,s,s,c,c,c", 3, prefill_offload_min_tokens=5)
    llm.engine.score(PROMPTS[2] + PROMPTS[0])
    # the last streamed unit hands over its slot (holding nothing yet); a run of 3 CPU layers takes a second
    # slot, in turn with the first, and reloads its unit
    assert driver.stats.slots_borrowed == 2 and driver.stats.loads == 3 + 1 + 2
    assert _step_at_start(driver) and driver.stats.misses == 0
    loads = driver.stats.loads
    driver.ensure_step_start()
    assert driver.stats.loads == loads


def test_threshold_counts_the_tokens_of_the_whole_step(deep_path, reference):
    ref_tokens, _ = reference
    for min_tokens, offloaded_steps in [(23, 1), (24, 0), (4, 10)]:  # one 23-token prefill, 9 steps of 4 tokens
        llm = new_llm(deep_path)
        driver = offload(llm, "r,s,c,s,s,c,r", 2, prefill_offload_min_tokens=min_tokens)
        assert greedy(llm) == ref_tokens
        assert driver.stats.offloaded_layers == 2 * offloaded_steps, min_tokens
        assert (driver.stats.kv_bytes_out > 0) == (offloaded_steps > 0)


def test_chunked_prefill_and_mixed_steps(deep_path):
    """Prompts in chunks of 8 tokens: a later chunk's twin reads the earlier chunks' KV from the host pages;
    a short prompt decodes in the same steps as the long one's chunks; decode steps (below the threshold)
    then run on the CPU over KV written by the twins."""
    prompts = [[7, 8, 9], LONG, PROMPTS[2]]
    want = greedy(new_llm(deep_path, max_num_batched_tokens=8), prompts, SHORT)
    llm = new_llm(deep_path, max_num_batched_tokens=8)
    driver = offload(llm, "r,c,s,c,c,s,r", 2, prefill_offload_min_tokens=5)
    seen = []  # per offloaded step: (any decode row, any chunk after the first)
    run_twin = driver._run_twin

    def spy(twin, args, kwargs):
        meta = args[2]
        rows = [(meta.query_start_loc[b + 1] - meta.query_start_loc[b], meta.context_lens[b])
                for b in range(len(meta.context_lens))]
        seen.append((any(n == 1 for n, _ in rows), any(1 < n < ctx for n, ctx in rows)))
        return run_twin(twin, args, kwargs)

    driver._run_twin = spy
    assert greedy(llm, prompts, SHORT) == want
    assert (True, True) in seen  # a step with a decode row and a later chunk of a prompt, offloaded
    assert driver.stats.kv_bytes_in > 0
    steps = len(seen) // 3
    assert steps >= 5 and driver.stats.offloaded_layers == 3 * steps
    # decode-only steps (3 tokens at most) stayed on the CPU: the KV they read came back from the twins
    assert llm.engine.scheduler is not None and all(len(p) > 0 for p in want)


def test_apply_plan_and_setup_pass_the_threshold(deep_path, reference):
    plan = SimpleNamespace(layers=["resident", "streamed", "cpu", "streamed", "streamed", "cpu", "resident"],
                           num_stream_buffers=2, lm_head="resident", embeddings="gpu", prefill_offload_min_tokens=6)
    llm = new_llm(deep_path)
    eng = llm.engine
    driver = apply_plan(eng.model, plan, eng.device)
    eng.runner = ModelRunner(eng.model, eng.model_config, eng.device, eng.dtype, eng.block_manager.num_blocks,
                             eng.block_manager.block_size, eng.config.seed, kv_layers=driver.kv_layers(eng.dtype))
    assert driver.prefill_offload_min_tokens == 6 and len(driver._twins) == 2
    assert "prefill offload from 6 tokens" in driver.summary()
    assert greedy(llm) == reference[0]
    assert driver.stats.offloaded_layers == 2


def test_engine_prefill_offload_option(deep_path, reference):
    llm = new_llm(deep_path, offload="r,s,c,s,s,c,r", prefill_offload=True, prefill_offload_min_tokens=5)
    assert llm.engine.offload.prefill_offload_min_tokens == 5
    assert greedy(llm) == reference[0]
    assert llm.engine.offload.stats.offloaded_layers == 2
    with pytest.raises(ValueError, match="prefill_offload_min_tokens must be >= 1"):
        new_llm(deep_path, offload="r,s,c,s,s,c,r", prefill_offload=True, prefill_offload_min_tokens=0)


def test_release_restores_the_cpu_layers_forward(deep_path, reference):
    llm = new_llm(deep_path)
    driver = offload(llm, "r,s,c,s,s,c,r", 2, prefill_offload_min_tokens=5)
    layer = llm.engine.model.model.layers[2]
    assert "forward" in layer.__dict__
    assert greedy(llm) == reference[0]
    driver.release()
    assert "forward" not in layer.__dict__ and not llm.engine.model.model._forward_hooks
    assert driver.prefill_offload_bytes() == (0, 0)
    offload(llm, "c,s,s,r,s,s,c", 2)  # laid out again without prefill offload: the CPU layers run on the CPU
    assert greedy(llm) == reference[0]


def test_twin_is_packed_from_the_layer_as_loaded(deep_path):
    """The twin packs the layer's own tensors (the model dtype, device format) like a streamed unit; the CPU
    layer itself is converted as before; the twin shares the rotary table with the device layers."""
    llm = new_llm(deep_path)
    model = llm.engine.model
    want = {n: t.clone() for n, t in model.model.layers[2].state_dict().items()}
    driver = offload(llm, "r,s,c,s,s,c,r", 2, prefill_offload_min_tokens=5)
    twin = next(t for t in driver._twins.values() if t.index == 2)
    got = twin.module.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert twin.layout.nbytes == driver._streamed[0].layout.nbytes  # same layer shape, same packing
    assert twin.module.self_attn.rotary is model.model.rotary
    assert twin.module is not model.model.layers[2] and not twin.module._forward_pre_hooks
    assert [p for p in driver.placements] == ["resident", STREAMED, CPU, STREAMED, STREAMED, CPU, "resident"]


def test_borrowed_slots_keep_the_ring_event_protocol(deep_path, reference, monkeypatch):
    """The CUDA branch of the ring run on the CPU against test_offload's checker of its ordering, with twins
    borrowing slots: a twin's copy waits for the slot's last reader, the twin waits for its copy, and the
    displaced unit's reload waits for the twin."""
    import contextlib

    from test_offload import _Protocol

    class Checker(_Protocol):
        def layer_in_slot(self, s: int):
            slot = self.ring.slots[s]
            twin = next((t for t in self.driver._twins.values()
                         if torch.equal(slot[: t.layout.nbytes], t.host)), None)
            return ("twin", twin.index) if twin is not None else super().layer_in_slot(s)

        def twin_starts(self, index: int) -> None:
            s = self.driver._twin_last_slot
            v = self.compute_waited[s]
            assert v is not None and v == self.loaded_v[s] and self.loaded_layer[s][v] == ("twin", index)
            self.slot_idle[s] = False
            self.twin_runs += 1

    llm = new_llm(deep_path)
    driver = offload(llm, "s,c,s,s,c,c,c", 3, prefill_offload_min_tokens=5)  # a lone CPU layer and a run of 3
    proto = Checker(driver)
    proto.twin_runs = 0
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: proto.compute)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    streamed = driver.layers_with(STREAMED)
    layers = llm.engine.model.model.layers
    for j, i in enumerate(streamed):
        layers[i].register_forward_pre_hook(lambda m, a, j=j: proto.layer_starts(j))
    for twin in driver._twins.values():
        twin.module.register_forward_pre_hook(lambda m, a, i=twin.index: proto.twin_starts(i))
    assert greedy(llm) == reference[0]
    assert proto.twin_runs == 4 and driver.stats.offloaded_layers == 4  # the prefill step only
    # 3 slots for 3 streamed units: every unit keeps its slot, so each borrowed slot is one reload: the lone CPU
    # layer takes one, the run of 3 two in turn
    assert driver.stats.slots_borrowed == 3 and driver.stats.misses == 0
    assert proto.copies == driver.stats.loads - 3 + 4  # 3 primed before the fakes; 4 twin copies
    driver.release()


def test_preemption_and_swap_with_offloaded_prefills(deep_path):  # recomputed prompts, swapped host pages
    """With 4 KV blocks the four requests are preempted as they grow: by recompute (a new prefill, offloaded
    again) or, with swap space, by copying every layer's pages out and back, the CPU layers' host pages among
    them, which must hold the rows the twins wrote."""
    long = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = greedy(new_llm(deep_path), params=long)
    for swap in (0, 1 << 20):
        llm = new_llm(deep_path, num_kv_blocks=4, swap_space=swap)
        driver = offload(llm, "s,c,r,s,c,s,s", 2, prefill_offload_min_tokens=5)
        if swap:
            llm.engine.runner.enable_swap(swap)
        assert greedy(llm, params=long) == want
        assert llm.engine.scheduler.num_preemptions > 0 and driver.stats.offloaded_layers > 0
        assert (llm.engine.scheduler.num_swap_outs > 0) == bool(swap)


def test_a_step_recorded_for_capture_is_never_offloaded(deep_path, reference):
    """Between begin_step_capture and end_step_capture (here live: the emulated schedule) the CPU layers run
    on the CPU whatever the step's size: an offloaded step's borrowed slots cannot be part of a graph."""
    llm = new_llm(deep_path)
    driver = offload(llm, "r,s,c,s,s,c,r", 2, prefill_offload_min_tokens=5)
    driver.ensure_step_start()
    driver.begin_step_capture(live=True)
    logits = llm.engine.score(PROMPTS[2] + PROMPTS[0])
    driver.after_replay(driver.end_step_capture())
    assert torch.equal(logits, reference[1]) and driver.stats.offloaded_layers == 0
    assert torch.equal(llm.engine.score(PROMPTS[2] + PROMPTS[0]), reference[1])
    assert driver.stats.offloaded_layers == 2 and driver.stats.misses == 0


def test_packed_cpu_layers_offload_their_int4_weights_as_loaded(deep_path):
    """int4 layers on the CPU as CpuPackedLinear (bf16 activations): an offloaded step computes them from their
    QuantLinear buffers as loaded, i.e. exactly as the all-resident int4 model does; the CPU path does not."""
    from vramwise.quant.cpu_packed import CpuPackedLinear
    from vramwise.quant.linear import QuantLinear

    prompt = PROMPTS[2] + PROMPTS[0]
    want = new_llm(deep_path, quantization="int4-g32").engine.score(prompt)
    kw = {"quantization": "int4-g32", "offload": "r,c,s,c,c,s,r", "cpu_weights": "packed"}
    on_cpu = new_llm(deep_path, **kw).engine.score(prompt)
    llm = new_llm(deep_path, prefill_offload=True, prefill_offload_min_tokens=5, **kw)
    driver = llm.engine.offload
    assert isinstance(llm.engine.model.model.layers[1].mlp.down_proj, CpuPackedLinear)
    twin = next(t for t in driver._twins.values() if t.index == 1)
    assert isinstance(twin.module.mlp.down_proj, QuantLinear) and twin.module.mlp.down_proj.qweight.dtype == torch.int32
    assert torch.equal(llm.engine.score(prompt), want) and not torch.equal(on_cpu, want)
    assert driver.stats.offloaded_layers == 3
