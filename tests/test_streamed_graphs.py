"""Streamed layers inside the captured decode step (engine/cuda_graphs.py + memory/offload.py "Captured decode
steps"): the ring's host-to-device copies are part of the graph, embeddings on the host are staged before the
replay, int8 KV is captured too.

CPU: "emulate" mode runs the captured step's schedule for real (in-step copies only, the wrap-around deferred
to after the replay, embedding rows from the staging buffer) and gives the all-resident eager tokens exactly;
the CUDA branch of the capture (events, fork and join of the copy stream) runs against fakes that enforce
CUDA's capture rules. GPU (marked gpu, < 2 min on an H100/H200): replayed graphs of streamed models give the
tokens of the same steps run eagerly, and the ring's stats show the replays' copies.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from test_offload import PROMPTS, make_deep_tiny_model

from vramwise.engine.llm_engine import LLMEngine
from vramwise.engine.runner import ModelRunner
from vramwise.llm import LLM
from vramwise.memory.offload import OffloadDriver, apply_placement
from vramwise.models.attention import AttentionMetadata
from vramwise.sampling_params import SamplingParams

SHORT = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
MAX_LEN, MAX_SEQS = 128, 4


def tokens(llm: LLM, prompts=PROMPTS[:3], params=SHORT) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def laid_out(path: str, placements, buffers: int, graphs: str, device: str = "cpu", kv: str = "auto",
             dtype: str = "float32", **extra) -> tuple[LLM, OffloadDriver]:
    """An engine whose model the driver lays out as asked (embed_on_cpu and lm_head are not engine flags),
    with its runner rebuilt for that placement and the given graph mode."""
    llm = LLM(path, device=device, dtype=dtype, max_model_len=MAX_LEN, max_num_seqs=MAX_SEQS, kv_cache_dtype=kv,
              enforce_eager=True, show_progress=False)
    eng = llm.engine
    driver = apply_placement(eng.model, placements, eng.device, buffers, **extra)
    eng.runner = ModelRunner(eng.model, eng.model_config, eng.device, eng.kv_dtype, eng.block_manager.num_blocks,
                             eng.block_manager.block_size, eng.config.seed, kv_layers=driver.kv_layers(eng.kv_dtype),
                             graphs=graphs, max_model_len=MAX_LEN, max_num_seqs=MAX_SEQS)
    return llm, driver


@pytest.fixture(scope="module")
def deep_path(tmp_path_factory) -> str:
    return make_deep_tiny_model(tmp_path_factory.mktemp("deep_sg"))  # 7 layers: 2 or 3 slots do not divide them


_REFS: dict[tuple[str, str], list[list[int]]] = {}


def reference(path: str, kv: str, device: str = "cpu") -> list[list[int]]:
    """All-resident, eager: the tokens every placement and graph mode must give."""
    key = (kv, device)
    if key not in _REFS:
        _REFS[key] = tokens(LLM(path, device=device, dtype="float32", max_model_len=MAX_LEN, max_num_seqs=MAX_SEQS,
                                kv_cache_dtype=kv, enforce_eager=True, show_progress=False))
    return _REFS[key]


# ---- engine policy --------------------------------------------------------------------------------------


def _mode(placements: list[str] | None, kv_dtype: torch.dtype, blocker: str | None = None) -> tuple[str, str | None]:
    offload = None if placements is None else SimpleNamespace(
        layers_with=lambda p: [i for i, x in enumerate(placements) if x == p], capture_blocker=lambda: blocker)
    fake = SimpleNamespace(config=SimpleNamespace(decode_graphs="auto", enforce_eager=False), kv_dtype=kv_dtype,
                           device=torch.device("cuda"), placement_name="test", offload=offload)
    return LLMEngine._graph_mode(fake)  # type: ignore[arg-type]


def test_graph_mode_captures_streamed_models_and_int8_kv():
    pytest.importorskip("triton")
    assert _mode(["resident", "streamed", "streamed"], torch.float16) == ("cuda", None)
    assert _mode(["streamed"] * 3, torch.int8) == ("cuda", None)
    assert _mode(None, torch.int8) == ("cuda", None)
    # CPU-computed layers: captured in pieces around them (segmented steps)
    assert _mode(["streamed", "cpu", "resident"], torch.float16) == ("cuda", None)
    assert _mode(["streamed"] * 3, torch.float16, blocker="not pinned") == ("off", "not pinned")


def test_cpu_layers_do_not_block_capture_they_split_it(deep_path):
    _, driver = laid_out(deep_path, "s,c,r,s,s,r,s", 2, "off")
    assert driver.capture_blocker() is None and driver.segmented
    _, driver = laid_out(deep_path, "streamed", 2, "off")
    assert driver.capture_blocker() is None  # on the CPU nothing is pinned, and nothing needs to be
    assert not driver.segmented


@pytest.mark.parametrize(
    "placements, buffers, want",
    [
        # (streamed ring indices, CPU layer after, slot break at) per piece
        ("s,c,r,s,s,r,s", 2, [([0], 1, None), ([1, 2], None, None), ([3], None, 3)]),
        ("r,s,s,c,s,c,s", 3, [([0, 1], 3, None), ([2], 5, None), ([3], None, None)]),
        ("s,s,s,c,r,r,r", 2, [([0, 1], None, None), ([2], 3, 2), ([], None, None)]),
        ("c,r,r,r,r,r,c", 2, [([], 0, None), ([], 6, None), ([], None, None)]),
    ],
)
def test_segment_plan_breaks_at_cpu_layers_and_shared_slots(deep_path, placements, buffers, want):
    """A piece ends before each CPU layer and before a streamed unit whose slot one of its own units reads."""
    _, driver = laid_out(deep_path, placements, buffers, "off")
    got = [(p.streamed, p.cpu_layer, p.slot_break_at) for p in driver.segment_plan()]
    assert got == want


# ---- emulated replays on the CPU ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "placements, buffers, kv, extra",
    [
        ("streamed", 2, "auto", {}),  # S = 7 over N = 2: the wrap-around shares a slot across steps
        ("streamed", 8, "auto", {}),  # S <= N: each unit keeps its slot, no copy after priming
        ("r,s,r,s,s,r,s", 3, "int8", {"lm_head": "streamed", "embed_on_cpu": True}),  # head streamed after the graph
        ("streamed", 3, "int8", {"embed_on_cpu": True}),
    ],
)
def test_emulated_streamed_steps_equal_eager(deep_path, placements, buffers, kv, extra):
    llm, driver = laid_out(deep_path, placements, buffers, "emulate", kv=kv, **extra)
    g = llm.engine.runner.graphs
    assert g is not None and g.offload is driver
    assert tokens(llm) == reference(deep_path, kv)
    assert g.num_replays > 0 and driver.stats.replays == g.num_replays
    assert llm.engine.num_lookahead_steps > 0  # async scheduling: input ids from the device (host-side lookup too)
    assert driver.stats.misses == 0  # every step started from the state the schedule expects
    assert driver._ring.owner == list(range(driver.num_slots))  # the next step's first units, loaded
    if extra.get("embed_on_cpu"):
        assert driver._emb_rows is not None and driver._emb_rows.shape[0] == MAX_SEQS


@pytest.mark.parametrize(
    "placements, buffers, kv, extra",
    [
        ("s,c,r,s,s,r,s", 2, "auto", {}),  # a slot break inside the step (units 1 and 3 share slot 1)
        ("r,s,s,c,s,c,s", 3, "int8", {"embed_on_cpu": True}),
        ("s,s,s,c,r,r,c", 2, "auto", {"lm_head": "streamed"}),  # the last piece is the final norm alone
        ("c,r,r,r,r,r,r", 2, "auto", {}),  # CPU layers only, no ring
        ("r,s,c,r,s,c,s", 2, "auto", {"prefill_offload_min_tokens": 2}),  # prefills run the CPU layers' twins
    ],
)
def test_emulated_segmented_steps_equal_eager(deep_path, placements, buffers, kv, extra):
    """Placements with CPU layers: decode steps run in pieces around them (the ring driven between the pieces,
    the CPU layers on a HostStep built from the pinned twin) and give the all-resident eager tokens."""
    llm, driver = laid_out(deep_path, placements, buffers, "emulate", kv=kv, **extra)
    g = llm.engine.runner.graphs
    assert g is not None and g.segmented
    assert tokens(llm) == reference(deep_path, kv)
    assert g.num_replays > 0
    assert llm.engine.num_lookahead_steps > 0
    if extra.get("prefill_offload_min_tokens"):
        assert driver.stats.offloaded_layers > 0  # the prefills ran the twins, the decode steps the CPU layers
    if driver._ring is not None:
        # Every streamed unit is loaded once per step, and only the pieces' own slot breaks wait for a copy
        # issued at their start (a miss); the others were prefetched while an earlier piece or CPU layer ran.
        breaks = sum(p.slot_break_at is not None for p in driver.segment_plan())
        assert driver.stats.misses <= breaks * g.num_replays + driver.num_slots


def test_segmented_step_uses_the_host_batch_from_the_twin(deep_path):
    """The CPU layers of a segmented step read the step's batch from a HostStep built on the host twin _fill
    wrote (no device-to-host copy of the static buffers), with the real context lengths, not the capture's
    bound."""
    llm, driver = laid_out(deep_path, "r,s,c,r,s,c,r", 2, "emulate")
    g = llm.engine.runner.graphs
    seen = []
    real = g._host_step

    def spy(meta, pad):
        real(meta, pad)
        host = meta.prepared["vramwise.offload.host_step"].meta
        twin = g._io_host[g._last_twin]
        lo, hi = twin.data_ptr(), twin.data_ptr() + twin.numel() * twin.element_size()
        assert lo <= host.slot_mapping.data_ptr() < hi and lo <= host.context_lens_t.data_ptr() < hi
        seen.append(host.context_lens_t.tolist())

    g._host_step = spy
    assert tokens(llm) == reference(deep_path, "auto")
    assert seen and max(max(c) for c in seen) < g.context_bound
    assert any(c[0] > 1 for c in seen)  # real contexts (prompt + generated), padding rows at 1


def test_emulated_steps_copy_every_streamed_unit_once(deep_path):
    """7 streamed layers over 2 slots: each step (eager or emulated replay) loads all 7 units exactly once."""
    llm, driver = laid_out(deep_path, "streamed", 2, "emulate")
    before = driver.stats.loads
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert out[0].outputs[0].token_ids == reference(deep_path, "auto")[0][:4]
    assert llm.engine.runner.graphs.num_replays == 3  # prefill eager, 3 decode steps emulated
    assert driver.stats.loads - before == 4 * 7


# ---- the CUDA branch of a capture, against fakes that enforce capture rules ---------------------------------


class _Capture:
    """Stands in for CUDA streams and events on the CPU and enforces what stream capture allows: inside a
    capture, a stream waits only on events recorded in the same capture, a side stream records only after it
    was forked (it waited on a captured event); outside, nothing waits on an event recorded in a capture."""

    def __init__(self) -> None:
        self.epoch: int | None = None
        self.ops: list[tuple[str, str, str]] = []


class _Ev:
    def __init__(self, cap: _Capture, name: str) -> None:
        self.cap, self.name, self.epoch = cap, name, None

    def record(self, stream: _St) -> None:
        if self.cap.epoch is not None:
            assert stream.forked(), f"{stream.name} records {self.name} in a capture it is not part of"
        self.epoch = self.cap.epoch
        self.cap.ops.append(("record", stream.name, self.name))


class _St:
    def __init__(self, cap: _Capture, name: str) -> None:
        self.cap, self.name, self.fork_epoch = cap, name, None

    def forked(self) -> bool:
        return self.name == "compute" or self.fork_epoch == self.cap.epoch

    def wait_event(self, ev: _Ev) -> None:
        if self.cap.epoch is not None:
            assert ev.epoch == self.cap.epoch, f"{self.name} waits on {ev.name}, recorded outside this capture"
            self.fork_epoch = self.cap.epoch
        else:
            assert ev.epoch is None, f"eager {self.name} waits on {ev.name}, recorded inside a capture"
        self.cap.ops.append(("wait", self.name, ev.name))

    def synchronize(self) -> None:
        pass


def _fake_ring(driver: OffloadDriver, monkeypatch) -> _Capture:
    cap = _Capture()
    ring, n = driver._ring, driver.num_slots
    compute = _St(cap, "compute")
    ring.is_async, ring.copy_stream = True, _St(cap, "copy")
    for name in ("loaded", "freed", "cap_loaded", "cap_freed"):
        setattr(ring, name, [_Ev(cap, f"{name}[{s}]") for s in range(n)])
    ring.cap_join, ring.eager_join = _Ev(cap, "cap_join"), _Ev(cap, "eager_join")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    return cap


@pytest.mark.parametrize(
    "placements, buffers, extra, end_owner, deferred",
    [
        ("streamed", 2, {}, [6, 5], [0, 1]),  # units 2..6 loaded in the graph; 0 and 1 after it
        # units 0..3 (layers 1, 3, 4, 6) then the head (4) over 3 slots: the graph loads 3 and the head;
        # slot 1's wrap-around is the head's own, issued when it runs after the replay; slot 2 only ever holds unit 2.
        ("r,s,r,s,s,r,s", 3, {"lm_head": "streamed", "embed_on_cpu": True}, [3, 4, 2], [0]),
        ("streamed", 8, {}, list(range(7)), []),  # S <= N: no copy in the graph
    ],
)
def test_capture_protocol_follows_cuda_rules(deep_path, monkeypatch, placements, buffers, extra, end_owner, deferred):
    llm, driver = laid_out(deep_path, placements, buffers, "off", **extra)
    model = llm.engine.model
    n, units = driver.num_slots, len(driver._streamed)
    in_graph = units - (extra.get("lm_head") == "streamed")  # the head runs after the replay, eagerly
    driver.prepare_step_capture(MAX_SEQS)
    cap = _fake_ring(driver, monkeypatch)
    stats0 = (driver.stats.loads, driver.stats.bytes_copied)
    meta = AttentionMetadata(slot_mapping=torch.tensor([0, 1]), block_tables=torch.tensor([[0], [0]]),
                             query_start_loc=[0, 1, 2], context_lens=[1, 2],
                             context_lens_t=torch.tensor([1, 2], dtype=torch.int32), max_context_len=MAX_LEN,
                             all_decode=True)
    with torch.inference_mode():
        driver.ensure_step_start()
        assert cap.ops[-2:] == [("record", "copy", "eager_join"), ("wait", "compute", "eager_join")]
        cap.epoch, start = 1, len(cap.ops)
        driver.begin_step_capture()
        hidden = model(torch.tensor([5, 9]), torch.tensor([0, 1]), meta)
        sched = driver.end_step_capture()
        captured, cap.epoch = cap.ops[start:], None

        copies = [op for op in captured if op[:2] == ("record", "copy") and op[2].startswith("cap_loaded")]
        assert sched.loads == len(copies) == max(0, units - n)  # unit j + N after unit j, no wrap-around
        assert sched.end_owner == end_owner and sched.deferred == deferred
        if copies:  # the graph ends joined: the capture stream waits for the copy stream's last copy
            assert captured[-2:] == [("record", "copy", "cap_join"), ("wait", "compute", "cap_join")]
        else:
            assert not any(op[1] == "copy" for op in captured)
        # Nothing ran: the host state is the step start again, the stats unchanged.
        assert driver._ring.owner == list(range(n)) and (driver.stats.loads, driver.stats.bytes_copied) == stats0
        assert driver._step is None and not driver._ring.capturing

        # "Replay": the schedule's end state, then the eager wrap-around; the head (if streamed) runs eagerly.
        driver.after_replay(sched)
        model.compute_logits(hidden)
    assert driver._ring.owner == list(range(n))
    assert driver.stats.replayed_loads == sched.loads and driver.stats.replays == 1
    wraps = len(deferred) + (1 if in_graph < units and units > n else 0)
    assert driver.stats.loads == stats0[0] + sched.loads + wraps
    assert driver.stats.misses == 0


class _FakeGraph:
    def replay(self) -> None:
        pass


@pytest.mark.parametrize(
    "placements, buffers, extra",
    [
        ("r,s,r,s,s,r,s", 3, {"lm_head": "streamed", "embed_on_cpu": True}),  # the GPU failure: 3 misses
        ("streamed", 2, {}),
    ],
)
def test_cuda_capture_path_loads_no_slot_as_a_miss(deep_path, monkeypatch, placements, buffers, extra):
    """DecodeGraphs.capture()'s CUDA branch (warm-up of every rung, then one capture per rung) run on the CPU
    against the fake streams/events: the warm-ups are whole steps (a streamed lm_head runs and issues its
    wrap-around), so every capture starts from the step-start state with no slot loaded as a miss, and
    replays then count only the schedule's copies."""
    llm, driver = laid_out(deep_path, placements, buffers, "emulate", **extra)
    g = llm.engine.runner.graphs
    cap = _fake_ring(driver, monkeypatch)
    epochs = iter(range(1, 100))

    @contextlib.contextmanager
    def fake_graph(graph, pool=None):
        cap.epoch = next(epochs)
        try:
            yield
        finally:
            cap.epoch = None

    for name, fake in [("synchronize", lambda device=None: None), ("empty_cache", lambda: None),
                       ("memory_reserved", lambda device=None: 0), ("graph_pool_handle", lambda: None),
                       ("CUDAGraph", _FakeGraph), ("graph", fake_graph)]:
        monkeypatch.setattr(torch.cuda, name, fake)
    g.mode = "cuda"  # the CUDA branch; the device stays the CPU
    before = replace(driver.stats)
    g.capture()
    assert set(g.graphs) == set(g.sizes) == {1, 2, 4}
    assert driver.stats.misses == before.misses == 0  # warm-ups and captures loaded nothing out of turn
    assert driver._ring.owner == list(range(driver.num_slots))
    # Warm-ups are whole steps: each loads the units past the first N, then wraps around every slot that held
    # one of them (a slot whose only user is its first unit keeps it); the captures run nothing.
    units, n = len(driver._streamed), driver.num_slots
    per_step = max(0, units - n) + min(n, max(0, units - n))
    assert driver.stats.loads - before.loads == len(g.sizes) * per_step


def test_step_after_a_skipped_head_reloads_its_slot_first(deep_path, monkeypatch):
    """A forward without logits (a prefill chunk that samples nothing) leaves the streamed head in its slot.
    The next step reloads that slot at its first streamed unit, ahead of the copies that unit's post-hook
    queues on the copy stream, not when the slot's reader comes (behind them)."""
    llm, driver = laid_out(deep_path, "r,s,r,s,s,r,s", 3, "off", lm_head="streamed")
    model = llm.engine.model
    cap = _fake_ring(driver, monkeypatch)
    meta = lambda: AttentionMetadata(slot_mapping=torch.tensor([0]), block_tables=torch.tensor([[0]]),
                                     query_start_loc=[0, 1], context_lens=[1],
                                     context_lens_t=torch.tensor([1], dtype=torch.int32), max_context_len=MAX_LEN)
    with torch.inference_mode():
        model(torch.tensor([5]), torch.tensor([0]), meta())  # no compute_logits: the head never ran
        assert driver._ring.owner == [0, 4, 2] and driver.stats.misses == 0
        start = len(cap.ops)
        model.compute_logits(model(torch.tensor([5]), torch.tensor([0]), meta()))
    ops = cap.ops[start:]
    # Slot 1's reload is the step's first copy, before unit 0 (layer 1) frees slot 0 for unit 3.
    assert ops.index(("record", "copy", "loaded[1]")) < ops.index(("record", "compute", "freed[0]"))
    assert driver.stats.misses == 1 and driver._ring.owner == [0, 1, 2]


def test_embedding_staging_reads_the_staged_rows(deep_path):
    llm, driver = laid_out(deep_path, "streamed", 2, "off", embed_on_cpu=True)
    emb = llm.engine.model.model.embed_tokens
    driver.prepare_step_capture(MAX_SEQS)
    ids = torch.tensor([3, 17, 0, 42])
    driver.stage_embeddings(ids)
    driver.ensure_step_start()
    driver.begin_step_capture(live=True)
    try:
        rows = emb(torch.tensor([0, 0, 0, 0]))  # the step's own ids are ignored: the graph reads the staged rows
    finally:
        driver.end_step_capture()
    assert torch.equal(rows, emb.weight[ids])
    with pytest.raises(RuntimeError, match="staging buffer"):
        driver.stage_embeddings(torch.zeros(MAX_SEQS + 1, dtype=torch.long))


# ---- GPU --------------------------------------------------------------------------------------------------

GPU_PROMPTS = [[(17 * i + j) % 200 + 3 for j in range(3 + 5 * i)] for i in range(5)]
GPU_MAX_TOKENS = [3, 12, 7, 16, 9]  # sequences finish mid-run: batches 5 -> 4 -> ... (non-ladder sizes)


def gpu_tokens(llm: LLM) -> list[list[int]]:
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in GPU_MAX_TOKENS]
    return [o.outputs[0].token_ids for o in llm.generate(GPU_PROMPTS, params)]


@pytest.fixture(scope="module")
def gpu_path(tmp_path_factory) -> str:
    # head_dim 64 (the bundled model's), GQA group 2, 7 layers
    return make_deep_tiny_model(tmp_path_factory.mktemp("deep_sg_gpu"), num_layers=7, hidden=256, intermediate=512,
                                heads=4, kv_heads=2)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "placements, buffers, kv, extra",
    [
        ("streamed", 2, "auto", {}),  # S = 7 not divisible by N = 2
        ("streamed", 3, "int8", {}),  # int8 KV captured too
        ("streamed", 8, "fp8", {}),  # S <= N: no copies after priming; fp8 KV captured too
        ("r,s,r,s,s,r,s", 3, "auto", {"lm_head": "streamed", "embed_on_cpu": True}),
        ("s,s,r,s,s,s,s", 2, "int8", {"embed_on_cpu": True}),
    ],
)
def test_cuda_graphs_with_streamed_layers_equal_eager(gpu_path, placements, buffers, kv, extra):
    """fp32 (random weights give flat logits; no near-tie hides in fp32 rounding). The replayed graphs give
    the tokens of the same padded steps run eagerly with the same placement (emulate: same kernels, shapes and
    slot addresses) and of the all-resident eager engine. Each layer's weights differ, so equal tokens also
    prove that the replayed copies put the right layer into each slot."""
    graphs, driver = laid_out(gpu_path, placements, buffers, "cuda", device="cuda", kv=kv, **extra)
    g = graphs.engine.runner.graphs
    assert g.mode == "cuda" and set(g.graphs) == set(g.sizes) and g.offload is driver
    emulated, _ = laid_out(gpu_path, placements, buffers, "emulate", device="cuda", kv=kv, **extra)
    got = gpu_tokens(graphs)
    assert got == gpu_tokens(emulated)
    eager = LLM(gpu_path, device="cuda", dtype="float32", max_model_len=MAX_LEN, max_num_seqs=MAX_SEQS,
                kv_cache_dtype=kv, enforce_eager=True, show_progress=False)
    assert got == gpu_tokens(eager)
    assert g.num_replays > 0 and driver.stats.replays == g.num_replays
    per_step = g.schedules[g.sizes[0]].loads
    assert per_step == max(0, len(driver._streamed) - driver.num_slots)
    assert driver.stats.replayed_loads == per_step * g.num_replays
    assert driver.stats.misses == 0
    if extra.get("embed_on_cpu"):
        assert graphs.engine.runner.graph_pool_bytes >= driver._emb_rows.numel() * driver._emb_rows.element_size()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "placements, buffers, kv, extra",
    [
        ("r,s,c,r,s,c,s", 3, "int8", {}),
        ("s,c,r,s,s,r,s", 2, "auto", {"embed_on_cpu": True}),  # a slot break inside the step
        ("s,s,s,c,r,r,c", 2, "auto", {"lm_head": "streamed"}),
        ("c,r,r,r,r,r,r", 2, "fp8", {}),
        ("r,s,c,r,s,c,s", 2, "auto", {"prefill_offload_min_tokens": 2}),
    ],
)
def test_cuda_graphs_with_cpu_layers_equal_eager(gpu_path, placements, buffers, kv, extra):
    """Segmented steps on CUDA: one graph per piece between the CPU layers, the ring driven between them. Their
    tokens equal the same padded steps run eagerly (emulate), the same placement's eager engine's and, with float
    KV (CPU layers keep theirs in fp32 whatever --kv-cache-dtype says), the all-resident eager engine's."""
    graphs, driver = laid_out(gpu_path, placements, buffers, "cuda", device="cuda", kv=kv, **extra)
    g = graphs.engine.runner.graphs
    assert g.mode == "cuda" and g.segmented and set(g.pieces) == set(g.sizes) and not g.graphs
    assert g.pieces[g.sizes[0]].num_graphs == len(driver.segment_plan())
    emulated, _ = laid_out(gpu_path, placements, buffers, "emulate", device="cuda", kv=kv, **extra)
    got = gpu_tokens(graphs)
    assert got == gpu_tokens(emulated)
    same_eager, _ = laid_out(gpu_path, placements, buffers, "off", device="cuda", kv=kv, **extra)
    assert got == gpu_tokens(same_eager)
    if kv == "auto":
        eager = LLM(gpu_path, device="cuda", dtype="float32", max_model_len=MAX_LEN, max_num_seqs=MAX_SEQS,
                    enforce_eager=True, show_progress=False)
        assert got == gpu_tokens(eager)
    assert g.num_replays > 0 and driver.stats.replays == g.num_replays


@pytest.mark.gpu
def test_cuda_graphs_with_packed_cpu_layers_real_shape():
    """The bundled model's shape, int4, a mixed placement with packed CPU layers (torch's int4 CPU kernel)
    through the engine's own flags: graphs on (segmented), tokens equal the same padded steps run eagerly."""
    kw = {"device": "cuda", "max_model_len": 256, "max_num_seqs": 4, "show_progress": False, "quantization": "int4",
          "offload": "r:18," + ",".join(["s", "c"] * 6), "num_stream_buffers": 3, "kv_cache_dtype": "int8",
          "cpu_weights": "packed"}
    graphs = LLM("random:smollm2-135m", **kw)
    assert graphs.engine.graph_mode == "cuda" and graphs.engine.runner.graphs.segmented
    emulated = LLM("random:smollm2-135m", decode_graphs="emulate", **kw)
    prompts = [[(17 * i + j) % 1000 + 3 for j in range(5 + 7 * i)] for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in graphs.generate(prompts, params)]
    assert got == [o.outputs[0].token_ids for o in emulated.generate(prompts, params)]
    assert graphs.engine.runner.graphs.num_replays > 0


@pytest.mark.gpu
def test_cuda_graphs_stream_a_real_shaped_model():
    """The bundled model's shape (30 layers) with random weights, 20 layers streamed over 3 slots (20 % 3 != 0),
    int8 KV, through the engine's own flags: graphs on, their tokens equal the eager engine's."""
    kw = {"device": "cuda", "dtype": "float32", "max_model_len": 256, "max_num_seqs": 6, "show_progress": False,
          "offload": "r:5,s:20,r:5", "num_stream_buffers": 3, "kv_cache_dtype": "int8"}
    graphs = LLM("random:smollm2-135m", **kw)
    assert graphs.engine.graph_mode == "cuda" and graphs.engine.graph_bypass_reason is None
    eager = LLM("random:smollm2-135m", enforce_eager=True, **kw)
    prompts = [[(17 * i + j) % 1000 + 3 for j in range(5 + 7 * i)] for i in range(5)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in graphs.generate(prompts, params)]
    assert got == [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    driver = graphs.engine.offload
    assert graphs.engine.runner.graphs.num_replays > 0
    assert driver.stats.replayed_loads == 17 * graphs.engine.runner.graphs.num_replays


@pytest.mark.gpu
def test_pageable_host_buffers_keep_decode_eager(gpu_path):
    """A copy from pageable memory cannot be captured: such a placement is refused by the graphs, named."""
    from vramwise.memory import placement as pl

    with pytest.raises(ValueError, match="not pinned"):
        laid_out(gpu_path, "streamed", 2, "cuda", device="cuda", host_allocator=pl.pageable_allocator)
