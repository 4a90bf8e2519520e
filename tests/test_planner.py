"""Budget arithmetic, the cost model's schedule, the planner's choices and `vramwise plan` (all torch-free
arithmetic: every plan here takes milliseconds)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from vramwise.memory.budget import (
    FP16,
    GiB,
    MiB,
    Budget,
    BudgetTooSmallError,
    QuantScheme,
    WeightFormat,
    activation_bytes,
    cuda_graph_bytes,
    cuda_graph_capture_sizes,
    kv_bytes_per_token,
    kv_bytes_per_token_layer,
    kv_pool_bytes,
    model_weights,
    resolve_quant,
    rotary_table_bytes,
)
from vramwise.memory.costmodel import (
    CPU_GENERIC,
    H100,
    RTX2060,
    DeviceProfile,
    Op,
    profile_from_doctor,
    simulate,
)
from vramwise.memory.planner import (
    CPU,
    DRIVER_NEXT,
    DRIVER_TODAY,
    RESIDENT,
    STREAMED,
    DriverCaps,
    describe_placement,
    driver_caps,
    plan,
    plan_matrix,
)
from vramwise.models.shapes import shape_config

W4 = WeightFormat.for_bits(4)  # int4, group 128
L13 = shape_config("llama-2-13b")
L7 = shape_config("llama-2-7b")


# ------------------------------------------------------------------------------------------------ budget


def test_kv_bytes_llama2_13b_by_hand():
    # 2 (K, V) x 40 layers x 40 kv heads x 128 head_dim x 2 bytes = 819,200 B = 0.8 MiB per token
    assert kv_bytes_per_token(L13, "fp16") == 2 * 40 * 40 * 128 * 2 == 819_200
    assert kv_bytes_per_token_layer(L13, "fp16") == 20_480
    # int8: 1 byte per element + one fp16 scale per (token, kv head) for K and for V
    assert kv_bytes_per_token_layer(L13, "int8") == 2 * 40 * (128 + 2) == 10_400
    assert kv_bytes_per_token(L13, "int8") < kv_bytes_per_token(L13, "fp16") * 0.51
    # GQA: Llama-3-8B has 8 kv heads of 128
    assert kv_bytes_per_token(shape_config("llama-3-8b")) == 2 * 32 * 8 * 128 * 2
    # the pool rounds up to whole blocks of 16 tokens
    assert kv_pool_bytes(L13, 17, num_layers=40) == 32 * 819_200


def test_int4_g128_bytes_of_a_13b_mlp_projection():
    # down_proj (out 5120, in 13824): 4-bit codes + fp16 scale and min per 128 inputs
    codes = 5120 * 13824 // 2  # 35,389,440
    groups = (13824 // 128) * 5120 * 2 * 2  # 108 groups x 5120 outputs x (scale + min) x 2 bytes = 2,211,840
    assert W4.bytes_for(5120, 13824) == codes + groups == 37_601_280
    assert W4.bits_per_weight(13824) == pytest.approx(4 + 32 / 128)
    assert WeightFormat.for_bits(8).bytes_for(5120, 13824) == 5120 * 13824 + 5120 * 2  # per-channel scale
    assert FP16.bytes_for(5120, 13824) == 2 * 5120 * 13824


def test_weight_format_matches_quantspec_layouts():
    from vramwise.quant.formats import QuantSpec  # torch; the planner itself never imports it

    for spec in (QuantSpec.int4(128), QuantSpec.int4(32, symmetric=True), QuantSpec.int8(), QuantSpec.int8(32)):
        for n, k in ((5120, 13824), (13824, 5120), (4096, 4096)):
            assert WeightFormat.from_spec(spec).bytes_for(n, k) == spec.weight_bytes(n, k)
    assert WeightFormat.from_spec(QuantSpec.int4(64)).name == QuantSpec.int4(64).name == "w4g64"


def test_13b_int4_total_is_designs_6_9_gb():
    w = model_weights(L13, QuantScheme(linear=W4, lm_head=W4))
    per_layer = 317_194_240 * 4.25 / 8 + 2 * 5120 * 2  # linears at 4.25 bits + two fp16 norm vectors
    assert w.layer_bytes[0] == per_layer
    total = w.total_layer_bytes + w.lm_head_bytes
    assert total == pytest.approx(6.9e9, rel=0.02)
    # fp16 embeddings and lm_head by default (the loader quantizes decoder-layer linears only)
    assert model_weights(L13, W4).lm_head_bytes == 32000 * 5120 * 2 + 5120 * 2


def test_resolve_quant_per_module_mapping():
    w8 = WeightFormat.for_bits(8)
    scheme = resolve_quant({"model.layers.0.mlp.down_proj": w8, "self_attn.q_proj": W4, "lm_head": w8})
    assert scheme.for_module("model.layers.0.mlp.down_proj") == w8
    assert scheme.for_module("model.layers.1.mlp.down_proj") == FP16
    assert scheme.for_module("model.layers.7.self_attn.q_proj") == W4
    assert scheme.lm_head == w8
    mixed = model_weights(L13, scheme)
    assert mixed.layer_bytes[0] != mixed.layer_bytes[1]
    assert resolve_quant(4).linear == W4 and resolve_quant(None).linear == FP16


def test_activation_bytes_by_hand():
    h, i, v = 5120, 13824, 32000
    assert activation_bytes(L13, 512, 8) == 512 * 2 * (3 * h + 3 * i) + 8 * v * 18


# ------------------------------------------------------------------------------------------------ cost model


def test_schedule_streamed_overlaps_with_two_buffers_not_one():
    ops = [Op(f"l{i}", "gpu", run_s=1.0, copy_s=2.0) for i in range(4)]
    # two slots: copies back to back, each layer runs while the next copies: copy-bound, 4 x 2 per step
    assert simulate([ops] * 3, 2)[-1] == pytest.approx(8.0)
    # one slot: a copy waits for the previous layer to finish: copy + run per layer
    assert simulate([ops] * 3, 1)[-1] == pytest.approx(12.0)
    with pytest.raises(ValueError):
        simulate([ops], 0)


def test_schedule_mixed_overlaps_copies_with_cpu_compute():
    streamed_only = [Op(f"s{i}", "gpu", 0.1, copy_s=3.0) for i in range(4)]
    mixed = []
    for i in range(2):
        mixed += [Op(f"s{i}", "gpu", 0.1, copy_s=3.0), Op(f"c{i}", "cpu", 3.0)]
    t_streamed = simulate([streamed_only] * 3, 2)[-1]
    t_mixed = simulate([mixed] * 3, 2)[-1]
    assert t_streamed == pytest.approx(12.0, rel=0.01)  # 4 copies of 3
    assert t_mixed < 0.6 * t_streamed  # each copy hides behind the neighbour's CPU work


def test_profile_from_doctor_report():
    report = {"time": "2026-11-25T00:00:00Z",
              "gpu": {"name": "NVIDIA H100 80GB HBM3", "total_memory": 80 * GiB, "hbm_bandwidth": 3.0e12,
                      "h2d_pinned_bandwidth": 50e9, "cuda_context_bytes": 520 * MiB, "num_sms": 132},
              "cpu": {"cpu_bandwidth": 40e9, "cpu_float_flops": 1.5e12}}
    p = profile_from_doctor(report)
    assert p.has_gpu and p.name.startswith("doctor:")
    assert p.h2d_pinned_bandwidth == 50e9 and p.cuda_context_bytes == 520 * MiB and p.cpu_bandwidth == 40e9
    assert p.cpu_quant_flops == pytest.approx(0.3 * 1.5e12)
    assert p.h2d_pageable_bandwidth == H100.h2d_pageable_bandwidth  # not measured: the base's
    cpu_only = profile_from_doctor({"gpu": None, "cpu": {"cpu_bandwidth": 9e9}})
    assert not cpu_only.has_gpu and cpu_only.cpu_bandwidth == 9e9
    assert DeviceProfile.from_dict(H100.to_dict()) == H100
    # torch's packed int4 kernel measured by doctor (bandwidth.measure_cpu_packed): its own read rate and flops
    packed = profile_from_doctor({"gpu": None, "cpu": {"cpu_bandwidth": 100e9, "cpu_packed_bandwidth": 30e9,
                                                       "cpu_quant_flops": 0.5e12, "cpu_float_flops": 1e12}})
    assert packed.cpu_packed_bandwidth == 30e9 and packed.cpu_quant_flops == 0.5e12


def test_packed_cpu_layers_read_at_the_packed_kernels_rate():
    # One token through a packed CPU layer is bound by the packed kernel's read rate, not the fp32 GEMV's;
    # float layers keep cpu_bandwidth; 0 (unmeasured) falls back to cpu_bandwidth.
    from vramwise.memory.costmodel import cpu_time

    wb, flops = 170e6, 2 * 317e6
    slow = H100.with_overrides(cpu_bandwidth=120e9, cpu_packed_bandwidth=40e9)
    assert cpu_time(slow, wb, flops, quantized=True, overheads=False) == pytest.approx(wb / 40e9)
    assert cpu_time(slow, wb, flops, quantized=False, overheads=False) == pytest.approx(wb / 120e9)
    # DRAM contention: packed CPU layers ask the packed kernel's rate of the host memory, not the fp32 GEMV's
    from vramwise.memory.costmodel import dram_shares

    host = slow.with_overrides(h2d_pinned_bandwidth=50e9, host_memory_bandwidth=80e9)
    assert dram_shares(host, True, True) == pytest.approx((80 / 170, 80 / 170))
    assert dram_shares(host, True, True, packed=True) == pytest.approx((80 / 90, 80 / 90))
    unmeasured = slow.with_overrides(cpu_packed_bandwidth=0.0)
    assert cpu_time(unmeasured, wb, flops, quantized=True, overheads=False) == pytest.approx(
        max(wb / 120e9, flops / H100.cpu_quant_flops))  # here the flops bound, 2.1 ms, above 1.4 ms of reading


# ------------------------------------------------------------------------------------------------ planner


def _check_budget(p):
    b = p.budget
    assert b.total == sum(getattr(b, t) for t in Budget.TERMS)
    assert b.total <= b.limit
    gpu_layers = p.num_resident + p.num_streamed
    assert p.kv_scratch_blocks == (1 if p.cuda_graph_sizes else 0)  # the decode graphs' padding block
    blocks = p.kv_num_blocks + p.kv_scratch_blocks
    assert b.kv_pool == blocks * 16 * kv_bytes_per_token_layer(L13 if len(p.layers) == 40 else L7,
                                                               p.kv_dtype) * gpu_layers
    assert p.kv_capacity_tokens >= p.max_model_len


def test_all_resident_when_it_fits():
    p = plan(L7, 16 * GiB, H100, W4, alternatives=False)
    assert p.policy == "resident" and p.layers == [RESIDENT] * 32 and p.lm_head == RESIDENT
    assert p.embeddings == "gpu" and p.num_stream_buffers == 0 and p.alternatives == []
    assert p.resident_share == 1.0
    _check_budget(p)
    # all-resident decode is HBM-bound: about the weights / 2979 GB/s (+ launch overheads)
    roof = p.prediction.roofline_step_s_b1
    assert 0.9 * (model_weights(L7, W4).total_layer_bytes / H100.hbm_bandwidth) < roof < 2 * (
        model_weights(L7, W4).total_bytes / H100.hbm_bandwidth)


def test_13b_in_6gib_offloads_and_predicts():
    p = plan(L13, 6 * GiB, H100, W4, model_name="llama-2-13b")
    assert p.policy in ("streamed", "cpu", "mixed")
    assert 0 < p.num_resident < 40 and p.num_streamed + p.num_cpu == 40 - p.num_resident
    _check_budget(p)
    pred = p.prediction
    assert 0 < pred.ttft_s < 1.0 and 1 < pred.decode_tok_s_b1 < 200
    assert pred.roofline_step_s_b1 <= pred.decode_step_s_b1
    assert {c.policy for c in p.considered} == {"resident", "streamed", "cpu", "mixed"}
    assert not next(c for c in p.considered if c.policy == "resident").fits
    assert any(a.cli == "--kv-cache-dtype int8" and a.fits for a in p.alternatives)
    assert json.loads(json.dumps(p.to_dict()))["layers"] == p.layers  # JSON-ready for the driver


@pytest.mark.parametrize("policy,off", [("streamed", STREAMED), ("cpu", CPU)])
def test_forced_policies(policy, off):
    p = plan(L13, 6 * GiB, H100, W4, force_policy=policy, alternatives=False)
    assert p.policy == policy
    assert set(p.layers) == {RESIDENT, off}
    if off == CPU:
        assert p.layers[: p.num_resident] == [RESIDENT] * p.num_resident  # resident first, CPU tail
    else:  # resident layers spread among the streamed ones, the step starting on a streamed layer
        assert p.layers[0] == STREAMED and p.layers[-1] == STREAMED
        runs = "".join("R" if x == RESIDENT else "s" for x in p.layers).split("R")
        assert max(map(len, runs)) - min(map(len, runs[1:-1])) <= 1  # evenly spread
    _check_budget(p)


def test_mixed_wins_at_batch_1_streaming_wins_at_batch_16():
    # with a packed CPU kernel, copies of streamed layers hide behind the CPU work of their neighbours
    kw = dict(max_model_len=384, prompt_len=256, gen_len=128, alternatives=False)
    b1 = {pol: plan(L13, 6 * GiB, H100, W4, force_policy=pol, driver=DRIVER_NEXT, **kw).prediction.decode_tok_s_b1
          for pol in ("streamed", "cpu", "mixed")}
    assert b1["mixed"] > b1["streamed"] and b1["mixed"] > b1["cpu"]
    assert plan(L13, 6 * GiB, H100, W4, driver=DRIVER_NEXT, **kw).policy == "mixed"
    # at 16 sequences a streamed weight serves 16 tokens per copy, while CPU flops grow 16x
    b16 = {pol: plan(L13, 6 * GiB, H100, W4, force_policy=pol, expected_batch=16, kv_dtype="int8", **kw)
           for pol in ("streamed", "cpu")}
    assert b16["streamed"].prediction.batch == 16
    assert b16["streamed"].prediction.decode_tok_s > b16["cpu"].prediction.decode_tok_s
    auto = plan(L13, 6 * GiB, H100, W4, expected_batch=16, kv_dtype="int8", **kw)
    assert auto.prediction.batch == 16 and auto.policy == "streamed"
    assert auto.kv_capacity_tokens >= 16 * 384


def test_reference_request_fits_the_context():
    # The engine plans with the default 512 + 128 reference request; with --max-model-len 384 no sequence is
    # that long, so the pool must be sized for 16 sequences of 384 tokens, not 8 of 640.
    p = plan(L13, 6 * GiB, H100, W4, max_model_len=384, expected_batch=16, max_num_seqs=16, kv_dtype="int8",
             alternatives=False)
    pred = p.prediction
    assert (pred.prompt_len, pred.gen_len) == (256, 128)
    assert pred.batch == 16 and p.kv_capacity_tokens >= 16 * 384
    long_ctx = plan(L13, 6 * GiB, H100, W4, max_model_len=4096, alternatives=False).prediction
    assert (long_ctx.prompt_len, long_ctx.gen_len) == (512, 128)  # unchanged where it fits


def test_todays_driver_computes_cpu_layers_in_fp32():
    today = plan(L13, 6 * GiB, H100, W4, force_policy="cpu", alternatives=False)
    nxt = plan(L13, 6 * GiB, H100, W4, force_policy="cpu", driver=DRIVER_NEXT, alternatives=False)
    fp32_layer = 4 * 317_194_240 + 2 * 5120 * 4
    embeddings = 32000 * 5120 * 2  # fp16 table, on the CPU
    assert today.host_weight_bytes == today.num_cpu * fp32_layer + embeddings  # dequantized: 4 bytes/weight
    assert today.prediction.decode_tok_s_b1 < nxt.prediction.decode_tok_s_b1
    assert today.prefill_offload_min_tokens is None and today.lm_head == RESIDENT
    auto = plan(L13, 6 * GiB, H100, W4)
    assert auto.policy == "streamed"  # fp32 CPU layers lose to streaming
    assert any(a.args.get("driver") == DRIVER_NEXT.name and a.fits and
               a.decode_tok_s_b1 > auto.prediction.decode_tok_s_b1 for a in auto.alternatives)
    with pytest.raises(ValueError):
        DriverCaps(cpu_weights="int2")


def test_driver_caps_for_cpu_weights_match_what_the_driver_runs():
    """--cpu-weights packed: CPU layers hold the packed int4 bytes (with fp32 KV: only the linears are packed),
    predicted faster than fp32 ones; plans with fp32 CPU layers list it as a runnable alternative."""
    assert driver_caps("fp32") is DRIVER_TODAY and driver_caps("bf16").cpu_kv_bytes == 2
    packed = driver_caps("packed")
    assert (packed.cpu_weights, packed.cpu_kv_bytes, packed.prefill_offload, packed.lm_head_offload) == (
        "packed", 4, False, False)
    today = plan(L13, 6 * GiB, H100, W4, force_policy="cpu", alternatives=False)
    p = plan(L13, 6 * GiB, H100, W4, force_policy="cpu", driver=packed, alternatives=False)
    w = model_weights(L13, W4)
    embeddings = 32000 * 5120 * 2
    assert p.host_weight_bytes == sum(w.layer_bytes[i] for i, x in enumerate(p.layers) if x == CPU) + embeddings
    assert p.host_weight_bytes < today.host_weight_bytes / 4
    assert p.prediction.decode_tok_s_b1 > today.prediction.decode_tok_s_b1
    assert any("packed" in n for n in p.notes)
    cpu = plan(L13, 6 * GiB, H100, W4, force_policy="cpu")  # (auto picks streaming: prefill on the CPU is slow)
    assert any(a.cli == "--cpu-weights packed" and a.args.get("driver") == packed.name and a.fits and
               a.decode_tok_s_b1 > cpu.prediction.decode_tok_s_b1 for a in cpu.alternatives)
    with pytest.raises(ValueError, match="unknown CPU weight format 'int3'"):
        driver_caps("int3")


def test_int8_kv_or_shorter_context_means_more_resident_layers():
    base = plan(L13, 6 * GiB, H100, W4, force_policy="streamed", alternatives=False)
    int8 = plan(L13, 6 * GiB, H100, W4, force_policy="streamed", kv_dtype="int8", alternatives=False)
    short = plan(L13, 6 * GiB, H100, W4, force_policy="streamed", max_model_len=1024, alternatives=False)
    assert int8.num_resident > base.num_resident and short.num_resident > base.num_resident
    assert int8.prediction.decode_tok_s_b1 > base.prediction.decode_tok_s_b1
    auto, auto8 = (plan(L13, 6 * GiB, H100, W4, kv_dtype=kv, alternatives=False) for kv in ("fp16", "int8"))
    assert auto8.resident_share > auto.resident_share


@pytest.mark.parametrize("driver", [DRIVER_TODAY, DRIVER_NEXT], ids=["today", "next"])
def test_decode_speed_falls_monotonically_as_the_budget_shrinks(driver):
    speeds = []
    for mib in range(12 * 1024, 2 * 1024, -512):
        p = plan(L13, mib * MiB, H100, W4, driver=driver, alternatives=False)
        speeds.append((mib, p.prediction.decode_tok_s_b1, p.prediction.workload_tok_s))
    for (m1, d1, w1), (m2, d2, w2) in zip(speeds, speeds[1:]):
        assert d2 <= d1 * (1 + 1e-9), f"{m2} MiB decodes faster than {m1} MiB"
        assert w2 <= w1 * (1 + 1e-9)
    assert speeds[0][1] > 5 * speeds[-1][1]


def test_planned_graph_ladder_is_the_captured_one():
    """The plan counts one graph per rung the engine captures (earlier: 1, 2, 4, 8, 16, 24, 32 planned against
    1, 2, 4, 8, 16, 32 captured, and a planned ladder capped at 256 while the engine captured past it)."""
    from vramwise.engine.cuda_graphs import graph_ladder
    for n in (1, 2, 3, 16, 24, 32, 300):
        assert cuda_graph_capture_sizes(n) == graph_ladder(n)
    assert cuda_graph_capture_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert cuda_graph_capture_sizes(300)[-2:] == [256, 300]
    with pytest.raises(ValueError, match="max_num_seqs"):
        cuda_graph_capture_sizes(0)


def test_cuda_graph_term_rounds_to_segments_and_counts_staged_embeddings():
    sizes = cuda_graph_capture_sizes(32)  # 1, 2, 4, 8, 16, 32
    on_gpu = cuda_graph_bytes(L13, sizes)
    on_host = cuda_graph_bytes(L13, sizes, embeddings_on_host=True)
    graphs = len(sizes) * MiB  # each graph's exec state
    assert (on_gpu - graphs) % (2 * MiB) == 0 and (on_host - graphs) % (2 * MiB) == 0  # allocator segments
    assert on_gpu - graphs >= activation_bytes(L13, 32, 32)
    assert on_host - graphs >= activation_bytes(L13, 32, 32) + 32 * L13.hidden_size * 2  # (32, hidden) fp16 rows
    assert on_host >= on_gpu
    # A batch whose staged rows cross a segment boundary costs one more segment with the table on the host.
    assert cuda_graph_bytes(L13, [256], embeddings_on_host=True) == cuda_graph_bytes(L13, [256]) + 2 * MiB
    assert cuda_graph_bytes(L13, []) == 0
    # Measured on an H200 (13B int4, 6 GiB, 32 sequences, embeddings on the host): a 26 MiB pool.
    assert on_host >= 26 * MiB


def test_13b_6gib_plan_counts_what_the_engine_allocates():
    """test_13b_int4_stays_within_6gib_on_the_gpu on an H200 (CUDA context measured 676 MiB + the 768 MiB
    allowance, 32 sequences): memory_report summed 1.4 MB over the budget. The runner allocates one KV block
    past the plan's for the decode graphs' padding rows (12.5 MiB here) and the rotary table (2 MiB) sits with
    the resident weights; the plan counted neither. Now its terms are what the report measured there."""
    profile = H100.with_overrides(cuda_context_bytes=1444 * MiB)
    p = plan(L13, 6 * GiB, profile, W4, max_model_len=2048, max_num_seqs=32, expected_batch=32, kv_dtype="fp16",
             alternatives=False)
    b = p.budget
    _check_budget(p)
    assert p.kv_scratch_blocks == 1
    block = 16 * kv_bytes_per_token_layer(L13, "fp16") * (p.num_resident + p.num_streamed)
    assert b.kv_pool == (p.kv_num_blocks + 1) * block  # what ModelRunner allocates with graphs
    # The H200 run's placement, and its report's terms for it (driver.bytes_resident, bytes_slots, the pool).
    assert (p.num_resident, p.num_streamed, p.num_stream_buffers, p.embeddings) == (10, 30, 2, "cpu")
    assert rotary_table_bytes(L13) == 2 * MiB
    assert b.resident_weights == 2_015_086_592 and b.stream_buffers == 337_059_840
    assert b.cuda_graphs >= 27_262_976  # the measured graph pool
    assert b.cuda_graphs == cuda_graph_bytes(L13, p.cuda_graph_sizes, embeddings_on_host=True)
    assert b.total <= 6 * GiB


def test_budget_too_small_error_lists_the_numbers():
    with pytest.raises(BudgetTooSmallError) as e:
        plan(L13, 256 * MiB, H100, W4)
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert "256.00 MiB" in msg and "CUDA context 500.00 MiB" in msg and "fixed terms" in msg
    assert e.value.budget is not None and e.value.budget.total > 256 * MiB
    with pytest.raises(BudgetTooSmallError) as e:
        plan(L13, 6 * GiB, H100, W4, force_policy="resident")
    msg = str(e.value)
    assert "'resident'" in msg and "resident weights 6.59 GiB" in msg and "6.00 GiB" in msg  # + rotary table


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="exceeds the model's context"):
        plan(L13, 6 * GiB, H100, W4, max_model_len=8192)
    with pytest.raises(ValueError, match="unknown policy"):
        plan(L13, 6 * GiB, H100, W4, force_policy="magic")
    with pytest.raises(ValueError, match="KV cache dtype"):
        plan(L13, 6 * GiB, H100, W4, kv_dtype="int3")
    with pytest.raises(ValueError, match="exceeds"):
        plan(L13, 100 * GiB, RTX2060, W4)


def test_cpu_only_device_runs_everything_on_the_cpu():
    p = plan(L7, 0, CPU_GENERIC, W4)
    assert p.policy == "cpu" and set(p.layers) == {CPU} and p.budget.total == 0
    assert p.weights == "fp32"  # the CPU path dequantizes at load
    assert p.prediction.decode_tok_s_b1 > 0


def test_rtx2060_profile_plans_13b():
    p = plan(L13, 6 * GiB, RTX2060, W4, alternatives=False)
    assert p.policy != "resident" and p.budget.total <= 6 * GiB
    assert p.prediction.decode_tok_s_b1 < plan(L13, 6 * GiB, H100, W4, alternatives=False).prediction.decode_tok_s_b1


def test_describe_placement_is_compact():
    assert describe_placement([RESIDENT] * 28 + [STREAMED] * 12) == "layers 0-27 resident, 28-39 streamed"
    text = describe_placement([RESIDENT] * 20 + [STREAMED, CPU] * 10)
    assert text.startswith("layers 0-19 resident, 20-39 interleaved: 10 streamed (20, 22, 24, ...)")
    spread = describe_placement([STREAMED, RESIDENT] * 20)
    assert spread == "layers 0-39 interleaved: 20 resident (1, 3, 5, ...), 20 streamed (0, 2, 4, ...)"


def test_matrix_covers_the_five_shapes():
    rows = plan_matrix(6 * GiB, H100)
    assert {r.shape for r in rows} == {"llama-2-7b", "llama-3-8b", "llama-2-13b", "codellama-34b", "llama-2-70b"}
    by = {(r.shape, r.bits): r for r in rows}
    assert by[("llama-2-7b", 4)].policy == "resident" and by[("llama-2-70b", 4)].resident_share < 0.2
    assert by[("llama-2-13b", 4)].decode_tok_s_b1 > by[("llama-2-13b", 8)].decode_tok_s_b1


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def no_doctor_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def test_cli_plan_13b_in_6gib(no_doctor_cache, capsys):
    from vramwise.cli import main

    out_json = no_doctor_cache / "plan.json"
    assert main(["plan", "--random-weights", "llama-2-13b", "--gpu-memory", "6GiB", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    for term in ("CUDA context", "resident weights", "streaming buffers", "KV pool", "activations", "workspace",
                 "CUDA graphs", "safety margin"):
        assert term in out
    assert "placement     mixed: layers 0-" in out and "KV cache" in out  # auto driver: packed + prefill offload and "TTFT, 512-token prompt" in out and "decode, batch 1" in out
    assert "alternatives:" in out and "built-in h100 profile" in out
    data = json.loads(out_json.read_text())
    assert len(data["layers"]) == 40 and data["budget"]["total"] <= 6 * GiB


def test_cli_plan_matrix(no_doctor_cache, capsys):
    from vramwise.cli import main

    assert main(["plan", "--gpu-memory", "6GiB", "--device-profile", "h100"]) == 0
    out = capsys.readouterr().out
    for shape in ("llama-2-7b", "llama-3-8b", "llama-2-13b", "codellama-34b", "llama-2-70b"):
        assert shape in out


def test_cli_plan_utilization_and_profiles(no_doctor_cache, capsys):
    from vramwise.cli import main

    assert main(["plan", "--random-weights", "llama-2-7b", "--gpu-memory-utilization", "0.1",
                 "--device-profile", "h100", "--kv-cache-dtype", "int8", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "7.96 GiB" in out  # 0.1 x 81559 MiB
    assert main(["plan", "--random-weights", "llama-2-7b", "--device-profile", "cpu"]) == 0
    assert "no GPU" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["plan", "--random-weights", "llama-2-13b", "--gpu-memory", "256MiB"], "CUDA context 500.00 MiB"),
    (["plan", "--random-weights", "llama-9b", "--gpu-memory", "6GiB"], "unknown model shape"),
    (["plan", "--random-weights", "llama-2-13b", "--gpu-memory", "6GiB", "--group-size", "100"], "--group-size 100"),
    (["plan", "--random-weights", "llama-2-13b", "--gpu-memory", "6GiB", "--gpu-memory-utilization", "0.5"],
     "not both"),
    (["plan", "--random-weights", "llama-2-13b", "--gpu-memory", "6GiB", "--device-profile", "tpu"],
     "unknown device profile"),
])
def test_cli_plan_bad_input_exits_2(no_doctor_cache, capsys, argv, needle):
    from vramwise.cli import main

    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_cli_plan_unparseable_size_exits_2(no_doctor_cache, capsys):
    from vramwise.cli import main

    with pytest.raises(SystemExit) as e:
        main(["plan", "--random-weights", "llama-2-13b", "--gpu-memory", "6Gx"])
    assert e.value.code == 2
    assert "cannot parse size" in capsys.readouterr().err


def test_cli_plan_uses_doctor_cache(no_doctor_cache, capsys):
    from vramwise.cli import main
    from vramwise.memory.bandwidth import REPORT_VERSION, save_report

    save_report({"version": REPORT_VERSION, "time": "t", "gpu": {"name": "NVIDIA H100 80GB HBM3",
                 "total_memory": 80 * GiB, "h2d_pinned_bandwidth": 25e9}, "cpu": {"cpu_bandwidth": 30e9}})
    assert main(["plan", "--random-weights", "llama-2-13b", "--gpu-memory", "6GiB"]) == 0
    out = capsys.readouterr().out
    assert "doctor:nvidia-h100-80gb-hbm3" in out and "pinned H2D 25.0 GB/s" in out


def test_cli_plan_reads_a_checkpoints_own_quantization(no_doctor_cache, capsys):
    from vramwise.cli import main
    from vramwise.weights import bundled_model_path

    assert main(["plan", str(bundled_model_path()), "--gpu-memory", "1GiB", "--device-profile", "h100"]) == 0
    out = capsys.readouterr().out
    assert "SmolLM2" in out and "(w4g32, 30 layers)" in out and "resident" in out  # GGUF Q4_1 -> int4 g32


def test_checkpoint_quant_gptq_config():
    from types import SimpleNamespace

    from vramwise.memory.cli import checkpoint_quant

    src = SimpleNamespace(hf_config={"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}})
    scheme, desc = checkpoint_quant(src)
    assert scheme.linear == W4 and "GPTQ" in desc
    assert checkpoint_quant(SimpleNamespace(hf_config={})) is None


def test_long_prefill_of_quantized_layers_pays_the_dequantize_pass():
    # From DEQUANT_MIN_TOKENS rows on, a quantized layer is dequantized into an fp16 workspace for cuBLAS: the
    # prefill prediction of an all-resident int4 13B (the weights in HBM, so flops and this pass are all there
    # is) grows by about (packed bytes + 2 bytes a weight) / HBM per layer over the fp16 model's, whose layers
    # read 2 bytes a weight and have the same flops.
    from vramwise.memory.budget import DEQUANT_MIN_TOKENS
    from vramwise.memory.costmodel import prefill_dequant_time

    kw = dict(max_model_len=1024, max_num_seqs=1, prompt_len=512, gen_len=16, force_policy="resident",
              alternatives=False, max_num_batched_tokens=512)
    q4 = plan(L13, 70 * GiB, H100, W4, **kw)
    fp = plan(L13, 70 * GiB, H100, FP16, **kw)
    w = model_weights(L13, W4)
    extra = sum(prefill_dequant_time(H100, wb, p, overheads=False) for wb, p in zip(w.layer_bytes, w.layer_params))
    assert 512 >= DEQUANT_MIN_TOKENS and extra > 5e-3  # 40 layers x ~0.27 ms
    # the rooflines: the predictions also hold the eager launches' host time, which the next test checks
    gap = q4.prediction.roofline_ttft_s - fp.prediction.roofline_ttft_s
    assert abs(gap - extra) < 0.1 * extra, (gap, extra)
    # below the threshold the fused GEMM runs instead: no such pass
    short = dict(kw, prompt_len=DEQUANT_MIN_TOKENS // 2)
    gap_short = plan(L13, 70 * GiB, H100, W4, **short).prediction.roofline_ttft_s - plan(
        L13, 70 * GiB, H100, FP16, **short).prediction.roofline_ttft_s
    assert gap_short < 0.2 * extra


def test_eager_prefill_pays_its_launches_on_the_host():
    """Prefills run eagerly: a layer takes at least its launches x eager_launch_s (costmodel
    eager_prefill_launches). The long-prefill path of a 13B int4 layer with the budget's 64 MiB workspace issues
    42 kernels (12 column chunks; the H100 trace had 43); with the launches made slow enough, the predicted
    TTFT of an all-resident model is 40 layers of them, and the roofline does not move."""
    from vramwise.memory.budget import DEQUANT_WORKSPACE_BYTES, DEQUANT_WORKSPACE_CHOICES
    from vramwise.memory.costmodel import EAGER_LAYER_BASE_LAUNCHES, eager_prefill_launches

    mats = [(15360, 5120), (5120, 5120), (27648, 5120), (5120, 13824)]
    assert eager_prefill_launches(mats, 64 * MiB) == 42
    assert eager_prefill_launches(mats, None) == EAGER_LAYER_BASE_LAUNCHES + 4
    assert eager_prefill_launches([(5120, 5120)], 1 << 30) == EAGER_LAYER_BASE_LAUNCHES + 2  # one chunk: no copy
    kw = dict(max_model_len=1024, max_num_seqs=1, prompt_len=512, gen_len=16, force_policy="resident",
              alternatives=False, max_num_batched_tokens=512)
    fast = plan(L13, 70 * GiB, H100, W4, **kw)
    slow_dev = replace(H100, eager_launch_s=1e-3)
    slow = plan(L13, 70 * GiB, slow_dev, W4, **kw)
    # with memory to spare the planner takes the largest dequantize workspace: fewest launches (19 a layer)
    assert slow.dequant_workspace_bytes == max(DEQUANT_WORKSPACE_CHOICES) > DEQUANT_WORKSPACE_BYTES
    assert eager_prefill_launches(mats, slow.dequant_workspace_bytes) == 19
    want = 40 * eager_prefill_launches(mats, slow.dequant_workspace_bytes) * 1e-3
    assert want < slow.prediction.ttft_s < want * 1.05
    assert slow.prediction.roofline_ttft_s == fast.prediction.roofline_ttft_s


def test_planner_sizes_the_dequantize_workspace_within_the_budget(monkeypatch):
    """Under 6 GiB the dequantize workspace competes with the KV pool, the ring and resident layers: the planner
    weighs budget.DEQUANT_WORKSPACE_CHOICES, the workspace term holds the one it picks, and the pick predicts
    a TTFT no worse (and a decode no slower) than the 64 MiB the engine used before."""
    from vramwise.memory import planner as planner_mod
    from vramwise.memory.budget import DEQUANT_WORKSPACE_CHOICES, workspace_bytes

    kw = dict(max_model_len=640, max_num_seqs=1, alternatives=False)
    chosen = plan(L13, 6 * GiB, H100, W4, **kw)
    assert chosen.dequant_workspace_bytes in DEQUANT_WORKSPACE_CHOICES
    assert chosen.budget.workspace == workspace_bytes(L13, 512, 640, quantized=True, num_sms=132,
                                                      dequant_bytes=chosen.dequant_workspace_bytes)
    assert chosen.budget.total <= chosen.budget.limit
    monkeypatch.setattr(planner_mod, "DEQUANT_WORKSPACE_CHOICES", (64 * MiB,))
    before = plan(L13, 6 * GiB, H100, W4, **kw)
    assert before.dequant_workspace_bytes == 64 * MiB
    assert chosen.prediction.ttft_s <= before.prediction.ttft_s
    assert chosen.prediction.decode_tok_s_b1 >= before.prediction.decode_tok_s_b1 * 0.995


def test_prefill_offload_threshold_and_memory_are_what_the_driver_runs():
    """--prefill-offload (memory/offload.py "Prefill offload"): the threshold is a whole-step comparison above
    the decode batch (decode steps keep their CPU layers on the CPU, as the decode model costs them); the
    twins' one layer of device KV pages (model dtype) is in the KV term; a CPU placement plans the one weight
    slot the driver's twins get when nothing streams."""
    caps = driver_caps("packed", prefill_offload=True)
    assert caps.prefill_offload and caps.cpu_weights == "packed" and "prefill offload" in caps.name
    kw = {"max_model_len": 640, "kv_dtype": "int8", "alternatives": False}
    off = plan(L13, 6 * GiB, H100, W4, max_num_seqs=1, driver=caps, **kw)
    on_cpu = plan(L13, 6 * GiB, H100, W4, max_num_seqs=1, driver=driver_caps("packed"), force_policy="mixed", **kw)
    assert off.policy == "mixed" and off.num_cpu > 0 and on_cpu.prefill_offload_min_tokens is None
    w = model_weights(L13, W4)
    cpu_layers = [i for i, x in enumerate(off.layers) if x == CPU]
    streamed = sum(w.layer_bytes[i] for i, x in enumerate(off.layers) if x == STREAMED)
    # host: streamed layers, CPU layers packed (their CPU form) and again as loaded (the twins), embeddings
    assert off.host_weight_bytes == streamed + 2 * sum(w.layer_bytes[i] for i in cpu_layers) + 32000 * 5120 * 2
    assert 1 < off.prefill_offload_min_tokens <= 512
    assert off.prediction.ttft_s < on_cpu.prediction.ttft_s / 3  # the 512-token prompt's CPU layers on the GPU
    twin = 2 * L13.num_key_value_heads * L13.head_dim * 2  # fp16 K and V per token
    gpu_layers = sum(1 for x in off.layers if x != CPU)
    per_token = off.kv_bytes_per_token  # the GPU-side layers' pool
    assert per_token % gpu_layers == 0
    tokens = (off.kv_num_blocks + off.kv_scratch_blocks) * off.kv_block_size
    assert off.budget.kv_pool == tokens * (per_token + twin)
    batch16 = plan(L13, 6 * GiB, H100, W4, max_num_seqs=16, driver=caps, **kw)
    if batch16.prefill_offload_min_tokens is not None:
        assert batch16.prefill_offload_min_tokens > 16  # decode steps of up to 16 sequences stay on the CPU
    cpu = plan(L13, 6 * GiB, H100, W4, max_num_seqs=1, force_policy="cpu", driver=caps, **kw)
    assert cpu.num_stream_buffers == 1 and cpu.prefill_offload_min_tokens is not None
    assert cpu.budget.stream_buffers == max(model_weights(L13, W4).layer_bytes)
