"""Long-prefill dequantize pipeline (kernels/dequant_pipeline.py): the next int4 weight is dequantized on a side
stream while cuBLAS multiplies by the current one. The GPU tests check it computes exactly what the serial path
computes (same dequantized weights, same cuBLAS product) in call order, out of order, in chunks and in an engine;
the CPU tests check where it is (not) installed."""

from __future__ import annotations

import pytest
import torch

from vramwise.kernels import w4a16
from vramwise.kernels.dequant_pipeline import DequantPipeline, install_dequant_pipeline
from vramwise.quant import QuantLinear, QuantSpec

SHAPES = [(384, 256), (256, 384), (768, 256), (256, 768)]  # (N, K): qkv, o, gate_up, down of a small layer


def _modules(device: str, bits: int = 4) -> list[QuantLinear]:
    torch.manual_seed(0)
    spec = QuantSpec.int4(64) if bits == 4 else QuantSpec.int8()
    mods = []
    for n, k in SHAPES:
        lin = torch.nn.Linear(k, n, bias=False).to(device)
        mods.append(QuantLinear.from_linear(lin, spec))
    return mods


def test_not_installed_off_cuda_or_without_int4_linears():
    assert install_dequant_pipeline(_modules("cpu"), torch.device("cpu")) is None
    assert install_dequant_pipeline(_modules("cpu", bits=8), torch.device("cuda")) is None
    assert all(m.dequant_pipeline is None for m in _modules("cpu"))
    with pytest.raises(ValueError, match="CUDA"):
        DequantPipeline(torch.device("cpu"), 1 << 20)


def test_dequantize_out_must_match():
    mods = _modules("cpu")
    m = mods[0]
    with pytest.raises(ValueError, match="out must be"):
        w4a16.w4a16_dequantize(m.qweight, m.scales, m.mins, m.group_size, torch.float16,
                               out=torch.empty(3, 3, dtype=torch.float16))


def test_engine_installs_only_for_a_resident_cuda_model(tmp_path):
    from fixtures import make_tiny_hf_model

    from vramwise.llm import LLM

    path = make_tiny_hf_model(tmp_path / "m", "llama_gqa")
    llm = LLM(path, device="cpu", quantization="int4", max_model_len=64, show_progress=False)
    assert llm.engine.dequant_pipeline is None  # CPU: the torch reference, nothing to overlap


def _serial(mods, x):
    return [w4a16.w4a16_matmul(x[:, : m.in_features].contiguous(), m.qweight, m.scales, m.mins, m.group_size,
                               config=w4a16.DequantConfig(2)) for m in mods]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("workspace", [1 << 20, 128 * 768 * 2])  # whole weights; column chunks (128-384)
def test_pipeline_equals_serial_in_order_and_out_of_order(dtype, workspace, monkeypatch):
    mods = _modules("cuda")
    pipe = install_dequant_pipeline(mods, torch.device("cuda"), workspace_bytes=workspace)
    assert pipe is not None and all(m.dequant_pipeline is pipe for m in mods)
    x = torch.randn(w4a16.DEQUANT_MIN_M + 44, 768, device="cuda", dtype=dtype)
    with monkeypatch.context() as mp:  # the serial path in the same column chunks: the same cuBLAS calls
        mp.setattr(w4a16, "DEQUANT_WORKSPACE_BYTES", workspace)
        want = _serial(mods, x)
    for _ in range(3):  # pass 1 learns the order (in chunks: prefetches the next chunk), passes 2-3 prefetch all
        got = [m(x[:, : m.in_features]) for m in mods]
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    assert pipe.prefetch_hits >= 2 * len(mods) - 1
    misses = pipe.prefetch_misses
    got = [m(x[:, : m.in_features]) for m in reversed(mods)]  # the learned order is wrong now
    for g, w in zip(got, reversed(want)):
        assert torch.equal(g, w)
    assert pipe.prefetch_misses > misses
    # the fused entry points (residual add, SwiGLU) go through it at these sizes too
    hits = pipe.prefetch_hits
    r = torch.randn(x.shape[0], mods[1].out_features, device="cuda", dtype=dtype)
    assert torch.equal(mods[1].forward_add(x[:, : mods[1].in_features], r), want[1] + r)
    assert pipe.prefetch_hits + pipe.prefetch_misses > hits
    # short steps (decode) bypass it
    few = x[:4, :256].contiguous()
    assert torch.equal(mods[0](few), w4a16.w4a16_matmul(few, mods[0].qweight, mods[0].scales, mods[0].mins, 64))


@pytest.mark.gpu
def test_engine_greedy_outputs_equal_with_and_without_the_pipeline(tmp_path):
    from fixtures import make_tiny_hf_model

    from vramwise.llm import LLM
    from vramwise.sampling_params import SamplingParams

    path = make_tiny_hf_model(tmp_path / "m", "llama_gqa")
    prompt = [(7 * j) % 200 + 3 for j in range(200)]  # two in one step: >= DEQUANT_MIN_M rows, a long prefill
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = []
    for on in (False, True):
        llm = LLM(path, device="cuda", quantization="int4", max_model_len=256, show_progress=False,
                  dequant_pipeline=on)
        assert (llm.engine.dequant_pipeline is not None) == on
        outs.append([o.outputs[0].token_ids for o in llm.generate([prompt, prompt[:190]], params)])
        if on:
            assert llm.engine.dequant_pipeline.prefetch_hits > 0
        del llm
    assert outs[0] == outs[1]


def test_off_by_default_in_every_entry_point():
    """Experimental (EngineConfig comment): the config, the LLM class and the CLI all default to off."""
    import inspect

    from vramwise.cli import build_parser
    from vramwise.config import EngineConfig
    from vramwise.llm import LLM

    assert EngineConfig().dequant_pipeline is False
    assert inspect.signature(LLM.__init__).parameters["dequant_pipeline"].default is False
    args = build_parser().parse_args(["serve"])
    assert args.dequant_pipeline is False
