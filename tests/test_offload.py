"""Offload driver on the CPU: every placement (resident, streamed with the CPU as both sides, CPU-computed,
mixed) gives the all-resident output bit for bit; streaming really copies into shared slots; CPU layers keep
their KV on the host; packed (quantized) buffers stream and dequantize; bad input is named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fixtures import make_tiny_tokenizer
from torch import nn

from vramwise.engine.runner import KVCache, ModelRunner
from vramwise.llm import LLM
from vramwise.memory import placement as pl
from vramwise.memory.offload import (
    CPU,
    RESIDENT,
    STREAMED,
    OffloadConfig,
    OffloadDriver,
    apply_placement,
    parse_placements,
    setup_offload,
)
from vramwise.sampling_params import SamplingParams

PROMPTS = [[5, 9, 33, 40, 2, 7, 81], [11, 12, 13], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110], [200, 3]]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
NUM_LAYERS = 7  # odd, so that 2 or 3 slots do not divide the streamed layers: the ring's wrap is exercised


def make_deep_tiny_model(dir: Path, num_layers: int = NUM_LAYERS, hidden: int = 64, intermediate: int = 128,
                         heads: int = 4, kv_heads: int = 2, vocab: int | None = None, seed: int = 0) -> str:
    """A tiny random Llama with more layers than the fixtures' (norms randomized too), saved as HF."""
    from fixtures import TINY_VOCAB_SIZE
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab or TINY_VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, num_hidden_layers=num_layers,
                      max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(str(dir), safe_serialization=True)
    make_tiny_tokenizer().save_pretrained(str(dir))
    return str(dir)


@pytest.fixture(scope="module")
def deep_path(tmp_path_factory) -> str:
    return make_deep_tiny_model(tmp_path_factory.mktemp("deep"))


def new_llm(path: str, device: str = "cpu", **kw) -> LLM:
    kw.setdefault("max_model_len", 128)
    return LLM(path, device=device, show_progress=False, **kw)


def offload(llm: LLM, placements, num_stream_buffers: int = 2, **kw) -> OffloadDriver:
    """Apply a placement to an engine's model and rebuild its runner so each layer's KV sits where the layer
    runs (what the engine does when it is built with an offload config)."""
    eng = llm.engine
    driver = apply_placement(eng.model, placements, eng.device, num_stream_buffers, **kw)
    eng.runner = ModelRunner(eng.model, eng.model_config, eng.device, eng.dtype, eng.block_manager.num_blocks,
                             eng.block_manager.block_size, eng.config.seed, kv_layers=driver.kv_layers(eng.dtype))
    return driver


def greedy(llm: LLM, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def reference(deep_path):
    llm = new_llm(deep_path)
    return greedy(llm), llm.engine.score(PROMPTS[2] + PROMPTS[0])


# ---- parsing and bad input --------------------------------------------------------------------------------


def test_parse_placements_forms():
    assert parse_placements("streamed", 3) == [STREAMED] * 3
    assert parse_placements("resident:1, s*2, cpu", 4) == [RESIDENT, STREAMED, STREAMED, CPU]
    assert parse_placements("r,c,s", 3) == [RESIDENT, CPU, STREAMED]
    assert parse_placements(["resident", "CPU"], 2) == [RESIDENT, CPU]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("gpu:2,disk:2", "bad placement entry 'disk:2'"),
        ("resident:3", "names 3 layer(s) but the model has 4"),
        ("sometimes", "unknown placement 'sometimes'"),
        (["resident", "x", "cpu", "cpu"], "unknown placement 'x'"),
        ("", "empty placement"),
    ],
)
def test_parse_placements_errors_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_placements(spec, 4)


def test_apply_placement_rejects_bad_arguments(deep_path):
    llm = new_llm(deep_path)
    with pytest.raises(ValueError, match="num_stream_buffers must be >= 2"):
        apply_placement(llm.engine.model, "streamed", "cpu", num_stream_buffers=1)
    with pytest.raises(ValueError, match="unknown CPU compute dtype 'int3'"):
        apply_placement(llm.engine.model, "cpu", "cpu", cpu_dtype="int3")
    with pytest.raises(ValueError, match="has 7"):
        apply_placement(llm.engine.model, "r,s", "cpu")
    assert greedy(llm, PROMPTS[:1]) == greedy(new_llm(deep_path), PROMPTS[:1])  # nothing half-applied
    driver = apply_placement(llm.engine.model, "streamed", "cpu")
    with pytest.raises(RuntimeError, match="release"):
        apply_placement(llm.engine.model, "cpu", "cpu")
    driver.release()
    apply_placement(llm.engine.model, "cpu", "cpu").release()


def test_tied_lm_head_stays_resident(tmp_path):
    from fixtures import make_tiny_hf_model

    llm = new_llm(make_tiny_hf_model(tmp_path / "tied", "llama_tied"))
    with pytest.raises(ValueError, match="ties lm_head to the token embedding"):
        apply_placement(llm.engine.model, "streamed", "cpu", lm_head="streamed")
    with pytest.raises(ValueError, match="unknown lm_head placement 'disk'"):
        apply_placement(llm.engine.model, "streamed", "cpu", lm_head="disk")
    want = greedy(llm, PROMPTS[:2])
    driver = offload(llm, "s,c", 2, embed_on_cpu=True)
    assert not driver.embed_on_cpu  # ignored for an embedding tied to lm_head, with a warning
    assert greedy(llm, PROMPTS[:2]) == want


def test_apply_plan_executes_a_planner_plan(deep_path, reference):
    from types import SimpleNamespace

    from vramwise.memory.offload import apply_plan

    plan = SimpleNamespace(layers=["resident"] * 2 + ["streamed"] * 3 + ["cpu"] * 2, num_stream_buffers=2,
                           lm_head="streamed", embeddings="cpu", prefill_offload_min_tokens=None)
    llm = new_llm(deep_path)
    eng = llm.engine
    driver = apply_plan(eng.model, plan, eng.device)
    eng.runner = ModelRunner(eng.model, eng.model_config, eng.device, eng.dtype, eng.block_manager.num_blocks,
                             eng.block_manager.block_size, eng.config.seed, kv_layers=driver.kv_layers(eng.dtype))
    assert driver.placements == plan.layers and driver.lm_head == STREAMED and driver.embed_on_cpu
    assert [s.name for s in driver._streamed] == ["model.layers.2", "model.layers.3", "model.layers.4", "lm_head"]
    assert greedy(llm) == reference[0]


def test_setup_offload_is_a_no_op_without_placements(deep_path):
    llm = new_llm(deep_path)
    assert setup_offload(llm.engine.model, OffloadConfig(), "cpu") is None
    driver = setup_offload(llm.engine.model, OffloadConfig(placements="r:3,s:2,c:2", num_stream_buffers=2), "cpu")
    assert driver is not None and driver.placements == [RESIDENT] * 3 + [STREAMED] * 2 + [CPU] * 2


# ---- equivalence ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "placements, buffers, extra",
    [
        ("resident", 2, {}),
        ("streamed", 2, {}),  # 7 layers over 2 slots: slot 0 carries layers 0, 2, 4, 6
        ("streamed", 3, {}),
        ("streamed", 8, {}),  # more slots than layers: each layer keeps its slot, no copies after priming
        ("cpu", 2, {}),
        ("r,s,c,s,s,c,r", 2, {}),  # mixed, interleaved
        ("r,s,c,s,s,c,r", 2, {"lm_head": "streamed"}),  # the head is the ring's last unit
        ("c:2,s:4,r", 3, {"embed_on_cpu": True, "lm_head": "cpu"}),
    ],
)
def test_placements_give_the_resident_output_bit_for_bit(deep_path, reference, placements, buffers, extra):
    ref_tokens, ref_logits = reference
    llm = new_llm(deep_path)
    driver = offload(llm, placements, buffers, **extra)
    assert greedy(llm) == ref_tokens
    assert torch.equal(llm.engine.score(PROMPTS[2] + PROMPTS[0]), ref_logits)  # same arithmetic, same bits
    assert driver.stats.misses == 0  # the ring is primed and every later load is a prefetch


def test_placements_agree_under_preemption(deep_path):
    # With 24 new tokens the four requests need 2 + 2 + 3 + 2 blocks of 16 by their end; 4 blocks hold them
    # all at the start only, so the scheduler preempts (and recomputes) as they grow.
    long = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = greedy(new_llm(deep_path), params=long)
    llm = new_llm(deep_path, num_kv_blocks=4)
    offload(llm, "s,c,r,s,c,s,s", 2)
    assert greedy(llm, params=long) == want
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv_blocks_used == 0


# ---- streaming mechanics ----------------------------------------------------------------------------------


def test_streamed_layers_share_slots_and_every_step_copies(deep_path, reference):
    llm = new_llm(deep_path)
    driver = offload(llm, "streamed", 2)
    layers = llm.engine.model.model.layers
    slot_ptrs = [s.data_ptr() for s in driver._ring.slots]
    # Layer j computes from slot j % 2 for good: layers 0, 2, 4, 6 read the same bytes, 1, 3, 5 the others.
    for j, layer in enumerate(layers):
        for p in layer.parameters():
            assert slot_ptrs[j % 2] <= p.data_ptr() < slot_ptrs[j % 2] + driver.slot_bytes
    assert layers[0].mlp.down_proj.weight.data_ptr() == layers[2].mlp.down_proj.weight.data_ptr()
    assert driver.stats.loads == 2  # primed with the first two

    steps_before = driver.stats.loads
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert out[0].outputs[0].token_ids == reference[0][0][:3]
    # 3 steps (prefill + 2 decodes), 7 layer loads each: 5 in-step prefetches and 2 for the next step's first layers.
    assert driver.stats.loads - steps_before == 3 * 7
    assert driver.stats.bytes_copied == driver.stats.loads * driver._streamed[0].layout.nbytes
    assert driver.stats.misses == 0


def test_out_of_order_call_loads_what_it_needs(deep_path):
    llm = new_llm(deep_path)
    driver = offload(llm, "streamed", 2)
    ref = new_llm(deep_path).engine.model.model.layers
    layers = llm.engine.model.model.layers
    x = torch.randn(3, 64)
    pos = torch.arange(3)
    from vramwise.models.attention import AttentionMetadata

    def meta():
        kv = (torch.zeros(4, 16, 2, 16), torch.zeros(4, 16, 2, 16))
        for m in (layers[5], ref[5]):
            m.self_attn.attn.kv_cache = tuple(t.clone() for t in kv)
        return AttentionMetadata(torch.arange(3), torch.tensor([[0]]), [0, 3], [3])

    with torch.inference_mode():
        got = layers[5](pos, x, meta())  # slot 1 holds layer 1: a miss, loaded on the spot
        want = ref[5](pos, x, meta())
    assert torch.equal(got, want)
    assert driver.stats.misses == 1


class _Protocol:
    """Checks the CUDA event protocol of the slot ring in host order, with fake streams and events standing
    in for CUDA (each stream runs its operations in the order the host issued them, as CUDA streams do):
      - a copy into slot s starts only after the compute stream recorded freed[s] past the slot's last reader;
      - a layer starts only after the compute stream waited on a loaded[s] recorded after the copy of THAT
        layer, and no other copy into s was issued since."""

    def __init__(self, driver: OffloadDriver) -> None:
        ring = driver._ring
        self.driver, self.ring = driver, ring
        n = driver.num_slots
        self.compute, self.copy = _FakeStream(self, "compute"), _FakeStream(self, "copy")
        self.loaded = [_FakeEvent(self, "loaded", s) for s in range(n)]
        self.freed = [_FakeEvent(self, "freed", s) for s in range(n)]
        self.loaded_v, self.freed_v = [0] * n, [0] * n
        self.loaded_layer = [{0: ring.owner[s]} for s in range(n)]  # version -> layer (primed synchronously)
        self.copy_waited: list[int | None] = [None] * n
        self.compute_waited: list[int | None] = [None] * n
        self.slot_idle = [True] * n  # no layer has read the slot since freed[s] was last recorded
        self.copies = self.runs = 0
        ring.is_async, ring.copy_stream, ring.loaded, ring.freed = True, self.copy, self.loaded, self.freed

    def layer_in_slot(self, s: int) -> int:
        slot = self.ring.slots[s]
        return next(j for j, st in enumerate(self.driver._streamed)
                    if j % self.driver.num_slots == s and torch.equal(slot[: st.layout.nbytes], st.host))

    def record(self, ev: _FakeEvent, stream: _FakeStream) -> None:
        s = ev.slot
        if ev.kind == "loaded":
            assert stream is self.copy
            assert self.copy_waited[s] == self.freed_v[s] and self.slot_idle[s], "copy overlaps a reader of the slot"
            self.loaded_v[s] += 1
            self.loaded_layer[s][self.loaded_v[s]] = self.layer_in_slot(s)
            self.copies += 1
        else:
            assert stream is self.compute
            self.freed_v[s] += 1
            self.slot_idle[s] = True

    def wait(self, stream: _FakeStream, ev: _FakeEvent) -> None:
        if stream is self.copy and ev.kind == "freed":
            self.copy_waited[ev.slot] = self.freed_v[ev.slot]
        elif stream is self.compute and ev.kind == "loaded":
            self.compute_waited[ev.slot] = self.loaded_v[ev.slot]
        else:
            raise AssertionError(f"unexpected wait of {stream.name} on {ev.kind}")

    def layer_starts(self, j: int) -> None:
        s = j % self.driver.num_slots
        v = self.compute_waited[s]
        assert v is not None and self.loaded_layer[s][v] == j and v == self.loaded_v[s], f"layer {j} not loaded"
        self.slot_idle[s] = False
        self.runs += 1


class _FakeStream:
    def __init__(self, proto: _Protocol, name: str) -> None:
        self.proto, self.name = proto, name

    def wait_event(self, ev: _FakeEvent) -> None:
        self.proto.wait(self, ev)

    def synchronize(self) -> None:
        pass


class _FakeEvent:
    def __init__(self, proto: _Protocol, kind: str, slot: int) -> None:
        self.proto, self.kind, self.slot = proto, kind, slot

    def record(self, stream: _FakeStream) -> None:
        self.proto.record(self, stream)


def test_ring_event_protocol_orders_copies_and_compute(deep_path, reference, monkeypatch):
    """The CUDA branch of the ring (streams, events) run on the CPU against a checker of its ordering."""
    import contextlib

    llm = new_llm(deep_path)
    driver = offload(llm, "s,r,s,c,s,s,s", 3)  # 5 streamed over 3 slots, resident and CPU layers between
    proto = _Protocol(driver)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: proto.compute)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    streamed = [i for i, p in enumerate(driver.placements) if p == STREAMED]
    for j, i in enumerate(streamed):  # runs after the driver's pre-hook, i.e. just before the layer computes
        llm.engine.model.model.layers[i].register_forward_pre_hook(lambda m, a, j=j: proto.layer_starts(j))
    assert greedy(llm) == reference[0]
    assert proto.runs == len(streamed) * 10 and proto.copies == driver.stats.loads - 3  # 3 primed before the fakes
    assert driver.stats.misses == 0
    driver.release()


def test_packed_quantized_buffers_stream_and_dequantize_on_cpu(deep_path, reference):
    """QuantLinear keeps packed int4 codes and fp16 scales as buffers: they stream like weights; on a CPU
    layer they are dequantized once to a float nn.Linear computing the same values."""
    from vramwise.quant.formats import QuantSpec
    from vramwise.quant.rtn import quantize_rtn

    def quantize(llm: LLM) -> None:
        for layer in llm.engine.model.model.layers:
            for name, lin in list(layer.named_modules()):
                if isinstance(lin, nn.Linear):
                    parent, _, child = name.rpartition(".")
                    packed = quantize_rtn(lin.weight.detach(), QuantSpec.int4(32))
                    setattr(layer.get_submodule(parent), child, PackedLinear(packed, lin.bias))

    base = new_llm(deep_path)
    quantize(base)
    want_tokens = greedy(base)
    want_logits = base.engine.score(PROMPTS[2])

    llm = new_llm(deep_path)
    quantize(llm)
    driver = offload(llm, "s,s,c,s,c,r,s", 2)
    layers = llm.engine.model.model.layers
    assert isinstance(layers[0].mlp.down_proj, PackedLinear) and layers[0].mlp.down_proj.qweight.dtype == torch.int32
    assert type(layers[2].mlp.down_proj) is nn.Linear  # CPU layer: dequantized at apply time
    assert isinstance(layers[5].mlp.down_proj, PackedLinear)
    assert greedy(llm) == want_tokens
    assert torch.equal(llm.engine.score(PROMPTS[2]), want_logits)
    assert driver.stats.loads > 0


class PackedLinear(nn.Module):
    """Stand-in for quant.linear.QuantLinear (same contract: packed tensors as buffers, packed())."""

    def __init__(self, packed, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.spec, self.in_features, self.out_features = packed.spec, packed.in_features, packed.out_features
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("mins", packed.mins)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def packed(self):
        from vramwise.quant.formats import PackedWeight

        return PackedWeight(self.qweight, self.scales, self.mins, self.spec, self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.packed().dequantize(torch.float32).to(x.dtype), self.bias)


def test_file_backed_host_buffers(deep_path, reference, tmp_path):
    llm = new_llm(deep_path)
    driver = offload(llm, "r,s,s,s,s,s,r", 2, host_allocator=pl.file_backed_allocator(tmp_path / "spill"))
    assert len(list((tmp_path / "spill").glob("layer-*.bin"))) == 5
    assert greedy(llm) == reference[0]
    driver.release()


# ---- CPU layers, KV placement, accounting, release --------------------------------------------------------


def test_cpu_layers_keep_kv_on_host_and_accounting_adds_up(deep_path):
    llm = new_llm(deep_path)
    model = llm.engine.model
    per_layer = pl.tensor_bytes(pl.owned_tensors(model.model.layers[0], pl.shared_modules(model)))
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values()
                if t.data_ptr() != model.model.rotary.cos_sin.data_ptr())
    driver = offload(llm, "r,s,c,s,s,c,r", 2)
    assert driver.kv_layers(torch.float32) == [
        (torch.device("cpu") if p == CPU else driver.device, torch.float32) for p in driver.placements]
    for i, attn in enumerate(model.attention_layers()):
        assert attn.kv_cache[0].device.type == "cpu"
    assert driver.bytes_cpu == 2 * per_layer
    assert driver.bytes_streamed >= 3 * per_layer  # plus alignment padding between tensors
    assert driver.slot_bytes >= per_layer and driver.num_slots == 2
    rotary = model.model.rotary.cos_sin.numel() * 4
    assert driver.bytes_resident == total - 5 * per_layer + rotary


def test_kv_cache_per_layer_devices_and_dtypes():
    from vramwise.config import ModelConfig

    cfg = ModelConfig("LlamaForCausalLM", 16, 8, 16, 3, 2, 1, 4, 32)
    whole = KVCache(cfg, 5, 4, torch.float32, torch.device("cpu"))
    assert whole.tensor.shape == (3, 2, 5, 4, 1, 4)
    split = KVCache(cfg, 5, 4, torch.float32, torch.device("cpu"),
                    layers=[("cpu", torch.float32), ("cpu", torch.bfloat16), ("cpu", torch.float32)])
    assert [split.layer(i)[0].dtype for i in range(3)] == [torch.float32, torch.bfloat16, torch.float32]
    assert split.layer(0)[0].shape == (5, 4, 1, 4)
    split.layer(2)[1].fill_(1.0)
    assert split.layer(0)[1].sum() == 0  # layers are separate pages
    assert split.nbytes_by_device() == {"cpu": 2 * 5 * 4 * 4 * (2 * 4 + 2)}
    with pytest.raises(RuntimeError, match="split"):
        _ = split.tensor
    with pytest.raises(ValueError, match="names 2 layers, the model has 3"):
        KVCache(cfg, 5, 4, torch.float32, torch.device("cpu"), layers=[("cpu", torch.float32)] * 2)


def test_release_leaves_a_plain_model_that_can_be_laid_out_again(deep_path, reference):
    llm = new_llm(deep_path)
    model = llm.engine.model
    driver = offload(llm, "s,c,s,s,r,c,s", 3)
    assert greedy(llm) == reference[0]
    driver.release()
    for layer in model.model.layers:
        assert not layer._forward_hooks and not layer._forward_pre_hooks
    # Streamed layers now compute from their own host buffers: all distinct again.
    assert len({layer.mlp.down_proj.weight.data_ptr() for layer in model.model.layers}) == NUM_LAYERS
    assert greedy(llm) == reference[0]
    offload(llm, "c,s,s,r,s,s,c", 2)
    assert greedy(llm) == reference[0]


def test_runner_builds_the_host_batch_once_per_step(deep_path, reference):
    """With CPU layers beside GPU ones the runner builds the host copy of the batch tensors from its Python
    lists (no D2H copies); it must equal the copy the driver would otherwise make from the device tensors.
    On a CPU-only machine the runner has no reason to, so the flag is forced here."""
    from vramwise.memory.offload import HOST_STEP_KEY, host_metadata

    llm = new_llm(deep_path)
    offload(llm, "r,c,s,c,r,s,c", 2)
    runner = llm.engine.runner
    runner._host_layers = True
    built = []
    real_prepare = runner.prepare

    def prepare(out):
        ids, pos, meta = real_prepare(out)
        step = meta.prepared[HOST_STEP_KEY]
        lazy = host_metadata(meta)
        for name in ("slot_mapping", "block_tables", "context_lens_t"):
            assert torch.equal(getattr(step.meta, name), getattr(lazy, name))
        assert (step.meta.query_start_loc, step.meta.context_lens, step.meta.all_decode) == (
            meta.query_start_loc, meta.context_lens, meta.all_decode)
        assert step.tensor(pos) is step.tensors[id(pos)][1] and torch.equal(step.tensor(pos), pos)
        built.append(step)
        return ids, pos, meta

    runner.prepare = prepare
    assert greedy(llm) == reference[0]
    assert len(built) == 10  # one per step (one prefill step, nine decode steps)


@pytest.mark.slow
def test_bundled_model_mixed_placement_matches_resident():
    """The real bundled SmolLM2 (30 layers, Q4_1 GGUF dequantized on CPU): resident layers, streamed ones over
    3 slots (not dividing the 10 streamed), CPU layers, interleaved; a batch of prompts, greedy."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "2 + 2 ="]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = LLM(device="cpu", max_model_len=128, show_progress=False)
    want = greedy(llm, prompts, params)
    driver = offload(llm, ["resident", "streamed", "cpu"] * 10, 3)
    assert greedy(llm, prompts, params) == want
    assert driver.stats.loads > 10 and driver.stats.misses == 0


# ---- CPU layers with packed weights (cpu_weights="packed": quant/cpu_packed.py) ----------------------------


def _quantize_layers(llm: LLM, spec_for) -> None:
    """Every linear of every decoder layer -> a real QuantLinear (RTN) in spec_for(name)."""
    from vramwise.quant.linear import QuantLinear

    for layer in llm.engine.model.model.layers:
        for name, lin in list(layer.named_modules()):
            if type(lin) is nn.Linear:
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent), child, QuantLinear.from_linear(lin, spec_for(child)))


def _assert_close_with_same_clear_argmax(logits: torch.Tensor, want: torch.Tensor) -> None:
    """logits (T, vocab) within bf16 error of want, yet not equal (the packed kernels ran). Greedy tokens of
    the random model are not robust to bf16 (two candidates often tie within 1e-3): where want's top-1 leads
    by more than twice the largest error, logits pick the same token, and that holds at most positions."""
    err = (logits - want).abs().max()
    assert 0 < float(err / want.abs().max()) < 2e-2
    top2 = want.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * err
    assert clear.sum() >= len(clear) // 2
    assert torch.equal(logits.argmax(-1)[clear], want.argmax(-1)[clear])


def test_packed_cpu_layers_match_resident_for_every_kind(deep_path):
    """int4 (qkv, gate_up), int8 per channel (down) and group-wise int8 (o_proj, held in bf16) on CPU layers:
    logits within bf16 error of the all-resident run, the same next token wherever the margin is clear; the
    packed modules keep their
    kernels' dtypes (the driver's float cast must not touch them)."""
    from vramwise.quant.cpu_packed import INT4, INT8, INT8_DEQUANTIZED, CpuPackedLinear
    from vramwise.quant.formats import QuantSpec
    from vramwise.quant.linear import QuantLinear

    specs = {"o_proj": QuantSpec.int8(32), "down_proj": QuantSpec.int8()}
    spec_for = lambda child: specs.get(child, QuantSpec.int4(32))  # noqa: E731
    base = new_llm(deep_path)
    _quantize_layers(base, spec_for)
    want_logits = base.engine.score(PROMPTS[2] + PROMPTS[0])

    llm = new_llm(deep_path)
    _quantize_layers(llm, spec_for)
    driver = offload(llm, "r,c,s,c,c,r,r", 2, cpu_weights="packed")
    layers = llm.engine.model.model.layers
    kinds = {name: m.kind for name, m in layers[1].named_modules() if isinstance(m, CpuPackedLinear)}
    assert kinds == {"self_attn.qkv_proj": INT4, "self_attn.o_proj": INT8_DEQUANTIZED, "mlp.gate_up_proj": INT4,
                     "mlp.down_proj": INT8}
    assert layers[1].mlp.gate_up_proj.scales_zeros.dtype == torch.bfloat16
    assert layers[1].input_layernorm.weight.dtype == torch.float32  # the rest stays in cpu_dtype
    assert isinstance(layers[2].mlp.down_proj, QuantLinear) and isinstance(layers[0].mlp.down_proj, QuantLinear)
    logits = llm.engine.score(PROMPTS[2] + PROMPTS[0])  # (T, vocab)
    # bf16 activations and scales in 3 of 7 layers: a few 2^-8 of the logits' scale.
    _assert_close_with_same_clear_argmax(logits, want_logits)
    assert "linears packed" in driver.summary()
    driver.release()


def test_packed_cpu_layer_host_bytes(deep_path):
    """A CPU layer's host bytes with packed int4 g32 linears: 4 bits a weight plus a bf16 [scale, zero] per
    32 (5 bits in all), against 32 bits dequantized: about 5/32 of the fp32 layer (norms add a little)."""
    from vramwise.quant.cpu_packed import CpuPackedLinear
    from vramwise.quant.formats import QuantSpec

    sizes = {}
    for mode in ("dequantized", "packed"):
        llm = new_llm(deep_path)
        _quantize_layers(llm, lambda child: QuantSpec.int4(32))
        driver = offload(llm, "r,c,r,r,r,r,c", 2, cpu_weights=mode)
        sizes[mode] = driver.bytes_cpu
        if mode == "packed":
            layer = llm.engine.model.model.layers[1]
            linears = sum(m.nbytes() for m in layer.modules() if isinstance(m, CpuPackedLinear))
            norms = sum(t.numel() * 4 for n, t in layer.named_parameters() if "norm" in n)
            assert driver.bytes_cpu == 2 * (linears + norms)
    assert 0.14 < sizes["packed"] / sizes["dequantized"] < 0.17


def test_engine_threads_cpu_weights(deep_path):
    """LLM(cpu_weights="packed") with an --offload placement: CPU layers computed packed, the same
    logits as the all-resident int4 model up to bf16; a bad choice is named before loading."""
    from vramwise.quant.cpu_packed import CpuPackedLinear

    base = new_llm(deep_path, quantization="int4-g32")
    llm = new_llm(deep_path, quantization="int4-g32", offload="r,c,r,r,c,r,r", cpu_weights="packed")
    assert llm.engine.offload.cpu_weights == "packed"
    assert isinstance(llm.engine.model.model.layers[4].mlp.down_proj, CpuPackedLinear)
    prompt = PROMPTS[2] + PROMPTS[0]
    _assert_close_with_same_clear_argmax(llm.engine.score(prompt), base.engine.score(prompt))
    assert len(greedy(llm, PROMPTS[:2])[1]) == GREEDY.max_tokens  # generation runs through the hooks
    with pytest.raises(ValueError, match="unknown CPU weight format 'int3'; choose fp32, bf16, packed"):
        new_llm(deep_path, cpu_weights="int3")
    with pytest.raises(ValueError, match="unknown cpu_weights 'fp32'"):
        apply_placement(base.engine.model, "cpu", "cpu", cpu_weights="fp32")


def test_packed_lm_head_on_the_cpu(deep_path):
    """A quantized lm_head placed on the CPU is itself the unit: it becomes a CpuPackedLinear (int8 kernel)."""
    from vramwise.quant.cpu_packed import INT8, CpuPackedLinear
    from vramwise.quant.formats import QuantSpec
    from vramwise.quant.linear import QuantLinear

    def quantize_head(llm: LLM) -> None:
        model = llm.engine.model
        model.lm_head = QuantLinear.from_linear(model.lm_head, QuantSpec.int8())

    base = new_llm(deep_path)
    quantize_head(base)
    want = base.engine.score(PROMPTS[2] + PROMPTS[0])
    llm = new_llm(deep_path)
    quantize_head(llm)
    driver = offload(llm, "resident", 2, lm_head="cpu", cpu_weights="packed")
    head = llm.engine.model.lm_head
    assert isinstance(head, CpuPackedLinear) and head.kind == INT8
    _assert_close_with_same_clear_argmax(llm.engine.score(PROMPTS[2] + PROMPTS[0]), want)
    driver.release()
