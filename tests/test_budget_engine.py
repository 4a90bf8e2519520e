"""The engine under a GPU-memory budget (--gpu-memory), on the CPU: the planner's device parameters are
injected (a fake card), so a tiny model is planned into a few MiB, laid out as the plan says (resident +
streamed / CPU-computed layers), its KV pool and prefill chunk sized from the plan, and it gives exactly the
all-resident greedy output. Budgets too small are refused before loading, with the numbers; the engine's
memory_report terms add up. The H100 test (marked gpu) runs a 13B-shaped int4 model in 6 GiB in a child
process and samples NVML through load, prefill and decode."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_offload import PROMPTS, greedy, make_deep_tiny_model

from vramwise.cli import build_parser, make_engine_config
from vramwise.config import EngineConfig, MemoryBudgetConfig, SchedulerConfig
from vramwise.llm import LLM
from vramwise.memory.budget import BudgetTooSmallError, MiB
from vramwise.memory.costmodel import H100
from vramwise.memory.enforce import REPORT_TERMS
from vramwise.memory.planner import plan
from vramwise.sampling_params import SamplingParams

#: A fake card for planning on the CPU: no context or library workspace (so that budgets of a few tens of
#: MiB are meaningful for a 7-layer model of ~150 KiB per layer), CPU slow enough that streaming wins.
STREAM_CARD = H100.with_overrides(name="fake-stream", total_memory=256 * MiB, cuda_context_bytes=0,
                                  library_workspace_bytes=0, num_sms=1, cpu_bandwidth=1e9, cpu_float_flops=1e9)
#: The same card with a copy engine so slow that computing offloaded layers on the CPU wins.
CPU_CARD = STREAM_CARD.with_overrides(name="fake-cpu", h2d_pinned_bandwidth=1e6, h2d_pageable_bandwidth=1e6,
                                      cpu_bandwidth=200e9, cpu_float_flops=10e12)
SCHED = SchedulerConfig(max_num_seqs=4, max_model_len=128)
SHORT = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def outputs(llm: LLM) -> list[list[int]]:
    """Greedy tokens of three prompts batched together (short: the CI box is small and shared)."""
    return greedy(llm, PROMPTS[:3], SHORT)


@pytest.fixture(scope="module")
def deep_path(tmp_path_factory) -> str:
    return make_deep_tiny_model(tmp_path_factory.mktemp("deep_budget"))


@pytest.fixture(scope="module")
def reference(deep_path):
    return outputs(engine_llm(deep_path))


def engine_llm(path: str, memory: MemoryBudgetConfig | None = None, **kw) -> LLM:
    return LLM(engine_config=EngineConfig(model=path, device="cpu", show_progress=False, scheduler=SCHED,
                                          memory=memory or MemoryBudgetConfig(), **kw))


@functools.lru_cache(maxsize=None)
def offloading_budget(path: str, card) -> int:
    """The largest budget (in 0.25 MiB steps) at which the planner keeps some layers resident and offloads
    others: found with the planner itself, as the engine will call it (fp32 on the CPU)."""
    from vramwise.memory.budget import FP32, QuantScheme
    from vramwise.weights import open_weights

    cfg = open_weights(path, show_progress=False).config
    fp32 = QuantScheme(FP32, (), FP32, FP32)
    for quarter in range(60 * 4, 30 * 4, -1):
        try:
            p = plan(cfg, quarter * MiB // 4, card, fp32, max_model_len=128, max_num_seqs=4, kv_dtype="fp32",
                     expected_batch=4, alternatives=False)
        except BudgetTooSmallError:
            continue
        if 0 < p.num_resident < len(p.layers):
            return quarter * MiB // 4
    raise AssertionError("no budget between 30 and 60 MiB gives a partly offloaded plan")


@pytest.mark.parametrize("card, offloaded", [(STREAM_CARD, "streamed"), (CPU_CARD, "cpu")])
def test_budget_plans_the_placement_and_keeps_the_greedy_output(deep_path, reference, card, offloaded):
    limit = offloading_budget(deep_path, card)
    llm = engine_llm(deep_path, MemoryBudgetConfig(gpu_memory=limit, device_profile=card))
    eng = llm.engine
    p = eng.budget_setup.plan
    assert eng.offload is not None and eng.offload.placements == p.layers  # the plan's layout, executed
    assert "resident" in p.layers and offloaded in p.layers
    assert eng.block_manager.num_blocks == p.kv_num_blocks  # the KV pool is what the budget leaves
    assert eng.scheduler_config.max_num_batched_tokens == min(4096, p.max_num_batched_tokens)
    assert eng.planner_prediction["ttft_s"] > 0 and eng.planner_prediction["decode_tok_s_b1"] > 0
    assert outputs(llm) == reference
    assert not eng.has_unfinished_requests()  # the start-up warm-up left nothing behind


def test_forced_offload_under_a_budget_sizes_kv_for_that_placement(deep_path, reference):
    limit = offloading_budget(deep_path, STREAM_CARD)
    llm = engine_llm(deep_path, MemoryBudgetConfig(gpu_memory=limit, device_profile=STREAM_CARD),
                     offload="r,s,c,s,s,c,r")
    eng = llm.engine
    assert eng.offload.placements == ["resident", "streamed", "cpu", "streamed", "streamed", "cpu", "resident"]
    assert eng.budget_setup.forced and eng.block_manager.num_blocks == eng.budget_setup.plan.kv_num_blocks
    assert outputs(llm) == reference


def test_memory_report_terms_add_up(deep_path):
    limit = offloading_budget(deep_path, STREAM_CARD)
    eng = engine_llm(deep_path, MemoryBudgetConfig(gpu_memory=limit, device_profile=STREAM_CARD)).engine
    r = eng.memory_report()
    assert set(REPORT_TERMS) <= set(r) and r["graph_pool"] == 0  # no CUDA graphs on the CPU
    assert r["total_planned"] == sum(r[t] for t in REPORT_TERMS)
    assert r["budget"] == limit and r["nvml_measured"] is None  # no NVML on the CPU
    drv = eng.offload
    assert r["resident_weights"] == drv.bytes_resident and r["stream_buffers"] == drv.bytes_slots > 0
    cfg = eng.model_config
    gpu_layers = sum(p != "cpu" for p in drv.placements)
    per_block = 2 * eng.block_manager.block_size * cfg.num_key_value_heads * cfg.head_dim * 4  # K+V, fp32
    assert r["kv_pool"] == eng.block_manager.num_blocks * gpu_layers * per_block
    planned = r["planned"]
    # The plan's KV term is exactly what was allocated, plus the scratch block the runner adds for CUDA graphs
    # (planned for the card; a CPU run captures none).
    assert eng.runner.graphs is None and eng.budget_setup.plan.kv_scratch_blocks == 1
    assert planned["kv_pool"] == r["kv_pool"] + gpu_layers * per_block
    assert planned["total"] <= limit
    # the weights the engine placed on the "device" are within a few KiB of the planner's estimate
    assert abs(r["resident_weights"] - planned["resident_weights"]) < 64 * 1024


def test_measured_memory_above_the_budget_is_refused_with_every_term(deep_path):
    """What start-up does on CUDA when NVML's per-process peak is above the budget (the figure is set by
    hand here: the CPU has no NVML)."""
    from vramwise.memory.enforce import BudgetExceededError, budget_verdict

    limit = offloading_budget(deep_path, STREAM_CARD)
    eng = engine_llm(deep_path, MemoryBudgetConfig(gpu_memory=limit, device_profile=STREAM_CARD)).engine
    setup, report = eng.budget_setup, eng.memory_report()
    setup.nvml_peak, setup.nvml_per_process = limit - 1, True
    assert budget_verdict(setup, report) is None  # within the budget
    setup.nvml_peak = limit + 3 * MiB
    err = budget_verdict(setup, report)
    assert isinstance(err, BudgetExceededError) and isinstance(err, ValueError) and err.report is report
    msg = str(err)
    assert "NVML measured" in msg and "3.00 MiB over" in msg
    for term in REPORT_TERMS:
        assert term in msg
    assert budget_verdict(setup, report, check=False) is None  # check_nvml=False only warns
    setup.nvml_per_process = False  # a device-wide figure counts other processes: a warning, not a refusal
    assert budget_verdict(setup, report) is None


def test_utilization_is_a_fraction_of_the_card(deep_path):
    frac = 0.16  # of the fake card's 256 MiB: 40.96 MiB (the fixed terms alone take 38.4 MiB)
    eng = engine_llm(deep_path, MemoryBudgetConfig(gpu_memory_utilization=frac, device_profile=STREAM_CARD)).engine
    assert eng.budget_setup.limit == int(frac * 256 * MiB)
    assert eng.memory_report()["total_planned"] <= eng.budget_setup.limit


def test_too_small_budget_is_refused_before_loading(deep_path, monkeypatch):
    import vramwise.engine.llm_engine as le

    def no_load(*a, **k):
        raise AssertionError("the model was loaded although the budget cannot hold it")

    monkeypatch.setattr(le, "load_model", no_load)
    with pytest.raises(BudgetTooSmallError) as e:
        engine_llm(deep_path, MemoryBudgetConfig(gpu_memory=8 * MiB, device_profile=STREAM_CARD))
    msg = str(e.value)
    assert "GPU memory budget 8.00 MiB is too small" in msg
    assert "needs at least" in msg and "safety margin" in msg and "activations" in msg
    assert e.value.budget.total > 8 * MiB  # the numbers behind the message


def test_bad_budget_requests_name_the_problem(deep_path):
    with pytest.raises(ValueError, match="either --gpu-memory or --gpu-memory-utilization"):
        engine_llm(deep_path, MemoryBudgetConfig(gpu_memory=64 * MiB, gpu_memory_utilization=0.5,
                                                 device_profile=STREAM_CARD))
    with pytest.raises(ValueError, match="exceeds the GPU's 256.00 MiB"):
        engine_llm(deep_path, MemoryBudgetConfig(gpu_memory=1024 * MiB, device_profile=STREAM_CARD))
    with pytest.raises(BudgetTooSmallError, match=r"too small for the forced placement \(layers 0-6 streamed\)"):
        engine_llm(deep_path, MemoryBudgetConfig(gpu_memory=20 * MiB, device_profile=STREAM_CARD), offload="streamed")
    limit = offloading_budget(deep_path, STREAM_CARD)
    with pytest.raises(ValueError, match="--num-kv-blocks 100000 does not fit"):
        from vramwise.config import CacheConfig

        engine_llm(deep_path, MemoryBudgetConfig(gpu_memory=limit, device_profile=STREAM_CARD),
                   cache=CacheConfig(num_gpu_blocks=100000))


def test_cpu_weights_packed_is_planned_and_executed(deep_path):
    """--cpu-weights packed under a budget: the plan is costed with the packed caps (planner.driver_caps) and
    the driver keeps the CPU layers' int4 linears packed (CpuPackedLinear)."""
    from vramwise.quant.cpu_packed import CpuPackedLinear

    mem = MemoryBudgetConfig(gpu_memory=200 * MiB, device_profile=CPU_CARD)
    llm = engine_llm(deep_path, mem, offload="r,c,r,r,c,r,r", quantization="int4-g32", cpu_weights="packed")
    eng = llm.engine
    assert eng.budget_setup.cpu_weights == "packed" and eng.offload.cpu_weights == "packed"
    assert any("packed" in n for n in eng.budget_setup.plan.notes)
    layers = eng.model.model.layers
    assert isinstance(layers[4].mlp.down_proj, CpuPackedLinear) and not isinstance(layers[0].mlp.down_proj,
                                                                                   CpuPackedLinear)
    assert all(len(t) == SHORT.max_tokens for t in outputs(llm))
    # the benchmark's prediction uses the same caps as the plan: packed CPU layers read fewer bytes than the
    # fp32 ones the default caps assume, so the predicted decode is faster than with those
    from vramwise.memory.planner import predict_workload

    setup = eng.budget_setup
    fp32 = predict_workload(setup.model_config, setup.limit, setup.profile, setup.quant, setup.plan, 1, 16, 8,
                            cuda_graphs=setup.cuda_graphs)
    assert setup.predict(1, 16, 8)["decode_tok_s"] > fp32["decode_tok_s"]


def test_no_budget_on_cpu_behaves_as_before(deep_path, reference):
    llm = engine_llm(deep_path, MemoryBudgetConfig(gpu_memory=64 * MiB))  # no profile injected: CPU, no budget
    assert llm.engine.budget_setup is None and llm.engine.offload is None
    assert llm.engine.scheduler_config.max_num_batched_tokens == SCHED.max_num_batched_tokens
    assert outputs(llm) == reference
    assert llm.engine.memory_report()["budget"] is None


def test_auto_driver_options_pack_and_offload_only_when_planned_on_a_gpu():
    from vramwise.memory.offload import resolve_driver_options

    assert resolve_driver_options("auto", None, planned_on_gpu=True) == ("packed", True)
    assert resolve_driver_options("auto", None, planned_on_gpu=False) == ("fp32", False)
    assert resolve_driver_options("fp32", False, planned_on_gpu=True) == ("fp32", False)  # explicit flags win
    assert resolve_driver_options("bf16", True, planned_on_gpu=False) == ("bf16", True)


def test_engine_flags_reach_the_config():
    p = build_parser()
    args = p.parse_args(["generate", "hi", "--gpu-memory", "6GiB", "--device-profile", "rtx2060"])
    mem = make_engine_config(args).memory
    assert mem.gpu_memory == 6 << 30 and mem.gpu_memory_utilization is None and mem.device_profile == "rtx2060"
    args = p.parse_args(["chat", "--gpu-memory-utilization", "0.5"])
    assert make_engine_config(args).memory.gpu_memory_utilization == 0.5
    assert make_engine_config(args).cpu_weights == "auto"  # the default: packed under a budget on a GPU, else fp32
    args = p.parse_args(["generate", "hi", "--offload", "r,c", "--cpu-weights", "packed"])
    assert make_engine_config(args).cpu_weights == "packed"
    args = p.parse_args(["generate", "hi", "--offload", "r,c", "--prefill-offload", "--prefill-offload-min-tokens", "64"])
    assert (make_engine_config(args).prefill_offload, make_engine_config(args).prefill_offload_min_tokens) == (True, 64)
    assert make_engine_config(p.parse_args(["generate", "hi"])).prefill_offload is None  # auto
    assert make_engine_config(p.parse_args(["generate", "hi", "--no-prefill-offload"])).prefill_offload is False
    args = p.parse_args(["generate", "hi", "--gpu-memory", "1GiB", "--gpu-memory-utilization", "0.5"])
    with pytest.raises(ValueError, match="not both"):
        make_engine_config(args)


@pytest.mark.parametrize("bad", ["0", "1.5", "x"])
def test_bad_utilization_is_a_usage_error(bad, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["generate", "hi", "--gpu-memory-utilization", bad])
    assert e.value.code == 2 and "--gpu-memory-utilization" in capsys.readouterr().err


# ---- H100 --------------------------------------------------------------------------------------------------

#: Child process: NVML sampled in a background thread from before the engine exists (load included), then a
#: 512-token prefill with batch-1 decode and 32 sequences decoding together. Prints one JSON line.
_CHILD = textwrap.dedent("""
    import json, sys
    from vramwise.bench.gpu_memory import NvmlMonitor
    mon = NvmlMonitor(interval_s=0.002).start()
    from vramwise.config import EngineConfig, MemoryBudgetConfig, SchedulerConfig
    from vramwise.engine.llm_engine import LLMEngine
    from vramwise.sampling_params import SamplingParams
    budget = int(sys.argv[1])
    eng = LLMEngine(EngineConfig(model="random:llama-2-13b", device="cuda", quantization="int4",
                                 show_progress=False, scheduler=SchedulerConfig(max_num_seqs=32, max_model_len=2048),
                                 memory=MemoryBudgetConfig(gpu_memory=budget)))
    peaks = {"load": mon.peak}
    def run(prompts, max_tokens):
        p = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        for i, ids in enumerate(prompts):
            eng.add_request(f"r{len(peaks)}-{i}", ids, p)
        done = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    done[o.request_id] = len(o.outputs[0].token_ids)
        return done
    out1 = run([[(7 * j) % 31000 + 3 for j in range(512)]], 16)  # prefill 512, then batch-1 decode
    peaks["prefill_512_decode_b1"] = mon.peak
    out32 = run([[(11 * i + j) % 31000 + 3 for j in range(64)] for i in range(32)], 16)  # batch-32 decode
    peaks["decode_b32"] = mon.peak
    mon.stop()
    rep = eng.memory_report()
    print(json.dumps({"peak": mon.peak, "peaks": peaks, "per_process": mon.per_process, "available": mon.available,
                      "placement": eng.placement_name, "tokens": [sorted(out1.values()), sorted(out32.values())],
                      "report": {k: v for k, v in rep.items() if k != "planned"}}))
""")


@pytest.mark.gpu
def test_13b_int4_stays_within_6gib_on_the_gpu():
    budget = 6 << 30
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(budget)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(res, indent=1))
    if not res["available"]:
        pytest.skip("NVML is not available: cannot measure the process's GPU memory")
    assert res["tokens"] == [[16], [16] * 32]
    assert res["placement"] != "all-resident"  # 13B int4 (~6.9 GB) cannot all be resident in 6 GiB
    for phase, peak in res["peaks"].items():
        assert peak <= budget, f"{phase}: NVML peak {peak / MiB:.0f} MiB > {budget / MiB:.0f} MiB"
    rep = res["report"]
    assert rep["total_planned"] <= budget and rep["nvml_measured"] <= budget


@pytest.mark.gpu
def test_budget_below_the_cuda_context_is_refused_before_loading(monkeypatch):
    import vramwise.engine.llm_engine as le

    monkeypatch.setattr(le, "load_model", lambda *a, **k: pytest.fail("loaded despite a hopeless budget"))
    with pytest.raises(BudgetTooSmallError, match=r"GPU memory budget 256\.00 MiB is too small") as e:
        le.LLMEngine(EngineConfig(model="random:llama-2-13b", device="cuda", quantization="int4",
                                  show_progress=False, memory=MemoryBudgetConfig(gpu_memory=256 * MiB)))
    assert "CUDA context" in str(e.value) and e.value.budget.cuda_context > 0


def test_context_allowance_env_is_read_and_checked(monkeypatch):
    from vramwise.memory.enforce import MODULE_LOADING_ALLOWANCE, module_loading_allowance

    monkeypatch.delenv("VRAMWISE_CONTEXT_ALLOWANCE", raising=False)
    assert module_loading_allowance() == MODULE_LOADING_ALLOWANCE
    monkeypatch.setenv("VRAMWISE_CONTEXT_ALLOWANCE", "256MiB")
    assert module_loading_allowance() == 256 << 20
    monkeypatch.setenv("VRAMWISE_CONTEXT_ALLOWANCE", "lots")
    with pytest.raises(ValueError, match="VRAMWISE_CONTEXT_ALLOWANCE"):
        module_loading_allowance()


def test_prefill_offload_is_planned_executed_and_counted(deep_path, reference):
    """--prefill-offload under a budget: the plan's threshold reaches the driver, the CPU layers run on the
    "device" for the prefill (same greedy output), and the twins' one layer of device KV pages is in both the
    plan's KV term and the engine's report (the ring lends the twins their weight slot)."""
    mem = MemoryBudgetConfig(gpu_memory=200 * MiB, device_profile=STREAM_CARD)
    llm = engine_llm(deep_path, mem, offload="r,s,c,s,s,c,r", prefill_offload=True)
    eng = llm.engine
    threshold = eng.budget_setup.plan.prefill_offload_min_tokens
    assert eng.budget_setup.prefill_offload and threshold is not None
    assert eng.offload.prefill_offload_min_tokens == threshold and len(eng.offload._twins) == 2
    assert outputs(llm) == reference
    assert eng.offload.stats.offloaded_layers > 0
    r = eng.memory_report()
    cfg = eng.model_config
    per_block = 2 * eng.block_manager.block_size * cfg.num_key_value_heads * cfg.head_dim * 4  # K+V, fp32
    blocks = eng.block_manager.num_blocks
    assert r["kv_pool"] == blocks * (5 + 1) * per_block  # 5 GPU-side layers + the twins' pages
    assert eng.offload.bytes_kv_scratch == blocks * per_block  # allocated by the prefill, as reported
    assert r["stream_buffers"] == eng.offload.bytes_slots
    planned = r["planned"]
    assert planned["kv_pool"] == r["kv_pool"] + (5 + 1) * per_block  # + the graphs' scratch block, planned
    assert r["total_planned"] <= mem.gpu_memory
    with pytest.raises(ValueError, match="prefill offload is off"):
        engine_llm(deep_path, offload="r,s,c,s,s,c,r", prefill_offload_min_tokens=8)
